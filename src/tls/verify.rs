//! The checks beyond webpki's chain validation: the rustls verifiers, [`check_peer_cert`] and the
//! helpers that read a certificate's identity.
//!
//! The certificate profile (SPIFFE X509-SVID): the leaf has basicConstraints with CA:FALSE and no
//! keyCertSign or cRLSign key usage; a chain through intermediates respects the trust anchor's own
//! path length constraint (webpki checks it only for intermediates, so a `pathlen:0` root would
//! otherwise accept a leaf issued through an intermediate). Validity is checked with an allowance of
//! [`CLOCK_SKEW`] either way.

use std::cell::Cell;
use std::error::Error as StdError;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::TrustAnchor;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use tonic::{Request, Status};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::peer::{BACKDATE, DenyList, PeerCert, normalize_serial};
use super::{TlsError, load_certs};
use crate::model::identity::{Identity, IdentityError, Role};

/// The extended key usage a peer certificate must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPurpose {
    /// TLS client authentication (agents, gateways, admins).
    ClientAuth,
    /// TLS server authentication (the broker).
    ServerAuth,
}

impl std::fmt::Display for KeyPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyPurpose::ClientAuth => "clientAuth",
            KeyPurpose::ServerAuth => "serverAuth",
        })
    }
}

/// Why a chain-valid peer certificate is still refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerCertError {
    /// The DER cannot be parsed.
    #[error("certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// Not exactly one URI SAN.
    #[error("certificate has {0} URI SANs; exactly one is required")]
    UriSanCount(usize),
    /// The URI SAN is not a valid identity.
    #[error("certificate identity is invalid: {0}")]
    BadIdentity(IdentityError),
    /// The identity is in another trust domain.
    #[error("certificate identity {uri} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The identity URI.
        uri: String,
        /// Our trust domain.
        expected: String,
    },
    /// The role is not allowed at this endpoint.
    #[error("role {role} is not allowed here; allowed: {allowed}")]
    RoleNotAllowed {
        /// The peer's role.
        role: Role,
        /// The allowed roles, comma-separated.
        allowed: String,
    },
    /// No extendedKeyUsage extension.
    #[error("certificate has no extended key usage extension ({0} is required)")]
    NoEku(KeyPurpose),
    /// The extendedKeyUsage extension lacks the purpose.
    #[error("certificate extended key usage does not include {0}")]
    MissingEku(KeyPurpose),
    /// A CA certificate presented as an end entity.
    #[error("certificate is a CA certificate, not an end-entity certificate")]
    IsCa,
    /// No basicConstraints extension (an X509-SVID leaf must have one, with CA:FALSE).
    #[error("certificate has no basic constraints extension (CA:FALSE is required)")]
    NoBasicConstraints,
    /// A leaf whose key usage lets it sign certificates or CRLs.
    #[error("certificate key usage includes {0}, which an end-entity certificate must not have")]
    BadKeyUsage(&'static str),
    /// The chain has more intermediates than the trust anchor's path length constraint allows.
    #[error("certificate chain has {intermediates} intermediate(s); its root allows {allowed}")]
    PathLen {
        /// Intermediates between the leaf and the root.
        intermediates: usize,
        /// The root's path length constraint.
        allowed: u32,
    },
}

impl PeerCertError {
    /// A bounded reason, the `reason` label of `hybroker_tls_handshake_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            PeerCertError::Unparsable(_) => "bad_encoding",
            PeerCertError::UriSanCount(_) | PeerCertError::BadIdentity(_) => "bad_identity",
            PeerCertError::WrongTrustDomain { .. } => "wrong_trust_domain",
            PeerCertError::RoleNotAllowed { .. } => "wrong_role",
            PeerCertError::NoEku(_) | PeerCertError::MissingEku(_) => "wrong_eku",
            PeerCertError::IsCa => "ca_as_leaf",
            PeerCertError::NoBasicConstraints => "no_basic_constraints",
            PeerCertError::BadKeyUsage(_) => "bad_key_usage",
            PeerCertError::PathLen { .. } => "path_len",
        }
    }
}

