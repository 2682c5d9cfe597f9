//! Golden signals as Prometheus counters, in the style of the OpenTelemetry Collector's
//! `servicegraph` and `spanmetrics` connectors.
//!
//! A background task calls [`SpanCounters::advance`] every few seconds: it computes the
//! requests of the window since the last call (ending a delay (30 s by default) in the past,
//! so that both halves of a pair have usually arrived) with the graph's pairing, and adds
//! them to cumulative counters and histograms. The other half of a pair is looked for
//! [`PAIR_WINDOW`] either side of the window (not the graph's five minutes: this runs every
//! few seconds), so a SERVER span whose CLIENT parent started more than that earlier counts
//! as an entry here.
//!
//! Spans that arrive later than the delay are counted when they come: the spans table
//! says which minutes acknowledged writes touched (`TableStore::take_written_minutes`),
//! and a minute the counters had already counted is counted again and only what it gained
//! is added (per series, requests, failures and buckets; counters never go down, so a
//! late parent that turns an entry request into an edge request leaves the entry counted
//! too). Minutes more than [`LATE_WINDOW`] behind the counters are not recounted
//! (`meshscope_metrics_late_minutes_ignored_total`); at most [`LATE_PER_ADVANCE`] minute
//! is recounted per call, the rest on the next ones. The all-in-one `serve` sees late
//! arrivals in its own writes; a query node of split roles in the collectors' new files
//! (`TableStore::note_arrivals`), except on object storage.
//!
//! Series are bounded: at most [`MAX_SERIES`] of each family; past that, new label sets are
//! dropped and counted in `meshscope_metrics_series_dropped_total`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
    NoLabelSet,
};
use prometheus_client::metrics::MetricType;

use super::model::{NodeKind, USER};
use super::range::TimeRange;
use super::typed;
use crate::engine::{QueryEngine, QueryError};

/// How far behind "now" a window ends, by default.
pub const DEFAULT_DELAY: Duration = Duration::seconds(30);
/// How far either side of a window the counters look for the other half of a pair.
pub const PAIR_WINDOW: Duration = Duration::minutes(1);
/// How far behind the counters a late span's minute may be and still be counted.
pub const LATE_WINDOW: Duration = Duration::minutes(10);
/// The most late minutes counted again per [`SpanCounters::advance`] (each costs a pairing
/// of that minute and one either side, about what a tick's own window costs).
pub const LATE_PER_ADVANCE: usize = 1;
/// The most series one family holds.
pub const MAX_SERIES: usize = 10_000;
/// Histogram bucket bounds in seconds (the connectors' defaults).
pub const BUCKETS: &[f64] = &[
    0.002, 0.004, 0.006, 0.008, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.4, 2.0, 5.0, 10.0, 15.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    count: u64,
    failed: u64,
    sum_seconds: f64,
    buckets: Vec<u64>,
}

impl Histogram {
    fn add(&mut self, row: &CallRow) {
        self.count += row.n.max(0) as u64;
        self.failed += row.failed.unwrap_or(0).max(0) as u64;
        self.sum_seconds += row.sum_ns.unwrap_or(0) as f64 / 1e9;
        if self.buckets.is_empty() {
            self.buckets = vec![0; BUCKETS.len()];
        }
        for (b, n) in self.buckets.iter_mut().zip(&row.buckets) {
            *b += n.unwrap_or(0).max(0) as u64;
        }
    }

    fn merge(&mut self, other: &Histogram) {
        self.count += other.count;
        self.failed += other.failed;
        self.sum_seconds += other.sum_seconds;
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (b, o) in self.buckets.iter_mut().zip(&other.buckets) {
            *b += o;
        }
    }

