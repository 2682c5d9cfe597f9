//! What the proxy reports about each request: a span, request metrics and an access-log
//! record, all OTLP, sent by [`export::Exporter`] in batches.
//!
//! The request path never waits for telemetry: it counts the request in the metrics and
//! pushes the finished request into a bounded queue with `try_send`; the exporter, off the
//! request path, makes its span and access-log record. When the queue is full (the
//! collector is slow or down) the request's span and log record are dropped and counted
//! in [`Stats`] (`/stats` and `/metrics` on the admin address).

pub mod export;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{Span, Status, span, status};
use tokio::sync::mpsc;

use crate::config::{ServiceIdentity, TelemetryConfig};
use crate::layers::Decisions;
use crate::layers::trace::TraceContext;
use crate::tls::PeerSecurity;

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(crate) fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

fn int_kv(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// The side of the proxy a request crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From another service (or a user) to the local app: a SERVER span.
    Inbound,
    /// From the local app to a destination: a CLIENT span.
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
    fn reporter(self) -> &'static str {
        match self {
            Direction::Inbound => "destination",
            Direction::Outbound => "source",
        }
    }
}

/// One finished request, as the trace layer saw it.
#[derive(Debug, Clone)]
pub struct Finished {
    pub direction: Direction,
    pub context: TraceContext,
    pub start: SystemTime,
    pub duration: Duration,
    pub method: http::Method,
    pub path: String,
    pub authority: Option<String>,
    pub status: u16,
    /// The calling workload, when known (outbound: this proxy's; inbound: from the
    /// caller's proxy).
    pub source_workload: Option<Arc<str>>,
    pub destination_service: Arc<str>,
    pub db_system: Option<Arc<str>>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub peer: Option<SocketAddr>,
    pub decisions: Decisions,
    /// How the connection was secured: inbound, the caller's; outbound, the one to the
    /// endpoint (`None`: the proxy answered before connecting).
    pub security: Option<PeerSecurity>,
    /// Outbound: the destination's route that matched the request (`meshscope.route`).
    pub route: Option<Arc<str>>,
    /// `primary` or `shadow` when the request was mirrored (`meshscope.mirror`).
    pub mirror: Option<&'static str>,
    /// FNV-1a of the response body, for mirrored requests (`meshscope.body_hash`).
    pub body_hash: Option<u64>,
}

impl Finished {
    /// `mutual_tls`, `none`, or `unknown`.
    pub fn security_policy(&self) -> &'static str {
        match &self.security {
            Some(s) if s.mtls => "mutual_tls",
            Some(_) => "none",
            None => "unknown",
        }
    }
}

/// Counters of the telemetry pipeline itself.
#[derive(Debug, Default)]
pub struct Stats {
    pub spans_exported: AtomicU64,
    pub logs_exported: AtomicU64,
    pub spans_dropped: AtomicU64,
    pub logs_dropped: AtomicU64,
    pub metric_exports: AtomicU64,
    pub export_failures: AtomicU64,
}

impl Stats {
    pub fn json(&self) -> serde_json::Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "spans_exported": l(&self.spans_exported),
            "logs_exported": l(&self.logs_exported),
            "spans_dropped": l(&self.spans_dropped),
            "logs_dropped": l(&self.logs_dropped),
            "metric_exports": l(&self.metric_exports),
            "export_failures": l(&self.export_failures),
        })
    }
}

/// A finished request as the request path hands it to the exporter, which makes its span
/// and access log: the request path pays one allocation and a queue push for them.
pub(crate) struct Record {
    finished: Finished,
    destination_workload: Arc<str>,
    version: Arc<str>,
    source_principal: Option<Arc<str>>,
    destination_principal: Option<Arc<str>>,
}

/// The handle the request path records through (cheap to clone).
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    identity: ServiceIdentity,
    workload: Arc<str>,
    resource: Resource,
    queue: Option<mpsc::Sender<Box<Record>>>,
    access_logs: bool,
    registry: Arc<metrics::Registry>,
    stats: Stats,
    /// This proxy's SPIFFE ID, once it has a certificate.
    principal: std::sync::OnceLock<Arc<str>>,
}

