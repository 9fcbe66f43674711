//! The log line formats. Text: tracing's usual lines, without the span fields that only serve
//! the OpenTelemetry conventions (`otel.kind`, `rpc.*`, `http.*`, `url.*`), which would repeat the
//! span's name on every line. JSON: one object per line: `timestamp` (RFC 3339, UTC), `level`, `target`, `fields` (the
//! event's, `message` among them), `span` (the innermost span's name and fields), `spans` (all of
//! them, outermost first) and, inside a traced span, `trace_id` and `span_id` (hex, as in
//! Tempo), so a log line leads to its trace.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Text fields: `name=value` separated by spaces, the message bare, convention-only span fields
/// left out.
pub struct TextFields;

/// Span fields that are for trace backends only (`otel.name` stays: it says which call or route).
fn for_traces_only(name: &str) -> bool {
    ["rpc.", "http.", "url.", "network.", "user_agent.", "server."].iter().any(|p| name.starts_with(p))
        || ["otel.kind", "otel.status_code", "error.type"].contains(&name)
}

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor { writer: &mut writer, first: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }

    /// Fields recorded later on a span: appended only when something is left to show.
    fn add_fields(&self, current: &mut FormattedFields<Self>, fields: &tracing::span::Record<'_>) -> fmt::Result {
        let mut more = String::new();
        self.format_fields(Writer::new(&mut more), fields)?;
        if !more.is_empty() {
            if !current.fields.is_empty() {
                current.fields.push(' ');
            }
            current.fields.push_str(&more);
        }
        Ok(())
    }
}

struct TextVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for TextVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() || for_traces_only(field.name()) {
            return;
        }
        let space = if self.first { "" } else { " " };
        self.first = false;
        self.result = match field.name() {
            "message" => write!(self.writer, "{space}{value:?}"),
            name => write!(self.writer, "{space}{name}={value:?}"),
        };
    }
}

/// The JSON line format (spans' fields must be recorded with [`JsonFields`]).
pub struct JsonLines;

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string().into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some((trace_id, span_id)) = super::context::current_ids() {
            line.insert("trace_id".into(), trace_id.into());
            line.insert("span_id".into(), span_id.into());
        }
        let mut fields = Map::new();
        event.record(&mut JsonVisitor(&mut fields));
        line.insert("fields".into(), Value::Object(fields));
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| {
                    let mut entry = match span.extensions().get::<FormattedFields<JsonFields>>() {
                        Some(f) if !f.is_empty() => serde_json::from_str::<Map<String, Value>>(f).unwrap_or_default(),
                        _ => Map::new(),
                    };
                    entry.insert("name".into(), span.name().into());
                    Value::Object(entry)
                })
                .collect();
            if let Some(last) = spans.last() {
                line.insert("span".into(), last.clone());
            }
            line.insert("spans".into(), Value::Array(spans));
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Collects an event's fields as JSON values.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::{JsonLines, TextFields};

    /// Log lines written into memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log_in_a_span() {
        let span = tracing::info_span!(
            "grpc",
            otel.name = "hybroker.v1.JobService/Submit",
            otel.kind = "server",
            rpc.system = "grpc",
            job.id = "j1",
            http.route = tracing::field::Empty,
        );
        span.record("http.route", "/v1/jobs");
        let _entered = span.enter();
        tracing::info!(tenant = "acme", "job submitted");
    }

    #[test]
    fn text_lines_leave_out_convention_only_span_fields() {
        let lines = Lines::default();
        let out = lines.clone();
        let subscriber =
            tracing_subscriber::fmt().with_writer(move || out.clone()).with_ansi(false).fmt_fields(TextFields).finish();
        tracing::subscriber::with_default(subscriber, log_in_a_span);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("grpc{otel.name=\"hybroker.v1.JobService/Submit\" job.id=\"j1\"}:"), "{text}");
        assert!(text.ends_with("job submitted tenant=\"acme\"\n"), "{text}");
        for hidden in ["otel.kind", "rpc.system", "http.route"] {
            assert!(!text.contains(hidden), "{hidden} in {text}");
        }
    }

    #[test]
    fn json_lines_carry_the_event_and_its_spans() {
        let lines = Lines::default();
        let out = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, log_in_a_span);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["fields"]["message"], "job submitted");
        assert_eq!(line["fields"]["tenant"], "acme");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["span"]["name"], "grpc");
        assert_eq!(line["span"]["job.id"], "j1");
        assert_eq!(line["span"]["http.route"], "/v1/jobs");
        assert_eq!(line["spans"].as_array().map(Vec::len), Some(1));
        // No OpenTelemetry layer here, so no ids.
        assert!(line.get("trace_id").is_none(), "{line}");
    }
}
