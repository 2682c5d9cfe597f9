//! Background upkeep of a table's files: compaction, retention, and deleting what they
//! replaced once no query can still be reading it.
//!
//! ```text
//!   many small flushed files ──compact──▶ one large file sorted by service, hour, trace
//!   (range a..b) (range b+1..c)           named by the whole range a..c; inputs retired
//!
//!   oldest files ──retention (age, then total size)──▶ retired
//!   retired files ──after the grace period──▶ deleted
//! ```
//!
//! Exactly once, whatever crashes: the compacted file is durable (temp + fsync + rename)
//! before the inputs leave the table's file list, and a file whose range lies inside another
//! file's range is superseded at start-up ([`crate::parquet_file::live`]). Queries take the
//! file list in one snapshot, so a running query reads either the inputs or the output.
//! Retired files stay on disk for `retire_grace` so queries planned before the swap finish.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::parquet_file::{self, FileSummary, Layout, ParquetFile, Placement};
use crate::table_store::{TableStore, TableWriter};

/// When and how much to compact.
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    /// Files at least this large are left alone; smaller neighbours are merged up to it.
    pub target_bytes: u64,
    /// Merge only runs of at least this many files.
    pub min_files: usize,
    /// zstd level of the merged files (1-22): higher is smaller and slower.
    pub zstd_level: i32,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            target_bytes: 64 << 20,
            min_files: 4,
            zstd_level: 15,
        }
    }
}

/// How long and how much a table keeps.
#[derive(Debug, Clone, Copy, Default)]
pub struct Retention {
    /// Files whose newest row is older than this are removed.
    pub max_age: Option<Duration>,
    /// While the table's files take more than this, the oldest are removed.
    pub max_bytes: Option<u64>,
}

/// What one compaction did.
#[derive(Debug, Clone)]
pub struct Compacted {
    pub inputs: usize,
    pub rows: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub output: PathBuf,
}

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    pub files: u64,
    pub bytes: u64,
    pub rows: u64,
}

