//! OTLP export requests as the tests build them, and posting them over OTLP/HTTP.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{Metric, ResourceMetrics, ScopeMetrics};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

/// A string attribute.
pub fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn resource(attributes: Vec<KeyValue>) -> Option<Resource> {
    Some(Resource {
        attributes,
        ..Default::default()
    })
}

/// One service's spans in one scope.
pub fn traces(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    traces_of(vec![kv("service.name", service)], spans)
}

/// Spans of the resource with these attributes, in one scope.
pub fn traces_of(
    resource_attributes: Vec<KeyValue>,
    spans: Vec<Span>,
) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: resource(resource_attributes),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// One service's metrics in one scope.
pub fn metrics(service: &str, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: resource(vec![kv("service.name", service)]),
            scope_metrics: vec![ScopeMetrics {
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Log records of the resource with these attributes, in one scope.
pub fn logs_of(
    resource_attributes: Vec<KeyValue>,
    log_records: Vec<LogRecord>,
) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: resource(resource_attributes),
            scope_logs: vec![ScopeLogs {
                log_records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Posts a request as protobuf to an OTLP/HTTP URL (`…/v1/traces`); it must be accepted.
pub async fn post(url: &str, request: &impl Message) {
    post_with(&reqwest::Client::new(), url, request).await
}

/// [`post`] through `client` (whose connection stays open for the next request).
pub async fn post_with(client: &reqwest::Client, url: &str, request: &impl Message) {
    let r = client
        .post(url)
        .header("content-type", "application/x-protobuf")
        .body(request.encode_to_vec())
        .send()
        .await
        .expect("export");
    assert_eq!(r.status(), 200, "{url}");
}

/// The OpenTelemetry SDK's tracer provider for `service`, batching into `exporter` (the
/// caller flushes or shuts it down before counting what arrived).
pub fn sdk_tracer_provider(
    exporter: opentelemetry_otlp::SpanExporter,
    service: &str,
) -> opentelemetry_sdk::trace::SdkTracerProvider {
    opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build()
}
