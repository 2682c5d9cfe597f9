//! Trace search and a trace's spans in tree order with the critical path marked.
//!
//! Looking a trace up by id needs no time range: span files are sorted by `trace_id`, with
//! row-group and page statistics and a bloom filter on `trace_id`, so DataFusion's Parquet
//! scan prunes every row group (and file) that cannot hold the id and reads the rest by
//! page. Buffered (not yet flushed) spans are scanned in memory.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value, json};

use super::range::{TimeRange, sql_str};
use super::{rows, str_of, u64_of};
use crate::engine::{QueryEngine, QueryError};

/// The filters of `GET /api/v1/traces`.
#[derive(Debug, Clone, Default)]
pub struct TraceQuery {
    pub service: Option<String>,
    pub span_name: Option<String>,
    /// `error` keeps traces with at least one ERROR span; `ok` those without.
    pub status: Option<String>,
    pub min_duration_ms: Option<f64>,
    /// `key=value` on a span attribute.
    pub attribute: Option<(String, String)>,
    pub limit: usize,
}

/// Trace summaries, newest first.
pub async fn search(
    engine: &QueryEngine,
    range: &TimeRange,
    q: &TraceQuery,
) -> Result<Value, QueryError> {
    let mut span_filters = vec![range.sql("start_time")];
    if let Some(s) = &q.service {
        span_filters.push(format!("service_name = {}", sql_str(s)));
    }
    if let Some(s) = &q.span_name {
        span_filters.push(format!("span_name = {}", sql_str(s)));
    }
    if let Some(ms) = q.min_duration_ms {
        span_filters.push(format!("duration_ns >= {}", (ms * 1e6) as i64));
    }
    if let Some((k, v)) = &q.attribute {
        span_filters.push(format!("span_attributes[{}] = {}", sql_str(k), sql_str(v)));
    }
    let having = match q.status.as_deref() {
        Some("error") => "HAVING sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) > 0",
        Some("ok") => "HAVING sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) = 0",
        Some(other) => {
            return Err(QueryError::Invalid(format!(
                "status must be error or ok, got {other:?}"
            )));
        }
        None => "",
    };
    let wide = range.widened(chrono::Duration::minutes(super::graph::PAIR_WINDOW));
    let sql = format!(
        "WITH matched AS (SELECT DISTINCT trace_id FROM spans WHERE {filters}),
         t AS (SELECT trace_id, min(start_time) AS start_time, max(end_time) AS end_time, count(*) AS span_count,
                      sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) AS error_count,
                      array_sort(array_agg(DISTINCT service_name)) AS services
               FROM spans WHERE {wide} AND trace_id IN (SELECT trace_id FROM matched)
               GROUP BY trace_id {having}
               ORDER BY start_time DESC LIMIT {limit}),
         roots AS (SELECT trace_id, first_value(service_name ORDER BY parent_span_id NULLS FIRST, start_time) AS root_service,
                          first_value(span_name ORDER BY parent_span_id NULLS FIRST, start_time) AS root_span_name
                   FROM spans WHERE {wide} AND trace_id IN (SELECT trace_id FROM t) GROUP BY trace_id)
         SELECT t.trace_id, roots.root_service, roots.root_span_name, t.start_time,
                CAST(t.end_time - t.start_time AS BIGINT) AS duration_ns_i, t.span_count, t.error_count, t.services
         FROM t JOIN roots ON roots.trace_id = t.trace_id ORDER BY t.start_time DESC",
        filters = span_filters.join(" AND "),
        wide = wide.sql("start_time"),
        limit = q.limit.clamp(1, 1000),
    );
    let out: Vec<Value> = rows(engine, &sql)
        .await?
        .into_iter()
        .map(|r| {
            json!({
                "trace_id": str_of(&r, "trace_id"),
                "root_service": str_of(&r, "root_service"),
                "root_span_name": str_of(&r, "root_span_name"),
                "start_time": r.get("start_time").cloned().unwrap_or(Value::Null),
                "duration_ms": r.get("duration_ns_i").and_then(Value::as_f64).unwrap_or(0.0) / 1e6,
                "span_count": u64_of(&r, "span_count"),
                "error_count": u64_of(&r, "error_count"),
                "services": r.get("services").cloned().unwrap_or(json!([])),
            })
        })
        .collect();
    Ok(Value::Array(out))
}

