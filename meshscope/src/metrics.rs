//! `GET /metrics`: Prometheus text exposition of meshscope's own health and of the golden
//! signals per service and edge.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use meshscope_collector::IngestStats;
use meshscope_proto::Table;
use meshscope_query::QueryEngine;
use meshscope_query::analysis::prometheus::SpanCounters;
use meshscope_storage::Storage;

use crate::serve::Shutdown;

/// What `/metrics` reports. A collector has no query engine; a query node no ingest.
#[derive(Clone)]
pub struct Exposition {
    pub storage: Storage,
    pub ingest: Option<Arc<IngestStats>>,
    pub engine: Option<QueryEngine>,
    pub counters: Option<Arc<SpanCounters>>,
    pub alerts: Option<meshscope_alerts::Alerting>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

impl Exposition {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let per = |tables: &[Table], f: &dyn Fn(Table) -> f64| -> Vec<(String, f64)> {
            tables
                .iter()
                .map(|t| (format!("table=\"{}\"", t.name()), f(*t)))
                .collect()
        };
        let per_signal =
            |f: &dyn Fn(&meshscope_collector::ingest::SignalStats) -> f64| -> Vec<(String, f64)> {
                per(&Table::SIGNALS, &|t| {
                    self.ingest
                        .as_ref()
                        .and_then(|i| i.for_table(t))
                        .map(f)
                        .unwrap_or(0.0)
                })
            };
        let per_table = |f: &dyn Fn(Table) -> f64| per(&Table::ALL, f);
        let store = |t: Table| self.storage.table(t).stats();
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        family(
            &mut out,
            "meshscope_ingest_requests_total",
            "counter",
            "OTLP export requests received.",
            &per_signal(&|s| ld(&s.requests)),
        );
        family(
            &mut out,
            "meshscope_ingest_accepted_records_total",
            "counter",
            "Records (spans, data points, log records) acknowledged.",
            &per_signal(&|s| ld(&s.accepted)),
        );
        family(
            &mut out,
            "meshscope_ingest_rejected_records_total",
            "counter",
            "Invalid records answered with partial_success.",
            &per_signal(&|s| ld(&s.rejected)),
        );
        family(
            &mut out,
            "meshscope_ingest_refused_requests_total",
            "counter",
            "Requests refused as overloaded or shutting down (retryable).",
            &per_signal(&|s| ld(&s.refused_requests)),
        );
        family(
            &mut out,
            "meshscope_ingest_bad_requests_total",
            "counter",
            "Requests that could not be decoded.",
            &per_signal(&|s| ld(&s.bad_requests)),
        );
        family(
            &mut out,
            "meshscope_wal_commits_total",
            "counter",
            "Group commits (fdatasync) of the write-ahead log.",
            &per_table(&|t| ld(&store(t).commits)),
        );
        family(
            &mut out,
            "meshscope_wal_bytes_total",
            "counter",
            "Bytes appended to the write-ahead log.",
            &per_table(&|t| ld(&store(t).wal_bytes)),
        );
        family(
            &mut out,
            "meshscope_buffered_bytes",
            "gauge",
            "Arrow bytes acknowledged or queued but not yet in Parquet (the WAL lag).",
            &per_table(&|t| store(t).buffered_bytes.load(Ordering::Relaxed) as f64),
        );
        family(
            &mut out,
            "meshscope_unflushed_rows",
            "gauge",
            "Rows acknowledged but not yet in Parquet.",
            &per_table(&|t| {
                (store(t)
                    .rows_written
                    .load(Ordering::Relaxed)
                    .saturating_sub(store(t).rows_flushed.load(Ordering::Relaxed)))
                    as f64
            }),
        );
        family(
            &mut out,
            "meshscope_parquet_files_written_total",
            "counter",
            "Parquet files written.",
            &per_table(&|t| ld(&store(t).files_written)),
        );
        family(
            &mut out,
            "meshscope_parquet_bytes_written_total",
            "counter",
            "Bytes of Parquet written.",
            &per_table(&|t| ld(&store(t).parquet_bytes)),
        );
        family(
            &mut out,
            "meshscope_parquet_rows_written_total",
            "counter",
            "Rows written into Parquet files.",
            &per_table(&|t| ld(&store(t).rows_flushed)),
        );
        family(
            &mut out,
            "meshscope_parquet_files",
            "gauge",
            "Parquet files queries read now.",
            &per_table(&|t| self.storage.table(t).snapshot().files.len() as f64),
        );
        family(
            &mut out,
            "meshscope_parquet_bytes",
            "gauge",
            "Bytes of the Parquet files queries read now.",
            &per_table(&|t| {
                self.storage
                    .table(t)
                    .snapshot()
                    .files
                    .iter()
                    .map(|f| f.size)
                    .sum::<u64>() as f64 // an empty f64 sum is -0
            }),
        );
        family(
            &mut out,
            "meshscope_compactions_total",
            "counter",
            "Compactions finished.",
            &per_table(&|t| ld(&store(t).compactions)),
        );
        family(
            &mut out,
            "meshscope_compacted_files_total",
            "counter",
            "Parquet files merged by compactions.",
            &per_table(&|t| ld(&store(t).compacted_files)),
        );
        family(
            &mut out,
            "meshscope_compaction_bytes_in_total",
            "counter",
            "Bytes of the files compactions merged.",
            &per_table(&|t| ld(&store(t).compacted_bytes_in)),
        );
        family(
            &mut out,
            "meshscope_compaction_bytes_out_total",
            "counter",
            "Bytes of the files compactions wrote.",
            &per_table(&|t| ld(&store(t).compacted_bytes_out)),
        );
        family(
            &mut out,
            "meshscope_retention_removed_files_total",
            "counter",
            "Parquet files removed by retention.",
            &per_table(&|t| ld(&store(t).expired_files)),
        );
        family(
            &mut out,
            "meshscope_retention_removed_bytes_total",
            "counter",
            "Bytes of Parquet removed by retention.",
            &per_table(&|t| ld(&store(t).expired_bytes)),
        );
        family(
            &mut out,
            "meshscope_retention_removed_rows_total",
            "counter",
            "Rows removed by retention.",
            &per_table(&|t| ld(&store(t).expired_rows)),
        );
        let Some(engine) = &self.engine else {
            return out;
        };
        let q = engine.stats();
        family(
            &mut out,
            "meshscope_queries_total",
            "counter",
            "SQL statements run through the HTTP API and analysis endpoints.",
            &[(String::new(), ld(&q.queries))],
        );
        family(
            &mut out,
            "meshscope_queries_failed_total",
            "counter",
            "SQL statements that failed.",
            &[(String::new(), ld(&q.failed))],
        );
        family(
            &mut out,
            "meshscope_query_seconds_total",
            "counter",
            "Time spent running SQL statements.",
            &[(String::new(), q.nanos.load(Ordering::Relaxed) as f64 / 1e9)],
        );
        if let Some(c) = &self.counters {
            c.render(&mut out);
        }
        if let Some(alerts) = &self.alerts {
            render_alerts(alerts, &mut out);
        }
        out
    }

