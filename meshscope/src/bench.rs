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

pub mod overload;

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
        let fanout = (1 + rng.below(4) as usize).min(n - made - 1);
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
    http: String,
}

fn start_server(data_dir: &Path) -> Result<Server, String> {
    start_server_with(data_dir, &[])
}

fn start_server_with(data_dir: &Path, extra: &[String]) -> Result<Server, String> {
    start_role(data_dir, "serve", extra)
}

/// `meshscope <role>` (`serve`, `query`) as a child process on free loopback ports.
fn start_role(data_dir: &Path, role: &str, extra: &[String]) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    start_exe(&exe, data_dir, role, extra)
}

/// [`start_role`] of the binary `exe`.
fn start_exe(exe: &Path, data_dir: &Path, role: &str, extra: &[String]) -> Result<Server, String> {
    let (g, h, a, p) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let child = std::process::Command::new(exe)
        .args([role, "--data-dir"])
        .arg(data_dir)
        .args(["--otlp-grpc-addr", &format!("127.0.0.1:{g}")])
        .args(["--otlp-http-addr", &format!("127.0.0.1:{h}")])
        .args(["--http-addr", &format!("127.0.0.1:{a}")])
        .args(["--pg-addr", &format!("127.0.0.1:{p}")])
        .args(["--log", "warn"])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    Ok(Server {
        child,
        grpc: format!("http://127.0.0.1:{g}"),
        http: format!("http://127.0.0.1:{a}"),
    })
}

