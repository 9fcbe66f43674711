//! The result: a table on stdout and the same figures as JSON.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::record::quantile;

/// Everything a run measured (the JSON document).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub agents: usize,
    pub jobs: usize,
    /// Offered jobs per second; 0 = flat out.
    pub offered_rate: f64,
    pub batch: usize,
    pub cpus_per_agent: u32,
    /// Sites configured (`--sites`; 0: placement off, first fit).
    pub sites: usize,
    /// Succeeded jobs per site they ran at.
    pub jobs_per_site: BTreeMap<String, usize>,
    /// Succeeded jobs with a placement decision (all of them with `--sites`, none without).
    pub placed_by_engine: usize,
    /// Issuing the CA, broker, admin and agent certificates.
    pub pki_seconds: f64,
    /// From starting the fleet until every agent had registered.
    pub connect_seconds: f64,
    /// The bench process's RSS growth while connecting, per agent.
    pub bench_kib_per_agent: f64,
    /// Jobs the broker acknowledged.
    pub submitted: usize,
    /// Acknowledged jobs whose completion the broker acknowledged to an agent.
    pub completed: usize,
    /// From the first submit to the last completion.
    pub run_seconds: f64,
    /// completed / run_seconds.
    pub sustained_jobs_per_second: f64,
    /// Submit (batch sent) to the assignment arriving at an agent.
    pub latency_ms: Latency,
    pub broker: BrokerUsage,
    /// SubmitBatch calls that failed as a whole and were sent again.
    pub failed_submit_calls: u64,
    /// Jobs refused inside a batch (the broker was busy) and sent again.
    pub refused_submits: u64,
    /// Acknowledged jobs that are not `succeeded` at the end, according to the job service.
    pub lost: usize,
    /// Succeeded jobs beyond those acknowledged (a retried submit that made a second job).
    pub extra_jobs: usize,
    pub storm: Option<Storm>,
    pub kill: Option<Kill>,
    /// `--renew` or `--renew-storm`.
    pub renewal: Option<RenewalReport>,
    /// This run's jobs/s against `--baseline`'s.
    pub baseline: Option<Baseline>,
    /// Every job completed and none was lost, and every agent renewed when asked to.
    pub ok: bool,
}

/// An earlier run's throughput, and this one's against it.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub path: std::path::PathBuf,
    /// The earlier run's sustained jobs/s.
    pub jobs_per_second: f64,
    /// (this run's − the earlier run's) / the earlier run's, percent.
    pub change_percent: f64,
}

impl Baseline {
    /// Reads `sustained_jobs_per_second` from an earlier result.
    pub fn read(path: &Path) -> anyhow::Result<Baseline> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading --baseline {}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("--baseline {} is not JSON", path.display()))?;
        let jobs_per_second = json["sustained_jobs_per_second"].as_f64().filter(|r| *r > 0.0).with_context(|| {
            format!("--baseline {} has no sustained_jobs_per_second (is it a bench result?)", path.display())
        })?;
        Ok(Baseline { path: path.to_path_buf(), jobs_per_second, change_percent: 0.0 })
    }

    /// This baseline compared with `jobs_per_second`.
    pub fn compared_with(self, jobs_per_second: f64) -> Baseline {
        let change_percent = (jobs_per_second - self.jobs_per_second) / self.jobs_per_second * 100.0;
        Baseline { change_percent, ..self }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// How many jobs the figures cover.
    pub samples: usize,
}

