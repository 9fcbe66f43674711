//! The capacity controller: the broker's side of cloud capacity that does I/O. Every
//! [`STEP`] it sends the core the results of the cloud calls made since the last step (and, every
//! [`LIST_EVERY`], what each site's provider lists), and makes the calls the core answers with:
//! launches (rendering the user data that makes the instance enrol) and terminations, each in a
//! task of its own, so a slow cloud delays nothing else. Agents of terminated instances are
//! revoked and removed through the identity lifecycle's own commands.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};

use super::core::{Call, CallResult, CapacityCmd, Cmd, StepReply};
use super::revocations::RevocationAdmin;
use crate::capacity::aws::{AwsProvider, AwsSettings};
use crate::capacity::azure::{AzureProvider, AzureSettings};
use crate::capacity::local::LocalProvider;
use crate::capacity::user_data::{self, Boot};
use crate::capacity::{LaunchSpec, Provider, ProviderError};
use crate::config::BrokerConfig;
use crate::model::capacity::ProviderKind;

/// Between two steps.
pub const STEP: Duration = Duration::from_millis(500);
/// Between two listings of every site's instances.
pub const LIST_EVERY: Duration = Duration::from_secs(10);
/// The longest a listing may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// What a launched instance needs to know of the broker.
#[derive(Debug, Clone)]
pub struct Joining {
    pub trust_domain: String,
    pub enroll_url: String,
    pub broker_url: String,
    pub server_name: Option<String>,
    /// The trust bundle file (`tls.ca_cert`), read for every launch (it changes in a rollover).
    pub ca_bundle: PathBuf,
}

pub struct Controller {
    core: mpsc::Sender<Cmd>,
    providers: HashMap<String, Arc<dyn Provider>>,
    clouds: HashMap<String, Option<&'static str>>,
    broker: String,
    joining: Joining,
    revocation: Arc<RevocationAdmin>,
}

/// The providers of the sites with `[site.capacity]`; an error names the site whose provider
/// cannot be set up.
pub async fn providers(config: &BrokerConfig) -> anyhow::Result<HashMap<String, Arc<dyn Provider>>> {
    let mut out: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    for site in &config.sites {
        let Some(capacity) = &site.capacity else { continue };
        let provider: Arc<dyn Provider> = match capacity.provider {
            ProviderKind::Local => {
                let local = capacity.local.clone().unwrap_or_default();
                let binary = match local.binary {
                    Some(b) => b,
                    None => std::env::current_exe().context("the broker's own binary")?,
                };
                let dir = local.dir.unwrap_or_else(|| {
                    config.store.path.parent().unwrap_or(std::path::Path::new(".")).join("local-instances")
                });
                Arc::new(LocalProvider {
                    site: site.name.clone(),
                    broker: config.broker.name.clone(),
                    binary,
                    dir,
                    isolation: if local.isolation.is_empty() { "auto".into() } else { local.isolation },
                })
            }
            ProviderKind::Aws => {
                let settings = AwsSettings {
                    site: site.name.clone(),
                    region: site.region.clone(),
                    broker: config.broker.name.clone(),
                    launch: capacity.aws.clone().unwrap_or_default(),
                    static_credentials: None,
                };
                let provider = AwsProvider::new(settings)
                    .await
                    .map_err(|e| anyhow::anyhow!("site {}: capacity provider aws: {e}", site.name))?;
                Arc::new(provider)
            }
            ProviderKind::Azure => {
                let launch = capacity.azure.clone().unwrap_or_default();
                let credential =
                    crate::config::azure_env::azure_credential_from_env(&launch.credential).map_err(|p| {
                        let p: Vec<String> = p.iter().map(|m| format!("site {}: capacity.{m}", site.name)).collect();
                        anyhow::anyhow!("{}", p.join("; "))
                    })?;
                let settings = AzureSettings {
                    site: site.name.clone(),
                    location: site.region.clone(),
                    broker: config.broker.name.clone(),
                    launch,
                    credential,
                };
                let provider = AzureProvider::new(settings)
                    .map_err(|e| anyhow::anyhow!("site {}: capacity provider azure: {e}", site.name))?;
                Arc::new(provider)
            }
        };
        out.insert(site.name.clone(), provider);
    }
    Ok(out)
}

impl Controller {
    pub fn new(
        config: &BrokerConfig,
        core: mpsc::Sender<Cmd>,
        providers: HashMap<String, Arc<dyn Provider>>,
        joining: Joining,
        revocation: Arc<RevocationAdmin>,
    ) -> Self {
        let clouds = config
            .sites
            .iter()
            .filter(|s| s.capacity.as_ref().is_some_and(|c| c.provider != ProviderKind::Local))
            .map(|s| (s.name.clone(), s.kind.cloud().map(|c| c.as_str())))
            .collect();
        Controller { core, providers, clouds, broker: config.broker.name.clone(), joining, revocation }
    }

