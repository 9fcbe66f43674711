//! Renewal of the agent's certificate over its live stream, as kubelet does: at a random point in
//! 70–90 % of the certificate's lifetime, counted from its issue time (NotBefore + BACKDATE, not
//! the backdated NotBefore), the agent makes a new key and sends a CSR on the session; on
//! `Renewed` it writes key (0600) and chain atomically and builds its client TLS from the files
//! for the next handshakes, without dropping the stream or any attempt. A refused or unanswered
//! renewal is retried with backoff.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::enroll::now_ms;
use crate::config::agent::AgentConfig;
use crate::model::UnixMillis;
use crate::model::retry::RetryPolicy;
use crate::{pki, proto};

/// How long a sent renewal waits for its answer before it is sent again.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// When to renew a certificate issued at `issued_at` that expires at `not_after`: at `issued_at`
/// plus 70 % to 90 % of the lifetime, `random` (in [0, 1)) picking where.
pub fn renewal_point(issued_at: UnixMillis, not_after: UnixMillis, random: f64) -> UnixMillis {
    let lifetime = (not_after - issued_at).max(0) as f64;
    issued_at + (lifetime * (0.7 + 0.2 * random.clamp(0.0, 1.0))).round() as UnixMillis
}

/// The current certificate's times, and a renewal in flight.
pub(super) struct Renewer {
    issued_at: UnixMillis,
    not_after: UnixMillis,
    /// When to send (again).
    next_at: UnixMillis,
    /// The key of the CSR in flight.
    pending_key: Option<String>,
    failures: u32,
    policy: RetryPolicy,
}

impl Renewer {
    /// The schedule of the certificate at `cert` (none when it cannot be read: no renewal).
    pub(super) fn load(cert: &Path) -> Option<Renewer> {
        let (issued_at, not_after) = cert_times(cert).ok()?;
        let policy = RetryPolicy::exponential(Duration::from_secs(2), Duration::from_secs(32)).with_jitter(0.5);
        let next_at = renewal_point(issued_at, not_after, fastrand::f64());
        tracing::info!(
            issued_at_ms = issued_at,
            not_after_ms = not_after,
            renew_at_ms = next_at,
            "certificate renewal scheduled"
        );
        Some(Renewer { issued_at, not_after, next_at, pending_key: None, failures: 0, policy })
    }

    /// How long until the next renewal (or resend) is due.
    pub(super) fn due_in(&self) -> Duration {
        Duration::from_millis(self.next_at.saturating_sub(now_ms()).max(0) as u64)
    }

    /// A renewal request for a fresh key, kept until the answer.
    pub(super) fn request(
        &mut self,
        trust_domain: &str,
        site: &str,
        node: &str,
    ) -> anyhow::Result<proto::RenewRequest> {
        let (key_pem, csr_der) = pki::agent_csr(trust_domain, site, node)?;
        self.pending_key = Some(key_pem);
        self.next_at = now_ms() + ANSWER_TIMEOUT.as_millis() as i64;
        tracing::info!(
            lifetime_used = (now_ms() - self.issued_at) as f64 / (self.not_after - self.issued_at).max(1) as f64,
            "renewing the agent certificate"
        );
        Ok(proto::RenewRequest { csr_der })
    }

    /// Applies an answer: writes key and chain (and the CA bundle) on success and returns true;
    /// schedules a retry otherwise.
    pub(super) fn answer(&mut self, config: &AgentConfig, renewed: proto::Renewed) -> bool {
        let Some(key_pem) = self.pending_key.take() else {
            tracing::warn!("ignored a renewal answer with no renewal in flight");
            return false;
        };
        let written = if renewed.error.is_empty() {
            write(&config.tls, &key_pem, &renewed)
        } else {
            Err(anyhow::anyhow!(renewed.error))
        };
        match written {
            Ok(()) => {
                self.issued_at = renewed.issued_at_ms;
                self.not_after = renewed.not_after_ms;
                self.next_at = renewal_point(self.issued_at, self.not_after, fastrand::f64());
                self.failures = 0;
                tracing::info!(
                    not_after_ms = self.not_after,
                    renew_at_ms = self.next_at,
                    "agent certificate renewed; the next connections use it"
                );
                true
            }
            Err(e) => {
                self.failures += 1;
                let pause = self.policy.delay(self.failures, None, fastrand::f64());
                self.next_at = now_ms() + pause.as_millis() as i64;
                tracing::warn!(failures = self.failures, retry_in = ?pause, "certificate renewal failed: {e:#}");
                false
            }
        }
    }
}

