//! One table: [`TableStore`] is what queries and ingest hold; behind it the table is
//! either written here ([`TableWriter`]: the log, the buffers and this writer's files) or,
//! on a query node, read from every collector's files ([`crate::listing::TableListing`]).
//! Both answer a [`Snapshot`].
//!
//! The write path:
//!
//! ```text
//!  write(batch) ──queue──▶ WAL writer thread ──group commit (fdatasync)──▶ ack
//!                              │ append to `active` (SQL sees it at once)
//!                              │ when active is big or old: rotate the WAL, active → frozen
//!                              ▼
//!                        flusher thread ── sorted zstd Parquet (tmp + rename + fsync) ──▶ files
//!                              └─ frozen dropped, WAL segments deleted
//! ```
//!
//! Queries read a [`Snapshot`]: the Parquet files plus the frozen and active batches, taken
//! under one lock, so each row is seen exactly once whatever the flusher is doing.
//! Memory is bounded: a write that would take the buffered bytes over the limit, or find the
//! queue full, is refused with [`Error::Overloaded`] instead of waiting.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::table_def::TableDef;
use arrow::record_batch::RecordBatch;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::listing::TableListing;
use crate::parquet_file::{self, ParquetFile};
use crate::remote::Remote;
use crate::wal::{self, Segment, Wal};

/// Limits and thresholds of a table's write path.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The data directory; the table lives in `<data_dir>/<table>/`, its log in
    /// `<data_dir>/wal/<table>/`.
    pub data_dir: PathBuf,
    /// Write a Parquet file once this many bytes of Arrow data are buffered.
    pub flush_bytes: usize,
    /// Write a Parquet file once the oldest buffered batch is this old.
    pub flush_interval: Duration,
    /// Refuse writes while this many bytes are buffered (queued, active and frozen).
    pub max_buffered_bytes: usize,
    /// How many write requests may wait for the log writer.
    pub queue_depth: usize,
    /// This node's id in file names and its log folder (`""` for `serve`; the `--node-id` of
    /// a collector, so several write into one folder without clashing).
    pub writer: String,
    /// How long files replaced by a compaction or expired stay on disk for the queries
    /// that already planned to read them.
    pub retire_grace: Duration,
    /// Parquet files on an object store instead of `data_dir` (the log stays local).
    pub remote: Option<Arc<Remote>>,
}

impl StoreConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            flush_bytes: 256 << 20,
            flush_interval: Duration::from_secs(300),
            max_buffered_bytes: 1 << 30,
            queue_depth: 1024,
            writer: String::new(),
            retire_grace: Duration::from_secs(300),
            remote: None,
        }
    }

    /// Where this node's write-ahead log of `table` lives.
    pub fn wal_dir(&self, table: &TableDef) -> PathBuf {
        let wal = self.data_dir.join("wal");
        if self.writer.is_empty() {
            wal.join(table.name())
        } else {
            wal.join(&self.writer).join(table.name())
        }
    }
}

/// What a query reads: every durable file and every buffered batch, each once.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub files: Vec<ParquetFile>,
    pub batches: Vec<RecordBatch>,
}

/// Counters of a table's write path, for `/metrics` and the benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    /// Rows acknowledged (durable in the log).
    pub rows_written: AtomicU64,
    /// Write requests acknowledged.
    pub requests: AtomicU64,
    /// Group commits (fdatasync calls) of the log.
    pub commits: AtomicU64,
    /// Bytes appended to the log.
    pub wal_bytes: AtomicU64,
    /// Rows written into Parquet files.
    pub rows_flushed: AtomicU64,
    /// Parquet files written.
    pub files_written: AtomicU64,
    /// Bytes of Parquet written.
    pub parquet_bytes: AtomicU64,
    /// Writes refused because the queue or the buffers were full.
    pub overloaded: AtomicU64,
    /// Bytes of Arrow data buffered (queued, active, frozen).
    pub buffered_bytes: AtomicUsize,
    /// Compactions finished, files they merged, and bytes before and after.
    pub compactions: AtomicU64,
    pub compacted_files: AtomicU64,
    pub compacted_bytes_in: AtomicU64,
    pub compacted_bytes_out: AtomicU64,
    /// Files, bytes and rows removed by retention.
    pub expired_files: AtomicU64,
    pub expired_bytes: AtomicU64,
    pub expired_rows: AtomicU64,
}

