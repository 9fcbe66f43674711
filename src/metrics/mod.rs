//! Prometheus metrics: a small process-wide registry of counters, gauges and histograms with label
//! sets, rendered in the text exposition format 0.0.4, and the `/metrics` HTTP server each service
//! starts when `[metrics] listen` is set.
//!
//! Every family is declared once in [`FAMILIES`] (name, type, help, labels); [`NAMES`] lists them
//! for the deploy dashboards' cross-check. Labels are bounded (sites, tenants, states, feeds,
//! reasons, directions, GPUs), never job ids. Gauges of the broker's live state are set in bulk by
//! the core on its tick ([`Registry::set_family`]); counters and histograms are updated where the
//! event happens, which allocates only the first time a label set is seen.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context;
use serde::Deserialize;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric family name this code exports.
pub const NAMES: &[&str] = &[
    "hybroker_jobs",
    "hybroker_jobs_finished_total",
    "hybroker_queue_depth",
    "hybroker_queue_oldest_wait_seconds",
    "hybroker_placement_duration_seconds",
    "hybroker_submit_to_dispatch_seconds",
    "hybroker_cost_estimated_usd_total",
    "hybroker_cost_actual_usd_total",
    "hybroker_tenant_budget_used_ratio",
    "hybroker_price_feed_age_seconds",
    "hybroker_price_feed_stale",
    "hybroker_agents_connected",
    "hybroker_tls_handshake_failures_total",
    "hybroker_staging_bytes_total",
    "hybroker_staging_duration_seconds",
    "hybroker_gateway_requests_total",
    "hybroker_gateway_request_duration_seconds",
    "hybroker_gpu_utilization_ratio",
    "hybroker_gpu_memory_used_bytes",
    "hybroker_gpu_memory_total_bytes",
    "hybroker_gpu_temperature_celsius",
    "hybroker_gpu_power_watts",
    "hybroker_gpu_ecc_errors_total",
    "hybroker_gpu_healthy",
    "hybroker_agent_attempts_running",
    "hybroker_agent_staging_bytes_total",
];

/// A family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family's declaration.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    /// Histograms' upper bounds (ascending; `+Inf` is implied).
    pub buckets: &'static [f64],
}

/// Latencies inside the broker: 100 µs to 10 s.
const FAST: &[f64] = &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];
/// Waits and transfers: 10 ms to 1 h.
const SLOW: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

const fn family(name: &'static str, kind: Kind, help: &'static str, labels: &'static [&'static str]) -> Family {
    Family { name, kind, help, labels, buckets: &[] }
}

const fn histogram(
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    b: &'static [f64],
) -> Family {
    Family { name, kind: Kind::Histogram, help, labels, buckets: b }
}

use Kind::{Counter, Gauge};

