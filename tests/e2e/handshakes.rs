//! The broker's accept loop under idle sockets (issue 12): the real broker process, real mutual
//! TLS, 127.0.0.1 and 127.0.0.2 (both loopback) as two source addresses.

use std::time::{Duration, Instant};

use hybroker::model::identity::Role;
use hybroker::proto::{self, job_service_client::JobServiceClient};
use hybroker::tls;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::common::*;

/// Whether the server has closed `socket` (EOF or reset), without waiting.
fn closed(socket: &TcpStream) -> bool {
    match socket.try_read(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => panic!("the broker sent data before a ClientHello"),
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_do_not_block_admin_calls() {
    // A pre-handshake timeout of 10 s (3 s by default) leaves a loaded machine ample time for
    // the calls: they must get through while the idle sockets still hold their places.
    let cluster = Cluster::start_with(Duration::from_secs(5), &[], |_| Setup {
        broker_env: vec![("HYBROKER_BROKER__CLIENT_HELLO_TIMEOUT".into(), "10s".into())],
        ..Setup::default()
    })
    .await;
    let url = format!("https://{}", cluster.addr);
    let admin = cluster.issue(Role::Admin, "ops", None);
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(cluster.addr).await.unwrap());
    }

    // Calls from the idle sockets' address and from another get through beside them.
    let started = Instant::now();
    let mut same = cluster.client_as(&admin).await;
    same.list(proto::ListJobsRequest::default()).await.expect("a call from the idle sockets' address");
    let same_took = started.elapsed();
    let started = Instant::now();
    let config = tls::client_config(&admin, TRUST_DOMAIN, Role::Broker).unwrap();
    let channel = tls::connect_from(&url, config, None, "127.0.0.2".parse().unwrap()).await.unwrap();
    JobServiceClient::new(channel).list(proto::ListJobsRequest::default()).await.expect("a call from another address");
    let other_took = started.elapsed();
    println!("with 300 idle sockets: a call from their address took {same_took:?}, from 127.0.0.2 {other_took:?}");
    // ... before the pre-handshake timeout freed anything: the idle sockets are all open.
    let dropped = idle.iter().filter(|s| closed(s)).count();
    assert_eq!(dropped, 0, "idle sockets were dropped before the calls finished");

    // Then the broker closes them, at its pre-handshake timeout.
    for socket in &mut idle {
        let read = tokio::time::timeout(Duration::from_secs(30), socket.read(&mut [0u8; 1])).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "an idle socket is still open after 30 s: {read:?}");
    }
    assert!(cluster.broker_log().contains("no_client_hello"), "the broker logs the idle sockets' reason");
}
