//! Typed column scans for the analysis paths, beside DataFusion.
//!
//! The service graph reads ten columns of every span of a range and pairs them in Rust
//! (`query/src/analysis/pairing.rs`). Through DataFusion each string column arrives as
//! `Utf8`, one copied string per row, because that is the table's schema. Here the Parquet
//! reader is asked for the types the consumer wants instead: low-cardinality columns
//! (service, kind, status …) as `Dictionary(Int32, Utf8)`, which keeps the files'
//! dictionary pages as they are, and ids as `Utf8View`, which points into the decoded pages
//! rather than copying them. Row groups whose time statistics lie outside the range are
//! skipped. Rows are not filtered by time (the consumer checks the time column itself), but a
//! scan may keep only the rows meeting a condition on one column ([`Rows`]), evaluated while
//! the file is decoded so the other columns are decoded for those rows only.
//!
//! A scan reads one [`Snapshot`](crate::Snapshot) — the same files and buffered batches a
//! DataFusion query would see — split into [`ScanPart`]s that run concurrently; files come
//! from local disk or through the object store, as everywhere else.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray, new_null_array,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef};
use arrow::error::ArrowError;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::ParquetFileReaderFactory;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use futures::StreamExt;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowPredicateFn, ArrowReaderMetadata, ArrowReaderOptions, RowFilter,
};
use parquet::arrow::async_reader::{
    AsyncFileReader, ParquetRecordBatchStream, ParquetRecordBatchStreamBuilder,
};
use parquet::file::statistics::Statistics;

use crate::parquet_file::ParquetFile;
use crate::table_store::TableStore;
use crate::{Error, Result};

/// What to read: columns with the types wanted, the time range row groups must touch,
/// and optionally which rows to keep.
#[derive(Debug, Clone)]
pub struct ColumnScan {
    /// The output schema: these columns in this order. A column a file lacks (an older
    /// schema) reads as nulls.
    pub schema: SchemaRef,
    /// `Int64`/`Timestamp(ns)` column whose statistics prune row groups.
    pub time_column: String,
    /// `[start, end)` in nanoseconds.
    pub range: (i64, i64),
    /// Rows the scan keeps; the others are dropped while the files are decoded (the
    /// condition's column first, the scan's other columns only for the rows it keeps).
    pub rows: Rows,
}

/// Which rows a [`ColumnScan`] keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Rows {
    /// Every row of the row groups that touch the range.
    #[default]
    All,
    /// Rows whose `Int64`/`Timestamp(ns)` column is at least `min` (row groups whose
    /// statistics say none is are not read).
    AtLeast { column: String, min: i64 },
    /// Rows whose text column equals `value`.
    Equals { column: String, value: String },
}

impl Rows {
    fn column(&self) -> Option<&str> {
        match self {
            Rows::All => None,
            Rows::AtLeast { column, .. } | Rows::Equals { column, .. } => Some(column),
        }
    }

    /// Which rows of `values` (the condition's column) are kept.
    fn keep(&self, values: &ArrayRef) -> std::result::Result<BooleanArray, ArrowError> {
        match self {
            Rows::All => Ok(BooleanArray::from(vec![true; values.len()])),
            Rows::AtLeast { min, .. } => {
                let v = arrow::compute::cast(values, &DataType::Int64)?;
                arrow::compute::kernels::cmp::gt_eq(&v, &Int64Array::new_scalar(*min))
            }
            Rows::Equals { value, .. } => {
                if let Some(d) = values.as_dictionary_opt::<Int32Type>()
                    && let Some(names) = d.values().as_string_opt::<i32>()
                {
                    // Compare each dictionary entry once, not each row.
                    let hit: Vec<bool> = (0..names.len())
                        .map(|i| names.is_valid(i) && names.value(i) == value)
                        .collect();
                    return Ok(d
                        .keys()
                        .iter()
                        .map(|k| k.map(|k| hit.get(k as usize).copied().unwrap_or(false)))
                        .collect());
                }
                let v = arrow::compute::cast(values, &DataType::Utf8)?;
                arrow::compute::kernels::cmp::eq(&v, &StringArray::new_scalar(value.as_str()))
            }
        }
    }

    /// The kept rows of a buffered batch (in the table's schema).
    fn filter(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let Some(values) = self.column().and_then(|c| batch.column_by_name(c)) else {
            return Ok(batch);
        };
        let keep = self.keep(values)?;
        Ok(arrow::compute::filter_record_batch(&batch, &keep)?)
    }
}

impl ColumnScan {
    pub fn new(columns: Vec<Field>, time_column: &str, range: (i64, i64)) -> Self {
        ColumnScan {
            schema: Arc::new(Schema::new(columns)),
            time_column: time_column.to_string(),
            range,
            rows: Rows::All,
        }
    }

