//! Storage that lasts and scales out, end to end:
//! - split roles: two `meshscope collector` processes and one `meshscope query` process
//!   sharing one data directory give the same answers as one `meshscope serve` fed the
//!   same spans — even when a trace's spans arrive at different collectors;
//! - retention removes the oldest files and counts what it removed in `/metrics`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::Server;
use opentelemetry_proto::tonic::trace::v1::{Span, Status};
use serde_json::Value;

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

use common::otlp::kv;

/// `traces` requests: frontend (entry) → cart → an uninstrumented postgres; every 7th
/// fails at cart. Returns each service's spans.
fn workload(traces: u64) -> BTreeMap<&'static str, Vec<Span>> {
    let base = (chrono::Utc::now() - chrono::Duration::minutes(5))
        .timestamp_nanos_opt()
        .expect("now") as u64;
    let mut out: BTreeMap<&'static str, Vec<Span>> = BTreeMap::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..traces {
        let trace = [next().to_le_bytes(), next().to_le_bytes()].concat();
        let ids: Vec<Vec<u8>> = (0..4).map(|_| next().to_le_bytes().to_vec()).collect();
        let t0 = base + i * 20_000_000;
        let ms = |n: u64| n * 1_000_000;
        let lat = ms(5 + next() % 40);
        let error = i % 7 == 0;
        let span =
            |id: usize, parent: Option<usize>, kind, name: &str, start, dur, err: bool, attrs| {
                Span {
                    trace_id: trace.clone(),
                    span_id: ids[id].clone(),
                    parent_span_id: parent.map(|p| ids[p].clone()).unwrap_or_default(),
                    name: name.into(),
                    kind,
                    start_time_unix_nano: start,
                    end_time_unix_nano: start + dur,
                    attributes: attrs,
                    status: Some(Status {
                        code: if err { 2 } else { 0 },
                        message: String::new(),
                    }),
                    ..Default::default()
                }
            };
        let fe = out.entry("frontend").or_default();
        fe.push(span(
            0,
            None,
            SERVER,
            "GET /",
            t0,
            lat + ms(30),
            false,
            vec![],
        ));
        fe.push(span(
            1,
            Some(0),
            CLIENT,
            "GET /cart",
            t0 + ms(1),
            lat + ms(20),
            error,
            vec![],
        ));
        let cart = out.entry("cart").or_default();
        cart.push(span(
            2,
            Some(1),
            SERVER,
            "GET /cart",
            t0 + ms(2),
            lat + ms(10),
            error,
            vec![],
        ));
        cart.push(span(
            3,
            Some(2),
            CLIENT,
            "SELECT",
            t0 + ms(3),
            lat,
            false,
            vec![kv("db.system", "postgresql")],
        ));
    }
    out
}

async fn export(otlp_http: &str, service: &str, spans: &[Span]) {
    for chunk in spans.chunks(50) {
        let req = common::otlp::traces(service, chunk.to_vec());
        common::otlp::post(&format!("{otlp_http}/v1/traces"), &req).await;
    }
}

/// (source, target) → (requests, errors, p99 in µs).
type Edges = BTreeMap<(String, String), (i64, i64, i64)>;

