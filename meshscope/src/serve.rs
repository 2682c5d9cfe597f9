//! `meshscope serve`: every role in one process; `meshscope collector` and `meshscope
//! query`: the two halves of a split deployment sharing one data directory.
//!
//! Start-up: open storage (replaying the write-ahead log), bind every listener, log each
//! address, then serve until SIGTERM or Ctrl-C. Shutdown: stop accepting, let in-flight
//! requests finish, write every buffered row into Parquet, exit.
//!
//! | part | serve | collector | query |
//! | --- | --- | --- | --- |
//! | OTLP receivers, write-ahead log, Parquet writer | ✓ | ✓ | |
//! | compaction and retention of its own files | ✓ | ✓ | rollups |
//! | SQL, HTTP API, Postgres wire, rollups, golden-signal counters | ✓ | | ✓ |
//! | `/healthz`, `/readyz`, `/metrics` | ✓ | ✓ | ✓ |

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use meshscope_collector::{Ingest, Limits};
use meshscope_query::analysis::prometheus::SpanCounters;
use meshscope_query::analysis::rollup::Rollups;
use meshscope_query::engine::EngineConfig;
use meshscope_query::{Executor, QueryEngine};
use meshscope_storage::{Maintainer, Storage, StoreConfig, Upkeep};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Role, ServeConfig};

/// The listeners a role opens: (what, address).
fn listeners(config: &ServeConfig) -> Vec<(&'static str, SocketAddr)> {
    let mut out = Vec::new();
    if config.role != Role::Query {
        out.push(("OTLP/gRPC", config.otlp_grpc_addr));
        out.push(("OTLP/HTTP", config.otlp_http_addr));
    }
    out.push(("HTTP API", config.http_addr));
    if config.role != Role::Collector {
        out.push(("Postgres wire protocol", config.pg_addr));
    }
    out
}

/// Without tokens, meshscope answers anyone who reaches it: allowed on loopback, and beyond
/// it only when `--insecure-no-auth` says so.
fn check_exposure(config: &ServeConfig) -> Result<(), String> {
    if !config.auth.is_open() {
        return Ok(());
    }
    let exposed: Vec<String> = listeners(config)
        .into_iter()
        .filter(|(_, a)| !a.ip().is_loopback())
        .map(|(what, a)| format!("{what} on {a}"))
        .collect();
    if exposed.is_empty() {
        return Ok(());
    }
    if config.insecure_no_auth {
        tracing::warn!(
            listeners = %exposed.join(", "),
            "--insecure-no-auth: listening beyond loopback without tokens; anyone who reaches \
             these addresses can send data and read everything"
        );
        return Ok(());
    }
    Err(format!(
        "refusing to listen beyond loopback without tokens ({}): give --auth-file (see the \
         README's security section), or --insecure-no-auth to accept anyone who reaches it",
        exposed.join(", ")
    ))
}

/// The scope an HTTP API request needs: probes and the UI's files (which hold no data) are
/// open; `/metrics` and every `/api/` read need `read`; changing alert rules needs `admin`.
fn api_scope(method: &axum::http::Method, path: &str) -> Option<meshscope_auth::Scope> {
    use meshscope_auth::Scope;
    let reads = *method == axum::http::Method::GET || *method == axum::http::Method::HEAD;
    if path == "/healthz" || path == "/readyz" || crate::identity::is_identity_path(path) {
        None
    } else if (path.starts_with("/api/v1/alerts/rules") || path.starts_with("/api/v1/mesh/"))
        && !reads
    {
        Some(Scope::Admin)
    } else if path == "/metrics" || path.starts_with("/api/") {
        Some(Scope::Read)
    } else {
        None
    }
}

/// `router` behind the API's token check.
fn guarded(router: Router, config: &ServeConfig) -> Router {
    meshscope_auth::http::Gate {
        auth: config.auth.clone(),
        surface: meshscope_auth::Surface::Api,
        scope_of: api_scope,
        render: meshscope_auth::http::json_error,
    }
    .guard(router)
}

/// A shutdown signal every server task can await.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for {what} on {addr}: {e}"))?;
    let local = l.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(address = %local, "{what} listening on {local}");
    Ok(l)
}

