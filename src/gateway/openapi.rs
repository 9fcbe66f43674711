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
    /// A limit was reached: the tenant's request rate, its unfinished jobs, its open event streams
    /// and followed logs (`max_streams_per_tenant`; close one first), or the requests without an
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::{AppState, router};

    /// The served document (the router of a gateway whose broker is never reached).
    fn document() -> Value {
        let broker = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let (_tx, stopping) = tokio::sync::watch::channel(false);
        let traced = crate::telemetry::grpc::traced(broker, "https://127.0.0.1:1");
        let (_, doc) = router(AppState::new(traced, 1024, Default::default(), stopping));
        serde_json::to_value(doc).unwrap()
    }

    fn schema_ref(name: &str) -> Value {
        json!({"$ref": format!("#/components/schemas/{name}")})
    }

    /// Every object schema that says nothing about its fields, with where it is.
    fn untyped_objects(value: &Value, at: &str, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                let is_object = map.get("type") == Some(&json!("object"));
                let described = ["properties", "additionalProperties", "allOf", "oneOf", "anyOf", "$ref"]
                    .iter()
                    .any(|k| map.contains_key(*k));
                if is_object && !described {
                    out.push(at.to_string());
                }
                map.iter().for_each(|(k, v)| untyped_objects(v, &format!("{at}/{k}"), out));
            }
            Value::Array(items) => {
                items.iter().enumerate().for_each(|(i, v)| untyped_objects(v, &format!("{at}/{i}"), out))
            }
            _ => {}
        }
    }

    #[tokio::test]
    async fn specs_decisions_and_prices_are_typed() {
        let doc = document();
        let paths = &doc["paths"];
        for path in ["/v1/jobs", "/v1/plan"] {
            let content = &paths[path]["post"]["requestBody"]["content"];
            assert_eq!(content["application/json"]["schema"], schema_ref("JobSpec"), "{path}");
            assert_eq!(content["application/yaml"]["schema"], schema_ref("JobSpec"), "{path}");
        }
        let ok = |path: &str, method: &str| {
            paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"].clone()
        };
        assert_eq!(ok("/v1/plan", "post"), schema_ref("Decision"));
        assert_eq!(ok("/v1/jobs/{id}/placement", "get"), schema_ref("Decision"));
        assert_eq!(ok("/v1/prices", "get"), schema_ref("Prices"));
        let schemas = &doc["components"]["schemas"];
        assert_eq!(schemas["Job"]["properties"]["spec"]["$ref"], schema_ref("JobSpec")["$ref"]);
        assert_eq!(schemas["JobSpec"]["additionalProperties"], false);
        assert_eq!(schemas["JobState"]["enum"].as_array().unwrap().len(), 7);
        // Only the document itself is a free-form object.
        let mut untyped = Vec::new();
        untyped_objects(&doc, "", &mut untyped);
        assert_eq!(untyped, ["/paths//openapi.json/get/responses/200/content/application/json/schema"]);
    }

    #[tokio::test]
    async fn every_route_documents_the_errors_it_can_answer() {
        let doc = document();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = &op["responses"];
                let problem = |code: &str| responses[code]["content"]["application/problem+json"]["schema"].clone();
                assert_eq!(problem("413"), schema_ref("Problem"), "{method} {path}: 413");
                if op.get("security").is_none() {
                    continue;
                }
                for code in ["401", "429", "503"] {
                    assert_eq!(problem(code), schema_ref("Problem"), "{method} {path}: {code}");
                }
                assert!(responses["429"]["headers"]["Retry-After"].is_object(), "{method} {path}");
                assert!(responses["401"]["headers"]["WWW-Authenticate"].is_object(), "{method} {path}");
            }
        }
    }

    #[tokio::test]
    async fn the_events_stream_is_described_as_server_sent_events_of_job_events() {
        let doc = document();
        let content = &doc["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"];
        assert_eq!(content.as_object().unwrap().len(), 1, "{content}");
        let event = &content["text/event-stream"]["schema"];
        assert_eq!(event["type"], "object");
        let data = &event["properties"]["data"];
        assert_eq!((&data["type"], &data["contentMediaType"]), (&json!("string"), &json!("application/json")));
        assert_eq!(data["contentSchema"]["anyOf"][0], schema_ref("JobEvent"));
        assert!(doc["components"]["schemas"]["JobEvent"].is_object());
        let last_event_id = &doc["paths"]["/v1/jobs/{id}/events"]["get"]["parameters"][1];
        assert_eq!(
            (&last_event_id["name"], &last_event_id["schema"]["type"]),
            (&json!("Last-Event-ID"), &json!("integer"))
        );
    }
}
