//! The core's spans. A job's placement and dispatch happen long after its submission, in the
//! core task; their spans take the submission's trace context stored with the job as parent, so
//! they join the job's one trace. The dispatch span's context travels with the assignment and the
//! agent's attempt span continues it.

use std::collections::HashMap;
use std::sync::LazyLock;

use opentelemetry::global::BoxedTracer;

use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::ActiveJob;
use crate::placement::engine::{Decision, Verdict};
use crate::telemetry::context;

/// The global provider's tracer (installed by `telemetry::init` before the core starts; a no-op
/// without it).
static TRACER: LazyLock<BoxedTracer> = LazyLock::new(|| opentelemetry::global::tracer("hybroker"));

/// At most this many rejected candidates become span events; the rest are counted.
pub(super) const MAX_REJECTION_EVENTS: usize = 16;

/// The span of one placement decision for `job`, in the job's trace.
pub(super) fn place_span(job: &ActiveJob) -> Span {
    let span = tracing::info_span!(
        "job.place",
        job.id = %job.rec.id,
        job.name = %job.rec.name,
        tenant = %job.rec.tenant,
        placement.site = tracing::field::Empty,
        placement.candidates = tracing::field::Empty,
        placement.rejections = tracing::field::Empty,
    );
    context::set_parent(&span, job.trace.clone());
    span
}

/// Records a decision on its span: the chosen site and estimated cost with its parts, how many
/// candidates and rejections, the prices' age, and an event per rejected candidate (bounded).
pub(super) fn record_decision(span: &Span, decision: &Decision) {
    let rejected: Vec<(&str, &str)> = decision
        .candidates
        .iter()
        .filter_map(|c| match &c.verdict {
            Verdict::Rejected(why) => Some((c.site.as_str(), why.as_str())),
            Verdict::Feasible(_) => None,
        })
        .collect();
    span.record("placement.candidates", decision.candidates.len() as u64);
    span.record("placement.rejections", rejected.len() as u64);
    span.set_attribute("placement.snapshot_id", decision.snapshot_id.clone());
    span.set_attribute("placement.price_age_seconds", decision.snapshot_age_ms as f64 / 1000.0);
    span.set_attribute("placement.prices_stale", decision.stale);
    if let Some(residency) = &decision.residency {
        span.set_attribute("placement.residency", residency.clone());
    }
    match &decision.chosen {
        Some(chosen) => {
            let cost = &chosen.offer.cost;
            span.record("placement.site", chosen.site.as_str());
            span.set_attribute("placement.cost.total_usd", cost.total_usd);
            span.set_attribute("placement.cost.compute_usd", cost.compute_usd);
            span.set_attribute("placement.cost.egress_usd", cost.egress_usd);
            span.set_attribute("placement.cost.storage_usd", cost.storage_usd);
            span.set_attribute("placement.usd_per_hour", cost.usd_per_hour);
            if let Some(t) = &chosen.offer.instance_type {
                span.set_attribute("placement.instance_type", t.clone());
            }
        }
        None => span.set_attribute("placement.outcome", "no site can take it now"),
    }
    for (site, why) in rejected.iter().take(MAX_REJECTION_EVENTS) {
        span.add_event(
            "candidate rejected",
            vec![
                KeyValue::new("placement.candidate", site.to_string()),
                KeyValue::new("placement.reason", why.to_string()),
            ],
        );
    }
    if rejected.len() > MAX_REJECTION_EVENTS {
        span.set_attribute("placement.rejection_events_dropped", (rejected.len() - MAX_REJECTION_EVENTS) as i64);
    }
}

/// The dispatch of the job's current attempt to `agent`, as a span in the job's trace; returns
/// its context for the assignment (empty for a job without a trace). Built with the OpenTelemetry
/// API directly: it is on the core's hot path, and an instant span needs none of `tracing`'s
/// machinery.
pub(super) fn dispatch(job: &ActiveJob, agent: &str, site: &str) -> HashMap<String, String> {
    let parent = &job.trace;
    if !parent.span().span_context().is_valid() {
        return HashMap::new();
    }
    let tracer = &*TRACER;
    let span = tracer
        .span_builder("job.dispatch")
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("job.id", job.rec.id.clone()),
            KeyValue::new("job.attempt", i64::from(job.life.attempts)),
            KeyValue::new("hybroker.agent", agent.to_string()),
            KeyValue::new("hybroker.site", site.to_string()),
        ])
        .start_with_context(tracer, parent);
    let cx = parent.with_span(span);
    let carrier = context::carrier_of_context(&cx);
    cx.span().end();
    carrier
}
