//! The DataFusion session over meshscope's tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::DFParser;
use meshscope_proto::Table;
use meshscope_storage::{Storage, StoredTable};
use thiserror::Error;

use crate::executor::Executor;
use crate::readonly::{self, ReadOnly, Surface};

/// Why a query did not run. User errors map to HTTP 400 / Postgres ERROR; `Internal` is ours.
#[derive(Debug, Error)]
pub enum QueryError {
    /// The statement would change something.
    #[error(transparent)]
    ReadOnly(#[from] ReadOnly),
    /// Bad SQL, an unknown table or column, a type error, a division by zero …
    #[error("{0}")]
    Invalid(String),
    /// Memory limit reached while running the query.
    #[error("{0}")]
    ResourcesExhausted(String),
    /// A failure on meshscope's side (I/O, a bug).
    #[error("{0}")]
    Internal(String),
}

impl From<meshscope_storage::Error> for QueryError {
    fn from(e: meshscope_storage::Error) -> Self {
        QueryError::Internal(e.to_string())
    }
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        let msg = e.to_string();
        match e.find_root() {
            DataFusionError::Internal(_)
            | DataFusionError::IoError(_)
            | DataFusionError::ObjectStore(_)
            | DataFusionError::ParquetError(_) => QueryError::Internal(msg),
            DataFusionError::ResourcesExhausted(_) => QueryError::ResourcesExhausted(msg),
            _ => QueryError::Invalid(msg),
        }
    }
}

/// A query's answer.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

/// Plans and runs read-only SQL over the stored tables, on the query [`Executor`].
#[derive(Clone)]
pub struct QueryEngine {
    ctx: Arc<SessionContext>,
    storage: Storage,
    executor: Executor,
    stats: Arc<QueryStats>,
}

/// Counters of the query side, for `/metrics`.
#[derive(Debug, Default)]
pub struct QueryStats {
    /// Statements run (API, CLI and the analysis endpoints; not the Postgres wire).
    pub queries: AtomicU64,
    /// Statements that failed (user errors included).
    pub failed: AtomicU64,
    /// Wall-clock time spent in them, in nanoseconds.
    pub nanos: AtomicU64,
    /// Statements running now: counted by a guard inside the query's task, so a statement
    /// cancelled because its caller went away leaves this count when its task ends.
    pub running: AtomicU64,
}

/// Counts a running statement for as long as it lives.
struct Running(Arc<QueryStats>);

impl Running {
    fn start(stats: &Arc<QueryStats>) -> Running {
        stats.running.fetch_add(1, Ordering::Relaxed);
        Running(Arc::clone(stats))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine")
            .field("session", &self.ctx.session_id())
            .finish()
    }
}

/// Settings of the query side.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Partitions DataFusion splits a scan into (usually the core count).
    pub target_partitions: usize,
    /// Memory all running queries may hold together, in bytes.
    pub memory_limit: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            target_partitions: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            memory_limit: 4 << 30,
        }
    }
}

impl QueryEngine {
    pub fn new(
        storage: &Storage,
        executor: Executor,
        config: EngineConfig,
    ) -> Result<Self, DataFusionError> {
        let session = SessionConfig::new()
            .with_information_schema(true)
            .with_target_partitions(config.target_partitions)
            .with_default_catalog_and_schema("datafusion", "public");
        // Late materialisation: decode the filter columns first (a trace id, a service),
        // then the rest of the columns only for the rows that pass.
        let mut session = session;
        session.options_mut().execution.parquet.pushdown_filters = true;
        session.options_mut().execution.parquet.reorder_filters = true;
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(config.memory_limit, 1.0)
            .build_arc()?;
        let ctx = SessionContext::new_with_config_rt(session, runtime);
        if let Some(remote) = storage.remote() {
            ctx.register_object_store(remote.url().as_ref(), remote.object_store());
        }
        for t in Table::ALL {
            ctx.register_table(
                t.name(),
                Arc::new(StoredTable::new(Arc::clone(storage.table(t)))),
            )?;
        }
        Ok(QueryEngine {
            ctx: Arc::new(ctx),
            storage: storage.clone(),
            executor,
            stats: Arc::default(),
        })
    }

    /// The session, for the Postgres wire protocol and the analysis modules.
    pub fn context(&self) -> &Arc<SessionContext> {
        &self.ctx
    }

    /// The stored tables, for the analysis paths that scan them directly.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn executor(&self) -> &Executor {
        &self.executor
    }

    /// Runs CPU-bound `f` on the query runtime and waits for it; it is cancelled when the
    /// caller goes away before it starts.
    pub async fn compute<T, F>(&self, f: F) -> Result<T, QueryError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.executor
            .compute(f)
            .await
            .map_err(|e| QueryError::Internal(format!("analysis task failed: {e}")))
    }

    pub fn stats(&self) -> &QueryStats {
        &self.stats
    }

    /// Runs one read-only statement and collects its result.
    pub async fn sql(&self, sql: &str) -> Result<QueryResult, QueryError> {
        let started = Instant::now();
        let result = self.run(sql).await;
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.stats
            .nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }

    async fn run(&self, sql: &str) -> Result<QueryResult, QueryError> {
        let statements = DFParser::parse_sql(sql).map_err(QueryError::from)?;
        match statements.len() {
            0 => return Err(QueryError::Invalid("no SQL statement given".into())),
            1 => readonly::check_df(&statements[0], Surface::Http)?,
            n => {
                return Err(QueryError::Invalid(format!(
                    "one statement at a time, got {n}"
                )));
            }
        }
        let ctx = Arc::clone(&self.ctx);
        let sql = sql.to_string();
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let running = Running::start(&self.stats);
        self.executor
            .spawn(async move {
                let _running = running;
                let df = ctx.sql_with_options(&sql, options).await?;
                let schema = Arc::new(df.schema().as_arrow().clone());
                let batches = df.collect().await?;
                Ok::<_, DataFusionError>(QueryResult { schema, batches })
            })
            .await
            .map_err(|e| QueryError::Internal(format!("query task failed: {e}")))?
            .map_err(QueryError::from)
    }
}
