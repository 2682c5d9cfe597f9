//! `meshscope serve`: every role in one process.
//!
//! Start-up: open storage (replaying the write-ahead log), bind every listener, log each
//! address, then serve until SIGTERM or Ctrl-C. Shutdown: stop accepting, let in-flight
//! requests finish, write every buffered row into Parquet, exit.

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
use meshscope_storage::{Storage, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ServeConfig;

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

/// Runs the all-in-one server until `stop` resolves (SIGTERM / Ctrl-C in `main`).
pub async fn run(config: ServeConfig, stop: impl Future<Output = ()>) -> Result<(), String> {
    let started = std::time::Instant::now();
    let mut store_config = StoreConfig::new(&config.data_dir);
    store_config.flush_bytes = config.flush_bytes;
    store_config.flush_interval = config.flush_interval;
    store_config.max_buffered_bytes = config.max_buffered_bytes;
    let data_dir = config.data_dir.clone();
    let storage = tokio::task::spawn_blocking(move || Storage::open(store_config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot open data directory {}: {e}", data_dir.display()))?;
    tracing::info!(data_dir = %storage.data_dir().display(), "storage open");

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
        },
    )
    .map_err(|e| format!("cannot set up the query engine: {e}"))?;
    let ingest = Ingest::new(storage.clone());
    let limits = Limits {
        max_body_bytes: config.max_body_bytes,
    };

    let grpc_l = bind("OTLP/gRPC", config.otlp_grpc_addr).await?;
    let otlp_http_l = bind("OTLP/HTTP", config.otlp_http_addr).await?;
    let http_l = bind("HTTP API", config.http_addr).await?;
    let pg_l = bind("Postgres wire protocol", config.pg_addr).await?;
    let pg_l = pg_l.into_std().map_err(|e| e.to_string())?;

    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, shutdown) = Shutdown::new();

    let grpc = tokio::spawn(meshscope_collector::grpc::serve(
        grpc_l,
        ingest.clone(),
        limits,
        shutdown.wait(),
    ));
    let otlp_http = tokio::spawn(
        axum::serve(
            otlp_http_l,
            meshscope_collector::http::router(ingest.clone(), limits),
        )
        .with_graceful_shutdown(shutdown.wait())
        .into_future(),
    );
    let exposition = crate::metrics::Exposition {
        storage: storage.clone(),
        ingest: Arc::clone(ingest.stats()),
        engine: engine.clone(),
        counters: Arc::new(SpanCounters::new(
            chrono::Duration::from_std(config.signals_delay)
                .unwrap_or(chrono::Duration::seconds(30)),
        )),
    };
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
    let api = Router::new()
        .merge(health_routes(Arc::clone(&ready)))
        .merge(exposition.router())
        .merge(meshscope_query::api::router(engine.clone()))
        .merge(meshscope_query::analysis::routes::router(engine.clone()))
        // The web UI: `/`, `/assets/…`, and index.html for every other path (client routes).
        .merge(meshscope_ui::router());
    let http = tokio::spawn(
        axum::serve(http_l, api)
            .with_graceful_shutdown(shutdown.wait())
            .into_future(),
    );
    let pg_serve = meshscope_query::pg::serve(pg_l, engine.clone(), shutdown.wait());
    let pg = executor.spawn(async move {
        if let Err(e) = pg_serve.await {
            tracing::error!(error = %e, "the Postgres wire protocol server stopped");
        }
    });

    ready.store(true, Ordering::Release);
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "meshscope ready"
    );

    stop.await;
    tracing::info!("shutting down: finishing requests, writing buffered rows to Parquet");
    ready.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    let drain = async {
        let _ = grpc.await;
        let _ = otlp_http.await;
        let _ = http.await;
        let _ = pg.await;
        let _ = counters.await;
        let _ = roller.await;
    };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within 10 s; closing anyway");
    }
    drop(ingest);
    let s = storage.clone();
    tokio::task::spawn_blocking(move || s.close())
        .await
        .map_err(|e| e.to_string())?;
    executor.shutdown();
    tracing::info!("stopped; every acknowledged row is in Parquet");
    Ok(())
}
