//! Parquet files of one table: naming, writing (sorted, zstd, atomically), reading and listing.
//!
//! A file is named by the range of write-ahead-log sequence numbers it holds,
//! `<first_seq>-<last_seq>.parquet` (20 digits each), so start-up knows which log entries are
//! already durable in Parquet without reading any file. A node of a split deployment
//! (`meshscope collector --node-id c1`) has a sequence space of its own and adds its id:
//! `<first_seq>-<last_seq>.c1.parquet`. Files are written to a hidden temporary name,
//! fsynced, renamed into place and the folder fsynced: a crash leaves either the whole file
//! or none of it (and a temporary file that its writer removes at start-up).
//!
//! Compaction writes one file whose range covers the files it merged, then deletes them; a
//! file whose range lies inside another file's range of the same writer is therefore
//! superseded ([`live`]), which is what makes a crash between the two steps harmless.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use arrow::compute::{SortColumn, concat, interleave_record_batch, lexsort_to_indices};
use arrow::datatypes::SchemaRef;
use arrow::datatypes::TimestampNanosecondType;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::statistics::Statistics;
use parquet::schema::types::ColumnPath;

use crate::error::{Error, Result};
use crate::remote::Remote;
use crate::table_def::{Distinct, FileRules, SortKey, TableDef};
use crate::wal::sync_dir;

/// A Parquet file that queries read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParquetFile {
    pub path: PathBuf,
    pub size: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The node that wrote it (`""` for `serve`, the `--node-id` of a collector).
    pub writer: String,
}

impl ParquetFile {
    /// Whether this file's sequence range lies inside `other`'s (same writer).
    pub(crate) fn within(&self, other: &ParquetFile) -> bool {
        self.writer == other.writer
            && self.path != other.path
            && other.first_seq <= self.first_seq
            && self.last_seq <= other.last_seq
    }
}

/// How a file's rows are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A flush of the write path: spans by trace, so a trace's spans sit side by side.
    Flushed,
    /// A compaction's output: by service, then hour, with each trace's spans clustered,
    /// compressed harder (zstd at this level) since it is written once in the background.
    Compacted { zstd_level: i32 },
}

/// Rows per row group: small enough that min/max statistics prune well (files are sorted).
const ROW_GROUP_ROWS: usize = 128 * 1024;
/// Rows per row group of a compacted file.
const COMPACTED_ROW_GROUP_ROWS: usize = 1024 * 1024;

fn file_name(first_seq: u64, last_seq: u64, writer: &str) -> String {
    if writer.is_empty() {
        format!("{first_seq:020}-{last_seq:020}.parquet")
    } else {
        format!("{first_seq:020}-{last_seq:020}.{writer}.parquet")
    }
}

pub(crate) fn parse_name(name: &str) -> Option<(u64, u64, String)> {
    let stem = name.strip_suffix(".parquet")?;
    let (range, writer) = stem.split_once('.').unwrap_or((stem, ""));
    let (a, b) = range.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, writer.to_string()))
}

/// Whether `id` can name a writer in file names (letters, digits, `_`).
pub fn valid_writer_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Layout {
    /// The rules a table's files of this layout are written by.
    fn rules(self, table: &TableDef) -> &FileRules {
        match self {
            Layout::Flushed => &table.flushed,
            Layout::Compacted { .. } => &table.compacted,
        }
    }
}

fn writer_properties(table: &TableDef, layout: Layout, rows: usize) -> WriterProperties {
    let level = match layout {
        Layout::Flushed => 3,
        Layout::Compacted { zstd_level } => zstd_level,
    };
    // Compacted files are read by whole columns or by page (the page index): larger row
    // groups share dictionaries and compress better (-0.8 bytes per span).
    let group_rows = match layout {
        Layout::Flushed => ROW_GROUP_ROWS,
        Layout::Compacted { .. } => COMPACTED_ROW_GROUP_ROWS,
    };
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(level).unwrap_or_default(),
        ))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(group_rows))
        .set_data_page_row_count_limit(16 * 1024)
        .set_created_by(format!("meshscope {}", env!("CARGO_PKG_VERSION")));
    let per_group = rows.min(group_rows);
    let rules = layout.rules(table);
    for b in rules.blooms {
        let distinct = match b.distinct {
            Distinct::RowsPer(n) => (per_group / n.max(1)) as u64,
            Distinct::Fixed(n) => n,
        };
        let path = ColumnPath::from(b.column);
        props = props
            .set_column_bloom_filter_enabled(path.clone(), true)
            .set_column_bloom_filter_fpp(path.clone(), 0.01)
            .set_column_bloom_filter_max_ndv(path, distinct.max(64));
    }
    for (col, encoding) in rules.unique {
        let path = ColumnPath::from(*col);
        props = props.set_column_dictionary_enabled(path.clone(), false);
        if RANDOM_IDS.contains(col) {
            props = props.set_column_compression(
                path.clone(),
                Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()),
            );
        }
        if let Some(e) = encoding {
            props = props.set_column_encoding(path, *e);
        }
    }
    props.build()
}

