//! What the CLI prints: aligned tables of jobs and agents, one job's details, one line per job event,
//! and the exit status a followed job ends the process with. Text from the API (names, labels,
//! reasons, event messages) is shown with control and bidirectional formatting characters escaped
//! (`\u{202e}`, [`crate::model::text::escape`]), so it cannot reorder or rewrite what is printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use crate::gateway::api::{Agent, Job, JobEvent};
use crate::model::state::JobState;
use crate::model::text::escape;

/// Left-aligned columns two spaces apart; the last column is not padded. Cells are shown escaped.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> =
        rows.iter().map(|row| row.iter().map(|cell| escape(cell).into_owned()).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn or_dash(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => "-".into(),
    }
}

pub fn jobs_table(jobs: &[Job], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.name.clone(),
                j.state.clone(),
                or_dash(j.site.as_deref()),
                or_dash(j.agent.as_deref()),
                j.exit_code.map_or("-".into(), |c| c.to_string()),
                age(&j.created_at, now),
            ]
        })
        .collect();
    table(&["ID", "NAME", "STATE", "SITE", "AGENT", "EXIT", "AGE"], &rows)
}

pub fn agents_table(agents: &[Agent]) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                yes_no(a.connected),
                yes_no(a.draining),
                gpus(a),
                a.running_jobs.len().to_string(),
                a.isolation.clone(),
                a.dedicated_tenant.clone().unwrap_or_else(|| "any".into()),
            ]
        })
        .collect();
    table(&["ID", "CONNECTED", "DRAINING", "GPUS", "RUNNING", "ISOLATION", "TENANTS"], &rows)
}

/// `2xH100-80GB [sim]`, models in order of first appearance; unhealthy GPUs counted.
pub fn gpus(agent: &Agent) -> String {
    if agent.gpus.is_empty() {
        return "-".into();
    }
    let mut models: Vec<(&str, usize)> = Vec::new();
    for g in &agent.gpus {
        match models.iter_mut().find(|(m, _)| *m == g.model) {
            Some((_, n)) => *n += 1,
            None => models.push((&g.model, 1)),
        }
    }
    let mut s = models.iter().map(|(m, n)| format!("{n}x{m}")).collect::<Vec<_>>().join(",");
    let unhealthy = agent.gpus.iter().filter(|g| !g.healthy).count();
    if unhealthy > 0 {
        let _ = write!(s, " ({unhealthy} unhealthy)");
    }
    if agent.gpus.iter().any(|g| g.simulated) {
        s.push_str(" [sim]");
    }
    s
}

fn labels(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        "-".into()
    } else {
        labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }
}

/// `NAME=<redacted>` for each of the spec's `secret_env` names, whatever the answer holds as values.
fn secret_names(spec: &serde_json::Value) -> String {
    match spec.get("secret_env").and_then(|s| s.as_object()) {
        Some(names) if !names.is_empty() => {
            let mut names: Vec<String> =
                names.keys().map(|k| format!("{k}={}", crate::model::secret::REDACTED)).collect();
            names.sort();
            names.join(",")
        }
        _ => "-".into(),
    }
}

/// One job, a field per line.
pub fn job_details(j: &Job) -> String {
    let state = if j.reason.is_empty() { j.state.clone() } else { format!("{} ({})", j.state, j.reason) };
    let fields = [
        ("id", j.id.clone()),
        ("name", j.name.clone()),
        ("tenant", j.tenant.clone()),
        ("state", state),
        (
            "attempts",
            match j.preemptions {
                0 => format!("{}/{}", j.attempts, j.max_attempts),
                n => format!("{}/{} ({n} preempted, not counted)", j.attempts, j.max_attempts),
            },
        ),
        ("site", or_dash(j.site.as_deref())),
        ("agent", or_dash(j.agent.as_deref())),
        ("exit code", j.exit_code.map_or("-".into(), |c| c.to_string())),
        ("labels", labels(&j.labels)),
        ("secrets", secret_names(&j.spec)),
        (
            "inputs",
            if j.input_objects == 0 {
                "-".into()
            } else {
                format!("{} objects, {} bytes", j.input_objects, j.input_bytes)
            },
        ),
        ("outputs", if j.outputs.is_empty() { "-".into() } else { j.outputs.join(" ") }),
        ("created", j.created_at.clone()),
        ("updated", j.updated_at.clone()),
        ("trace", or_dash(j.trace_id.as_deref())),
    ];
    fields.iter().map(|(k, v)| format!("{:<10} {}\n", format!("{k}:"), escape(v))).collect()
}

/// One agent, a field per line, then one line per GPU.
/// The agent certificate's expiry as `agents get` shows it: `expires <time>`, or `EXPIRED at <time>`
/// (it must enrol again with a new join token), or `-` when unknown.
fn cert_expiry(not_after: Option<&str>) -> String {
    let Some(at) = not_after else { return "-".into() };
    match humantime::parse_rfc3339(at) {
        Ok(t) if t <= std::time::SystemTime::now() => format!("EXPIRED at {at} (enrol again with a new join token)"),
        _ => format!("expires {at}"),
    }
}

