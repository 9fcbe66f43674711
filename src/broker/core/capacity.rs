//! Cloud capacity in the core: the launches of every site with a capacity provider, from the
//! intent to the termination the cloud confirmed. The capacity controller (`broker::capacity`)
//! does the cloud calls; every [`CapacityCmd::Step`] brings their results and, now and then, what
//! each cloud lists, and gets back the calls to make now. A launch's intent and its join token are
//! written in the step's batch, and the reply (the calls) is released only after that commit, so a
//! broker killed at any point finds every launch it may have made in the store, and every
//! instance it made by its launch tag.
//!
//! A step: apply call results (bind an instance to its launch and its token to the instance id; a
//! capacity, quota or invalid error leaves the (site, type, market) out of placement for a backoff
//! and places the site's waiting jobs again); reconcile the listings (adopt a tagged instance whose
//! launch's reply was lost; a launch the cloud no longer lists is over; an instance of a failed or
//! unknown launch is terminated, the latter after `orphan_grace`); retire instances that did not
//! enrol within `boot_timeout` or idled past `idle_timeout` (drained first, never with an attempt);
//! then launch for demand (`placement::scale`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::oneshot;

use super::{Core, Effects};
use crate::capacity::{Instance, InstanceState, ProviderError};
use crate::model::UnixMillis;
use crate::model::capacity::CapacityConfig;
use crate::model::price::Market;
use crate::model::site::Site;
use crate::model::state::JobState;
use crate::placement::scale::{self, Launching, Room, Want};
use crate::placement::world::Unavailable;
use crate::store::{IdentityWrite, LaunchRecord, Write};

/// Between two tries of a failed terminate or a throttled launch.
const RETRY: Duration = Duration::from_secs(2);
/// A launch answered this recently may not be listed yet (the cloud's listing lags its writes).
const LIST_LAG: Duration = Duration::from_secs(30);
/// How long a launch's join token lives beyond the boot timeout.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

/// What the capacity controller asks of the core.
pub enum CapacityCmd {
    Step {
        results: Vec<CallResult>,
        /// Per site: what its provider lists now (only in steps that listed).
        listed: Vec<(String, Result<Vec<Instance>, ProviderError>)>,
        /// The calls to make now, and agents to revoke and remove (their instances are gone).
        reply: oneshot::Sender<StepReply>,
    },
    /// Every elastic site's instances, pending launches, spend and unavailable pools.
    Sites { reply: oneshot::Sender<Vec<SiteView>> },
}

/// What a step asks of the controller.
#[derive(Debug, Default)]
pub struct StepReply {
    pub calls: Vec<Call>,
    /// Agents of terminated instances: to revoke (their identity) and remove.
    pub retired_agents: Vec<String>,
}

/// A cloud call to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Launch { launch_id: String, site: String, instance_type: String, market: Market, token: String },
    Terminate { site: String, launch_id: Option<String>, instance_id: String, reason: String },
}

/// A cloud call's result.
#[derive(Debug, Clone)]
pub enum CallResult {
    Launched { launch_id: String, result: Result<Instance, ProviderError> },
    Terminated { site: String, launch_id: Option<String>, instance_id: String, result: Result<(), ProviderError> },
}

/// Where a launch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchState {
    /// Intent written; the cloud has not answered with an instance.
    Requested,
    /// The instance exists; its agent has not enrolled.
    Booting,
    Enrolled,
    /// Terminate ordered (boot timeout, idle, orphan).
    Retiring,
    Terminated,
    /// The launch made no instance.
    Failed,
}

impl LaunchState {
    pub fn as_str(self) -> &'static str {
        match self {
            LaunchState::Requested => "requested",
            LaunchState::Booting => "booting",
            LaunchState::Enrolled => "enrolled",
            LaunchState::Retiring => "retiring",
            LaunchState::Terminated => "terminated",
            LaunchState::Failed => "failed",
        }
    }

    fn parse(text: &str) -> LaunchState {
        [Self::Requested, Self::Booting, Self::Enrolled, Self::Retiring, Self::Terminated, Self::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
            .unwrap_or(Self::Failed)
    }

    fn alive(self) -> bool {
        !matches!(self, LaunchState::Terminated | LaunchState::Failed)
    }

    fn pending(self) -> bool {
        matches!(self, LaunchState::Requested | LaunchState::Booting)
    }
}