/// Every family, in [`NAMES`] order.
pub static FAMILIES: &[Family] = &[
    family("hybroker_jobs", Gauge, "Unfinished jobs by state and site.", &["state", "site"]),
    family("hybroker_jobs_finished_total", Counter, "Jobs that reached a terminal state.", &["state", "site"]),
    family("hybroker_queue_depth", Gauge, "Jobs waiting: queued (site none) or placed, not yet bound.", &["site"]),
    family("hybroker_queue_oldest_wait_seconds", Gauge, "Age of the oldest waiting job since submit.", &["site"]),
    histogram("hybroker_placement_duration_seconds", "Placement engine decision time.", &[], FAST),
    histogram("hybroker_submit_to_dispatch_seconds", "Time from submit to the first lease.", &[], SLOW),
    family(
        "hybroker_cost_estimated_usd_total",
        Counter,
        "Estimated cost of the attempts dispatched (their placement decision's total).",
        &["tenant", "site"],
    ),
    family("hybroker_cost_actual_usd_total", Counter, "Cost accrued by ended attempts.", &["tenant", "site"]),
    family("hybroker_tenant_budget_used_ratio", Gauge, "Share of the monthly budget spent.", &["tenant"]),
    family("hybroker_price_feed_age_seconds", Gauge, "Age of each live price feed's last good prices.", &["feed"]),
    family("hybroker_price_feed_stale", Gauge, "1 when a live price feed is stale or never fetched.", &["feed"]),
    family("hybroker_agents_connected", Gauge, "Agents connected, by site.", &["site"]),
    family(
        "hybroker_tls_handshake_failures_total",
        Counter,
        "Failed or refused TLS handshakes by reason (e.g. expired, not_yet_valid, wrong_eku, path_len, \
         no_client_hello, protocol_version), and sockets closed unread: too_many_unfinished (their \
         source address has too many unfinished handshakes), server_busy (too many in all).",
        &["reason"],
    ),
    family("hybroker_staging_bytes_total", Counter, "Bytes staged by ended attempts.", &["direction", "site"]),
    histogram("hybroker_staging_duration_seconds", "Stage-in and stage-out durations.", &["direction"], SLOW),
    family("hybroker_gateway_requests_total", Counter, "Gateway HTTP requests.", &["route", "method", "status"]),
    histogram("hybroker_gateway_request_duration_seconds", "Gateway HTTP request latency.", &["route"], FAST),
    family("hybroker_gpu_utilization_ratio", Gauge, "GPU utilisation (0-1).", &["gpu", "model"]),
    family("hybroker_gpu_memory_used_bytes", Gauge, "GPU memory in use.", &["gpu", "model"]),
    family("hybroker_gpu_memory_total_bytes", Gauge, "GPU memory in all.", &["gpu", "model"]),
    family("hybroker_gpu_temperature_celsius", Gauge, "GPU die temperature.", &["gpu", "model"]),
    family("hybroker_gpu_power_watts", Gauge, "GPU power draw.", &["gpu", "model"]),
    family("hybroker_gpu_ecc_errors_total", Counter, "Volatile uncorrected ECC errors.", &["gpu", "model"]),
    family("hybroker_gpu_healthy", Gauge, "1 when the GPU is healthy.", &["gpu", "model"]),
    family("hybroker_agent_attempts_running", Gauge, "Attempts running on this agent.", &[]),
    family("hybroker_agent_staging_bytes_total", Counter, "Bytes this agent staged.", &["direction"]),
];

/// One labelled series.
#[derive(Debug, Clone)]
struct Series {
    labels: Vec<String>,
    value: f64,
    /// Histograms: per-bucket (not cumulative) counts, the last one for `+Inf`.
    buckets: Vec<u64>,
    count: u64,
}

/// The process's metrics.
#[derive(Debug)]
pub struct Registry {
    series: Mutex<Vec<Vec<Series>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self { series: Mutex::new(FAMILIES.iter().map(|_| Vec::new()).collect()) }
    }
}

/// The process-wide registry.
pub fn global() -> &'static Registry {
    static GLOBAL: OnceLock<Registry> = OnceLock::new();
    GLOBAL.get_or_init(Registry::default)
}

fn index(name: &str) -> Option<usize> {
    let i = FAMILIES.iter().position(|f| f.name == name);
    debug_assert!(i.is_some(), "unknown metric {name}");
    i
}

impl Registry {
    fn with_series(&self, name: &str, labels: &[&str], f: impl FnOnce(&Family, &mut Series)) {
        let Some(i) = index(name) else { return };
        let fam = &FAMILIES[i];
        debug_assert_eq!(fam.labels.len(), labels.len(), "labels of {name}");
        let mut all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let list = &mut all[i];
        let at = match list.iter().position(|s| s.labels.iter().map(String::as_str).eq(labels.iter().copied())) {
            Some(at) => at,
            None => {
                let buckets = if fam.kind == Kind::Histogram { vec![0; fam.buckets.len() + 1] } else { vec![] };
                list.push(Series {
                    labels: labels.iter().map(|l| l.to_string()).collect(),
                    value: 0.0,
                    buckets,
                    count: 0,
                });
                list.len() - 1
            }
        };
        f(fam, &mut list[at]);
    }

    /// Adds `by` (≥ 0) to a counter.
    pub fn inc(&self, name: &str, labels: &[&str], by: f64) {
        self.with_series(name, labels, |_, s| s.value += by.max(0.0));
    }

