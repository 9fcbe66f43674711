use super::verify::{Refused, identity_of, parse_cert};
use super::*;
use crate::model::identity::Identity;
use crate::pki::{Ca, IssueRequest, Issued, LeafEku, LeafOptions, init_ca};
use rustls::pki_types::ServerName;
use rustls::{CertificateError, OtherError};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

pub(super) const TD: &str = "hybroker.test";
pub(super) const AGENT_URI: &str = "spiffe://hybroker.test/agent/lab/n1";

/// A CA in a temporary directory, and helpers to write certificates next to it.
pub(super) struct Fixture {
    pub(super) dir: tempfile::TempDir,
    ca: Ca,
}

impl Fixture {
    pub(super) fn new() -> Self {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), TD).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        Fixture { dir, ca }
    }

    /// Writes `issued` as `<name>.pem` / `<name>-key.pem`, trusting this fixture's CA.
    pub(super) fn write(&self, name: &str, issued: &Issued) -> TlsPaths {
        let cert = self.dir.path().join(format!("{name}.pem"));
        let key = self.dir.path().join(format!("{name}-key.pem"));
        fs::write(&cert, &issued.cert_pem).unwrap();
        fs::write(&key, &issued.key_pem).unwrap();
        TlsPaths { ca_cert: self.dir.path().join("ca.pem"), cert, key }
    }

    pub(super) fn issue(&self, role: Role, name: &str, site: Option<&str>) -> TlsPaths {
        let issued = self
            .ca
            .issue(&IssueRequest {
                role,
                name: name.to_string(),
                site: site.map(str::to_string),
                dns: vec!["localhost".to_string()],
                ips: vec!["127.0.0.1".parse().unwrap()],
                days: 1,
            })
            .unwrap();
        self.write(name, &issued)
    }

    /// An agent-like leaf for `lab/n1`, modified by `edit`.
    pub(super) fn custom(&self, name: &str, edit: impl FnOnce(&mut LeafOptions)) -> TlsPaths {
        let mut opts = LeafOptions {
            uris: vec![AGENT_URI.to_string()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            ..LeafOptions::default()
        };
        edit(&mut opts);
        self.write(name, &self.ca.issue_custom(&opts).unwrap())
    }

    pub(super) fn server(&self, client_roles: &[Role]) -> Arc<ServerConfig> {
        let paths = self.issue(Role::Broker, "broker", None);
        server_config(&paths, TD, client_roles).unwrap()
    }

    pub(super) fn agent_client(&self) -> Arc<ClientConfig> {
        client_config(&self.issue(Role::Agent, "n1", Some("lab")), TD, Role::Broker).unwrap()
    }
}

/// One real handshake on 127.0.0.1 through [`accept_tls`]: (server's view: peer identity, or the
/// error as `<metric reason>: <message>`; client's view).
pub(super) async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Result<Identity, String>, Result<(), String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let limits = HandshakeLimits::default();
        let mut tls = accept_tls(tcp, server, &limits).await.map_err(|e| format!("{}: {e}", e.reason()))?;
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        tls.write_all(b"k").await.map_err(|e| e.to_string())?;
        // Wait for the client to close, so no reset races the byte.
        let _ = tls.read(&mut [0u8; 1]).await;
        parse_cert(&leaf).and_then(|c| identity_of(&c)).map_err(|e| e.to_string())
    };
    let client_side = async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = TlsConnector::from(client).connect(name, tcp).await.map_err(|e| e.to_string())?;
        // With TLS 1.3 a refused client certificate shows up at the first read.
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok(())
    };
    let both = async { tokio::join!(server_side, client_side) };
    tokio::time::timeout(Duration::from_secs(10), both).await.expect("handshake hung")
}

/// Asserts the server refused the client, with `reason` in the server-side error.
async fn assert_refused(fx: &Fixture, client: TlsPaths, reason: &str) {
    let client = client_config(&client, TD, Role::Broker).unwrap();
    let (server, client) = handshake(fx.server(&[Role::Agent]), client).await;
    let err = server.expect_err("server accepted the client");
    assert!(err.contains(reason), "server error {err:?} lacks {reason:?}");
    assert!(client.is_err(), "client did not see the refusal");
}

