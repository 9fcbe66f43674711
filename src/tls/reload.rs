//! Certificates, keys and CA bundles reloaded without a restart.
//!
//! A [`Reloading`] holder owns "the current configuration built from these files": servers load it
//! for each accept ([`ServerTls`](super::ServerTls)), clients for each new connection
//! ([`ClientTls`](super::ClientTls)), so a reload applies to new handshakes and live connections
//! keep theirs. [`Reloading::watch`] rebuilds it when the files' contents change (checked every
//! [`RELOAD_INTERVAL`]) and on SIGHUP; code that writes new files itself (an agent's renewal)
//! calls [`Reloading::reload_now`]. A file that does not build (bad PEM, key not matching the
//! certificate, a half-written file) keeps the previous configuration, is logged as an error and
//! counted in `hybroker_tls_reload_total{result="error"}`. Each successful load sets
//! `hybroker_cert_expiry_timestamp_seconds` for the certificate (and the CA bundle).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ServerConfig};

use super::peer::PeerCert;
use super::verify::parse_cert;
use super::{TlsError, TlsPaths, load_certs};

/// How often the files are checked for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The role of the gateway's public HTTPS certificate (any CA, no SPIFFE identity, no CA bundle:
/// its `TlsPaths::ca_cert` is the certificate file itself).
pub const PUBLIC: &str = "public";

const RELOADS: &str = "hybroker_tls_reload_total";
const EXPIRY: &str = "hybroker_cert_expiry_timestamp_seconds";

type Build<C> = Box<dyn Fn(&TlsPaths) -> Result<Arc<C>, TlsError> + Send + Sync>;

/// The current TLS configuration built from a set of files, rebuilt when they change.
pub struct Reloading<C> {
    /// The `role` label of the expiry metric (`broker`, `gateway`, `agent`).
    role: &'static str,
    paths: TlsPaths,
    build: Build<C>,
    current: Arc<ArcSwap<C>>,
    /// SHA-256 of the files' contents when last loaded (or last found broken).
    seen: Mutex<Option<Vec<u8>>>,
}

/// The server side (the broker).
pub type ReloadingServerTls = Reloading<ServerConfig>;
/// The client side (gateway and agent to the broker).
pub type ReloadingClientTls = Reloading<ClientConfig>;

impl<C> std::fmt::Debug for Reloading<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading").field("role", &self.role).field("paths", &self.paths).finish_non_exhaustive()
    }
}

