//! Typed configuration, parsed once at start-up.
//!
//! Every server flag can come from the command line, a `MESHSCOPE_*` environment variable
//! or the TOML file given with `--config`, in that order of precedence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

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
    /// Runs SQL against a running server and prints the result.
    Sql(SqlArgs),
    /// Benchmarks (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The bundled sidecar proxy, in front of one service instance.
    Proxy(ProxyArgs),
    /// `serve` plus a demo mesh (services behind bundled proxies) and a traffic generator.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The proxy's TOML file (listeners, telemetry, service registry, policies); the
    /// registry and policies are reloaded when it changes.
    #[arg(long, env = "MESHSCOPE_PROXY_CONFIG")]
    pub config: PathBuf,
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
}

/// Flags of the server roles. Unset flags fall back to the config file, then to defaults.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (kebab-case keys).
    #[arg(long, env = "MESHSCOPE_CONFIG")]
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
}

/// The same settings in the `--config` TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    data_dir: Option<PathBuf>,
    otlp_grpc_addr: Option<SocketAddr>,
    otlp_http_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    pg_addr: Option<SocketAddr>,
    max_body_bytes: Option<usize>,
    flush_bytes: Option<usize>,
    flush_interval_secs: Option<u64>,
    max_buffered_bytes: Option<usize>,
    query_memory_bytes: Option<usize>,
    signals_interval_secs: Option<u64>,
    signals_delay_secs: Option<u64>,
    rollup_interval_secs: Option<u64>,
    rollup_delay_secs: Option<u64>,
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
    pub query_memory_bytes: usize,
    pub signals_interval: Duration,
    pub signals_delay: Duration,
    pub rollup_interval: Duration,
    pub rollup_delay: Duration,
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
}

fn addr(s: &str) -> SocketAddr {
    // Literal defaults: parsing cannot fail.
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl ServeArgs {
    pub fn resolve(&self) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => load(path)?,
            None => FileConfig::default(),
        };
        Ok(ServeConfig {
            data_dir: self
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./meshscope-data")),
            otlp_grpc_addr: self
                .otlp_grpc_addr
                .or(file.otlp_grpc_addr)
                .unwrap_or_else(|| addr("127.0.0.1:4317")),
            otlp_http_addr: self
                .otlp_http_addr
                .or(file.otlp_http_addr)
                .unwrap_or_else(|| addr("127.0.0.1:4318")),
            http_addr: self
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| addr("127.0.0.1:8080")),
            pg_addr: self
                .pg_addr
                .or(file.pg_addr)
                .unwrap_or_else(|| addr("127.0.0.1:5433")),
            max_body_bytes: self
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(16 << 20),
            flush_bytes: self.flush_bytes.or(file.flush_bytes).unwrap_or(256 << 20),
            flush_interval: Duration::from_secs(
                self.flush_interval_secs
                    .or(file.flush_interval_secs)
                    .unwrap_or(300),
            ),
            max_buffered_bytes: self
                .max_buffered_bytes
                .or(file.max_buffered_bytes)
                .unwrap_or(1 << 30),
            query_memory_bytes: self
                .query_memory_bytes
                .or(file.query_memory_bytes)
                .unwrap_or(4 << 30),
            signals_interval: secs(
                self.signals_interval_secs.or(file.signals_interval_secs),
                10,
            )
            .max(Duration::from_secs(1)),
            signals_delay: secs(self.signals_delay_secs.or(file.signals_delay_secs), 30),
            rollup_interval: secs(self.rollup_interval_secs.or(file.rollup_interval_secs), 15)
                .max(Duration::from_secs(1)),
            rollup_delay: secs(self.rollup_delay_secs.or(file.rollup_delay_secs), 120),
        })
    }
}

fn secs(v: Option<u64>, default: u64) -> Duration {
    Duration::from_secs(v.unwrap_or(default))
}

fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.into(),
        source,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The statement to run (read-only: SELECT, WITH, EXPLAIN, SHOW).
    pub sql: String,
    /// The server's HTTP address.
    #[arg(
        long,
        env = "MESHSCOPE_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
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
    fn sql_defaults() {
        let cli = Cli::try_parse_from(["meshscope", "sql", "SELECT 1"]).expect("parse");
        let Command::Sql(a) = cli.command else {
            panic!("sql expected")
        };
        assert_eq!(a.server, "http://127.0.0.1:8080");
        assert_eq!(a.format, Format::Table);
    }
}
