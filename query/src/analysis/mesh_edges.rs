//! Edges from the mesh's own telemetry: proxies see every request, even when traces are
//! sampled, and report it as request metrics and access logs that name both ends.
//!
//! Recognised sources (labels are metric data-point attributes or log attributes):
//!
//! | source | requests | latency | ends | error |
//! | --- | --- | --- | --- | --- |
//! | Istio, and meshscope's proxy | `istio_requests_total` / `meshscope_requests_total` (counter) | `istio_request_duration_milliseconds` / `meshscope_request_duration_milliseconds` (histogram) | `source_workload` → `destination_service_name` (or `destination_workload`) | `response_code` ≥ 500 |
//! | Linkerd | `response_total` with `direction="outbound"` (counter) | `response_latency_ms` (histogram) | `deployment` → `dst_service` (or `dst_deployment`) | `classification="failure"` |
//! | Envoy's stats sink (`envoy.stat_sinks.open_telemetry`) | `cluster.upstream_rq_total` (counter) | `cluster.upstream_rq_time` (histogram, ms) | the resource's `service.name` → `envoy.cluster_name` | `cluster.upstream_rq_xx` with `envoy.response_code_class="5"` |
//! | access logs | one log record per request | its `duration_ms` | `source_workload` → `destination_service_name` (or `destination_workload`) | `response_code` (or `http.response.status_code`) ≥ 500 |
//!
//! The callee is the *service*: a canary workload (`cart-v2`) counts on its service's edge,
//! under its version (`destination_version`, Istio's `destination_canonical_revision`,
//! Linkerd's `dst_version`). A caller named by its workload is mapped to its service by
//! the `destination_workload` → `destination_service_name` pairs the same telemetry
//! reports (Istio's `source_canonical_service` first, where it is present). Requests a
//! proxy answered itself are counted per reason from `proxy_response` (meshscope) or
//! `response_flags` (Envoy, Istio).
//!
//! Envoy's clusters that are not a call to another service are left out: the caller's own
//! name, and names that start with `local` or `inbound`, or contain `admin`, `otel`,
//! `otlp`, `opentelemetry`, `collector`, `telemetry` or `meshscope`.
//!
//! Istio reports each request twice (`reporter="source"` and `"destination"`); the source
//! side's report is used where there is one. Counters are read as the increase over the
//! range of each series (cumulative: last minus first, or the last value when the series
//! started inside the range; delta: the sum); histograms likewise, bucket by bucket, and
//! their percentiles are interpolated inside buckets as Prometheus' `histogram_quantile` does.

use std::collections::{BTreeMap, HashMap};

use meshscope_proto::convert::spans::envoy_reason;

use super::model::{Raw, Signals, UNKNOWN_VERSION, VersionSignals, summarise};
use super::range::TimeRange;
use super::typed;
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
        targets: &["destination_service_name", "destination_workload"],
        only: None,
        error: ErrorRule::StatusAtLeast500("response_code"),
    },
    Family {
        counter: "meshscope_requests_total",
        histogram: "meshscope_request_duration_milliseconds",
        source: "source_workload",
        targets: &["destination_service_name", "destination_workload"],
        only: None,
        error: ErrorRule::StatusAtLeast500("response_code"),
    },
    Family {
        counter: "response_total",
        histogram: "response_latency_ms",
        source: "deployment",
        targets: &["dst_service", "dst_deployment"],
        only: Some(("direction", "outbound")),
        error: ErrorRule::ClassificationFailure,
    },
];

/// The version labels, in order.
const VERSION_LABELS: &[&str] = &[
    "destination_version",
    "destination_canonical_revision",
    "dst_version",
];

/// What one kind of telemetry saw of one edge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeenEdge {
    pub signals: Signals,
    pub by_version: Vec<VersionSignals>,
    pub reasons: BTreeMap<String, u64>,
}

/// `(source, target)` → what was seen, for one kind of telemetry.
pub type EdgeSignals = BTreeMap<(String, String), SeenEdge>;

fn coalesce(map: &str, keys: &[&str]) -> String {
    let parts: Vec<String> = keys.iter().map(|t| format!("{map}['{t}']")).collect();
    format!("coalesce({})", parts.join(", "))
}

