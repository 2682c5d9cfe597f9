//! What crosses a rule's threshold now: the golden signals of services and edges come from
//! the query crate's own service graph (`meshscope_query::analysis::graph`), and those of
//! endpoints from the same query `signals::service` runs, so an alert sees exactly the
//! numbers `/api/v1/graph` and `/api/v1/services[/{name}]` show for the same window. Evidence (up to 5
//! exemplar trace ids of failing or slow requests) is a SQL query over `spans`.
//!
//! One [`Observer`] lives for one evaluation and computes each window's graph once, however
//! many rules look at it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use meshscope_query::analysis::graph::{ComputedFrom, ServiceGraph, Signals};
use meshscope_query::analysis::range::{TimeRange, sql_str};
use meshscope_query::analysis::signals;
use meshscope_query::api::to_json;
use meshscope_query::{QueryEngine, QueryError};
use serde_json::Value;

use crate::eval::{Evidence, Observation};
use crate::rule::{Kind, Op, Rule, Scope, Signal, Structural, Threshold};
use crate::structural::{self, EdgeKey};

/// Exemplars per alert.
pub const EXEMPLARS: usize = 5;

type Key = (i64, i64);

fn key(r: &TimeRange) -> Key {
    (
        r.start.timestamp_nanos_opt().unwrap_or(0),
        r.end.timestamp_nanos_opt().unwrap_or(0),
    )
}

/// The windows `[now - w, now)` and the one before it.
fn windows(now: DateTime<Utc>, w: Duration) -> (TimeRange, TimeRange) {
    let w = chrono::Duration::from_std(w).unwrap_or(chrono::Duration::minutes(5));
    (
        TimeRange {
            start: now - w,
            end: now,
        },
        TimeRange {
            start: now - w - w,
            end: now - w,
        },
    )
}

/// Raw spans for windows up to an hour, per-minute rollups past that (percentiles within
/// 1%), as the API chooses by default.
fn path(range: &TimeRange) -> ComputedFrom {
    ComputedFrom::choose(None, range).unwrap_or(ComputedFrom::Spans)
}

/// Signals from a JSON answer of the analysis API.
fn signals_of(e: &Value) -> Signals {
    let f = |k: &str| e[k].as_f64().unwrap_or(0.0);
    Signals {
        requests: e["requests"].as_u64().unwrap_or(0),
        errors: e["errors"].as_u64().unwrap_or(0),
        error_rate: f("error_rate"),
        rate: f("rate"),
        p50_ms: f("p50_ms"),
        p95_ms: f("p95_ms"),
        p99_ms: f("p99_ms"),
    }
}

/// Computes observations for rules, caching each window's graph.
pub struct Observer<'a> {
    engine: &'a QueryEngine,
    graphs: HashMap<Key, ServiceGraph>,
    services: HashMap<Key, Vec<(String, Signals)>>,
    endpoints: HashMap<(Key, String), Vec<(String, Signals)>>,
}

impl<'a> Observer<'a> {
    pub fn new(engine: &'a QueryEngine) -> Self {
        Observer {
            engine,
            graphs: HashMap::new(),
            services: HashMap::new(),
            endpoints: HashMap::new(),
        }
    }

    async fn graph(&mut self, range: &TimeRange) -> Result<&ServiceGraph, QueryError> {
        let k = key(range);
        if !self.graphs.contains_key(&k) {
            let g = ServiceGraph::compute_by(self.engine, range, path(range)).await?;
            self.graphs.insert(k, g);
        }
        self.graphs
            .get(&k)
            .ok_or_else(|| QueryError::Internal("graph cache".into()))
    }