fn health_routes(ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(ready): State<Arc<AtomicBool>>| async move {
                if ready.load(Ordering::Acquire) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "starting")
                }
            }),
        )
        .with_state(ready)
}

/// Rolls up complete minutes every `every` until shutdown.
async fn roll_up(rollups: Rollups, every: Duration, shutdown: Shutdown) {
    let stop = shutdown.wait();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = tick.tick() => match rollups.run_once(chrono::Utc::now()).await {
                Ok(0) => {}
                Ok(minutes) => tracing::info!(minutes, "rolled up golden signals"),
                Err(e) => tracing::warn!(error = %e, "rolling up golden signals failed"),
            },
            () = &mut stop => return,
        }
    }
}

/// Compacts and expires files every `every` until shutdown.
async fn maintain(mut maintainer: Maintainer, every: Duration, shutdown: Shutdown) {
    let stop = shutdown.wait();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    // A pass can run for minutes under a backlog; shutdown ends it after the compaction
    // under way.
    let cancel = Arc::new(AtomicBool::new(false));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
                let flag = Arc::clone(&cancel);
                let mut pass = tokio::task::spawn_blocking(move || {
                    let report = maintainer.run_once(now, &flag);
                    (maintainer, report)
                });
                let joined = tokio::select! {
                    joined = &mut pass => joined,
                    () = &mut stop => {
                        cancel.store(true, Ordering::Relaxed);
                        let _ = pass.await;
                        return;
                    }
                };
                match joined {
                    Ok((m, report)) => {
                        maintainer = m;
                        if report.compactions + report.expired.files as usize + report.deleted > 0 {
                            tracing::info!(compactions = report.compactions, expired_files = report.expired.files,
                                expired_bytes = report.expired.bytes, deleted_files = report.deleted,
                                "storage maintenance pass");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "storage maintenance panicked; stopping it");
                        return;
                    }
                }
            }
            () = &mut stop => return,
        }
    }
}

/// The addresses a server bound (port 0 in the config becomes the port the kernel chose).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// `None` on a query node, which has no receivers.
    pub otlp_grpc: Option<SocketAddr>,
    pub http: SocketAddr,
    pub pg: SocketAddr,
}

/// Runs a server role until `stop` resolves (SIGTERM / Ctrl-C in `main`).
pub async fn run(config: ServeConfig, stop: impl Future<Output = ()>) -> Result<(), String> {
    run_reporting(config, stop, None).await
}

