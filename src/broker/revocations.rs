//! The broker's deny list of revoked certificates, shared by the TLS verifier (refused at the
//! handshake), the accept path (refused after it, and live connections closed), the admin service
//! (revoke, list) and renewal (checked before signing).
//!
//! An entry names an identity URI, which denies every certificate of that identity issued before
//! the revocation (issue time = NotBefore + [`tls::BACKDATE`]; a certificate issued later, e.g. after
//! a new join token, passes), or one serial (lower-case hex, any identity). It is loaded from the
//! store at start and updated after each revocation's commit.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::core::{Cmd, Revoke};
use crate::model::UnixMillis;
use crate::model::identity::{Identity, Role};
use crate::proto;
use crate::store::RevocationRecord;
use crate::tls::{self, DenyList, LiveConnections, PeerCert};

/// The deny list.
#[derive(Debug, Default)]
pub struct Revocations {
    index: ArcSwap<Index>,
}

#[derive(Debug, Default, Clone)]
struct Index {
    /// Every entry, oldest first.
    records: Vec<RevocationRecord>,
    /// Identity URI → the latest revocation of it (time, reason).
    identities: HashMap<String, (UnixMillis, String)>,
    /// Serial → reason.
    serials: HashMap<String, String>,
}

impl Index {
    fn add(&mut self, record: RevocationRecord) {
        if !record.identity.is_empty() {
            let latest = self.identities.entry(record.identity.clone()).or_insert((i64::MIN, String::new()));
            if record.revoked_at >= latest.0 {
                *latest = (record.revoked_at, record.reason.clone());
            }
        }
        if let Some(serial) = tls::normalize_serial(&record.serial) {
            self.serials.insert(serial, record.reason.clone());
        }
        self.records.push(record);
    }
}

impl Revocations {
    /// The list holding `records` (from `Writer::load_revocations`).
    pub fn new(records: Vec<RevocationRecord>) -> Arc<Self> {
        let mut index = Index::default();
        records.into_iter().for_each(|r| index.add(r));
        Arc::new(Self { index: ArcSwap::from_pointee(index) })
    }

    /// Adds a committed entry.
    pub fn add(&self, record: RevocationRecord) {
        self.index.rcu(|index| {
            let mut index = Index::clone(index);
            index.add(record.clone());
            index
        });
    }

    /// Whether nothing is revoked (then no call needs a check).
    pub fn is_empty(&self) -> bool {
        self.index.load().records.is_empty()
    }

    /// Every entry, oldest first.
    pub fn list(&self) -> Vec<RevocationRecord> {
        self.index.load().records.clone()
    }

    /// Why the certificate `serial_hex` of `identity_uri`, issued at `issued_at`, is revoked;
    /// `None` when it is not. Renewal calls this before signing.
    pub fn denies(&self, identity_uri: &str, serial_hex: &str, issued_at: UnixMillis) -> Option<String> {
        let index = self.index.load();
        if let Some((revoked_at, reason)) = index.identities.get(identity_uri)
            && issued_at < *revoked_at
        {
            return Some(format!("identity {identity_uri} revoked: {reason}"));
        }
        let serial = tls::normalize_serial(serial_hex)?;
        index.serials.get(&serial).map(|reason| format!("certificate serial {serial} revoked: {reason}"))
    }
}

impl DenyList for Revocations {
    fn denies(&self, identity_uri: &str, serial_hex: &str, issued_at: UnixMillis) -> Option<String> {
        Revocations::denies(self, identity_uri, serial_hex, issued_at)
    }
}

/// Refuses every call whose connection's certificate is revoked, with `permission_denied`: the
/// per-call check behind the handshake's and the closing of live connections (which already end
/// the calls of a revoked connection). Free while nothing is revoked.
#[derive(Debug, Clone)]
pub struct DenyCallsLayer(pub Arc<Revocations>);

impl<S> tower::Layer<S> for DenyCallsLayer {
    type Service = DenyCalls<S>;

    fn layer(&self, inner: S) -> DenyCalls<S> {
        DenyCalls { inner, list: self.0.clone() }
    }
}

/// The service of [`DenyCallsLayer`].
#[derive(Debug, Clone)]
pub struct DenyCalls<S> {
    inner: S,
    list: Arc<Revocations>,
}

