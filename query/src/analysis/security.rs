//! Security on each edge: how much of its traffic was mutual TLS, which identities its
//! certificates proved, and what authorization refused.
//!
//! | field | from request metrics (Istio, meshscope's proxy) | else from access logs |
//! | --- | --- | --- |
//! | `mtls_ratio` | `connection_security_policy` = `mutual_tls` over `mutual_tls` + `none` (the source side's report where there is one; `unknown`, answered before any connection, is left out) | outbound records' `connection_security_policy` |
//! | `client_identities` / `server_identities` | `source_principal` / `destination_principal` | the same keys |
//! | `denied` / `would_deny` | the callee side's `authz` = `deny` / `would-deny` | inbound records' `authz` |
//!
//! The access logs also fill the graph's edges the metrics say nothing about (a proxy that
//! writes access logs only, beside ones that report metrics). With neither, the proxies' spans (`meshscope.tls`, `meshscope.peer_identity`,
//! `meshscope.authz`) give the same. `mtls_ratio` is `null` when no source says (no proxy that reports it on that edge).
//! Counters are read as increases over the range, as for the edges themselves.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::mesh_edges::{POINT_COLUMNS, increase};
use super::range::TimeRange;
use super::typed;
use crate::engine::{QueryEngine, QueryError};

/// What the graph's edge says about security.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EdgeSecurity {
    /// Share of requests over mutual TLS, 0–1; `null` when no source says.
    pub mtls_ratio: Option<f64>,
    /// SPIFFE IDs the callers' certificates proved.
    pub client_identities: Vec<String>,
    /// SPIFFE IDs the callee's certificates proved.
    pub server_identities: Vec<String>,
    /// Requests authorization refused (403 by the callee's proxy).
    pub denied: u64,
    /// Requests an audit-mode rule would have refused.
    pub would_deny: u64,
}

/// `(source service, target service)` → its security.
pub type SecurityByEdge = BTreeMap<(String, String), EdgeSecurity>;

#[derive(Debug, Default)]
struct Acc {
    /// (mutual_tls, none) per reporter: 0 source, 1 destination.
    tls: [(f64, f64); 2],
    clients: BTreeSet<String>,
    servers: BTreeSet<String>,
    denied: f64,
    would_deny: f64,
}

impl Acc {
    /// (mutual TLS, plaintext) requests: the source side's report where there is one.
    fn tls_counts(&self) -> (f64, f64) {
        if self.tls[0].0 + self.tls[0].1 > 0.0 {
            self.tls[0]
        } else {
            self.tls[1]
        }
    }

    fn merge(&mut self, other: Acc) {
        for (a, b) in self.tls.iter_mut().zip(other.tls) {
            a.0 += b.0;
            a.1 += b.1;
        }
        self.clients.extend(other.clients);
        self.servers.extend(other.servers);
        self.denied += other.denied;
        self.would_deny += other.would_deny;
    }

    fn finish(self) -> EdgeSecurity {
        let (m, n) = self.tls_counts();
        EdgeSecurity {
            mtls_ratio: (m + n > 0.0).then(|| super::round3(m / (m + n))),
            client_identities: self.clients.into_iter().collect(),
            server_identities: self.servers.into_iter().collect(),
            denied: self.denied.round() as u64,
            would_deny: self.would_deny.round() as u64,
        }
    }

    fn add(&mut self, reporter_is_source: bool, row: &Labels, n: f64) {
        let side = usize::from(!reporter_is_source);
        match row.policy.as_str() {
            "mutual_tls" => self.tls[side].0 += n,
            "none" => self.tls[side].1 += n,
            _ => {}
        }
        if n > 0.0 {
            for (set, p) in [
                (&mut self.clients, &row.client),
                (&mut self.servers, &row.server),
            ] {
                if let Some(p) = p.as_ref().filter(|p| p.starts_with("spiffe://")) {
                    set.insert(p.clone());
                }
            }
        }
        // What the callee's proxy decided (the caller's sees only the 403).
        if !reporter_is_source || row.reporter.is_empty() {
            match row.authz.as_str() {
                "deny" => self.denied += n,
                "would-deny" => self.would_deny += n,
                _ => {}
            }
        }
    }
}

#[derive(Debug, Clone, serde::Deserialize)]
struct Labels {
    src: String,
    dst: String,
    dst_workload: Option<String>,
    reporter: String,
    policy: String,
    client: Option<String>,
    server: Option<String>,
    authz: String,
}