    pub fn router(self) -> Router {
        Router::new()
            .route(
                "/metrics",
                get(|State(e): State<Exposition>| async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        e.render(),
                    )
                        .into_response()
                }),
            )
            .with_state(self)
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

fn render_alerts(alerts: &meshscope_alerts::Alerting, out: &mut String) {
    use meshscope_alerts::eval::AlertState;
    let counts = alerts.counts();
    let stats = alerts.stats();

    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    family(
        out,
        "meshscope_alerts",
        "gauge",
        "Alerts by state.",
        &[
            AlertState::Pending,
            AlertState::Firing,
            AlertState::Resolved,
        ]
        .map(|s| {
            (
                format!("state=\"{}\"", s.name()),
                counts.get(&s).copied().unwrap_or(0) as f64,
            )
        }),
    );
    family(
        out,
        "meshscope_alert_rule_evaluations_total",
        "counter",
        "Alert rule evaluations, and those whose query failed.",
        &[
            (
                "result=\"ok\"".to_string(),
                ld(&stats.evaluations) - ld(&stats.evaluation_failures),
            ),
            (
                "result=\"failed\"".to_string(),
                ld(&stats.evaluation_failures),
            ),
        ],
    );
    family(
        out,
        "meshscope_alert_notification_attempts_total",
        "counter",
        "Webhook and Alertmanager delivery attempts by outcome.",
        &[
            ("outcome=\"ok\"".to_string(), ld(&stats.attempts_ok)),
            ("outcome=\"failed\"".to_string(), ld(&stats.attempts_failed)),
        ],
    );
}
