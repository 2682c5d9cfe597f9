//! The web UI in a real browser: Debian's headless Chromium driven over WebDriver
//! (chromedriver) against the real binary fed with a known mesh through OTLP/JSON.
//!
//! Each page is checked for what an engineer looks for (the nodes and edges of the mesh,
//! a node's signals, a trace's spans, log filtering, SQL rows) and saved as a PNG under
//! `target/ui-screenshots/`. The server runs with an alert rule that fires on that mesh and
//! two webhook receivers (one answering, one unreachable), for the Alerts page. `MESHSCOPE_UI_HOLD=<seconds>` keeps the fed server running
//! afterwards (its address is printed) to look at it by hand.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::browser::Browser;
use common::mesh::big_mesh;
use common::{Server, now_ns};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------
// The known data

const TRACES: u64 = 60;
/// The trace the test opens: 7 spans, frontend → checkout → payments and postgres.
const KNOWN_TRACE: u64 = 3;

fn trace_id(i: u64) -> String {
    format!("{:032x}", 0x5eed_0000_0000_u64 + i)
}

fn span_id(i: u64, k: u64) -> String {
    format!("{:016x}", (i + 1) * 64 + k)
}

fn is_checkout(i: u64) -> bool {
    i % 3 != 2
}

fn is_error(i: u64) -> bool {
    is_checkout(i) && i.is_multiple_of(10)
}

fn attr(k: &str, v: &str) -> Value {
    json!({ "key": k, "value": { "stringValue": v } })
}

fn resource(service: &str, namespace: &str) -> Value {
    json!({ "attributes": [attr("service.name", service), attr("service.namespace", namespace)] })
}

struct SpanSpec<'a> {
    service: &'a str,
    k: u64,
    parent: Option<u64>,
    name: &'a str,
    kind: u8,
    start_ms: u64,
    dur_ms: u64,
    error: bool,
    attrs: Vec<Value>,
}

/// OTLP/JSON for every trace, one resource per service.
fn traces_payload(base_ns: u64) -> Value {
    let mut by_service: std::collections::BTreeMap<&str, (&str, Vec<Value>)> = Default::default();
    for i in 0..TRACES {
        let t0 = base_ns + i * 8_000_000_000;
        let jitter = (i % 7) * 4;
        let specs: Vec<SpanSpec<'_>> = if is_checkout(i) {
            let err = is_error(i);
            vec![
                SpanSpec {
                    service: "frontend",
                    k: 1,
                    parent: None,
                    name: "GET /checkout",
                    kind: 2,
                    start_ms: 0,
                    dur_ms: 140 + jitter,
                    error: err,
                    attrs: vec![
                        attr("http.route", "/checkout"),
                        attr("http.request.method", "GET"),
                    ],
                },
                SpanSpec {
                    service: "frontend",
                    k: 2,
                    parent: Some(1),
                    name: "POST /api/checkout",
                    kind: 3,
                    start_ms: 6,
                    dur_ms: 120 + jitter,
                    error: err,
                    attrs: vec![],
                },
                SpanSpec {
                    service: "checkout",
                    k: 3,
                    parent: Some(2),
                    name: "POST /api/checkout",
                    kind: 2,
                    start_ms: 8,
                    dur_ms: 115 + jitter,
                    error: err,
                    attrs: vec![attr("http.route", "/api/checkout")],
                },
                SpanSpec {
                    service: "checkout",
                    k: 4,
                    parent: Some(3),
                    name: "charge",
                    kind: 3,
                    start_ms: 12,
                    dur_ms: 60 + jitter,
                    error: err,
                    attrs: vec![],
                },
                SpanSpec {
                    service: "payments",
                    k: 5,
                    parent: Some(4),
                    name: "POST /charge",
                    kind: 2,
                    start_ms: 14,
                    dur_ms: 55 + jitter,
                    error: err,
                    attrs: vec![
                        attr("http.route", "/charge"),
                        attr("payment.provider", "acme"),
                    ],
                },
                SpanSpec {
                    service: "checkout",
                    k: 6,
                    parent: Some(3),
                    name: "INSERT orders",
                    kind: 3,
                    start_ms: 100,
                    dur_ms: 20,
                    error: false,
                    attrs: vec![
                        attr("peer.service", "postgres"),
                        attr("db.system.name", "postgresql"),
                    ],
                },
                // In parallel with the checkout call, so off the critical path.
                SpanSpec {
                    service: "frontend",
                    k: 7,
                    parent: Some(1),
                    name: "render cart",
                    kind: 1,
                    start_ms: 8,
                    dur_ms: 20,
                    error: false,
                    attrs: vec![],
                },
            ]
        } else {
            vec![
                SpanSpec {
                    service: "frontend",
                    k: 1,
                    parent: None,
                    name: "GET /products",
                    kind: 2,
                    start_ms: 0,
                    dur_ms: 40 + jitter,
                    error: false,
                    attrs: vec![attr("http.route", "/products")],
                },
                SpanSpec {
                    service: "frontend",
                    k: 2,
                    parent: Some(1),
                    name: "GET /items",
                    kind: 3,
                    start_ms: 3,
                    dur_ms: 30 + jitter,
                    error: false,
                    attrs: vec![],
                },
                SpanSpec {
                    service: "catalog",
                    k: 3,
                    parent: Some(2),
                    name: "GET /items",
                    kind: 2,
                    start_ms: 4,
                    dur_ms: 28 + jitter,
                    error: false,
                    attrs: vec![attr("http.route", "/items")],
                },
            ]
        };
        for sp in specs {
            let start = t0 + sp.start_ms * 1_000_000;
            let end = start + sp.dur_ms * 1_000_000;
            let mut span = json!({
                "traceId": trace_id(i),
                "spanId": span_id(i, sp.k),
                "name": sp.name,
                "kind": sp.kind,
                "startTimeUnixNano": start.to_string(),
                "endTimeUnixNano": end.to_string(),
                "attributes": sp.attrs,
                "status": { "code": if sp.error { 2 } else { 1 } },
            });
            if let Some(p) = sp.parent {
                span["parentSpanId"] = json!(span_id(i, p));
            }
            if sp.k == 5 {
                span["events"] = json!([{ "timeUnixNano": (start + 20_000_000).to_string(), "name": "card authorised", "attributes": [attr("card.brand", "visa")] }]);
            }
            let ns = if sp.service == "frontend" {
                "web"
            } else {
                "shop"
            };
            by_service
                .entry(sp.service)
                .or_insert((ns, Vec::new()))
                .1
                .push(span);
        }
    }
    let resource_spans: Vec<Value> = by_service
        .into_iter()
        .map(|(svc, (ns, spans))| {
            json!({ "resource": resource(svc, ns), "scopeSpans": [{ "scope": { "name": "ui-test" }, "spans": spans }] })
        })
        .collect();
    json!({ "resourceSpans": resource_spans })
}

/// Application logs that carry trace ids, and the mesh's access logs (which alone show
/// the frontend → recommendations edge).
fn logs_payload(base_ns: u64) -> Value {
    let (mut checkout, mut payments, mut proxy) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..TRACES {
        let t0 = base_ns + i * 8_000_000_000;
        if is_checkout(i) {
            // The sidecar's access log of the frontend → checkout call, with the trace id.
            proxy.push(json!({
                "timeUnixNano": (t0 + 6_000_000).to_string(), "severityNumber": 9, "severityText": "INFO",
                "body": { "stringValue": format!("POST /api/checkout {}", if is_error(i) { 500 } else { 200 }) },
                "traceId": trace_id(i),
                "attributes": [attr("source_workload", "frontend"), attr("destination_workload", "checkout"),
                               attr("duration_ms", "120"), attr("response_code", if is_error(i) { "500" } else { "200" })],
            }));
            checkout.push(json!({
                "timeUnixNano": (t0 + 100_000_000).to_string(), "severityNumber": 9, "severityText": "INFO",
                "body": { "stringValue": format!("order {i} placed") },
                "traceId": trace_id(i), "spanId": span_id(i, 3),
            }));
        }
        if is_error(i) {
            payments.push(json!({
                "timeUnixNano": (t0 + 60_000_000).to_string(), "severityNumber": 17, "severityText": "ERROR",
                "body": { "stringValue": format!("card declined for order {i}") },
                "traceId": trace_id(i), "spanId": span_id(i, 5),
            }));
        }
        if i % 2 == 0 {
            proxy.push(json!({
                "timeUnixNano": (t0 + 1_000_000).to_string(), "severityNumber": 9, "severityText": "INFO",
                "body": { "stringValue": "GET /recommendations 200" },
                "attributes": [attr("source_workload", "frontend"), attr("destination_workload", "recommendations"),
                               attr("duration_ms", "12"), attr("response_code", "200")],
            }));
        }
    }
    let rl = |svc: &str, ns: &str, recs: Vec<Value>| json!({ "resource": resource(svc, ns), "scopeLogs": [{ "scope": { "name": "ui-test" }, "logRecords": recs }] });
    json!({ "resourceLogs": [rl("checkout", "shop", checkout), rl("payments", "shop", payments), rl("mesh-proxy", "web", proxy)] })
}

