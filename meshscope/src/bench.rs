//! `meshscope bench ingest`: how fast acknowledged spans go in, and what they cost at rest.
//!
//! Starts the real server as a child process (`meshscope serve`, durability on, on
//! loopback), sends realistic mesh spans (12 attributes each, like a sidecar's SERVER and
//! CLIENT spans) over OTLP/gRPC in batches, then stops it with SIGTERM so that every span
//! is in Parquet. Prints spans/s acknowledged and sustained into Parquet, the server's CPU
//! seconds per million spans, its peak RSS and the bytes per span on disk.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshscope_proto::otlp::collector::trace::v1::ExportTraceServiceRequest;
use meshscope_proto::otlp::collector::trace::v1::trace_service_client::TraceServiceClient;
use meshscope_proto::otlp::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use meshscope_proto::otlp::resource::v1::Resource;
use meshscope_proto::otlp::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode,
};

use crate::config::BenchIngestArgs;

/// A small fast PRNG (xorshift64*): ids and choices, no dependency needed for a benchmark.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SERVICES: &[&str] = &[
    "frontend",
    "cart",
    "checkout",
    "payments",
    "inventory",
    "shipping",
    "recommendations",
    "currency",
];
const ROUTES: &[&str] = &[
    "/api/cart",
    "/api/checkout",
    "/api/pay",
    "/api/stock/{sku}",
    "/api/ship",
    "/api/recs",
    "/api/convert",
    "/",
];

fn kv(k: &str, v: Value) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}
fn s(v: &str) -> Value {
    Value::StringValue(v.to_string())
}

