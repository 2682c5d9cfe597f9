//! # meshscope-storage
//!
//! Where acknowledged telemetry lives: a write-ahead log per table, in-memory Arrow batches
//! that SQL sees at once, and plain Parquet files under `<data-dir>/<table>/` that any engine
//! can read.
//!
//! ## Layout
//! - [`wal`]: the write-ahead log (segments, group commit, replay that cuts torn tails).
//! - [`table_store`]: [`TableStore`], one table as queries and ingest hold it: its write
//!   path (log writer thread, flusher thread) and the [`Snapshot`] a query reads.
//! - `listing`: a query node's read-only view of a table (every collector's files,
//!   listed again in the background each second).
//! - [`parquet_file`]: Parquet naming, sorted zstd writing (temp file + rename), listing.
//! - [`provider`]: the DataFusion `TableProvider` over a snapshot.
//! - [`maintenance`]: compaction, retention and deleting replaced files.
//! - [`remote`]: the same files on an S3-compatible object store.
//!
//! The guarantee: once [`Storage::write`] returns `Ok`, the rows survive `kill -9`
//! (fsynced log) and appear in exactly one of the log or a Parquet file after a restart.

pub mod arrivals;
pub mod bloom_cache;
pub mod error;
mod listing;
pub mod maintenance;
pub mod parquet_file;
pub mod provider;
pub mod remote;
pub mod scan;
pub mod table_store;
pub mod trace_index;
pub mod wal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::record_batch::RecordBatch;
use meshscope_proto::Table;

pub use error::{Error, Result};
pub use maintenance::{Compacted, CompactionPolicy, Expired, Retention};
pub use provider::StoredTable;
pub use scan::{ColumnScan, ScanPart};
pub use table_store::{Snapshot, Stats, StoreConfig, TableStore};

/// Every table of one data directory.
#[derive(Debug, Clone)]
pub struct Storage {
    data_dir: PathBuf,
    tables: Arc<BTreeMap<Table, Arc<TableStore>>>,
}

impl Storage {
    /// Opens (or creates) the data directory and replays each table's log.
    pub fn open(config: StoreConfig) -> Result<Self> {
        Self::open_with(config, |t, config| TableStore::open(t, config.clone()))
    }

    /// Opens the data directory as a query node: spans, logs and metrics read every
    /// collector's Parquet files (what they have flushed); the rollups table is this node's
    /// own, written under `config.writer`.
    pub fn open_query(config: StoreConfig) -> Result<Self> {
        Self::open_with(config, |t, config| {
            if t == Table::Rollups {
                TableStore::open(t, config.clone())
            } else {
                TableStore::open_reader(t, &config.data_dir, config.remote.clone())
            }
        })
    }

    /// Canonicalises the data directory, then opens each table with `open`.
    fn open_with(
        config: StoreConfig,
        open: impl Fn(Table, &StoreConfig) -> Result<Arc<TableStore>>,
    ) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::io(&config.data_dir, e))?;
        let data_dir =
            std::fs::canonicalize(&config.data_dir).map_err(|e| Error::io(&config.data_dir, e))?;
        let config = StoreConfig {
            data_dir: data_dir.clone(),
            ..config
        };
        let mut tables = BTreeMap::new();
        for t in Table::ALL {
            tables.insert(t, open(t, &config)?);
        }
        Ok(Storage {
            data_dir,
            tables: Arc::new(tables),
        })
    }

    /// The object store holding the Parquet files, when they are not on local disk.
    pub fn remote(&self) -> Option<&Arc<remote::Remote>> {
        self.tables.values().next().and_then(|t| t.remote())
    }

    /// Every table, in a fixed order.
    pub fn tables(&self) -> impl Iterator<Item = &Arc<TableStore>> {
        self.tables.values()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn table(&self, table: Table) -> &Arc<TableStore> {
        // Every table is opened in `open`, so the map holds each key.
        &self.tables[&table]
    }

    /// Appends a batch to a table durably (see [`TableStore::write`]).
    pub async fn write(&self, table: Table, batch: RecordBatch) -> Result<()> {
        self.table(table).write(batch).await
    }

    /// Writes everything buffered into Parquet files.
    pub async fn flush(&self) -> Result<()> {
        for t in self.tables.values() {
            t.flush().await?;
        }
        Ok(())
    }

    /// Stops accepting writes and leaves every acknowledged row in Parquet files.
    pub fn close(&self) {
        for t in self.tables.values() {
            t.close();
            t.delete_retired(true); // no query is running any more
        }
    }
}

/// Compaction and retention settings of every table.
#[derive(Debug, Clone, Default)]
pub struct Upkeep {
    /// `None` turns compaction off.
    pub compaction: Option<CompactionPolicy>,
    pub retention: BTreeMap<Table, Retention>,
}

/// Runs compaction and retention over a storage's tables, pass after pass.
#[derive(Debug)]
pub struct Maintainer {
    storage: Storage,
    upkeep: Upkeep,
    summaries: std::collections::HashMap<PathBuf, parquet_file::FileSummary>,
}

/// What one maintenance pass did, summed over the tables.
#[derive(Debug, Clone, Copy, Default)]
pub struct MaintenanceReport {
    pub compactions: usize,
    pub expired: Expired,
    pub deleted: usize,
}

impl Maintainer {
    pub fn new(storage: Storage, upkeep: Upkeep) -> Self {
        Maintainer {
            storage,
            upkeep,
            summaries: Default::default(),
        }
    }

    /// One pass at wall-clock time `now_ns`: expire, compact, delete retired files.
    /// Blocking; errors are logged per table and do not stop the other tables.
    ///
    /// Compactions go one at a time, table after table, with retention and the deletion of
    /// retired files between them: under a backlog of small files (ingest faster than
    /// compaction) the size bound still holds and the merged inputs still leave the disk.
    /// `cancel` ends the pass after the compaction under way (at shutdown).
    pub fn run_once(&mut self, now_ns: i64, cancel: &AtomicBool) -> MaintenanceReport {
        let mut report = MaintenanceReport::default();
        let mut merging: Vec<bool> = vec![true; self.storage.tables().count()];
        while merging.iter().any(|&m| m) && !cancel.load(Ordering::Relaxed) {
            for (t, merging) in self.storage.tables().zip(merging.iter_mut()) {
                if let Some(r) = self.upkeep.retention.get(&t.table()) {
                    match t.expire(*r, now_ns, &mut self.summaries) {
                        Ok(e) => {
                            report.expired.files += e.files;
                            report.expired.bytes += e.bytes;
                            report.expired.rows += e.rows;
                        }
                        Err(e) => {
                            tracing::warn!(table = %t.table(), error = %e, "retention failed")
                        }
                    }
                }
                *merging = *merging
                    && match self.upkeep.compaction.map(|policy| t.compact_once(policy)) {
                        Some(Ok(Some(_))) => {
                            report.compactions += 1;
                            true
                        }
                        Some(Ok(None)) | None => false,
                        Some(Err(e)) => {
                            tracing::warn!(table = %t.table(), error = %e, "compaction failed");
                            false
                        }
                    };
                report.deleted += t.delete_retired(false);
            }
        }
        report
    }
}
