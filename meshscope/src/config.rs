//! Typed configuration, parsed once at start-up.
//!
//! Every server flag can come from the command line, a `MESHSCOPE_*` environment variable
//! or the TOML file given with `--config`, in that order of precedence.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use meshscope_storage::table_def::{self, Source};
use meshscope_storage::{CompactionPolicy, Retention, Upkeep};
use serde::{Deserialize, Serialize};

/// meshscope: service-mesh observability. OTLP in, SQL out.
#[derive(Debug, Parser)]
#[command(name = "meshscope", version, about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `meshscope_storage=debug`).
    #[arg(long, global = true, env = "MESHSCOPE_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// All-in-one server: OTLP receivers, storage, query API, SQL over HTTP and Postgres.
    Serve(ServeArgs),
    /// Ingest only: OTLP receivers writing Parquet into a shared data directory (run any
    /// number, each with its own --node-id). Serves /healthz, /readyz and /metrics.
    Collector(ServeArgs),
    /// Query only: SQL, API, UI and alerts over the Parquet files every collector wrote.
    Query(ServeArgs),
    /// Runs SQL against a running server and prints the result.
    Sql(SqlArgs),
    /// Prints each request span as a running server ingests it (like `linkerd viz tap`).
    Tap(TapArgs),
    /// Benchmarks (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The bundled sidecar proxy, in front of one service instance.
    Proxy(ProxyArgs),
    /// `serve` plus a demo mesh (services behind bundled proxies) and a traffic generator.
    Demo(DemoArgs),
    /// The mesh CA's bootstrap tokens.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// The `--auth-file`'s tokens.
    #[command(subcommand)]
    Auth(AuthCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Reads a token's secret from stdin (one line) and prints the auth file's lines that
    /// stand for it without holding it: `secret-sha256` (the bearer header) and
    /// `scram-salted-password` (SCRAM-SHA-256 on the Postgres wire).
    Hash,
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Makes a bootstrap token that may ask the mesh CA for these workloads' certificates;
    /// prints it once (only its SHA-256 is kept, in <data-dir>/ca/bootstrap-tokens.toml).
    Token(TokenArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The server's data directory [./meshscope-data].
    #[arg(long, env = "MESHSCOPE_DATA_DIR", default_value = "./meshscope-data")]
    pub data_dir: PathBuf,
    /// The workloads' namespace.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// A workload the token covers (repeat for more).
    #[arg(long = "workload", required = true)]
    pub workloads: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The proxy's TOML file (listeners, telemetry, service registry, policies); the
    /// registry and policies are reloaded when it changes.
    #[arg(long, env = "MESHSCOPE_PROXY_CONFIG")]
    pub config: PathBuf,
    /// Take the destinations, routes, policies and authorization rules from this
    /// control plane (a `meshscope serve` HTTP address) instead of the file.
    #[arg(long, env = "MESHSCOPE_CONTROL_PLANE", requires = "workload")]
    pub control_plane: Option<String>,
    /// The workload whose policy document to follow (with --control-plane).
    #[arg(long, env = "MESHSCOPE_WORKLOAD", requires = "control_plane")]
    pub workload: Option<String>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The server flags, as for `serve` (data directory default: ./meshscope-demo-data;
    /// a default port that is taken falls back to a free one).
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Requests per second from the traffic generator.
    #[arg(long, default_value_t = 20.0)]
    pub rps: f64,
    /// Run only the mesh and send its telemetry to this OTLP/gRPC endpoint (a running
    /// `meshscope serve` or `collector`, e.g. `http://collector-1:4317`) instead of starting
    /// a server in-process.
    #[arg(long, env = "MESHSCOPE_DEMO_COLLECTOR")]
    pub collector: Option<String>,
}

/// The server roles' settings, declared once: each is a flag, a `MESHSCOPE_*` variable
/// and a kebab-case key of the `--config` TOML file (the same struct, read by serde), in
/// that order of precedence ([`ServeArgs::merged`]); its default is applied in one place,
/// [`ServeArgs::resolve_for`]. The file alone also takes `[[token]]`, `[retention.<table>]`
/// and `[alerts]`.
#[derive(Debug, Clone, Default, Args, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeArgs {
    /// TOML file with any of the settings below (kebab-case keys).
    #[arg(long, env = "MESHSCOPE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Where tables, Parquet files and the write-ahead log live [./meshscope-data].
    #[arg(long, env = "MESHSCOPE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// OTLP/gRPC listen address [127.0.0.1:4317].
    #[arg(long, env = "MESHSCOPE_OTLP_GRPC_ADDR")]
    pub otlp_grpc_addr: Option<SocketAddr>,
    /// OTLP/HTTP listen address [127.0.0.1:4318].
    #[arg(long, env = "MESHSCOPE_OTLP_HTTP_ADDR")]
    pub otlp_http_addr: Option<SocketAddr>,
    /// Query API and UI listen address [127.0.0.1:8080].
    #[arg(long, env = "MESHSCOPE_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Postgres wire protocol listen address [127.0.0.1:5433].
    #[arg(long, env = "MESHSCOPE_PG_ADDR")]
    pub pg_addr: Option<SocketAddr>,
    /// Largest OTLP request body, after decompression, in bytes [16777216].
    #[arg(long, env = "MESHSCOPE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Write a Parquet file when a table buffers this many bytes [268435456].
    #[arg(long, env = "MESHSCOPE_FLUSH_BYTES")]
    pub flush_bytes: Option<usize>,
    /// Write a Parquet file when the oldest buffered row is this many seconds old [300].
    #[arg(long, env = "MESHSCOPE_FLUSH_INTERVAL_SECS")]
    pub flush_interval_secs: Option<u64>,
    /// Refuse ingest (retryable) while a table buffers this many bytes [1073741824].
    #[arg(long, env = "MESHSCOPE_MAX_BUFFERED_BYTES")]
    pub max_buffered_bytes: Option<usize>,
    /// The mesh's trust domain: workload identities are
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<workload>` [meshscope.local].
    #[arg(long, env = "MESHSCOPE_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Lifetime of the workload certificates the mesh CA signs, in seconds [86400].
    #[arg(long, env = "MESHSCOPE_CERT_LIFETIME_SECS")]
    pub cert_lifetime_secs: Option<u64>,
    /// A directory of `<workload>.toml` policy documents for the control plane: read at
    /// start (a bad one stops the server with its problems) and every 2 s; a file whose
    /// text changed since it was last read becomes its workload's next version [none].
    #[arg(long, env = "MESHSCOPE_POLICY_DIR")]
    pub policy_dir: Option<PathBuf>,
    /// OTLP exports in progress at once (gRPC and HTTP together); more are refused at once,
    /// retryably, before their bodies are read [32].
    #[arg(long, env = "MESHSCOPE_MAX_INFLIGHT_EXPORTS")]
    pub max_inflight_exports: Option<usize>,
    /// Memory all running queries may use together, in bytes [4294967296].
    #[arg(long, env = "MESHSCOPE_QUERY_MEMORY_BYTES")]
    pub query_memory_bytes: Option<usize>,
    /// How often the golden-signal counters of `/metrics` advance, in seconds [10].
    #[arg(long, env = "MESHSCOPE_SIGNALS_INTERVAL_SECS")]
    pub signals_interval_secs: Option<u64>,
    /// How far behind now those counters stay, so both halves of a pair arrive [30].
    #[arg(long, env = "MESHSCOPE_SIGNALS_DELAY_SECS")]
    pub signals_delay_secs: Option<u64>,
    /// How often complete minutes are rolled up, in seconds [15].
    #[arg(long, env = "MESHSCOPE_ROLLUP_INTERVAL_SECS")]
    pub rollup_interval_secs: Option<u64>,
    /// How old a minute must be before it is rolled up, in seconds [120].
    #[arg(long, env = "MESHSCOPE_ROLLUP_DELAY_SECS")]
    pub rollup_delay_secs: Option<u64>,
    /// This node's id in a split deployment (letters, digits, `_`): names its Parquet files
    /// and its write-ahead-log folder. Collectors default to the host name.
    #[arg(long, env = "MESHSCOPE_NODE_ID")]
    pub node_id: Option<String>,
    /// How often small Parquet files are compacted, in seconds; 0 turns compaction off [60].
    #[arg(long, env = "MESHSCOPE_COMPACTION_INTERVAL_SECS")]
    pub compaction_interval_secs: Option<u64>,
    /// Size compaction merges small files up to, in bytes [67108864].
    #[arg(long, env = "MESHSCOPE_COMPACTION_TARGET_BYTES")]
    pub compaction_target_bytes: Option<u64>,
    /// Fewest neighbouring small files worth one compaction [4].
    #[arg(long, env = "MESHSCOPE_COMPACTION_MIN_FILES")]
    pub compaction_min_files: Option<usize>,
    /// zstd level of compacted files (1-22; higher: smaller, more CPU) [15]. Random ids
    /// (trace and span ids) always use level 1, which suits them best.
    #[arg(long, env = "MESHSCOPE_COMPACTION_ZSTD_LEVEL", value_parser = clap::value_parser!(i32).range(1..=22))]
    pub compaction_zstd_level: Option<i32>,
    /// Keep spans, logs and metrics this many seconds (by their newest row) [forever].
    #[arg(long, env = "MESHSCOPE_RETENTION_MAX_AGE_SECS")]
    pub retention_max_age_secs: Option<u64>,
    /// Keep at most this many bytes of Parquet per table (oldest removed first) [no limit].
    #[arg(long, env = "MESHSCOPE_RETENTION_MAX_BYTES")]
    pub retention_max_bytes: Option<u64>,
    /// Keep the rollups table this many seconds [forever].
    #[arg(long, env = "MESHSCOPE_ROLLUPS_RETENTION_MAX_AGE_SECS")]
    pub rollups_retention_max_age_secs: Option<u64>,
    /// Keep at most this many bytes of rollups [no limit].
    #[arg(long, env = "MESHSCOPE_ROLLUPS_RETENTION_MAX_BYTES")]
    pub rollups_retention_max_bytes: Option<u64>,
    /// How long replaced or expired files stay for queries already reading them, seconds [300].
    #[arg(long, env = "MESHSCOPE_RETIRE_GRACE_SECS")]
    pub retire_grace_secs: Option<u64>,
    /// Keep Parquet files on an S3-compatible object store, `s3://bucket/prefix`, instead of
    /// under --data-dir (the write-ahead log stays there). Credentials and endpoint come from
    /// the `AWS_*` variables [local disk].
    #[arg(long, env = "MESHSCOPE_STORAGE_URL")]
    pub storage_url: Option<String>,
    /// A query (SQL, API request, Postgres statement) running longer is cancelled and
    /// answered 408 / SQLSTATE 57014 [30].
    #[arg(long, env = "MESHSCOPE_QUERY_TIMEOUT_SECS")]
    pub query_timeout_secs: Option<u64>,
    /// Rows a JSON answer of /api/v1/sql holds at most (`"truncated": true` beyond; the
    /// Arrow stream is not cut) [100000].
    #[arg(long, env = "MESHSCOPE_SQL_MAX_ROWS")]
    pub sql_max_rows: Option<usize>,
    /// Queries running at once; more wait up to the query timeout, then get 503 [8].
    #[arg(long, env = "MESHSCOPE_MAX_CONCURRENT_QUERIES")]
    pub max_concurrent_queries: Option<usize>,
    /// TOML file of `[[token]]` tables (name, secret or secret-sha256, scopes: ingest, read,
    /// admin). With it every listener needs a token; without it everything is open, which
    /// is allowed on loopback only [no tokens].
    #[arg(long, env = "MESHSCOPE_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// PEM certificate chain: serve every listener (OTLP gRPC and HTTP, the API and UI, the
    /// Postgres wire) over TLS; goes with --tls-key [plaintext].
    #[arg(long, env = "MESHSCOPE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MESHSCOPE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: require client certificates signed by one of them [none].
    #[arg(long, env = "MESHSCOPE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// TLS on every listener with a certificate the mesh CA in <data-dir>/ca/ issues at
    /// start for localhost, this host's name and the listen addresses (clients trust
    /// <data-dir>/ca/root.pem, also at GET /api/v1/identity/trust-anchors) [off].
    #[arg(long, env = "MESHSCOPE_TLS_AUTO", conflicts_with_all = ["tls_cert", "tls_key"],
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub tls_auto: Option<bool>,
    /// Listen on addresses other than loopback without tokens: anyone who reaches the server
    /// can send data and read everything.
    #[arg(long, env = "MESHSCOPE_INSECURE_NO_AUTH", num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    pub insecure_no_auth: Option<bool>,
    /// File only: `[[token]]` tables, as in the auth file.
    #[arg(skip)]
    #[serde(skip_serializing)]
    pub token: Option<Vec<meshscope_auth::TokenSpec>>,
    /// File only: per-table retention, overriding the flags:
    /// `[retention.logs] max-age-secs = 86400`.
    #[arg(skip)]
    #[serde(skip_serializing)]
    pub retention: Option<BTreeMap<String, TableRetention>>,
    /// File only: `[alerts]`: rules, receivers, evaluation interval (see meshscope-alerts).
    #[arg(skip)]
    #[serde(skip_serializing)]
    pub alerts: Option<meshscope_alerts::AlertsConfig>,
}

/// One table's retention in the config file (`[retention.spans]` …).
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TableRetention {
    max_age_secs: Option<u64>,
    max_bytes: Option<u64>,
}

/// Which parts of meshscope a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything in one process.
    Serve,
    /// OTLP receivers and storage only.
    Collector,
    /// SQL, API, UI and alerts over the collectors' files.
    Query,
}

