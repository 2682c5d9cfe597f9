//! W3C trace context and the telemetry of each request.
//!
//! The trace layer is outermost: it reads `traceparent`/`tracestate` (or starts a trace
//! when absent or malformed), makes this hop's span (SERVER inbound, CLIENT outbound) a
//! child of it, and passes its own span id on in `traceparent`, so the next proxy's SERVER
//! span is the child of this CLIENT span and the app's own spans hang under the SERVER
//! span. When the response body ends (or is dropped) it hands a [`Finished`] request to
//! [`Telemetry::record`]: span, metrics, access log.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{Body, BoxError, BoxFuture, Decisions, HttpService};
use crate::telemetry::{Direction, Finished, Telemetry};
use crate::tls::PeerSecurity;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// A header older meshscope proxies sent to name their caller's workload. It is never
/// trusted: the caller's workload comes from its certificate, and the header is removed
/// on both sides so an app never sees (or forges) it.
pub const SOURCE_WORKLOAD: &str = "x-meshscope-source-workload";

/// This hop's span in its trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub flags: u8,
    pub trace_state: Option<String>,
}

/// `traceparent` → (trace id, parent span id, flags); `None` when malformed (W3C Trace
/// Context level 1: version `ff` and all-zero ids are invalid; version 00 has exactly four
/// fields; a later version may append fields).
pub fn parse_traceparent(v: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let v = v.trim();
    let mut parts = v.split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    if version.len() != 2 || trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
        return None;
    }
    let is_lower_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if ![version, trace, parent, flags]
        .iter()
        .all(|s| is_lower_hex(s))
    {
        return None;
    }
    if version == "ff" || (version == "00" && rest.is_some()) {
        return None;
    }
    let mut t = [0u8; 16];
    let mut p = [0u8; 8];
    let mut f = [0u8; 1];
    hex::decode_to_slice(trace, &mut t).ok()?;
    hex::decode_to_slice(parent, &mut p).ok()?;
    hex::decode_to_slice(flags, &mut f).ok()?;
    if t == [0; 16] || p == [0; 8] {
        return None;
    }
    Some((t, p, f[0]))
}

pub fn format_traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> String {
    format!(
        "00-{}-{}-{:02x}",
        hex::encode(trace_id),
        hex::encode(span_id),
        flags
    )
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let b: [u8; N] = rand::random();
        if b != [0; N] {
            return b;
        }
    }
}