/// (time, series start, value, delta): what [`increase`] reads.
type CounterPoint = (i64, i64, f64, bool);

#[derive(Debug, serde::Deserialize)]
struct MetricRow {
    #[serde(flatten)]
    labels: Labels,
    series: Option<String>,
    service_name: String,
    series_start: Option<i64>,
    t: i64,
    delta: Option<bool>,
    value: Option<f64>,
}

/// `(minute, source, target)` → what was counted (minute 0 when not by minute).
type Accs = BTreeMap<(i64, String, String), Acc>;

/// Minutes since the epoch, as the `m` column: the minute's start in nanoseconds.
fn minute_sql(column: &str, by_minute: bool) -> String {
    if by_minute {
        format!(
            "CAST(date_bin(INTERVAL '1 minute', {column}, TIMESTAMP '1970-01-01T00:00:00Z') AS BIGINT)"
        )
    } else {
        "CAST(0 AS BIGINT)".into()
    }
}

/// Keeps the edges, summed over minutes.
fn whole_range(accs: Accs) -> BTreeMap<(String, String), Acc> {
    let mut out: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for ((_, src, dst), a) in accs {
        out.entry((src, dst)).or_default().merge(a);
    }
    out
}

/// Per edge, from request metrics, else access logs, else the proxies' spans.
pub async fn by_edge(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<SecurityByEdge, QueryError> {
    let (accs, _) = first_source(engine, range, false).await?;
    Ok(whole_range(accs)
        .into_iter()
        .map(|(k, a)| (k, a.finish()))
        .collect())
}

/// Where the security of a range was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecuritySource {
    Metrics,
    AccessLogs,
    Spans,
    None,
}

/// The first source that says anything about the range: request metrics, access logs,
/// the proxies' spans.
async fn first_source(
    engine: &QueryEngine,
    range: &TimeRange,
    by_minute: bool,
) -> Result<(Accs, SecuritySource), QueryError> {
    let found = from_metrics(engine, range, by_minute).await?;
    if !found.is_empty() {
        return Ok((found, SecuritySource::Metrics));
    }
    let found = from_access_logs(engine, range, by_minute).await?;
    if !found.is_empty() {
        return Ok((found, SecuritySource::AccessLogs));
    }
    let found = from_spans(engine, range, by_minute).await?;
    let source = if found.is_empty() {
        SecuritySource::None
    } else {
        SecuritySource::Spans
    };
    Ok((found, source))
}

/// One minute of an edge's (or the mesh's) security: requests by how they were secured
/// and by what authorization decided.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SecurityMinute {
    /// The minute's start, RFC 3339.
    pub time: String,
    pub mtls: u64,
    pub plaintext: u64,
    pub denied: u64,
    pub would_deny: u64,
}

/// `GET /api/v1/security/series`: per minute, the requests over mutual TLS and in
/// plaintext and the denials, of the edges from `source` to `target` (either may be left
/// out: every edge), with where it was read from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecuritySeries {
    pub source: Option<String>,
    pub target: Option<String>,
    pub computed_from: SecuritySource,
    pub minutes: Vec<SecurityMinute>,
}

pub async fn series(
    engine: &QueryEngine,
    range: &TimeRange,
    source: Option<&str>,
    target: Option<&str>,
) -> Result<SecuritySeries, QueryError> {
    let (accs, computed_from) = first_source(engine, range, true).await?;
    let mut minutes: BTreeMap<i64, SecurityMinute> = BTreeMap::new();
    for ((m, src, dst), a) in accs {
        if source.is_some_and(|s| s != src) || target.is_some_and(|t| t != dst) {
            continue;
        }
        let (mtls, plain) = a.tls_counts();
        let e = minutes.entry(m).or_default();
        e.mtls += mtls.round() as u64;
        e.plaintext += plain.round() as u64;
        e.denied += a.denied.round() as u64;
        e.would_deny += a.would_deny.round() as u64;
    }
    Ok(SecuritySeries {
        source: source.map(str::to_string),
        target: target.map(str::to_string),
        computed_from,
        minutes: minutes
            .into_iter()
            .map(|(m, mut v)| {
                v.time = chrono::DateTime::from_timestamp_nanos(m)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                v
            })
            .collect(),
    })
}