enum Command {
    Write {
        batch: RecordBatch,
        payload: Vec<u8>,
        bytes: usize,
        ack: oneshot::Sender<Result<()>>,
    },
    Flush {
        ack: oneshot::Sender<Result<()>>,
    },
}

struct FlushJob {
    batches: Vec<RecordBatch>,
    bytes: usize,
    first_seq: u64,
    last_seq: u64,
    segments: Vec<Segment>,
    acks: Vec<oneshot::Sender<Result<()>>>,
}

#[derive(Default)]
pub(crate) struct State {
    /// This writer's live files, in sequence order.
    pub(crate) files: Vec<ParquetFile>,
    frozen: Vec<RecordBatch>,
    active: Vec<RecordBatch>,
    active_bytes: usize,
    active_since: Option<Instant>,
    /// Files no query will plan to read any more, deleted once their grace has passed.
    pub(crate) retired: Vec<(ParquetFile, Instant)>,
}

pub(crate) struct Shared {
    pub(crate) table: &'static TableDef,
    pub(crate) dir: PathBuf,
    pub(crate) config: StoreConfig,
    state: Mutex<State>,
    /// Signalled when `frozen` empties (a flush finished).
    flushed: Condvar,
    pub(crate) stats: Stats,
    /// Serialises compaction and retention of this table.
    pub(crate) maintenance: Mutex<()>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is a push
        // or a swap), so recover from poisoning rather than fail every later request.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One table as queries read it and, where this process ingests it, as it is written.
pub struct TableStore {
    files: Files,
    /// The Parquet files' bloom filters, kept for queries (see [`crate::bloom_cache`]).
    pub(crate) blooms: Arc<crate::bloom_cache::BloomCache>,
    /// Which files can hold a trace id (see [`crate::trace_index`]).
    pub(crate) traces: Arc<crate::trace_index::TraceIndex>,
}

/// Where a table's files come from.
enum Files {
    /// This process writes the table.
    Written(TableWriter),
    /// A query node: every collector's flushed files.
    Listed(Arc<TableListing>),
}

/// A table this process writes: its log writer and flusher threads, its buffers and files.
pub(crate) struct TableWriter {
    pub(crate) shared: Arc<Shared>,
    /// The minutes acknowledged writes touched (see [`crate::arrivals`]).
    arrivals: crate::arrivals::WrittenMinutes,
    tx: Mutex<Option<SyncSender<Command>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A query node's counters: nothing is written there.
static NO_WRITES: LazyLock<Stats> = LazyLock::new(Stats::default);

impl std::fmt::Debug for TableStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableStore")
            .field("table", &self.table())
            .field("read_only", &self.is_reader())
            .finish()
    }
}

impl TableStore {
    fn new(files: Files) -> Arc<Self> {
        Arc::new(TableStore {
            files,
            blooms: Arc::new(crate::bloom_cache::BloomCache::new(
                crate::bloom_cache::DEFAULT_BUDGET,
            )),
            traces: Arc::new(crate::trace_index::TraceIndex::new(
                "trace_id",
                crate::bloom_cache::DEFAULT_BUDGET,
            )),
        })
    }

    /// Opens the table for writing: lists its Parquet files, replays the log entries not
    /// yet in one, and starts the writer and flusher threads.
    pub fn open(table: &'static TableDef, config: StoreConfig) -> Result<Arc<Self>> {
        TableWriter::open(table, config).map(|w| Self::new(Files::Written(w)))
    }

    /// Opens a table read-only for a query node: every writer's Parquet files in
    /// `<data_dir>/<table>/` (or the bucket), listed again each second in the background.
    /// It sees what the collectors have flushed.
    pub fn open_reader(
        table: &'static TableDef,
        data_dir: &Path,
        remote: Option<Arc<Remote>>,
    ) -> Result<Arc<Self>> {
        TableListing::open(table, data_dir, remote).map(|l| Self::new(Files::Listed(l)))
    }

    /// The writer, where this process writes the table (compaction and retention are its).
    pub(crate) fn writer(&self) -> Option<&TableWriter> {
        match &self.files {
            Files::Written(w) => Some(w),
            Files::Listed(_) => None,
        }
    }

