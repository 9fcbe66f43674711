//! A certificate renewed on a live stream: the agent keeps its stream, so the NotAfter the core
//! shows (`admin agents`: `cert: expires …`) and stores is the renewed certificate's from then on,
//! not the one the stream opened with.

use super::{Core, Effects};
use crate::model::UnixMillis;
use crate::store::Write;

impl Core {
    /// The agent's current stream `conn` got a certificate valid until `not_after`; a closed or
    /// replaced stream's renewal changes nothing.
    pub(super) fn cert_renewed(&mut self, agent: &str, conn: u64, not_after: UnixMillis, out: &mut Effects) {
        if !self.touch(agent, conn) {
            return;
        }
        let now_ms = self.now.ms;
        let Some(entry) = self.agents.get_mut(agent) else { return };
        entry.cert_not_after = not_after;
        out.batch.push(Write::Agent(entry.record(now_ms)));
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::Harness;
    use super::super::*;

    fn shown_expiry(h: &mut Harness) -> i64 {
        let (reply, rx) = tokio::sync::oneshot::channel();
        h.step(vec![Cmd::Agents { reply }]);
        rx.blocking_recv().unwrap()[0].cert_not_after_ms
    }

    #[test]
    fn a_renewal_on_the_live_stream_is_the_expiry_shown_and_stored_and_a_stale_stream_changes_nothing() {
        let mut h = Harness::new();
        h.connect("a", 1, vec![]);
        let out = h.step(vec![Cmd::CertRenewed { agent: "lab/a".into(), conn: 1, not_after: 5_000 }]);
        assert_eq!(shown_expiry(&mut h), 5_000);
        let stored = out.batch.writes.iter().any(|w| matches!(w, Write::Agent(a) if a.cert_not_after == 5_000));
        assert!(stored, "the renewed expiry is not written");
        let out = h.step(vec![Cmd::CertRenewed { agent: "lab/a".into(), conn: 2, not_after: 9_000 }]);
        assert_eq!(shown_expiry(&mut h), 5_000);
        assert!(out.batch.writes.is_empty());
    }
}
