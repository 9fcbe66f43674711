//! `/v1/sites`: the elastic sites' cloud capacity (instances, pending launches, spend, pools left
//! out of placement), for admin tenants only, from the broker's admin service (`ListSites`).

use axum::Json;
use axum::extract::{Path, State};

use super::AppState;
use super::api::{SiteCapacity, SiteList};
use super::auth::Tenant;
use super::openapi::{Forbidden, NotFound, TenantErrors};
use super::problem::HttpError;
use crate::proto;

/// List the sites with a capacity provider (admin tenants only).
#[utoipa::path(
    get,
    path = "/v1/sites",
    operation_id = "list_sites",
    tag = "sites",
    responses((status = 200, description = "Every site with a capacity provider", body = SiteList), Forbidden, TenantErrors),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<AppState>, tenant: Tenant) -> Result<Json<SiteList>, HttpError> {
    tenant.require_admin()?;
    let sites = state.admin().list_sites(proto::ListSitesRequest { site: String::new() }).await?.into_inner().sites;
    Ok(Json(SiteList { sites: sites.into_iter().map(SiteCapacity::from).collect() }))
}

/// Get one site's capacity: each instance and the unavailable pools (admin tenants only); 404 for
/// a site without a capacity provider.
#[utoipa::path(
    get,
    path = "/v1/sites/{site}",
    operation_id = "get_site",
    tag = "sites",
    params(("site" = String, Path, description = "The site's name")),
    responses((status = 200, description = "The site's capacity", body = SiteCapacity), Forbidden, NotFound, TenantErrors),
    security(("bearer" = []))
)]
pub async fn get_site(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(site): Path<String>,
) -> Result<Json<SiteCapacity>, HttpError> {
    tenant.require_admin()?;
    let sites = state.admin().list_sites(proto::ListSitesRequest { site: site.clone() }).await?.into_inner().sites;
    let found = sites.into_iter().find(|s| s.site == site);
    let found = found.ok_or_else(|| HttpError::NotFound(format!("site {site} has no capacity provider")))?;
    Ok(Json(found.into()))
}
