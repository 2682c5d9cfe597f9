//! # meshscope
//!
//! The binary: parses the command line once and runs one role.
//!
//! ## Layout
//! - [`config`]: clap flags, `MESHSCOPE_*` variables and the `--config` TOML file.
//! - [`serve`]: the server roles: all-in-one `serve`, and `collector` / `query` of a split
//!   deployment (storage, OTLP receivers, HTTP API, Postgres wire, compaction, retention).
//! - [`metrics`]: `GET /metrics` (own health and golden signals, Prometheus text).
//! - [`sql_client`]: `meshscope sql "…"` against a running server.
//! - [`tap_client`]: `meshscope tap`, the live stream of requests in the terminal.
//! - [`bench`]: `meshscope bench ingest`.
//! - [`identity`]: the mesh CA's HTTP API and `meshscope identity token`.
//! - [`mesh`]: the control plane, each workload's versioned policy document.
//! - [`demo`]: `meshscope demo` (serve + a demo mesh behind bundled proxies + traffic).
//! - `meshscope proxy` runs [`meshscope_proxy::run`].

mod bench;
mod config;
mod demo;
mod identity;
mod mesh;
mod metrics;
mod serve;
mod sql_client;
mod tap_client;

use std::process::ExitCode;

use clap::Parser;
use config::{AuthCommand, BenchCommand, Cli, Command, IdentityCommand, Role};
use tracing_subscriber::EnvFilter;

/// mimalloc: decoding OTLP makes many small allocations (a `String` per attribute key and
/// value); glibc's malloc spent about a fifth of ingest CPU on them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Resolves on SIGTERM or Ctrl-C.
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("meshscope-io")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                let config = args.resolve().map_err(|e| e.to_string())?;
                serve::run(config, stop_signal()).await
            }
            Command::Collector(args) => {
                let config = args
                    .resolve_for(Role::Collector)
                    .map_err(|e| e.to_string())?;
                serve::run(config, stop_signal()).await
            }
            Command::Query(args) => {
                let config = args.resolve_for(Role::Query).map_err(|e| e.to_string())?;
                serve::run(config, stop_signal()).await
            }
            Command::Sql(args) => sql_client::run(args).await,
            Command::Tap(args) => tokio::select! {
                r = tap_client::run(args) => r,
                () = stop_signal() => Ok(()),
            },
            Command::Bench(BenchCommand::Ingest(args)) => bench::ingest(args).await,
            Command::Bench(BenchCommand::Graph(args)) => bench::graph(args).await,
            Command::Bench(BenchCommand::Storage(args)) => bench::storage(args).await,
            Command::Bench(BenchCommand::Overload(args)) => bench::overload::run(args).await,
            Command::Bench(BenchCommand::Scrape(args)) => bench::scrape(args).await,
            Command::Proxy(args) => {
                let cp = args
                    .control_plane
                    .zip(args.workload)
                    .map(|(url, workload)| meshscope_proxy::control::ControlPlane {
                        url,
                        workload,
                    });
                meshscope_proxy::run(args.config, cp, stop_signal())
                    .await
                    .map_err(|e| e.to_string())
            }
            Command::Demo(args) => demo::run(args, stop_signal()).await,
            Command::Identity(IdentityCommand::Token(args)) => identity::token(args),
            Command::Auth(AuthCommand::Hash) => hash_secret(),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `meshscope auth hash`: a secret from stdin, as a token's lines of the auth file.
fn hash_secret() -> Result<(), String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("reading the secret from stdin: {e}"))?;
    let secret = line.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err("no secret on stdin (give it as one line)".into());
    }
    println!(
        "secret-sha256 = \"{}\"",
        meshscope_auth::secret_digest_hex(secret)
    );
    match meshscope_auth::ScramKey::derive(secret) {
        Some(key) => println!("scram-salted-password = \"{}\"", key.encode()),
        None => eprintln!(
            "no scram-salted-password: the secret is not printable ASCII (the Postgres wire \
             will ask for it in cleartext)"
        ),
    }
    Ok(())
}