/// How far a peer's certificate validity may be off our clock, either way: a certificate issued a
/// few seconds "in the future" by a CA whose clock runs ahead, or one that expired a moment ago
/// while its holder renews, is accepted. Small enough not to matter for revocation by expiry.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Runs `verify` at `now`; a certificate refused as not yet valid (expired) is tried again at
/// `now` plus (minus) [`CLOCK_SKEW`]. Returns the time at which it passed, or the first error.
fn with_clock_skew<T>(
    now: UnixTime,
    verify: impl Fn(UnixTime) -> Result<T, rustls::Error>,
) -> Result<(T, UnixTime), rustls::Error> {
    let first = match verify(now) {
        Ok(verified) => return Ok((verified, now)),
        Err(e) => e,
    };
    let secs = match &first {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => now.as_secs().saturating_add(CLOCK_SKEW.as_secs()),
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            now.as_secs().saturating_sub(CLOCK_SKEW.as_secs())
        }
        _ => return Err(first),
    };
    let at = UnixTime::since_unix_epoch(Duration::from_secs(secs));
    verify(at).map(|verified| (verified, at)).map_err(|_| first)
}

/// The trust anchors with their own path length constraints, which webpki does not apply.
#[derive(Debug)]
pub(super) struct AnchorPathLimits {
    anchors: Vec<TrustAnchor<'static>>,
    /// `pathLenConstraint` of each anchor (same order); `None` when it has none.
    limits: Vec<Option<u32>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl AnchorPathLimits {
    /// Reads the constraints of the CA bundle's certificates.
    pub(super) fn new(roots: &[CertificateDer<'_>], algorithms: WebPkiSupportedAlgorithms) -> Result<Self, TlsError> {
        let bad = |e: &dyn std::fmt::Display| TlsError::BadCa(e.to_string());
        let mut anchors = Vec::with_capacity(roots.len());
        let mut limits = Vec::with_capacity(roots.len());
        for der in roots {
            anchors.push(webpki::anchor_from_trusted_cert(der).map_err(|e| bad(&e))?.to_owned());
            let cert = parse_cert(der).map_err(|e| bad(&e))?;
            let basic = cert.basic_constraints().map_err(|e| bad(&e))?;
            limits.push(basic.and_then(|b| b.value.path_len_constraint));
        }
        Ok(AnchorPathLimits { anchors, limits, algorithms })
    }

    /// Refuses a chain-valid leaf whose path (through `intermediates`) has more intermediates than
    /// its anchor's path length constraint; free when no intermediate was presented.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        at: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), PeerCertError> {
        if intermediates.is_empty() || self.limits.iter().all(Option::is_none) {
            return Ok(());
        }
        let leaf = webpki::EndEntityCert::try_from(end_entity).map_err(|e| PeerCertError::Unparsable(e.to_string()))?;
        let violation = Cell::new(None);
        let within_limit = |path: &webpki::VerifiedPath<'_>| {
            let anchor = path.anchor();
            let limit = self
                .anchors
                .iter()
                .position(|a| {
                    a.subject == anchor.subject && a.subject_public_key_info == anchor.subject_public_key_info
                })
                .and_then(|i| self.limits[i]);
            let depth = path.intermediate_certificates().count();
            match limit {
                Some(allowed) if depth > allowed as usize => {
                    violation.set(Some(PeerCertError::PathLen { intermediates: depth, allowed }));
                    Err(webpki::Error::PathLenConstraintViolated)
                }
                _ => Ok(()),
            }
        };
        // webpki tries every path; the chain already passed the same checks without ours, so a
        // failure here means that every path breaks an anchor's constraint.
        leaf.verify_for_usage(self.algorithms.all, &self.anchors, intermediates, at, usage, None, Some(&within_limit))
            .map(drop)
            .map_err(|_| {
                violation.take().unwrap_or(PeerCertError::PathLen { intermediates: intermediates.len(), allowed: 0 })
            })
    }
}