    /// Every service's own signals (its SERVER and CONSUMER spans), as
    /// `GET /api/v1/services` computes them: no pairing needed.
    async fn services(&mut self, range: &TimeRange) -> Result<Vec<(String, Signals)>, QueryError> {
        let k = key(range);
        if let Some(v) = self.services.get(&k) {
            return Ok(v.clone());
        }
        let list: Vec<(String, Signals)> = signals::services(self.engine, range, path(range))
            .await?
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|e| {
                        (
                            e["name"].as_str().unwrap_or_default().to_string(),
                            signals_of(e),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.services.insert(k, list.clone());
        Ok(list)
    }

    async fn endpoint_signals(
        &mut self,
        range: &TimeRange,
        service: &str,
    ) -> Result<Vec<(String, Signals)>, QueryError> {
        let k = (key(range), service.to_string());
        if let Some(v) = self.endpoints.get(&k) {
            return Ok(v.clone());
        }
        // The endpoint query of `signals::service` (`GET /api/v1/services/{name}`), alone:
        // that function also computes the graph, the per-minute series and saturation,
        // which an endpoint rule does not need.
        let sql = format!(
            "SELECT {endpoint} AS endpoint, count(*) AS requests,
                    sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) AS errors,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ns) AS p50_ns,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ns) AS p95_ns,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ns) AS p99_ns
             FROM spans WHERE {} AND service_name = {} AND {served}
             GROUP BY 1",
            range.sql("start_time"),
            sql_str(service),
            endpoint = meshscope_query::analysis::signals::ENDPOINT_SQL,
            served = meshscope_query::analysis::signals::SERVED_SQL,
        );
        let seconds = range.seconds();
        let round3 = |v: f64| (v * 1000.0).round() / 1000.0;
        let list: Vec<(String, Signals)> = json_rows(self.engine, &sql)
            .await?
            .iter()
            .map(|r| {
                let f = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(0.0);
                let requests = r.get("requests").and_then(Value::as_u64).unwrap_or(0);
                let errors = r.get("errors").and_then(Value::as_u64).unwrap_or(0);
                (
                    r.get("endpoint")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    Signals {
                        requests,
                        errors,
                        error_rate: if requests == 0 {
                            0.0
                        } else {
                            errors as f64 / requests as f64
                        },
                        rate: round3(requests as f64 / seconds),
                        p50_ms: round3(f("p50_ns") / 1e6),
                        p95_ms: round3(f("p95_ns") / 1e6),
                        p99_ms: round3(f("p99_ns") / 1e6),
                    },
                )
            })
            .collect();
        self.endpoints.insert(k, list.clone());
        Ok(list)
    }

    /// The instances of `rule` that cross now, with their evidence.
    pub async fn observe(
        &mut self,
        rule: &Rule,
        now: DateTime<Utc>,
    ) -> Result<Vec<Observation>, QueryError> {
        match &rule.kind {
            Kind::Threshold(t) => self.threshold(t, now).await,
            Kind::Sql(sql) => sql_rule(self.engine, sql).await,
            Kind::Structural(s) => self.structural(s, now).await,
        }
    }

    /// Every instance of the scope with its signals now and in the window before.
    async fn instances(
        &mut self,
        t: &Threshold,
        cur: &TimeRange,
        prev: &TimeRange,
    ) -> Result<Vec<(BTreeMap<String, String>, Signals, Signals)>, QueryError> {
        // Rates that fall are seen against the window before, and a target that is gone
        // has a rate of 0, so those rules look at the previous window's instances too.
        let falling = t.signal == Signal::RateDrop || matches!(t.op, Op::Lt | Op::Le);
        let mut out: BTreeMap<BTreeMap<String, String>, (Signals, Signals)> = BTreeMap::new();
        let label = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        match &t.scope {
            Scope::Service(only) => {
                for (i, range) in [cur, prev].into_iter().enumerate() {
                    if i == 1 && !falling {
                        break;
                    }
                    for (name, signals) in self.services(range).await? {
                        if only.as_ref().is_some_and(|s| *s != name) {
                            continue;
                        }
                        let e = out.entry(label(&[("service", &name)])).or_default();
                        if i == 0 {
                            e.0 = signals;
                        } else {
                            e.1 = signals;
                        }
                    }
                }
                if let Some(s) = only
                    && falling
                {
                    out.entry(label(&[("service", s)])).or_default();
                }
            }
            Scope::Edge { source, target } => {
                for (i, range) in [cur, prev].into_iter().enumerate() {
                    if i == 1 && !falling {
                        break;
                    }
                    let g = self.graph(range).await?;
                    for e in g.graph.edge_weights() {
                        if source.as_ref().is_some_and(|s| *s != e.source)
                            || target.as_ref().is_some_and(|t| *t != e.target)
                        {
                            continue;
                        }
                        let entry = out
                            .entry(label(&[("source", &e.source), ("target", &e.target)]))
                            .or_default();
                        if i == 0 {
                            entry.0 = e.signals.clone();
                        } else {
                            entry.1 = e.signals.clone();
                        }
                    }
                }
                if let (Some(s), Some(tg)) = (source, target)
                    && falling
                {
                    out.entry(label(&[("source", s), ("target", tg)]))
                        .or_default();
                }
            }
            Scope::Endpoint { service, endpoint } => {
                for (i, range) in [cur, prev].into_iter().enumerate() {
                    if i == 1 && !falling {
                        break;
                    }
                    for (name, s) in self.endpoint_signals(range, service).await? {
                        if endpoint.as_ref().is_some_and(|e| *e != name) {
                            continue;
                        }
                        let entry = out
                            .entry(label(&[("service", service), ("endpoint", &name)]))
                            .or_default();
                        if i == 0 {
                            entry.0 = s;
                        } else {
                            entry.1 = s;
                        }
                    }
                }
                if let Some(e) = endpoint
                    && falling
                {
                    out.entry(label(&[("service", service), ("endpoint", e)]))
                        .or_default();
                }
            }
        }
        Ok(out.into_iter().map(|(l, (c, p))| (l, c, p)).collect())
    }

    async fn threshold(
        &mut self,
        t: &Threshold,
        now: DateTime<Utc>,
    ) -> Result<Vec<Observation>, QueryError> {
        let (cur, prev) = windows(now, t.window);
        let mut out = Vec::new();
        for (labels, now_s, before) in self.instances(t, &cur, &prev).await? {
            let value = match t.signal {
                Signal::ErrorRate => now_s.error_rate,
                Signal::P50 => now_s.p50_ms,
                Signal::P95 => now_s.p95_ms,
                Signal::P99 => now_s.p99_ms,
                Signal::Rate => now_s.rate,
                Signal::Requests => now_s.requests as f64,
                Signal::Errors => now_s.errors as f64,
                Signal::RateDrop => {
                    if before.requests == 0 || before.requests < t.min_requests {
                        continue;
                    }
                    1.0 - now_s.requests as f64 / before.requests as f64
                }
            };
            if t.signal != Signal::RateDrop && now_s.requests < t.min_requests {
                continue;
            }
            if !t.op.holds(value, t.threshold) {
                continue;
            }
            let exemplar_trace_ids =
                exemplars(self.engine, &t.scope, &labels, t.signal, value, &cur)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "finding exemplar traces failed");
                        Vec::new()
                    });
            out.push(Observation {
                labels,
                evidence: Evidence {
                    value: Some(value),
                    threshold: Some(t.threshold),
                    signal: t.signal.name().to_string(),
                    exemplar_trace_ids,
                },
            });
        }
        Ok(out)
    }

    async fn structural(
        &mut self,
        s: &Structural,
        now: DateTime<Utc>,
    ) -> Result<Vec<Observation>, QueryError> {
        let (cur, prev) = windows(now, s.window);
        let current = structural::edge_set(self.graph(&cur).await?);
        let previous = structural::edge_set(self.graph(&prev).await?);
        let mut out = Vec::new();
        for e in structural::changes(s, &previous, &current) {
            let (range, graph_range) = match s.change {
                crate::rule::Change::EdgeVanished => (prev, prev),
                _ => (cur, cur),
            };
            let requests = self
                .graph(&graph_range)
                .await?
                .graph
                .edge_weights()
                .find(|w| w.source == e.source && w.target == e.target)
                .map(|w| w.signals.requests)
                .unwrap_or(0);
            let labels: BTreeMap<String, String> = [
                ("source".to_string(), e.source.clone()),
                ("target".to_string(), e.target.clone()),
                (
                    "target_kind".to_string(),
                    if e.target_virtual {
                        "virtual"
                    } else {
                        "service"
                    }
                    .to_string(),
                ),
            ]
            .into();
            let exemplar_trace_ids = edge_exemplars(self.engine, &e, &range, None)
                .await
                .unwrap_or_default();
            out.push(Observation {
                labels,
                evidence: Evidence {
                    value: Some(requests as f64),
                    threshold: None,
                    signal: s.change.name().to_string(),
                    exemplar_trace_ids,
                },
            });
        }
        Ok(out)
    }
}