/// The request metrics' counters (`istio_requests_total`, `meshscope_requests_total`),
/// read as increases over the range or, `by_minute`, over each minute.
async fn from_metrics(
    engine: &QueryEngine,
    range: &TimeRange,
    by_minute: bool,
) -> Result<Accs, QueryError> {
    let start_ns = range.start.timestamp_nanos_opt().unwrap_or(0);
    let a = |k: &str| format!("attributes['{k}']");
    let sql = format!(
        "SELECT coalesce({scs}, {sw}) AS src,
                coalesce({dsn}, {dw}) AS dst, {dw} AS dst_workload,
                coalesce({rep}, '') AS reporter, coalesce({csp}, '') AS policy,
                {sp} AS client, {dp} AS server, coalesce({authz}, '') AS authz,
                {POINT_COLUMNS}
         FROM metrics
         WHERE {r} AND metric_name IN ('istio_requests_total', 'meshscope_requests_total')
           AND {sw} IS NOT NULL AND coalesce({dsn}, {dw}) IS NOT NULL
           AND ({csp} IS NOT NULL OR {authz} IS NOT NULL)
         ORDER BY t",
        scs = a("source_canonical_service"),
        sw = a("source_workload"),
        dsn = a("destination_service_name"),
        dw = a("destination_workload"),
        rep = a("reporter"),
        csp = a("connection_security_policy"),
        sp = a("source_principal"),
        dp = a("destination_principal"),
        authz = a("authz"),
        r = range.sql("time"),
    );
    let rows = typed::<MetricRow>(engine, &sql).await?;
    let mut services: HashMap<String, String> = HashMap::new();
    let mut series: HashMap<(String, i64), (Labels, Vec<CounterPoint>)> = HashMap::new();
    for r in rows {
        if let Some(w) = r
            .labels
            .dst_workload
            .as_ref()
            .filter(|w| **w != r.labels.dst)
        {
            services.insert(w.clone(), r.labels.dst.clone());
        }
        let key = (
            format!("{}|{}", r.service_name, r.series.unwrap_or_default()),
            r.series_start.unwrap_or(0),
        );
        let start = r.series_start.unwrap_or(0);
        series
            .entry(key)
            .or_insert_with(|| (r.labels.clone(), Vec::new()))
            .1
            .push((r.t, start, r.value.unwrap_or(0.0), r.delta.unwrap_or(false)));
    }
    let mut accs = Accs::new();
    for (labels, points) in series.into_values() {
        let src = services
            .get(&labels.src)
            .cloned()
            .unwrap_or(labels.src.clone());
        let counted = if by_minute {
            per_minute(&points, start_ns)
        } else {
            BTreeMap::from([(0, increase(&points, start_ns))])
        };
        for (m, n) in counted {
            accs.entry((m, src.clone(), labels.dst.clone()))
                .or_default()
                .add(labels.reporter != "destination", &labels, n);
        }
    }
    Ok(accs)
}

const MINUTE_NS: i64 = 60_000_000_000;

/// A counter series' increase in each minute its points fall in (ordered by time): a
/// delta series' points summed; a cumulative one's last value in the minute against the
/// last before it (or its first, or zero where the series started inside the range),
/// a drop read as a reset. The minutes sum to [`increase`] over the range.
fn per_minute(points: &[CounterPoint], range_start_ns: i64) -> BTreeMap<i64, f64> {
    let mut out: BTreeMap<i64, f64> = BTreeMap::new();
    let minute = |t: i64| t.div_euclid(MINUTE_NS) * MINUTE_NS;
    let Some(first) = points.first() else {
        return out;
    };
    if first.3 {
        for p in points {
            *out.entry(minute(p.0)).or_default() += p.2;
        }
        return out;
    }
    let mut before = if first.1 >= range_start_ns && first.1 > 0 {
        0.0 // the series started inside the range: it counted from zero
    } else {
        first.2
    };
    for group in points.chunk_by(|a, b| minute(a.0) == minute(b.0)) {
        let last = group.last().map_or(before, |p| p.2);
        let n = if last >= before { last - before } else { last };
        *out.entry(minute(group[0].0)).or_default() += n;
        before = last;
    }
    out
}

