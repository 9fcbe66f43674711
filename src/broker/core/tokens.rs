//! Join tokens in the core: created, listed and revoked by admins, spent by enrolments. A token is
//! `hbj_<token id>_<secret>` (128-bit id-free secret from the system CSPRNG); only SHA-256 of the
//! secret is kept, compared in constant time. The table lives in memory (loaded from the store at
//! start); every change is a store write of the same batch, and replies wait for its commit.
//!
//! Enrolment asks twice: [`TokenCmd::Check`] before signing (a CSR the token does not allow spends
//! nothing), then [`TokenCmd::Spend`], which checks again and takes one use atomically: of two
//! enrolments racing for the last use, one gets its certificate and the other's is discarded.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use super::fleet::admin_event;
use super::{Core, Effects, Reply};
use crate::error::ApiError;
use crate::model::UnixMillis;
use crate::store::{IdentityWrite, JoinTokenRecord, Write};

const PREFIX: &str = "hbj_";
/// The longest a token may live.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A join token as presented: its id and secret. `Debug` shows the id only.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub token_id: String,
    secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken").field("token_id", &self.token_id).field("secret", &"<redacted>").finish()
    }
}

impl JoinToken {
    /// Parses `hbj_<id>_<secret>`; `None` for anything else (the text is never echoed).
    pub fn parse(text: &str) -> Option<JoinToken> {
        let (id, secret) = text.trim().strip_prefix(PREFIX)?.split_once('_')?;
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        (hex(id, 16) && hex(secret, 32)).then(|| JoinToken { token_id: id.to_string(), secret: secret.to_string() })
    }

    fn secret_sha256(&self) -> String {
        super::keys::sha256_hex(self.secret.as_bytes())
    }
}

/// What `admin agents token list` shows of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenView {
    pub token_id: String,
    pub site: String,
    /// Empty: the node comes from the CSR.
    pub node: String,
    pub created_by: String,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub uses_left: u32,
    pub revoked: bool,
}

impl From<&JoinTokenRecord> for TokenView {
    fn from(r: &JoinTokenRecord) -> Self {
        TokenView {
            token_id: r.token_id.clone(),
            site: r.site.clone(),
            node: r.node.clone(),
            created_by: r.created_by.clone(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            uses_left: r.uses_left,
            revoked: r.revoked_at.is_some(),
        }
    }
}

/// Why a token was refused (the label of `hybroker_enrollments_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Expired,
    UsedUp,
    Revoked,
    /// A token without a node asked for a node the broker already knows (or a dedicated one):
    /// only a token scoped to that node may enrol it again.
    NodeKnown,
    /// A launch's token before the cloud answered the launch with the instance id it is for: the
    /// agent tries again.
    Unbound,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown",
            Refusal::Expired => "expired",
            Refusal::UsedUp => "used_up",
            Refusal::Revoked => "revoked",
            Refusal::NodeKnown => "node_known",
            Refusal::Unbound => "unbound",
        }
    }

    /// The message the enrolling agent gets (never the token text).
    pub fn message(self, token_id: &str) -> String {
        match self {
            Refusal::Unknown => "unknown join token (wrong or mistyped); ask an admin for a new one".to_string(),
            Refusal::Expired => format!("join token {token_id} has expired; ask an admin for a new one"),
            Refusal::UsedUp => format!("join token {token_id} is used up; ask an admin for a new one"),
            Refusal::Revoked => format!("join token {token_id} was revoked; ask an admin for a new one"),
            Refusal::Unbound => format!(
                "join token {token_id} is for a launch the cloud has not answered yet; try again in a few seconds"
            ),
            Refusal::NodeKnown => format!(
                "join token {token_id} names no node, and this node name is already enrolled (or dedicated); \
                 enrol it with a token made for it (admin agents token create --node)"
            ),
        }
    }
}

/// What a valid token lets one enrolment ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub site: String,
    /// `None`: the node comes from the CSR.
    pub node: Option<String>,
    /// When the token was made: an identity revoked after that is not enrolled with it.
    pub created_at: UnixMillis,
}

