//! What the callers' proxies did to protect each edge: endpoints ejected by outlier
//! detection, circuit-breaker transitions (opened, closed again by a probe) and retries
//! the retry budget refused.
//!
//! | field | the bundled proxy's CLIENT span (callee: `peer.service`) |
//! | --- | --- |
//! | `ejections` | `meshscope.ejected` (the endpoint this request's failure ejected; also a `meshscope.ejection` event) |
//! | `breaker_opened` / `breaker_closed` | `meshscope.breaker_transition` = `open` / `closed` |
//! | `retry_budget_exhausted` | `meshscope.retry_budget_exhausted` = `true` (a retry was due and refused) |
//!
//! Counted from spans, so a mesh that samples its traces shows the sampled share; the
//! proxy's own `/metrics` (`meshscope_proxy_ejections_total`,
//! `meshscope_proxy_breaker_transitions_total`, `meshscope_proxy_retry_budget_exhausted_total`)
//! counts every one.

use std::collections::BTreeMap;

use serde::Serialize;

use super::range::TimeRange;
use super::typed;
use crate::engine::{QueryEngine, QueryError};

/// What the graph's edge says about its callers' resilience layers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EdgeResilience {
    /// Endpoints of the callee taken out of rotation by outlier ejection.
    pub ejections: u64,
    /// Times a caller's circuit breaker towards the callee opened.
    pub breaker_opened: u64,
    /// Times it closed again (a half-open probe succeeded).
    pub breaker_closed: u64,
    /// Retries that were due but refused by the retry budget.
    pub retry_budget_exhausted: u64,
}

/// `(source service, target service)` → what its callers' proxies did.
pub type ResilienceByEdge = BTreeMap<(String, String), EdgeResilience>;

/// Per edge over the range; edges where nothing happened are absent.
pub async fn by_edge(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<ResilienceByEdge, QueryError> {
    let sa = |k: &str| format!("span_attributes['{k}']");
    let sql = format!(
        "SELECT service_name AS src, {peer} AS dst,
                sum(CASE WHEN {ejected} IS NOT NULL THEN 1 ELSE 0 END) AS ejections,
                sum(CASE WHEN {moved} = 'open' THEN 1 ELSE 0 END) AS opened,
                sum(CASE WHEN {moved} = 'closed' THEN 1 ELSE 0 END) AS closed,
                sum(CASE WHEN {budget} = 'true' THEN 1 ELSE 0 END) AS exhausted
         FROM spans
         WHERE {r} AND span_kind = 'CLIENT' AND {peer} IS NOT NULL
           AND ({ejected} IS NOT NULL OR {moved} IS NOT NULL OR {budget} IS NOT NULL)
         GROUP BY 1, 2",
        peer = sa("peer.service"),
        ejected = sa("meshscope.ejected"),
        moved = sa("meshscope.breaker_transition"),
        budget = sa("meshscope.retry_budget_exhausted"),
        r = range.sql("start_time"),
    );
    #[derive(Debug, serde::Deserialize)]
    struct Row {
        src: String,
        dst: String,
        ejections: i64,
        opened: i64,
        closed: i64,
        exhausted: i64,
    }
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(typed::<Row>(engine, &sql)
        .await?
        .into_iter()
        .map(|r| {
            (
                (r.src, r.dst),
                EdgeResilience {
                    ejections: count(r.ejections),
                    breaker_opened: count(r.opened),
                    breaker_closed: count(r.closed),
                    retry_budget_exhausted: count(r.exhausted),
                },
            )
        })
        .collect())
}
