//! The live tap: every request span, as it is ingested, to whoever is watching
//! (`GET /api/v1/tap`, `meshscope tap`), like `linkerd viz tap`.
//!
//! [`Ingest`](crate::Ingest) hands each batch of spans it has made durable to
//! [`Tap::publish`]. With nobody tapping that is one atomic load; with tappers, each span
//! that passes a tapper's [`TapFilter`] becomes a [`TapEvent`] in that tapper's bounded
//! queue. A tapper that reads too slowly loses events (counted, never blocking ingest), and
//! the number of tappers at once is bounded, so tapping can cost memory only within
//! `max_subscribers × QUEUE` events.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{
    Array, AsArray, Int32Array, Int64Array, MapArray, StringArray, TimestampNanosecondArray,
};
use arrow::record_batch::RecordBatch;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Events a tapper's queue holds before new ones are dropped for it.
pub const QUEUE: usize = 1024;

/// Tappers at once, by default.
pub const MAX_SUBSCRIBERS: usize = 64;

/// One request span, as the tap shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TapEvent {
    /// The span's start, RFC 3339 with nanoseconds.
    pub time: String,
    pub trace_id: String,
    pub span_id: String,
    pub service: String,
    /// The other side: the callee of a CLIENT / PRODUCER span (the service graph's peer
    /// name), the caller of a SERVER / CONSUMER span (the source workload a proxy
    /// authenticated, else the client address, else the service of its parent CLIENT span
    /// when that reached meshscope first).
    pub peer: Option<String>,
    /// `SERVER`, `CLIENT`, `PRODUCER` or `CONSUMER`.
    pub kind: String,
    pub method: Option<String>,
    /// The request path (`url.path`, `http.target`, the path of `url.full` / `http.url`),
    /// else the route.
    pub path: Option<String>,
    /// The HTTP status code, when the span has one.
    pub status: Option<i32>,
    /// The span's status: `OK`, `ERROR` or `UNSET`.
    pub span_status: String,
    pub duration_ms: f64,
}

/// Which responses a tapper wants: a code (`503`), a class (`5xx`) or `error` (span status
/// ERROR or a 5xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Code(i32),
    Class(i32),
    Error,
}

impl std::str::FromStr for StatusFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("error") {
            return Ok(StatusFilter::Error);
        }
        let bad = || format!("status must be a code (503), a class (5xx) or error, got {s:?}");
        if let Some(d) = s.strip_suffix("xx").or_else(|| s.strip_suffix("XX")) {
            let class: i32 = d.parse().map_err(|_| bad())?;
            return (1..=5)
                .contains(&class)
                .then_some(StatusFilter::Class(class))
                .ok_or_else(bad);
        }
        let code: i32 = s.parse().map_err(|_| bad())?;
        (100..=599)
            .contains(&code)
            .then_some(StatusFilter::Code(code))
            .ok_or_else(bad)
    }
}

/// What a tapper wants to see; every field given must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TapFilter {
    /// The span's service.
    pub service: Option<String>,
    /// The other side (see [`TapEvent::peer`]).
    pub peer: Option<String>,
    pub path_prefix: Option<String>,
    pub method: Option<String>,
    pub status: Option<StatusFilter>,
}

impl TapFilter {
    fn status_matches(&self, http: Option<i32>, span_status: &str) -> bool {
        match self.status {
            None => true,
            Some(StatusFilter::Code(c)) => http == Some(c),
            Some(StatusFilter::Class(c)) => http.is_some_and(|h| h / 100 == c),
            Some(StatusFilter::Error) => span_status == "ERROR" || http.is_some_and(|h| h >= 500),
        }
    }

    fn matches(&self, e: &TapEvent) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        eq(&self.service, Some(&e.service))
            && eq(&self.peer, e.peer.as_deref())
            && self.method.as_deref().is_none_or(|m| {
                e.method
                    .as_deref()
                    .is_some_and(|h| h.eq_ignore_ascii_case(m))
            })
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| e.path.as_deref().is_some_and(|h| h.starts_with(p)))
            && self.status_matches(e.status, &e.span_status)
    }
}

struct Subscriber {
    id: u64,
    filter: TapFilter,
    tx: mpsc::Sender<TapEvent>,
    dropped: Arc<AtomicU64>,
}

