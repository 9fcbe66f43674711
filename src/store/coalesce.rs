//! Folds a [`Batch`] into the fewest row writes that leave the store exactly as writing it in
//! order would: per job the last values win, an attempt created and ended in one batch is one
//! insert, and likewise for agents and keys. Database-neutral; the store turns each list into
//! multi-row statements.
//!
//! Equivalence with writing the batch in order, write by write, rests on these facts:
//! - an `UpdateJob` (and `EndAttempt`, `RevokeKey`, `KeyUsed`, `AgentDraining`) of a row that does
//!   not exist changes nothing;
//! - every `UpdateJob` sets the same mutable columns, so the last one wins (likewise `EndAttempt`);
//! - a `NewJob` of a job that exists fails the whole batch, so updates of that job before its
//!   `NewJob` either changed nothing or are rolled back: they are dropped;
//! - a second `NewJob` (`NewAttempt`, `NewKey`) of the same row fails the batch: it is kept as an
//!   extra row, so the insert fails the same way;
//! - an attempt created before its job's `NewJob` in the same batch fails the batch (foreign key,
//!   or the job existed and its `NewJob` fails): [`Folded::attempts_first`] asks for the attempts
//!   to be inserted before the jobs, so that it fails too.
//!
//! - a `RemoveAgent` deletes a row, after which the same id may be inserted again with a new rowid:
//!   a batch holding one writes every agent write of its own, in order ([`Folded::agent_writes`]);
//!   the agents table has no foreign keys, so its writes may run before or after the other tables';
//! - an `Identity` write touches only tables no other write touches (join tokens, revocations, the
//!   admin audit trail): they are kept as they are, in order, and written after the rest.
//!
//! Rows are kept in the order of their first write, so that inserts allocate the same rowids.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use super::{
    AgentRecord, AttemptEnd, AttemptRecord, Batch, IdentityWrite, JobEvent, JobStatus, JobSubmission, KeyRecord, Write,
};
use crate::model::UnixMillis;

/// A job inserted by the batch: its submission from the `NewJob`, its status from the last write
/// of it (the `NewJob` itself, or a later `UpdateJob`).
#[derive(Debug)]
pub struct NewJob<'a> {
    pub new: &'a JobSubmission,
    pub last: &'a JobStatus,
}

/// An attempt inserted by the batch, ended by it too when `end` is set.
#[derive(Debug)]
pub struct NewAttempt<'a> {
    pub new: &'a AttemptRecord,
    pub end: Option<&'a AttemptEnd>,
}

/// An agent upserted by the batch: inserted with `first`'s site and node, `last`'s inventory and
/// last seen, and `draining`; or, when it exists, refreshed with `last`'s inventory and last seen.
#[derive(Debug)]
pub struct AgentUpsert<'a> {
    pub first: &'a AgentRecord,
    pub last: &'a AgentRecord,
    pub draining: bool,
}

/// A key inserted by the batch, with the revocation and last use of the writes after its `NewKey`.
#[derive(Debug)]
pub struct NewKey<'a> {
    pub new: &'a KeyRecord,
    pub last_used: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

/// Changes to a key the batch did not create: `revoked_at` replaces, `used` raises `last_used`.
#[derive(Debug)]
pub struct KeyChange<'a> {
    pub key_id: &'a str,
    pub revoked_at: Option<UnixMillis>,
    pub used: Option<UnixMillis>,
}