/// Resolved server settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub otlp_grpc_addr: SocketAddr,
    pub otlp_http_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub pg_addr: SocketAddr,
    pub max_body_bytes: usize,
    pub flush_bytes: usize,
    pub flush_interval: Duration,
    pub max_buffered_bytes: usize,
    pub max_inflight_exports: usize,
    pub query_memory_bytes: usize,
    pub signals_interval: Duration,
    pub signals_delay: Duration,
    pub rollup_interval: Duration,
    pub rollup_delay: Duration,
    pub role: Role,
    /// `""` for `serve`.
    pub node_id: String,
    /// `None`: compaction off.
    pub compaction_interval: Option<Duration>,
    pub upkeep: Upkeep,
    pub retire_grace: Duration,
    /// `s3://bucket/prefix`, or `None` for the data directory.
    pub storage_url: Option<String>,
    pub alerts: meshscope_alerts::AlertsConfig,
    pub query_limits: meshscope_query::engine::QueryLimits,
    /// The tokens every listener checks ([`Auth::open`](meshscope_auth::Auth::open): none).
    pub auth: meshscope_auth::Auth,
    /// Whether listening beyond loopback without tokens was asked for.
    pub insecure_no_auth: bool,
    /// TLS on every listener (`None`: plaintext).
    pub tls: Option<meshscope_auth::tls::Tls>,
    /// The mesh CA's trust domain and leaf lifetime (`serve` and `query`).
    pub trust_domain: String,
    pub cert_lifetime: Duration,
    /// The control plane's directory of policy documents (`None`: API only).
    pub policy_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid node id {0:?}: use letters, digits and `_` (at most 64)")]
    NodeId(String),
    #[error("unknown table {0:?} in [retention] (tables: spans, logs, metrics, rollups)")]
    RetentionTable(String),
    #[error(transparent)]
    Auth(#[from] meshscope_auth::AuthError),
    #[error("tokens given twice: in {0} and as [[token]] in the config file; keep one")]
    TokensTwice(PathBuf),
    #[error(transparent)]
    Tls(#[from] meshscope_auth::tls::TlsError),
    #[error("give both tls-cert and tls-key (or neither)")]
    TlsHalf,
    #[error("tls-client-ca needs tls-cert and tls-key (or tls-auto)")]
    TlsClientCaAlone,
    #[error("tls-auto makes the certificate itself: give it without tls-cert and tls-key")]
    TlsAutoAndFiles,
    #[error("tls-auto: {0}")]
    TlsAuto(String),
    #[error("cannot read the flags over the config file: {0}")]
    Flags(String),
}

/// The host name, as a node id (other characters become `_`).
fn host_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "collector".into());
    let id: String = host
        .trim()
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if id.is_empty() {
        "collector".into()
    } else {
        id
    }
}

