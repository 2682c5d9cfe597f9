//! Rules evaluated over real stored spans (storage + DataFusion engine in a temp dir) with
//! the clock injected, delivered to a real HTTP receiver on 127.0.0.1; no test sleeps.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use chrono::{DateTime, Utc};
use meshscope_alerts::notify::{SIGNATURE_HEADER, signature};
use meshscope_alerts::rule::RuleSpec;
use meshscope_alerts::{Alerting, AlertsConfig, ManualClock, ReceiverConfig, RecordingSleeper};
use meshscope_proto::Table;
use meshscope_proto::otlp::collector::trace::v1::ExportTraceServiceRequest;
use meshscope_proto::otlp::common::v1::{AnyValue, KeyValue, any_value};
use meshscope_proto::otlp::resource::v1::Resource;
use meshscope_proto::otlp::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use meshscope_query::engine::EngineConfig;
use meshscope_query::{Executor, QueryEngine};
use meshscope_storage::{Storage, StoreConfig};
use reqwest::Method;
use serde_json::{Value, json};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-26T12:00:00Z")
        .expect("t0")
        .with_timezone(&Utc)
}

fn ns(t: DateTime<Utc>) -> u64 {
    t.timestamp_nanos_opt().expect("ns") as u64
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

struct Engine {
    storage: Storage,
    engine: QueryEngine,
    next_id: u64,
}

impl Engine {
    /// An engine over a fresh data directory under the returned temporary one (which also
    /// holds the alert state).
    fn in_temp_dir() -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().expect("tmp");
        let e = Engine::open(&dir.path().join("data"));
        (dir, e)
    }

    fn open(dir: &Path) -> Engine {
        let storage =
            Storage::open(StoreConfig::new(dir), &meshscope_query::DERIVED).expect("storage");
        let executor = Executor::new(2).expect("executor");
        let engine = QueryEngine::new(&storage, executor, EngineConfig::default()).expect("engine");
        Engine {
            storage,
            engine,
            next_id: 1,
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    async fn write(&self, service: &str, spans: Vec<Span>) {
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", service)],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let converted = meshscope_proto::convert::spans(&req).expect("convert");
        self.storage
            .write(Table::Spans, converted.batch)
            .await
            .expect("write");
    }

    /// `n` entry requests to `service` starting at `at`, the first `errors` of them failing.
    /// Returns their trace ids (hex).
    async fn requests(
        &mut self,
        service: &str,
        at: DateTime<Utc>,
        n: usize,
        errors: usize,
    ) -> Vec<String> {
        let mut spans = Vec::new();
        let mut ids = Vec::new();
        for i in 0..n {
            let trace = [self.id().to_be_bytes(), 7u64.to_be_bytes()].concat();
            ids.push(hex::encode(&trace));
            let start = ns(at) + i as u64 * 1_000_000;
            spans.push(Span {
                trace_id: trace,
                span_id: self.id().to_be_bytes().to_vec(),
                name: "GET /cart".into(),
                kind: SERVER,
                start_time_unix_nano: start,
                end_time_unix_nano: start + 5_000_000,
                status: Some(Status {
                    code: if i < errors { 2 } else { 1 },
                    message: String::new(),
                }),
                ..Default::default()
            });
        }
        self.write(service, spans).await;
        ids
    }

    /// One call from `from` to `to` at `at` (a CLIENT span and its SERVER child).
    async fn call(&mut self, from: &str, to: &str, at: DateTime<Utc>) {
        let trace = [self.id().to_be_bytes(), 9u64.to_be_bytes()].concat();
        let client_id = self.id().to_be_bytes().to_vec();
        let start = ns(at);
        let client = Span {
            trace_id: trace.clone(),
            span_id: client_id.clone(),
            name: "call".into(),
            kind: CLIENT,
            start_time_unix_nano: start,
            end_time_unix_nano: start + 3_000_000,
            ..Default::default()
        };
        let server = Span {
            trace_id: trace,
            span_id: self.id().to_be_bytes().to_vec(),
            parent_span_id: client_id,
            name: "handle".into(),
            kind: SERVER,
            start_time_unix_nano: start + 100_000,
            end_time_unix_nano: start + 2_000_000,
            ..Default::default()
        };
        self.write(from, vec![client]).await;
        self.write(to, vec![server]).await;
    }
}

/// What the receiver got.
#[derive(Clone, Default)]
struct Received {
    bodies: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    /// Answer 500 to this many requests first.
    fail_first: Arc<AtomicUsize>,
    hits: Arc<AtomicUsize>,
}

impl Received {
    fn bodies(&self) -> Vec<Value> {
        self.bodies
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }
}

async fn hook(State(r): State<Received>, headers: HeaderMap, body: Bytes) -> StatusCode {
    r.hits.fetch_add(1, Ordering::SeqCst);
    if r.fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let secret_ok = match headers.get(SIGNATURE_HEADER) {
        Some(sig) => sig.to_str().ok() == Some(signature("s3cret", &body).as_str()),
        None => true,
    };
    if !secret_ok {
        return StatusCode::UNAUTHORIZED;
    }
    let v: Value = serde_json::from_slice(&body).expect("JSON body");
    r.bodies.lock().expect("lock").push((headers, v));
    StatusCode::OK
}

/// A webhook receiver on 127.0.0.1:0.
async fn receiver() -> (SocketAddr, Received) {
    let received = Received::default();
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(received.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    (addr, received)
}

fn error_rule(for_secs: u64) -> RuleSpec {
    toml::from_str(&format!(
        r#"name = "checkout-errors"
           signal = "error_rate"
           service = "checkout"
           threshold = 0.1
           window-secs = 60
           for-secs = {for_secs}
           severity = "critical"
           labels = {{ team = "payments" }}
           annotations = {{ summary = "{{{{ $labels.service }}}} fails {{{{ $value }}}} of requests" }}"#
    ))
    .expect("rule")
}

/// The alerts API served on a test port.
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    /// One request: its status and its JSON body (`Null` when it has none).
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// Rules written as the alerts file's `[[r]]` tables.
fn rules_toml(text: &str) -> Vec<RuleSpec> {
    toml::from_str::<BTreeMap<String, Vec<RuleSpec>>>(text)
        .expect("rules")
        .remove("r")
        .expect("r")
}

fn config(addr: SocketAddr, rules: Vec<RuleSpec>) -> AlertsConfig {
    let mut r = ReceiverConfig::webhook("ops", &format!("http://{addr}/hook"));
    r.hmac_secret = Some("s3cret".into());
    r.initial_backoff_ms = 100;
    r.max_backoff_ms = 1000;
    r.timeout_secs = 5;
    AlertsConfig {
        evaluation_interval_secs: 15,
        rules,
        receivers: vec![r],
        ..Default::default()
    }
}

async fn alerting(
    e: &Engine,
    dir: &Path,
    config: AlertsConfig,
    clock: &ManualClock,
    sleeper: RecordingSleeper,
) -> Alerting {
    Alerting::open(
        e.engine.clone(),
        dir,
        config,
        "http://meshscope.test:8080".into(),
        Arc::new(clock.clone()),
        Arc::new(sleeper),
    )
    .await
    .expect("alerting")
}

/// Alerting on the clock `clock` with one error-rate rule (`error_rule(0)`) and no real waits.
async fn error_alerting(e: &Engine, dir: &Path, addr: SocketAddr, clock: &ManualClock) -> Alerting {
    alerting(
        e,
        dir,
        config(addr, vec![error_rule(0)]),
        clock,
        RecordingSleeper::default(),
    )
    .await
}

/// Alerting at `t0()` with the test receiver at `addr`, the given rules and no real waits.
async fn alerting_at_t0(
    e: &Engine,
    dir: &Path,
    addr: SocketAddr,
    rules: Vec<RuleSpec>,
) -> (Alerting, ManualClock) {
    let clock = ManualClock::new(t0());
    let a = alerting(
        e,
        dir,
        config(addr, rules),
        &clock,
        RecordingSleeper::default(),
    )
    .await;
    (a, clock)
}

fn states(a: &Alerting) -> Vec<String> {
    a.alerts()
        .values()
        .map(|x| x.state.name().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_firing_resolved_with_exactly_one_notification_each() {
    let (dir, mut e) = Engine::in_temp_dir();
    let (addr, got) = receiver().await;
    // 20 requests in the 30 s before t0, 8 of them failing (40% > 10%).
    let traces = e
        .requests("checkout", t0() - chrono::Duration::seconds(30), 20, 8)
        .await;
    let (a, clock) = alerting_at_t0(&e, dir.path(), addr, vec![error_rule(30)]).await;

    assert_eq!(a.evaluate().await, 1);
    assert_eq!(states(&a), vec!["pending"]);
    assert_eq!(a.deliver().await, 0, "nothing is sent for a pending alert");

    clock.advance(Duration::from_secs(15));
    a.evaluate().await;
    assert_eq!(states(&a), vec!["pending"], "for is 30 s");

    clock.advance(Duration::from_secs(15));
    a.evaluate().await;
    assert_eq!(states(&a), vec!["firing"]);
    assert_eq!(a.deliver().await, 1);
    assert_eq!(a.deliver().await, 0, "de-duplicated: already told");
    a.evaluate().await;
    assert_eq!(a.deliver().await, 0, "still firing, still told");

    // The failing requests leave the 60 s window 90 s after they started.
    clock.advance(Duration::from_secs(45));
    a.evaluate().await;
    assert_eq!(states(&a), vec!["resolved"]);
    assert_eq!(a.deliver().await, 1);
    a.evaluate().await;
    assert_eq!(a.deliver().await, 0);

    let bodies = got.bodies();
    assert_eq!(bodies.len(), 2, "one firing and one resolved: {bodies:#?}");
    let (firing, resolved) = (&bodies[0], &bodies[1]);
    assert_eq!(firing["version"], "4");
    assert_eq!(firing["status"], "firing");
    assert_eq!(firing["receiver"], "ops");
    assert_eq!(firing["groupKey"], "{}:{alertname=\"checkout-errors\"}");
    assert_eq!(firing["externalURL"], "http://meshscope.test:8080");
    assert_eq!(firing["commonLabels"]["severity"], "critical");
    let alert = &firing["alerts"][0];
    assert_eq!(alert["labels"]["alertname"], "checkout-errors");
    assert_eq!(alert["labels"]["service"], "checkout");
    assert_eq!(alert["labels"]["team"], "payments");
    assert_eq!(alert["annotations"]["value"], "0.4");
    assert_eq!(alert["annotations"]["threshold"], "0.1");
    assert_eq!(
        alert["annotations"]["summary"],
        "checkout fails 0.4 of requests"
    );
    assert_eq!(alert["startsAt"], "2026-11-26T12:00:30.000Z");
    assert_eq!(alert["endsAt"], "0001-01-01T00:00:00Z");
    let exemplars: Vec<&str> = alert["annotations"]["exemplar_trace_ids"]
        .as_str()
        .expect("exemplars")
        .split(',')
        .collect();
    assert_eq!(exemplars.len(), 5);
    for x in &exemplars {
        assert!(
            traces[..8].contains(&x.to_string()),
            "{x} is not a failing request's trace"
        );
    }
    assert_eq!(resolved["status"], "resolved");
    assert_eq!(resolved["alerts"][0]["status"], "resolved");
    assert_eq!(resolved["alerts"][0]["endsAt"], "2026-11-26T12:01:15.000Z");
    assert_eq!(resolved["alerts"][0]["fingerprint"], alert["fingerprint"]);

    // Every attempt is in the log, signed.
    let log = a.deliveries();
    assert_eq!(log.len(), 2);
    assert!(
        log.iter()
            .all(|d| d.ok && d.attempt == 1 && d.http_status == Some(200))
    );
    let sig = got.bodies.lock().expect("lock")[0]
        .0
        .get(SIGNATURE_HEADER)
        .map(|v| v.to_str().expect("ascii").to_string());
    assert!(sig.is_some_and(|s| s.starts_with("sha256=") && s.len() == 7 + 64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_with_exponential_backoff() {
    let (dir, mut e) = Engine::in_temp_dir();
    let (addr, got) = receiver().await;
    got.fail_first.store(3, Ordering::SeqCst);
    e.requests("checkout", t0() - chrono::Duration::seconds(10), 10, 5)
        .await;
    let clock = ManualClock::new(t0());
    let sleeper = RecordingSleeper::default();
    let a = alerting(
        &e,
        dir.path(),
        config(addr, vec![error_rule(0)]),
        &clock,
        sleeper.clone(),
    )
    .await;
    a.evaluate().await;
    assert_eq!(a.deliver().await, 1);
    assert_eq!(
        sleeper.waits(),
        vec![
            Duration::from_millis(100),
            Duration::from_millis(200),
            Duration::from_millis(400)
        ]
    );
    assert_eq!(got.hits.load(Ordering::SeqCst), 4);
    assert_eq!(got.bodies().len(), 1);
    let log = a.deliveries();
    let summary: Vec<(u32, bool, Option<u16>)> = log
        .iter()
        .map(|d| (d.attempt, d.ok, d.http_status))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, false, Some(500)),
            (2, false, Some(500)),
            (3, false, Some(500)),
            (4, true, Some(200))
        ]
    );

    // A receiver that never answers 2xx: max-attempts tries, then the next round tries again.
    got.fail_first.store(100, Ordering::SeqCst);
    let mut cfg = config(addr, vec![error_rule(0)]);
    cfg.receivers[0].max_attempts = 3;
    let dir2 = tempfile::tempdir().expect("tmp");
    let b = alerting(&e, dir2.path(), cfg, &clock, RecordingSleeper::default()).await;
    b.evaluate().await;
    assert_eq!(b.deliver().await, 0);
    assert_eq!(b.deliveries().len(), 3);
    assert_eq!(b.deliver().await, 0);
    assert_eq!(b.deliveries().len(), 6, "still owed, tried again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_neither_loses_nor_repeats_a_firing_alert() {
    let (dir, mut e) = Engine::in_temp_dir();
    let (addr, got) = receiver().await;
    e.requests("checkout", t0() - chrono::Duration::seconds(10), 10, 5)
        .await;
    let clock = ManualClock::new(t0());
    {
        let a = error_alerting(&e, dir.path(), addr, &clock).await;
        a.evaluate().await;
        assert_eq!(a.deliver().await, 1);
    } // "crash": the process is gone, only the files remain.
    let b = error_alerting(&e, dir.path(), addr, &clock).await;
    assert_eq!(states(&b), vec!["firing"], "the firing alert survived");
    clock.advance(Duration::from_secs(15));
    b.evaluate().await;
    assert_eq!(b.deliver().await, 0, "not sent twice");
    assert_eq!(b.deliveries().len(), 1, "the attempt log survived too");
    clock.advance(Duration::from_secs(120));
    b.evaluate().await;
    assert_eq!(b.deliver().await, 1);
    let statuses: Vec<Value> = got.bodies().iter().map(|b| b["status"].clone()).collect();
    assert_eq!(statuses, vec![json!("firing"), json!("resolved")]);

    // A restart between firing and delivery delivers after the restart.
    let dir2 = tempfile::tempdir().expect("tmp");
    clock.set(t0());
    {
        let a = error_alerting(&e, dir2.path(), addr, &clock).await;
        a.evaluate().await;
    }
    let c = error_alerting(&e, dir2.path(), addr, &clock).await;
    assert_eq!(c.deliver().await, 1, "the owed notification was not lost");
    assert_eq!(got.bodies().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structural_and_sql_rules() {
    let (dir, mut e) = Engine::in_temp_dir();
    let (addr, got) = receiver().await;
    let before = t0() - chrono::Duration::seconds(90);
    let now = t0() - chrono::Duration::seconds(30);
    e.call("frontend", "cart", before).await;
    e.call("frontend", "cart", now).await;
    e.call("frontend", "payments", now).await; // new this window
    e.call("search", "index", before).await; // gone this window
    let rules: Vec<RuleSpec> = rules_toml(
        r#"
        [[r]]
        name = "new-edge"
        kind = "edge-appeared"
        window-secs = 60
        [[r]]
        name = "gone-edge"
        kind = "edge-vanished"
        window-secs = 60
        [[r]]
        name = "busy"
        sql = "SELECT service_name AS service, count(*) AS value, max(trace_id) AS trace_id FROM spans WHERE span_kind = 'SERVER' GROUP BY service_name HAVING count(*) >= 2"
        "#,
    );
    let (a, _clock) = alerting_at_t0(&e, dir.path(), addr, rules).await;
    a.evaluate().await;
    let alerts = a.alerts();
    let by_rule = |r: &str| -> Vec<BTreeMap<String, String>> {
        alerts
            .values()
            .filter(|x| x.rule == r)
            .map(|x| x.labels.clone())
            .collect()
    };
    let new = by_rule("new-edge");
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(
        (new[0]["source"].as_str(), new[0]["target"].as_str()),
        ("frontend", "payments")
    );
    let gone = by_rule("gone-edge");
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(
        (gone[0]["source"].as_str(), gone[0]["target"].as_str()),
        ("search", "index")
    );
    let busy = by_rule("busy");
    assert_eq!(busy.len(), 1, "only cart has two server spans: {busy:?}");
    assert_eq!(busy[0]["service"], "cart");
    let busy_alert = alerts.values().find(|x| x.rule == "busy").expect("busy");
    assert_eq!(busy_alert.evidence.value, Some(2.0));
    assert_eq!(busy_alert.evidence.exemplar_trace_ids.len(), 1);
    let new_alert = alerts.values().find(|x| x.rule == "new-edge").expect("new");
    assert_eq!(
        new_alert.evidence.exemplar_trace_ids.len(),
        1,
        "the new edge's one trace"
    );

    assert_eq!(a.deliver().await, 3, "one group per alertname");
    assert_eq!(got.bodies().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_validates_persists_and_protects_config_rules() {
    let (dir, mut e) = Engine::in_temp_dir();
    e.requests("checkout", t0(), 1, 0).await;
    let (addr, _got) = receiver().await;
    let (a, clock) = alerting_at_t0(&e, dir.path(), addr, vec![error_rule(0)]).await;
    let app = meshscope_alerts::api::router(a.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    let api = Api {
        http: reqwest::Client::new(),
        base: format!("http://{api}"),
    };
    let post = |body: Value| api.call(Method::POST, "/api/v1/alerts/rules", Some(body));

    let (status, v) =
        post(json!({"name": "bad-sql", "kind": "sql", "sql": "SELECT nope FROM spans"})).await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().expect("error").contains("bad SQL"),
        "{v}"
    );
    assert!(
        v["problems"][0].as_str().expect("p").contains("nope"),
        "{v}"
    );

    let (status, v) = post(json!({"name": "writes", "sql": "DROP TABLE spans"})).await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().expect("error").contains("read-only"),
        "{v}"
    );

    let (status, v) = post(json!({"name": "x", "signal": "latency", "threshold": 1})).await;
    assert_eq!(status, 400);
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("unknown signal \"latency\""),
        "{v}"
    );

    let (status, v) = post(json!({"name": "ghost-latency", "signal": "p99_ms", "service": "ghost", "threshold": 250, "for-secs": 60})).await;
    assert_eq!(status, 201);
    assert!(
        v["warnings"][0]
            .as_str()
            .expect("warning")
            .contains("\"ghost\" has sent no spans"),
        "{v}"
    );
    assert_eq!(v["rule"]["origin"], "api");

    let (status, _) =
        post(json!({"name": "ghost-latency", "signal": "rate", "threshold": 1})).await;
    assert_eq!(status, 409, "duplicate");

    let (status, _) = api
        .call(
            Method::PUT,
            "/api/v1/alerts/rules/ghost-latency",
            Some(json!({"signal": "p95_ms", "service": "checkout", "threshold": 100})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, v) = api
        .call(Method::GET, "/api/v1/alerts/rules/ghost-latency", None)
        .await;
    assert_eq!(v["signal"], "p95_ms");

    let (status, _) = api
        .call(Method::DELETE, "/api/v1/alerts/rules/checkout-errors", None)
        .await;
    assert_eq!(status, 409, "config rules change in the config file");
    let (status, _) = api
        .call(Method::GET, "/api/v1/alerts/rules/nope", None)
        .await;
    assert_eq!(status, 404);

    // API-made rules survive a restart.
    let b = error_alerting(&e, dir.path(), addr, &clock).await;
    let names: Vec<String> = b.rules().iter().map(|(r, _)| r.name.clone()).collect();
    assert_eq!(names, vec!["checkout-errors", "ghost-latency"]);

    let (status, _) = api
        .call(Method::DELETE, "/api/v1/alerts/rules/ghost-latency", None)
        .await;
    assert_eq!(status, 204);
    let (_, list) = api.call(Method::GET, "/api/v1/alerts/rules", None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    a.evaluate().await;
    let (_, v) = api
        .call(Method::GET, "/api/v1/alerts?state=firing", None)
        .await;
    assert_eq!(
        v.as_array().map(Vec::len),
        Some(0),
        "one good request: no alert"
    );
    let (status, _) = api
        .call(Method::GET, "/api/v1/alerts?state=bogus", None)
        .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_json_format_and_deleting_a_rule_resolves_its_alerts() {
    let (dir, mut e) = Engine::in_temp_dir();
    let (addr, got) = receiver().await;
    let traces = e
        .requests("checkout", t0() - chrono::Duration::seconds(10), 10, 6)
        .await;
    let clock = ManualClock::new(t0());
    let mut cfg = config(addr, vec![]);
    cfg.receivers[0].format = meshscope_alerts::Format::Json;
    let a = alerting(&e, dir.path(), cfg, &clock, RecordingSleeper::default()).await;
    let mut spec = error_rule(0);
    spec.name = "made-by-api".into();
    let (_, warnings) = a.create_rule(spec).await.expect("create");
    assert!(warnings.is_empty(), "{warnings:?}");
    a.evaluate().await;
    assert_eq!(a.deliver().await, 1);
    a.delete_rule("made-by-api").await.expect("delete");
    assert_eq!(states(&a), vec!["resolved"]);
    assert_eq!(a.deliver().await, 1);
    let bodies = got.bodies();
    assert_eq!(bodies.len(), 2);
    let firing = &bodies[0];
    assert_eq!(firing["status"], "firing");
    let alert = &firing["alerts"][0];
    assert_eq!(alert["rule"], "made-by-api");
    assert_eq!(alert["state"], "firing");
    assert_eq!(alert["evidence"]["value"], 0.6);
    assert_eq!(alert["evidence"]["threshold"], 0.1);
    assert_eq!(alert["evidence"]["signal"], "error_rate");
    let ids = alert["evidence"]["exemplar_trace_ids"]
        .as_array()
        .expect("ids");
    assert_eq!(ids.len(), 5);
    assert!(
        ids.iter()
            .all(|i| traces[..6].iter().any(|t| Some(t.as_str()) == i.as_str()))
    );
    assert_eq!(bodies[1]["status"], "resolved");
    assert_eq!(
        bodies[1]["alerts"][0]["ends_at"],
        "2026-11-26T12:00:00.000Z"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_hangs_times_out_and_is_recorded() {
    // The one test that waits for real: a 1 s per-attempt timeout against a receiver that
    // never answers.
    let hang = Router::new().route(
        "/hook",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::OK
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, hang).await });
    let (dir, mut e) = Engine::in_temp_dir();
    e.requests("checkout", t0() - chrono::Duration::seconds(10), 10, 5)
        .await;
    let clock = ManualClock::new(t0());
    let mut cfg = config(addr, vec![error_rule(0)]);
    cfg.receivers[0].timeout_secs = 1;
    cfg.receivers[0].max_attempts = 2;
    let sleeper = RecordingSleeper::default();
    let a = alerting(&e, dir.path(), cfg, &clock, sleeper.clone()).await;
    a.evaluate().await;
    let started = std::time::Instant::now();
    assert_eq!(a.deliver().await, 0);
    assert!(started.elapsed() < Duration::from_secs(10));
    let log = a.deliveries();
    assert_eq!(log.len(), 2);
    for d in &log {
        assert!(!d.ok);
        assert_eq!(d.http_status, None);
        assert_eq!(d.error.as_deref(), Some("timed out after 1s"), "{d:?}");
    }
    assert_eq!(sleeper.waits(), vec![Duration::from_millis(100)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_edges_and_falling_rates() {
    let (dir, mut e) = Engine::in_temp_dir();
    let (addr, _got) = receiver().await;
    // checkout: 20 requests in the window before, 4 in this one (an 80% drop); all on
    // the endpoint "GET /cart", 2 of the recent 4 failing.
    e.requests("checkout", t0() - chrono::Duration::seconds(90), 20, 0)
        .await;
    let recent = e
        .requests("checkout", t0() - chrono::Duration::seconds(30), 4, 2)
        .await;
    // search: traffic before, none now.
    e.requests("search", t0() - chrono::Duration::seconds(90), 5, 0)
        .await;
    e.call("frontend", "cart", t0() - chrono::Duration::seconds(20))
        .await;
    let rules: Vec<RuleSpec> = rules_toml(
        r#"
        [[r]]
        name = "drop"
        signal = "rate_drop"
        window-secs = 60
        threshold = 0.5
        [[r]]
        name = "silent"
        signal = "rate"
        service = "search"
        op = "<"
        threshold = 0.01
        window-secs = 60
        [[r]]
        name = "endpoint-errors"
        signal = "error_rate"
        service = "checkout"
        endpoint = "GET /cart"
        threshold = 0.25
        window-secs = 60
        [[r]]
        name = "edge-slow"
        signal = "p95_ms"
        source = "frontend"
        target = "cart"
        threshold = 2.0
        window-secs = 60
        "#,
    );
    let (a, _clock) = alerting_at_t0(&e, dir.path(), addr, rules).await;
    a.evaluate().await;
    let alerts = a.alerts();
    let of = |rule: &str| -> Vec<&meshscope_alerts::eval::Alert> {
        alerts.values().filter(|x| x.rule == rule).collect()
    };
    let mut drops: Vec<(&str, Option<f64>)> = of("drop")
        .iter()
        .map(|x| (x.labels["service"].as_str(), x.evidence.value))
        .collect();
    drops.sort_by(|x, y| x.0.cmp(y.0));
    assert_eq!(drops, vec![("checkout", Some(0.8)), ("search", Some(1.0))]);
    let silent = of("silent");
    assert_eq!(silent.len(), 1);
    assert_eq!(silent[0].evidence.value, Some(0.0));
    let ep = of("endpoint-errors");
    assert_eq!(ep.len(), 1);
    assert_eq!(ep[0].labels["endpoint"], "GET /cart");
    assert_eq!(ep[0].evidence.value, Some(0.5));
    assert_eq!(ep[0].evidence.exemplar_trace_ids.len(), 2);
    assert!(
        ep[0]
            .evidence
            .exemplar_trace_ids
            .iter()
            .all(|t| recent[..2].contains(t))
    );
    let slow = of("edge-slow");
    assert_eq!(slow.len(), 1);
    assert_eq!(slow[0].evidence.value, Some(3.0));
    assert_eq!(slow[0].evidence.exemplar_trace_ids.len(), 1);
}
