//! Parquet files on an S3-compatible object store (`--storage-url s3://bucket/prefix`)
//! instead of the local data directory; the write-ahead log stays on local disk.
//!
//! The layout is the same as on disk: `<prefix>/<table>/<first>-<last>[.<node>].parquet`.
//! A PUT is atomic, so a file is either whole or absent; compaction's exactly-once rule
//! (superseded ranges) works unchanged. Credentials, region and endpoint come from the
//! usual `AWS_*` variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT`, `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint), read by the
//! object_store crate's `AmazonS3Builder`.
//!
//! Storage's writer and maintenance threads are plain threads, so each call here blocks on
//! the runtime handle captured when the store was opened.

use std::sync::Arc;

use crate::table_def::TableDef;
use bytes::Bytes;
use datafusion::execution::object_store::ObjectStoreUrl;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::file::metadata::ParquetMetaDataReader;

use crate::error::{Error, Result};
use crate::parquet_file::{self, ParquetFile};

/// An object-store location for every table's Parquet files.
#[derive(Debug, Clone)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    url: ObjectStoreUrl,
    prefix: ObjPath,
    handle: tokio::runtime::Handle,
}

impl Remote {
    /// `s3://bucket[/prefix]`, configured from the `AWS_*` environment. Must be called
    /// inside a tokio runtime (its handle runs the requests).
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::Remote(format!("bad storage URL {url:?}: {e}")))?;
        if parsed.scheme() != "s3" {
            return Err(Error::Remote(format!(
                "unsupported storage URL {url:?}: use s3://bucket/prefix (local disk is the default)"
            )));
        }
        let bucket = parsed
            .host_str()
            .ok_or_else(|| Error::Remote(format!("no bucket in storage URL {url:?}")))?;
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| Error::Remote(format!("cannot configure S3 for {url:?}: {e}")))?;
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Remote("object storage needs a tokio runtime".into()))?;
        Ok(Remote {
            store: Arc::new(store),
            url: ObjectStoreUrl::parse(format!("s3://{bucket}"))
                .map_err(|e| Error::Remote(e.to_string()))?,
            prefix: ObjPath::from(parsed.path().trim_matches('/')),
            handle,
        })
    }

    /// The store, for DataFusion's runtime to read through.
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    /// The URL DataFusion knows the store by (`s3://bucket`).
    pub fn url(&self) -> &ObjectStoreUrl {
        &self.url
    }

    fn table_prefix(&self, table: &TableDef) -> ObjPath {
        self.prefix.clone().join(table.name())
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }

    /// Runs a background task on the store's runtime.
    pub(crate) fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.handle.spawn(f);
    }

    /// Uploads one file.
    pub(crate) fn put(&self, table: &TableDef, name: &str, bytes: Vec<u8>) -> Result<ObjPath> {
        let key = self.table_prefix(table).join(name);
        self.block_on(self.store.put(&key, PutPayload::from(bytes)))?;
        Ok(key)
    }

    /// Every Parquet file of `table`, superseded ones included.
    pub(crate) async fn list_async(&self, table: &TableDef) -> Result<Vec<ParquetFile>> {
        let prefix = self.table_prefix(table);
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        let mut out: Vec<ParquetFile> = metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                let (first_seq, last_seq, writer) = parquet_file::parse_name(name)?;
                Some(ParquetFile {
                    path: m.location.as_ref().into(),
                    size: m.size,
                    first_seq,
                    last_seq,
                    writer,
                })
            })
            .collect();
        out.sort_by_key(|f| (f.writer.clone(), f.first_seq));
        Ok(out)
    }

    pub(crate) fn list(&self, table: &TableDef) -> Result<Vec<ParquetFile>> {
        self.block_on(self.list_async(table))
    }

    fn key(f: &ParquetFile) -> ObjPath {
        ObjPath::from(f.path.to_string_lossy().as_ref())
    }

    /// A whole file's bytes.
    pub(crate) fn get(&self, f: &ParquetFile) -> Result<Bytes> {
        let key = Self::key(f);
        self.block_on(async { self.store.get(&key).await?.bytes().await })
            .map_err(Error::from)
    }

    /// A file's footer (two ranged reads), without its data.
    pub(crate) fn footer(
        &self,
        f: &ParquetFile,
    ) -> Result<parquet::file::metadata::ParquetMetaData> {
        let key = Self::key(f);
        if f.size < 12 {
            return Err(Error::Remote(format!("{key} is too small to be Parquet")));
        }
        let tail = self.block_on(self.store.get_range(&key, f.size - 8..f.size))?;
        if &tail[4..8] != b"PAR1" {
            return Err(Error::Remote(format!("{key} is not a Parquet file")));
        }
        let len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
        let start = (f.size - 8)
            .checked_sub(len)
            .ok_or_else(|| Error::Remote(format!("{key} has a broken footer")))?;
        let meta = self.block_on(self.store.get_range(&key, start..f.size - 8))?;
        Ok(ParquetMetaDataReader::decode_metadata(&meta)?)
    }

    pub(crate) fn delete(&self, f: &ParquetFile) -> Result<()> {
        let key = Self::key(f);
        match self.block_on(self.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
