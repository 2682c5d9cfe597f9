//! Acknowledged means durable: `kill -9` in the middle of a stream of exports loses and
//! duplicates nothing; SIGTERM leaves everything in Parquet that DuckDB can read.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Server;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

const SPANS_PER_REQUEST: usize = 50;

/// Request `n` of sender `w`: span ids encode (w, n, i) so every span is unique and known.
fn request(w: u8, n: u32) -> (ExportTraceServiceRequest, Vec<String>) {
    let mut ids = Vec::new();
    let spans = (0..SPANS_PER_REQUEST as u16)
        .map(|i| {
            let mut id = [0u8; 8];
            id[0] = w + 1;
            id[1..5].copy_from_slice(&n.to_be_bytes());
            id[5..7].copy_from_slice(&i.to_be_bytes());
            id[7] = 1;
            ids.push(id.iter().map(|b| format!("{b:02x}")).collect::<String>());
            let mut trace = [7u8; 16];
            trace[..8].copy_from_slice(&id);
            Span {
                trace_id: trace.to_vec(),
                span_id: id.to_vec(),
                name: format!("op-{i}"),
                kind: 2,
                start_time_unix_nano: 1_700_000_000_000_000_000 + u64::from(n),
                end_time_unix_nano: 1_700_000_000_001_000_000 + u64::from(n),
                attributes: vec![KeyValue {
                    key: "http.route".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue(format!("/r/{}", i % 7))),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect();
    let req = common::otlp::traces(&format!("svc-{w}"), spans);
    (req, ids)
}

/// Streams exports from 4 senders until the server goes away; returns the acknowledged ids.
async fn stream_until_killed(
    server: &Server,
    first_request: u32,
    kill_after_acks: usize,
) -> (HashSet<String>, Server) {
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let url = server.otlp_url("/v1/traces");
    let mut senders = Vec::new();
    for w in 0..4u8 {
        let (acked, url) = (Arc::clone(&acked), url.clone());
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = first_request;
            loop {
                let (req, ids) = request(w, n);
                n += 1;
                let sent = client
                    .post(&url)
                    .header("content-type", "application/x-protobuf")
                    .body(req.encode_to_vec())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => acked.lock().expect("lock").extend(ids),
                    Ok(r) if r.status() == 503 => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    _ => return, // the server is gone
                }
            }
        }));
    }
    while acked.lock().expect("lock").len() < kill_after_acks * SPANS_PER_REQUEST {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // SAFETY of the test's claim: kill while the senders are still sending.
    let data_dir = server.data_dir.clone();
    let pid = server.child.id();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill -9");
    for s in senders {
        let _ = s.await;
    }
    let set = acked.lock().expect("lock").clone();
    (set, Server::start_with(&data_dir, &flags()))
}

/// Small flush threshold: Parquet files are written during the stream, so the crash lands
/// between log, buffer and file states; and compaction merges them every second, so it
/// lands in the middle of compactions too.
fn flags() -> Vec<&'static str> {
    [
        &["--flush-bytes", "300000"][..],
        &common::COMPACT_EVERY_SECOND,
    ]
    .concat()
}