    pub fn table(&self) -> &'static TableDef {
        match &self.files {
            Files::Written(w) => w.shared.table,
            Files::Listed(l) => l.table(),
        }
    }

    /// The object store holding the files, when they are not on local disk.
    pub(crate) fn remote(&self) -> Option<&Arc<Remote>> {
        match &self.files {
            Files::Written(w) => w.shared.config.remote.as_ref(),
            Files::Listed(l) => l.remote(),
        }
    }

    /// The URL DataFusion knows the table's files by: the bucket, or the local disk.
    pub fn object_store_url(&self) -> datafusion::execution::object_store::ObjectStoreUrl {
        match self.remote() {
            Some(r) => r.url().clone(),
            None => datafusion::execution::object_store::ObjectStoreUrl::local_filesystem(),
        }
    }

    /// Whether this is a query node's read-only view.
    pub fn is_reader(&self) -> bool {
        matches!(self.files, Files::Listed(_))
    }

    /// The folder of this table's Parquet files.
    pub fn dir(&self) -> &Path {
        match &self.files {
            Files::Written(w) => &w.shared.dir,
            Files::Listed(l) => l.dir(),
        }
    }

    /// The write path's counters (all zero on a query node).
    pub fn stats(&self) -> &Stats {
        match &self.files {
            Files::Written(w) => &w.shared.stats,
            Files::Listed(_) => &NO_WRITES,
        }
    }

    /// Appends a batch durably: returns once it is in the log (fsynced) and visible to
    /// queries. Refuses at once, without waiting, when the table is overloaded.
    pub async fn write(&self, batch: RecordBatch) -> Result<()> {
        match &self.files {
            Files::Written(w) => w.write(batch).await,
            Files::Listed(l) => Err(Error::Closed {
                table: l.table().name(),
                why: "this is a read-only query node".into(),
            }),
        }
    }

    /// Writes everything buffered into Parquet and waits until it is durable there
    /// (nothing to do on a query node).
    pub async fn flush(&self) -> Result<()> {
        match &self.files {
            Files::Written(w) => w.flush().await,
            Files::Listed(_) => Ok(()),
        }
    }

    /// What a query reads now. Never blocks on I/O: a writer's files and buffers are in
    /// memory, a query node's listing is refreshed in the background.
    pub fn snapshot(&self) -> Snapshot {
        match &self.files {
            Files::Written(w) => w.snapshot(),
            Files::Listed(l) => l.snapshot(),
        }
    }

    /// The minutes of the table's time column that new data touched since the last call,
    /// each with the earliest time written into it: acknowledged writes of this process, or
    /// on a query node the files collectors flushed since (see [`crate::arrivals`]).
    pub fn take_written_minutes(&self) -> crate::arrivals::Minutes {
        match &self.files {
            Files::Written(w) => w.arrivals.take(),
            Files::Listed(l) => l.arrivals.take(),
        }
    }

    /// Stops accepting writes, writes everything buffered into Parquet, and stops the
    /// threads (a query node's lister stops when the table is dropped).
    pub fn close(&self) {
        if let Files::Written(w) = &self.files {
            w.close();
        }
    }
}

