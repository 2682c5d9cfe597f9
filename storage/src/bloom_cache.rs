//! Bloom filters kept in memory across queries.
//!
//! Looking a trace up by id (`WHERE trace_id = '…'`, no time range) asks every span file's
//! bloom filter whether the id may be there: dozens to hundreds of reads of 50–500 KB per
//! lookup, each a trip through the object store (a blocking-pool hop on local disk, a GET on
//! S3). Files never change once written, so their filters can be kept: this wraps the
//! Parquet reader factory and serves the byte ranges that are bloom filters — recognised
//! from the footer's `bloom_filter_offset`/`length` — from memory, up to a byte budget
//! (oldest out first; files are never rewritten, and a compacted file's filters simply age
//! out). A lookup then reads only the row groups whose filter says yes.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::ParquetFileReaderFactory;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use futures::FutureExt;
use futures::future::BoxFuture;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::file::metadata::ParquetMetaData;

/// Default budget: about 1.2 bytes per distinct trace id at 1% false positives, so ~200
/// million spans' filters.
pub const DEFAULT_BUDGET: usize = 256 << 20;

/// Filters by (file, offset); the oldest leave first when over budget.
#[derive(Debug)]
pub struct BloomCache {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    bytes: usize,
    map: HashMap<(String, u64), Bytes>,
    order: VecDeque<(String, u64)>,
    hits: u64,
    misses: u64,
}

impl BloomCache {
    pub fn new(budget: usize) -> Self {
        BloomCache {
            budget,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, file: &str, range: &Range<u64>) -> Option<Bytes> {
        let mut inner = self.lock();
        let found = inner
            .map
            .get(&(file.to_string(), range.start))
            .filter(|b| b.len() as u64 == range.end - range.start)
            .cloned();
        if found.is_some() {
            inner.hits += 1;
        } else {
            inner.misses += 1;
        }
        found
    }

    fn put(&self, file: &str, offset: u64, bytes: Bytes) {
        if bytes.len() > self.budget {
            return;
        }
        let mut inner = self.lock();
        let key = (file.to_string(), offset);
        if inner.map.contains_key(&key) {
            return;
        }
        inner.bytes += bytes.len();
        inner.map.insert(key.clone(), bytes);
        inner.order.push_back(key);
        while inner.bytes > self.budget {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some(b) = inner.map.remove(&old) {
                inner.bytes -= b.len();
            }
        }
    }

    /// (bytes held, hits, misses).
    pub fn stats(&self) -> (usize, u64, u64) {
        let inner = self.lock();
        (inner.bytes, inner.hits, inner.misses)
    }
}

/// A reader factory whose readers serve bloom filters from a [`BloomCache`].
#[derive(Debug)]
pub struct BloomCachingFactory {
    pub inner: Arc<dyn ParquetFileReaderFactory>,
    pub cache: Arc<BloomCache>,
}

impl ParquetFileReaderFactory for BloomCachingFactory {
    fn create_reader(
        &self,
        partition_index: usize,
        file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> datafusion::error::Result<Box<dyn AsyncFileReader + Send>> {
        let path = file.object_meta.location.to_string();
        let inner = self
            .inner
            .create_reader(partition_index, file, metadata_size_hint, metrics)?;
        Ok(Box::new(BloomCachingReader {
            inner,
            path,
            cache: Arc::clone(&self.cache),
            blooms: Vec::new(),
        }))
    }
}

struct BloomCachingReader {
    inner: Box<dyn AsyncFileReader + Send>,
    path: String,
    cache: Arc<BloomCache>,
    /// The file's bloom filter ranges, from its footer.
    blooms: Vec<Range<u64>>,
}

impl AsyncFileReader for BloomCachingReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        if !self.blooms.contains(&range) {
            return self.inner.get_bytes(range);
        }
        if let Some(b) = self.cache.get(&self.path, &range) {
            return futures::future::ready(Ok(b)).boxed();
        }
        let (cache, path) = (Arc::clone(&self.cache), self.path.clone());
        let fetch = self.inner.get_bytes(range.clone());
        async move {
            let b = fetch.await?;
            cache.put(&path, range.start, b.clone());
            Ok(b)
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        self.inner.get_byte_ranges(ranges)
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let meta = self.inner.get_metadata(options).await?;
            self.blooms = meta
                .row_groups()
                .iter()
                .flat_map(|rg| rg.columns())
                .filter_map(|c| {
                    let offset = u64::try_from(c.bloom_filter_offset()?).ok()?;
                    let length = u64::try_from(c.bloom_filter_length()?).ok()?;
                    Some(offset..offset + length)
                })
                .collect();
            Ok(meta)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_within_budget_oldest_out_first() {
        let c = BloomCache::new(10);
        c.put("a", 0, Bytes::from(vec![0u8; 4]));
        c.put("a", 4, Bytes::from(vec![0u8; 4]));
        assert!(c.get("a", &(0..4)).is_some());
        c.put("b", 0, Bytes::from(vec![0u8; 4]));
        assert!(c.get("a", &(0..4)).is_none(), "the oldest left");
        assert!(c.get("a", &(4..8)).is_some());
        assert!(c.get("b", &(0..4)).is_some());
        assert!(
            c.get("b", &(0..5)).is_none(),
            "a different length is not the filter"
        );
        assert_eq!(c.stats().0, 8);
        c.put("big", 0, Bytes::from(vec![0u8; 11]));
        assert!(c.get("big", &(0..11)).is_none(), "larger than the budget");
    }
}
