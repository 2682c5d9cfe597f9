//! The admin endpoint: `GET /stats` (JSON: requests, telemetry pipeline counters, breaker
//! states, identity and certificate expiry), `GET /metrics` (OpenMetrics text of the same, through `prometheus-client`), `GET /ready`.

use crate::outbound::Route;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::identity::MeshIdentity;
use crate::outbound::SharedRoutes;
use crate::telemetry::Telemetry;

/// What the admin listener reads from.
#[derive(Clone)]
pub struct Admin {
    pub telemetry: Telemetry,
    pub routes: SharedRoutes,
    pub mesh: Option<Arc<MeshIdentity>>,
    pub reloads: Arc<crate::Reloads>,
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/ready", get(|| async { "ready\n" }))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .with_state(admin)
}

fn breakers(a: &Admin) -> Vec<(String, &'static str)> {
    a.routes
        .read()
        .map(|r| {
            r.routes
                .iter()
                .filter_map(|route| {
                    route
                        .breaker
                        .as_ref()
                        .map(|b| (route.config.name.clone(), b.state().as_str()))
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn stats(State(a): State<Admin>) -> axum::Json<serde_json::Value> {
    let mut v = a.telemetry.stats().json();
    v["service"] = serde_json::json!(a.telemetry.service());
    v["requests"] = serde_json::json!(a.telemetry.registry().requests());
    let b: serde_json::Map<String, serde_json::Value> = breakers(&a)
        .into_iter()
        .map(|(k, s)| (k, serde_json::json!(s)))
        .collect();
    v["breakers"] = serde_json::Value::Object(b);
    let r = &a.reloads;
    v["config"] = serde_json::json!({
        "reloads": r.applied.load(Ordering::Relaxed),
        "rejected": r.rejected.load(Ordering::Relaxed),
        "last_error": r.last_error(),
    });
    if let Some(m) = &a.mesh {
        v["identity"] = serde_json::json!({
            "spiffe_id": m.id().to_string(),
            "mode": format!("{:?}", m.mode()).to_ascii_lowercase(),
            "certificate_expiry_unix": m.expiry_unix(),
            "renewed": m.renewed.load(Ordering::Relaxed),
            "renew_failures": m.renew_failures.load(Ordering::Relaxed),
            "inbound_refused": m.inbound_refused.load(Ordering::Relaxed),
        });
    }
    axum::Json(v)
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SignalLabel {
    signal: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// A counter per destination: name, help, and its value for a route (`None`: not
/// exposed for it, e.g. no breaker configured).
type RouteCounter = (&'static str, &'static str, fn(&Route) -> Option<u64>);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DestinationLabel {
    destination: String,
}

/// The request metrics, the telemetry pipeline and the breakers, read on each scrape.
impl Collector for Admin {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        self.telemetry.registry().encode(&mut enc)?;
        let s = self.telemetry.stats();
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, spans, logs) in [
            (
                "meshscope_proxy_telemetry_dropped",
                "Spans and log records dropped because the export queue was full.",
                l(&s.spans_dropped),
                l(&s.logs_dropped),
            ),
            (
                "meshscope_proxy_telemetry_exported",
                "Spans and log records exported over OTLP.",
                l(&s.spans_exported),
                l(&s.logs_exported),
            ),
        ] {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (signal, v) in [("spans", spans), ("logs", logs)] {
                family
                    .encode_family(&SignalLabel { signal })?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
        {
            let mut reloads = enc.encode_descriptor(
                "meshscope_proxy_config_reloads",
                "Changes of the config file applied or refused (the previous config kept).",
                None,
                MetricType::Counter,
            )?;
            for (result, counter) in [
                ("applied", &self.reloads.applied),
                ("rejected", &self.reloads.rejected),
            ] {
                reloads
                    .encode_family(&ResultLabel { result })?
                    .encode_counter::<NoLabelSet, _, u64>(&l(counter), None)?;
            }
        }
        {
            let mut open = enc.encode_descriptor(
                "meshscope_proxy_breaker_open",
                "1 while the route's circuit breaker is open.",
                None,
                MetricType::Gauge,
            )?;
            for (destination, state) in breakers(self) {
                open.encode_family(&DestinationLabel { destination })?
                    .encode_gauge(&u64::from(state == "open"))?;
            }
        }
        {
            let routes = self
                .routes
                .read()
                .map(|r| r.routes.clone())
                .unwrap_or_default();
            let counters: [RouteCounter; 3] = [
                (
                    "meshscope_proxy_ejections",
                    "Endpoints taken out of rotation by outlier ejection.",
                    |r| {
                        Some(
                            r.splits()
                                .map(|s| s.ejections.load(Ordering::Relaxed))
                                .sum(),
                        )
                    },
                ),
                (
                    "meshscope_proxy_breaker_transitions",
                    "Circuit breaker state changes (opened, closed by a probe, opened again).",
                    |r| {
                        r.breaker
                            .as_ref()
                            .map(|b| b.transitions.load(Ordering::Relaxed))
                    },
                ),
                (
                    "meshscope_proxy_retry_budget_exhausted",
                    "Retries that were due but refused by the retry budget.",
                    |r| {
                        r.retry
                            .as_ref()
                            .map(|p| p.exhausted.load(Ordering::Relaxed))
                    },
                ),
            ];
            for (name, help, value) in counters {
                let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
                for r in &routes {
                    if let Some(n) = value(r) {
                        family
                            .encode_family(&DestinationLabel {
                                destination: r.config.name.clone(),
                            })?
                            .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                    }
                }
            }
            let mut ejected = enc.encode_descriptor(
                "meshscope_proxy_endpoints_ejected",
                "Endpoints out of rotation now.",
                None,
                MetricType::Gauge,
            )?;
            for r in &routes {
                ejected
                    .encode_family(&DestinationLabel {
                        destination: r.config.name.clone(),
                    })?
                    .encode_gauge(&(r.splits().map(|s| s.ejected()).sum::<usize>() as i64))?;
            }
        }
        if let Some(m) = &self.mesh {
            enc.encode_descriptor(
                "meshscope_proxy_certificate_expiry_timestamp_seconds",
                "When this proxy's workload certificate expires (Unix seconds).",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&(m.expiry_unix() as i64))?;
            for (name, help, v) in [
                (
                    "meshscope_proxy_certificate_renewals",
                    "Workload certificates renewed.",
                    l(&m.renewed),
                ),
                (
                    "meshscope_proxy_certificate_renew_failures",
                    "Renewal attempts that failed (retried while the certificate is valid).",
                    l(&m.renew_failures),
                ),
                (
                    "meshscope_proxy_inbound_tls_refused",
                    "Inbound connections refused: plaintext on a strict listener, or a failed \
                     mTLS handshake.",
                    l(&m.inbound_refused),
                ),
            ] {
                enc.encode_descriptor(name, help, None, MetricType::Counter)?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
        Ok(())
    }
}

async fn metrics(State(a): State<Admin>) -> Response {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(a));
    let mut out = String::new();
    match encode(&mut out, &registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], out).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The OpenMetrics content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
