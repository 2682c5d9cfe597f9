//! `GET /metrics`: the OpenMetrics exposition (`prometheus-client`) of meshscope's own
//! health and of the golden signals per service and edge.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use meshscope_collector::IngestStats;
use meshscope_collector::ingest::SignalStats;
use meshscope_proto::Table;
use meshscope_query::QueryEngine;
use meshscope_query::analysis::prometheus::SpanCounters;
use meshscope_storage::Storage;
use meshscope_storage::table_store::Stats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::serve::Shutdown;

/// What `/metrics` reports. A collector has no query engine; a query node no ingest.
#[derive(Clone)]
pub struct Exposition {
    pub storage: Storage,
    pub ingest: Option<Arc<IngestStats>>,
    pub engine: Option<QueryEngine>,
    pub counters: Option<Arc<SpanCounters>>,
    pub alerts: Option<meshscope_alerts::Alerting>,
    pub auth: meshscope_auth::Auth,
    /// The receivers' bound on exports in progress (none on a query node).
    pub admission: Option<meshscope_collector::admission::Admission>,
    /// The live tap (where spans are ingested).
    pub tap: Option<meshscope_collector::tap::Tap>,
    /// The mesh CA (`serve` and `query`).
    pub identity: Option<Arc<crate::identity::Identity>>,
}

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exposition")
            .field("ingest", &self.ingest.is_some())
            .field("engine", &self.engine.is_some())
            .field("alerts", &self.alerts.is_some())
            .finish_non_exhaustive()
    }
}

/// The `table` label of the per-table families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TableLabel {
    table: &'static str,
}

/// One family over tables: `(table, value)` samples.
fn per_table<V: EncodeCounterValue + EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (&'static str, V)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (table, v) in samples {
        let labels = TableLabel { table };
        let mut m = family.encode_family(&labels)?;
        match kind {
            MetricType::Counter => m.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            _ => m.encode_gauge(&v)?,
        }
    }
    Ok(())
}

/// One unlabelled counter.
fn counter<V: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: V,
) -> std::fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

/// A family read from a stats struct: name, help, and the value it takes.
type Family<S> = (&'static str, &'static str, fn(&S) -> u64);