/// One export request of `n` spans: traces of a SERVER span with CLIENT children, 12
/// attributes each, grouped by service as an SDK or proxy sends them.
fn mesh_request(rng: &mut Rng, n: usize, now_ns: u64) -> ExportTraceServiceRequest {
    let mut by_service: Vec<Vec<Span>> = vec![Vec::new(); SERVICES.len()];
    let mut made = 0;
    while made < n {
        let trace_id = [rng.next().to_le_bytes(), rng.next().to_le_bytes()].concat();
        let caller = rng.below(SERVICES.len() as u64) as usize;
        let root_id = rng.next().to_le_bytes().to_vec();
        let start = now_ns - rng.below(1_000_000_000);
        let fanout = (1 + rng.below(4) as usize).min(n - made - 1).max(0);
        let mut push = |svc: usize, span: Span| by_service[svc].push(span);
        let status_code = if rng.below(100) < 2 { 503 } else { 200 };
        let attrs = |rng: &mut Rng, route: &str, peer: &str, code: i64| {
            vec![
                kv(
                    "http.request.method",
                    s(if rng.below(4) == 0 { "POST" } else { "GET" }),
                ),
                kv("http.route", s(route)),
                kv("http.response.status_code", Value::IntValue(code)),
                kv("server.address", s(peer)),
                kv("server.port", Value::IntValue(8080)),
                kv("url.scheme", s("http")),
                kv("network.protocol.version", s("1.1")),
                kv("network.peer.address", s("10.0.3.17")),
                kv("user_agent.original", s("meshscope-proxy/0.1")),
                kv("mesh.proxy", s("meshscope")),
                kv("mesh.retries", Value::IntValue((rng.below(10) == 0) as i64)),
                kv("mesh.upstream_cluster", s(peer)),
            ]
        };
        let status = |code: i64| Status {
            code: if code >= 500 {
                StatusCode::Error as i32
            } else {
                StatusCode::Unset as i32
            },
            message: String::new(),
        };
        let dur = 200_000 + rng.below(20_000_000);
        let route = ROUTES[caller];
        push(
            caller,
            Span {
                trace_id: trace_id.clone(),
                span_id: root_id.clone(),
                name: format!("GET {route}"),
                kind: SpanKind::Server as i32,
                start_time_unix_nano: start,
                end_time_unix_nano: start + dur,
                attributes: attrs(rng, route, SERVICES[caller], status_code),
                status: Some(status(status_code)),
                ..Default::default()
            },
        );
        made += 1;
        for _ in 0..fanout {
            let callee = rng.below(SERVICES.len() as u64) as usize;
            let cstart = start + rng.below(dur / 2);
            let cdur = rng.below(dur / 2).max(1);
            push(
                caller,
                Span {
                    trace_id: trace_id.clone(),
                    span_id: rng.next().to_le_bytes().to_vec(),
                    parent_span_id: root_id.clone(),
                    name: format!("GET {}", ROUTES[callee]),
                    kind: SpanKind::Client as i32,
                    start_time_unix_nano: cstart,
                    end_time_unix_nano: cstart + cdur,
                    attributes: attrs(rng, ROUTES[callee], SERVICES[callee], status_code),
                    status: Some(status(status_code)),
                    ..Default::default()
                },
            );
            made += 1;
        }
    }
    ExportTraceServiceRequest {
        resource_spans: by_service
            .into_iter()
            .enumerate()
            .filter(|(_, spans)| !spans.is_empty())
            .map(|(i, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", s(SERVICES[i])),
                        kv("service.namespace", s("shop")),
                        kv("service.version", s("1.4.2")),
                        kv("k8s.pod.name", s(&format!("{}-7d9f8-x2k4p", SERVICES[i]))),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "meshscope-proxy".into(),
                        version: "0.1.0".into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// (utime + stime) seconds and state of a process, from /proc.
fn cpu_seconds(pid: u32) -> Option<(f64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some(((utime + stime) / 100.0, state))
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn dir_bytes(dir: &Path, ext: &str) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == ext))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Server {
    child: Child,
    grpc: String,
}

fn start_server(data_dir: &Path) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (g, h, a, p) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let child = std::process::Command::new(exe)
        .args(["serve", "--data-dir"])
        .arg(data_dir)
        .args(["--otlp-grpc-addr", &format!("127.0.0.1:{g}")])
        .args(["--otlp-http-addr", &format!("127.0.0.1:{h}")])
        .args(["--http-addr", &format!("127.0.0.1:{a}")])
        .args(["--pg-addr", &format!("127.0.0.1:{p}")])
        .args(["--log", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    Ok(Server {
        child,
        grpc: format!("http://127.0.0.1:{g}"),
    })
}

pub async fn ingest(args: BenchIngestArgs) -> Result<(), String> {
    let tmp;
    let data_dir: PathBuf = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("meshscope-bench-{}", std::process::id()));
            tmp.clone()
        }
    };
    let _ = std::fs::remove_dir_all(&data_dir);
    let mut server = start_server(&data_dir)?;
    let pid = server.child.id();
    let mut client = None;
    for _ in 0..200 {
        if let Ok(c) = TraceServiceClient::connect(server.grpc.clone()).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = client
        .ok_or("the server did not come up")?
        .max_encoding_message_size(64 << 20);
    let batches = args.spans.div_ceil(args.batch);
    eprintln!(
        "bench ingest: {} spans in {batches} requests of {} over OTLP/gRPC, {} in flight, server pid {pid}, data {}",
        args.spans,
        args.batch,
        args.concurrency,
        data_dir.display()
    );
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let sent = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.concurrency.max(1) {
        let (mut client, sent, retried, next) = (
            client.clone(),
            Arc::clone(&sent),
            Arc::clone(&retried),
            Arc::clone(&next),
        );
        let batch = args.batch;
        workers.spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1) * 0x1234_5678);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= batches as u64 {
                    return Ok::<_, String>(());
                }
                let req = mesh_request(&mut rng, batch, now_ns);
                loop {
                    match client.export(req.clone()).await {
                        Ok(_) => break,
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(s) => return Err(format!("export failed: {s}")),
                    }
                }
                sent.fetch_add(batch as u64, Ordering::Relaxed);
            }
        });
    }
    let mut peak_kib = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                Some(Ok(Ok(()))) => continue,
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => return Err(e.to_string()),
                None => break,
            },
            _ = ticker.tick() => {
                let n = sent.load(Ordering::Relaxed);
                peak_kib = peak_kib.max(peak_rss_kib(pid).unwrap_or(0));
                eprintln!("  {:>5.1}s  {:>10} spans acknowledged  {:>9.0} spans/s  peak RSS {} MiB",
                    start.elapsed().as_secs_f64(), n, n as f64 / start.elapsed().as_secs_f64(), peak_kib / 1024);
            }
        }
    }
    let acked_elapsed = start.elapsed();
    let total = sent.load(Ordering::Relaxed);
    peak_kib = peak_kib.max(peak_rss_kib(pid).unwrap_or(0));
    eprintln!(
        "  all {total} spans acknowledged in {:.2}s; stopping the server (SIGTERM) to write Parquet",
        acked_elapsed.as_secs_f64()
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let mut cpu = 0.0;
    loop {
        match cpu_seconds(pid) {
            Some((c, state)) => {
                cpu = c;
                if state == 'Z' {
                    break;
                }
                peak_kib = peak_kib.max(peak_rss_kib(pid).unwrap_or(0));
            }
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = server.child.wait().map_err(|e| e.to_string())?;
    let durable_elapsed = start.elapsed();
    if !status.success() {
        return Err(format!("the server exited with {status}"));
    }
    let parquet = dir_bytes(&data_dir.join("spans"), "parquet");
    let acked_rate = total as f64 / acked_elapsed.as_secs_f64();
    let durable_rate = total as f64 / durable_elapsed.as_secs_f64();
    println!("spans                      {total}");
    println!(
        "acknowledged               {acked_rate:.0} spans/s ({:.2} s)",
        acked_elapsed.as_secs_f64()
    );
    println!(
        "sustained into Parquet     {durable_rate:.0} spans/s ({:.2} s, until every span was in a Parquet file)",
        durable_elapsed.as_secs_f64()
    );
    println!(
        "server CPU                 {:.2} s per million spans ({cpu:.2} s in all)",
        cpu / (total as f64 / 1e6)
    );
    println!("server peak RSS            {} MiB", peak_kib / 1024);
    println!(
        "Parquet at rest            {:.1} bytes per span ({parquet} bytes)",
        parquet as f64 / total as f64
    );
    println!(
        "overload answers retried   {}",
        retried.load(Ordering::Relaxed)
    );
    if args.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(())
}
