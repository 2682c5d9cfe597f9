//! The DataFusion session over meshscope's tables.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::error::DataFusionError;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::DFParser;
use futures::StreamExt;
use meshscope_storage::{Storage, StoredTable};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

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
    /// The query ran past `--query-timeout-secs` and was cancelled (HTTP 408, SQLSTATE 57014).
    #[error(
        "the query was cancelled after {:.1} s: queries may run for {} s \
         (--query-timeout-secs); narrow its time range or filters",
        .elapsed.as_secs_f64(), .limit.as_secs()
    )]
    Timeout { elapsed: Duration, limit: Duration },
    /// `--max-concurrent-queries` were running for as long as the query could wait (HTTP 503).
    #[error(
        "{running} queries are running (--max-concurrent-queries) and none finished within \
         {:.1} s; try again", .waited.as_secs_f64()
    )]
    Busy { running: usize, waited: Duration },
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

/// The values a statement refers to as `$1`, `$2` …: text that comes from a user (a
/// service name, a trace id, an attribute) is bound as data and never becomes SQL.
///
/// ```
/// # use meshscope_query::Params;
/// let mut p = Params::default();
/// let sql = format!("SELECT 1 FROM spans WHERE service_name = {}", p.bind("o'brien"));
/// assert_eq!(sql, "SELECT 1 FROM spans WHERE service_name = $1");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Params(Vec<ScalarValue>);

impl Params {
    /// Binds `value` and returns its placeholder, to be written into the statement.
    pub fn bind(&mut self, value: impl Into<String>) -> String {
        self.0.push(ScalarValue::Utf8(Some(value.into())));
        format!("${}", self.0.len())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
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
    limits: QueryLimits,
    admission: Arc<Semaphore>,
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
    /// Requests (SQL, API, Postgres) cancelled at `--query-timeout-secs`.
    pub timed_out: AtomicU64,
    /// Requests refused because `--max-concurrent-queries` stayed busy.
    pub refused_busy: AtomicU64,
    /// `/api/v1/sql` answers cut at `--sql-max-rows`.
    pub truncated: AtomicU64,
    /// Requests waiting now for a place among `--max-concurrent-queries`.
    pub waiting: AtomicU64,
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
    pub limits: QueryLimits,
}

/// Bounds on what users ask (SQL, the API, the Postgres wire). meshscope's own work
/// (rollups, `/metrics` counters, alert rules) is not bounded by them.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// A request running longer is cancelled [30 s].
    pub timeout: Duration,
    /// Requests running at once; more wait (as long as `timeout`) for one to finish [8].
    pub max_concurrent: usize,
    /// Rows a JSON answer of `/api/v1/sql` holds at most [100000].
    pub sql_max_rows: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            timeout: Duration::from_secs(30),
            max_concurrent: 8,
            sql_max_rows: 100_000,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            target_partitions: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            memory_limit: 4 << 30,
            limits: QueryLimits::default(),
        }
    }
}

