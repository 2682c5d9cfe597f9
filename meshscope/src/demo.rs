//! `meshscope demo`: `serve` plus a small mesh with realistic, imperfect traffic, all in
//! this process on loopback, so the UI fills within seconds.
//!
//! ```text
//! traffic ─▶ frontend ─┬─▶ cart (v1 90% / v2 10%) ─┬─▶ postgres (db, no proxy)
//!                      │                            └─▶ inventory (flaky)
//!                      ├─▶ inventory ─▶ postgres
//!                      └─▶ checkout ─┬─▶ cart, inventory, postgres
//!                                    └─▶ payments ─▶ payments-gateway (external, no proxy;
//!                                                    latency injected by the proxy)
//! ```
//!
//! Each service is a small axum app behind its own bundled proxy (inbound in front of it,
//! outbound for its calls, found by `Host`), and forwards `traceparent` like an
//! instrumented app would. Inventory fails 20% of its requests and has a short outage
//! every minute: retries hide most failures, the breaker opens during the outage.

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use meshscope_proxy::Proxy;
use meshscope_proxy::config::{
    AuthorizationRule, AuthzMode, BreakerConfig, Destination, Endpoint, FaultConfig,
    IdentityConfig, Listen, MtlsMode, Policy, ProxyConfig, RateLimitConfig, RetryConfig,
    ServiceIdentity, TelemetryConfig,
};
use meshscope_proxy::routes::{BackendConfig, MatchConfig, MirrorConfig, RouteConfig, ValueMatch};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{DemoArgs, ServeConfig};

/// One downstream call an endpoint makes.
#[derive(Clone, Copy)]
struct Call {
    method: &'static str,
    host: &'static str,
    path: &'static str,
    /// Probability of making it.
    p: f64,
}

const fn call(method: &'static str, host: &'static str, path: &'static str, p: f64) -> Call {
    Call {
        method,
        host,
        path,
        p,
    }
}

/// A demo service: its routes (path → calls), its own work time and its failures.
struct Spec {
    name: &'static str,
    version: &'static str,
    routes: &'static [(&'static str, &'static [Call])],
    work_ms: (u64, u64),
    fail_percent: f64,
    /// An outage (all requests fail) of this many seconds every minute.
    outage_secs: u64,
}

const FRONTEND: &[(&str, &[Call])] = &[
    ("/checkout", &[call("POST", "checkout", "/checkout", 1.0)]),
    ("/cart", &[call("GET", "cart", "/cart", 1.0)]),
    (
        "/",
        &[
            call("GET", "cart", "/cart", 1.0),
            call("GET", "inventory", "/stock", 0.5),
            // Not allowed: payments admits checkout only, so its proxy answers 403.
            call("GET", "payments", "/balance", 0.05),
        ],
    ),
];
const CART: &[(&str, &[Call])] = &[(
    "/",
    &[
        call("GET", "postgres", "/query?table=carts", 1.0),
        call("GET", "inventory", "/stock", 0.3),
    ],
)];
const CHECKOUT: &[(&str, &[Call])] = &[(
    "/",
    &[
        call("GET", "cart", "/cart", 1.0),
        call("PUT", "inventory", "/reserve", 1.0),
        call("POST", "payments", "/pay", 1.0),
        call("POST", "postgres", "/query?table=orders", 1.0),
    ],
)];
const PAYMENTS: &[(&str, &[Call])] =
    &[("/", &[call("POST", "payments-gateway", "/v1/charges", 1.0)])];
const INVENTORY: &[(&str, &[Call])] =
    &[("/", &[call("GET", "postgres", "/query?table=stock", 1.0)])];
const LEAF: &[(&str, &[Call])] = &[];

