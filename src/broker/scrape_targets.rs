//! Prometheus service discovery of the agents (`GET /sd/agents` on the broker's metrics listener,
//! in Prometheus' HTTP SD format): one target per agent the broker knows that reported the port of
//! its `/metrics` (inventory label [`METRICS_PORT_LABEL`]), at the address its stream last came
//! from, with its `site` and `node` as labels. Launched cloud instances appear when their agent
//! connects and go when the broker removes their agent (retired instances); an agent that merely
//! disconnected stays listed, so Prometheus sees it down (`up == 0`) instead of forgetting it.
//! Addresses live in memory: after a broker restart an agent is listed again once it reconnects.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::core::{AgentView, Cmd};
use crate::model::agent::METRICS_PORT_LABEL;

/// The path of the discovery document on the metrics listener.
pub const PATH: &str = "/sd/agents";
/// The longest the core may take to list the agents.
const CORE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where each agent's stream last came from (agent id → IP address).
#[derive(Debug, Default)]
pub struct AgentAddresses(Mutex<HashMap<String, IpAddr>>);

impl AgentAddresses {
    /// The agent `agent` connected from `ip` (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn record(&self, agent: &str, ip: IpAddr) {
        self.0.lock().expect("agent addresses").insert(agent.to_string(), ip.to_canonical());
    }

    fn snapshot(&self) -> HashMap<String, IpAddr> {
        self.0.lock().expect("agent addresses").clone()
    }
}

/// One target group of Prometheus' HTTP service discovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetGroup {
    pub targets: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// The target groups of `agents` (ordered by agent id): those with a metrics port and a known address.
pub fn target_groups(agents: &[AgentView], addresses: &HashMap<String, IpAddr>) -> Vec<TargetGroup> {
    let mut groups: Vec<(&str, TargetGroup)> = agents
        .iter()
        .filter_map(|a| {
            let port: u16 = a.inventory.labels.get(METRICS_PORT_LABEL)?.parse().ok().filter(|p| *p != 0)?;
            let ip = *addresses.get(&a.id)?;
            let labels = BTreeMap::from([("site".to_string(), a.site.clone()), ("node".to_string(), a.node.clone())]);
            Some((a.id.as_str(), TargetGroup { targets: vec![SocketAddr::new(ip, port).to_string()], labels }))
        })
        .collect();
    groups.sort_by(|a, b| a.0.cmp(b.0));
    groups.into_iter().map(|(_, g)| g).collect()
}

#[derive(Clone)]
struct Discovery {
    /// Weak: the metrics server outlives the core's drain at a stop, which waits for every sender.
    core: mpsc::WeakSender<Cmd>,
    addresses: Arc<AgentAddresses>,
}

/// The `/sd/agents` route, asking `core` for the agents.
pub fn routes(core: &mpsc::Sender<Cmd>, addresses: Arc<AgentAddresses>) -> axum::Router {
    let discovery = Discovery { core: core.downgrade(), addresses };
    axum::Router::new().route(PATH, axum::routing::get(agents)).with_state(discovery)
}

async fn agents(State(discovery): State<Discovery>) -> Response {
    let (reply, answer) = oneshot::channel();
    let listed = async {
        discovery.core.upgrade()?.send(Cmd::Agents { reply }).await.ok()?;
        answer.await.ok()
    };
    match tokio::time::timeout(CORE_TIMEOUT, listed).await {
        Ok(Some(views)) => Json(target_groups(&views, &discovery.addresses.snapshot())).into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "the broker's core did not list its agents\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::agent::Inventory;

    fn agent(id: &str, port: Option<&str>) -> AgentView {
        let (site, node) = id.split_once('/').unwrap();
        let mut inventory = Inventory::default();
        if let Some(port) = port {
            inventory.labels.insert(METRICS_PORT_LABEL.into(), port.into());
        }
        AgentView {
            id: id.into(),
            site: site.into(),
            node: node.into(),
            inventory,
            connected: true,
            running_jobs: vec![],
            last_seen_ms: 0,
            draining: false,
            dedicated: None,
            cert_not_after_ms: 0,
        }
    }

    #[test]
    fn agents_with_a_port_and_an_address_are_targets_labelled_with_site_and_node() {
        let addresses = AgentAddresses::default();
        addresses.record("lab/b", "10.0.0.7".parse().unwrap());
        addresses.record("aws/i-0a", "::ffff:10.1.2.3".parse().unwrap());
        addresses.record("lab/v6", "2001:db8::5".parse().unwrap());
        addresses.record("lab/no-port", "10.0.0.9".parse().unwrap());
        addresses.record("lab/bad-port", "10.0.0.9".parse().unwrap());
        let agents = [
            agent("lab/b", Some("9466")),
            agent("aws/i-0a", Some("9100")),
            agent("lab/v6", Some("9466")),
            agent("lab/no-port", None),
            agent("lab/bad-port", Some("http")),
            agent("lab/no-address", Some("9466")),
        ];
        let groups = target_groups(&agents, &addresses.snapshot());
        let json = serde_json::to_value(&groups).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"targets": ["10.1.2.3:9100"], "labels": {"site": "aws", "node": "i-0a"}},
                {"targets": ["10.0.0.7:9466"], "labels": {"site": "lab", "node": "b"}},
                {"targets": ["[2001:db8::5]:9466"], "labels": {"site": "lab", "node": "v6"}},
            ])
        );
    }
}
