//! The CA and role certificates (`hybroker pki init|issue`, enrolment, renewal, and the tests).
//!
//! `pki init` makes two CAs, both ECDSA P-256 and valid 10 years: a root (path length 1) whose key
//! can stay offline, and an issuing CA (path length 0) signed by it, whose key the broker holds to
//! sign agents' CSRs. A directory holds `ca.pem` (the trust bundle: roots, several during a
//! rollover), `root-key.pem`, `issuing-ca.pem`, `issuing-ca-key.pem` (keys mode 0600) and
//! `trust-domain`. Leaves get one URI SAN (their [`Identity`]), the requested DNS/IP SANs, key
//! usage digitalSignature, `CA:FALSE`, a random serial, NotBefore at the issue time less
//! [`BACKDATE`], and the role's extended key usage: serverAuth for the broker, clientAuth for
//! agents, gateways and admins (docs/design.md §6). Their `.pem` holds the chain: leaf, then the
//! issuing CA. [`Ca::issue_custom`] can also make the malformed certificates the TLS tests must see
//! refused; [`Ca::sign_agent_csr`] (module `csr`) signs what enrolment and renewal ask for.

mod csr;
#[cfg(test)]
mod csr_tests;
#[cfg(test)]
mod tests;

pub use csr::{SignedLeaf, agent_csr, issued_at, not_after, serial_hex};

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use x509_parser::asn1_rs::Tag;

use crate::model::identity::{Identity, IdentityError, Role, validate_name, validate_trust_domain};

/// Validity of a new CA.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far back `not_before` is set, to tolerate small clock skew between machines: a certificate
/// was issued at its NotBefore plus this ([`issued_at`]).
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Errors from creating, loading or using the development CA.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("could not {op} {path}: {source}")]
    Io {
        /// What was attempted ("read", "write", "create directory").
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `init_ca` found an existing CA.
    #[error("a CA already exists in {0} (refusing to overwrite it)")]
    CaExists(PathBuf),
    /// The CA files are unusable.
    #[error("invalid CA in {path}: {reason}")]
    BadCa {
        /// The CA file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An agent certificate was requested without a site.
    #[error("an agent certificate needs a site (--site)")]
    SiteRequired,
    /// A site was given for a role that has none.
    #[error("a {0} certificate has no site; --site is only for agents")]
    SiteNotAllowed(Role),
    /// The validity is zero days.
    #[error("a certificate must be valid for at least 1 day")]
    ZeroDays,
    /// A SAN value cannot be encoded.
    #[error("invalid subject alternative name {0:?}")]
    InvalidSan(String),
    /// An identity part is invalid.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// rcgen refused to build or sign the certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A certificate signing request is unusable (unparsable, bad signature, unsupported).
    #[error("bad certificate signing request: {0}")]
    BadCsr(String),
    /// A CSR names an identity the token or the stream does not grant.
    #[error("the certificate signing request asks for {asked}, but this may only issue {allowed}")]
    CsrNotAllowed {
        /// What the CSR asked for.
        asked: String,
        /// What may be issued.
        allowed: String,
    },
    /// A certificate cannot be parsed.
    #[error("invalid certificate: {0}")]
    BadCert(String),
}

/// Where [`init_ca`] wrote the CAs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    /// `ca.pem`: the trust bundle (root certificates) to hand out.
    pub cert: PathBuf,
    /// `root-key.pem`: the root's private key (mode 0600); keep it offline.
    pub root_key: PathBuf,
    /// `issuing-ca.pem`: the issuing CA certificate, signed by the root.
    pub issuing_cert: PathBuf,
    /// `issuing-ca-key.pem`: the issuing CA's private key (mode 0600), the one the broker holds.
    pub key: PathBuf,
    /// `trust-domain`: the trust domain, as text.
    pub trust_domain: PathBuf,
}

impl CaPaths {
    /// The file names inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        CaPaths {
            cert: dir.join("ca.pem"),
            root_key: dir.join("root-key.pem"),
            issuing_cert: dir.join("issuing-ca.pem"),
            key: dir.join("issuing-ca-key.pem"),
            trust_domain: dir.join("trust-domain"),
        }
    }
}

