//! Renewal on the agent's stream: an agent sends a CSR for a new key on its live session; the
//! broker signs it for the stream's own identity (site and node from the peer certificate, never
//! from the CSR) and answers `Renewed` on the same stream. A stream ends when its certificate's
//! NotAfter passes, unless the agent renewed on it (the newest certificate's NotAfter counts).
//! Results are counted in `hybroker_cert_renewals_total{result}`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Request, Status};

use super::core::{AgentMessage, RenewedCert};
use crate::model::UnixMillis;
use crate::model::identity::Identity;
use crate::pki::{Ca, PkiError};
use crate::tls::{DenyList, PeerCert};

use super::revocations::Revocations;

const RENEWALS: &str = "hybroker_cert_renewals_total";

/// What signs renewals: the issuing CA and the lifetime it grants; revoked identities get none.
pub struct Renewal {
    ca: Arc<Ca>,
    /// The broker's `tls.ca_cert`, handed out with each renewal (see `enroll::trust_bundle`).
    bundle: std::path::PathBuf,
    lifetime: Duration,
    revoked: Arc<Revocations>,
}

impl Renewal {
    pub fn new(ca: Arc<Ca>, bundle: std::path::PathBuf, lifetime: Duration, revoked: Arc<Revocations>) -> Self {
        let registry = crate::metrics::global();
        for result in ["ok", "bad_csr", "refused"] {
            registry.declare(RENEWALS, &[result]);
        }
        Renewal { ca, bundle, lifetime, revoked }
    }
}

/// The peer certificate of a request, if it has a parsable one.
pub fn peer_cert<T>(req: &Request<T>) -> Option<PeerCert> {
    let certs = req.peer_certs()?;
    PeerCert::from_der(certs.first()?.as_ref()).ok()
}

/// One stream's certificate: when it expires, and how to renew it.
pub struct StreamCert {
    identity: Identity,
    /// The certificate the stream runs on: the peer's, then the newest renewal's. Its NotAfter
    /// ends the stream.
    cert: Option<PeerCert>,
    renewal: Option<Arc<Renewal>>,
    /// Weak: the stream ends when the driver drops the agent's outbox, which this must not keep.
    outbox: mpsc::WeakSender<AgentMessage>,
    /// When this stream last got a certificate: one renewal per quarter lifetime at most.
    last_renewed: Option<Instant>,
}

impl StreamCert {
    pub fn new(
        identity: Identity,
        cert: Option<PeerCert>,
        renewal: Option<Arc<Renewal>>,
        outbox: mpsc::Sender<AgentMessage>,
    ) -> Self {
        StreamCert { identity, cert, renewal, outbox: outbox.downgrade(), last_renewed: None }
    }

    /// Resolves when the stream's certificate has expired (never, without a NotAfter).
    pub async fn expired(&self) {
        match self.cert.as_ref().map(|c| c.not_after) {
            Some(at) => {
                let left = Duration::from_millis(at.saturating_sub(super::core::now_ms()).max(0) as u64);
                tokio::time::sleep_until(Instant::now() + left).await;
            }
            None => std::future::pending().await,
        }
    }

    /// Signs `csr_der` for this stream's identity and answers on the stream.
    /// Returns the new certificate's NotAfter when one was issued.
    pub fn renew(&mut self, csr_der: &[u8]) -> Option<UnixMillis> {
        let agent = self.identity.agent_id();
        let answer = match self.sign(csr_der) {
            Ok(signed) => {
                crate::metrics::global().inc(RENEWALS, &["ok"], 1.0);
                tracing::info!(
                    agent,
                    serial = signed.serial,
                    not_after = signed.not_after,
                    "agent certificate renewed"
                );
                self.cert = Some(PeerCert {
                    identity_uri: signed.identity.uri(),
                    serial_hex: signed.serial.clone(),
                    issued_at: signed.issued_at,
                    not_after: signed.not_after,
                });
                RenewedCert {
                    cert_chain_pem: signed.chain_pem,
                    issued_at: signed.issued_at,
                    not_after: signed.not_after,
                    error: String::new(),
                    ca_bundle_pem: self
                        .renewal
                        .as_ref()
                        .map(|r| super::enroll::trust_bundle(&r.bundle, &r.ca))
                        .unwrap_or_default(),
                }
            }
            Err((result, error)) => {
                crate::metrics::global().inc(RENEWALS, &[result], 1.0);
                tracing::warn!(agent, result, error, "agent certificate renewal refused");
                RenewedCert { error, ..RenewedCert::default() }
            }
        };
        let issued = (!answer.cert_chain_pem.is_empty()).then_some(answer.not_after);
        // A full or closed outbox means the stream is being dropped; the agent retries later.
        if let Some(outbox) = self.outbox.upgrade() {
            let _ = outbox.try_send(AgentMessage::Renewed(answer));
        }
        issued
    }

