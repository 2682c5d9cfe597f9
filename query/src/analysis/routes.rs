//! The analysis API: `/api/v1/graph[/diff]`, `/api/v1/services[/{name}]`, `/api/v1/series`,
//! `/api/v1/traces[/{id}]`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::diff::{self, Thresholds};
use super::dot::EdgeLabel;
use super::graph::{ComputedFrom, ServiceGraph};
use super::range::{TimeRange, empty_as_none};
use super::signals;
use super::traces::{self, TraceQuery};
use crate::api::error_response;
use crate::engine::{QueryEngine, QueryError};

/// Query parameters as a typed struct; a malformed value is a 400 naming it.
type Params<T> = Result<Query<T>, QueryRejection>;

fn params<T>(p: Params<T>) -> Result<T, QueryError> {
    p.map(|Query(t)| t)
        .map_err(|e| QueryError::Invalid(e.body_text()))
}

/// `start` and `end` (RFC 3339; the last 15 minutes by default) and, where the answer may
/// come from the rollups, `source`.
#[derive(Debug, Default, Deserialize)]
struct RangeParams {
    #[serde(default, deserialize_with = "empty_as_none")]
    start: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    end: Option<String>,
    /// `spans`, `rollups` or `auto` (the default: rollups past an hour).
    #[serde(default, deserialize_with = "empty_as_none")]
    source: Option<String>,
}

impl RangeParams {
    fn range(&self) -> Result<TimeRange, QueryError> {
        TimeRange::parse(
            self.start.as_deref(),
            self.end.as_deref(),
            chrono::Utc::now(),
        )
    }
}

/// `GET /api/v1/graph`.
#[derive(Debug, Default, Deserialize)]
struct GraphParams {
    #[serde(flatten)]
    range: RangeParams,
    #[serde(default, deserialize_with = "empty_as_none")]
    namespace: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    service: Option<String>,
    /// Hops around `service` (default 1).
    #[serde(default, deserialize_with = "empty_as_none")]
    depth: Option<usize>,
    /// `json` (the default) or `dot` (Graphviz).
    #[serde(default, deserialize_with = "empty_as_none")]
    format: Option<String>,
    /// The DOT edge labels: `rate` (default), `errors`, `p99`, `mtls`, `none`.
    #[serde(default, deserialize_with = "empty_as_none")]
    label: Option<String>,
}

impl GraphParams {
    /// The graph of `g` that the namespace and neighbourhood filters keep.
    fn filtered(&self, mut g: ServiceGraph) -> ServiceGraph {
        if let Some(ns) = &self.namespace {
            g = g.in_namespace(ns);
        }
        if let Some(svc) = &self.service {
            g = g.around(svc, self.depth.unwrap_or(1));
        }
        g
    }
}

/// `GET /api/v1/graph/diff`: the window `start`–`end` against `base_start`–`base_end`
/// (by default the window of the same length just before).
#[derive(Debug, Default, Deserialize)]
struct DiffParams {
    #[serde(flatten)]
    graph: GraphParams,
    #[serde(default, deserialize_with = "empty_as_none")]
    base_start: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    base_end: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    error_rate_delta: Option<f64>,
    #[serde(default, deserialize_with = "empty_as_none")]
    p99_ratio: Option<f64>,
    #[serde(default, deserialize_with = "empty_as_none")]
    p99_floor_ms: Option<f64>,
}

impl DiffParams {
    fn windows(&self) -> Result<(TimeRange, TimeRange), QueryError> {
        let now = self.graph.range.range()?;
        let base = match (&self.base_start, &self.base_end) {
            (None, None) => {
                let len = now.end - now.start;
                TimeRange {
                    start: now.start - len,
                    end: now.start,
                }
            }
            (Some(s), Some(e)) => TimeRange::parse(Some(s), Some(e), chrono::Utc::now())?,
            _ => {
                return Err(QueryError::Invalid(
                    "give both base_start and base_end, or neither (the window just before)".into(),
                ));
            }
        };
        Ok((now, base))
    }