/// [`by_edge`], with the access logs read for `uncovered` edges too (edges the graph has
/// whose security the metrics do not give) — what the graph calls.
pub async fn by_edge_filling(
    engine: &QueryEngine,
    range: &TimeRange,
    uncovered: impl Fn(&SecurityByEdge) -> bool,
) -> Result<SecurityByEdge, QueryError> {
    let (accs, source) = first_source(engine, range, false).await?;
    let mut found: SecurityByEdge = whole_range(accs)
        .into_iter()
        .map(|(k, a)| (k, a.finish()))
        .collect();
    if source == SecuritySource::Metrics && uncovered(&found) {
        for (k, a) in whole_range(from_access_logs(engine, range, false).await?) {
            found.entry(k).or_insert_with(|| a.finish());
        }
    }
    Ok(found)
}

/// The last resort, for a mesh that sends only traces: the proxies' CLIENT spans
/// (`meshscope.tls`, the server's `meshscope.peer_identity`, `peer.service` as the callee)
/// and SERVER spans (the caller from its certificate, `meshscope.authz`).
async fn from_spans(
    engine: &QueryEngine,
    range: &TimeRange,
    by_minute: bool,
) -> Result<Accs, QueryError> {
    let sa = |k: &str| format!("span_attributes['{k}']");
    let sql = format!(
        "SELECT CASE WHEN span_kind = 'CLIENT' THEN service_name ELSE {src} END AS src,
                CASE WHEN span_kind = 'CLIENT' THEN {peer} ELSE service_name END AS dst,
                CAST(NULL AS VARCHAR) AS dst_workload,
                CASE WHEN span_kind = 'CLIENT' THEN '' ELSE 'destination' END AS reporter,
                CASE {tls} WHEN 'mtls' THEN 'mutual_tls' WHEN 'plaintext' THEN 'none' ELSE '' END AS policy,
                CASE WHEN span_kind = 'SERVER' THEN {pid} END AS client,
                CASE WHEN span_kind = 'CLIENT' THEN {pid} END AS server,
                coalesce({authz}, '') AS authz, span_kind = 'CLIENT' AS outbound, count(*) AS n,
                {m} AS m
         FROM spans
         WHERE {r} AND {tls} IS NOT NULL AND span_kind IN ('CLIENT', 'SERVER')
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 11",
        src = sa("meshscope.source_workload"),
        peer = sa("peer.service"),
        tls = sa("meshscope.tls"),
        pid = sa("meshscope.peer_identity"),
        authz = sa("meshscope.authz"),
        r = range.sql("start_time"),
        m = minute_sql("start_time", by_minute),
    );
    #[derive(Debug, serde::Deserialize)]
    struct SpanRow {
        src: Option<String>,
        dst: Option<String>,
        reporter: String,
        policy: String,
        client: Option<String>,
        server: Option<String>,
        authz: String,
        outbound: bool,
        n: i64,
        m: i64,
    }
    let mut accs = Accs::new();
    for r in typed::<SpanRow>(engine, &sql).await? {
        let (Some(src), Some(dst)) = (r.src, r.dst) else {
            continue;
        };
        let labels = Labels {
            src: src.clone(),
            dst: dst.clone(),
            dst_workload: None,
            reporter: r.reporter,
            policy: r.policy,
            client: r.client,
            server: r.server,
            authz: if r.outbound { String::new() } else { r.authz },
        };
        accs.entry((r.m, src, dst))
            .or_default()
            .add(r.outbound, &labels, r.n as f64);
    }
    Ok(accs)
}

#[derive(Debug, serde::Deserialize)]
struct LogRow {
    #[serde(flatten)]
    labels: Labels,
    direction: String,
    n: i64,
    m: i64,
}

