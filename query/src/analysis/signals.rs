//! Golden signals per service, endpoint and edge, and the per-minute series a chart needs.
//!
//! A service's requests are its SERVER and CONSUMER spans; an endpoint is a service's
//! `http_route` (or the span name when there is none). Rate is requests per second over
//! the range; percentiles are exact. Saturation comes from the proxies' gauges in
//! `metrics` where they report it (`*in_flight*` / `*inflight*` / `*utilization*`, and
//! Envoy's `http.downstream_rq_active` / `cluster.upstream_rq_active` per listener or cluster).

use serde::Serialize;

use super::graph::{Edge, ServiceGraph, services_sql};
use super::model::{ComputedFrom, Signals, SignalsRow, VersionSignals};
use super::range::{TimeRange, empty_as_none};
use super::{round3, typed_with};
use crate::engine::{Params, QueryEngine, QueryError};

pub use super::model::{ENDPOINT_SQL, SERVED_SQL};

/// One service of `GET /api/v1/services`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ServiceSignals {
    pub name: String,
    pub namespace: Option<String>,
    #[serde(flatten)]
    pub signals: Signals,
}

/// `GET /api/v1/services`: every service with its signals, busiest first.
pub async fn services(
    engine: &QueryEngine,
    range: &TimeRange,
    path: ComputedFrom,
) -> Result<Vec<ServiceSignals>, QueryError> {
    let seconds = range.seconds();
    let mut out: Vec<ServiceSignals> = match path {
        ComputedFrom::Spans => {
            let (sql, params) = services_sql(range, None);
            typed_with::<SignalsRow>(engine, &sql, params)
                .await?
                .into_iter()
                .map(|r| ServiceSignals {
                    signals: r.signals(seconds),
                    name: r.name,
                    namespace: r.namespace,
                })
                .collect()
        }
        ComputedFrom::Rollups => super::rollup::aggregates(engine, range)
            .await?
            .into_iter()
            .filter(|(key, _)| key.kind == "service")
            .fold(
                std::collections::BTreeMap::<String, (Option<String>, super::rollup::Agg)>::new(),
                |mut by, (key, agg)| {
                    let e = by.entry(key.source).or_default();
                    e.0 = e.0.take().or(key.namespace);
                    e.1.merge(&agg);
                    by
                },
            )
            .into_iter()
            .map(|(name, (namespace, agg))| ServiceSignals {
                name,
                namespace,
                signals: agg.signals(seconds),
            })
            .collect(),
    };
    out.sort_by(|a, b| {
        b.signals
            .requests
            .cmp(&a.signals.requests)
            .then_with(|| a.name.cmp(&b.name))
    });
    Ok(out)
}

/// A service's endpoints ([`ENDPOINT_SQL`]) with their signals, busiest first: the
/// `endpoints` of `GET /api/v1/services/{name}` and what endpoint alert rules watch.
pub async fn endpoints(
    engine: &QueryEngine,
    range: &TimeRange,
    service: &str,
) -> Result<Vec<(String, Signals)>, QueryError> {
    let seconds = range.seconds();
    let mut params = Params::default();
    let service = params.bind(service);
    Ok(typed_with::<SignalsRow>(
        engine,
        &format!(
            "SELECT {ENDPOINT_SQL} AS name, CAST(NULL AS VARCHAR) AS namespace, count(*) AS requests,
                    sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) AS errors,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ns) AS p50_ns,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ns) AS p95_ns,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ns) AS p99_ns
             FROM spans WHERE {} AND service_name = {service} AND {SERVED_SQL}
             GROUP BY 1 ORDER BY requests DESC, name",
            range.sql("start_time"),
        ),
        params,
    )
    .await?
    .into_iter()
    .map(|r| {
        let signals = r.signals(seconds);
        (r.name, signals)
    })
    .collect())
}

/// An endpoint of a service with its signals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointSignals {
    pub name: String,
    #[serde(flatten)]
    pub signals: Signals,
}

/// One minute of a service's own requests (exact percentiles, p90 too).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MinuteSignals {
    pub time: String,
    pub requests: u64,
    pub rate: f64,
    pub errors: u64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// One in-flight gauge of the service over the range (`metric{cluster or listener}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Saturation {
    pub metric: String,
    pub avg: f64,
    pub max: f64,
}

/// `GET /api/v1/services/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceDetail {
    pub name: String,
    #[serde(flatten)]
    pub signals: Signals,
    pub endpoints: Vec<EndpointSignals>,
    /// The edges into the service and out of it, as `/api/v1/graph` has them.
    pub upstream: Vec<Edge>,
    pub downstream: Vec<Edge>,
    pub series: Vec<MinuteSignals>,
    pub saturation: Vec<Saturation>,
    pub versions: Vec<VersionSignals>,
}

