use super::*;
use std::os::unix::fs::PermissionsExt;
use x509_parser::extensions::GeneralName;

fn request(role: Role, name: &str, site: Option<&str>) -> IssueRequest {
    IssueRequest {
        role,
        name: name.to_string(),
        site: site.map(str::to_string),
        dns: vec!["localhost".to_string()],
        ips: vec!["127.0.0.1".parse().unwrap()],
        days: 30,
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_files_and_refuses_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let paths = init_ca(dir.path(), "hybroker.test").unwrap();
    assert_eq!(mode(&paths.key), 0o600);
    assert_eq!(fs::read_to_string(&paths.trust_domain).unwrap().trim(), "hybroker.test");
    let err = init_ca(dir.path(), "hybroker.test").unwrap_err();
    assert!(matches!(err, PkiError::CaExists(_)), "{err}");
    assert!(init_ca(&dir.path().join("x"), "Bad Domain").is_err());
}

#[test]
fn a_new_pki_directory_is_private_and_a_wide_ca_key_is_narrowed_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let paths = init_ca(&pki, "hybroker.test").unwrap();
    assert_eq!(mode(&pki), 0o700);
    fs::set_permissions(&paths.key, fs::Permissions::from_mode(0o644)).unwrap();
    Ca::load(&pki).unwrap();
    assert_eq!(mode(&paths.key), 0o600);
}

#[test]
fn loaded_ca_issues_role_certificates() {
    let dir = tempfile::tempdir().unwrap();
    init_ca(dir.path(), "hybroker.test").unwrap();
    let ca = Ca::load(dir.path()).unwrap();
    assert_eq!(ca.trust_domain(), "hybroker.test");
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca.issuing_cert_pem().as_bytes()).unwrap();
    let ca_cert = ca_pem.parse_x509().unwrap();
    let (_, root_pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
    let root = root_pem.parse_x509().unwrap();
    // The issuing CA is signed by the root; the root may have one CA below it, the issuing CA none.
    assert_eq!(ca_cert.issuer().as_raw(), root.subject().as_raw());
    ca_cert.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(root.basic_constraints().unwrap().unwrap().value.path_len_constraint, Some(1));
    assert_eq!(ca_cert.basic_constraints().unwrap().unwrap().value.path_len_constraint, Some(0));

    let cases = [
        (Role::Agent, Some("lab-sto"), "spiffe://hybroker.test/agent/lab-sto/gpu-01"),
        (Role::Broker, None, "spiffe://hybroker.test/broker/gpu-01"),
        (Role::Admin, None, "spiffe://hybroker.test/admin/gpu-01"),
    ];
    for (role, site, uri) in cases {
        let issued = ca.issue(&request(role, "gpu-01", site)).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        // The issuer must match the CA subject byte for byte, also after a reload.
        assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
        let sans = &cert.subject_alternative_name().unwrap().unwrap().value.general_names;
        let uris: Vec<_> = sans
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        assert_eq!(uris, [uri]);
        assert!(sans.contains(&GeneralName::DNSName("localhost")));
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert_eq!(eku.server_auth, role == Role::Broker);
        assert_eq!(eku.client_auth, role != Role::Broker);
        assert!(!cert.is_ca());
        assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
        assert!(format!("{issued:?}").contains("<redacted>"));
        // The .pem holds the chain: the leaf, then the issuing CA.
        assert!(issued.cert_pem.ends_with(ca.issuing_cert_pem()));
    }
}

#[test]
fn site_rules_and_days() {
    let ca = Ca::generate("hybroker.test").unwrap();
    let err = ca.issue(&request(Role::Agent, "n1", None)).unwrap_err();
    assert!(matches!(err, PkiError::SiteRequired), "{err}");
    let err = ca.issue(&request(Role::Broker, "main", Some("lab"))).unwrap_err();
    assert_eq!(err.to_string(), "a broker certificate has no site; --site is only for agents");
    let err = ca.issue(&request(Role::Agent, "n/1", Some("lab"))).unwrap_err();
    assert!(err.to_string().starts_with("invalid node"), "{err}");
    let mut bad_dns = request(Role::Broker, "main", None);
    bad_dns.dns.push("not a name".to_string());
    assert!(matches!(ca.issue(&bad_dns), Err(PkiError::InvalidSan(_))));
    let mut zero = request(Role::Admin, "ops", None);
    zero.days = 0;
    assert!(matches!(ca.issue(&zero), Err(PkiError::ZeroDays)));
}

#[test]
fn issue_to_dir_writes_private_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("hybroker.test").unwrap();
    let req = request(Role::Gateway, "gw", None);
    let (cert, key) = ca.issue_to_dir(dir.path(), &req).unwrap();
    assert_eq!(cert, dir.path().join("gw.pem"));
    assert_eq!(key, dir.path().join("gw-key.pem"));
    assert_eq!(mode(&key), 0o600);
    // Reissuing replaces both files.
    let old = fs::read_to_string(&cert).unwrap();
    ca.issue_to_dir(dir.path(), &req).unwrap();
    assert_ne!(fs::read_to_string(&cert).unwrap(), old);
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn load_reports_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = Ca::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("trust-domain"), "{err}");
}

#[test]
fn init_writes_a_root_and_an_issuing_ca_and_the_broker_needs_no_root_key() {
    let dir = tempfile::tempdir().unwrap();
    let paths = init_ca(dir.path(), "hybroker.test").unwrap();
    assert_eq!(mode(&paths.root_key), 0o600);
    assert_eq!(mode(&paths.key), 0o600);
    assert_eq!(paths.key, dir.path().join("issuing-ca-key.pem"));
    fs::remove_file(&paths.root_key).unwrap();
    let ca = Ca::load(dir.path()).unwrap();
    assert_eq!(ca.cert_pem(), fs::read_to_string(&paths.cert).unwrap());
}

#[test]
fn a_directory_of_the_single_ca_layout_asks_for_pki_init_again() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("ca.pem"), "x").unwrap();
    fs::write(dir.path().join("ca-key.pem"), "x").unwrap();
    fs::write(dir.path().join("trust-domain"), "hybroker.test\n").unwrap();
    let err = Ca::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("made before issuing CAs") && err.contains("hybroker pki init --dir"), "{err}");
    assert!(matches!(init_ca(dir.path(), "hybroker.test"), Err(PkiError::CaExists(_))));
}
