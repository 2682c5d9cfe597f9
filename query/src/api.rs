//! `POST /api/v1/sql`: `{"sql": "…"}` → `{"columns":[{"name","type"}], "rows":[[…]]}`, or
//! an Arrow IPC stream with `Accept: application/vnd.apache.arrow.stream`.
//! Bad or writing SQL → 400 `{"error": "…"}`.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema};
use arrow::ipc::writer::StreamWriter;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::{QueryEngine, QueryError, QueryResult};

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
            QueryError::ResourcesExhausted(_) => StatusCode::SERVICE_UNAVAILABLE,
            QueryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error_response(status, self.to_string())
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
    let result = match engine.sql(&req.sql).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let wants_arrow = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains(ARROW_STREAM));
    // Encoding a large result is CPU work: on the query runtime, not the I/O threads.
    let rendered = engine
        .compute(move || {
            if wants_arrow {
                to_arrow_ipc(&result)
            } else {
                to_json(&result).map(|v| v.to_string().into_bytes())
            }
        })
        .await;
    match rendered {
        Err(e) => e.into_response(),
        Ok(Ok(body)) => {
            let ct = if wants_arrow {
                ARROW_STREAM
            } else {
                "application/json"
            };
            (StatusCode::OK, [(header::CONTENT_TYPE, ct)], body).into_response()
        }
        Ok(Err(e)) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the result: {e}"),
        ),
    }
}

fn to_arrow_ipc(r: &QueryResult) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let mut out = Vec::new();
    {
        let mut w = StreamWriter::try_new(&mut out, &r.schema)?;
        for b in &r.batches {
            w.write(b)?;
        }
        w.finish()?;
    }
    Ok(out)
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