    /// Sets one gauge.
    pub fn set(&self, name: &str, labels: &[&str], value: f64) {
        self.with_series(name, labels, |_, s| s.value = value);
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, name: &str, labels: &[&str], value: f64) {
        self.with_series(name, labels, |fam, s| {
            let bucket = fam.buckets.iter().position(|b| value <= *b).unwrap_or(fam.buckets.len());
            s.buckets[bucket] += 1;
            s.count += 1;
            s.value += value;
        });
    }

    /// Replaces every series of a gauge family (series no longer present disappear).
    pub fn set_family(&self, name: &str, series: impl IntoIterator<Item = (Vec<String>, f64)>) {
        let Some(i) = index(name) else { return };
        let new: Vec<Series> =
            series.into_iter().map(|(labels, value)| Series { labels, value, buckets: vec![], count: 0 }).collect();
        debug_assert!(new.iter().all(|s| s.labels.len() == FAMILIES[i].labels.len()), "labels of {name}");
        self.series.lock().unwrap_or_else(|e| e.into_inner())[i] = new;
    }

    /// The text exposition (format 0.0.4) of every family with at least one series.
    pub fn render(&self) -> String {
        let all = self.series.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out = String::new();
        for (fam, list) in FAMILIES.iter().zip(&all) {
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(out, "# HELP {} {}", fam.name, fam.help.replace('\\', "\\\\").replace('\n', "\\n"));
            let _ = writeln!(out, "# TYPE {} {}", fam.name, fam.kind.as_str());
            for s in list {
                let pairs: Vec<(&str, &str)> =
                    fam.labels.iter().copied().zip(s.labels.iter().map(String::as_str)).collect();
                if fam.kind != Kind::Histogram {
                    let _ = writeln!(out, "{}{} {}", fam.name, labels(&pairs, None), number(s.value));
                    continue;
                }
                let mut cumulative = 0;
                for (i, n) in s.buckets.iter().enumerate() {
                    cumulative += n;
                    let le = fam.buckets.get(i).map_or_else(|| "+Inf".to_string(), |b| number(*b));
                    let _ = writeln!(out, "{}_bucket{} {cumulative}", fam.name, labels(&pairs, Some(&le)));
                }
                let _ = writeln!(out, "{}_sum{} {}", fam.name, labels(&pairs, None), number(s.value));
                let _ = writeln!(out, "{}_count{} {}", fam.name, labels(&pairs, None), s.count);
            }
        }
        out
    }
}

/// `{a="x",b="y"}` (with `le` last for buckets), or nothing without labels.
fn labels(pairs: &[(&str, &str)], le: Option<&str>) -> String {
    let mut parts: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

/// A label value escaped for the text format.
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A sample value as the text format spells it.
fn number(v: f64) -> String {
    match v {
        v if v.is_nan() => "NaN".into(),
        v if v == f64::INFINITY => "+Inf".into(),
        v if v == f64::NEG_INFINITY => "-Inf".into(),
        v => v.to_string(),
    }
}

/// `[metrics]`: the Prometheus endpoint of a service (off by default).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Where `GET /metrics` is served (plain HTTP), e.g. `127.0.0.1:9464`; port 0 picks one.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Write the bound address to this file once listening (useful with port 0).
    #[serde(default)]
    pub addr_file: Option<PathBuf>,
}

/// Refreshes scrape-time gauges just before a scrape is rendered.
pub type Refresh = Arc<dyn Fn(&Registry) + Send + Sync>;

/// The running `/metrics` server; stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the `/metrics` server when the section says where; `None` when metrics are off.
pub async fn start(section: &MetricsSection, refresh: Option<Refresh>) -> anyhow::Result<Option<Server>> {
    let Some(listen) = section.listen else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("metrics: binding {listen}"))?;
    let addr = listener.local_addr()?;
    if let Some(path) = &section.addr_file {
        crate::cli::write_atomically(path, &addr.to_string()).context("metrics addr_file")?;
    }
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let refresh = refresh.clone();
            async move {
                if let Some(refresh) = &refresh {
                    refresh(global());
                }
                ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], global().render())
            }
        }),
    );
    tracing::info!(%addr, "metrics listening at /metrics");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(Some(Server { addr, task }))
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
