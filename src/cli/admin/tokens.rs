//! `hybroker admin agents token create|list|revoke`: join tokens for enrolling agents, on the
//! broker's admin service (admin certificate only; the gateway never exposes them). The token is
//! printed once, when it is made (or written into a join file with `--output-file`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;

use super::connection::{BrokerArgs, status_error};
use super::keys::rfc3339;
use crate::agent::enroll::JoinFile;
use crate::cli::client::output::table;
use crate::cli::report::{EXIT_OK, Output, print_json};
use crate::model::duration::HumanDuration;
use crate::proto::{self, admin_service_client::AdminServiceClient};

#[derive(Subcommand)]
pub(super) enum TokenCommand {
    /// Make a join token for a site (and optionally one node); printed once, or written into a
    /// join file with --output-file.
    Create {
        /// The site the node joins (a configured [[site]] when the broker has any).
        #[arg(long)]
        site: String,
        /// Only this node name may enrol with it; default: the node names itself in its CSR.
        #[arg(long)]
        node: Option<String>,
        /// How long the token is valid.
        #[arg(long, default_value = "15m", value_parser = HumanDuration::parse)]
        ttl: HumanDuration,
        /// How many nodes may enrol with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Write a join file (mode 0600) holding the token, the enrol address and the CA bundle
        /// (--ca-cert) instead of printing the token.
        #[arg(long, value_name = "PATH", requires = "enroll_url")]
        output_file: Option<PathBuf>,
        /// The broker's enrol listener for the join file, e.g. https://broker.example:7444.
        #[arg(long, value_name = "URL")]
        enroll_url: Option<String>,
        /// The name to verify in the broker's certificate, when not the URL's host.
        #[arg(long)]
        server_name: Option<String>,
    },
    /// List join tokens (id, scope, expiry, uses left, status); never the tokens themselves.
    List,
    /// Revoke a join token: no node enrols with it any more.
    Revoke { token_id: String },
}

/// One token as `list` and `revoke` print it (as JSON: the table's columns).
#[derive(Serialize)]
struct TokenRow {
    token_id: String,
    site: String,
    /// Absent (`*` in the table) when any node name may enrol.
    node: Option<String>,
    created: String,
    expires: String,
    uses_left: u32,
    /// `active`, `expired`, `used up` or `revoked`.
    status: &'static str,
    created_by: String,
}

impl From<proto::JoinTokenInfo> for TokenRow {
    fn from(t: proto::JoinTokenInfo) -> Self {
        let now = crate::agent::enroll::now_ms();
        let status = match () {
            () if t.revoked => "revoked",
            () if t.expires_at_ms <= now => "expired",
            () if t.uses_left == 0 => "used up",
            () => "active",
        };
        Self {
            token_id: t.token_id,
            site: t.site,
            node: (!t.node.is_empty()).then_some(t.node),
            created: rfc3339(t.created_at_ms),
            expires: rfc3339(t.expires_at_ms),
            uses_left: t.uses_left,
            status,
            created_by: t.created_by,
        }
    }
}

/// `token create` as JSON.
#[derive(Serialize)]
struct Created {
    #[serde(flatten)]
    info: TokenRow,
    /// The token, shown only now (absent when written to a join file).
    token: Option<String>,
    join_file: Option<PathBuf>,
}

pub(super) async fn run(broker: &BrokerArgs, command: TokenCommand) -> anyhow::Result<i32> {
    let mut client = AdminServiceClient::new(broker.channel().await?);
    let out = broker.output;
    match command {
        TokenCommand::Create { site, node, ttl, uses, output_file, enroll_url, server_name } => {
            let request = proto::CreateJoinTokenRequest {
                site: site.clone(),
                node: node.clone().unwrap_or_default(),
                ttl_ms: ttl.0.as_millis() as i64,
                uses,
            };
            let created = client.create_join_token(request).await.map_err(status_error)?.into_inner();
            let info = TokenRow::from(created.info.unwrap_or_default());
            let mut token = Some(created.token);
            if let (Some(path), Some(enroll_url)) = (&output_file, enroll_url) {
                let join = JoinFile {
                    token: token.take().unwrap_or_default(),
                    enroll_url,
                    server_name,
                    trust_domain: broker.trust_domain()?,
                    site,
                    node,
                    ca_bundle: std::fs::read_to_string(broker.ca_cert())
                        .with_context(|| format!("cannot read {}", broker.ca_cert().display()))?,
                };
                crate::pki::write_atomically(path, &join.render(), 0o600)?;
            }
            let (token_id, expires) = (info.token_id.clone(), info.expires.clone());
            match out {
                Output::Json => print_json(&Created { info, token: token.clone(), join_file: output_file.clone() }),
                Output::Table => {
                    println!("token id:  {token_id}");
                    println!("expires:   {expires}");
                    match (&token, &output_file) {
                        (Some(token), _) => println!("token:     {token}"),
                        (None, Some(path)) => println!("join file: {}", path.display()),
                        (None, None) => {}
                    }
                }
            }
            if token.is_some() {
                eprintln!("the token is shown only now; put it in the node's join file and keep it secret");
            }
        }
        TokenCommand::List => {
            let tokens = client.list_join_tokens(proto::ListJoinTokensRequest {}).await.map_err(status_error)?;
            let rows: Vec<TokenRow> = tokens.into_inner().tokens.into_iter().map(TokenRow::from).collect();
            match out {
                Output::Json => print_json(&serde_json::json!({ "tokens": rows })),
                Output::Table => print!("{}", tokens_table(&rows)),
            }
        }
        TokenCommand::Revoke { token_id } => {
            let request = proto::RevokeJoinTokenRequest { token_id };
            let info = client.revoke_join_token(request).await.map_err(status_error)?.into_inner();
            let row = TokenRow::from(info);
            match out {
                Output::Json => print_json(&row),
                Output::Table => println!("revoked join token {} (site {})", row.token_id, row.site),
            }
        }
    }
    Ok(EXIT_OK)
}

fn tokens_table(rows: &[TokenRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|t| {
            vec![
                t.token_id.clone(),
                t.site.clone(),
                t.node.clone().unwrap_or_else(|| "*".into()),
                t.expires.clone(),
                t.uses_left.to_string(),
                t.status.to_string(),
                t.created_by.clone(),
            ]
        })
        .collect();
    table(&["TOKEN ID", "SITE", "NODE", "EXPIRES", "USES LEFT", "STATUS", "CREATED BY"], &rows)
}
