//! One trace per job across the three services: an in-process OTLP/gRPC trace receiver collects
//! the spans that the gateway, the broker and the agent (separate processes) export, and a job
//! submitted with a `traceparent` shows up as one trace with the expected spans and parents, the
//! placement's attributes and events, an attempt (with stage-in, execute, stage-out) per try, and
//! the workload's `TRACEPARENT`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::common::{Cluster, Setup, eventually, get, watch_to_end};
use crate::gateway::Api;

const TTL: Duration = Duration::from_secs(3);
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;
const STATUS_ERROR: i32 = 2;

/// One received span, flattened for assertions (ids in lowercase hex).
#[derive(Debug, Clone)]
struct Span {
    service: String,
    resource: BTreeMap<String, String>,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: i32,
    status: i32,
    attrs: BTreeMap<String, String>,
    /// Each attribute's OTLP type (`string`, `int`, `double`, `bool`, …), of the span and its events.
    types: BTreeMap<String, &'static str>,
    events: Vec<(String, BTreeMap<String, String>)>,
    /// (trace id, span id) of each link.
    links: Vec<(String, String)>,
    start_ns: u64,
    end_ns: u64,
}

/// The receiver: every exported span, in arrival order.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| flatten(&r.attributes)).unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                spans.push(Span {
                    service: service.clone(),
                    resource: resource.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    name: s.name,
                    kind: s.kind,
                    status: s.status.map_or(0, |st| st.code),
                    attrs: flatten(&s.attributes),
                    types: s
                        .attributes
                        .iter()
                        .chain(s.events.iter().flat_map(|e| &e.attributes))
                        .map(|kv| (kv.key.clone(), kv.value.as_ref().map_or("none", type_name)))
                        .collect(),
                    events: s.events.iter().map(|e| (e.name.clone(), flatten(&e.attributes))).collect(),
                    links: s.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect(),
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Prints the trace as an indented tree (`cargo test traces -- --nocapture`): what Tempo shows.
fn print_tree(spans: &[Span], parent: &str, depth: usize, t0: u64) {
    let mut children: Vec<&Span> = spans.iter().filter(|s| s.parent == parent).collect();
    children.sort_by_key(|s| s.start_ns);
    for s in children {
        let (at, took) = ((s.start_ns - t0) as f64 / 1e6, (s.end_ns - s.start_ns) as f64 / 1e6);
        println!("{:>9.1} ms {:>8.1} ms  {}{} [{}]", at, took, "  ".repeat(depth), s.name, s.service);
        print_tree(spans, &s.span_id, depth + 1, t0);
    }
}

/// One key per concept, numbers as numbers: across the job's spans (all three services) and their
/// events, a key always has one type; every count, size, code, port and cost is an int or a double
/// (numeric TraceQL queries such as `{ .http.response.status_code >= 500 }` must match them); no
/// string value reads as a number unless the conventions make it text; and hybroker's own keys are
/// namespaced `hybroker.` (the OTel convention for attributes outside the semantic conventions).
fn assert_attributes_typed(spans: &[Span]) {
    let mut seen: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    for span in spans {
        for (key, kind) in &span.types {
            if let Some((other, at)) = seen.insert(key, (kind, &span.name)) {
                assert_eq!(other, *kind, "{key} is {other} on {at} but {kind} on {}", span.name);
            }
        }
        let values = span.attrs.iter().chain(span.events.iter().flat_map(|(_, attrs)| attrs));
        for (key, value) in values {
            let numeric_text = span.types[key] == "string" && value.parse::<f64>().is_ok();
            // Versions, and `error.type`, which the HTTP conventions make the status code as text.
            let text_by_convention = key.ends_with(".version") || key == "error.type";
            assert!(!numeric_text || text_by_convention, "{key} = {value:?} is a string on {}", span.name);
        }
    }
    for key in [
        "http.response.status_code",
        "server.port",
        "rpc.grpc.status_code",
        "process.exit.code",
        "hybroker.job.attempt",
        "hybroker.staging.bytes",
        "hybroker.staging.files",
        "hybroker.staging.duration_ms",
        "hybroker.placement.candidates",
        "hybroker.placement.rejections",
    ] {
        assert_eq!(seen.get(key).map(|(kind, _)| *kind), Some("int"), "{key}: {seen:?}");
    }
    for key in ["hybroker.placement.cost.total_usd", "hybroker.placement.price_age_seconds", "hybroker.cost_usd"] {
        assert_eq!(seen.get(key).map(|(kind, _)| *kind), Some("double"), "{key}: {seen:?}");
    }
    let semantic = ["http.", "rpc.", "server.", "url.", "network.", "user_agent.", "process.", "error.", "otel."];
    let stray: Vec<&&str> =
        seen.keys().filter(|k| !k.starts_with("hybroker.") && !semantic.iter().any(|p| k.starts_with(p))).collect();
    assert!(stray.is_empty(), "attributes outside the conventions and the hybroker. namespace: {stray:?}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn flatten(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), kv.value.as_ref().map(text).unwrap_or_default())).collect()
}

fn type_name(v: &AnyValue) -> &'static str {
    match &v.value {
        Some(any_value::Value::StringValue(_)) => "string",
        Some(any_value::Value::IntValue(_)) => "int",
        Some(any_value::Value::DoubleValue(_)) => "double",
        Some(any_value::Value::BoolValue(_)) => "bool",
        _ => "other",
    }
}

