//! The DataFusion table over one [`TableStore`]: its Parquet files and its buffered batches,
//! read from one [`Snapshot`](crate::Snapshot) per query.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::catalog::TableProvider;
use datafusion::common::{DFSchema, DataFusionError, Result, ScalarValue, project_schema};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::parquet::{
    CachedParquetFileReaderFactory, ParquetAccessPlan, ParquetFileReaderFactory,
};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;

use crate::bloom_cache::BloomCachingFactory;
use crate::table_store::TableStore;
use crate::trace_index::TraceIndex;

/// A stored table as DataFusion sees it.
#[derive(Debug)]
pub struct StoredTable {
    store: Arc<TableStore>,
    schema: SchemaRef,
}

impl StoredTable {
    pub fn new(store: Arc<TableStore>) -> Self {
        let schema = store.table().schema();
        StoredTable { store, schema }
    }
}

/// Readers of a table's Parquet files through the runtime's object store (local disk or
/// the bucket) with footers cached in the runtime and bloom filters in the table across
/// queries.
pub fn reader_factory(
    store: &TableStore,
    runtime: &RuntimeEnv,
) -> Result<Arc<dyn ParquetFileReaderFactory>> {
    let objects = runtime.object_store(store.object_store_url())?;
    let metadata_cache = runtime.cache_manager.get_file_metadata_cache();
    Ok(Arc::new(BloomCachingFactory {
        inner: Arc::new(CachedParquetFileReaderFactory::new(objects, metadata_cache)),
        cache: Arc::clone(&store.blooms),
    }))
}

/// `v` when the filters include `trace_id = 'v'`.
fn trace_id_literal(filters: &[Expr]) -> Option<String> {
    filters.iter().find_map(|f| match f {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => match (left.as_ref(), right.as_ref()) {
            (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c))
                if c.name == "trace_id" =>
            {
                match v {
                    ScalarValue::Utf8(Some(s))
                    | ScalarValue::Utf8View(Some(s))
                    | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
                    _ => None,
                }
            }
            _ => None,
        },
        _ => None,
    })
}

/// The files that may hold trace `id`, each limited to the row groups that may.
fn by_trace_id(
    index: &TraceIndex,
    files: Vec<crate::parquet_file::ParquetFile>,
    id: &str,
) -> Result<Vec<PartitionedFile>> {
    let mut out = Vec::new();
    for f in files {
        let (total, groups) = index
            .row_groups(&f.path, id)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        if groups.is_empty() {
            continue;
        }
        let mut plan = ParquetAccessPlan::new_none(total);
        for g in groups {
            plan.scan(g);
        }
        out.push(PartitionedFile::new(f.path.to_string_lossy(), f.size).with_extension(plan));
    }
    Ok(out)
}

/// Spreads items over at most `n` groups, balancing a weight.
fn spread<T>(items: Vec<T>, n: usize, weight: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let n = n.max(1).min(items.len().max(1));
    let mut groups: Vec<(u64, Vec<T>)> = (0..n).map(|_| (0, Vec::new())).collect();
    let mut items = items;
    items.sort_by_key(|i| std::cmp::Reverse(weight(i)));
    for item in items {
        if let Some(g) = groups.iter_mut().min_by_key(|g| g.0) {
            g.0 += weight(&item);
            g.1.push(item);
        }
    }
    groups
        .into_iter()
        .map(|g| g.1)
        .filter(|g| !g.is_empty())
        .collect()
}

#[async_trait]
impl TableProvider for StoredTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let snapshot = self.store.snapshot();
        let partitions = state.config().target_partitions();
        let mut plans: Vec<Arc<dyn ExecutionPlan>> = Vec::new();

        if !snapshot.files.is_empty() {
            // The session's Parquet options (bloom filters, filter pushdown), and footers
            // cached across queries: a trace lookup touches every file's footer.
            let url = self.store.object_store_url();
            let mut source = ParquetSource::new(Arc::clone(&self.schema))
                .with_table_parquet_options(state.table_options().parquet.clone())
                .with_parquet_file_reader_factory(reader_factory(
                    &self.store,
                    state.runtime_env(),
                )?);
            // Prune row groups and pages with the query's filters (statistics, bloom filters).
            if let Some(expr) = conjunction(filters.iter().cloned()) {
                let df_schema = DFSchema::try_from(Arc::clone(&self.schema))?;
                let predicate = state.create_physical_expr(expr, &df_schema)?;
                source = source.with_predicate(predicate);
            }
            let files = match (trace_id_literal(filters), self.store.remote()) {
                // A lookup by trace id: only the files and row groups that may hold it.
                (Some(id), None) => {
                    let index = Arc::clone(&self.store.traces);
                    tokio::task::spawn_blocking(move || by_trace_id(&index, snapshot.files, &id))
                        .await
                        .map_err(|e| DataFusionError::External(Box::new(e)))??
                }
                _ => snapshot
                    .files
                    .into_iter()
                    .map(|f| PartitionedFile::new(f.path.to_string_lossy(), f.size))
                    .collect::<Vec<_>>(),
            };
            if !files.is_empty() {
                let groups = spread(files, partitions, |f| f.object_meta.size)
                    .into_iter()
                    .map(FileGroup::new)
                    .collect();
                let config = FileScanConfigBuilder::new(url, Arc::new(source))
                    .with_file_groups(groups)
                    .with_projection_indices(projection.cloned())?
                    .with_limit(limit)
                    .build();
                plans.push(DataSourceExec::from_data_source(config));
            }
        }
        if !snapshot.batches.is_empty() {
            let parts = spread(snapshot.batches, partitions, |b| b.num_rows() as u64);
            let mem =
                MemorySourceConfig::try_new(&parts, Arc::clone(&self.schema), projection.cloned())?
                    .with_limit(limit);
            plans.push(DataSourceExec::from_data_source(mem));
        }
        if plans.is_empty() {
            return Ok(Arc::new(EmptyExec::new(project_schema(
                &self.schema,
                projection,
            )?)));
        }
        UnionExec::try_new(plans)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Files are pruned with the filters, but rows are still filtered above the scan.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn spread_balances_and_drops_empty_groups() {
        let g = spread(vec![5u64, 1, 1, 1, 1, 1], 2, |x| *x);
        assert_eq!(g.len(), 2);
        let sums: Vec<u64> = g.iter().map(|g| g.iter().sum()).collect();
        assert_eq!(sums, vec![5, 5]);
        assert_eq!(spread(vec![1u64], 8, |x| *x).len(), 1);
        assert!(spread(Vec::<u64>::new(), 4, |x| *x).is_empty());
    }
}