/// A place among the running requests, held until the request's answer is sent.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    /// When the request must be finished.
    pub deadline: tokio::time::Instant,
    pub started: Instant,
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
        for t in storage.tables() {
            ctx.register_table(t.table().name, Arc::new(StoredTable::new(Arc::clone(t))))?;
        }
        Ok(QueryEngine {
            ctx: Arc::new(ctx),
            storage: storage.clone(),
            executor,
            stats: Arc::default(),
            limits: config.limits,
            admission: Arc::new(Semaphore::new(config.limits.max_concurrent.max(1))),
        })
    }

    pub fn limits(&self) -> &QueryLimits {
        &self.limits
    }

    /// Waits (at most the query timeout) for a place among the running requests.
    pub async fn admit(&self) -> Result<Admitted, QueryError> {
        let started = Instant::now();
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let wait = tokio::time::timeout(
            self.limits.timeout,
            Arc::clone(&self.admission).acquire_owned(),
        )
        .await;
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        match wait {
            Ok(Ok(permit)) => Ok(Admitted {
                _permit: permit,
                deadline: tokio::time::Instant::now() + self.limits.timeout,
                started: Instant::now(),
            }),
            Ok(Err(_)) => Err(QueryError::Internal(
                "the query engine is shutting down".into(),
            )),
            Err(_) => {
                self.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                Err(QueryError::Busy {
                    running: self.limits.max_concurrent,
                    waited: started.elapsed(),
                })
            }
        }
    }

    /// Runs a user's request within the limits: a place among the running ones, and the
    /// timeout (dropping `fut` cancels the query jobs it awaits).
    pub async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, QueryError>>,
    ) -> Result<T, QueryError> {
        let admitted = self.admit().await?;
        self.until(&admitted, fut).await
    }

    /// `fut`, cancelled at the admitted request's deadline.
    pub async fn until<T>(
        &self,
        admitted: &Admitted,
        fut: impl Future<Output = Result<T, QueryError>>,
    ) -> Result<T, QueryError> {
        match tokio::time::timeout_at(admitted.deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out(admitted)),
        }
    }

    fn timed_out(&self, admitted: &Admitted) -> QueryError {
        self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
        QueryError::Timeout {
            elapsed: admitted.started.elapsed(),
            limit: self.limits.timeout,
        }
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
        self.sql_with(sql, Params::default()).await
    }

    /// Runs one read-only statement whose `$n` placeholders take `params`' values.
    pub async fn sql_with(&self, sql: &str, params: Params) -> Result<QueryResult, QueryError> {
        let started = Instant::now();
        let result = self
            .run_capped(sql, params, usize::MAX)
            .await
            .map(|(r, _)| r);
        self.count(started, result.is_err());
        result
    }

    /// Runs one read-only statement, keeping at most `max_rows` rows of its answer (the
    /// rest is not computed); says whether rows were left out.
    pub async fn sql_capped(
        &self,
        sql: &str,
        max_rows: usize,
    ) -> Result<(QueryResult, bool), QueryError> {
        let started = Instant::now();
        let result = self.run_capped(sql, Params::default(), max_rows).await;
        self.count(started, result.is_err());
        if matches!(result, Ok((_, true))) {
            self.stats.truncated.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn count(&self, started: Instant, failed: bool) {
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.stats
            .nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Runs one read-only statement and hands its batches over as they come (at most two
    /// waiting), for answers of any size in bounded memory. The query runs on the query
    /// runtime until its last batch, the receiver goes away, or `admitted`'s deadline.
    pub async fn sql_stream(
        &self,
        sql: &str,
        admitted: Admitted,
    ) -> Result<(SchemaRef, mpsc::Receiver<Result<RecordBatch, QueryError>>), QueryError> {
        let started = Instant::now();
        let ctx = Arc::clone(&self.ctx);
        let options = Self::read_only(sql)?;
        let sql = sql.to_string();
        let (schema_tx, schema_rx) = tokio::sync::oneshot::channel();
        let (tx, rx) = mpsc::channel(2);
        let running = Running::start(&self.stats);
        let engine = self.clone();
        self.executor.spawn_detached(async move {
            let _running = running;
            let deadline = admitted.deadline;
            let work = async {
                let df = ctx.sql_with_options(&sql, options).await?;
                let schema = Arc::new(df.schema().as_arrow().clone());
                let mut stream = df.execute_stream().await?;
                if schema_tx.send(Ok(schema)).is_err() {
                    return Ok(());
                }
                while let Some(batch) = stream.next().await {
                    let failed = batch.is_err();
                    if tx.send(batch.map_err(QueryError::from)).await.is_err() || failed {
                        return Ok(());
                    }
                }
                Ok::<_, DataFusionError>(())
            };
            let outcome = tokio::select! {
                r = tokio::time::timeout_at(deadline, work) => r,
                // The client went away: stop computing.
                () = tx.closed() => Ok(Ok(())),
            };
            let failed = !matches!(outcome, Ok(Ok(())));
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // Before the schema: the planning error; after: the stream's.
                    let e = QueryError::from(e);
                    let _ = tx.send(Err(QueryError::Invalid(e.to_string()))).await;
                }
                Err(_) => {
                    let _ = tx.send(Err(engine.timed_out(&admitted))).await;
                }
            }
            engine.count(started, failed);
            drop(admitted);
            Ok::<(), QueryError>(())
        });
        match schema_rx.await {
            Ok(Ok(schema)) => Ok((schema, rx)),
            Ok(Err(e)) => Err(e),
            // The task ended before a schema: its error is the first message.
            Err(_) => {
                let mut rx = rx;
                match rx.recv().await {
                    Some(Err(e)) => Err(e),
                    _ => Err(QueryError::Internal(
                        "the query ended without an answer".into(),
                    )),
                }
            }
        }
    }

    fn read_only(sql: &str) -> Result<SQLOptions, QueryError> {
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
        Ok(SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false))
    }

    async fn run_capped(
        &self,
        sql: &str,
        params: Params,
        max_rows: usize,
    ) -> Result<(QueryResult, bool), QueryError> {
        let options = Self::read_only(sql)?;
        let ctx = Arc::clone(&self.ctx);
        let sql = sql.to_string();
        let running = Running::start(&self.stats);
        self.executor
            .spawn(async move {
                let _running = running;
                let mut df = ctx.sql_with_options(&sql, options).await?;
                if !params.is_empty() {
                    df = df.with_param_values(params.0)?;
                }
                let schema = Arc::new(df.schema().as_arrow().clone());
                let mut stream = df.execute_stream().await?;
                let mut batches = Vec::new();
                let mut rows = 0;
                let mut truncated = false;
                while let Some(batch) = stream.next().await {
                    let batch = batch?;
                    let room = max_rows - rows;
                    if batch.num_rows() > room {
                        if room > 0 {
                            batches.push(batch.slice(0, room));
                        }
                        truncated = true;
                        break;
                    }
                    rows += batch.num_rows();
                    batches.push(batch);
                }
                Ok::<_, DataFusionError>((QueryResult { schema, batches }, truncated))
            })
            .await
            .map_err(|e| QueryError::Internal(format!("query task failed: {e}")))?
            .map_err(QueryError::from)
    }
}