/// One launch in memory.
#[derive(Debug)]
struct Launch {
    rec: LaunchRecord,
    state: LaunchState,
    market: Market,
    /// When the intent was made (the boot timeout counts from it).
    born: Instant,
    /// When the instance id became known (listing lag).
    bound: Option<Instant>,
    /// The join token's text: only in the process that made it (a restarted broker does not re-send).
    token: Option<String>,
    /// A call for it is outstanding.
    in_flight: bool,
    /// The last launch call failed in a way that may have made the instance: list before re-sending.
    unanswered: bool,
    /// Not before this (throttling, retries).
    next_try: Instant,
    /// Since when its agent has held no attempt.
    idle_since: Option<Instant>,
    agent: Option<String>,
}

/// A (site, instance type, market) left out of placement.
#[derive(Debug, Clone)]
struct Gone {
    reason: String,
    since: UnixMillis,
    until: Instant,
}

/// The core's capacity state.
#[derive(Debug, Default)]
pub struct Capacity {
    launches: BTreeMap<String, Launch>,
    unavailable: HashMap<(String, String, Market), Gone>,
    /// Instances of unknown launches, when first seen (for `orphan_grace` when the cloud gives no
    /// launch time).
    strangers: HashMap<String, Instant>,
}

/// A site's capacity as `hybroker sites` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteView {
    pub site: String,
    pub provider: String,
    pub instances: Vec<InstanceView>,
    pub pending_launches: u32,
    /// Instance-hours × $/h of every launch loaded (alive, and ended this month), split into the
    /// time its agent ran attempts (charged to tenants) and idle time (charged to the site).
    pub spend_usd: f64,
    pub idle_usd: f64,
    /// (instance type, market, reason, since).
    pub unavailable: Vec<(String, String, String, UnixMillis)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    pub launch_id: String,
    pub instance_id: String,
    pub state: String,
    pub instance_type: String,
    pub market: String,
    pub usd_per_hour: f64,
    pub age_s: u64,
    pub idle_s: u64,
    pub agent: String,
    pub reason: String,
}

impl Capacity {
    pub fn load(records: Vec<LaunchRecord>, now: super::Now) -> Capacity {
        let launches = records
            .into_iter()
            .map(|rec| {
                let age = Duration::from_millis(now.ms.saturating_sub(rec.created_at).max(0) as u64);
                let born = now.at.checked_sub(age).unwrap_or(now.at);
                let state = LaunchState::parse(&rec.state);
                let launch = Launch {
                    market: Market::parse(&rec.market).unwrap_or(Market::OnDemand),
                    state,
                    born,
                    bound: (!rec.instance_id.is_empty()).then_some(born),
                    token: None,
                    in_flight: false,
                    // A restarted broker lists before it decides anything about a requested launch.
                    unanswered: state == LaunchState::Requested,
                    next_try: now.at,
                    idle_since: None,
                    agent: None,
                    rec,
                };
                (launch.rec.launch_id.clone(), launch)
            })
            .collect();
        Capacity { launches, unavailable: HashMap::new(), strangers: HashMap::new() }
    }

    /// The pools of `site` left out of placement now.
    pub fn unavailable(&self, site: &str, now: Instant) -> Vec<Unavailable> {
        self.unavailable
            .iter()
            .filter(|((s, _, _), g)| s == site && g.until > now)
            .map(|((_, ty, market), g)| Unavailable {
                instance_type: ty.clone(),
                market: *market,
                reason: g.reason.clone(),
                since: g.since,
            })
            .collect()
    }
}

/// A fresh launch id: `hbl-` and 16 hex digits.
fn launch_id() -> String {
    let mut id = [0u8; 8];
    SystemRandom::new().fill(&mut id).expect("the system random source works");
    format!("hbl-{}", super::keys::hex(&id))
}

