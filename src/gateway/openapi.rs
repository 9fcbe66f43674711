//! The OpenAPI document's frame (info, bearer security, tags) and the problem responses the
//! routes declare. The paths come from the handlers' `#[utoipa::path]` through utoipa-axum's
//! `OpenApiRouter`, so every served route is in the document.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi};

use super::api::Problem;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hybroker gateway",
        description = "The tenants' HTTP API of hybroker: submit and follow GPU jobs, and (for admin \
                       tenants) see and drain agents and see the elastic sites' cloud capacity. \
                       Authenticate with `Authorization: Bearer <api key>`. \
                       Every error is an RFC 9457 problem (`application/problem+json`).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&BearerAuth),
    components(schemas(Problem)),
    tags(
        (name = "jobs", description = "The tenant's jobs"),
        (name = "data", description = "Tenants' data in and out: job outputs, objects under the tenant's storage prefixes"),
        (name = "agents", description = "GPU nodes (admin tenants)"),
        (name = "sites", description = "Elastic sites' cloud capacity: instances, launches, spend (admin tenants)"),
        (name = "service", description = "Health and this document"),
    )
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the routes name.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = Http::builder().scheme(HttpAuthScheme::Bearer).description(Some("A tenant's API key")).build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The errors of every authenticated route.
#[derive(IntoResponses)]
pub enum TenantErrors {
    /// No API key, or an unknown or revoked one.
    #[response(
        status = 401,
        content_type = "application/problem+json",
        headers(("WWW-Authenticate" = String, description = "Bearer"))
    )]
    Unauthorized(Problem),
    /// A limit was reached: the tenant's request rate, its unfinished jobs, its open event streams,
    /// followed logs and streamed downloads and uploads (`max_streams_per_tenant`; close one first), or the requests without an
    /// accepted API key from the client's address (answered before the key is checked, so while
    /// an address is over it every request from it gets 429).
    #[response(
        status = 429,
        content_type = "application/problem+json",
        headers((
            "Retry-After" = u64,
            description = "Whole seconds to wait before retrying (not sent for open streams: closing one frees room)"
        ))
    )]
    TooManyRequests(Problem),
    /// The broker cannot be reached.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// A malformed request; the detail names the field, header or parameter.
#[derive(IntoResponses)]
#[response(status = 400, content_type = "application/problem+json")]
pub struct BadRequest(pub Problem);

/// The tenant is not an admin tenant.
#[derive(IntoResponses)]
#[response(status = 403, content_type = "application/problem+json")]
pub struct Forbidden(pub Problem);

/// No such object for this tenant (another tenant's objects are not found too).
#[derive(IntoResponses)]
#[response(status = 404, content_type = "application/problem+json")]
pub struct NotFound(pub Problem);

/// The job is in a state that does not allow this.
#[derive(IntoResponses)]
#[response(status = 409, content_type = "application/problem+json")]
pub struct Conflict(pub Problem);

/// The request body is over the gateway's limit.
#[derive(IntoResponses)]
#[response(status = 413, content_type = "application/problem+json")]
pub struct PayloadTooLarge(pub Problem);

/// The idempotency key was used before with a different body.
#[derive(IntoResponses)]
#[response(status = 422, content_type = "application/problem+json")]
pub struct IdempotencyKeyReused(pub Problem);

/// Not ready: the broker cannot be reached.
#[derive(IntoResponses)]
#[response(status = 503, content_type = "application/problem+json")]
pub struct NotReady(pub Problem);
