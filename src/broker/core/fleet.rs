//! The core's state of the fleet: one entry per agent the broker knows, with what its attempts
//! hold (allocations, kept summed so that binding needs no walk over them).

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::{Core, Effects};
use crate::error::ApiError;
use crate::model::UnixMillis;
use crate::model::agent::Inventory;
use crate::placement::bind::FreeCapacity;
use crate::store::{AdminEventRecord, AgentRecord, IdentityWrite, Write};

/// Resources held by one attempt on an agent.
#[derive(Debug, Clone)]
pub struct Alloc {
    pub gpus: Vec<u32>,
    pub cpus: u32,
    pub memory_mib: u64,
}

/// The core's view of one agent.
pub struct AgentEntry {
    pub id: String,
    pub site: String,
    pub node: String,
    pub inventory: Inventory,
    /// The id of its open stream, when it has one (the stream itself is the driver's).
    pub conn: Option<u64>,
    pub last_seen: Instant,
    /// Resources held by attempts, keyed by (job id, epoch); change only through `allocate`/`release`.
    allocs: HashMap<(String, u64), Alloc>,
    /// Sums over `allocs`, kept so that dispatch needs no walk over them.
    used_cpus: u32,
    used_memory_mib: u64,
    held_gpus: Vec<u32>,
    /// Takes no new work; running attempts finish.
    pub draining: bool,
    /// The only tenant whose jobs this node runs (`[[dedicated]]` in the broker's config).
    pub dedicated: Option<String>,
    /// The NotAfter of the certificate it last connected with (0: unknown).
    pub cert_not_after: crate::model::UnixMillis,
}

/// What the job service shows of an agent.
#[derive(Debug, Clone)]
pub struct AgentView {
    pub id: String,
    pub site: String,
    pub node: String,
    pub inventory: Inventory,
    pub connected: bool,
    pub running_jobs: Vec<String>,
    pub last_seen_ms: i64,
    pub draining: bool,
    pub dedicated: Option<String>,
    /// The NotAfter of the certificate it last connected with (0: unknown).
    pub cert_not_after_ms: i64,
}

impl AgentEntry {
    /// The agent's row as written at `now_ms` (register, certificate renewal).
    pub fn record(&self, now_ms: UnixMillis) -> AgentRecord {
        AgentRecord {
            id: self.id.clone(),
            site: self.site.clone(),
            node: self.node.clone(),
            inventory_json: serde_json::to_string(&self.inventory).unwrap_or_default(),
            last_seen: now_ms,
            draining: self.draining,
            cert_not_after: self.cert_not_after,
        }
    }

    pub fn new(id: &str, site: &str, node: &str, now: Instant) -> Self {
        Self {
            id: id.to_string(),
            site: site.to_string(),
            node: node.to_string(),
            inventory: Inventory::default(),
            conn: None,
            last_seen: now,
            allocs: HashMap::new(),
            used_cpus: 0,
            used_memory_mib: 0,
            held_gpus: Vec::new(),
            draining: false,
            cert_not_after: 0,
            dedicated: None,
        }
    }

    /// Connected and not draining: it may take new work.
    pub fn takes_work(&self) -> bool {
        self.conn.is_some() && !self.draining
    }

    /// Books resources for an attempt (replacing what the same attempt held).
    pub fn allocate(&mut self, job_id: &str, epoch: u64, alloc: Alloc) {
        self.release(job_id, epoch);
        self.used_cpus += alloc.cpus;
        self.used_memory_mib += alloc.memory_mib;
        self.held_gpus.extend(&alloc.gpus);
        self.allocs.insert((job_id.to_string(), epoch), alloc);
    }

    /// Frees what the attempt held, if anything.
    pub fn release(&mut self, job_id: &str, epoch: u64) {
        if let Some(a) = self.allocs.remove(&(job_id.to_string(), epoch)) {
            self.used_cpus -= a.cpus;
            self.used_memory_mib -= a.memory_mib;
            for gpu in &a.gpus {
                if let Some(i) = self.held_gpus.iter().position(|g| g == gpu) {
                    self.held_gpus.swap_remove(i);
                }
            }
        }
    }

    /// Frees everything, returning what was held.
    pub fn take_allocs(&mut self) -> HashMap<(String, u64), Alloc> {
        (self.used_cpus, self.used_memory_mib) = (0, 0);
        self.held_gpus.clear();
        std::mem::take(&mut self.allocs)
    }

    /// Whether the attempt of `job_id` at `epoch` holds resources here.
    pub fn holds(&self, job_id: &str, epoch: u64) -> bool {
        self.allocs.contains_key(&(job_id.to_string(), epoch))
    }

    /// What each attempt holds here: (job id, epoch) → its allocation.
    pub fn allocations(&self) -> impl Iterator<Item = (&(String, u64), &Alloc)> {
        self.allocs.iter()
    }

    /// The attempts holding resources here: (job id, epoch).
    pub fn attempts(&self) -> impl Iterator<Item = &(String, u64)> {
        self.allocs.keys()
    }

    /// What each attempt holds: ((job id, epoch), resources).
    pub fn allocs(&self) -> impl Iterator<Item = (&(String, u64), &Alloc)> {
        self.allocs.iter()
    }

    /// Healthy GPUs, CPUs and memory not held by any attempt.
    pub fn free(&self) -> FreeCapacity {
        FreeCapacity {
            gpus: self
                .inventory
                .gpus
                .iter()
                .filter(|g| g.healthy && !self.held_gpus.contains(&g.index))
                .map(|g| (g.index, g.model.clone()))
                .collect(),
            cpus: self.inventory.cpus.saturating_sub(self.used_cpus),
            memory_mib: self.inventory.memory_mib.saturating_sub(self.used_memory_mib),
            tenant: self.dedicated.clone(),
        }
    }