/// The key file of a CA directory made before issuing CAs.
pub const OLD_CA_KEY: &str = "ca-key.pem";

/// Creates a root and an issuing CA for `trust_domain` in `dir` (created if missing); refuses to
/// overwrite a CA, also one of the older single-CA layout.
pub fn init_ca(dir: &Path, trust_domain: &str) -> Result<CaPaths, PkiError> {
    let paths = CaPaths::in_dir(dir);
    if [&paths.cert, &paths.root_key, &paths.issuing_cert, &paths.key, &dir.join(OLD_CA_KEY)].iter().any(|p| p.exists())
    {
        return Err(PkiError::CaExists(dir.to_path_buf()));
    }
    let (ca, root_key) = Ca::generate_with_root(trust_domain)?;
    crate::private_files::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    write_file(&paths.root_key, &root_key.serialize_pem(), 0o600, false)?;
    write_file(&paths.key, &ca.key.serialize_pem(), 0o600, false)?;
    write_file(&paths.issuing_cert, &ca.issuing_pem, 0o644, false)?;
    write_file(&paths.cert, &ca.bundle_pem, 0o644, false)?;
    write_file(&paths.trust_domain, &format!("{trust_domain}\n"), 0o644, true)?;
    Ok(paths)
}

/// A loaded (or freshly generated) issuing CA that can issue leaf certificates.
pub struct Ca {
    trust_domain: String,
    /// The trust bundle (`ca.pem`): the roots.
    bundle_pem: String,
    /// The issuing CA certificate, appended to every leaf's chain.
    issuing_pem: String,
    /// Carries the issuing CA subject (and key id method) for the `Issuer`.
    params: CertificateParams,
    key: KeyPair,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A role certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// A role certificate request (what `hybroker pki issue` takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueRequest {
    /// The role to grant.
    pub role: Role,
    /// The node id for agents, otherwise the name; also the output file stem.
    pub name: String,
    /// The site: required for agents, refused for other roles.
    pub site: Option<String>,
    /// DNS SANs (for the server name check of servers).
    pub dns: Vec<String>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
    /// Validity in days (at least 1).
    pub days: u32,
}

/// Which extended key usages a leaf carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafEku {
    /// No extendedKeyUsage extension at all.
    None,
    /// clientAuth only.
    Client,
    /// serverAuth only.
    Server,
    /// serverAuth and clientAuth.
    Both,
}

/// Everything [`Ca::issue_custom`] lets a caller (mostly a test) choose.
#[derive(Debug, Clone)]
pub struct LeafOptions {
    /// The subject common name.
    pub common_name: String,
    /// URI SANs, in order (zero, one or several).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
    /// Extended key usages.
    pub eku: LeafEku,
    /// Marks the certificate as a CA (basicConstraints CA:TRUE, keyCertSign).
    pub is_ca: bool,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl Default for LeafOptions {
    /// A client certificate with no SANs, valid from five minutes ago for one day.
    fn default() -> Self {
        let now = SystemTime::now();
        LeafOptions {
            common_name: "hybroker leaf".to_string(),
            uris: Vec::new(),
            dns: Vec::new(),
            ips: Vec::new(),
            eku: LeafEku::Client,
            is_ca: false,
            not_before: now - BACKDATE,
            not_after: now + Duration::from_secs(24 * 3600),
        }
    }
}

impl Ca {
    /// Generates a new root and issuing CA in memory (see [`init_ca`] to write them).
    pub fn generate(trust_domain: &str) -> Result<Ca, PkiError> {
        Ok(Self::generate_with_root(trust_domain)?.0)
    }

    /// [`Ca::generate`], also returning the root's key.
    fn generate_with_root(trust_domain: &str) -> Result<(Ca, KeyPair), PkiError> {
        validate_trust_domain(trust_domain)?;
        let now = SystemTime::now();
        let ca_params = |kind: &str, path_len: u8| {
            let mut params = CertificateParams::default();
            params.distinguished_name = ca_subject(kind, trust_domain);
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
            params.key_usages =
                vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            params.not_before = (now - BACKDATE).into();
            params.not_after = (now + CA_VALIDITY).into();
            params.serial_number = Some(random_serial());
            params
        };
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let root_params = ca_params("root CA", 1);
        let bundle_pem = root_params.self_signed(&root_key)?.pem();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params("issuing CA", 0);
        params.use_authority_key_identifier_extension = true;
        let cert_pem = params.signed_by(&key, &Issuer::from_params(&root_params, &root_key))?.pem();
        Ok((Ca { trust_domain: trust_domain.to_string(), bundle_pem, issuing_pem: cert_pem, params, key }, root_key))
    }