/// Whether `id` looks like a trace id (32 hex digits); any case is accepted.
pub fn normalise_id(id: &str) -> Option<String> {
    (id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// `GET /api/v1/traces/{id}`: every span, parents before children (siblings by start
/// time), each with its `depth` and whether it lies on the `critical_path`. `None` when
/// no span has that id.
pub async fn get(engine: &QueryEngine, trace_id: &str) -> Result<Option<Value>, QueryError> {
    let spans = rows(
        engine,
        &format!("SELECT * FROM spans WHERE trace_id = {}", sql_str(trace_id)),
    )
    .await?;
    if spans.is_empty() {
        return Ok(None);
    }
    let ordered = tree_order(spans);
    Ok(Some(json!({ "trace_id": trace_id, "spans": ordered })))
}

fn ns(row: &Map<String, Value>, key: &str) -> i64 {
    row.get(key).and_then(Value::as_i64).unwrap_or(0)
}

/// Orders spans depth-first from the roots and marks the critical path.
pub fn tree_order(spans: Vec<Map<String, Value>>) -> Vec<Value> {
    // Times as nanoseconds: start from the stored start and the exact duration.
    let start_ns: Vec<i64> = spans
        .iter()
        .map(|s| parse_ts(s.get("start_time")))
        .collect();
    let end_ns: Vec<i64> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| start_ns[i] + ns(s, "duration_ns"))
        .collect();
    let ids: HashMap<String, usize> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| (str_of(s, "span_id"), i))
        .collect();
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        match s
            .get("parent_span_id")
            .and_then(Value::as_str)
            .and_then(|p| ids.get(p))
        {
            Some(&p) if p != i => children.entry(p).or_default().push(i),
            _ => roots.push(i),
        }
    }
    let by_start = |v: &mut Vec<usize>| v.sort_by_key(|i| (start_ns[*i], *i));
    by_start(&mut roots);
    for c in children.values_mut() {
        by_start(c);
    }

    // Critical path: from the root that ends last, walk back from each span's end through
    // the child that finished last before the cursor (Jaeger's definition).
    let mut critical = HashSet::new();
    if let Some(&root) = roots.iter().max_by_key(|i| end_ns[**i]) {
        let mut stack = vec![(root, end_ns[root])];
        while let Some((span, cursor_end)) = stack.pop() {
            critical.insert(span);
            let mut cursor = end_ns[span].min(cursor_end);
            let mut kids = children.get(&span).cloned().unwrap_or_default();
            kids.sort_by_key(|k| std::cmp::Reverse(end_ns[*k]));
            for k in kids {
                if start_ns[k] < cursor && end_ns[k] > start_ns[span] {
                    stack.push((k, cursor));
                    cursor = start_ns[k];
                }
            }
        }
    }

    let mut out = Vec::with_capacity(spans.len());
    let mut visited = HashSet::new();
    let mut stack: Vec<(usize, usize)> = roots.iter().rev().map(|r| (*r, 0)).collect();
    while let Some((i, depth)) = stack.pop() {
        if !visited.insert(i) {
            continue;
        }
        let mut v = Value::Object(spans[i].clone());
        v["depth"] = json!(depth);
        v["critical_path"] = json!(critical.contains(&i));
        out.push(v);
        if let Some(kids) = children.get(&i) {
            for k in kids.iter().rev() {
                stack.push((*k, depth + 1));
            }
        }
    }
    // Spans caught in a parent cycle are not reachable from a root: append them.
    for (i, s) in spans.iter().enumerate() {
        if !visited.contains(&i) {
            let mut v = Value::Object(s.clone());
            v["depth"] = json!(0);
            v["critical_path"] = json!(false);
            out.push(v);
        }
    }
    out
}

/// Nanoseconds of an arrow-json timestamp (`2026-11-26T12:00:00.123456789Z`).
fn parse_ts(v: Option<&Value>) -> i64 {
    v.and_then(Value::as_str)
        .and_then(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .ok()
                .or_else(|| chrono::DateTime::parse_from_rfc3339(&format!("{s}Z")).ok())
        })
        .and_then(|d| d.timestamp_nanos_opt())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: Option<&str>, start_ms: i64, dur_ms: i64) -> Map<String, Value> {
        let t = chrono::DateTime::from_timestamp_nanos(start_ms * 1_000_000)
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let v = json!({ "span_id": id, "parent_span_id": parent, "start_time": t, "duration_ns": dur_ms * 1_000_000 });
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn tree_order_and_critical_path() {
        // root 0..100: a 10..40, b 20..90 (b ends last) with child c 30..80; d 95..99.
        let spans = vec![
            span("c", Some("b"), 30, 50),
            span("root", None, 0, 100),
            span("d", Some("root"), 95, 4),
            span("a", Some("root"), 10, 30),
            span("b", Some("root"), 20, 70),
        ];
        let out = tree_order(spans);
        let order: Vec<&str> = out
            .iter()
            .map(|s| s["span_id"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(order, vec!["root", "a", "b", "c", "d"]);
        let depth: Vec<u64> = out
            .iter()
            .map(|s| s["depth"].as_u64().unwrap_or(9))
            .collect();
        assert_eq!(depth, vec![0, 1, 1, 2, 1]);
        let critical: Vec<&str> = out
            .iter()
            .filter(|s| s["critical_path"] == json!(true))
            .map(|s| s["span_id"].as_str().unwrap_or(""))
            .collect();
        // d covers the tail, b (through c) the middle, a the stretch before b started.
        assert_eq!(critical, vec!["root", "a", "b", "c", "d"]);
    }

    #[test]
    fn overlapping_sibling_that_ends_early_is_not_critical() {
        // root 0..100: long 0..100 covers everything; short 10..20 overlaps it.
        let spans = vec![
            span("root", None, 0, 100),
            span("long", Some("root"), 0, 100),
            span("short", Some("root"), 10, 10),
        ];
        let out = tree_order(spans);
        let critical: Vec<&str> = out
            .iter()
            .filter(|s| s["critical_path"] == json!(true))
            .map(|s| s["span_id"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(critical, vec!["root", "long"]);
    }

    #[test]
    fn ids_are_checked() {
        assert_eq!(
            normalise_id("5B8EFFF798038103D269B633813FC60C").as_deref(),
            Some("5b8efff798038103d269b633813fc60c")
        );
        assert_eq!(normalise_id("xyz"), None);
    }
}
