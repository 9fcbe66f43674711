//! The accept loop under idle sockets: real TCP on loopback (127.0.0.1 and 127.0.0.2 are both
//! local), real mutual TLS, a real tonic server.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::tests::Fixture;
use super::*;

/// A generous bound for anything that should take milliseconds on an idle machine.
const DEADLINE: Duration = Duration::from_secs(10);

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A tonic health server behind [`tls_incoming_with`].
struct Server {
    url: String,
    addr: SocketAddr,
    gate: Arc<HandshakeGate>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Server {
    async fn start(fx: &Fixture, limits: HandshakeLimits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = HandshakeGate::new(limits);
        let incoming = tls_incoming_with(listener, fx.server(&[Role::Agent]), Arc::clone(&gate));
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tonic::transport::Server::builder().add_service(health).serve_with_incoming_shutdown(
            incoming,
            async {
                let _ = stopped.await;
            },
        ));
        Server { url: format!("https://{addr}"), addr, gate, stop, task }
    }

    /// An agent's mutual TLS channel from `from` and one health check on it; returns the channel
    /// (its connection stays open) and how long both took.
    async fn call_from(&self, fx: &Fixture, from: IpAddr) -> Result<(Channel, Duration), String> {
        let started = Instant::now();
        let call = async {
            let channel = connect_from(&self.url, fx.agent_client(), None, from).await.map_err(|e| e.to_string())?;
            let check = HealthCheckRequest { service: String::new() };
            HealthClient::new(channel.clone()).check(check).await.map_err(|e| explain_status(&e))?;
            Ok::<_, String>(channel)
        };
        let channel =
            tokio::time::timeout(DEADLINE, call).await.map_err(|_| format!("no answer within {DEADLINE:?}"))??;
        Ok((channel, started.elapsed()))
    }

