//! Trace search and a trace's spans in tree order with the critical path marked.
//!
//! Looking a trace up by id needs no time range: span files are sorted by `trace_id`, with
//! row-group and page statistics and a bloom filter on `trace_id`, so DataFusion's Parquet
//! scan prunes every row group (and file) that cannot hold the id and reads the rest by
//! page. Buffered (not yet flushed) spans are scanned in memory.

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, TimestampNanosecondType};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::range::TimeRange;
use super::typed_with;
use crate::api::to_json;
use crate::engine::{Params, QueryEngine, QueryError};

/// The filters of `GET /api/v1/traces`.
#[derive(Debug, Clone, Default)]
pub struct TraceQuery {
    pub service: Option<String>,
    pub span_name: Option<String>,
    /// `error` keeps traces with at least one ERROR span; `ok` those without.
    pub status: Option<String>,
    pub min_duration_ms: Option<f64>,
    /// `key=value` pairs one span's attributes must all hold.
    pub attributes: Vec<(String, String)>,
    pub limit: usize,
}

/// One trace of `GET /api/v1/traces`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    pub trace_id: String,
    /// The service and name of the root span (the span without a parent; the earliest
    /// when there are several, or none is stored yet).
    pub root_service: String,
    pub root_span_name: String,
    /// RFC 3339, as the SQL endpoint prints timestamps.
    pub start_time: String,
    pub duration_ms: f64,
    pub span_count: u64,
    pub error_count: u64,
    /// Every service with a span in the trace, sorted.
    pub services: Vec<String>,
}

/// A summary as the search SQL returns it.
#[derive(Deserialize)]
struct SummaryRow {
    trace_id: String,
    root_service: Option<String>,
    root_span_name: Option<String>,
    start_ns: i64,
    duration_ns: i64,
    span_count: i64,
    error_count: Option<i64>,
    services: Option<Vec<Option<String>>>,
}

/// Trace summaries, newest first.
pub async fn search(
    engine: &QueryEngine,
    range: &TimeRange,
    q: &TraceQuery,
) -> Result<Vec<TraceSummary>, QueryError> {
    let mut params = Params::default();
    let mut span_filters = vec![range.sql("start_time")];
    if let Some(s) = &q.service {
        span_filters.push(format!("service_name = {}", params.bind(s)));
    }
    if let Some(s) = &q.span_name {
        span_filters.push(format!("span_name = {}", params.bind(s)));
    }
    if let Some(ms) = q.min_duration_ms {
        span_filters.push(format!("duration_ns >= {}", (ms * 1e6) as i64));
    }
    for (k, v) in &q.attributes {
        let (k, v) = (params.bind(k), params.bind(v));
        span_filters.push(format!("span_attributes[{k}] = {v}"));
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
    let wide = range.widened(chrono::Duration::minutes(super::model::PAIR_WINDOW));
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
         SELECT t.trace_id, roots.root_service, roots.root_span_name,
                CAST(t.start_time AS BIGINT) AS start_ns,
                CAST(t.end_time - t.start_time AS BIGINT) AS duration_ns, t.span_count, t.error_count, t.services
         FROM t JOIN roots ON roots.trace_id = t.trace_id ORDER BY t.start_time DESC",
        filters = span_filters.join(" AND "),
        wide = wide.sql("start_time"),
        limit = q.limit.clamp(1, 1000),
    );
    let rows = typed_with::<SummaryRow>(engine, &sql, params).await?;
    Ok(rows
        .into_iter()
        .map(|r| TraceSummary {
            trace_id: r.trace_id,
            root_service: r.root_service.unwrap_or_default(),
            root_span_name: r.root_span_name.unwrap_or_default(),
            start_time: rfc3339(r.start_ns),
            duration_ms: r.duration_ns as f64 / 1e6,
            span_count: r.span_count.max(0) as u64,
            error_count: r.error_count.unwrap_or(0).max(0) as u64,
            services: r
                .services
                .unwrap_or_default()
                .into_iter()
                .flatten()
                .collect(),
        })
        .collect())
}