/// Checks a chain-valid end-entity certificate beyond the chain; returns its identity.
pub fn check_peer_cert(
    der: &[u8],
    trust_domain: &str,
    roles: &[Role],
    purpose: KeyPurpose,
) -> Result<Identity, PeerCertError> {
    let cert = parse_cert(der)?;
    let basic = cert.basic_constraints().map_err(|e| PeerCertError::Unparsable(e.to_string()))?;
    match basic {
        Some(b) if b.value.ca => return Err(PeerCertError::IsCa),
        Some(_) => {}
        None => return Err(PeerCertError::NoBasicConstraints),
    }
    if let Some(usage) = cert.key_usage().map_err(|e| PeerCertError::Unparsable(e.to_string()))? {
        if usage.value.key_cert_sign() {
            return Err(PeerCertError::BadKeyUsage("keyCertSign"));
        }
        if usage.value.crl_sign() {
            return Err(PeerCertError::BadKeyUsage("cRLSign"));
        }
    }
    let identity = identity_of(&cert)?;
    if identity.trust_domain != trust_domain {
        return Err(PeerCertError::WrongTrustDomain { uri: identity.uri(), expected: trust_domain.to_string() });
    }
    if !roles.contains(&identity.role) {
        return Err(PeerCertError::RoleNotAllowed { role: identity.role, allowed: role_list(roles) });
    }
    let eku = cert
        .extended_key_usage()
        .map_err(|e| PeerCertError::Unparsable(e.to_string()))?
        .ok_or(PeerCertError::NoEku(purpose))?;
    let present = match purpose {
        KeyPurpose::ClientAuth => eku.value.client_auth,
        KeyPurpose::ServerAuth => eku.value.server_auth,
    };
    if !present {
        return Err(PeerCertError::MissingEku(purpose));
    }
    Ok(identity)
}

/// The identity in the first (leaf) certificate of a PEM file, e.g. our own certificate.
pub fn identity_of_cert_file(path: &Path) -> Result<Identity, TlsError> {
    let certs = load_certs("certificate", path)?;
    parse_cert(&certs[0])
        .and_then(|cert| identity_of(&cert))
        .map_err(|source| TlsError::CertIdentity { path: path.to_path_buf(), source })
}

/// The trust domain of the identity in a PEM certificate file.
pub fn trust_domain_of_cert(path: &Path) -> Result<String, TlsError> {
    identity_of_cert_file(path).map(|identity| identity.trust_domain)
}

/// The identity of the verified peer of a server-side request.
pub fn peer_identity<T>(req: &Request<T>) -> Result<Identity, Status> {
    let certs = req.peer_certs().ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
    let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
    parse_cert(leaf).and_then(|cert| identity_of(&cert)).map_err(|e| Status::unauthenticated(format!("client {e}")))
}

/// [`peer_identity`], refused with `permission_denied` unless its role is in `allowed`.
pub fn require_role<T>(req: &Request<T>, allowed: &[Role]) -> Result<Identity, Status> {
    let identity = peer_identity(req)?;
    if allowed.contains(&identity.role) {
        Ok(identity)
    } else {
        Err(Status::permission_denied(format!(
            "role {} is not allowed here; allowed: {}",
            identity.role,
            role_list(allowed)
        )))
    }
}

