//! The core's spans. A job's placement and dispatch happen long after its submission, in the
//! core task; their spans take the submission's trace context stored with the job as parent, so
//! they join the job's one trace. The dispatch span's context travels with the assignment and the
//! agent's attempt span continues it; the attempt's end, as the broker records it, is a span
//! beside the agent's.

use std::collections::HashMap;
use std::sync::LazyLock;

use opentelemetry::global::BoxedTracer;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::active_job::ActiveJob;
use crate::model::state::JobState;
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
        hybroker.job.id = %job.sub.id,
        hybroker.job.name = %job.sub.name,
        hybroker.tenant = %job.sub.tenant,
        hybroker.placement.site = tracing::field::Empty,
        hybroker.placement.candidates = tracing::field::Empty,
        hybroker.placement.rejections = tracing::field::Empty,
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
    span.record("hybroker.placement.candidates", decision.candidates.len() as i64);
    span.record("hybroker.placement.rejections", rejected.len() as i64);
    span.set_attribute("hybroker.placement.snapshot_id", decision.snapshot_id.clone());
    span.set_attribute("hybroker.placement.price_age_seconds", decision.snapshot_age_ms as f64 / 1000.0);
    span.set_attribute("hybroker.placement.prices_stale", decision.stale);
    if let Some(residency) = &decision.residency {
        span.set_attribute("hybroker.placement.residency", residency.clone());
    }
    match &decision.chosen {
        Some(chosen) => {
            let cost = &chosen.offer.cost;
            span.record("hybroker.placement.site", chosen.site.as_str());
            span.set_attribute("hybroker.placement.cost.total_usd", cost.total_usd);
            span.set_attribute("hybroker.placement.cost.compute_usd", cost.compute_usd);
            span.set_attribute("hybroker.placement.cost.egress_usd", cost.egress_usd);
            span.set_attribute("hybroker.placement.cost.storage_usd", cost.storage_usd);
            span.set_attribute("hybroker.placement.usd_per_hour", cost.usd_per_hour);
            if let Some(t) = &chosen.offer.instance_type {
                span.set_attribute("hybroker.placement.instance_type", t.clone());
            }
        }
        None => span.set_attribute("hybroker.placement.outcome", "no site can take it now"),
    }
    for (site, why) in rejected.iter().take(MAX_REJECTION_EVENTS) {
        span.add_event(
            "candidate rejected",
            vec![
                KeyValue::new("hybroker.placement.candidate", site.to_string()),
                KeyValue::new("hybroker.placement.reason", why.to_string()),
            ],
        );
    }
    if rejected.len() > MAX_REJECTION_EVENTS {
        span.set_attribute(
            "hybroker.placement.rejection_events_dropped",
            (rejected.len() - MAX_REJECTION_EVENTS) as i64,
        );
    }
}

/// The dispatch of the job's current attempt to `agent`, as a span in the job's trace; returns
/// its context (for the assignment as carrier entries, empty for a job without a trace, and as the
/// parent of the attempt's end).
pub(super) fn dispatch(job: &ActiveJob, agent: &str, site: &str) -> (HashMap<String, String>, Context) {
    let attributes = || {
        vec![
            KeyValue::new("hybroker.job.id", job.sub.id.clone()),
            KeyValue::new("hybroker.job.attempt", i64::from(job.life.attempts)),
            KeyValue::new("hybroker.agent", agent.to_string()),
            KeyValue::new("hybroker.site", site.to_string()),
        ]
    };
    let cx = instant(&job.trace, "job.dispatch", SpanKind::Producer, attributes);
    (context::carrier_of_context(&cx), cx)
}

/// The end of the job's current attempt as the broker records it, under its dispatch: the
/// outcome, exit code and reason, and what it cost (engine placement).
pub(super) fn attempt_ended(
    job: &ActiveJob,
    state: JobState,
    exit_code: Option<i32>,
    reason: &str,
    cost_usd: Option<f64>,
) {
    let attributes = || {
        let mut attributes = vec![
            KeyValue::new("hybroker.job.id", job.sub.id.clone()),
            KeyValue::new("hybroker.job.attempt", i64::from(job.life.attempts)),
            KeyValue::new("hybroker.outcome", state.as_str()),
            KeyValue::new("hybroker.reason", reason.to_string()),
        ];
        attributes.extend(exit_code.map(|c| KeyValue::new("process.exit.code", i64::from(c))));
        attributes.extend(cost_usd.map(|c| KeyValue::new("hybroker.cost_usd", c)));
        attributes
    };
    let parent = if job.dispatched.span().span_context().is_valid() { &job.dispatched } else { &job.trace };
    instant(parent, "job.attempt.end", SpanKind::Internal, attributes);
}

/// A span that starts and ends now, under `parent`, built with the OpenTelemetry API directly:
/// these are on the core's hot path and need none of `tracing`'s machinery. Nothing (an empty
/// context) for a job without a trace, whose attributes are then never built.
fn instant(
    parent: &Context,
    name: &'static str,
    kind: SpanKind,
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> Context {
    if !parent.span().span_context().is_valid() {
        return Context::new();
    }
    let tracer = &*TRACER;
    let span =
        tracer.span_builder(name).with_kind(kind).with_attributes(attributes()).start_with_context(tracer, parent);
    let cx = parent.with_span(span);
    cx.span().end();
    cx
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::prelude::*;

    use super::{MAX_REJECTION_EVENTS, record_decision};
    use crate::placement::engine::{Candidate, Decision, Rejection, RejectionKind, Verdict};

    /// Keeps every exported span.
    #[derive(Debug, Clone, Default)]
    struct Kept(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Kept {
        fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
            self.0.lock().unwrap().extend(batch);
            async { Ok(()) }
        }
    }

    #[test]
    fn rejections_become_a_bounded_number_of_events() {
        let kept = Kept::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(kept.clone()).build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let candidates = (0..20)
            .map(|i| Candidate {
                site: format!("site-{i}"),
                output_locations: vec![],
                verdict: Verdict::Rejected(Rejection::new(
                    RejectionKind::Capacity,
                    format!("gpu: no H100 at site-{i}"),
                )),
            })
            .collect();
        let decision = Decision {
            chosen: None,
            candidates,
            residency: None,
            snapshot_id: "prices-1".into(),
            snapshot_age_ms: 90_000,
            stale: false,
        };
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "job.place",
                hybroker.placement.site = tracing::field::Empty,
                hybroker.placement.candidates = tracing::field::Empty,
                hybroker.placement.rejections = tracing::field::Empty,
            );
            record_decision(&span, &decision);
        });
        let spans = kept.0.lock().unwrap();
        assert_eq!(spans.len(), 1);
        let span = &spans[0];
        let attribute =
            |key: &str| span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string());
        assert_eq!(span.events.len(), MAX_REJECTION_EVENTS);
        assert_eq!(span.events[0].name, "candidate rejected");
        // Counts are numbers in the trace, not strings (numeric TraceQL queries match them).
        let value = |key: &str| span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.clone());
        assert_eq!(value("hybroker.placement.rejections"), Some(opentelemetry::Value::I64(20)));
        assert_eq!(value("hybroker.placement.candidates"), Some(opentelemetry::Value::I64(20)));
        assert_eq!(attribute("hybroker.placement.rejection_events_dropped").as_deref(), Some("4"));
        assert_eq!(attribute("hybroker.placement.price_age_seconds").as_deref(), Some("90"));
        assert_eq!(attribute("hybroker.placement.outcome").as_deref(), Some("no site can take it now"));
        assert_eq!(attribute("hybroker.placement.site"), None);
    }
}