async fn feed(server: &Server) {
    feed_as(server, None).await;
}

/// [`feed`], sending `ingest_token` with each export.
async fn feed_as(server: &Server, ingest_token: Option<&str>) {
    // Start 9 minutes ago so every record sits inside the default 15-minute range.
    let base = now_ns() - 9 * 60 * 1_000_000_000;
    let client = reqwest::Client::new();
    for (path, body) in [
        ("/v1/traces", traces_payload(base)),
        ("/v1/logs", logs_payload(base)),
    ] {
        let mut r = client.post(server.otlp_url(path));
        if let Some(t) = ingest_token {
            r = r.bearer_auth(t);
        }
        let r = r
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("OTLP/HTTP export");
        assert_eq!(
            r.status(),
            200,
            "{path}: {}",
            r.text().await.unwrap_or_default()
        );
    }
    let spans = (0..TRACES)
        .map(|i| if is_checkout(i) { 7 } else { 3 })
        .sum::<i64>();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.scalar("SELECT count(*) FROM spans").await < spans {
        assert!(Instant::now() < deadline, "spans did not become visible");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Alerting: a rule that fires on the known mesh and receivers for its notifications

/// A webhook receiver on 127.0.0.1:0 that answers 200 and counts what it got.
async fn webhook() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&got);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { axum::http::StatusCode::OK }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    (addr, got)
}

/// checkout fails 4 of its 40 requests (10 %) over the fed 8 minutes: over 5 % at once.
const RULE: &str = "checkout-errors";

fn alert_config(dir: &std::path::Path, hook: std::net::SocketAddr) -> String {
    // Port 9 (discard) on loopback: nothing listens, so each attempt fails and is logged.
    let cfg = format!(
        r#"
[alerts]
evaluation-interval-secs = 1

[[alerts.rules]]
name = "{RULE}"
signal = "error_rate"
service = "checkout"
threshold = 0.05
window-secs = 900
for-secs = 0
severity = "critical"
annotations = {{ summary = "checkout fails {{{{ $value }}}} of its requests" }}

[[alerts.receivers]]
name = "ops"
url = "http://{hook}/hook"

[[alerts.receivers]]
name = "pager"
url = "http://127.0.0.1:9/hook"
max-attempts = 2
timeout-secs = 2
"#
    );
    let path = dir.join("meshscope.toml");
    std::fs::write(&path, cfg).expect("config");
    path.to_string_lossy().into_owned()
}