    /// Why the certificate this stream runs on is now revoked (a serial revocation of a renewed
    /// certificate, which the handshake registry does not know); `None` when it is not.
    pub fn revoked(&self) -> Option<String> {
        let (renewal, cert) = (self.renewal.as_ref()?, self.cert.as_ref()?);
        if renewal.revoked.is_empty() {
            return None;
        }
        renewal.revoked.denies_peer(cert)
    }

    fn sign(&mut self, csr_der: &[u8]) -> Result<crate::pki::SignedLeaf, (&'static str, String)> {
        let Some(renewal) = &self.renewal else {
            return Err(("refused", "this broker does not renew certificates (no broker.ca_dir)".to_string()));
        };
        // A misbehaving (or stolen) agent must not make the stream sign in a loop.
        let pause = renewal.lifetime / 4;
        if let Some(at) = self.last_renewed
            && at.elapsed() < pause
        {
            return Err(("refused", format!("renewed less than {pause:?} ago on this stream")));
        }
        // A revoked certificate's stream is closed at the revocation; this covers one renewing
        // in the same moment.
        if let Some(cert) = &self.cert
            && let Some(reason) = renewal.revoked.denies_peer(cert)
        {
            return Err(("refused", reason));
        }
        let site = self.identity.site.as_deref().unwrap_or_default();
        let signed =
            renewal.ca.sign_agent_csr(csr_der, site, Some(&self.identity.name), renewal.lifetime).map_err(|e| {
                let result = if matches!(e, PkiError::BadCsr(_)) { "bad_csr" } else { "refused" };
                (result, e.to_string())
            })?;
        self.last_renewed = Some(Instant::now());
        Ok(signed)
    }
}

/// The messages of an agent's stream, ended with an error when `end` fires (its certificate
/// expired); without that, they end when the outbox closes, as a stream always did.
pub struct EndWhenExpired<S> {
    messages: S,
    end: Option<oneshot::Receiver<Status>>,
    done: bool,
}

impl<S> EndWhenExpired<S> {
    pub fn new(messages: S, end: oneshot::Receiver<Status>) -> Self {
        EndWhenExpired { messages, end: Some(end), done: false }
    }
}

impl<S, T> Stream for EndWhenExpired<S>
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(end) = self.end.as_mut()
            && let Poll::Ready(ended) = Pin::new(end).poll(cx)
        {
            self.end = None;
            if let Ok(status) = ended {
                self.done = true;
                return Poll::Ready(Some(Err(status)));
            }
        }
        Pin::new(&mut self.messages).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RevocationRecord;

    const TD: &str = "t.example";

    /// A stream of agent `lab/n1` whose certificate was issued at `issued_at`, and its outbox
    /// (the sender, which the stream holds only weakly, as the driver does, and the receiver).
    type Outbox = (mpsc::Sender<AgentMessage>, mpsc::Receiver<AgentMessage>);

    fn stream(revoked: Vec<RevocationRecord>, issued_at: UnixMillis) -> (StreamCert, Outbox) {
        let ca = Arc::new(Ca::generate(TD).unwrap());
        let renewal = Renewal::new(ca, "no-bundle.pem".into(), Duration::from_secs(3600), Revocations::new(revoked));
        let identity = Identity::agent(TD, "lab", "n1");
        let cert = PeerCert { identity_uri: identity.uri(), serial_hex: "a1".into(), issued_at, not_after: i64::MAX };
        let (tx, rx) = mpsc::channel(8);
        (StreamCert::new(identity, Some(cert), Some(Arc::new(renewal)), tx.clone()), (tx, rx))
    }

    fn answer(rx: &mut mpsc::Receiver<AgentMessage>) -> RenewedCert {
        match rx.try_recv().unwrap() {
            AgentMessage::Renewed(renewed) => renewed,
            other => panic!("not a renewal answer: {other:?}"),
        }
    }

    fn csr() -> Vec<u8> {
        crate::pki::agent_csr(TD, "lab", "n1").unwrap().1
    }

    #[test]
    fn a_stream_gets_one_certificate_per_quarter_lifetime() {
        let (mut stream, (_tx, mut rx)) = stream(vec![], super::super::core::now_ms());
        assert!(stream.renew(&csr()).is_some());
        assert!(answer(&mut rx).error.is_empty());
        assert_eq!(stream.renew(&csr()), None, "a second renewal at once");
        let refused = answer(&mut rx);
        assert!(refused.cert_chain_pem.is_empty() && refused.error.contains("renewed less than"), "{refused:?}");
    }

    #[test]
    fn a_revoked_identity_is_not_renewed_and_its_stream_says_so() {
        let record = RevocationRecord {
            identity: Identity::agent(TD, "lab", "n1").uri(),
            serial: String::new(),
            reason: "stolen".into(),
            revoked_by: "spiffe://t.example/admin/ops".into(),
            revoked_at: 2_000,
        };
        let (mut stream, (_tx, mut rx)) = stream(vec![record], 1_000);
        assert!(stream.revoked().is_some_and(|why| why.contains("stolen")));
        assert_eq!(stream.renew(&csr()), None);
        assert!(answer(&mut rx).error.contains("revoked"));
    }
}
