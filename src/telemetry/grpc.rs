//! A span around every gRPC call, on both sides, after the OpenTelemetry RPC conventions: named
//! `package.Service/Method`, kind client or server, `rpc.system`, `rpc.service`, `rpc.method`
//! and `rpc.grpc.status_code`. The client sends its span's context in the request metadata; the
//! server's span continues it. A streaming call's span ends when its response starts. Health
//! checks are not traced, nor client calls made outside any span.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use axum::http::{HeaderMap, Request, Response};
use tonic::transport::Channel;
use tower::{Layer, Service};
use tracing::Instrument;

use super::context;

/// A channel whose calls are traced (what every gRPC client in the product uses).
pub type TracedChannel = Traced<Channel>;

/// Wraps a channel to `url`: a client span per call (naming the server), its context injected
/// into the metadata.
pub fn traced(channel: Channel, url: &str) -> TracedChannel {
    let uri = url.parse::<axum::http::Uri>().ok();
    let host = uri.as_ref().and_then(|u| u.host()).unwrap_or_default();
    let port = uri.as_ref().and_then(|u| u.port_u16()).unwrap_or(443);
    Traced { inner: channel, kind: Kind::Client(Arc::new((host.to_string(), port))) }
}

/// A server layer: a server span per call, continuing the caller's context.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerLayer;

impl<S> Layer<S> for ServerLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Traced<S> {
        Traced { inner, kind: Kind::Server }
    }
}

#[derive(Debug, Clone)]
enum Kind {
    /// Calls to this server (host, port).
    Client(Arc<(String, u16)>),
    Server,
}

/// A gRPC service (client or server side) with a span per call.
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
    kind: Kind,
}

impl<S, B, R> Service<Request<B>> for Traced<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Health checks are probes, not work; a client call outside any span (a background poll,
        // like a followed log's) would start a trace of its own each time.
        let untraced = req.uri().path().starts_with("/grpc.health.")
            || matches!(self.kind, Kind::Client(_) if tracing::Span::current().is_none());
        if untraced {
            return Box::pin(self.inner.call(req));
        }
        let path = req.uri().path().trim_start_matches('/').to_string();
        let (service, method) = path.split_once('/').unwrap_or((path.as_str(), ""));
        let span = match &self.kind {
            Kind::Client(server) => tracing::info_span!(
                "grpc",
                otel.name = %path,
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.service = %service,
                rpc.method = %method,
                rpc.grpc.status_code = tracing::field::Empty,
                server.address = server.0.as_str(),
                server.port = i64::from(server.1),
            ),
            Kind::Server => tracing::info_span!(
                "grpc",
                otel.name = %path,
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.service = %service,
                rpc.method = %method,
                rpc.grpc.status_code = tracing::field::Empty,
            ),
        };
        match self.kind {
            Kind::Client(_) => context::inject_headers(&span, req.headers_mut()),
            Kind::Server => context::set_parent(&span, context::from_headers(req.headers())),
        }
        let client = matches!(self.kind, Kind::Client(_));
        let call = self.inner.call(req);
        let recorder = span.clone();
        Box::pin(
            async move {
                let result = call.await;
                let code = match &result {
                    Ok(response) => status_code(response.headers()),
                    // The call never reached the peer (a transport error on the client).
                    Err(_) => tonic::Code::Unavailable as i32,
                };
                recorder.record("rpc.grpc.status_code", code);
                if is_error(client, code) {
                    recorder.record("otel.status_code", "ERROR");
                }
                result
            }
            .instrument(span),
        )
    }
}

/// The call's status when the response head carries it (a failed call is "trailers only");
/// otherwise the call got as far as its response: OK.
fn status_code(headers: &HeaderMap) -> i32 {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The conventions: every non-OK code is an error for the client; for the server only the codes
/// that mean the server failed.
fn is_error(client: bool, code: i32) -> bool {
    use tonic::Code;
    match client {
        true => code != Code::Ok as i32,
        false => [
            Code::Unknown,
            Code::DeadlineExceeded,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
        ]
        .iter()
        .any(|c| *c as i32 == code),
    }
}