/// The rows of a query as JSON objects.
async fn json_rows(
    engine: &QueryEngine,
    sql: &str,
) -> Result<Vec<serde_json::Map<String, Value>>, QueryError> {
    let result = engine.sql(sql).await?;
    let json = to_json(&result).map_err(|e| QueryError::Internal(e.to_string()))?;
    let names: Vec<String> = result
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    Ok(json["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    names
                        .iter()
                        .cloned()
                        .zip(row.as_array().cloned().unwrap_or_default())
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default())
}

fn trace_ids(rows: Vec<serde_json::Map<String, Value>>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in rows {
        if let Some(id) = r.get("trace_id").and_then(Value::as_str)
            && !out.iter().any(|x| x == id)
        {
            out.push(id.to_string());
        }
    }
    out.truncate(EXEMPLARS);
    out
}

/// What makes a request evidence: an error, or at least the percentile's latency.
fn condition(signal: Signal, value: f64, status: &str, duration: &str) -> (String, String) {
    if signal.is_latency() {
        let ns = (value * 1e6).floor() as i64;
        (format!("{duration} >= {ns}"), format!("{duration} DESC"))
    } else if matches!(signal, Signal::ErrorRate | Signal::Errors) {
        (status.to_string(), "start_time DESC".into())
    } else {
        ("TRUE".into(), "start_time DESC".into())
    }
}

/// Up to 5 trace ids of the failing or slow requests of an instance.
async fn exemplars(
    engine: &QueryEngine,
    scope: &Scope,
    labels: &BTreeMap<String, String>,
    signal: Signal,
    value: f64,
    range: &TimeRange,
) -> Result<Vec<String>, QueryError> {
    if signal == Signal::RateDrop || value == 0.0 && signal.is_latency() {
        return Ok(Vec::new());
    }
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    match scope {
        Scope::Service(_) | Scope::Endpoint { .. } => {
            let (cond, order) = condition(signal, value, "status_code = 'ERROR'", "duration_ns");
            let endpoint = match scope {
                Scope::Endpoint { .. } => format!(
                    " AND {} = {}",
                    meshscope_query::analysis::signals::ENDPOINT_SQL,
                    sql_str(&get("endpoint"))
                ),
                _ => String::new(),
            };
            let sql = format!(
                "SELECT trace_id, start_time, duration_ns FROM spans
                 WHERE {} AND service_name = {} AND {served}{endpoint} AND {cond}
                 ORDER BY {order} LIMIT {}",
                range.sql("start_time"),
                sql_str(&get("service")),
                EXEMPLARS * 4,
                served = meshscope_query::analysis::signals::SERVED_SQL,
            );
            Ok(trace_ids(json_rows(engine, &sql).await?))
        }
        Scope::Edge { .. } => {
            let e = EdgeKey {
                source: get("source"),
                target: get("target"),
                target_virtual: false,
            };
            edge_exemplars(engine, &e, range, Some((signal, value))).await
        }
    }
}

/// Up to 5 trace ids of requests on an edge (failing or slow ones when a signal says so):
/// requests the graph counted on it, from its own pairing (`pairing::edge_exemplars`).
async fn edge_exemplars(
    engine: &QueryEngine,
    e: &EdgeKey,
    range: &TimeRange,
    signal: Option<(Signal, f64)>,
) -> Result<Vec<String>, QueryError> {
    let (signal, value) = signal.unwrap_or((Signal::Requests, 0.0));
    let mut found =
        meshscope_query::analysis::pairing::edge_exemplars(engine, range, &e.source, &e.target)
            .await?;
    let ns = (value * 1e6).floor() as i64;
    found.retain(|x| {
        if signal.is_latency() {
            x.latency_ns >= ns
        } else if matches!(signal, Signal::ErrorRate | Signal::Errors) {
            x.error
        } else {
            true
        }
    });
    if signal.is_latency() {
        found.sort_by_key(|x| std::cmp::Reverse(x.latency_ns));
    } else {
        found.sort_by_key(|x| std::cmp::Reverse(x.minute));
    }
    let mut out: Vec<String> = Vec::new();
    for x in found {
        if !out.contains(&x.trace_id) {
            out.push(x.trace_id);
        }
        if out.len() == EXEMPLARS {
            break;
        }
    }
    Ok(out)
}

fn label_name(column: &str) -> String {
    let mut s: String = column
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if s.chars().next().is_none_or(|c| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// A SQL rule: every row is an instance; its columns are labels, except `value` (the
/// evidence's value) and `trace_id` / `exemplar_trace_ids` (its exemplars).
pub async fn sql_rule(engine: &QueryEngine, sql: &str) -> Result<Vec<Observation>, QueryError> {
    let mut out = Vec::new();
    for row in json_rows(engine, sql).await? {
        let mut labels = BTreeMap::new();
        let mut evidence = Evidence {
            signal: "sql".into(),
            ..Default::default()
        };
        for (col, v) in row {
            match col.as_str() {
                "value" => {
                    evidence.value = v
                        .as_f64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                }
                "trace_id" => evidence.exemplar_trace_ids.extend(text(&v)),
                "exemplar_trace_ids" => match &v {
                    Value::Array(ids) => evidence
                        .exemplar_trace_ids
                        .extend(ids.iter().filter_map(text)),
                    other => evidence.exemplar_trace_ids.extend(text(other)),
                },
                _ => {
                    if let Some(t) = text(&v) {
                        labels.insert(label_name(&col), t);
                    }
                }
            }
        }
        evidence.exemplar_trace_ids.truncate(EXEMPLARS);
        out.push(Observation { labels, evidence });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_names_become_label_names() {
        assert_eq!(label_name("service_name"), "service_name");
        assert_eq!(label_name("count(*)"), "count___");
        assert_eq!(label_name("1x"), "_1x");
    }
}