    /// Runs until the core stops.
    pub async fn run(self) {
        let (results_tx, mut results_rx) = mpsc::unbounded_channel::<CallResult>();
        let mut last_list: Option<Instant> = None;
        let mut tick = tokio::time::interval(STEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut results = Vec::new();
            while let Ok(r) = results_rx.try_recv() {
                results.push(r);
            }
            let listed = if last_list.is_none_or(|t| t.elapsed() >= LIST_EVERY) {
                last_list = Some(Instant::now());
                self.list_all().await
            } else {
                Vec::new()
            };
            let (reply, rx) = oneshot::channel();
            if self.core.send(Cmd::Capacity(CapacityCmd::Step { results, listed, reply })).await.is_err() {
                return;
            }
            let Ok(StepReply { calls, retired_agents }) = rx.await else { return };
            for call in calls {
                self.spawn_call(call, results_tx.clone());
            }
            for agent in retired_agents {
                self.retire(agent);
            }
        }
    }

    async fn list_all(&self) -> Vec<(String, Result<Vec<crate::capacity::Instance>, ProviderError>)> {
        let lists = self.providers.iter().map(|(site, p)| async move {
            let listed = tokio::time::timeout(LIST_TIMEOUT, p.list())
                .await
                .unwrap_or_else(|_| Err(ProviderError::Transient { message: "listing timed out".into() }));
            (site.clone(), listed)
        });
        futures::future::join_all(lists).await
    }

    fn spawn_call(&self, call: Call, results: mpsc::UnboundedSender<CallResult>) {
        match call {
            Call::Launch { launch_id, site, instance_type, market, token } => {
                let Some(provider) = self.providers.get(&site).cloned() else { return };
                let user_data = self.user_data(&launch_id, &site, &token);
                let broker = self.broker.clone();
                tokio::spawn(async move {
                    let result = match user_data {
                        Ok(user_data) => {
                            let id = launch_id.clone();
                            let spec = LaunchSpec { launch_id: id, broker, site, instance_type, market, user_data };
                            provider.launch(&spec).await
                        }
                        Err(message) => Err(ProviderError::Invalid { code: "UserData".into(), message }),
                    };
                    let _ = results.send(CallResult::Launched { launch_id, result });
                });
            }
            Call::Terminate { site, launch_id, instance_id, reason } => {
                let Some(provider) = self.providers.get(&site).cloned() else { return };
                tokio::spawn(async move {
                    tracing::info!(site, instance_id, reason, "terminating instance");
                    let result = provider.terminate(&instance_id).await;
                    let _ = results.send(CallResult::Terminated { site, launch_id, instance_id, result });
                });
            }
        }
    }

    /// The launch's user data: its join token, the broker's addresses and trust bundle.
    fn user_data(&self, launch_id: &str, site: &str, token: &str) -> Result<String, String> {
        let ca_bundle = crate::tls::read_bundle(&self.joining.ca_bundle).map_err(|e| e.to_string())?;
        let cloud = self.clouds.get(site).copied().flatten();
        let node = cloud.is_none().then(|| crate::capacity::local::instance_id(launch_id));
        Ok(user_data::render(&Boot {
            launch_id,
            site,
            cloud,
            node: node.as_deref(),
            token,
            trust_domain: &self.joining.trust_domain,
            enroll_url: &self.joining.enroll_url,
            broker_url: &self.joining.broker_url,
            server_name: self.joining.server_name.as_deref(),
            ca_bundle: &ca_bundle,
        }))
    }

    /// Revokes the agent of a terminated instance and removes it.
    fn retire(&self, agent: String) {
        let (revocation, core) = (self.revocation.clone(), self.core.clone());
        tokio::spawn(async move {
            let req = crate::proto::RevokeCertificatesRequest {
                identity: agent.clone(),
                reason: "its instance was terminated".into(),
                ..Default::default()
            };
            if let Err(e) = revocation.revoke(ACTOR, req).await {
                tracing::warn!(agent, error = %e, "could not revoke a retired instance's agent");
            }
            let (reply, rx) = oneshot::channel();
            let cmd = Cmd::RemoveAgent { agent: agent.clone(), force: true, actor: ACTOR.into(), reply };
            if core.send(cmd).await.is_ok()
                && let Ok(Err(e)) = rx.await
            {
                tracing::warn!(agent, error = %e, "could not remove a retired instance's agent");
            }
        });
    }
}

/// The actor of the capacity controller's own revocations and removals in the audit trail.
pub const ACTOR: &str = "capacity";