/// `GET /api/v1/services/{name}`: the service's signals, endpoints, edges and series.
/// `None` when the service has no spans at all in the range.
pub async fn service(
    engine: &QueryEngine,
    range: &TimeRange,
    name: &str,
) -> Result<Option<ServiceDetail>, QueryError> {
    let seconds = range.seconds();
    let own = {
        let (sql, params) = services_sql(range, Some(name));
        typed_with::<SignalsRow>(engine, &sql, params).await?
    };
    // Every statement below binds the service's name the same way.
    let mut named = Params::default();
    let svc = named.bind(name);
    #[derive(serde::Deserialize)]
    struct Count {
        n: i64,
    }
    let seen = typed_with::<Count>(
        engine,
        &format!(
            "SELECT count(*) AS n FROM spans WHERE service_name = {svc} AND {}",
            range.sql("start_time")
        ),
        named.clone(),
    )
    .await?;
    if seen.first().map_or(0, |r| r.n) == 0 {
        return Ok(None);
    }
    let signals = own.first().map(|r| r.signals(seconds)).unwrap_or_default();

    let endpoints = endpoints(engine, range, name)
        .await?
        .into_iter()
        .map(|(name, signals)| EndpointSignals { name, signals })
        .collect();

    let graph = ServiceGraph::compute_by(engine, range, ComputedFrom::Spans).await?;
    let versions = graph
        .find(name)
        .map(|n| n.versions.clone())
        .unwrap_or_default();
    let mut upstream = Vec::new();
    let mut downstream = Vec::new();
    for e in graph.edges() {
        if e.target == name {
            upstream.push(e.clone());
        }
        if e.source == name {
            downstream.push(e.clone());
        }
    }

    /// One minute of a service's served spans.
    #[derive(serde::Deserialize)]
    struct Minute {
        minute_ns: i64,
        requests: i64,
        errors: i64,
        p50_ns: Option<f64>,
        p90_ns: Option<f64>,
        p95_ns: Option<f64>,
        p99_ns: Option<f64>,
    }
    let series = typed_with::<Minute>(
        engine,
        &format!(
            "SELECT CAST(date_bin(INTERVAL '1 minute', start_time, TIMESTAMP '1970-01-01T00:00:00Z') AS BIGINT) AS minute_ns,
                    count(*) AS requests,
                    sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) AS errors,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ns) AS p50_ns,
                    percentile_cont(0.9) WITHIN GROUP (ORDER BY duration_ns) AS p90_ns,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ns) AS p95_ns,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ns) AS p99_ns
             FROM spans WHERE {} AND service_name = {svc} AND {SERVED_SQL}
             GROUP BY 1 ORDER BY 1",
            range.sql("start_time")
        ),
        named.clone(),
    )
    .await?
    .into_iter()
    .map(|r| {
        let (requests, errors) = (r.requests.max(0) as u64, r.errors.max(0) as u64);
        let ms = |ns: Option<f64>| round3(ns.unwrap_or(0.0) / 1e6);
        MinuteSignals {
            time: chrono::DateTime::from_timestamp_nanos(r.minute_ns)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            requests,
            rate: round3(requests as f64 / 60.0),
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p50_ms: ms(r.p50_ns),
            p90_ms: ms(r.p90_ns),
            p95_ms: ms(r.p95_ns),
            p99_ms: ms(r.p99_ns),
        }
    })
    .collect();

    /// One in-flight gauge of the service, over the range.
    #[derive(serde::Deserialize)]
    struct Gauge {
        metric_name: String,
        avg: Option<f64>,
        max: Option<f64>,
    }
    let saturation = typed_with::<Gauge>(
        engine,
        &format!(
            "SELECT metric_name || coalesce('{{' || coalesce(attributes['envoy.cluster_name'], attributes['envoy.http_conn_manager_prefix']) || '}}', '') AS metric_name,
                    avg(value) AS avg, max(value) AS max FROM metrics
             WHERE {} AND service_name = {svc} AND metric_type = 'gauge'
               AND (metric_name LIKE '%in_flight%' OR metric_name LIKE '%inflight%' OR metric_name LIKE '%utilization%'
                    OR metric_name LIKE '%rq_active')
             GROUP BY 1 ORDER BY 1",
            range.sql("time")
        ),
        named.clone(),
    )
    .await?
    .into_iter()
    .map(|r| Saturation {
        metric: r.metric_name,
        avg: r.avg.unwrap_or(0.0),
        max: r.max.unwrap_or(0.0),
    })
    .collect();

    Ok(Some(ServiceDetail {
        name: name.to_string(),
        signals,
        endpoints,
        upstream,
        downstream,
        series,
        saturation,
        versions,
    }))
}