impl Latency {
    /// The figures of `sorted` (milliseconds, ascending).
    pub fn of(sorted: &[f64]) -> Self {
        Latency {
            p50: quantile(sorted, 0.5),
            p99: quantile(sorted, 0.99),
            p999: quantile(sorted, 0.999),
            max: sorted.last().copied().unwrap_or(0.0),
            samples: sorted.len(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerUsage {
    /// User + system CPU over the run (first submit to last completion), all processes.
    pub cpu_seconds: f64,
    /// cpu_seconds / run_seconds.
    pub avg_cores: f64,
    /// The highest VmHWM of any broker process, MiB (a storm included).
    pub peak_rss_mib: f64,
    /// VmRSS when the jobs had completed (before any storm), MiB.
    pub rss_after_run_mib: f64,
}

/// The reconnect storm after the run.
#[derive(Debug, Clone, Serialize)]
pub struct Storm {
    /// From the drop until every agent had registered again.
    pub reregistered_seconds: f64,
    /// Connects, handshakes and stream opens that failed (and were retried).
    pub failed_connects: u64,
    /// After a renewal: agents the broker sees on a renewed certificate once all were back.
    pub on_renewed_certificates: Option<usize>,
}

/// The broker killed with SIGKILL mid-load.
#[derive(Debug, Clone, Serialize)]
pub struct Kill {
    /// How the broker was stopped: `kill -9`, or `SIGTERM` (`--restart-broker`).
    pub signal: &'static str,
    /// From SIGTERM until the broker had exited (none for `kill -9`).
    pub exit_seconds: Option<f64>,
    /// Jobs acknowledged when it was killed.
    pub acknowledged_at_kill: usize,
    /// Jobs acknowledged over the whole run.
    pub acknowledged: usize,
    /// Acknowledged jobs that are not `succeeded` at the end.
    pub lost: usize,
    /// Jobs agents were assigned more than once (informational: at-least-once execution).
    pub completed_twice: usize,
    /// From the kill until the restarted broker answered health checks.
    pub restart_seconds: f64,
    /// From the kill until every agent had registered again.
    pub reregistered_seconds: Option<f64>,
    /// Connects that failed while the broker was away.
    pub failed_connects: u64,
}

impl Report {
    /// Prints the table.
    pub fn print(&self) {
        let rate = if self.offered_rate > 0.0 { format!("{} jobs/s", self.offered_rate) } else { "flat out".into() };
        let rows: Vec<(&str, String)> = vec![
            ("agents", format!("{} ({} cpus each)", self.agents, self.cpus_per_agent)),
            ("jobs", format!("{} in batches of {}, {rate}", self.jobs, self.batch)),
            ("sites", self.sites_row()),
            ("certificates issued", format!("{:.3} s", self.pki_seconds)),
            ("all agents connected", format!("{:.2} s", self.connect_seconds)),
            ("bench memory per agent", format!("{:.1} KiB", self.bench_kib_per_agent)),
            ("submitted / completed", format!("{} / {}", self.submitted, self.completed)),
            ("run (first submit→last done)", format!("{:.2} s", self.run_seconds)),
            ("sustained submit→complete", format!("{:.0} jobs/s", self.sustained_jobs_per_second)),
            ("baseline (--baseline)", self.baseline_row()),
            (
                "submit→agent latency",
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms, p999 {:.1} ms, max {:.1} ms",
                    self.latency_ms.p50, self.latency_ms.p99, self.latency_ms.p999, self.latency_ms.max
                ),
            ),
            ("broker cpu", format!("{:.1} s ({:.2} cores on average)", self.broker.cpu_seconds, self.broker.avg_cores)),
            (
                "broker rss",
                format!(
                    "{:.1} MiB after the run, {:.1} MiB peak",
                    self.broker.rss_after_run_mib, self.broker.peak_rss_mib
                ),
            ),
            ("retried submits", format!("{} calls, {} refused jobs", self.failed_submit_calls, self.refused_submits)),
            ("lost jobs", self.lost.to_string()),
            ("extra jobs (duplicates)", self.extra_jobs.to_string()),
        ];
        let mut rows = rows;
        if let Some(s) = &self.storm {
            rows.push(("storm: all re-registered", format!("{:.2} s", s.reregistered_seconds)));
            rows.push(("storm: failed connects", s.failed_connects.to_string()));
            if let Some(n) = s.on_renewed_certificates {
                rows.push(("storm: back on renewed certs", format!("{n} of {}", self.agents)));
            }
        }
        if let Some(k) = &self.kill {
            let graceful = k.exit_seconds.is_some();
            let label = |kill: &'static str, term: &'static str| if graceful { term } else { kill };
            rows.push((
                label("kill: acknowledged (at kill)", "restart: acknowledged (at SIGTERM)"),
                format!("{} ({})", k.acknowledged, k.acknowledged_at_kill),
            ));
            if let Some(exit) = k.exit_seconds {
                rows.push(("restart: SIGTERM to exit", format!("{exit:.2} s")));
            }
            rows.push((label("kill: lost", "restart: lost"), k.lost.to_string()));
            rows.push((label("kill: completed twice", "restart: completed twice"), k.completed_twice.to_string()));
            rows.push((
                label("kill: restart to serving", "restart: stop to serving"),
                format!("{:.2} s", k.restart_seconds),
            ));
            let again = k.reregistered_seconds.map_or("not all".into(), |s| format!("{s:.2} s"));
            rows.push((label("kill: all agents back", "restart: all agents back"), again));
            rows.push((label("kill: failed connects", "restart: failed connects"), k.failed_connects.to_string()));
        }
        if let Some(r) = &self.renewal {
            rows.extend(r.rows());
        }
        rows.retain(|(_, v)| !v.is_empty());
        rows.push(("result", if self.ok { "ok".into() } else { "FAILED".into() }));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (key, value) in rows {
            println!("  {key:<width$}  {value}");
        }
    }

    /// This run's jobs/s against the baseline's (empty without one).
    fn baseline_row(&self) -> String {
        self.baseline.as_ref().map_or_else(String::new, |b| {
            format!("{:.0} jobs/s: this run {:+.1} % ({})", b.jobs_per_second, b.change_percent, b.path.display())
        })
    }

    /// `none (first fit)`, or the sites and where the jobs ran.
    fn sites_row(&self) -> String {
        if self.sites == 0 {
            return "none (first fit)".into();
        }
        let per_site: Vec<String> = self.jobs_per_site.iter().map(|(site, n)| format!("{site} {n}")).collect();
        format!("{} ({} jobs placed by the engine: {})", self.sites, self.placed_by_engine, per_site.join(", "))
    }

    /// Writes the JSON document to `path`.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

/// What the renewals measured (the `renewal` object of the JSON).
#[derive(Debug, Clone, Serialize)]
pub struct RenewalReport {
    /// `spread` (`--renew`) or `storm` (`--renew-storm`).
    pub mode: &'static str,
    /// The window the renewals were spread over (0 for a storm).
    pub window_seconds: f64,
    /// Making every agent's key and CSR, in the bench before the run: the agents' cost.
    pub csr_seconds: f64,
    pub csr_us_per_agent: f64,
    pub agents: usize,
    /// Renewals the broker signed (and whose certificate loaded).
    pub signed: usize,
    /// Renewals refused, or signed with a certificate that did not load.
    pub refused: usize,
    /// Renewals never answered.
    pub unanswered: usize,
    /// From the signal until the last answer.
    pub seconds: f64,
    /// signed / seconds: the issuance rate.
    pub per_second: f64,
    /// From an agent first sending its CSR until its answer.
    pub latency_ms: Latency,
    /// The broker's CPU (user + system) from the signal until every renewal was answered; with
    /// `--renew` the job load runs meanwhile and is included.
    pub broker_cpu_seconds: f64,
    pub broker_avg_cores: f64,
    /// broker_cpu_seconds / signed, for a storm (nothing else runs then).
    pub broker_cpu_ms_per_renewal: Option<f64>,
    /// Renewals answered between the first submit and the last completion.
    pub during_jobs: usize,
    /// Connects, handshakes and stream opens that failed while renewing.
    pub failed_connects: u64,
    /// Streams that broke after registering while renewing.
    pub dropped_streams: u64,
    /// The first refusal, if any.
    pub first_error: Option<String>,
    /// Connected agents the broker lists with a renewed certificate's expiry afterwards.
    pub broker_shows_renewed: usize,
    /// Every agent renewed, and (without a broker kill or restart) no connect failed and no
    /// stream broke.
    pub ok: bool,
}

impl RenewalReport {
    /// The table rows.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        let how = match self.mode {
            "storm" => "storm (every agent at once)".to_string(),
            _ => format!("spread over {:.0} s", self.window_seconds),
        };
        let mut rows = vec![
            ("renewal", how),
            (
                "renewal: keys + CSRs (agents)",
                format!("{:.2} s ({:.0} µs per agent, before the run)", self.csr_seconds, self.csr_us_per_agent),
            ),
            (
                "renewal: signed / refused / lost",
                format!("{} / {} / {} of {}", self.signed, self.refused, self.unanswered, self.agents),
            ),
            ("renewal: signal→last answer", format!("{:.2} s ({:.0} renewals/s)", self.seconds, self.per_second)),
            (
                "renewal: latency",
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                    self.latency_ms.p50, self.latency_ms.p99, self.latency_ms.max
                ),
            ),
            (
                "renewal: broker cpu",
                format!("{:.2} s ({:.2} cores on average)", self.broker_cpu_seconds, self.broker_avg_cores),
            ),
        ];
        if let Some(ms) = self.broker_cpu_ms_per_renewal {
            rows.push(("renewal: broker cpu per renewal", format!("{ms:.3} ms")));
        }
        if self.mode != "storm" {
            rows.push(("renewal: answered during the jobs", self.during_jobs.to_string()));
        }
        rows.push(("renewal: failed connects / drops", format!("{} / {}", self.failed_connects, self.dropped_streams)));
        rows.push(("renewal: broker lists renewed", format!("{} of {}", self.broker_shows_renewed, self.agents)));
        if let Some(e) = &self.first_error {
            rows.push(("renewal: first refusal", e.clone()));
        }
        rows
    }
}
