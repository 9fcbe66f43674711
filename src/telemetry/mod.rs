//! Logs and traces. Logs: `tracing` to stderr (stdout is for what the user asked to see), text or
//! one JSON object per line; `RUST_LOG` filters them. Traces: the services' spans (target
//! `hybroker`, info and up, whatever `RUST_LOG` says) become OpenTelemetry spans, exported over
//! OTLP/gRPC when an endpoint is configured (`[telemetry] otlp_endpoint` or the standard
//! `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`). Without one, spans still get trace ids, so the
//! W3C trace context still crosses every hop and log lines still carry `trace_id`/`span_id` (at
//! the same per-job cost); `OTEL_SDK_DISABLED=true` turns spans off altogether.
//!
//! - [`context`]: W3C `traceparent`/`tracestate` in and out of HTTP headers, gRPC metadata, the
//!   job record (JSON) and a workload's environment.
//! - [`grpc`]: client and server spans around every gRPC call (OTel RPC conventions).
//! - `format`: the log line formats (text, JSON).
//! - [`notify`]: systemd readiness, reload and stop notifications (`NOTIFY_SOCKET`).

pub mod context;
mod format;
pub mod grpc;
pub mod notify;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::Deserialize;
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets, filter_fn};
use tracing_subscriber::prelude::*;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`, `span`, `spans`, and
    /// `trace_id`/`span_id` inside a traced span.
    Json,
}

/// `[telemetry]`: where traces go. The standard `OTEL_*` variables win over this section
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
/// `OTEL_TRACES_SAMPLER`/`_ARG`, `OTEL_BSP_*`, `OTEL_SDK_DISABLED`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// The OTLP/gRPC endpoint (an OpenTelemetry Collector), e.g. `http://127.0.0.1:4317`. None:
    /// no export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The CA that signed an `https` endpoint's certificate (PEM).
    #[serde(default)]
    pub otlp_ca_cert: Option<PathBuf>,
    /// The share of new traces kept (0 to 1); a trace that arrives with a parent keeps the
    /// parent's decision.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
}

fn default_sample_ratio() -> f64 {
    1.0
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self { otlp_endpoint: None, otlp_ca_cert: None, sample_ratio: default_sample_ratio() }
    }
}

impl TelemetrySection {
    /// Adds the section's problems to a config's list.
    pub fn check(&self, problems: &mut Vec<String>) {
        if let Some(endpoint) = &self.otlp_endpoint {
            match endpoint.parse::<axum::http::Uri>() {
                Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {
                    if uri.scheme_str() == Some("https") && self.otlp_ca_cert.is_none() {
                        problems.push(format!(
                            "telemetry.otlp_endpoint {endpoint:?} is https: give telemetry.otlp_ca_cert (the CA of \
                             the collector's certificate)"
                        ));
                    }
                }
                _ => problems.push(format!(
                    "telemetry.otlp_endpoint {endpoint:?} must be an http:// or https:// URL with a host, \
                     e.g. http://127.0.0.1:4317"
                )),
            }
        }
        if let Some(ca) = self.otlp_ca_cert.as_ref().filter(|p| !p.is_file()) {
            problems.push(format!("telemetry.otlp_ca_cert: {} does not exist", ca.display()));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            problems.push(format!("telemetry.sample_ratio {} must be between 0 and 1", self.sample_ratio));
        }
    }
}

/// What the gateway does with a client's `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTraces {
    /// Continue the client's trace: the job joins it (and the client's sampling decision holds).
    #[default]
    Continue,
    /// Start a new trace that links to the client's: tenants cannot force sampling or put many
    /// jobs into one trace.
    Link,
}

/// A service whose spans are traced.
pub struct Service<'a> {
    /// `broker`, `gateway`, `agent` or `quickstart`: the service name is `hybroker-<role>`.
    pub role: &'static str,
    pub section: &'a TelemetrySection,
    /// The site (agents), as the resource attribute `hybroker.site`.
    pub site: Option<String>,
    /// This instance's identity (its certificate's SPIFFE id), as `service.instance.id`.
    pub instance: Option<String>,
}

/// The installed tracing; [`Telemetry::shutdown`] sends what is still buffered.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the exporter (off the async workers: the export blocks).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// The default log filter: ours at info, chatty dependencies quieter.
pub const DEFAULT_FILTER: &str = "info,h2=warn,tower=warn,hyper=warn,sqlx=warn,rustls_platform_verifier=off";