    fn thresholds(&self) -> Result<Thresholds, QueryError> {
        let d = Thresholds::default();
        let t = Thresholds {
            error_rate_delta: self.error_rate_delta.unwrap_or(d.error_rate_delta),
            p99_ratio: self.p99_ratio.unwrap_or(d.p99_ratio),
            p99_floor_ms: self.p99_floor_ms.unwrap_or(d.p99_floor_ms),
        };
        if [t.error_rate_delta, t.p99_ratio, t.p99_floor_ms]
            .iter()
            .any(|v| !v.is_finite() || *v < 0.0)
        {
            return Err(QueryError::Invalid(
                "error_rate_delta, p99_ratio and p99_floor_ms must be non-negative numbers".into(),
            ));
        }
        Ok(t)
    }
}

/// `GET /api/v1/traces`.
#[derive(Debug, Default, Deserialize)]
struct TraceParams {
    #[serde(flatten)]
    range: RangeParams,
    #[serde(default, deserialize_with = "empty_as_none")]
    service: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    span_name: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    status: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    min_duration_ms: Option<f64>,
    /// `key=value` pairs one span must all hold, logfmt style (as Jaeger's tag search):
    /// `http.route=/cart region="eu west"`.
    #[serde(default, deserialize_with = "empty_as_none")]
    attribute: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    limit: Option<usize>,
}

impl TraceParams {
    fn query(self) -> Result<TraceQuery, QueryError> {
        let attributes = match &self.attribute {
            Some(a) => logfmt(a)?,
            None => Vec::new(),
        };
        Ok(TraceQuery {
            service: self.service,
            span_name: self.span_name,
            status: self.status,
            min_duration_ms: self.min_duration_ms,
            attributes,
            limit: self.limit.unwrap_or(20),
        })
    }
}

