//! The analysis API: `/api/v1/graph`, `/api/v1/services[/{name}]`, `/api/v1/series`,
//! `/api/v1/traces[/{id}]`.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::graph::{ComputedFrom, ServiceGraph};
use super::range::TimeRange;
use super::signals;
use super::traces::{self, TraceQuery};
use crate::api::error_response;
use crate::engine::{QueryEngine, QueryError};

type Params = Query<HashMap<String, String>>;

fn range(p: &HashMap<String, String>) -> Result<TimeRange, QueryError> {
    TimeRange::parse(
        p.get("start").map(String::as_str),
        p.get("end").map(String::as_str),
        chrono::Utc::now(),
    )
}

pub fn router(engine: QueryEngine) -> Router {
    Router::new()
        .route("/api/v1/graph", get(graph))
        .route("/api/v1/services", get(services))
        .route("/api/v1/services/{name}", get(service))
        .route("/api/v1/series", get(series))
        .route("/api/v1/traces", get(search))
        .route("/api/v1/traces/{id}", get(trace))
        .with_state(engine)
}

fn answer(r: Result<serde_json::Value, QueryError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `?start&end&namespace&service&depth&source` (depth: hops around `service`, default 1;
/// source: `spans`, `rollups` or `auto`, the default, which uses rollups past an hour).
async fn graph(State(engine): State<QueryEngine>, Query(p): Params) -> Response {
    let r = match range(&p) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let path = match ComputedFrom::choose(p.get("source").map(String::as_str), &r) {
        Ok(path) => path,
        Err(e) => return e.into_response(),
    };
    with_path(
        path,
        async {
            let mut g = ServiceGraph::compute_by(&engine, &r, path).await?;
            if let Some(ns) = p.get("namespace").filter(|s| !s.is_empty()) {
                g = g.in_namespace(ns);
            }
            if let Some(svc) = p.get("service").filter(|s| !s.is_empty()) {
                let depth = match p.get("depth") {
                    Some(d) => d.parse().map_err(|_| {
                        QueryError::Invalid(format!("depth must be a whole number, got {d:?}"))
                    })?,
                    None => 1,
                };
                g = g.around(svc, depth);
            }
            Ok(g.to_json())
        }
        .await,
    )
}

async fn services(State(engine): State<QueryEngine>, Query(p): Params) -> Response {
    let r = match range(&p) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match ComputedFrom::choose(p.get("source").map(String::as_str), &r) {
        Ok(path) => with_path(path, signals::services(&engine, &r, path).await),
        Err(e) => e.into_response(),
    }
}

/// The answer, with `x-meshscope-computed-from: spans|rollups`.
fn with_path(path: ComputedFrom, r: Result<serde_json::Value, QueryError>) -> Response {
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
    Query(p): Params,
) -> Response {
    match async { signals::service(&engine, &range(&p)?, &name).await }.await {
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
async fn series(
    State(engine): State<QueryEngine>,
    q: Result<Query<signals::SeriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return QueryError::Invalid(e.body_text()).into_response(),
    };
    let r = async {
        let r = TimeRange::parse(q.start.as_deref(), q.end.as_deref(), chrono::Utc::now())?;
        signals::series(&engine, &r, &q).await
    }
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn search(State(engine): State<QueryEngine>, Query(p): Params) -> Response {
    answer(
        async {
            let r = range(&p)?;
            let num = |k: &str| -> Result<Option<f64>, QueryError> {
                p.get(k)
                    .filter(|s| !s.is_empty())
                    .map(|v| {
                        v.parse::<f64>().map_err(|_| {
                            QueryError::Invalid(format!("{k} must be a number, got {v:?}"))
                        })
                    })
                    .transpose()
            };
            let attribute = match p
                .get("attribute")
                .or_else(|| p.get("attr"))
                .filter(|s| !s.is_empty())
            {
                Some(a) => Some(
                    a.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| {
                            QueryError::Invalid(format!("attribute must be key=value, got {a:?}"))
                        })?,
                ),
                None => None,
            };
            let q = TraceQuery {
                service: p.get("service").filter(|s| !s.is_empty()).cloned(),
                span_name: p.get("span_name").filter(|s| !s.is_empty()).cloned(),
                status: p.get("status").filter(|s| !s.is_empty()).cloned(),
                min_duration_ms: num("min_duration_ms")?,
                attribute,
                limit: num("limit")?.map(|l| l as usize).unwrap_or(20),
            };
            traces::search(&engine, &r, &q).await
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
