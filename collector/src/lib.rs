//! # meshscope-collector
//!
//! The OTLP receivers: what faces proxies and SDKs on the network.
//!
//! ## Layout
//! - [`ingest`]: the one pipeline every receiver calls — OTLP request -> Arrow
//!   (`meshscope_proto::convert`) -> durable write (`meshscope_storage`) -> an outcome with
//!   the OTLP `partial_success` counts. Maps storage errors to "retry later" or "internal".
//! - [`grpc`]: `TraceService`, `MetricsService` and `LogsService` on tonic (port 4317), gzip
//!   accepted, message size limited.
//! - [`http`]: `POST /v1/traces|metrics|logs` on axum (port 4318), protobuf or JSON, gzip or
//!   not, answered in the request's encoding; body limits before and after decompression.
//! - [`tap`]: the live tap, `GET /api/v1/tap`: each request span, once durable, streamed
//!   as Server-Sent Events to the tappers whose filters it passes.

pub mod admission;
pub mod grpc;
pub mod http;
pub mod ingest;
pub mod tap;

pub use ingest::{Ingest, IngestError, IngestStats, Outcome};

/// Limits the receivers enforce on every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest request body accepted, after decompression (bytes).
    pub max_body_bytes: usize,
    /// Exports in progress at once, over gRPC and HTTP together; more are refused at once
    /// (`UNAVAILABLE` / 503 with `Retry-After`) before their bodies are read.
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 16 << 20,
            max_in_flight: 32,
        }
    }
}
