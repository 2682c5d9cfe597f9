//! OTLP/HTTP: `POST /v1/traces`, `/v1/metrics`, `/v1/logs`.
//!
//! - `Content-Type: application/x-protobuf` or `application/json` (OTLP/JSON); anything
//!   else is 415. The response uses the request's encoding.
//! - `Content-Encoding: gzip` is accepted; other codings are 415.
//! - Bodies over the limit are 413, before and after decompression (so a gzip bomb stops
//!   at the limit). Undecodable bodies are 400 with a `google.rpc.Status` saying why.
//! - Overload is 503 with `Retry-After`.

// The helpers' errors are finished HTTP responses, returned to the client as they are.
#![allow(clippy::result_large_err)]

use std::io::Read;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use meshscope_proto::Table;
use meshscope_proto::otlp::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use meshscope_proto::otlp::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use meshscope_proto::otlp::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};

use meshscope_auth::http::Gate;
use meshscope_auth::{Auth, Scope, Surface};
use tonic::Code;

use crate::Limits;
use crate::ingest::{Ingest, IngestError};

#[derive(Clone)]
struct AppState {
    ingest: Ingest,
    limits: Limits,
}

/// The OTLP/HTTP routes; every request needs an `ingest` token unless `auth` is open
/// (401 / 403 before the body is read).
pub fn router(
    ingest: Ingest,
    admission: crate::admission::Admission,
    limits: Limits,
    auth: Auth,
) -> Router {
    let routes = Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/metrics", post(metrics))
        .route("/v1/logs", post(logs))
        // The compressed body may not exceed the limit either.
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(admission, admit))
        .with_state(AppState { ingest, limits });
    Gate {
        auth,
        surface: Surface::OtlpHttp,
        scope_of: |_, _| Some(Scope::Ingest),
        render: refusal,
    }
    .guard(routes)
}

/// 503 with `Retry-After` when every place for an export is taken (before the body is read).
async fn admit(
    axum::extract::State(admission): axum::extract::State<crate::admission::Admission>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match admission.try_admit() {
        Some(place) => {
            let resp = next.run(req).await;
            drop(place);
            resp
        }
        None => {
            let enc = encoding(req.headers()).unwrap_or(Encoding::Json);
            error(
                enc,
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                admission.message(),
            )
        }
    }
}

/// A refused credential, as a `google.rpc.Status` in the request's encoding.
fn refusal(headers: &HeaderMap, status: StatusCode, message: String) -> Response {
    let enc = encoding(headers).unwrap_or(Encoding::Json);
    let code = if status == StatusCode::UNAUTHORIZED {
        Code::Unauthenticated
    } else {
        Code::PermissionDenied
    };
    error(enc, status, code, message)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

/// `google.rpc.Status`, the body OTLP/HTTP error responses carry.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// An error answer: `google.rpc.Status` with the gRPC `code`, in the request's encoding.
fn error(enc: Encoding, status: StatusCode, code: Code, message: String) -> Response {
    let code = code as i32;
    let mut resp = match enc {
        Encoding::Json => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "code": code, "message": message }).to_string(),
        )
            .into_response(),
        Encoding::Protobuf => (
            status,
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            prost::Message::encode_to_vec(&RpcStatus { code, message }),
        )
            .into_response(),
    };
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn encoding(headers: &HeaderMap) -> Result<Encoding, Response> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/x-protobuf" | "application/protobuf" => Ok(Encoding::Protobuf),
        "application/json" => Ok(Encoding::Json),
        _ => Err(error(
            Encoding::Json,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::InvalidArgument,
            format!(
                "unsupported content type {ct:?}: use application/x-protobuf or application/json"
            ),
        )),
    }
}

