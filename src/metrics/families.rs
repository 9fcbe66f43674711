//! Every metric family this code exports, declared once: name, type, help, labels, buckets.

use std::collections::HashMap;
use std::sync::OnceLock;

/// Every metric family name this code exports.
pub const NAMES: &[&str] = &[
    "hybroker_jobs",
    "hybroker_jobs_finished_total",
    "hybroker_queue_depth",
    "hybroker_queue_oldest_wait_seconds",
    "hybroker_placement_duration_seconds",
    "hybroker_submit_to_dispatch_seconds",
    "hybroker_placement_wait_seconds",
    "hybroker_cost_estimated_usd_total",
    "hybroker_cost_actual_usd_total",
    "hybroker_tenant_budget_used_ratio",
    "hybroker_price_feed_age_seconds",
    "hybroker_price_feed_stale",
    "hybroker_agents_connected",
    "hybroker_site_info",
    "hybroker_tls_handshake_failures_total",
    "hybroker_tls_reload_total",
    "hybroker_cert_expiry_timestamp_seconds",
    "hybroker_enrollments_total",
    "hybroker_capacity_launches_total",
    "hybroker_capacity_instances",
    "hybroker_capacity_usd_total",
    "hybroker_cert_renewals_total",
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
    "hybroker_build_info",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "process_threads",
];

/// A family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub(super) fn as_str(self) -> &'static str {
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

/// Queue waits: 1 s to 1 day.
const WAITS: &[f64] = &[1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0];

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
    histogram(
        "hybroker_placement_wait_seconds",
        "A placed attempt's wait before its lease: the decision's estimate, and the actual.",
        &["kind"],
        WAITS,
    ),
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
        "hybroker_site_info",
        Gauge,
        "Always 1, per configured site: its kind (onprem, aws, azure) and whether it is elastic (takes \
         work before an agent exists, so 0 agents there is normal).",
        &["site", "kind", "elastic"],
    ),
    family(
        "hybroker_tls_handshake_failures_total",
        Counter,
        "Failed or refused TLS handshakes by reason (e.g. expired, not_yet_valid, wrong_eku, path_len, \
         no_client_hello, protocol_version), and sockets closed unread: too_many_unfinished (their \
         source address has too many unfinished handshakes), server_busy (too many in all).",
        &["reason"],
    ),
    family(
        "hybroker_tls_reload_total",
        Counter,
        "Reloads of this process's certificate, key and CA bundle after a change on disk or SIGHUP: ok \
         (new handshakes use them), error (a bad file: the previous ones stay in use).",
        &["result"],
    ),
    family(
        "hybroker_cert_expiry_timestamp_seconds",
        Gauge,
        "NotAfter (Unix seconds) of each certificate this process holds: its own (role broker, gateway, \
         agent or admin, by identity URI) and the CA certificates it trusts (role ca, by subject); \
         updated on reload and renewal.",
        &["role", "identity"],
    ),
    family(
        "hybroker_enrollments_total",
        Counter,
        "Agent enrolments with a join token by result: ok, unknown, expired, used_up, revoked, wrong_site \
         (the CSR names another site or node than the token allows), bad_csr, rate_limited.",
        &["result"],
    ),
    family(
        "hybroker_capacity_launches_total",
        Counter,
        "Capacity provider launches by site and result: requested, launched (the cloud answered with an \
         instance), enrolled (its agent joined), boot_timeout, terminated, or the error class of a failed \
         call (capacity, quota, invalid, throttled, transient).",
        &["site", "result"],
    ),
    family(
        "hybroker_capacity_instances",
        Gauge,
        "Instances of each elastic site by state: requested, booting, enrolled, retiring.",
        &["site", "state"],
    ),
    family(
        "hybroker_capacity_usd_total",
        Counter,
        "Instance-hours × $/h this month per elastic site, launch to termination: part used (time running \
         attempts, charged to tenants) and idle (charged to the site). Set from the broker's launch records \
         on its tick; it starts again from the month's total after a restart and falls at a new month \
         (a counter reset to PromQL's increase and rate).",
        &["site", "part"],
    ),
    family(
        "hybroker_cert_renewals_total",
        Counter,
        "Agent certificate renewals on the stream by result: ok, bad_csr, refused.",
        &["result"],
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
    family(
        "hybroker_build_info",
        Gauge,
        "Always 1: the version (and commit, when the build was given one) of this hybroker.",
        &["version", "commit"],
    ),
    family("process_cpu_seconds_total", Counter, "User and system CPU time spent in seconds.", &[]),
    family("process_resident_memory_bytes", Gauge, "Resident memory size in bytes.", &[]),
    family("process_virtual_memory_bytes", Gauge, "Virtual memory size in bytes.", &[]),
    family("process_open_fds", Gauge, "Number of open file descriptors.", &[]),
    family("process_max_fds", Gauge, "Maximum number of open file descriptors.", &[]),
    family("process_start_time_seconds", Gauge, "Start time of the process since unix epoch in seconds.", &[]),
    family("process_threads", Gauge, "Number of OS threads in the process.", &[]),
];

/// The position of a family in [`FAMILIES`] (one hash lookup); `None` for a name not declared.
pub(super) fn index(name: &str) -> Option<usize> {
    static INDEX: OnceLock<HashMap<&'static str, usize, foldhash::fast::FixedState>> = OnceLock::new();
    let i = INDEX.get_or_init(|| FAMILIES.iter().enumerate().map(|(i, f)| (f.name, i)).collect()).get(name).copied();
    debug_assert!(i.is_some(), "unknown metric {name}");
    i
}
