//! The broker's stop: every connected agent is told to reconnect (each after its own pause, so
//! that they do not all come back to the next broker at once) and its stream ends. Leases are
//! left as they are: the next broker restores them and gives the agents one lease period.

use std::time::Duration;

use super::{AgentMessage, Core, Effects};

/// What agents are told when the broker stops.
pub const SHUTDOWN_REASON: &str = "broker shutting down";

impl Core {
    /// Tells every connected agent to reconnect after a pause below `jitter` (drawn from `seed`)
    /// and ends its stream once told; returns how many were told. Agents that connect later in
    /// the batch or after are told the same (`stopping` stays set).
    pub(super) fn shutdown(&mut self, jitter: Duration, seed: u64, out: &mut Effects) -> usize {
        self.stopping = Some((jitter, seed));
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut told = 0;
        for entry in self.agents.values_mut() {
            let Some(conn) = entry.conn.take() else { continue };
            let after = jitter.mul_f64(rng.f64());
            out.send(&entry.id, AgentMessage::Reconnect { after, reason: SHUTDOWN_REASON.into() });
            out.ended.push((entry.id.clone(), conn));
            told += 1;
        }
        told
    }

    /// While stopping, an agent that registers is told to reconnect at once.
    pub(super) fn refuse_while_stopping(&mut self, out: &mut Effects) {
        if let Some((jitter, seed)) = self.stopping {
            let told = self.shutdown(jitter, seed.wrapping_add(1), out);
            if told > 0 {
                tracing::info!(told, "told agents that registered while stopping to reconnect");
            }
        }
    }
}