fn text(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// Serves the receiver on a free loopback port.
async fn start_collector() -> (SocketAddr, Collector) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, collector)
}

/// The lab site (where the test agent is) and an AWS site whose only type has no H100; a local
/// store for the job's data; tenant `acme` may use it; traces go to `otlp`.
fn broker_extra(dir: &std::path::Path, otlp: SocketAddr) -> String {
    let snapshot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json");
    format!(
        "[prices]\nsnapshot = \"{snapshot}\"\n\
         [[residency]]\nname = \"any\"\naws = [\"us-east-1\"]\nonprem = [\"stockholm\"]\n\
         [[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"\nresidency = \"any\"\ngpu_hour_usd = 1.5\n\
         [[site]]\nname = \"aws-us-east-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"any\"\n\
         instance_types = [\"g6.xlarge\"]\n{nb}\
         [[storage]]\nname = \"lab\"\ncloud = \"local\"\ndir = \"{objects}\"\nlisten = \"127.0.0.1:0\"\nregion = \"stockholm\"\nresidency = \"any\"\n\
         [[tenant]]\nname = \"acme\"\nstorage = [\"local://lab/acme/\"]\n{telemetry}",
        snapshot = snapshot.display(),
        objects = dir.join("objects").display(),
        telemetry = telemetry(otlp),
        nb = crate::common::no_boot_capacity(),
    )
}