impl Telemetry {
    /// The handle and the exporter that drains its queue (run it with
    /// [`export::Exporter::run`]).
    pub fn new(
        identity: &ServiceIdentity,
        config: &TelemetryConfig,
    ) -> (Telemetry, export::Exporter) {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let mut attributes = vec![
            string_kv("service.name", &identity.name),
            string_kv("telemetry.sdk.name", "meshscope-proxy"),
        ];
        if let Some(ns) = &identity.namespace {
            attributes.push(string_kv("service.namespace", ns));
        }
        if let Some(v) = &identity.version {
            attributes.push(string_kv("service.version", v));
        }
        attributes.push(string_kv("meshscope.workload", identity.workload()));
        let resource = Resource {
            attributes,
            ..Default::default()
        };
        let telemetry = Telemetry {
            inner: Arc::new(Inner {
                identity: identity.clone(),
                workload: Arc::from(identity.workload()),
                resource: resource.clone(),
                queue: config.otlp_endpoint.is_some().then_some(tx),
                access_logs: config.access_logs,
                registry: Arc::default(),
                stats: Stats::default(),
                principal: std::sync::OnceLock::new(),
            }),
        };
        let exporter = export::Exporter::new(config.clone(), resource, rx, telemetry.clone());
        (telemetry, exporter)
    }

    /// Names this proxy's own SPIFFE ID in its telemetry (set once, at start).
    pub fn set_principal(&self, id: &str) {
        let _ = self.inner.principal.set(Arc::from(id));
    }

    /// Whether this proxy has a mesh identity (a certificate).
    pub fn has_identity(&self) -> bool {
        self.inner.principal.get().is_some()
    }

    /// (source, destination) principals of a request: the peer's from its certificate,
    /// this proxy's own when the connection was mTLS.
    fn principals(&self, f: &Finished) -> (Option<Arc<str>>, Option<Arc<str>>) {
        let Some(sec) = f.security.as_ref().filter(|s| s.mtls) else {
            return (None, None);
        };
        let own = self.inner.principal.get().cloned();
        let peer = sec.peer.as_ref().map(|p| Arc::from(p.to_string().as_str()));
        match f.direction {
            Direction::Inbound => (peer, own),
            Direction::Outbound => (own, peer),
        }
    }

    pub fn workload(&self) -> &Arc<str> {
        &self.inner.workload
    }

