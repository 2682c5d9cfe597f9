//! The topology beyond one window (issue #16), against the real binary: the live tap fed by
//! the OpenTelemetry SDK (filters, limit, a client that leaves, `meshscope tap`), the diff
//! of two crafted windows from raw spans and from the rollups, and the graph as DOT.

mod common;

use std::time::{Duration, Instant};

use common::otlp::{kv, post, traces, traces_of};
use common::{Server, now_ns};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue as PKeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span as PSpan, Status as PStatus, status};
use serde_json::Value;

/// Sends spans of `service` through the SDK's gRPC exporter: for each `(kind, path,
/// status)` one span, flushed before returning.
fn send_with_sdk(endpoint: String, service: &str, spans: Vec<(SpanKind, &'static str, i64)>) {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .expect("grpc exporter");
    let provider = common::otlp::sdk_tracer_provider(exporter, service);
    let tracer = provider.tracer("topology-test");
    for (kind, path, code) in spans {
        let client = kind == SpanKind::Client;
        let mut attrs = vec![
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("http.response.status_code", code),
        ];
        if client {
            attrs.push(KeyValue::new("url.full", format!("http://cart:8080{path}")));
            attrs.push(KeyValue::new("server.address", "cart"));
        } else {
            attrs.push(KeyValue::new("url.path", path));
        }
        let mut span = tracer
            .span_builder(format!("GET {path}"))
            .with_kind(kind)
            .with_attributes(attrs)
            .start(&tracer);
        if code >= 500 {
            span.set_status(Status::error("upstream failed"));
        }
        span.end();
    }
    provider.shutdown().expect("shutdown flushes every span");
}

/// One Server-Sent Event.
#[derive(Debug)]
struct Sse {
    event: String,
    data: Value,
}

/// Reads events from a tap response until `n` have come or the stream ends (bounded).
async fn read_events(resp: &mut reqwest::Response, n: usize, buf: &mut String) -> Vec<Sse> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < n {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if !event.is_empty() {
                let data = serde_json::from_str(&data).expect("event data is JSON");
                out.push(Sse { event, data });
            }
        }
        if out.len() >= n {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of {n} tap events: {out:?}",
            out.len()
        );
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) => break,
            Ok(Err(e)) => panic!("tap stream broke: {e}"),
            Err(_) => panic!("only {} of {n} tap events in 20 s: {out:?}", out.len()),
        }
    }
    out
}

async fn open_tap(server: &Server, query: &str) -> reqwest::Response {
    let resp = reqwest::Client::new()
        .get(server.url(&format!("/api/v1/tap?{query}")))
        .send()
        .await
        .expect("tap");
    assert_eq!(resp.status(), 200, "tap?{query}");
    assert_eq!(
        resp.headers()["content-type"].to_str().expect("ASCII"),
        "text/event-stream"
    );
    resp
}