/// The graph's edges, and its nodes as `kind:id`.
fn edges(graph: &Value) -> (Edges, Vec<String>) {
    let e = graph["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| {
            (
                (
                    e["source"].as_str().expect("source").to_string(),
                    e["target"].as_str().expect("target").to_string(),
                ),
                (
                    e["requests"].as_i64().expect("requests"),
                    e["errors"].as_i64().expect("errors"),
                    (e["p99_ms"].as_f64().expect("p99") * 1000.0).round() as i64,
                ),
            )
        })
        .collect();
    let mut nodes: Vec<String> = graph["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            format!(
                "{}:{}",
                n["kind"].as_str().unwrap_or(""),
                n["id"].as_str().unwrap_or("")
            )
        })
        .collect();
    nodes.sort();
    (e, nodes)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_collectors_and_a_query_node_answer_like_serve() {
    let dir = tempfile::tempdir().expect("tmp");
    let shared = dir.path().join("shared");
    let collector = |id: &str| {
        Server::start_role(
            "collector",
            &shared,
            &[
                "--node-id",
                id,
                "--flush-interval-secs",
                "1",
                "--compaction-interval-secs",
                "1",
                "--compaction-min-files",
                "2",
                "--retire-grace-secs",
                "2",
            ],
        )
    };
    let c1 = collector("c1");
    let c2 = collector("c2");
    let query = Server::start_role("query", &shared, &[]);
    let serve = Server::start(&dir.path().join("serve"));

    // frontend's spans go to one collector, cart's to the other: every trace is split.
    let spans = workload(400);
    let total: usize = spans.values().map(Vec::len).sum();
    // c1 gets frontend's spans in two halves, far enough apart to land in two files.
    let (a, b) = spans["frontend"].split_at(spans["frontend"].len() / 2);
    export(&c1.otlp_url(""), "frontend", a).await;
    let files = r#"meshscope_parquet_files_written_total{table="spans"}"#;
    c1.wait_metric(files, 30, |n| n >= 1.0).await;
    export(&c1.otlp_url(""), "frontend", b).await;
    export(&c2.otlp_url(""), "cart", &spans["cart"]).await;
    for (service, s) in &spans {
        export(&serve.otlp_url(""), service, s).await;
    }

    // Within the freshness bound (flush interval 1 s + listing at most 1 s old), the query
    // node sees what both collectors acknowledged.
    let started = Instant::now();
    loop {
        let n = query.scalar("SELECT count(*) FROM spans").await;
        if n as usize == total {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the query node sees {n} of {total} spans after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fresh = started.elapsed();
    assert!(fresh < Duration::from_secs(5), "visible after {fresh:?}");

    // Same answers as serve: graph, services, SQL.
    let (qe, qn) = edges(&query.get_json("/api/v1/graph").await);
    let (se, sn) = edges(&serve.get_json("/api/v1/graph").await);
    assert_eq!(qn, sn, "same nodes");
    assert_eq!(qe, se, "same edges, counts, errors and p99");
    assert_eq!(qe[&("frontend".to_string(), "cart".to_string())].0, 400);
    assert_eq!(qe[&("frontend".to_string(), "cart".to_string())].1, 58); // ⌈400 / 7⌉
    assert!(qn.contains(&"virtual:postgresql".to_string()), "{qn:?}");
    let sql = "SELECT service_name, count(*), sum(duration_ns) FROM spans GROUP BY 1 ORDER BY 1";
    assert_eq!(query.sql(sql).await["rows"], serve.sql(sql).await["rows"]);

    // The query node is read-only: its own OTLP ports are not even open.
    assert!(
        reqwest::Client::new()
            .post(query.otlp_url("/v1/traces"))
            .body(Vec::<u8>::new())
            .send()
            .await
            .is_err(),
        "a query node does not ingest"
    );

    // c1 flushed its spans into more than one file (see above); it compacts them into one,
    // and the query node still sees every span once.
    let c1_files = || {
        std::fs::read_dir(shared.join("spans"))
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".c1.parquet"))
            })
            .count()
    };
    let started = Instant::now();
    while c1_files() > 1 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "c1 never compacted its files"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let metrics = c1.get_text("/metrics").await;
    assert!(
        !metrics.contains("meshscope_compactions_total{table=\"spans\"} 0"),
        "c1 counts its compactions"
    );
    assert_eq!(
        query.scalar("SELECT count(*) FROM spans").await as usize,
        total
    );
    assert_eq!(
        query
            .scalar("SELECT count(DISTINCT span_id) FROM spans")
            .await as usize,
        total
    );

    // Other engines read the compacted file (times split into byte streams, ids at zstd
    // level 1) and see the same rows and times as meshscope.
    let ours = query
        .sql(
            "SELECT count(*), sum(duration_ns), min(CAST(start_time AS BIGINT)), \
             sum(CAST(end_time AS BIGINT) - CAST(start_time AS BIGINT)) FROM spans",
        )
        .await["rows"][0]
        .clone();
    let ours: Vec<String> = ours
        .as_array()
        .expect("row")
        .iter()
        .map(|v| v.to_string())
        .collect();
    let glob = format!("{}/spans/*.parquet", shared.display());
    let script = format!(
        "import duckdb, pyarrow.parquet as pq, pyarrow.compute as pc, glob\n\
         d = duckdb.connect().execute(\"SELECT count(*), sum(duration_ns), \
         min(epoch_ns(start_time)), sum(epoch_ns(end_time) - epoch_ns(start_time)) \
         FROM read_parquet('{glob}')\").fetchone()\n\
         print(','.join(str(v) for v in d))\n\
         t = pq.ParquetDataset(sorted(glob.glob('{glob}'))).read(columns=['start_time', 'duration_ns'])\n\
         print(t.num_rows, pc.sum(t['duration_ns']).as_py(), \
         pc.min(t['start_time'].cast('int64')).as_py())\n"
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    common::assert_success(&out, "DuckDB and pyarrow read the compacted files");
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(ours.join(",").as_str()), "DuckDB");
    assert_eq!(
        lines.next(),
        Some(format!("{} {} {}", ours[0], ours[1], ours[2]).as_str()),
        "pyarrow"
    );

    for s in [c1, c2, query, serve] {
        s.terminate();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_removes_old_files_and_counts_them() {
    let server = Server::in_temp_dir(&[
        "--flush-interval-secs",
        "1",
        "--compaction-interval-secs",
        "1",
        "--retention-max-age-secs",
        "3600",
    ]);
    let hour = 3_600_000_000_000u64;
    let now = chrono::Utc::now().timestamp_nanos_opt().expect("now") as u64;
    let spans = |start: u64, n: u64, id0: u64| -> Vec<Span> {
        (0..n)
            .map(|i| Span {
                trace_id: [(id0 + i + 1).to_be_bytes(), [9; 8]].concat(),
                span_id: (id0 + i + 1).to_be_bytes().to_vec(),
                name: "GET /".into(),
                kind: SERVER,
                start_time_unix_nano: start,
                end_time_unix_nano: start + 1_000_000,
                ..Default::default()
            })
            .collect()
    };
    // Three hours old: beyond the one-hour retention once it is in a file of its own.
    export(
        &server.otlp_url(""),
        "legacy",
        &spans(now - 3 * hour, 40, 0),
    )
    .await;
    let files = r#"meshscope_parquet_files_written_total{table="spans"}"#;
    server.wait_metric(files, 30, |n| n >= 1.0).await;
    export(&server.otlp_url(""), "fresh", &spans(now, 25, 1000)).await;
    let started = Instant::now();
    loop {
        let n = server.scalar("SELECT count(*) FROM spans").await;
        if n == 25 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{n} spans left, not 25"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        server
            .scalar("SELECT count(*) FROM spans WHERE service_name = 'fresh'")
            .await,
        25
    );
    let metrics = server.get_text("/metrics").await;
    assert!(
        metrics.contains("meshscope_retention_removed_rows_total{table=\"spans\"} 40"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("retention"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    server.terminate();
}

/// The final flush at shutdown comes after the last maintenance pass; retention runs once
/// more after it, so what the flush wrote beyond the bounds does not stay.
#[tokio::test(flavor = "multi_thread")]
async fn retention_runs_after_the_final_flush() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let args = [
        "--flush-interval-secs",
        "3600",
        "--compaction-interval-secs",
        "3600",
        "--retention-max-age-secs",
        "3600",
    ];
    let server = Server::start_with(&data, &args);
    let hour = 3_600_000_000_000u64;
    let now = chrono::Utc::now().timestamp_nanos_opt().expect("now") as u64;
    let old: Vec<Span> = (0..30u64)
        .map(|i| Span {
            trace_id: [(i + 1).to_be_bytes(), [5; 8]].concat(),
            span_id: (i + 1).to_be_bytes().to_vec(),
            name: "GET /".into(),
            kind: SERVER,
            start_time_unix_nano: now - 3 * hour,
            end_time_unix_nano: now - 3 * hour + 1_000_000,
            ..Default::default()
        })
        .collect();
    export(&server.otlp_url(""), "legacy", &old).await;
    assert_eq!(server.scalar("SELECT count(*) FROM spans").await, 30);
    server.terminate();
    let parquet: Vec<String> = std::fs::read_dir(data.join("spans"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".parquet"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        parquet.is_empty(),
        "three-hour-old spans stayed past a one-hour bound in {parquet:?}"
    );
    // And they do not come back from the write-ahead log either.
    let server = Server::start_with(&data, &args);
    assert_eq!(server.scalar("SELECT count(*) FROM spans").await, 0);
    server.terminate();
}

/// Looking traces up by id when they live in many Parquet files (the trace index picks
/// the files and row groups; none is missed), after a restart, and with an absent id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_lookup_by_id_over_many_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let args = [
        "--flush-interval-secs",
        "1",
        "--compaction-interval-secs",
        "0",
    ];
    let server = Server::start_with(&data, &args);
    let spans = workload(60);
    // Six rounds, each flushed to its own files.
    let trace_ids: Vec<String> = spans["frontend"]
        .iter()
        .step_by(2)
        .map(|s| hex(&s.trace_id))
        .collect();
    for round in 0..6 {
        for (service, spans) in &spans {
            let part: Vec<Span> = spans
                .iter()
                .skip(round * spans.len() / 6)
                .take(spans.len() / 6)
                .cloned()
                .collect();
            export(&server.otlp_url(""), service, &part).await;
        }
        // Each round in files of its own: wait until it is flushed.
        let files = r#"meshscope_unflushed_rows{table="spans"}"#;
        server.wait_metric(files, 30, |n| n == 0.0).await;
    }
    server.terminate();
    let server = Server::start_with(&data, &args);
    let files = std::fs::read_dir(data.join("spans"))
        .expect("spans dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "parquet"))
        })
        .count();
    assert!(files >= 6, "the spans are spread over {files} files");
    let client = reqwest::Client::new();
    for id in &trace_ids {
        let r = client
            .get(server.url(&format!("/api/v1/traces/{id}")))
            .send()
            .await
            .expect("lookup");
        assert_eq!(r.status(), 200, "{id}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(
            body["spans"].as_array().map(Vec::len),
            Some(4),
            "{id}: {body}"
        );
    }
    let r = client
        .get(server.url(&format!("/api/v1/traces/{}", "0".repeat(31) + "1")))
        .send()
        .await
        .expect("lookup");
    assert_eq!(r.status(), 404);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
