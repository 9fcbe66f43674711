//! Certificate revocation in the core: the deny entry and its audit event are written in the batch,
//! and a revoked agent is cut off at once: its stream is ended and its attempts count as lost (like
//! an expired lease), so they are re-queued and run elsewhere. The deny list itself and the closing
//! of TLS connections live in the service (`broker/revocations.rs`), after the commit.

use super::fleet::admin_event;
use super::{Core, Effects, Reply};
use crate::store::{IdentityWrite, RevocationRecord, Write};

/// A revocation as the core takes it.
pub struct Revoke {
    /// The deny entry (its `revoked_at` is set by the core's clock).
    pub record: RevocationRecord,
    /// The agent id (`site/node`) when an agent identity is revoked.
    pub agent: Option<String>,
    /// The entry as stored, once committed.
    pub reply: Reply<RevocationRecord>,
}

impl Core {
    /// Records `revoke` and, for an agent, ends its stream and loses its attempts.
    pub(super) fn revoke(&mut self, revoke: Revoke, out: &mut Effects) {
        let Revoke { mut record, agent, reply } = revoke;
        if record.revoked_at == 0 {
            record.revoked_at = self.now.ms;
        }
        let target =
            if record.identity.is_empty() { format!("serial {}", record.serial) } else { record.identity.clone() };
        tracing::info!(actor = record.revoked_by, target, reason = record.reason, "certificate revoked");
        out.batch.push(Write::Identity(IdentityWrite::Revocation(record.clone())));
        out.batch.push(admin_event(record.revoked_at, &record.revoked_by, "cert.revoke", &target, &record.reason));
        if let Some(agent) = agent {
            self.cut_off(&agent, "agent certificate revoked", out);
        }
        out.reply(reply, Ok(record));
    }
}