fn specs() -> Vec<Spec> {
    let s = |name, version, routes, work_ms, fail_percent, outage_secs| Spec {
        name,
        version,
        routes,
        work_ms,
        fail_percent,
        outage_secs,
    };
    vec![
        s("frontend", "v1", FRONTEND, (1, 4), 0.0, 0),
        s("cart", "v1", CART, (2, 6), 0.0, 0),
        s("cart", "v2", CART, (4, 12), 2.0, 0),
        s("checkout", "v1", CHECKOUT, (3, 8), 0.0, 0),
        // The next checkout, taking a 10% mirror of the live one: a dry run that answers
        // without calling anything (a shadow must not charge anyone twice).
        s("checkout", "v2-shadow", LEAF, (6, 20), 0.0, 0),
        s("payments", "v1", PAYMENTS, (2, 5), 0.0, 0),
        s("inventory", "v1", INVENTORY, (1, 3), 20.0, 6),
        // Not behind a proxy: seen only as the callers' CLIENT spans (virtual nodes).
        s("postgres", "15", LEAF, (1, 4), 0.0, 0),
        s("payments-gateway", "external", LEAF, (20, 60), 1.0, 0),
    ]
}

fn proxied(name: &str) -> bool {
    !matches!(name, "postgres" | "payments-gateway")
}

struct AppState {
    spec: Spec,
    /// The service's own proxy's outbound address (absent for unproxied peers).
    outbound: Option<SocketAddr>,
    client: reqwest::Client,
    started: Instant,
}

async fn handle(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let spec = &app.spec;
    let (lo, hi) = spec.work_ms;
    tokio::time::sleep(Duration::from_millis(rand::random_range(lo..=hi))).await;
    let in_outage =
        spec.outage_secs > 0 && app.started.elapsed().as_secs() % 60 >= 60 - spec.outage_secs;
    if in_outage || rand::random_range(0.0..100.0) < spec.fail_percent {
        return (StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable\n").into_response();
    }
    let path = req.uri().path().to_string();
    let calls = spec
        .routes
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix))
        .map(|(_, c)| *c)
        .unwrap_or(&[]);
    let headers = req.headers().clone();
    for c in calls {
        if rand::random_range(0.0..1.0) >= c.p {
            continue;
        }
        let Some(outbound) = app.outbound else { break };
        let status = downstream(&app.client, outbound, c, &headers).await;
        if status >= 500 {
            return (
                StatusCode::BAD_GATEWAY,
                format!("{} answered {status}\n", c.host),
            )
                .into_response();
        }
    }
    axum::Json(serde_json::json!({ "service": spec.name, "version": spec.version })).into_response()
}

/// A call through the local proxy, carrying the trace context like an instrumented app.
async fn downstream(
    client: &reqwest::Client,
    outbound: SocketAddr,
    c: &Call,
    incoming: &HeaderMap,
) -> u16 {
    let method = reqwest::Method::from_bytes(c.method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut r = client
        .request(method, format!("http://{outbound}{}", c.path))
        .header(reqwest::header::HOST, c.host);
    for h in ["traceparent", "tracestate", BETA_HEADER] {
        if let Some(v) = incoming.get(h) {
            r = r.header(h, v.as_bytes());
        }
    }
    if c.method == "POST" || c.method == "PUT" {
        r = r.body(r#"{"items":[{"sku":"A-1","qty":1}]}"#);
    }
    match r.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let _ = resp.bytes().await;
            status
        }
        Err(_) => 599,
    }
}

/// `addr` itself when it is free, else port 0: the server then binds a port the kernel
/// chooses and reports it (`serve::Bound`).
fn usable(addr: SocketAddr) -> SocketAddr {
    if addr.port() != 0 && StdListener::bind(addr).is_ok() {
        return addr;
    }
    SocketAddr::new(addr.ip(), 0)
}

fn destination(name: &str, endpoints: Vec<Endpoint>, policy: Policy) -> Destination {
    Destination {
        name: name.into(),
        aliases: vec![],
        db_system: (name == "postgres").then(|| "postgresql".into()),
        h2c: false,
        // The database and the external gateway have no sidecar: plaintext, and shown so.
        mtls: Some(proxied(name)),
        namespace: None,
        endpoints,
        policy,
        routes: vec![],
    }
}