impl Core {
    pub(super) fn capacity_cmd(&mut self, cmd: CapacityCmd, out: &mut Effects) {
        match cmd {
            CapacityCmd::Step { results, listed, reply } => {
                let mut step = StepReply::default();
                for result in results {
                    self.call_result(result, &mut step, out);
                }
                for (site, listing) in listed {
                    match listing {
                        Ok(instances) => self.reconcile(&site, instances, &mut step, out),
                        Err(e) => tracing::warn!(site, error = %e, "could not list the site's instances"),
                    }
                }
                self.retire_due(&mut step, out);
                self.launch_for_demand(&mut step, out);
                out.after_commit(move || {
                    let _ = reply.send(step);
                });
            }
            CapacityCmd::Sites { reply } => {
                let _ = reply.send(self.site_views());
            }
        }
    }

    /// The site's capacity provider settings, when it has one.
    fn provider_of(&self, site: &str) -> Option<(&Site, &CapacityConfig)> {
        let site = self.settings.placer.site(site)?;
        Some((site, site.capacity.as_ref()?))
    }

    fn write_launch(launch: &Launch, out: &mut Effects) {
        let mut rec = launch.rec.clone();
        rec.state = launch.state.as_str().to_string();
        out.batch.push(Write::Identity(IdentityWrite::Launch(rec)));
    }

    fn call_result(&mut self, result: CallResult, step: &mut StepReply, out: &mut Effects) {
        let now = self.now;
        match result {
            CallResult::Launched { launch_id, result: Ok(instance) } => {
                self.bind_instance(&launch_id, &instance.instance_id, step, out);
            }
            CallResult::Launched { launch_id, result: Err(e) } => {
                let Some(launch) = self.cloud.launches.get_mut(&launch_id) else { return };
                launch.in_flight = false;
                if e.retryable() {
                    // It may have been made (a lost reply): the next listing decides.
                    launch.unanswered = true;
                    let wait = match &e {
                        ProviderError::Throttled { retry_after: Some(d), .. } => (*d).max(RETRY),
                        _ => RETRY,
                    };
                    launch.next_try = now.at + wait;
                    tracing::warn!(launch_id, error = %e, "launch not answered; listing before trying again");
                    crate::metrics::global().inc(LAUNCHES, &[&launch.rec.site, e.class()], 1.0);
                    return;
                }
                self.launch_failed(&launch_id, &e, out);
            }
            CallResult::Terminated { site, launch_id, instance_id, result } => {
                let launch = launch_id.as_deref().and_then(|id| self.cloud.launches.get_mut(id));
                match (result, launch) {
                    (Ok(()), Some(launch)) => {
                        launch.in_flight = false;
                        self.ended(launch_id.as_deref().unwrap_or(""), "terminated", step, out);
                    }
                    (Ok(()), None) => {
                        tracing::info!(site, instance_id, "orphan instance terminated");
                        self.cloud.strangers.remove(&instance_id);
                    }
                    (Err(e), launch) => {
                        tracing::warn!(site, instance_id, error = %e, "terminate failed; trying again");
                        if let Some(launch) = launch {
                            launch.in_flight = false;
                            launch.next_try = now.at + RETRY;
                        }
                    }
                }
            }
        }
    }

    /// The launch made `instance_id`: its token now enrols only that node.
    fn bind_instance(&mut self, launch_id: &str, instance_id: &str, step: &mut StepReply, out: &mut Effects) {
        let now = self.now;
        let Some(launch) = self.cloud.launches.get_mut(launch_id) else { return };
        launch.in_flight = false;
        launch.unanswered = false;
        if !launch.rec.instance_id.is_empty() {
            return;
        }
        launch.rec.instance_id = instance_id.to_string();
        launch.bound = Some(now.at);
        match launch.state {
            LaunchState::Requested => {
                launch.state = LaunchState::Booting;
                tracing::info!(launch_id, instance_id, site = launch.rec.site, "instance launched");
                crate::metrics::global().inc(LAUNCHES, &[&launch.rec.site, "launched"], 1.0);
            }
            // Its launch was given up meanwhile (boot timeout, a restart): it must not stay.
            _ => {
                launch.state = LaunchState::Retiring;
                step.calls.push(Call::Terminate {
                    site: launch.rec.site.clone(),
                    launch_id: Some(launch_id.to_string()),
                    instance_id: instance_id.to_string(),
                    reason: launch.rec.reason.clone(),
                });
                launch.in_flight = true;
            }
        }
        let token_id = launch.rec.token_id.clone();
        Self::write_launch(launch, out);
        self.tokens.bind(&token_id, instance_id);
        out.batch.push(Write::Identity(IdentityWrite::BindJoinToken { token_id, node: instance_id.to_string() }));
    }