/// Installs the process-wide subscriber: logs, and for a service its spans as OpenTelemetry
/// spans. Call once, inside the tokio runtime (the exporter's channel lives there).
pub fn init(format: LogFormat, service: Option<Service<'_>>) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .fmt_fields(format::TextFields)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(format::JsonLines)
            .with_filter(filter)
            .boxed(),
    };
    // `OTEL_SDK_DISABLED=true`: no spans at all (no export, no context passed on, no per-job cost).
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let Some(service) = service.filter(|_| !disabled) else {
        let _ = tracing_subscriber::registry().with(logs).try_init();
        return Ok(Telemetry::default());
    };
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let exporter = exporter(service.section)?;
    let mut builder = SdkTracerProvider::builder().with_resource(resource(&service));
    if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
        let ratio = Sampler::TraceIdRatioBased(service.section.sample_ratio);
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(ratio)));
    }
    let exporting = exporter.is_some();
    if let Some(exporter) = exporter {
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    // The core's hot-path spans use the OpenTelemetry API directly, through the global provider.
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("hybroker");
    // Only our own spans become trace spans, whatever RUST_LOG says about logs. Log lines are not
    // copied into spans as events: the bridge would turn their unsigned numbers into strings, and
    // each line already carries its trace and span id. A span's own events (a placement's rejected
    // candidates) are added through the OpenTelemetry API with typed values.
    let ours = Targets::new().with_target("hybroker", LevelFilter::INFO).and(filter_fn(|meta| meta.is_span()));
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_filter(ours);
    let _ = tracing_subscriber::registry().with(logs).with(spans).try_init();
    if exporting {
        tracing::info!(service = service_name(service.role), "exporting traces over OTLP/gRPC");
    }
    Ok(Telemetry { provider: exporting.then_some(provider) })
}

/// The OTLP exporter, when an endpoint is configured.
fn exporter(section: &TelemetrySection) -> anyhow::Result<Option<opentelemetry_otlp::SpanExporter>> {
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    let from_env = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()));
    if !from_env && section.otlp_endpoint.is_none() {
        return Ok(None);
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_timeout(Duration::from_secs(10));
    if let (false, Some(endpoint)) = (from_env, &section.otlp_endpoint) {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(ca) = &section.otlp_ca_cert {
        let pem = std::fs::read(ca).with_context(|| format!("telemetry.otlp_ca_cert {}", ca.display()))?;
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
        builder = builder.with_tls_config(tls);
    }
    Ok(Some(builder.build().context("the OTLP trace exporter")?))
}

fn service_name(role: &str) -> String {
    format!("hybroker-{role}")
}

/// `service.name` per role (unless `OTEL_SERVICE_NAME` says otherwise), version, host, site and
/// instance; `OTEL_RESOURCE_ATTRIBUTES` adds to them.
fn resource(service: &Service<'_>) -> Resource {
    let mut builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name(service_name(service.role));
    }
    let mut attributes = vec![
        KeyValue::new("service.namespace", "hybroker"),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    ];
    if let Ok(host) = nix::unistd::gethostname() {
        attributes.push(KeyValue::new("host.name", host.to_string_lossy().into_owned()));
    }
    if let Some(site) = &service.site {
        attributes.push(KeyValue::new("hybroker.site", site.clone()));
    }
    if let Some(instance) = &service.instance {
        attributes.push(KeyValue::new("service.instance.id", instance.clone()));
    }
    builder.with_attributes(attributes).build()
}

#[cfg(test)]
mod tests {
    use super::TelemetrySection;

    fn problems(toml: &str) -> Vec<String> {
        let section: TelemetrySection = toml::from_str(toml).unwrap();
        let mut problems = Vec::new();
        section.check(&mut problems);
        problems
    }

    #[test]
    fn the_section_names_every_problem() {
        assert!(problems("otlp_endpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 0.25").is_empty());
        assert!(problems("").is_empty());
        let found = problems("otlp_endpoint = \"collector:4317\"\nsample_ratio = 1.5");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("must be an http:// or https:// URL"), "{found:?}");
        assert!(found[1].contains("between 0 and 1"), "{found:?}");
        let found = problems("otlp_endpoint = \"https://collector:4317\"");
        assert!(found[0].contains("give telemetry.otlp_ca_cert"), "{found:?}");
        let found = problems("otlp_endpoint = \"https://c:4317\"\notlp_ca_cert = \"/nonexistent/ca.pem\"");
        assert!(found[0].contains("/nonexistent/ca.pem does not exist"), "{found:?}");
        assert!(toml::from_str::<TelemetrySection>("endpoint = \"x\"").is_err(), "unknown keys are refused");
    }
}