fn endpoint(address: SocketAddr, version: &str, workload: Option<String>, weight: u32) -> Endpoint {
    Endpoint {
        address,
        version: version.into(),
        workload,
        weight,
        identity: None,
    }
}

/// The registry every proxy gets, from the addresses each service listens on (the
/// proxies' inbound addresses, or the app itself when it has no proxy).
fn registry(addrs: &HashMap<(String, String), SocketAddr>) -> Vec<Destination> {
    let at = |n: &str, v: &str| addrs.get(&(n.to_string(), v.to_string())).copied();
    let mut d = vec![];
    if let (Some(v1), Some(v2)) = (at("cart", "v1"), at("cart", "v2")) {
        let mut cart = destination(
            "cart",
            vec![
                endpoint(v1, "v1", None, 90),
                endpoint(v2, "v2", Some("cart-v2".into()), 10),
            ],
            Policy {
                timeout_ms: Some(2000),
                retry: Some(retry(2)),
                ..Default::default()
            },
        );
        // A/B by header: the beta users always get the new cart.
        cart.routes = vec![RouteConfig {
            name: Some("beta".into()),
            matches: vec![MatchConfig {
                headers: vec![ValueMatch {
                    name: BETA_HEADER.into(),
                    value: Some("beta".into()),
                    regex: None,
                }],
                ..MatchConfig::default()
            }],
            backends: vec![BackendConfig {
                version: "v2".into(),
                weight: 1,
            }],
            timeout_ms: None,
            retry: None,
            mirror: None,
        }];
        d.push(cart);
    }
    if let Some(a) = at("inventory", "v1") {
        d.push(destination(
            "inventory",
            vec![endpoint(a, "v1", None, 1)],
            Policy {
                timeout_ms: Some(1000),
                retry: Some(retry(2)),
                breaker: Some(BreakerConfig {
                    consecutive_failures: 5,
                    open_ms: 2000,
                }),
                ..Default::default()
            },
        ));
    }
    if let Some(a) = at("checkout", "v1") {
        let mut endpoints = vec![endpoint(a, "v1", None, 1)];
        let shadow = at("checkout", "v2-shadow");
        if let Some(s) = shadow {
            endpoints.push(endpoint(
                s,
                "v2-shadow",
                Some("checkout-v2-shadow".into()),
                0,
            ));
        }
        let mut checkout = destination(
            "checkout",
            endpoints,
            Policy {
                timeout_ms: Some(5000),
                rate_limit: Some(RateLimitConfig {
                    requests_per_sec: 200.0,
                    burst: Some(400.0),
                }),
                ..Default::default()
            },
        );
        if shadow.is_some() {
            // Every checkout may be mirrored: 10% of them go to the shadow too.
            checkout.routes = vec![RouteConfig {
                name: Some("mirror-v2".into()),
                matches: vec![],
                backends: vec![BackendConfig {
                    version: "v1".into(),
                    weight: 1,
                }],
                timeout_ms: None,
                retry: None,
                mirror: Some(MirrorConfig {
                    version: "v2-shadow".into(),
                    percent: 10.0,
                    max_body_bytes: 64 * 1024,
                }),
            }];
        }
        d.push(checkout);
    }
    if let Some(a) = at("payments", "v1") {
        d.push(destination(
            "payments",
            vec![endpoint(a, "v1", None, 1)],
            Policy {
                timeout_ms: Some(3000),
                ..Default::default()
            },
        ));
    }
    if let Some(a) = at("payments-gateway", "external") {
        d.push(destination(
            "payments-gateway",
            vec![endpoint(a, "external", None, 1)],
            Policy {
                timeout_ms: Some(2000),
                // Injected latency: a slow third party.
                fault: Some(FaultConfig {
                    abort_percent: 0.0,
                    abort_status: 503,
                    delay_percent: 25.0,
                    delay_ms: 150,
                }),
                ..Default::default()
            },
        ));
    }
    if let Some(a) = at("postgres", "15") {
        d.push(destination(
            "postgres",
            vec![endpoint(a, "15", None, 1)],
            Policy::default(),
        ));
    }
    d
}