/// A batch folded. Write, in this order: `agent_draining` (before `agents`), then the jobs, then
/// the attempts (before the jobs when `attempts_first`); the other lists in any order.
#[derive(Debug, Default)]
pub struct Folded<'a> {
    pub new_jobs: Vec<NewJob<'a>>,
    /// Jobs the batch did not create: their final row (update only if it exists).
    pub job_updates: Vec<(&'a str, &'a JobStatus)>,
    pub events: Vec<&'a JobEvent>,
    pub new_attempts: Vec<NewAttempt<'a>>,
    /// Attempts the batch did not create: how they ended last (update only if they exist).
    pub attempt_ends: Vec<&'a AttemptEnd>,
    /// The batch must fail: insert the attempts before the jobs so that it does.
    pub attempts_first: bool,
    /// Agents with a draining write: its last value, for an agent that existed before the batch.
    pub agent_draining: Vec<(&'a str, bool)>,
    pub agents: Vec<AgentUpsert<'a>>,
    /// The batch's agent writes (`Agent`, `AgentDraining`, `RemoveAgent`) one by one, in order,
    /// when it removes an agent (removals are rare); `agent_draining` and `agents` are empty then.
    pub agent_writes: Vec<&'a Write>,
    pub new_keys: Vec<NewKey<'a>>,
    pub key_changes: Vec<KeyChange<'a>>,
    /// The identity tables' writes, unfolded, in batch order (written last).
    pub identity: Vec<&'a IdentityWrite>,
}

#[derive(Clone, Copy)]
enum Slot {
    /// Index into the inserts.
    Insert(usize),
    /// Index into the updates (which hold `None` once a later insert drops them).
    Update(usize),
}

#[derive(Default)]
struct AgentSlot {
    draining: Option<usize>,
    upsert: Option<usize>,
}

#[derive(Default)]
struct KeySlot {
    new: Option<usize>,
    change: Option<usize>,
}