    /// What `self` has beyond `before` (field by field, never negative).
    fn gain_over(&self, before: &Histogram) -> Histogram {
        Histogram {
            count: self.count.saturating_sub(before.count),
            failed: self.failed.saturating_sub(before.failed),
            sum_seconds: (self.sum_seconds - before.sum_seconds).max(0.0),
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, b)| b.saturating_sub(before.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// The larger of the two, field by field.
    fn max(&self, other: &Histogram) -> Histogram {
        let n = self.buckets.len().max(other.buckets.len());
        let at = |h: &Histogram, i: usize| h.buckets.get(i).copied().unwrap_or(0);
        Histogram {
            count: self.count.max(other.count),
            failed: self.failed.max(other.failed),
            sum_seconds: self.sum_seconds.max(other.sum_seconds),
            buckets: (0..n).map(|i| at(self, i).max(at(other, i))).collect(),
        }
    }

    fn add_requests(&mut self, latencies_ns: &[i64], failed: u64) {
        self.count += latencies_ns.len() as u64;
        self.failed += failed;
        if self.buckets.is_empty() {
            self.buckets = vec![0; BUCKETS.len()];
        }
        for &ns in latencies_ns {
            self.sum_seconds += ns as f64 / 1e9;
            for (b, bound) in self.buckets.iter_mut().zip(BUCKETS) {
                *b += u64::from(ns <= (bound * 1e9) as i64);
            }
        }
    }
}

/// (client, server, target kind)
type EdgeSeries = (String, String, String);
/// (service, span name, span kind, status)
type CallSeries = (String, String, String, String);

/// What a stretch of time holds, per series.
#[derive(Debug, Default, Clone)]
struct Counts {
    edges: BTreeMap<EdgeSeries, Histogram>,
    calls: BTreeMap<CallSeries, Histogram>,
}

impl Counts {
    fn merge(&mut self, other: &Counts) {
        for (k, h) in &other.edges {
            self.edges.entry(k.clone()).or_default().merge(h);
        }
        for (k, h) in &other.calls {
            self.calls.entry(k.clone()).or_default().merge(h);
        }
    }

    /// What `self` has beyond `before`, and the larger of both (what is counted now).
    fn gain_over(&self, before: &Counts) -> (Counts, Counts) {
        let mut gain = Counts::default();
        let mut now = before.clone();
        for (k, h) in &self.edges {
            let old = before.edges.get(k).cloned().unwrap_or_default();
            gain.edges.insert(k.clone(), h.gain_over(&old));
            now.edges.insert(k.clone(), h.max(&old));
        }
        for (k, h) in &self.calls {
            let old = before.calls.get(k).cloned().unwrap_or_default();
            gain.calls.insert(k.clone(), h.gain_over(&old));
            now.calls.insert(k.clone(), h.max(&old));
        }
        (gain, now)
    }
}

#[derive(Debug, Default)]
struct State {
    cursor: Option<DateTime<Utc>>,
    edges: BTreeMap<EdgeSeries, Histogram>,
    calls: BTreeMap<CallSeries, Histogram>,
    /// What each recent minute (since the epoch) has been counted with.
    counted: BTreeMap<i64, Counts>,
    /// Minutes already counted that received spans since, not recounted yet.
    late: std::collections::BTreeSet<i64>,
    dropped: u64,
    windows: u64,
    late_recounted: u64,
    late_ignored: u64,
}

impl State {
    /// Adds counts to the exposed totals, within the series limit.
    fn add(&mut self, counts: &Counts) {
        for (key, h) in &counts.edges {
            if self.edges.len() >= MAX_SERIES && !self.edges.contains_key(key) {
                self.dropped += 1;
                continue;
            }
            self.edges.entry(key.clone()).or_default().merge(h);
        }
        for (key, h) in &counts.calls {
            if self.calls.len() >= MAX_SERIES && !self.calls.contains_key(key) {
                self.dropped += 1;
                continue;
            }
            self.calls.entry(key.clone()).or_default().merge(h);
        }
    }
}

const MINUTE: i64 = 60;

/// The written minutes that received spans earlier than `t` (late for counters at `t`).
fn earlier_than(
    written: meshscope_storage::arrivals::Minutes,
    t: DateTime<Utc>,
) -> impl Iterator<Item = i64> {
    let t = t.timestamp_nanos_opt().unwrap_or(i64::MAX);
    written
        .into_iter()
        .filter(move |(_, earliest)| *earliest < t)
        .map(|(m, _)| m)
}

fn minute_start(m: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(m * MINUTE, 0).unwrap_or_default()
}

/// The requests (pairs, from the graph's pairing) and spans of `range`, per minute.
async fn tally(
    engine: &QueryEngine,
    range: &TimeRange,
) -> Result<BTreeMap<i64, Counts>, QueryError> {
    let mut out: BTreeMap<i64, Counts> = BTreeMap::new();
    for e in super::pairing::requests_by_minute_within(engine, range, PAIR_WINDOW).await? {
        let kind = match e.target_kind {
            NodeKind::Virtual => "virtual",
            _ => "service",
        };
        // The entry point is Tempo's `user` client.
        let client = e.source.unwrap_or_else(|| USER.to_string());
        out.entry(e.minute.timestamp().div_euclid(MINUTE))
            .or_default()
            .edges
            .entry((client, e.target, kind.to_string()))
            .or_default()
            .add_requests(&e.latencies_ns, e.errors);
    }
    let calls = typed::<CallRow>(
        engine,
        &format!(
            "SELECT CAST(date_bin(INTERVAL '1 minute', start_time, TIMESTAMP '1970-01-01T00:00:00Z') AS BIGINT) / 60000000000 AS minute,
                    service_name, span_name, span_kind, status_code, count(*) AS n,
                    sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) AS failed,
                    sum(duration_ns) AS sum_ns, make_array({}) AS buckets
             FROM spans WHERE {} GROUP BY 1, service_name, span_name, span_kind, status_code",
            bucket_columns("duration_ns"),
            range.sql("start_time")
        ),
    )
    .await?;
    for r in &calls {
        let key = (
            r.service_name.clone(),
            r.span_name.clone(),
            r.span_kind.clone(),
            r.status_code.clone(),
        );
        out.entry(r.minute)
            .or_default()
            .calls
            .entry(key)
            .or_default()
            .add(r);
    }
    Ok(out)
}

/// The cumulative counters behind `GET /metrics`.
#[derive(Debug)]
pub struct SpanCounters {
    state: Mutex<State>,
    delay: Duration,
}

impl Default for SpanCounters {
    fn default() -> Self {
        SpanCounters::new(DEFAULT_DELAY)
    }
}

/// One minute of one span series (service, name, kind, status) as the calls SQL returns it.
#[derive(Debug, serde::Deserialize)]
struct CallRow {
    minute: i64,
    service_name: String,
    span_name: String,
    span_kind: String,
    status_code: String,
    n: i64,
    failed: Option<i64>,
    sum_ns: Option<i64>,
    /// The spans at or under each of [`BUCKETS`], in order.
    buckets: Vec<Option<i64>>,
}

/// The cumulative bucket counts as SQL expressions, one per bound of [`BUCKETS`].
fn bucket_columns(expr: &str) -> String {
    BUCKETS
        .iter()
        .map(|b| {
            format!(
                "sum(CASE WHEN {expr} <= {} THEN 1 ELSE 0 END)",
                (b * 1e9) as i64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl SpanCounters {
    pub fn new(delay: Duration) -> Self {
        SpanCounters {
            state: Mutex::default(),
            delay,
        }
    }

    /// Counts the window from the last call to `now - delay`, and what arrived since for
    /// minutes already counted. The first call starts the counters at that point (like a
    /// connector started then).
    pub async fn advance(
        &self,
        engine: &QueryEngine,
        now: DateTime<Utc>,
    ) -> Result<(), QueryError> {
        let end = now - self.delay;
        let written = engine
            .storage()
            .table(meshscope_proto::Table::Spans)
            .take_written_minutes();
        let (start, late) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let start = match st.cursor {
                None => {
                    st.cursor = Some(end);
                    return Ok(());
                }
                Some(c) if c >= end => {
                    // Nothing new to count now: keep the late minutes for the next call.
                    st.late.extend(earlier_than(written, c));
                    return Ok(());
                }
                Some(c) => c,
            };
            // Writes of spans earlier than the cursor: their minute is counted already.
            st.late.extend(earlier_than(written, start));
            let oldest = (start - LATE_WINDOW).timestamp().div_euclid(MINUTE);
            let too_old = st.late.iter().take_while(|m| **m < oldest).count();
            st.late_ignored += too_old as u64;
            st.late = st.late.split_off(&oldest);
            let late: Vec<i64> = st.late.iter().copied().take(LATE_PER_ADVANCE).collect();
            for m in &late {
                st.late.remove(m);
            }
            (start, late)
        };
        let fresh = tally(engine, &TimeRange { start, end }).await?;
        let mut recounted = Vec::with_capacity(late.len());
        for m in late {
            // The part of the minute the counters have passed.
            let range = TimeRange {
                start: minute_start(m),
                end: minute_start(m + 1).min(start),
            };
            let counts = tally(engine, &range).await?.remove(&m).unwrap_or_default();
            recounted.push((m, counts));
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for (m, counts) in recounted {
            let before = st.counted.get(&m).cloned().unwrap_or_default();
            let (gain, now_counted) = counts.gain_over(&before);
            st.add(&gain);
            st.counted.insert(m, now_counted);
            st.late_recounted += 1;
        }
        for (m, counts) in fresh {
            st.add(&counts);
            st.counted.entry(m).or_default().merge(&counts);
        }
        let oldest = (end - LATE_WINDOW).timestamp().div_euclid(MINUTE);
        st.counted = st.counted.split_off(&oldest);
        st.cursor = Some(end);
        st.windows += 1;
        Ok(())
    }
}

/// A label value from traffic (a service or span name), escaped as the exposition format
/// wants (`\\`, `\"`, `\n`): `prometheus-client` writes label values as they are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Escaped<'a>(pub &'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// `traces_service_graph_*` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EdgeLabels<'a> {
    client: Escaped<'a>,
    server: Escaped<'a>,
    connection_type: &'static str,
}

impl EncodeLabelSet for EdgeLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        [
            ("client", self.client.clone()),
            ("server", self.server.clone()),
            ("connection_type", Escaped(self.connection_type)),
        ]
        .encode(encoder)
    }
}

/// `traces_span_metrics_*` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CallLabels<'a> {
    service_name: Escaped<'a>,
    span_name: Escaped<'a>,
    span_kind: String,
    status_code: String,
}

impl EncodeLabelSet for CallLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        [
            ("service_name", self.service_name.clone()),
            ("span_name", self.span_name.clone()),
            ("span_kind", Escaped(&self.span_kind)),
            ("status_code", Escaped(&self.status_code)),
        ]
        .encode(encoder)
    }
}