pub fn agent_details(a: &Agent) -> String {
    let mut out = String::new();
    let running = if a.running_jobs.is_empty() { "-".into() } else { a.running_jobs.join(", ") };
    let fields = [
        ("id", a.id.clone()),
        ("connected", if a.connected { "yes" } else { "no" }.into()),
        ("draining", if a.draining { "yes" } else { "no" }.into()),
        ("isolation", a.isolation.clone()),
        ("tenants", a.dedicated_tenant.as_ref().map_or("any".into(), |t| format!("{t} only (dedicated)"))),
        ("cpus", a.cpus.to_string()),
        ("memory", format!("{} MiB", a.memory_mib)),
        ("labels", labels(&a.labels)),
        ("running", running),
        ("last seen", a.last_seen.clone()),
        ("cert", cert_expiry(a.cert_not_after.as_deref())),
        ("gpus", gpus(a)),
    ];
    for (k, v) in fields {
        let _ = writeln!(out, "{:<10} {}", format!("{k}:"), escape(&v));
    }
    for g in &a.gpus {
        let line = format!(
            "  gpu {}: {} ({}) {} MiB {}{} util {}% temp {}C power {:.1}W ecc {}{} uuid {}",
            g.index,
            g.model,
            g.name,
            g.memory_mib,
            if g.healthy { "healthy" } else { "UNHEALTHY" },
            if g.simulated { " [simulated]" } else { "" },
            g.utilization_pct,
            g.temperature_c,
            f64::from(g.power_mw) / 1000.0,
            g.ecc_errors,
            if g.mig_enabled { " mig" } else { "" },
            g.uuid,
        );
        let _ = writeln!(out, "{}", escape(&line));
    }
    out
}

/// `12:00:01 running    lab/node-a           started`: the event's UTC time of day, state, agent (`-`
/// before there is one) and reason (or exit code).
pub fn event_line(e: &JobEvent) -> String {
    let time = e.at.split_once('T').map_or(e.at.as_str(), |(_, t)| t.get(..8).unwrap_or(t));
    let agent = e.agent.as_deref().filter(|a| !a.is_empty()).unwrap_or("-");
    let reason = match e.exit_code {
        Some(code) if e.reason.is_empty() => format!("exit code {code}"),
        _ => e.reason.clone(),
    };
    let (state, agent, reason) = (escape(&e.state), escape(agent), escape(&reason));
    format!("{} {state:<10} {agent:<20} {reason}", escape(time)).trim_end().to_string()
}

/// The summary of a job that has ended: `hello 0190… succeeded on lab/node-a, exit code 0, in 3s`.
pub fn final_line(j: &Job) -> String {
    let mut line = format!("{} {} {}", escape(&j.name), escape(&j.id), escape(&j.state));
    if let Some(agent) = j.agent.as_deref().filter(|a| !a.is_empty()) {
        let _ = write!(line, " on {}", escape(agent));
    }
    if let Some(code) = j.exit_code {
        let _ = write!(line, ", exit code {code}");
    }
    if let (Ok(from), Ok(to)) = (parse_time(&j.created_at), parse_time(&j.updated_at)) {
        let _ = write!(line, ", in {}", short_duration(to.duration_since(from).unwrap_or_default()));
    }
    if j.state != "succeeded" && !j.reason.is_empty() {
        let _ = write!(line, ": {}", escape(&j.reason));
    }
    line
}

/// The process exit status for a job's result: 0 succeeded; a failed job's own exit code clamped
/// to 1..=125 (1 when it has none or it is 0); 1 cancelled or not ended. The same for the tenants'
/// `--follow` and the operators' `--wait` (the table in [`crate::cli::report`]).
pub fn exit_status(j: &Job) -> i32 {
    use crate::cli::report::{EXIT_JOB_FAILED, EXIT_OK};
    match j.state.as_str() {
        "succeeded" => EXIT_OK,
        "failed" => j.exit_code.filter(|c| *c != 0).map_or(EXIT_JOB_FAILED, |c| c.clamp(1, 125)),
        _ => EXIT_JOB_FAILED,
    }
}

pub fn is_terminal(state: &str) -> bool {
    state.parse::<JobState>().is_ok_and(JobState::is_terminal)
}

fn parse_time(s: &str) -> Result<SystemTime, humantime::TimestampError> {
    humantime::parse_rfc3339_weak(s)
}

/// Age since an RFC 3339 time: `42s`, `5m`, `3h`, `2d`; `-` when it does not parse.
pub fn age(rfc3339: &str, now: SystemTime) -> String {
    parse_time(rfc3339).map_or("-".into(), |t| short_duration(now.duration_since(t).unwrap_or_default()))
}

pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
#[path = "output_tests.rs"]
mod tests;