fn telemetry(otlp: SocketAddr) -> String {
    format!("\n[telemetry]\notlp_endpoint = \"http://{otlp}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_is_one_trace_across_gateway_broker_and_agent() {
    let (otlp, collector) = start_collector().await;
    let cluster = Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |dir| {
        let input = dir.join("objects/lab/acme/in/data.txt");
        std::fs::create_dir_all(input.parent().unwrap()).unwrap();
        std::fs::write(&input, b"twelve bytes").unwrap();
        Setup {
            broker_extra: Some(broker_extra(dir, otlp)),
            // The standard variables work too (and win over the config).
            broker_env: [("OTEL_RESOURCE_ATTRIBUTES".to_string(), "deployment.environment=e2e".to_string())]
                .into_iter()
                .chain(crate::common::enrolling(dir, "24h"))
                .collect(),
            agent_extra: telemetry(otlp),
        }
    })
    .await;
    let gateway = cluster.start_gateway_with("gateway", false, &telemetry(otlp));
    let api = Api::new(&gateway, &cluster.tenant_key("acme"));
    // Placement counts only connected agents: wait for the lab's.
    crate::placement::lab_agent_connected(&cluster).await;
    // Probes are not traced (nor is the broker health check behind /readyz).
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(api.get(probe).await.0, reqwest::StatusCode::OK, "{probe}");
    }

    // Attempt 1 writes out/ but not more/, so its stage-out fails and the job runs again.
    let (trace_id, caller) = (format!("{:032x}", fastrand::u128(1..)), format!("{:016x}", fastrand::u64(1..)));
    let spec = json!({
        "name": "traced",
        "max_attempts": 2,
        "resources": {"gpus": 1, "gpu_model": ["H100-80GB"]},
        "command": ["sh", "-c", "mkdir -p out && echo \"$TRACEPARENT\" > out/traceparent.txt && \
                     if [ $HYBROKER_ATTEMPT = 2 ]; then mkdir -p more && echo two > more/m.txt; fi"],
        "inputs": [{"uri": "local://lab/acme/in/data.txt", "path": "data.txt"}],
        "outputs": [{"path": "out/", "to": "local://lab/acme/r/"}, {"path": "more/", "to": "local://lab/acme/r/"}],
    });
    let request = api
        .request(reqwest::Method::POST, "/v1/jobs")
        .header("traceparent", format!("00-{trace_id}-{caller}-01"))
        .json(&spec);
    let (status, headers, body) = crate::gateway::send(request).await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    let traceresponse = headers["traceresponse"].to_str().unwrap();
    assert!(traceresponse.starts_with(&format!("00-{trace_id}-")), "{traceresponse}");
    let id = body["id"].as_str().unwrap().to_string();

    let mut admin = cluster.admin().await;
    let events = watch_to_end(&mut admin, &id).await;
    let job = get(&mut admin, &id).await;
    assert_eq!((job.state.as_str(), job.attempts), ("succeeded", 2), "{events:?}");
    let (_, _, shown) = api.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(shown["trace_id"], trace_id.as_str(), "the API names the job's trace: {shown}");

    // Every expected span has arrived (each service exports in batches).
    let wanted = [
        ("job.attempt", 2),
        ("stage-in", 2),
        ("execute", 2),
        ("stage-out", 2),
        ("job.dispatch", 2),
        ("job.attempt.end", 2),
    ];
    let spans = eventually("the job's spans from all three services", || async {
        let spans: Vec<Span> = collector.0.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect();
        let count = |name: &str| spans.iter().filter(|s| s.name == name).count();
        let complete =
            wanted.iter().all(|(name, n)| count(name) >= *n) && count("POST /v1/jobs") == 1 && count("job.place") >= 2;
        complete.then_some(spans)
    })
    .await;
    print_tree(&spans, &caller, 0, spans.iter().map(|s| s.start_ns).min().unwrap());
    let all = collector.0.lock().unwrap().clone();
    let probes: Vec<&Span> = all.iter().filter(|s| s.name.contains("healthz") || s.name.contains("Health/")).collect();
    assert!(probes.is_empty(), "probes traced: {probes:#?}");
    let services: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(services, ["hybroker-agent", "hybroker-broker", "hybroker-gateway"].into(), "{spans:#?}");
    let one = |name: &str, service: &str, parent: &str| -> Span {
        let found: Vec<&Span> =
            spans.iter().filter(|s| s.name == name && s.service == service && s.parent == parent).collect();
        assert_eq!(found.len(), 1, "one {name} from {service} under {parent}: {spans:#?}");
        found[0].clone()
    };
    let children = |parent: &Span, name: &str| -> Vec<Span> {
        spans.iter().filter(|s| s.parent == parent.span_id && s.name == name).cloned().collect()
    };

    // Gateway: the HTTP server span continues the caller; its client call is the broker's parent.
    let http = one("POST /v1/jobs", "hybroker-gateway", &caller);
    assert_eq!(http.kind, SERVER);
    assert_eq!(http.attrs["http.request.method"], "POST");
    assert_eq!(http.attrs["http.route"], "/v1/jobs");
    assert_eq!(http.attrs["http.response.status_code"], "201");
    assert_eq!(http.attrs["network.protocol.version"], "1.1");
    let call = one("hybroker.v1.JobService/Submit", "hybroker-gateway", &http.span_id);
    assert_eq!(call.attrs["server.address"], "127.0.0.1");
    assert_eq!(call.attrs["server.port"], cluster.addr.port().to_string());
    assert_eq!(
        (call.kind, call.attrs["rpc.system"].as_str(), call.attrs["rpc.method"].as_str()),
        (CLIENT, "grpc", "Submit")
    );
    let submit = one("hybroker.v1.JobService/Submit", "hybroker-broker", &call.span_id);
    assert_eq!((submit.kind, submit.attrs["rpc.grpc.status_code"].as_str()), (SERVER, "0"));
    assert_eq!(submit.resource["deployment.environment"], "e2e");
    assert_eq!(submit.resource["service.version"], env!("CARGO_PKG_VERSION"));
    assert!(submit.resource["service.instance.id"].ends_with("/broker/broker"), "{:?}", submit.resource);

    // Broker: placement and dispatch, minutes later in real life, continue the submission.
    let places = children(&submit, "job.place");
    assert!(places.len() >= 2, "placed once per attempt: {places:#?}");
    let place = &places[0];
    assert_eq!(place.attrs["hybroker.job.id"], id);
    assert_eq!(place.attrs["hybroker.placement.site"], "lab");
    assert_eq!(place.attrs["hybroker.placement.candidates"], "2");
    assert_eq!(place.attrs["hybroker.placement.rejections"], "1");
    for key in [
        "hybroker.placement.cost.total_usd",
        "hybroker.placement.cost.compute_usd",
        "hybroker.placement.cost.egress_usd",
    ] {
        assert!(place.attrs[key].parse::<f64>().is_ok_and(|v| v >= 0.0), "{key}: {place:#?}");
    }
    assert!(place.attrs["hybroker.placement.price_age_seconds"].parse::<f64>().is_ok_and(|v| v > 0.0), "{place:#?}");
    let (event, attrs) = &place.events[0];
    assert_eq!(
        (event.as_str(), attrs["hybroker.placement.candidate"].as_str()),
        ("candidate rejected", "aws-us-east-1")
    );
    assert!(attrs["hybroker.placement.reason"].contains("H100"), "{attrs:?}");
    let dispatches = children(&submit, "job.dispatch");
    assert_eq!(dispatches.len(), 2, "{dispatches:#?}");

    // Agent: one attempt span per dispatch, each with its stages; the workload saw its context.
    for dispatch in &dispatches {
        assert_eq!(dispatch.kind, PRODUCER);
        let n = dispatch.attrs["hybroker.job.attempt"].clone();
        let attempt = one("job.attempt", "hybroker-agent", &dispatch.span_id);
        // The broker's record of the attempt's end, beside it: outcome, reason, actual cost.
        let end = one("job.attempt.end", "hybroker-broker", &dispatch.span_id);
        let cost = end.attrs["hybroker.cost_usd"].parse::<f64>().unwrap();
        assert!(cost > 0.0 && cost < 0.01, "a few seconds at $1.50/h: {end:#?}");
        assert_eq!((attempt.kind, attempt.attrs["hybroker.job.attempt"].as_str()), (CONSUMER, n.as_str()));
        assert_eq!(attempt.resource["hybroker.site"], "lab");
        let stage_in = one("stage-in", "hybroker-agent", &attempt.span_id);
        assert_eq!(stage_in.attrs["hybroker.staging.bytes"], "12");
        assert!(!children(&stage_in, "hybroker.v1.AgentService/InputUrls").is_empty(), "URL calls in stage-in");
        let execute = one("execute", "hybroker-agent", &attempt.span_id);
        assert_eq!(execute.attrs["process.exit.code"], "0");
        let stage_out = one("stage-out", "hybroker-agent", &attempt.span_id);
        if n == "1" {
            assert_eq!((stage_out.status, attempt.status), (STATUS_ERROR, STATUS_ERROR), "{stage_out:#?}");
            assert!(stage_out.attrs["error.message"].contains("more/"), "{stage_out:#?}");
            assert_eq!(end.attrs["hybroker.outcome"], "failed");
            assert!(end.attrs["hybroker.reason"].contains("more/"), "{end:#?}");
        } else {
            assert_eq!(stage_out.attrs["hybroker.staging.files"], "2");
            assert_eq!(
                (end.attrs["hybroker.outcome"].as_str(), end.attrs["process.exit.code"].as_str()),
                ("succeeded", "0")
            );
            let key = format!("objects/lab/acme/r/acme/{id}/attempt-2/traceparent.txt");
            let seen = std::fs::read_to_string(cluster.path(&key)).unwrap();
            assert_eq!(seen.trim(), format!("00-{trace_id}-{}-01", execute.span_id));
        }
    }
    assert_attributes_typed(&spans);
    drop(gateway);

    // A gateway told to `link` client traces starts its own trace, linked to the client's.
    let linking = cluster.start_gateway_keyed("linking", false, "client_traces = \"link\"", &telemetry(otlp));
    let api = Api { url: linking.url.clone(), ..api };
    let request = api
        .request(reqwest::Method::GET, &format!("/v1/jobs/{id}"))
        .header("traceparent", format!("00-{trace_id}-{caller}-01"));
    let (status, headers, _) = crate::gateway::send(request).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let own = headers["traceresponse"].to_str().unwrap().split('-').nth(1).unwrap().to_string();
    assert_ne!(own, trace_id, "a new trace");
    let linked = eventually("the linking gateway's span", || async {
        collector.0.lock().unwrap().iter().find(|s| s.trace_id == own && s.name == "GET /v1/jobs/{id}").cloned()
    })
    .await;
    assert_eq!((linked.parent.as_str(), linked.links.as_slice()), ("", &[(trace_id.clone(), caller.clone())][..]));
}
