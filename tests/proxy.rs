//! The bundled proxy end to end: real `meshscope serve` (the binary), real proxies (the
//! proxy library in this process) and small apps, all on loopback sockets.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use common::Server;
use common::proxy::{admin_metrics, admin_stats};
use meshscope_proxy::Proxy;
use meshscope_proxy::config::{
    BreakerConfig, Destination, FaultConfig, Policy, ProxyConfig, RetryConfig,
};
use serde_json::Value;

/// A test app: counts hits, fails while `failing` (or every other hit with `flaky`), and
/// calls `next` through its proxy's outbound listener, forwarding `traceparent`.
struct App {
    name: String,
    hits: AtomicU64,
    failing: AtomicBool,
    flaky: bool,
    /// Answers this late.
    delay_ms: AtomicU64,
    next: Option<(String, SocketAddr)>,
}

async fn app_handler(State(app): State<Arc<App>>, req: Request) -> Response {
    let n = app.hits.fetch_add(1, Ordering::SeqCst);
    let delay = app.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if app.failing.load(Ordering::SeqCst) || (app.flaky && n % 2 == 0) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    if let Some((host, outbound)) = &app.next {
        let mut r = reqwest::Client::new()
            .get(format!("http://{outbound}/next"))
            .header("host", host.as_str());
        if let Some(tp) = req.headers().get("traceparent") {
            r = r.header("traceparent", tp.as_bytes());
        }
        let status = r.send().await.map(|r| r.status().as_u16()).unwrap_or(599);
        if status != 200 {
            return (StatusCode::BAD_GATEWAY, "next failed").into_response();
        }
    }
    app.name.clone().into_response()
}

/// The TOML of a "caller" proxy with an outbound and an admin listener, exporting to
/// `server`; tests append their `[[destination]]` tables.
fn caller_toml(server: &Server) -> String {
    format!(
        r#"
[service]
name = "caller"
[listen]
outbound = "127.0.0.1:0"
admin = "127.0.0.1:0"
[telemetry]
otlp-endpoint = "{}"
batch-interval-ms = 200
"#,
        server.grpc_url()
    )
}

