//! Enrolment: the `EnrollService` of the broker's enrol listener (server-authenticated TLS only;
//! the join token in the request authenticates the agent). A request is rate-limited per source
//! address and per token id, its token checked by the core, its CSR signed by the issuing CA for
//! the token's site (and node, else the CSR's), and only then is one use of the token spent: a
//! refused CSR spends nothing, an issued certificate always spends one (also when the reply is then
//! lost: the agent needs a new token, as with SPIRE). Every result is counted in
//! `hybroker_enrollments_total{result}`; the token text never reaches a log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::core::{Cmd, JoinToken, Refusal, Scope, TokenCmd};
use super::revocations::Revocations;
use crate::pki::{Ca, PkiError};
use crate::proto;

const ENROLLMENTS: &str = "hybroker_enrollments_total";
/// Every result label, declared at start so each reads 0.
pub const RESULTS: [&str; 9] =
    ["ok", "unknown", "expired", "used_up", "revoked", "wrong_site", "node_known", "bad_csr", "rate_limited"];

/// Enrolments allowed from one source address: a burst, then a steady rate.
const PER_SOURCE: Bucket = Bucket { burst: 20.0, per_second: 5.0 };
/// Enrolments allowed with one token id (a token for a whole site's nodes may take many).
const PER_TOKEN: Bucket = Bucket { burst: 10.0, per_second: 2.0 };
/// Buckets kept before idle ones are dropped.
const MAX_BUCKETS: usize = 10_000;

/// A token bucket's shape.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    burst: f64,
    per_second: f64,
}

/// Token buckets by key (a source address or a token id).
#[derive(Debug, Default)]
struct Limiter {
    buckets: HashMap<String, (f64, Instant)>,
}

impl Limiter {
    /// Takes one from `key`'s bucket; false when it is empty.
    fn allow(&mut self, key: &str, shape: Bucket, now: Instant) -> bool {
        if self.buckets.len() >= MAX_BUCKETS {
            let full = Duration::from_secs_f64(shape.burst / shape.per_second);
            self.buckets.retain(|_, (_, at)| now.duration_since(*at) < full);
        }
        let (level, at) = self.buckets.entry(key.to_string()).or_insert((shape.burst, now));
        *level = (*level + now.duration_since(*at).as_secs_f64() * shape.per_second).min(shape.burst);
        *at = now;
        if *level >= 1.0 {
            *level -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The enrol listener's only service.
pub struct EnrollService {
    core: mpsc::Sender<Cmd>,
    ca: Arc<Ca>,
    /// The broker's own CA bundle (`tls.ca_cert`), handed to agents: read at each call, so a
    /// rollover's two-root bundle reaches them.
    bundle: PathBuf,
    lifetime: Duration,
    revoked: Arc<Revocations>,
    limiter: Mutex<Limiter>,
}

impl EnrollService {
    pub fn new(
        core: mpsc::Sender<Cmd>,
        ca: Arc<Ca>,
        bundle: PathBuf,
        lifetime: Duration,
        revoked: Arc<Revocations>,
    ) -> Self {
        let registry = crate::metrics::global();
        for result in RESULTS {
            registry.declare(ENROLLMENTS, &[result]);
        }
        Self { core, ca, bundle, lifetime, revoked, limiter: Mutex::new(Limiter::default()) }
    }

    fn allow(&self, key: &str, shape: Bucket) -> bool {
        self.limiter.lock().expect("limiter lock").allow(key, shape, Instant::now())
    }

    async fn ask(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<Scope, Refusal>>) -> TokenCmd,
    ) -> Result<Result<Scope, Refusal>, Status> {
        let (tx, rx) = oneshot::channel();
        self.core.send(Cmd::Token(cmd(tx))).await.map_err(|_| unavailable())?;
        rx.await.map_err(|_| unavailable())
    }
}

/// The trust bundle to give an agent: the broker's `tls.ca_cert` as it is now (it holds both
/// roots during a rollover); the issuing CA's bundle when that file cannot be read.
pub fn trust_bundle(path: &Path, ca: &Ca) -> String {
    crate::tls::read_bundle(path).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "could not read the CA bundle; handing out the issuing CA's");
        ca.cert_pem().to_string()
    })
}

fn unavailable() -> Status {
    Status::unavailable("the broker's core is not running")
}

/// Counts one result and passes `status` on.
fn refused(result: &str, status: Status) -> Status {
    crate::metrics::global().inc(ENROLLMENTS, &[result], 1.0);
    status
}