async fn stored_ids(server: &Server) -> (i64, HashSet<String>) {
    let total = server.scalar("SELECT count(*) FROM spans").await;
    let v = server.sql("SELECT span_id FROM spans").await;
    let ids = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r[0].as_str().expect("id").to_string())
        .collect();
    (total, ids)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_stream_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let server = Server::start_with(&data, &flags());

    let (acked1, server) = stream_until_killed(&server, 0, 120).await;
    let (total, ids) = stored_ids(&server).await;
    assert_eq!(total as usize, ids.len(), "no span is stored twice");
    let lost: Vec<_> = acked1.difference(&ids).take(5).collect();
    assert!(
        lost.is_empty(),
        "acknowledged spans lost after kill -9: {lost:?} (of {})",
        acked1.len()
    );
    let parquet_files = std::fs::read_dir(data.join("spans"))
        .expect("spans dir")
        .count();
    assert!(
        parquet_files >= 1,
        "the stream crossed at least one Parquet flush"
    );

    // Crash again after the replay, with new requests on top.
    let (acked2, server) = stream_until_killed(&server, 1_000_000, 80).await;
    let (total, ids) = stored_ids(&server).await;
    assert_eq!(
        total as usize,
        ids.len(),
        "no span is stored twice after two crashes"
    );
    assert!(
        acked1.is_subset(&ids) && acked2.is_subset(&ids),
        "every acknowledged span survives both crashes"
    );

    // Compactions ran (and were counted) while all this happened.
    let started = std::time::Instant::now();
    loop {
        let metrics = server.get_text("/metrics").await;
        if !metrics.contains("meshscope_compactions_total{table=\"spans\"} 0") {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no compaction of the many small files"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }

    // A graceful stop leaves every row in Parquet, readable by another engine.
    server.terminate();
    let wal_bytes: u64 = walk(&data.join("wal"))
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert_eq!(
        wal_bytes, 0,
        "after SIGTERM the log holds nothing that is not in Parquet"
    );
    let out = duckdb_spans(&data, "count(*), count(DISTINCT span_id)");
    assert_eq!(
        out,
        format!("({total}, {total})"),
        "DuckDB sees every span once"
    );
}

/// `SELECT <columns>` over the spans' Parquet files in `data`, by DuckDB (pip `duckdb`):
/// the row as Python prints a tuple.
fn duckdb_spans(data: &std::path::Path, columns: &str) -> String {
    let glob = format!("{}/spans/*.parquet", data.display());
    let sql = format!("SELECT {columns} FROM read_parquet('{glob}')");
    let duck = std::process::Command::new("python3")
        .args([
            "-c",
            &format!("import duckdb; print(duckdb.connect().execute(\"{sql}\").fetchone())"),
        ])
        .output()
        .expect("python3");
    common::assert_success(&duck, "DuckDB (pip duckdb) reads the files");
    String::from_utf8_lossy(&duck.stdout).trim().to_string()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A stop does not wait for clients that are connected but idle: an exporter's gRPC channel
/// after its export, HTTP/1.1 keep-alive connections (OTLP/HTTP and the API), a Postgres
/// session and a live tap stream. Each is closed at once (the tap stream ends), so the
/// drain never reaches its 10 s bound, and the acknowledged export is in Parquet.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_does_not_wait_for_idle_connections() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let server = Server::start(&data);
    let mut grpc = TraceServiceClient::connect(server.grpc_url())
        .await
        .expect("gRPC connect");
    let (req, _) = request(0, 0);
    grpc.export(req).await.expect("export");
    let http = reqwest::Client::new();
    let (req, _) = request(0, 1);
    common::otlp::post_with(&http, &server.otlp_url("/v1/traces"), &req).await;
    let ready = http.get(server.url("/readyz")).send().await.expect("GET");
    assert_eq!(ready.status(), 200);
    let (pg, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=meshscope", server.pg),
        tokio_postgres::NoTls,
    )
    .await
    .expect("pg connect");
    let pg_session = tokio::spawn(conn);
    pg.simple_query("SELECT 1").await.expect("pg query");
    let mut tap = http
        .get(server.url("/api/v1/tap"))
        .send()
        .await
        .expect("tap");
    assert_eq!(tap.status(), 200);
    let tap_stream = tokio::spawn(async move { while let Ok(Some(_)) = tap.chunk().await {} });

    let log = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .expect("terminate");
    assert!(
        !log.contains("did not finish"),
        "the stop waited for idle clients:\n{log}"
    );
    tokio::time::timeout(Duration::from_secs(5), tap_stream)
        .await
        .expect("the tap stream ended with the server")
        .expect("tap task");
    tokio::time::timeout(Duration::from_secs(5), pg_session)
        .await
        .expect("the Postgres session was closed")
        .ok();
    drop((grpc, pg));
    assert_eq!(
        duckdb_spans(&data, "count(*)"),
        format!("({},)", 2 * SPANS_PER_REQUEST),
        "both acknowledged exports are in Parquet"
    );
}