/// `k=v k2="v 2"`: pairs separated by spaces, a value in double quotes when it holds
/// spaces (`\"` for a quote inside); only the first `=` of a pair splits it.
fn logfmt(text: &str) -> Result<Vec<(String, String)>, QueryError> {
    let bad = || {
        QueryError::Invalid(format!(
            "attribute must be key=value pairs separated by spaces, got {text:?}"
        ))
    };
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        let mut has_eq = false;
        for c in chars.by_ref() {
            if c == '=' {
                has_eq = true;
                break;
            }
            key.push(c);
        }
        if !has_eq || key.is_empty() || key.contains(char::is_whitespace) {
            return Err(bad());
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed || chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err(bad());
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

pub fn router(engine: QueryEngine) -> Router {
    Router::new()
        .route("/api/v1/graph", get(graph))
        .route("/api/v1/graph/diff", get(graph_diff))
        .route("/api/v1/mirrors", get(mirrors))
        .route("/api/v1/security/series", get(security_series))
        .route("/api/v1/services", get(services))
        .route("/api/v1/services/{name}", get(service))
        .route("/api/v1/series", get(series))
        .route("/api/v1/traces", get(search))
        .route("/api/v1/traces/{id}", get(trace))
        .with_state(engine)
}

fn answer<T: Serialize>(r: Result<T, QueryError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn graph(State(engine): State<QueryEngine>, p: Params<GraphParams>) -> Response {
    let (p, r, path, dot) = match params(p).and_then(|p| {
        let r = p.range.range()?;
        let path = ComputedFrom::choose(p.range.source.as_deref(), &r)?;
        let dot = match p.format.as_deref() {
            None | Some("json") => None,
            Some("dot") => Some(
                p.label
                    .as_deref()
                    .map(str::parse::<EdgeLabel>)
                    .transpose()
                    .map_err(QueryError::Invalid)?
                    .unwrap_or_default(),
            ),
            Some(other) => {
                return Err(QueryError::Invalid(format!(
                    "format must be json or dot, got {other:?}"
                )));
            }
        };
        Ok((p, r, path, dot))
    }) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let g = ServiceGraph::compute_by(&engine, &r, path)
        .await
        .map(|g| p.filtered(g));
    match (g, dot) {
        (Ok(g), Some(label)) => {
            let mut resp = (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/vnd.graphviz; charset=utf-8",
                )],
                g.to_dot(label),
            )
                .into_response();
            resp.headers_mut().insert(
                "x-meshscope-computed-from",
                axum::http::HeaderValue::from_static(path.name()),
            );
            resp
        }
        (g, _) => with_path(path, g.map(|g| g.to_json())),
    }
}

async fn security_series(
    State(engine): State<QueryEngine>,
    p: Params<EdgeRangeParams>,
) -> Response {
    answer(
        async {
            let p = params(p)?;
            let r = p.range.range()?;
            super::security::series(&engine, &r, p.source.as_deref(), p.target.as_deref()).await
        }
        .await,
    )
}

/// `start`, `end` and an edge's `source` / `target` (either may be left out): the
/// parameters of `GET /api/v1/mirrors` and `GET /api/v1/security/series`.
#[derive(Debug, Default, Deserialize)]
struct EdgeRangeParams {
    #[serde(flatten)]
    range: RangeParams,
    #[serde(default, deserialize_with = "empty_as_none")]
    source: Option<String>,
    #[serde(default, deserialize_with = "empty_as_none")]
    target: Option<String>,
}

async fn mirrors(State(engine): State<QueryEngine>, p: Params<EdgeRangeParams>) -> Response {
    answer(
        async {
            let p = params(p)?;
            let r = p.range.range()?;
            super::mirrors::compare(&engine, &r, p.source.as_deref(), p.target.as_deref()).await
        }
        .await,
    )
}

async fn graph_diff(State(engine): State<QueryEngine>, p: Params<DiffParams>) -> Response {
    let chosen = params(p).and_then(|p| {
        let (now, base) = p.windows()?;
        let t = p.thresholds()?;
        // Both windows by one path, chosen by the longer: a like-for-like comparison.
        let longer = if base.seconds() > now.seconds() {
            &base
        } else {
            &now
        };
        let path = ComputedFrom::choose(p.graph.range.source.as_deref(), longer)?;
        Ok((p, now, base, t, path))
    });
    let (p, now, base, t, path) = match chosen {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    with_path(
        path,
        async {
            let g = ServiceGraph::compute_by(&engine, &now, path).await?;
            let b = ServiceGraph::compute_by(&engine, &base, path).await?;
            let d = diff::diff(&p.graph.filtered(g), &p.graph.filtered(b), t);
            Ok(serde_json::json!({
                "start": now.start.to_rfc3339(),
                "end": now.end.to_rfc3339(),
                "base_start": base.start.to_rfc3339(),
                "base_end": base.end.to_rfc3339(),
                "nodes": d.nodes,
                "edges": d.edges,
                "thresholds": d.thresholds,
                "node_changes": d.node_changes,
                "edge_changes": d.edge_changes,
            }))
        }
        .await,
    )
}

async fn services(State(engine): State<QueryEngine>, p: Params<RangeParams>) -> Response {
    let chosen = params(p).and_then(|p| {
        let r = p.range()?;
        Ok((ComputedFrom::choose(p.source.as_deref(), &r)?, r))
    });
    match chosen {
        Ok((path, r)) => with_path(path, signals::services(&engine, &r, path).await),
        Err(e) => e.into_response(),
    }
}

/// The answer, with `x-meshscope-computed-from: spans|rollups`.
fn with_path<T: Serialize>(path: ComputedFrom, r: Result<T, QueryError>) -> Response {
    let mut resp = answer(r);
    resp.headers_mut().insert(
        "x-meshscope-computed-from",
        axum::http::HeaderValue::from_static(path.name()),
    );
    resp
}

async fn service(
    State(engine): State<QueryEngine>,
    Path(name): Path<String>,
    p: Params<RangeParams>,
) -> Response {
    match async { signals::service(&engine, &params(p)?.range()?, &name).await }.await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error_response(
            StatusCode::NOT_FOUND,
            format!("no spans of service {name:?} in the range"),
        ),
        Err(e) => e.into_response(),
    }
}

/// `?start&end&step&service` or `?start&end&step&source&target`, or neither: per-step
/// golden signals (`signals::series`).
async fn series(State(engine): State<QueryEngine>, q: Params<signals::SeriesQuery>) -> Response {
    answer(
        async {
            let q = params(q)?;
            let r = TimeRange::parse(q.start.as_deref(), q.end.as_deref(), chrono::Utc::now())?;
            signals::series(&engine, &r, &q).await
        }
        .await,
    )
}

async fn search(State(engine): State<QueryEngine>, p: Params<TraceParams>) -> Response {
    answer(
        async {
            let p = params(p)?;
            let r = p.range.range()?;
            traces::search(&engine, &r, &p.query()?).await
        }
        .await,
    )
}

async fn trace(State(engine): State<QueryEngine>, Path(id): Path<String>) -> Response {
    let Some(id) = traces::normalise_id(&id) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            format!("a trace id is 32 hex digits, got {id:?}"),
        );
    };
    match traces::get(&engine, &id).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error_response(StatusCode::NOT_FOUND, format!("no trace {id}")),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(q: &str) -> Result<T, QueryError> {
        let uri: axum::http::Uri = format!("/x?{q}").parse().unwrap();
        params(Query::try_from_uri(&uri))
    }

    #[test]
    fn empty_parameters_are_absent() {
        let p: GraphParams = parse("service=&depth=&namespace=shop&start=").unwrap();
        assert_eq!(p.service, None);
        assert_eq!(p.depth, None);
        assert_eq!(p.namespace.as_deref(), Some("shop"));
        assert!(p.range.start.is_none());
    }

    #[test]
    fn malformed_numbers_are_named() {
        let err = parse::<GraphParams>("service=cart&depth=two").unwrap_err();
        assert!(matches!(err, QueryError::Invalid(_)), "{err:?}");
        assert!(err.to_string().contains("two"), "{err}");
        let err = parse::<TraceParams>("min_duration_ms=slow").unwrap_err();
        assert!(err.to_string().contains("slow"), "{err}");
    }

    #[test]
    fn trace_search_parameters() {
        let p: TraceParams =
            parse("service=cart&status=error&min_duration_ms=2.5&attribute=http.route%3D%2Fcart%3Fa%3Db&limit=5&end=2026-12-01T10:00:00Z")
                .unwrap();
        assert_eq!(p.range.end.as_deref(), Some("2026-12-01T10:00:00Z"));
        let q = p.query().unwrap();
        assert_eq!(q.service.as_deref(), Some("cart"));
        assert_eq!(q.status.as_deref(), Some("error"));
        assert_eq!(q.min_duration_ms, Some(2.5));
        // Only the first `=` splits: values may hold more.
        assert_eq!(
            q.attributes,
            vec![("http.route".to_string(), "/cart?a=b".to_string())]
        );
        assert_eq!(q.limit, 5);
        assert_eq!(parse::<TraceParams>("").unwrap().query().unwrap().limit, 20);
        let err = parse::<TraceParams>("attribute=novalue")
            .unwrap()
            .query()
            .unwrap_err();
        assert!(err.to_string().contains("key=value"), "{err}");
    }

    #[test]
    fn several_attributes_logfmt_style() {
        let pairs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            logfmt(r#"http.route=/cart  region="eu \"west\"" empty="" a=b=c"#).unwrap(),
            pairs(&[
                ("http.route", "/cart"),
                ("region", "eu \"west\""),
                ("empty", ""),
                ("a", "b=c")
            ])
        );
        for bad in ["novalue", "a=\"open", "=x", "a=\"x\"y", "  "] {
            let e = logfmt(bad).unwrap_err();
            assert!(e.to_string().contains("key=value"), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_parameters_are_ignored_as_browsers_and_grafana_add_their_own() {
        let p: RangeParams = parse("_=1764580000&source=rollups").unwrap();
        assert_eq!(p.source.as_deref(), Some("rollups"));
    }
}
