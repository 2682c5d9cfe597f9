//! Which files and row groups can hold a trace id, answered from memory.
//!
//! `GET /api/v1/traces/{id}` has no time range, so every span file is a candidate. Each
//! file's footer carries, per row group, the `trace_id` min/max statistics (flushed files
//! are sorted by trace id) and a bloom filter (1% false positives). This index keeps those
//! per file once read, so that a lookup hands DataFusion only the files, and within them
//! only the row groups, that may hold the id — usually one — instead of having it open
//! every file, fetch its filter and decide. Files never change once written; entries of
//! files compacted away simply age out (oldest first, within a byte budget).
//!
//! Local files only: on object storage the same pruning happens inside DataFusion's scan,
//! with the filters served by [`crate::bloom_cache`].

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use parquet::bloom_filter::Sbbf;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::statistics::Statistics;

use crate::{Error, Result};

/// One row group's evidence.
#[derive(Debug)]
struct Group {
    min: Option<Vec<u8>>,
    max: Option<Vec<u8>>,
    bloom: Option<Sbbf>,
}

impl Group {
    fn may_hold(&self, id: &[u8]) -> bool {
        if let Some(min) = &self.min
            && id < min.as_slice()
        {
            return false;
        }
        if let Some(max) = &self.max
            && id > max.as_slice()
        {
            return false;
        }
        self.bloom.as_ref().is_none_or(|b| b.check(id))
    }

    fn bytes(&self) -> usize {
        self.bloom.as_ref().map_or(0, |b| b.num_blocks() * 32)
            + self.min.as_ref().map_or(0, Vec::len)
            + self.max.as_ref().map_or(0, Vec::len)
            + 64
    }
}

/// Per-file evidence for one column, within a byte budget.
#[derive(Debug)]
pub struct TraceIndex {
    column: &'static str,
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    files: HashMap<PathBuf, Arc<Vec<Group>>>,
    order: VecDeque<(PathBuf, usize)>,
    bytes: usize,
}

impl TraceIndex {
    pub fn new(column: &'static str, budget: usize) -> Self {
        TraceIndex {
            column,
            budget,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file's number of row groups, and those that may hold `id` (empty: none can).
    pub fn row_groups(&self, path: &Path, id: &str) -> Result<(usize, Vec<usize>)> {
        let cached = self.lock().files.get(path).cloned();
        let groups = match cached {
            Some(g) => g,
            None => {
                let g = Arc::new(load(path, self.column)?);
                self.keep(path, Arc::clone(&g));
                g
            }
        };
        let may = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.may_hold(id.as_bytes()))
            .map(|(i, _)| i)
            .collect();
        Ok((groups.len(), may))
    }

    fn keep(&self, path: &Path, groups: Arc<Vec<Group>>) {
        let size: usize = groups.iter().map(Group::bytes).sum();
        if size > self.budget {
            return;
        }
        let mut inner = self.lock();
        if inner.files.insert(path.to_path_buf(), groups).is_some() {
            return;
        }
        inner.bytes += size;
        inner.order.push_back((path.to_path_buf(), size));
        while inner.bytes > self.budget {
            let Some((old, size)) = inner.order.pop_front() else {
                break;
            };
            inner.files.remove(&old);
            inner.bytes -= size;
        }
    }

    /// Bytes held and files indexed.
    pub fn stats(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.bytes, inner.files.len())
    }
}

/// Reads a file's footer and its row groups' bloom filters for `column`.
fn load(path: &Path, column: &str) -> Result<Vec<Group>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file.try_clone().map_err(|e| Error::io(path, e))?)?;
    let meta = reader.metadata();
    let index = meta
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .position(|c| c.path().string() == column);
    meta.row_groups()
        .iter()
        .map(|rg| {
            let Some(c) = index.map(|i| rg.column(i)) else {
                return Ok(Group {
                    min: None,
                    max: None,
                    bloom: None,
                });
            };
            let (min, max) = match c.statistics() {
                Some(Statistics::ByteArray(s)) => (
                    s.min_bytes_opt().map(<[u8]>::to_vec),
                    s.max_bytes_opt().map(<[u8]>::to_vec),
                ),
                _ => (None, None),
            };
            // Truncated statistics are bounds, not values: only exact ones prune.
            let exact = c
                .statistics()
                .is_some_and(|s| s.min_is_exact() && s.max_is_exact());
            let (min, max) = if exact { (min, max) } else { (None, None) };
            Ok(Group {
                min,
                max,
                bloom: Sbbf::read_from_column_chunk(c, &file)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, RecordBatch, StringArray};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use parquet::schema::types::ColumnPath;

    fn write(path: &Path, ids: &[&str], group_rows: usize) {
        let col: ArrayRef = Arc::new(StringArray::from(ids.to_vec()));
        let batch = RecordBatch::try_from_iter([("trace_id", col)]).expect("batch");
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(group_rows))
            .set_column_bloom_filter_enabled(ColumnPath::from("trace_id"), true)
            .build();
        let mut w = ArrowWriter::try_new(
            File::create(path).expect("create"),
            batch.schema(),
            Some(props),
        )
        .expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
    }

    #[test]
    fn finds_the_row_groups_that_may_hold_an_id() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = dir.path().join("a.parquet");
        // Sorted, two row groups of two.
        write(&a, &["01", "02", "07", "09"], 2);
        let index = TraceIndex::new("trace_id", 1 << 20);
        assert_eq!(index.row_groups(&a, "02").expect("index").1, vec![0]);
        assert_eq!(index.row_groups(&a, "09").expect("index").1, vec![1]);
        // Between the groups, below and above all: by statistics, then by bloom filter.
        assert!(index.row_groups(&a, "05").expect("index").1.is_empty());
        assert!(index.row_groups(&a, "00").expect("index").1.is_empty());
        assert!(index.row_groups(&a, "08").expect("index").1.is_empty());
        assert_eq!(index.stats().1, 1);

        // Unsorted ids: the statistics cover everything, the bloom filter still decides.
        let b = dir.path().join("b.parquet");
        write(&b, &["ff", "00", "aa", "11"], 4);
        assert_eq!(index.row_groups(&b, "aa").expect("index").1, vec![0]);
        assert!(index.row_groups(&b, "ab").expect("index").1.is_empty());

        // A budget of nothing keeps nothing, and still answers.
        let none = TraceIndex::new("trace_id", 0);
        assert_eq!(none.row_groups(&a, "07").expect("index").1, vec![1]);
        assert_eq!(none.stats(), (0, 0));
        assert!(
            none.row_groups(&dir.path().join("missing.parquet"), "07")
                .is_err()
        );
    }
}