/// The request body, decompressed, within the limit.
fn body(enc: Encoding, headers: &HeaderMap, raw: Bytes, limit: usize) -> Result<Bytes, Response> {
    let coding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    match coding.as_str() {
        "" | "identity" => Ok(raw),
        "gzip" | "x-gzip" => {
            let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(limit));
            let mut reader = flate2::read::MultiGzDecoder::new(&raw[..]).take(limit as u64 + 1);
            if let Err(e) = reader.read_to_end(&mut out) {
                return Err(error(
                    enc,
                    StatusCode::BAD_REQUEST,
                    Code::InvalidArgument,
                    format!("invalid gzip body: {e}"),
                ));
            }
            if out.len() > limit {
                return Err(error(
                    enc,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Code::ResourceExhausted,
                    format!("decompressed body exceeds the limit of {limit} bytes"),
                ));
            }
            Ok(Bytes::from(out))
        }
        other => Err(error(
            enc,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::InvalidArgument,
            format!("unsupported content encoding {other:?}: use gzip or none"),
        )),
    }
}

/// Decodes an OTLP/HTTP body, protobuf or (`json`) OTLP/JSON, exactly as the receiver does
/// (its error text is the 400 answer's message). Public for the fuzz targets.
pub fn decode_otlp<T>(json: bool, bytes: &[u8]) -> Result<T, String>
where
    T: prost::Message + Default + serde::de::DeserializeOwned,
{
    decode(
        if json {
            Encoding::Json
        } else {
            Encoding::Protobuf
        },
        bytes,
    )
}

fn decode<T>(enc: Encoding, bytes: &[u8]) -> Result<T, String>
where
    T: prost::Message + Default + serde::de::DeserializeOwned,
{
    match enc {
        Encoding::Protobuf => T::decode(bytes).map_err(|e| format!("invalid protobuf body: {e}")),
        Encoding::Json => {
            serde_json::from_slice(bytes).map_err(|e| format!("invalid OTLP/JSON body: {e}"))
        }
    }
}

fn ok<T: prost::Message + serde::Serialize>(enc: Encoding, msg: &T) -> Response {
    match enc {
        Encoding::Protobuf => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            msg.encode_to_vec(),
        )
            .into_response(),
        Encoding::Json => match serde_json::to_value(msg) {
            Ok(mut body) => {
                // Leave out absent fields (`"partialSuccess": null`) as protobuf JSON does.
                if let Some(map) = body.as_object_mut() {
                    map.retain(|_, v| !v.is_null());
                }
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    body.to_string(),
                )
                    .into_response()
            }
            Err(e) => error(
                enc,
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Internal,
                e.to_string(),
            ),
        },
    }
}

fn failed(enc: Encoding, e: IngestError) -> Response {
    match e {
        IngestError::Overloaded(m) | IngestError::Unavailable(m) => {
            error(enc, StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, m)
        }
        IngestError::Internal(m) => {
            error(enc, StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, m)
        }
    }
}

/// Decodes the request or answers the client's error.
fn request<T>(
    s: &AppState,
    table: Table,
    headers: &HeaderMap,
    raw: Bytes,
) -> Result<(Encoding, T), Response>
where
    T: prost::Message + Default + serde::de::DeserializeOwned,
{
    let enc = encoding(headers).inspect_err(|_| s.ingest.bad_request(table))?;
    let bytes = body(enc, headers, raw, s.limits.max_body_bytes)
        .inspect_err(|_| s.ingest.bad_request(table))?;
    let req = decode::<T>(enc, &bytes).map_err(|m| {
        s.ingest.bad_request(table);
        error(enc, StatusCode::BAD_REQUEST, Code::InvalidArgument, m)
    })?;
    Ok((enc, req))
}

async fn traces(State(s): State<AppState>, headers: HeaderMap, raw: Bytes) -> Response {
    let (enc, req) = match request::<ExportTraceServiceRequest>(&s, Table::Spans, &headers, raw) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match s.ingest.traces(&req).await {
        Ok(o) => ok(
            enc,
            &ExportTraceServiceResponse {
                partial_success: o.partial_success().map(|(rejected_spans, error_message)| {
                    ExportTracePartialSuccess {
                        rejected_spans,
                        error_message,
                    }
                }),
            },
        ),
        Err(e) => failed(enc, e),
    }
}