/// Binds an app; `serve` it once its proxy is known.
async fn bind_app() -> (tokio::net::TcpListener, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

fn serve_app(l: tokio::net::TcpListener, app: Arc<App>) {
    let router = axum::Router::new().fallback(app_handler).with_state(app);
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
}

fn app(name: &str, next: Option<(String, SocketAddr)>) -> Arc<App> {
    Arc::new(App {
        name: name.into(),
        hits: AtomicU64::new(0),
        failing: AtomicBool::new(false),
        flaky: false,
        delay_ms: AtomicU64::new(0),
        next,
    })
}

fn config(name: &str, app: Option<SocketAddr>, otlp: &str) -> ProxyConfig {
    common::proxy::proxy_config(name, "test", app, otlp)
}

fn dest(name: &str, endpoints: &[(SocketAddr, &str, u32)], policy: Policy) -> Destination {
    common::proxy::destination(name, endpoints, policy)
}

async fn get_via(
    client: &reqwest::Client,
    proxy: SocketAddr,
    host: &str,
) -> (u16, String, Option<String>) {
    let r = client
        .get(format!("http://{proxy}/items"))
        .header("host", host)
        .send()
        .await
        .expect("request through the proxy");
    let status = r.status().as_u16();
    let local = r
        .headers()
        .get("x-meshscope-proxy")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, r.text().await.unwrap_or_default(), local)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_across_three_proxies_is_one_trace_with_edges_and_joined_access_logs() {
    let server = Server::in_temp_dir(&[]);
    let otlp = server.grpc_url();

    // c (leaf) ← b ← a, each behind its own proxy.
    let (lc, c_addr) = bind_app().await;
    let pc = Proxy::start(config("svc-c", Some(c_addr), &otlp), None)
        .await
        .expect("proxy c");
    serve_app(lc, app("svc-c", None));

    let (lb, b_addr) = bind_app().await;
    let mut cb = config("svc-b", Some(b_addr), &otlp);
    cb.destinations = vec![dest(
        "svc-c",
        &[(pc.inbound.expect("in"), "v1", 1)],
        Policy::default(),
    )];
    let pb = Proxy::start(cb, None).await.expect("proxy b");
    serve_app(
        lb,
        app("svc-b", Some(("svc-c".into(), pb.outbound.expect("out")))),
    );

    let (la, a_addr) = bind_app().await;
    let mut ca = config("svc-a", Some(a_addr), &otlp);
    ca.destinations = vec![dest(
        "svc-b",
        &[(pb.inbound.expect("in"), "v1", 1)],
        Policy::default(),
    )];
    let pa = Proxy::start(ca, None).await.expect("proxy a");
    serve_app(
        la,
        app("svc-a", Some(("svc-b".into(), pa.outbound.expect("out")))),
    );

    // The caller speaks h2c to the first proxy; the trace is started by the caller.
    let trace_id = "5b8efff798038103d269b633813fc60c";
    let root = "eee19b7ec3c1b174";
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let r = h2
        .get(format!("http://{}/checkout", pa.inbound.expect("in")))
        .header("traceparent", format!("00-{trace_id}-{root}-01"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.text().await.expect("body"), "svc-a");

    let n = server
        .eventually(
            &format!("SELECT count(*) FROM spans WHERE trace_id = '{trace_id}'"),
            |n| n >= 5,
        )
        .await;
    assert_eq!(n, 5, "SERVER a, CLIENT a→b, SERVER b, CLIENT b→c, SERVER c");
    let v = server
        .sql(&format!(
            "SELECT span_id, parent_span_id, service_name, span_kind, peer_service, http_status_code
             FROM spans WHERE trace_id = '{trace_id}'"
        ))
        .await;
    let spans: HashMap<(String, String), (String, String, Value)> = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                (
                    r[2].as_str().unwrap_or("").to_string(),
                    r[3].as_str().unwrap_or("").to_string(),
                ),
                (
                    r[0].as_str().unwrap_or("").to_string(),
                    r[1].as_str().unwrap_or("").to_string(),
                    r[4].clone(),
                ),
            )
        })
        .collect();
    let id = |s: &str, k: &str| {
        spans
            .get(&(s.to_string(), k.to_string()))
            .unwrap_or_else(|| panic!("{s} {k} in {v}"))
    };
    assert_eq!(
        id("svc-a", "SERVER").1,
        root,
        "the caller's span is the parent"
    );
    assert_eq!(id("svc-a", "CLIENT").1, id("svc-a", "SERVER").0);
    assert_eq!(id("svc-b", "SERVER").1, id("svc-a", "CLIENT").0);
    assert_eq!(id("svc-b", "CLIENT").1, id("svc-b", "SERVER").0);
    assert_eq!(id("svc-c", "SERVER").1, id("svc-b", "CLIENT").0);
    assert_eq!(id("svc-a", "CLIENT").2, "svc-b");
    assert_eq!(id("svc-b", "CLIENT").2, "svc-c");

    // Access logs carry the trace and span ids of their spans.
    let logs = server
        .eventually(
            &format!("SELECT count(*) FROM logs WHERE trace_id = '{trace_id}'"),
            |n| n >= 5,
        )
        .await;
    assert_eq!(logs, 5);
    let joined = server
        .scalar(&format!(
            "SELECT count(*) FROM logs l JOIN spans s ON l.trace_id = s.trace_id AND l.span_id = s.span_id
             WHERE l.trace_id = '{trace_id}' AND l.log_attributes['response_code'] = '200'
               AND l.log_attributes['direction'] = lower(CASE s.span_kind WHEN 'SERVER' THEN 'INBOUND' ELSE 'OUTBOUND' END)"
        ))
        .await;
    assert_eq!(joined, 5, "every record names its own span");
    let edge_logs = server
        .scalar(&format!(
            "SELECT count(*) FROM logs WHERE trace_id = '{trace_id}'
               AND log_attributes['source_workload'] = 'svc-a' AND log_attributes['destination_workload'] = 'svc-b'"
        ))
        .await;
    assert_eq!(edge_logs, 1);

    // Request metrics with both ends, cumulative.
    let m = server.eventually("SELECT count(*) FROM metrics WHERE metric_name = 'meshscope_requests_total'
           AND attributes['source_workload'] = 'svc-b' AND attributes['destination_workload'] = 'svc-c'
           AND attributes['reporter'] = 'source' AND temporality = 'cumulative' AND value = 1",
        |n| n >= 1,
    )
    .await;
    assert!(m >= 1);

    // The graph pairs the spans into edges user → a → b → c.
    let graph: Value = server.get_json("/api/v1/graph").await;
    let edges: Vec<(String, String)> = graph["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap_or("").into(),
                e["target"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    for (s, t) in [("user", "svc-a"), ("svc-a", "svc-b"), ("svc-b", "svc-c")] {
        assert!(
            edges.contains(&(s.into(), t.into())),
            "{s} → {t} in {edges:?}"
        );
    }
    for p in [pa, pb, pc] {
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_hide_a_flaky_upstream_and_are_counted() {
    let server = Server::in_temp_dir(&[]);
    let (l, addr) = bind_app().await;
    let flaky = Arc::new(App {
        name: "flaky".into(),
        hits: AtomicU64::new(0),
        failing: AtomicBool::new(false),
        flaky: true,
        delay_ms: AtomicU64::new(0),
        next: None,
    });
    serve_app(l, Arc::clone(&flaky));
    let mut c = config("caller", None, &server.grpc_url());
    c.destinations = vec![dest(
        "flaky",
        &[(addr, "v1", 1)],
        Policy {
            retry: Some(RetryConfig {
                max_retries: 2,
                backoff_base_ms: 1,
                backoff_max_ms: 5,
                retry_on: vec![503],
                all_methods: false,
                max_body_bytes: 1024,
                budget_ratio: 1.0,
                budget_min_per_sec: 100.0,
            }),
            ..Default::default()
        },
    )];
    let p = Proxy::start(c, None).await.expect("proxy");
    let client = reqwest::Client::new();
    let n = 40;
    for _ in 0..n {
        let (status, body, _) = get_via(&client, p.outbound.expect("out"), "flaky").await;
        assert_eq!(status, 200, "{body}");
    }
    let hits = flaky.hits.load(Ordering::SeqCst);
    assert_eq!(hits, 2 * n, "every other attempt fails: one retry each");
    let retries = server.eventually("SELECT CAST(sum(TRY_CAST(span_attributes['meshscope.retries'] AS BIGINT)) AS BIGINT) FROM spans
          WHERE service_name = 'caller' AND span_kind = 'CLIENT'",
        |r| r == n as i64,
    )
    .await;
    assert_eq!(retries, n as i64);
    let logged = server.eventually("SELECT CAST(sum(TRY_CAST(log_attributes['retries'] AS BIGINT)) AS BIGINT) FROM logs WHERE service_name = 'caller'",
        |r| r == n as i64,
    )
    .await;
    assert_eq!(logged, n as i64);
    p.stop().await;
}

/// The graph's edge `source → target` (default range), `Null` when absent.
async fn graph_edge(server: &Server, source: &str, target: &str) -> Value {
    let graph: Value = server.get_json("/api/v1/graph").await;
    graph["edges"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|e| e["source"] == source && e["target"] == target)
        })
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_breaker_opens_on_failures_and_recovers_through_a_probe() {
    let server = Server::in_temp_dir(&[]);
    let (l, addr) = bind_app().await;
    let upstream = app("fragile", None);
    upstream.failing.store(true, Ordering::SeqCst);
    serve_app(l, Arc::clone(&upstream));
    let mut c = config("caller", None, &server.grpc_url());
    c.destinations = vec![dest(
        "fragile",
        &[(addr, "v1", 1)],
        Policy {
            breaker: Some(BreakerConfig {
                consecutive_failures: 3,
                open_ms: 500,
            }),
            ..Default::default()
        },
    )];
    let p = Proxy::start(c, None).await.expect("proxy");
    let out = p.outbound.expect("out");
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let (status, _, local) = get_via(&client, out, "fragile").await;
        assert_eq!((status, local), (503, None), "the upstream's own failures");
    }
    for _ in 0..5 {
        let (status, _, local) = get_via(&client, out, "fragile").await;
        assert_eq!((status, local.as_deref()), (503, Some("circuit-open")));
    }
    assert_eq!(
        upstream.hits.load(Ordering::SeqCst),
        3,
        "an open breaker spares the upstream"
    );
    assert_eq!(admin_stats(&p).await["breakers"]["fragile"], "open");

    upstream.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body, _) = get_via(&client, out, "fragile").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "fragile"),
        "the half-open probe succeeds"
    );
    assert_eq!(admin_stats(&p).await["breakers"]["fragile"], "closed");
    assert_eq!(get_via(&client, out, "fragile").await.0, 200);

    let states = |s: &'static str| {
        format!(
            "SELECT count(*) FROM spans WHERE service_name = 'caller' AND span_attributes['meshscope.breaker_state'] = '{s}'"
        )
    };
    assert_eq!(server.eventually(&states("open"), |n| n >= 5).await, 5);
    assert_eq!(server.eventually(&states("half_open"), |n| n >= 1).await, 1);
    // The two state changes: the failure that opened it, the probe that closed it.
    let moved = |to: &'static str| {
        format!(
            "SELECT count(*) FROM spans WHERE service_name = 'caller' AND span_attributes['meshscope.breaker_transition'] = '{to}'"
        )
    };
    assert_eq!(server.eventually(&moved("open"), |n| n >= 1).await, 1);
    assert_eq!(server.eventually(&moved("closed"), |n| n >= 1).await, 1);
    let m = admin_metrics(&p).await;
    assert!(
        m.contains("meshscope_proxy_breaker_transitions_total{destination=\"fragile\"} 2"),
        "{m}"
    );
    // …and on the graph's edge, beside the requests the open breaker answered.
    let e = graph_edge(&server, "caller", "fragile").await;
    assert_eq!(
        (e["breaker_opened"].as_u64(), e["breaker_closed"].as_u64()),
        (Some(1), Some(1)),
        "{e}"
    );
    assert_eq!(e["reasons"]["circuit-open"], 5, "{e}");
    assert_eq!(e["ejections"], 0, "{e}");
    p.stop().await;
}

