//! `hybroker jobs explain`: a placement decision as a table, one row per candidate.

use crate::model::text::{escape, escape_keeping_lines};
use crate::placement::engine::{Decision, Verdict};

/// The decision as people read it: the choice and its cost, then every candidate. Text is shown
/// escaped (a reason may quote what a tenant wrote, e.g. an output's path).
pub fn decision_table(d: &Decision) -> String {
    let mut head = String::new();
    let out = &mut head;
    match &d.chosen {
        Some(c) => {
            let cost = &c.offer.cost;
            out.push_str(&format!(
                "chosen:    site {} {}\nestimate:  ${:.2} = compute ${:.2} + egress ${:.2} + storage ${:.2} ({:.2} h at ${:.2}/h)\n",
                c.site,
                describe_offer(&c.offer.instance_type, c.offer.instances, &c.offer.gpu_model),
                cost.total_usd,
                cost.compute_usd,
                cost.egress_usd,
                cost.storage_usd,
                cost.hours,
                cost.usd_per_hour,
            ));
            if let Some(wait) = c.offer.wait_text() {
                out.push_str(&format!("wait:      {wait}, worth ${:.2} of delay\n", cost.delay_usd));
            }
            if !c.output_locations.is_empty() {
                out.push_str(&format!("outputs:   {}\n", c.output_locations.join(", ")));
            }
        }
        None => out.push_str("chosen:    none (every candidate was rejected)\n"),
    }
    let minutes = d.snapshot_age_ms.max(0) as f64 / 60_000.0;
    let age = match minutes {
        m if m < 120.0 => format!("{m:.0} min"),
        m if m < 2880.0 => format!("{:.1} h", m / 60.0),
        m => format!("{:.0} days", m / 1440.0),
    };
    let stale = if d.stale { " (STALE: older than allowed)" } else { "" };
    out.push_str(&format!("prices:    snapshot {}, {age} old at the decision{stale}\n", d.snapshot_id));
    if let Some(r) = &d.residency {
        out.push_str(&format!("residency: {r}\n"));
    }
    let mut out = escape_keeping_lines(&head);
    out.push('\n');
    let rows: Vec<[String; 5]> = d
        .candidates
        .iter()
        .map(|c| {
            let outputs = if c.output_locations.is_empty() { "-".to_string() } else { c.output_locations.join(",") };
            let site = escape(&c.site).into_owned();
            let outputs = escape(&outputs).into_owned();
            match &c.verdict {
                Verdict::Feasible(o) => [
                    site,
                    outputs,
                    format!("${:.2}", o.cost.total_usd),
                    format!("${:.2}", o.cost.usd_per_hour),
                    match o.wait_text() {
                        Some(wait) => format!(
                            "{}, {wait}, +${:.2} delay",
                            describe_offer(&o.instance_type, o.instances, &o.gpu_model),
                            o.cost.delay_usd
                        ),
                        None => describe_offer(&o.instance_type, o.instances, &o.gpu_model),
                    },
                ],
                Verdict::Rejected(why) => {
                    [site, outputs, "-".into(), "-".into(), format!("rejected: {}", escape(why.as_str()))]
                }
            }
        })
        .collect();
    let header = ["SITE", "OUTPUTS", "TOTAL", "$/H", "WHY"].map(String::from);
    let widths: Vec<usize> =
        (0..4).map(|i| rows.iter().map(|r| r[i].len()).chain([header[i].len()]).max().unwrap_or(0)).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn describe_offer(instance_type: &Option<String>, instances: u32, gpu_model: &Option<String>) -> String {
    match (instance_type, gpu_model) {
        (Some(t), _) => format!("{instances}x {t}"),
        (None, Some(m)) => format!("on-prem {m}"),
        (None, None) => "on-prem".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::engine::{Rejection, RejectionKind};

    #[test]
    fn reasons_quoting_tenant_text_are_shown_escaped() {
        let why = "residency: output out\u{202e}/ goes to us, data in eu";
        let d = Decision {
            chosen: None,
            candidates: vec![crate::placement::engine::Candidate {
                site: "lab".into(),
                output_locations: vec!["us-a".into()],
                verdict: Verdict::Rejected(Rejection::new(RejectionKind::Residency, why)),
            }],
            residency: Some("eu".into()),
            snapshot_id: "snap".into(),
            snapshot_age_ms: 60_000,
            stale: false,
        };
        let table = decision_table(&d);
        assert!(table.contains("chosen:    none") && table.contains("residency: eu\n"), "{table}");
        assert!(
            table.contains("lab   us-a         -    -  rejected: residency: output out\\u{202e}/ goes to us"),
            "{table}"
        );
        assert!(!table.contains('\u{202e}'), "{table}");
    }
}