impl TableWriter {
    fn open(table: &'static TableDef, config: StoreConfig) -> Result<TableWriter> {
        let dir = config.data_dir.join(table.name());
        let remote = config.remote.as_deref();
        let all = match remote {
            Some(r) => r.list(table)?,
            None => {
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                parquet_file::remove_unfinished(&dir, &config.writer)?;
                parquet_file::list(&dir)?
            }
        };
        let own = all
            .into_iter()
            .filter(|f| f.writer == config.writer)
            .collect();
        // Files a compaction merged but a crash kept it from deleting.
        let (files, superseded) = parquet_file::live(own);
        for f in superseded {
            tracing::info!(file = %f.path.display(), "removing a file that a compaction replaced");
            parquet_file::delete(&f, remote)?;
        }
        let durable = files.iter().map(|f| f.last_seq).max().unwrap_or(0);
        let wal_dir = config.wal_dir(table);
        let (wal, entries) = Wal::replay(&wal_dir, |entries| {
            entries
                .iter()
                .map(|e| e.seq)
                .max()
                .unwrap_or(0)
                .max(durable)
                + 1
        })?;

        let mut state = State {
            files,
            ..State::default()
        };
        let (mut replayed_rows, mut next_seq) = (0usize, durable + 1);
        for entry in entries {
            next_seq = next_seq.max(entry.seq + 1);
            if entry.seq <= durable {
                continue; // already in a Parquet file
            }
            // An entry an older version logged has that version's columns: given the
            // table's current schema, as a file of that version is when read.
            let decoded = wal::decode(&entry.payload).and_then(|batches| {
                batches
                    .into_iter()
                    .map(|b| crate::parquet_file::adapt(b, &table.schema()))
                    .collect::<Result<Vec<_>>>()
            });
            match decoded {
                Ok(batches) => {
                    for b in batches {
                        replayed_rows += b.num_rows();
                        state.active_bytes += b.get_array_memory_size();
                        state.active.push(b);
                    }
                }
                Err(e) => tracing::error!(table = %table, seq = entry.seq, error = %e,
                    "skipping an undecodable write-ahead-log entry"),
            }
        }
        if !state.active.is_empty() {
            state.active_since = Some(Instant::now());
            tracing::info!(table = %table, rows = replayed_rows, "replayed the write-ahead log");
        }

        let stats = Stats::default();
        stats
            .buffered_bytes
            .store(state.active_bytes, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            table,
            dir,
            config: config.clone(),
            state: Mutex::new(state),
            flushed: Condvar::new(),
            stats,
            maintenance: Mutex::new(()),
        });
        let (tx, rx) = mpsc::sync_channel(config.queue_depth);
        let (flush_tx, flush_rx) = mpsc::channel();
        let writer = Writer {
            shared: Arc::clone(&shared),
            wal,
            next_seq,
            first_unfrozen: durable + 1,
            flush_tx,
        };
        let w = std::thread::Builder::new()
            .name(format!("wal-{}", table.name()))
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::io(Path::new("thread"), e))?;
        let s = Arc::clone(&shared);
        let f = std::thread::Builder::new()
            .name(format!("flush-{}", table.name()))
            .spawn(move || flusher(&s, flush_rx))
            .map_err(|e| Error::io(Path::new("thread"), e))?;
        Ok(TableWriter {
            arrivals: Default::default(),
            shared,
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(vec![w, f]),
        })
    }

    fn sender(&self) -> Result<SyncSender<Command>> {
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Error::Closed {
                table: self.shared.table.name(),
                why: "shutting down".into(),
            })
    }

    async fn write(&self, batch: RecordBatch) -> Result<()> {
        let table = self.shared.table;
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if batch.schema() != table.schema() {
            return Err(Error::SchemaMismatch {
                table: table.name(),
            });
        }
        let stats = &self.shared.stats;
        let bytes = batch.get_array_memory_size();
        let buffered = stats.buffered_bytes.fetch_add(bytes, Ordering::AcqRel);
        if buffered + bytes > self.shared.config.max_buffered_bytes {
            stats.buffered_bytes.fetch_sub(bytes, Ordering::AcqRel);
            stats.overloaded.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Overloaded {
                table: table.name(),
                why: "ingest buffers are full",
            });
        }
        let release = || {
            stats.buffered_bytes.fetch_sub(bytes, Ordering::AcqRel);
        };
        let payload = match wal::encode(&batch) {
            Ok(p) => p,
            Err(e) => {
                release();
                return Err(e);
            }
        };
        let minutes = crate::arrivals::minutes_of(&batch, table.time_column());
        let (ack, done) = oneshot::channel();
        let sender = match self.sender() {
            Ok(s) => s,
            Err(e) => {
                release();
                return Err(e);
            }
        };
        match sender.try_send(Command::Write {
            batch,
            payload,
            bytes,
            ack,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                release();
                stats.overloaded.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Overloaded {
                    table: table.name(),
                    why: "write-ahead-log queue is full",
                });
            }
            Err(TrySendError::Disconnected(_)) => {
                release();
                return Err(Error::Closed {
                    table: table.name(),
                    why: "writer stopped".into(),
                });
            }
        }
        let written = done.await.unwrap_or_else(|_| {
            Err(Error::Closed {
                table: table.name(),
                why: "writer stopped".into(),
            })
        });
        if written.is_ok() {
            self.arrivals.record(minutes);
        }
        written
    }

    async fn flush(&self) -> Result<()> {
        let (ack, done) = oneshot::channel();
        self.sender()?
            .send(Command::Flush { ack })
            .map_err(|_| Error::Closed {
                table: self.shared.table.name(),
                why: "writer stopped".into(),
            })?;
        done.await.unwrap_or_else(|_| {
            Err(Error::Closed {
                table: self.shared.table.name(),
                why: "writer stopped".into(),
            })
        })
    }

    fn snapshot(&self) -> Snapshot {
        let st = self.shared.lock();
        Snapshot {
            files: st.files.clone(),
            batches: st.frozen.iter().chain(st.active.iter()).cloned().collect(),
        }
    }

    fn close(&self) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(tx); // the writer flushes what it holds when its queue closes
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for TableWriter {
    fn drop(&mut self) {
        self.close();
    }
}