    /// Healthy GPUs, CPUs and memory, held or not.
    pub fn total(&self) -> FreeCapacity {
        FreeCapacity {
            gpus: self.inventory.gpus.iter().filter(|g| g.healthy).map(|g| (g.index, g.model.clone())).collect(),
            cpus: self.inventory.cpus,
            memory_mib: self.inventory.memory_mib,
            tenant: self.dedicated.clone(),
        }
    }

    /// The agent as the job service shows it; `now` is the core's clock.
    pub fn view(&self, now: Instant) -> AgentView {
        let seen = SystemTime::now() - now.saturating_duration_since(self.last_seen);
        let mut running_jobs: Vec<String> = self.allocs.keys().map(|(job, _)| job.clone()).collect();
        running_jobs.sort();
        AgentView {
            id: self.id.clone(),
            site: self.site.clone(),
            node: self.node.clone(),
            inventory: self.inventory.clone(),
            connected: self.conn.is_some(),
            running_jobs,
            last_seen_ms: seen.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
            draining: self.draining,
            dedicated: self.dedicated.clone(),
            cert_not_after_ms: self.cert_not_after,
        }
    }
}

impl Core {
    /// Drains (`true`: no new work) or undrains an agent; a change is written with its audit event.
    pub(super) fn set_draining(
        &mut self,
        agent: &str,
        draining: bool,
        actor: &str,
        out: &mut Effects,
    ) -> Result<AgentView, ApiError> {
        let now = self.now;
        let entry = self.agents.get_mut(agent).ok_or_else(|| ApiError::NotFound(format!("agent {agent} not found")))?;
        if entry.draining != draining {
            entry.draining = draining;
            let action = if draining { "agent.drain" } else { "agent.undrain" };
            tracing::info!(
                agent,
                actor,
                action,
                "{}",
                if draining { "agent draining: no new work" } else { "agent undrained: takes new work" }
            );
            out.batch.push(Write::AgentDraining { id: agent.to_string(), draining });
            out.batch.push(admin_event(now.ms, actor, action, agent, ""));
        }
        Ok(entry.view(now.at))
    }

    /// Forgets an agent: its row, its capacity and (on the next publish) its series. Refused while
    /// it is connected unless `force`, which closes its stream; attempts it held are lost and queued
    /// again, as when a lease is lost.
    pub(super) fn remove_agent(
        &mut self,
        agent: &str,
        force: bool,
        actor: &str,
        out: &mut Effects,
    ) -> Result<AgentView, ApiError> {
        let now = self.now;
        let entry = self.agents.get(agent).ok_or_else(|| ApiError::NotFound(format!("agent {agent} not found")))?;
        if entry.conn.is_some() && !force {
            return Err(ApiError::FailedPrecondition(format!(
                "agent {agent} is connected; stop it first, or remove it with --force (its running attempts are lost \
                 and queued again)"
            )));
        }
        let view = entry.view(now.at);
        let connected = entry.conn.is_some();
        self.cut_off(agent, "the agent was removed", out);
        self.agents.remove(agent);
        let detail = if connected { "forced while connected" } else { "" };
        tracing::info!(agent, actor, force, "agent removed");
        out.batch.push(Write::RemoveAgent { id: agent.to_string() });
        out.batch.push(admin_event(now.ms, actor, "agent.remove", agent, detail));
        Ok(view)
    }
}

impl Core {
    /// Ends `agent`'s stream (if it has one) and declares the attempts it holds lost, so they are
    /// queued again at once (a revoked or removed agent).
    pub(super) fn cut_off(&mut self, agent: &str, reason: &str, out: &mut Effects) {
        let Some(entry) = self.agents.get_mut(agent) else { return };
        if let Some(conn) = entry.conn.take() {
            out.closed.push((agent.to_string(), conn));
        }
        let held: Vec<(String, u64)> = entry.attempts().cloned().collect();
        for (job_id, epoch) in held {
            self.lease_lost(&job_id, epoch, reason, out);
        }
    }
}

/// An audit-trail entry (`IdentityWrite::AdminEvent`), for every admin action the core applies.
pub(super) fn admin_event(
    at: crate::model::UnixMillis,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> Write {
    Write::Identity(IdentityWrite::AdminEvent(AdminEventRecord {
        at,
        actor: actor.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        detail: detail.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpu::{parse_simulated, simulated_gpus};

    #[test]
    fn unhealthy_and_allocated_gpus_are_not_free() {
        let mut entry = AgentEntry::new("lab/a", "lab", "a", Instant::now());
        let mut gpus = simulated_gpus(&parse_simulated("4xH100-80GB").unwrap(), 0, "a");
        gpus[1].healthy = false;
        entry.inventory =
            Inventory { gpus, cpus: 16, memory_mib: 65536, labels: Default::default(), ..Default::default() };
        entry.allocate("job-1", 1, Alloc { gpus: vec![2], cpus: 4, memory_mib: 1024 });
        let free = entry.free();
        assert_eq!(free.gpus.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 3]);
        assert_eq!((free.cpus, free.memory_mib), (12, 64512));
        entry.release("job-1", 1);
        assert_eq!(entry.free().gpus.len(), 3);
        assert_eq!(entry.free().cpus, 16);
    }
}