fn retry(max_retries: u32) -> RetryConfig {
    RetryConfig {
        max_retries,
        backoff_base_ms: 10,
        backoff_max_ms: 100,
        retry_on: vec![502, 503, 504],
        all_methods: false,
        max_body_bytes: 64 * 1024,
        budget_ratio: 0.25,
        budget_min_per_sec: 10.0,
    }
}

/// Where the demo's proxies get their certificates: the in-process server's mesh CA.
#[derive(Clone)]
struct DemoIdentity {
    ca_url: String,
    token_file: PathBuf,
    trust_domain: String,
}

/// The workloads of the demo's proxies (the names their certificates carry).
fn workload_of(spec: &Spec) -> String {
    if spec.version == "v1" {
        spec.name.to_string()
    } else {
        format!("{}-{}", spec.name, spec.version)
    }
}

/// Strict mTLS everywhere but the frontend, which is the mesh's edge (like an ingress
/// gateway) and takes the traffic generator's plaintext too; payments admits checkout only.
fn identity_for(
    spec: &Spec,
    id: Option<&DemoIdentity>,
) -> (IdentityConfig, Vec<AuthorizationRule>) {
    let Some(id) = id else {
        return (IdentityConfig::default(), vec![]);
    };
    let identity = IdentityConfig {
        mode: if spec.name == "frontend" {
            MtlsMode::Permissive
        } else {
            MtlsMode::Strict
        },
        ca_url: Some(id.ca_url.clone()),
        token_file: Some(id.token_file.clone()),
        ca_file: None,
        trust_domain: Some(id.trust_domain.clone()),
        namespace: Some("demo".into()),
    };
    let rules = if spec.name == "payments" {
        vec![AuthorizationRule {
            allow: vec!["ns/demo/sa/checkout".into()],
            mode: AuthzMode::Enforce,
        }]
    } else {
        vec![]
    };
    (identity, rules)
}

fn proxy_config(
    spec: &Spec,
    app: SocketAddr,
    otlp: &str,
    id: Option<&DemoIdentity>,
) -> ProxyConfig {
    let (identity, authorization) = identity_for(spec, id);
    ProxyConfig {
        service: ServiceIdentity {
            name: spec.name.into(),
            namespace: Some("demo".into()),
            version: Some(spec.version.into()),
            workload: (spec.version != "v1").then(|| workload_of(spec)),
        },
        listen: Listen {
            inbound: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            app: Some(app),
            outbound: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            admin: None,
            app_h2c: false,
        },
        telemetry: TelemetryConfig {
            otlp_endpoint: Some(otlp.to_string()),
            batch_interval_ms: 1000,
            ..TelemetryConfig::default()
        },
        identity,
        authorization,
        destinations: vec![],
    }
}

/// The header of the demo's A/B rule, carried along by every demo app.
const BETA_HEADER: &str = "x-user-group";