/// The log writer: owns the WAL, assigns sequence numbers, commits groups, freezes.
struct Writer {
    shared: Arc<Shared>,
    wal: Wal,
    next_seq: u64,
    first_unfrozen: u64,
    flush_tx: mpsc::Sender<FlushJob>,
}

/// A write waiting for the group commit: its batch, log payload, size and acknowledgement.
type PendingWrite = (RecordBatch, Vec<u8>, usize, oneshot::Sender<Result<()>>);

/// The most requests one group commit takes.
const MAX_GROUP: usize = 256;

impl Writer {
    fn run(mut self, rx: Receiver<Command>) {
        let tick = Duration::from_millis(250);
        loop {
            let first = match rx.recv_timeout(tick) {
                Ok(cmd) => Some(cmd),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut writes = Vec::new();
            let mut flushes = Vec::new();
            let mut next = first;
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Write {
                        batch,
                        payload,
                        bytes,
                        ack,
                    } => writes.push((batch, payload, bytes, ack)),
                    Command::Flush { ack } => flushes.push(ack),
                }
                if writes.len() < MAX_GROUP {
                    next = rx.try_recv().ok();
                }
            }
            if !writes.is_empty() {
                self.commit_group(writes);
            }
            if !flushes.is_empty() {
                self.freeze_and_wait(flushes);
            } else if self.due() {
                self.freeze(Vec::new(), false);
            }
        }
        // Queue closed: make everything durable in Parquet before stopping.
        let (ack, done) = oneshot::channel();
        self.freeze_and_wait(vec![ack]);
        drop(self.flush_tx); // lets the flusher finish its last job and stop
        if let Ok(Err(e)) = done.blocking_recv() {
            tracing::error!(table = %self.shared.table, error = %e, "final flush failed; the log keeps the data");
        }
    }

    fn commit_group(&mut self, writes: Vec<PendingWrite>) {
        let first_seq = self.next_seq;
        let mut wal_bytes = 0u64;
        for (_, payload, _, _) in &writes {
            self.wal.append(self.next_seq, payload);
            self.next_seq += 1;
            wal_bytes += payload.len() as u64;
        }
        let stats = &self.shared.stats;
        if let Err(e) = self.wal.commit() {
            tracing::error!(table = %self.shared.table, error = %e, "write-ahead-log commit failed");
            self.next_seq = first_seq;
            let msg = e.to_string();
            for (_, _, bytes, ack) in writes {
                stats.buffered_bytes.fetch_sub(bytes, Ordering::AcqRel);
                let _ = ack.send(Err(Error::Closed {
                    table: self.shared.table.name(),
                    why: msg.clone(),
                }));
            }
            return;
        }
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.wal_bytes.fetch_add(wal_bytes, Ordering::Relaxed);
        let mut acks = Vec::with_capacity(writes.len());
        {
            let mut st = self.shared.lock();
            for (batch, _, bytes, ack) in writes {
                stats
                    .rows_written
                    .fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
                st.active_bytes += bytes;
                st.active.push(batch);
                acks.push(ack);
            }
            st.active_since.get_or_insert_with(Instant::now);
        }
        stats
            .requests
            .fetch_add(acks.len() as u64, Ordering::Relaxed);
        for ack in acks {
            let _ = ack.send(Ok(()));
        }
    }

    fn due(&self) -> bool {
        let st = self.shared.lock();
        st.frozen.is_empty()
            && !st.active.is_empty()
            && (st.active_bytes >= self.shared.config.flush_bytes
                || st
                    .active_since
                    .is_some_and(|t| t.elapsed() >= self.shared.config.flush_interval))
    }

    /// Waits for a running flush to end, then freezes what is active and hands `acks` to
    /// the flusher (they are answered once the file is durable).
    fn freeze_and_wait(&mut self, acks: Vec<oneshot::Sender<Result<()>>>) {
        {
            let mut st = self.shared.lock();
            while !st.frozen.is_empty() {
                st = self
                    .shared
                    .flushed
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        self.freeze(acks, true);
    }

    fn freeze(&mut self, acks: Vec<oneshot::Sender<Result<()>>>, forced: bool) {
        {
            let st = self.shared.lock();
            if !st.frozen.is_empty() {
                return;
            }
            if st.active.is_empty() {
                drop(st);
                for ack in acks {
                    let _ = ack.send(Ok(()));
                }
                return;
            }
        }
        // The rotation fsyncs the finished segment and the directory: outside the lock
        // every query's `snapshot()` takes. Only this thread appends to `active` or
        // freezes it, so what was checked above still holds after.
        let segments = match self.wal.rotate(self.next_seq) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(table = %self.shared.table, error = %e, "cannot rotate the write-ahead log");
                let msg = e.to_string();
                for ack in acks {
                    let _ = ack.send(Err(Error::Closed {
                        table: self.shared.table.name(),
                        why: msg.clone(),
                    }));
                }
                return;
            }
        };
        let mut st = self.shared.lock();
        let batches = std::mem::take(&mut st.active);
        st.frozen = batches.clone();
        let bytes = std::mem::take(&mut st.active_bytes);
        st.active_since = None;
        drop(st);
        let job = FlushJob {
            batches,
            bytes,
            first_seq: self.first_unfrozen,
            last_seq: self.next_seq - 1,
            segments,
            acks,
        };
        self.first_unfrozen = self.next_seq;
        tracing::debug!(table = %self.shared.table, forced, first = job.first_seq, last = job.last_seq, "freezing");
        if let Err(mpsc::SendError(job)) = self.flush_tx.send(job) {
            for ack in job.acks {
                let _ = ack.send(Err(Error::Closed {
                    table: self.shared.table.name(),
                    why: "flusher stopped".into(),
                }));
            }
        }
    }
}