/// A timestamp in nanoseconds as Arrow's JSON writer prints a UTC timestamp column.
fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Whether `id` looks like a trace id (32 hex digits); any case is accepted.
pub fn normalise_id(id: &str) -> Option<String> {
    (id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// `GET /api/v1/traces/{id}`: every span, parents before children (siblings by start
/// time), each with its `depth` and whether it lies on the `critical_path`. `None` when
/// no span has that id.
pub async fn get(engine: &QueryEngine, trace_id: &str) -> Result<Option<Value>, QueryError> {
    let mut params = Params::default();
    let id = params.bind(trace_id);
    let result = engine
        .sql_with(
            &format!("SELECT * FROM spans WHERE trace_id = {id}"),
            params,
        )
        .await?;
    let mut keys = Vec::new();
    for b in &result.batches {
        keys.extend(span_keys(b)?);
    }
    if keys.is_empty() {
        return Ok(None);
    }
    // Every column of every span, as the SQL endpoint renders them.
    let json = to_json(&result).map_err(|e| QueryError::Internal(e.to_string()))?;
    let names: Vec<&String> = result.schema.fields().iter().map(|f| f.name()).collect();
    let rows: Vec<&Value> = json["rows"]
        .as_array()
        .map(|r| r.iter().collect())
        .unwrap_or_default();
    let mut spans = Vec::with_capacity(keys.len());
    for place in tree_order(&keys) {
        let mut span = serde_json::Map::new();
        if let Some(cells) = rows.get(place.index).and_then(|r| r.as_array()) {
            for (name, cell) in names.iter().zip(cells) {
                span.insert((*name).clone(), cell.clone());
            }
        }
        span.insert("depth".into(), json!(place.depth));
        span.insert("critical_path".into(), json!(place.critical));
        spans.push(Value::Object(span));
    }
    Ok(Some(json!({ "trace_id": trace_id, "spans": spans })))
}

/// What the tree order needs of a span, read from the Arrow columns.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanKey {
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub start_ns: i64,
    pub duration_ns: i64,
}

/// The [`SpanKey`]s of a batch of the spans table, in row order.
fn span_keys(b: &RecordBatch) -> Result<Vec<SpanKey>, QueryError> {
    let column = |name: &str| {
        b.column_by_name(name)
            .ok_or_else(|| QueryError::Internal(format!("the spans table has no {name} column")))
    };
    let wrong = |name: &str| QueryError::Internal(format!("spans.{name} has an unexpected type"));
    let span_id = column("span_id")?
        .as_string_opt::<i32>()
        .ok_or_else(|| wrong("span_id"))?;
    let parent = column("parent_span_id")?
        .as_string_opt::<i32>()
        .ok_or_else(|| wrong("parent_span_id"))?;
    let start = column("start_time")?
        .as_primitive_opt::<TimestampNanosecondType>()
        .ok_or_else(|| wrong("start_time"))?;
    let duration = column("duration_ns")?
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(|| wrong("duration_ns"))?;
    Ok((0..b.num_rows())
        .map(|i| SpanKey {
            span_id: span_id.value(i).to_string(),
            parent_span_id: parent.is_valid(i).then(|| parent.value(i).to_string()),
            start_ns: start.value(i),
            duration_ns: duration.value(i),
        })
        .collect())
}

/// Where a span goes in the tree: its row, depth and whether it is on the critical path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub index: usize,
    pub depth: usize,
    pub critical: bool,
}

