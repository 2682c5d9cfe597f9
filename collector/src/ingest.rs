//! The pipeline shared by the gRPC and HTTP receivers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use meshscope_proto::otlp::collector::logs::v1::ExportLogsServiceRequest;
use meshscope_proto::otlp::collector::metrics::v1::ExportMetricsServiceRequest;
use meshscope_proto::otlp::collector::trace::v1::ExportTraceServiceRequest;
use meshscope_proto::{Converted, Table, convert};
use meshscope_storage::Storage;
use thiserror::Error;

/// What became of an accepted request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub accepted: u64,
    pub rejected: u64,
    pub message: Option<String>,
}

impl Outcome {
    /// The `(rejected count, error_message)` of the OTLP `partial_success`, when there is one.
    pub fn partial_success(&self) -> Option<(i64, String)> {
        (self.rejected > 0 || self.message.is_some()).then(|| {
            (
                i64::try_from(self.rejected).unwrap_or(i64::MAX),
                self.message.clone().unwrap_or_default(),
            )
        })
    }
}

/// Why a request was not accepted at all.
#[derive(Debug, Error)]
pub enum IngestError {
    /// Buffers or the write-ahead log are full: retry later (gRPC UNAVAILABLE, HTTP 503).
    #[error("{0}")]
    Overloaded(String),
    /// The server is shutting down: retry elsewhere or later (gRPC UNAVAILABLE, HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an I/O failure on our side (gRPC INTERNAL, HTTP 500).
    #[error("{0}")]
    Internal(String),
}

impl From<meshscope_storage::Error> for IngestError {
    fn from(e: meshscope_storage::Error) -> Self {
        use meshscope_storage::Error as E;
        match e {
            E::Overloaded { .. } => IngestError::Overloaded(e.to_string()),
            E::Closed { .. } => IngestError::Unavailable(e.to_string()),
            other => IngestError::Internal(other.to_string()),
        }
    }
}

/// Counters per signal: bounded labels (signal x outcome).
#[derive(Debug, Default)]
pub struct SignalStats {
    pub requests: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub refused_requests: AtomicU64,
    pub bad_requests: AtomicU64,
}

#[derive(Debug, Default)]
pub struct IngestStats {
    pub spans: SignalStats,
    pub metrics: SignalStats,
    pub logs: SignalStats,
}

impl IngestStats {
    /// The counters of an OTLP signal's table.
    pub fn for_table(&self, table: Table) -> &SignalStats {
        match table {
            Table::Spans => &self.spans,
            Table::Metrics => &self.metrics,
            Table::Logs => &self.logs,
        }
    }
}

/// The receivers' shared entry into storage.
#[derive(Clone)]
pub struct Ingest {
    storage: Storage,
    stats: Arc<IngestStats>,
    tap: crate::tap::Tap,
    clock: Arc<dyn Fn() -> i64 + Send + Sync>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").finish_non_exhaustive()
    }
}

fn system_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Ingest {
    pub fn new(storage: Storage) -> Self {
        Ingest {
            storage,
            stats: Arc::default(),
            tap: crate::tap::Tap::default(),
            clock: Arc::new(system_now_ns),
        }
    }

    /// Replaces the clock that stamps log records arriving without any time (for tests).
    pub fn with_clock(mut self, clock: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The live tap every durable batch of spans is shown to.
    pub fn tap(&self) -> &crate::tap::Tap {
        &self.tap
    }

    pub fn stats(&self) -> &Arc<IngestStats> {
        &self.stats
    }

    /// Counts a request the receiver could not decode.
    pub fn bad_request(&self, table: Table) {
        let s = self.stats.for_table(table);
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.bad_requests.fetch_add(1, Ordering::Relaxed);
    }

    async fn store(
        &self,
        table: Table,
        converted: Result<Converted, arrow::error::ArrowError>,
    ) -> Result<Outcome, IngestError> {
        let s = self.stats.for_table(table);
        s.requests.fetch_add(1, Ordering::Relaxed);
        let c =
            converted.map_err(|e| IngestError::Internal(format!("converting to Arrow: {e}")))?;
        let accepted = c.batch.num_rows() as u64;
        // Arrow arrays are shared, not copied: the tap sees the batch after it is durable.
        let tapped =
            (table == Table::Spans && self.tap.stats().subscribers > 0).then(|| c.batch.clone());
        if let Err(e) = self.storage.write(table, c.batch).await {
            let e = IngestError::from(e);
            if matches!(e, IngestError::Overloaded(_) | IngestError::Unavailable(_)) {
                s.refused_requests.fetch_add(1, Ordering::Relaxed);
            }
            return Err(e);
        }
        if let Some(b) = tapped {
            self.tap.publish(&b);
        }
        s.accepted.fetch_add(accepted, Ordering::Relaxed);
        s.rejected.fetch_add(c.rejected, Ordering::Relaxed);
        Ok(Outcome {
            accepted,
            rejected: c.rejected,
            message: c.message,
        })
    }

    pub async fn traces(&self, req: &ExportTraceServiceRequest) -> Result<Outcome, IngestError> {
        self.store(Table::Spans, convert::spans(req)).await
    }

    pub async fn metrics(&self, req: &ExportMetricsServiceRequest) -> Result<Outcome, IngestError> {
        self.store(Table::Metrics, convert::metrics(req)).await
    }

    pub async fn logs(&self, req: &ExportLogsServiceRequest) -> Result<Outcome, IngestError> {
        let now = (self.clock)();
        self.store(Table::Logs, convert::logs(req, now)).await
    }
}