impl TableStore {
    /// Merges the first run of small neighbouring files, if there is one worth merging.
    /// Blocking (reads and writes files); run it off the async runtime.
    pub fn compact_once(&self, policy: CompactionPolicy) -> Result<Option<Compacted>> {
        let Some(TableWriter { shared, .. }) = self.writer() else {
            return Ok(None);
        };
        let _one_at_a_time = shared.maintenance.lock().unwrap_or_else(|p| p.into_inner());
        let files = shared.lock().files.clone();
        let Some(run) = pick_run(&files, policy) else {
            return Ok(None);
        };
        let started = Instant::now();
        let mut batches = Vec::new();
        for f in &run {
            match parquet_file::read_table(shared.table, f, shared.config.remote.as_deref()) {
                Ok(b) => batches.extend(b),
                Err(e) if is_not_found(&e) => {
                    // Removed behind our back (by hand, or a retention pass of another
                    // node): forget it rather than fail on it forever.
                    shared.lock().files.retain(|x| x.path != f.path);
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        let (first, last) = (&run[0], &run[run.len() - 1]);
        let output = parquet_file::write(
            shared.table,
            Placement {
                dir: &shared.dir,
                remote: shared.config.remote.as_deref(),
                first_seq: first.first_seq,
                last_seq: last.last_seq,
                writer: &shared.config.writer,
                layout: Layout::Compacted {
                    zstd_level: policy.zstd_level,
                },
            },
            &batches,
        )?;
        drop(batches);
        let bytes_in: u64 = run.iter().map(|f| f.size).sum();
        {
            let mut st = shared.lock();
            // Retention cannot have run (it takes the maintenance lock), and the flusher only
            // appends, so every input is still listed.
            st.files.retain(|f| !run.iter().any(|r| r.path == f.path));
            let at = st.files.partition_point(|f| f.first_seq < output.first_seq);
            st.files.insert(at, output.clone());
            let now = Instant::now();
            st.retired.extend(run.iter().cloned().map(|f| (f, now)));
        }
        let stats = &shared.stats;
        stats.compactions.fetch_add(1, Ordering::Relaxed);
        stats
            .compacted_files
            .fetch_add(run.len() as u64, Ordering::Relaxed);
        stats
            .compacted_bytes_in
            .fetch_add(bytes_in, Ordering::Relaxed);
        stats
            .compacted_bytes_out
            .fetch_add(output.size, Ordering::Relaxed);
        tracing::info!(table = %shared.table, inputs = run.len(), rows, bytes_in, bytes_out = output.size,
            file = %output.path.display(), elapsed_ms = started.elapsed().as_millis() as u64,
            "compacted Parquet files");
        Ok(Some(Compacted {
            inputs: run.len(),
            rows,
            bytes_in,
            bytes_out: output.size,
            output: output.path,
        }))
    }

    /// Removes this writer's files that fall outside `retention` at time `now` (nanoseconds
    /// since the epoch): first those whose newest row is too old, then the oldest until the
    /// total size fits. `summaries` caches footers across passes.
    ///
    /// The size bound covers the whole storage location: where several collectors share it,
    /// each weighs its files against everyone's and removes its own among the oldest of
    /// all, so together they keep the bound (each deletes only what it wrote).
    pub fn expire(
        &self,
        retention: Retention,
        now_ns: i64,
        summaries: &mut HashMap<PathBuf, FileSummary>,
    ) -> Result<Expired> {
        let Some(TableWriter { shared, .. }) = self.writer() else {
            return Ok(Expired::default());
        };
        if retention.max_age.is_none() && retention.max_bytes.is_none() {
            return Ok(Expired::default());
        }
        let _one_at_a_time = shared.maintenance.lock().unwrap_or_else(|p| p.into_inner());
        let files = shared.lock().files.clone();
        let others = match retention.max_bytes {
            Some(_) => self.other_writers_files(),
            None => Vec::new(),
        };
        let mut aged: Vec<(ParquetFile, FileSummary, bool)> = Vec::with_capacity(files.len());
        for (f, own) in files
            .into_iter()
            .map(|f| (f, true))
            .chain(others.into_iter().map(|f| (f, false)))
        {
            let s = match summaries.get(&f.path) {
                Some(s) => *s,
                None => {
                    let s = match parquet_file::summary(
                        shared.table,
                        &f,
                        shared.config.remote.as_deref(),
                    ) {
                        Ok(s) => s,
                        // Another writer's file may go (compacted, expired) at any time.
                        Err(_) if !own => continue,
                        Err(e) => return Err(e),
                    };
                    summaries.insert(f.path.clone(), s);
                    s
                }
            };
            aged.push((f, s, own));
        }
        // Forget the footers of files that are gone (other writers' too).
        let present: std::collections::HashSet<&PathBuf> =
            aged.iter().map(|(f, _, _)| &f.path).collect();
        summaries.retain(|p, _| present.contains(p));
        // Oldest newest-row first.
        aged.sort_by_key(|(f, s, _)| (s.max_time.unwrap_or(i64::MIN), f.first_seq));
        let mut doomed = Vec::new();
        let mut total: u64 = aged.iter().map(|(f, _, _)| f.size).sum();
        let cutoff = retention
            .max_age
            .map(|age| now_ns.saturating_sub(i64::try_from(age.as_nanos()).unwrap_or(i64::MAX)));
        for (f, s, own) in &aged {
            let too_old = cutoff.is_some_and(|c| s.max_time.is_some_and(|t| t < c));
            let too_big = retention.max_bytes.is_some_and(|max| total > max);
            if !(too_old || too_big) {
                break;
            }
            // Another writer's file counts as gone: its writer removes it on its own pass.
            total -= f.size;
            if *own {
                doomed.push((f.clone(), *s));
            }
        }
        let mut out = Expired::default();
        if doomed.is_empty() {
            return Ok(out);
        }
        {
            let mut st = shared.lock();
            st.files
                .retain(|f| !doomed.iter().any(|(d, _)| d.path == f.path));
            let now = Instant::now();
            st.retired
                .extend(doomed.iter().map(|(f, _)| (f.clone(), now)));
        }
        for (f, s) in &doomed {
            summaries.remove(&f.path);
            out.files += 1;
            out.bytes += f.size;
            out.rows += s.rows;
            tracing::info!(table = %shared.table, file = %f.path.display(), rows = s.rows, bytes = f.size,
                newest_row_ns = s.max_time, "retention: removing Parquet file");
        }
        let stats = &shared.stats;
        stats.expired_files.fetch_add(out.files, Ordering::Relaxed);
        stats.expired_bytes.fetch_add(out.bytes, Ordering::Relaxed);
        stats.expired_rows.fetch_add(out.rows, Ordering::Relaxed);
        Ok(out)
    }

    /// The live files other writers keep in this table's storage location (none where this
    /// writer is alone). A listing that fails counts as none: the bound then holds per writer.
    fn other_writers_files(&self) -> Vec<ParquetFile> {
        let Some(TableWriter { shared, .. }) = self.writer() else {
            return Vec::new();
        };
        let listed = match shared.config.remote.as_deref() {
            Some(remote) => remote.list(shared.table),
            None => parquet_file::list(&shared.dir),
        };
        match listed {
            Ok(files) => parquet_file::live(files)
                .0
                .into_iter()
                .filter(|f| f.writer != shared.config.writer)
                .collect(),
            Err(e) => {
                tracing::warn!(table = %shared.table, error = %e, "retention: cannot list other writers' files");
                Vec::new()
            }
        }
    }

    /// Deletes retired files whose grace period has passed (all of them with `force`).
    pub fn delete_retired(&self, force: bool) -> usize {
        let Some(TableWriter { shared, .. }) = self.writer() else {
            return 0;
        };
        let grace = shared.config.retire_grace;
        let due: Vec<ParquetFile> = {
            let mut st = shared.lock();
            let (due, keep) = std::mem::take(&mut st.retired)
                .into_iter()
                .partition(|(_, at)| force || at.elapsed() >= grace);
            st.retired = keep;
            due.into_iter().map(|(f, _)| f).collect()
        };
        let mut n = 0;
        for f in due {
            match parquet_file::delete(&f, shared.config.remote.as_deref()) {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(file = %f.path.display(), error = %e, "cannot delete a retired file")
                }
            }
        }
        n
    }
}

fn is_not_found(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
        Error::ObjectStore(object_store::Error::NotFound { .. }) => true,
        _ => false,
    }
}

/// The first run of at least `min_files` neighbouring small files whose sizes add up to at
/// most the target (a run may stop short of the target when a large file interrupts it).
fn pick_run(files: &[ParquetFile], policy: CompactionPolicy) -> Option<Vec<ParquetFile>> {
    let small = |f: &ParquetFile| f.size < policy.target_bytes / 2;
    let mut i = 0;
    while i < files.len() {
        if !small(&files[i]) {
            i += 1;
            continue;
        }
        let mut run = Vec::new();
        let mut bytes = 0u64;
        let mut j = i;
        while j < files.len() && small(&files[j]) && bytes + files[j].size <= policy.target_bytes {
            bytes += files[j].size;
            run.push(files[j].clone());
            j += 1;
        }
        if run.len() >= policy.min_files.max(2) {
            return Some(run);
        }
        i = j.max(i + 1);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table_def::SPANS;
    use crate::table_store::StoreConfig;
    use arrow::array::{Array, AsArray, RecordBatch};
    use meshscope_proto::convert;
    use meshscope_proto::otlp::collector::trace::v1::ExportTraceServiceRequest;
    use meshscope_proto::otlp::common::v1::{AnyValue, KeyValue, any_value};
    use meshscope_proto::otlp::resource::v1::Resource;
    use meshscope_proto::otlp::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    /// `n` spans of `service` with ids starting at `first`, all starting at `start_ns`.
    fn spans(service: &str, first: u32, n: u32, start_ns: u64) -> RecordBatch {
        let spans = (first..first + n)
            .map(|i| Span {
                trace_id: [i.to_be_bytes().as_slice(), &[7; 12]].concat(),
                span_id: [i.to_be_bytes().as_slice(), &[1; 4]].concat(),
                name: "op".into(),
                start_time_unix_nano: start_ns,
                end_time_unix_nano: start_ns + 1_000,
                ..Default::default()
            })
            .collect();
        let resource = Resource {
            attributes: vec![KeyValue {
                key: "service.name".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(service.into())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        convert::spans(&req).expect("convert").batch
    }

    /// Every span id a snapshot's files and batches hold (with repeats).
    fn span_ids(store: &TableStore) -> Vec<String> {
        let snap = store.snapshot();
        let mut batches = snap.batches.clone();
        for f in &snap.files {
            batches.extend(parquet_file::read(f, None).expect("read"));
        }
        batches
            .iter()
            .flat_map(|b| {
                let col = b
                    .column_by_name("span_id")
                    .expect("span_id")
                    .as_string::<i32>()
                    .clone();
                (0..col.len()).map(move |i| col.value(i).to_string())
            })
            .collect()
    }

    /// A store with `files` flushed files of 10 spans each, services alternating.
    async fn store_with_files(config: StoreConfig, files: u32) -> Arc<TableStore> {
        let store = TableStore::open(&SPANS, config).expect("open");
        for i in 0..files {
            let service = if i % 2 == 0 { "cart" } else { "checkout" };
            let hour = 3_600_000_000_000u64;
            store
                .write(spans(
                    service,
                    i * 10,
                    10,
                    1_000 * hour + u64::from(i) * hour,
                ))
                .await
                .expect("write");
            store.flush().await.expect("flush");
        }
        assert_eq!(store.snapshot().files.len(), files as usize);
        store
    }

    fn small_files() -> CompactionPolicy {
        CompactionPolicy {
            target_bytes: 1 << 30,
            min_files: 2,
            zstd_level: 3,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn compaction_merges_files_and_keeps_every_row_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut config = StoreConfig::new(dir.path());
        config.retire_grace = Duration::ZERO;
        let store = store_with_files(config.clone(), 6).await;
        let before: BTreeSet<String> = span_ids(&store).into_iter().collect();
        assert_eq!(before.len(), 60);

        let done = store
            .compact_once(small_files())
            .expect("compact")
            .expect("a run");
        assert_eq!((done.inputs, done.rows), (6, 60));
        let snap = store.snapshot();
        assert_eq!(snap.files.len(), 1, "one file replaces six");
        let (first, last) = (snap.files[0].first_seq, snap.files[0].last_seq);
        assert_eq!((first, last), (1, 6), "named by the whole range it holds");
        let after = span_ids(&store);
        assert_eq!(after.len(), 60, "no row lost or doubled");
        assert_eq!(after.iter().cloned().collect::<BTreeSet<_>>(), before);
        // Sorted by service first: the ten cart spans of each hour come before checkout's.
        let batch = &parquet_file::read(&snap.files[0], None).expect("read")[0];
        let services = batch
            .column_by_name("service_name")
            .expect("col")
            .as_string::<i32>()
            .clone();
        let names: Vec<&str> = (0..services.len()).map(|i| services.value(i)).collect();
        assert!(
            names[..30].iter().all(|s| *s == "cart")
                && names[30..].iter().all(|s| *s == "checkout")
        );

        // Nothing more to merge; the inputs are deleted once retired.
        assert!(store.compact_once(small_files()).expect("again").is_none());
        assert_eq!(store.delete_retired(false), 6);
        assert_eq!(
            parquet_file::list(&dir.path().join("spans"))
                .expect("list")
                .len(),
            1
        );
        assert_eq!(store.stats().compactions.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_crash_between_writing_the_output_and_deleting_the_inputs_duplicates_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let config = StoreConfig::new(dir.path());
        let store = store_with_files(config.clone(), 4).await;
        store
            .compact_once(small_files())
            .expect("compact")
            .expect("a run");
        // Crash now: the retired inputs are still on disk (the grace has not passed) and
        // nothing deletes them; the process dies.
        std::mem::forget(store);
        let on_disk = parquet_file::list(&dir.path().join("spans")).expect("list");
        assert_eq!(on_disk.len(), 5, "four inputs and their merged copy");

        // A query node reading the folder meanwhile sees every row once.
        let reader = TableStore::open_reader(&SPANS, dir.path(), None).expect("reader");
        assert_eq!(span_ids(&reader).len(), 40);

        let store = TableStore::open(&SPANS, config).expect("reopen");
        assert_eq!(
            span_ids(&store).len(),
            40,
            "every row exactly once after the restart"
        );
        assert_eq!(
            parquet_file::list(&dir.path().join("spans"))
                .expect("list")
                .len(),
            1,
            "start-up removed the superseded inputs"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retention_removes_the_oldest_files_by_age_then_by_size() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut config = StoreConfig::new(dir.path());
        config.retire_grace = Duration::ZERO;
        // Files hold hours 1000, 1001, … 1005 (one hour each).
        let store = store_with_files(config, 6).await;
        let hour = 3_600_000_000_000i64;
        let now = 1_006 * hour;
        let mut cache = HashMap::new();
        // Keep 3.5 hours: the files of hours 1000, 1001 and 1002 (newest rows before 1002.5) go.
        let age = Retention {
            max_age: Some(Duration::from_secs(3 * 3600 + 1800)),
            max_bytes: None,
        };
        let e = store.expire(age, now, &mut cache).expect("expire");
        assert_eq!((e.files, e.rows), (3, 30));
        assert_eq!(span_ids(&store).len(), 30);
        // Now bound the size to what two files take: the oldest of the remaining three goes.
        let sizes: Vec<u64> = store.snapshot().files.iter().map(|f| f.size).collect();
        let size = Retention {
            max_age: None,
            max_bytes: Some(sizes[1] + sizes[2]),
        };
        let e = store.expire(size, now, &mut cache).expect("expire");
        assert_eq!(e.files, 1);
        let left: BTreeSet<u64> = store.snapshot().files.iter().map(|f| f.first_seq).collect();
        assert_eq!(left, BTreeSet::from([5, 6]), "the newest two remain");
        assert_eq!(store.stats().expired_rows.load(Ordering::Relaxed), 40);
        assert_eq!(store.delete_retired(false), 4);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_pass_compacts_expires_and_deletes_until_done_unless_cancelled() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut config = StoreConfig::new(dir.path());
        config.retire_grace = Duration::ZERO;
        let storage = crate::Storage::open(config, &[]).expect("open");
        let table = Arc::clone(storage.table(meshscope_proto::Table::Spans));
        let hour = 3_600_000_000_000u64;
        for i in 0..8u32 {
            table
                .write(spans("cart", i * 10, 10, (1_000 + u64::from(i)) * hour))
                .await
                .expect("write");
            table.flush().await.expect("flush");
        }
        let sizes: Vec<u64> = table.snapshot().files.iter().map(|f| f.size).collect();
        let total: u64 = sizes.iter().sum();
        // Pairs of neighbours merge (four compactions); half the bytes may stay.
        let policy = CompactionPolicy {
            target_bytes: sizes[0] * 5 / 2,
            min_files: 2,
            zstd_level: 3,
        };
        let upkeep = crate::Upkeep {
            compaction: Some(policy),
            retention: BTreeMap::from([(
                SPANS.name,
                Retention {
                    max_age: None,
                    max_bytes: Some(total / 2),
                },
            )]),
        };
        let now = 2_000 * hour as i64;
        let mut maintainer = crate::Maintainer::new(storage.clone(), upkeep);
        let cancelled = maintainer.run_once(now, &AtomicBool::new(true));
        assert_eq!(cancelled.compactions + cancelled.expired.files as usize, 0);
        assert_eq!(
            table.snapshot().files.len(),
            8,
            "a cancelled pass does nothing"
        );

        let report = maintainer.run_once(now, &AtomicBool::new(false));
        assert!(report.compactions >= 2, "{report:?}");
        assert!(report.expired.files >= 1, "{report:?}");
        let live = table.snapshot().files;
        let live_bytes: u64 = live.iter().map(|f| f.size).sum();
        assert!(live_bytes <= total / 2, "{live_bytes} > {}", total / 2);
        // Whatever the pass merged or expired has left the disk too.
        let on_disk = std::fs::read_dir(dir.path().join("spans"))
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
            })
            .count();
        assert_eq!(on_disk, live.len());
        let kept = span_ids(&table);
        assert!(
            !kept.is_empty() && kept.len() < 80,
            "{} spans kept",
            kept.len()
        );
        assert!(
            kept.contains(&"0000004f01010101".to_string()),
            "the newest span stays"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn collectors_sharing_a_location_keep_one_size_bound() {
        let dir = tempfile::tempdir().expect("tmp");
        let config = |writer: &str| {
            let mut c = StoreConfig::new(dir.path());
            c.writer = writer.into();
            c.retire_grace = Duration::ZERO;
            c
        };
        // c1 holds hours 1000-1002; c2 holds hours 1010-1012.
        let c1 = store_with_files(config("c1"), 3).await;
        let c2 = TableStore::open(&SPANS, config("c2")).expect("open");
        let hour = 3_600_000_000_000u64;
        for i in 0..3u32 {
            c2.write(spans(
                "cart",
                100 + i * 10,
                10,
                (1_010 + u64::from(i)) * hour,
            ))
            .await
            .expect("write");
            c2.flush().await.expect("flush");
        }
        let sizes =
            |s: &TableStore| -> Vec<u64> { s.snapshot().files.iter().map(|f| f.size).collect() };
        let (s1, s2) = (sizes(&c1), sizes(&c2));
        // Room for all of c2 and c1's newest file: c1 alone fits (three files), both don't.
        let bound = s2.iter().sum::<u64>() + s1[2];
        assert!(s1.iter().sum::<u64>() <= bound);
        let retention = Retention {
            max_age: None,
            max_bytes: Some(bound),
        };
        let now = 2_000 * hour as i64;
        let e = c2
            .expire(retention, now, &mut HashMap::new())
            .expect("expire");
        assert_eq!(e.files, 0, "c2's files are the newest of all");
        let e = c1
            .expire(retention, now, &mut HashMap::new())
            .expect("expire");
        assert_eq!(
            (e.files, e.rows),
            (2, 20),
            "c1 removes its two oldest files"
        );
        assert_eq!(c1.delete_retired(false), 2);
        let reader = TableStore::open_reader(&SPANS, dir.path(), None).expect("reader");
        let left: u64 = reader.snapshot().files.iter().map(|f| f.size).sum();
        assert!(left <= bound, "{left} bytes left under a bound of {bound}");
        assert_eq!(span_ids(&reader).len(), 40);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_query_node_reads_every_collectors_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut a = StoreConfig::new(dir.path());
        a.writer = "c1".into();
        let mut b = StoreConfig::new(dir.path());
        b.writer = "c2".into();
        let sa = store_with_files(a, 2).await;
        let sb = store_with_files(b, 3).await;
        let reader = TableStore::open_reader(&SPANS, dir.path(), None).expect("reader");
        assert_eq!(reader.snapshot().files.len(), 5);
        assert_eq!(span_ids(&reader).len(), 50);
        // Each writer keeps its own log and sequence numbers.
        assert!(
            dir.path().join("wal/c1/spans").is_dir() && dir.path().join("wal/c2/spans").is_dir()
        );
        assert!(
            reader.write(spans("x", 0, 1, 1)).await.is_err(),
            "read-only"
        );
        drop((sa, sb));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_query_node_sees_what_a_collector_flushes_later_and_its_minutes_arrive() {
        let dir = tempfile::tempdir().expect("tmp");
        let writer = store_with_files(StoreConfig::new(dir.path()), 1).await;
        let reader = TableStore::open_reader(&SPANS, dir.path(), None).expect("reader");
        assert_eq!(span_ids(&reader).len(), 10);
        assert!(
            reader.take_written_minutes().is_empty(),
            "what was there at start-up is no arrival"
        );

        let hour = 3_600_000_000_000u64;
        let late = 999 * hour + 30_000_000_000; // a minute before anything written so far
        writer
            .write(spans("cart", 100, 5, late))
            .await
            .expect("write");
        writer.flush().await.expect("flush");
        // The listing is refreshed in the background (each second): wait for it, bounded.
        let deadline = Instant::now() + Duration::from_secs(10);
        while span_ids(&reader).len() < 15 {
            assert!(Instant::now() < deadline, "the new file was never listed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let minute = (late / 60_000_000_000) as i64;
        let mut arrived = reader.take_written_minutes();
        while !arrived.contains_key(&minute) {
            assert!(Instant::now() < deadline, "the file's minute never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
            arrived.extend(reader.take_written_minutes());
        }
        assert_eq!(arrived.get(&minute), Some(&(late as i64)));
        assert_eq!(reader.stats().rows_written.load(Ordering::Relaxed), 0);
    }

    fn file(first: u64, size: u64) -> ParquetFile {
        ParquetFile {
            path: PathBuf::from(format!("{first}")),
            size,
            first_seq: first,
            last_seq: first,
            writer: String::new(),
        }
    }

    #[test]
    fn picks_the_first_run_of_small_neighbours_up_to_the_target() {
        let policy = CompactionPolicy {
            target_bytes: 100,
            min_files: 3,
            zstd_level: 3,
        };
        // 1, 2 are small but a large file (3) interrupts them; 4..=9 are small.
        let files: Vec<_> = [10, 10, 80, 20, 20, 20, 20, 20, 20]
            .iter()
            .enumerate()
            .map(|(i, &s)| file(i as u64 + 1, s))
            .collect();
        let run = pick_run(&files, policy).expect("a run");
        let firsts: Vec<u64> = run.iter().map(|f| f.first_seq).collect();
        assert_eq!(firsts, vec![4, 5, 6, 7, 8]); // 5 × 20 = the 100-byte target
        assert!(pick_run(&files[..3], policy).is_none());
    }
}
