//! The admin service: tenants' API keys, for operators with an admin-role certificate.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::core::{CapacityCmd, Cmd, SiteView, TokenCmd};
use super::keys::{KeyRing, KeyView};
use super::revocations::RevocationAdmin;
use crate::config::TenantConfig;
use crate::error::ApiError;
use crate::model::identity::Role;
use crate::proto;
use crate::store::Reader;
use crate::tls;

pub struct AdminService {
    core: mpsc::Sender<Cmd>,
    keys: Arc<KeyRing>,
    tenants: Arc<HashMap<String, TenantConfig>>,
    revocation: Option<Arc<RevocationAdmin>>,
    /// Reads the audit trail (`ListAdminEvents`).
    reader: Option<Reader>,
    /// Configured sites (`[[site]]`); join tokens must name one when there are any.
    sites: Vec<String>,
}

impl AdminService {
    pub fn new(core: mpsc::Sender<Cmd>, keys: Arc<KeyRing>, tenants: Arc<HashMap<String, TenantConfig>>) -> Self {
        Self { core, keys, tenants, revocation: None, reader: None, sites: Vec::new() }
    }

    /// Serves `RevokeCertificates` and `ListRevocations` through `revocation`.
    pub fn with_revocation(mut self, revocation: Arc<RevocationAdmin>) -> Self {
        self.revocation = Some(revocation);
        self
    }

    fn revocation(&self) -> Result<&RevocationAdmin, Status> {
        self.revocation.as_deref().ok_or_else(|| Status::unimplemented("revocation is not enabled on this broker"))
    }

    /// Serves the audit trail from `reader`.
    pub fn with_reader(mut self, reader: Reader) -> Self {
        self.reader = Some(reader);
        self
    }

    /// Join tokens are checked against these sites (none: any valid site name).
    pub fn with_sites(mut self, sites: Vec<String>) -> Self {
        self.sites = sites;
        self
    }
}

/// Most audit events one `ListAdminEvents` returns (and its default).
const MAX_ADMIN_EVENTS: u32 = 1000;
const DEFAULT_ADMIN_EVENTS: u32 = 50;

impl From<KeyView> for proto::KeyInfo {
    fn from(k: KeyView) -> Self {
        Self {
            key_id: k.key_id,
            tenant: k.tenant,
            created_at_ms: k.created_at,
            last_used_ms: k.last_used,
            revoked: k.revoked,
        }
    }
}

