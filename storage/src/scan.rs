//! Typed column scans for the analysis paths, beside DataFusion.
//!
//! The service graph reads ten columns of every span of a range and pairs them in Rust
//! (`query/src/analysis/pairing.rs`). Through DataFusion each string column arrives as
//! `Utf8`, one copied string per row, because that is the table's schema. Here the Parquet
//! reader is asked for the types the consumer wants instead: low-cardinality columns
//! (service, kind, status …) as `Dictionary(Int32, Utf8)`, which keeps the files'
//! dictionary pages as they are, and ids as `Utf8View`, which points into the decoded pages
//! rather than copying them. Row groups whose time statistics lie outside the range are
//! skipped. Rows are not filtered: the consumer checks the time column itself.
//!
//! A scan reads one [`Snapshot`](crate::Snapshot) — the same files and buffered batches a
//! DataFusion query would see — split into [`ScanPart`]s that run concurrently; files come
//! from local disk or through the object store, as everywhere else.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::ParquetFileReaderFactory;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use futures::StreamExt;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::{
    AsyncFileReader, ParquetRecordBatchStream, ParquetRecordBatchStreamBuilder,
};
use parquet::file::statistics::Statistics;

use crate::parquet_file::ParquetFile;
use crate::table_store::TableStore;
use crate::{Error, Result};

/// What to read: columns with the types wanted, and the time range row groups must touch.
#[derive(Debug, Clone)]
pub struct ColumnScan {
    /// The output schema: these columns in this order. A column a file lacks (an older
    /// schema) reads as nulls.
    pub schema: SchemaRef,
    /// `Int64`/`Timestamp(ns)` column whose statistics prune row groups.
    pub time_column: String,
    /// `[start, end)` in nanoseconds.
    pub range: (i64, i64),
}

impl ColumnScan {
    pub fn new(columns: Vec<Field>, time_column: &str, range: (i64, i64)) -> Self {
        ColumnScan {
            schema: Arc::new(Schema::new(columns)),
            time_column: time_column.to_string(),
            range,
        }
    }

    /// `batch` with the scan's columns, cast to the scan's types.
    fn shape(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let columns = self
            .schema
            .fields()
            .iter()
            .map(|f| -> Result<ArrayRef> {
                match batch.column_by_name(f.name()) {
                    Some(c) if c.data_type() == f.data_type() => Ok(Arc::clone(c)),
                    Some(c) => Ok(arrow::compute::cast(c, f.data_type())?),
                    None => Ok(new_null_array(f.data_type(), batch.num_rows())),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let options =
            arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &options,
        )?)
    }
}

/// A share of a snapshot: some files, some buffered batches.
#[derive(Debug, Default)]
pub struct ScanPart {
    files: Vec<ParquetFile>,
    batches: Vec<RecordBatch>,
}

impl TableStore {
    /// The table's current snapshot split into at most `parts` shares of similar size.
    pub fn scan_parts(&self, parts: usize) -> Vec<ScanPart> {
        let snapshot = self.snapshot();
        let mut out: Vec<(u64, ScanPart)> = (0..parts.max(1))
            .map(|_| (0, ScanPart::default()))
            .collect();
        let mut files = snapshot.files;
        files.sort_by_key(|f| std::cmp::Reverse(f.size));
        for f in files {
            if let Some(p) = out.iter_mut().min_by_key(|p| p.0) {
                p.0 += f.size;
                p.1.files.push(f);
            }
        }
        for b in snapshot.batches {
            if let Some(p) = out.iter_mut().min_by_key(|p| p.0) {
                p.0 += b.get_array_memory_size() as u64 / 4;
                p.1.batches.push(b);
            }
        }
        out.into_iter()
            .map(|p| p.1)
            .filter(|p| !p.files.is_empty() || !p.batches.is_empty())
            .collect()
    }
}

impl ScanPart {
    /// Reads the part, handing each batch (shaped as `scan.schema`) to `each`; files are
    /// opened through `files` (see [`crate::provider::reader_factory`]).
    pub async fn read<E>(
        self,
        scan: &ColumnScan,
        files: &Arc<dyn ParquetFileReaderFactory>,
        mut each: impl FnMut(RecordBatch) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E>
    where
        E: From<Error>,
    {
        for b in &self.batches {
            each(scan.shape(b)?)?;
        }
        for f in &self.files {
            // A file compacted away after the snapshot stays on disk for the retire grace.
            let Some(mut stream) = open(files, f, scan).await? else {
                continue;
            };
            while let Some(b) = stream.next().await {
                let b = b.map_err(Error::from)?;
                each(scan.shape(&b)?)?;
            }
        }
        Ok(())
    }
}

type BatchStream = ParquetRecordBatchStream<Box<dyn AsyncFileReader>>;

/// Opens one file for the scan; `None` when no row group touches the range.
async fn open(
    files: &Arc<dyn ParquetFileReaderFactory>,
    f: &ParquetFile,
    scan: &ColumnScan,
) -> Result<Option<BatchStream>> {
    let file = PartitionedFile::new(f.path.to_string_lossy(), f.size);
    // (`AsyncFileReader` is `Send` itself; parquet implements it for this box type.)
    let mut reader: Box<dyn AsyncFileReader> =
        files.create_reader(0, file, None, &ExecutionPlanMetricsSet::new())?;
    let meta = ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new()).await?;
    let file_schema = meta.schema();

