//! What engineers come for: the service graph, golden signals and traces, computed with
//! DataFusion over the stored spans and shaped in plain Rust.
//!
//! - [`model`]: the shared vocabulary (what a request is, node kinds, [`model::Signals`],
//!   summaries per version and reason), a leaf the other modules meet in.
//! - [`range`]: the `start` / `end` time range of every request (RFC 3339; last 15 minutes
//!   by default) and its SQL condition.
//! - [`graph`]: the service-dependency graph (petgraph), with the contract's pairing rules,
//!   namespace and neighbourhood filters.
//! - [`diff`]: the graph of one window against a base window, node by node, edge by edge.
//! - [`dot`]: the graph as Graphviz DOT, namespaces as clusters.
//! - [`mirrors`]: mirrored traffic, each route's primary against its shadow.
//! - [`pairing`]: the graph's edges from raw spans in one scan, paired in Rust.
//! - [`mesh_edges`]: edges from the proxies' request metrics and access logs.
//! - [`signals`]: golden signals per service, endpoint and edge, with per-minute series.
//! - [`sketch`] and [`rollup`]: per-minute mergeable aggregates for long ranges.
//! - [`traces`]: trace search and a trace's spans in tree order with its critical path.
//! - [`prometheus`]: golden signals as servicegraph / spanmetrics style counters.
//! - [`routes`]: the HTTP API over all of them.

pub mod diff;
pub mod dot;
pub mod graph;
pub mod mesh_edges;
pub mod mirrors;
pub mod model;
pub mod pairing;
pub mod prometheus;
pub mod range;
pub mod resilience;
pub mod rollup;
pub mod routes;
pub mod security;
pub mod signals;
pub mod sketch;
pub mod traces;

use crate::engine::{Params, QueryEngine, QueryError};

/// Runs internal SQL and reads its rows into `T` straight from the Arrow arrays
/// (`serde_arrow`): a column that is missing or of another type is an error, never a
/// silent zero.
pub async fn typed<T: serde::de::DeserializeOwned>(
    engine: &QueryEngine,
    sql: &str,
) -> Result<Vec<T>, QueryError> {
    typed_with(engine, sql, Params::default()).await
}

/// [`typed`] for a statement with `$n` placeholders.
pub async fn typed_with<T: serde::de::DeserializeOwned>(
    engine: &QueryEngine,
    sql: &str,
    params: Params,
) -> Result<Vec<T>, QueryError> {
    let result = engine.sql_with(sql, params).await?;
    let mut out = Vec::new();
    for b in &result.batches {
        let rows: Vec<T> = serde_arrow::from_record_batch(b).map_err(|e| {
            QueryError::Internal(format!("reading {}: {e}", std::any::type_name::<T>()))
        })?;
        out.extend(rows);
    }
    Ok(out)
}

/// Rounds to microsecond precision for readable JSON.
pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
