//! The broker: the control plane. Job service (gateway, admins) and agent service (one stream per
//! agent) over mutual TLS, both feeding the [`core::Core`] state machine that owns live state, run
//! by its [`core::Driver`] task, which commits it. The metrics listener also serves the agents'
//! Prometheus service discovery ([`scrape_targets`]).

pub mod admin;
pub mod agents;
pub mod backup;
pub mod capacity;
pub mod core;
pub mod data;
pub mod enroll;
pub mod jobs;
pub mod keys;
pub mod placer;
mod renew;
pub mod revocations;
pub mod scrape_targets;
pub mod secrets;
mod staging;
mod tail;
pub mod tenant_data;
mod tokens;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

use crate::config::{BrokerConfig, TenantConfig};
use crate::model::identity::Role;
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::agent_service_server::AgentServiceServer;
use crate::proto::data_service_server::DataServiceServer;
use crate::proto::job_service_server::JobServiceServer;
use crate::{store, tls};

/// Commands waiting for the core; submitters wait (backpressure) when it is full.
const CORE_QUEUE: usize = 65_536;
/// Agents told to reconnect at a stop come back spread over this long.
const RECONNECT_JITTER: Duration = Duration::from_secs(2);
/// Job events buffered for watchers; a watcher that falls further behind re-reads the store.
const EVENT_BUFFER: usize = 65_536;

/// Serves the broker on `listener` until `shutdown` resolves or the core stops (a failed commit);
/// the enrol listener, when configured, on `broker.enroll_listen`.
pub async fn run(
    config: BrokerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let enroll = match config.broker.enroll_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?),
        None => None,
    };
    run_with(config, listener, enroll, shutdown).await
}