/// The exposition of the counters (`GET /metrics`), encoded by `prometheus-client` on
/// every scrape from the state as it is.
impl Collector for SpanCounters {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let edges: Vec<(EdgeLabels<'_>, &Histogram)> = st
            .edges
            .iter()
            .map(|((c, s, kind), h)| {
                let labels = EdgeLabels {
                    client: Escaped(c),
                    server: Escaped(s),
                    connection_type: conn(kind),
                };
                (labels, h)
            })
            .collect();
        let calls: Vec<(CallLabels<'_>, &Histogram)> = st
            .calls
            .iter()
            .map(|((svc, name, kind, status), h)| {
                let labels = CallLabels {
                    service_name: Escaped(svc),
                    span_name: Escaped(name),
                    span_kind: format!("SPAN_KIND_{kind}"),
                    status_code: format!("STATUS_CODE_{status}"),
                };
                (labels, h)
            })
            .collect();
        counters(
            &mut encoder,
            "traces_service_graph_request",
            "Requests between two nodes of the service graph.",
            edges.iter().map(|(l, h)| (l, h.count)),
        )?;
        counters(
            &mut encoder,
            "traces_service_graph_request_failed",
            "Failed requests between two nodes.",
            edges.iter().map(|(l, h)| (l, h.failed)),
        )?;
        histograms(
            &mut encoder,
            "traces_service_graph_request_client_seconds",
            "Latency of requests as the client sees it.",
            &edges,
        )?;
        counters(
            &mut encoder,
            "traces_span_metrics_calls",
            "Spans per service, name, kind and status.",
            calls.iter().map(|(l, h)| (l, h.count)),
        )?;
        histograms(
            &mut encoder,
            "traces_span_metrics_duration_seconds",
            "Span durations per service, name, kind and status.",
            &calls,
        )?;
        for (name, help, v) in [
            (
                "meshscope_metrics_series_dropped",
                "Label sets not kept because a family reached its series limit.",
                st.dropped,
            ),
            (
                "meshscope_metrics_windows",
                "Windows of spans counted into the golden-signal counters.",
                st.windows,
            ),
            (
                "meshscope_metrics_late_minutes_recounted",
                "Minutes counted again because spans for them arrived after they were counted.",
                st.late_recounted,
            ),
            (
                "meshscope_metrics_late_minutes_ignored",
                "Minutes that received spans too long after they were counted to count them.",
                st.late_ignored,
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        Ok(())
    }
}

/// One counter family (`name_total{labels} value`).
fn counters<'l, L: EncodeLabelSet + 'l>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl Iterator<Item = (&'l L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        family
            .encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

/// One histogram family over [`BUCKETS`] (and `+Inf`).
fn histograms<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(L, &Histogram)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        family
            .encode_family(labels)?
            .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.per_bucket(), None)?;
    }
    Ok(())
}

impl Histogram {
    /// Each bucket's own count (the encoder adds them up), the last one `+Inf`.
    fn per_bucket(&self) -> Vec<(f64, u64)> {
        let cumulative = |i: usize| self.buckets.get(i).copied().unwrap_or(0);
        let mut out = Vec::with_capacity(BUCKETS.len() + 1);
        let mut below = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            let c = cumulative(i).max(below);
            out.push((*bound, c - below));
            below = c;
        }
        out.push((f64::MAX, self.count.saturating_sub(below)));
        out
    }
}