#[derive(Default)]
struct Inner {
    subscribers: Mutex<Vec<Subscriber>>,
    /// `subscribers.len()`, read without the lock on every batch.
    active: AtomicUsize,
    next_id: AtomicU64,
    events: AtomicU64,
    dropped: AtomicU64,
    max_subscribers: usize,
    /// The server is stopping: every stream has ended and new ones end at once.
    closed: std::sync::atomic::AtomicBool,
    /// Recent calls' span ids and their callers, to name the caller of a SERVER span
    /// whose attributes do not (while anyone taps).
    callers: Mutex<Callers>,
}

/// Calls remembered to name the caller of the spans they lead to.
pub const CALLERS: usize = 65_536;

/// The services of the last [`CALLERS`] CLIENT / PRODUCER spans, by span id: a SERVER or
/// CONSUMER span whose parent is one of them was called by that service. Bounded: the
/// oldest leave first.
#[derive(Debug, Default)]
struct Callers {
    by_span: std::collections::HashMap<String, String>,
    order: std::collections::VecDeque<String>,
}

impl Callers {
    fn remember(&mut self, span_id: &str, service: &str) {
        if self.by_span.contains_key(span_id) {
            return;
        }
        if self.order.len() >= CALLERS
            && let Some(old) = self.order.pop_front()
        {
            self.by_span.remove(&old);
        }
        self.order.push_back(span_id.to_string());
        self.by_span
            .insert(span_id.to_string(), service.to_string());
    }
}

/// The tap's counters, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapStats {
    pub subscribers: usize,
    /// Events handed to tappers.
    pub events: u64,
    /// Events a tapper's full queue had no room for.
    pub dropped: u64,
}

/// The hub between ingest and the tappers; cheap to clone.
#[derive(Clone)]
pub struct Tap {
    inner: Arc<Inner>,
}

impl Default for Tap {
    fn default() -> Self {
        Tap::new(MAX_SUBSCRIBERS)
    }
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").field("stats", &self.stats()).finish()
    }
}

/// A tapper's end of the tap; leaving (dropping it) unsubscribes at once.
pub struct Subscription {
    rx: mpsc::Receiver<TapEvent>,
    id: u64,
    dropped: Arc<AtomicU64>,
    tap: Tap,
}

impl Subscription {
    pub async fn next(&mut self) -> Option<TapEvent> {
        self.rx.recv().await
    }

    /// Events this tapper lost to a full queue so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.tap.unsubscribe(self.id);
    }
}

/// More tappers than the tap takes at once.
#[derive(Debug, thiserror::Error)]
#[error("{0} tappers are watching already; try again when one leaves")]
pub struct TooManyTappers(pub usize);

impl Tap {
    pub fn new(max_subscribers: usize) -> Tap {
        Tap {
            inner: Arc::new(Inner {
                max_subscribers,
                ..Inner::default()
            }),
        }
    }

