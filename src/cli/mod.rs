//! The command-line side: `pki`, `quickstart`, the operators' `admin`/`tenants`, the tenants'
//! `client`, completions and man pages ([`docs`]), what they all share ([`report`]: output, exit statuses, errors), and helpers of the
//! services' commands.

pub mod admin;
pub mod catalog;
pub mod client;
pub mod docs;
pub mod quickstart;
pub mod report;

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use crate::model::identity::Role;
use crate::pki::{self, IssueRequest};

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Make a root CA (ca.pem, root-key.pem: keep that key offline) and an issuing CA signed by it
    /// (issuing-ca.pem, issuing-ca-key.pem: the broker's) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "hybroker.local")]
        trust_domain: String,
    },
    /// Issue a role certificate signed by the issuing CA in DIR, written as NAME.pem (the
    /// certificate, then the issuing CA) and NAME-key.pem.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// broker | agent | gateway | admin
        #[arg(long)]
        role: Role,
        #[arg(long)]
        name: String,
        /// The agent's site (required for agents).
        #[arg(long)]
        site: Option<String>,
        /// DNS names the certificate is valid for (servers).
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses the certificate is valid for (servers).
        #[arg(long)]
        ip: Vec<IpAddr>,
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// Where to write the files; default: DIR.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn pki(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init { dir, trust_domain } => {
            let paths = pki::init_ca(&dir, &trust_domain)?;
            println!(
                "made a root and an issuing CA for trust domain {trust_domain}: trust bundle {}, issuing CA {} \
                 (keep {} offline: the broker needs only the issuing CA)",
                paths.cert.display(),
                paths.issuing_cert.display(),
                paths.root_key.display()
            );
        }
        PkiCommand::Issue { dir, role, name, site, dns, ip, days, out } => {
            let ca = pki::Ca::load(&dir)?;
            let request = IssueRequest { role, name, site, dns, ips: ip, days };
            let (cert, key) = ca.issue_to_dir(out.as_deref().unwrap_or(&dir), &request)?;
            println!("issued {}: {} {}", role, cert.display(), key.display());
        }
    }
    Ok(())
}

/// Listens on `addr` with a deep accept backlog (the kernel caps it at `net.core.somaxconn`), so a
/// storm of reconnecting agents is queued rather than dropped.
pub fn listen(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    Ok(socket.listen(16_384)?)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    crate::telemetry::notify::stopping();
}
