//! `POST /api/v1/sql`: `{"sql": "…"}` → `{"columns":[{"name","type"}], "rows":[[…]],
//! "truncated": false}` (at most `--sql-max-rows` rows; `"truncated": true` when there were
//! more), or an Arrow IPC stream of every row with `Accept: application/vnd.apache.arrow.stream`
//! (streamed batch by batch, in bounded memory).
//! Bad or writing SQL → 400 `{"error": "…"}`; past `--query-timeout-secs` → 408; every place
//! of `--max-concurrent-queries` taken for as long → 503 with `Retry-After`.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema};
use arrow::ipc::writer::StreamWriter;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::{Admitted, QueryEngine, QueryError, QueryResult};

pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    pub sql: String,
}

/// The SQL route; merged into the HTTP API router by the binary.
pub fn router(engine: QueryEngine) -> Router {
    Router::new()
        .route("/api/v1/sql", post(sql))
        .with_state(engine)
}

/// A JSON error answer `{"error": "…"}`.
pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let status = match &self {
            QueryError::ReadOnly(_) | QueryError::Invalid(_) => StatusCode::BAD_REQUEST,
            QueryError::ResourcesExhausted(_) | QueryError::Busy { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            QueryError::Timeout { .. } => StatusCode::REQUEST_TIMEOUT,
            QueryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut resp = error_response(status, self.to_string());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// `router`'s requests within the engine's limits (a place among the running requests,
/// the timeout): for the analysis routes, whose handlers run several queries.
pub fn bounded(router: Router, engine: QueryEngine) -> Router {
    router.layer(axum::middleware::from_fn_with_state(engine, limit))
}

async fn limit(State(engine): State<QueryEngine>, req: Request, next: Next) -> Response {
    match engine
        .bounded(async { Ok::<_, QueryError>(next.run(req).await) })
        .await
    {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn sql(
    State(engine): State<QueryEngine>,
    headers: HeaderMap,
    body: Result<Json<SqlRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"sql\": \"…\"}}: {e}"),
            );
        }
    };
    let wants_arrow = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains(ARROW_STREAM));
    let admitted = match engine.admit().await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    if wants_arrow {
        return arrow_stream(&engine, &req.sql, admitted)
            .await
            .unwrap_or_else(IntoResponse::into_response);
    }
    let max_rows = engine.limits().sql_max_rows;
    let answer = engine
        .until(&admitted, async {
            let (result, truncated) = engine.sql_capped(&req.sql, max_rows).await?;
            // Encoding a large result is CPU work: on the query runtime, not the I/O threads.
            engine
                .compute(move || {
                    to_json(&result).map(|mut v| {
                        v["truncated"] = Value::Bool(truncated);
                        v.to_string().into_bytes()
                    })
                })
                .await
        })
        .await;
    match answer {
        Err(e) => e.into_response(),
        Ok(Ok(body)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Ok(Err(e)) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the result: {e}"),
        ),
    }
}

/// Every row as an Arrow IPC stream, encoded batch by batch as the query produces them. An
/// error after the first batch ends the stream early (a reader sees it cut short, and the
/// server logs why).
async fn arrow_stream(
    engine: &QueryEngine,
    sql: &str,
    admitted: Admitted,
) -> Result<Response, QueryError> {
    let (schema, batches) = engine.sql_stream(sql, admitted).await?;
    let mut writer = StreamWriter::try_new(Vec::new(), &schema)
        .map_err(|e| QueryError::Internal(format!("encoding the result: {e}")))?;
    let head = std::mem::take(writer.get_mut());
    let chunks = futures::stream::unfold(Some((writer, batches)), |state| async move {
        let (mut writer, mut batches) = state?;
        let chunk = match batches.recv().await {
            Some(Ok(batch)) => writer.write(&batch).map(|()| true),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "an Arrow answer ended early");
                return None;
            }
            None => writer.finish().map(|()| false),
        };
        match chunk {
            Ok(more) => {
                let bytes = axum::body::Bytes::from(std::mem::take(writer.get_mut()));
                Some((
                    Ok::<_, std::io::Error>(bytes),
                    more.then_some((writer, batches)),
                ))
            }
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    let body =
        futures::stream::once(async move { Ok(axum::body::Bytes::from(head)) }).chain(chunks);
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, ARROW_STREAM)],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// One JSON value per row of a single column, through arrow-json (so nested types,
/// maps and timestamps come out the way Arrow's JSON writer prints them).
fn column_values(
    field: &Field,
    batch: &RecordBatch,
    i: usize,
) -> Result<Vec<Value>, arrow::error::ArrowError> {
    let one = Arc::new(Schema::new(vec![Field::new(
        "v",
        field.data_type().clone(),
        true,
    )]));
    let b = RecordBatch::try_new(one, vec![Arc::clone(batch.column(i))])?;
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::JsonArray>(&mut buf);
        w.write(&b)?;
        w.finish()?;
    }
    let rows: Vec<Value> = serde_json::from_slice(&buf)
        .map_err(|e| arrow::error::ArrowError::JsonError(e.to_string()))?;
    Ok(rows
        .into_iter()
        .map(|mut r| r.get_mut("v").map(Value::take).unwrap_or(Value::Null))
        .collect())
}

/// `{"columns":[{"name","type"}], "rows":[[…]]}`.
pub fn to_json(r: &QueryResult) -> Result<Value, arrow::error::ArrowError> {
    let columns: Vec<Value> = r
        .schema
        .fields()
        .iter()
        .map(|f| json!({ "name": f.name(), "type": f.data_type().to_string() }))
        .collect();
    let mut rows: Vec<Value> = Vec::new();
    for batch in &r.batches {
        let cols = r
            .schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| column_values(f, batch, i))
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            rows.push(Value::Array(
                cols.iter()
                    .map(|c| c.get(row).cloned().unwrap_or(Value::Null))
                    .collect(),
            ));
        }
    }
    Ok(json!({ "columns": columns, "rows": rows }))
}