fn addr(s: &str) -> SocketAddr {
    // Literal defaults: parsing cannot fail.
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl ServeArgs {
    pub fn resolve(&self) -> Result<ServeConfig, ConfigError> {
        self.resolve_for(Role::Serve)
    }

    /// The flags (and variables) over the `--config` file: a setting the command line or
    /// the environment gives wins, the file's stands otherwise. One generic overlay on the
    /// same struct, so no setting is listed twice.
    pub fn merged(&self) -> Result<ServeArgs, ConfigError> {
        let Some(path) = &self.config else {
            return Ok(self.clone());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let parse = |source| ConfigError::Parse {
            path: path.into(),
            source,
        };
        // Read as the settings first, so an unknown key or a bad value names its line.
        toml::from_str::<ServeArgs>(&text).map_err(parse)?;
        let mut table: toml::Table = toml::from_str(&text).map_err(parse)?;
        // The flags that were given (an unset one serialises to nothing).
        let flags = toml::Table::try_from(self).map_err(|e| ConfigError::Flags(e.to_string()))?;
        table.extend(flags);
        let mut merged: ServeArgs = table.try_into().map_err(parse)?;
        merged.config = self.config.clone();
        Ok(merged)
    }

    pub fn resolve_for(&self, role: Role) -> Result<ServeConfig, ConfigError> {
        let s = self.merged()?;
        let node_id = match (s.node_id.clone(), role) {
            (Some(id), _) => id,
            (None, Role::Serve) => String::new(),
            (None, Role::Collector) => host_node_id(),
            (None, Role::Query) => "query".into(),
        };
        if !node_id.is_empty() && !meshscope_storage::parquet_file::valid_writer_id(&node_id) {
            return Err(ConfigError::NodeId(node_id));
        }
        let compaction_interval = secs(s.compaction_interval_secs, 60);
        let compaction = CompactionPolicy {
            target_bytes: s.compaction_target_bytes.unwrap_or(64 << 20),
            min_files: s.compaction_min_files.unwrap_or(4).max(2),
            zstd_level: s.compaction_zstd_level.unwrap_or(15).clamp(1, 22),
        };
        let signals = Retention {
            max_age: s.retention_max_age_secs.map(Duration::from_secs),
            max_bytes: s.retention_max_bytes,
        };
        let rollups = Retention {
            max_age: s.rollups_retention_max_age_secs.map(Duration::from_secs),
            max_bytes: s.rollups_retention_max_bytes,
        };
        // The signal tables share `--retention-*`; the rollups (the one derived table) have
        // their own defaults.
        let tables = table_def::SIGNALS.iter().chain(&meshscope_query::DERIVED);
        let mut retention: BTreeMap<&'static str, Retention> = tables
            .clone()
            .map(|t| {
                let r = match t.source {
                    Source::Signal(_) => signals,
                    Source::Derived => rollups,
                };
                (t.name, r)
            })
            .collect();
        for (name, r) in s.retention.clone().unwrap_or_default() {
            let table = tables
                .clone()
                .find(|t| t.name == name)
                .ok_or_else(|| ConfigError::RetentionTable(name.clone()))?;
            let entry = retention.entry(table.name).or_default();
            if r.max_age_secs.is_some() {
                entry.max_age = r.max_age_secs.map(Duration::from_secs);
            }
            if r.max_bytes.is_some() {
                entry.max_bytes = r.max_bytes;
            }
        }
        let auth = match (s.auth_file.clone(), s.token.clone()) {
            (Some(path), Some(_)) => return Err(ConfigError::TokensTwice(path)),
            (Some(path), None) => meshscope_auth::Auth::load(&path)?,
            (None, Some(tokens)) => match &s.config {
                Some(config) => meshscope_auth::Auth::from_file_tokens(config, tokens)?,
                None => meshscope_auth::Auth::from_specs(tokens)?,
            },
            (None, None) => meshscope_auth::Auth::open(),
        };
        let tls_auto = s.tls_auto.unwrap_or(false);
        let client_ca = s.tls_client_ca.clone();
        let tls = match (s.tls_cert.clone(), s.tls_key.clone(), client_ca.clone()) {
            (Some(_), _, _) | (_, Some(_), _) if tls_auto => {
                return Err(ConfigError::TlsAutoAndFiles);
            }
            // Issued below, once the data directory is known.
            (None, None, _) if tls_auto => None,
            (Some(cert), Some(key), client_ca) => Some(meshscope_auth::tls::Tls::load(
                &meshscope_auth::tls::TlsFiles {
                    cert,
                    key,
                    client_ca,
                },
            )?),
            (None, None, None) => None,
            (None, None, Some(_)) => return Err(ConfigError::TlsClientCaAlone),
            _ => return Err(ConfigError::TlsHalf),
        };
        // Collectors flush often: a query node sees only what is in Parquet.
        let default_flush = if role == Role::Collector { 10 } else { 300 };
        let mut resolved = ServeConfig {
            role,
            node_id,
            compaction_interval: (!compaction_interval.is_zero()).then_some(compaction_interval),
            upkeep: Upkeep {
                compaction: Some(compaction),
                retention,
            },
            retire_grace: secs(s.retire_grace_secs, 300),
            storage_url: s.storage_url.clone(),
            data_dir: s
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("./meshscope-data")),
            otlp_grpc_addr: s.otlp_grpc_addr.unwrap_or_else(|| addr("127.0.0.1:4317")),
            otlp_http_addr: s.otlp_http_addr.unwrap_or_else(|| addr("127.0.0.1:4318")),
            http_addr: s.http_addr.unwrap_or_else(|| addr("127.0.0.1:8080")),
            pg_addr: s.pg_addr.unwrap_or_else(|| addr("127.0.0.1:5433")),
            max_body_bytes: s.max_body_bytes.unwrap_or(16 << 20),
            flush_bytes: s.flush_bytes.unwrap_or(256 << 20),
            flush_interval: Duration::from_secs(s.flush_interval_secs.unwrap_or(default_flush)),
            max_buffered_bytes: s.max_buffered_bytes.unwrap_or(1 << 30),
            max_inflight_exports: s.max_inflight_exports.unwrap_or(32).max(1),
            query_memory_bytes: s.query_memory_bytes.unwrap_or(4 << 30),
            signals_interval: secs(s.signals_interval_secs, 10).max(Duration::from_secs(1)),
            signals_delay: secs(s.signals_delay_secs, 30),
            rollup_interval: secs(s.rollup_interval_secs, 15).max(Duration::from_secs(1)),
            rollup_delay: secs(s.rollup_delay_secs, 120),
            alerts: s.alerts.clone().unwrap_or_default(),
            query_limits: meshscope_query::engine::QueryLimits {
                timeout: secs(s.query_timeout_secs, 30).max(Duration::from_secs(1)),
                max_concurrent: s.max_concurrent_queries.unwrap_or(8).max(1),
                sql_max_rows: s.sql_max_rows.unwrap_or(100_000),
            },
            auth,
            insecure_no_auth: s.insecure_no_auth.unwrap_or(false),
            tls,
            trust_domain: s
                .trust_domain
                .clone()
                .unwrap_or_else(|| meshscope_identity::ca::DEFAULT_TRUST_DOMAIN.to_string()),
            cert_lifetime: secs(s.cert_lifetime_secs, 86_400).max(Duration::from_secs(1)),
            policy_dir: s.policy_dir.clone(),
        };
        if tls_auto {
            resolved.tls = Some(auto_tls(&resolved, client_ca)?);
        }
        Ok(resolved)
    }
}

/// How long the server's own `--tls-auto` certificate lives; a new one is made at every
/// start.
const AUTO_TLS_LIFETIME: Duration = Duration::from_secs(90 * 86_400);

/// `--tls-auto`: a server certificate from the mesh CA for localhost, this host's name and
/// every listen address that is a specific IP, written to `<data-dir>/ca/server.pem` and
/// `server.key` (0600) and loaded like `--tls-cert`/`--tls-key`.
fn auto_tls(
    c: &ServeConfig,
    client_ca: Option<PathBuf>,
) -> Result<meshscope_auth::tls::Tls, ConfigError> {
    let dir = c.data_dir.join("ca");
    let ca = meshscope_identity::ca::MeshCa::open(&dir, &c.trust_domain, c.cert_lifetime)
        .map_err(|e| ConfigError::TlsAuto(e.to_string()))?;
    let mut names = vec!["localhost".to_string()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim().to_ascii_lowercase();
        if !h.is_empty() && h != "localhost" {
            names.push(h);
        }
    }
    let mut ips: Vec<std::net::IpAddr> = vec![
        std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ];
    for a in [c.otlp_grpc_addr, c.otlp_http_addr, c.http_addr, c.pg_addr] {
        if !a.ip().is_unspecified() && !ips.contains(&a.ip()) {
            ips.push(a.ip());
        }
    }
    let issued = ca
        .issue_server(&names, &ips, AUTO_TLS_LIFETIME)
        .map_err(|e| ConfigError::TlsAuto(e.to_string()))?;
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    meshscope_identity::write_private(&key, issued.key_pem.as_bytes())
        .map_err(|e| ConfigError::TlsAuto(e.to_string()))?;
    std::fs::write(&cert, &issued.chain_pem).map_err(|e| ConfigError::TlsAuto(e.to_string()))?;
    Ok(meshscope_auth::tls::Tls::load(
        &meshscope_auth::tls::TlsFiles {
            cert,
            key,
            client_ca,
        },
    )?)
}

fn secs(v: Option<u64>, default: u64) -> Duration {
    Duration::from_secs(v.unwrap_or(default))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TapFormat {
    /// One line per request: time, caller → callee, kind, method, path, status, latency.
    Text,
    /// The API's events, one JSON object per line.
    Json,
}

/// How a command reaches a running server (`meshscope sql`, `meshscope tap`).
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server's HTTP address (`tap`: a `serve` or `collector` node).
    #[arg(
        long,
        env = "MESHSCOPE_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// A token with the `read` scope, for a server started with `--auth-file`.
    #[arg(long, env = "MESHSCOPE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Args)]
pub struct TapArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only spans of this service.
    #[arg(long)]
    pub service: Option<String>,
    /// Only requests with this peer (the callee of a client span, the caller of a server span).
    #[arg(long)]
    pub peer: Option<String>,
    /// Only paths starting with this.
    #[arg(long)]
    pub path_prefix: Option<String>,
    /// Only this HTTP method.
    #[arg(long)]
    pub method: Option<String>,
    /// Only this status: a code (503), a class (5xx) or `error`.
    #[arg(long)]
    pub status: Option<String>,
    /// Stop after this many requests (default: until Ctrl-C).
    #[arg(long)]
    pub limit: Option<u64>,
    #[arg(long, value_enum, default_value_t = TapFormat::Text)]
    pub format: TapFormat,
}

#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The statement to run (read-only: SELECT, WITH, EXPLAIN, SHOW).
    pub sql: String,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// OTLP/gRPC span ingest into a real `meshscope serve` child process, durability on.
    Ingest(BenchIngestArgs),
    /// Service graph, golden signals and trace lookups over stored spans, against DuckDB.
    Graph(BenchGraphArgs),
    /// Compaction and retention over a stored data directory (which it changes): bytes per
    /// span and query times before and after.
    Storage(BenchStorageArgs),
    /// Overload: the ingest rate measured, then many times that offered for a while; what
    /// was refused, the server's RSS, recovery, and whether every acknowledged span is there.
    Overload(BenchOverloadArgs),
    /// `/metrics` scrape time of a query node over many small Parquet files.
    Scrape(BenchScrapeArgs),
}