/// An OTLP/gRPC trace client of a server that is starting, once it answers (within `wait`).
async fn connect(
    url: &str,
    wait: Duration,
) -> Result<TraceServiceClient<tonic::transport::Channel>, String> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(c) = TraceServiceClient::connect(url.to_string()).await {
            return Ok(c.max_encoding_message_size(64 << 20));
        }
        if Instant::now() > deadline {
            return Err("the server did not come up".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let client = connect(&server.grpc, Duration::from_secs(10)).await?;
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
    let spread_ns = (args.spread_hours.max(0.0) * 3600e9) as u64;
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
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((w as u64 + 1) * 0x1234_5678));
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= batches as u64 {
                    return Ok::<_, String>(());
                }
                // Spans end around the moment they are sent, as a proxy's would; or, spread
                // over the past hours, request i at its share of them.
                let sent_ns = if spread_ns > 0 {
                    now_ns - spread_ns + spread_ns / batches as u64 * i
                } else {
                    now_ns + start.elapsed().as_nanos() as u64
                };
                let req = mesh_request(&mut rng, batch, sent_ns);
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
    // Our connection closed first, as a finished exporter's would: the server's drain waits
    // for open connections.
    drop(client);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let mut cpu = 0.0;
    while let Some((c, state)) = cpu_seconds(pid) {
        cpu = c;
        if state == 'Z' {
            break;
        }
        peak_kib = peak_kib.max(peak_rss_kib(pid).unwrap_or(0));
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

/// `meshscope bench scrape`: a query node's `/metrics` scrape time over `--files` small
/// span files (each one flush of `--spans-per-file` spans, written by the storage crate as a
/// collector would, none compacted), scraped `--runs` times after a first one.
pub async fn scrape(args: crate::config::BenchScrapeArgs) -> Result<(), String> {
    use meshscope_proto::Table;
    use meshscope_storage::{Storage, StoreConfig};

    let data_dir = std::env::temp_dir().join(format!("meshscope-scrape-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    eprintln!(
        "bench scrape: writing {} span files of {} spans into {}",
        args.files,
        args.spans_per_file,
        data_dir.display()
    );
    {
        let mut config = StoreConfig::new(&data_dir);
        config.writer = "collector-1".into();
        let storage = Storage::open(config, &[]).map_err(|e| e.to_string())?;
        let spans = storage.table(Table::Spans);
        let mut rng = Rng(0x5EED);
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let started = Instant::now();
        for i in 0..args.files {
            // The files cover the last ten minutes, the newest last.
            let at = now_ns - 600_000_000_000 + 600_000_000_000 / args.files as u64 * i as u64;
            let req = mesh_request(&mut rng, args.spans_per_file, at);
            let batch = meshscope_proto::convert::spans(&req)
                .map_err(|e| e.to_string())?
                .batch;
            spans.write(batch).await.map_err(|e| e.to_string())?;
            spans.flush().await.map_err(|e| e.to_string())?;
            if (i + 1) % 100 == 0 {
                eprintln!(
                    "  {:>5} files in {:.1} s",
                    i + 1,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        storage.close();
    }
    let listed = std::fs::read_dir(data_dir.join("spans"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
                .count()
        })
        .unwrap_or(0);
    let this = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut binaries = vec![("this build", this)];
    if let Some(other) = &args.against {
        binaries.push(("--against", other.clone()));
    }
    let rounds = if args.against.is_some() {
        args.rounds.max(1)
    } else {
        1
    };
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); binaries.len()];
    for round in 0..rounds {
        for (i, (label, exe)) in binaries.iter().enumerate() {
            let (first, times) = scrape_query_node(exe, &data_dir, args.runs).await?;
            eprintln!(
                "  round {}: {label}: first {first:.1} ms, median {:.1} ms",
                round + 1,
                median_of(&times)
            );
            results[i].0.push(first);
            results[i].1.extend(times);
        }
    }
    let _ = std::fs::remove_dir_all(&data_dir);
    println!("span files                    {listed}");
    for ((label, exe), (firsts, mut times)) in binaries.iter().zip(results) {
        times.sort_by(f64::total_cmp);
        let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
        println!("{label} ({})", exe.display());
        println!(
            "  first scrape                {:.1} ms (median of {} nodes)",
            median_of(&firsts),
            firsts.len()
        );
        println!(
            "  scrape                      p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms over {} scrapes",
            pct(0.5),
            pct(0.9),
            pct(1.0),
            times.len()
        );
    }
    Ok(())
}

/// Starts `exe query` over `data_dir`, times its first `/metrics` answer and `runs` more
/// (in ms), and stops it.
async fn scrape_query_node(
    exe: &Path,
    data_dir: &Path,
    runs: usize,
) -> Result<(f64, Vec<f64>), String> {
    let mut server = start_exe(exe, data_dir, "query", &[])?;
    let client = reqwest::Client::new();
    let url = format!("{}/metrics", server.http);
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let t = Instant::now();
        match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => {
                r.text().await.map_err(|e| e.to_string())?;
                break t.elapsed().as_secs_f64() * 1e3;
            }
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => return Err(format!("the query node did not answer /metrics: {other:?}")),
        }
    };
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let r = client.get(&url).send().await.map_err(|e| e.to_string())?;
        r.text().await.map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = server.child.kill();
    let _ = server.child.wait();
    Ok((first, times))
}

fn median_of(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `meshscope bench graph`: the service graph, golden signals and trace lookups over spans
/// stored by meshscope (`bench ingest --data-dir D` first), against DuckDB over the same
/// Parquet files.
pub async fn graph(args: crate::config::BenchGraphArgs) -> Result<(), String> {
    use meshscope_query::analysis::graph::ServiceGraph;
    use meshscope_query::analysis::range::TimeRange;
    use meshscope_query::analysis::rollup::Rollups;
    use meshscope_query::analysis::traces;
    use meshscope_storage::{Storage, StoreConfig};

    let storage = Storage::open(StoreConfig::new(&args.data_dir), &meshscope_query::DERIVED)
        .map_err(|e| e.to_string())?;
    let (executor, engine) = query_engine(&storage)?;
    let scalar = |v: &arrow::array::ArrayRef| {
        arrow::util::display::array_value_to_string(v, 0).unwrap_or_default()
    };
    let r = engine
        .sql("SELECT count(*), CAST(min(start_time) AS VARCHAR), CAST(max(start_time) AS VARCHAR) FROM spans")
        .await
        .map_err(|e| e.to_string())?;
    let b = r.batches.first().ok_or("no spans stored")?;
    let (count, min, max) = (
        scalar(b.column(0)),
        scalar(b.column(1)),
        scalar(b.column(2)),
    );
    let parse = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .or_else(|_| chrono::DateTime::parse_from_rfc3339(&format!("{s}Z")))
            .map(|d| d.with_timezone(&chrono::Utc))
            .map_err(|e| format!("{s}: {e}"))
    };
    let range = TimeRange {
        start: parse(&min)?,
        end: parse(&max)? + chrono::Duration::seconds(1),
    };
    eprintln!(
        "bench graph: {count} spans from {min} to {max} in {}",
        args.data_dir.display()
    );
    let (raw, edges) = timed_runs(args.runs, "graph from raw spans", || async {
        let g = ServiceGraph::compute(&engine, &range).await?;
        Ok(g.edges().count())
    })
    .await?;
    let t = Instant::now();
    let minutes = Rollups::new(engine.clone(), storage.clone(), chrono::Duration::zero())
        .run_once(range.end + chrono::Duration::hours(1))
        .await
        .map_err(|e| e.to_string())?;
    let rollup_build = t.elapsed();
    eprintln!(
        "  rolled up {minutes} minute(s) in {:.1} s",
        rollup_build.as_secs_f64()
    );
    let (rolled, _) = timed_runs(args.runs, "graph from rollups", || async {
        ServiceGraph::compute_from_rollups(&engine, &range).await
    })
    .await?;
    // The topology diff as `/api/v1/graph/diff` answers it from rollups: the range's second
    // half against its first (a day against the day before over `--spread-hours 48`).
    let half = (range.end - range.start) / 2;
    let (base, now) = (
        TimeRange {
            start: range.start,
            end: range.start + half,
        },
        TimeRange {
            start: range.start + half,
            end: range.end,
        },
    );
    let (diffs, changes) = timed_runs(args.runs, "diff of two windows from rollups", || async {
        let g = ServiceGraph::compute_from_rollups(&engine, &now).await?;
        let b = ServiceGraph::compute_from_rollups(&engine, &base).await?;
        Ok(
            meshscope_query::analysis::diff::diff(&g, &b, Default::default())
                .edges
                .len(),
        )
    })
    .await?;

    // Trace by id: ids spread over the files.
    let ids = sample_trace_ids(&engine, args.lookups).await?;
    let mut lookups = Vec::new();
    for id in &ids {
        let t = Instant::now();
        let found = traces::get(&engine, id).await.map_err(|e| e.to_string())?;
        lookups.push(t.elapsed().as_secs_f64() * 1e3);
        if found.is_none() {
            return Err(format!("trace {id} not found"));
        }
    }
    lookups.sort_by(f64::total_cmp);
    let pct = |p: f64| lookups[((lookups.len() - 1) as f64 * p).round() as usize];

    // DuckDB over the same files, the same aggregates.
    let glob = format!("{}/spans/*.parquet", storage.data_dir().display());
    let script = DUCKDB_GRAPH
        .replace("{glob}", &glob)
        .replace("{runs}", &args.runs.to_string());
    let duck = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let duck_ms: Option<f64> = if duck.status.success() {
        String::from_utf8_lossy(&duck.stdout)
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
    } else {
        eprintln!(
            "  DuckDB comparison skipped: {}",
            String::from_utf8_lossy(&duck.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        None
    };

    let raw_ms = median_of(&raw);
    let rolled_ms = median_of(&rolled);
    println!("spans                         {count}");
    println!("edges                         {edges}");
    println!(
        "graph from raw spans          {raw_ms:.1} ms (median of {})",
        args.runs
    );
    println!(
        "graph from rollups            {rolled_ms:.1} ms (median of {})",
        args.runs
    );
    println!(
        "rollup build                  {:.1} s for {minutes} minute(s)",
        rollup_build.as_secs_f64()
    );
    println!(
        "diff from rollups             {:.1} ms (median of {}; {:.1} h against the {:.1} h before, {changes} edges)",
        median_of(&diffs),
        args.runs,
        half.num_minutes() as f64 / 60.0,
        half.num_minutes() as f64 / 60.0,
    );
    println!(
        "trace by id (no time range)   p50 {:.1} ms, p99 {:.1} ms over {} lookups",
        pct(0.5),
        pct(0.99),
        lookups.len()
    );
    if let Some(d) = duck_ms {
        println!(
            "DuckDB, same graph, same files {d:.1} ms (median of {})",
            args.runs
        );
        println!("meshscope raw / DuckDB        {:.2}x the time", raw_ms / d);
    }
    storage.close();
    executor.shutdown();
    Ok(())
}

/// The service graph's edge aggregates in DuckDB SQL, timed in-process; prints the median ms.
const DUCKDB_GRAPH: &str = r#"
import duckdb, time, statistics
con = duckdb.connect()
sql = """
WITH s AS (SELECT trace_id, span_id, parent_span_id, service_name, span_kind, status_code, duration_ns, start_time,
                  peer_name AS peer
           FROM read_parquet('{glob}')),
callers AS (SELECT * FROM s WHERE span_kind IN ('CLIENT', 'PRODUCER')),
callees AS (SELECT * FROM s WHERE span_kind IN ('SERVER', 'CONSUMER')),
paired AS (SELECT c.service_name AS source, p.service_name AS target, c.duration_ns AS latency_ns,
                  (c.status_code = 'ERROR' OR p.status_code = 'ERROR') AS error, c.span_id AS caller_id, c.trace_id AS caller_trace
           FROM callers c JOIN callees p ON p.trace_id = c.trace_id AND p.parent_span_id = c.span_id
            AND ((c.span_kind = 'CLIENT' AND p.span_kind = 'SERVER') OR (c.span_kind = 'PRODUCER' AND p.span_kind = 'CONSUMER'))),
unpaired AS (SELECT c.service_name AS source, c.peer AS target, c.duration_ns AS latency_ns, c.status_code = 'ERROR' AS error
             FROM callers c ANTI JOIN paired p ON p.caller_trace = c.trace_id AND p.caller_id = c.span_id WHERE c.peer IS NOT NULL),
entries AS (SELECT 'user' AS source, e.service_name AS target, e.duration_ns AS latency_ns, e.status_code = 'ERROR' AS error
            FROM (SELECT * FROM s WHERE span_kind = 'SERVER') e ANTI JOIN s parent ON parent.trace_id = e.trace_id AND parent.span_id = e.parent_span_id),
r AS (SELECT source, target, latency_ns, error FROM paired UNION ALL SELECT source, target, latency_ns, error FROM unpaired
      UNION ALL SELECT source, target, latency_ns, error FROM entries)
SELECT source, target, count(*), sum(CASE WHEN error THEN 1 ELSE 0 END),
       quantile_cont(latency_ns, 0.5), quantile_cont(latency_ns, 0.95), quantile_cont(latency_ns, 0.99)
FROM r GROUP BY source, target
"""
times = []
for _ in range({runs}):
    t = time.perf_counter()
    con.execute(sql).fetchall()
    times.append((time.perf_counter() - t) * 1000)
print(statistics.median(times))
"#;

/// One measurement of `bench storage`.
struct StorageSample {
    files: usize,
    bytes: u64,
    spans: u64,
    lookup_p50: f64,
    lookup_p99: f64,
    service_query_ms: f64,
    graph_ms: f64,
}

/// A query engine over `storage` with the server's defaults, on an executor of every core.
fn query_engine(
    storage: &meshscope_storage::Storage,
) -> Result<(meshscope_query::Executor, meshscope_query::QueryEngine), String> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let executor = meshscope_query::Executor::new(cores).map_err(|e| e.to_string())?;
    let engine = meshscope_query::QueryEngine::new(
        storage,
        executor.clone(),
        meshscope_query::engine::EngineConfig::default(),
    )
    .map_err(|e| e.to_string())?;
    Ok((executor, engine))
}

/// Runs `f` `runs` times (at least once), telling each run's time under `label`: the times in
/// ms and the last run's answer.
async fn timed_runs<T, F, Fut>(runs: usize, label: &str, mut f: F) -> Result<(Vec<f64>, T), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, meshscope_query::QueryError>>,
{
    let mut times = Vec::new();
    loop {
        let t = Instant::now();
        let answer = f().await.map_err(|e| e.to_string())?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        eprintln!("  {label}: {ms:.1} ms");
        times.push(ms);
        if times.len() >= runs {
            return Ok((times, answer));
        }
    }
}

/// `n` trace ids of root SERVER spans, spread over the files (every k-th of the first 50·n).
async fn sample_trace_ids(
    engine: &meshscope_query::QueryEngine,
    n: usize,
) -> Result<Vec<String>, String> {
    let r = engine
        .sql(&format!(
            "SELECT trace_id FROM spans WHERE span_kind = 'SERVER' AND parent_span_id IS NULL LIMIT {}",
            n * 50
        ))
        .await
        .map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    for b in &r.batches {
        for i in 0..b.num_rows() {
            all.push(
                arrow::util::display::array_value_to_string(b.column(0), i).unwrap_or_default(),
            );
        }
    }
    let step = (all.len() / n.max(1)).max(1);
    Ok(all.into_iter().step_by(step).take(n).collect())
}

async fn measure_storage(
    engine: &meshscope_query::QueryEngine,
    storage: &meshscope_storage::Storage,
    ids: &[String],
    runs: usize,
) -> Result<StorageSample, String> {
    use meshscope_proto::Table;
    use meshscope_query::analysis::graph::ServiceGraph;
    use meshscope_query::analysis::range::TimeRange;
    use meshscope_query::analysis::traces;

    let snap = storage.table(Table::Spans).snapshot();
    let bytes: u64 = snap.files.iter().map(|f| f.size).sum();
    let count = |sql: &'static str| async move {
        let r = engine.sql(sql).await.map_err(|e| e.to_string())?;
        let b = r.batches.first().ok_or("empty answer")?;
        arrow::util::display::array_value_to_string(b.column(0), 0).map_err(|e| e.to_string())
    };
    let spans: u64 = count("SELECT count(*) FROM spans")
        .await?
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut lookups = Vec::new();
    for id in ids {
        let t = Instant::now();
        let found = traces::get(engine, id).await.map_err(|e| e.to_string())?;
        lookups.push(t.elapsed().as_secs_f64() * 1e3);
        if found.is_none() {
            return Err(format!("trace {id} not found"));
        }
    }
    lookups.sort_by(f64::total_cmp);
    let pct = |p: f64| lookups[((lookups.len() - 1) as f64 * p).round() as usize];
    let mut service = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        count("SELECT count(*) FROM spans WHERE service_name = 'checkout' AND span_kind = 'SERVER' AND status_code = 'ERROR'").await?;
        service.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let range = TimeRange {
        start: chrono::DateTime::from_timestamp_nanos(0),
        end: chrono::DateTime::from_timestamp_nanos(i64::MAX / 2),
    };
    let mut graph = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        ServiceGraph::compute(engine, &range)
            .await
            .map_err(|e| e.to_string())?;
        graph.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(StorageSample {
        files: snap.files.len(),
        bytes,
        spans,
        lookup_p50: pct(0.5),
        lookup_p99: pct(0.99),
        service_query_ms: median_of(&service),
        graph_ms: median_of(&graph),
    })
}

/// `meshscope bench storage`: compaction and retention over a stored data directory.
pub async fn storage(args: crate::config::BenchStorageArgs) -> Result<(), String> {
    use meshscope_proto::Table;
    use meshscope_storage::{CompactionPolicy, Retention, Storage, StoreConfig};

    let mut config = StoreConfig::new(&args.data_dir);
    config.retire_grace = Duration::ZERO;
    let storage = Storage::open(config, &meshscope_query::DERIVED).map_err(|e| e.to_string())?;
    let (executor, engine) = query_engine(&storage)?;
    let ids = sample_trace_ids(&engine, args.lookups).await?;

    eprintln!("bench storage: measuring before compaction…");
    let before = measure_storage(&engine, &storage, &ids, args.runs).await?;
    eprintln!("  {} files, {} spans", before.files, before.spans);

    let spans = std::sync::Arc::clone(storage.table(Table::Spans));
    let policy = CompactionPolicy {
        target_bytes: args.target_bytes,
        min_files: 2,
        zstd_level: args.zstd_level,
    };
    let started = Instant::now();
    let (compacted, compacted_rows) = tokio::task::spawn_blocking(move || {
        let (mut n, mut rows) = (0usize, 0u64);
        loop {
            match spans.compact_once(policy) {
                Ok(Some(c)) => {
                    n += 1;
                    rows += c.rows;
                    eprintln!(
                        "  compaction {n}: {} files, {} rows, {:.1} MiB -> {:.1} MiB ({:.0} s so far)",
                        c.inputs,
                        c.rows,
                        c.bytes_in as f64 / 1048576.0,
                        c.bytes_out as f64 / 1048576.0,
                        started.elapsed().as_secs_f64()
                    );
                }
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        spans.delete_retired(true);
        Ok((n, rows))
    })
    .await
    .map_err(|e| e.to_string())??;
    let compaction_secs = started.elapsed().as_secs_f64();

    eprintln!("bench storage: measuring after compaction…");
    let after = measure_storage(&engine, &storage, &ids, args.runs).await?;

    // Retention by size: keep `keep_share` of the compacted table.
    let bound = (after.bytes as f64 * args.keep_share) as u64;
    let spans = std::sync::Arc::clone(storage.table(Table::Spans));
    let expired = tokio::task::spawn_blocking(move || {
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let e = spans.expire(
            Retention {
                max_age: None,
                max_bytes: Some(bound),
            },
            now,
            &mut Default::default(),
        );
        spans.delete_retired(true);
        e
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let on_disk = dir_bytes(&storage.data_dir().join("spans"), "parquet");

    let per_span = |s: &StorageSample| s.bytes as f64 / s.spans.max(1) as f64;
    println!("spans                          {}", before.spans);
    println!("                               before        after compaction");
    println!(
        "files                          {:<13} {}",
        before.files, after.files
    );
    println!(
        "bytes per span                 {:<13.1} {:.1}",
        per_span(&before),
        per_span(&after)
    );
    println!(
        "trace by id p50 / p99 (ms)     {:<13} {:.1} / {:.1}",
        format!("{:.1} / {:.1}", before.lookup_p50, before.lookup_p99),
        after.lookup_p50,
        after.lookup_p99
    );
    println!(
        "one service's errors (ms)      {:<13.1} {:.1}",
        before.service_query_ms, after.service_query_ms
    );
    println!(
        "graph from raw spans (ms)      {:<13.1} {:.1}",
        before.graph_ms, after.graph_ms
    );
    println!(
        "compaction                     {compacted} compactions of {compacted_rows} spans in {compaction_secs:.1} s ({:.0} spans/s)",
        compacted_rows as f64 / compaction_secs.max(1e-9)
    );
    println!(
        "retention to {:.1} MiB          removed {} files, {} rows; {:.1} MiB on disk ({})",
        bound as f64 / 1048576.0,
        expired.files,
        expired.rows,
        on_disk as f64 / 1048576.0,
        if on_disk <= bound {
            "within the bound"
        } else {
            "OVER the bound"
        }
    );
    storage.close();
    executor.shutdown();
    Ok(())
}