    /// The launch made no instance: its pool is left out for a while, its token revoked, and the
    /// jobs waiting at its site placed again.
    fn launch_failed(&mut self, launch_id: &str, e: &ProviderError, out: &mut Effects) {
        let now = self.now;
        let Some(launch) = self.cloud.launches.get_mut(launch_id) else { return };
        let (site, ty, market) = (launch.rec.site.clone(), launch.rec.instance_type.clone(), launch.market);
        launch.state = LaunchState::Failed;
        launch.rec.reason = e.to_string();
        launch.rec.ended_at = Some(now.ms);
        tracing::warn!(launch_id, site, instance_type = ty, market = market.as_str(), error = %e, "launch failed");
        crate::metrics::global().inc(LAUNCHES, &[&site, e.class()], 1.0);
        let token_id = launch.rec.token_id.clone();
        Self::write_launch(launch, out);
        self.revoke_launch_token(&token_id, out);
        let backoff = self.provider_of(&site).map(|(_, c)| match e {
            ProviderError::Capacity { .. } => c.capacity_backoff.0,
            _ => c.quota_backoff.0,
        });
        if let Some(backoff) = backoff {
            self.mark_unavailable(&site, &ty, market, e.to_string(), backoff);
        }
        self.replace_waiting(&site);
    }

    /// Leaves (site, type, market) out of placement for `backoff`.
    pub(super) fn mark_unavailable(&mut self, site: &str, ty: &str, market: Market, reason: String, backoff: Duration) {
        let gone = Gone { reason, since: self.now.ms, until: self.now.at + backoff };
        self.cloud.unavailable.insert((site.to_string(), ty.to_string(), market), gone);
    }

    /// A spot interruption ended an attempt placed on `offer` at `site`: that pool is left out of
    /// placement for the site's `capacity_backoff` (SkyPilot's "eager next region").
    pub(super) fn pool_interrupted(&mut self, site: &str, offer: &crate::placement::engine::Offer) {
        let (Some(ty), Some(market)) = (&offer.instance_type, offer.market) else { return };
        if let Some(backoff) = self.provider_of(site).map(|(_, c)| c.capacity_backoff.0) {
            self.mark_unavailable(site, ty, market, "spot interruption notice".into(), backoff);
        }
    }

    fn revoke_launch_token(&mut self, token_id: &str, out: &mut Effects) {
        if self.tokens.revoke_quietly(token_id, self.now.ms) {
            out.batch
                .push(Write::Identity(IdentityWrite::RevokeJoinToken { token_id: token_id.into(), at: self.now.ms }));
        }
    }

    /// Jobs placed at `site` and not bound are placed again now.
    fn replace_waiting(&mut self, site: &str) {
        let now = self.now.at;
        for (_, job_id) in &self.queue {
            if let Some(job) = self.jobs.get_mut(job_id)
                && job.life.state == JobState::Placed
                && job.site.as_deref() == Some(site)
            {
                job.next_placement = Some(now);
            }
        }
    }

    /// The launch is over (the cloud terminated it, or no longer lists it).
    fn ended(&mut self, launch_id: &str, why: &str, step: &mut StepReply, out: &mut Effects) {
        let now = self.now;
        let Some(launch) = self.cloud.launches.get_mut(launch_id) else { return };
        if !launch.state.alive() {
            return;
        }
        launch.state = LaunchState::Terminated;
        launch.rec.ended_at = Some(now.ms);
        if launch.rec.reason.is_empty() {
            launch.rec.reason = why.to_string();
        }
        tracing::info!(launch_id, instance_id = launch.rec.instance_id, reason = launch.rec.reason, "instance ended");
        crate::metrics::global().inc(LAUNCHES, &[&launch.rec.site, "terminated"], 1.0);
        let agent = format!("{}/{}", launch.rec.site, launch.rec.instance_id);
        let token_id = launch.rec.token_id.clone();
        Self::write_launch(launch, out);
        self.revoke_launch_token(&token_id, out);
        if self.agents.contains_key(&agent) {
            self.cut_off(&agent, "its instance was terminated", out);
            step.retired_agents.push(agent);
        }
    }