/// Random hexadecimal ids: all zstd can do is code each digit in about four bits, which
/// its lowest level does best; higher levels find false matches in random digits and
/// spend more (measured on compacted spans: span_id 8.06 bytes per span at level 1, 8.35
/// at 12; trace_id 4.99 against 5.28; parent_span_id 3.03 against 3.22), and are slower.
const RANDOM_IDS: &[&str] = &["trace_id", "span_id", "parent_span_id"];

/// Sorts a table's batches into one batch, as `write` orders them.
#[cfg(test)]
fn prepare(
    table: &TableDef,
    layout: Layout,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<RecordBatch> {
    if batches.is_empty() {
        return Ok(RecordBatch::new_empty(Arc::clone(schema)));
    }
    let order = sort_order(table, layout, schema, batches)?;
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    Ok(interleave_record_batch(&refs, &order)?)
}

/// The order a table's rows are written in, as (batch, row within it). Only the sort
/// columns are concatenated; the writer then gathers the rows from the original batches a
/// slice at a time, so a compaction holds its inputs and one slice, not two copies.
fn sort_order(
    table: &TableDef,
    layout: Layout,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<(usize, usize)>> {
    let columns = layout
        .rules(table)
        .sort
        .iter()
        .map(|key| {
            let name = match key {
                SortKey::Column(n) | SortKey::Hour(n) => n,
            };
            let idx = schema.index_of(name).map_err(|_| Error::SchemaMismatch {
                table: table.name(),
            })?;
            let parts: Vec<&dyn Array> = batches.iter().map(|b| b.column(idx).as_ref()).collect();
            let values = concat(&parts)?;
            let values = match key {
                SortKey::Column(_) => values,
                SortKey::Hour(_) => hours(&values),
            };
            Ok(SortColumn {
                values,
                options: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let order = lexsort_to_indices(&columns, None)?;
    // Global row number -> (batch, row within it).
    let mut starts = Vec::with_capacity(batches.len());
    let mut total = 0usize;
    for b in batches {
        starts.push(total);
        total += b.num_rows();
    }
    let pairs: Vec<(usize, usize)> = order
        .values()
        .iter()
        .map(|&i| {
            let i = i as usize;
            let b = starts.partition_point(|&s| s <= i) - 1;
            (b, i - starts[b])
        })
        .collect();
    Ok(pairs)
}

/// Rows gathered into one batch at a time while writing.
const WRITE_SLICE_ROWS: usize = 64 * 1024;

/// Writes `batches` to `out` in the table's sort order, a slice at a time.
fn write_sorted<W: std::io::Write + Send>(
    out: &mut ArrowWriter<W>,
    table: &TableDef,
    layout: Layout,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<()> {
    if batches.is_empty() {
        return Ok(());
    }
    let order = sort_order(table, layout, schema, batches)?;
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    for slice in order.chunks(WRITE_SLICE_ROWS) {
        out.write(&interleave_record_batch(&refs, slice)?)?;
    }
    Ok(())
}

/// The hour (since the epoch) of each timestamp; nulls stay null.
fn hours(values: &ArrayRef) -> ArrayRef {
    const HOUR_NS: i64 = 3_600_000_000_000;
    match values.as_primitive_opt::<TimestampNanosecondType>() {
        Some(ts) => Arc::new(
            ts.iter()
                .map(|v| v.map(|t| t.div_euclid(HOUR_NS)))
                .collect::<Int64Array>(),
        ),
        None => Arc::clone(values),
    }
}

/// Where a file goes and what it holds.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    /// The local folder, unless `remote` is set.
    pub dir: &'a Path,
    pub remote: Option<&'a Remote>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub writer: &'a str,
    pub layout: Layout,
}

/// Writes `batches` as one durable Parquet file holding log entries
/// `first_seq..=last_seq` of `writer`.
pub fn write(table: &TableDef, at: Placement<'_>, batches: &[RecordBatch]) -> Result<ParquetFile> {
    let Placement {
        dir,
        remote,
        first_seq,
        last_seq,
        writer,
        layout,
    } = at;
    let schema = table.schema();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let name = file_name(first_seq, last_seq, writer);
    if let Some(remote) = remote {
        let mut buf = Vec::new();
        let mut out = ArrowWriter::try_new(
            &mut buf,
            Arc::clone(&schema),
            Some(writer_properties(table, layout, rows)),
        )?;
        write_sorted(&mut out, table, layout, &schema, batches)?;
        out.close()?;
        let size = buf.len() as u64;
        let key = remote.put(table, &name, buf)?;
        return Ok(ParquetFile {
            path: PathBuf::from(key.as_ref()),
            size,
            first_seq,
            last_seq,
            writer: writer.to_string(),
        });
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(&name);
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut out = ArrowWriter::try_new(
        file,
        Arc::clone(&schema),
        Some(writer_properties(table, layout, rows)),
    )?;
    write_sorted(&mut out, table, layout, &schema, batches)?;
    let file = out.into_inner()?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    let size = file.metadata().map_err(|e| Error::io(&tmp, e))?.len();
    drop(file);
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    sync_dir(dir)?;
    Ok(ParquetFile {
        path,
        size,
        first_seq,
        last_seq,
        writer: writer.to_string(),
    })
}

/// Gives a batch read from a file (or a write-ahead-log entry) written by an older version
/// the table's current schema: columns matched by name, missing ones null.
pub(crate) fn adapt(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema() == *schema {
        return Ok(batch);
    }
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(c) if c.data_type() == field.data_type() => Ok(Arc::clone(c)),
            Some(c) => Ok(arrow::compute::cast(c, field.data_type())?),
            None => Ok(arrow::array::new_null_array(
                field.data_type(),
                batch.num_rows(),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

/// Reads a whole file back in the table's current schema (compaction's input).
pub fn read_table(
    table: &TableDef,
    f: &ParquetFile,
    remote: Option<&Remote>,
) -> Result<Vec<RecordBatch>> {
    let schema = table.schema();
    read(f, remote)?
        .into_iter()
        .map(|b| adapt(b, &schema))
        .collect()
}

/// Reads a whole file back as written.
pub fn read(f: &ParquetFile, remote: Option<&Remote>) -> Result<Vec<RecordBatch>> {
    let batches = if let Some(remote) = remote {
        ParquetRecordBatchReaderBuilder::try_new(remote.get(f)?)?
            .with_batch_size(64 * 1024)
            .build()?
            .collect::<std::result::Result<Vec<_>, _>>()?
    } else {
        let file = File::open(&f.path).map_err(|e| Error::io(&f.path, e))?;
        ParquetRecordBatchReaderBuilder::try_new(file)?
            .with_batch_size(64 * 1024)
            .build()?
            .collect::<std::result::Result<Vec<_>, _>>()?
    };
    Ok(batches)
}

/// Deletes a file (a missing file is not an error).
pub fn delete(f: &ParquetFile, remote: Option<&Remote>) -> Result<()> {
    match remote {
        Some(r) => r.delete(f),
        None => match fs::remove_file(&f.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&f.path, e)),
        },
    }
}

/// What a file's footer says: its rows and the range of the table's time column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSummary {
    pub rows: u64,
    /// Nanoseconds since the epoch; `None` for a file without statistics.
    pub min_time: Option<i64>,
    pub max_time: Option<i64>,
}

/// Reads a file's footer (not its data).
pub fn summary(table: &TableDef, f: &ParquetFile, remote: Option<&Remote>) -> Result<FileSummary> {
    let meta = match remote {
        Some(r) => r.footer(f)?,
        None => {
            let file = File::open(&f.path).map_err(|e| Error::io(&f.path, e))?;
            SerializedFileReader::new(file)?.metadata().clone()
        }
    };
    let column = table.time_column();
    let mut out = FileSummary {
        rows: meta.file_metadata().num_rows().max(0) as u64,
        min_time: None,
        max_time: None,
    };
    for rg in meta.row_groups() {
        for col in rg.columns() {
            if col.column_path().string() != column {
                continue;
            }
            if let Some(Statistics::Int64(s)) = col.statistics() {
                if let Some(&v) = s.min_opt() {
                    out.min_time = Some(out.min_time.map_or(v, |m| m.min(v)));
                }
                if let Some(&v) = s.max_opt() {
                    out.max_time = Some(out.max_time.map_or(v, |m| m.max(v)));
                }
            }
        }
    }
    Ok(out)
}

/// Every Parquet file in `dir`, in sequence order (superseded ones included; see [`live`]).
pub fn list(dir: &Path) -> Result<Vec<ParquetFile>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some((first_seq, last_seq, writer)) = parse_name(name) {
            // A file deleted between the listing and here is simply not there.
            let Ok(meta) = entry.metadata() else { continue };
            out.push(ParquetFile {
                path,
                size: meta.len(),
                first_seq,
                last_seq,
                writer,
            });
        }
    }
    out.sort_by(|a, b| {
        (
            a.writer.as_str(),
            a.first_seq,
            std::cmp::Reverse(a.last_seq),
        )
            .cmp(&(
                b.writer.as_str(),
                b.first_seq,
                std::cmp::Reverse(b.last_seq),
            ))
    });
    Ok(out)
}

/// Removes the temporary files `writer` left behind when a crash interrupted a write.
pub fn remove_unfinished(dir: &Path, writer: &str) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(inner) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
            continue;
        };
        if parse_name(inner).is_some_and(|(_, _, w)| w == writer) {
            tracing::info!(file = %path.display(), "removing an unfinished Parquet file");
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Splits files into those queries read and those a finished compaction superseded (their
/// range lies inside another file's range of the same writer).
pub fn live(files: Vec<ParquetFile>) -> (Vec<ParquetFile>, Vec<ParquetFile>) {
    let mut by_writer: BTreeMap<String, Vec<ParquetFile>> = BTreeMap::new();
    for f in files {
        by_writer.entry(f.writer.clone()).or_default().push(f);
    }
    let (mut keep, mut gone) = (Vec::new(), Vec::new());
    for (_, mut files) in by_writer {
        // Widest first among equal starts, so a covering file comes before what it covers.
        files.sort_by_key(|f| (f.first_seq, std::cmp::Reverse(f.last_seq)));
        let mut cover: Option<ParquetFile> = None;
        for f in files {
            if cover.as_ref().is_some_and(|c| f.within(c)) {
                gone.push(f);
            } else {
                cover = Some(f.clone());
                keep.push(f);
            }
        }
    }
    keep.sort_by_key(|f| (f.first_seq, f.writer.clone()));
    (keep, gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_sorts_rows_across_batches() {
        use arrow::array::{Array, AsArray};
        let req = |ids: &[u8]| {
            let spans = ids
                .iter()
                .map(|i| meshscope_proto::otlp::trace::v1::Span {
                    trace_id: vec![*i; 16],
                    span_id: vec![*i; 8],
                    start_time_unix_nano: 1,
                    end_time_unix_nano: 2,
                    ..Default::default()
                })
                .collect();
            meshscope_proto::otlp::collector::trace::v1::ExportTraceServiceRequest {
                resource_spans: vec![meshscope_proto::otlp::trace::v1::ResourceSpans {
                    scope_spans: vec![meshscope_proto::otlp::trace::v1::ScopeSpans {
                        spans,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            }
        };
        let a = meshscope_proto::convert::spans(&req(&[5, 1, 9]))
            .expect("a")
            .batch;
        let b = meshscope_proto::convert::spans(&req(&[3, 7]))
            .expect("b")
            .batch;
        let out = prepare(
            &crate::table_def::SPANS,
            Layout::Flushed,
            &crate::table_def::SPANS.schema(),
            &[a, b],
        )
        .expect("prepare");
        let ids = out
            .column_by_name("span_id")
            .expect("col")
            .as_string::<i32>()
            .clone();
        let got: Vec<&str> = (0..ids.len()).map(|i| &ids.value(i)[..2]).collect();
        assert_eq!(got, vec!["01", "03", "05", "07", "09"]);
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(
            parse_name(&file_name(3, 17, "")),
            Some((3, 17, String::new()))
        );
        assert_eq!(
            parse_name(&file_name(3, 17, "c1")),
            Some((3, 17, "c1".to_string()))
        );
        assert_eq!(parse_name("x.parquet"), None);
        assert_eq!(parse_name("1-2.wal"), None);
        assert!(valid_writer_id("collector_1"));
        assert!(!valid_writer_id("a.b") && !valid_writer_id("a-b") && !valid_writer_id(""));
    }

    #[test]
    fn files_inside_a_compacted_range_are_superseded() {
        let f = |a: u64, b: u64, w: &str| ParquetFile {
            path: PathBuf::from(file_name(a, b, w)),
            size: 1,
            first_seq: a,
            last_seq: b,
            writer: w.to_string(),
        };
        let (keep, gone) = live(vec![
            f(1, 3, ""),
            f(4, 6, ""),
            f(1, 6, ""), // compacted from the two above
            f(7, 9, ""),
            f(2, 5, "c1"), // another writer's sequence space
        ]);
        let names = |v: &[ParquetFile]| {
            let mut n: Vec<(u64, u64, String)> = v
                .iter()
                .map(|f| (f.first_seq, f.last_seq, f.writer.clone()))
                .collect();
            n.sort();
            n
        };
        assert_eq!(
            names(&keep),
            vec![
                (1, 6, String::new()),
                (2, 5, "c1".to_string()),
                (7, 9, String::new())
            ]
        );
        assert_eq!(
            names(&gone),
            vec![(1, 3, String::new()), (4, 6, String::new())]
        );
    }
}