/// [`run`], telling `bound` which addresses it listens on once they are bound (the demo
/// starts its mesh against them).
pub async fn run_reporting(
    config: ServeConfig,
    stop: impl Future<Output = ()>,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    check_exposure(&config)?;
    let role = config.role;
    let mut store_config = StoreConfig::new(&config.data_dir);
    store_config.flush_bytes = config.flush_bytes;
    store_config.flush_interval = config.flush_interval;
    store_config.max_buffered_bytes = config.max_buffered_bytes;
    store_config.writer = config.node_id.clone();
    store_config.retire_grace = config.retire_grace;
    if let Some(url) = &config.storage_url {
        let remote = meshscope_storage::remote::Remote::from_url(url).map_err(|e| e.to_string())?;
        tracing::info!(url = %url, "Parquet files live on object storage");
        store_config.remote = Some(Arc::new(remote));
    }
    let data_dir = config.data_dir.clone();
    let storage = tokio::task::spawn_blocking(move || match role {
        // A collector only ingests: the derived tables are the query side's.
        Role::Query => Storage::open_query(store_config, &meshscope_query::DERIVED),
        Role::Serve => Storage::open(store_config, &meshscope_query::DERIVED),
        Role::Collector => Storage::open(store_config, &[]),
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot open data directory {}: {e}", data_dir.display()))?;
    tracing::info!(data_dir = %storage.data_dir().display(), role = ?role, node_id = %config.node_id, "storage open");
    if role == Role::Collector {
        return run_collector(config, storage, started, stop).await;
    }

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let executor =
        Executor::new(cores).map_err(|e| format!("cannot start the query runtime: {e}"))?;
    let engine = QueryEngine::new(
        &storage,
        executor.clone(),
        EngineConfig {
            target_partitions: cores,
            memory_limit: config.query_memory_bytes,
            limits: config.query_limits,
        },
    )
    .map_err(|e| format!("cannot set up the query engine: {e}"))?;
    let front = WritePath::new(&config, &storage);
    let WritePath {
        ingest, admission, ..
    } = front.clone();

    let receivers = if role == Role::Serve {
        Some((
            bind("OTLP/gRPC", config.otlp_grpc_addr).await?,
            bind("OTLP/HTTP", config.otlp_http_addr).await?,
        ))
    } else {
        None
    };
    let http_l = bind("HTTP API", config.http_addr).await?;
    let pg_l = bind("Postgres wire protocol", config.pg_addr).await?;
    if let Some(tx) = bound {
        let local = |l: &TcpListener| l.local_addr().map_err(|e| e.to_string());
        let _ = tx.send(Bound {
            otlp_grpc: receivers.as_ref().map(|(g, _)| local(g)).transpose()?,
            http: local(&http_l)?,
            pg: local(&pg_l)?,
        });
    }
    let pg_l = pg_l.into_std().map_err(|e| e.to_string())?;
    // The mesh CA: its root is made on the first start and kept.
    let identity = crate::identity::Identity::open(&config)?;
    // The control plane's policy documents.
    let mesh = crate::mesh::Mesh::open(&config.data_dir)?;
    let mut policy_files = std::collections::BTreeMap::new();
    if let Some(dir) = &config.policy_dir {
        let (stored, problems) = mesh.load_dir(dir, &mut policy_files);
        if !problems.is_empty() {
            return Err(format!(
                "the policy directory {} has documents that do not check:\n  {}",
                dir.display(),
                problems.join("\n  ")
            ));
        }
        tracing::info!(dir = %dir.display(), stored, "policy directory read");
    }
    // Checks the config file's alert rules before anything starts serving.
    let alerting = meshscope_alerts::Alerting::open(
        engine.clone(),
        storage.data_dir(),
        config.alerts.clone(),
        format!("http://{}", http_l.local_addr().map_err(|e| e.to_string())?),
        Arc::new(meshscope_alerts::SystemClock),
        Arc::new(meshscope_alerts::TokioSleeper),
    )
    .await
    .map_err(|e| format!("cannot start alerting: {e}"))?;

    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, shutdown) = Shutdown::new();

    let mut tasks = Vec::new();
    if let Some((grpc_l, otlp_http_l)) = receivers {
        tasks.extend(front.spawn(grpc_l, otlp_http_l, &config, &shutdown));
    }
    let alerts = tokio::spawn(alerting.clone().run(shutdown.wait()));
    let exposition = crate::metrics::Exposition {
        storage: storage.clone(),
        ingest: (role == Role::Serve).then(|| Arc::clone(ingest.stats())),
        engine: Some(engine.clone()),
        counters: Some(Arc::new(SpanCounters::new(
            chrono::Duration::from_std(config.signals_delay)
                .unwrap_or(chrono::Duration::seconds(30)),
        ))),
        alerts: Some(alerting.clone()),
        auth: config.auth.clone(),
        admission: Some(admission.clone()),
        tap: (role == Role::Serve).then(|| ingest.tap().clone()),
        identity: Some(Arc::clone(&identity)),
    };
    if let Some(every) = config.compaction_interval {
        tasks.push(tokio::spawn(maintain(
            Maintainer::new(storage.clone(), config.upkeep.clone()),
            every,
            shutdown.clone(),
        )));
    }
    let counters = tokio::spawn(
        exposition
            .clone()
            .run_counters(config.signals_interval, shutdown.clone()),
    );
    let rollups = Rollups::new(
        engine.clone(),
        storage.clone(),
        chrono::Duration::from_std(config.rollup_delay).unwrap_or(chrono::Duration::minutes(2)),
    );
    let roller = tokio::spawn(roll_up(rollups, config.rollup_interval, shutdown.clone()));
    if let Some(dir) = config.policy_dir.clone() {
        tasks.push(tokio::spawn(mesh.clone().follow_dir(
            dir,
            policy_files,
            shutdown.wait(),
        )));
    }
    let api = Router::new()
        .merge(health_routes(Arc::clone(&ready)))
        .merge(crate::identity::router(Arc::clone(&identity)))
        .merge(crate::mesh::router(mesh))
        .merge(tap_routes(role, &ingest))
        .merge(meshscope_alerts::api::router(alerting))
        .merge(exposition.router())
        .merge(meshscope_query::api::router(engine.clone()))
        .merge(meshscope_query::api::bounded(
            meshscope_query::analysis::routes::router(engine.clone()),
            engine.clone(),
        ))
        // The web UI: `/`, `/assets/…`, and index.html for every other path (client routes).
        .merge(meshscope_ui::router());
    let api = guarded(api, &config);
    let http = serve_http("HTTP API", http_l, api, &config, &shutdown);
    let pg_serve = meshscope_query::pg::serve(
        pg_l,
        engine.clone(),
        config.auth.clone(),
        config.tls.clone(),
        shutdown.wait(),
    );
    let pg = executor.spawn_detached(async move {
        if let Err(e) = pg_serve.await {
            tracing::error!(error = %e, "the Postgres wire protocol server stopped");
        }
    });

    ready.store(true, Ordering::Release);
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "meshscope ready"
    );

    tasks.extend([http, pg, counters, roller, alerts]);
    drain(stop, &ready, stop_tx, ingest.tap(), tasks).await;
    drop(ingest);
    close(storage, final_retention(&config)).await?;
    executor.shutdown();
    Ok(())
}