/// Sends the traffic mix to the frontend until `stop`: 60% browse, 25% cart, 15% checkout.
async fn traffic(frontend: SocketAddr, rps: f64, mut stop: watch::Receiver<bool>) {
    let client = reqwest::Client::new();
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rps.max(0.1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = tokio::time::interval(Duration::from_secs(10));
    report.tick().await;
    let (mut last_sent, mut last_failed) = (0, 0);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = report.tick() => {
                let (s, f) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
                println!("  traffic: {} requests in the last 10 s, {} failed (total {s})", s - last_sent, f - last_failed);
                (last_sent, last_failed) = (s, f);
                continue;
            }
            _ = stop.wait_for(|s| *s) => return,
        }
        let x: f64 = rand::random_range(0.0..1.0);
        let (method, path) = if x < 0.60 {
            (reqwest::Method::GET, "/")
        } else if x < 0.85 {
            (reqwest::Method::GET, "/cart")
        } else {
            (reqwest::Method::POST, "/checkout")
        };
        let mut req = client
            .request(method, format!("http://{frontend}{path}"))
            .header(reqwest::header::HOST, "frontend")
            .header(reqwest::header::USER_AGENT, "meshscope-demo-traffic");
        // 5% of the users are in the beta group (routed to cart v2 by header).
        if rand::random_range(0.0..1.0) < 0.05 {
            req = req.header(BETA_HEADER, "beta");
        }
        let (sent, failed) = (Arc::clone(&sent), Arc::clone(&failed));
        tokio::spawn(async move {
            sent.fetch_add(1, Ordering::Relaxed);
            match req.send().await {
                Ok(r) if !r.status().is_server_error() => {
                    let _ = r.bytes().await;
                }
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

async fn wait_ready(http: SocketAddr) -> Result<(), String> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("http://{http}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("meshscope serve did not become ready within 60 s".into())
}

/// A bootstrap token for every demo workload, in a private file under the data dir.
fn demo_identity(
    data_dir: &std::path::Path,
    trust_domain: &str,
    http: SocketAddr,
) -> Result<DemoIdentity, String> {
    let ca_dir = data_dir.join("ca");
    let workloads: Vec<String> = specs()
        .iter()
        .filter(|s| proxied(s.name))
        .map(workload_of)
        .collect();
    let token = meshscope_identity::tokens::BootstrapTokens::in_dir(&ca_dir)
        .mint("demo", &workloads)
        .map_err(|e| e.to_string())?;
    let token_file = ca_dir.join("demo-proxies.token");
    meshscope_identity::write_private(&token_file, token.as_bytes()).map_err(|e| e.to_string())?;
    Ok(DemoIdentity {
        ca_url: format!("http://{http}"),
        token_file,
        trust_domain: trust_domain.to_string(),
    })
}

/// Runs the demo until `stop` (Ctrl-C / SIGTERM).
pub async fn run(args: DemoArgs, stop: impl Future<Output = ()>) -> Result<(), String> {
    let (stop_serve, serve_rx) = watch::channel(false);
    let mut server = None;
    // Only with the in-process server: a remote collector has no mesh CA.
    let mut identity = None;
    let otlp = if let Some(collector) = &args.collector {
        println!("meshscope demo: sending the mesh's telemetry to {collector}");
        collector.clone()
    } else {
        let mut serve_args = args.serve.clone();
        if serve_args.data_dir.is_none() {
            serve_args.data_dir = Some(PathBuf::from("./meshscope-demo-data"));
        }
        let mut config: ServeConfig = serve_args.resolve().map_err(|e| e.to_string())?;
        let data_dir = config.data_dir.clone();
        let trust_domain = config.trust_domain.clone();
        config.otlp_grpc_addr = usable(config.otlp_grpc_addr);
        config.otlp_http_addr = usable(config.otlp_http_addr);
        config.http_addr = usable(config.http_addr);
        config.pg_addr = usable(config.pg_addr);
        println!(
            "meshscope demo: starting the server (data in {})",
            config.data_dir.display()
        );
        let mut serve_stop = serve_rx.clone();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let mut task = tokio::spawn(crate::serve::run_reporting(
            config,
            async move {
                let _ = serve_stop.wait_for(|s| *s).await;
            },
            Some(bound_tx),
        ));
        // The addresses the server bound (a port 0 is the one the kernel chose).
        let bound = tokio::select! {
            b = bound_rx => b.ok(),
            r = &mut task => return match r {
                Ok(Err(e)) => Err(e),
                _ => Err("meshscope serve stopped during start-up".into()),
            },
        };
        let Some(bound) = bound else {
            return Err("meshscope serve stopped during start-up".into());
        };
        let (http, pg) = (bound.http, bound.pg);
        let grpc = bound
            .otlp_grpc
            .ok_or("the server has no OTLP/gRPC receiver")?;
        tokio::select! {
            r = wait_ready(http) => r?,
            () = async { while !task.is_finished() { tokio::time::sleep(Duration::from_millis(50)).await } } => {
                return match task.await {
                    Ok(Err(e)) => Err(e),
                    _ => Err("meshscope serve stopped during start-up".into()),
                };
            }
        }
        server = Some((task, http, grpc, pg));
        identity = Some(demo_identity(&data_dir, &trust_domain, http)?);
        format!("http://{grpc}")
    };
    let specs = specs();
    println!(
        "meshscope demo: starting {} services, {} of them behind their own proxy",
        specs.len(),
        specs.iter().filter(|s| proxied(s.name)).count()
    );
    let (stop_apps, apps_rx) = watch::channel(false);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut proxies: Vec<Proxy> = vec![];
    // Each proxy's workload and authorization rules, for its policy document.
    // Each proxy's workload, authorization rules and inbound mTLS mode (with identity),
    // which its policy document carries.
    let mut workloads: Vec<(String, Vec<AuthorizationRule>, Option<MtlsMode>)> = vec![];
    let mut addrs: HashMap<(String, String), SocketAddr> = HashMap::new();
    let mut app_tasks = vec![];
    let mut frontend = None;
    let started = Instant::now();
    for spec in specs {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let app_addr = l.local_addr().map_err(|e| e.to_string())?;
        let (outbound, reachable_at) = if proxied(spec.name) {
            let config = proxy_config(&spec, app_addr, &otlp, identity.as_ref());
            workloads.push((
                workload_of(&spec),
                config.authorization.clone(),
                (config.identity.mode != MtlsMode::Off).then_some(config.identity.mode),
            ));
            let proxy = Proxy::start(config, None)
                .await
                .map_err(|e| format!("cannot start the proxy of {}: {e}", spec.name))?;
            let inbound = proxy.inbound.ok_or("proxy without inbound address")?;
            let outbound = proxy.outbound;
            proxies.push(proxy);
            (outbound, inbound)
        } else {
            (None, app_addr)
        };
        println!(
            "  {:<17} {:<9} app {app_addr}{}",
            spec.name,
            spec.version,
            if proxied(spec.name) {
                format!(", proxy inbound {reachable_at}")
            } else {
                " (no proxy)".into()
            }
        );
        addrs.insert(
            (spec.name.to_string(), spec.version.to_string()),
            reachable_at,
        );
        if spec.name == "frontend" {
            frontend = Some(reachable_at);
        }
        let state = Arc::new(AppState {
            spec,
            outbound,
            client: client.clone(),
            started,
        });
        let router = Router::new().fallback(handle).with_state(state);
        let mut rx = apps_rx.clone();
        app_tasks.push(tokio::spawn(async move {
            let _ = axum::serve(l, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
        }));
    }
    // Now that every address is known, give each proxy the registry: through the control
    // plane when the server runs here (each workload's policy document, followed by its
    // proxy), else directly.
    let destinations = registry(&addrs);
    match &server {
        Some((_, http, _, _)) => {
            for (p, (workload, authorization, mtls_mode)) in proxies.iter_mut().zip(&workloads) {
                let doc = meshscope_proxy::control::PolicyDocument {
                    mtls_mode: *mtls_mode,
                    destinations: destinations.clone(),
                    authorization: authorization.clone(),
                };
                let text = toml::to_string(&doc).map_err(|e| e.to_string())?;
                let r = client
                    .put(format!("http://{http}/api/v1/mesh/policy/{workload}"))
                    .body(text)
                    .send()
                    .await
                    .map_err(|e| format!("the control plane: {e}"))?;
                if !r.status().is_success() {
                    return Err(format!(
                        "the control plane refused {workload}'s policy: {}",
                        r.text().await.unwrap_or_default()
                    ));
                }
                p.follow(meshscope_proxy::control::ControlPlane {
                    url: format!("http://{http}"),
                    workload: workload.clone(),
                });
            }
        }
        None => {
            for p in &proxies {
                p.set_destinations(destinations.clone())
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    let frontend = frontend.ok_or("no frontend")?;
    let traffic_task = tokio::spawn(traffic(frontend, args.rps, apps_rx.clone()));

    println!();
    println!(
        "meshscope demo is running ({} requests/s into the frontend)",
        args.rps
    );
    if let Some((_, http, grpc, pg)) = &server {
        println!("  UI:        http://{http}/");
        println!("  API:       http://{http}/api/v1/graph   http://{http}/api/v1/services");
        println!("  OTLP:      gRPC {grpc}");
        println!(
            "  Postgres:  psql -h {} -p {} -U meshscope -d meshscope",
            pg.ip(),
            pg.port()
        );
        println!(
            "  Try:       meshscope sql --server http://{http} \"SELECT service_name, span_kind, count(*) AS spans, round(avg(duration_ns) / 1e6, 2) AS avg_ms FROM spans GROUP BY 1, 2 ORDER BY 1, 2\""
        );
    } else {
        println!("  Telemetry: OTLP/gRPC to {otlp}");
    }
    if identity.is_some() {
        println!(
            "  Security:  strict mTLS between the proxies (spiffe://…/ns/demo/sa/<workload>); the frontend is the edge and also takes plaintext; payments admits checkout only"
        );
    }
    if let Some((_, http, _, _)) = &server {
        println!(
            "  Policy:    http://{http}/mesh; shift the cart canary to 50%:\n             curl -s http://{http}/api/v1/mesh/policy/frontend | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"document\"].replace(\"weight = 90\", \"weight = 50\").replace(\"weight = 10\", \"weight = 50\"))' | curl -s -X PUT --data-binary @- http://{http}/api/v1/mesh/policy/frontend"
        );
    }
    println!(
        "  The graph and golden signals fill within about 10 seconds. Ctrl-C stops everything."
    );
    println!();

    stop.await;
    println!(
        "meshscope demo: stopping traffic, proxies (sending their last telemetry) and the server"
    );
    let _ = stop_apps.send(true);
    let _ = traffic_task.await;
    for p in proxies {
        p.stop().await;
    }
    for t in app_tasks {
        let _ = t.await;
    }
    let _ = stop_serve.send(true);
    match server {
        Some((task, ..)) => match task.await {
            Ok(r) => r,
            Err(e) => Err(e.to_string()),
        },
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_names_every_callee_with_the_canary_and_the_database() {
        let mut addrs = HashMap::new();
        for (i, s) in specs().iter().enumerate() {
            addrs.insert(
                (s.name.to_string(), s.version.to_string()),
                SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)),
            );
        }
        let d = registry(&addrs);
        let names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cart",
                "inventory",
                "checkout",
                "payments",
                "payments-gateway",
                "postgres"
            ]
        );
        let cart = &d[0];
        assert_eq!(
            cart.endpoints.iter().map(|e| e.weight).collect::<Vec<_>>(),
            [90, 10]
        );
        assert_eq!(cart.routes.len(), 1);
        assert_eq!(cart.routes[0].backends[0].version, "v2");
        assert_eq!(d[5].db_system.as_deref(), Some("postgresql"));
        let config = ProxyConfig {
            destinations: d,
            ..proxy_config(
                &specs()[0],
                SocketAddr::from(([127, 0, 0, 1], 1)),
                "http://127.0.0.1:4317",
                None,
            )
        };
        config.validate().expect("valid");
    }
}
