//! Parquet files of one table: naming, writing (sorted, zstd, atomically) and listing.
//!
//! A file is named by the range of write-ahead-log sequence numbers it holds,
//! `<first_seq>-<last_seq>.parquet` (20 digits each), so start-up knows which log entries are
//! already durable in Parquet without reading any file. Files are written to a hidden
//! temporary name, fsynced, renamed into place and the folder fsynced: a crash leaves either
//! the whole file or none of it (and a temporary file that start-up removes).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use meshscope_proto::Table;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::error::{Error, Result};
use crate::wal::sync_dir;

/// A Parquet file that queries read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParquetFile {
    pub path: PathBuf,
    pub size: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Rows per row group: small enough that min/max statistics prune well (files are sorted).
const ROW_GROUP_ROWS: usize = 128 * 1024;

fn file_name(first_seq: u64, last_seq: u64) -> String {
    format!("{first_seq:020}-{last_seq:020}.parquet")
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".parquet")?;
    let (a, b) = stem.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The columns each table's files are sorted by: they cluster what queries look up together
/// and make the encodings compress (spans: a trace's spans side by side).
fn sort_columns(table: Table) -> &'static [&'static str] {
    match table {
        Table::Spans => &["trace_id", "start_time"],
        Table::Logs => &["service_name", "time"],
        Table::Metrics => &["metric_name", "service_name", "time"],
        Table::Rollups => &["kind", "source", "minute"],
    }
}

fn writer_properties(table: Table, rows: usize) -> WriterProperties {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_data_page_row_count_limit(16 * 1024)
        .set_created_by(format!("meshscope {}", env!("CARGO_PKG_VERSION")));
    let bloom =
        |props: parquet::file::properties::WriterPropertiesBuilder, col: &str, ndv: usize| {
            let path = ColumnPath::from(col);
            props
                .set_column_bloom_filter_enabled(path.clone(), true)
                .set_column_bloom_filter_fpp(path.clone(), 0.01)
                .set_column_bloom_filter_max_ndv(path, ndv.max(64) as u64)
        };
    let per_group = rows.min(ROW_GROUP_ROWS);
    match table {
        Table::Spans => props = bloom(props, "trace_id", per_group / 2),
        Table::Logs => props = bloom(props, "trace_id", per_group),
        Table::Metrics | Table::Rollups => {}
    }
    props.build()
}

/// Sorts and concatenates a table's batches into one batch ready to write.
pub fn prepare(table: Table, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch> {
    let all = concat_batches(schema, batches)?;
    let columns = sort_columns(table)
        .iter()
        .map(|name| {
            let values = all
                .column_by_name(name)
                .cloned()
                .ok_or(Error::SchemaMismatch {
                    table: table.name(),
                })?;
            Ok(SortColumn {
                values,
                options: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let indices = lexsort_to_indices(&columns, None)?;
    Ok(take_record_batch(&all, &indices)?)
}

/// Writes `batches` as one durable Parquet file in `dir` holding log entries
/// `first_seq..=last_seq`.
pub fn write(
    table: Table,
    dir: &Path,
    batches: &[RecordBatch],
    first_seq: u64,
    last_seq: u64,
) -> Result<ParquetFile> {
    let schema = table.schema();
    let batch = prepare(table, &schema, batches)?;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = file_name(first_seq, last_seq);
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(&name);
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut writer = ArrowWriter::try_new(
        file,
        Arc::clone(&schema),
        Some(writer_properties(table, batch.num_rows())),
    )?;
    writer.write(&batch)?;
    let file = writer.into_inner()?;
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
    })
}

/// The table's Parquet files, in sequence order. Removes leftover temporary files of a
/// write that a crash interrupted.
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
        if name.starts_with('.') && name.ends_with(".tmp") {
            tracing::info!(file = %path.display(), "removing an unfinished Parquet file");
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            continue;
        }
        if let Some((first_seq, last_seq)) = parse_name(name) {
            let size = entry.metadata().map_err(|e| Error::io(&path, e))?.len();
            out.push(ParquetFile {
                path,
                size,
                first_seq,
                last_seq,
            });
        }
    }
    out.sort_by_key(|f| f.first_seq);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_name(&file_name(3, 17)), Some((3, 17)));
        assert_eq!(parse_name("x.parquet"), None);
        assert_eq!(parse_name("1-2.wal"), None);
    }
}
