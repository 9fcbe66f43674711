//! The OpenAPI document's frame (info, bearer security, tags) and the problem responses the
//! routes declare. The paths come from the handlers' `#[utoipa::path]` through utoipa-axum's
//! `OpenApiRouter`, so every served route is in the document.

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi};

use super::api::{JobEvent, Problem};

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
    components(schemas(Problem, JobEvent)),
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

/// The route whose answer is Server-Sent Events of [`JobEvent`]s.
const EVENTS_PATH: &str = "/v1/jobs/{id}/events";

/// Completes the document once the routes are in: the events stream's schema describes each of
/// its events (the fields `id`, `event` and `data`, the `data` a JSON `JobEvent`, or a `Problem`
/// for an `error` event), as OpenAPI before 3.2 (which adds `itemSchema`) describes an event
/// stream and SSE-aware validators (schemathesis) read it.
pub fn finish(openapi: &mut utoipa::openapi::OpenApi) {
    let content = openapi
        .paths
        .paths
        .get_mut(EVENTS_PATH)
        .and_then(|item| item.get.as_mut())
        .and_then(|op| op.responses.responses.get_mut("200"))
        .and_then(|response| match response {
            RefOr::T(response) => response.content.get_mut("text/event-stream"),
            RefOr::Ref(_) => None,
        });
    if let Some(content) = content {
        content.schema = Some(server_sent_event_schema());
    }
}

/// One Server-Sent Event of the events stream.
fn server_sent_event_schema() -> RefOr<Schema> {
    let schema = serde_json::json!({
        "type": "object",
        "description": "One Server-Sent Event: `id` (the event's `seq`), `event` (the job's state, or `error`) \
                        and one `data` line (a `JobEvent` as JSON; for `error`, a `Problem`). Lines \
                        `: keep-alive` come in between.",
        "required": ["event", "data"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "event": {"type": "string"},
            "data": {"type": "string", "contentMediaType": "application/json"}
        }
    });
    let mut schema: Schema = serde_json::from_value(schema).expect("the event schema is a schema");
    // utoipa has no `contentSchema`: it goes in as an extension (serialised in place).
    let content_schema = serde_json::json!({"anyOf": [
        {"$ref": "#/components/schemas/JobEvent"},
        {"$ref": "#/components/schemas/Problem"}
    ]});
    if let Schema::Object(event) = &mut schema
        && let Some(RefOr::T(Schema::Object(data))) = event.properties.get_mut("data")
    {
        data.extensions.get_or_insert_with(Default::default).insert("contentSchema".into(), content_schema);
    }
    RefOr::T(schema)
}

/// The errors of every authenticated route.
#[derive(IntoResponses)]
pub enum TenantErrors {
    /// A request body (on any route) over the gateway's `max_body_bytes`.
    #[response(status = 413, content_type = "application/problem+json")]
    PayloadTooLarge(Problem),
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

/// The tenant is not an admin tenant (agents, sites), or not declared in the broker's config.
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

/// A body that says it is not JSON (`Content-Type` other than `application/json` or `…+json`;
/// none is taken as JSON).
#[derive(IntoResponses)]
#[response(status = 415, content_type = "application/problem+json")]
pub struct UnsupportedMediaType(pub Problem);

/// The errors of the routes without a key (health, readiness, this document): only a body over
/// the gateway's limit. They are not rate limited.
#[derive(IntoResponses)]
#[response(status = 413, content_type = "application/problem+json")]
pub struct ServiceErrors(pub Problem);

/// The idempotency key was used before with a different body.
#[derive(IntoResponses)]
#[response(status = 422, content_type = "application/problem+json")]
pub struct IdempotencyKeyReused(pub Problem);

/// Not ready: the broker cannot be reached.
#[derive(IntoResponses)]
#[response(status = 503, content_type = "application/problem+json")]
pub struct NotReady(pub Problem);