async fn from_access_logs(
    engine: &QueryEngine,
    range: &TimeRange,
    by_minute: bool,
) -> Result<Accs, QueryError> {
    let la = |k: &str| format!("log_attributes['{k}']");
    let sql = format!(
        "SELECT coalesce({sw}, {down}) AS src, coalesce({dsn}, {dw}) AS dst, {dw} AS dst_workload,
                coalesce({dir}, '') AS direction, '' AS reporter, coalesce({csp}, '') AS policy,
                {sp} AS client, {dp} AS server, coalesce({authz}, '') AS authz, count(*) AS n,
                {m} AS m
         FROM logs
         WHERE {r} AND {csp} IS NOT NULL AND coalesce({sw}, {down}) IS NOT NULL
           AND coalesce({dsn}, {dw}) IS NOT NULL
         GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 11",
        sw = la("source_workload"),
        down = la("downstream_workload"),
        dsn = la("destination_service_name"),
        dw = la("destination_workload"),
        dir = la("direction"),
        csp = la("connection_security_policy"),
        sp = la("source_principal"),
        dp = la("destination_principal"),
        authz = la("authz"),
        r = range.sql("time"),
        m = minute_sql("time", by_minute),
    );
    let rows = typed::<LogRow>(engine, &sql).await?;
    let services: HashMap<String, String> = rows
        .iter()
        .filter_map(|r| {
            let w = r
                .labels
                .dst_workload
                .as_ref()
                .filter(|w| **w != r.labels.dst)?;
            Some((w.clone(), r.labels.dst.clone()))
        })
        .collect();
    let mut accs = Accs::new();
    for r in rows {
        let src = services
            .get(&r.labels.src)
            .cloned()
            .unwrap_or(r.labels.src.clone());
        let acc = accs.entry((r.m, src, r.labels.dst.clone())).or_default();
        let n = r.n as f64;
        if r.direction == "inbound" {
            // The callee's record: its authorization outcome; TLS only if no caller record.
            acc.add(false, &r.labels, n);
        } else {
            let mut l = r.labels.clone();
            l.authz.clear();
            acc.add(true, &l, n);
        }
    }
    Ok(accs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(policy: &str, client: Option<&str>, authz: &str, reporter: &str) -> Labels {
        Labels {
            src: "a".into(),
            dst: "b".into(),
            dst_workload: None,
            reporter: reporter.into(),
            policy: policy.into(),
            client: client.map(str::to_string),
            server: Some("spiffe://td/ns/x/sa/b".into()),
            authz: authz.into(),
        }
    }

    #[test]
    fn per_minute_increases_sum_to_the_ranges_and_read_a_drop_as_a_reset() {
        let m = MINUTE_NS;
        // A cumulative series older than the range: 10 at its start, 16 and 19 in minute
        // 0, 25 in minute 1, a restart to 4 in minute 2.
        let points: Vec<CounterPoint> = vec![
            (5, 1, 10.0, false),
            (m / 2, 1, 16.0, false),
            (m - 1, 1, 19.0, false),
            (m + 5, 1, 25.0, false),
            (2 * m + 5, 1, 4.0, false),
        ];
        let got = per_minute(&points, 2);
        assert_eq!(got, BTreeMap::from([(0, 9.0), (m, 6.0), (2 * m, 4.0)]));
        // Without the reset the minutes add up to the range's increase.
        let whole: f64 = per_minute(&points[..4], 2).values().sum();
        assert_eq!(whole, increase(&points[..4], 2));
        // A series that started inside the range counted from zero; a delta one sums.
        let fresh = [(m + 1, m, 3.0, false), (2 * m + 1, m, 5.0, false)];
        assert_eq!(
            per_minute(&fresh, 0),
            BTreeMap::from([(m, 3.0), (2 * m, 2.0)])
        );
        let delta = [(1, 0, 2.0, true), (2, 0, 3.0, true), (m, 0, 1.0, true)];
        assert_eq!(per_minute(&delta, 0), BTreeMap::from([(0, 5.0), (m, 1.0)]));
    }

    #[test]
    fn the_source_side_decides_the_ratio_and_the_callee_the_denials() {
        let mut acc = Acc::default();
        acc.add(
            true,
            &labels("mutual_tls", Some("spiffe://td/ns/x/sa/a"), "", "source"),
            3.0,
        );
        acc.add(true, &labels("none", None, "", "source"), 1.0);
        acc.add(true, &labels("unknown", None, "", "source"), 5.0);
        // The destination's own view (Istio reports twice) does not count twice.
        acc.add(
            false,
            &labels(
                "mutual_tls",
                Some("spiffe://td/ns/x/sa/a"),
                "deny",
                "destination",
            ),
            2.0,
        );
        acc.add(
            false,
            &labels("mutual_tls", Some("unknown"), "would-deny", "destination"),
            1.0,
        );
        let s = acc.finish();
        assert_eq!(s.mtls_ratio, Some(0.75));
        assert_eq!(s.client_identities, ["spiffe://td/ns/x/sa/a"]);
        assert_eq!(s.server_identities, ["spiffe://td/ns/x/sa/b"]);
        assert_eq!((s.denied, s.would_deny), (2, 1));
        assert_eq!(Acc::default().finish().mtls_ratio, None);
    }
}
