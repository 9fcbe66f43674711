//! The certificate profile, case by case: real handshakes with certificates that rcgen makes here
//! (a root of our own, so that intermediates and odd extensions are possible); each refusal is
//! checked with its metric reason (the `reason:` prefix the test helper puts on server errors).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use super::tests::{AGENT_URI, Fixture, TD, handshake};
use super::*;
use crate::model::identity::Identity;

const HOUR: Duration = Duration::from_secs(3600);

/// A root CA made with rcgen, with a chosen path length constraint, in a temporary directory.
struct TestPki {
    dir: tempfile::TempDir,
    params: CertificateParams,
    key: KeyPair,
}

/// A certificate authority that can sign: the root or an intermediate.
struct Signer {
    params: CertificateParams,
    key: KeyPair,
    /// Its certificate, PEM (appended to the chains it signs when it is an intermediate).
    pem: String,
}

impl TestPki {
    /// A root with `pathlen:<path_len>` (or no constraint), like `hybroker pki init` makes.
    fn new(path_len: Option<u8>) -> Self {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        // A name of its own, so that another TestPki's leaves are from an unknown CA.
        params.distinguished_name.push(DnType::CommonName, format!("test root {:08x}", fastrand::u32(..)));
        params.is_ca = IsCa::Ca(match path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        fs::write(dir.path().join("ca.pem"), pem).unwrap();
        TestPki { dir, params, key }
    }

    fn root(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    /// An intermediate CA (no EKU, so webpki's EKU check passes through it) signed by the root.
    fn intermediate(&self) -> Signer {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "test intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.signed_by(&key, &self.root()).unwrap().pem();
        Signer { params, key, pem }
    }

    /// Signs `params` with the root, or with `via` (an intermediate, then sent in the chain), and
    /// writes the chain and key as `<name>.pem` / `<name>-key.pem`.
    fn write(&self, name: &str, params: &CertificateParams, via: Option<&Signer>) -> TlsPaths {
        let key = KeyPair::generate().unwrap();
        let chain = match via {
            None => params.signed_by(&key, &self.root()).unwrap().pem(),
            Some(ca) => {
                let issuer = Issuer::from_params(&ca.params, &ca.key);
                format!("{}{}", params.signed_by(&key, &issuer).unwrap().pem(), ca.pem)
            }
        };
        let cert = self.path(&format!("{name}.pem"));
        let key_path = self.path(&format!("{name}-key.pem"));
        fs::write(&cert, chain).unwrap();
        fs::write(&key_path, key.serialize_pem()).unwrap();
        TlsPaths { ca_cert: self.path("ca.pem"), cert, key: key_path }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The broker's server configuration (its certificate from the root), allowing agents.
    fn server(&self) -> Arc<ServerConfig> {
        let paths =
            self.write("broker", &leaf("spiffe://hybroker.test/broker/b", ExtendedKeyUsagePurpose::ServerAuth), None);
        server_config(&paths, TD, &[Role::Agent]).unwrap()
    }

    /// The handshake of an agent presenting `paths` with this PKI's broker.
    async fn agent_handshake(&self, paths: &TlsPaths) -> (Result<Identity, String>, Result<(), String>) {
        let client = client_config(paths, TD, Role::Broker).unwrap();
        handshake(self.server(), client).await
    }
}

/// A leaf of the profile `hybroker pki` issues: one URI SAN, `CA:FALSE`, digitalSignature, `eku`.
fn leaf(uri: &str, eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "test leaf");
    params.subject_alt_names = vec![
        SanType::URI(Ia5String::try_from(uri).unwrap()),
        SanType::DnsName(Ia5String::try_from("localhost").unwrap()),
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
    ];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    let now = SystemTime::now();
    params.not_before = (now - HOUR).into();
    params.not_after = (now + HOUR).into();
    params
}

fn agent_leaf() -> CertificateParams {
    leaf(AGENT_URI, ExtendedKeyUsagePurpose::ClientAuth)
}

/// Asserts that the server refused the handshake with metric reason `reason`, and the client saw it.
#[track_caller]
fn assert_refused_for(result: (Result<Identity, String>, Result<(), String>), reason: &str) {
    let (server, client) = result;
    let err = server.expect_err("server accepted the client");
    assert!(err.starts_with(&format!("{reason}: ")), "server error {err:?} is not for reason {reason:?}");
    assert!(client.is_err(), "client did not see the refusal");
}

#[track_caller]
fn assert_accepted(result: (Result<Identity, String>, Result<(), String>)) {
    let (server, client) = result;
    assert_eq!(server.expect("server refused the client"), Identity::agent(TD, "lab", "n1"));
    client.expect("client failed");
}

#[tokio::test]
async fn root_path_length_is_enforced() {
    // pathlen:0: a leaf straight from the root passes, one through an intermediate does not
    // (webpki alone accepts it: it checks path length only for intermediates).
    let pki = TestPki::new(Some(0));
    assert_accepted(pki.agent_handshake(&pki.write("direct", &agent_leaf(), None)).await);
    let via = pki.intermediate();
    let paths = pki.write("via-intermediate", &agent_leaf(), Some(&via));
    let (server, client) = pki.agent_handshake(&paths).await;
    let err = server.as_ref().unwrap_err();
    assert!(err.contains("chain has 1 intermediate(s); its root allows 0"), "{err}");
    assert_refused_for((server, client), "path_len");

    // pathlen:1 allows the same chain.
    let pki = TestPki::new(Some(1));
    let via = pki.intermediate();
    assert_accepted(pki.agent_handshake(&pki.write("via-intermediate", &agent_leaf(), Some(&via))).await);
}

#[tokio::test]
async fn client_refuses_a_broker_certificate_through_an_intermediate_under_pathlen_zero() {
    let pki = TestPki::new(Some(0));
    let via = pki.intermediate();
    let broker = leaf("spiffe://hybroker.test/broker/b", ExtendedKeyUsagePurpose::ServerAuth);
    let server = server_config(&pki.write("broker-via", &broker, Some(&via)), TD, &[Role::Agent]).unwrap();
    let client = client_config(&pki.write("agent", &agent_leaf(), None), TD, Role::Broker).unwrap();
    let (_, client) = handshake(server, client).await;
    let err = client.unwrap_err();
    assert!(err.contains("its root allows 0"), "{err}");
}

#[tokio::test]
async fn leaf_with_certificate_signing_key_usage_is_refused() {
    let pki = TestPki::new(Some(0));
    for (name, usage, shown) in [
        ("key-cert-sign", KeyUsagePurpose::KeyCertSign, "keyCertSign"),
        ("crl-sign", KeyUsagePurpose::CrlSign, "cRLSign"),
    ] {
        let mut params = agent_leaf();
        params.key_usages.push(usage);
        let (server, client) = pki.agent_handshake(&pki.write(name, &params, None)).await;
        let err = server.as_ref().unwrap_err();
        assert!(err.contains(&format!("key usage includes {shown}")), "{err}");
        assert_refused_for((server, client), "bad_key_usage");
    }
}

#[tokio::test]
async fn leaf_without_basic_constraints_is_refused() {
    let pki = TestPki::new(Some(0));
    let mut params = agent_leaf();
    params.is_ca = IsCa::NoCa;
    assert_refused_for(pki.agent_handshake(&pki.write("no-bc", &params, None)).await, "no_basic_constraints");
}

#[tokio::test]
async fn ca_certificate_as_leaf_is_counted_as_such() {
    let pki = TestPki::new(None);
    let mut params = agent_leaf();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages.push(KeyUsagePurpose::KeyCertSign);
    assert_refused_for(pki.agent_handshake(&pki.write("ca-leaf", &params, None)).await, "ca_as_leaf");
}

#[tokio::test]
async fn validity_allows_a_minute_of_clock_skew() {
    let pki = TestPki::new(Some(0));
    let now = SystemTime::now();
    let skew_inside = Duration::from_secs(30);
    assert!(skew_inside < CLOCK_SKEW);

    let mut params = agent_leaf();
    params.not_before = (now + skew_inside).into();
    assert_accepted(pki.agent_handshake(&pki.write("soon", &params, None)).await);
    params.not_before = (now + HOUR).into();
    params.not_after = (now + 2 * HOUR).into();
    assert_refused_for(pki.agent_handshake(&pki.write("later", &params, None)).await, "not_yet_valid");

    let mut params = agent_leaf();
    params.not_after = (now - skew_inside).into();
    assert_accepted(pki.agent_handshake(&pki.write("just-expired", &params, None)).await);
    params.not_before = (now - 2 * HOUR).into();
    params.not_after = (now - HOUR).into();
    assert_refused_for(pki.agent_handshake(&pki.write("expired", &params, None)).await, "expired");
}

#[tokio::test]
async fn wrong_or_missing_extended_key_usage_is_counted_as_wrong_eku() {
    let pki = TestPki::new(Some(0));
    // serverAuth only: webpki refuses it for client authentication.
    let server_only = leaf(AGENT_URI, ExtendedKeyUsagePurpose::ServerAuth);
    assert_refused_for(pki.agent_handshake(&pki.write("server-eku", &server_only, None)).await, "wrong_eku");
    // No extendedKeyUsage at all: webpki accepts it, our check does not.
    let mut none = agent_leaf();
    none.extended_key_usages.clear();
    assert_refused_for(pki.agent_handshake(&pki.write("no-eku", &none, None)).await, "wrong_eku");
}

#[tokio::test]
async fn other_refusals_have_precise_reasons() {
    let pki = TestPki::new(Some(0));
    let foreign = TestPki::new(Some(0));
    let mut paths = foreign.write("foreign", &agent_leaf(), None);
    paths.ca_cert = pki.path("ca.pem");
    let client = client_config(&paths, TD, Role::Broker).unwrap();
    assert_refused_for(handshake(pki.server(), client).await, "unknown_ca");

    let gateway = leaf("spiffe://hybroker.test/gateway/g", ExtendedKeyUsagePurpose::ClientAuth);
    assert_refused_for(pki.agent_handshake(&pki.write("gateway", &gateway, None)).await, "wrong_role");

    let fx = Fixture::new();
    let roots = load_roots(&fx.dir.path().join("ca.pem")).unwrap();
    let anonymous = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert_refused_for(handshake(fx.server(&[Role::Agent]), Arc::new(anonymous)).await, "no_certificate");
}

#[tokio::test]
async fn tls_1_2_client_is_refused_as_protocol_version() {
    let fx = Fixture::new();
    let paths = fx.issue(Role::Agent, "n1", Some("lab"));
    let (certs, key) = load_pair(&paths).unwrap();
    let roots = load_roots(&paths.ca_cert).unwrap();
    let tls12 = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    assert_refused_for(handshake(fx.server(&[Role::Agent]), Arc::new(tls12)).await, "protocol_version");
}

#[test]
fn hybroker_pki_leaves_fit_the_profile() {
    let fx = Fixture::new();
    for (role, name, site, purpose) in [
        (Role::Agent, "n1", Some("lab"), KeyPurpose::ClientAuth),
        (Role::Broker, "b", None, KeyPurpose::ServerAuth),
        (Role::Gateway, "g", None, KeyPurpose::ClientAuth),
        (Role::Admin, "a", None, KeyPurpose::ClientAuth),
    ] {
        let paths = fx.issue(role, name, site);
        let der = CertificateDer::from_pem_file(&paths.cert).unwrap();
        let cert = verify::parse_cert(&der).unwrap();
        let basic = cert.basic_constraints().unwrap().expect("pki leaves carry basicConstraints");
        assert!(!basic.value.ca);
        let usage = cert.key_usage().unwrap().expect("pki leaves carry key usage").value;
        assert!(usage.digital_signature() && !usage.key_cert_sign() && !usage.crl_sign());
        check_peer_cert(&der, TD, &[role], purpose).unwrap();
    }
}