/// Waits for `stop`, then shuts the node's tasks down: not ready any more (probes see it
/// first), every task told to stop, every tap stream ended, and up to 10 s for requests in
/// flight to finish.
async fn drain(
    stop: impl Future<Output = ()>,
    ready: &AtomicBool,
    stop_tx: watch::Sender<bool>,
    tap: &meshscope_collector::tap::Tap,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    stop.await;
    tracing::info!("shutting down: finishing requests, writing buffered rows to Parquet");
    ready.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    // Live tap streams never finish by themselves: they end now, as idle connections do.
    tap.close();
    let all = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within 10 s; closing anyway");
    }
}

/// `GET /api/v1/tap` where spans are ingested; a query node sees no spans arrive, so it
/// says where to tap instead of streaming nothing.
fn tap_routes(role: Role, ingest: &Ingest) -> Router {
    if role == Role::Serve {
        return meshscope_collector::tap::router(ingest.tap().clone());
    }
    Router::new().route(
        "/api/v1/tap",
        get(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({
                    "error": "a query node ingests no spans: tap the HTTP address of a collector node"
                })),
            )
        }),
    )
}

/// Retention's last pass at shutdown, after the final flush (which may have taken a
/// table past its size bound since the last maintenance pass).
fn final_retention(config: &ServeConfig) -> Option<Upkeep> {
    (config.compaction_interval.is_some() && !config.upkeep.retention.is_empty()).then(|| Upkeep {
        compaction: None,
        retention: config.upkeep.retention.clone(),
    })
}

async fn close(storage: Storage, retention: Option<Upkeep>) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        storage.close();
        if let Some(upkeep) = retention {
            let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
            let report =
                Maintainer::new(storage.clone(), upkeep).run_once(now, &AtomicBool::new(false));
            if report.expired.files > 0 {
                tracing::info!(
                    expired_files = report.expired.files,
                    expired_bytes = report.expired.bytes,
                    "retention after the final flush"
                );
            }
            storage.close(); // deletes what it retired: no query is running any more
        }
    })
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!("stopped; every acknowledged row is in Parquet");
    Ok(())
}

/// Serves `router` on `listener` until shutdown: over TLS when the config has it.
fn serve_http(
    what: &'static str,
    listener: TcpListener,
    router: Router,
    config: &ServeConfig,
    shutdown: &Shutdown,
) -> tokio::task::JoinHandle<()> {
    let stop = shutdown.wait();
    match &config.tls {
        Some(tls) => tokio::spawn(meshscope_auth::tls::serve_https(
            listener,
            tls.http(),
            router,
            stop,
        )),
        None => tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %e, "the {what} listener stopped");
            }
        }),
    }
}

