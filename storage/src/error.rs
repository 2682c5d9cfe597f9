//! Storage errors: one variant per cause.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// A file-system operation failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Encoding or decoding Arrow data failed.
    #[error("Arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Writing or reading a Parquet file failed.
    #[error("Parquet error: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// A batch does not have the table's schema (a bug in the caller).
    #[error("table {table} is defined twice")]
    DuplicateTable { table: &'static str },
    #[error("batch schema does not match table {table}")]
    SchemaMismatch { table: &'static str },
    /// The buffers or the write-ahead log are full; the client should retry later.
    #[error("{table} ingest is overloaded ({why}); retry later")]
    Overloaded {
        table: &'static str,
        why: &'static str,
    },
    /// The object store refused or failed a request.
    #[error("object storage error: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// DataFusion's file readers failed.
    #[error("DataFusion error: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    /// The object-storage location is misconfigured.
    #[error("{0}")]
    Remote(String),
    /// The storage is shutting down or its writer has stopped.
    #[error("{table} storage is not accepting writes: {why}")]
    Closed { table: &'static str, why: String },
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the client may succeed by retrying the same request later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Overloaded { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
