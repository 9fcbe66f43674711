//! The admin service's join-token calls at the proto edge: a create request checked and turned
//! into a core command, and the core's token views as `proto`.

use std::time::Duration;

use tonic::Status;

use super::core::{Reply, TokenCmd, TokenView};
use crate::model::identity::validate_name;
use crate::proto;

/// A token's lifetime when the request names none.
const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);

/// The core command for `CreateJoinToken` by the admin `actor` (its URI), or why the request is
/// invalid: a site that is not configured (when sites are), an invalid site or node name.
pub fn create_command(
    r: proto::CreateJoinTokenRequest,
    sites: &[String],
    actor: String,
    reply: Reply<(TokenView, String)>,
) -> Result<TokenCmd, Status> {
    validate_name("site", &r.site).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if !sites.is_empty() && !sites.contains(&r.site) {
        return Err(Status::invalid_argument(format!(
            "site {:?} is not configured on this broker ([[site]]); configured: {}",
            r.site,
            sites.join(", ")
        )));
    }
    let node = (!r.node.is_empty()).then_some(r.node);
    if let Some(node) = &node {
        validate_name("node", node).map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    let ttl = if r.ttl_ms <= 0 { DEFAULT_TTL } else { Duration::from_millis(r.ttl_ms as u64) };
    Ok(TokenCmd::Create { site: r.site, node, ttl, uses: r.uses.max(1), actor, reply })
}

impl From<TokenView> for proto::JoinTokenInfo {
    fn from(t: TokenView) -> Self {
        Self {
            token_id: t.token_id,
            site: t.site,
            node: t.node,
            created_at_ms: t.created_at,
            expires_at_ms: t.expires_at,
            uses_left: t.uses_left,
            revoked: t.revoked,
            created_by: t.created_by,
        }
    }
}
