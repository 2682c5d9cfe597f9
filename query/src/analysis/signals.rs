//! Golden signals per service, endpoint and edge, and the per-minute series a chart needs.
//!
//! A service's requests are its SERVER and CONSUMER spans; an endpoint is a service's
//! `http_route` (or the span name when there is none). Rate is requests per second over
//! the range; percentiles are exact. Saturation comes from the proxies' gauges in
//! `metrics` where they report it (`*in_flight*` / `*inflight*` / `*utilization*`).

use serde_json::{Value, json};

use super::graph::{ComputedFrom, ServiceGraph, Signals, services_sql};
use super::range::{TimeRange, sql_str};
use super::{f64_of, round3, rows, str_of, u64_of};
use crate::engine::{QueryEngine, QueryError};

/// `GET /api/v1/services`: every service with its signals, busiest first.
pub async fn services(
    engine: &QueryEngine,
    range: &TimeRange,
    path: ComputedFrom,
) -> Result<Value, QueryError> {
    let seconds = range.seconds();
    let entry = |name: String, namespace: Option<String>, signals: Signals| {
        let mut v = serde_json::to_value(signals).unwrap_or(Value::Null);
        v["name"] = json!(name);
        v["namespace"] = json!(namespace);
        v
    };
    let mut out: Vec<Value> = match path {
        ComputedFrom::Spans => rows(engine, &services_sql(range, None))
            .await?
            .iter()
            .map(|r| {
                entry(
                    str_of(r, "name"),
                    r.get("namespace")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    Signals::from_row(r, seconds),
                )
            })
            .collect(),
        ComputedFrom::Rollups => super::rollup::aggregates(engine, range)
            .await?
            .into_iter()
            .filter(|((kind, ..), _)| kind == "service")
            .map(|((_, name, _, _, ns), agg)| entry(name, ns, agg.signals(seconds)))
            .collect(),
    };
    out.sort_by(|a, b| {
        b["requests"]
            .as_u64()
            .cmp(&a["requests"].as_u64())
            .then_with(|| a["name"].as_str().cmp(&b["name"].as_str()))
    });
    Ok(Value::Array(out))
}

/// `GET /api/v1/services/{name}`: the service's signals, endpoints, edges and series.
/// `None` when the service has no spans at all in the range.
pub async fn service(
    engine: &QueryEngine,
    range: &TimeRange,
    name: &str,
) -> Result<Option<Value>, QueryError> {
    let seconds = range.seconds();
    let svc = sql_str(name);
    let own = rows(engine, &services_sql(range, Some(name))).await?;
    let seen = rows(
        engine,
        &format!(
            "SELECT count(*) AS n FROM spans WHERE service_name = {svc} AND {}",
            range.sql("start_time")
        ),
    )
    .await?;
    if seen.first().map(|r| u64_of(r, "n")).unwrap_or(0) == 0 {
        return Ok(None);
    }
    let signals = own
        .first()
        .map(|r| Signals::from_row(r, seconds))
        .unwrap_or_default();

    let endpoints = rows(
        engine,
        &format!(
            "SELECT coalesce(http_route, span_name) AS endpoint, count(*) AS requests,
                    sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) AS errors,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ns) AS p50_ns,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ns) AS p95_ns,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ns) AS p99_ns
             FROM spans WHERE {} AND service_name = {svc} AND span_kind IN ('SERVER', 'CONSUMER')
             GROUP BY 1 ORDER BY requests DESC, endpoint",
            range.sql("start_time")
        ),
    )
    .await?
    .iter()
    .map(|r| {
        let mut v = serde_json::to_value(Signals::from_row(r, seconds)).unwrap_or(Value::Null);
        v["name"] = json!(str_of(r, "endpoint"));
        v
    })
    .collect::<Vec<_>>();

    let graph = ServiceGraph::compute_by(engine, range, ComputedFrom::Spans).await?;
    let mut upstream = Vec::new();
    let mut downstream = Vec::new();
    for e in graph.graph.edge_weights() {
        if e.target == name {
            upstream.push(serde_json::to_value(e).unwrap_or(Value::Null));
        }
        if e.source == name {
            downstream.push(serde_json::to_value(e).unwrap_or(Value::Null));
        }
    }

    let series = rows(
        engine,
        &format!(
            "SELECT date_bin(INTERVAL '1 minute', start_time, TIMESTAMP '1970-01-01T00:00:00Z') AS minute,
                    count(*) AS requests,
                    sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) AS errors,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ns) AS p50_ns,
                    percentile_cont(0.9) WITHIN GROUP (ORDER BY duration_ns) AS p90_ns,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ns) AS p95_ns,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ns) AS p99_ns
             FROM spans WHERE {} AND service_name = {svc} AND span_kind IN ('SERVER', 'CONSUMER')
             GROUP BY 1 ORDER BY 1",
            range.sql("start_time")
        ),
    )
    .await?
    .iter()
    .map(|r| {
        let requests = u64_of(r, "requests");
        let errors = u64_of(r, "errors");
        json!({
            "time": r.get("minute").cloned().unwrap_or(Value::Null),
            "requests": requests,
            "rate": round3(requests as f64 / 60.0),
            "errors": errors,
            "error_rate": if requests == 0 { 0.0 } else { errors as f64 / requests as f64 },
            "p50_ms": round3(f64_of(r, "p50_ns") / 1e6),
            "p90_ms": round3(f64_of(r, "p90_ns") / 1e6),
            "p95_ms": round3(f64_of(r, "p95_ns") / 1e6),
            "p99_ms": round3(f64_of(r, "p99_ns") / 1e6),
        })
    })
    .collect::<Vec<_>>();

    let saturation = rows(
        engine,
        &format!(
            "SELECT metric_name, avg(value) AS avg, max(value) AS max FROM metrics
             WHERE {} AND service_name = {svc} AND metric_type = 'gauge'
               AND (metric_name LIKE '%in_flight%' OR metric_name LIKE '%inflight%' OR metric_name LIKE '%utilization%')
             GROUP BY metric_name ORDER BY metric_name",
            range.sql("time")
        ),
    )
    .await?
    .iter()
    .map(|r| json!({ "metric": str_of(r, "metric_name"), "avg": f64_of(r, "avg"), "max": f64_of(r, "max") }))
    .collect::<Vec<_>>();

    let mut v = serde_json::to_value(signals).unwrap_or(Value::Null);
    v["name"] = json!(name);
    v["endpoints"] = json!(endpoints);
    v["upstream"] = json!(upstream);
    v["downstream"] = json!(downstream);
    v["series"] = json!(series);
    v["saturation"] = json!(saturation);
    Ok(Some(v))
}
