//! The loop around the core: it loads the core from the store, feeds it batches of commands with
//! the clock, commits each batch's writes in one transaction and only then releases the batch's
//! replies, agent messages and job events (invariant 6). It owns the store writer and the agents'
//! outboxes, which the core never sees.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};

use super::{Cmd, Conn, Core, CoreSettings, Effects, Now, Stored, place};
use crate::store::{JobEvent, StoreError, Write, Writer};

/// Most commands applied in one batch (one transaction).
const MAX_BATCH: usize = 4096;
/// Lease expiry waits out a backlog for at most this many ticks (a tick is a quarter lease).
const MAX_DEFERRED_TICKS: u32 = 2;

pub struct Driver {
    core: Core,
    writer: Writer,
    /// Each connected agent's current stream.
    outboxes: HashMap<String, Conn>,
    events: broadcast::Sender<JobEvent>,
    lease_ttl: Duration,
}

impl Driver {
    /// Loads every unfinished job, the agents, keys and this month's spend from the store.
    pub async fn load(
        mut writer: Writer,
        settings: CoreSettings,
        events: broadcast::Sender<JobEvent>,
    ) -> Result<Self, StoreError> {
        let now = Now::system();
        let stored = stored(&mut writer, now).await?;
        let lease_ttl = settings.lease_ttl;
        let core = Core::restore(settings, stored, now)?;
        Ok(Self { core, writer, outboxes: HashMap::new(), events, lease_ttl })
    }

    /// Runs until every command sender is gone, or a commit fails.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) -> Result<(), StoreError> {
        let mut tick = tokio::time::interval((self.lease_ttl / 4).max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cmds = Vec::with_capacity(MAX_BATCH);
        let mut expiry_due = false;
        let mut ticks_deferred = 0;
        let mut gauges_due = false;
        loop {
            // Leases are checked on the tick only: walking every job per batch would cost more
            // than the batch itself under load.
            tokio::select! {
                n = rx.recv_many(&mut cmds, MAX_BATCH) => if n == 0 { return Ok(()) },
                _ = tick.tick() => {
                    ticks_deferred += u32::from(expiry_due);
                    expiry_due = true;
                    gauges_due = true;
                }
            }
            // Every idempotency key of the batch is looked up in one query.
            let keys: Vec<(String, String)> = cmds.iter().filter_map(Cmd::idempotency_key).collect();
            let found = if keys.is_empty() { HashMap::new() } else { self.writer.find_idempotent(&keys).await? };
            for cmd in &cmds {
                if let Cmd::Connected { agent, conn, .. } = cmd {
                    self.outboxes.insert(agent.clone(), conn.clone());
                }
            }
            // Not while a backlog waits (a heartbeat queued behind it must not count as silence),
            // but a lasting overload must not starve expiry either: after a few ticks it runs anyway.
            let expire = expiry_due && (rx.len() < MAX_BATCH || ticks_deferred >= MAX_DEFERRED_TICKS);
            if expire {
                expiry_due = false;
                ticks_deferred = 0;
            }
            let out = self.core.step(cmds.drain(..), found, expire, Now::system());
            self.writer.commit(&out.batch).await?;
            self.deliver(out);
            if std::mem::take(&mut gauges_due) {
                self.core.publish_gauges();
            }
        }
    }

    /// Releases a committed batch's effects: replies, closed streams, agent messages, job events.
    fn deliver(&mut self, out: Effects) {
        for f in out.replies {
            f();
        }
        for (agent, conn) in out.closed {
            if self.outboxes.get(&agent).is_some_and(|c| c.id == conn) {
                self.outboxes.remove(&agent);
            }
        }
        for (agent, msg) in out.messages {
            let Some(conn) = self.outboxes.get(&agent) else { continue };
            // An agent whose outbox is full or gone loses its stream (it reconnects and
            // reconciles), so no message is silently dropped on a stream that stays open.
            if conn.outbox.try_send(msg).is_err() {
                let id = conn.id;
                self.outboxes.remove(&agent);
                self.core.stream_lost(&agent, id);
            }
        }
        // Their last messages are queued: dropping the outbox ends the stream after them.
        for (agent, conn) in out.ended {
            if self.outboxes.get(&agent).is_some_and(|c| c.id == conn) {
                self.outboxes.remove(&agent);
            }
        }
        // Job events travel in the batch; they are sent only when someone watches.
        if self.events.receiver_count() > 0 {
            for write in out.batch.writes {
                if let Write::Event(ev) = write {
                    let _ = self.events.send(ev);
                }
            }
        }
    }
}

/// What the core needs of the store at start (`now` picks the month whose spend counts).
pub(super) async fn stored(writer: &mut Writer, now: Now) -> Result<Stored, StoreError> {
    Ok(Stored {
        last_event_seq: writer.last_event_seq().await?,
        spent: writer.load_spend(place::month_start(now.ms)).await?,
        keys: writer.load_keys().await?,
        agents: writer.load_agents().await?,
        join_tokens: writer.load_join_tokens().await?,
        launches: writer.load_launches(place::month_start(now.ms)).await?,
        jobs: writer.load_active().await?,
    })
}