/// Writes frozen batches into Parquet, one job at a time; retries until it succeeds (the
/// data stays readable from memory and safe in the log meanwhile).
fn flusher(shared: &Shared, jobs: Receiver<FlushJob>) {
    while let Ok(job) = jobs.recv() {
        let rows: usize = job.batches.iter().map(|b| b.num_rows()).sum();
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        let file = loop {
            let at = parquet_file::Placement {
                dir: &shared.dir,
                remote: shared.config.remote.as_deref(),
                first_seq: job.first_seq,
                last_seq: job.last_seq,
                writer: &shared.config.writer,
                layout: parquet_file::Layout::Flushed,
            };
            match parquet_file::write(shared.table, at, &job.batches) {
                Ok(f) => break f,
                Err(e) => {
                    tracing::error!(table = %shared.table, error = %e, retry_in = ?delay, "writing a Parquet file failed");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        };
        let stats = &shared.stats;
        stats.rows_flushed.fetch_add(rows as u64, Ordering::Relaxed);
        stats.files_written.fetch_add(1, Ordering::Relaxed);
        stats.parquet_bytes.fetch_add(file.size, Ordering::Relaxed);
        tracing::info!(table = %shared.table, rows, bytes = file.size, file = %file.path.display(),
            elapsed_ms = started.elapsed().as_millis() as u64, "wrote Parquet file");
        {
            let mut st = shared.lock();
            st.frozen.clear();
            st.files.push(file);
        }
        stats.buffered_bytes.fetch_sub(job.bytes, Ordering::AcqRel);
        shared.flushed.notify_all();
        let res = wal::remove_segments(&job.segments);
        if let Err(e) = &res {
            tracing::warn!(table = %shared.table, error = %e, "could not remove flushed log segments");
        }
        for ack in job.acks {
            let _ = ack.send(Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table_def::SPANS;
    use meshscope_proto::convert;
    use meshscope_proto::otlp::collector::trace::v1::ExportTraceServiceRequest;
    use meshscope_proto::otlp::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn batch(first_id: u8, n: u8) -> RecordBatch {
        let spans = (0..n)
            .map(|i| Span {
                trace_id: vec![first_id; 16],
                span_id: vec![first_id, i, 1, 1, 1, 1, 1, 1],
                name: "op".into(),
                start_time_unix_nano: 10,
                end_time_unix_nano: 20,
                ..Default::default()
            })
            .collect();
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        convert::spans(&req).expect("convert").batch
    }

    fn rows(s: &Snapshot) -> usize {
        s.batches.iter().map(|b| b.num_rows()).sum()
    }

    /// An upgrade with acknowledged rows still in the log: an entry an older version wrote
    /// (without a column added since, here `mirror`) is replayed in today's schema.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_log_entry_of_an_older_schema_is_replayed_in_the_current_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let config = StoreConfig::new(dir.path());
        let current = batch(7, 3);
        let keep: Vec<usize> = (0..current.num_columns())
            .filter(|i| current.schema().field(*i).name() != "mirror")
            .collect();
        let older = current.project(&keep).expect("project");
        assert!(older.column_by_name("mirror").is_none());
        {
            let (mut wal, _) = Wal::replay(&config.wal_dir(&SPANS), |_| 1).expect("wal");
            wal.append(1, &wal::encode(&older).expect("encode"));
            wal.commit().expect("commit");
        }
        let store = TableStore::open(&SPANS, config).expect("open");
        let snap = store.snapshot();
        assert_eq!(rows(&snap), 3);
        for b in &snap.batches {
            assert_eq!(b.schema(), SPANS.schema());
            let mirror = b.column_by_name("mirror").expect("mirror column");
            assert_eq!(mirror.null_count(), b.num_rows());
        }
        // …and it flushes into a file like any other row.
        store.flush().await.expect("flush");
        assert_eq!(store.snapshot().files.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn writes_are_visible_then_flushed_then_replayed_exactly_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let config = StoreConfig::new(dir.path());
        {
            let store = TableStore::open(&SPANS, config.clone()).expect("open");
            store.write(batch(1, 3)).await.expect("write");
            store.write(batch(2, 2)).await.expect("write");
            let snap = store.snapshot();
            assert_eq!(
                (rows(&snap), snap.files.len()),
                (5, 0),
                "visible before any flush"
            );
            store.flush().await.expect("flush");
            let snap = store.snapshot();
            assert_eq!(
                (rows(&snap), snap.files.len()),
                (0, 1),
                "now in one Parquet file"
            );
            store.write(batch(3, 4)).await.expect("write");
            assert_eq!(store.stats().rows_written.load(Ordering::Relaxed), 9);
            // Dropping without close would flush; simulate a crash by leaking the threads'
            // work: forget the store so nothing more is written.
            std::mem::forget(store);
        }
        // Reopen: the file holds 5 rows, the log replays the 4 written after it.
        let store = TableStore::open(&SPANS, config).expect("reopen");
        let snap = store.snapshot();
        assert_eq!(snap.files.len(), 1);
        assert_eq!(rows(&snap), 4, "only the unflushed entries are replayed");
        store.close();
        let store =
            TableStore::open(&SPANS, StoreConfig::new(dir.path())).expect("reopen after close");
        let snap = store.snapshot();
        assert_eq!(
            (rows(&snap), snap.files.len()),
            (0, 2),
            "close writes the rest to Parquet"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn overload_is_refused_not_buffered() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut config = StoreConfig::new(dir.path());
        config.max_buffered_bytes = 1;
        let store = TableStore::open(&SPANS, config).expect("open");
        let err = store.write(batch(1, 1)).await.expect_err("over the limit");
        assert!(err.is_retryable(), "{err}");
        assert_eq!(store.stats().overloaded.load(Ordering::Relaxed), 1);
        assert_eq!(
            store.stats().buffered_bytes.load(Ordering::Relaxed),
            0,
            "nothing held"
        );
        assert_eq!(rows(&store.snapshot()), 0);
    }
}