/// Writes the renewed key (0600), chain and bundle, each atomically (a temporary file renamed over
/// the old one).
fn write(paths: &crate::tls::TlsPaths, key_pem: &str, renewed: &proto::Renewed) -> anyhow::Result<()> {
    // A late answer to an earlier request (resent after a timeout) carries another key's
    // certificate: writing it beside this key would leave a pair that cannot connect.
    let key = rcgen::KeyPair::from_pem(key_pem).context("the renewal key")?;
    let (_, leaf) = x509_parser::pem::parse_x509_pem(renewed.cert_chain_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the renewed certificate is not PEM: {e}"))?;
    let leaf = leaf.parse_x509().map_err(|e| anyhow::anyhow!("the renewed certificate cannot be parsed: {e}"))?;
    anyhow::ensure!(
        leaf.public_key().subject_public_key.data.as_ref() == key.public_key_raw(),
        "the renewed certificate is for another key (an answer to an earlier request); not written"
    );
    pki::write_atomically(&paths.key, key_pem, 0o600).context("writing the renewed key")?;
    pki::write_atomically(&paths.cert, &renewed.cert_chain_pem, 0o644).context("writing the renewed certificate")?;
    if !renewed.ca_bundle_pem.is_empty() {
        pki::write_atomically(&paths.ca_cert, &renewed.ca_bundle_pem, 0o644).context("writing the CA bundle")?;
    }
    Ok(())
}

impl super::Agent {
    /// How long until a renewal is due (a day when this agent does not renew).
    pub(super) fn renewal_due_in(&self) -> Duration {
        self.renewer.as_ref().map_or(Duration::from_secs(24 * 3600), Renewer::due_in)
    }

    /// A renewal request to send now, if this agent renews.
    pub(super) fn renewal_request(&mut self) -> Option<proto::agent_message::Msg> {
        let (td, site, node) = (
            self.identity.trust_domain.clone(),
            self.identity.site.clone().unwrap_or_default(),
            self.identity.name.clone(),
        );
        let renewer = self.renewer.as_mut()?;
        match renewer.request(&td, &site, &node) {
            Ok(request) => Some(proto::agent_message::Msg::Renew(request)),
            Err(e) => {
                tracing::warn!("could not make a renewal request: {e:#}");
                None
            }
        }
    }

    /// Applies the broker's answer; after a renewal the next handshakes use the new files.
    pub(super) fn renewed(&mut self, renewed: proto::Renewed) {
        let Some(renewer) = self.renewer.as_mut() else { return };
        if !renewer.answer(&self.config, renewed) {
            return;
        }
        // The staging client and the next sessions dial with the reloaded configuration.
        if let Err(e) = self.tls.reload_now() {
            tracing::error!("the renewed certificate cannot be loaded: {e}");
        }
    }
}

/// (issued at, not after) of the certificate file's leaf.
fn cert_times(cert: &Path) -> anyhow::Result<(UnixMillis, UnixMillis)> {
    let pem = std::fs::read(cert)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)?;
    Ok((pki::issued_at(&pem.contents)?, pki::not_after(&pem.contents)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_for_another_key_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let paths = crate::tls::TlsPaths {
            ca_cert: dir.path().join("ca.pem"),
            cert: dir.path().join("agent.pem"),
            key: dir.path().join("agent-key.pem"),
        };
        let ca = pki::Ca::generate("t.example").unwrap();
        let (key_pem, _) = pki::agent_csr("t.example", "lab", "n1").unwrap();
        let (other_key, other_csr) = pki::agent_csr("t.example", "lab", "n1").unwrap();
        let signed = ca.sign_agent_csr(&other_csr, "lab", Some("n1"), Duration::from_secs(3600)).unwrap();
        let renewed = proto::Renewed { cert_chain_pem: signed.chain_pem, ..Default::default() };
        let err = write(&paths, &key_pem, &renewed).unwrap_err();
        assert!(err.to_string().contains("another key"), "{err:#}");
        assert!(!paths.key.exists() && !paths.cert.exists(), "nothing is written");
        write(&paths, &other_key, &renewed).unwrap();
        assert_eq!(std::fs::read_to_string(&paths.key).unwrap(), other_key);
    }

    #[test]
    fn the_renewal_point_lies_in_70_to_90_percent_of_the_lifetime_from_the_issue_time() {
        let (issued, expires) = (1_000_000, 1_000_000 + 20_000);
        assert_eq!(renewal_point(issued, expires, 0.0), issued + 14_000);
        assert_eq!(renewal_point(issued, expires, 0.5), issued + 16_000);
        assert!(renewal_point(issued, expires, 0.999_999) <= issued + 18_000);
        let mut rng = fastrand::Rng::with_seed(7);
        let points: Vec<i64> = (0..1000).map(|_| renewal_point(issued, expires, rng.f64()) - issued).collect();
        assert!(points.iter().all(|p| (14_000..=18_000).contains(p)));
        // Spread over the window, not bunched at one end.
        assert!(points.iter().any(|p| *p < 14_500) && points.iter().any(|p| *p > 17_500));
    }
}