/// A retry budget that is spent refuses the retries due after it; each refusal is on the
/// request's span (attribute and event), on the proxy's counter and on the graph's edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spent_retry_budget_is_counted_on_the_span_the_proxy_and_the_graph() {
    let server = Server::in_temp_dir(&[]);
    let (l, addr) = bind_app().await;
    let upstream = app("broken", None);
    upstream.failing.store(true, Ordering::SeqCst);
    serve_app(l, Arc::clone(&upstream));
    let mut c = config("caller", None, &server.grpc_url());
    c.destinations = vec![dest(
        "broken",
        &[(addr, "v1", 1)],
        Policy {
            // One retry in the bucket at start, none earned: the first request retries,
            // every later one's retry is refused.
            retry: Some(RetryConfig {
                max_retries: 1,
                backoff_base_ms: 1,
                backoff_max_ms: 2,
                retry_on: vec![503],
                all_methods: false,
                max_body_bytes: 1024,
                budget_ratio: 0.0,
                budget_min_per_sec: 0.0,
            }),
            ..Default::default()
        },
    )];
    let p = Proxy::start(c, None).await.expect("proxy");
    let client = reqwest::Client::new();
    let n = 6;
    for _ in 0..n {
        let (status, _, _) = get_via(&client, p.outbound.expect("out"), "broken").await;
        assert_eq!(status, 503);
    }
    assert_eq!(
        upstream.hits.load(Ordering::SeqCst),
        n + 1,
        "one retry only"
    );
    let refused =
        "SELECT count(*) FROM spans WHERE service_name = 'caller' AND span_kind = 'CLIENT'
                    AND span_attributes['meshscope.retry_budget_exhausted'] = 'true'";
    assert_eq!(
        server.eventually(refused, |k| k == n as i64 - 1).await,
        n as i64 - 1
    );
    let events = "SELECT count(*) FROM (SELECT unnest(events) AS e FROM spans WHERE service_name = 'caller') WHERE e['name'] = 'meshscope.retry_budget_exhausted'";
    assert_eq!(
        server.eventually(events, |k| k == n as i64 - 1).await,
        n as i64 - 1
    );
    let m = admin_metrics(&p).await;
    assert!(
        m.contains(&format!(
            "meshscope_proxy_retry_budget_exhausted_total{{destination=\"broken\"}} {}",
            n - 1
        )),
        "{m}"
    );
    let e = graph_edge(&server, "caller", "broken").await;
    assert_eq!(e["retry_budget_exhausted"], n - 1, "{e}");
    assert_eq!(e["requests"], n, "{e}");
    p.stop().await;
}

