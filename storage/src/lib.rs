//! # meshscope-storage
//!
//! Where acknowledged telemetry lives: a write-ahead log per table, in-memory Arrow batches
//! that SQL sees at once, and plain Parquet files under `<data-dir>/<table>/` that any engine
//! can read.
//!
//! ## Layout
//! - [`wal`]: the write-ahead log (segments, group commit, replay that cuts torn tails).
//! - [`table_store`]: one table's write path (log writer thread, flusher thread) and the
//!   [`Snapshot`] a query reads.
//! - [`parquet_file`]: Parquet naming, sorted zstd writing (temp file + rename), listing.
//! - [`provider`]: the DataFusion `TableProvider` over a snapshot.
//!
//! The guarantee: once [`Storage::write`] returns `Ok`, the rows survive `kill -9`
//! (fsynced log) and appear in exactly one of the log or a Parquet file after a restart.

pub mod error;
pub mod parquet_file;
pub mod provider;
pub mod table_store;
pub mod wal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use meshscope_proto::Table;

pub use error::{Error, Result};
pub use provider::StoredTable;
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
        std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::io(&config.data_dir, e))?;
        let data_dir =
            std::fs::canonicalize(&config.data_dir).map_err(|e| Error::io(&config.data_dir, e))?;
        let config = StoreConfig {
            data_dir: data_dir.clone(),
            ..config
        };
        let mut tables = BTreeMap::new();
        for t in Table::ALL {
            tables.insert(t, TableStore::open(t, config.clone())?);
        }
        Ok(Storage {
            data_dir,
            tables: Arc::new(tables),
        })
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
        }
    }
}
