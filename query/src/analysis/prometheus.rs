//! Golden signals as Prometheus counters, in the style of the OpenTelemetry Collector's
//! `servicegraph` and `spanmetrics` connectors.
//!
//! A background task calls [`SpanCounters::advance`] every few seconds: it computes the
//! requests of the window since the last call (ending a delay (30 s by default) in the past,
//! so that both halves of a pair have usually arrived) with the graph's pairing, and adds
//! them to cumulative counters and histograms. The other half of a pair is looked for
//! [`PAIR_WINDOW`] either side of the window (not the graph's five minutes: this runs every
//! few seconds), so a SERVER span whose CLIENT parent started more than that earlier counts
//! as an entry here. Spans that arrive later than the delay are not counted here (they are
//! in SQL, the graph and the API).
//!
//! Series are bounded: at most [`MAX_SERIES`] of each family; past that, new label sets are
//! dropped and counted in `meshscope_metrics_series_dropped_total`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

use super::graph::NodeKind;
use super::range::TimeRange;
use super::{rows, str_of, u64_of};
use crate::engine::{QueryEngine, QueryError};

/// How far behind "now" a window ends, by default.
pub const DEFAULT_DELAY: Duration = Duration::seconds(30);
/// How far either side of a window the counters look for the other half of a pair.
pub const PAIR_WINDOW: Duration = Duration::minutes(1);
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
    fn add(&mut self, row: &serde_json::Map<String, serde_json::Value>) {
        self.count += u64_of(row, "n");
        self.failed += u64_of(row, "failed");
        self.sum_seconds += row.get("sum_ns").and_then(|v| v.as_f64()).unwrap_or(0.0) / 1e9;
        if self.buckets.is_empty() {
            self.buckets = vec![0; BUCKETS.len()];
        }
        for (i, b) in self.buckets.iter_mut().enumerate() {
            *b += u64_of(row, &format!("le{i}"));
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

#[derive(Debug, Default)]
struct State {
    cursor: Option<DateTime<Utc>>,
    edges: BTreeMap<(String, String, String), Histogram>,
    calls: BTreeMap<(String, String, String, String), Histogram>,
    dropped: u64,
    windows: u64,
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

fn bucket_columns(expr: &str) -> String {
    BUCKETS
        .iter()
        .enumerate()
        .map(|(i, b)| {
            format!(
                "sum(CASE WHEN {expr} <= {} THEN 1 ELSE 0 END) AS le{i}",
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

    /// Counts the window from the last call to `now - delay`. The first call starts the
    /// counters at that point (like a connector started then).
    pub async fn advance(
        &self,
        engine: &QueryEngine,
        now: DateTime<Utc>,
    ) -> Result<(), QueryError> {
        let end = now - self.delay;
        let start = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match st.cursor {
                None => {
                    st.cursor = Some(end);
                    return Ok(());
                }
                Some(c) if c >= end => return Ok(()),
                Some(c) => c,
            }
        };
        let range = TimeRange { start, end };
        let edges = super::pairing::requests_within(engine, &range, PAIR_WINDOW).await?;
        let calls = rows(
            engine,
            &format!(
                "SELECT service_name, span_name, span_kind, status_code, count(*) AS n,
                        sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) AS failed,
                        sum(duration_ns) AS sum_ns, {}
                 FROM spans WHERE {} GROUP BY service_name, span_name, span_kind, status_code",
                bucket_columns("duration_ns"),
                range.sql("start_time")
            ),
        )
        .await?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for e in edges {
            let kind = match e.target_kind {
                NodeKind::Virtual => "virtual",
                _ => "service",
            };
            // The entry point is Tempo's `user` client.
            let client = e.source.unwrap_or_else(|| super::graph::USER.to_string());
            let key = (client, e.target, kind.to_string());
            if st.edges.len() >= MAX_SERIES && !st.edges.contains_key(&key) {
                st.dropped += 1;
                continue;
            }
            st.edges
                .entry(key)
                .or_default()
                .add_requests(&e.latencies_ns, e.errors);
        }
        for r in &calls {
            let key = (
                str_of(r, "service_name"),
                str_of(r, "span_name"),
                str_of(r, "span_kind"),
                str_of(r, "status_code"),
            );
            if st.calls.len() >= MAX_SERIES && !st.calls.contains_key(&key) {
                st.dropped += 1;
                continue;
            }
            st.calls.entry(key).or_default().add(r);
        }
        st.cursor = Some(end);
        st.windows += 1;
        Ok(())
    }

    /// Appends the exposition of the counters to `out`.
    pub fn render(&self, out: &mut String) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            out,
            "# HELP traces_service_graph_request_total Requests between two nodes of the service graph."
        );
        let _ = writeln!(out, "# TYPE traces_service_graph_request_total counter");
        for ((c, s, kind), h) in &st.edges {
            let _ = writeln!(
                out,
                "traces_service_graph_request_total{{client={},server={},connection_type={}}} {}",
                q(c),
                q(s),
                q(conn(kind)),
                h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP traces_service_graph_request_failed_total Failed requests between two nodes."
        );
        let _ = writeln!(
            out,
            "# TYPE traces_service_graph_request_failed_total counter"
        );
        for ((c, s, kind), h) in &st.edges {
            let _ = writeln!(
                out,
                "traces_service_graph_request_failed_total{{client={},server={},connection_type={}}} {}",
                q(c),
                q(s),
                q(conn(kind)),
                h.failed
            );
        }
        let _ = writeln!(
            out,
            "# HELP traces_service_graph_request_client_seconds Latency of requests as the client sees it."
        );
        let _ = writeln!(
            out,
            "# TYPE traces_service_graph_request_client_seconds histogram"
        );
        for ((c, s, kind), h) in &st.edges {
            let labels = format!(
                "client={},server={},connection_type={}",
                q(c),
                q(s),
                q(conn(kind))
            );
            histogram(
                out,
                "traces_service_graph_request_client_seconds",
                &labels,
                h,
            );
        }
        let _ = writeln!(
            out,
            "# HELP traces_span_metrics_calls_total Spans per service, name, kind and status."
        );
        let _ = writeln!(out, "# TYPE traces_span_metrics_calls_total counter");
        for ((svc, name, kind, status), h) in &st.calls {
            let _ = writeln!(
                out,
                "traces_span_metrics_calls_total{{service_name={},span_name={},span_kind={},status_code={}}} {}",
                q(svc),
                q(name),
                q(&format!("SPAN_KIND_{kind}")),
                q(&format!("STATUS_CODE_{status}")),
                h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP traces_span_metrics_duration_seconds Span durations per service, name, kind and status."
        );
        let _ = writeln!(out, "# TYPE traces_span_metrics_duration_seconds histogram");
        for ((svc, name, kind, status), h) in &st.calls {
            let labels = format!(
                "service_name={},span_name={},span_kind={},status_code={}",
                q(svc),
                q(name),
                q(&format!("SPAN_KIND_{kind}")),
                q(&format!("STATUS_CODE_{status}"))
            );
            histogram(out, "traces_span_metrics_duration_seconds", &labels, h);
        }
        let _ = writeln!(
            out,
            "# HELP meshscope_metrics_series_dropped_total Label sets not kept because a family reached its series limit."
        );
        let _ = writeln!(out, "# TYPE meshscope_metrics_series_dropped_total counter");
        let _ = writeln!(out, "meshscope_metrics_series_dropped_total {}", st.dropped);
        let _ = writeln!(
            out,
            "# HELP meshscope_metrics_windows_total Windows of spans counted into the golden-signal counters."
        );
        let _ = writeln!(out, "# TYPE meshscope_metrics_windows_total counter");
        let _ = writeln!(out, "meshscope_metrics_windows_total {}", st.windows);
    }
}

fn conn(target_kind: &str) -> &'static str {
    if target_kind == "virtual" {
        "virtual_node"
    } else {
        ""
    }
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    for (i, b) in BUCKETS.iter().enumerate() {
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"{b}\"}} {}",
            h.buckets.get(i).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

/// A quoted, escaped Prometheus label value.
pub fn q(v: &str) -> String {
    format!(
        "\"{}\"",
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(q("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    }

    #[test]
    fn histogram_lines_are_cumulative_with_inf() {
        let mut h = Histogram {
            count: 3,
            failed: 1,
            sum_seconds: 0.5,
            buckets: vec![0; BUCKETS.len()],
        };
        h.buckets[4] = 2;
        let mut out = String::new();
        histogram(&mut out, "x", "a=\"b\"", &h);
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.01\"} 2"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3"));
        assert!(out.contains("x_count{a=\"b\"} 3"));
    }
}