/// Waits (up to 30 s) until the alerts API shows the rule firing and both receivers'
/// attempts (a delivered one to `ops`, a failed one to `pager`).
async fn wait_for_alert(server: &Server) {
    let client = reqwest::Client::new();
    let get = |path: &str| {
        let req = client.get(server.url(path));
        async move {
            req.send()
                .await
                .expect("alerts API")
                .json::<Value>()
                .await
                .expect("JSON")
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alerts = get("/api/v1/alerts?state=firing").await;
        let deliveries = get("/api/v1/alerts/deliveries").await;
        let list = deliveries.as_array().cloned().unwrap_or_default();
        let firing = alerts
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["rule"] == RULE));
        let delivered = list
            .iter()
            .any(|d| d["receiver"] == "ops" && d["ok"] == true);
        let failed = list
            .iter()
            .any(|d| d["receiver"] == "pager" && d["ok"] == false);
        if firing && delivered && failed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no firing {RULE} with deliveries: {alerts} {deliveries}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_pages_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (hook, hook_got) = webhook().await;
    let config = alert_config(dir.path(), hook);
    let server = Server::start_with(&dir.path().join("data"), &["--config", &config]);
    feed(&server).await;

    // The binary serves the app itself: index.html for client routes, hashed assets.
    let index = reqwest::get(server.url("/traces/abc"))
        .await
        .expect("GET /traces/abc");
    assert_eq!(index.status(), 200);
    assert!(index.text().await.expect("body").contains("/assets/app-"));
    let api404 = reqwest::get(server.url("/api/v1/nope"))
        .await
        .expect("GET /api/v1/nope");
    assert_eq!(
        api404.status(),
        404,
        "unknown API paths must not answer the app"
    );

    let b = Browser::start().await;
    b.call(
        reqwest::Method::POST,
        "/window/rect",
        Some(json!({ "width": 1600, "height": 1000 })),
    )
    .await;

    // Alerts (first, while the unreachable receiver's failures are still few in the log):
    // the firing alert with its evidence and exemplar traces, the rule, and the
    // delivery log with both outcomes.
    wait_for_alert(&server).await;
    assert!(
        hook_got.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the webhook got nothing"
    );
    b.goto(&server.url("/alerts?range=15m")).await;
    let nav = b.wait_for("a.nav-link.active[href^='/alerts']", 1).await;
    assert_eq!(b.text(&nav[0]).await, "Alerts");
    let row = b
        .wait_for(
            &format!("tr.alert-row[data-rule='{RULE}'][data-state='firing']"),
            1,
        )
        .await;
    let text = b.text(&row[0]).await;
    assert!(
        text.contains(RULE) && text.to_lowercase().contains("firing"),
        "{text}"
    );
    assert!(
        text.contains("10%") && text.contains("> 5.0%"),
        "value vs threshold: {text}"
    );
    assert!(text.contains("service=checkout"), "labels: {text}");
    let summary = b
        .wait_for("[data-test='alert-summary'] .kpi.bad .kpi-value", 1)
        .await;
    assert_eq!(b.text(&summary[0]).await, "1", "one firing alert");
    let failing: BTreeSet<String> = (0..TRACES).filter(|i| is_error(*i)).map(trace_id).collect();
    let exemplars = b
        .find_all(&format!("tr.alert-row[data-rule='{RULE}'] a.exemplar"))
        .await;
    assert!(!exemplars.is_empty(), "exemplar trace links");
    for e in &exemplars {
        let id = b.attr(e, "data-trace-id").await;
        assert!(
            failing.contains(&id),
            "exemplar {id} is not a failing checkout trace"
        );
        assert!(
            b.attr(e, "href")
                .await
                .starts_with(&format!("/traces/{id}"))
        );
    }
    let rule = b
        .wait_for(
            &format!("[data-test='rules-table'] tr[data-rule='{RULE}']"),
            1,
        )
        .await;
    let text = b.text(&rule[0]).await;
    assert!(
        text.contains("checkout") && text.contains("error_rate > 5.0%") && text.contains("config"),
        "{text}"
    );
    let ok = b
        .wait_for(
            "[data-test='deliveries-table'] tr.delivery-row[data-receiver='ops'][data-ok='true']",
            1,
        )
        .await;
    assert!(
        b.text(&ok[0]).await.contains("200"),
        "the webhook's HTTP status"
    );
    let failed = b.wait_for("[data-test='deliveries-table'] tr.delivery-row[data-receiver='pager'][data-ok='false']", 1).await;
    let text = b.text(&failed[0]).await.to_lowercase();
    assert!(
        text.contains("failed") && text.contains("firing") && text.contains("127.0.0.1:9"),
        "{text}"
    );
    b.screenshot("alerts").await;
    // The delivery log filtered by receiver (through the API's `receiver=`).
    let select = b
        .wait_for("[data-test='receiver-filter'] option[value='ops']", 1)
        .await;
    b.click(&select[0]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = b
            .find_all("[data-test='deliveries-table'] tr.delivery-row")
            .await;
        let mut receivers = BTreeSet::new();
        for r in &rows {
            receivers.insert(b.attr(r, "data-receiver").await);
        }
        let url = b.call(reqwest::Method::GET, "/url", None).await;
        if url.as_str().unwrap_or_default().contains("receiver=ops")
            && receivers.len() == 1
            && receivers.contains("ops")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deliveries not filtered to ops: {receivers:?} {url}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Filtering by state: no resolved alerts, so the firing one is gone.
    let resolved = b
        .find_all("[data-test='state-filter'] button[data-state='resolved']")
        .await;
    b.click(&resolved[0]).await;
    b.wait_for("[data-test='alerts-page'] .empty", 1).await;
    assert!(b.find_all("tr.alert-row").await.is_empty());
    let url = b.call(reqwest::Method::GET, "/url", None).await;
    assert!(
        url.as_str().unwrap_or_default().contains("state=resolved"),
        "{url}"
    );
    let firing = b
        .find_all("[data-test='state-filter'] button[data-state='firing']")
        .await;
    b.click(&firing[0]).await;
    b.wait_for(&format!("tr.alert-row[data-rule='{RULE}']"), 1)
        .await;
    // An exemplar opens its trace in the trace view.
    let exemplars = b
        .find_all(&format!("tr.alert-row[data-rule='{RULE}'] a.exemplar"))
        .await;
    b.click(&exemplars[0]).await;
    b.wait_for("[data-test='waterfall'] .span-row", 7).await;

    // Topology: every node and edge of the mesh.
    b.goto(&server.url("/?range=15m")).await;
    b.wait_for("svg.graph g.node[data-id='payments']", 1).await;
    let mut nodes = BTreeSet::new();
    for n in b.find_all("svg.graph g.node").await {
        nodes.insert(format!(
            "{}:{}",
            b.attr(&n, "data-kind").await,
            b.attr(&n, "data-id").await
        ));
    }
    let expected_nodes: BTreeSet<String> = [
        "user:user",
        "service:frontend",
        "service:checkout",
        "service:catalog",
        "service:payments",
        "virtual:postgres",
        "service:recommendations",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(nodes, expected_nodes);
    let mut edges = BTreeSet::new();
    for e in b.find_all("svg.graph g.edge").await {
        edges.insert(format!(
            "{}>{}",
            b.attr(&e, "data-source").await,
            b.attr(&e, "data-target").await
        ));
    }
    let expected_edges: BTreeSet<String> = [
        "user>frontend",
        "frontend>checkout",
        "frontend>catalog",
        "checkout>payments",
        "checkout>postgres",
        "frontend>recommendations",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(edges, expected_edges);
    // The mesh-only edge says where it was seen.
    b.screenshot("topology").await;
    let rec = b.find_all("g.edge[data-target='recommendations']").await;
    assert!(b.text(&rec[0]).await.contains("access logs"));

    // Clicking a node opens its golden signals.
    let checkout = b.find_all("svg.graph g.node[data-id='checkout']").await;
    b.click(&checkout[0]).await;
    let panel = b
        .wait_for("[data-test='signals-panel'] .chart polyline", 3)
        .await;
    assert!(!panel.is_empty());
    let panel = b.find_all("[data-test='signals-panel']").await;
    let text = b.text(&panel[0]).await.to_lowercase();
    assert!(
        text.contains("checkout") && text.contains("rate") && text.contains("p99"),
        "{text}"
    );
    assert!(b.find_all("[data-test='failing-traces']").await.len() == 1);
    b.screenshot("topology-node").await;
    // The selection is in the URL, so the view can be shared.
    let url = b.call(reqwest::Method::GET, "/url", None).await;
    assert!(
        url.as_str()
            .unwrap_or_default()
            .contains("sel=node%3Acheckout"),
        "{url}"
    );

    // Clicking an edge charts the requests on it.
    let edge = b
        .find_all("svg.graph g.edge[data-source='checkout'][data-target='payments'] path.edge-hit")
        .await;
    b.click(&edge[0]).await;
    b.wait_for("[data-test='signals-panel'] .panel-title", 1)
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let title = b.find_all("[data-test='signals-panel'] .panel-title").await;
        let charts = b
            .find_all("[data-test='signals-panel'] .chart polyline")
            .await;
        if b.text(&title[0]).await.contains("checkout → payments") && charts.len() >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "edge panel did not chart the edge"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    b.screenshot("topology-edge").await;

    // Auto-refresh from the URL: the data reloads and the open panel stays in place.
    b.goto(&server.url("/?range=15m&refresh=5s&sel=node%3Acheckout"))
        .await;
    b.wait_for("[data-test='signals-panel'] .chart polyline", 3)
        .await;
    let stamp = b.find_all(".updated").await;
    let first = b.text(&stamp[0]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if b.text(&stamp[0]).await != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "auto-refresh did not reload ({first})"
        );
    }
    // After the reload the open panel's charts are drawn again.
    b.wait_for("[data-test='signals-panel'] .chart polyline", 3)
        .await;

    // Filter by namespace: the shop's services, not the web tier's.
    b.goto(&server.url("/?range=15m&namespace=shop")).await;
    b.wait_for("svg.graph g.node[data-id='payments']", 1).await;
    let mut shop = BTreeSet::new();
    for n in b.find_all("svg.graph g.node[data-kind='service']").await {
        shop.insert(b.attr(&n, "data-id").await);
    }
    assert!(
        shop.contains("checkout") && shop.contains("catalog") && !shop.contains("frontend"),
        "{shop:?}"
    );
    // A custom range puts both ends in the URL.
    let custom = b.find_all("button[data-range='custom']").await;
    b.click(&custom[0]).await;
    b.wait_for(".custom-range input[type='datetime-local']", 2)
        .await;
    let url = b.call(reqwest::Method::GET, "/url", None).await;
    let url = url.as_str().unwrap_or_default().to_string();
    assert!(
        url.contains("range=custom") && url.contains("from=") && url.contains("to="),
        "{url}"
    );

    // The time range is shared by every page through the URL.
    let hour = b.find_all("button[data-range='1h']").await;
    b.click(&hour[0]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let url = b.call(reqwest::Method::GET, "/url", None).await;
        let services_link = b.find_all("a.nav-link[href^='/services']").await;
        let href = b.attr(&services_link[0], "href").await;
        if url.as_str().unwrap_or_default().contains("range=1h") && href.contains("range=1h") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "range=1h not in the URL and links: {url} {href}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Services: one row per service with server spans, with sparklines.
    b.goto(&server.url("/services?range=15m")).await;
    b.wait_for("tr[data-service='payments'] svg.spark polyline", 1)
        .await;
    let rows = b.find_all("[data-test='services-table'] tbody tr").await;
    let mut names = BTreeSet::new();
    for r in &rows {
        names.insert(b.attr(r, "data-service").await);
    }
    for s in ["frontend", "checkout", "catalog", "payments"] {
        assert!(names.contains(s), "{names:?}");
    }
    b.screenshot("services").await;
    // Sortable: by p50, slowest first.
    let p50 = b.find_all("th[data-sort='p50_ms']").await;
    b.click(&p50[0]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = b.find_all("[data-test='services-table'] tbody tr").await;
        let first = b.attr(&rows[0], "data-service").await;
        let last = b.attr(&rows[rows.len() - 1], "data-service").await;
        if first == "frontend" && last == "catalog" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not sorted by p50: {first} … {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    b.goto(&server.url("/services/checkout?range=15m")).await;
    b.wait_for("[data-test='endpoints'] tbody tr", 1).await;
    b.screenshot("service").await;

    // Traces: search, open one, a waterfall with its seven spans and its logs.
    b.goto(&server.url("/traces?range=15m&service=payments"))
        .await;
    let want = trace_id(KNOWN_TRACE);
    let row = b
        .wait_for(
            &format!("tr.trace-row[data-trace-id='{want}'] a.trace-link"),
            1,
        )
        .await;
    let listed = b.find_all("tr.trace-row").await.len();
    assert_eq!(
        listed as u64,
        (0..TRACES).filter(|i| is_checkout(*i)).count() as u64
    );
    b.screenshot("traces").await;
    b.click(&row[0]).await;
    let spans = b.wait_for("[data-test='waterfall'] .span-row", 7).await;
    // The trace is rendered at once: seven rows, no more.
    assert_eq!(
        b.find_all("[data-test='waterfall'] .span-row").await.len(),
        7
    );
    // The parallel render span is the one span off the critical path.
    let off: Vec<String> = b.find_all(".span-row:not(.critical)").await;
    assert_eq!(off.len(), 1, "exactly one span off the critical path");
    assert!(b.text(&off[0]).await.contains("render cart"));
    // Its application log and the sidecar's access log, in time order.
    let logs = b.wait_for("[data-test='trace-logs'] .log-line", 2).await;
    assert!(b.text(&logs[0]).await.contains("POST /api/checkout 200"));
    assert!(
        b.text(&logs[1])
            .await
            .contains(&format!("order {KNOWN_TRACE} placed"))
    );
    // Span details: attributes and events of the payments span.
    let mut payments = None;
    for sp in &spans {
        if b.text(sp).await.contains("POST /charge") {
            payments = Some(sp.clone());
        }
    }
    b.click(&payments.expect("the payments span")).await;
    let detail = b.wait_for("[data-test='span-detail']", 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = b.text(&detail[0]).await;
        if text.contains("payment.provider") && text.contains("card authorised") {
            break;
        }
        assert!(Instant::now() < deadline, "span detail: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.screenshot("trace").await;
    // The minimap has a bar per span; collapsing the root hides the six below it.
    assert_eq!(b.find_all("[data-test='minimap'] .mini-bar").await.len(), 7);
    let visible_rows = "return [...document.querySelectorAll('[data-test=waterfall] .span-row')]
        .filter(r => r.style.display !== 'none').length";
    let twisty = b.find_all("[data-test='collapse']").await;
    b.click(&twisty[0]).await;
    assert_eq!(b.js(visible_rows, json!([])).await, 1);
    b.click(&twisty[0]).await;
    assert_eq!(b.js(visible_rows, json!([])).await, 7);
    // Download as JSON (the download is caught and read back).
    b.js(
        "window.__saved = []; URL.revokeObjectURL = () => {};
         HTMLAnchorElement.prototype.click = function () { window.__saved.push([this.download, this.href]); };",
        json!([]),
    )
    .await;
    let button = b.find_all("[data-test='trace-json']").await;
    b.click(&button[0]).await;
    let saved = b
        .js_async(
            "const done = arguments[arguments.length - 1];
             const [name, href] = window.__saved[0];
             fetch(href).then(r => r.text()).then(t => done([name, t]));",
        )
        .await;
    assert_eq!(saved[0], format!("trace-{want}.json"));
    let json: Value = serde_json::from_str(saved[1].as_str().expect("text")).expect("JSON");
    assert_eq!(json["spans"].as_array().map(Vec::len), Some(7));
    // Against a trace that never reached checkout: its operations are missing there.
    let other = trace_id(5);
    b.goto(&server.url(&format!("/traces/{want}?compare={other}")))
        .await;
    b.wait_for("[data-test='trace-compare'] [data-test='compare-row']", 1)
        .await;
    let missing = b
        .find_all("[data-test='compare-row'][data-change='missing']")
        .await;
    let mut names = Vec::new();
    for r in &missing {
        names.push(b.text(r).await);
    }
    assert!(
        names
            .iter()
            .any(|n| n.contains("payments") && n.contains("POST /charge")),
        "{names:?}"
    );
    b.screenshot("trace-compare").await;

    // Logs: filtering by text keeps only the matching records; their trace ids link.
    b.goto(&server.url("/logs?range=15m")).await;
    b.wait_for("[data-test='log-results'] .log-row", 10).await;
    b.screenshot("logs").await;
    let input = b
        .find_all("[data-test='log-search'] input[name='text']")
        .await;
    b.type_into(&input[0], "declined").await;
    let submit = b
        .find_all("[data-test='log-search'] button[type='submit']")
        .await;
    b.click(&submit[0]).await;
    let declined = (0..TRACES).filter(|i| is_error(*i)).count();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = b.find_all("[data-test='log-results'] .log-row").await;
        let mut all = rows.len() == declined;
        for r in &rows {
            all &= b.text(r).await.contains("card declined");
        }
        if all {
            assert!(
                !b.find_all("[data-test='log-results'] a.trace-chip")
                    .await
                    .is_empty()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "log filter did not narrow to {declined} rows (got {})",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    b.screenshot("logs-filtered").await;

    // SQL: run a query and read its rows; a bad query shows a readable error.
    b.goto(&server.url("/sql")).await;
    b.wait_for("[data-test='schema'] .table-schema", 3).await;
    let editor = b.wait_for("[data-test='sql-editor']", 1).await;
    b.type_into(&editor[0], "SELECT service_name, count(*) AS spans FROM spans GROUP BY service_name ORDER BY service_name").await;
    let run = b.find_all("[data-test='run-sql']").await;
    b.click(&run[0]).await;
    let rows = b.wait_for("[data-test='sql-results'] tbody tr", 4).await;
    let mut got = Vec::new();
    for r in &rows {
        got.push(
            b.text(r)
                .await
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    assert_eq!(
        got,
        ["catalog 20", "checkout 120", "frontend 160", "payments 40"]
    );
    b.type_into(&editor[0], "SELECT nope FROM spans").await;
    b.click(&run[0]).await;
    let err = b.wait_for(".error-box", 1).await;
    assert!(b.text(&err[0]).await.to_lowercase().contains("nope"));
    b.type_into(
        &editor[0],
        "SELECT date_bin(INTERVAL '30 seconds', start_time, TIMESTAMP '1970-01-01T00:00:00Z') AS t,\n       count(*) AS spans,\n       avg(duration_ns) / 1e6 AS avg_ms\nFROM spans\nGROUP BY 1\nORDER BY 1",
    )
    .await;
    b.click(&run[0]).await;
    b.wait_for(".sql-main .chart polyline", 1).await;
    b.screenshot("sql").await;

    // The error box above is the only failure: nothing else went wrong in the console
    // (the bad query's 400 is logged by the browser as a failed request, nothing else).
    let errors: Vec<String> = b
        .console_errors()
        .await
        .into_iter()
        .filter(|e| !e.contains("/api/v1/sql") || !e.contains("400"))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:#?}");

    if let Some(secs) = std::env::var("MESHSCOPE_UI_HOLD")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("UI at {} for {secs} s", server.url("/"));
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_asks_for_a_token_once_and_keeps_it_for_the_tab() {
    use std::os::unix::fs::PermissionsExt;
    const INGEST: &str = "ui-test-ingest-secret-0000000001";
    const READ: &str = "ui-test-read-secret-00000000002";
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "[[token]]\nname = \"feeder\"\nsecret = \"{INGEST}\"\nscopes = [\"ingest\"]\n\n\
             [[token]]\nname = \"browser\"\nsecret = \"{READ}\"\nscopes = [\"read\"]\n"
        ),
    )
    .expect("auth file");
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut server = Server::start_with(
        &dir.path().join("data"),
        &["--auth-file", auth.to_str().expect("path")],
    );
    server.token = Some(READ.into());
    feed_as(&server, Some(INGEST)).await;

    let b = Browser::start().await;
    b.goto(&server.url("/services?range=15m")).await;
    let input = b.wait_for("#token-input", 1).await;
    b.screenshot("token-prompt").await;
    // A wrong token is refused and asked for again.
    b.type_into(&input[0], "not-the-token").await;
    let submit = b.wait_for("#token-submit", 1).await;
    b.click(&submit[0]).await;
    let label = b.wait_for("label[for='token-input']", 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.text(&label[0]).await.contains("refused") {
        assert!(Instant::now() < deadline, "the wrong token was not refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let input = b.wait_for("#token-input", 1).await;
    b.type_into(&input[0], READ).await;
    let submit = b.wait_for("#token-submit", 1).await;
    b.click(&submit[0]).await;
    b.wait_for("tr[data-service='checkout']", 1).await;
    assert!(b.find_all("[data-test='token-prompt']").await.is_empty());

    // Another page load in the same tab: the token is kept, no prompt, data shown.
    b.goto(&server.url("/services?range=15m")).await;
    b.wait_for("tr[data-service='checkout']", 1).await;
    assert!(b.find_all("[data-test='token-prompt']").await.is_empty());
    let kept = b
        .js(
            "return sessionStorage.getItem('meshscope-token')",
            json!([]),
        )
        .await;
    assert_eq!(kept, json!(READ));
    let refused = server
        .metric("meshscope_auth_failures_total{surface=\"api\",reason=\"missing\"}")
        .await;
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
}

/// Access-log records a mesh's proxies write: `n` outbound calls `src → dst` over
/// `policy`, and, for `denied`, the callee's inbound record of the refusal.
fn access_logs(
    base_ns: u64,
    src: &str,
    dst: &str,
    policy: &str,
    n: u64,
    denied: bool,
) -> Vec<Value> {
    let id = |w: &str| format!("spiffe://meshscope.local/ns/shop/sa/{w}");
    (0..n)
        .flat_map(|i| {
            let t = (base_ns + i * 1_000_000_000).to_string();
            let status = if denied { "403" } else { "200" };
            let mut out = vec![attr("source_workload", src), attr("destination_workload", dst),
                attr("destination_service_name", dst), attr("direction", "outbound"),
                attr("duration_ms", "3"), attr("response_code", status),
                attr("connection_security_policy", policy)];
            if policy == "mutual_tls" {
                out.push(attr("source_principal", &id(src)));
                out.push(attr("destination_principal", &id(dst)));
            }
            let mut recs = vec![json!({ "timeUnixNano": t, "severityNumber": 9, "body": { "stringValue": "access" }, "attributes": out })];
            if denied {
                recs.push(json!({ "timeUnixNano": t, "severityNumber": 9, "body": { "stringValue": "access" }, "attributes": [
                    attr("downstream_workload", src), attr("local_workload", dst),
                    attr("destination_service_name", dst), attr("direction", "inbound"),
                    attr("duration_ms", "0.2"), attr("response_code", "403"),
                    attr("connection_security_policy", policy), attr("source_principal", &id(src)),
                    attr("destination_principal", &id(dst)), attr("authz", "deny")] }));
            }
            recs
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padlocks_on_the_topology_and_the_security_view_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"));
    let base = now_ns() - 5 * 60 * 1_000_000_000;
    let mut recs = access_logs(base, "frontend", "cart", "mutual_tls", 6, false);
    recs.extend(access_logs(
        base,
        "payments",
        "payments-gateway",
        "none",
        4,
        false,
    ));
    recs.extend(access_logs(
        base,
        "frontend",
        "payments",
        "mutual_tls",
        2,
        true,
    ));
    recs.extend(access_logs(
        base,
        "checkout",
        "cart",
        "mutual_tls",
        3,
        false,
    ));
    recs.extend(access_logs(base, "checkout", "cart", "none", 1, false));
    let body = json!({ "resourceLogs": [{ "resource": resource("mesh-proxy", "shop"),
        "scopeLogs": [{ "scope": { "name": "ui-test" }, "logRecords": recs }] }] });
    let r = reqwest::Client::new()
        .post(server.otlp_url("/v1/logs"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("OTLP/HTTP logs");
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.scalar("SELECT count(*) FROM logs").await < 18 {
        assert!(Instant::now() < deadline, "logs did not become visible");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let b = Browser::start().await;
    b.goto(&server.url("/?range=15m")).await;
    let edge = |s: &str, t: &str, level: &str| {
        format!(".edge[data-source='{s}'][data-target='{t}'] .lock[data-mtls='{level}']")
    };
    b.wait_for(&edge("frontend", "cart", "full"), 1).await;
    b.wait_for(&edge("payments", "payments-gateway", "none"), 1)
        .await;
    b.wait_for(&edge("checkout", "cart", "partial"), 1).await;
    let label = b
        .find_all(".edge[data-source='checkout'][data-target='cart'] .el2")
        .await;
    assert!(b.text(&label[0]).await.contains("mTLS 75%"));
    // No users edge in this mesh: its entry rate is zero, not "-0.00/s".
    let summary = b.find_all(".graph-summary").await;
    let text = b.text(&summary[0]).await;
    assert!(text.contains("entry rate 0.00/s"), "{text}");

    // The edge panel: the identities each side proved, and the denials.
    let hit = b
        .find_all(".edge[data-source='frontend'][data-target='payments'] path.edge-hit")
        .await;
    b.click(&hit[0]).await;
    let panel = b
        .wait_for("[data-test='edge-security'][data-mtls='full']", 1)
        .await;
    let text = b.text(&panel[0]).await;
    assert!(
        text.contains("spiffe://meshscope.local/ns/shop/sa/frontend")
            && text.contains("spiffe://meshscope.local/ns/shop/sa/payments"),
        "{text}"
    );
    let denied = b
        .wait_for("[data-test='edge-security'] [data-test='denied']", 1)
        .await;
    assert!(b.text(&denied[0]).await.contains("Denied 2"));

    // Per minute (`/api/v1/security/series`): the requests by transport and the denials
    // add up to what was sent, for the whole mesh and for one edge.
    let series = |q: &'static str| {
        let url = server.url(&format!("/api/v1/security/series{q}"));
        async move {
            reqwest::get(url)
                .await
                .expect("security series")
                .json::<Value>()
                .await
                .expect("JSON")
        }
    };
    let total = |v: &Value, k: &str| -> u64 {
        v["minutes"]
            .as_array()
            .map_or(0, |m| m.iter().map(|m| m[k].as_u64().unwrap_or(0)).sum())
    };
    let all = series("").await;
    assert_eq!(all["computed_from"], "access-logs", "{all}");
    assert_eq!(
        (
            total(&all, "mtls"),
            total(&all, "plaintext"),
            total(&all, "denied")
        ),
        (11, 5, 2),
        "{all}"
    );
    let edge = series("?source=checkout&target=cart").await;
    assert_eq!(
        (
            total(&edge, "mtls"),
            total(&edge, "plaintext"),
            total(&edge, "denied")
        ),
        (3, 1, 0),
        "{edge}"
    );

    // The Security view: every edge, worst first, under the per-minute chart.
    b.goto(&server.url("/security?range=15m")).await;
    let nav = b.wait_for("a.nav-link.active[href^='/security']", 1).await;
    assert_eq!(b.text(&nav[0]).await, "Security");
    let rows = b.wait_for("[data-test='security-row']", 4).await;
    let mut order = Vec::new();
    for r in &rows {
        order.push((
            b.attr(r, "data-source").await,
            b.attr(r, "data-target").await,
            b.attr(r, "data-mtls").await,
        ));
    }
    assert_eq!(
        order[..3]
            .iter()
            .map(|(s, t, m)| format!("{s}>{t}:{m}"))
            .collect::<Vec<_>>(),
        [
            "checkout>cart:partial",
            "payments>payments-gateway:none",
            "frontend>payments:full"
        ],
        "plaintext and denied edges first"
    );
    let chart = b.wait_for("[data-test='security-chart'] svg", 1).await;
    assert!(!chart.is_empty());
    let charted = b.find_all("[data-test='security-chart']").await;
    assert_eq!(
        b.attr(&charted[0], "data-computed-from").await,
        "access-logs"
    );
    let denied_row = b.text(&rows[2]).await;
    assert!(denied_row.contains("2 denied"), "{denied_row}");
    let summary = b.find_all("[data-test='security-summary']").await;
    let s = b.text(&summary[0]).await;
    assert!(
        s.contains("2 requests denied") && s.contains("1 plaintext"),
        "{s}"
    );
    b.screenshot("security").await;
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}

/// OTLP/JSON of `n` requests `caller → callee` starting at `t0_ns` (a root SERVER span of
/// the caller, its CLIENT span and the callee's SERVER span), one resource per service.
fn calls(
    t0_ns: u64,
    seed: u64,
    (caller, caller_ns): (&str, &str),
    (callee, callee_ns): (&str, &str),
    n: u64,
) -> Value {
    let span = |trace: &str, id: &str, parent: Option<&str>, kind: u8, start: u64, path: &str| {
        json!({
            "traceId": trace, "spanId": id, "parentSpanId": parent.unwrap_or(""),
            "name": format!("GET {path}"), "kind": kind,
            "startTimeUnixNano": start.to_string(), "endTimeUnixNano": (start + 4_000_000).to_string(),
            "attributes": [attr("url.path", path), attr("http.request.method", "GET")],
        })
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..n {
        let trace = format!("{:032x}", (seed << 32) + i);
        let t = t0_ns + i * 50_000_000;
        let (root, client, server) = (
            format!("{:016x}", (seed << 40) + i * 4 + 1),
            format!("{:016x}", (seed << 40) + i * 4 + 2),
            format!("{:016x}", (seed << 40) + i * 4 + 3),
        );
        a.push(span(&trace, &root, None, 2, t, "/"));
        a.push(span(
            &trace,
            &client,
            Some(&root),
            3,
            t + 100_000,
            &format!("/{callee}"),
        ));
        b.push(span(
            &trace,
            &server,
            Some(&client),
            2,
            t + 200_000,
            &format!("/{callee}"),
        ));
    }
    json!({ "resourceSpans": [
        { "resource": resource(caller, caller_ns), "scopeSpans": [{ "spans": a }] },
        { "resource": resource(callee, callee_ns), "scopeSpans": [{ "spans": b }] },
    ]})
}

async fn post_json(server: &Server, body: &Value) {
    let r = reqwest::Client::new()
        .post(server.otlp_url("/v1/traces"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("OTLP/HTTP traces");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_zoom_labels_hiding_diff_and_the_live_tap_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"));
    let minute = 60 * 1_000_000_000;
    // 10 s into a minute, so that each window's calls (a second long) stay in one minute.
    let start = (now_ns() - 5 * minute) / minute * minute + 10_000_000_000;
    let (now, hour_ago) = (start, start - 60 * minute);
    let frontend = ("frontend", "shop");
    // The hour before: frontend → cart → legacy; now: frontend → cart → inventory.
    for (t, seed, from, to) in [
        (hour_ago, 1, frontend, ("cart", "shop")),
        (hour_ago, 2, ("cart", "shop"), ("legacy", "shop")),
        (now, 3, frontend, ("cart", "shop")),
        (now, 4, ("cart", "shop"), ("inventory", "stock")),
    ] {
        post_json(&server, &calls(t, seed, from, to, 20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.scalar("SELECT count(*) FROM spans").await < 240 {
        assert!(Instant::now() < deadline, "spans did not become visible");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let b = Browser::start().await;
    b.goto(&server.url("/?range=15m")).await;
    b.wait_for(".edge[data-source='cart'][data-target='inventory']", 1)
        .await;
    let transform = || async {
        let v = b.find_all("[data-test='viewport']").await;
        b.attr(&v[0], "transform").await
    };
    let fit = "translate(0.0,0.0) scale(1.000)";
    assert_eq!(transform().await, fit);
    // Zoom with the button, then with the wheel, pan by dragging, and fit again.
    let zoom_in = b.find_all("[data-test='zoom-in']").await;
    b.click(&zoom_in[0]).await;
    let zoomed = transform().await;
    assert!(zoomed.ends_with("scale(1.300)"), "{zoomed}");
    b.js(
        "const s = document.querySelector('svg.graph'); const r = s.getBoundingClientRect();
         s.dispatchEvent(new WheelEvent('wheel', {deltaY: -100, clientX: r.left + 100, clientY: r.top + 100, bubbles: true, cancelable: true}));",
        json!([]),
    )
    .await;
    let wheeled = transform().await;
    assert!(wheeled.ends_with("scale(1.495)"), "{wheeled}");
    b.js(
        "const s = document.querySelector('svg.graph'); const r = s.getBoundingClientRect();
         const at = (type, x) => s.dispatchEvent(new PointerEvent(type, {clientX: r.left + x, clientY: r.top + 200, button: 0, bubbles: true}));
         at('pointerdown', 200); at('pointermove', 260); at('pointermove', 320); at('pointerup', 320);",
        json!([]),
    )
    .await;
    let panned = transform().await;
    assert_ne!(panned, wheeled, "dragging pans");
    assert!(panned.ends_with("scale(1.495)"), "{panned}");
    b.screenshot("topology-zoomed").await;
    let fit_button = b.find_all("[data-test='zoom-fit']").await;
    b.click(&fit_button[0]).await;
    assert_eq!(transform().await, fit);

    // Export: each button saves a file (the page's downloads are caught and read back).
    b.js(
        "window.__saved = [];
         URL.revokeObjectURL = () => {};
         HTMLAnchorElement.prototype.click = function () { window.__saved.push([this.download, this.href]); };",
        json!([]),
    )
    .await;
    for what in ["svg", "json", "png"] {
        let button = b.find_all(&format!("[data-test='export-{what}']")).await;
        b.click(&button[0]).await;
    }
    let saved = b
        .js_async(
            "const done = arguments[arguments.length - 1];
             const wait = () => window.__saved.length < 3 ? setTimeout(wait, 50) :
                 Promise.all(window.__saved.map(([name, href]) => fetch(href).then(r => r.blob())
                     .then(async b => [name, b.type, b.size, b.type.startsWith('image/png') ? '' : await b.text()])))
                 .then(done);
             wait();",
        )
        .await;
    let saved = saved.as_array().expect("downloads");
    let file = |name: &str| {
        saved
            .iter()
            .find(|f| f[0] == name)
            .unwrap_or_else(|| panic!("no {name} in {saved:?}"))
            .clone()
    };
    let svg = file("meshscope-topology.svg");
    let text = svg[3].as_str().unwrap();
    assert!(text.starts_with("<svg") && text.contains("xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(
        text.contains("<style>") && text.contains("data-id=\"inventory\""),
        "{}",
        &text[..200]
    );
    let json: Value =
        serde_json::from_str(file("meshscope-topology.json")[3].as_str().unwrap()).unwrap();
    assert_eq!(json["nodes"].as_array().unwrap().len(), 4, "{json}");
    assert_eq!(json["edges"].as_array().unwrap().len(), 4, "{json}");
    let png = file("meshscope-topology.png");
    assert_eq!(png[1], "image/png");
    assert!(png[2].as_u64().unwrap() > 5_000, "{png:?}");

    // Edge labels as chosen: p99 only, or none (the hover card keeps the numbers).
    b.goto(&server.url("/?range=15m&label=p99")).await;
    let l1 = b
        .wait_for(".edge[data-source='frontend'][data-target='cart'] .el1", 1)
        .await;
    assert!(b.text(&l1[0]).await.starts_with("p99 "));
    b.goto(&server.url("/?range=15m&label=none")).await;
    let edge = b
        .wait_for(".edge[data-source='frontend'][data-target='cart']", 1)
        .await;
    assert!(b.find_all(".edge-label").await.is_empty(), "labels hidden");
    // …and the hover card keeps the numbers: pointing at the edge shows them, styled.
    let hover = b.attr(&edge[0], "data-hover").await;
    assert!(
        hover.starts_with("frontend → cart\n") && hover.contains("p99"),
        "{hover}"
    );
    b.js(
        "const e = document.querySelector(\".edge[data-source='frontend'][data-target='cart'] .edge-hit\");
         const r = e.getBoundingClientRect();
         e.dispatchEvent(new PointerEvent('pointerover', {bubbles: true, clientX: r.left + r.width / 2, clientY: r.top + r.height / 2}));",
        json!([]),
    )
    .await;
    let card = b.wait_for("[data-test='hover-card']", 1).await;
    let text = b.text(&card[0]).await;
    assert!(
        text.starts_with("frontend → cart") && text.contains("p99"),
        "{text}"
    );
    let shown = b
        .js(
            "const c = getComputedStyle(document.querySelector(\"[data-test='hover-card']\")); return [c.position, c.borderRadius];",
            json!([]),
        )
        .await;
    assert_eq!(shown, json!(["fixed", "8px"]));
    b.screenshot("topology-hover-card").await;
    b.js(
        "document.querySelector('svg.graph').dispatchEvent(new PointerEvent('pointerleave'));",
        json!([]),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.find_all("[data-test='hover-card']").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the card stayed after the pointer left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Hide a node from its panel; hide a namespace; show them again.
    b.goto(&server.url("/?range=15m")).await;
    let node = b
        .wait_for(".node[data-id='legacy'], .node[data-id='inventory']", 1)
        .await;
    b.click(&node[0]).await;
    let hide = b.wait_for("[data-test='hide-node']", 1).await;
    let tap = b.find_all("[data-test='tap-link']").await;
    assert!(b.attr(&tap[0], "href").await.contains("/tap?"));
    b.click(&hide[0]).await;
    b.wait_for("[data-test='show-hidden']", 1).await;
    assert!(b.find_all(".node[data-id='inventory']").await.is_empty());
    assert!(
        b.find_all(".edge[data-target='inventory']")
            .await
            .is_empty(),
        "its edges go with it"
    );
    b.goto(&server.url("/?range=15m&hide=ns:stock")).await;
    b.wait_for(".node[data-id='cart']", 1).await;
    assert!(b.find_all(".node[data-namespace='stock']").await.is_empty());
    let show = b.wait_for("[data-test='show-hidden']", 1).await;
    b.click(&show[0]).await;
    b.wait_for(".node[data-id='inventory']", 1).await;

    // Against the hour before: inventory's edge added, legacy's removed, cart's the same.
    b.goto(&server.url("/?range=15m&compare=hour")).await;
    b.wait_for(
        ".edge[data-source='cart'][data-target='inventory'][data-change='added']",
        1,
    )
    .await;
    b.wait_for(
        ".edge[data-source='cart'][data-target='legacy'][data-change='removed']",
        1,
    )
    .await;
    b.wait_for(
        ".edge[data-source='frontend'][data-target='cart'][data-change='same']",
        1,
    )
    .await;
    b.wait_for(".node[data-id='legacy'][data-change='removed']", 1)
        .await;
    let summary = b.wait_for("[data-test='diff-summary']", 1).await;
    let text = b.text(&summary[0]).await;
    assert!(
        text.contains("the hour before: 1 added, 1 removed, 0 changed"),
        "{text}"
    );
    b.screenshot("topology-diff").await;

    // Replay, minute by minute: the minute of the traffic shows it, the one before is empty.
    let minute_of = |ns: u64| {
        chrono::DateTime::from_timestamp_nanos((ns / minute * minute) as i64)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    b.goto(&server.url(&format!("/?range=15m&at={}", minute_of(now))))
        .await;
    b.wait_for(".edge[data-source='cart'][data-target='inventory']", 1)
        .await;
    let replay = b.wait_for("[data-test='replay'] span", 1).await;
    let label = b.text(&replay[0]).await;
    assert!(label.to_lowercase().starts_with("replay · "), "{label}");
    b.goto(&server.url(&format!("/?range=15m&at={}", minute_of(now - 2 * minute))))
        .await;
    b.wait_for(".empty", 1).await;
    let whole = b.wait_for("[data-test='replay-off']", 1).await;
    b.click(&whole[0]).await;
    b.wait_for(".edge[data-source='cart'][data-target='inventory']", 1)
        .await;

    // Mirrored traffic in the edge panel: primary against shadow, per route.
    let pair = |i: u64, side: &str, hash: &str, ms: u64| {
        json!({
            "traceId": format!("{:032x}", 0xabc0_0000u64 + i), "spanId": format!("{:016x}", 0xabc0_0000u64 + i * 2 + u64::from(side == "shadow")),
            "parentSpanId": format!("{:016x}", 0xfff0_0000u64 + i), "name": "POST /pay", "kind": 3,
            "startTimeUnixNano": (now + i * 1_000_000).to_string(), "endTimeUnixNano": (now + i * 1_000_000 + ms * 1_000_000).to_string(),
            "attributes": [attr("peer.service", "payments"), attr("meshscope.route", "all"), attr("meshscope.mirror", side),
                           attr("meshscope.body_hash", hash), json!({ "key": "http.response.status_code", "value": { "intValue": "200" } })],
        })
    };
    let spans: Vec<Value> = (0..4)
        .flat_map(|i| {
            [
                pair(i, "primary", "aa", 5),
                pair(i, "shadow", if i == 0 { "aa" } else { "bb" }, 40),
            ]
        })
        .collect();
    post_json(
        &server,
        &json!({ "resourceSpans": [{ "resource": resource("checkout", "shop"), "scopeSpans": [{ "spans": spans }] }] }),
    )
    .await;
    b.goto(&server.url("/?range=15m&sel=edge:checkout>payments"))
        .await;
    let block = b
        .wait_for(
            "[data-test='mirror-compare'] .mirror-row[data-route='all']",
            1,
        )
        .await;
    let text = b.text(&block[0]).await;
    assert!(
        text.contains("4 pairs") && text.contains("bodies alike 25"),
        "{text}"
    );
    b.screenshot("topology-mirror").await;

    // The Mesh page: a proxy following the control plane, in sync with its policy.
    let put = reqwest::Client::new()
        .put(server.url("/api/v1/mesh/policy/caller"))
        .body("[[destination]]\nname = \"shop\"\nendpoint = [{ address = \"127.0.0.1:9\" }]\n")
        .send()
        .await
        .expect("PUT policy");
    assert_eq!(put.status(), 200);
    let mut proxy = meshscope_proxy::Proxy::start(
        meshscope_proxy::config::ProxyConfig::parse(
            "[service]\nname = \"caller\"\n[listen]\noutbound = \"127.0.0.1:0\"\n",
        )
        .expect("config"),
        None,
    )
    .await
    .expect("proxy");
    proxy.follow(meshscope_proxy::control::ControlPlane {
        url: server.url(""),
        workload: "caller".into(),
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.applied().version != 1 {
        assert!(
            Instant::now() < deadline,
            "the proxy never applied the policy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first poll reports version 0, the next the applied one; the page reads the
    // list when it opens.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        b.goto(&server.url("/mesh")).await;
        let row = b
            .wait_for("[data-test='proxy-row'][data-workload='caller']", 1)
            .await;
        if b.attr(&row[0], "data-sync").await == "synced" {
            break;
        }
        assert!(Instant::now() < deadline, "never shown in sync");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    b.wait_for("[data-test='policy'][data-workload='caller']", 1)
        .await;
    let change = b.wait_for("[data-test='change-row']", 1).await;
    let text = b.text(&change[0]).await;
    assert!(
        text.contains("caller v1") && text.contains("first version"),
        "{text}"
    );
    b.screenshot("mesh").await;
    proxy.stop().await;

    // A policy change is marked on the charts of the services it touched: frontend's
    // split towards cart, on cart's page, with what changed on hover and in a list.
    for weights in [(90, 10), (50, 50)] {
        let doc = format!(
            "[[destination]]\nname = \"cart\"\nendpoint = [{{ address = \"127.0.0.1:9\", version = \"v1\", weight = {} }}, \
             {{ address = \"127.0.0.1:10\", version = \"v2\", weight = {} }}]\n",
            weights.0, weights.1
        );
        let put = reqwest::Client::new()
            .put(server.url("/api/v1/mesh/policy/frontend"))
            .body(doc)
            .send()
            .await
            .expect("PUT policy");
        assert_eq!(put.status(), 200);
    }
    b.goto(&server.url("/services/cart?range=15m")).await;
    // The two versions, milliseconds apart, are one mark (`v1–v2`) on each of the three
    // charts, with both on hover.
    let marks = b.wait_for("[data-test='chart-mark']", 3).await;
    assert_eq!(marks.len(), 3);
    assert_eq!(b.text(&marks[0]).await, "v1–v2");
    let titles = b
        .js(
            "return [...document.querySelectorAll(\"[data-test='chart-mark'] title\")].map(t => t.textContent)",
            json!([]),
        )
        .await;
    let titles: Vec<&str> = titles
        .as_array()
        .expect("titles")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(titles.len(), marks.len());
    assert!(
        titles.iter().all(|t| t.contains("policy of frontend v2")
            && t.contains("destination[cart].endpoint[v1].weight: 90 → 50")
            && t.contains("policy of frontend v1")),
        "{titles:?}"
    );
    let rows = b.wait_for("[data-test='change-row']", 2).await;
    let newest = b.text(&rows[0]).await;
    assert!(
        newest.contains("frontend v2") && newest.contains("10 → 50"),
        "{newest}"
    );
    b.screenshot("service-policy-changes").await;

    // What a caller's proxy did on an edge (an ejection, the breaker opening, a retry the
    // budget refused; the bundled proxy's span attributes) is in the edge's panel.
    let t = now + 30_000_000_000;
    let protected = json!({ "resourceSpans": [{ "resource": resource("cart", "shop"), "scopeSpans": [{ "spans": [{
        "traceId": format!("{:032x}", 0xfeed_u64), "spanId": format!("{:016x}", 0xfeed_u64),
        "name": "GET /inventory", "kind": 3,
        "startTimeUnixNano": t.to_string(), "endTimeUnixNano": (t + 1_000_000).to_string(),
        "status": { "code": 2 },
        "attributes": [
            attr("peer.service", "inventory"),
            attr("meshscope.ejected", "10.0.0.7:8080"),
            attr("meshscope.breaker_transition", "open"),
            { "key": "meshscope.retry_budget_exhausted", "value": { "boolValue": true } },
        ],
    }]}]}]});
    post_json(&server, &protected).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while server
        .scalar("SELECT count(*) FROM spans WHERE span_attributes['meshscope.ejected'] IS NOT NULL")
        .await
        < 1
    {
        assert!(Instant::now() < deadline, "the span did not become visible");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.goto(&server.url("/?range=15m&sel=edge:cart%3Einventory"))
        .await;
    let line = b.wait_for("[data-test='resilience']", 1).await;
    assert_eq!(
        b.text(&line[0]).await,
        "Resilience: 1 endpoint ejected · breaker opened 1, closed 0 · 1 retry refused by the budget"
    );

    // The live tap: requests appear as they are ingested; leaving the page ends the tap.
    b.goto(&server.url("/tap?service=cart")).await;
    server
        .wait_metric("meshscope_tap_subscribers", 20, |v| v == 1.0)
        .await;
    post_json(
        &server,
        &calls(now_ns(), 5, ("cart", "shop"), ("inventory", "stock"), 3),
    )
    .await;
    let rows = b.wait_for("[data-test='tap-row']", 6).await;
    let text = b.text(&rows[0]).await;
    assert!(text.contains("cart") && text.contains("GET /"), "{text}");
    let trace = b.find_all("[data-test='tap-row'] a").await;
    assert!(b.attr(&trace[0], "href").await.starts_with("/traces/"));
    let live = b
        .js(
            "return document.querySelector(\"[data-test='tap-state']\").textContent",
            json!([]),
        )
        .await;
    assert_eq!(live, "live · 6 requests");
    let pause = b.find_all("[data-test='tap-pause']").await;
    b.click(&pause[0]).await;
    post_json(
        &server,
        &calls(now_ns(), 6, ("cart", "shop"), ("inventory", "stock"), 1),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = b
            .js(
                "return document.querySelector(\"[data-test='tap-pause']\").textContent",
                json!([]),
            )
            .await;
        if text == "Resume (2 held)" {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.find_all("[data-test='tap-row']").await.len(), 6, "paused");
    b.screenshot("tap").await;
    // Leaving the page (through the app's navigation) ends its tap.
    let services = b.find_all("a.nav-link[href^='/services']").await;
    b.click(&services[0]).await;
    b.wait_for("a.nav-link.active[href^='/services']", 1).await;
    server
        .wait_metric("meshscope_tap_subscribers", 20, |v| v == 0.0)
        .await;
    // And so does leaving the app (the page may stay in the back/forward cache).
    b.goto(&server.url("/tap")).await;
    server
        .wait_metric("meshscope_tap_subscribers", 20, |v| v == 1.0)
        .await;
    b.goto("about:blank").await;
    server
        .wait_metric("meshscope_tap_subscribers", 20, |v| v == 0.0)
        .await;
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_services_stay_legible_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"));
    post_json(&server, &big_mesh(now_ns() - 5 * 60 * 1_000_000_000)).await;
    let graph = || async {
        reqwest::get(server.url("/api/v1/graph"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let edges = loop {
        let g = graph().await;
        let n = g["edges"].as_array().map(Vec::len).unwrap_or(0);
        if g["nodes"].as_array().map(Vec::len) == Some(51) && n == 163 {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the mesh did not arrive: {n} edges"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let b = Browser::start().await;
    b.call(
        reqwest::Method::POST,
        "/window/rect",
        Some(json!({ "width": 1400, "height": 900 })),
    )
    .await;
    b.goto(&server.url("/?range=15m")).await;
    b.wait_for(".node.kind-service", 50).await;
    b.wait_for(".ns-box", 5).await;
    // Bounding boxes as drawn: node labels never overlap one another, and no edge label
    // covers a node's shape or label, or another edge label.
    let measure = "
        const boxes = sel => [...document.querySelectorAll(sel)].map(e => e.getBoundingClientRect())
            .filter(r => r.width > 0 && r.height > 0);
        const hit = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
        const pairs = (xs, ys, same) => { let n = 0; xs.forEach((a, i) => ys.forEach((b, j) => {
            if ((!same || j > i) && hit(a, b)) n++; })); return n; };
        const names = boxes('.node .node-label'),
              shapes = boxes('.node circle.service-shape, .node rect.user-shape, .node polygon, .version-dot circle');
        const labels = boxes('.edge-label rect');
        return { names: names.length, labels: labels.length, locks: document.querySelectorAll('.lock').length,
                 name_pairs: pairs(names, names, true), label_on_name: pairs(labels, names, false),
                 label_on_shape: pairs(labels, shapes, false), label_pairs: pairs(labels, labels, true),
                 versions: document.querySelectorAll(\"[data-test='version-split']\").length,
                 version_nodes: document.querySelectorAll(\"[data-test='version-nodes'] .version-dot\").length,
                 split_on_edges: [...document.querySelectorAll('.edge .el2')].filter(t => t.textContent.includes('v2 ')).length,
                 app_boxes: document.querySelectorAll(\"[data-test='app-box']\").length,
                 dots_outside_box: [...document.querySelectorAll('.node')].reduce((n, g) => {
                     const box = g.querySelector(\"[data-test='app-box']\");
                     if (!box) return n;
                     const b = box.getBoundingClientRect();
                     return n + [...g.querySelectorAll('.version-dot circle, .version-label')].filter(d => {
                         const r = d.getBoundingClientRect();
                         return r.left < b.left || r.right > b.right || r.top < b.top || r.bottom > b.bottom; }).length; }, 0),
                 box_on_other_node: [...document.querySelectorAll('.node')].reduce((n, g) => {
                     const box = g.querySelector(\"[data-test='app-box']\");
                     if (!box) return n;
                     const b = box.getBoundingClientRect();
                     return n + [...document.querySelectorAll('.node')].filter(o => o !== g)
                         .flatMap(o => [...o.querySelectorAll('.service-shape, .user-shape, polygon, .node-label')])
                         .filter(e => hit(b, e.getBoundingClientRect())).length; }, 0) };";
    let m = b.js(measure, json!([])).await;
    eprintln!("50 services, {edges} edges: {m}");
    assert_eq!(m["names"], 51, "{m}");
    assert_eq!(m["name_pairs"], 0, "overlapping node labels: {m}");
    assert_eq!(m["label_on_name"], 0, "edge labels over node labels: {m}");
    assert_eq!(m["label_on_shape"], 0, "edge labels over nodes: {m}");
    assert_eq!(m["label_pairs"], 0, "overlapping edge labels: {m}");
    assert!(
        m["labels"].as_u64().unwrap() >= 40,
        "most edges keep a label: {m}"
    );
    assert_eq!(
        m["versions"], 10,
        "the version split of each two-version service: {m}"
    );
    // Each two-version service is a box holding its versions, clear of every other node.
    assert_eq!(m["app_boxes"], 10, "{m}");
    assert_eq!(
        m["dots_outside_box"], 0,
        "versions drawn outside their service's box: {m}"
    );
    assert_eq!(
        m["box_on_other_node"], 0,
        "a service's box covers another node: {m}"
    );
    b.screenshot("topology-50").await;
    let zoom_in = b.find_all("[data-test='zoom-in']").await;
    for _ in 0..3 {
        b.click(&zoom_in[0]).await;
    }
    b.screenshot("topology-50-zoomed").await;

    // Focus on one service and its neighbours; hide a namespace.
    b.goto(&server.url("/?range=15m&service=ns2-svc4&depth=1"))
        .await;
    b.wait_for(".node[data-id='ns2-svc4']", 1).await;
    // Itself, the three it calls and ns3-svc2, its three callers and ns1-svc8.
    let focused = b.find_all(".node").await;
    let mut ids = Vec::new();
    for n in &focused {
        ids.push(b.attr(n, "data-id").await);
    }
    ids.sort();
    assert_eq!(
        ids,
        [
            "ns1-svc8", "ns2-svc1", "ns2-svc2", "ns2-svc3", "ns2-svc4", "ns2-svc5", "ns2-svc6",
            "ns2-svc7", "ns3-svc2"
        ]
    );
    b.goto(&server.url("/?range=15m&hide=ns:ns4")).await;
    b.wait_for(".node[data-id='ns3-svc0']", 1).await;
    assert_eq!(b.find_all(".node.kind-service").await.len(), 40);
    assert!(b.find_all(".ns-box[data-namespace='ns4']").await.is_empty());
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}