impl TraceContext {
    /// This hop's context: a child of the request's `traceparent`, or a new root.
    pub fn from_headers(h: &http::HeaderMap) -> TraceContext {
        let parent = h
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        match parent {
            Some((trace_id, parent, flags)) => TraceContext {
                trace_id,
                span_id: random_nonzero(),
                parent: Some(parent),
                flags: flags & 0x01,
                trace_state: h
                    .get(TRACESTATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            },
            None => TraceContext {
                trace_id: random_nonzero(),
                span_id: random_nonzero(),
                parent: None,
                flags: 0x01,
                trace_state: None,
            },
        }
    }

    pub fn traceparent(&self) -> String {
        format_traceparent(&self.trace_id, &self.span_id, self.flags)
    }
}

/// Request extension set by the outbound router: whom this request is for.
#[derive(Debug, Clone)]
pub struct Peer {
    pub destination: Arc<str>,
    pub db_system: Option<Arc<str>>,
}

#[derive(Clone)]
pub struct TraceLayer {
    direction: Direction,
    telemetry: Telemetry,
}

impl TraceLayer {
    pub fn new(direction: Direction, telemetry: Telemetry) -> TraceLayer {
        TraceLayer {
            direction,
            telemetry,
        }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = TraceService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceService {
            inner,
            direction: self.direction,
            telemetry: self.telemetry.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TraceService<S> {
    inner: S,
    direction: Direction,
    telemetry: Telemetry,
}

/// Request extension: the peer address of the connection.
#[derive(Debug, Clone, Copy)]
pub struct RemoteAddr(pub std::net::SocketAddr);

impl<S: HttpService> Service<Request<Body>> for TraceService<S> {
    crate::layers::http_service_head!();

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        let start = SystemTime::now();
        let started = Instant::now();
        let context = TraceContext::from_headers(req.headers());
        let (mut parts, body) = req.into_parts();
        if let Ok(v) = HeaderValue::from_str(&context.traceparent()) {
            parts.headers.insert(TRACEPARENT, v);
        }
        parts.headers.remove(SOURCE_WORKLOAD);
        let (destination, db_system, source_workload, security) = match self.direction {
            Direction::Outbound => {
                let peer = parts.extensions.get::<Peer>().cloned();
                let workload = Arc::clone(self.telemetry.workload());
                match peer {
                    Some(p) => (p.destination, p.db_system, Some(workload), None),
                    None => (Arc::from("unknown"), None, Some(workload), None),
                }
            }
            Direction::Inbound => {
                // Who called is what the caller's certificate proves, nothing else.
                let security = parts
                    .extensions
                    .get::<PeerSecurity>()
                    .cloned()
                    .unwrap_or(PeerSecurity::PLAINTEXT);
                let source = security.peer.as_ref().map(|id| Arc::from(id.workload()));
                (
                    Arc::from(self.telemetry.service()),
                    None,
                    source,
                    Some(security),
                )
            }
        };
        let in_flight = self.telemetry.in_flight(self.direction, &destination);
        let request_bytes = Arc::new(AtomicU64::new(0));
        let body = Watched::new(body, Arc::clone(&request_bytes)).boxed();
        let authority = parts
            .uri
            .authority()
            .map(|a| a.host().to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(|h| h.split(':').next().unwrap_or(h).to_string())
            });
        let mirror = match self.direction {
            Direction::Outbound => parts
                .extensions
                .get::<super::mirror::MirrorMark>()
                .map(|m| m.as_str()),
            // A copy says so in a header, believed only from a meshed caller (an mTLS
            // peer), or in a mesh without identity: a plaintext client cannot hide its
            // requests from the golden signals by sending it.
            Direction::Inbound => (parts.headers.contains_key(super::mirror::MIRROR_HEADER)
                && (security.as_ref().is_some_and(|s| s.mtls) || !self.telemetry.has_identity()))
            .then_some("shadow"),
        };
        let finished = Finished {
            direction: self.direction,
            context,
            start,
            duration: Default::default(),
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            authority,
            status: 0,
            source_workload,
            destination_service: destination,
            db_system,
            request_bytes: 0,
            response_bytes: 0,
            peer: parts.extensions.get::<RemoteAddr>().map(|r| r.0),
            decisions: Decisions::default(),
            security,
            route: parts
                .extensions
                .get::<crate::routes::RouteName>()
                .map(|r| Arc::clone(&r.0)),
            mirror,
            body_hash: None,
        };
        let fut = self.inner.call(Request::from_parts(parts, body));
        let telemetry = self.telemetry.clone();
        Box::pin(async move {
            let Ok(r) = fut.await;
            let (parts, body) = r.into_parts();
            let mut finished = finished;
            finished.status = parts.status.as_u16();
            finished.decisions = Decisions::of(&parts.extensions);
            finished.decisions.proxy_response = super::proxy_response(&parts.headers);
            if finished.direction == Direction::Outbound {
                // The endpoint's connection: mTLS as the pool reported it, plaintext when
                // a connection was made without it, unknown when none was.
                finished.security =
                    match (&finished.decisions.security, &finished.decisions.upstream) {
                        (Some(s), _) => Some(s.clone()),
                        (None, Some(_))
                            if finished.decisions.proxy_response != Some("connect-failed") =>
                        {
                            Some(PeerSecurity::PLAINTEXT)
                        }
                        _ => None,
                    };
            }
            let pending = Pending {
                telemetry,
                finished,
                started,
                request_bytes,
                _in_flight: in_flight,
            };
            let hash = pending.finished.mirror.map(|_| FNV_OFFSET);
            let body = Watched::new(
                body,
                Observation {
                    bytes: 0,
                    hash,
                    pending: Some(pending),
                },
            );
            Ok(http::Response::from_parts(parts, body.boxed()))
        })
    }
}

/// A request whose response is still streaming.
struct Pending {
    telemetry: Telemetry,
    finished: Finished,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    _in_flight: crate::telemetry::metrics::InFlight,
}

/// FNV-1a, 64 bits: a stable hash of a response body, to tell whether a mirrored pair
/// answered alike (not a security hash).
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Pending {
    fn finish(mut self, response_bytes: u64, hash: Option<u64>) {
        self.finished.body_hash = hash;
        self.finished.duration = self.started.elapsed();
        self.finished.response_bytes = response_bytes;
        self.finished.request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.telemetry.record(self.finished);
    }
}

/// What a [`Watched`] body is told as its frames pass.
trait Watcher {
    /// A data frame went by.
    fn data(&mut self, data: &Bytes);
    /// The body ended: its last frame, an error, or dropped before either (may be told twice).
    fn end(&mut self) {}
}

pin_project_lite::pin_project! {
    /// A body that passes every frame through unchanged and tells its [`Watcher`].
    struct Watched<W: Watcher> {
        #[pin]
        inner: Body,
        watcher: W,
    }

    impl<W: Watcher> PinnedDrop for Watched<W> {
        fn drop(this: Pin<&mut Self>) {
            this.project().watcher.end();
        }
    }
}

impl<W: Watcher> Watched<W> {
    fn new(inner: Body, watcher: W) -> Self {
        Self { inner, watcher }
    }
}

impl<W: Watcher> http_body::Body for Watched<W> {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.watcher.data(d);
                }
            }
            Poll::Ready(None | Some(Err(_))) => this.watcher.end(),
            Poll::Pending => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts the bytes of a request body.
impl Watcher for Arc<AtomicU64> {
    fn data(&mut self, data: &Bytes) {
        self.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
}

/// Counts (and, for a mirrored request, hashes) a response body and records the request
/// when the body ends or is dropped.
struct Observation {
    bytes: u64,
    hash: Option<u64>,
    pending: Option<Pending>,
}

impl Watcher for Observation {
    fn data(&mut self, data: &Bytes) {
        self.bytes += data.len() as u64;
        if let Some(h) = self.hash.as_mut() {
            *h = fnv1a(*h, data);
        }
    }
    fn end(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(self.bytes, self.hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ServiceIdentity, TelemetryConfig};
    use crate::layers::testing::{Script, call, get};

    #[test]
    fn traceparent_round_trip_and_rejects() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, p, f) = parse_traceparent(tp).expect("valid");
        assert_eq!(format_traceparent(&t, &p, f), tp);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // A later version may add fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }

