//! A DNS server for one name: `A` queries for it are answered with 127.0.0.1, `AAAA` with no
//! address, every other name with NXDOMAIN; it remembers the names it was asked. It listens on port
//! 53 (a resolv.conf has no port) of a loopback address of its own, so it needs root, as the image
//! tests do anyway.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

pub struct Server {
    ip: IpAddr,
    asked: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(name: &str) -> Server {
        // A loopback address no other test uses; the whole of 127/8 is loopback on Linux.
        let ip = IpAddr::V4(Ipv4Addr::new(127, 83, (std::process::id() % 250) as u8 + 1, 53));
        let socket = UdpSocket::bind(SocketAddr::new(ip, 53))
            .await
            .unwrap_or_else(|e| panic!("a DNS server on {ip}:53 (needs root): {e}"));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (name, seen) = (name.to_ascii_lowercase(), Arc::clone(&asked));
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Some((asked_name, answer)) = answer(&buf[..n], &name) else { continue };
                seen.lock().unwrap().push(asked_name);
                let _ = socket.send_to(&answer, from).await;
            }
        });
        Server { ip, asked, task }
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// The names asked so far.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The asked name and the answer to `query`, or None for what is not a one-question query.
fn answer(query: &[u8], name: &str) -> Option<(String, Vec<u8>)> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    while *query.get(at)? != 0 {
        let len = query[at] as usize;
        labels.push(String::from_utf8_lossy(query.get(at + 1..at + 1 + len)?).to_ascii_lowercase());
        at += len + 1;
    }
    let question = query.get(12..at + 5)?;
    let kind = u16::from_be_bytes([query[at + 1], query[at + 2]]);
    let asked = labels.join(".");
    let known = asked == name;
    let answers: u16 = if known && kind == 1 { 1 } else { 0 };
    // Response, recursion desired and available; NXDOMAIN for an unknown name.
    let flags: u16 = if known { 0x8180 } else { 0x8183 };
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(&query[0..2]);
    reply.extend_from_slice(&flags.to_be_bytes());
    reply.extend_from_slice(&[0, 1]);
    reply.extend_from_slice(&answers.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if answers == 1 {
        // The name by pointer to the question, type A, class IN, TTL 5 s, 4 bytes: 127.0.0.1.
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 1]);
    }
    Some((asked, reply))
}