    pub fn stats(&self) -> TapStats {
        TapStats {
            subscribers: self.inner.active.load(Ordering::Relaxed),
            events: self.inner.events.load(Ordering::Relaxed),
            dropped: self.inner.dropped.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        // A panic while holding the lock cannot leave the list half-changed.
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn subscribe(&self, filter: TapFilter) -> Result<Subscription, TooManyTappers> {
        let mut subs = self.lock();
        if subs.len() >= self.inner.max_subscribers {
            return Err(TooManyTappers(subs.len()));
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        if !self.inner.closed.load(Ordering::Acquire) {
            subs.push(Subscriber {
                id,
                filter,
                tx,
                dropped: Arc::clone(&dropped),
            });
        }
        self.inner.active.store(subs.len(), Ordering::Relaxed);
        Ok(Subscription {
            rx,
            id,
            dropped,
            tap: self.clone(),
        })
    }

    /// The server is stopping: every tapper's stream ends now (its queue is drained first),
    /// and a tap that starts later ends at once, so no stream holds the shutdown open.
    pub fn close(&self) {
        let mut subs = self.lock();
        self.inner.closed.store(true, Ordering::Release);
        subs.clear();
        self.inner.active.store(0, Ordering::Relaxed);
    }

    fn unsubscribe(&self, id: u64) {
        let mut subs = self.lock();
        subs.retain(|s| s.id != id);
        self.inner.active.store(subs.len(), Ordering::Relaxed);
    }

    /// Hands the request spans of a durable batch to every tapper whose filter they pass.
    pub fn publish(&self, batch: &RecordBatch) {
        if self.inner.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(spans) = SpanColumns::of(batch) else {
            return;
        };
        // The calls first (a call and the span it led to may come in one batch), then
        // each callee span without a named caller gets its call's service.
        let mut callers = self.inner.callers.lock().unwrap_or_else(|p| p.into_inner());
        for row in 0..batch.num_rows() {
            if matches!(spans.kind.value(row), "CLIENT" | "PRODUCER") {
                callers.remember(spans.span_id.value(row), spans.service.value(row));
            }
        }
        let subs = self.lock();
        let (mut sent, mut dropped) = (0u64, 0u64);
        for row in 0..batch.num_rows() {
            let Some(mut event) = spans.event(row) else {
                continue;
            };
            if event.peer.is_none() && matches!(event.kind.as_str(), "SERVER" | "CONSUMER") {
                event.peer = spans
                    .parent(row)
                    .and_then(|p| callers.by_span.get(p))
                    .cloned();
            }
            for s in subs.iter().filter(|s| s.filter.matches(&event)) {
                match s.tx.try_send(event.clone()) {
                    Ok(()) => sent += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.dropped.fetch_add(1, Ordering::Relaxed);
                        dropped += 1;
                    }
                    // Gone: its Subscription's drop removes it.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        self.inner.events.fetch_add(sent, Ordering::Relaxed);
        self.inner.dropped.fetch_add(dropped, Ordering::Relaxed);
    }
}

/// The columns of the `spans` table the tap reads.
struct SpanColumns<'a> {
    start: &'a TimestampNanosecondArray,
    duration: &'a Int64Array,
    trace_id: &'a StringArray,
    span_id: &'a StringArray,
    service: &'a StringArray,
    kind: &'a StringArray,
    status: &'a StringArray,
    method: &'a StringArray,
    route: &'a StringArray,
    http_status: &'a Int32Array,
    peer_name: &'a StringArray,
    parent: &'a StringArray,
    attributes: &'a MapArray,
}

/// The first of `keys` that the map row holds.
fn attribute<'a>(map: &'a MapArray, row: usize, keys: &[&str]) -> Option<&'a str> {
    let offsets = map.value_offsets();
    let (from, to) = (offsets[row] as usize, offsets[row + 1] as usize);
    let k = map.keys().as_string_opt::<i32>()?;
    let v = map.values().as_string_opt::<i32>()?;
    keys.iter().find_map(|want| {
        (from..to).find_map(|i| (k.value(i) == *want && v.is_valid(i)).then(|| v.value(i)))
    })
}

fn opt(a: &StringArray, row: usize) -> Option<String> {
    a.is_valid(row).then(|| a.value(row).to_string())
}

/// The path of a URL (`https://host/a/b?q` → `/a/b`), or of a request target (`/a?q`).
fn url_path(url: &str) -> Option<&str> {
    let rest = match url.find("://") {
        Some(i) => {
            let after = &url[i + 3..];
            &after[after.find('/')?..]
        }
        None => url,
    };
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    (!rest[..end].is_empty()).then(|| &rest[..end])
}

impl<'a> SpanColumns<'a> {
    fn of(b: &'a RecordBatch) -> Option<SpanColumns<'a>> {
        let s = |name: &str| b.column_by_name(name)?.as_string_opt::<i32>();
        Some(SpanColumns {
            start: b
                .column_by_name("start_time")?
                .as_any()
                .downcast_ref::<TimestampNanosecondArray>()?,
            duration: b.column_by_name("duration_ns")?.as_primitive_opt()?,
            trace_id: s("trace_id")?,
            span_id: s("span_id")?,
            service: s("service_name")?,
            kind: s("span_kind")?,
            status: s("status_code")?,
            method: s("http_method")?,
            route: s("http_route")?,
            http_status: b.column_by_name("http_status_code")?.as_primitive_opt()?,
            peer_name: s("peer_name")?,
            parent: s("parent_span_id")?,
            attributes: b.column_by_name("span_attributes")?.as_map_opt()?,
        })
    }

    fn parent(&self, row: usize) -> Option<&'a str> {
        self.parent.is_valid(row).then(|| self.parent.value(row))
    }

    /// The row as an event, unless it is not a request (an INTERNAL span).
    fn event(&self, row: usize) -> Option<TapEvent> {
        let kind = self.kind.value(row);
        let client = matches!(kind, "CLIENT" | "PRODUCER");
        if !client && !matches!(kind, "SERVER" | "CONSUMER") {
            return None;
        }
        let attr = |keys: &[&str]| attribute(self.attributes, row, keys);
        let peer = if client {
            opt(self.peer_name, row)
        } else {
            attr(&[
                "meshscope.source_workload",
                "source_workload",
                "client.address",
                "net.sock.peer.addr",
                "net.peer.ip",
            ])
            .map(str::to_string)
        };
        let path = attr(&["url.path"])
            .or_else(|| attr(&["http.target", "url.full", "http.url"]).and_then(url_path))
            .map(str::to_string)
            .or_else(|| opt(self.route, row));
        let time = chrono::DateTime::from_timestamp_nanos(self.start.value(row))
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        Some(TapEvent {
            time,
            trace_id: self.trace_id.value(row).to_string(),
            span_id: self.span_id.value(row).to_string(),
            service: self.service.value(row).to_string(),
            peer,
            kind: kind.to_string(),
            method: opt(self.method, row),
            path,
            status: self
                .http_status
                .is_valid(row)
                .then(|| self.http_status.value(row)),
            span_status: self.status.value(row).to_string(),
            duration_ms: (self.duration.value(row) as f64 / 1e3).round() / 1e3,
        })
    }
}

/// `GET /api/v1/tap` parameters.
#[derive(Debug, Default, Deserialize)]
struct TapParams {
    service: Option<String>,
    peer: Option<String>,
    path_prefix: Option<String>,
    method: Option<String>,
    status: Option<String>,
    /// Stop after this many events (default: until the client leaves).
    limit: Option<u64>,
}

fn empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

impl TapParams {
    fn filter(self) -> Result<(TapFilter, Option<u64>), String> {
        let status = empty(self.status).map(|s| s.parse()).transpose()?;
        Ok((
            TapFilter {
                service: empty(self.service),
                peer: empty(self.peer),
                path_prefix: empty(self.path_prefix),
                method: empty(self.method),
                status,
            },
            self.limit,
        ))
    }
}

fn bad_request(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// `GET /api/v1/tap`: Server-Sent Events, `event: span` with a [`TapEvent`] as JSON for
/// each request span ingested after the tap began that passes the filters; after `limit`
/// of them an `event: end` with `{"events": n, "dropped": d}` and the stream closes.
async fn tap(State(tap): State<Tap>, q: Result<Query<TapParams>, QueryRejection>) -> Response {
    let (filter, limit) = match q.map_err(|e| e.body_text()).and_then(|Query(p)| p.filter()) {
        Ok(v) => v,
        Err(e) => return bad_request(StatusCode::BAD_REQUEST, e),
    };
    if limit == Some(0) {
        return bad_request(StatusCode::BAD_REQUEST, "limit must be at least 1".into());
    }
    let sub = match tap.subscribe(filter) {
        Ok(s) => s,
        Err(e) => return bad_request(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
    };
    let stream = futures::stream::unfold(
        (sub, 0u64, false),
        move |(mut sub, sent, done)| async move {
            if done {
                return None;
            }
            if limit.is_some_and(|l| sent >= l) {
                let end = serde_json::json!({ "events": sent, "dropped": sub.dropped() });
                let ev = Event::default().event("end").data(end.to_string());
                return Some((Ok::<_, std::convert::Infallible>(ev), (sub, sent, true)));
            }
            let e = sub.next().await?;
            let ev = Event::default()
                .event("span")
                .json_data(&e)
                .unwrap_or_else(|_| Event::default().comment("unencodable event"));
            Some((Ok(ev), (sub, sent + 1, false)))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// `GET /api/v1/tap` over `tap`.
pub fn router(tap: Tap) -> Router {
    Router::new()
        .route("/api/v1/tap", get(self::tap))
        .with_state(tap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(service: &str, path: &str, status: i32) -> TapEvent {
        TapEvent {
            time: String::new(),
            trace_id: "t".into(),
            span_id: "s".into(),
            service: service.into(),
            peer: Some("cart".into()),
            kind: "CLIENT".into(),
            method: Some("GET".into()),
            path: Some(path.into()),
            status: Some(status),
            span_status: if status >= 500 { "ERROR" } else { "UNSET" }.into(),
            duration_ms: 1.0,
        }
    }

    #[test]
    fn status_filters_parse_and_refuse_clearly() {
        assert_eq!("503".parse(), Ok(StatusFilter::Code(503)));
        assert_eq!("5xx".parse(), Ok(StatusFilter::Class(5)));
        assert_eq!("Error".parse(), Ok(StatusFilter::Error));
        for bad in ["9xx", "abc", "42", ""] {
            let e = bad.parse::<StatusFilter>().unwrap_err();
            assert!(e.contains("class (5xx)"), "{e}");
        }
    }

    #[test]
    fn filters_match_every_field_given() {
        let f = TapFilter {
            service: Some("frontend".into()),
            path_prefix: Some("/cart".into()),
            status: Some(StatusFilter::Class(5)),
            method: Some("get".into()),
            ..TapFilter::default()
        };
        assert!(f.matches(&event("frontend", "/cart/1", 503)));
        assert!(!f.matches(&event("frontend", "/cart/1", 200)));
        assert!(!f.matches(&event("frontend", "/pay", 503)));
        assert!(!f.matches(&event("checkout", "/cart", 503)));
        assert!(TapFilter::default().matches(&event("x", "/", 200)));
    }

    #[test]
    fn paths_of_urls_and_targets() {
        assert_eq!(url_path("http://cart:8080/cart/1?x=1"), Some("/cart/1"));
        assert_eq!(url_path("/cart?x"), Some("/cart"));
        assert_eq!(url_path("http://cart"), None);
    }

    /// A batch as ingest stores it: `n` CLIENT spans of frontend to cart (`url.full`), one
    /// SERVER span of cart (from frontend's proxy) and one INTERNAL span.
    fn batch(n: usize) -> RecordBatch {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
        use opentelemetry_proto::tonic::resource::v1::Resource;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, span};
        let kv = |k: &str, v: Value| KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        };
        let s = |v: &str| Value::StringValue(v.into());
        let span = |id: u8, kind: span::SpanKind, attrs: Vec<KeyValue>| Span {
            trace_id: vec![7; 16],
            span_id: vec![id; 8],
            name: "GET".into(),
            kind: kind as i32,
            start_time_unix_nano: 1_764_662_400_000_000_000,
            end_time_unix_nano: 1_764_662_400_002_500_000,
            attributes: attrs,
            ..Default::default()
        };
        let resource = |name: &str, spans: Vec<Span>| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", s(name))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        };
        let clients = (0..n)
            .map(|i| {
                span(
                    i as u8 + 1,
                    span::SpanKind::Client,
                    vec![
                        kv("http.request.method", s("GET")),
                        kv("url.full", s("http://cart:8080/cart/42?x=1")),
                        kv("server.address", s("cart")),
                        kv("http.response.status_code", Value::IntValue(503)),
                    ],
                )
            })
            .collect();
        let server = span(
            200,
            span::SpanKind::Server,
            vec![
                kv("http.route", s("/cart/{id}")),
                kv("meshscope.source_workload", s("frontend")),
                kv("http.response.status_code", Value::IntValue(200)),
            ],
        );
        let internal = span(201, span::SpanKind::Internal, vec![]);
        let req = ExportTraceServiceRequest {
            resource_spans: vec![
                resource("frontend", clients),
                resource("cart", vec![server, internal]),
            ],
        };
        meshscope_proto::convert::spans(&req).unwrap().batch
    }

    #[tokio::test]
    async fn request_spans_reach_the_tappers_that_want_them() {
        let tap = Tap::default();
        // Nobody tapping: nothing is built or counted.
        tap.publish(&batch(3));
        assert_eq!(tap.stats(), TapStats::default());
        let mut all = tap.subscribe(TapFilter::default()).unwrap();
        let mut errors = tap
            .subscribe(TapFilter {
                status: Some(StatusFilter::Error),
                peer: Some("cart".into()),
                ..TapFilter::default()
            })
            .unwrap();
        tap.publish(&batch(1));
        let client = all.next().await.unwrap();
        assert_eq!(client.service, "frontend");
        assert_eq!(client.kind, "CLIENT");
        assert_eq!(client.peer.as_deref(), Some("cart"));
        assert_eq!(client.method.as_deref(), Some("GET"));
        assert_eq!(client.path.as_deref(), Some("/cart/42"));
        assert_eq!(client.status, Some(503));
        assert_eq!(client.duration_ms, 2.5);
        assert_eq!(client.trace_id, "07".repeat(16));
        assert_eq!(client.time, "2025-12-02T08:00:00.000000000Z");
        let server = all.next().await.unwrap();
        assert_eq!(server.kind, "SERVER");
        assert_eq!(server.peer.as_deref(), Some("frontend"));
        assert_eq!(server.path.as_deref(), Some("/cart/{id}"));
        // The INTERNAL span is no request; the 503 is the only error to cart.
        assert!(all.rx.try_recv().is_err());
        assert_eq!(errors.next().await.unwrap().span_id, client.span_id);
        assert!(errors.rx.try_recv().is_err());
        assert_eq!(tap.stats().events, 3);
    }

    /// One span of `service` as a plain SDK exports it: no caller attributes.
    fn sdk_span(service: &str, kind: i32, id: u8, parent: Option<u8>) -> RecordBatch {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
        use opentelemetry_proto::tonic::resource::v1::Resource;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".into(),
                        value: Some(AnyValue {
                            value: Some(Value::StringValue(service.into())),
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        trace_id: vec![9; 16],
                        span_id: vec![id; 8],
                        parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
                        name: "GET /cart".into(),
                        kind,
                        start_time_unix_nano: 1_764_662_400_000_000_000,
                        end_time_unix_nano: 1_764_662_400_001_000_000,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        meshscope_proto::convert::spans(&req).unwrap().batch
    }

    #[tokio::test]
    async fn a_plain_sdk_server_span_is_named_after_the_call_that_reached_meshscope_first() {
        const SERVER: i32 = 2;
        const CLIENT: i32 = 3;
        let tap = Tap::default();
        let mut all = tap.subscribe(TapFilter::default()).unwrap();
        // frontend's call arrives first, then cart's span of it: named.
        tap.publish(&sdk_span("frontend", CLIENT, 1, None));
        tap.publish(&sdk_span("cart", SERVER, 2, Some(1)));
        assert_eq!(all.next().await.unwrap().kind, "CLIENT");
        let served = all.next().await.unwrap();
        assert_eq!(
            (served.service.as_str(), served.peer.as_deref()),
            ("cart", Some("frontend"))
        );
        // A callee span whose call has not arrived (yet): no caller, not a guess.
        tap.publish(&sdk_span("cart", SERVER, 4, Some(3)));
        assert_eq!(all.next().await.unwrap().peer, None);
        // Bounded: past CALLERS calls the oldest is forgotten.
        let mut callers = Callers::default();
        for i in 0..=CALLERS {
            callers.remember(&format!("{i:016x}"), "frontend");
        }
        assert_eq!(callers.by_span.len(), CALLERS);
        assert!(!callers.by_span.contains_key(&format!("{:016x}", 0)));
        assert!(callers.by_span.contains_key(&format!("{CALLERS:016x}")));
    }

    #[test]
    fn a_slow_tapper_loses_events_counted_and_never_blocks() {
        let tap = Tap::default();
        let slow = tap.subscribe(TapFilter::default()).unwrap();
        for _ in 0..QUEUE / 100 + 1 {
            tap.publish(&batch(100));
        }
        let published = (QUEUE / 100 + 1) * 101;
        assert_eq!(slow.dropped(), (published - QUEUE) as u64);
        assert_eq!(tap.stats().dropped, slow.dropped());
        assert_eq!(tap.stats().events, QUEUE as u64);
    }

    #[tokio::test]
    async fn close_ends_every_stream_and_later_ones_at_once() {
        let tap = Tap::new(4);
        let mut a = tap.subscribe(TapFilter::default()).expect("subscribe");
        tap.close();
        assert_eq!(tap.stats().subscribers, 0);
        assert!(a.next().await.is_none(), "an open stream ends");
        let mut b = tap.subscribe(TapFilter::default()).expect("subscribe");
        assert!(b.next().await.is_none(), "a later one ends at once");
    }

    #[test]
    fn subscribers_are_bounded_and_leave_on_drop() {
        let tap = Tap::new(2);
        let a = tap.subscribe(TapFilter::default()).unwrap();
        let _b = tap.subscribe(TapFilter::default()).unwrap();
        assert!(tap.subscribe(TapFilter::default()).is_err());
        assert_eq!(tap.stats().subscribers, 2);
        drop(a);
        assert_eq!(tap.stats().subscribers, 1);
        assert!(tap.subscribe(TapFilter::default()).is_ok());
    }
}