    /// Applies a site's listing.
    fn reconcile(&mut self, site: &str, instances: Vec<Instance>, step: &mut StepReply, out: &mut Effects) {
        let now = self.now;
        let Some((_, config)) = self.provider_of(site) else { return };
        let grace = config.orphan_grace.0;
        let listed: HashSet<String> =
            instances.iter().filter(|i| i.state != InstanceState::Terminated).map(|i| i.instance_id.clone()).collect();
        for inst in &instances {
            if inst.state == InstanceState::Terminated {
                continue;
            }
            let launch = inst.launch_id.as_deref().and_then(|id| self.cloud.launches.get(id));
            match launch.map(|l| (l.state, l.rec.instance_id.is_empty(), l.in_flight)) {
                Some((LaunchState::Requested, true, _)) => {
                    let id = inst.launch_id.clone().expect("matched by launch id");
                    tracing::info!(launch_id = id, instance_id = inst.instance_id, "adopted a launched instance");
                    self.bind_instance(&id, &inst.instance_id, step, out);
                }
                Some((LaunchState::Failed, ..)) => {
                    let reason = "its launch had been given up".to_string();
                    self.order_terminate(site, inst.launch_id.clone(), &inst.instance_id, reason, step);
                }
                Some(_) => {}
                None => {
                    let first = *self.cloud.strangers.entry(inst.instance_id.clone()).or_insert(now.at);
                    let age = match inst.launched_at {
                        Some(at) => Duration::from_millis(now.ms.saturating_sub(at).max(0) as u64),
                        None => now.at.duration_since(first),
                    };
                    if age >= grace {
                        let reason = format!("orphan: no launch of this broker made it (age {age:?})");
                        self.order_terminate(site, None, &inst.instance_id, reason, step);
                    }
                }
            }
        }
        // Launches the cloud no longer lists.
        let mut gone = Vec::new();
        let mut resend = Vec::new();
        let mut given_up = Vec::new();
        for (id, l) in self.cloud.launches.iter().filter(|(_, l)| l.rec.site == site && l.state.alive()) {
            if l.in_flight {
                continue;
            }
            if l.rec.instance_id.is_empty() {
                if l.unanswered && l.next_try <= now.at {
                    if l.token.is_some() { resend.push(id.clone()) } else { given_up.push(id.clone()) }
                }
                continue;
            }
            let lagging = l.bound.is_some_and(|b| now.at.duration_since(b) < LIST_LAG);
            if !listed.contains(&l.rec.instance_id) && !lagging {
                gone.push(id.clone());
            }
        }
        for id in gone {
            self.ended(&id, "the cloud no longer lists it", step, out);
        }
        for id in resend {
            let launch = self.cloud.launches.get_mut(&id).expect("listed above");
            launch.unanswered = false;
            launch.in_flight = true;
            step.calls.push(launch_call(launch));
        }
        for id in given_up {
            let e = ProviderError::Transient { message: "the broker restarted before the launch was answered".into() };
            let launch = self.cloud.launches.get_mut(&id).expect("listed above");
            launch.state = LaunchState::Failed;
            launch.rec.reason = e.to_string();
            launch.rec.ended_at = Some(now.ms);
            let token_id = launch.rec.token_id.clone();
            Self::write_launch(launch, out);
            self.revoke_launch_token(&token_id, out);
        }
    }

    fn order_terminate(
        &mut self,
        site: &str,
        launch_id: Option<String>,
        instance_id: &str,
        reason: String,
        step: &mut StepReply,
    ) {
        if step.calls.iter().any(|c| matches!(c, Call::Terminate { instance_id: i, .. } if i == instance_id)) {
            return;
        }
        tracing::info!(site, instance_id, reason, "terminating instance");
        step.calls.push(Call::Terminate { site: site.into(), launch_id, instance_id: instance_id.into(), reason });
    }