impl<C: Send + Sync + 'static> Reloading<C> {
    /// Builds the first configuration (an error here is the caller's to report) and records the
    /// certificates' expiry.
    pub fn new(
        role: &'static str,
        paths: &TlsPaths,
        build: impl Fn(&TlsPaths) -> Result<Arc<C>, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, TlsError> {
        let seen = fingerprint(paths);
        let config = build(paths)?;
        crate::metrics::declare_tls_series(crate::metrics::global());
        record_expiry(role, paths);
        Ok(Arc::new(Reloading {
            role,
            paths: paths.clone(),
            build: Box::new(build),
            current: Arc::new(ArcSwap::new(config)),
            seen: Mutex::new(seen),
        }))
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<C> {
        self.current.load_full()
    }

    /// The swap that servers and connectors load from.
    pub fn swap(&self) -> Arc<ArcSwap<C>> {
        Arc::clone(&self.current)
    }

    /// The files.
    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// Rebuilds from the files now, whether or not they changed; on error the previous
    /// configuration stays. Logged and counted either way.
    pub fn reload_now(&self) -> Result<(), TlsError> {
        let seen = fingerprint(&self.paths);
        let result = self.still_ours(&self.paths).and_then(|()| (self.build)(&self.paths));
        *self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = seen;
        match result {
            Ok(config) => {
                self.current.store(config);
                record_expiry(self.role, &self.paths);
                crate::metrics::global().inc(RELOADS, &["ok"], 1.0);
                tracing::info!(role = self.role, cert = %self.paths.cert.display(), "tls certificate, key and ca bundle reloaded");
                Ok(())
            }
            Err(e) => {
                crate::metrics::global().inc(RELOADS, &["error"], 1.0);
                tracing::error!(role = self.role, error = %e, "tls reload failed; still using the previous certificate, key and ca bundle");
                Err(e)
            }
        }
    }

    /// Refuses a replacement certificate that is already expired or carries another role than
    /// the one this process has (a gateway certificate copied over the broker's): it would load
    /// fine and fail every handshake after.
    fn still_ours(&self, paths: &TlsPaths) -> Result<(), TlsError> {
        let bad = |reason: String| TlsError::BadReload { path: paths.cert.clone(), reason };
        let certs = load_certs("certificate", &paths.cert)?;
        let cert = parse_cert(&certs[0]).map_err(|e| bad(e.to_string()))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if cert.validity().not_after.timestamp() <= now as i64 {
            return Err(bad("the certificate has expired".to_string()));
        }
        if self.role == PUBLIC {
            return Ok(());
        }
        match super::verify::identity_of(&cert) {
            Ok(identity) if identity.role.as_str() == self.role => Ok(()),
            Ok(identity) => Err(bad(format!("the certificate is for role {}, not {}", identity.role, self.role))),
            Err(e) => Err(bad(format!("the certificate's identity is invalid: {e}"))),
        }
    }

    /// [`Reloading::reload_now`] when the files' contents differ from the last load; `None` when
    /// they do not (a broken file is reported once, not every interval).
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let now = fingerprint(&self.paths);
        if now.is_none() || *self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) == now {
            return None;
        }
        Some(self.reload_now())
    }

    /// Checks the files every `interval` and reloads on SIGHUP, until the returned task is aborted
    /// or dropped with the runtime. Must be called inside a tokio runtime.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        // Listening before returning: a SIGHUP from now on reloads rather than ends the process.
        let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signals) => Some(signals),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; tls files are still checked for changes");
                None
            }
        };
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let hangup = async {
                    match hangups.as_mut() {
                        Some(signals) => signals.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = ticks.tick() => drop(this.reload_if_changed()),
                    Some(()) = hangup => {
                        tracing::info!(role = this.role, "SIGHUP: reloading tls files");
                        // systemd: RELOADING=1 now, READY=1 once the files are loaded (or kept).
                        let _reload = crate::telemetry::notify::reloading();
                        drop(this.reload_now());
                    }
                }
            }
        })
    }
}

/// SHA-256 over the three files' contents; `None` when one cannot be read (mid-replacement).
fn fingerprint(paths: &TlsPaths) -> Option<Vec<u8>> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for path in [&paths.ca_cert, &paths.cert, &paths.key] {
        let data = std::fs::read(path).ok()?;
        ctx.update(&(data.len() as u64).to_le_bytes());
        ctx.update(&data);
    }
    Some(ctx.finish().as_ref().to_vec())
}

/// Sets `hybroker_cert_expiry_timestamp_seconds` for the leaf of `paths.cert` (as `role`, by its
/// identity URI) and for every certificate of the CA bundle (as `ca`, by subject). Unreadable
/// files are skipped (the configuration build reports them).
pub fn record_expiry(role: &str, paths: &TlsPaths) {
    if role == PUBLIC {
        // By subject: a public certificate has no SPIFFE identity, and no bundle beside it.
        if let Ok(certs) = load_certs("certificate", &paths.cert)
            && let Some((subject, not_after)) = subject_and_expiry(&certs[0])
        {
            crate::metrics::global().set(EXPIRY, &[PUBLIC, &subject], not_after as f64);
        }
        return;
    }
    if let Ok(certs) = load_certs("certificate", &paths.cert)
        && let Ok(peer) = PeerCert::from_der(&certs[0])
    {
        crate::metrics::global().set(EXPIRY, &[role, &peer.identity_uri], (peer.not_after / 1000) as f64);
    }
    record_ca_expiry(&paths.ca_cert);
}

/// Sets `hybroker_cert_expiry_timestamp_seconds{role="ca"}` for every certificate in `path` (a CA
/// bundle, or the broker's issuing CA), by subject.
pub fn record_ca_expiry(path: &Path) {
    let Ok(certs) = load_certs("CA certificate", path) else { return };
    for cert in &certs {
        if let Some((subject, not_after)) = subject_and_expiry(cert) {
            crate::metrics::global().set(EXPIRY, &["ca", &subject], not_after as f64);
        }
    }
}

/// A certificate's subject and NotAfter (Unix seconds).
fn subject_and_expiry(der: &CertificateDer<'_>) -> Option<(String, i64)> {
    let cert = parse_cert(der).ok()?;
    Some((cert.subject().to_string(), cert.validity().not_after.timestamp()))
}