/// What `GET /api/v1/series` is asked for (typed query parameters).
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct SeriesQuery {
    #[serde(default, deserialize_with = "empty_as_none")]
    pub start: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    pub end: Option<String>,
    /// Seconds per point, a whole number of minutes (default: at most 60 points).
    #[serde(default, deserialize_with = "empty_as_none")]
    pub step: Option<u64>,
    /// One service's own requests.
    #[serde(default, deserialize_with = "empty_as_none")]
    pub service: Option<String>,
    /// One edge's requests: its source (`user` or `user (entry)` for the entry point) and
    /// target, as `/api/v1/graph` names them.
    #[serde(default, deserialize_with = "empty_as_none")]
    pub source: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    pub target: Option<String>,
}

/// One point of a series: the golden signals of `step` seconds from `time`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SeriesPoint {
    pub time: String,
    #[serde(flatten)]
    pub signals: Signals,
}

/// One series: a service's (`service`) or an edge's (`source`, `target`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Series {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub points: Vec<SeriesPoint>,
}

/// `GET /api/v1/series`'s answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SeriesAnswer {
    pub step: u64,
    pub series: Vec<Series>,
}

/// Per-step golden signals of a service, an edge, or (asked for neither) every service,
/// from the same cells the graph is built from: the per-minute rollups where they exist,
/// the raw-span pairing for the minutes after them (percentiles within the sketch's 1%).
pub async fn series(
    engine: &QueryEngine,
    range: &TimeRange,
    q: &SeriesQuery,
) -> Result<SeriesAnswer, QueryError> {
    use std::collections::BTreeMap;

    use super::model::{USER, USER_ENTRY};
    use super::rollup::Agg;

    let minutes = (range.seconds() / 60.0).ceil().max(1.0) as u64;
    let step = match q.step {
        Some(s) if s == 0 || s % 60 != 0 => {
            return Err(QueryError::Invalid(format!(
                "step must be a positive whole number of minutes in seconds (60, 120, …), got {s}"
            )));
        }
        Some(s) => s,
        None => minutes.div_ceil(60) * 60,
    };
    let edge = match (&q.source, &q.target) {
        (Some(s), Some(t)) => Some((s.as_str(), t.as_str())),
        (None, None) => None,
        _ => {
            return Err(QueryError::Invalid(
                "an edge's series needs both source and target".into(),
            ));
        }
    };
    let cells = super::rollup::by_minute(engine, range).await?;
    // With a service called `user`, `user` is that service and the entry is `user (entry)`.
    let user_service = cells
        .keys()
        .any(|(_, k)| k.kind == "service" && k.source == USER);
    let is_entry = |k: &super::rollup::Key| match k.source_kind.as_deref() {
        Some(kind) => kind == "user",
        None => k.source == USER,
    };
    let start_s = range.start.timestamp();
    // series name → step index → aggregate
    let mut by: BTreeMap<String, BTreeMap<i64, Agg>> = BTreeMap::new();
    for ((minute, key), agg) in &cells {
        let name = match (&q.service, edge) {
            (Some(svc), _) => {
                if key.kind != "service" || &key.source != svc {
                    continue;
                }
                svc.clone()
            }
            (None, Some((source, target))) => {
                let entry_asked = source == USER_ENTRY || (source == USER && !user_service);
                let source_matches = if is_entry(key) {
                    entry_asked
                } else {
                    !entry_asked && key.source == source
                };
                if key.kind != "edge" || key.target.as_deref() != Some(target) || !source_matches {
                    continue;
                }
                String::new()
            }
            (None, None) => {
                if key.kind != "service" {
                    continue;
                }
                key.source.clone()
            }
        };
        let i = (minute.timestamp() - start_s).div_euclid(step as i64);
        by.entry(name).or_default().entry(i).or_default().merge(agg);
    }
    let point = |i: i64, agg: &Agg| SeriesPoint {
        time: chrono::DateTime::from_timestamp(start_s + i * step as i64, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        signals: agg.signals(step as f64),
    };
    let series = by
        .into_iter()
        .map(|(name, steps)| Series {
            service: (edge.is_none()).then_some(name),
            source: edge.map(|(s, _)| s.to_string()),
            target: edge.map(|(_, t)| t.to_string()),
            points: steps.iter().map(|(i, agg)| point(*i, agg)).collect(),
        })
        .collect();
    Ok(SeriesAnswer { step, series })
}