/// The join-token commands of the core.
pub enum TokenCmd {
    Create {
        site: String,
        node: Option<String>,
        ttl: Duration,
        uses: u32,
        /// The admin identity's URI.
        actor: String,
        /// The token's view and its text, shown once.
        reply: Reply<(TokenView, String)>,
    },
    List {
        reply: oneshot::Sender<Vec<TokenView>>,
    },
    Revoke {
        token_id: String,
        actor: String,
        reply: Reply<TokenView>,
    },
    /// Whether the token is valid now, spending nothing.
    Check {
        token: JoinToken,
        reply: oneshot::Sender<Result<Scope, Refusal>>,
    },
    /// Checks again and spends one use for the agent `site/node` (answered after the commit).
    Spend {
        token: JoinToken,
        agent: String,
        reply: oneshot::Sender<Result<Scope, Refusal>>,
    },
}

/// The in-memory token table.
#[derive(Debug, Default)]
pub struct Tokens {
    by_id: BTreeMap<String, JoinTokenRecord>,
}

impl Tokens {
    pub fn load(records: Vec<JoinTokenRecord>) -> Self {
        Tokens { by_id: records.into_iter().map(|r| (r.token_id.clone(), r)).collect() }
    }

    /// A single-use token for a launch of `site` (bound to its instance id later, by [`Tokens::bind`]).
    pub fn for_launch(
        &mut self,
        site: &str,
        launch_id: &str,
        now: UnixMillis,
        ttl: Duration,
    ) -> (JoinTokenRecord, String) {
        let (mut record, text) = generate(site, "", "capacity", now, ttl, 1);
        record.launch_id = launch_id.to_string();
        self.by_id.insert(record.token_id.clone(), record.clone());
        (record, text)
    }

    /// The token now enrols only `node`.
    pub fn bind(&mut self, token_id: &str, node: &str) {
        if let Some(record) = self.by_id.get_mut(token_id) {
            record.node = node.to_string();
        }
    }

    /// Revokes a token without an audit entry (the capacity controller's own tokens); whether it
    /// changed.
    pub fn revoke_quietly(&mut self, token_id: &str, now: UnixMillis) -> bool {
        match self.by_id.get_mut(token_id) {
            Some(record) if record.revoked_at.is_none() => {
                record.revoked_at = Some(now);
                true
            }
            _ => false,
        }
    }

    /// The token's scope if it is valid at `now`.
    fn check(&self, token: &JoinToken, now: UnixMillis) -> Result<Scope, Refusal> {
        let Some(record) = self.by_id.get(&token.token_id) else { return Err(Refusal::Unknown) };
        let hash = token.secret_sha256();
        if !bool::from(hash.as_bytes().ct_eq(record.secret_sha256.as_bytes())) {
            return Err(Refusal::Unknown);
        }
        if record.revoked_at.is_some() {
            return Err(Refusal::Revoked);
        }
        if now >= record.expires_at {
            return Err(Refusal::Expired);
        }
        if record.uses_left == 0 {
            return Err(Refusal::UsedUp);
        }
        if !record.launch_id.is_empty() && record.node.is_empty() {
            return Err(Refusal::Unbound);
        }
        Ok(Scope {
            site: record.site.clone(),
            node: (!record.node.is_empty()).then(|| record.node.clone()),
            created_at: record.created_at,
        })
    }
}

/// A new token's record and text.
fn generate(
    site: &str,
    node: &str,
    actor: &str,
    now: UnixMillis,
    ttl: Duration,
    uses: u32,
) -> (JoinTokenRecord, String) {
    let rng = SystemRandom::new();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 16];
    rng.fill(&mut id).expect("the system random source works");
    rng.fill(&mut secret).expect("the system random source works");
    let (token_id, secret) = (super::keys::hex(&id), super::keys::hex(&secret));
    let record = JoinTokenRecord {
        token_id: token_id.clone(),
        secret_sha256: super::keys::sha256_hex(secret.as_bytes()),
        site: site.to_string(),
        node: node.to_string(),
        created_by: actor.to_string(),
        created_at: now,
        expires_at: now + ttl.as_millis() as i64,
        uses_left: uses,
        revoked_at: None,
        launch_id: String::new(),
    };
    (record, format!("{PREFIX}{token_id}_{secret}"))
}