pub fn fold(batch: &Batch) -> Folded<'_> {
    let mut f = Folded::default();
    let mut jobs: HashMap<&str, Slot> = HashMap::new();
    let mut job_updates: Vec<Option<(&str, &JobStatus)>> = Vec::new();
    let mut attempts: HashMap<(&str, u32), Slot> = HashMap::new();
    let mut attempt_ends: Vec<Option<&AttemptEnd>> = Vec::new();
    // Jobs given an attempt in this batch before (or without) a `NewJob` of theirs in it.
    let mut attempted_before_new: Vec<&str> = Vec::new();
    let mut agents: HashMap<&str, AgentSlot> = HashMap::new();
    let mut keys: HashMap<&str, KeySlot> = HashMap::new();
    let mut key_changes: Vec<Option<KeyChange>> = Vec::new();
    let agents_in_order = batch.writes.iter().any(|w| matches!(w, Write::RemoveAgent { .. }));

    for write in &batch.writes {
        match write {
            Write::Agent(_) | Write::AgentDraining { .. } | Write::RemoveAgent { .. } if agents_in_order => {
                f.agent_writes.push(write);
            }
            Write::RemoveAgent { .. } => unreachable!("a batch with a removal writes its agents in order"),
            Write::NewJob { job: j, status } => match jobs.entry(j.id.as_str()) {
                Entry::Occupied(mut e) => match *e.get() {
                    Slot::Insert(_) => f.new_jobs.push(NewJob { new: j, last: status }),
                    Slot::Update(u) => {
                        job_updates[u] = None;
                        e.insert(Slot::Insert(f.new_jobs.len()));
                        f.new_jobs.push(NewJob { new: j, last: status });
                    }
                },
                Entry::Vacant(e) => {
                    e.insert(Slot::Insert(f.new_jobs.len()));
                    f.new_jobs.push(NewJob { new: j, last: status });
                }
            },
            Write::UpdateJob { id, status } => match jobs.entry(id.as_str()) {
                Entry::Occupied(e) => match *e.get() {
                    Slot::Insert(i) => f.new_jobs[i].last = status,
                    Slot::Update(u) => job_updates[u] = Some((id, status)),
                },
                Entry::Vacant(e) => {
                    e.insert(Slot::Update(job_updates.len()));
                    job_updates.push(Some((id, status)));
                }
            },
            Write::Event(e) => f.events.push(e),
            Write::NewAttempt(a) => {
                if !matches!(jobs.get(a.job_id.as_str()), Some(Slot::Insert(_))) {
                    attempted_before_new.push(&a.job_id);
                }
                match attempts.entry((a.job_id.as_str(), a.attempt)) {
                    Entry::Occupied(mut e) => match *e.get() {
                        Slot::Insert(_) => f.new_attempts.push(NewAttempt { new: a, end: None }),
                        Slot::Update(u) => {
                            attempt_ends[u] = None;
                            e.insert(Slot::Insert(f.new_attempts.len()));
                            f.new_attempts.push(NewAttempt { new: a, end: None });
                        }
                    },
                    Entry::Vacant(e) => {
                        e.insert(Slot::Insert(f.new_attempts.len()));
                        f.new_attempts.push(NewAttempt { new: a, end: None });
                    }
                }
            }
            Write::EndAttempt(a) => match attempts.entry((a.job_id.as_str(), a.attempt)) {
                Entry::Occupied(e) => match *e.get() {
                    Slot::Insert(i) => f.new_attempts[i].end = Some(a),
                    Slot::Update(u) => attempt_ends[u] = Some(a),
                },
                Entry::Vacant(e) => {
                    e.insert(Slot::Update(attempt_ends.len()));
                    attempt_ends.push(Some(a));
                }
            },
            Write::Agent(a) => {
                let slot = agents.entry(a.id.as_str()).or_default();
                match slot.upsert {
                    Some(i) => f.agents[i].last = a,
                    None => {
                        slot.upsert = Some(f.agents.len());
                        f.agents.push(AgentUpsert { first: a, last: a, draining: a.draining });
                    }
                }
            }
            Write::AgentDraining { id, draining } => {
                let slot = agents.entry(id.as_str()).or_default();
                match slot.draining {
                    Some(i) => f.agent_draining[i].1 = *draining,
                    None => {
                        slot.draining = Some(f.agent_draining.len());
                        f.agent_draining.push((id, *draining));
                    }
                }
                // Once the batch has inserted the agent, this write applies to the new row too.
                if let Some(i) = slot.upsert {
                    f.agents[i].draining = *draining;
                }
            }
            Write::NewKey(k) => {
                let slot = keys.entry(k.key_id.as_str()).or_default();
                if slot.new.is_none() {
                    slot.new = Some(f.new_keys.len());
                    if let Some(c) = slot.change.take() {
                        key_changes[c] = None;
                    }
                }
                f.new_keys.push(NewKey { new: k, last_used: k.last_used, revoked_at: k.revoked_at });
            }
            Write::RevokeKey { key_id, at } => {
                let slot = keys.entry(key_id.as_str()).or_default();
                match slot.new {
                    Some(i) => f.new_keys[i].revoked_at = Some(*at),
                    None => key_change(slot, &mut key_changes, key_id).revoked_at = Some(*at),
                }
            }
            Write::KeyUsed { key_id, at } => {
                let slot = keys.entry(key_id.as_str()).or_default();
                match slot.new {
                    Some(i) => f.new_keys[i].last_used = f.new_keys[i].last_used.max(*at),
                    None => {
                        let change = key_change(slot, &mut key_changes, key_id);
                        change.used = Some(change.used.map_or(*at, |u| u.max(*at)));
                    }
                }
            }
            Write::Identity(w) => f.identity.push(w),
        }
    }
    f.attempts_first = attempted_before_new.iter().any(|id| matches!(jobs.get(id), Some(Slot::Insert(_))));
    f.job_updates = job_updates.into_iter().flatten().collect();
    f.attempt_ends = attempt_ends.into_iter().flatten().collect();
    f.key_changes = key_changes.into_iter().flatten().collect();
    f
}

fn key_change<'a, 'b>(
    slot: &mut KeySlot,
    changes: &'b mut Vec<Option<KeyChange<'a>>>,
    key_id: &'a str,
) -> &'b mut KeyChange<'a> {
    let c = *slot.change.get_or_insert_with(|| {
        changes.push(Some(KeyChange { key_id, revoked_at: None, used: None }));
        changes.len() - 1
    });
    changes[c].as_mut().expect("a key's change is dropped only once the batch creates the key")
}
