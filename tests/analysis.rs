//! The service graph, golden signals and traces against an oracle: a generated mesh
//! workload whose every edge, node and percentile the test computes on its own, sent
//! through OTLP the way real meshes send it (shuffled, split across exporters and batches,
//! with a gateway that emits only CLIENT spans, an uninstrumented database, messaging,
//! missing parents and clock skew).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use common::Server;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, Status};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn id8(&mut self) -> Vec<u8> {
        self.next().to_le_bytes().to_vec()
    }
}

#[derive(Clone)]
struct GenSpan {
    service: &'static str,
    span: Span,
}

use common::otlp::kv;

struct Mesh {
    rng: Rng,
    base_ns: u64,
    spans: Vec<GenSpan>,
}

impl Mesh {
    fn new(seed: u64, base_ns: u64) -> Mesh {
        Mesh {
            rng: Rng(seed),
            base_ns,
            spans: Vec::new(),
        }
    }

    /// One request `caller → callee` at `start`: a CLIENT span `client_name` (3 ms) and its
    /// SERVER child `server_name` 0.1 ms later (2 ms), failed when `error`.
    fn call(
        &mut self,
        (caller, client_name): (&'static str, &str),
        (callee, server_name): (&'static str, &str),
        start: u64,
        error: bool,
    ) {
        let trace = [self.rng.id8(), self.rng.id8()].concat();
        let c = self.span(
            caller,
            &trace,
            None,
            CLIENT,
            client_name,
            start,
            3_000_000,
            false,
            vec![],
        );
        let at = start + 100_000;
        self.span(
            callee,
            &trace,
            Some(&c),
            SERVER,
            server_name,
            at,
            2_000_000,
            error,
            vec![],
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn span(
        &mut self,
        service: &'static str,
        trace: &[u8],
        parent: Option<&[u8]>,
        kind: i32,
        name: &str,
        start: u64,
        dur: u64,
        error: bool,
        attrs: Vec<KeyValue>,
    ) -> Vec<u8> {
        let id = self.rng.id8();
        // payments' clock runs 2 s ahead: pairing must not care.
        let skew = if service == "payments" {
            2_000_000_000
        } else {
            0
        };
        self.spans.push(GenSpan {
            service,
            span: Span {
                trace_id: trace.to_vec(),
                span_id: id.clone(),
                parent_span_id: parent.map(<[u8]>::to_vec).unwrap_or_default(),
                name: name.into(),
                kind,
                start_time_unix_nano: self.base_ns + start + skew,
                end_time_unix_nano: self.base_ns + start + skew + dur,
                attributes: attrs,
                status: Some(Status {
                    code: if error { 2 } else { 0 },
                    message: String::new(),
                }),
                ..Default::default()
            },
        });
        id
    }

    fn latency(&mut self, typical_ms: u64) -> u64 {
        // A long-tailed distribution: mostly near typical, sometimes 10x.
        let base = typical_ms * 1_000_000 / 2 + self.rng.below(typical_ms * 1_000_000);
        if self.rng.chance(5) { base * 10 } else { base }
    }

    /// One request entering the mesh.
    fn request(&mut self, i: u64) {
        let trace = [self.rng.id8(), self.rng.id8()].concat();
        let t0 = i * 50_000_000; // requests spread over the range
        let via_gateway = self.rng.chance(70);
        let fe_dur = self.latency(40) + 60_000_000;
        let fe_parent = if via_gateway {
            let gw = self.span(
                "gateway",
                &trace,
                None,
                CLIENT,
                "proxy frontend",
                t0,
                fe_dur + 1_000_000,
                false,
                vec![kv("peer.service", "frontend")],
            );
            Some(gw)
        } else if self.rng.chance(10) {
            // A parent that was never exported (an uninstrumented load balancer).
            Some(self.rng.id8())
        } else {
            None
        };
        let fe_err = self.rng.chance(3);
        let fe = self.span(
            "frontend",
            &trace,
            fe_parent.as_deref(),
            SERVER,
            "GET /",
            t0 + 500_000,
            fe_dur,
            fe_err,
            vec![kv("http.route", "/")],
        );

        // frontend -> cart
        let c_dur = self.latency(5);
        let c = self.span(
            "frontend",
            &trace,
            Some(&fe),
            CLIENT,
            "GET cart",
            t0 + 1_000_000,
            c_dur + 200_000,
            false,
            vec![kv("server.address", "cart")],
        );
        let cart_err = self.rng.chance(1);
        self.span(
            "cart",
            &trace,
            Some(&c),
            SERVER,
            "GET /cart",
            t0 + 1_100_000,
            c_dur,
            cart_err,
            vec![kv("http.route", "/cart")],
        );

        if self.rng.chance(40) {
            // frontend -> checkout -> payments (10% errors), checkout -> db, checkout => shipping (messaging)
            let co_dur = self.latency(20) + 10_000_000;
            let cc = self.span(
                "frontend",
                &trace,
                Some(&fe),
                CLIENT,
                "POST checkout",
                t0 + 8_000_000,
                co_dur + 300_000,
                false,
                vec![],
            );
            let co = self.span(
                "checkout",
                &trace,
                Some(&cc),
                SERVER,
                "POST /checkout",
                t0 + 8_100_000,
                co_dur,
                false,
                vec![kv("http.route", "/checkout")],
            );
            let p_dur = self.latency(8);
            let pc = self.span(
                "checkout",
                &trace,
                Some(&co),
                CLIENT,
                "POST payments",
                t0 + 8_200_000,
                p_dur + 100_000,
                false,
                vec![],
            );
            let pay_err = self.rng.chance(10);
            self.span(
                "payments",
                &trace,
                Some(&pc),
                SERVER,
                "POST /pay",
                t0 + 8_250_000,
                p_dur,
                pay_err,
                vec![kv("http.route", "/pay")],
            );
            let db_dur = self.latency(2);
            let db_err = self.rng.chance(2);
            self.span(
                "checkout",
                &trace,
                Some(&co),
                CLIENT,
                "SELECT stock",
                t0 + 9_000_000,
                db_dur,
                db_err,
                vec![
                    kv("db.system.name", "postgresql"),
                    kv("db.namespace", "inventory-db"),
                ],
            );
            let q_dur = self.latency(1);
            let prod = self.span(
                "checkout",
                &trace,
                Some(&co),
                PRODUCER,
                "publish orders",
                t0 + 9_500_000,
                q_dur,
                false,
                vec![kv("messaging.destination.name", "orders")],
            );
            let ship_dur = self.latency(3);
            self.span(
                "shipping",
                &trace,
                Some(&prod),
                CONSUMER,
                "process orders",
                t0 + 20_000_000,
                ship_dur,
                false,
                vec![],
            );
        }
    }
}

/// The exact linear-interpolation percentile (numpy's default, DataFusion's percentile_cont).
fn percentile(values: &mut [u64], p: f64) -> f64 {
    values.sort_unstable();
    let rank = p * (values.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    values[lo] as f64 + (values[hi] as f64 - values[lo] as f64) * (rank - lo as f64)
}

#[derive(Default, Debug)]
struct Expect {
    requests: u64,
    errors: u64,
    latencies: Vec<u64>,
}

/// The oracle: the contract's graph semantics, computed straight from the generated spans.
fn oracle(spans: &[GenSpan]) -> (BTreeMap<(String, String), Expect>, BTreeMap<String, Expect>) {
    let by_id: HashMap<(&[u8], &[u8]), &GenSpan> = spans
        .iter()
        .map(|s| ((&s.span.trace_id[..], &s.span.span_id[..]), s))
        .collect();
    let mut children: HashMap<(&[u8], &[u8]), Vec<&GenSpan>> = HashMap::new();
    for s in spans {
        if !s.span.parent_span_id.is_empty() {
            children
                .entry((&s.span.trace_id[..], &s.span.parent_span_id[..]))
                .or_default()
                .push(s);
        }
    }
    let err = |s: &GenSpan| s.span.status.as_ref().is_some_and(|st| st.code == 2);
    let dur = |s: &GenSpan| s.span.end_time_unix_nano - s.span.start_time_unix_nano;
    let attr = |s: &GenSpan, k: &str| {
        s.span.attributes.iter().find(|a| a.key == k).and_then(|a| {
            match a.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(v) => Some(v.clone()),
                _ => None,
            }
        })
    };
    let mut edges: BTreeMap<(String, String), Expect> = BTreeMap::new();
    let mut nodes: BTreeMap<String, Expect> = BTreeMap::new();
    let add = |map: &mut BTreeMap<(String, String), Expect>,
               a: &str,
               b: &str,
               latency: u64,
               error: bool| {
        let e = map.entry((a.to_string(), b.to_string())).or_default();
        e.requests += 1;
        e.errors += error as u64;
        e.latencies.push(latency);
    };
    for s in spans {
        let kids = children.get(&(&s.span.trace_id[..], &s.span.span_id[..]));
        match s.span.kind {
            CLIENT | PRODUCER => {
                let want = if s.span.kind == CLIENT {
                    SERVER
                } else {
                    CONSUMER
                };
                let paired: Vec<_> = kids
                    .map(|k| k.iter().filter(|k| k.span.kind == want).collect())
                    .unwrap_or_default();
                if paired.is_empty() {
                    let peer = [
                        "peer.service",
                        "db.namespace",
                        "db.name",
                        "db.system.name",
                        "db.system",
                        "server.address",
                        "net.peer.name",
                        "messaging.destination.name",
                    ]
                    .iter()
                    .find_map(|k| attr(s, k));
                    if let Some(peer) = peer {
                        add(&mut edges, s.service, &peer, dur(s), err(s));
                    }
                }
                for p in paired {
                    add(&mut edges, s.service, p.service, dur(s), err(s) || err(p));
                }
            }
            SERVER | CONSUMER => {
                let n = nodes.entry(s.service.to_string()).or_default();
                n.requests += 1;
                n.errors += err(s) as u64;
                n.latencies.push(dur(s));
                let has_parent = !s.span.parent_span_id.is_empty()
                    && by_id.contains_key(&(&s.span.trace_id[..], &s.span.parent_span_id[..]));
                if s.span.kind == SERVER && !has_parent {
                    add(&mut edges, "user", s.service, dur(s), err(s));
                }
            }
            _ => {}
        }
    }
    (edges, nodes)
}

/// Sends the spans shuffled, split per service (one exporter each) and in small batches.
async fn send(server: &Server, spans: &[GenSpan], rng: &mut Rng) {
    let mut shuffled: Vec<&GenSpan> = spans.iter().collect();
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let _client = reqwest::Client::new();
    let mut by_service: BTreeMap<&str, Vec<Span>> = BTreeMap::new();
    for s in shuffled {
        by_service
            .entry(s.service)
            .or_default()
            .push(s.span.clone());
    }
    for (service, spans) in by_service {
        for chunk in spans.chunks(97) {
            let req = common::otlp::traces_of(
                vec![kv("service.name", service), kv("service.namespace", "shop")],
                chunk.to_vec(),
            );
            common::otlp::post(&server.otlp_url("/v1/traces"), &req).await;
        }
    }
}

fn close(got: f64, want_ms: f64, what: &str) {
    let tolerance = (want_ms.abs() * 0.01).max(0.002); // 1% (and JSON's rounding to 1 µs)
    assert!(
        (got - want_ms).abs() <= tolerance,
        "{what}: got {got} ms, want {want_ms} ms"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn graph_signals_and_traces_match_the_oracle() {
    let server = Server::in_temp_dir(&[]);
    let now_ns = common::now_ns();
    let base_ns = now_ns - 10 * 60 * 1_000_000_000; // 10 minutes ago
    let mut mesh = Mesh::new(0x5eed_1234_abcd_0042, base_ns);
    for i in 0..1200 {
        mesh.request(i);
    }
    let (want_edges, want_nodes) = oracle(&mesh.spans);
    let mut rng = Rng(99);
    send(&server, &mesh.spans, &mut rng).await;

    let start =
        chrono::DateTime::from_timestamp_nanos((base_ns - 60_000_000_000) as i64).to_rfc3339();
    let end = chrono::DateTime::from_timestamp_nanos((now_ns + 60_000_000_000) as i64).to_rfc3339();
    let range = format!("start={}&end={}", urlencode(&start), urlencode(&end));
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        async move {
            let r = http.get(path).send().await.expect("GET");
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.expect("json"))
        }
    };

    // The graph: every edge, its counts and percentiles.
    let (status, g) = get(server.url(&format!("/api/v1/graph?{range}"))).await;
    assert_eq!(status, 200, "{g}");
    let got_edges: BTreeMap<(String, String), &serde_json::Value> = g["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| {
            (
                (
                    e["source"].as_str().unwrap_or("").to_string(),
                    e["target"].as_str().unwrap_or("").to_string(),
                ),
                e,
            )
        })
        .collect();
    assert_eq!(
        got_edges.keys().collect::<Vec<_>>(),
        want_edges.keys().collect::<Vec<_>>()
    );
    for (key, want) in &want_edges {
        let got = got_edges[key];
        assert_eq!(got["requests"], want.requests, "{key:?} requests");
        assert_eq!(got["errors"], want.errors, "{key:?} errors");
        let mut l = want.latencies.clone();
        for (p, field) in [(0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")] {
            close(
                got[field].as_f64().expect(field),
                percentile(&mut l, p) / 1e6,
                &format!("{key:?} {field}"),
            );
        }
        assert_eq!(got["sources"], serde_json::json!(["spans"]));
    }
    let kinds: HashMap<&str, &str> = g["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap_or(""),
                n["kind"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(kinds["user"], "user");
    assert_eq!(kinds["inventory-db"], "virtual");
    assert_eq!(
        kinds["gateway"], "service",
        "a gateway with only CLIENT spans is still a service node"
    );
    assert_eq!(kinds["shipping"], "service");

    // Golden signals per service.
    let (_, services) = get(server.url(&format!("/api/v1/services?{range}"))).await;
    let got: HashMap<&str, &serde_json::Value> = services
        .as_array()
        .expect("list")
        .iter()
        .map(|s| (s["name"].as_str().unwrap_or(""), s))
        .collect();
    for (name, want) in &want_nodes {
        let s = got[name.as_str()];
        assert_eq!(s["requests"], want.requests, "{name}");
        assert_eq!(s["errors"], want.errors, "{name}");
        let mut l = want.latencies.clone();
        close(
            s["p99_ms"].as_f64().expect("p99"),
            percentile(&mut l, 0.99) / 1e6,
            &format!("{name} p99"),
        );
        close(
            s["p50_ms"].as_f64().expect("p50"),
            percentile(&mut l, 0.5) / 1e6,
            &format!("{name} p50"),
        );
    }

    // A service page: endpoints, edges both ways, a series per minute.
    let (status, checkout) = get(server.url(&format!("/api/v1/services/checkout?{range}"))).await;
    assert_eq!(status, 200);
    assert_eq!(checkout["endpoints"][0]["name"], "/checkout");
    let downstream: HashSet<&str> = checkout["downstream"]
        .as_array()
        .expect("down")
        .iter()
        .map(|e| e["target"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        downstream,
        HashSet::from(["payments", "inventory-db", "shipping"])
    );
    assert_eq!(checkout["upstream"][0]["source"], "frontend");
    let series_total: u64 = checkout["series"]
        .as_array()
        .expect("series")
        .iter()
        .map(|p| p["requests"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(series_total, want_nodes["checkout"].requests);
    assert_eq!(
        get(server.url(&format!("/api/v1/services/nope?{range}")))
            .await
            .0,
        404
    );

    // Neighbourhood filter: payments and its direct neighbours only.
    let (_, around) =
        get(server.url(&format!("/api/v1/graph?{range}&service=payments&depth=1"))).await;
    let ids: HashSet<&str> = around["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids, HashSet::from(["payments", "checkout"]));

    // Trace search: errors at payments, newest first, each summary consistent.
    let (status, found) = get(server.url(&format!(
        "/api/v1/traces?{range}&service=payments&status=error&limit=5"
    )))
    .await;
    assert_eq!(status, 200, "{found}");
    let found = found.as_array().expect("list");
    assert_eq!(found.len(), 5);
    let starts: Vec<&str> = found
        .iter()
        .map(|t| t["start_time"].as_str().unwrap_or(""))
        .collect();
    assert!(
        starts.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {starts:?}"
    );
    for t in found {
        assert!(t["error_count"].as_u64().unwrap_or(0) >= 1);
        assert!(
            t["services"]
                .as_array()
                .expect("services")
                .iter()
                .any(|s| s == "payments")
        );
    }

    // What a user types is bound as a value, never read as SQL: a quote that would close a
    // literal and widen the filter matches nothing, and an attribute filter (key and value
    // both bound) finds exactly the traces with that span attribute.
    let (status, none) = get(server.url(&format!(
        "/api/v1/traces?{range}&service=payments%27%20OR%20%271%27%3D%271&limit=5"
    )))
    .await;
    assert_eq!(status, 200, "{none}");
    assert_eq!(
        none,
        serde_json::json!([]),
        "a quoted value widened the search"
    );
    let (status, paid) = get(server.url(&format!(
        "/api/v1/traces?{range}&attribute=http.route%3D/pay&limit=1000"
    )))
    .await;
    assert_eq!(status, 200, "{paid}");
    let paid = paid.as_array().expect("list");
    assert!(!paid.is_empty(), "the /pay route's traces are found");
    assert!(
        paid.iter().all(|t| t["services"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s == "payments"))),
        "only traces through payments (the service with http.route=/pay): {paid:?}"
    );
    let (status, odd) = get(server.url(&format!(
        "/api/v1/traces?{range}&attribute=http.route%3D%22/pay%27%20OR%20%27%27%3D%27%22"
    )))
    .await;
    assert_eq!(status, 200, "{odd}");
    assert_eq!(odd, serde_json::json!([]));

    // One trace by id, without a time range: tree order, depth, critical path.
    let id = found[0]["trace_id"].as_str().expect("id").to_string();
    let want_spans = mesh
        .spans
        .iter()
        .filter(|s| {
            s.span
                .trace_id
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                == id
        })
        .count();
    let (status, trace) = get(server.url(&format!("/api/v1/traces/{}", id.to_uppercase()))).await;
    assert_eq!(status, 200);
    let spans = trace["spans"].as_array().expect("spans");
    assert_eq!(spans.len(), want_spans);
    assert_eq!(found[0]["span_count"], want_spans);
    assert_eq!(spans[0]["depth"], 0);
    let pos: HashMap<&str, usize> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| (s["span_id"].as_str().unwrap_or(""), i))
        .collect();
    for (i, s) in spans.iter().enumerate() {
        if let Some(p) = s["parent_span_id"].as_str()
            && let Some(pi) = pos.get(p)
        {
            assert!(*pi < i, "a parent comes before its children");
        }
    }
    assert_eq!(spans[0]["critical_path"], true);
    assert!(spans.iter().filter(|s| s["critical_path"] == true).count() >= 2);
    assert_eq!(
        get(server.url("/api/v1/traces/00000000000000000000000000000001"))
            .await
            .0,
        404
    );
    assert_eq!(get(server.url("/api/v1/traces/not-an-id")).await.0, 400);
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_endpoint_exposes_health_and_golden_signal_counters() {
    let server =
        Server::in_temp_dir(&["--signals-delay-secs", "0", "--signals-interval-secs", "1"]);
    // The counters start counting at their first tick (start-up); send after they have
    // counted a window.
    server
        .wait_metric("meshscope_metrics_windows_total", 20, |w| w >= 1.0)
        .await;
    let now_ns = common::now_ns();
    let mut mesh = Mesh::new(7, now_ns);
    for i in 0..10u64 {
        mesh.call(
            ("frontend", "GET cart"),
            ("cart", "GET /cart"),
            i * 1_000_000,
            i < 2,
        );
    }
    let mut rng = Rng(3);
    send(&server, &mesh.spans, &mut rng).await;

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let text = loop {
        let text = server.get_text("/metrics").await;
        if text.contains(r#"traces_service_graph_request_total{client="frontend",server="cart",connection_type=""} 10"#) {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counters did not reach 10 requests:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    assert!(text.contains(r#"traces_service_graph_request_failed_total{client="frontend",server="cart",connection_type=""} 2"#), "{text}");
    assert!(text.contains(r#"traces_service_graph_request_client_seconds_bucket{le="0.004",client="frontend",server="cart",connection_type=""} 10"#), "{text}");
    assert!(text.contains(r#"traces_span_metrics_calls_total{service_name="cart",span_name="GET /cart",span_kind="SPAN_KIND_SERVER",status_code="STATUS_CODE_ERROR"} 2"#), "{text}");
    assert!(
        text.contains(r#"meshscope_ingest_accepted_records_total{table="spans"} 20"#),
        "{text}"
    );
    assert!(
        text.contains("# TYPE meshscope_buffered_bytes gauge"),
        "{text}"
    );
}

/// The value of one exposition line (`name{labels} value`), if present.
fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

async fn metrics_text(server: &Server) -> String {
    server.get_text("/metrics").await
}

/// Polls `/metrics` until `done` holds (at most 20 s).
async fn wait_metrics(server: &Server, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = metrics_text(server).await;
        if done(&text) {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "{what}:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Spans that reach meshscope minutes after they started are counted in `/metrics` when
/// they arrive, and each request once.
#[tokio::test(flavor = "multi_thread")]
async fn late_spans_are_counted_once_when_they_arrive() {
    let server =
        Server::in_temp_dir(&["--signals-delay-secs", "0", "--signals-interval-secs", "1"]);
    late_spans_counted_once(&server, &server).await;
}

/// The same on a query node of split roles: it sees late spans when the collector's files
/// with them appear.
#[tokio::test(flavor = "multi_thread")]
async fn late_spans_are_counted_once_on_a_query_node() {
    let dir = tempfile::tempdir().expect("tmp");
    let shared = dir.path().join("shared");
    let collector = Server::start_role(
        "collector",
        &shared,
        &["--node-id", "c1", "--flush-interval-secs", "1"],
    );
    let query = Server::start_role(
        "query",
        &shared,
        &["--signals-delay-secs", "0", "--signals-interval-secs", "1"],
    );
    late_spans_counted_once(&collector, &query).await;
}

/// Sends late spans to `ingest` and checks the counters of `server`.
async fn late_spans_counted_once(ingest: &Server, server: &Server) {
    let windows = |t: &str| metric_value(t, "meshscope_metrics_windows_total").unwrap_or(0.0);
    // The counters have passed some windows: everything below is behind them.
    wait_metrics(server, "the counters never advanced", |t| windows(t) >= 2.0).await;
    let series =
        r#"traces_service_graph_request_total{client="api",server="db-proxy",connection_type=""}"#;
    let now_ns = common::now_ns();
    // Three minutes ago, at the start of a minute (so both batches fall in one minute).
    let minute_ns = 60_000_000_000;
    let base_ns = (now_ns - 3 * minute_ns) / minute_ns * minute_ns + 1_000_000_000;
    let mut mesh = Mesh::new(11, base_ns);
    let pairs = |mesh: &mut Mesh, n: u64, at_ms: u64| {
        for i in 0..n {
            let t = (at_ms + i) * 1_000_000;
            mesh.call(("api", "GET db"), ("db-proxy", "GET /q"), t, false);
        }
    };
    pairs(&mut mesh, 10, 0);
    let mut rng = Rng(5);
    send(ingest, &mesh.spans, &mut rng).await;
    wait_metrics(server, "late requests not counted", |t| {
        metric_value(t, series) == Some(10.0)
    })
    .await;

    // More late requests of the same minute: only they are added.
    mesh.spans.clear();
    pairs(&mut mesh, 5, 20_000);
    send(ingest, &mesh.spans, &mut rng).await;
    let text = wait_metrics(server, "second late batch not counted", |t| {
        metric_value(t, series) == Some(15.0)
    })
    .await;
    assert!(
        metric_value(&text, "meshscope_metrics_late_minutes_recounted_total").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    // And nothing is counted twice as the counters go on.
    let seen = windows(&text);
    let text = wait_metrics(server, "the counters stopped", |t| windows(t) >= seen + 3.0).await;
    assert_eq!(metric_value(&text, series), Some(15.0), "{text}");
    let calls = r#"traces_span_metrics_calls_total{service_name="db-proxy",span_name="GET /q",span_kind="SPAN_KIND_SERVER",status_code="STATUS_CODE_UNSET"}"#;
    assert_eq!(metric_value(&text, calls), Some(15.0), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rollups_agree_with_raw_spans_within_one_percent() {
    let dir = tempfile::tempdir().expect("tmp");
    // Minutes are rolled up 5 s after start-up, once all the data below is in.
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--rollup-delay-secs", "0", "--rollup-interval-secs", "5"],
    );
    let now_ns = common::now_ns();
    let minute = 60_000_000_000u64;
    let base_ns = (now_ns - 10 * minute) / minute * minute;
    let mut mesh = Mesh::new(0xfeed, base_ns);
    for i in 0..2400 {
        mesh.request(i); // 50 ms apart: two minutes of traffic
    }
    let mut rng = Rng(5);
    send(&server, &mesh.spans, &mut rng).await;

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server
        .scalar("SELECT count(*) FROM rollups WHERE kind = 'edge'")
        .await
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "no rollups written");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    // Whole minutes, covering all the traffic.
    let start = chrono::DateTime::from_timestamp_nanos((base_ns - minute) as i64).to_rfc3339();
    let end = chrono::DateTime::from_timestamp_nanos((base_ns + 5 * minute) as i64).to_rfc3339();
    let range = format!("start={}&end={}", urlencode(&start), urlencode(&end));
    let http = reqwest::Client::new();
    let fetch = |source: &str| {
        let url = server.url(&format!("/api/v1/graph?{range}&source={source}"));
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.expect("GET");
            let from = r.headers()["x-meshscope-computed-from"]
                .to_str()
                .expect("header")
                .to_string();
            (from, r.json::<serde_json::Value>().await.expect("json"))
        }
    };
    let (raw_from, raw) = fetch("spans").await;
    let (rolled_from, rolled) = fetch("rollups").await;
    assert_eq!(
        (raw_from.as_str(), rolled_from.as_str()),
        ("spans", "rollups")
    );
    let raw_edges = raw["edges"].as_array().expect("edges");
    assert_eq!(
        raw_edges.len(),
        rolled["edges"].as_array().expect("edges").len()
    );
    for (a, b) in raw_edges
        .iter()
        .zip(rolled["edges"].as_array().expect("edges"))
    {
        let what = format!("{} -> {}", a["source"], a["target"]);
        assert_eq!((&a["source"], &a["target"]), (&b["source"], &b["target"]));
        assert_eq!(a["requests"], b["requests"], "{what}");
        assert_eq!(a["errors"], b["errors"], "{what}");
        for f in ["p50_ms", "p95_ms", "p99_ms"] {
            close(
                b[f].as_f64().expect(f),
                a[f].as_f64().expect(f),
                &format!("{what} {f} from rollups"),
            );
        }
    }
    // The service list from rollups agrees too.
    let list = |source: &str| server.url(&format!("/api/v1/services?{range}&source={source}"));
    let raw: serde_json::Value = http
        .get(list("spans"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    let rolled: serde_json::Value = http
        .get(list("rollups"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(
        raw.as_array().map(Vec::len),
        rolled.as_array().map(Vec::len)
    );
    for (a, b) in raw
        .as_array()
        .expect("list")
        .iter()
        .zip(rolled.as_array().expect("list"))
    {
        assert_eq!(
            (&a["name"], &a["requests"], &a["errors"]),
            (&b["name"], &b["requests"], &b["errors"])
        );
        close(
            b["p99_ms"].as_f64().expect("p99"),
            a["p99_ms"].as_f64().expect("p99"),
            &format!("{} p99", a["name"]),
        );
    }
}

mod mesh_telemetry {
    use super::*;

    use opentelemetry_proto::tonic::logs::v1::LogRecord;
    use opentelemetry_proto::tonic::metrics::v1::{
        AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint, Sum,
        metric::Data, number_data_point,
    };

    fn labels(pairs: &[(&str, &str)]) -> Vec<KeyValue> {
        pairs.iter().map(|(k, v)| kv(k, v)).collect()
    }

    fn counter(name: &str, points: Vec<(Vec<KeyValue>, u64, u64, f64)>) -> Metric {
        Metric {
            name: name.into(),
            data: Some(Data::Sum(Sum {
                data_points: points
                    .into_iter()
                    .map(|(attributes, start, time, v)| NumberDataPoint {
                        attributes,
                        start_time_unix_nano: start,
                        time_unix_nano: time,
                        value: Some(number_data_point::Value::AsDouble(v)),
                        ..Default::default()
                    })
                    .collect(),
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            })),
            ..Default::default()
        }
    }

    fn histogram(name: &str, points: Vec<(Vec<KeyValue>, u64, u64, Vec<u64>)>) -> Metric {
        Metric {
            name: name.into(),
            data: Some(Data::Histogram(Histogram {
                data_points: points
                    .into_iter()
                    .map(
                        |(attributes, start, time, bucket_counts)| HistogramDataPoint {
                            attributes,
                            start_time_unix_nano: start,
                            time_unix_nano: time,
                            count: bucket_counts.iter().sum(),
                            explicit_bounds: vec![5.0, 10.0, 50.0],
                            bucket_counts,
                            ..Default::default()
                        },
                    )
                    .collect(),
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn proxy_metrics_and_access_logs_add_edges_and_sources() {
        let server = Server::in_temp_dir(&[]);
        let now = common::now_ns();
        let (t0, t1, t2) = (
            now - 600_000_000_000,
            now - 300_000_000_000,
            now - 60_000_000_000,
        );

        // Spans: frontend -> cart, 4 requests, so that edge exists from spans too.
        let mut mesh = Mesh::new(11, t1);
        for i in 0..4u64 {
            mesh.call(
                ("frontend", "GET cart"),
                ("cart", "GET /cart"),
                i * 1_000_000,
                false,
            );
        }
        let mut rng = Rng(1);
        send(&server, &mesh.spans, &mut rng).await;

        // Istio, both reporters: frontend -> cart 100 requests (10 of them 503) in the range;
        // the series started before it (value 20 / 2 at its first point in the range).
        let ok = |reporter: &str| {
            labels(&[
                ("source_workload", "frontend"),
                ("destination_workload", "cart"),
                ("response_code", "200"),
                ("reporter", reporter),
            ])
        };
        let bad = |reporter: &str| {
            labels(&[
                ("source_workload", "frontend"),
                ("destination_workload", "cart"),
                ("response_code", "503"),
                ("reporter", reporter),
            ])
        };
        let mut metrics = vec![];
        for reporter in ["source", "destination"] {
            metrics.push(counter(
                "istio_requests_total",
                vec![
                    (ok(reporter), t0, t1, 20.0),
                    (ok(reporter), t0, t2, 110.0),
                    (bad(reporter), t0, t1, 2.0),
                    (bad(reporter), t0, t2, 12.0),
                ],
            ));
            metrics.push(histogram(
                "istio_request_duration_milliseconds",
                vec![
                    (ok(reporter), t0, t1, vec![10, 10, 0, 0]),
                    (ok(reporter), t0, t2, vec![60, 60, 0, 0]),
                ],
            ));
        }
        // Linkerd: cart -> inventory (no spans at all), 40 requests, 4 failures.
        let lk = |class: &str| {
            labels(&[
                ("deployment", "cart"),
                ("dst_deployment", "inventory"),
                ("direction", "outbound"),
                ("classification", class),
            ])
        };
        metrics.push(counter(
            "response_total",
            vec![
                (lk("success"), t1, t1 + 1, 0.0),
                (lk("success"), t1, t2, 36.0),
                (lk("failure"), t1, t1 + 1, 0.0),
                (lk("failure"), t1, t2, 4.0),
            ],
        ));
        let req = common::otlp::metrics("mesh-proxy", metrics);
        common::otlp::post(&server.otlp_url("/v1/metrics"), &req).await;

        // Access logs: inventory -> postgres, 3 requests, one 500.
        let logs: Vec<LogRecord> = [("200", "4"), ("200", "6"), ("500", "8")]
            .iter()
            .map(|(code, ms)| LogRecord {
                time_unix_nano: t1 + 5,
                attributes: labels(&[
                    ("source_workload", "inventory"),
                    ("destination_workload", "postgres"),
                    ("response_code", code),
                    ("duration_ms", ms),
                ]),
                ..Default::default()
            })
            .collect();
        let req = common::otlp::logs_of(Vec::new(), logs);
        common::otlp::post(&server.otlp_url("/v1/logs"), &req).await;

        let start = chrono::DateTime::from_timestamp_nanos((t0 + 1) as i64).to_rfc3339();
        let end = chrono::DateTime::from_timestamp_nanos(now as i64).to_rfc3339();
        let url = server.url(&format!(
            "/api/v1/graph?start={}&end={}",
            urlencode(&start),
            urlencode(&end)
        ));
        let g: serde_json::Value = reqwest::get(url)
            .await
            .expect("GET")
            .json()
            .await
            .expect("json");
        let edge = |s: &str, t: &str| {
            g["edges"]
                .as_array()
                .expect("edges")
                .iter()
                .find(|e| e["source"] == s && e["target"] == t)
                .cloned()
                .unwrap_or_else(|| panic!("no edge {s} -> {t} in {g}"))
        };
        let fc = edge("frontend", "cart");
        assert_eq!(fc["sources"], serde_json::json!(["spans", "metrics"]));
        assert_eq!(fc["requests"], 4, "spans' own signals stay first");
        let m = &fc["by_source"]["metrics"];
        assert_eq!(
            m["requests"], 100,
            "the increase over the range, counted once although Istio reports twice: {fc}"
        );
        assert_eq!(m["errors"], 10);
        assert_eq!(
            m["p50_ms"], 5.0,
            "histogram_quantile of the bucket increase: {fc}"
        );
        let ci = edge("cart", "inventory");
        assert_eq!(ci["sources"], serde_json::json!(["metrics"]));
        assert_eq!(
            (ci["requests"].as_u64(), ci["errors"].as_u64()),
            (Some(40), Some(4))
        );
        let ip = edge("inventory", "postgres");
        assert_eq!(ip["sources"], serde_json::json!(["access_logs"]));
        assert_eq!(
            (
                ip["requests"].as_u64(),
                ip["errors"].as_u64(),
                ip["p50_ms"].as_f64()
            ),
            (Some(3), Some(1), Some(6.0))
        );
    }
}