#[tokio::test]
async fn valid_agent_is_accepted() {
    let fx = Fixture::new();
    let (server, client) = handshake(fx.server(&[Role::Agent]), fx.agent_client()).await;
    assert_eq!(server.unwrap(), Identity::agent(TD, "lab", "n1"));
    client.unwrap();
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let fx = Fixture::new();
    let roots = load_roots(&fx.dir.path().join("ca.pem")).unwrap();
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (server, client) = handshake(fx.server(&[Role::Agent]), Arc::new(client)).await;
    assert!(server.unwrap_err().contains("peer sent no certificates"));
    assert!(client.is_err());
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let fx = Fixture::new();
    let other = Ca::generate(TD).unwrap();
    let issued =
        other.issue_custom(&LeafOptions { uris: vec![AGENT_URI.to_string()], ..LeafOptions::default() }).unwrap();
    assert_refused(&fx, fx.write("foreign", &issued), "UnknownIssuer").await;
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let fx = Fixture::new();
    let day = Duration::from_secs(24 * 3600);
    let paths = fx.custom("expired", |o| {
        o.not_before = SystemTime::now() - 3 * day;
        o.not_after = SystemTime::now() - day;
    });
    assert_refused(&fx, paths, "certificate expired").await;
}

#[tokio::test]
async fn certificate_without_eku_is_refused() {
    let fx = Fixture::new();
    let paths = fx.custom("no-eku", |o| o.eku = LeafEku::None);
    assert_refused(&fx, paths, "no extended key usage").await;
}

#[tokio::test]
async fn certificate_with_two_uri_sans_is_refused() {
    let fx = Fixture::new();
    let paths = fx.custom("two-uris", |o| {
        o.uris.push("spiffe://hybroker.test/agent/lab/n2".to_string());
    });
    assert_refused(&fx, paths, "has 2 URI SANs").await;
    let paths = fx.custom("no-uri", |o| o.uris.clear());
    assert_refused(&fx, paths, "has 0 URI SANs").await;
}

#[tokio::test]
async fn ca_certificate_as_leaf_is_refused() {
    let fx = Fixture::new();
    let paths = fx.custom("ca-leaf", |o| o.is_ca = true);
    // webpki already refuses it (CaUsedAsEndEntity); our own check refuses it too.
    assert_refused(&fx, paths.clone(), "invalid peer certificate").await;
    let der = CertificateDer::from_pem_file(&paths.cert).unwrap();
    let err = check_peer_cert(&der, TD, &[Role::Agent], KeyPurpose::ClientAuth).unwrap_err();
    assert_eq!(err, PeerCertError::IsCa);
}

#[tokio::test]
async fn wrong_role_or_trust_domain_is_refused() {
    let fx = Fixture::new();
    let client = fx.agent_client();
    let (server, client) = handshake(fx.server(&[Role::Admin, Role::Gateway]), client).await;
    let err = server.unwrap_err();
    assert!(err.contains("role agent is not allowed here; allowed: admin, gateway"), "{err}");
    assert!(client.is_err());
    let paths = fx.custom("other-td", |o| {
        o.uris = vec!["spiffe://other.test/agent/lab/n1".to_string()];
    });
    assert_refused(&fx, paths, "not in trust domain hybroker.test").await;
}

#[tokio::test]
async fn client_refuses_a_server_with_an_agent_certificate() {
    let fx = Fixture::new();
    // An agent certificate (clientAuth only) presented by a server: webpki refuses it.
    let agent = fx.issue(Role::Agent, "rogue", Some("lab"));
    let server = server_config(&agent, TD, &[Role::Agent]).unwrap();
    let (_, client) = handshake(server, fx.agent_client()).await;
    assert!(client.unwrap_err().contains("invalid peer certificate"));
    // With serverAuth too, the role check refuses it.
    let both = fx.custom("rogue-both", |o| o.eku = LeafEku::Both);
    let server = server_config(&both, TD, &[Role::Agent]).unwrap();
    let (_, client) = handshake(server, fx.agent_client()).await;
    let err = client.unwrap_err();
    assert!(err.contains("role agent is not allowed here; allowed: broker"), "{err}");
}