fn conn(target_kind: &str) -> &'static str {
    if target_kind == "virtual" {
        "virtual_node"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn exposition(counters: SpanCounters) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(counters));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn families_are_encoded_with_escaped_labels_and_cumulative_buckets() {
        let counters = SpanCounters::default();
        {
            let mut st = counters.state.lock().unwrap();
            let mut h = Histogram::default();
            h.add_requests(&[3_000_000, 3_000_000, 20_000_000_000], 1);
            st.edges.insert(
                ("fr\"ont".into(), "db\nx".into(), "virtual".into()),
                h.clone(),
            );
            st.calls.insert(
                (
                    "cart".into(),
                    "GET /".into(),
                    "SERVER".into(),
                    "ERROR".into(),
                ),
                h,
            );
            st.windows = 4;
        }
        let out = exposition(counters);
        let edge = r#"client="fr\"ont",server="db\nx",connection_type="virtual_node""#;
        for line in [
            format!("traces_service_graph_request_total{{{edge}}} 3"),
            format!("traces_service_graph_request_failed_total{{{edge}}} 1"),
            format!("traces_service_graph_request_client_seconds_bucket{{le=\"0.002\",{edge}}} 0"),
            format!("traces_service_graph_request_client_seconds_bucket{{le=\"0.004\",{edge}}} 2"),
            format!("traces_service_graph_request_client_seconds_bucket{{le=\"15.0\",{edge}}} 2"),
            format!("traces_service_graph_request_client_seconds_bucket{{le=\"+Inf\",{edge}}} 3"),
            format!("traces_service_graph_request_client_seconds_count{{{edge}}} 3"),
            r#"traces_span_metrics_calls_total{service_name="cart",span_name="GET /",span_kind="SPAN_KIND_SERVER",status_code="STATUS_CODE_ERROR"} 3"#.to_string(),
            "# TYPE traces_span_metrics_duration_seconds histogram".to_string(),
            "meshscope_metrics_windows_total 4".to_string(),
            "# EOF".to_string(),
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
    }
}