    /// Boot timeouts, idle instances, and terminates to (re)try.
    fn retire_due(&mut self, step: &mut StepReply, out: &mut Effects) {
        let now = self.now;
        let mut boot_timeouts = Vec::new();
        let mut idle = Vec::new();
        let mut retry = Vec::new();
        for (id, l) in &mut self.cloud.launches {
            let Some(config) = self.settings.placer.site(&l.rec.site).and_then(|s| s.capacity.as_ref()) else {
                continue;
            };
            match l.state {
                LaunchState::Requested | LaunchState::Booting
                    if now.at.duration_since(l.born) >= config.boot_timeout.0 =>
                {
                    boot_timeouts.push((id.clone(), config.boot_timeout));
                }
                LaunchState::Enrolled => {
                    let agent = l.agent.as_deref().and_then(|a| self.agents.get(a));
                    let busy = agent.is_some_and(|a| a.attempts().next().is_some());
                    if busy {
                        l.idle_since = None;
                    } else if now.at.duration_since(*l.idle_since.get_or_insert(now.at)) >= config.idle_timeout.0 {
                        idle.push((id.clone(), config.idle_timeout));
                    }
                }
                LaunchState::Retiring if !l.in_flight && l.next_try <= now.at && !l.rec.instance_id.is_empty() => {
                    retry.push(id.clone());
                }
                _ => {}
            }
        }
        for (id, timeout) in boot_timeouts {
            let launch = self.cloud.launches.get_mut(&id).expect("listed above");
            launch.rec.reason = format!("boot timeout: not enrolled within {timeout}");
            let site = launch.rec.site.clone();
            tracing::warn!(launch_id = id, site, reason = launch.rec.reason, "launch gave up");
            crate::metrics::global().inc(LAUNCHES, &[&site, "boot_timeout"], 1.0);
            if launch.rec.instance_id.is_empty() {
                // No instance known: given up; one that turns up later is terminated on sight.
                launch.state = LaunchState::Failed;
                launch.rec.ended_at = Some(now.ms);
                let token_id = launch.rec.token_id.clone();
                Self::write_launch(launch, out);
                self.revoke_launch_token(&token_id, out);
            } else {
                launch.state = LaunchState::Retiring;
                Self::write_launch(launch, out);
                retry.push(id.clone());
            }
            self.replace_waiting(&site);
        }
        for (id, timeout) in idle {
            let launch = self.cloud.launches.get_mut(&id).expect("listed above");
            launch.state = LaunchState::Retiring;
            launch.rec.reason = format!("idle for {timeout}");
            Self::write_launch(launch, out);
            if let Some(agent) = launch.agent.clone() {
                let _ = self.set_draining(&agent, true, "capacity", out);
            }
            retry.push(id);
        }
        for id in retry {
            let launch = self.cloud.launches.get_mut(&id).expect("listed above");
            launch.in_flight = true;
            let (site, instance, reason) =
                (launch.rec.site.clone(), launch.rec.instance_id.clone(), launch.rec.reason.clone());
            self.order_terminate(&site, Some(id), &instance, reason, step);
        }
    }