/// The write path's front: the ingest pipeline, the admission gate both receivers share,
/// and their limits.
#[derive(Clone)]
struct WritePath {
    ingest: Ingest,
    admission: meshscope_collector::admission::Admission,
    limits: Limits,
}

impl WritePath {
    fn new(config: &ServeConfig, storage: &Storage) -> WritePath {
        let limits = Limits {
            max_body_bytes: config.max_body_bytes,
            max_in_flight: config.max_inflight_exports,
        };
        WritePath {
            ingest: Ingest::new(storage.clone()),
            admission: meshscope_collector::admission::Admission::new(limits.max_in_flight),
            limits,
        }
    }

    /// The OTLP/gRPC and OTLP/HTTP receivers, serving until shutdown.
    fn spawn(
        self,
        grpc_l: TcpListener,
        otlp_http_l: TcpListener,
        config: &ServeConfig,
        shutdown: &Shutdown,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let WritePath {
            ingest,
            admission,
            limits,
        } = self;
        let grpc = meshscope_collector::grpc::serve(
            grpc_l,
            ingest.clone(),
            admission.clone(),
            limits,
            config.auth.clone(),
            config.tls.as_ref().map(|t| {
                let (cert, key) = t.identity_pem();
                meshscope_collector::grpc::TlsPem {
                    cert: cert.to_vec(),
                    key: key.to_vec(),
                    client_ca: t.client_ca_pem().map(<[u8]>::to_vec),
                }
            }),
            shutdown.wait(),
        );
        let router = meshscope_collector::http::router(
            ingest.clone(),
            admission.clone(),
            limits,
            config.auth.clone(),
        );
        vec![
            tokio::spawn(async move {
                if let Err(e) = grpc.await {
                    tracing::error!(error = %e, "the OTLP/gRPC receiver stopped");
                }
            }),
            serve_http("OTLP/HTTP", otlp_http_l, router, config, shutdown),
        ]
    }
}

/// `meshscope collector`: receivers, the write path, compaction and retention; health and
/// `/metrics` on the HTTP address.
async fn run_collector(
    config: ServeConfig,
    storage: Storage,
    started: std::time::Instant,
    stop: impl Future<Output = ()>,
) -> Result<(), String> {
    let front = WritePath::new(&config, &storage);
    let WritePath {
        ingest, admission, ..
    } = front.clone();
    let grpc_l = bind("OTLP/gRPC", config.otlp_grpc_addr).await?;
    let otlp_http_l = bind("OTLP/HTTP", config.otlp_http_addr).await?;
    let http_l = bind("HTTP API", config.http_addr).await?;
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, shutdown) = Shutdown::new();
    let mut tasks = front.spawn(grpc_l, otlp_http_l, &config, &shutdown);
    if let Some(every) = config.compaction_interval {
        tasks.push(tokio::spawn(maintain(
            Maintainer::new(storage.clone(), config.upkeep.clone()),
            every,
            shutdown.clone(),
        )));
    }
    let exposition = crate::metrics::Exposition {
        storage: storage.clone(),
        ingest: Some(Arc::clone(ingest.stats())),
        engine: None,
        counters: None,
        alerts: None,
        auth: config.auth.clone(),
        admission: Some(admission.clone()),
        tap: Some(ingest.tap().clone()),
        identity: None,
    };
    let api = Router::new()
        .merge(health_routes(Arc::clone(&ready)))
        .merge(meshscope_collector::tap::router(ingest.tap().clone()))
        .merge(exposition.router());
    let api = guarded(api, &config);
    tasks.push(serve_http("HTTP API", http_l, api, &config, &shutdown));
    ready.store(true, Ordering::Release);
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        node_id = %config.node_id,
        "meshscope collector ready"
    );
    drain(stop, &ready, stop_tx, ingest.tap(), tasks).await;
    drop(ingest);
    close(storage, final_retention(&config)).await
}
