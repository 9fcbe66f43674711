//! Enrolment with a join token: a node without a valid certificate makes its own P-256 key, sends a
//! CSR with the token to the broker's enrol listener (verifying the broker with the join file's CA
//! bundle) and writes the key (0600), the certificate chain and the CA bundle where `tls.*` says.
//! A node whose certificate is still valid does not enrol again; one whose certificate expired
//! says so and enrols only with a new token. The token never reaches a log.
//!
//! The join file is TOML (`hybroker admin agents token create --output-file` writes it):
//! `token`, `enroll_url`, `trust_domain`, `site`, `node` (absent: `agent.node_name`, else the
//! instance id from the metadata service with `agent.cloud`, else the host name), optional
//! `server_name`, and `ca_bundle` (PEM).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::config::agent::AgentConfig;
use crate::model::UnixMillis;
use crate::model::retry::RetryPolicy;
use crate::proto::{self, enroll_service_client::EnrollServiceClient};
use crate::{pki, tls};

/// Tries of an enrolment the broker did not answer (it may be starting).
const TRIES: u32 = 8;

/// A join file's contents.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JoinFile {
    /// `hbj_<id>_<secret>`.
    pub token: String,
    /// The broker's enrol listener, `https://host:port`.
    pub enroll_url: String,
    /// The name to verify in the broker's certificate; default: the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    pub trust_domain: String,
    pub site: String,
    /// The node name; absent: the token names it, or the host name is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The CA bundle (PEM) to verify the broker with.
    pub ca_bundle: String,
}

impl fmt::Debug for JoinFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinFile")
            .field("token", &"<redacted>")
            .field("enroll_url", &self.enroll_url)
            .field("site", &self.site)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl JoinFile {
    pub fn read(path: &Path) -> anyhow::Result<JoinFile> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read join file {}", path.display()))?;
        // The parse error could quote the token: name the file only.
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("join file {} is not valid: {}", path.display(), e.message()))
    }

    /// The file's text, with a comment saying what it is.
    pub fn render(&self) -> String {
        let body = toml::to_string(self).expect("a join file serialises");
        format!(
            "# hybroker join file: `hybroker agent --join-file THIS_FILE` enrols this node once.\n\
             # The token is a secret: move this file to the node only, and delete it after enrolment.\n{body}"
        )
    }
}

/// The NotAfter of the certificate file's leaf, if it is readable.
pub fn cert_not_after(path: &Path) -> Option<UnixMillis> {
    let pem = std::fs::read(path).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    pki::not_after(&pem.contents).ok()
}

/// Makes sure the node has a certificate: enrols with the join file when it has none (or none
/// usable); refuses to start, saying why, when its certificate expired and there is no join file.
pub async fn ensure_certificate(config: &AgentConfig) -> anyhow::Result<()> {
    let paths = &config.tls;
    let now = now_ms();
    let not_after = cert_not_after(&paths.cert);
    let has_key = paths.key.is_file() && paths.ca_cert.is_file();
    match (not_after, &config.agent.join_token_file) {
        (Some(at), _) if at > now && has_key => return Ok(()),
        (Some(at), None) if at <= now => bail!(
            "the agent certificate {} expired at {} (ms since the epoch); the node must enrol again: start the agent \
             with --join-file holding a new join token (hybroker admin agents token create)",
            paths.cert.display(),
            at
        ),
        (_, None) => return Ok(()), // the usual start fails with the missing file named
        (Some(at), Some(_)) if at <= now => tracing::warn!(
            cert = %paths.cert.display(),
            expired_at_ms = at,
            "the agent certificate expired; enrolling again with the join file (it needs a new join token)"
        ),
        _ => {}
    }
    let join_path = config.agent.join_token_file.as_ref().expect("matched above");
    let join = JoinFile::read(join_path)?;
    enroll(config, &join).await.with_context(|| format!("enrolment with join file {}", join_path.display()))
}

async fn enroll(config: &AgentConfig, join: &JoinFile) -> anyhow::Result<()> {
    let node = match (join.node.as_ref().or(config.agent.node_name.as_ref()), config.agent.cloud) {
        (Some(node), _) => node.clone(),
        // A launched instance is named after itself: the broker knows it by that name.
        (None, Some(cloud)) => {
            let url = config.agent.metadata_url.as_deref().unwrap_or(super::metadata::DEFAULT_METADATA_URL);
            let client = super::metadata::MetadataClient::new(cloud, url)?;
            client.instance_name().await.context("the node name from the instance metadata service")?
        }
        (None, None) => nix::unistd::gethostname()
            .context("host name")?
            .into_string()
            .map_err(|_| anyhow::anyhow!("the host name is not UTF-8; set node in the join file"))?,
    };
    // The key is made here and never leaves the node: the broker gets the CSR, its public key only.
    let (key_pem, csr_der) = pki::agent_csr(&join.trust_domain, &join.site, &node)?;
    let client_tls = tls::enroll_client_config(join.ca_bundle.as_bytes(), &join.trust_domain)?;
    let request = proto::EnrollRequest { token: join.token.clone(), csr_der };
    crate::telemetry::notify::status(&format!("enrolling at {} as {}/{node}", join.enroll_url, join.site));
    let policy = RetryPolicy::exponential(Duration::from_millis(200), Duration::from_secs(5)).with_jitter(0.5);
    let mut tries = 0;
    let response = loop {
        tries += 1;
        let attempt = async {
            let channel = tls::connect(&join.enroll_url, client_tls.clone(), join.server_name.as_deref()).await?;
            EnrollServiceClient::new(channel).enroll(request.clone()).await.map_err(|status| {
                anyhow::anyhow!("the broker refused the enrolment: {}", status.message()).context(status.code())
            })
        };
        match attempt.await {
            Ok(response) => break response.into_inner(),
            Err(e) if tries < TRIES && retryable(&e) => {
                tracing::warn!(tries, "enrolment failed, retrying: {e:#}");
                tokio::time::sleep(policy.delay(tries, None, fastrand::f64())).await;
            }
            Err(e) => return Err(e),
        }
    };
    let paths = &config.tls;
    for dir in [&paths.key, &paths.cert, &paths.ca_cert].iter().filter_map(|p| p.parent()) {
        if !dir.as_os_str().is_empty() {
            crate::private_files::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    pki::write_atomically(&paths.key, &key_pem, 0o600)?;
    pki::write_atomically(&paths.cert, &response.cert_chain_pem, 0o644)?;
    pki::write_atomically(&paths.ca_cert, &response.ca_bundle_pem, 0o644)?;
    tracing::info!(
        agent = response.agent_id,
        issued_at_ms = response.issued_at_ms,
        not_after_ms = response.not_after_ms,
        cert = %paths.cert.display(),
        "enrolled with the join token: key made on this node, certificate written"
    );
    Ok(())
}

/// Whether an enrolment error may pass by itself (the broker unreachable or busy), unlike a refusal.
fn retryable(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<tonic::Code>() {
        Some(code) => matches!(code, tonic::Code::Unavailable | tonic::Code::ResourceExhausted),
        None => true, // could not connect
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> UnixMillis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
