//! OTLP/gRPC: the three export services on tonic.

use std::future::Future;

use meshscope_auth::{Auth, Scope, Surface};
use meshscope_proto::otlp::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use meshscope_proto::otlp::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use meshscope_proto::otlp::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use meshscope_proto::otlp::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use meshscope_proto::otlp::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use meshscope_proto::otlp::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::Limits;
use crate::ingest::{Ingest, IngestError};

/// The gRPC services, sharing one [`Ingest`].
#[derive(Debug, Clone)]
pub struct Grpc {
    ingest: Ingest,
}

fn status(e: IngestError) -> Status {
    match e {
        IngestError::Overloaded(m) | IngestError::Unavailable(m) => Status::unavailable(m),
        IngestError::Internal(m) => Status::internal(m),
    }
}

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let o = self
            .ingest
            .traces(request.get_ref())
            .await
            .map_err(status)?;
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: o.partial_success().map(|(rejected_spans, error_message)| {
                ExportTracePartialSuccess {
                    rejected_spans,
                    error_message,
                }
            }),
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let o = self
            .ingest
            .metrics(request.get_ref())
            .await
            .map_err(status)?;
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: o
                .partial_success()
                .map(
                    |(rejected_data_points, error_message)| ExportMetricsPartialSuccess {
                        rejected_data_points,
                        error_message,
                    },
                ),
        }))
    }
}

#[tonic::async_trait]
impl LogsService for Grpc {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        let o = self.ingest.logs(request.get_ref()).await.map_err(status)?;
        Ok(Response::new(ExportLogsServiceResponse {
            partial_success: o
                .partial_success()
                .map(
                    |(rejected_log_records, error_message)| ExportLogsPartialSuccess {
                        rejected_log_records,
                        error_message,
                    },
                ),
        }))
    }
}

/// Refuses a call without an `ingest` token before its message is decoded:
/// UNAUTHENTICATED for a missing or unknown token, PERMISSION_DENIED without the scope.
#[derive(Clone)]
struct RequireIngest(Auth);

impl tonic::service::Interceptor for RequireIngest {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req.metadata().get("authorization").map(|v| v.as_bytes());
        match self
            .0
            .check_header(Surface::OtlpGrpc, presented, Scope::Ingest)
        {
            Ok(_) => Ok(req),
            Err(denied) if denied.is_unauthenticated() => {
                Err(Status::unauthenticated(denied.to_string()))
            }
            Err(denied) => Err(Status::permission_denied(denied.to_string())),
        }
    }
}

/// The server's certificate chain and key, and the CA client certificates must chain to
/// (PEM), for OTLP/gRPC over TLS.
#[derive(Debug, Clone)]
pub struct TlsPem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

/// Serves OTLP/gRPC on `listener` until `shutdown` completes, over TLS with `tls`; every
/// call needs an `ingest` token unless `auth` is open.
pub async fn serve(
    listener: TcpListener,
    ingest: Ingest,
    admission: crate::admission::Admission,
    limits: Limits,
    auth: Auth,
    tls: Option<TlsPem>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let gate = RequireIngest(auth);
    let g = Grpc { ingest };
    let max = limits.max_body_bytes;
    let traces = TraceServiceServer::new(g.clone())
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max);
    let metrics = MetricsServiceServer::new(g.clone())
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max);
    let logs = LogsServiceServer::new(g)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(max);
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        let mut config = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(tls.cert, tls.key));
        if let Some(ca) = tls.client_ca {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        server = server.tls_config(config)?;
    }
    server
        .layer(tower::util::MapResponseLayer::new(
            decode_errors_are_invalid_argument,
        ))
        .layer(crate::admission::AdmissionLayer(admission))
        .add_service(InterceptedService::new(traces, gate.clone()))
        .add_service(InterceptedService::new(metrics, gate.clone()))
        .add_service(InterceptedService::new(logs, gate))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
}

/// tonic answers an undecodable protobuf message with INTERNAL and an over-limit one with
/// OUT_OF_RANGE (its reading of the gRPC status-code guide). The contract, like the OTLP
/// specification, says INVALID_ARGUMENT (do not retry) and RESOURCE_EXHAUSTED. Both
/// answers are produced by tonic before our handler runs and are recognised by their message.
fn decode_errors_are_invalid_argument<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let h = resp.headers();
    // grpc-message is percent-encoded; spaces are all we need to read it.
    let message = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("")
        .replace("%20", " ");
    let rewritten = match h.get("grpc-status").and_then(|v| v.to_str().ok()) {
        Some("13") if message.starts_with("failed to decode Protobuf message") => Some("3"),
        Some("11") if message.contains("message length too large") => Some("8"),
        _ => None,
    };
    if let Some(code) = rewritten {
        resp.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static(code));
    }
    resp
}