    pub fn service(&self) -> &str {
        &self.inner.identity.name
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    pub fn registry(&self) -> &Arc<metrics::Registry> {
        &self.inner.registry
    }

    pub fn resource(&self) -> &Resource {
        &self.inner.resource
    }

    pub fn in_flight(&self, direction: Direction, destination: &Arc<str>) -> metrics::InFlight {
        self.inner
            .registry
            .in_flight(direction.as_str(), destination)
    }

    /// Records one finished request: metrics now; the request into the queue, for the
    /// exporter to make its span and log record.
    pub fn record(&self, f: Finished) {
        let d = &f.decisions;
        let (dest_workload, version) = match &d.chosen {
            Some(c) => (Arc::clone(&c.workload), Arc::clone(&c.version)),
            None => match f.direction {
                Direction::Inbound => (
                    Arc::clone(&self.inner.workload),
                    Arc::from(self.inner.identity.version.as_deref().unwrap_or("unknown")),
                ),
                Direction::Outbound => (Arc::clone(&f.destination_service), Arc::from("unknown")),
            },
        };
        let (source_principal, destination_principal) = self.principals(&f);
        self.inner.registry.observe(
            metrics::SeriesKey {
                reporter: f.direction.reporter(),
                source_workload: f.source_workload.clone(),
                destination_workload: Arc::clone(&dest_workload),
                destination_service: Arc::clone(&f.destination_service),
                destination_version: Arc::clone(&version),
                response_code: f.status,
                connection_security_policy: f.security_policy(),
                source_principal: source_principal.clone(),
                destination_principal: destination_principal.clone(),
                authz: d
                    .authz
                    .filter(|z| *z != crate::layers::authz::AuthzDecision::Allow)
                    .map(|z| z.as_str()),
                mirror: f.mirror.filter(|m| *m == "shadow"),
            },
            f.duration,
        );
        let Some(queue) = &self.inner.queue else {
            return;
        };
        let record = Box::new(Record {
            finished: f,
            destination_workload: dest_workload,
            version,
            source_principal,
            destination_principal,
        });
        if queue.try_send(record).is_err() {
            let stats = &self.inner.stats;
            stats.spans_dropped.fetch_add(1, Ordering::Relaxed);
            if self.inner.access_logs {
                stats.logs_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The span and (when access logs are on) the access log of a recorded request; the
    /// exporter calls this, off the request path.
    pub(crate) fn render(&self, r: &Record, spans: &mut Vec<Span>, logs: &mut Vec<LogRecord>) {
        let f = &r.finished;
        spans.push(self.span(f, &r.version, &r.source_principal, &r.destination_principal));
        if self.inner.access_logs {
            logs.push(self.access_log(
                f,
                &r.destination_workload,
                &r.version,
                &r.source_principal,
                &r.destination_principal,
            ));
        }
    }

    fn span(
        &self,
        f: &Finished,
        version: &str,
        source_principal: &Option<Arc<str>>,
        destination_principal: &Option<Arc<str>>,
    ) -> Span {
        let start = f
            .start
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let d = &f.decisions;
        let mut a = vec![
            string_kv("http.request.method", f.method.as_str()),
            string_kv("url.path", &f.path),
            int_kv("http.response.status_code", i64::from(f.status)),
            string_kv("meshscope.direction", f.direction.as_str()),
            int_kv("meshscope.retries", i64::from(d.retries)),
            string_kv("meshscope.version", version),
        ];
        if let Some(h) = &f.authority {
            a.push(string_kv("server.address", h));
        }
        if f.direction == Direction::Outbound {
            a.push(string_kv("peer.service", &f.destination_service));
            if let Some(db) = &f.db_system {
                a.push(string_kv("db.system", db));
            }
        }
        if let Some(src) = &f.source_workload {
            a.push(string_kv("meshscope.source_workload", src));
        }
        if let Some(r) = &f.route {
            a.push(string_kv("meshscope.route", r));
        }
        if let Some(m) = f.mirror {
            a.push(string_kv("meshscope.mirror", m));
        }
        if let Some(h) = f.body_hash {
            a.push(string_kv("meshscope.body_hash", &format!("{h:016x}")));
        }
        if let Some(u) = &d.upstream {
            a.push(string_kv("network.peer.address", &u.0.ip().to_string()));
            a.push(int_kv("network.peer.port", i64::from(u.0.port())));
        } else if let Some(p) = &f.peer {
            a.push(string_kv("client.address", &p.ip().to_string()));
        }
        if let Some(b) = d.breaker {
            a.push(string_kv("meshscope.breaker_state", b.as_str()));
        }
        if let Some(fault) = &d.fault {
            a.push(string_kv("meshscope.fault", &fault.describe()));
        }
        if d.rate_limited {
            a.push(KeyValue {
                key: "meshscope.rate_limited".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::BoolValue(true)),
                }),
                ..Default::default()
            });
        }
        if d.timed_out {
            a.push(string_kv("error.type", "timeout"));
        }
        if let Some(r) = d.proxy_response {
            a.push(string_kv("meshscope.proxy_response", r));
        }
        if let Some(s) = &f.security {
            a.push(string_kv(
                "meshscope.tls",
                if s.mtls { "mtls" } else { "plaintext" },
            ));
        }
        // The other end's identity, as its certificate proved it.
        let peer_identity = match f.direction {
            Direction::Inbound => source_principal,
            Direction::Outbound => destination_principal,
        };
        if let Some(p) = peer_identity {
            a.push(string_kv("meshscope.peer_identity", p));
        }
        if let Some(z) = d.authz {
            a.push(string_kv("meshscope.authz", z.as_str()));
        }
        // What the resilience layers did, as events at the request's end.
        let end = start + f.duration.as_nanos() as u64;
        let mut events = Vec::new();
        if let Some(e) = d.ejected {
            a.push(string_kv("meshscope.ejected", &e.to_string()));
            events.push(span::Event {
                time_unix_nano: end,
                name: "meshscope.ejection".into(),
                attributes: vec![string_kv("network.peer.address", &e.to_string())],
                ..Default::default()
            });
        }
        if let Some(to) = d.breaker_transition {
            a.push(string_kv("meshscope.breaker_transition", to.as_str()));
            events.push(span::Event {
                time_unix_nano: end,
                name: "meshscope.breaker_transition".into(),
                attributes: vec![string_kv("meshscope.breaker_state", to.as_str())],
                ..Default::default()
            });
        }
        if d.budget_exhausted {
            a.push(KeyValue {
                key: "meshscope.retry_budget_exhausted".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::BoolValue(true)),
                }),
                ..Default::default()
            });
            events.push(span::Event {
                time_unix_nano: end,
                name: "meshscope.retry_budget_exhausted".into(),
                ..Default::default()
            });
        }
        let error = f.status >= 500;
        Span {
            trace_id: f.context.trace_id.to_vec(),
            span_id: f.context.span_id.to_vec(),
            parent_span_id: f.context.parent.map(|p| p.to_vec()).unwrap_or_default(),
            trace_state: f.context.trace_state.clone().unwrap_or_default(),
            flags: 0x100 | u32::from(f.context.flags), // has-is-remote bit + trace flags
            name: format!("{} {}", f.method, f.path),
            kind: match f.direction {
                Direction::Inbound => span::SpanKind::Server as i32,
                Direction::Outbound => span::SpanKind::Client as i32,
            },
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes: a,
            events,
            status: Some(Status {
                code: if error {
                    status::StatusCode::Error as i32
                } else {
                    status::StatusCode::Unset as i32
                },
                message: if error {
                    format!("HTTP {}", f.status)
                } else {
                    String::new()
                },
            }),
            ..Default::default()
        }
    }

    /// The access-log record. Only the source side (outbound) names both ends with
    /// `source_workload`/`destination_workload`, so the graph counts each request once;
    /// the inbound record names its caller `downstream_workload`.
    fn access_log(
        &self,
        f: &Finished,
        dest_workload: &Arc<str>,
        version: &str,
        source_principal: &Option<Arc<str>>,
        destination_principal: &Option<Arc<str>>,
    ) -> LogRecord {
        let d = &f.decisions;
        let ms = f.duration.as_secs_f64() * 1000.0;
        let mut a = vec![
            string_kv("http.request.method", f.method.as_str()),
            string_kv("url.path", &f.path),
            string_kv("response_code", &f.status.to_string()),
            string_kv("duration_ms", &format!("{ms:.3}")),
            int_kv("bytes_received", f.request_bytes as i64),
            int_kv("bytes_sent", f.response_bytes as i64),
            int_kv("retries", i64::from(d.retries)),
            string_kv("direction", f.direction.as_str()),
            string_kv("destination_service_name", &f.destination_service),
            string_kv("destination_version", version),
        ];
        match f.direction {
            Direction::Outbound => {
                a.push(string_kv("source_workload", &self.inner.workload));
                a.push(string_kv("destination_workload", dest_workload));
            }
            Direction::Inbound => {
                if let Some(s) = &f.source_workload {
                    a.push(string_kv("downstream_workload", s));
                }
                a.push(string_kv("local_workload", dest_workload));
            }
        }
        if let Some(u) = &d.upstream {
            a.push(string_kv("upstream_address", &u.0.to_string()));
        }
        if let Some(b) = d.breaker {
            a.push(string_kv("breaker_state", b.as_str()));
        }
        if let Some(fault) = &d.fault {
            a.push(string_kv("fault", &fault.describe()));
        }
        if let Some(r) = d.proxy_response {
            a.push(string_kv("proxy_response", r));
        }
        if let Some(m) = f.mirror {
            a.push(string_kv("mirror", m));
        }
        a.push(string_kv("connection_security_policy", f.security_policy()));
        if let Some(p) = source_principal {
            a.push(string_kv("source_principal", p));
        }
        if let Some(p) = destination_principal {
            a.push(string_kv("destination_principal", p));
        }
        if let Some(z) = d.authz {
            a.push(string_kv("authz", z.as_str()));
        }
        let now = now_ns();
        LogRecord {
            time_unix_nano: now,
            observed_time_unix_nano: now,
            severity_number: if f.status >= 500 {
                SeverityNumber::Warn as i32
            } else {
                SeverityNumber::Info as i32
            },
            severity_text: if f.status >= 500 { "WARN" } else { "INFO" }.into(),
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue(format!(
                    "{} {} {} {:.3}ms {}",
                    f.method,
                    f.path,
                    f.status,
                    ms,
                    f.direction.as_str()
                ))),
            }),
            attributes: a,
            trace_id: f.context.trace_id.to_vec(),
            span_id: f.context.span_id.to_vec(),
            flags: u32::from(f.context.flags),
            event_name: "meshscope.access".into(),
            ..Default::default()
        }
    }
}