    /// Loads the issuing CA written by [`init_ca`] from `dir` (the root's key is not needed).
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let paths = CaPaths::in_dir(dir);
        let bad = |path: &Path, reason: String| PkiError::BadCa { path: path.to_path_buf(), reason };
        if !paths.issuing_cert.exists() && dir.join(OLD_CA_KEY).exists() {
            return Err(bad(
                dir,
                "it was made before issuing CAs (it has ca-key.pem, no issuing-ca.pem); make a new one with \
                 `hybroker pki init --dir NEW_DIR` and issue every certificate again from it"
                    .to_string(),
            ));
        }
        let trust_domain = read_file(&paths.trust_domain)?.trim().to_string();
        validate_trust_domain(&trust_domain)?;
        let bundle_pem = read_file(&paths.cert)?;
        let cert_pem = read_file(&paths.issuing_cert)?;
        crate::private_files::narrow_logged(&paths.key).map_err(io_err("restrict", &paths.key))?;
        let key_pem = read_file(&paths.key)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(&paths.key, e.to_string()))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| bad(&paths.issuing_cert, format!("not a pem certificate: {e}")))?;
        let cert = pem.parse_x509().map_err(|e| bad(&paths.issuing_cert, format!("not an x509 certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(bad(&paths.issuing_cert, "not a CA certificate".to_string()));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad(&paths.key, "the key does not match issuing-ca.pem".to_string()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = subject_to_rcgen(cert.subject()).map_err(|r| bad(&paths.issuing_cert, r))?;
        params.use_authority_key_identifier_extension = true;
        Ok(Ca { trust_domain, bundle_pem, issuing_pem: cert_pem, params, key })
    }

    /// The trust domain this CA issues identities in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle (the roots), PEM-encoded: what peers verify chains against.
    pub fn cert_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The issuing CA certificate, PEM-encoded (the second certificate of every leaf's chain).
    pub fn issuing_cert_pem(&self) -> &str {
        &self.issuing_pem
    }

    /// Issues a role certificate (see the module docs for its contents).
    pub fn issue(&self, req: &IssueRequest) -> Result<Issued, PkiError> {
        let identity = match (req.role, &req.site) {
            (Role::Agent, Some(site)) => Identity::agent(&self.trust_domain, site, &req.name),
            (Role::Agent, None) => return Err(PkiError::SiteRequired),
            (role, Some(_)) => return Err(PkiError::SiteNotAllowed(role)),
            (role, None) => Identity::new(&self.trust_domain, role, &req.name),
        };
        identity.validate()?;
        if req.days == 0 {
            return Err(PkiError::ZeroDays);
        }
        if let Some(bad) = req.dns.iter().find(|d| rustls_pki_types::DnsName::try_from(d.as_str()).is_err()) {
            return Err(PkiError::InvalidSan(bad.clone()));
        }
        let now = SystemTime::now();
        self.issue_custom(&LeafOptions {
            common_name: format!("{} {}", identity.role, identity.agent_id()),
            uris: vec![identity.uri()],
            dns: req.dns.clone(),
            ips: req.ips.clone(),
            eku: match req.role {
                Role::Broker => LeafEku::Server,
                Role::Agent | Role::Gateway | Role::Admin => LeafEku::Client,
            },
            is_ca: false,
            not_before: now - BACKDATE,
            not_after: now + Duration::from_secs(u64::from(req.days) * 24 * 3600),
        })
    }

    /// Issues a role certificate into `dir` as `<name>.pem` and `<name>-key.pem` (mode 0600),
    /// replacing earlier ones; returns (certificate path, key path).
    pub fn issue_to_dir(&self, dir: &Path, req: &IssueRequest) -> Result<(PathBuf, PathBuf), PkiError> {
        validate_name("name", &req.name)?;
        let issued = self.issue(req)?;
        crate::private_files::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let cert_path = dir.join(format!("{}.pem", req.name));
        let key_path = dir.join(format!("{}-key.pem", req.name));
        write_file(&key_path, &issued.key_pem, 0o600, true)?;
        write_file(&cert_path, &issued.cert_pem, 0o644, true)?;
        Ok((cert_path, key_path))
    }

    /// Issues a leaf exactly as described by `opts`, with no role rules applied.
    pub fn issue_custom(&self, opts: &LeafOptions) -> Result<Issued, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, opts.common_name.as_str());
        let ia5 = |s: &String| Ia5String::try_from(s.as_str()).map_err(|_| PkiError::InvalidSan(s.clone()));
        for uri in &opts.uris {
            params.subject_alt_names.push(SanType::URI(ia5(uri)?));
        }
        for dns in &opts.dns {
            params.subject_alt_names.push(SanType::DnsName(ia5(dns)?));
        }
        params.subject_alt_names.extend(opts.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages = match opts.eku {
            LeafEku::None => vec![],
            LeafEku::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            LeafEku::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            LeafEku::Both => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = if opts.is_ca {
            params.key_usages.push(KeyUsagePurpose::KeyCertSign);
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = opts.not_before.into();
        params.not_after = opts.not_after.into();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued { cert_pem: format!("{}{}", cert.pem(), self.issuing_pem), key_pem: key.serialize_pem() })
    }
}

/// The subject of a new CA (`kind`: "root CA", "issuing CA").
fn ca_subject(kind: &str, trust_domain: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "hybroker");
    // A random suffix keeps two CAs of one trust domain apart (rotation bundles, clear errors).
    let suffix = fastrand::u32(..);
    dn.push(DnType::CommonName, format!("hybroker {kind} {trust_domain} {suffix:08x}"));
    dn
}

/// A random positive 16-byte serial (rcgen would derive one from the key, repeated on key reuse).
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("system random");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero byte: the DER encoding keeps all 16
    rcgen::SerialNumber::from_slice(&bytes)
}

