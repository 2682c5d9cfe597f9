//! SQL out, three ways: `POST /api/v1/sql` (JSON and Arrow IPC), `meshscope sql`, and the
//! Postgres wire protocol (psql, and a driver using the extended query protocol). Every
//! entry point is read-only.

mod common;

use std::process::Command;

use common::{Server, binary, testdata};

async fn loaded_server(dir: &std::path::Path) -> Server {
    let server = Server::start(&dir.join("data"));
    let r = reqwest::Client::new()
        .post(server.otlp_url("/v1/traces"))
        .header("content-type", "application/json")
        .body(testdata("trace.json"))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200);
    server
}

const WRITES: &[&str] = &[
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO spans SELECT * FROM spans",
    "DROP TABLE spans",
    "DELETE FROM spans",
    "COPY spans TO '/tmp/meshscope-copy.parquet'",
    "CREATE EXTERNAL TABLE etc STORED AS CSV LOCATION '/etc/passwd'",
    "SET datafusion.execution.batch_size = 1",
    "SELECT * INTO t2 FROM spans",
];

#[tokio::test(flavor = "multi_thread")]
async fn http_api_json_and_arrow() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = loaded_server(dir.path()).await;
    let v = server.sql("SELECT service_name, span_attributes['my.span.attr'] AS attr, http_status_code FROM spans").await;
    assert_eq!(
        v["columns"][0],
        serde_json::json!({"name": "service_name", "type": "Utf8"})
    );
    assert_eq!(
        v["rows"],
        serde_json::json!([["my.service", "some value", null]])
    );

    let r = reqwest::Client::new()
        .post(server.url("/api/v1/sql"))
        .header("accept", "application/vnd.apache.arrow.stream")
        .json(&serde_json::json!({"sql": "SELECT trace_id, duration_ns FROM spans"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.apache.arrow.stream"
    );
    let bytes = r.bytes().await.expect("body");
    let batches: Vec<_> = arrow::ipc::reader::StreamReader::try_new(&bytes[..], None)
        .expect("Arrow IPC stream")
        .collect::<Result<_, _>>()
        .expect("batches");
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);

    // Bad SQL and writes: 400 with a readable error; reading files is not possible.
    let (status, body) = server.sql_status("SELEC 1").await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().expect("error").contains("SELEC"),
        "{body}"
    );
    let (status, body) = server.sql_status("SELECT * FROM '/etc/passwd'").await;
    assert_eq!(status, 400, "{body}");
    for sql in WRITES {
        let (status, body) = server.sql_status(sql).await;
        assert_eq!(status, 400, "{sql}: {body}");
        assert!(
            body["error"].as_str().expect("error").contains("read-only"),
            "{sql}: {body}"
        );
    }
    assert_eq!(
        server.scalar("SELECT count(*) FROM spans").await,
        1,
        "nothing changed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_prints_tables_json_and_csv_and_refuses_writes() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = loaded_server(dir.path()).await;
    let url = server.url("");
    let run = |args: &[&str]| {
        Command::new(binary())
            .arg("sql")
            .args(args)
            .args(["--server", &url])
            .output()
            .expect("meshscope sql")
    };

    let out = run(&["SELECT service_name, span_kind FROM spans"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| my.service   | SERVER    |"), "{text}");
    assert!(text.contains("(1 row)"), "{text}");

    let out = run(&["SELECT span_name FROM spans", "--format", "csv"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "span_name\nI'm a server span\n"
    );

    let out = run(&["SELECT duration_ns FROM spans", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["rows"], serde_json::json!([[1_000_000_000i64]]));

    let out = run(&["DROP TABLE spans"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_wire_with_psql_and_a_driver() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = loaded_server(dir.path()).await;
    let port = server.pg.to_string();
    let psql = |sql: &str| {
        Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "meshscope",
                "-d",
                "meshscope",
                "-X",
                "-A",
                "-t",
                "-c",
                sql,
            ])
            .output()
            .expect("psql (Debian postgresql-client)")
    };
    let out = psql("SELECT service_name, span_attributes['my.span.attr'] FROM spans");
    common::assert_success(&out, "psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "my.service|some value"
    );
    for sql in WRITES {
        let out = psql(sql);
        let err = String::from_utf8_lossy(&out.stderr);
        // The Postgres dialect has no CREATE EXTERNAL TABLE: it is refused as a syntax error.
        let refused = err.contains("read-only")
            || (sql.starts_with("CREATE EXTERNAL") && err.contains("ERROR"));
        assert!(refused, "{sql}: {err}");
    }

    // The extended query protocol, with a bound parameter, through a real driver.
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=meshscope dbname=meshscope"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT span_name, duration_ns FROM spans WHERE service_name = $1",
            &[&"my.service"],
        )
        .await
        .expect("extended query");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "I'm a server span");
    assert_eq!(rows[0].get::<_, i64>(1), 1_000_000_000);
    let err = client
        .query("DROP TABLE spans", &[])
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("read-only") || format!("{err:?}").contains("read-only"),
        "{err:?}"
    );
    assert_eq!(server.scalar("SELECT count(*) FROM spans").await, 1);
}

/// Waits (at most `secs`) until the running-queries gauge reads `want`.
async fn wait_running(server: &Server, want: f64, secs: u64) {
    server
        .wait_metric("meshscope_queries_running", secs, |v| v == want)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_whose_client_went_away_is_cancelled() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("tmp");
    // No background SQL (rollups, counters) to blur the count of running statements.
    let server = Server::start_with(
        &dir.path().join("data"),
        &[
            "--rollup-interval-secs",
            "3600",
            "--signals-interval-secs",
            "3600",
        ],
    );
    wait_running(&server, 0.0, 10).await;
    // Hours of work for a debug build: a sum over 10^11 generated rows.
    let body = r#"{"sql": "SELECT sum(value % 7) FROM range(100000000000)"}"#;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", server.http)).expect("connect");
    write!(
        conn,
        "POST /api/v1/sql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    wait_running(&server, 1.0, 30).await;
    // The client leaves; its query's task must go with it (not run for hours).
    drop(conn);
    wait_running(&server, 0.0, 30).await;
    // The server still answers.
    let v = server.sql("SELECT 1 AS one").await;
    assert_eq!(v["rows"], serde_json::json!([[1]]));
}
