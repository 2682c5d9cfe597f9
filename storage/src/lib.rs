//! # meshscope-storage
//!
//! Where acknowledged telemetry lives: a write-ahead log per table, in-memory Arrow batches
//! that SQL sees at once, and plain Parquet files under `<data-dir>/<table>/` that any engine
//! can read.
//!
//! ## Layout
//! - [`table_def`]: [`TableDef`], what storage knows of a table (schema, time column, who
//!   writes it, its files' sort order, encodings and bloom filters); the signal tables'.
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
pub mod table_def;
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
pub use scan::{ColumnScan, Rows, ScanPart};
pub use table_def::{Source, TableDef};
pub use table_store::{Snapshot, Stats, StoreConfig, TableStore};

use table_def::SIGNALS;

/// Every table of one data directory: the three OTLP signal tables, and the derived tables
/// its opener named.
#[derive(Debug, Clone)]
pub struct Storage {
    data_dir: PathBuf,
    /// In [`table_def::SIGNALS`]' order, then the derived tables in the order given.
    tables: Arc<Vec<Arc<TableStore>>>,
}

impl Storage {
    /// Opens (or creates) the data directory and replays each table's log: the signal
    /// tables and `derived` (tables another stage computes, such as the query side's
    /// rollups).
    pub fn open(config: StoreConfig, derived: &[&'static TableDef]) -> Result<Self> {
        Self::open_with(config, derived, |t, config| {
            TableStore::open(t, config.clone())
        })
    }

    /// Opens the data directory as a query node: the signal tables read every
    /// collector's Parquet files (what they have flushed); the derived tables are this
    /// node's own, written under `config.writer`.
    pub fn open_query(config: StoreConfig, derived: &[&'static TableDef]) -> Result<Self> {
        Self::open_with(config, derived, |t, config| match t.source {
            Source::Signal(_) => {
                TableStore::open_reader(t, &config.data_dir, config.remote.clone())
            }
            Source::Derived => TableStore::open(t, config.clone()),
        })
    }

    /// Canonicalises the data directory, then opens each table with `open`.
    fn open_with(
        config: StoreConfig,
        derived: &[&'static TableDef],
        open: impl Fn(&'static TableDef, &StoreConfig) -> Result<Arc<TableStore>>,
    ) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::io(&config.data_dir, e))?;
        let data_dir =
            std::fs::canonicalize(&config.data_dir).map_err(|e| Error::io(&config.data_dir, e))?;
        let config = StoreConfig {
            data_dir: data_dir.clone(),
            ..config
        };
        let mut tables = Vec::with_capacity(SIGNALS.len() + derived.len());
        for &t in SIGNALS.iter().chain(derived) {
            if tables.iter().any(|s: &Arc<TableStore>| s.table() == t) {
                return Err(Error::DuplicateTable { table: t.name });
            }
            tables.push(open(t, &config)?);
        }
        Ok(Storage {
            data_dir,
            tables: Arc::new(tables),
        })
    }

    /// The object store holding the Parquet files, when they are not on local disk.
    pub fn remote(&self) -> Option<&Arc<remote::Remote>> {
        self.tables.first().and_then(|t| t.remote())
    }

    /// Every table, in a fixed order.
    pub fn tables(&self) -> impl Iterator<Item = &Arc<TableStore>> {
        self.tables.iter()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// An OTLP signal's table (always open).
    pub fn table(&self, table: Table) -> &Arc<TableStore> {
        let i = match table {
            Table::Spans => 0,
            Table::Logs => 1,
            Table::Metrics => 2,
        };
        // `open_with` puts the signal tables first, in this order.
        &self.tables[i]
    }

    /// Any table by its name, if this storage opened it.
    pub fn named(&self, name: &str) -> Option<&Arc<TableStore>> {
        self.tables.iter().find(|t| t.table().name == name)
    }

    /// Appends a batch to a table durably (see [`TableStore::write`]).
    pub async fn write(&self, table: Table, batch: RecordBatch) -> Result<()> {
        self.table(table).write(batch).await
    }

    /// Writes everything buffered into Parquet files.
    pub async fn flush(&self) -> Result<()> {
        for t in self.tables.iter() {
            t.flush().await?;
        }
        Ok(())
    }

    /// Stops accepting writes and leaves every acknowledged row in Parquet files.
    pub fn close(&self) {
        for t in self.tables.iter() {
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
    /// Per table, by name.
    pub retention: BTreeMap<&'static str, Retention>,
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
                if let Some(r) = self.upkeep.retention.get(t.table().name) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table_def::{FileRules, SortKey};

    fn derived_schema() -> arrow::datatypes::SchemaRef {
        use arrow::datatypes::{DataType, Field, Schema};
        Arc::new(Schema::new(vec![
            Field::new("minute", meshscope_proto::schema::timestamp_type(), false),
            Field::new("n", DataType::Int64, false),
        ]))
    }

    static DERIVED: TableDef = TableDef {
        name: "derived",
        schema: derived_schema,
        time_column: "minute",
        source: Source::Derived,
        flushed: FileRules {
            sort: &[SortKey::Column("minute")],
            unique: &[],
            blooms: &[],
        },
        compacted: FileRules {
            sort: &[SortKey::Column("minute")],
            unique: &[],
            blooms: &[],
        },
    };

    /// A query node reads the signal tables and writes the derived ones itself; a table
    /// named twice is refused.
    #[test]
    fn a_query_node_reads_signals_and_writes_what_it_derives() {
        let dir = tempfile::tempdir().expect("tmp");
        let storage = Storage::open_query(StoreConfig::new(dir.path()), &[&DERIVED]).expect("open");
        let names: Vec<_> = storage.tables().map(|t| t.table().name).collect();
        assert_eq!(names, ["spans", "logs", "metrics", "derived"]);
        for t in Table::ALL {
            assert!(storage.table(t).is_reader(), "{t}");
            assert_eq!(storage.table(t).table().name, t.name());
        }
        let derived = storage.named("derived").expect("derived is open");
        assert!(!derived.is_reader());
        assert!(storage.named("rollups").is_none());

        let twice = Storage::open(StoreConfig::new(dir.path()), &[&table_def::SPANS]);
        assert!(
            matches!(twice, Err(Error::DuplicateTable { table: "spans" })),
            "{twice:?}"
        );
    }
}