#[test]
fn config_errors_name_the_file() {
    let fx = Fixture::new();
    let mut paths = fx.issue(Role::Broker, "b", None);
    paths.key = fx.dir.path().join("missing-key.pem");
    let err = server_config(&paths, TD, &[Role::Agent]).unwrap_err();
    assert!(err.to_string().starts_with("could not read private key "), "{err}");
    paths.key = paths.cert.clone();
    let err = server_config(&paths, TD, &[Role::Agent]).unwrap_err();
    assert!(matches!(err, TlsError::NoKey(_)), "{err}");
    assert!(matches!(server_config(&fx.issue(Role::Broker, "b", None), TD, &[]), Err(TlsError::NoClientRoles)));
    let agent = fx.issue(Role::Agent, "n1", Some("lab"));
    let identity = identity_of_cert_file(&agent.cert).unwrap();
    assert_eq!(identity, Identity::agent(TD, "lab", "n1"));
    assert_eq!(trust_domain_of_cert(&agent.cert).unwrap(), TD);
    let no_uri = fx.custom("no-uri", |o| o.uris.clear());
    let err = identity_of_cert_file(&no_uri.cert).unwrap_err();
    assert!(err.to_string().ends_with("has 0 URI SANs; exactly one is required"), "{err}");
}

#[tokio::test]
async fn tonic_health_check_over_mutual_tls() {
    let fx = Fixture::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let incoming = tls_incoming(listener, fx.server(&[Role::Agent, Role::Admin]));
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let intercept = move |req: Request<()>| {
        let _ = seen_tx.send(require_role(&req, &[Role::Agent])?);
        Ok(req)
    };
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(intercept))
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    let check = || HealthCheckRequest { service: String::new() };

    // An agent passes TLS and the interceptor, which sees its certificate.
    let channel = connect(&url, fx.agent_client(), None).await.unwrap();
    let reply = HealthClient::new(channel).check(check()).await.unwrap();
    assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
    assert_eq!(seen_rx.recv().await.unwrap(), Identity::agent(TD, "lab", "n1"));

    // An admin passes TLS but not `require_role`.
    let admin = fx.issue(Role::Admin, "ops", None);
    let admin = client_config(&admin, TD, Role::Broker).unwrap();
    let channel = connect_lazy(&url, admin, Some("localhost")).unwrap();
    let status = HealthClient::new(channel).check(check()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(explain_status(&status), "role admin is not allowed here; allowed: agent");

    // A certificate from another CA: refused at the handshake, explained to the client.
    let other = Ca::generate(TD).unwrap();
    let opts = LeafOptions { uris: vec![AGENT_URI.to_string()], ..LeafOptions::default() };
    let foreign = fx.write("foreign", &other.issue_custom(&opts).unwrap());
    let foreign = client_config(&foreign, TD, Role::Broker).unwrap();
    let message = match connect(&url, foreign, None).await {
        Err(e) => e.to_string(),
        Ok(channel) => {
            let status = HealthClient::new(channel).check(check()).await.unwrap_err();
            explain_status(&status)
        }
    };
    assert!(message.contains("refused the TLS handshake"), "{message}");

    // The server survived the refused handshake.
    let channel = connect(&url, fx.agent_client(), None).await.unwrap();
    HealthClient::new(channel).check(check()).await.unwrap();

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn explain_status_reads_the_error_chain() {
    // h2 keeps only the kind and text of the I/O error that carried the rustls alert.
    let io_err = io::Error::new(io::ErrorKind::InvalidData, "received fatal alert: CertificateExpired");
    let status = Status::from_error(Box::new(io_err));
    let message = explain_status(&status);
    assert!(message.starts_with("the broker refused the TLS handshake (alert CertificateExpired)"), "{message}");
    let status = Status::from_error(Box::new(io::Error::from(io::ErrorKind::BrokenPipe)));
    assert!(explain_status(&status).starts_with("the broker closed the connection"));
    let refused =
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(PeerCertError::IsCa)))));
    let status = Status::from_error(Box::new(io::Error::new(io::ErrorKind::InvalidData, refused)));
    assert_eq!(
        explain_status(&status),
        "refused the broker's certificate: certificate is a CA certificate, not an \
         end-entity certificate"
    );
    let status = Status::not_found("job 7 not found");
    assert_eq!(explain_status(&status), "job 7 not found");
}

#[tokio::test]
async fn unreachable_broker_is_explained() {
    let fx = Fixture::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = connect(&url, fx.agent_client(), None).await.unwrap_err();
    assert!(err.to_string().contains("connection refused"), "{err}");
    let err = connect("http://127.0.0.1:1", fx.agent_client(), None).await;
    assert!(matches!(err, Err(TlsError::BadUrl { .. })));
}