async fn metrics(State(s): State<AppState>, headers: HeaderMap, raw: Bytes) -> Response {
    let (enc, req) = match request::<ExportMetricsServiceRequest>(&s, Table::Metrics, &headers, raw)
    {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match s.ingest.metrics(&req).await {
        Ok(o) => ok(
            enc,
            &ExportMetricsServiceResponse {
                partial_success: o.partial_success().map(
                    |(rejected_data_points, error_message)| ExportMetricsPartialSuccess {
                        rejected_data_points,
                        error_message,
                    },
                ),
            },
        ),
        Err(e) => failed(enc, e),
    }
}

async fn logs(State(s): State<AppState>, headers: HeaderMap, raw: Bytes) -> Response {
    let (enc, req) = match request::<ExportLogsServiceRequest>(&s, Table::Logs, &headers, raw) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    match s.ingest.logs(&req).await {
        Ok(o) => ok(
            enc,
            &ExportLogsServiceResponse {
                partial_success: o.partial_success().map(
                    |(rejected_log_records, error_message)| ExportLogsPartialSuccess {
                        rejected_log_records,
                        error_message,
                    },
                ),
            },
        ),
        Err(e) => failed(enc, e),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn gzip(data: &[u8]) -> Bytes {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        Bytes::from(e.finish().unwrap())
    }

    #[test]
    fn content_types_pick_the_encoding() {
        let ct = |v: &str| encoding(&headers(&[(header::CONTENT_TYPE, v)]));
        assert_eq!(ct("application/x-protobuf").unwrap(), Encoding::Protobuf);
        assert_eq!(ct("application/protobuf").unwrap(), Encoding::Protobuf);
        assert_eq!(
            ct("Application/JSON; charset=utf-8").unwrap(),
            Encoding::Json
        );
        let refused = ct("text/plain").unwrap_err();
        assert_eq!(refused.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let missing = encoding(&HeaderMap::new()).unwrap_err();
        assert_eq!(missing.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn bodies_are_decompressed_within_the_limit() {
        let plain = Bytes::from_static(b"0123456789");
        let none = body(Encoding::Json, &HeaderMap::new(), plain.clone(), 100).unwrap();
        assert_eq!(none, plain);
        let gz = headers(&[(header::CONTENT_ENCODING, "gzip")]);
        assert_eq!(body(Encoding::Json, &gz, gzip(&plain), 100).unwrap(), plain);
        // A small body that inflates past the limit is refused, not inflated whole.
        let bomb = gzip(&vec![0u8; 1 << 20]);
        assert!(bomb.len() < 10_000);
        let r = body(Encoding::Protobuf, &gz, bomb, 1000).unwrap_err();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let r = body(Encoding::Json, &gz, plain.clone(), 100).unwrap_err();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "not gzip");
        let br = headers(&[(header::CONTENT_ENCODING, "br")]);
        let r = body(Encoding::Json, &br, plain, 100).unwrap_err();
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn errors_carry_a_status_in_the_requests_encoding() {
        let r = error(
            Encoding::Protobuf,
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "busy".into(),
        );
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/x-protobuf");
        assert_eq!(
            r.headers()[header::RETRY_AFTER],
            "1",
            "retryable: when to come back"
        );
        let r = error(
            Encoding::Json,
            StatusCode::BAD_REQUEST,
            Code::InvalidArgument,
            "bad".into(),
        );
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn otlp_json_and_protobuf_decode_and_garbage_is_an_error() {
        let req: ExportTraceServiceRequest =
            decode(Encoding::Json, br#"{"resourceSpans":[]}"#).unwrap();
        assert!(req.resource_spans.is_empty());
        let bytes = prost::Message::encode_to_vec(&req);
        let back: ExportTraceServiceRequest = decode(Encoding::Protobuf, &bytes).unwrap();
        assert_eq!(back, req);
        let e = decode::<ExportTraceServiceRequest>(Encoding::Json, b"{nope").unwrap_err();
        assert!(e.contains("invalid OTLP/JSON"), "{e}");
        let e = decode::<ExportTraceServiceRequest>(Encoding::Protobuf, &[0xff, 0xff]).unwrap_err();
        assert!(e.contains("invalid protobuf"), "{e}");
    }
}
