//! The topology page's render time in headless Chromium (Debian `chromium` +
//! `chromium-driver`) at 50 and 500 services: a server fed a generated mesh, the page
//! opened at 1400×900, timed from navigation start until every node is in the page and a
//! frame has been drawn after it (wasm load, the graph API call, the layout, the DOM).
//!
//! ```sh
//! cargo bench -p meshscope --bench topology_render -- [--runs 5] [--sizes 50,500]
//! ```
//!
//! Uses the release `meshscope` binary Cargo builds for the bench (or `MESHSCOPE_BIN`).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Server;
use common::browser::Browser;
use common::mesh::generated_mesh;
use serde_json::{Value, json};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Waits (bounded) until the graph API answers `nodes` nodes.
async fn wait_for_graph(server: &Server, nodes: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let g: Value = match reqwest::get(server.url("/api/v1/graph?range=15m")).await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        let n = g["nodes"].as_array().map_or(0, Vec::len);
        if n == nodes {
            return g["edges"].as_array().map_or(0, Vec::len);
        }
        assert!(
            Instant::now() < deadline,
            "the mesh did not arrive: {n} of {nodes} nodes"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = arg("--runs").and_then(|r| r.parse().ok()).unwrap_or(5);
    let sizes: Vec<usize> = arg("--sizes")
        .unwrap_or_else(|| "50,500".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut rows = Vec::new();
    for services in sizes {
        // 10 services a namespace up to 50, then 50 a namespace.
        let per = if services <= 50 { 10 } else { 50 };
        let namespaces = services.div_ceil(per);
        let services = namespaces * per;
        let dir = tempfile::tempdir().expect("tempdir");
        let server = Server::start(&dir.path().join("data"));
        let mesh = generated_mesh(namespaces, per, now_ns() - 5 * 60 * 1_000_000_000);
        let spans: usize = mesh["resourceSpans"]
            .as_array()
            .map(|r| {
                r.iter()
                    .map(|r| r["scopeSpans"][0]["spans"].as_array().map_or(0, Vec::len))
                    .sum()
            })
            .unwrap_or(0);
        // One export request per resource, as SDKs send them.
        let client = reqwest::Client::new();
        for r in mesh["resourceSpans"].as_array().into_iter().flatten() {
            let body = json!({ "resourceSpans": [r] });
            let resp = client
                .post(server.otlp_url("/v1/traces"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .expect("OTLP/HTTP");
            assert!(resp.status().is_success(), "export: {}", resp.status());
        }
        let edges = wait_for_graph(&server, services + 1).await;
        eprintln!("topology_render: {services} services, {edges} edges, {spans} spans stored");

        let b = Browser::start().await;
        b.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({ "width": 1400, "height": 900 })),
        )
        .await;
        let (mut drawn, mut api) = (Vec::new(), Vec::new());
        for run in 0..runs + 1 {
            b.goto(&server.url("/?range=15m")).await;
            let script = format!(
                "const done = arguments[arguments.length - 1];
                 const check = () => {{
                   if (document.querySelectorAll('.node').length >= {want}) {{
                     requestAnimationFrame(() => {{
                       const g = performance.getEntriesByType('resource')
                         .filter(e => e.name.includes('/api/v1/graph?')).pop();
                       done({{ drawn: performance.now(), api: g ? g.duration : null }});
                     }});
                   }} else {{ setTimeout(check, 2); }}
                 }};
                 check();",
                want = services + 1
            );
            let m = b.js_async(&script).await;
            let (d, a) = (
                m["drawn"].as_f64().unwrap_or(f64::NAN),
                m["api"].as_f64().unwrap_or(f64::NAN),
            );
            // The first load warms the browser's cache of the wasm: not counted.
            if run > 0 {
                eprintln!("  run {run}: drawn at {d:.0} ms, graph API {a:.0} ms");
                drawn.push(d);
                api.push(a);
            }
        }
        let nodes = b.find_all(".node").await.len();
        assert_eq!(nodes, services + 1, "every node drawn");
        b.screenshot(&format!("bench-topology-{services}")).await;
        rows.push((services, edges, median(drawn), median(api)));
    }
    println!("| services | edges | drawn after navigation, ms | of it the graph API, ms |");
    println!("| --- | --- | --- | --- |");
    for (s, e, d, a) in rows {
        println!("| {s} | {e} | {d:.0} | {a:.0} |");
    }
    println!("(medians of {runs} loads each, Chromium headless at 1400×900)");
}