fn ld(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// meshscope's own health, read from the stats of ingest, storage and queries on each
/// scrape.
impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let signal = |t: Table, f: fn(&SignalStats) -> u64| {
            (
                t.name(),
                self.ingest.as_ref().map_or(0, |i| f(i.for_table(t))),
            )
        };
        let ingest: [Family<SignalStats>; 5] = [
            (
                "meshscope_ingest_requests",
                "OTLP export requests received.",
                |s| ld(&s.requests),
            ),
            (
                "meshscope_ingest_accepted_records",
                "Records (spans, data points, log records) acknowledged.",
                |s| ld(&s.accepted),
            ),
            (
                "meshscope_ingest_rejected_records",
                "Invalid records answered with partial_success.",
                |s| ld(&s.rejected),
            ),
            (
                "meshscope_ingest_refused_requests",
                "Requests refused as overloaded or shutting down (retryable).",
                |s| ld(&s.refused_requests),
            ),
            (
                "meshscope_ingest_bad_requests",
                "Requests that could not be decoded.",
                |s| ld(&s.bad_requests),
            ),
        ];
        for (name, help, f) in ingest {
            let samples = Table::ALL.map(|t| signal(t, f));
            per_table(&mut enc, name, help, Counter, samples)?;
        }

        if let Some(a) = &self.admission {
            counter(
                &mut enc,
                "meshscope_ingest_shed_requests",
                "OTLP exports refused at once because --max-inflight-exports were in progress.",
                a.shed(),
            )?;
        }
        if let Some(t) = &self.tap {
            let t = t.stats();
            enc.encode_descriptor(
                "meshscope_tap_subscribers",
                "Clients watching the live tap (/api/v1/tap) now.",
                None,
                Gauge,
            )?
            .encode_gauge(&(t.subscribers as i64))?;
            counter(
                &mut enc,
                "meshscope_tap_events",
                "Span events streamed to tap clients.",
                t.events,
            )?;
            counter(
                &mut enc,
                "meshscope_tap_dropped_events",
                "Span events a tap client's full queue had no room for (it reads too slowly).",
                t.dropped,
            )?;
        }
        let stores: [Family<Stats>; 14] = [
            (
                "meshscope_wal_commits",
                "Group commits (fdatasync) of the write-ahead log.",
                |s| ld(&s.commits),
            ),
            (
                "meshscope_wal_bytes",
                "Bytes appended to the write-ahead log.",
                |s| ld(&s.wal_bytes),
            ),
            (
                "meshscope_parquet_files_written",
                "Parquet files written.",
                |s| ld(&s.files_written),
            ),
            (
                "meshscope_parquet_bytes_written",
                "Bytes of Parquet written.",
                |s| ld(&s.parquet_bytes),
            ),
            (
                "meshscope_parquet_rows_written",
                "Rows written into Parquet files.",
                |s| ld(&s.rows_flushed),
            ),
            ("meshscope_compactions", "Compactions finished.", |s| {
                ld(&s.compactions)
            }),
            (
                "meshscope_compacted_files",
                "Parquet files merged by compactions.",
                |s| ld(&s.compacted_files),
            ),
            (
                "meshscope_compaction_bytes_in",
                "Bytes of the files compactions merged.",
                |s| ld(&s.compacted_bytes_in),
            ),
            (
                "meshscope_compaction_bytes_out",
                "Bytes of the files compactions wrote.",
                |s| ld(&s.compacted_bytes_out),
            ),
            (
                "meshscope_retention_removed_files",
                "Parquet files removed by retention.",
                |s| ld(&s.expired_files),
            ),
            (
                "meshscope_retention_removed_bytes",
                "Bytes of Parquet removed by retention.",
                |s| ld(&s.expired_bytes),
            ),
            (
                "meshscope_retention_removed_rows",
                "Rows removed by retention.",
                |s| ld(&s.expired_rows),
            ),
            (
                "meshscope_buffered_bytes",
                "Arrow bytes acknowledged or queued but not yet in Parquet (the WAL lag).",
                |s| s.buffered_bytes.load(Ordering::Relaxed) as u64,
            ),
            (
                "meshscope_unflushed_rows",
                "Rows acknowledged but not yet in Parquet.",
                |s| ld(&s.rows_written).saturating_sub(ld(&s.rows_flushed)),
            ),
        ];
        for (name, help, f) in stores {
            let kind = if name == "meshscope_buffered_bytes" || name == "meshscope_unflushed_rows" {
                Gauge
            } else {
                Counter
            };
            let samples = self
                .storage
                .tables()
                .map(|t| (t.table().name, f(t.stats())));
            per_table(&mut enc, name, help, kind, samples)?;
        }
        // One snapshot per table per scrape (on a query node it lists the data directory).
        let files: Vec<_> = self
            .storage
            .tables()
            .map(|t| {
                let snap = t.snapshot();
                (
                    t.table().name,
                    snap.files.len() as u64,
                    snap.files.iter().map(|f| f.size).sum::<u64>(),
                )
            })
            .collect();
        per_table(
            &mut enc,
            "meshscope_parquet_files",
            "Parquet files queries read now.",
            Gauge,
            files.iter().map(|&(t, n, _)| (t, n)),
        )?;
        per_table(
            &mut enc,
            "meshscope_parquet_bytes",
            "Bytes of the Parquet files queries read now.",
            Gauge,
            files.iter().map(|&(t, _, bytes)| (t, bytes)),
        )?;

        let Some(engine) = &self.engine else {
            return Ok(());
        };
        let q = engine.stats();
        counter(
            &mut enc,
            "meshscope_queries",
            "SQL statements run through the HTTP API and analysis endpoints.",
            ld(&q.queries),
        )?;
        counter(
            &mut enc,
            "meshscope_queries_failed",
            "SQL statements that failed.",
            ld(&q.failed),
        )?;
        counter(
            &mut enc,
            "meshscope_query_seconds",
            "Time spent running SQL statements.",
            ld(&q.nanos) as f64 / 1e9,
        )?;
        for (name, help, v) in [
            (
                "meshscope_queries_timed_out",
                "Requests (SQL, API, Postgres) cancelled at --query-timeout-secs.",
                &q.timed_out,
            ),
            (
                "meshscope_queries_refused_busy",
                "Requests refused (503) after waiting for a place among \
                 --max-concurrent-queries.",
                &q.refused_busy,
            ),
            (
                "meshscope_sql_answers_truncated",
                "/api/v1/sql JSON answers cut at --sql-max-rows.",
                &q.truncated,
            ),
        ] {
            counter(&mut enc, name, help, ld(v))?;
        }
        enc.encode_descriptor(
            "meshscope_queries_waiting",
            "Requests waiting now for a place among --max-concurrent-queries.",
            None,
            Gauge,
        )?
        .encode_gauge(&(q.waiting.load(Ordering::Relaxed) as i64))?;
        enc.encode_descriptor(
            "meshscope_queries_running",
            "SQL statements running now (a statement whose caller went away is cancelled).",
            None,
            Gauge,
        )?
        .encode_gauge(&(q.running.load(Ordering::Relaxed) as i64))?;
        Ok(())
    }
}

