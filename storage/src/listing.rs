//! A query node's read-only view of a table: every collector's flushed Parquet files,
//! listed again in the background each second, so a query's [`Snapshot`] never waits on
//! the disk or the object store.
//!
//! ```text
//!  lister (thread, or a task for an object store) ── every second ──▶ files (live ones)
//!        └─ files new since the last listing: their minutes → arrivals (for /metrics)
//!  snapshot() ── clone of the latest list, no I/O
//! ```
//!
//! The writer side ([`crate::table_store`]) answers the same [`Snapshot`] from its own
//! files and buffers; [`crate::TableStore`] is the one front both hide behind.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::table_def::TableDef;

use crate::arrivals::{self, WrittenMinutes};
use crate::error::{Error, Result};
use crate::parquet_file::{self, ParquetFile};
use crate::remote::Remote;
use crate::table_store::Snapshot;

/// How often the files are listed again.
const RELIST: Duration = Duration::from_secs(1);

/// Every writer's live files of one table, as last listed.
pub(crate) struct TableListing {
    table: &'static TableDef,
    dir: PathBuf,
    remote: Option<Arc<Remote>>,
    files: Mutex<Vec<ParquetFile>>,
    /// Minutes of the files that appeared since the first listing (a query node's view of
    /// arrivals: what collectors flushed since).
    pub(crate) arrivals: Arc<WrittenMinutes>,
}

impl TableListing {
    /// Lists the table once (so the first query sees what is there) and starts listing it
    /// again every second for as long as the listing lives.
    pub(crate) fn open(
        table: &'static TableDef,
        data_dir: &Path,
        remote: Option<Arc<Remote>>,
    ) -> Result<Arc<Self>> {
        let dir = data_dir.join(table.name());
        let first = match &remote {
            Some(r) => r.list(table)?,
            None => {
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                parquet_file::list(&dir)?
            }
        };
        let listing = Arc::new(TableListing {
            table,
            dir,
            remote: remote.clone(),
            files: Mutex::new(parquet_file::live(first).0),
            arrivals: Arc::default(),
        });
        let weak = Arc::downgrade(&listing);
        match remote {
            // Object-store listings are async: a task on the store's runtime.
            Some(r) => {
                let store = Arc::clone(&r);
                r.spawn(async move {
                    loop {
                        tokio::time::sleep(RELIST).await;
                        let Some(listing) = weak.upgrade() else { return };
                        match store.list_async(table).await {
                            Ok(files) => listing.replace(files, false),
                            Err(e) => {
                                tracing::warn!(table = %table, error = %e, "cannot list Parquet files")
                            }
                        }
                    }
                });
            }
            // A directory listing (and reading new files' footers) is blocking: a thread.
            None => {
                std::thread::Builder::new()
                    .name(format!("list-{}", table.name()))
                    .spawn(move || relist_local(&weak))
                    .map_err(|e| Error::io(Path::new("thread"), e))?;
            }
        }
        Ok(listing)
    }

    pub(crate) fn table(&self) -> &'static TableDef {
        self.table
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn remote(&self) -> Option<&Arc<Remote>> {
        self.remote.as_ref()
    }

    /// The files as last listed.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            files: self.lock().clone(),
            batches: Vec::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ParquetFile>> {
        // Every update is a swap: a poisoned lock still holds a whole list.
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a new listing; with `note_arrivals`, then records the minutes of the
    /// files that were not there before. Publishing first means a consumer that takes the
    /// arrivals and then queries always finds the files they came from.
    fn replace(&self, listed: Vec<ParquetFile>, note_arrivals: bool) {
        let now = parquet_file::live(listed).0;
        let before = std::mem::replace(&mut *self.lock(), now.clone());
        if note_arrivals {
            self.note_arrivals(&before, &now);
        }
    }

    /// Records the minutes of the files in `now` that a collector flushed since `before`
    /// was listed: each file's time range from its footer, every minute of it with the
    /// file's earliest time. A compaction's output (it covers files listed before) brings
    /// nothing new.
    fn note_arrivals(&self, before: &[ParquetFile], now: &[ParquetFile]) {
        let known: HashSet<&Path> = before.iter().map(|f| f.path.as_path()).collect();
        for f in now.iter().filter(|f| !known.contains(f.path.as_path())) {
            if before.iter().any(|b| b.within(f)) {
                continue;
            }
            let Ok(summary) = parquet_file::summary(self.table, f, None) else {
                continue;
            };
            let (Some(min), Some(max)) = (summary.min_time, summary.max_time) else {
                continue;
            };
            self.arrivals.record(arrivals::minutes_between(min, max));
        }
    }
}

/// The local lister's loop: ends when the listing is dropped.
fn relist_local(listing: &Weak<TableListing>) {
    loop {
        std::thread::sleep(RELIST);
        let Some(listing) = listing.upgrade() else {
            return;
        };
        match parquet_file::list(&listing.dir) {
            Ok(files) => listing.replace(files, true),
            Err(e) => {
                tracing::warn!(table = %listing.table, error = %e, "cannot list Parquet files")
            }
        }
    }
}
