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
use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use meshscope_query::analysis::graph::{ComputedFrom, ServiceGraph, Signals};
use meshscope_query::analysis::range::TimeRange;
use meshscope_query::analysis::signals;
use meshscope_query::analysis::typed_with;
use meshscope_query::{Params, QueryEngine, QueryError};

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
            .into_iter()
            .map(|s| (s.name, s.signals))
            .collect();
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
        // The endpoints of `GET /api/v1/services/{name}`, alone: `signals::service` also
        // computes the graph, the per-minute series and saturation, which an endpoint rule
        // does not need.
        let list = signals::endpoints(self.engine, range, service).await?;
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
                    for e in g.edges() {
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

    /// `plaintext-edge` and `denied-requests`: the current window's edges.
    async fn security(
        &mut self,
        s: &Structural,
        cur: TimeRange,
    ) -> Result<Vec<Observation>, QueryError> {
        let found = structural::security_findings(s, self.graph(&cur).await?);
        let mut out = Vec::new();
        for (e, value) in found {
            let labels: BTreeMap<String, String> = [
                ("source".to_string(), e.source.clone()),
                ("target".to_string(), e.target.clone()),
            ]
            .into();
            let exemplar_trace_ids = edge_exemplars(self.engine, &e, &cur, None)
                .await
                .unwrap_or_default();
            out.push(Observation {
                labels,
                evidence: Evidence {
                    value: Some(value),
                    threshold: None,
                    signal: s.change.name().to_string(),
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
        if matches!(
            s.change,
            crate::rule::Change::PlaintextEdge | crate::rule::Change::DeniedRequests
        ) {
            return self.security(s, cur).await;
        }
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
                .edges()
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

/// The distinct trace ids of exemplar rows, at most [`EXEMPLARS`], in order.
async fn trace_ids(
    engine: &QueryEngine,
    sql: &str,
    params: Params,
) -> Result<Vec<String>, QueryError> {
    #[derive(serde::Deserialize)]
    struct Row {
        trace_id: String,
    }
    let mut out: Vec<String> = Vec::new();
    for r in typed_with::<Row>(engine, sql, params).await? {
        if !out.contains(&r.trace_id) {
            out.push(r.trace_id);
        }
    }
    out.truncate(EXEMPLARS);
    Ok(out)
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
            let mut params = Params::default();
            let service = params.bind(get("service"));
            let endpoint = match scope {
                Scope::Endpoint { .. } => format!(
                    " AND {} = {}",
                    meshscope_query::analysis::signals::ENDPOINT_SQL,
                    params.bind(get("endpoint"))
                ),
                _ => String::new(),
            };
            let sql = format!(
                "SELECT trace_id FROM spans
                 WHERE {} AND service_name = {service} AND {served}{endpoint} AND {cond}
                 ORDER BY {order} LIMIT {}",
                range.sql("start_time"),
                EXEMPLARS * 4,
                served = meshscope_query::analysis::signals::SERVED_SQL,
            );
            trace_ids(engine, &sql, params).await
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

/// A SQL rule: every row is an instance; its columns are labels, except `value` (the
/// evidence's value) and `trace_id` / `exemplar_trace_ids` (its exemplars).
pub async fn sql_rule(engine: &QueryEngine, sql: &str) -> Result<Vec<Observation>, QueryError> {
    let result = engine.sql(sql).await?;
    let mut out = Vec::new();
    for b in &result.batches {
        out.extend(
            observations(b)
                .map_err(|e| QueryError::Invalid(format!("reading the rule's rows: {e}")))?,
        );
    }
    Ok(out)
}

/// One observation per row of a SQL rule's result, read from the Arrow columns: labels as
/// Arrow prints their values (nulls leave the label out), `value` cast to a number (text
/// that is not one leaves it out), exemplars from a text column or a list of them.
fn observations(b: &RecordBatch) -> Result<Vec<Observation>, ArrowError> {
    let opts = FormatOptions::default();
    let schema = b.schema();
    let mut value = None;
    let mut ids: Vec<&ArrayRef> = Vec::new();
    let mut labels = Vec::new();
    for (f, col) in schema.fields().iter().zip(b.columns()) {
        match f.name().as_str() {
            "value" => value = Some(cast(col, &DataType::Float64)?),
            "trace_id" | "exemplar_trace_ids" => ids.push(col),
            name => labels.push((
                label_name(name),
                col,
                ArrayFormatter::try_new(col.as_ref(), &opts)?,
            )),
        }
    }
    let value = value.as_ref().map(|v| v.as_primitive::<Float64Type>());
    (0..b.num_rows())
        .map(|row| {
            let mut evidence = Evidence {
                signal: "sql".into(),
                value: value.filter(|v| v.is_valid(row)).map(|v| v.value(row)),
                ..Default::default()
            };
            for col in &ids {
                evidence
                    .exemplar_trace_ids
                    .extend(cell_texts(col, row, &opts)?);
            }
            evidence.exemplar_trace_ids.truncate(EXEMPLARS);
            let labels = labels
                .iter()
                .filter(|(_, col, _)| col.is_valid(row))
                .map(|(name, _, fmt)| (name.clone(), fmt.value(row).to_string()))
                .collect();
            Ok(Observation { labels, evidence })
        })
        .collect()
}

/// The text of one cell, or of each item when the cell is a list.
fn cell_texts(
    col: &ArrayRef,
    row: usize,
    opts: &FormatOptions<'_>,
) -> Result<Vec<String>, ArrowError> {
    if col.is_null(row) {
        return Ok(Vec::new());
    }
    let cell: ArrayRef = match col.data_type() {
        DataType::List(_) => col.as_list::<i32>().value(row),
        DataType::LargeList(_) => col.as_list::<i64>().value(row),
        _ => col.slice(row, 1),
    };
    let f = ArrayFormatter::try_new(cell.as_ref(), opts)?;
    Ok((0..cell.len())
        .filter(|i| cell.is_valid(*i))
        .map(|i| f.value(i).to_string())
        .collect())
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

    #[test]
    fn a_sql_rules_rows_are_read_from_arrow() {
        use datafusion::arrow::array::{Int64Array, ListBuilder, StringArray, StringBuilder};
        use datafusion::arrow::datatypes::{Field, Schema};
        use std::sync::Arc;
        let mut ids = ListBuilder::new(StringBuilder::new());
        ids.append_value([Some("t1"), None, Some("t2")]);
        ids.append_null();
        let ids = ids.finish();
        let schema = Arc::new(Schema::new(vec![
            Field::new("service_name", DataType::Utf8, true),
            Field::new("count(*)", DataType::Int64, false),
            Field::new("value", DataType::Utf8, true),
            Field::new("trace_id", DataType::Utf8, true),
            Field::new("exemplar_trace_ids", ids.data_type().clone(), true),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![Some("cart"), None])),
                Arc::new(Int64Array::from(vec![3, 4])),
                Arc::new(StringArray::from(vec![Some("0.25"), Some("lots")])),
                Arc::new(StringArray::from(vec![Some("t0"), None])),
                Arc::new(ids),
            ],
        )
        .unwrap();
        let o = observations(&b).unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(
            o[0].labels.get("service_name").map(String::as_str),
            Some("cart")
        );
        assert_eq!(o[0].labels.get("count___").map(String::as_str), Some("3"));
        assert_eq!(o[0].evidence.value, Some(0.25));
        assert_eq!(o[0].evidence.exemplar_trace_ids, vec!["t0", "t1", "t2"]);
        // A null label is left out; text that is no number gives no value.
        assert!(!o[1].labels.contains_key("service_name"));
        assert_eq!(o[1].evidence.value, None);
        assert!(o[1].evidence.exemplar_trace_ids.is_empty());
    }
}