/// Wraps webpki's client verifier with the identity checks.
#[derive(Debug)]
pub(super) struct ClientIdentityVerifier {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) anchors: AnchorPathLimits,
    pub(super) trust_domain: String,
    pub(super) roles: Vec<Role>,
    /// Revoked identities and serials, refused as `CertificateError::Revoked`.
    pub(super) deny: Option<Arc<dyn DenyList>>,
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let (verified, at) = with_clock_skew(now, |t| self.inner.verify_client_cert(end_entity, intermediates, t))
            .inspect_err(|e| log_refusal("client", end_entity, e))?;
        self.anchors
            .check(end_entity, intermediates, at, webpki::KeyUsage::client_auth())
            .map_err(|e| refuse("client", end_entity, e))?;
        check_peer_cert(end_entity, &self.trust_domain, &self.roles, KeyPurpose::ClientAuth)
            .map_err(|e| refuse("client", end_entity, e))?;
        if let Some(deny) = &self.deny {
            let peer = PeerCert::from_der(end_entity).map_err(|e| refuse("client", end_entity, e))?;
            if let Some(reason) = deny.denies_peer(&peer) {
                log_refusal("client", end_entity, &format_args!("revoked: {reason}"));
                return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Wraps webpki's server verifier (chain and server name) with the identity checks.
#[derive(Debug)]
pub(super) struct ServerIdentityVerifier {
    pub(super) inner: Arc<WebPkiServerVerifier>,
    pub(super) anchors: AnchorPathLimits,
    pub(super) trust_domain: String,
    pub(super) role: Role,
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (verified, at) = with_clock_skew(now, |t| {
            self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, t)
        })
        .inspect_err(|e| log_refusal("server", end_entity, e))?;
        self.anchors
            .check(end_entity, intermediates, at, webpki::KeyUsage::server_auth())
            .map_err(|e| refuse("server", end_entity, e))?;
        check_peer_cert(end_entity, &self.trust_domain, &[self.role], KeyPurpose::ServerAuth)
            .map_err(|e| refuse("server", end_entity, e))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Logs why a peer certificate was refused, with the peer's URI SAN when it has one.
fn log_refusal(side: &str, end_entity: &[u8], reason: &dyn std::fmt::Display) {
    let peer = parse_cert(end_entity)
        .ok()
        .and_then(|cert| uri_sans(&cert).ok()?.into_iter().next())
        .unwrap_or_else(|| "<no URI SAN>".to_string());
    tracing::warn!(%peer, %reason, "refused {side} certificate");
}

/// Logs and wraps an identity-check failure as a rustls certificate error.
fn refuse(side: &str, end_entity: &[u8], err: PeerCertError) -> rustls::Error {
    log_refusal(side, end_entity, &err);
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(err)))))
}

/// A [`PeerCertError`] inside a rustls error. rustls shows `CertificateError::Other` with `Debug`,
/// so `Debug` here prints the message.
pub(super) struct Refused(pub(super) PeerCertError);

impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for Refused {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

impl PeerCert {
    /// The facts of the first (leaf) certificate of a PEM file, e.g. our own.
    pub fn from_pem_file(path: &Path) -> Result<Self, TlsError> {
        let certs = load_certs("certificate", path)?;
        Self::from_der(&certs[0]).map_err(|source| TlsError::CertIdentity { path: path.to_path_buf(), source })
    }

    /// Reads the facts of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, PeerCertError> {
        let cert = parse_cert(der)?;
        let identity = identity_of(&cert)?;
        let serial: String = cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
        let validity = cert.validity();
        Ok(PeerCert {
            identity_uri: identity.uri(),
            serial_hex: normalize_serial(&serial).unwrap_or_default(),
            issued_at: validity.not_before.timestamp() * 1000 + BACKDATE.as_millis() as i64,
            not_after: validity.not_after.timestamp() * 1000,
        })
    }
}

/// Parses a DER certificate.
pub(super) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, PeerCertError> {
    x509_parser::parse_x509_certificate(der).map(|(_, cert)| cert).map_err(|e| PeerCertError::Unparsable(e.to_string()))
}

/// The URI SANs of a certificate, in order.
fn uri_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, PeerCertError> {
    let san = cert.subject_alternative_name().map_err(|e| PeerCertError::Unparsable(e.to_string()))?;
    Ok(san
        .map(|ext| ext.value.general_names.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect())
}

/// The identity in the certificate's single URI SAN.
pub(super) fn identity_of(cert: &X509Certificate<'_>) -> Result<Identity, PeerCertError> {
    match uri_sans(cert)?.as_slice() {
        [uri] => Identity::parse(uri).map_err(PeerCertError::BadIdentity),
        others => Err(PeerCertError::UriSanCount(others.len())),
    }
}

/// "a, b, c".
fn role_list(roles: &[Role]) -> String {
    roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
}
