//! `hybroker admin certs revoke|revocations` and `hybroker admin agents revoke`: the broker's deny
//! list of certificates, by identity (every certificate issued for it until now) or by serial.

use clap::{ArgGroup, Args, Subcommand};
use serde::Serialize;
use tonic::transport::Channel;

use super::connection::status_error;
use super::keys::rfc3339;
use crate::cli::client::output::table;
use crate::cli::report::{Output, print_json};
use crate::proto::{self, admin_service_client::AdminServiceClient};

#[derive(Subcommand)]
pub(super) enum CertsCommand {
    /// Revoke certificates of any role (agent, gateway, admin): by identity, every certificate
    /// issued for it until now (a new join token issues a fresh one); or one certificate by serial.
    /// The broker refuses them at once and closes their live connections.
    Revoke(RevokeArgs),
    /// List the revocations, oldest first.
    Revocations,
}

#[derive(Args)]
#[command(group(ArgGroup::new("what").required(true).args(["identity", "serial"])))]
pub(super) struct RevokeArgs {
    /// A SPIFFE URI (spiffe://TD/gateway/NAME, …/admin/NAME, …/agent/SITE/NODE) or an agent's SITE/NODE.
    #[arg(long, value_name = "URI|SITE/NODE")]
    identity: Option<String>,
    /// A certificate's serial number in hex (as `openssl x509 -noout -serial` prints it; colons allowed).
    #[arg(long, value_name = "HEX")]
    serial: Option<String>,
    /// Why (kept with the revocation and in the audit trail).
    #[arg(long, default_value = "")]
    reason: String,
}

/// One revocation as `certs revoke` and `certs revocations` print it (as JSON: the table's columns).
#[derive(Serialize)]
struct RevocationRow {
    /// The identity URI; absent when by serial.
    identity: Option<String>,
    /// The serial (lower-case hex); absent when by identity.
    serial: Option<String>,
    reason: String,
    /// RFC 3339.
    revoked_at: String,
    revoked_by: String,
    /// Live connections closed (only from `certs revoke`).
    #[serde(skip_serializing_if = "Option::is_none")]
    connections_closed: Option<u32>,
}

#[derive(Serialize)]
struct RevocationList {
    revocations: Vec<RevocationRow>,
}

impl RevocationRow {
    fn new(r: proto::RevocationInfo, with_closed: bool) -> Self {
        Self {
            identity: (!r.identity.is_empty()).then_some(r.identity),
            serial: (!r.serial.is_empty()).then_some(r.serial),
            reason: r.reason,
            revoked_at: rfc3339(r.revoked_at_ms),
            revoked_by: r.revoked_by,
            connections_closed: with_closed.then_some(r.connections_closed),
        }
    }

    fn target(&self) -> String {
        match (&self.identity, &self.serial) {
            (Some(identity), _) => identity.clone(),
            (None, Some(serial)) => format!("serial {serial}"),
            (None, None) => String::new(),
        }
    }
}

/// Runs a `certs` command.
pub(super) async fn certs(channel: Channel, out: Output, command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Revoke(RevokeArgs { identity, serial, reason }) => {
            revoke(channel, out, identity.unwrap_or_default(), serial.unwrap_or_default(), reason).await
        }
        CertsCommand::Revocations => {
            let mut client = AdminServiceClient::new(channel);
            let list = client.list_revocations(proto::ListRevocationsRequest {}).await.map_err(status_error)?;
            let list = RevocationList {
                revocations: list.into_inner().revocations.into_iter().map(|r| RevocationRow::new(r, false)).collect(),
            };
            match out {
                Output::Json => print_json(&list),
                Output::Table => print!("{}", revocations_table(&list.revocations)),
            }
            Ok(())
        }
    }
}

/// Revokes `identity` or `serial` (exactly one non-empty) and prints what was revoked.
pub(super) async fn revoke(
    channel: Channel,
    out: Output,
    identity: String,
    serial: String,
    reason: String,
) -> anyhow::Result<()> {
    let mut client = AdminServiceClient::new(channel);
    let request = proto::RevokeCertificatesRequest { identity, serial, reason };
    let revoked = client.revoke_certificates(request).await.map_err(status_error)?.into_inner();
    let row = RevocationRow::new(revoked, true);
    match out {
        Output::Json => print_json(&row),
        Output::Table => println!(
            "revoked {} ({} live connection(s) closed); certificates issued for it until now are refused",
            row.target(),
            row.connections_closed.unwrap_or(0)
        ),
    }
    Ok(())
}

fn revocations_table(rows: &[RevocationRow]) -> String {
    let rows: Vec<Vec<String>> =
        rows.iter().map(|r| vec![r.target(), r.revoked_at.clone(), r.revoked_by.clone(), r.reason.clone()]).collect();
    table(&["REVOKED", "AT", "BY", "REASON"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_row_names_identity_or_serial() {
        let info = proto::RevocationInfo {
            identity: String::new(),
            serial: "a1b".into(),
            reason: "lost laptop".into(),
            revoked_at_ms: 1_000,
            revoked_by: "spiffe://td/admin/ops".into(),
            connections_closed: 2,
        };
        let row = RevocationRow::new(info, true);
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"identity": null, "serial": "a1b", "reason": "lost laptop",
                               "revoked_at": "1970-01-01T00:00:01Z", "revoked_by": "spiffe://td/admin/ops",
                               "connections_closed": 2})
        );
        assert!(revocations_table(&[row]).contains("serial a1b"));
    }
}
