//! Latency the proxy adds, and its throughput, against the direct path and nginx.
//!
//! `cargo run --release -p meshscope-proxy --example proxy_bench -- [--rate 1000] [--secs 10] [--runs 3]`
//!
//! Every part is its own process on loopback: a small hyper backend, an OTLP sink that
//! accepts and discards what the proxy exports, the proxy (this binary in `proxy` mode,
//! with spans, metrics and access logs on), and nginx (Debian package) as a reverse proxy
//! with upstream keep-alive. This process is the load generator:
//! - fixed rate, open loop: request `i` is sent at `start + i/rate` whatever the earlier
//!   ones are doing (no coordinated omission); its latency counts from when it was sent
//!   (tokio's timer wakes up to 1 ms late, the same for every path); p50 and p99 per path,
//!   and the difference to the direct path is the added latency;
//! - maximum throughput: `wrk` (Debian package) with 64 connections for `--secs`.
//!
//! Each figure is the median of `--runs` runs.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// As in the `meshscope` binary, so `proxy` mode measures what `meshscope proxy` runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("backend") => runtime(1)?.block_on(backend(args[2].parse()?)),
        Some("sink") => runtime(1)?.block_on(sink(args[2].parse()?)),
        Some("proxy") => runtime(arg("--threads", 0.0) as usize)?.block_on(async {
            meshscope_proxy::run(PathBuf::from(&args[2]), async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(Into::into)
        }),
        _ => orchestrate(),
    }
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        b.worker_threads(threads);
    }
    b.enable_all().build()
}

/// `200 ok` to everything, HTTP/1.1 keep-alive.
async fn backend(port: u16) -> BoxResult<()> {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(b"ok\n"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

mod otlp_sink {
    use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsService;
    use opentelemetry_proto::tonic::collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService;
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService;
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use tonic::{Request, Response, Status};

    pub struct Sink;

    #[async_trait::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            _: Request<ExportTraceServiceRequest>,
        ) -> Result<Response<ExportTraceServiceResponse>, Status> {
            Ok(Response::new(ExportTraceServiceResponse::default()))
        }
    }
    #[async_trait::async_trait]
    impl MetricsService for Sink {
        async fn export(
            &self,
            _: Request<ExportMetricsServiceRequest>,
        ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
            Ok(Response::new(ExportMetricsServiceResponse::default()))
        }
    }
    #[async_trait::async_trait]
    impl LogsService for Sink {
        async fn export(
            &self,
            _: Request<ExportLogsServiceRequest>,
        ) -> Result<Response<ExportLogsServiceResponse>, Status> {
            Ok(Response::new(ExportLogsServiceResponse::default()))
        }
    }
}

/// Accepts OTLP/gRPC and discards it.
async fn sink(port: u16) -> BoxResult<()> {
    use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsServiceServer;
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(otlp_sink::Sink))
        .add_service(MetricsServiceServer::new(otlp_sink::Sink))
        .add_service(LogsServiceServer::new(otlp_sink::Sink))
        .serve(SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    Ok(())
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
        }
        std::thread::sleep(Duration::from_millis(300));
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_port(port: u16) -> BoxResult<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listens on {port}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn nginx_config(dir: &Path, port: u16, backend: u16) -> String {
    format!(
        "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://backend;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        d = dir.display()
    )
}

fn proxy_config(port: u16, backend: u16, sink: Option<u16>) -> String {
    let export = sink
        .map(|s| format!("otlp-endpoint = \"http://127.0.0.1:{s}\"\n"))
        .unwrap_or_default();
    format!(
        "[service]\nname = \"bench-client\"\n[listen]\noutbound = \"127.0.0.1:{port}\"\n\
         [telemetry]\n{export}batch-interval-ms = 1000\n\
         [[destination]]\nname = \"backend\"\nendpoint = [{{ address = \"127.0.0.1:{backend}\" }}]\n\
         [destination.policy]\ntimeout-ms = 5000\n\
         retry = {{ max-retries = 2 }}\nbreaker = {{ consecutive-failures = 50 }}\n"
    )
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// Open-loop load at `rate` for `secs`: latencies in ms, errors.
async fn fixed_rate(target: SocketAddr, rate: f64, secs: f64) -> (Vec<f64>, usize) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector);
    let uri: hyper::Uri = match format!("http://{target}/").parse() {
        Ok(u) => u,
        Err(_) => return (vec![], 0),
    };
    // Warm the pool.
    for _ in 0..20 {
        let req = hyper::Request::get(uri.clone())
            .header("host", "backend")
            .body(Empty::new());
        if let Ok(req) = req
            && let Ok(r) = client.request(req).await
        {
            let _ = r.into_body().collect().await;
        }
    }
    let n = (rate * secs) as usize;
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        let client = client.clone();
        let uri = uri.clone();
        let sent = tokio::time::Instant::now();
        tasks.push(tokio::spawn(async move {
            let req = hyper::Request::get(uri)
                .header("host", "backend")
                .body(Empty::new())
                .ok()?;
            let r = client.request(req).await.ok()?;
            let ok = r.status().is_success();
            let _ = r.into_body().collect().await.ok()?;
            ok.then(|| sent.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut lat = Vec::with_capacity(n);
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Some(ms)) => lat.push(ms),
            _ => errors += 1,
        }
    }
    (lat, errors)
}

