//! `/v1/agents`: the fleet's nodes, their inventory and health, for admin tenants only.

use axum::Json;
use axum::extract::{Path, State};

use super::AppState;
use super::api::{Agent, AgentList};
use super::auth::Tenant;
use super::openapi::{Forbidden, NotFound, TenantErrors};
use super::problem::HttpError;
use crate::proto;

/// List the agents (admin tenants only).
#[utoipa::path(
    get,
    path = "/v1/agents",
    operation_id = "list_agents",
    tag = "agents",
    responses((status = 200, description = "Every known agent", body = AgentList), Forbidden, TenantErrors),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<AppState>, tenant: Tenant) -> Result<Json<AgentList>, HttpError> {
    tenant.require_admin()?;
    let agents = state.jobs().list_agents(proto::ListAgentsRequest {}).await?.into_inner().agents;
    Ok(Json(AgentList { agents: agents.into_iter().map(Agent::from).collect() }))
}

/// Get one agent: inventory, GPU health, running jobs (admin tenants only).
#[utoipa::path(
    get,
    path = "/v1/agents/{site}/{node}",
    operation_id = "get_agent",
    tag = "agents",
    params(("site" = String, Path, description = "The agent's site"), ("node" = String, Path, description = "The node")),
    responses((status = 200, description = "The agent", body = Agent), Forbidden, NotFound, TenantErrors),
    security(("bearer" = []))
)]
pub async fn get_agent(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((site, node)): Path<(String, String)>,
) -> Result<Json<Agent>, HttpError> {
    tenant.require_admin()?;
    let request = proto::GetAgentRequest { agent_id: format!("{site}/{node}") };
    Ok(Json(state.jobs().get_agent(request).await?.into_inner().into()))
}

/// Drain an agent: it takes no new work and its running jobs finish (admin tenants only).
#[utoipa::path(
    post,
    path = "/v1/agents/{site}/{node}/drain",
    operation_id = "drain_agent",
    tag = "agents",
    params(("site" = String, Path, description = "The agent's site"), ("node" = String, Path, description = "The node")),
    responses((status = 200, description = "The agent, draining", body = Agent), Forbidden, NotFound, TenantErrors),
    security(("bearer" = []))
)]
pub async fn drain(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((site, node)): Path<(String, String)>,
) -> Result<Json<Agent>, HttpError> {
    tenant.require_admin()?;
    let request = proto::DrainAgentRequest { agent_id: format!("{site}/{node}"), tenant: tenant.name.clone() };
    Ok(Json(state.jobs().drain_agent(request).await?.into_inner().into()))
}

/// Undrain an agent: it takes new work again (admin tenants only).
#[utoipa::path(
    post,
    path = "/v1/agents/{site}/{node}/undrain",
    operation_id = "undrain_agent",
    tag = "agents",
    params(("site" = String, Path, description = "The agent's site"), ("node" = String, Path, description = "The node")),
    responses((status = 200, description = "The agent, taking work", body = Agent), Forbidden, NotFound, TenantErrors),
    security(("bearer" = []))
)]
pub async fn undrain(
    State(state): State<AppState>,
    tenant: Tenant,
    Path((site, node)): Path<(String, String)>,
) -> Result<Json<Agent>, HttpError> {
    tenant.require_admin()?;
    let request = proto::DrainAgentRequest { agent_id: format!("{site}/{node}"), tenant: tenant.name.clone() };
    Ok(Json(state.jobs().undrain_agent(request).await?.into_inner().into()))
}
