//! Starting and stopping the real `meshscope` binary for end-to-end tests.
#![allow(dead_code)] // each test file uses a different part of this module

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod browser;
pub mod mesh;
pub mod otlp;
pub mod proxy;

/// Flags that make compaction run every second over any two files and delete what it
/// replaced a second later, so a test sees compactions happen while it works.
pub const COMPACT_EVERY_SECOND: [&str; 6] = [
    "--compaction-interval-secs",
    "1",
    "--compaction-min-files",
    "2",
    "--retire-grace-secs",
    "1",
];

/// The binary under test: `MESHSCOPE_BIN`, or the one Cargo built for these tests.
pub fn binary() -> PathBuf {
    std::env::var("MESHSCOPE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_meshscope")))
}

/// A running `meshscope serve` child process on free loopback ports.
pub struct Server {
    pub child: Child,
    pub data_dir: PathBuf,
    pub grpc: u16,
    pub otlp_http: u16,
    pub http: u16,
    pub pg: u16,
    pub log: PathBuf,
    /// The bearer token `sql*` and `metric*` send (a server started with `--auth-file`).
    pub token: Option<String>,
    /// Started with `--tls-cert` or `--tls-auto`: readiness is read from the log only.
    pub tls: bool,
    /// The temporary directory `in_temp_dir` made for the data, removed after the process.
    scratch: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start(data_dir: &Path) -> Server {
        Self::start_with(data_dir, &[])
    }

    /// `serve` with `extra` flags over a fresh temporary data directory of its own.
    pub fn in_temp_dir(extra: &[&str]) -> Server {
        let scratch = tempfile::tempdir().expect("tmp");
        let mut server = Self::start_with(&scratch.path().join("data"), extra);
        server.scratch = Some(scratch);
        server
    }

    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Server {
        Self::start_role("serve", data_dir, extra)
    }

    /// Starts `meshscope <role>` (`serve`, `collector` or `query`).
    pub fn start_role(role: &str, data_dir: &Path, extra: &[&str]) -> Server {
        Self::start_env(role, data_dir, extra, &[])
    }

    /// Starts `meshscope <role>` with extra environment variables.
    pub fn start_env(role: &str, data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        // Port 0 everywhere, and the ports read back from the log: picking free ports first
        // races with every other process on the machine.
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = data_dir.with_extension(format!("{role}.{}.{n}.log", std::process::id()));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        // Loopback port 0 for every listener `extra` does not place itself.
        let defaults = [
            "--otlp-grpc-addr",
            "--otlp-http-addr",
            "--http-addr",
            "--pg-addr",
        ]
        .into_iter()
        .filter(|flag| !extra.contains(flag))
        .flat_map(|flag| [flag, "127.0.0.1:0"]);
        let child = Command::new(binary())
            .arg(role)
            .arg("--data-dir")
            .arg(data_dir)
            .args(defaults)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start meshscope");
        let mut server = Server {
            child,
            data_dir: data_dir.to_path_buf(),
            grpc: 0,
            otlp_http: 0,
            http: 0,
            pg: 0,
            log,
            token: None,
            tls: extra.contains(&"--tls-cert") || extra.contains(&"--tls-auto"),
            scratch: None,
        };
        server.wait_ready();
        server
    }

    /// Waits for the "ready" log line, reads the bound ports from the log, checks /readyz.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = |text: &str, what: &str| -> u16 {
            text.find(&format!("{what} listening on 127.0.0.1:"))
                .map(|i| &text[i + what.len() + " listening on 127.0.0.1:".len()..])
                .map(|rest| {
                    rest.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        };
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(" ready") {
                self.grpc = port(&text, "OTLP/gRPC");
                self.otlp_http = port(&text, "OTLP/HTTP");
                self.http = port(&text, "HTTP API");
                self.pg = port(&text, "Postgres wire protocol");
                if self.tls || http_status(self.http, "/readyz").is_ok_and(|s| s == 200) {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("meshscope exited with {status}; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "meshscope did not become ready; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    pub fn otlp_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.otlp_http)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    /// Runs SQL through `POST /api/v1/sql`; panics unless it answers 200.
    pub async fn sql(&self, sql: &str) -> Value {
        let (status, body) = self.sql_status(sql).await;
        assert_eq!(status, 200, "{sql}: {body}");
        body
    }

    /// Polls `sql` until its first cell (an integer, else -1) satisfies `ok`, and returns
    /// it; after 15 s it returns what it last read, for the caller's assertion to show.
    pub async fn eventually(&self, sql: &str, ok: impl Fn(i64) -> bool) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let n = self.sql(sql).await["rows"][0][0].as_i64().unwrap_or(-1);
            if ok(n) || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn sql_status(&self, sql: &str) -> (u16, Value) {
        let r = self
            .authorized(reqwest::Client::new().post(self.url("/api/v1/sql")))
            .json(&serde_json::json!({ "sql": sql }))
            .send()
            .await
            .expect("POST /api/v1/sql");
        let status = r.status().as_u16();
        (status, r.json().await.expect("JSON answer"))
    }

    /// `request` with this server's token, if it has one.
    pub fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }

    /// The single number a `SELECT count(*) …` style query returns.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let v = self.sql(sql).await;
        v["rows"][0][0]
            .as_i64()
            .unwrap_or_else(|| panic!("{sql}: no integer in {v}"))
    }

    /// The value of one series of `/metrics` (`name` or `name{labels}` exactly as
    /// exposed), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self
            .authorized(reqwest::Client::new().get(self.url("/metrics")))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// A `GET` with the server's token, if it has one, which must answer.
    async fn get(&self, path: &str) -> reqwest::Response {
        self.authorized(reqwest::Client::new().get(self.url(path)))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The body of a [`Server::get`].
    pub async fn get_text(&self, path: &str) -> String {
        let r = self.get(path).await;
        r.text()
            .await
            .unwrap_or_else(|e| panic!("GET {path} body: {e}"))
    }

    /// A [`Server::get`] that must answer JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        r.json()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"))
    }

    /// Waits (at most `secs`) until the series is present and `done` holds for its value;
    /// returns the value.
    pub async fn wait_metric(&self, series: &str, secs: u64, done: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.metric(series).await;
            if let Some(v) = v.filter(|v| done(*v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "{series} stayed {v:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    /// SIGTERM, and wait for a clean exit: what the process logged.
    pub fn terminate(mut self) -> String {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        let status = self.child.wait().expect("wait");
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(
            status.success(),
            "meshscope exited with {status}; log:\n{log}"
        );
        log
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status of a plain `GET` (readiness polling, no client library needed).
pub fn http_status(port: u16, path: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    buf.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad answer"))
}

/// Now, in nanoseconds since the epoch (OTLP's time).
/// The string `field` of every object in the array `list` of `v` (e.g. the node ids of a graph
/// answer, `strings(&graph, "nodes", "id")`); panics when `list` is not an array.
pub fn strings<'a>(v: &'a Value, list: &str, field: &str) -> Vec<&'a str> {
    v[list]
        .as_array()
        .unwrap_or_else(|| panic!("no array {list:?} in {v}"))
        .iter()
        .filter_map(|item| item[field].as_str())
        .collect()
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
}

/// Asserts that a finished command succeeded, showing `what` and its stderr if not.
pub fn assert_success(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shared OTLP/JSON examples (`shared/testdata/otlp-json`).
pub fn testdata(name: &str) -> Vec<u8> {
    let root = std::env::var("MESHSCOPE_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/otlp-json")
        });
    std::fs::read(root.join(name)).unwrap_or_else(|e| panic!("testdata {name}: {e}"))
}
