//! Edges from the mesh's own telemetry: proxies see every request, even when traces are
//! sampled, and report it as request metrics and access logs that name both ends.
//!
//! Recognised sources (labels are metric data-point attributes or log attributes):
//!
//! | source | requests | latency | ends | error |
//! | --- | --- | --- | --- | --- |
//! | Istio, and meshscope's proxy | `istio_requests_total` / `meshscope_requests_total` (counter) | `istio_request_duration_milliseconds` / `meshscope_request_duration_milliseconds` (histogram) | `source_workload` → `destination_workload` (or `destination_service_name`) | `response_code` ≥ 500 |
//! | Linkerd | `response_total` with `direction="outbound"` (counter) | `response_latency_ms` (histogram) | `deployment` → `dst_deployment` (or `dst_service`) | `classification="failure"` |
//! | access logs | one log record per request | its `duration_ms` | `source_workload` → `destination_workload` | `response_code` (or `http.response.status_code`) ≥ 500 |
//!
//! Istio reports each request twice (`reporter="source"` and `"destination"`); the source
//! side's report is used where there is one. Counters are read as the increase over the
//! range of each series (cumulative: last minus first, or the last value when the series
//! started inside the range; delta: the sum); histograms likewise, bucket by bucket, and
//! their percentiles are interpolated inside buckets as Prometheus' `histogram_quantile` does.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::graph::Signals;
use super::range::TimeRange;
use super::{rows, str_of};
use crate::engine::{QueryEngine, QueryError};

/// One family of request metrics.
struct Family {
    counter: &'static str,
    histogram: &'static str,
    source: &'static str,
    targets: &'static [&'static str],
    /// Only data points whose `attributes[key] = value`.
    only: Option<(&'static str, &'static str)>,
    error: ErrorRule,
}