/// Orders spans depth-first from the roots and marks the critical path.
pub fn tree_order(spans: &[SpanKey]) -> Vec<Placed> {
    let start_ns: Vec<i64> = spans.iter().map(|s| s.start_ns).collect();
    let end_ns: Vec<i64> = spans.iter().map(|s| s.start_ns + s.duration_ns).collect();
    let ids: HashMap<&str, usize> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| (s.span_id.as_str(), i))
        .collect();
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        match s.parent_span_id.as_deref().and_then(|p| ids.get(p)) {
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
        out.push(Placed {
            index: i,
            depth,
            critical: critical.contains(&i),
        });
        if let Some(kids) = children.get(&i) {
            for k in kids.iter().rev() {
                stack.push((*k, depth + 1));
            }
        }
    }
    // Spans caught in a parent cycle are not reachable from a root: append them.
    for i in 0..spans.len() {
        if !visited.contains(&i) {
            out.push(Placed {
                index: i,
                depth: 0,
                critical: false,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: Option<&str>, start_ms: i64, dur_ms: i64) -> SpanKey {
        SpanKey {
            span_id: id.to_string(),
            parent_span_id: parent.map(str::to_string),
            start_ns: start_ms * 1_000_000,
            duration_ns: dur_ms * 1_000_000,
        }
    }

    fn ids<'a>(spans: &'a [SpanKey], placed: &[Placed], only_critical: bool) -> Vec<&'a str> {
        placed
            .iter()
            .filter(|p| !only_critical || p.critical)
            .map(|p| spans[p.index].span_id.as_str())
            .collect()
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
        let out = tree_order(&spans);
        assert_eq!(ids(&spans, &out, false), vec!["root", "a", "b", "c", "d"]);
        let depth: Vec<usize> = out.iter().map(|p| p.depth).collect();
        assert_eq!(depth, vec![0, 1, 1, 2, 1]);
        // d covers the tail, b (through c) the middle, a the stretch before b started.
        assert_eq!(ids(&spans, &out, true), vec!["root", "a", "b", "c", "d"]);
    }

    #[test]
    fn overlapping_sibling_that_ends_early_is_not_critical() {
        // root 0..100: long 0..100 covers everything; short 10..20 overlaps it.
        let spans = vec![
            span("root", None, 0, 100),
            span("long", Some("root"), 0, 100),
            span("short", Some("root"), 10, 10),
        ];
        let out = tree_order(&spans);
        assert_eq!(ids(&spans, &out, true), vec!["root", "long"]);
    }

    #[test]
    fn a_parent_cycle_keeps_every_span() {
        let spans = vec![
            span("root", None, 0, 10),
            span("x", Some("y"), 1, 2),
            span("y", Some("x"), 2, 2),
            span("self", Some("self"), 3, 1),
        ];
        let out = tree_order(&spans);
        let mut all = ids(&spans, &out, false);
        all.sort_unstable();
        assert_eq!(all, vec!["root", "self", "x", "y"]);
        // A span that is its own parent is a root; the critical path starts at the root
        // that ends last.
        assert!(out.iter().all(|p| p.depth == 0));
        assert_eq!(ids(&spans, &out, true), vec!["root"]);
    }

    #[test]
    fn span_keys_read_the_arrow_columns() {
        use arrow::array::{Int64Array, StringArray, TimestampNanosecondArray};
        use arrow::datatypes::{DataType, Field, Schema};
        use std::sync::Arc;
        let start = TimestampNanosecondArray::from(vec![5, 7]).with_timezone("UTC");
        let schema = Arc::new(Schema::new(vec![
            Field::new("span_id", DataType::Utf8, false),
            Field::new("parent_span_id", DataType::Utf8, true),
            Field::new("start_time", start.data_type().clone(), false),
            Field::new("duration_ns", DataType::Int64, false),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(StringArray::from(vec![None, Some("a")])),
                Arc::new(start),
                Arc::new(Int64Array::from(vec![10, 2])),
            ],
        )
        .unwrap();
        assert_eq!(
            span_keys(&b).unwrap(),
            vec![span_key("a", None, 5, 10), span_key("b", Some("a"), 7, 2)]
        );
        // A column that is missing is an error, not a span at time zero.
        let err = span_keys(&b.project(&[0, 1, 2]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("duration_ns"), "{err}");
    }

    fn span_key(id: &str, parent: Option<&str>, start_ns: i64, duration_ns: i64) -> SpanKey {
        SpanKey {
            span_id: id.into(),
            parent_span_id: parent.map(Into::into),
            start_ns,
            duration_ns,
        }
    }

    #[test]
    fn start_times_print_as_the_sql_endpoint_prints_them() {
        // The summaries' start_time and the trace's spans (arrow-json) must agree.
        for ns in [
            0,
            1_764_000_000_123_456_789,
            1_764_000_000_000_000_000,
            1_764_000_000_120_000_000,
        ] {
            let a = arrow::array::TimestampNanosecondArray::from(vec![ns]).with_timezone("UTC");
            let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
                arrow::datatypes::Field::new("t", a.data_type().clone(), false),
            ]));
            let batch = RecordBatch::try_new(schema.clone(), vec![std::sync::Arc::new(a)]).unwrap();
            let r = crate::engine::QueryResult {
                schema,
                batches: vec![batch],
            };
            let j = to_json(&r).unwrap();
            assert_eq!(j["rows"][0][0], json!(rfc3339(ns)), "{ns}");
        }
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
