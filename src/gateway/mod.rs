//! The gateway: the tenants' HTTP/JSON API, a client of the broker.
//!
//! Every request is authenticated with the broker (`Authorization: Bearer <key>`; no caching, so
//! a revoked key fails on its next request) and rate limited per tenant; the broker is called over
//! mutual TLS with a gateway-role certificate and always told the tenant, so other tenants'
//! objects are "not found". Errors are RFC 9457 problems; `/openapi.json` is generated from the
//! handlers.
//!
//! - [`api`]: the JSON shapes (shared with the CLI).
//! - `router`: routes, middleware, `/healthz`, `/readyz`, `/openapi.json`; `openapi`: the
//!   document's frame and problem responses; `job_schema`: the job files' JSON Schema.
//! - `jobs`, `streams` (events, logs), `agents`, `sites`, `data` (job outputs, tenant data in and
//!   out): the handlers; `convert`: gRPC → JSON.
//! - `auth`: API keys and rate limits; `limits`: requests without an accepted key per client
//!   address (`client_address`: the TCP peer, or behind a trusted proxy its header) and open
//!   streams per tenant; `problem`: errors; `serve`: the TLS/HTTP listener.

mod agents;
pub mod api;
mod auth;
pub mod client_address;
mod convert;
mod data;
pub mod job_schema;
mod jobs;
mod limits;
pub mod openapi;
mod placement;
mod problem;
mod router;
mod serve;
mod sites;
mod streams;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::pb::health_client::HealthClient;

use crate::config::gateway::{GatewayConfig, GatewaySection};
use crate::model::identity::Role;
use crate::proto::admin_service_client::AdminServiceClient;
use crate::proto::job_service_client::JobServiceClient;
use crate::telemetry::ClientTraces;
use crate::telemetry::grpc::{TracedChannel, traced};
use crate::tls;

pub use problem::{PROBLEM_BASE, PROBLEM_JSON};
pub use router::router;
pub use serve::ServeError;

/// What every handler shares: the broker channel, the rate limiter and the stop signal.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    broker: TracedChannel,
    limiter: auth::RateLimiter,
    limits: GatewayLimits,
    /// The last `/readyz` check and when it was made.
    last_ready: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
    max_body_bytes: usize,
    client_traces: ClientTraces,
    stopping: watch::Receiver<bool>,
}

/// The limits in front of the broker: requests without an accepted key per client address, and
/// open streams per tenant.
pub struct GatewayLimits {
    addresses: limits::AddressLimiter,
    proxies: client_address::TrustedProxies,
    streams: limits::StreamSlots,
}

impl GatewayLimits {
    /// The limits of a `[gateway]` section (validated: the header name parses).
    pub fn new(section: &GatewaySection) -> Self {
        let header = section.trusted_proxy_header.as_deref().and_then(|h| h.parse().ok());
        Self {
            addresses: limits::AddressLimiter::new(
                section.unauthenticated_per_second,
                section.unauthenticated_burst,
                section.max_client_addresses,
            ),
            proxies: client_address::TrustedProxies::new(header, section.trusted_proxies.clone()),
            streams: limits::StreamSlots::new(section.max_streams_per_tenant),
        }
    }
}

impl AppState {
    /// State over a (traced) broker channel; streams end when `stopping` turns true.
    pub fn new(
        broker: TracedChannel,
        max_body_bytes: usize,
        client_traces: ClientTraces,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        let limiter = auth::RateLimiter::default();
        let limits = GatewayLimits::new(&GatewaySection::default());
        let last_ready = tokio::sync::Mutex::default();
        let inner = Inner { broker, limiter, limits, last_ready, max_body_bytes, client_traces, stopping };
        Self { inner: Arc::new(inner) }
    }

    /// The same state with other limits; before the state is shared.
    pub fn with_limits(self, limits: GatewayLimits) -> Self {
        let Ok(mut inner) = Arc::try_unwrap(self.inner) else { panic!("limits are set before the state is shared") };
        inner.limits = limits;
        Self { inner: Arc::new(inner) }
    }