#[tonic::async_trait]
impl proto::enroll_service_server::EnrollService for EnrollService {
    async fn enroll(&self, req: Request<proto::EnrollRequest>) -> Result<Response<proto::EnrollResponse>, Status> {
        // IPv6 by its /64: one host could otherwise take a fresh address per request.
        let source = crate::tls::source_of(req.remote_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0])));
        if !self.allow(&format!("source {source}"), PER_SOURCE) {
            tracing::warn!(%source, "enrolment refused: too many from this address");
            return Err(refused(
                "rate_limited",
                Status::resource_exhausted("too many enrolments from this address; retry later"),
            ));
        }
        let req = req.into_inner();
        let Some(token) = JoinToken::parse(&req.token) else {
            tracing::warn!(%source, "enrolment refused: not a join token");
            return Err(refused("unknown", Status::unauthenticated(Refusal::Unknown.message(""))));
        };
        let token_id = token.token_id.clone();
        let scope = self.ask(|reply| TokenCmd::Check { token: token.clone(), reply }).await?;
        let scope = scope.map_err(|why| {
            tracing::warn!(%source, token_id, reason = why.label(), "enrolment refused");
            // A launched instance early for its launch's answer tries again.
            let status = if why == Refusal::Unbound { Status::unavailable } else { Status::permission_denied };
            refused(why.label(), status(why.message(&token_id)))
        })?;
        // Charged only with the right secret: token ids are listed and logged, and a stranger
        // guessing secrets must not use up a real token's rate.
        if !self.allow(&format!("token {token_id}"), PER_TOKEN) {
            tracing::warn!(%source, token_id, "enrolment refused: too many with this token");
            return Err(refused(
                "rate_limited",
                Status::resource_exhausted("too many enrolments with this join token; retry later"),
            ));
        }
        let signed =
            self.ca.sign_agent_csr(&req.csr_der, &scope.site, scope.node.as_deref(), self.lifetime).map_err(|e| {
                let (result, status) = match &e {
                    PkiError::CsrNotAllowed { .. } => ("wrong_site", Status::permission_denied(e.to_string())),
                    _ => ("bad_csr", Status::invalid_argument(e.to_string())),
                };
                tracing::warn!(%source, token_id, result, error = %e, "enrolment refused");
                refused(result, status)
            })?;
        // An identity revoked after the token was made (a stolen node keeping its join file) is not
        // enrolled with it; a token made after the revocation enrols the node afresh.
        if let Some(reason) = self.revoked.denies(&signed.identity.uri(), "", scope.created_at) {
            tracing::warn!(%source, token_id, agent = signed.identity.agent_id(), reason, "enrolment refused");
            let message = format!(
                "agent {} was revoked after join token {token_id} was made; ask an admin for a new token",
                signed.identity.agent_id()
            );
            return Err(refused("revoked", Status::permission_denied(message)));
        }
        // Checked again and spent at once: a token used up meanwhile gets nothing.
        let agent = signed.identity.agent_id();
        let spent = self.ask(|reply| TokenCmd::Spend { token, agent, reply }).await?;
        spent.map_err(|why| {
            tracing::warn!(%source, token_id, reason = why.label(), "enrolment refused");
            refused(why.label(), Status::permission_denied(why.message(&token_id)))
        })?;
        crate::metrics::global().inc(ENROLLMENTS, &["ok"], 1.0);
        tracing::info!(
            agent = signed.identity.agent_id(),
            token_id,
            serial = signed.serial,
            %source,
            "agent enrolled"
        );
        Ok(Response::new(proto::EnrollResponse {
            cert_chain_pem: signed.chain_pem,
            ca_bundle_pem: trust_bundle(&self.bundle, &self.ca),
            agent_id: signed.identity.agent_id(),
            issued_at_ms: signed.issued_at,
            not_after_ms: signed.not_after,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut limiter = Limiter::default();
        let shape = Bucket { burst: 3.0, per_second: 2.0 };
        let t0 = Instant::now();
        assert!((0..3).all(|_| limiter.allow("a", shape, t0)));
        assert!(!limiter.allow("a", shape, t0));
        assert!(limiter.allow("b", shape, t0), "buckets are per key");
        assert!(limiter.allow("a", shape, t0 + Duration::from_millis(500)));
        assert!(!limiter.allow("a", shape, t0 + Duration::from_millis(500)));
    }
}
