//! The analysis' shared vocabulary, a leaf every other module builds on: what a request
//! is (`SERVED_SQL`, `ENDPOINT_SQL`), the node kinds and the entry point's names, the
//! golden [`Signals`] and how a set of requests ([`Measure`]: exact latencies or a rollup's
//! sketch) is summarised per version and proxy reason. It depends on nothing else of the
//! analysis, so the graph, the pairing, the rollups, the mesh telemetry and the counters
//! all meet here instead of in each other.

use std::collections::BTreeMap;

use serde::Serialize;

use super::range::TimeRange;
use super::round3;
use crate::engine::QueryError;

/// The spans that are a request a service served: SERVER and CONSUMER spans, except the
/// SERVER span Envoy's outbound listener makes for each outgoing request when
/// `spawn_upstream_span` is on (`egress <host>`: the app's own call, not one it answered),
/// and a shadow's copy of a mirrored request (`mirror` = `shadow`: nobody waited for it).
pub const SERVED_SQL: &str = "span_kind IN ('SERVER', 'CONSUMER') AND span_name NOT LIKE 'egress %'
     AND (mirror IS NULL OR mirror <> 'shadow')";

/// A span's endpoint: its `http_route`; else its name, unless that is one a proxy gives
/// every span (Envoy's `ingress` / `egress <host>`), when the path of `url.path` /
/// `http.url` says more.
pub const ENDPOINT_SQL: &str = "coalesce(http_route,
    CASE WHEN span_name = 'ingress' OR span_name = 'egress' OR span_name LIKE 'egress %' OR span_name LIKE 'ingress %'
         THEN coalesce(span_attributes['url.path'],
                       nullif(regexp_replace(regexp_replace(span_attributes['http.url'], '^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*', ''), '[?#].*$', ''), ''))
    END,
    span_name)";

/// How far outside the range the other half of a pair may start.
pub const PAIR_WINDOW: i64 = 5; // minutes

/// The entry point's node id.
pub const USER: &str = "user";
/// The entry point's node id when a service is itself called `user`.
pub const USER_ENTRY: &str = "user (entry)";

/// Where a range's signals are computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputedFrom {
    /// Raw spans: exact percentiles; the default for ranges up to an hour.
    Spans,
    /// Per-minute rollups (and raw spans for the minutes not rolled up yet): percentiles
    /// within 1%; the default for longer ranges.
    Rollups,
}

impl ComputedFrom {
    /// From the `source` query parameter (`spans`, `rollups` or `auto`).
    pub fn choose(param: Option<&str>, range: &TimeRange) -> Result<ComputedFrom, QueryError> {
        match param {
            Some("spans") | Some("raw") => Ok(ComputedFrom::Spans),
            Some("rollups") => Ok(ComputedFrom::Rollups),
            None | Some("") | Some("auto") => Ok(if range.seconds() > 3600.0 {
                ComputedFrom::Rollups
            } else {
                ComputedFrom::Spans
            }),
            Some(other) => Err(QueryError::Invalid(format!(
                "source must be spans, rollups or auto, got {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ComputedFrom::Spans => "spans",
            ComputedFrom::Rollups => "rollups",
        }
    }
}

/// The node kinds of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Service,
    Virtual,
    User,
}

/// Request-level golden signals of a node or an edge.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Signals {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl Signals {
    /// Signals of `requests` over `seconds`, with p50/p95/p99 latencies in nanoseconds.
    pub(crate) fn new(
        requests: u64,
        errors: u64,
        seconds: f64,
        [p50_ns, p95_ns, p99_ns]: [f64; 3],
    ) -> Signals {
        Signals {
            requests,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            rate: round3(requests as f64 / seconds),
            p50_ms: round3(p50_ns / 1e6),
            p95_ms: round3(p95_ns / 1e6),
            p99_ms: round3(p99_ns / 1e6),
        }
    }
}

/// A row of signals as the SQL of `graph::services_sql` (and the endpoint query) answers:
/// a name, counts and exact percentiles in nanoseconds.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct SignalsRow {
    pub name: String,
    pub namespace: Option<String>,
    pub requests: i64,
    pub errors: i64,
    pub p50_ns: Option<f64>,
    pub p95_ns: Option<f64>,
    pub p99_ns: Option<f64>,
}

impl SignalsRow {
    pub(crate) fn signals(&self, seconds: f64) -> Signals {
        let ns = |p: Option<f64>| p.unwrap_or(0.0);
        Signals::new(
            u64::try_from(self.requests).unwrap_or(0),
            u64::try_from(self.errors).unwrap_or(0),
            seconds,
            [ns(self.p50_ns), ns(self.p95_ns), ns(self.p99_ns)],
        )
    }
}

/// The signals of one version of a service (or of an edge's callee).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionSignals {
    pub version: String,
    #[serde(flatten)]
    pub signals: Signals,
}

/// The name under which requests of a service without `service.version` are listed
/// beside versioned ones.
pub const UNKNOWN_VERSION: &str = "unknown";