/// The alerts' state and delivery counters.
#[derive(Clone)]
struct AlertsCollector(meshscope_alerts::Alerting);

impl std::fmt::Debug for AlertsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AlertsCollector")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

impl Collector for AlertsCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        use meshscope_alerts::eval::AlertState;
        let counts = self.0.counts();
        let stats = self.0.stats();
        {
            let mut alerts = enc.encode_descriptor(
                "meshscope_alerts",
                "Alerts by state.",
                None,
                MetricType::Gauge,
            )?;
            for s in [
                AlertState::Pending,
                AlertState::Firing,
                AlertState::Resolved,
            ] {
                let n = counts.get(&s).copied().unwrap_or(0) as u64;
                alerts
                    .encode_family(&StateLabel { state: s.name() })?
                    .encode_gauge(&n)?;
            }
        }
        {
            let mut evals = enc.encode_descriptor(
                "meshscope_alert_rule_evaluations",
                "Alert rule evaluations, and those whose query failed.",
                None,
                MetricType::Counter,
            )?;
            let failed = ld(&stats.evaluation_failures);
            for (result, n) in [
                ("ok", ld(&stats.evaluations).saturating_sub(failed)),
                ("failed", failed),
            ] {
                evals
                    .encode_family(&ResultLabel { result })?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        let mut attempts = enc.encode_descriptor(
            "meshscope_alert_notification_attempts",
            "Webhook and Alertmanager delivery attempts by outcome.",
            None,
            MetricType::Counter,
        )?;
        for (outcome, n) in [
            ("ok", ld(&stats.attempts_ok)),
            ("failed", ld(&stats.attempts_failed)),
        ] {
            attempts
                .encode_family(&OutcomeLabel { outcome })?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        Ok(())
    }
}

/// Requests accepted per token and refused per reason, on each listener.
#[derive(Debug, Clone)]
struct AuthCollector(meshscope_auth::Auth);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    surface: &'static str,
    reason: &'static str,
}

impl Collector for AuthCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        {
            let mut failures = enc.encode_descriptor(
                "meshscope_auth_failures",
                "Requests and logins refused: no token (missing), an unknown one (invalid), or \
                 one without the scope (scope).",
                None,
                MetricType::Counter,
            )?;
            for (surface, reason, n) in self.0.failures() {
                failures
                    .encode_family(&RefusalLabels {
                        surface: surface.name(),
                        reason,
                    })?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        let mut accepted = enc.encode_descriptor(
            "meshscope_auth_accepted",
            "Requests and logins accepted, by token name (never its secret).",
            None,
            MetricType::Counter,
        )?;
        for a in self.0.accepted() {
            // Token names are letters, digits, `_`, `-` and `.`: nothing to escape.
            let labels = [("token", a.token.as_str()), ("surface", a.surface.name())];
            accepted
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&a.requests, None)?;
        }
        Ok(())
    }
}

/// The OpenMetrics content type `/metrics` answers with (Prometheus negotiates it).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Exposition {
    /// Every family, through one `prometheus-client` registry: meshscope's health, the
    /// golden-signal counters and the alerts.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        if let Some(c) = &self.counters {
            registry.register_collector(Box::new(Arc::clone(c)));
        }
        if let Some(a) = &self.alerts {
            registry.register_collector(Box::new(AlertsCollector(a.clone())));
        }
        if !self.auth.is_open() {
            registry.register_collector(Box::new(AuthCollector(self.auth.clone())));
        }
        if let Some(i) = &self.identity {
            registry
                .register_collector(Box::new(crate::identity::IdentityCollector(Arc::clone(i))));
        }
        registry
    }

    pub fn router(self) -> Router {
        let registry = Arc::new(self.registry());
        Router::new()
            .route(
                "/metrics",
                get(|State(registry): State<Arc<Registry>>| async move {
                    // A query node's file listing and the encoding are blocking work.
                    let text = tokio::task::spawn_blocking(move || {
                        let mut out = String::new();
                        encode(&mut out, &registry).map(|()| out)
                    })
                    .await;
                    match text {
                        Ok(Ok(text)) => {
                            ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
                        }
                        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    }
                }),
            )
            .with_state(registry)
    }

    /// Advances the golden-signal counters every `every` until shutdown.
    pub async fn run_counters(self, every: Duration, shutdown: Shutdown) {
        let (Some(engine), Some(counters)) = (&self.engine, &self.counters) else {
            return;
        };
        let stop = shutdown.wait();
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = counters.advance(engine, chrono::Utc::now()).await {
                        tracing::warn!(error = %e, "computing golden-signal counters failed");
                    }
                }
                () = &mut stop => return,
            }
        }
    }
}