    /// Waits until the gate counts exactly `n` unfinished handshakes.
    async fn wait_unfinished(&self, n: usize) {
        let until = Instant::now() + DEADLINE;
        while self.gate.unfinished() != n {
            assert!(Instant::now() < until, "{} unfinished handshakes, expected {n}", self.gate.unfinished());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// `n` TCP connections from `from` to `to` that never send a byte.
async fn idle_sockets(from: IpAddr, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        sockets.push(socket.connect(to).await.unwrap());
    }
    sockets
}

/// `n` sockets from `from` that each send a ClientHello, then nothing.
async fn stalled_after_hello(fx: &Fixture, from: IpAddr, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let config = fx.agent_client();
    let mut sockets = idle_sockets(from, to, n).await;
    for socket in &mut sockets {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        tokio::io::AsyncWriteExt::write_all(socket, &hello).await.unwrap();
    }
    sockets
}

/// Asserts that the server closes `socket` (EOF or reset) without a byte, within [`DEADLINE`].
async fn assert_closed(mut socket: TcpStream) {
    let mut buf = [0u8; 1];
    match tokio::time::timeout(DEADLINE, socket.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(_)) => panic!("the server sent data on a socket over its limit"),
        Err(_) => panic!("the server did not close a socket over its limit within {DEADLINE:?}"),
    }
}

/// The value of `hybroker_tls_handshake_failures_total{reason="<reason>"}` in this process.
fn failures(reason: &str) -> f64 {
    let prefix = format!("hybroker_tls_handshake_failures_total{{reason=\"{reason}\"}} ");
    let text = crate::metrics::global().render();
    text.lines().find_map(|line| line.strip_prefix(&prefix)).map_or(0.0, |v| v.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_leave_room_for_other_clients() {
    let fx = Fixture::new();
    // Timeouts far beyond the calls' deadline: the calls cannot be helped by the idle sockets
    // being dropped; the default limits otherwise.
    let limits = HandshakeLimits {
        client_hello_timeout: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(60),
        ..HandshakeLimits::default()
    };
    let server = Server::start(&fx, limits).await;
    let _idle = idle_sockets(ip("127.0.0.1"), server.addr, 300).await;
    // And 100 that stall after their ClientHello: they hold nothing but their slot either.
    let _stalled = stalled_after_hello(&fx, ip("127.0.0.1"), server.addr, 100).await;
    server.wait_unfinished(400).await;

    let (_same, same_took) =
        server.call_from(&fx, ip("127.0.0.1")).await.expect("a call from the idle sockets' address");
    let (_other, other_took) = server.call_from(&fx, ip("127.0.0.2")).await.expect("a call from another address");
    println!(
        "with 300 idle and 100 stalled sockets: a call from their address took {same_took:?}, from another {other_took:?}"
    );
    // The idle sockets still hold their slots: the calls got through beside them.
    assert_eq!(server.gate.unfinished(), 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_over_its_limit_is_refused_and_counted() {
    let fx = Fixture::new();
    let limits = HandshakeLimits {
        client_hello_timeout: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(60),
        per_source: 4,
        total: 6,
    };
    let server = Server::start(&fx, limits).await;
    let (over_source, over_total) = (failures("too_many_unfinished"), failures("server_busy"));

    // 127.0.0.1 holds its 4 slots: its next socket is closed at once, and counted.
    let idle_a = idle_sockets(ip("127.0.0.1"), server.addr, 4).await;
    server.wait_unfinished(4).await;
    let extra = idle_sockets(ip("127.0.0.1"), server.addr, 1).await.pop().unwrap();
    assert_closed(extra).await;
    assert!(failures("too_many_unfinished") > over_source, "the refused socket was not counted");
    let err = server.call_from(&fx, ip("127.0.0.1")).await.expect_err("a call over the source's limit got through");
    println!("refused call: {err}");
    // Another address is not affected.
    server.call_from(&fx, ip("127.0.0.2")).await.expect("a call from another address");

    // All 6 slots taken: a third address is refused too, as "server_busy".
    let idle_b = idle_sockets(ip("127.0.0.2"), server.addr, 2).await;
    server.wait_unfinished(6).await;
    let extra = idle_sockets(ip("127.0.0.3"), server.addr, 1).await.pop().unwrap();
    assert_closed(extra).await;
    assert!(failures("server_busy") > over_total, "the refused socket was not counted");

    // Closed sockets free their slots; finished handshakes hold none, however many stay open.
    drop((idle_a, idle_b));
    server.wait_unfinished(0).await;
    let mut open = Vec::new();
    for _ in 0..2 * limits.per_source {
        open.push(server.call_from(&fx, ip("127.0.0.1")).await.expect("a call after the idle sockets left"));
    }
    assert_eq!(server.gate.unfinished(), 0);
    server.stop().await;
}

#[tokio::test]
async fn silent_stalled_or_plain_clients_fail_with_their_reason() {
    let fx = Fixture::new();
    let limits = HandshakeLimits {
        client_hello_timeout: Duration::from_millis(200),
        handshake_timeout: Duration::from_millis(600),
        ..HandshakeLimits::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    // Silent: no ClientHello.
    let _silent = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let started = Instant::now();
    let err = accept_tls(tcp, fx.server(&[Role::Agent]), &limits).await.unwrap_err();
    assert_eq!(err.reason(), "no_client_hello", "{err}");
    assert!(started.elapsed() >= limits.client_hello_timeout);

    // Not TLS at all.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut plain, b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let err = accept_tls(tcp, fx.server(&[Role::Agent]), &limits).await.unwrap_err();
    assert_eq!(err.reason(), "bad_message", "{err}");

    // Stalled: a ClientHello, then nothing; the whole handshake's bound applies.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut client = rustls::ClientConnection::new(fx.agent_client(), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stalled, &hello).await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let started = Instant::now();
    let err = accept_tls(tcp, fx.server(&[Role::Agent]), &limits).await.unwrap_err();
    assert_eq!(err.reason(), "timeout", "{err}");
    assert!(started.elapsed() >= limits.handshake_timeout - Duration::from_millis(50));
}

#[test]
fn a_gate_raises_the_open_file_limit_it_needs() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let limits = HandshakeLimits::default();
    let wanted = (2 * limits.total + 1024) as u64;
    // Other tests hold a few hundred sockets at most; 2,000 leaves them room.
    setrlimit(Resource::RLIMIT_NOFILE, 2000.min(hard), hard).unwrap();
    let _gate = HandshakeGate::new(limits);
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(soft >= wanted.min(hard), "soft open file limit {soft}, wanted {wanted} (hard {hard})");
}