enum ErrorRule {
    StatusAtLeast500(&'static str),
    ClassificationFailure,
}

const FAMILIES: &[Family] = &[
    Family {
        counter: "istio_requests_total",
        histogram: "istio_request_duration_milliseconds",
        source: "source_workload",
        targets: &["destination_workload", "destination_service_name"],
        only: None,
        error: ErrorRule::StatusAtLeast500("response_code"),
    },
    Family {
        counter: "meshscope_requests_total",
        histogram: "meshscope_request_duration_milliseconds",
        source: "source_workload",
        targets: &["destination_workload", "destination_service_name"],
        only: None,
        error: ErrorRule::StatusAtLeast500("response_code"),
    },
    Family {
        counter: "response_total",
        histogram: "response_latency_ms",
        source: "deployment",
        targets: &["dst_deployment", "dst_service"],
        only: Some(("direction", "outbound")),
        error: ErrorRule::ClassificationFailure,
    },
];

/// `(source, target)` → signals, for one kind of telemetry.
pub type EdgeSignals = BTreeMap<(String, String), Signals>;

fn target_expr(targets: &[&str]) -> String {
    let parts: Vec<String> = targets
        .iter()
        .map(|t| format!("attributes['{t}']"))
        .collect();
    format!("coalesce({})", parts.join(", "))
}

/// Counter increase of one series from its points (ordered by time).
fn increase(points: &[(i64, i64, f64, bool)], range_start_ns: i64) -> f64 {
    // (time, start_time, value, delta)
    let Some(first) = points.first() else {
        return 0.0;
    };
    if first.3 {
        return points.iter().map(|p| p.2).sum();
    }
    let last = points.last().map(|p| p.2).unwrap_or(0.0);
    if first.1 >= range_start_ns && first.1 > 0 {
        last // the series started inside the range: it counted from zero
    } else {
        (last - first.2).max(0.0)
    }
}

/// `histogram_quantile`: linear interpolation inside the bucket holding the rank.
pub fn histogram_quantile(q: f64, bounds: &[f64], counts: &[f64]) -> f64 {
    let total: f64 = counts.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut seen = 0.0;
    for (i, c) in counts.iter().enumerate() {
        if seen + c >= rank && *c > 0.0 {
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            // The +Inf bucket has no upper bound: answer its lower bound.
            let Some(upper) = bounds.get(i) else {
                return lower;
            };
            return lower + (upper - lower) * ((rank - seen) / c);
        }
        seen += c;
    }
    bounds.last().copied().unwrap_or(0.0)
}

/// Edges from request metrics.
pub async fn from_metrics(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<EdgeSignals, QueryError> {
    let seconds = range.seconds();
    let start_ns = range.start.timestamp_nanos_opt().unwrap_or(0);
    #[derive(Default)]
    struct Acc {
        requests: f64,
        errors: f64,
        bounds: Vec<f64>,
        buckets: Vec<f64>,
        source_reported: bool,
    }
    let mut edges: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for f in FAMILIES {
        let only = f
            .only
            .map(|(k, v)| format!(" AND attributes['{k}'] = '{v}'"))
            .unwrap_or_default();
        let error_col = match f.error {
            ErrorRule::StatusAtLeast500(label) => {
                format!("TRY_CAST(attributes['{label}'] AS INT) >= 500")
            }
            ErrorRule::ClassificationFailure => {
                "attributes['classification'] = 'failure'".to_string()
            }
        };
        let sql = format!(
            "SELECT attributes['{src}'] AS src, {dst} AS dst, coalesce(attributes['reporter'], '') AS reporter,
                    array_to_string(map_keys(attributes), ',') || '=' || array_to_string(map_values(attributes), ',') AS series,
                    coalesce({error_col}, false) AS failed, metric_name, service_name,
                    CAST(start_time AS BIGINT) AS series_start, CAST(time AS BIGINT) AS t,
                    temporality = 'delta' AS delta, value, bucket_counts, explicit_bounds
             FROM metrics
             WHERE {r} AND metric_name IN ('{c}', '{h}') AND attributes['{src}'] IS NOT NULL AND {dst} IS NOT NULL{only}
             ORDER BY t",
            src = f.source,
            dst = target_expr(f.targets),
            r = range.sql("time"),
            c = f.counter,
            h = f.histogram,
        );
        // A series is its service, its whole label set and its start; points in time order.
        // (series, src, dst, reporter, failed, series start)
        type SeriesKey = (String, String, String, String, bool, i64);
        // (delta temporality, bucket counts, bounds)
        type HistogramPoint = (bool, Vec<f64>, Vec<f64>);
        let mut counters: HashMap<SeriesKey, Vec<(i64, i64, f64, bool)>> = HashMap::new();
        let mut histos: HashMap<SeriesKey, Vec<HistogramPoint>> = HashMap::new();
        for r in rows(engine, &sql).await? {
            let (src, dst, reporter) =
                (str_of(&r, "src"), str_of(&r, "dst"), str_of(&r, "reporter"));
            let series_start = r.get("series_start").and_then(Value::as_i64).unwrap_or(0);
            let t = r.get("t").and_then(Value::as_i64).unwrap_or(0);
            let delta = r.get("delta").and_then(Value::as_bool).unwrap_or(false);
            let failed = r.get("failed").and_then(Value::as_bool).unwrap_or(false);
            let key = (
                format!("{}|{}", str_of(&r, "service_name"), str_of(&r, "series")),
                src,
                dst,
                reporter,
                failed,
                series_start,
            );
            if str_of(&r, "metric_name") == f.counter {
                let value = r.get("value").and_then(Value::as_f64).unwrap_or(0.0);
                counters
                    .entry(key)
                    .or_default()
                    .push((t, series_start, value, delta));
            } else {
                let floats = |k: &str| -> Vec<f64> {
                    r.get(k)
                        .and_then(Value::as_array)
                        .map(|a| a.iter().filter_map(Value::as_f64).collect())
                        .unwrap_or_default()
                };
                histos.entry(key).or_default().push((
                    delta,
                    floats("bucket_counts"),
                    floats("explicit_bounds"),
                ));
            }
        }
        // Which edges have a source-side report (Istio reports twice).
        let source_side: std::collections::HashSet<(String, String)> = counters
            .keys()
            .filter(|k| k.3 == "source")
            .map(|k| (k.1.clone(), k.2.clone()))
            .collect();
        let counted = |src: &str, dst: &str, reporter: &str| {
            reporter.is_empty()
                || reporter == "source"
                || !source_side.contains(&(src.to_string(), dst.to_string()))
        };
        for ((_, src, dst, reporter, failed, _), points) in counters {
            if !counted(&src, &dst, &reporter) {
                continue;
            }
            let n = increase(&points, start_ns);
            let acc = edges.entry((src, dst)).or_default();
            acc.requests += n;
            if failed {
                acc.errors += n;
            }
            acc.source_reported |= reporter == "source";
        }
        for ((_, src, dst, reporter, _, _), points) in histos {
            if !counted(&src, &dst, &reporter) {
                continue;
            }
            let Some((delta, _, bounds)) = points.first().cloned() else {
                continue;
            };
            let counts: Vec<f64> = if delta {
                let mut sum = vec![0.0; points[0].1.len()];
                for (_, c, _) in &points {
                    for (s, v) in sum.iter_mut().zip(c) {
                        *s += v;
                    }
                }
                sum
            } else {
                let first = &points[0].1;
                let last = &points[points.len() - 1].1;
                if points.len() == 1 {
                    last.clone()
                } else {
                    last.iter()
                        .zip(first)
                        .map(|(l, f)| (l - f).max(0.0))
                        .collect()
                }
            };
            let acc = edges.entry((src, dst)).or_default();
            if acc.buckets.is_empty() {
                acc.bounds = bounds;
                acc.buckets = vec![0.0; counts.len()];
            }
            if acc.buckets.len() == counts.len() {
                for (a, c) in acc.buckets.iter_mut().zip(&counts) {
                    *a += c;
                }
            }
        }
    }
    Ok(edges
        .into_iter()
        .filter(|(_, a)| a.requests > 0.0)
        .map(|(k, a)| {
            let requests = a.requests.round() as u64;
            let errors = a.errors.round() as u64;
            // Bucket bounds are in milliseconds.
            let ns = |p: f64| histogram_quantile(p, &a.bounds, &a.buckets) * 1e6;
            let signals = Signals::new(requests, errors, seconds, [ns(0.5), ns(0.95), ns(0.99)]);
            (k, signals)
        })
        .collect())
}

/// Edges from access-log records (one record per request).
pub async fn from_access_logs(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<EdgeSignals, QueryError> {
    let seconds = range.seconds();
    let sql = format!(
        "SELECT log_attributes['source_workload'] AS source, log_attributes['destination_workload'] AS target,
                count(*) AS requests,
                sum(CASE WHEN TRY_CAST(coalesce(log_attributes['response_code'], log_attributes['http.response.status_code']) AS INT) >= 500
                         THEN 1 ELSE 0 END) AS errors,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY TRY_CAST(log_attributes['duration_ms'] AS DOUBLE)) * 1e6 AS p50_ns,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY TRY_CAST(log_attributes['duration_ms'] AS DOUBLE)) * 1e6 AS p95_ns,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY TRY_CAST(log_attributes['duration_ms'] AS DOUBLE)) * 1e6 AS p99_ns
         FROM logs
         WHERE {} AND log_attributes['source_workload'] IS NOT NULL AND log_attributes['destination_workload'] IS NOT NULL
         GROUP BY 1, 2",
        range.sql("time")
    );
    Ok(rows(engine, &sql)
        .await?
        .iter()
        .map(|r| {
            (
                (str_of(r, "source"), str_of(r, "target")),
                Signals::from_row(r, seconds),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        // 10 requests under 5 ms, 10 between 5 and 10, none above.
        let bounds = [5.0, 10.0, 25.0];
        let counts = [10.0, 10.0, 0.0, 0.0];
        assert_eq!(histogram_quantile(0.5, &bounds, &counts), 5.0);
        assert_eq!(histogram_quantile(0.75, &bounds, &counts), 7.5);
        assert_eq!(histogram_quantile(0.25, &bounds, &counts), 2.5);
        // Everything in +Inf: its lower bound.
        assert_eq!(
            histogram_quantile(0.5, &bounds, &[0.0, 0.0, 0.0, 4.0]),
            25.0
        );
        assert_eq!(histogram_quantile(0.5, &bounds, &[0.0; 4]), 0.0);
    }

    #[test]
    fn counter_increase() {
        // cumulative series that started before the range: last - first
        assert_eq!(
            increase(&[(10, 1, 5.0, false), (20, 1, 12.0, false)], 5),
            7.0
        );
        // started inside the range: counts from zero
        assert_eq!(
            increase(&[(10, 8, 5.0, false), (20, 8, 12.0, false)], 5),
            12.0
        );
        // delta points add up
        assert_eq!(increase(&[(10, 0, 2.0, true), (20, 0, 3.0, true)], 5), 5.0);
    }
}
