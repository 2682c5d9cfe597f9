//! Parquet on an S3-compatible object store: a real S3 server (moto's standalone server,
//! from PyPI) holds the files; serve writes, compacts and reads them, a restart finds them,
//! and a collector + query pair shares them.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use opentelemetry_proto::tonic::trace::v1::Span;

/// A running S3 server on a free loopback port, stopped on drop.
struct S3 {
    child: Child,
    endpoint: String,
}

impl S3 {
    fn start() -> S3 {
        use std::io::BufRead as _;
        // Port 0: the server binds a free port and says which (no bind-and-release race).
        let script = "from moto.server import ThreadedMotoServer\n\
                      import sys\n\
                      s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n\
                      s.start()\n\
                      print(s.get_host_and_port()[1], flush=True)\n\
                      sys.stdin.read()\n";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto's S3 server (scripts/install-test-deps installs moto[server])");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the S3 server's port");
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the S3 server did not start: {line:?}"));
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while common::http_status(port, "/").is_err() {
            assert!(Instant::now() < deadline, "the S3 server did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        S3 { child, endpoint }
    }

    fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "meshscope"),
            ("AWS_SECRET_ACCESS_KEY", "meshscope-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT", &self.endpoint),
            ("AWS_ALLOW_HTTP", "true"),
        ]
    }

    /// `aws s3api`-style calls through boto3 (installed with moto).
    fn python(&self, code: &str) -> String {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='meshscope', aws_secret_access_key='meshscope-secret', region_name='us-east-1')\n{code}",
            self.endpoint
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("python3");
        common::assert_success(&out, "python3 (boto3)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The object keys under `prefix`.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.python(&format!(
            "for o in s3.list_objects_v2(Bucket='traffic', Prefix='{prefix}').get('Contents', []): print(o['Key'])"
        ));
        out.lines().map(str::to_string).collect()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Exports `n` spans with ids from `first` and waits for the acknowledgement.
async fn export(server: &Server, first: u64, n: u64) {
    let now = chrono::Utc::now().timestamp_nanos_opt().expect("now") as u64;
    let spans = (first..first + n)
        .map(|i| Span {
            trace_id: [i.to_be_bytes(), [3; 8]].concat(),
            span_id: (i + 1).to_be_bytes().to_vec(), // never all zeros (invalid)
            name: "GET /items".into(),
            kind: 2,
            start_time_unix_nano: now - 1_000_000_000,
            end_time_unix_nano: now - 1_000_000_000 + i * 1_000,
            ..Default::default()
        })
        .collect();
    let req = common::otlp::traces("inventory", spans);
    common::otlp::post(&server.otlp_url("/v1/traces"), &req).await;
}

async fn wait_for(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn parquet_lives_on_s3_through_flushes_compactions_restarts_and_split_roles() {
    let s3 = S3::start();
    s3.python("s3.create_bucket(Bucket='traffic')");
    let env = s3.env();
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("wal-only");
    let flags = [
        &[
            "--storage-url",
            "s3://traffic/mesh",
            "--flush-interval-secs",
            "1",
        ][..],
        &common::COMPACT_EVERY_SECOND,
    ]
    .concat();
    let server = Server::start_env("serve", &data, &flags, &env);

    // Three exports, each flushed to a file of its own before the next: compacted into one.
    for i in 0..3 {
        export(&server, i * 100, 100).await;
        let flushed = ((i + 1) * 100) as f64;
        server
            .wait_metric(
                "meshscope_parquet_rows_written_total{table=\"spans\"}",
                20,
                |v| v >= flushed,
            )
            .await;
    }
    wait_for("the three files are compacted into one on S3", async || {
        let keys = s3.keys("mesh/spans/");
        let n = server.scalar("SELECT count(*) FROM spans").await;
        eprintln!("{n} spans in {keys:?}");
        keys.len() == 1 && n == 300
    })
    .await;
    let keys = s3.keys("mesh/spans/");
    assert!(
        keys[0].starts_with("mesh/spans/00000000000000000001-") && keys[0].ends_with(".parquet"),
        "{keys:?}"
    );
    assert!(
        !data.join("spans").read_dir().is_ok_and(|mut d| d
            .any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "parquet")))),
        "no Parquet file on local disk"
    );
    assert_eq!(
        server
            .scalar("SELECT count(DISTINCT span_id) FROM spans")
            .await,
        300
    );
    // A lookup by id prunes through the S3 file's statistics and bloom filter.
    let id = hex::encode(151u64.to_be_bytes());
    assert_eq!(
        server
            .scalar(&format!(
                "SELECT count(*) FROM spans WHERE span_id = '{id}'"
            ))
            .await,
        1
    );

    // More data, then a graceful stop: everything is on S3 and a restart reads it.
    export(&server, 1000, 50).await;
    server.terminate();
    let server = Server::start_env("serve", &data, &flags, &env);
    assert_eq!(server.scalar("SELECT count(*) FROM spans").await, 350);
    // The graph's own column scan reads the files from S3 as well: every span is a
    // parentless SERVER span, so one request each on user → inventory.
    let at = |m: i64| {
        (chrono::Utc::now() + chrono::Duration::minutes(m))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let graph = server
        .get_json(&format!(
            "/api/v1/graph?source=spans&start={}&end={}",
            at(-30),
            at(1)
        ))
        .await;
    let requests = graph["edges"]
        .as_array()
        .and_then(|edges| {
            edges
                .iter()
                .find(|e| e["source"] == "user" && e["target"] == "inventory")
        })
        .and_then(|e| e["requests"].as_u64());
    assert_eq!(requests, Some(350), "{graph}");
    // And a trace by id, through the S3 file's statistics and bloom filter.
    let trace = hex::encode([5u64.to_be_bytes(), [3; 8]].concat());
    let found: serde_json::Value = server.get_json(&format!("/api/v1/traces/{trace}")).await;
    assert_eq!(found["spans"].as_array().map(Vec::len), Some(1), "{found}");
    server.terminate();

    // Split roles over the same bucket: a collector writes, a query node reads.
    let collector = Server::start_env(
        "collector",
        &dir.path().join("c1"),
        &[&flags[..], &["--node-id", "c1"]].concat(),
        &env,
    );
    let query = Server::start_env("query", &dir.path().join("q"), &flags, &env);
    export(&collector, 5000, 25).await;
    wait_for(
        "the query node sees the collector's flushed spans",
        async || query.scalar("SELECT count(*) FROM spans").await == 375,
    )
    .await;
    assert!(
        s3.keys("mesh/spans/")
            .iter()
            .any(|k| k.ends_with(".c1.parquet"))
    );
    collector.terminate();
    query.terminate();
}