    /// New launches for the jobs placed at elastic sites that no agent took.
    fn launch_for_demand(&mut self, step: &mut StepReply, out: &mut Effects) {
        let mut by_site: BTreeMap<&str, Vec<Want<'_>>> = BTreeMap::new();
        for (_, job_id) in &self.queue {
            let job = &self.jobs[job_id];
            // A job about to be placed again (its launch failed) waits for its new decision.
            if job.life.state != JobState::Placed || job.next_placement.is_some() {
                continue;
            }
            let (Some(site), Some(chosen)) = (&job.site, job.decision.as_ref().and_then(|d| d.chosen.as_ref())) else {
                continue;
            };
            let (Some(ty), Some(market)) = (&chosen.offer.instance_type, chosen.offer.market) else { continue };
            let left_out = self.cloud.unavailable.get(&(site.clone(), ty.clone(), market));
            if left_out.is_some_and(|g| g.until > self.now.at) {
                continue;
            }
            let r = &job.spec.resources;
            by_site.entry(site.as_str()).or_default().push(Want {
                job: job_id,
                instance_type: ty,
                market,
                gpus: r.gpus,
                cpus: r.cpus,
                memory_gib: r.memory_gib,
            });
        }
        let mut orders = Vec::new();
        let mut events: Vec<(String, String)> = Vec::new();
        for (site, wants) in &by_site {
            let Some(config) = self.settings.placer.site(site).and_then(|s| s.capacity.as_ref()) else { continue };
            let alive: Vec<&Launch> =
                self.cloud.launches.values().filter(|l| l.rec.site == *site && l.state.alive()).collect();
            let pending = alive.iter().filter(|l| l.state.pending()).count() as u32;
            let usd: f64 = alive.iter().map(|l| l.rec.usd_per_hour).sum();
            let room = Room {
                instances: config.max_instances.saturating_sub(alive.len() as u32),
                pending: config.max_pending.saturating_sub(pending),
                usd_per_hour: config.max_usd_per_hour.map(|cap| cap - usd),
            };
            let launching: Vec<Launching<'_>> = alive
                .iter()
                .filter(|l| l.state.pending())
                .map(|l| Launching { launch: &l.rec.launch_id, instance_type: &l.rec.instance_type, market: l.market })
                .collect();
            let price = |ty: &str, market: Market| {
                wants
                    .iter()
                    .filter(|w| w.instance_type == ty && w.market == market)
                    .find_map(|w| {
                        self.jobs[w.job].decision.as_ref()?.chosen.as_ref().map(|c| c.offer.cost.usd_per_hour)
                    })
                    .unwrap_or(0.0)
            };
            let plan = scale::plan(wants, &launching, room, price);
            for l in plan.launches {
                orders.push((site.to_string(), l.instance_type.to_string(), l.market, l.usd_per_hour, l.jobs.len()));
                let n = orders.len();
                for job in l.jobs {
                    events.push((job.to_string(), format!("@{n}")));
                }
            }
            for (job, limit) in plan.blocked {
                events.push((job.to_string(), format!("waiting for an instance: site {site} is at its {limit}")));
            }
        }
        let mut ids = Vec::new();
        for (site, ty, market, usd, jobs) in orders {
            let id = self.new_launch(&site, &ty, market, usd, step, out);
            tracing::info!(launch_id = id, site, instance_type = ty, market = market.as_str(), jobs, "launching");
            ids.push((id, site, ty, market));
        }
        for (job_id, reason) in events {
            let reason = match reason.strip_prefix('@').and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => {
                    let (id, site, ty, market) = &ids[n - 1];
                    format!("launching instance {id} ({ty}, {}) at site {site} for it", market.as_str())
                }
                None => reason,
            };
            if let Some(mut job) = self.jobs.remove(&job_id) {
                if job.reason != reason {
                    self.event(&mut job, reason, false, out);
                }
                self.jobs.insert(job_id, job);
            }
        }
    }

    /// Records a launch intent with its join token and asks for the launch.
    fn new_launch(
        &mut self,
        site: &str,
        ty: &str,
        market: Market,
        usd_per_hour: f64,
        step: &mut StepReply,
        out: &mut Effects,
    ) -> String {
        let now = self.now;
        let launch_id = launch_id();
        let boot = self.provider_of(site).map_or(Duration::from_secs(600), |(_, c)| c.boot_timeout.0);
        let (token, text) = self.tokens.for_launch(site, &launch_id, now.ms, boot + TOKEN_MARGIN);
        out.batch.push(Write::Identity(IdentityWrite::NewJoinToken(token.clone())));
        let rec = LaunchRecord {
            launch_id: launch_id.clone(),
            site: site.to_string(),
            instance_type: ty.to_string(),
            market: market.as_str().to_string(),
            usd_per_hour,
            token_id: token.token_id.clone(),
            instance_id: String::new(),
            state: LaunchState::Requested.as_str().to_string(),
            reason: String::new(),
            created_at: now.ms,
            enrolled_at: None,
            ended_at: None,
            busy_ms: 0,
        };
        let launch = Launch {
            rec,
            state: LaunchState::Requested,
            market,
            born: now.at,
            bound: None,
            token: Some(text),
            in_flight: true,
            unanswered: false,
            next_try: now.at,
            idle_since: None,
            agent: None,
        };
        Self::write_launch(&launch, out);
        step.calls.push(launch_call(&launch));
        crate::metrics::global().inc(LAUNCHES, &[site, "requested"], 1.0);
        self.cloud.launches.insert(launch_id.clone(), launch);
        launch_id
    }

    /// An agent registered: if it is a launch's instance, the launch is enrolled.
    pub(super) fn capacity_enrolled(&mut self, agent: &str, site: &str, node: &str, out: &mut Effects) {
        let now = self.now;
        let Some(launch) = self
            .cloud
            .launches
            .values_mut()
            .find(|l| l.rec.site == site && l.rec.instance_id == node && l.state.alive())
        else {
            return;
        };
        launch.agent = Some(agent.to_string());
        if launch.state == LaunchState::Booting || launch.state == LaunchState::Requested {
            launch.state = LaunchState::Enrolled;
            launch.rec.enrolled_at = Some(now.ms);
            launch.idle_since = Some(now.at);
            let boot = now.at.duration_since(launch.born);
            tracing::info!(
                agent,
                launch_id = launch.rec.launch_id,
                boot_s = boot.as_secs_f64(),
                "launched instance enrolled"
            );
            crate::metrics::global().inc(LAUNCHES, &[site, "enrolled"], 1.0);
            Self::write_launch(launch, out);
        }
    }

    /// An attempt of `agent` ran for `ran`: if the agent is a launched instance, that time is
    /// its used part (charged to the tenant); the rest of its life is idle (charged to the site).
    pub(super) fn instance_busy(&mut self, agent: &str, ran: Duration) {
        if let Some(l) = self.cloud.launches.values_mut().find(|l| l.agent.as_deref() == Some(agent)) {
            l.rec.busy_ms += ran.as_millis() as i64;
        }
    }

    pub(super) fn site_views(&self) -> Vec<SiteView> {
        let now = self.now;
        let mut views = Vec::new();
        for site in self.settings.placer.sites() {
            let Some(config) = &site.capacity else { continue };
            let mut view = SiteView {
                site: site.name.clone(),
                provider: config.provider.as_str().to_string(),
                instances: Vec::new(),
                pending_launches: 0,
                spend_usd: 0.0,
                idle_usd: 0.0,
                unavailable: self
                    .cloud
                    .unavailable(&site.name, now.at)
                    .into_iter()
                    .map(|u| (u.instance_type, u.market.as_str().to_string(), u.reason, u.since))
                    .collect(),
            };
            for l in self.cloud.launches.values().filter(|l| l.rec.site == site.name) {
                let end = l.rec.ended_at.unwrap_or(now.ms);
                let hours = (end - l.rec.created_at).max(0) as f64 / 3_600_000.0;
                let busy = l.rec.busy_ms as f64 / 3_600_000.0;
                view.spend_usd += hours * l.rec.usd_per_hour;
                view.idle_usd += (hours - busy).max(0.0) * l.rec.usd_per_hour;
                if l.state.pending() {
                    view.pending_launches += 1;
                }
                if l.state.alive() {
                    view.instances.push(InstanceView {
                        launch_id: l.rec.launch_id.clone(),
                        instance_id: l.rec.instance_id.clone(),
                        state: l.state.as_str().to_string(),
                        instance_type: l.rec.instance_type.clone(),
                        market: l.market.as_str().to_string(),
                        usd_per_hour: l.rec.usd_per_hour,
                        age_s: now.at.duration_since(l.born).as_secs(),
                        idle_s: l.idle_since.map_or(0, |t| now.at.duration_since(t).as_secs()),
                        agent: l.agent.clone().unwrap_or_default(),
                        reason: l.rec.reason.clone(),
                    });
                }
            }
            views.push(view);
        }
        views
    }
}

/// The launch call of a launch (its token text must be known).
fn launch_call(launch: &Launch) -> Call {
    Call::Launch {
        launch_id: launch.rec.launch_id.clone(),
        site: launch.rec.site.clone(),
        instance_type: launch.rec.instance_type.clone(),
        market: launch.market,
        token: launch.token.clone().unwrap_or_default(),
    }
}

/// `hybroker_capacity_launches_total{site, result}`.
pub const LAUNCHES: &str = "hybroker_capacity_launches_total";
