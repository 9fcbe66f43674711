//! `hybroker tenants add|list|revoke`: tenants' API keys, on the broker's admin service. The key
//! itself is printed once, when it is made; lists show only its id.

use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;

use super::connection::{BrokerArgs, status_error};
use crate::cli::client::output::table;
use crate::cli::report::{self, EXIT_OK, Output, print_json};
use crate::proto::{self, admin_service_client::AdminServiceClient};

#[derive(Args)]
pub struct TenantsArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(subcommand)]
    command: TenantsCommand,
}

#[derive(Subcommand)]
enum TenantsCommand {
    /// Make a new API key for a tenant declared in the broker config; the key is printed once.
    Add { tenant: String },
    /// List keys (id, tenant, created, last used, status); never the keys themselves.
    List {
        /// Only this tenant's keys.
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Revoke a key: it fails from the next request on.
    Revoke { key_id: String },
}

/// `tenants add` as JSON: the table's fields.
#[derive(Serialize)]
struct AddedKey {
    tenant: String,
    key_id: String,
    /// The secret, shown only now.
    key: String,
}

/// One key as `tenants list` and `tenants revoke` print it (as JSON: the table's columns).
#[derive(Serialize)]
struct KeyRow {
    key_id: String,
    tenant: String,
    /// RFC 3339.
    created: String,
    /// RFC 3339; absent (`never` in the table) when the key was never used.
    last_used: Option<String>,
    /// `active` or `revoked`.
    status: &'static str,
}

#[derive(Serialize)]
struct KeyList {
    keys: Vec<KeyRow>,
}

impl From<proto::KeyInfo> for KeyRow {
    fn from(k: proto::KeyInfo) -> Self {
        Self {
            key_id: k.key_id,
            tenant: k.tenant,
            created: rfc3339(k.created_at_ms),
            last_used: (k.last_used_ms != 0).then(|| rfc3339(k.last_used_ms)),
            status: if k.revoked { "revoked" } else { "active" },
        }
    }
}

/// Runs a `tenants` command; returns the exit status (errors printed as `error:`/`hint:`).
pub async fn tenants(args: TenantsArgs) -> i32 {
    report::finish(run(args).await)
}

async fn run(args: TenantsArgs) -> anyhow::Result<i32> {
    let mut client = AdminServiceClient::new(args.broker.channel().await?);
    let out = args.broker.output;
    match args.command {
        TenantsCommand::Add { tenant } => {
            let added = client.add_key(proto::AddKeyRequest { tenant }).await.map_err(status_error)?.into_inner();
            let info = added.info.unwrap_or_default();
            let added = AddedKey { tenant: info.tenant, key_id: info.key_id, key: added.key };
            match out {
                Output::Json => print_json(&added),
                Output::Table => {
                    println!("tenant:  {}", added.tenant);
                    println!("key id:  {}", added.key_id);
                    println!("key:     {}", added.key);
                }
            }
            eprintln!("the key is shown only now; give it to the tenant (HYBROKER_TOKEN) and keep it secret");
        }
        TenantsCommand::List { tenant } => {
            let keys = client.list_keys(proto::ListKeysRequest { tenant }).await.map_err(status_error)?;
            let keys = KeyList { keys: keys.into_inner().keys.into_iter().map(KeyRow::from).collect() };
            match out {
                Output::Json => print_json(&keys),
                Output::Table => print!("{}", keys_table(&keys.keys)),
            }
        }
        TenantsCommand::Revoke { key_id } => {
            let key = client.revoke_key(proto::RevokeKeyRequest { key_id }).await.map_err(status_error)?;
            let key = KeyRow::from(key.into_inner());
            match out {
                Output::Json => print_json(&key),
                Output::Table => println!("revoked key {} of tenant {}", key.key_id, key.tenant),
            }
        }
    }
    Ok(EXIT_OK)
}

fn keys_table(keys: &[KeyRow]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let last_used = k.last_used.clone().unwrap_or_else(|| "never".into());
            vec![k.key_id.clone(), k.tenant.clone(), k.created.clone(), last_used, k.status.to_string()]
        })
        .collect();
    table(&["KEY ID", "TENANT", "CREATED", "LAST USED", "STATUS"], &rows)
}

/// Milliseconds since the Unix epoch as RFC 3339 in whole seconds, UTC.
pub(super) fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_row_names_its_fields_as_the_table_does() {
        let info = proto::KeyInfo {
            key_id: "k1".into(),
            tenant: "acme".into(),
            created_at_ms: 1_000,
            last_used_ms: 0,
            revoked: true,
        };
        let row = KeyRow::from(info);
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"key_id": "k1", "tenant": "acme", "created": "1970-01-01T00:00:01Z",
                               "last_used": null, "status": "revoked"})
        );
        let text = keys_table(&[row]);
        assert_eq!(text.lines().next().unwrap().split("  ").filter(|c| !c.is_empty()).count(), 5, "{text}");
        assert!(text.lines().nth(1).unwrap().contains("never"), "{text}");
    }
}