#[derive(Debug, Args)]
pub struct BenchScrapeArgs {
    /// Span files to write (one flush each) before the query node starts.
    #[arg(long, default_value_t = 1000)]
    pub files: usize,
    /// Spans in each file.
    #[arg(long, default_value_t = 200)]
    pub spans_per_file: usize,
    /// Scrapes timed (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Another meshscope binary (an earlier build) to scrape over the same files in the same
    /// run, in rounds interleaved with this one.
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// Rounds per binary with `--against` (each a fresh query node and `--runs` scrapes).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

#[derive(Debug, Args)]
pub struct BenchOverloadArgs {
    /// Seconds of closed-loop ingest that measure the rate the server sustains.
    #[arg(long, default_value_t = 10)]
    pub calibrate_secs: u64,
    /// Seconds of overload.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Offered load as a multiple of the measured rate.
    #[arg(long, default_value_t = 10.0)]
    pub factor: f64,
    /// Spans per export request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Requests in flight during calibration.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Requests in flight at most during overload (the load generator's own bound).
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// The server's --max-buffered-bytes (its flush size is a quarter of it).
    #[arg(long, default_value_t = 256 << 20)]
    pub max_buffered_bytes: usize,
}

#[derive(Debug, Args)]
pub struct BenchStorageArgs {
    /// A data directory filled by `bench ingest --data-dir` (the server must be stopped).
    /// It is compacted and then trimmed by retention: use a copy.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Size compaction merges files up to, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub target_bytes: u64,
    /// Runs of each query (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Trace-by-id lookups.
    #[arg(long, default_value_t = 200)]
    pub lookups: usize,
    /// zstd level of the compacted files.
    #[arg(long, default_value_t = 15)]
    pub zstd_level: i32,
    /// Retention's size bound as a share of the compacted spans table (0.5 keeps half).
    #[arg(long, default_value_t = 0.5)]
    pub keep_share: f64,
}

#[derive(Debug, Args)]
pub struct BenchGraphArgs {
    /// A data directory filled by `bench ingest --data-dir` (the server must be stopped).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Runs of each query (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Trace-by-id lookups.
    #[arg(long, default_value_t = 200)]
    pub lookups: usize,
}

#[derive(Debug, Args)]
pub struct BenchIngestArgs {
    /// Spans to send in total.
    #[arg(long, default_value_t = 2_000_000)]
    pub spans: usize,
    /// Spans per export request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Export requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Data directory for the server under test (a fresh temporary one when absent).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Spread the spans' times evenly over this many hours before now (0: they happen as
    /// they are sent), for history: a day of rollups, the diff of a day against the one
    /// before.
    #[arg(long, default_value_t = 0.0)]
    pub spread_hours: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "data-dir = \"/srv/m\"\nhttp-addr = \"0.0.0.0:9000\"\npg-addr = \"127.0.0.1:6000\"\n",
        )
        .expect("write");
        let cli = Cli::try_parse_from([
            "meshscope",
            "serve",
            "--config",
            path.to_str().expect("utf8"),
            "--pg-addr",
            "127.0.0.1:7000",
        ])
        .expect("parse");
        let Command::Serve(args) = cli.command else {
            panic!("serve expected")
        };
        let c = args.resolve().expect("resolve");
        assert_eq!(c.data_dir, PathBuf::from("/srv/m"));
        assert_eq!(c.http_addr, addr("0.0.0.0:9000"));
        assert_eq!(c.pg_addr, addr("127.0.0.1:7000"));
        assert_eq!(c.otlp_grpc_addr, addr("127.0.0.1:4317"));
        assert_eq!(c.otlp_http_addr, addr("127.0.0.1:4318"));
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.toml");
        std::fs::write(&path, "data_dirr = 1\n").expect("write");
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let err = args.resolve().expect_err("unknown key");
        assert!(err.to_string().contains("invalid config file"), "{err}");
    }

    #[test]
    fn roles_and_retention_resolve() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "retention-max-age-secs = 3600\n[retention.logs]\nmax-bytes = 1000\n",
        )
        .expect("write");
        let args = ServeArgs {
            config: Some(path.clone()),
            rollups_retention_max_age_secs: Some(86400),
            ..Default::default()
        };
        let c = args.resolve_for(Role::Collector).expect("resolve");
        assert!(!c.node_id.is_empty(), "collectors default to the host name");
        assert_eq!(c.flush_interval, Duration::from_secs(10));
        let r = |t: &str| c.upkeep.retention[t];
        assert_eq!(r("spans").max_age, Some(Duration::from_secs(3600)));
        assert_eq!(r("logs").max_age, Some(Duration::from_secs(3600)));
        assert_eq!(r("logs").max_bytes, Some(1000));
        assert_eq!(r("spans").max_bytes, None);
        assert_eq!(r("metrics").max_age, Some(Duration::from_secs(3600)));
        assert_eq!(r("rollups").max_age, Some(Duration::from_secs(86400)));
        let bad = ServeArgs {
            node_id: Some("a/b".into()),
            ..Default::default()
        };
        assert!(bad.resolve_for(Role::Collector).is_err());
        std::fs::write(&path, "[retention.spanz]\nmax-bytes = 1\n").expect("write");
        let err = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .expect_err("unknown table");
        assert!(err.to_string().contains("spanz"), "{err}");
    }

    #[test]
    fn alerts_table_in_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "[alerts]\nevaluation-interval-secs = 5\n[[alerts.rules]]\nname = \"r\"\nsignal = \"rate\"\nthreshold = 1.0\n[[alerts.receivers]]\nname = \"ops\"\nurl = \"http://127.0.0.1:9/h\"\n",
        )
        .expect("write");
        let args = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let c = args.resolve().expect("resolve");
        assert_eq!(c.alerts.evaluation_interval_secs, 5);
        assert_eq!(c.alerts.rules[0].name, "r");
        assert_eq!(c.alerts.receivers[0].name, "ops");
        std::fs::write(&path, "[alerts]\nevaluation-interval = 5\n").expect("write");
        assert!(
            args.resolve().is_err(),
            "unknown keys inside [alerts] are errors too"
        );
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(["meshscope", "serve"].iter().chain(argv))
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let Command::Serve(args) = cli.command else {
            panic!("serve expected")
        };
        args
    }

    #[test]
    fn switches_are_flags_file_keys_or_both() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "insecure-no-auth = true