/// [`run`], with the enrol listener bound by the caller (`None`: no enrolment).
pub async fn run_with(
    config: BrokerConfig,
    listener: TcpListener,
    enroll_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    crate::private_files::narrow_logged(&config.tls.key).context("broker private key")?;
    let trust_domain = tls::trust_domain_of_cert(&config.tls.cert).context("broker certificate")?;
    let (mut writer, reader) = store::open(&config.store.path).await?;
    let revoked = revocations::Revocations::new(writer.load_revocations().await?);
    let live = tls::LiveConnections::new();
    let server_tls = broker_tls(&config, &trust_domain, &revoked, &live)?;
    let secrets = Arc::new(secrets::SecretKeys::load_or_create(&config.secrets_key_file())?);
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let mut tenants: HashMap<String, TenantConfig> =
        config.tenants.iter().map(|t| (t.name.clone(), t.clone())).collect();
    tenants.entry("default".into()).or_insert_with(TenantConfig::default_tenant);
    let tenants = Arc::new(tenants);
    let keys = Arc::new(keys::KeyRing::default());
    let dedicated: Arc<HashMap<String, String>> =
        Arc::new(config.dedicated.iter().map(|d| (d.agent.clone(), d.tenant.clone())).collect());
    let (prices, price_book) = start_prices(&config).await?;
    let book = price_book.as_ref().map(|(book, _)| book.clone());
    let refresh: crate::metrics::Refresh = Arc::new(move |registry| feed_gauges(registry, book.as_deref()));
    let tenant_names: Vec<&str> = tenants.keys().map(String::as_str).collect();
    crate::metrics::declare_broker_series(crate::metrics::global(), &config.sites, &tenant_names);
    let (core_tx, core_rx) = mpsc::channel(CORE_QUEUE);
    let agent_addresses = Arc::new(scrape_targets::AgentAddresses::default());
    let discovery = scrape_targets::routes(&core_tx, agent_addresses.clone());
    let _metrics = crate::metrics::start_with_routes(&config.metrics, Some(refresh), discovery).await?;
    let settings = core::CoreSettings {
        lease_ttl: config.leases.ttl.0,
        heartbeat_interval: config.leases.heartbeat_interval.0,
        log_tail_bytes: config.limits.log_tail_bytes,
        tenants: (*tenants).clone(),
        keys: keys.clone(),
        placer: Arc::new(placer::Placer::new(&config, prices.clone())),
        secrets,
        dedicated: dedicated.clone(),
    };
    let data = Arc::new(data::DataPlane::start(&config).await?);
    let core = core::Driver::load(writer, settings, events.clone()).await?;
    let mut core_task = tokio::spawn(core.run(core_rx));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<jobs::JobService>>().await;
    health.set_serving::<AgentServiceServer<agents::AgentService>>().await;
    health.set_serving::<AdminServiceServer<admin::AdminService>>().await;
    let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
    let parts = jobs::JobServiceParts {
        max_spec_bytes: config.limits.max_spec_bytes,
        tenants: tenants.clone(),
        keys: keys.clone(),
        data: data.clone(),
        prices: (prices.clone(), config.placement.price_max_age.0, Arc::new(config.sites.clone())),
        stopping: stopping_rx,
    };
    let data_service = tenant_data::DataService::new(reader.clone(), tenants.clone(), data.clone());
    let admin_service = admin::AdminService::new(core_tx.clone(), keys, tenants).with_reader(reader.clone());
    let job_service = jobs::JobService::new(core_tx.clone(), reader, events, parts);
    let revocation = Arc::new(revocations::RevocationAdmin {
        core: core_tx.clone(),
        list: revoked.clone(),
        live,
        trust_domain: trust_domain.clone(),
        own: tls::PeerCert::from_pem_file(&config.tls.cert).context("broker certificate")?,
    });
    let site_names = config.sites.iter().map(|s| s.name.clone()).collect();
    let admin_service = admin_service.with_revocation(revocation.clone()).with_sites(site_names);
    let providers = capacity::providers(&config).await?;
    let enroll_addr = enroll_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let issuing_ca = match &config.broker.ca_dir {
        Some(dir) => Some(Arc::new(crate::pki::Ca::load(dir).context("broker.ca_dir")?)),
        None => None,
    };
    let lifetime = config.broker.agent_cert_lifetime.0;
    let enroll_task = match (enroll_listener, &issuing_ca) {
        (Some(enroll_listener), Some(ca)) => {
            let service = enroll::EnrollService::new(
                core_tx.clone(),
                ca.clone(),
                config.tls.ca_cert.clone(),
                lifetime,
                revoked.clone(),
            );
            // The broker's certificate, reloaded like the main listener's.
            let reloading = tls::ReloadingServerTls::new("broker", &config.tls, tls::enroll_server_config)
                .context("enrol listener tls")?;
            let watching = AbortOnDrop(reloading.watch(tls::RELOAD_INTERVAL));
            let gate = tls::HandshakeGate::new(config.broker.handshake_limits());
            let enroll_tls = tls::ServerTls { config: reloading.swap(), gate, live: None };
            tracing::info!(addr = %enroll_listener.local_addr()?, "enrol listener");
            let server = tonic::transport::Server::builder()
                .add_service(crate::proto::enroll_service_server::EnrollServiceServer::new(service))
                .serve_with_incoming(tls::tls_incoming_served(enroll_listener, enroll_tls));
            Some(AbortOnDrop(tokio::spawn(async move {
                let _watching = watching;
                if let Err(e) = server.await {
                    tracing::error!(error = %e, "enrol listener failed");
                }
            })))
        }
        (Some(_), None) => anyhow::bail!("broker.enroll_listen needs broker.ca_dir"),
        (None, _) => None,
    };
    let mut agent_service = agents::AgentService::new(core_tx.clone(), data, dedicated).with_addresses(agent_addresses);
    if let Some(ca) = issuing_ca {
        agent_service = agent_service.with_renewal(ca, config.tls.ca_cert.clone(), lifetime, revoked.clone());
    }
    let addr = listener.local_addr()?;
    let capacity_task = match (providers.is_empty(), enroll_addr) {
        (true, _) => {
            // It holds a core sender: kept, it would hold the core's drain at a stop.
            drop(revocation);
            None
        }
        (false, None) => anyhow::bail!(
            "sites with [site.capacity] need broker.enroll_listen and broker.ca_dir: launched instances enrol there"
        ),
        (false, Some(enroll_addr)) => {
            let joining = capacity::Joining {
                trust_domain: trust_domain.clone(),
                enroll_url: config.broker.advertise_enroll_url.clone().unwrap_or(format!("https://{enroll_addr}")),
                broker_url: config.broker.advertise_url.clone().unwrap_or(format!("https://{addr}")),
                server_name: config.broker.advertise_server_name.clone(),
                ca_bundle: config.tls.ca_cert.clone(),
            };
            let controller = capacity::Controller::new(&config, core_tx.clone(), providers, joining, revocation);
            Some(AbortOnDrop(tokio::spawn(controller.run())))
        }
    };
    tracing::info!(%addr, trust_domain, "broker listening");
    crate::telemetry::notify::ready(&match enroll_addr {
        Some(enroll) => format!("serving gRPC on {addr}, enrolment on {enroll}"),
        None => format!("serving gRPC on {addr}"),
    });
    let (stop_accepting, stop_accepting_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(crate::telemetry::grpc::ServerLayer)
        .layer(revocations::DenyCallsLayer(revoked.clone()))
        .add_service(health_service)
        .add_service(JobServiceServer::new(job_service).max_decoding_message_size(8 << 20))
        .add_service(DataServiceServer::new(data_service).max_decoding_message_size(8 << 20))
        .add_service(AgentServiceServer::new(agent_service))
        .add_service(AdminServiceServer::new(admin_service))
        .serve_with_incoming_shutdown(tls::tls_incoming_served(listener, server_tls), async {
            let _ = stop_accepting_rx.await;
        });
    tokio::pin!(server);
    tokio::pin!(shutdown);
    tokio::select! {
        served = &mut server => return served.context("broker server"),
        stopped = &mut core_task => {
            stopped.context("broker core panicked")?.context("broker core stopped")?;
            return Ok(());
        }
        () = &mut shutdown => {}
    }
    // SIGTERM: stop accepting, send agents away, drain the core, and exit within the grace.
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + config.broker.shutdown_grace.0;
    health.set_not_serving::<JobServiceServer<jobs::JobService>>().await;
    health.set_not_serving::<AgentServiceServer<agents::AgentService>>().await;
    health.set_not_serving::<AdminServiceServer<admin::AdminService>>().await;
    let _ = stop_accepting.send(());
    // The enrol listener stops too: its service holds a core sender the drain waits for.
    drop(enroll_task);
    drop(capacity_task);
    let _ = stopping.send(true);
    tracing::info!(elapsed = ?started.elapsed(), "broker stopped accepting");
    let (told_tx, told_rx) = tokio::sync::oneshot::channel();
    let cmd = core::Cmd::Shutdown { jitter: RECONNECT_JITTER, seed: fastrand::u64(..), reply: told_tx };
    let drained = async move {
        core_tx.send(cmd).await.ok()?;
        drop(core_tx);
        told_rx.await.ok()
    };
    tokio::select! {
        told = tokio::time::timeout_at(deadline, drained) => match told {
            Ok(Some(told)) => {
                tracing::info!(elapsed = ?started.elapsed(), "told {told} agents to reconnect");
                tracing::info!(elapsed = ?started.elapsed(), "core drained: every command queued before the stop is committed");
            }
            Ok(None) => tracing::warn!("the core stopped before it was drained"),
            Err(_) => tracing::warn!("the core was not drained within the shutdown grace"),
        },
        stopped = &mut core_task => {
            stopped.context("broker core panicked")?.context("broker core stopped")?;
            return Ok(());
        }
    }
    // Agents hang up once their streams end; calls in flight finish. Streams of clients that never
    // end their half (hung or old agents) would hold the server forever: the grace bounds them.
    match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(served) => served.context("broker server")?,
        Err(_) => tracing::warn!("connections still open after the shutdown grace; closing them"),
    }
    // The core commits what the last calls sent, then stops when their senders are gone.
    match tokio::time::timeout_at(deadline, &mut core_task).await {
        Ok(stopped) => stopped.context("broker core panicked")?.context("broker core stopped")?,
        Err(_) => tracing::warn!("commands still arriving after the shutdown grace; stopping the core"),
    }
    tracing::info!("exiting after {:?}", started.elapsed());
    Ok(())
}