#[tokio::test(flavor = "multi_thread")]
async fn tap_streams_the_spans_sent_after_it_began() {
    let server = Server::in_temp_dir(&[]);
    // Before anyone taps: never shown.
    send_with_sdk(
        server.grpc_url(),
        "frontend",
        vec![(SpanKind::Client, "/before", 503)],
    );
    let mut errors = open_tap(&server, "service=frontend&status=5xx&limit=2").await;
    let mut everything = open_tap(&server, "").await;
    server
        .wait_metric("meshscope_tap_subscribers", 10, |v| v == 2.0)
        .await;
    send_with_sdk(
        server.grpc_url(),
        "frontend",
        vec![
            (SpanKind::Client, "/cart/1", 200),
            (SpanKind::Client, "/cart/2", 503),
            (SpanKind::Internal, "/not-a-request", 200),
            (SpanKind::Client, "/cart/3", 502),
            (SpanKind::Client, "/cart/4", 503),
        ],
    );
    send_with_sdk(
        server.grpc_url(),
        "cart",
        vec![(SpanKind::Server, "/cart/5", 200)],
    );

    let mut buf = String::new();
    let got = read_events(&mut errors, 3, &mut buf).await;
    let paths: Vec<&str> = got[..2]
        .iter()
        .map(|e| e.data["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/cart/2", "/cart/3"], "{got:?}");
    for e in &got[..2] {
        assert_eq!(e.event, "span");
        assert_eq!(e.data["service"], "frontend");
        assert_eq!(e.data["peer"], "cart");
        assert_eq!(e.data["kind"], "CLIENT");
        assert_eq!(e.data["method"], "GET");
        assert_eq!(e.data["span_status"], "ERROR");
        assert_eq!(e.data["trace_id"].as_str().unwrap().len(), 32);
        assert!(e.data["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(e.data["time"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(got[2].event, "end");
    assert_eq!(got[2].data["events"], 2);
    // After `limit`, the server closes the stream.
    let rest = tokio::time::timeout(Duration::from_secs(10), errors.chunk())
        .await
        .expect("stream closes after the limit");
    assert!(matches!(rest, Ok(None)), "{rest:?}");

    // The unfiltered tapper sees every request span, the earlier one excepted.
    let mut buf = String::new();
    let all = read_events(&mut everything, 5, &mut buf).await;
    let mut paths: Vec<&str> = all
        .iter()
        .map(|e| e.data["path"].as_str().unwrap())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        ["/cart/1", "/cart/2", "/cart/3", "/cart/4", "/cart/5"]
    );
    // A client that leaves is gone at once.
    drop(everything);
    server
        .wait_metric("meshscope_tap_subscribers", 10, |v| v == 0.0)
        .await;
    // 2 + 5 delivered; /cart/4 may have been queued for the first tapper as it left.
    let events = server.metric("meshscope_tap_events_total").await.unwrap();
    assert!((7.0..=8.0).contains(&events), "{events}");
    assert_eq!(
        server.metric("meshscope_tap_dropped_events_total").await,
        Some(0.0)
    );
    // Everything was also stored as usual.
    assert_eq!(server.scalar("SELECT count(*) FROM spans").await, 7);

    // Bad filters are named.
    let r = reqwest::get(server.url("/api/v1/tap?status=9xx"))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("5xx"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn meshscope_tap_prints_requests_in_the_terminal() {
    let server = Server::in_temp_dir(&[]);
    let child = std::process::Command::new(common::binary())
        .args(["tap", "--server", &server.url(""), "--service", "cart"])
        .args(["--limit", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("meshscope tap");
    server
        .wait_metric("meshscope_tap_subscribers", 20, |v| v == 1.0)
        .await;
    send_with_sdk(
        server.grpc_url(),
        "cart",
        vec![
            (SpanKind::Server, "/cart/7", 200),
            (SpanKind::Server, "/cart/8", 503),
        ],
    );
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("tap exits after --limit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].contains("? → cart  SERVER   GET /cart/7  :status=200"),
        "{stdout}"
    );
    assert!(lines[1].contains("GET /cart/8  :status=503"), "{stdout}");
    assert!(stderr.contains("tap ended"), "{stderr}");
}

fn rfc3339(ns: u64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns as i64)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A CLIENT span of a trace and the SERVER span of its callee, or (with `callee` None) a
/// root SERVER span: spans of `(service, span)`.
struct Crafted {
    spans: Vec<(&'static str, PSpan)>,
    next: u64,
}

impl Crafted {
    fn id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn span(
        &mut self,
        trace: u64,
        parent: Option<u64>,
        kind: i32,
        at: u64,
        ms: u64,
        error: bool,
    ) -> PSpan {
        PSpan {
            trace_id: trace.to_be_bytes().repeat(2),
            span_id: self.id().to_be_bytes().to_vec(),
            parent_span_id: parent.map(|p| p.to_be_bytes().to_vec()).unwrap_or_default(),
            name: "GET /x".into(),
            kind,
            start_time_unix_nano: at,
            end_time_unix_nano: at + ms * 1_000_000,
            attributes: vec![PKeyValue {
                key: "http.response.status_code".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::IntValue(if error { 500 } else { 200 })),
                }),
                ..Default::default()
            }],
            status: error.then(|| PStatus {
                code: status::StatusCode::Error as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `n` requests `caller → callee` at `at`, `errors` of them failing, each `ms` long.
    fn requests(
        &mut self,
        caller: &'static str,
        callee: &'static str,
        at: u64,
        n: u64,
        errors: u64,
        ms: u64,
    ) {
        for i in 0..n {
            let trace = self.id();
            let t = at + i * 10_000_000;
            // Roots last 100 ms whatever they call, so the entry edges stay alike.
            let root = self.span(trace, None, 2, t, 100, false);
            let root_id = self.next;
            let client = self.span(trace, Some(root_id), 3, t + 500_000, ms, i < errors);
            let client_id = self.next;
            let server = self.span(
                trace,
                Some(client_id),
                2,
                t + 600_000,
                ms.saturating_sub(1),
                i < errors,
            );
            self.spans.push((caller, root));
            self.spans.push((caller, client));
            self.spans.push((callee, server));
        }
    }

    /// Everything in one export per service.
    async fn send(self, server: &Server) {
        let mut by_service: std::collections::BTreeMap<&str, Vec<PSpan>> = Default::default();
        for (s, span) in self.spans {
            by_service.entry(s).or_default().push(span);
        }
        let mut req = traces("x", Vec::new());
        req.resource_spans.clear();
        for (s, spans) in by_service {
            let r = traces_of(
                vec![kv("service.name", s), kv("service.namespace", "shop")],
                spans,
            );
            req.resource_spans.extend(r.resource_spans);
        }
        post(&server.otlp_url("/v1/traces"), &req).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn graph_diff_marks_what_changed_between_two_windows() {
    let server = Server::in_temp_dir(&["--rollup-delay-secs", "0", "--rollup-interval-secs", "1"]);
    let minute = 60_000_000_000u64;
    let now = now_ns() / minute * minute;
    // Base: the window 20–10 minutes ago; now: the last 10 minutes.
    let (base_start, base_end, end) = (now - 20 * minute, now - 10 * minute, now);
    let mut m = Crafted {
        spans: Vec::new(),
        next: 0,
    };
    let (b, n) = (base_start + 5 * minute, base_end + 5 * minute);
    m.requests("frontend", "cart", b, 50, 0, 10);
    m.requests("frontend", "cart", n, 50, 0, 10);
    m.requests("cart", "payments", b, 50, 0, 10);
    m.requests("cart", "payments", n, 50, 10, 10); // 0% → 20% errors
    m.requests("cart", "legacy", b, 20, 0, 5); // gone
    m.requests("cart", "inventory", n, 20, 0, 5); // new
    m.requests("frontend", "search", b, 50, 0, 10);
    m.requests("frontend", "search", n, 50, 0, 40); // p99 ~10 → ~40 ms
    m.send(&server).await;

    let url = |source: &str| {
        server.url(&format!(
            "/api/v1/graph/diff?start={}&end={}&base_start={}&base_end={}&source={source}",
            rfc3339(base_end),
            rfc3339(end),
            rfc3339(base_start),
            rfc3339(base_end)
        ))
    };
    let changes = |d: &Value| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = d["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    format!(
                        "{}→{}",
                        e["source"].as_str().unwrap(),
                        e["target"].as_str().unwrap()
                    ),
                    e["change"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let expected: Vec<(String, String)> = [
        ("cart→inventory", "added"),
        ("cart→legacy", "removed"),
        ("cart→payments", "changed"),
        ("frontend→cart", "same"),
        ("frontend→search", "changed"),
        // The root spans of frontend and cart's own: both windows alike.
        ("user→cart", "same"),
        ("user→frontend", "same"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();

    let resp = reqwest::get(url("spans")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-meshscope-computed-from"], "spans");
    let d: Value = resp.json().await.unwrap();
    assert_eq!(changes(&d), expected, "{d:#}");
    let edge = |d: &Value, s: &str, t: &str| {
        d["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["source"] == s && e["target"] == t)
            .cloned()
            .unwrap()
    };
    let pay = edge(&d, "cart", "payments");
    assert_eq!(pay["requests"], 50);
    assert_eq!(pay["base_requests"], 50);
    assert_eq!(pay["error_rate"], 0.2);
    assert_eq!(pay["base_error_rate"], 0.0);
    assert_eq!(pay["moved"], serde_json::json!(["error_rate"]));
    let search = edge(&d, "frontend", "search");
    assert_eq!(search["p99_ms"], 40.0);
    assert_eq!(search["base_p99_ms"], 10.0);
    let legacy = edge(&d, "cart", "legacy");
    assert_eq!(
        (
            legacy["requests"].as_u64(),
            legacy["base_requests"].as_u64()
        ),
        (Some(0), Some(20))
    );
    let node = |id: &str| {
        d["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(node("legacy")["change"], "removed");
    assert_eq!(node("inventory")["change"], "added");
    assert_eq!(node("inventory")["namespace"], "shop");
    assert_eq!(d["edge_changes"]["added"], 1);
    assert_eq!(d["thresholds"]["error_rate_delta"], 0.02);

    // From the rollups, once the minutes are rolled up: the same changes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = reqwest::get(url("rollups")).await.unwrap();
        assert_eq!(resp.headers()["x-meshscope-computed-from"], "rollups");
        let r: Value = resp.json().await.unwrap();
        if changes(&r) == expected {
            let search = edge(&r, "frontend", "search");
            let p99 = search["p99_ms"].as_f64().unwrap();
            assert!((p99 - 40.0).abs() <= 0.4, "{search}");
            break;
        }
        assert!(Instant::now() < deadline, "rollups never agreed: {r:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Without a base, the window of the same length just before; one end alone is refused.
    let d: Value = reqwest::get(server.url(&format!(
        "/api/v1/graph/diff?start={}&end={}&source=spans",
        rfc3339(base_end),
        rfc3339(end)
    )))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        d["base_start"],
        chrono::DateTime::from_timestamp_nanos(base_start as i64).to_rfc3339()
    );
    assert_eq!(changes(&d), expected);
    let r = reqwest::get(server.url("/api/v1/graph/diff?base_start=2026-01-01T00:00:00Z"))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Tighter thresholds make the small move a change.
    let tight: Value = reqwest::get(format!(
        "{}&error_rate_delta=0.5&p99_ratio=10",
        url("spans")
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(edge(&tight, "cart", "payments")["change"], "same");

    // The same graph as DOT, namespaces as clusters.
    let resp = reqwest::get(server.url(&format!(
        "/api/v1/graph?start={}&end={}&format=dot&label=errors",
        rfc3339(base_end),
        rfc3339(end)
    )))
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/vnd.graphviz")
    );
    let dot = resp.text().await.unwrap();
    assert!(dot.starts_with("digraph meshscope {"), "{dot}");
    assert!(dot.contains("subgraph \"cluster_shop\""), "{dot}");
    assert!(
        dot.contains("\"cart\" -> \"payments\" [label=\"20.0% (10)\", color=red];"),
        "{dot}"
    );
    assert!(!dot.contains("legacy"), "{dot}");
    let r = reqwest::get(server.url("/api/v1/graph?format=png"))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_are_searched_by_several_attributes_of_one_span() {
    let server = Server::in_temp_dir(&[]);
    let at = now_ns() - 60_000_000_000;
    let span = |n: u64, route: &str, region: &str| PSpan {
        trace_id: (1000 + n).to_be_bytes().repeat(2),
        span_id: (1000 + n).to_be_bytes().to_vec(),
        name: "GET".into(),
        kind: 2,
        start_time_unix_nano: at + n,
        end_time_unix_nano: at + n + 1_000_000,
        attributes: vec![kv("http.route", route), kv("region", region)],
        ..Default::default()
    };
    let req = traces(
        "cart",
        vec![
            span(1, "/cart", "eu west"),
            span(2, "/cart", "us"),
            span(3, "/pay", "eu west"),
        ],
    );
    post(&server.otlp_url("/v1/traces"), &req).await;
    let search = |attrs: &str| {
        let url = reqwest::Url::parse_with_params(
            &server.url("/api/v1/traces"),
            &[
                ("attribute", attrs),
                ("start", &rfc3339(at - 60_000_000_000)),
            ],
        )
        .expect("url");
        async move {
            let r = reqwest::get(url).await.expect("search");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("JSON"))
        }
    };
    let ids = |v: &Value| -> Vec<String> {
        let mut ids: Vec<String> = v
            .as_array()
            .expect("traces")
            .iter()
            .map(|t| t["trace_id"].as_str().expect("id")[28..].to_string())
            .collect();
        ids.sort();
        ids
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = search(r#"http.route=/cart region="eu west""#).await;
        assert_eq!(s, 200, "{v}");
        if !ids(&v).is_empty() {
            // Both on one span: trace 1 only (1001 = 0x3e9).
            assert_eq!(ids(&v), ["03e9"], "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "spans did not become visible");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ids(&search("http.route=/cart").await.1), ["03e9", "03ea"]);
    let (s, v) = search(r#"region="eu"#).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("key=value"), "{v}");
}
