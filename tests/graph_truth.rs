//! The graph tells the truth about a mesh as it really reports: one node per service
//! (also when a proxy answered for the callee, and when a service is called `user`),
//! versions and canaries inside their service, requests a proxy answered itself broken
//! out per reason, Envoy's ways of naming a peer, and the proxies' own metrics mapping a
//! canary workload to its service. Every count is computed here from what is sent.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::Server;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Metric, NumberDataPoint, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::trace::v1::{Span, Status};
use prost::Message;
use serde_json::Value;

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

use common::otlp::kv;

/// Spans by (service, version) resource.
#[derive(Default)]
struct Mesh {
    next_id: u64,
    base_ns: u64,
    spans: BTreeMap<(&'static str, Option<&'static str>), Vec<Span>>,
}

impl Mesh {
    fn id(&mut self) -> Vec<u8> {
        self.next_id += 1;
        // Spread over the bits so that ids look random enough to shard.
        (self.next_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
            .to_be_bytes()
            .to_vec()
    }

    #[allow(clippy::too_many_arguments)]
    fn span(
        &mut self,
        (service, version): (&'static str, Option<&'static str>),
        trace: &[u8],
        parent: Option<&[u8]>,
        kind: i32,
        name: &str,
        at_ms: u64,
        error: bool,
        attrs: Vec<KeyValue>,
    ) -> Vec<u8> {
        let id = self.id();
        let start = self.base_ns + at_ms * 1_000_000;
        self.spans
            .entry((service, version))
            .or_default()
            .push(Span {
                trace_id: trace.to_vec(),
                span_id: id.clone(),
                parent_span_id: parent.map(<[u8]>::to_vec).unwrap_or_default(),
                name: name.into(),
                kind,
                start_time_unix_nano: start,
                end_time_unix_nano: start + 2_000_000,
                attributes: attrs,
                status: Some(Status {
                    code: if error { 2 } else { 0 },
                    message: String::new(),
                }),
                ..Default::default()
            });
        id
    }

    fn trace(&mut self) -> Vec<u8> {
        [self.id(), self.id()].concat()
    }

    /// A span that succeeds, with no attributes, named for nobody in particular.
    fn bare(
        &mut self,
        who: (&'static str, Option<&'static str>),
        trace: &[u8],
        parent: Option<&[u8]>,
        kind: i32,
        at_ms: u64,
    ) -> Vec<u8> {
        self.span(who, trace, parent, kind, "op", at_ms, false, vec![])
    }

    /// Exports every resource's spans (with `service.version` where it has one, and
    /// `extra` resource attributes); how many spans that was.
    async fn post(&self, server: &Server, extra: &[KeyValue]) -> u64 {
        for ((service, version), spans) in &self.spans {
            let mut attrs = vec![kv("service.name", service)];
            attrs.extend(extra.iter().cloned());
            if let Some(v) = version {
                attrs.push(kv("service.version", v));
            }
            let req = common::otlp::traces_of(attrs, spans.clone());
            post(server, "/v1/traces", req.encode_to_vec()).await;
        }
        self.spans.values().map(|s| s.len() as u64).sum()
    }
}

async fn post(server: &Server, path: &str, body: Vec<u8>) {
    let r = reqwest::Client::new()
        .post(server.otlp_url(path))
        .header("content-type", "application/x-protobuf")
        .body(body)
        .send()
        .await
        .expect("export");
    assert_eq!(r.status(), 200, "{path}");
}

fn counter(name: &str, value: f64, start_ns: u64, time_ns: u64, labels: &[(&str, &str)]) -> Metric {
    Metric {
        name: name.into(),
        data: Some(metric::Data::Sum(Sum {
            data_points: vec![NumberDataPoint {
                attributes: labels.iter().map(|(k, v)| kv(k, v)).collect(),
                start_time_unix_nano: start_ns,
                time_unix_nano: time_ns,
                value: Some(number_data_point::Value::AsDouble(value)),
                ..Default::default()
            }],
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    }
}

fn edge<'a>(g: &'a Value, source: &str, target: &str) -> &'a Value {
    g["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .find(|e| e["source"] == source && e["target"] == target)
        .unwrap_or_else(|| panic!("no edge {source} -> {target} in {g}"))
}

fn node<'a>(g: &'a Value, id: &str) -> &'a Value {
    g["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("no node {id} in {g}"))
}

fn versions(v: &Value, key: &str) -> BTreeMap<String, u64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {v}"))
        .iter()
        .map(|x| {
            (
                x["version"].as_str().unwrap_or("").to_string(),
                x["requests"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn reasons(e: &Value) -> BTreeMap<String, u64> {
    e["reasons"]
        .as_object()
        .unwrap_or_else(|| panic!("no reasons in {e}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect()
}

/// Node ids unique, each (source, target) once.
fn assert_unique(g: &Value) {
    let ids = common::strings(g, "nodes", "id");
    let set: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), set.len(), "duplicate node ids: {ids:?}");
    let pairs: Vec<(String, String)> = g["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| (e["source"].to_string(), e["target"].to_string()))
        .collect();
    let set: BTreeSet<_> = pairs.iter().collect();
    assert_eq!(pairs.len(), set.len(), "duplicate edges: {pairs:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_node_per_service_with_versions_and_proxy_answers() {
    let server = Server::in_temp_dir(&[]);
    let now_ns = common::now_ns();
    let mut m = Mesh {
        base_ns: now_ns - 5 * 60 * 1_000_000_000,
        ..Mesh::default()
    };
    let frontend = ("frontend", None);
    let (cart_v1, cart_v2) = (("cart", Some("v1")), ("cart", Some("v2")));
    let inventory = ("inventory", Some("1.4.0"));
    let user_svc = ("user", None);

    // 100 entry requests to frontend; each calls cart (90 reach v1, 10 the canary v2,
    // every 9th v1 request fails) and inventory.
    let (mut cart_errors, mut inv_paired, mut circuit, mut limited) = (0u64, 0u64, 0u64, 0u64);
    for i in 0..100u64 {
        let t = m.trace();
        let at = i * 100;
        let fe = m.span(
            frontend,
            &t,
            None,
            SERVER,
            "GET /",
            at,
            false,
            vec![kv("http.route", "/")],
        );
        let c = m.span(
            frontend,
            &t,
            Some(&fe),
            CLIENT,
            "GET cart",
            at + 1,
            false,
            vec![kv("server.address", "cart")],
        );
        let (version, fail) = if i % 10 == 9 {
            (cart_v2, false)
        } else {
            (cart_v1, i % 9 == 0)
        };
        cart_errors += u64::from(fail);
        m.span(
            version,
            &t,
            Some(&c),
            SERVER,
            "GET /cart",
            at + 2,
            fail,
            vec![kv("http.route", "/cart")],
        );
        // frontend → inventory: 70 reach it; 20 are answered by frontend's own proxy
        // (circuit open: a CLIENT span naming inventory, no child); 10 by Envoy, which
        // names the peer only as its upstream cluster and says RL in response_flags.
        let (name, answered_by_proxy, attrs) = match i % 10 {
            0 | 1 => {
                circuit += 1;
                let attrs = vec![
                    kv("peer.service", "inventory"),
                    kv("meshscope.proxy_response", "circuit-open"),
                ];
                ("GET inventory", true, attrs)
            }
            2 => {
                limited += 1;
                let attrs = vec![
                    kv("upstream_cluster", "inventory"),
                    kv("http.url", "http://inventory:8080/stock?sku=1"),
                    kv("response_flags", "RL"),
                ];
                ("egress inventory:8080", true, attrs)
            }
            _ => {
                inv_paired += 1;
                (
                    "GET inventory",
                    false,
                    vec![kv("peer.service", "inventory")],
                )
            }
        };
        let ic = m.span(
            frontend,
            &t,
            Some(&fe),
            CLIENT,
            name,
            at + 3,
            answered_by_proxy,
            attrs,
        );
        if !answered_by_proxy {
            m.span(
                inventory,
                &t,
                Some(&ic),
                SERVER,
                "ingress",
                at + 4,
                false,
                vec![kv("http.url", "http://inventory:8080/stock?sku=1")],
            );
        }
        // cart v1 → an external payments gateway, named only by Envoy's http.url.
        if version == cart_v1 && i % 3 == 0 {
            m.span(
                version,
                &t,
                Some(&fe),
                CLIENT,
                "egress payments-gateway",
                at + 5,
                false,
                vec![kv("http.url", "https://payments-gateway:8443/charge")],
            );
        }
    }
    let gateway_calls = (0..100u64).filter(|i| i % 10 != 9 && i % 3 == 0).count() as u64;
    // A real service called `user`: 12 requests enter it, each calls cart v1.
    for i in 0..12u64 {
        let t = m.trace();
        let at = 20_000 + i * 10;
        let u = m.span(user_svc, &t, None, SERVER, "GET /me", at, false, vec![]);
        let c = m.span(
            user_svc,
            &t,
            Some(&u),
            CLIENT,
            "GET cart",
            at + 1,
            false,
            vec![kv("peer.service", "cart")],
        );
        m.span(
            cart_v1,
            &t,
            Some(&c),
            SERVER,
            "GET /cart",
            at + 2,
            false,
            vec![kv("http.route", "/cart")],
        );
    }

    let total_spans = m.post(&server, &[kv("service.namespace", "shop")]).await;

    // The proxies' own request metrics: frontend's proxy counted 90 requests to the
    // workload cart-v1 and 10 to the canary workload cart-v2, both of service cart; the
    // canary itself reports a call to inventory under its workload name. Two points per
    // series (a minute apart) whose increase is what the range holds; the series started
    // before the range, and Envoy-style microsecond start times must not look like 1970.
    let t1 = m.base_ns + 60_000_000_000;
    let t2 = t1 + 60_000_000_000;
    let started_us = (m.base_ns - 3_600_000_000_000) / 1000;
    let series = [
        ("frontend", "cart-v1", "cart", "v1", 90.0),
        ("frontend", "cart-v2", "cart", "v2", 10.0),
        ("cart-v2", "inventory", "inventory", "unknown", 4.0),
    ];
    let mut metrics = Vec::new();
    for (src, wl, svc, ver, n) in series {
        let labels = [
            ("source_workload", src),
            ("destination_workload", wl),
            ("destination_service_name", svc),
            ("destination_version", ver),
            ("response_code", "200"),
            ("reporter", "source"),
        ];
        metrics.push(counter(
            "meshscope_requests_total",
            1000.0,
            started_us,
            t1,
            &labels,
        ));
        metrics.push(counter(
            "meshscope_requests_total",
            1000.0 + n,
            started_us,
            t2,
            &labels,
        ));
    }
    let req = common::otlp::metrics("mesh-proxies", metrics);
    post(&server, "/v1/metrics", req.encode_to_vec()).await;

    let start = chrono::DateTime::from_timestamp_nanos((m.base_ns - 30_000_000_000) as i64);
    let end = chrono::DateTime::from_timestamp_nanos((now_ns + 60_000_000_000) as i64);
    let range = format!(
        "start={}&end={}",
        start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let http = reqwest::Client::new();
    // Visible to SQL within 2 s of the acknowledgement (bounded wait).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.scalar("SELECT count(*) FROM spans").await as u64 != total_spans {
        assert!(std::time::Instant::now() < deadline, "spans did not arrive");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut graphs = Vec::new();
    for source in ["spans", "rollups"] {
        let g: Value = server
            .get_json(&format!("/api/v1/graph?{range}&source={source}"))
            .await;
        graphs.push((source, g));
    }
    for (source, g) in &graphs {
        let ctx = format!("source={source}: {g}");
        assert_unique(g);
        // The entry point and the service called `user` stay apart.
        assert_eq!(node(g, "user")["kind"], "service", "{ctx}");
        assert_eq!(node(g, "user (entry)")["kind"], "user", "{ctx}");
        assert_eq!(
            edge(g, "user (entry)", "frontend")["requests"],
            100,
            "{ctx}"
        );
        assert_eq!(edge(g, "user (entry)", "user")["requests"], 12, "{ctx}");
        assert_eq!(edge(g, "user", "cart")["requests"], 12, "{ctx}");

        // One cart, with its versions, and no cart-v2 node from the metrics.
        assert!(
            !g["nodes"]
                .as_array()
                .expect("nodes")
                .iter()
                .any(|n| n["id"] == "cart-v2" || n["id"] == "cart-v1"),
            "{ctx}"
        );
        let cart = node(g, "cart");
        assert_eq!(cart["requests"], 112, "{ctx}");
        assert_eq!(
            versions(cart, "versions"),
            BTreeMap::from([("v1".to_string(), 102), ("v2".to_string(), 10)]),
            "{ctx}"
        );
        let fc = edge(g, "frontend", "cart");
        assert_eq!(fc["requests"], 100, "{ctx}");
        assert_eq!(fc["errors"], cart_errors, "{ctx}");
        assert_eq!(
            versions(fc, "by_version"),
            BTreeMap::from([("v1".to_string(), 90), ("v2".to_string(), 10)]),
            "{ctx}"
        );
        // The metrics saw the same edge, under the service, split by version.
        assert!(
            fc["sources"]
                .as_array()
                .expect("sources")
                .iter()
                .any(|s| s == "metrics"),
            "{ctx}"
        );
        assert_eq!(fc["by_source"]["metrics"]["requests"], 100, "{ctx}");

        // Requests the proxies answered for inventory count on inventory's edge, by reason.
        let fi = edge(g, "frontend", "inventory");
        assert_eq!(fi["requests"], inv_paired + circuit + limited, "{ctx}");
        assert_eq!(fi["errors"], circuit + limited, "{ctx}");
        assert_eq!(
            reasons(fi),
            BTreeMap::from([
                ("circuit-open".to_string(), circuit),
                ("rate-limited".to_string(), limited)
            ]),
            "{ctx}"
        );
        assert_eq!(node(g, "inventory")["kind"], "service", "{ctx}");

        // The peer without a sidecar: a virtual node named by the URL's host.
        assert_eq!(node(g, "payments-gateway")["kind"], "virtual", "{ctx}");
        assert_eq!(
            edge(g, "cart", "payments-gateway")["requests"],
            gateway_calls,
            "{ctx}"
        );
    }
    // The canary's own call, reported under its workload, is cart's (metrics only).
    let g = &graphs[0].1;
    let ci = edge(g, "cart", "inventory");
    assert_eq!(ci["sources"], serde_json::json!(["metrics"]), "{g}");
    assert_eq!(ci["requests"], 4, "{g}");

    // Endpoints: Envoy's `ingress` spans are named by their URL's path.
    let svc: Value = server
        .get_json(&format!("/api/v1/services/inventory?{range}"))
        .await;
    let endpoints: Vec<&str> = svc["endpoints"]
        .as_array()
        .unwrap_or_else(|| panic!("{svc}"))
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(endpoints, vec!["/stock"], "{svc}");

    // The charts' series come from the same rules: per-minute points that add up to the
    // graph's counts, for an edge, the entry edge of the service called `user`, and a service.
    let series = |q: String| {
        let http = http.clone();
        let url = server.url(&format!("/api/v1/series?{range}&{q}"));
        async move {
            let v: Value = http
                .get(url)
                .send()
                .await
                .expect("series")
                .json()
                .await
                .expect("json");
            v
        }
    };
    let total = |v: &Value| -> u64 {
        v["series"][0]["points"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|p| p["requests"].as_u64().unwrap_or(0))
            .sum()
    };
    let fc = series("source=frontend&target=cart".into()).await;
    assert_eq!(fc["step"], 60, "{fc}");
    assert_eq!(total(&fc), 100, "{fc}");
    assert_eq!(
        total(&series("source=user%20(entry)&target=user".into()).await),
        12
    );
    assert_eq!(total(&series("source=user&target=cart".into()).await), 12);
    assert_eq!(total(&series("service=cart".into()).await), 112);
    let all = series(String::new()).await;
    assert_eq!(all["series"].as_array().map(Vec::len), Some(4), "{all}");
    let bad = http
        .get(server.url(&format!("/api/v1/series?{range}&source=frontend")))
        .send()
        .await
        .expect("series");
    assert_eq!(bad.status(), 400);

    // Metric start times in microseconds are read as such, not as 1970.
    let early = server
        .scalar("SELECT count(*) FROM metrics WHERE start_time < TIMESTAMP '2000-01-01T00:00:00Z'")
        .await;
    assert_eq!(early, 0);
}

/// A request is paired with its other half across the edges of the range, and the traffic
/// of the widened window that cannot pair with the range is not read at all: a call that
/// outlives the range (its server side starts 31 s after the range ends), a message that
/// waits two minutes in its queue, a server span in the range under a long call that began
/// before it (not an entry), a child that starts a little before its caller (clock skew),
/// and thousands of spans in the window on either side that end or start far from the range.
#[tokio::test(flavor = "multi_thread")]
async fn pairs_across_the_edges_of_the_range_and_reads_only_what_crosses_them() {
    const PRODUCER: i32 = 4;
    const CONSUMER: i32 = 5;
    let server = Server::in_temp_dir(&[
        "--log",
        "info,meshscope_query::analysis=debug",
        "--flush-interval-secs",
        "1",
    ]);
    // The range: one minute, ten minutes ago, on whole seconds (the API's precision).
    let base_ns = (common::now_ns() / 1_000_000_000 - 600) * 1_000_000_000;
    let mut m = Mesh {
        base_ns: base_ns - 300_000_000_000,
        ..Mesh::default()
    };
    // Milliseconds from the range's start, as the helper wants them from its base.
    let at = |ms: i64| (ms + 300_000) as u64;
    let (frontend, cart, orders, billing) = (
        ("frontend", None),
        ("cart", Some("v3")),
        ("orders", None),
        ("billing", None),
    );
    let (gateway, inventory, noise) = (("gateway", None), ("inventory", None), ("noise", None));
    let lasting = |m: &mut Mesh, who: (&'static str, Option<&'static str>), ms: u64| {
        let s = m
            .spans
            .get_mut(&who)
            .and_then(|s| s.last_mut())
            .expect("span");
        s.end_time_unix_nano = s.start_time_unix_nano + ms * 1_000_000;
    };

    // A call that outlives the range: its server side starts 31 s after the range ends.
    // No peer name: only pairing puts it on an edge (and gives it cart's version).
    let t = m.trace();
    let c = m.bare(frontend, &t, None, CLIENT, at(59_000));
    lasting(&mut m, frontend, 40_000);
    m.bare(cart, &t, Some(&c), SERVER, at(91_000));
    // A child that starts 2 s before its caller (the hosts' clocks disagree).
    let t = m.trace();
    let c = m.bare(frontend, &t, None, CLIENT, at(1_000));
    m.bare(cart, &t, Some(&c), SERVER, at(-1_000));
    // A message that waits two minutes in its queue.
    let t = m.trace();
    let p = m.bare(orders, &t, None, PRODUCER, at(58_000));
    m.bare(billing, &t, Some(&p), CONSUMER, at(178_000));
    // A server span of the range under a call that began 100 s before it: not an entry.
    let t = m.trace();
    let g = m.bare(gateway, &t, None, CLIENT, at(-100_000));
    lasting(&mut m, gateway, 200_000);
    m.bare(inventory, &t, Some(&g), SERVER, at(10_000));
    // A server span of the range whose parent was never received: an entry.
    let t = m.trace();
    m.bare(inventory, &t, Some(&[7; 8]), SERVER, at(20_000));
    // The window's other traffic: whole traces that end 100 s before the range or start
    // 100 s after it.
    for i in 0..3_000i64 {
        for offset in [-200_000, 150_000] {
            let t = m.trace();
            m.bare(noise, &t, None, SERVER, at(offset + i * 10));
        }
    }
    let total_spans = m.post(&server, &[]).await;
    // Read from Parquet (where the conditions are evaluated while decoding), not from the
    // buffers: wait for the flush.
    server
        .wait_metric(
            "meshscope_parquet_rows_written_total{table=\"spans\"}",
            30,
            |n| n >= total_spans as f64,
        )
        .await;

    let iso = |ns: u64| {
        chrono::DateTime::from_timestamp_nanos(ns as i64)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let range = format!(
        "start={}&end={}",
        iso(base_ns),
        iso(base_ns + 60_000_000_000)
    );
    let g = server
        .get_json(&format!("/api/v1/graph?{range}&source=spans"))
        .await;
    assert_unique(&g);
    let fc = edge(&g, "frontend", "cart");
    assert_eq!(fc["requests"], 2, "{g}");
    assert_eq!(
        versions(fc, "by_version"),
        BTreeMap::from([("v3".to_string(), 2)]),
        "{g}"
    );
    assert_eq!(edge(&g, "orders", "billing")["requests"], 1, "{g}");
    // (The entry point is `user`: no service of this mesh has that name.)
    assert_eq!(edge(&g, "user", "inventory")["requests"], 1, "{g}");
    assert_eq!(node(&g, "inventory")["requests"], 2, "{g}");
    let nodes = g["nodes"].as_array().expect("nodes");
    assert!(nodes.iter().all(|n| n["id"] != "noise"), "{g}");

    // What the pairing decoded for this graph (its debug line; the background counters'
    // pairings are by minute): the spans near the range, none of the 6,000 others.
    let log = std::fs::read_to_string(&server.log).expect("log");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("pairing of raw spans") && l.contains("by_minute=false"))
        .unwrap_or_else(|| panic!("no pairing line in the log:\n{log}"));
    let decoded: u64 = line
        .split("decoded=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"));
    assert!((8..100).contains(&decoded), "{line}");
}
