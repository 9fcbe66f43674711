//! The W3C trace context (`traceparent`, `tracestate`) in and out of its carriers: HTTP headers
//! and gRPC metadata (both `http::HeaderMap`), the job record (a small JSON object) and the
//! assignment (a string map). With telemetry not installed the propagator is a no-op: nothing is
//! injected and every extraction is an empty context.

use std::collections::HashMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The context of `span` as carrier entries (`traceparent`, and `tracestate` when set); empty
/// when the span is not traced.
pub fn carrier_of(span: &tracing::Span) -> HashMap<String, String> {
    carrier_of_context(&span.context())
}

/// Like [`carrier_of`], for an OpenTelemetry context.
pub fn carrier_of_context(cx: &Context) -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    inject(cx, &mut carrier);
    carrier
}

/// Writes `cx` into a carrier when it carries a span.
fn inject(cx: &Context, carrier: &mut dyn Injector) {
    if cx.span().span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(cx, carrier));
    }
}

/// The current span's context for a new job: as JSON to store with it (`None` when not traced)
/// and as the parent of its later spans.
pub fn current_for_job() -> (Option<String>, Context) {
    let cx = tracing::Span::current().context();
    let carrier = carrier_of_context(&cx);
    let json = (!carrier.is_empty()).then(|| serde_json::to_string(&carrier).expect("a string map serialises"));
    (json, cx)
}

/// A context from carrier entries (an empty context when there is none or it is malformed).
pub fn from_carrier(carrier: &HashMap<String, String>) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier))
}

/// A context stored as JSON by [`current_for_job`].
pub fn from_json(json: Option<&str>) -> Context {
    let carrier: HashMap<String, String> = json.and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default();
    from_carrier(&carrier)
}

/// Makes `span` a child of `parent` when `parent` carries a span (call before the span is
/// first entered).
pub fn set_parent(span: &tracing::Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Links `span` to the span in `other`, when there is one (call before the span is first entered).
pub fn add_link(span: &tracing::Span, other: &Context) {
    let sc = other.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The remote context in request headers (`traceparent`, `tracestate`).
pub fn from_headers(headers: &HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderCarrier(headers)))
}

/// Writes `span`'s context into request headers.
pub fn inject_headers(span: &tracing::Span, headers: &mut HeaderMap) {
    inject(&span.context(), &mut HeaderCarrierMut(headers));
}

/// The trace and span ids of the current OpenTelemetry context (the entered span), in hex.
pub fn current_ids() -> Option<(String, String)> {
    let cx = Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// `span` as a W3C `traceresponse` value (`00-<trace id>-<span id>-<flags>`), when traced.
pub fn traceresponse(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// The trace id (32 hex digits) of a context stored by [`current_for_job`].
pub fn trace_id_of_json(json: Option<&str>) -> Option<String> {
    let carrier: HashMap<String, String> = serde_json::from_str(json?).ok()?;
    // Parsed here, not through the propagator: it is a no-op where telemetry is not installed.
    let parent = carrier.get("traceparent")?;
    let mut parts = parent.split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    let valid =
        trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()) && trace_id.bytes().any(|b| b != b'0');
    valid.then(|| trace_id.to_ascii_lowercase())
}

struct HeaderCarrier<'a>(&'a HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderCarrierMut<'a>(&'a mut HeaderMap);

impl Injector for HeaderCarrierMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(key), HeaderValue::try_from(value)) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::trace_id_of_json;

    #[test]
    fn a_stored_context_gives_its_trace_id() {
        let stored = r#"{"traceparent":"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"}"#;
        assert_eq!(trace_id_of_json(Some(stored)).as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
        for bad in [
            "",
            "{}",
            "not json",
            r#"{"traceparent":"00-00000000000000000000000000000000-b7ad6b7169203331-01"}"#,
            r#"{"traceparent":"00-0af7651916cd43dd-b7ad6b7169203331-01"}"#,
            r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319z-b7ad6b7169203331-01"}"#,
        ] {
            assert_eq!(trace_id_of_json(Some(bad)), None, "{bad}");
        }
        assert_eq!(trace_id_of_json(None), None);
    }
}