    /// The same scan over another range, keeping `rows`.
    pub fn over(&self, range: (i64, i64), rows: Rows) -> Self {
        ColumnScan {
            range,
            rows,
            ..self.clone()
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
        &self,
        scan: &ColumnScan,
        files: &Arc<dyn ParquetFileReaderFactory>,
        mut each: impl FnMut(RecordBatch) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E>
    where
        E: From<Error>,
    {
        for b in &self.batches {
            // The condition's column need not be one the scan returns: filter first.
            each(scan.shape(&scan.rows.filter(b.clone())?)?)?;
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
    let condition = scan
        .rows
        .column()
        .and_then(|c| file_schema.fields().iter().position(|f| f.name() == c));
    let mut builder = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, meta.clone())
        .with_projection(mask)
        .with_row_groups(row_groups)
        .with_batch_size(64 * 1024);
    // A file without the condition's column (an older schema) is read whole.
    if let Some(root) = condition {
        let rows = scan.rows.clone();
        let keep = ArrowPredicateFn::new(
            ProjectionMask::roots(meta.parquet_schema(), [root]),
            move |b: RecordBatch| rows.keep(b.column(0)),
        );
        builder = builder.with_row_filter(RowFilter::new(vec![Box::new(keep)]));
    }
    Ok(Some(builder.build()?))
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

/// The row groups whose time statistics overlap the range and, for [`Rows::AtLeast`],
/// whose column's maximum reaches the minimum (all, without statistics).
fn touching(meta: &ArrowReaderMetadata, scan: &ColumnScan) -> Vec<usize> {
    let (lo, hi) = scan.range;
    let position = |name: &str| {
        meta.parquet_schema()
            .columns()
            .iter()
            .position(|c| c.path().string() == name)
    };
    let time = position(&scan.time_column);
    let at_least = match &scan.rows {
        Rows::AtLeast { column, min } => position(column).map(|c| (c, *min)),
        _ => None,
    };
    let int_range = |rg: &parquet::file::metadata::RowGroupMetaData, c: usize| match rg
        .column(c)
        .statistics()
    {
        Some(Statistics::Int64(s)) => s.min_opt().copied().zip(s.max_opt().copied()),
        _ => None,
    };
    meta.metadata()
        .row_groups()
        .iter()
        .enumerate()
        .filter(|(_, rg)| {
            let in_range = time
                .and_then(|c| int_range(rg, c))
                .is_none_or(|(min, max)| max >= lo && min < hi);
            let reaches = at_least
                .and_then(|(c, want)| int_range(rg, c).map(|(_, max)| max >= want))
                .unwrap_or(true);
            in_range && reaches
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
    fn a_condition_keeps_its_rows_whatever_the_columns_type() {
        use arrow::array::{DictionaryArray, TimestampNanosecondArray};
        let ends = TimestampNanosecondArray::from(vec![Some(5), None, Some(10), Some(4)]);
        let at_least = Rows::AtLeast {
            column: "end_time".into(),
            min: 5,
        };
        let keep = at_least.keep(&(Arc::new(ends) as ArrayRef)).unwrap();
        assert_eq!(
            keep.iter().map(|k| k == Some(true)).collect::<Vec<_>>(),
            [true, false, true, false]
        );
        let consumer = Rows::Equals {
            column: "span_kind".into(),
            value: "CONSUMER".into(),
        };
        let kinds: DictionaryArray<Int32Type> = vec!["SERVER", "CONSUMER", "CLIENT", "CONSUMER"]
            .into_iter()
            .collect();
        let plain = StringArray::from(vec![Some("CONSUMER"), None, Some("SERVER")]);
        let keep = |a: ArrayRef| -> Vec<bool> {
            consumer
                .keep(&a)
                .unwrap()
                .iter()
                .map(|k| k == Some(true))
                .collect()
        };
        assert_eq!(keep(Arc::new(kinds)), [false, true, false, true]);
        assert_eq!(keep(Arc::new(plain)), [true, false, false]);

        // A buffered batch is filtered on a column the scan does not return.
        let batch = RecordBatch::try_from_iter([
            ("n", Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
            (
                "end_time",
                Arc::new(TimestampNanosecondArray::from(vec![9, 2, 7])) as ArrayRef,
            ),
        ])
        .unwrap();
        let kept = at_least.filter(batch.clone()).unwrap();
        assert_eq!(
            kept.column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values(),
            &[1, 3]
        );
        assert_eq!(Rows::All.filter(batch).unwrap().num_rows(), 3);
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