impl<S> DenyCalls<S> {
    /// Why the call's peer certificate is revoked, if it is.
    fn refusal<B>(&self, req: &http::Request<B>) -> Option<String> {
        if self.list.is_empty() {
            return None;
        }
        let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
        let certs = info.peer_certs()?;
        self.list.denies_peer(&PeerCert::from_der(certs.first()?).ok()?)
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for DenyCalls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, std::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.refusal(&req) {
            Some(reason) => {
                let status = Status::permission_denied(format!("certificate revoked: {reason}"));
                futures::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
            None => futures::future::Either::Left(self.inner.call(req)),
        }
    }
}

/// The admin side of revocation: checks a request, has the core commit it, then updates the deny
/// list and closes the live connections it now refuses.
#[derive(Debug)]
pub struct RevocationAdmin {
    pub core: mpsc::Sender<Cmd>,
    pub list: Arc<Revocations>,
    pub live: Arc<LiveConnections>,
    pub trust_domain: String,
    /// The broker's own certificate, which may not be revoked through itself.
    pub own: PeerCert,
}

impl RevocationAdmin {
    /// Revokes what `req` names on behalf of `actor` (an identity URI).
    pub async fn revoke(
        &self,
        actor: &str,
        req: proto::RevokeCertificatesRequest,
    ) -> Result<proto::RevocationInfo, Status> {
        let (identity, serial) = match (req.identity.trim(), req.serial.trim()) {
            ("", "") => return Err(Status::invalid_argument("name an identity or a serial to revoke")),
            (id, s) if !id.is_empty() && !s.is_empty() => {
                return Err(Status::invalid_argument("name an identity or a serial, not both"));
            }
            (id, "") => (Some(self.identity(id)?), String::new()),
            (_, s) => {
                let serial = tls::normalize_serial(s).ok_or_else(|| {
                    Status::invalid_argument(format!("serial {s:?} is not hexadecimal (e.g. 4f:a0:1c or 4fa01c)"))
                })?;
                if serial == self.own.serial_hex {
                    return Err(Status::failed_precondition(
                        "serial is the broker's own certificate; replace the broker's certificate on disk instead",
                    ));
                }
                (None, serial)
            }
        };
        let agent = identity.as_ref().filter(|i| i.role == Role::Agent).map(Identity::agent_id);
        let record = RevocationRecord {
            identity: identity.as_ref().map(Identity::uri).unwrap_or_default(),
            serial,
            reason: req.reason.trim().to_string(),
            revoked_by: actor.to_string(),
            revoked_at: crate::broker::core::now_ms(),
        };
        // Denied from now on, before the commit: a renewal or handshake racing with the commit
        // cannot slip through (a certificate issued after this stamp is a new enrolment's). A
        // failed commit leaves the entry denied in memory until a restart, and the caller an error.
        self.list.add(record.clone());
        let (tx, rx) = oneshot::channel();
        let unavailable = || Status::unavailable("the broker's core is not running");
        self.core.send(Cmd::Revoke(Revoke { record, agent, reply: tx })).await.map_err(|_| unavailable())?;
        let record = rx.await.map_err(|_| unavailable())??;
        let closed = self.live.close_denied(self.list.as_ref());
        tracing::info!(actor, identity = record.identity, serial = record.serial, closed, "revocation in force");
        Ok(info(record, closed))
    }

    /// Every entry, oldest first.
    pub fn list(&self) -> proto::ListRevocationsResponse {
        proto::ListRevocationsResponse { revocations: self.list.list().into_iter().map(|r| info(r, 0)).collect() }
    }

    /// The identity `given` names: a SPIFFE URI in our trust domain, or `SITE/NODE` of an agent.
    fn identity(&self, given: &str) -> Result<Identity, Status> {
        let uri = if given.starts_with("spiffe://") {
            given.to_string()
        } else {
            match given.split_once('/') {
                Some((site, node)) if !site.is_empty() && !node.is_empty() => {
                    format!("spiffe://{}/agent/{site}/{node}", self.trust_domain)
                }
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "identity {given:?} is neither a spiffe:// URI nor an agent's SITE/NODE"
                    )));
                }
            }
        };
        let identity =
            Identity::parse(&uri).map_err(|e| Status::invalid_argument(format!("identity {given:?}: {e}")))?;
        if identity.trust_domain != self.trust_domain {
            return Err(Status::invalid_argument(format!(
                "identity {uri} is not in this broker's trust domain {}",
                self.trust_domain
            )));
        }
        if identity.uri() == self.own.identity_uri || identity.role == Role::Broker {
            return Err(Status::failed_precondition(format!(
                "{uri} is a broker identity; the broker cannot revoke itself: replace its certificate on disk instead"
            )));
        }
        Ok(identity)
    }
}

fn info(r: RevocationRecord, closed: u32) -> proto::RevocationInfo {
    proto::RevocationInfo {
        identity: r.identity,
        serial: r.serial,
        reason: r.reason,
        revoked_at_ms: r.revoked_at,
        revoked_by: r.revoked_by,
        connections_closed: closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(identity: &str, serial: &str, at: UnixMillis) -> RevocationRecord {
        RevocationRecord {
            identity: identity.into(),
            serial: serial.into(),
            reason: "lost".into(),
            revoked_by: "spiffe://td/admin/ops".into(),
            revoked_at: at,
        }
    }

    #[test]
    fn an_identity_is_denied_for_certificates_issued_before_its_revocation() {
        let list = Revocations::new(vec![record("spiffe://td/agent/s/n", "", 1_000)]);
        assert!(list.denies("spiffe://td/agent/s/n", "ab", 999).is_some());
        assert!(list.denies("spiffe://td/agent/s/n", "ab", 1_000).is_none(), "issued at or after: a fresh one");
        assert!(list.denies("spiffe://td/agent/s/other", "ab", 0).is_none());
    }

    #[test]
    fn a_serial_is_denied_whatever_its_identity_and_spelling() {
        let list = Revocations::new(Vec::new());
        list.add(record("", "0a1b", 5));
        assert!(list.denies("spiffe://td/gateway/g", "0A:1B", i64::MAX).is_some());
        assert!(list.denies("spiffe://td/gateway/g", "a1c", 0).is_none());
        assert_eq!(list.list().len(), 1);
    }
}