/// `k` successes of `n` trials of probability `p` lie within 5 standard deviations.
fn binomial_ok(k: u64, n: u64, p: f64) -> bool {
    let (n, k) = (n as f64, k as f64);
    (k - n * p).abs() <= 5.0 * (n * p * (1.0 - p)).sqrt()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_injection_and_the_canary_split_follow_the_config() {
    let server = Server::in_temp_dir(&[]);
    let (l1, a1) = bind_app().await;
    let (l2, a2) = bind_app().await;
    serve_app(l1, app("shop v1", None));
    serve_app(l2, app("shop v2", None));
    let mut c = config("caller", None, &server.grpc_url());
    c.destinations = vec![dest(
        "shop",
        &[(a1, "v1", 90), (a2, "v2", 10)],
        Policy {
            fault: Some(FaultConfig {
                abort_percent: 20.0,
                abort_status: 418,
                delay_percent: 0.0,
                delay_ms: 0,
            }),
            ..Default::default()
        },
    )];
    let p = Proxy::start(c, None).await.expect("proxy");
    let out = p.outbound.expect("out");
    let client = reqwest::Client::new();
    let n = 2000u64;
    let mut answers = vec![];
    for chunk in 0..(n / 50) {
        let batch = (0..50).map(|_| get_via(&client, out, "shop"));
        answers.extend(futures::future::join_all(batch).await);
        let _ = chunk;
    }
    let aborted = answers.iter().filter(|a| a.0 == 418).count() as u64;
    let v2 = answers.iter().filter(|a| a.1 == "shop v2").count() as u64;
    let v1 = answers.iter().filter(|a| a.1 == "shop v1").count() as u64;
    assert_eq!(aborted + v1 + v2, n);
    assert!(
        answers
            .iter()
            .filter(|a| a.0 == 418)
            .all(|a| a.2.as_deref() == Some("fault-abort"))
    );
    assert!(
        binomial_ok(aborted, n, 0.2),
        "{aborted} of {n} aborted, configured 20%"
    );
    assert!(
        binomial_ok(v2, n - aborted, 0.1),
        "{v2} of {} to v2, configured 10%",
        n - aborted
    );

    // The metrics say the same, by version.
    let by_version = |v: &'static str| {
        format!(
            "SELECT CAST(sum(last_value) AS BIGINT) FROM (
               SELECT max(value) AS last_value FROM metrics
               WHERE service_name = 'caller' AND metric_name = 'meshscope_requests_total'
                 AND attributes['destination_version'] = '{v}' AND attributes['response_code'] = '200'
               GROUP BY array_to_string(map_values(attributes), ','))"
        )
    };
    assert_eq!(
        server
            .eventually(&by_version("v2"), |k| k == v2 as i64)
            .await,
        v2 as i64
    );
    assert_eq!(
        server
            .eventually(&by_version("v1"), |k| k == v1 as i64)
            .await,
        v1 as i64
    );
    let faults = server.eventually("SELECT count(*) FROM spans WHERE service_name = 'caller' AND span_attributes['meshscope.fault'] = 'abort:418'",
        |k| k == aborted as i64,
    )
    .await;
    assert_eq!(faults, aborted as i64);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_that_is_down_does_not_stall_traffic_and_drops_are_counted() {
    // Nothing listens on this port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let (l, addr) = bind_app().await;
    serve_app(l, app("leaf", None));
    let mut c = config("caller", None, &dead_url);
    c.telemetry.queue_capacity = 50;
    c.telemetry.export_timeout_ms = 200;
    c.destinations = vec![dest("leaf", &[(addr, "v1", 1)], Policy::default())];
    let p = Proxy::start(c, None).await.expect("proxy");
    let out = p.outbound.expect("out");
    let client = reqwest::Client::new();
    let started = Instant::now();
    for _ in 0..20 {
        let batch = (0..25).map(|_| get_via(&client, out, "leaf"));
        for (status, _, _) in futures::future::join_all(batch).await {
            assert_eq!(status, 200);
        }
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "500 requests took {took:?}");
    // Give the exporter a couple of (failing) rounds.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = admin_stats(&p).await;
    let dropped = s["spans_dropped"].as_u64().unwrap_or(0);
    assert!(
        dropped >= 450,
        "queue of 50, 500 spans, nothing exported: {s}"
    );
    assert_eq!(s["spans_exported"], 0);
    assert_eq!(s["requests"], 500);
    let text = admin_metrics(&p).await;
    let exposed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("meshscope_proxy_telemetry_dropped_total{signal=\"spans\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dropped-spans counter in {text}"));
    assert!(exposed >= dropped, "{exposed} < {dropped}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_changes_in_the_file_apply_without_a_restart() {
    let (l, addr) = bind_app().await;
    serve_app(l, app("leaf", None));
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("proxy.toml");
    let write = |abort: u32| {
        std::fs::write(
            &path,
            format!(
                "[service]\nname = \"caller\"\n[listen]\noutbound = \"127.0.0.1:0\"\n\
                 admin = \"127.0.0.1:0\"\n[[destination]]\nname = \"leaf\"\nendpoint = [{{ address = \"{addr}\" }}]\n\
                 policy = {{ fault = {{ abort-percent = {abort}, abort-status = 429 }} }}\n"
            ),
        )
        .expect("write")
    };
    write(0);
    let p = Proxy::start(ProxyConfig::load(&path).expect("load"), Some(path.clone()))
        .await
        .expect("proxy");
    let out = p.outbound.expect("out");
    let client = reqwest::Client::new();
    assert_eq!(get_via(&client, out, "leaf").await.0, 200);
    write(100);
    wait_until("the changed file is applied", || {
        p.reloads().applied.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(
        get_via(&client, out, "leaf").await.0,
        429,
        "the new fault policy applies"
    );
    // A broken file keeps the last good config, and says why.
    std::fs::write(&path, "not toml [").expect("write");
    wait_until("the broken file is refused", || {
        p.reloads().rejected.load(Ordering::Relaxed) == 1
    })
    .await;
    let why = p.reloads().last_error().unwrap_or_default();
    assert!(why.contains("TOML") || why.contains("expected"), "{why}");
    assert_eq!(get_via(&client, out, "leaf").await.0, 429);
    let s = admin_stats(&p).await;
    assert_eq!(s["config"]["reloads"], 1, "{s}");
    assert_eq!(s["config"]["rejected"], 1, "{s}");
    assert_eq!(s["config"]["last_error"], why.as_str());
    let text = admin_metrics(&p).await;
    for line in [
        "meshscope_proxy_config_reloads_total{result=\"applied\"} 1",
        "meshscope_proxy_config_reloads_total{result=\"rejected\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in {text}");
    }
    p.stop().await;
}

/// Polls `done` every 20 ms for up to 10 s.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2c_upstreams_timeouts_and_the_rate_limit_work_through_real_sockets() {
    // An upstream that says which protocol it was spoken to in, and one that is slow.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let router = axum::Router::new()
        .route(
            "/version",
            axum::routing::get(|req: Request| async move { format!("{:?}", req.version()) }),
        )
        .route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "late"
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    let mut c = config("caller", None, "http://127.0.0.1:9");
    c.telemetry.otlp_endpoint = None;
    let mut h2 = dest(
        "grpc-ish",
        &[(addr, "v1", 1)],
        Policy {
            timeout_ms: Some(100),
            ..Default::default()
        },
    );
    h2.h2c = true;
    let limited = dest(
        "limited",
        &[(addr, "v1", 1)],
        Policy {
            rate_limit: Some(meshscope_proxy::config::RateLimitConfig {
                requests_per_sec: 1.0,
                burst: Some(3.0),
            }),
            ..Default::default()
        },
    );
    c.destinations = vec![h2, limited];
    let p = Proxy::start(c, None).await.expect("proxy");
    let out = p.outbound.expect("out");
    let client = reqwest::Client::new();
    let r = client
        .get(format!("http://{out}/version"))
        .header("host", "grpc-ish")
        .send()
        .await
        .expect("request");
    assert_eq!(
        r.version(),
        reqwest::Version::HTTP_11,
        "the app spoke HTTP/1.1 to the proxy"
    );
    assert_eq!(
        r.text().await.expect("body"),
        "HTTP/2.0",
        "the proxy spoke h2c upstream"
    );

    let started = Instant::now();
    let r = client
        .get(format!("http://{out}/slow"))
        .header("host", "grpc-ish")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["x-meshscope-proxy"], "timeout");
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );

    let mut statuses = vec![];
    for _ in 0..6 {
        let r = client
            .get(format!("http://{out}/version"))
            .header("host", "limited")
            .send()
            .await
            .expect("request");
        statuses.push(r.status().as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429, 429],
        "a burst of 3, then 1/s"
    );
    // Unknown hosts are not routed anywhere.
    let r = client
        .get(format!("http://{out}/"))
        .header("host", "nowhere")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 404);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_by_request_match_path_method_headers_and_query_first_match_winning() {
    let server = Server::in_temp_dir(&[]);
    let mut addrs = Vec::new();
    for v in ["v1", "v2", "v3"] {
        let (l, a) = bind_app().await;
        serve_app(l, app(&format!("shop {v}"), None));
        addrs.push(a);
    }
    let text = caller_toml(&server)
        + &format!(
            r#"
[[destination]]
name = "shop"
endpoint = [{{ address = "{a1}", version = "v1" }}, {{ address = "{a2}", version = "v2", weight = 0 }},
            {{ address = "{a3}", version = "v3", weight = 0 }}]
[[destination.route]]
name = "beta"
match = [{{ headers = [{{ name = "x-user-group", value = "beta" }}] }}]
backends = [{{ version = "v2" }}]
[[destination.route]]
name = "api"
match = [{{ path = {{ prefix = "/api" }} }}, {{ method = "DELETE" }}]
backends = [{{ version = "v3" }}]
[[destination.route]]
name = "search"
match = [{{ path = {{ exact = "/search" }}, query = [{{ name = "q", regex = "[a-z]+" }}] }}]
backends = [{{ version = "v2", weight = 1 }}, {{ version = "v3", weight = 1 }}]
"#,
            a1 = addrs[0],
            a2 = addrs[1],
            a3 = addrs[2],
        );
    let c = ProxyConfig::parse(&text).expect("config");
    let p = Proxy::start(c, None).await.expect("proxy");
    let out = p.outbound.expect("out");
    let client = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, beta: bool| {
        let mut r = client
            .request(method, format!("http://{out}{path}"))
            .header("host", "shop");
        if beta {
            r = r.header("x-user-group", "beta");
        }
        async move {
            let r = r.send().await.expect("through the proxy");
            assert_eq!(r.status(), 200);
            r.text().await.expect("body")
        }
    };
    use reqwest::Method;
    assert_eq!(
        send(Method::GET, "/", false).await,
        "shop v1",
        "no route: the split"
    );
    assert_eq!(
        send(Method::GET, "/api/items", true).await,
        "shop v2",
        "first match wins"
    );
    assert_eq!(send(Method::GET, "/api/items", false).await, "shop v3");
    assert_eq!(send(Method::GET, "/api", false).await, "shop v3");
    assert_eq!(
        send(Method::GET, "/apix", false).await,
        "shop v1",
        "prefixes by segment"
    );
    assert_eq!(
        send(Method::DELETE, "/other", false).await,
        "shop v3",
        "any match of a route"
    );
    assert_eq!(
        send(Method::GET, "/search?q=123", false).await,
        "shop v1",
        "regex on the whole value"
    );
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..200 {
        *seen
            .entry(send(Method::GET, "/search?x=1&q=abc", false).await)
            .or_insert(0u64) += 1;
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["shop v2", "shop v3"],
        "{seen:?}"
    );
    assert!(binomial_ok(seen["shop v2"], 200, 0.5), "{seen:?}");

    // The CLIENT spans name the route that took them.
    let routed = |name: &str| {
        format!(
            "SELECT count(*) FROM spans WHERE service_name = 'caller' AND span_attributes['meshscope.route'] = '{name}'"
        )
    };
    assert_eq!(
        server.eventually(&routed("search"), |n| n == 200).await,
        200
    );
    assert_eq!(server.eventually(&routed("api"), |n| n == 3).await, 3);
    assert_eq!(server.eventually(&routed("beta"), |n| n == 1).await, 1);
    p.stop().await;

    // A bad route is refused with every problem named.
    let bad = text
        .replace(r#"regex = "[a-z]+""#, r#"regex = "[a-z""#)
        .replace(
            r#"backends = [{ version = "v3" }]"#,
            r#"backends = [{ version = "v9" }]"#,
        );
    let e = ProxyConfig::parse(&bad).expect_err("refused").to_string();
    assert!(e.contains("regex") && e.contains("\"v9\""), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_endpoint_is_ejected_and_returns_and_the_fast_one_takes_the_load() {
    let server = Server::in_temp_dir(&[]);
    let (apps, mut addrs) = (
        [
            app("shop a", None),
            app("shop b", None),
            app("shop c", None),
        ],
        Vec::new(),
    );
    for a in &apps {
        let (l, at) = bind_app().await;
        serve_app(l, Arc::clone(a));
        addrs.push(at);
    }
    let [a, b, c] = &apps;
    a.failing.store(true, Ordering::SeqCst);
    c.delay_ms.store(30, Ordering::SeqCst);
    let mut config = config("caller", None, &server.grpc_url());
    config.destinations = vec![dest(
        "shop",
        &[
            (addrs[0], "v1", 1),
            (addrs[1], "v1", 1),
            (addrs[2], "v1", 1),
        ],
        Policy {
            outlier: Some(meshscope_proxy::config::OutlierConfig {
                consecutive_5xx: 3,
                base_ejection_ms: 4000,
                max_ejection_percent: 50,
            }),
            ..Default::default()
        },
    )];
    // Every endpoint is v1 (the helper names the workload of other versions only).
    let p = Proxy::start(config, None).await.expect("proxy");
    let out = p.outbound.expect("out");
    let client = reqwest::Client::new();
    let mut failures = 0;
    for _ in 0..150 {
        if get_via(&client, out, "shop").await.0 != 200 {
            failures += 1;
        }
    }
    // Three failures in a row ejected it; P2C rarely picks it before that.
    assert!((3..=12).contains(&failures), "{failures} failures");
    let hits = |x: &App| x.hits.load(Ordering::SeqCst);
    assert_eq!(hits(a), failures);
    // Peak EWMA: the 30 ms endpoint gets far less than the fast one.
    assert!(
        hits(c) * 4 < hits(b),
        "fast {} vs slow {}",
        hits(b),
        hits(c)
    );
    let metrics = || admin_metrics(&p);
    let m = metrics().await;
    assert!(
        m.contains("meshscope_proxy_ejections_total{destination=\"shop\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("meshscope_proxy_endpoints_ejected{destination=\"shop\"} 1"),
        "{m}"
    );
    // Healthy again, it returns after its ejection.
    a.failing.store(false, Ordering::SeqCst);
    let before = hits(a);
    let deadline = Instant::now() + Duration::from_secs(20);
    while hits(a) == before {
        assert!(
            Instant::now() < deadline,
            "the ejected endpoint never came back"
        );
        assert_eq!(get_via(&client, out, "shop").await.0, 200);
    }
    assert!(
        metrics()
            .await
            .contains("meshscope_proxy_endpoints_ejected{destination=\"shop\"} 0")
    );
    // The ejection is on the span of the request that caused it.
    let ejected = format!(
        "SELECT count(*) FROM spans WHERE service_name = 'caller' AND span_attributes['meshscope.ejected'] = '{}'",
        addrs[0]
    );
    assert_eq!(server.eventually(&ejected, |n| n == 1).await, 1);
    let events = "SELECT count(*) FROM (SELECT unnest(events) AS e FROM spans WHERE service_name = 'caller') WHERE e['name'] = 'meshscope.ejection'";
    assert_eq!(server.eventually(events, |n| n == 1).await, 1);
    // …and counted on the graph's edge.
    let e = graph_edge(&server, "caller", "shop").await;
    assert_eq!(e["ejections"], 1, "{e}");
    assert_eq!(e["breaker_opened"], 0, "{e}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_copies_its_share_to_the_shadow_without_delaying_the_caller() {
    let server = Server::in_temp_dir(&[]);
    let (l1, primary_at) = bind_app().await;
    let primary = app("checkout v1", None);
    serve_app(l1, Arc::clone(&primary));
    // The shadow, behind its own proxy, answers differently and two seconds late.
    let (l2, shadow_app_at) = bind_app().await;
    let shadow = app("checkout v2-shadow", None);
    shadow.delay_ms.store(2000, Ordering::SeqCst);
    serve_app(l2, Arc::clone(&shadow));
    let shadow_proxy = Proxy::start(
        config("checkout-shadow", Some(shadow_app_at), &server.grpc_url()),
        None,
    )
    .await
    .expect("shadow proxy");
    let shadow_at = shadow_proxy.inbound.expect("inbound");
    let text = caller_toml(&server)
        + &format!(
            r#"
[[destination]]
name = "checkout"
endpoint = [{{ address = "{primary_at}", version = "v1" }}, {{ address = "{shadow_at}", version = "v2-shadow", weight = 0 }}]
[[destination.route]]
name = "all"
mirror = {{ version = "v2-shadow", percent = 50, max-body-bytes = 64 }}
"#,
        );
    let p = Proxy::start(ProxyConfig::parse(&text).expect("config"), None)
        .await
        .expect("proxy");
    let out = p.outbound.expect("out");
    let client = reqwest::Client::new();
    let n = 200u64;
    for i in 0..n {
        let started = Instant::now();
        let r = client
            .post(format!("http://{out}/pay"))
            .header("host", "checkout")
            .body(format!("order {i}"))
            .send()
            .await
            .expect("through the proxy");
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.text().await.expect("body"),
            "checkout v1",
            "the caller sees the primary"
        );
        // The shadow sleeps 2 s; the caller never waits for it.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    // A body over the bound is not copied.
    let big = client
        .post(format!("http://{out}/pay"))
        .header("host", "checkout")
        .body("x".repeat(100))
        .send()
        .await
        .expect("big");
    assert_eq!(big.status(), 200);
    assert_eq!(primary.hits.load(Ordering::SeqCst), n + 1);

    // Once every primary request's span is in, count the mirrored ones.
    let primaries =
        "SELECT count(*) FROM spans WHERE service_name = 'caller' AND span_kind = 'CLIENT'
                     AND coalesce(span_attributes['meshscope.mirror'], 'primary') = 'primary'";
    assert_eq!(
        server.eventually(primaries, |k| k == n as i64 + 1).await,
        n as i64 + 1
    );
    let mirrored = server
        .scalar("SELECT count(*) FROM spans WHERE service_name = 'caller' AND span_attributes['meshscope.mirror'] = 'primary'")
        .await as u64;
    assert!(
        binomial_ok(mirrored, n, 0.5),
        "{mirrored} of {n} mirrored, configured 50%"
    );
    // Every copy reached the shadow, marked on both sides of it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while shadow.hits.load(Ordering::SeqCst) < mirrored {
        assert!(Instant::now() < deadline, "copies missing at the shadow");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(shadow.hits.load(Ordering::SeqCst), mirrored);
    let client_side = "SELECT count(*) FROM spans WHERE service_name = 'caller' AND span_kind = 'CLIENT' AND span_attributes['meshscope.mirror'] = 'shadow'";
    assert_eq!(
        server
            .eventually(client_side, |k| k == mirrored as i64)
            .await,
        mirrored as i64
    );
    let server_side = "SELECT count(*) FROM spans WHERE service_name = 'checkout-shadow' AND span_kind = 'SERVER' AND span_attributes['meshscope.mirror'] = 'shadow'";
    assert_eq!(
        server
            .eventually(server_side, |k| k == mirrored as i64)
            .await,
        mirrored as i64
    );
    // Each pair (same trace, same parent) hashed its answers: different bodies, different hashes.
    let pairs = "SELECT count(*) FROM spans p JOIN spans s
                   ON p.trace_id = s.trace_id AND p.parent_span_id IS NOT DISTINCT FROM s.parent_span_id
                 WHERE p.span_attributes['meshscope.mirror'] = 'primary' AND s.span_attributes['meshscope.mirror'] = 'shadow'
                   AND p.span_kind = 'CLIENT' AND s.span_kind = 'CLIENT'
                   AND p.span_attributes['meshscope.body_hash'] <> s.span_attributes['meshscope.body_hash']";
    assert_eq!(
        server.eventually(pairs, |k| k == mirrored as i64).await,
        mirrored as i64
    );
    // The README's comparison of a route's primary and shadow.
    let readme = "SELECT p.span_attributes['meshscope.route'] AS route, count(*) AS pairs,
  avg(CASE WHEN p.span_attributes['meshscope.body_hash'] = s.span_attributes['meshscope.body_hash'] THEN 1.0 ELSE 0 END) AS body_match,
  avg(CASE WHEN p.http_status_code / 100 = s.http_status_code / 100 THEN 1.0 ELSE 0 END) AS status_class_match,
  approx_percentile_cont(p.duration_ns / 1e6, 0.99) AS primary_p99_ms, approx_percentile_cont(s.duration_ns / 1e6, 0.99) AS shadow_p99_ms
FROM spans p JOIN spans s ON p.trace_id = s.trace_id AND p.parent_span_id = s.parent_span_id
WHERE p.span_kind = 'CLIENT' AND s.span_kind = 'CLIENT'
  AND p.span_attributes['meshscope.mirror'] = 'primary' AND s.span_attributes['meshscope.mirror'] = 'shadow'
GROUP BY 1";
    let v = server.sql(readme).await;
    let row = &v["rows"][0];
    assert_eq!(row[0], "all", "{v}");
    assert_eq!(row[1].as_u64(), Some(mirrored), "{v}");
    assert_eq!(row[2].as_f64(), Some(0.0), "different answers: {v}");
    assert_eq!(row[3].as_f64(), Some(1.0), "both 200: {v}");
    assert!(row[5].as_f64().unwrap() >= 2000.0, "the shadow's 2 s: {v}");
    assert!(row[4].as_f64().unwrap() < 1000.0, "{v}");
    // The same through the API, per caller, destination and route.
    let m: Value = server
        .get_json("/api/v1/mirrors?source=caller&target=checkout")
        .await;
    let m = &m[0];
    assert_eq!(m["route"], "all", "{m}");
    assert_eq!(m["pairs"].as_u64(), Some(mirrored), "{m}");
    assert_eq!(m["body_match_ratio"], 0.0, "{m}");
    assert_eq!(m["status_class_match_ratio"], 1.0, "{m}");
    assert_eq!(
        m["primary"]["status_classes"]["2xx"].as_u64(),
        Some(mirrored),
        "{m}"
    );
    assert!(m["shadow"]["p99_ms"].as_f64().unwrap() >= 2000.0, "{m}");
    assert!(m["primary"]["p99_ms"].as_f64().unwrap() < 1000.0, "{m}");
    // The graph and the golden signals count what the caller waited for: the primary's
    // requests, not the copies (nor the shadow's 2 s).
    let e = graph_edge(&server, "caller", "checkout").await;
    assert_eq!(e["requests"].as_u64(), Some(n + 1), "{e}");
    assert!(e["p99_ms"].as_f64().unwrap() < 1000.0, "{e}");
    let versions = common::strings(&e, "by_version", "version");
    assert!(!versions.contains(&"v2-shadow"), "{versions:?} {e}");
    // The proxy's metrics and access logs mark the copies (`mirror="shadow"`), so they
    // agree with the spans.
    for source in ["metrics", "access_logs"] {
        assert_eq!(
            e["by_source"][source]["requests"].as_u64(),
            Some(n + 1),
            "{source}: {e}"
        );
    }
    let m = admin_metrics(&p).await;
    assert!(
        m.contains("destination_version=\"v2-shadow\"") && m.contains("mirror=\"shadow\""),
        "{m}"
    );
    assert_eq!(
        graph_edge(&server, "caller", "checkout-shadow").await,
        Value::Null
    );
    let services: Value = server.get_json("/api/v1/services").await;
    let shadow_served = services
        .as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == "checkout-shadow"))
        .map(|s| s["requests"].as_u64().unwrap_or(0))
        .unwrap_or(0);
    assert_eq!(shadow_served, 0, "{services}");
    p.stop().await;
    shadow_proxy.stop().await;
}