/// Rebuilds an rcgen subject from a parsed certificate's, keeping the string types so that the
/// issuer name of new leaves matches the CA's subject byte for byte (chain building needs that).
fn subject_to_rcgen(name: &x509_parser::x509::X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter_rdn() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("multi-valued subject names are not supported".to_string());
        };
        let oid: Vec<u64> = attr.attr_type().iter().ok_or("subject attribute oid too large")?.collect();
        let text = attr.as_str().map_err(|e| format!("unsupported subject attribute: {e}"))?;
        let value = match attr.attr_value().tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_string()),
            Tag::PrintableString => {
                DnValue::PrintableString(PrintableString::try_from(text).map_err(|e| e.to_string())?)
            }
            tag => return Err(format!("unsupported subject string type {tag}")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

/// Maps an I/O error to [`PkiError::Io`].
fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PkiError {
    let path = path.to_path_buf();
    move |source| PkiError::Io { op, path, source }
}

/// Reads a text file, naming it in the error.
fn read_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_err("read", path))
}

/// Writes `contents` to `path` with `mode` (0600 for keys) through a temporary file and a rename,
/// so readers see the old file or the whole new one.
pub fn write_atomically(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    write_file(path, contents, mode, true)
}

/// Writes `contents` with `mode`: through a temporary file and a rename when `replace`, or with
/// `create_new` (failing if the file exists) otherwise.
fn write_file(path: &Path, contents: &str, mode: u32, replace: bool) -> Result<(), PkiError> {
    let target = if replace {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        PathBuf::from(tmp)
    } else {
        path.to_path_buf()
    };
    if replace {
        // A leftover from an interrupted run would keep its old mode; start afresh.
        let _ = fs::remove_file(&target);
    }
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(&target).map_err(io_err("create", &target))?;
    file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()).map_err(io_err("write", &target))?;
    if replace {
        fs::rename(&target, path).map_err(io_err("replace", path))?;
    }
    Ok(())
}