#[tonic::async_trait]
impl proto::admin_service_server::AdminService for AdminService {
    async fn add_key(&self, req: Request<proto::AddKeyRequest>) -> Result<Response<proto::AddKeyResponse>, Status> {
        tls::require_role(&req, &[Role::Admin])?;
        let tenant = req.into_inner().tenant;
        if !self.tenants.contains_key(&tenant) {
            let mut known: Vec<&String> = self.tenants.keys().collect();
            known.sort();
            return Err(Status::not_found(format!(
                "tenant {tenant:?} is not declared in the broker config ([[tenant]]); declared: {known:?}"
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.core.send(Cmd::AddKey { tenant, reply: tx }).await.map_err(|_| unavailable())?;
        let (info, key) = rx.await.map_err(|_| unavailable())??;
        tracing::info!(key_id = info.key_id, tenant = info.tenant, "api key added");
        Ok(Response::new(proto::AddKeyResponse { info: Some(info.into()), key }))
    }

    async fn list_keys(
        &self,
        req: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        tls::require_role(&req, &[Role::Admin])?;
        let tenant = req.into_inner().tenant;
        let keys = self.keys.list((!tenant.is_empty()).then_some(tenant.as_str()));
        Ok(Response::new(proto::ListKeysResponse { keys: keys.into_iter().map(Into::into).collect() }))
    }

    async fn revoke_key(&self, req: Request<proto::RevokeKeyRequest>) -> Result<Response<proto::KeyInfo>, Status> {
        tls::require_role(&req, &[Role::Admin])?;
        let key_id = req.into_inner().key_id;
        let (tx, rx) = oneshot::channel();
        self.core.send(Cmd::RevokeKey { key_id, reply: tx }).await.map_err(|_| unavailable())?;
        let info = rx.await.map_err(|_| unavailable())??;
        tracing::info!(key_id = info.key_id, tenant = info.tenant, "api key revoked");
        Ok(Response::new(info.into()))
    }

    async fn create_join_token(
        &self,
        req: Request<proto::CreateJoinTokenRequest>,
    ) -> Result<Response<proto::CreateJoinTokenResponse>, Status> {
        let admin = tls::require_role(&req, &[Role::Admin])?;
        let r = req.into_inner();
        let (tx, rx) = oneshot::channel();
        let cmd = super::tokens::create_command(r, &self.sites, admin.uri(), tx)?;
        self.core.send(Cmd::Token(cmd)).await.map_err(|_| unavailable())?;
        let (view, token) = rx.await.map_err(|_| unavailable())??;
        Ok(Response::new(proto::CreateJoinTokenResponse { info: Some(view.into()), token }))
    }

    async fn list_join_tokens(
        &self,
        req: Request<proto::ListJoinTokensRequest>,
    ) -> Result<Response<proto::ListJoinTokensResponse>, Status> {
        tls::require_role(&req, &[Role::Admin])?;
        let (tx, rx) = oneshot::channel();
        self.core.send(Cmd::Token(TokenCmd::List { reply: tx })).await.map_err(|_| unavailable())?;
        let tokens = rx.await.map_err(|_| unavailable())?;
        Ok(Response::new(proto::ListJoinTokensResponse { tokens: tokens.into_iter().map(Into::into).collect() }))
    }

    async fn revoke_join_token(
        &self,
        req: Request<proto::RevokeJoinTokenRequest>,
    ) -> Result<Response<proto::JoinTokenInfo>, Status> {
        let admin = tls::require_role(&req, &[Role::Admin])?;
        let token_id = req.into_inner().token_id;
        let (tx, rx) = oneshot::channel();
        let cmd = TokenCmd::Revoke { token_id, actor: admin.uri(), reply: tx };
        self.core.send(Cmd::Token(cmd)).await.map_err(|_| unavailable())?;
        Ok(Response::new(rx.await.map_err(|_| unavailable())??.into()))
    }

    async fn revoke_certificates(
        &self,
        req: Request<proto::RevokeCertificatesRequest>,
    ) -> Result<Response<proto::RevocationInfo>, Status> {
        let actor = tls::require_role(&req, &[Role::Admin])?.uri();
        Ok(Response::new(self.revocation()?.revoke(&actor, req.into_inner()).await?))
    }

    async fn list_revocations(
        &self,
        req: Request<proto::ListRevocationsRequest>,
    ) -> Result<Response<proto::ListRevocationsResponse>, Status> {
        tls::require_role(&req, &[Role::Admin])?;
        Ok(Response::new(self.revocation()?.list()))
    }

    async fn remove_agent(
        &self,
        req: Request<proto::RemoveAgentRequest>,
    ) -> Result<Response<proto::AgentInfo>, Status> {
        let who = tls::require_role(&req, &[Role::Admin])?;
        let proto::RemoveAgentRequest { agent_id: agent, force } = req.into_inner();
        let (tx, rx) = oneshot::channel();
        let cmd = Cmd::RemoveAgent { agent, force, actor: who.uri(), reply: tx };
        self.core.send(cmd).await.map_err(|_| unavailable())?;
        let view = rx.await.map_err(|_| unavailable())??;
        Ok(Response::new(view.into()))
    }

    async fn list_admin_events(
        &self,
        req: Request<proto::ListAdminEventsRequest>,
    ) -> Result<Response<proto::ListAdminEventsResponse>, Status> {
        tls::require_role(&req, &[Role::Admin])?;
        let limit = match req.into_inner().limit {
            0 => DEFAULT_ADMIN_EVENTS,
            n => n.min(MAX_ADMIN_EVENTS),
        };
        let reader = self.reader.as_ref().ok_or_else(unavailable)?;
        let events = reader.admin_events(limit).await.map_err(ApiError::from)?;
        let events = events
            .into_iter()
            .map(|e| proto::AdminEvent {
                at_ms: e.at,
                actor: e.actor,
                action: e.action,
                target: e.target,
                detail: e.detail,
            })
            .collect();
        Ok(Response::new(proto::ListAdminEventsResponse { events }))
    }

    async fn list_sites(
        &self,
        req: Request<proto::ListSitesRequest>,
    ) -> Result<Response<proto::ListSitesResponse>, Status> {
        tls::require_role(&req, &[Role::Admin, Role::Gateway])?;
        let wanted = req.into_inner().site;
        let (tx, rx) = oneshot::channel();
        self.core.send(Cmd::Capacity(CapacityCmd::Sites { reply: tx })).await.map_err(|_| unavailable())?;
        let views = rx.await.map_err(|_| unavailable())?;
        if !wanted.is_empty() && !views.iter().any(|v| v.site == wanted) {
            return Err(Status::not_found(format!("site {wanted} has no capacity provider (or does not exist)")));
        }
        let sites = views.into_iter().filter(|v| wanted.is_empty() || v.site == wanted).map(site_info).collect();
        Ok(Response::new(proto::ListSitesResponse { sites }))
    }
}

fn site_info(v: SiteView) -> proto::SiteCapacityInfo {
    proto::SiteCapacityInfo {
        site: v.site,
        provider: v.provider,
        instances: v
            .instances
            .into_iter()
            .map(|i| proto::InstanceInfo {
                launch_id: i.launch_id,
                instance_id: i.instance_id,
                state: i.state,
                instance_type: i.instance_type,
                market: i.market,
                usd_per_hour: i.usd_per_hour,
                age_s: i.age_s,
                idle_s: i.idle_s,
                agent: i.agent,
                reason: i.reason,
            })
            .collect(),
        pending_launches: v.pending_launches,
        spend_usd: v.spend_usd,
        idle_usd: v.idle_usd,
        unavailable: v
            .unavailable
            .into_iter()
            .map(|(instance_type, market, reason, since_ms)| proto::UnavailablePool {
                instance_type,
                market,
                reason,
                since_ms,
            })
            .collect(),
    }
}

fn unavailable() -> Status {
    Status::unavailable("the broker's core is not running")
}
