//! The batching OTLP/gRPC exporter: every `batch-interval-ms` it drains the queue into
//! export requests of at most `max-batch` records (spans, log records) and sends the
//! metric registry's cumulative snapshot. An export that fails or takes longer than
//! `export-timeout-ms` is abandoned and its records counted as dropped; the queue keeps
//! filling meanwhile and drops what does not fit, so traffic never waits on the collector.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{ResourceMetrics, ScopeMetrics};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tokio::sync::mpsc;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{Record, Telemetry};
use crate::config::TelemetryConfig;

pub struct Exporter {
    config: TelemetryConfig,
    resource: Resource,
    queue: mpsc::Receiver<Box<Record>>,
    telemetry: Telemetry,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("invalid OTLP endpoint {0:?}: {1}")]
    Endpoint(String, String),
    #[error("cannot read the OTLP token file {0}: {1}")]
    Token(String, String),
}

/// Adds `authorization: Bearer <token>` to every export (nothing without a token file).
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl Bearer {
    fn from_file(path: Option<&std::path::Path>) -> Result<Bearer, ExportError> {
        let Some(path) = path else {
            return Ok(Bearer(None));
        };
        let shown = || path.display().to_string();
        let token = std::fs::read_to_string(path)
            .map_err(|e| ExportError::Token(shown(), e.to_string()))?;
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| ExportError::Token(shown(), "not a printable ASCII token".into()))?;
        Ok(Bearer(Some(value)))
    }
}

type Authorized = InterceptedService<Channel, Bearer>;

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "meshscope-proxy".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

/// The whole batches of `v` (multiples of `n` records), leaving the rest in `v`.
fn full<T>(v: &mut Vec<T>, n: usize) -> Vec<T> {
    let whole = v.len() / n * n;
    let rest = v.split_off(whole);
    std::mem::replace(v, rest)
}

/// `v` in owned pieces of at most `n` (no copies).
fn batches<T>(mut v: Vec<T>, n: usize) -> Vec<Vec<T>> {
    let mut out = vec![];
    while v.len() > n {
        let rest = v.split_off(n);
        out.push(std::mem::replace(&mut v, rest));
    }
    if !v.is_empty() {
        out.push(v);
    }
    out
}

struct Clients {
    traces: TraceServiceClient<Authorized>,
    metrics: MetricsServiceClient<Authorized>,
    logs: LogsServiceClient<Authorized>,
}

impl Exporter {
    pub(crate) fn new(
        config: TelemetryConfig,
        resource: Resource,
        queue: mpsc::Receiver<Box<Record>>,
        telemetry: Telemetry,
    ) -> Exporter {
        Exporter {
            config,
            resource,
            queue,
            telemetry,
        }
    }

    /// Checks the endpoint and reads the token file, so a mistake stops the proxy at start.
    pub(crate) fn check(&self) -> Result<(), ExportError> {
        self.clients().map(drop)
    }

    fn clients(&self) -> Result<Option<Clients>, ExportError> {
        let Some(url) = &self.config.otlp_endpoint else {
            return Ok(None);
        };
        let channel = Channel::from_shared(url.clone())
            .map_err(|e| ExportError::Endpoint(url.clone(), e.to_string()))?
            .connect_timeout(Duration::from_millis(self.config.export_timeout_ms))
            .tcp_nodelay(true)
            .connect_lazy();
        let bearer = Bearer::from_file(self.config.otlp_token_file.as_deref())?;
        Ok(Some(Clients {
            traces: TraceServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            metrics: MetricsServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            logs: LogsServiceClient::with_interceptor(channel, bearer),
        }))
    }

    /// Runs until `stop`, then sends what is queued one last time. Every 100 ms full
    /// batches (`max-batch`) are sent, so export work is spread; the rest and the metrics
    /// every `batch-interval-ms`. (The queue is read in turns, not per record, so the
    /// request path never wakes the exporter.)
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<(), ExportError> {
        let mut clients = self.clients()?;
        let every = Duration::from_millis(self.config.batch_interval_ms);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pace = tokio::time::interval(every.min(Duration::from_millis(100)));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut spans = Vec::new();
        let mut logs = Vec::new();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.drain(&mut spans, &mut logs);
                    self.send_spans(clients.as_mut(), std::mem::take(&mut spans)).await;
                    self.send_logs(clients.as_mut(), std::mem::take(&mut logs)).await;
                    self.send_metrics(clients.as_mut()).await;
                }
                _ = pace.tick() => {
                    if self.queue.len() < self.config.max_batch {
                        continue;
                    }
                    self.drain(&mut spans, &mut logs);
                    let s = full(&mut spans, self.config.max_batch);
                    self.send_spans(clients.as_mut(), s).await;
                    let l = full(&mut logs, self.config.max_batch);
                    self.send_logs(clients.as_mut(), l).await;
                }
                () = &mut stop => {
                    self.drain(&mut spans, &mut logs);
                    self.send_spans(clients.as_mut(), spans).await;
                    self.send_logs(clients.as_mut(), logs).await;
                    self.send_metrics(clients.as_mut()).await;
                    return Ok(());
                }
            }
        }
    }

    fn drain(&mut self, spans: &mut Vec<Span>, logs: &mut Vec<LogRecord>) {
        while let Ok(r) = self.queue.try_recv() {
            self.telemetry.render(&r, spans, logs);
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.export_timeout_ms)
    }

    async fn send_spans(&self, clients: Option<&mut Clients>, spans: Vec<Span>) {
        let (Some(c), false) = (clients, spans.is_empty()) else {
            return;
        };
        let stats = self.telemetry.stats();
        for chunk in batches(spans, self.config.max_batch) {
            let n = chunk.len() as u64;
            let req = self.spans_request(chunk);
            match tokio::time::timeout(self.timeout(), c.traces.export(req)).await {
                Ok(Ok(_)) => stats.spans_exported.fetch_add(n, Ordering::Relaxed),
                r => {
                    tracing::debug!(error = ?r.err(), "span export failed");
                    stats.export_failures.fetch_add(1, Ordering::Relaxed);
                    stats.spans_dropped.fetch_add(n, Ordering::Relaxed)
                }
            };
        }
    }

    async fn send_logs(&self, clients: Option<&mut Clients>, logs: Vec<LogRecord>) {
        let (Some(c), false) = (clients, logs.is_empty()) else {
            return;
        };
        let stats = self.telemetry.stats();
        for chunk in batches(logs, self.config.max_batch) {
            let n = chunk.len() as u64;
            let req = self.logs_request(chunk);
            match tokio::time::timeout(self.timeout(), c.logs.export(req)).await {
                Ok(Ok(_)) => stats.logs_exported.fetch_add(n, Ordering::Relaxed),
                _ => {
                    stats.export_failures.fetch_add(1, Ordering::Relaxed);
                    stats.logs_dropped.fetch_add(n, Ordering::Relaxed)
                }
            };
        }
    }

    async fn send_metrics(&self, clients: Option<&mut Clients>) {
        let Some(c) = clients else {
            return;
        };
        let stats = self.telemetry.stats();
        let metrics = self.telemetry.registry().snapshot();
        if metrics.is_empty() {
            return;
        }
        let req = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(scope()),
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        match tokio::time::timeout(self.timeout(), c.metrics.export(req)).await {
            Ok(Ok(_)) => stats.metric_exports.fetch_add(1, Ordering::Relaxed),
            _ => stats.export_failures.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn spans_request(&self, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope()),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn logs_request(&self, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(scope()),
                    log_records: records,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }
}
