//! Mirrored traffic, primary against shadow (`GET /api/v1/mirrors`): the bundled proxy's
//! mirror sends a copy of a share of a route's requests to a shadow version, and marks
//! both CLIENT spans (`meshscope.mirror` = `primary` / `shadow`, siblings in one trace,
//! each with `meshscope.body_hash` of its answer). Pairs are joined by trace and parent
//! span, and summarised per caller, destination and route: how many, how often the
//! answers' bodies and status classes agree, each side's errors and latency percentiles.

use serde::{Deserialize, Serialize};

use super::range::TimeRange;
use super::{round3, typed_with};
use crate::engine::{Params, QueryEngine, QueryError};

/// One route's mirrored pairs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MirrorComparison {
    pub source: String,
    pub target: String,
    pub route: String,
    pub pairs: u64,
    /// Share of pairs whose response bodies hashed alike.
    pub body_match_ratio: f64,
    /// Share of pairs whose status classes (2xx, 4xx, 5xx …) agree.
    pub status_class_match_ratio: f64,
    pub primary: Side,
    pub shadow: Side,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Side {
    /// Answers per status class: `2xx`, `3xx`, `4xx`, `5xx`, and `none` (no answer).
    pub status_classes: std::collections::BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Deserialize)]
struct Row {
    source: String,
    target: String,
    route: String,
    pairs: i64,
    body_match: f64,
    class_match: f64,
    p_p50: Option<f64>,
    p_p99: Option<f64>,
    s_p50: Option<f64>,
    s_p99: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct ClassRow {
    source: String,
    target: String,
    route: String,
    side: String,
    class: String,
    n: i64,
}

/// The primary / shadow pairs of the range, and the values the statement binds.
fn pairs_sql(range: &TimeRange, source: Option<&str>, target: Option<&str>) -> (String, Params) {
    let mut params = Params::default();
    let mut only = String::new();
    if let Some(s) = source {
        only.push_str(&format!(" AND p.service_name = {}", params.bind(s)));
    }
    if let Some(t) = target {
        only.push_str(&format!(
            " AND p.span_attributes['peer.service'] = {}",
            params.bind(t)
        ));
    }
    let sql = format!(
        "SELECT p.service_name AS source, coalesce(p.span_attributes['peer.service'], p.peer_name, '') AS target,
                coalesce(p.span_attributes['meshscope.route'], '') AS route,
                p.duration_ns AS p_ns, s.duration_ns AS s_ns,
                p.http_status_code AS p_status, s.http_status_code AS s_status,
                p.span_attributes['meshscope.body_hash'] AS p_hash, s.span_attributes['meshscope.body_hash'] AS s_hash
         FROM spans p JOIN spans s
           ON p.trace_id = s.trace_id AND p.parent_span_id = s.parent_span_id AND p.service_name = s.service_name
         WHERE {} AND {} AND p.span_kind = 'CLIENT' AND s.span_kind = 'CLIENT'
           AND p.span_attributes['meshscope.mirror'] = 'primary'
           AND s.span_attributes['meshscope.mirror'] = 'shadow'{only}",
        range.sql("p.start_time"),
        range.widened(chrono::Duration::minutes(1)).sql("s.start_time"),
    );
    (sql, params)
}

/// Every mirrored route of the range, busiest first; `source` / `target` narrow it to one
/// edge.
pub async fn compare(
    engine: &QueryEngine,
    range: &TimeRange,
    source: Option<&str>,
    target: Option<&str>,
) -> Result<Vec<MirrorComparison>, QueryError> {
    let (pairs, params) = pairs_sql(range, source, target);
    let rows: Vec<Row> = typed_with(
        engine,
        &format!(
            "WITH pairs AS ({pairs})
             SELECT source, target, route, count(*) AS pairs,
                    avg(CASE WHEN p_hash = s_hash THEN 1.0 ELSE 0.0 END) AS body_match,
                    avg(CASE WHEN coalesce(p_status / 100, 0) = coalesce(s_status / 100, 0) THEN 1.0 ELSE 0.0 END) AS class_match,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY p_ns) AS p_p50,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY p_ns) AS p_p99,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY s_ns) AS s_p50,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY s_ns) AS s_p99
             FROM pairs GROUP BY source, target, route ORDER BY pairs DESC, source, target, route"
        ),
        params.clone(),
    )
    .await?;
    let classes: Vec<ClassRow> = typed_with(
        engine,
        &format!(
            "WITH pairs AS ({pairs})
             SELECT source, target, route, 'primary' AS side,
                    coalesce(CAST(p_status / 100 AS VARCHAR) || 'xx', 'none') AS class, count(*) AS n
             FROM pairs GROUP BY 1, 2, 3, 4, 5
             UNION ALL
             SELECT source, target, route, 'shadow' AS side,
                    coalesce(CAST(s_status / 100 AS VARCHAR) || 'xx', 'none') AS class, count(*) AS n
             FROM pairs GROUP BY 1, 2, 3, 4, 5"
        ),
        params,
    )
    .await?;
    let ms = |ns: Option<f64>| round3(ns.unwrap_or(0.0) / 1e6);
    Ok(rows
        .into_iter()
        .map(|r| {
            let side = |name: &str, p50, p99| Side {
                status_classes: classes
                    .iter()
                    .filter(|c| {
                        c.side == name
                            && c.source == r.source
                            && c.target == r.target
                            && c.route == r.route
                    })
                    .map(|c| (c.class.clone(), u64::try_from(c.n).unwrap_or(0)))
                    .collect(),
                p50_ms: ms(p50),
                p99_ms: ms(p99),
            };
            MirrorComparison {
                primary: side("primary", r.p_p50, r.p_p99),
                shadow: side("shadow", r.s_p50, r.s_p99),
                pairs: u64::try_from(r.pairs).unwrap_or(0),
                body_match_ratio: round3(r.body_match),
                status_class_match_ratio: round3(r.class_match),
                source: r.source,
                target: r.target,
                route: r.route,
            }
        })
        .collect())
}