impl Core {
    pub(super) fn token_cmd(&mut self, cmd: TokenCmd, out: &mut Effects) {
        let now = self.now.ms;
        match cmd {
            TokenCmd::Create { site, node, ttl, uses, actor, reply } => {
                if ttl.is_zero() || ttl > MAX_TTL || uses == 0 {
                    let msg = format!("a join token needs a ttl above 0 and at most {MAX_TTL:?}, and at least 1 use");
                    return out.reply(reply, Err(ApiError::InvalidArgument(msg)));
                }
                let (record, text) = generate(&site, node.as_deref().unwrap_or(""), &actor, now, ttl, uses);
                let view = TokenView::from(&record);
                let target = format!("{site}/{}", node.as_deref().unwrap_or("*"));
                tracing::info!(actor, token_id = record.token_id, target, uses, ttl = ?ttl, "join token created");
                out.batch.push(Write::Identity(IdentityWrite::NewJoinToken(record.clone())));
                out.batch.push(admin_event(
                    now,
                    &actor,
                    "token.create",
                    &target,
                    &format!("token {} uses {uses}", view.token_id),
                ));
                self.tokens.by_id.insert(record.token_id.clone(), record);
                out.reply(reply, Ok((view, text)));
            }
            TokenCmd::List { reply } => {
                let _ = reply.send(self.tokens.by_id.values().map(TokenView::from).collect());
            }
            TokenCmd::Revoke { token_id, actor, reply } => {
                let Some(record) = self.tokens.by_id.get_mut(&token_id) else {
                    return out.reply(reply, Err(ApiError::NotFound(format!("join token {token_id} not found"))));
                };
                if record.revoked_at.is_none() {
                    record.revoked_at = Some(now);
                    tracing::info!(actor, token_id, "join token revoked");
                    out.batch
                        .push(Write::Identity(IdentityWrite::RevokeJoinToken { token_id: token_id.clone(), at: now }));
                    let target = format!("{}/{}", record.site, if record.node.is_empty() { "*" } else { &record.node });
                    let view = TokenView::from(&*record);
                    out.batch.push(admin_event(now, &actor, "token.revoke", &target, &format!("token {token_id}")));
                    return out.reply(reply, Ok(view));
                }
                out.reply(reply, Ok(TokenView::from(&*record)));
            }
            TokenCmd::Check { token, reply } => {
                let _ = reply.send(self.tokens.check(&token, now));
            }
            TokenCmd::Spend { token, agent, reply } => {
                // A token for any node of a site must not take over one that exists: the real
                // node's stream would be replaced and its (dedicated) work sent to the newcomer.
                let known = self.agents.contains_key(&agent) || self.settings.dedicated.contains_key(&agent);
                let result = match self.tokens.check(&token, now) {
                    Ok(scope) if scope.node.is_none() && known => Err(Refusal::NodeKnown),
                    result => result,
                };
                if result.is_ok()
                    && let Some(record) = self.tokens.by_id.get_mut(&token.token_id)
                {
                    record.uses_left -= 1;
                    out.batch.push(Write::Identity(IdentityWrite::JoinTokenUsed { token_id: token.token_id.clone() }));
                }
                out.after_commit(move || {
                    let _ = reply.send(result);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(record: JoinTokenRecord) -> Tokens {
        Tokens::load(vec![record])
    }

    #[test]
    fn a_token_is_checked_by_id_and_secret_and_refused_with_its_reason() {
        let (record, text) = generate("lab", "", "spiffe://t/admin/ops", 1_000, Duration::from_secs(60), 1);
        let token = JoinToken::parse(&text).unwrap();
        assert!(!format!("{token:?}").contains(&text[21..]), "{token:?}");
        let tokens = table(record.clone());
        assert_eq!(tokens.check(&token, 1_000), Ok(Scope { site: "lab".into(), node: None, created_at: 1_000 }));
        assert_eq!(tokens.check(&token, 61_000), Err(Refusal::Expired));
        let mut tampered = text.clone();
        let last = if tampered.ends_with('0') { "1" } else { "0" };
        tampered.replace_range(tampered.len() - 1.., last);
        assert_eq!(tokens.check(&JoinToken::parse(&tampered).unwrap(), 1_000), Err(Refusal::Unknown));
        let used = table(JoinTokenRecord { uses_left: 0, ..record.clone() });
        assert_eq!(used.check(&token, 1_000), Err(Refusal::UsedUp));
        let revoked = table(JoinTokenRecord { revoked_at: Some(2), ..record });
        assert_eq!(revoked.check(&token, 1_000), Err(Refusal::Revoked));
        assert!(JoinToken::parse("hbj_short_x").is_none());
        assert!(JoinToken::parse(&text.replace("hbj_", "hbk_")).is_none());
    }
}