    fn jobs(&self) -> JobServiceClient<TracedChannel> {
        // A page of 1000 jobs with 64 KiB specs is 64 MiB.
        JobServiceClient::new(self.inner.broker.clone()).max_decoding_message_size(64 << 20)
    }

    /// The broker's admin service (the gateway's certificate may call `ListSites` only).
    fn admin(&self) -> AdminServiceClient<TracedChannel> {
        AdminServiceClient::new(self.inner.broker.clone())
    }

    fn health(&self) -> HealthClient<TracedChannel> {
        HealthClient::new(self.inner.broker.clone())
    }

    fn limiter(&self) -> &auth::RateLimiter {
        &self.inner.limiter
    }

    fn limits(&self) -> &GatewayLimits {
        &self.inner.limits
    }

    fn last_ready(&self) -> &tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>> {
        &self.inner.last_ready
    }

    fn max_body_bytes(&self) -> usize {
        self.inner.max_body_bytes
    }

    fn client_traces(&self) -> ClientTraces {
        self.inner.client_traces
    }

    fn stopping(&self) -> watch::Receiver<bool> {
        self.inner.stopping.clone()
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves.
///
/// The broker is dialled lazily, so the gateway starts (and `/readyz` says 503) while the broker
/// is down.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let trust_domain = tls::trust_domain_of_cert(&config.tls.cert).context("gateway certificate")?;
    let td = trust_domain.clone();
    let client_tls =
        tls::ReloadingClientTls::new("gateway", &config.tls, move |paths| tls::client_config(paths, &td, Role::Broker))
            .context("gateway tls")?;
    // The broker connection is dialled with the current files: a reload applies to the next
    // connection; the live one stays.
    let reloader = client_tls.watch(tls::RELOAD_INTERVAL);
    let broker = tls::connect_lazy(&config.broker.url, client_tls.swap(), config.broker.server_name.as_deref())?;
    // The public certificate (any CA) reloads like the others: on a change of its files or SIGHUP.
    let (public_tls, public_reloader) = match (&config.gateway.public_cert, &config.gateway.public_key) {
        (Some(cert), Some(key)) => {
            serve::public_tls(cert, key)?;
            let paths = tls::TlsPaths { ca_cert: cert.clone(), cert: cert.clone(), key: key.clone() };
            let reloading = tls::ReloadingServerTls::new(tls::PUBLIC, &paths, |p| {
                serve::public_tls(&p.cert, &p.key)
                    .map_err(|e| tls::TlsError::BadReload { path: p.cert.clone(), reason: e.to_string() })
            })
            .context("gateway public tls")?;
            (Some(reloading.swap()), Some(reloading.watch(tls::RELOAD_INTERVAL)))
        }
        _ => (None, None),
    };
    let _metrics = crate::metrics::start(&config.metrics, None).await?;
    let (stopping_tx, stopping) = watch::channel(false);
    let broker = traced(broker, &config.broker.url);
    let state = AppState::new(broker, config.gateway.max_body_bytes, config.gateway.client_traces, stopping)
        .with_limits(GatewayLimits::new(&config.gateway));
    let (app, _) = router(state);
    let addr = listener.local_addr()?;
    let scheme = if public_tls.is_some() { "https" } else { "http" };
    tracing::info!(url = %format!("{scheme}://{addr}"), broker = config.broker.url, trust_domain, "gateway listening");
    crate::telemetry::notify::ready(&format!("serving {scheme}://{addr}, broker {}", config.broker.url));
    let shutdown = async move {
        shutdown.await;
        // Event and log streams end first, so their connections can finish.
        let _ = stopping_tx.send(true);
    };
    serve::serve(listener, public_tls, app, shutdown, config.gateway.shutdown_grace.0).await;
    reloader.abort();
    if let Some(public_reloader) = public_reloader {
        public_reloader.abort();
    }
    Ok(())
}