/// A version label's value, unless it says there is none.
fn version_of(v: Option<&str>) -> Option<String> {
    v.filter(|v| !v.is_empty() && *v != UNKNOWN_VERSION && *v != "latest")
        .map(str::to_string)
}

/// Counter increase of one series from its points (ordered by time).
pub(super) fn increase(points: &[(i64, i64, f64, bool)], range_start_ns: i64) -> f64 {
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

/// Bucket counts' increase of one histogram series from its points (ordered by time).
fn bucket_increase(points: &[HistogramPoint]) -> Vec<f64> {
    let Some((delta, first, _)) = points.first() else {
        return Vec::new();
    };
    if *delta {
        let mut sum = vec![0.0; first.len()];
        for (_, c, _) in points {
            for (s, v) in sum.iter_mut().zip(c) {
                *s += v;
            }
        }
        sum
    } else if points.len() == 1 {
        first.clone()
    } else {
        let last = &points[points.len() - 1].1;
        last.iter()
            .zip(first)
            .map(|(l, f)| (l - f).max(0.0))
            .collect()
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

/// (delta temporality, bucket counts, bounds)
type HistogramPoint = (bool, Vec<f64>, Vec<f64>);

/// Requests of one edge and callee version, added up over series.
#[derive(Default)]
struct Acc {
    requests: f64,
    errors: f64,
    bounds: Vec<f64>,
    buckets: Vec<f64>,
    reasons: BTreeMap<String, f64>,
}

impl Acc {
    fn add_buckets(&mut self, bounds: Vec<f64>, counts: &[f64]) {
        if self.buckets.is_empty() {
            self.bounds = bounds;
            self.buckets = vec![0.0; counts.len()];
        }
        if self.buckets.len() == counts.len() {
            for (a, c) in self.buckets.iter_mut().zip(counts) {
                *a += c;
            }
        }
    }

    fn absorb(&mut self, other: &Acc) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.add_buckets(other.bounds.clone(), &other.buckets);
        for (r, n) in &other.reasons {
            *self.reasons.entry(r.clone()).or_default() += n;
        }
    }

    fn signals(&self, seconds: f64) -> Signals {
        // Bucket bounds are in milliseconds.
        let ns = |p: f64| histogram_quantile(p, &self.bounds, &self.buckets) * 1e6;
        Signals::new(
            self.requests.round() as u64,
            self.errors.round() as u64,
            seconds,
            [ns(0.5), ns(0.95), ns(0.99)],
        )
    }
}

/// `(source, target, version)` → requests.
type Accs = BTreeMap<(String, String, Option<String>), Acc>;

/// Sums each edge's versions into what the graph shows; callers named by a workload are
/// mapped to their service through `workload → service`.
fn seen_edges(accs: Accs, services: &HashMap<String, String>, seconds: f64) -> EdgeSignals {
    let mut by_edge: BTreeMap<(String, String), BTreeMap<Option<String>, Acc>> = BTreeMap::new();
    for ((src, dst, version), acc) in accs {
        if acc.requests <= 0.0 {
            continue;
        }
        let src = services.get(&src).cloned().unwrap_or(src);
        by_edge
            .entry((src, dst))
            .or_default()
            .entry(version)
            .or_default()
            .absorb(&acc);
    }
    by_edge
        .into_iter()
        .map(|(edge, versions)| {
            let mut total = Acc::default();
            let versioned = versions.keys().any(Option::is_some);
            let mut by_version: Vec<VersionSignals> = Vec::new();
            for (version, acc) in &versions {
                total.absorb(acc);
                if versioned {
                    by_version.push(VersionSignals {
                        version: version
                            .clone()
                            .unwrap_or_else(|| UNKNOWN_VERSION.to_string()),
                        signals: acc.signals(seconds),
                    });
                }
            }
            by_version.sort_by(|a, b| {
                b.signals
                    .requests
                    .cmp(&a.signals.requests)
                    .then_with(|| a.version.cmp(&b.version))
            });
            let reasons = total
                .reasons
                .iter()
                .map(|(r, n)| (r.clone(), n.round() as u64))
                .filter(|(_, n)| *n > 0)
                .collect();
            let seen = SeenEdge {
                signals: total.signals(seconds),
                by_version,
                reasons,
            };
            (edge, seen)
        })
        .collect()
}

/// The reason a `response_flags` or `proxy_response` label gives, if any.
fn reason_of(proxy_response: &str, flags: &str) -> Option<String> {
    if !proxy_response.is_empty() {
        return Some(proxy_response.to_string());
    }
    envoy_reason(flags).map(str::to_string)
}

/// Whether an Envoy cluster is a call to another service (not the local app, the admin
/// or the telemetry exporter).
pub fn envoy_service_cluster(caller: &str, cluster: &str) -> bool {
    let c = cluster.to_ascii_lowercase();
    !(c == caller.to_ascii_lowercase()
        || c.starts_with("local")
        || c.starts_with("inbound")
        || [
            "admin",
            "otel",
            "otlp",
            "opentelemetry",
            "collector",
            "telemetry",
            "meshscope",
        ]
        .iter()
        .any(|w| c.contains(w)))
}

/// One row of a request-metric query.
struct Point {
    /// Service, whole label set and start: one series.
    series: String,
    src: String,
    dst: String,
    version: Option<String>,
    reporter: String,
    reason: Option<String>,
    failed: bool,
    counter: bool,
    t: i64,
    series_start: i64,
    delta: bool,
    value: f64,
    buckets: Vec<f64>,
    bounds: Vec<f64>,
}

/// One row of a request-metric query, as DataFusion answers it.
#[derive(Debug, serde::Deserialize)]
struct MetricRow {
    src: Option<String>,
    dst: Option<String>,
    dst_workload: Option<String>,
    version: Option<String>,
    reporter: String,
    flags: String,
    proxy_response: String,
    failed: bool,
    series: Option<String>,
    metric_name: String,
    service_name: String,
    series_start: Option<i64>,
    t: i64,
    delta: Option<bool>,
    value: Option<f64>,
    bucket_counts: Option<Vec<Option<i64>>>,
    explicit_bounds: Option<Vec<Option<f64>>>,
}

impl MetricRow {
    fn point(self, counter: bool) -> Point {
        Point {
            series: format!(
                "{}|{}",
                self.service_name,
                self.series.as_deref().unwrap_or_default()
            ),
            reason: reason_of(&self.proxy_response, &self.flags),
            src: self.src.unwrap_or_default(),
            dst: self.dst.unwrap_or_default(),
            version: version_of(self.version.as_deref()),
            reporter: self.reporter,
            failed: self.failed,
            counter,
            t: self.t,
            series_start: self.series_start.unwrap_or(0),
            delta: self.delta.unwrap_or(false),
            value: self.value.unwrap_or(0.0),
            buckets: self
                .bucket_counts
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.unwrap_or(0) as f64)
                .collect(),
            bounds: self
                .explicit_bounds
                .unwrap_or_default()
                .into_iter()
                .map(|b| b.unwrap_or(f64::INFINITY))
                .collect(),
        }
    }
}

/// The columns every request-metric query selects besides `src`, `dst`, `failed`.
pub(super) const POINT_COLUMNS: &str = "array_to_string(map_keys(attributes), ',') || '=' || array_to_string(map_values(attributes), ',') AS series,
    metric_name, service_name, CAST(start_time AS BIGINT) AS series_start, CAST(time AS BIGINT) AS t,
    temporality = 'delta' AS delta, value, bucket_counts, explicit_bounds";

/// Adds up points per series: counters' increase into requests (and errors, and
/// reasons), histograms' bucket increase into latencies. `counted` says whether a
/// series' (src, dst, reporter) counts.
fn accumulate(
    points: Vec<Point>,
    start_ns: i64,
    accs: &mut Accs,
    counted: impl Fn(&Point) -> bool,
) {
    let mut series: HashMap<(String, bool, i64), Vec<Point>> = HashMap::new();
    for p in points {
        series
            .entry((p.series.clone(), p.counter, p.series_start))
            .or_default()
            .push(p);
    }
    for ((_, counter, _), points) in series {
        let Some(first) = points.first() else {
            continue;
        };
        if !counted(first) {
            continue;
        }
        let acc = accs
            .entry((first.src.clone(), first.dst.clone(), first.version.clone()))
            .or_default();
        if counter {
            let values: Vec<(i64, i64, f64, bool)> = points
                .iter()
                .map(|p| (p.t, p.series_start, p.value, p.delta))
                .collect();
            let n = increase(&values, start_ns);
            acc.requests += n;
            if first.failed {
                acc.errors += n;
            }
            if let Some(r) = &first.reason {
                *acc.reasons.entry(r.clone()).or_default() += n;
            }
        } else {
            let hp: Vec<HistogramPoint> = points
                .iter()
                .map(|p| (p.delta, p.buckets.clone(), p.bounds.clone()))
                .collect();
            acc.add_buckets(first.bounds.clone(), &bucket_increase(&hp));
        }
    }
}

/// Edges from request metrics.
pub async fn from_metrics(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<EdgeSignals, QueryError> {
    let seconds = range.seconds();
    let start_ns = range.start.timestamp_nanos_opt().unwrap_or(0);
    let mut accs = Accs::new();
    let mut services: HashMap<String, String> = HashMap::new();
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
        let workload = f.targets.last().copied().unwrap_or_default();
        let sql = format!(
            "SELECT coalesce(attributes['source_canonical_service'], attributes['{src}']) AS src,
                    attributes['{src}'] AS src_workload,
                    {dst} AS dst, attributes['{workload}'] AS dst_workload,
                    {version} AS version, coalesce(attributes['reporter'], '') AS reporter,
                    coalesce(attributes['response_flags'], '') AS flags,
                    coalesce(attributes['proxy_response'], '') AS proxy_response,
                    coalesce({error_col}, false) AS failed, {POINT_COLUMNS}
             FROM metrics
             WHERE {r} AND metric_name IN ('{c}', '{h}') AND attributes['{src}'] IS NOT NULL AND {dst} IS NOT NULL{only}
               AND coalesce(attributes['mirror'], '') <> 'shadow'
             ORDER BY t",
            src = f.source,
            dst = coalesce("attributes", f.targets),
            version = coalesce("attributes", VERSION_LABELS),
            r = range.sql("time"),
            c = f.counter,
            h = f.histogram,
        );
        let mut points = Vec::new();
        for r in typed::<MetricRow>(engine, &sql).await? {
            if let (Some(dst), Some(workload)) = (&r.dst, &r.dst_workload)
                && workload != dst
            {
                services.insert(workload.clone(), dst.clone());
            }
            let counter = r.metric_name == f.counter;
            points.push(r.point(counter));
        }
        // Which edges have a source-side report (Istio reports twice).
        let source_side: std::collections::HashSet<(String, String)> = points
            .iter()
            .filter(|p| p.counter && p.reporter == "source")
            .map(|p| (p.src.clone(), p.dst.clone()))
            .collect();
        accumulate(points, start_ns, &mut accs, |p| {
            p.reporter.is_empty()
                || p.reporter == "source"
                || !source_side.contains(&(p.src.clone(), p.dst.clone()))
        });
    }
    envoy_stats(engine, range, start_ns, &mut accs).await?;
    Ok(seen_edges(accs, &services, seconds))
}

/// Envoy's stats sink: requests per upstream cluster of each sidecar, errors from the
/// 5xx class counter, latency from `cluster.upstream_rq_time`.
async fn envoy_stats(
    engine: &QueryEngine,
    range: &TimeRange,
    start_ns: i64,
    accs: &mut Accs,
) -> Result<(), QueryError> {
    let sql = format!(
        "SELECT service_name AS src, attributes['envoy.cluster_name'] AS dst,
                CAST(NULL AS VARCHAR) AS dst_workload, CAST(NULL AS VARCHAR) AS version,
                '' AS reporter, '' AS flags, '' AS proxy_response,
                metric_name = 'cluster.upstream_rq_xx' AS failed, {POINT_COLUMNS}
         FROM metrics
         WHERE {r} AND attributes['envoy.cluster_name'] IS NOT NULL
           AND (metric_name IN ('cluster.upstream_rq_total', 'cluster.upstream_rq_time')
                OR (metric_name = 'cluster.upstream_rq_xx' AND attributes['envoy.response_code_class'] = '5'))
         ORDER BY t",
        r = range.sql("time"),
    );
    let mut requests = Vec::new();
    let mut failures = Vec::new();
    for r in typed::<MetricRow>(engine, &sql).await? {
        let (src, dst) = (r.src.as_deref(), r.dst.as_deref());
        if !envoy_service_cluster(src.unwrap_or_default(), dst.unwrap_or_default()) {
            continue;
        }
        match r.metric_name.as_str() {
            "cluster.upstream_rq_xx" => failures.push(r.point(true)),
            "cluster.upstream_rq_total" => requests.push(r.point(true)),
            _ => requests.push(r.point(false)),
        }
    }
    accumulate(requests, start_ns, accs, |_| true);
    // 5xx responses: errors of the same edge, not more requests.
    let mut errors = Accs::new();
    accumulate(failures, start_ns, &mut errors, |_| true);
    for (key, e) in errors {
        if let Some(acc) = accs.get_mut(&key) {
            acc.errors += e.errors;
        }
    }
    Ok(())
}

/// (callee version, proxy reason, requests): what [`summarise`] adds up.
type VersionReasonCell = (Option<String>, Option<String>, Raw);

/// Edges from access-log records (one record per request).
pub async fn from_access_logs(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<EdgeSignals, QueryError> {
    let seconds = range.seconds();
    let la = |k: &str| format!("log_attributes['{k}']");
    let sql = format!(
        "SELECT {src} AS source, coalesce({dsn}, {dw}) AS target, {dw} AS workload,
                {version} AS version,
                coalesce({pr}, '') AS proxy_response, coalesce({rf}, '') AS flags,
                sum(CASE WHEN TRY_CAST(coalesce({rc}, log_attributes['http.response.status_code']) AS INT) >= 500
                         THEN 1 ELSE 0 END) AS errors,
                array_agg(TRY_CAST({dur} AS DOUBLE)) AS durations_ms
         FROM logs
         WHERE {r} AND {src} IS NOT NULL AND coalesce({dsn}, {dw}) IS NOT NULL
           AND coalesce(log_attributes['mirror'], '') <> 'shadow'
         GROUP BY 1, 2, 3, 4, 5, 6",
        src = la("source_workload"),
        dsn = la("destination_service_name"),
        dw = la("destination_workload"),
        version = coalesce("log_attributes", VERSION_LABELS),
        pr = la("proxy_response"),
        rf = la("response_flags"),
        rc = la("response_code"),
        dur = la("duration_ms"),
        r = range.sql("time")
    );
    // (source, target) → (version, reason, requests), as the spans' cells.
    let mut cells: BTreeMap<(String, String), Vec<VersionReasonCell>> = BTreeMap::new();
    #[derive(serde::Deserialize)]
    struct LogRow {
        source: String,
        target: String,
        workload: Option<String>,
        version: Option<String>,
        proxy_response: String,
        flags: String,
        errors: i64,
        durations_ms: Option<Vec<Option<f64>>>,
    }
    let found = typed::<LogRow>(engine, &sql).await?;
    let services: HashMap<String, String> = found
        .iter()
        .filter_map(|r| {
            let w = r.workload.as_ref().filter(|w| **w != r.target)?;
            Some((w.clone(), r.target.clone()))
        })
        .collect();
    for r in found {
        let source = services.get(&r.source).cloned().unwrap_or(r.source);
        let latencies_ns = r
            .durations_ms
            .unwrap_or_default()
            .into_iter()
            .map(|ms| (ms.unwrap_or(0.0) * 1e6) as i64)
            .collect();
        cells.entry((source, r.target)).or_default().push((
            version_of(r.version.as_deref()),
            reason_of(&r.proxy_response, &r.flags),
            Raw {
                latencies_ns,
                errors: u64::try_from(r.errors).unwrap_or(0),
            },
        ));
    }
    // Percentiles over every record's latency: CPU work, on the query runtime.
    engine
        .compute(move || {
            cells
                .into_iter()
                .map(|(edge, cells)| {
                    let (signals, by_version, reasons) = summarise(cells, seconds);
                    let seen = SeenEdge {
                        signals,
                        by_version,
                        reasons,
                    };
                    (edge, seen)
                })
                .collect()
        })
        .await
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
