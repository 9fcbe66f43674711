//! Agents' certificate signing requests: the agent makes its key and a CSR ([`agent_csr`]); the
//! broker signs it for the identity the join token (or the renewing stream) grants
//! ([`Ca::sign_agent_csr`]), taking only the CSR's public key: every extension of the certificate
//! is set here, never copied from the request. [`issued_at`] and [`serial_hex`] read back what
//! revocation compares.

use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::prelude::FromDer;

use super::{BACKDATE, Ca, PkiError, random_serial};
use crate::model::UnixMillis;
use crate::model::identity::{Identity, Role, validate_name};

/// A certificate the issuing CA signed for a CSR.
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    /// The leaf, then the issuing CA, PEM-encoded.
    pub chain_pem: String,
    /// The leaf alone, DER-encoded.
    pub cert_der: Vec<u8>,
    /// The identity it carries.
    pub identity: Identity,
    /// Lower-case hex, as [`serial_hex`] reads it.
    pub serial: String,
    /// When it was issued (NotBefore + [`BACKDATE`], whole seconds).
    pub issued_at: UnixMillis,
    /// Its NotAfter (whole seconds).
    pub not_after: UnixMillis,
}

/// A fresh P-256 key (PKCS#8 PEM) and a CSR (DER) for it asking for the agent `site/node`
/// (common name the node, URI SAN the identity): what an agent sends to enrol or renew.
pub fn agent_csr(trust_domain: &str, site: &str, node: &str) -> Result<(String, Vec<u8>), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node);
    let uri = Identity::agent(trust_domain, site, node).uri();
    let uri = Ia5String::try_from(uri.as_str()).map_err(|_| PkiError::InvalidSan(uri.clone()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

impl Ca {
    /// Signs an agent CSR for `site` and `node` (the token's or the stream's); `node` `None` takes
    /// the node from the CSR (its agent URI SAN, else its common name), validated. The CSR's
    /// signature is checked; a CSR naming another site or node is refused. The certificate gets
    /// `spiffe://<td>/agent/<site>/<node>`, clientAuth, `CA:FALSE`, digitalSignature, a random
    /// serial, an AKI, and is valid for `lifetime` from now.
    pub fn sign_agent_csr(
        &self,
        csr_der: &[u8],
        site: &str,
        node: Option<&str>,
        lifetime: Duration,
    ) -> Result<SignedLeaf, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let asked = requested_agent(&csr.params, &self.trust_domain)?;
        let node = match (node, &asked) {
            (Some(node), _) => node.to_string(),
            (None, Requested { node: Some(n), .. }) => n.clone(),
            (None, Requested { node: None, .. }) => {
                return Err(PkiError::BadCsr("it names no node (no agent URI SAN, no common name)".to_string()));
            }
        };
        validate_name("node", &node)?;
        let granted = Identity::agent(&self.trust_domain, site, &node);
        granted.validate()?;
        let wrong_site = asked.site.as_deref().is_some_and(|s| s != site);
        let wrong_node = asked.node.as_deref().is_some_and(|n| n != node);
        if wrong_site || wrong_node {
            return Err(PkiError::CsrNotAllowed {
                asked: format!(
                    "agent {}/{}",
                    asked.site.as_deref().unwrap_or(site),
                    asked.node.as_deref().unwrap_or(&node)
                ),
                allowed: format!("agent {}", granted.agent_id()),
            });
        }
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, format!("{} {}", Role::Agent, granted.agent_id()));
        let uri = granted.uri();
        params.subject_alt_names =
            vec![SanType::URI(Ia5String::try_from(uri.as_str()).map_err(|_| PkiError::InvalidSan(uri.clone()))?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + lifetime).into();
        let cert = params.signed_by(&csr.public_key, &Issuer::from_params(&self.params, &self.key))?;
        let cert_der = cert.der().to_vec();
        Ok(SignedLeaf {
            chain_pem: format!("{}{}", cert.pem(), self.issuing_pem),
            issued_at: issued_at(&cert_der)?,
            not_after: not_after(&cert_der)?,
            serial: hex(serial.as_ref()),
            identity: granted,
            cert_der,
        })
    }
}

/// What a CSR asks for: the site and node of its agent URI SAN, or the node of its common name.
struct Requested {
    site: Option<String>,
    node: Option<String>,
}

/// Reads the requested agent from the CSR's SANs and subject; a URI SAN that is not an agent of
/// this trust domain is refused.
fn requested_agent(params: &CertificateParams, trust_domain: &str) -> Result<Requested, PkiError> {
    let mut asked = Requested { site: None, node: None };
    for san in &params.subject_alt_names {
        if let SanType::URI(uri) = san {
            let identity = Identity::parse(uri.as_str())
                .map_err(|e| PkiError::BadCsr(format!("its URI SAN {:?}: {e}", uri.as_str())))?;
            if identity.role != Role::Agent || identity.trust_domain != trust_domain {
                return Err(PkiError::CsrNotAllowed {
                    asked: identity.uri(),
                    allowed: format!("agents of trust domain {trust_domain}"),
                });
            }
            asked = Requested { site: identity.site.clone(), node: Some(identity.name.clone()) };
        }
    }
    if asked.node.is_none() {
        asked.node = match params.distinguished_name.get(&DnType::CommonName) {
            Some(rcgen::DnValue::Utf8String(cn)) => Some(cn.clone()),
            Some(rcgen::DnValue::PrintableString(cn)) => Some(cn.as_str().to_string()),
            _ => None,
        };
    }
    Ok(asked)
}

/// When a certificate was issued: its NotBefore plus [`BACKDATE`] (whole seconds, as X.509 keeps).
pub fn issued_at(cert_der: &[u8]) -> Result<UnixMillis, PkiError> {
    let cert = parse(cert_der)?;
    Ok(cert.validity().not_before.timestamp() * 1000 + BACKDATE.as_millis() as i64)
}

/// A certificate's NotAfter.
pub fn not_after(cert_der: &[u8]) -> Result<UnixMillis, PkiError> {
    Ok(parse(cert_der)?.validity().not_after.timestamp() * 1000)
}

/// A certificate's serial number, lower-case hex without leading zero bytes.
pub fn serial_hex(cert_der: &[u8]) -> Result<String, PkiError> {
    let cert = parse(cert_der)?;
    Ok(hex(cert.raw_serial()))
}

fn parse(cert_der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, PkiError> {
    x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map(|(_, cert)| cert)
        .map_err(|e| PkiError::BadCert(e.to_string()))
}

/// Lower-case hex of a big-endian number, leading zero bytes dropped.
fn hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len().saturating_sub(1));
    bytes[start..].iter().map(|b| format!("{b:02x}")).collect()
}