fn wrk(target: SocketAddr, secs: f64) -> Option<f64> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            "-c64",
            &format!("-d{}s", secs as u64),
            "-H",
            "Host: backend",
        ])
        .arg(format!("http://{target}/"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn orchestrate() -> BoxResult<()> {
    let rate = arg("--rate", 1000.0);
    let secs = arg("--secs", 10.0);
    let runs = arg("--runs", 3.0) as usize;
    let me = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let (backend_port, sink_port, proxy_port, nginx_port) =
        (free_port(), free_port(), free_port(), free_port());
    let quiet_port = free_port();
    let mut procs = Procs(vec![]);
    procs.0.push(
        Command::new(&me)
            .args(["backend", &backend_port.to_string()])
            .spawn()?,
    );
    procs.0.push(
        Command::new(&me)
            .args(["sink", &sink_port.to_string()])
            .spawn()?,
    );
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        proxy_config(proxy_port, backend_port, Some(sink_port)),
    )?;
    let quiet = dir.path().join("quiet.toml");
    std::fs::write(&quiet, proxy_config(quiet_port, backend_port, None))?;
    for c in [&config, &quiet] {
        procs.0.push(
            Command::new(&me)
                .args(["proxy", &c.display().to_string()])
                .args(["--threads", &arg("--proxy-threads", 0.0).to_string()])
                .env("MESHSCOPE_LOG", "warn")
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let nginx_conf = dir.path().join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        nginx_config(dir.path(), nginx_port, backend_port),
    )?;
    let nginx = Command::new("nginx")
        .args([
            "-c",
            &nginx_conf.display().to_string(),
            "-e",
            &dir.path().join("error.log").display().to_string(),
        ])
        .stderr(Stdio::null())
        .spawn();
    let have_nginx = match nginx {
        Ok(c) => {
            procs.0.push(c);
            true
        }
        Err(e) => {
            eprintln!("nginx not started ({e}); `apt-get install -y nginx` to compare");
            false
        }
    };
    for p in [backend_port, sink_port, proxy_port, quiet_port] {
        wait_port(p)?;
    }
    if have_nginx {
        wait_port(nginx_port)?;
    }
    let mut targets = vec![
        ("direct", SocketAddr::from(([127, 0, 0, 1], backend_port))),
        (
            "meshscope proxy",
            SocketAddr::from(([127, 0, 0, 1], proxy_port)),
        ),
        (
            "meshscope proxy, no export",
            SocketAddr::from(([127, 0, 0, 1], quiet_port)),
        ),
    ];
    if have_nginx {
        targets.push(("nginx", SocketAddr::from(([127, 0, 0, 1], nginx_port))));
    }
    let have_wrk = Command::new("wrk").arg("--version").output().is_ok();
    if !have_wrk {
        eprintln!("wrk not found; `apt-get install -y wrk` for the throughput figures");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> =
        vec![(vec![], vec![], vec![]); targets.len()];
    for run in 1..=runs {
        // The paths take turns, one second each, so a noisy neighbour hits them alike.
        eprint!("run {run}/{runs}: {rate} req/s, {secs} one-second turns per path ");
        let mut lat: Vec<Vec<f64>> = vec![vec![]; targets.len()];
        let mut errors = vec![0usize; targets.len()];
        for _ in 0..(secs as usize) {
            for (i, (_, addr)) in targets.iter().enumerate() {
                let (l, e) = rt.block_on(fixed_rate(*addr, rate, 1.0));
                lat[i].extend(l);
                errors[i] += e;
            }
            eprint!(".");
        }
        eprintln!();
        for (i, (name, addr)) in targets.iter().enumerate() {
            lat[i].sort_by(|a, b| a.total_cmp(b));
            let (p50, p99) = (percentile(&lat[i], 0.5), percentile(&lat[i], 0.99));
            eprint!(
                "  {name}: p50 {p50:.3} ms, p99 {p99:.3} ms, {} errors",
                errors[i]
            );
            results[i].0.push(p50);
            results[i].1.push(p99);
            if have_wrk {
                let rps = wrk(*addr, secs).unwrap_or(f64::NAN);
                eprintln!("; max {rps:.0} req/s");
                results[i].2.push(rps);
            } else {
                eprintln!();
            }
        }
    }
    let (d50, d99) = (median(results[0].0.clone()), median(results[0].1.clone()));
    println!(
        "\nmedians of {runs} runs; fixed rate {rate} req/s, {secs} s per path in 1 s turns; wrk -t1 -c64 -d{secs}s\n"
    );
    println!("| path | p50 ms | p99 ms | added p50 ms | added p99 ms | max req/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (i, (name, _)) in targets.iter().enumerate() {
        let (p50, p99) = (median(results[i].0.clone()), median(results[i].1.clone()));
        let rps = median(results[i].2.clone());
        let added = |x: f64, d: f64| {
            if i == 0 {
                "—".to_string()
            } else {
                format!("{:.3}", x - d)
            }
        };
        println!(
            "| {name} | {p50:.3} | {p99:.3} | {} | {} | {rps:.0} |",
            added(p50, d50),
            added(p99, d99)
        );
    }
    drop(procs);
    Ok(())
}