flush-bytes = 1000
",
        )
        .expect("write");
        let file = path.to_str().expect("utf8");
        // From the file alone.
        let c = serve_args(&["--config", file]).resolve().expect("resolve");
        assert!(c.insecure_no_auth);
        assert_eq!(c.flush_bytes, 1000);
        // A bare flag is true; `=false` overrides the file's true.
        assert_eq!(serve_args(&["--tls-auto"]).tls_auto, Some(true));
        assert_eq!(serve_args(&[]).tls_auto, None);
        let c = serve_args(&["--config", file, "--insecure-no-auth=false"])
            .resolve()
            .expect("resolve");
        assert!(!c.insecure_no_auth);
        // Defaults, once: nothing given.
        let c = serve_args(&[]).resolve().expect("resolve");
        assert!(!c.insecure_no_auth);
        assert_eq!(c.flush_bytes, 256 << 20);
        assert_eq!(c.http_addr, addr("127.0.0.1:8080"));
        // A value of the wrong type in the file names its key.
        std::fs::write(&path, "flush-bytes = \"lots\"\n").expect("write");
        let err = serve_args(&["--config", file])
            .resolve()
            .expect_err("bad type");
        assert!(err.to_string().contains("flush-bytes"), "{err}");
    }

    #[test]
    fn sql_defaults() {
        let cli = Cli::try_parse_from(["meshscope", "sql", "SELECT 1"]).expect("parse");
        let Command::Sql(a) = cli.command else {
            panic!("sql expected")
        };
        assert_eq!(a.client.server, "http://127.0.0.1:8080");
        assert_eq!(a.format, Format::Table);
    }
}