/// The broker's TLS: reloaded when its files change or on SIGHUP, refusing revoked certificates
/// at the handshake and after it, its live connections registered so that a revocation closes them.
fn broker_tls(
    config: &BrokerConfig,
    trust_domain: &str,
    revoked: &Arc<revocations::Revocations>,
    live: &Arc<tls::LiveConnections>,
) -> anyhow::Result<tls::ServerTls> {
    let deny: Arc<dyn tls::DenyList> = revoked.clone();
    let (td, check) = (trust_domain.to_string(), deny.clone());
    let build = move |paths: &tls::TlsPaths| {
        tls::server_config_with(paths, &td, &[Role::Agent, Role::Gateway, Role::Admin], Some(check.clone()))
    };
    let reloading = tls::ReloadingServerTls::new("broker", &config.tls, build).context("broker tls")?;
    // Runs as long as the runtime: the broker's runtime ends with the process.
    drop(reloading.watch(tls::RELOAD_INTERVAL));
    Ok(tls::ServerTls {
        config: reloading.swap(),
        gate: tls::HandshakeGate::new(config.broker.handshake_limits()),
        live: Some((live.clone(), deny)),
    })
}

/// The price book when sites are configured (offline snapshot, persisted last prices, live feeds
/// refreshing in the background); otherwise an empty snapshot that placement never reads.
async fn start_prices(
    config: &BrokerConfig,
) -> anyhow::Result<(placer::Prices, Option<(Arc<crate::pricing::PriceBook>, AbortOnDrop)>)> {
    use crate::model::site::instance_type;
    use crate::pricing::{PriceBook, Wanted, WantedInstance, WantedRegion};
    if config.sites.is_empty() {
        let (_, rx) = tokio::sync::watch::channel(Arc::new(crate::model::price::PriceSnapshot::default()));
        return Ok((rx, None));
    }
    let mut wanted = Wanted::default();
    for site in &config.sites {
        let Some(cloud) = site.kind.cloud() else { continue };
        wanted.regions.push(WantedRegion { cloud, region: site.region.clone() });
        for t in site.instance_types.iter().filter(|t| instance_type(t).is_some()) {
            wanted.compute.push(WantedInstance {
                cloud,
                region: site.region.clone(),
                instance_type: t.clone(),
                spot: site.spot,
            });
        }
    }
    for s in &config.storage {
        let cloud = match s.cloud {
            crate::config::StorageCloud::Aws => crate::model::price::Cloud::Aws,
            crate::config::StorageCloud::Azure => crate::model::price::Cloud::Azure,
            crate::config::StorageCloud::Local => continue,
        };
        wanted.regions.push(WantedRegion { cloud, region: s.region.clone() });
    }
    let book = Arc::new(PriceBook::from_settings(&config.prices.settings(), wanted).await.context("prices")?);
    let prices = book.subscribe();
    tracing::info!(snapshot = prices.borrow().id, "prices loaded");
    let task = tokio::spawn(book.clone().run(std::future::pending()));
    Ok((prices, Some((book, AbortOnDrop(task)))))
}

/// The price feeds' age and staleness, at scrape time.
fn feed_gauges(registry: &crate::metrics::Registry, book: Option<&crate::pricing::PriceBook>) {
    let feeds = book.map(|b| b.feed_status()).unwrap_or_default();
    let age = feeds.iter().filter_map(|f| Some((vec![f.name.clone()], f.age?.as_secs_f64())));
    registry.set_family("hybroker_price_feed_age_seconds", age);
    let stale = feeds.iter().map(|f| (vec![f.name.clone()], f64::from(u8::from(f.stale))));
    registry.set_family("hybroker_price_feed_stale", stale);
}

/// Stops a background task when the broker stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