/// Requests that can be added together and summarised: exact latencies from raw spans,
/// or a rollup's sketch.
pub(crate) trait Measure: Default {
    /// Adds `other`'s requests.
    fn absorb(&mut self, other: Self);
    fn requests(&self) -> u64;
    fn signals(&mut self, seconds: f64) -> Signals;
}

/// Raw requests: every latency, and the errors.
#[derive(Debug, Clone, Default)]
pub(crate) struct Raw {
    pub latencies_ns: Vec<i64>,
    pub errors: u64,
}

impl Measure for Raw {
    fn absorb(&mut self, other: Raw) {
        if self.latencies_ns.is_empty() {
            self.latencies_ns = other.latencies_ns;
        } else {
            self.latencies_ns.extend(other.latencies_ns);
        }
        self.errors += other.errors;
    }

    fn requests(&self) -> u64 {
        self.latencies_ns.len() as u64
    }

    fn signals(&mut self, seconds: f64) -> Signals {
        let p = percentiles(&mut self.latencies_ns);
        Signals::new(self.requests(), self.errors, seconds, p)
    }
}

/// The requests of one edge with one callee version and one proxy reason.
pub(crate) struct EdgeCell<M> {
    /// `None` for the entry point.
    pub source: Option<String>,
    pub target: String,
    pub target_kind: NodeKind,
    pub version: Option<String>,
    pub reason: Option<String>,
    pub measure: M,
}

/// A service's own requests of one version.
pub(crate) struct ServiceCell<M> {
    pub service: String,
    pub namespace: Option<String>,
    pub version: Option<String>,
    pub measure: M,
}

/// One node's or edge's cells summarised: the total, the versions (none when no cell
/// names one) and the requests per reason.
pub(crate) fn summarise<M: Measure>(
    cells: Vec<(Option<String>, Option<String>, M)>,
    seconds: f64,
) -> (Signals, Vec<VersionSignals>, BTreeMap<String, u64>) {
    let mut reasons = BTreeMap::new();
    let mut by_version: BTreeMap<Option<String>, M> = BTreeMap::new();
    for (version, reason, m) in cells {
        if let Some(r) = reason {
            *reasons.entry(r).or_insert(0) += m.requests();
        }
        by_version.entry(version).or_default().absorb(m);
    }
    let versioned = by_version.keys().any(Option::is_some);
    if by_version.len() == 1 {
        let Some((version, mut m)) = by_version.into_iter().next() else {
            return (Signals::default(), Vec::new(), reasons);
        };
        let signals = m.signals(seconds);
        let versions = version
            .map(|version| {
                vec![VersionSignals {
                    version,
                    signals: signals.clone(),
                }]
            })
            .unwrap_or_default();
        return (signals, versions, reasons);
    }
    let mut versions = Vec::with_capacity(by_version.len());
    let mut total = M::default();
    for (version, mut m) in by_version {
        if versioned {
            versions.push(VersionSignals {
                version: version.unwrap_or_else(|| UNKNOWN_VERSION.to_string()),
                signals: m.signals(seconds),
            });
        }
        total.absorb(m);
    }
    versions.sort_by(|a, b| {
        b.signals
            .requests
            .cmp(&a.signals.requests)
            .then_with(|| a.version.cmp(&b.version))
    });
    (total.signals(seconds), versions, reasons)
}

/// p50, p95 and p99 of `values` (reordered), interpolated as `percentile_cont`.
pub(crate) fn percentiles(values: &mut [i64]) -> [f64; 3] {
    let n = values.len();
    if n == 0 {
        return [0.0; 3];
    }
    let mut out = [0.0; 3];
    // Each selection leaves everything at or above its rank to its right, so the next,
    // higher rank is looked for only there.
    let mut from = 0;
    for (o, p) in out.iter_mut().zip([0.5, 0.95, 0.99]) {
        let rank = p * (n - 1) as f64;
        let lo = rank.floor() as usize;
        let (_, at, right) = values[from..].select_nth_unstable(lo - from);
        let a = *at;
        let b = if rank > lo as f64 {
            right.iter().copied().min().unwrap_or(a)
        } else {
            a
        };
        *o = a as f64 + (b - a) as f64 * (rank - lo as f64);
        from = lo;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The selection gives what sorting and interpolating gives.
    #[test]
    fn percentiles_match_sorting() {
        let mut seed = 7u64;
        for n in [1usize, 2, 3, 10, 101, 1000, 4097] {
            let values: Vec<i64> = (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 40) as i64 % 5000
                })
                .collect();
            let mut sorted = values.clone();
            sorted.sort_unstable();
            let want = [0.5, 0.95, 0.99].map(|p| {
                let rank = p * (n - 1) as f64;
                let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
                sorted[lo] as f64 + (sorted[hi] - sorted[lo]) as f64 * (rank - lo as f64)
            });
            let mut v = values;
            assert_eq!(percentiles(&mut v), want, "n = {n}");
        }
        assert_eq!(percentiles(&mut []), [0.0; 3]);
    }
}