    // The file's own schema with the wanted types on the wanted columns.
    let hinted: Vec<Field> = file_schema
        .fields()
        .iter()
        .map(|f| match scan.schema.field_with_name(f.name()) {
            Ok(want) if hintable(f.data_type(), want.data_type()) => {
                f.as_ref().clone().with_data_type(want.data_type().clone())
            }
            _ => f.as_ref().clone(),
        })
        .collect();
    let hinted = Arc::new(Schema::new_with_metadata(
        hinted,
        file_schema.metadata().clone(),
    ));
    let meta = ArrowReaderMetadata::try_new(
        Arc::clone(meta.metadata()),
        ArrowReaderOptions::new().with_schema(hinted),
    )?;

    let roots: Vec<usize> = file_schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| scan.schema.field_with_name(f.name()).is_ok())
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(meta.parquet_schema(), roots);
    let row_groups = touching(&meta, scan);
    if row_groups.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        ParquetRecordBatchStreamBuilder::new_with_metadata(reader, meta)
            .with_projection(mask)
            .with_row_groups(row_groups)
            .with_batch_size(64 * 1024)
            .build()?,
    ))
}

/// Whether a file column of type `have` can be read as `want` directly.
fn hintable(have: &DataType, want: &DataType) -> bool {
    matches!(
        (have, want),
        (DataType::Utf8, DataType::Dictionary(_, _))
            | (DataType::Utf8, DataType::Utf8View)
            | (DataType::Utf8, DataType::Utf8)
    )
}

/// The row groups whose time statistics overlap the range (all, without statistics).
fn touching(meta: &ArrowReaderMetadata, scan: &ColumnScan) -> Vec<usize> {
    let (lo, hi) = scan.range;
    let column = meta
        .parquet_schema()
        .columns()
        .iter()
        .position(|c| c.path().string() == scan.time_column);
    meta.metadata()
        .row_groups()
        .iter()
        .enumerate()
        .filter(|(_, rg)| {
            let Some(c) = column else { return true };
            match rg.column(c).statistics() {
                Some(Statistics::Int64(s)) => match (s.min_opt(), s.max_opt()) {
                    (Some(&min), Some(&max)) => max >= lo && min < hi,
                    _ => true,
                },
                _ => true,
            }
        })
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, AsArray, Int64Array, StringArray};

    use super::*;

    #[test]
    fn batches_take_the_scans_shape() {
        let scan = ColumnScan::new(
            vec![
                Field::new("name", DataType::Utf8View, true),
                Field::new("n", DataType::Int64, true),
                Field::new("absent", DataType::Utf8, true),
            ],
            "n",
            (0, 10),
        );
        let batch = RecordBatch::try_from_iter([
            ("extra", Arc::new(Int64Array::from(vec![7, 8])) as ArrayRef),
            ("n", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
            (
                "name",
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let shaped = scan.shape(&batch).unwrap();
        assert_eq!(shaped.schema(), scan.schema);
        // Cast to the wanted type, columns the batch lacks as nulls, the rest dropped.
        assert_eq!(shaped.column(0).as_string_view().value(1), "b");
        assert_eq!(shaped.column(2).null_count(), 2);
        assert_eq!(shaped.num_rows(), 2);
    }

    #[test]
    fn only_text_is_read_straight_into_dictionaries_and_views() {
        let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        assert!(hintable(&DataType::Utf8, &dict));
        assert!(hintable(&DataType::Utf8, &DataType::Utf8View));
        assert!(!hintable(&DataType::Int64, &DataType::Utf8View));
        assert!(!hintable(&DataType::Utf8, &DataType::Int64));
    }
}
