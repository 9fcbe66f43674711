//! Prometheus metrics: a small process-wide registry of counters, gauges and histograms with label
//! sets, rendered in the text exposition format 0.0.4, and the `/metrics` HTTP server each service
//! starts when `[metrics] listen` is set.
//!
//! Every family is declared once in [`FAMILIES`] (name, type, help, labels); [`NAMES`] lists them
//! for the deploy dashboards' cross-check. Labels are bounded (sites, tenants, states, feeds,
//! reasons, directions, GPUs), never job ids. Gauges of the broker's live state are set in bulk by
//! the core on its tick ([`Registry::set_family`]); counters and histograms are updated where the
//! event happens: a lock-free load of the family's map, a hash lookup and an atomic add (a
//! [`Handle`] skips the lookup), allocating only the first time a label set is seen. Known label
//! sets (configured sites, tenants, job states) are [declared](Registry::declare) so they read 0
//! instead of being absent.
//! Every scrape adds the `process_*` metrics and `hybroker_build_info`. A service may serve more
//! routes on the same listener ([`start_with_routes`]: the broker's `/sd/agents`).

mod families;
mod known;
mod process;
mod registry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;

pub use families::{FAMILIES, Family, Kind, NAMES};
pub use known::{declare_agent_series, declare_broker_series, declare_tls_series};
pub use registry::{Handle, Registry, escape, global};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
    start_with_routes(section, refresh, axum::Router::new()).await
}

/// [`start`], serving `routes` beside `/metrics` (the broker's Prometheus service discovery).
pub async fn start_with_routes(
    section: &MetricsSection,
    refresh: Option<Refresh>,
    routes: axum::Router,
) -> anyhow::Result<Option<Server>> {
    let Some(listen) = section.listen else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("metrics: binding {listen}"))?;
    let addr = listener.local_addr()?;
    if let Some(path) = &section.addr_file {
        crate::private_files::write_atomically(path, &addr.to_string()).context("metrics addr_file")?;
    }
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let refresh = refresh.clone();
                async move {
                    process::publish(global());
                    process::publish_build_info(global());
                    if let Some(refresh) = &refresh {
                        refresh(global());
                    }
                    ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], global().render())
                }
            }),
        )
        .merge(routes);
    tracing::info!(%addr, "metrics listening at /metrics");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(Some(Server { addr, task }))
}

#[cfg(test)]
mod tests;
