//! # meshscope-query
//!
//! Read-only SQL over the stored traffic, three ways in.
//!
//! ## Layout
//! - [`executor`]: a dedicated Tokio runtime for DataFusion's CPU-bound work, away from
//!   the runtime that serves sockets (the InfluxDB IOx `DedicatedExecutor` pattern).
//! - [`readonly`]: the one rule that decides which statements may run (SELECT, WITH,
//!   EXPLAIN, SHOW and harmless Postgres session settings) on every entry point.
//! - [`engine`]: the DataFusion `SessionContext` with every table of `meshscope-storage`
//!   registered (`spans`, `logs`, `metrics`, and the [`DERIVED`] `rollups`), and `sql()`
//!   that plans and collects.
//! - [`api`]: `POST /api/v1/sql` (JSON rows, or Arrow IPC).
//! - [`analysis`]: the service graph, golden signals and traces, and their HTTP API.
//! - [`pg`]: the Postgres wire protocol (psql, Grafana, drivers) via `datafusion-postgres`.

pub mod analysis;
pub mod api;
pub mod engine;
pub mod executor;
pub mod pg;
pub mod readonly;

pub use engine::{Params, QueryEngine, QueryError};

/// The tables the query side computes and stores beside the signal tables: open storage
/// with them (`Storage::open(config, &DERIVED)`) wherever queries are served.
pub const DERIVED: [&meshscope_storage::TableDef; 1] = [&analysis::rollup::TABLE];
pub use executor::Executor;