    #[test]
    fn a_child_keeps_the_trace_and_state_and_a_root_is_new() {
        let mut h = http::HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=x"));
        let c = TraceContext::from_headers(&h);
        assert_eq!(hex::encode(c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            c.parent.map(hex::encode).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_ne!(hex::encode(c.span_id), "00f067aa0ba902b7");
        assert_eq!(c.trace_state.as_deref(), Some("vendor=x"));
        let root = TraceContext::from_headers(&http::HeaderMap::new());
        assert_eq!(root.parent, None);
        assert_eq!(root.flags, 1);
    }

    /// Echoes the traceparent it received in the response header `seen`.
    #[derive(Clone)]
    struct Echo;
    impl Service<Request<Body>> for Echo {
        type Response = http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: Request<Body>) -> BoxFuture {
            let seen = req.headers().get(TRACEPARENT).cloned();
            let src = req.headers().get(SOURCE_WORKLOAD).cloned();
            Box::pin(async move {
                let mut r = http::Response::new(crate::layers::full("hello"));
                if let Some(s) = seen {
                    r.headers_mut().insert("seen", s);
                }
                if let Some(s) = src {
                    r.headers_mut().insert("src", s);
                }
                Ok(r)
            })
        }
    }

    #[tokio::test]
    async fn the_client_span_id_goes_downstream_and_the_request_is_counted_when_the_body_ends() {
        let identity = ServiceIdentity {
            name: "frontend".into(),
            namespace: None,
            version: None,
            workload: None,
        };
        let (telemetry, _exporter) = Telemetry::new(&identity, &TelemetryConfig::default());
        let mut svc = TraceLayer::new(Direction::Outbound, telemetry.clone()).layer(Echo);
        let mut req = get();
        req.headers_mut().insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        req.extensions_mut().insert(Peer {
            destination: Arc::from("cart"),
            db_system: None,
        });
        let r = call(&mut svc, req).await;
        let seen = r
            .headers()
            .get("seen")
            .and_then(|v| v.to_str().ok())
            .expect("seen")
            .to_string();
        let (t, p, _) = parse_traceparent(&seen).expect("valid");
        assert_eq!(hex::encode(t), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(
            hex::encode(p),
            "00f067aa0ba902b7",
            "the CLIENT span's own id goes on"
        );
        assert_eq!(
            r.headers().get("src"),
            None,
            "no workload header goes on: the next hop learns the caller from its certificate"
        );
        assert_eq!(
            telemetry.registry().requests(),
            0,
            "not before the body ends"
        );
        let body = r.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"hello");
        assert_eq!(telemetry.registry().requests(), 1);

        // A dropped body still counts.
        let mut svc =
            TraceLayer::new(Direction::Inbound, telemetry.clone()).layer(Script::new(&[500]));
        drop(call(&mut svc, get()).await);
        assert_eq!(telemetry.registry().requests(), 2);
        let text = crate::telemetry::metrics::exposition(telemetry.registry());
        assert!(
            text.contains("reporter=\"destination\",destination_workload=\"frontend\""),
            "{text}"
        );
    }
}
