//! The admin endpoint: `GET /stats` (JSON: requests, telemetry pipeline counters, breaker
//! states), `GET /metrics` (Prometheus text of the same), `GET /ready`.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use crate::outbound::SharedRoutes;
use crate::telemetry::Telemetry;

#[derive(Clone)]
struct Admin {
    telemetry: Telemetry,
    routes: SharedRoutes,
}

pub fn router(telemetry: Telemetry, routes: SharedRoutes) -> Router {
    Router::new()
        .route("/ready", get(|| async { "ready\n" }))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .with_state(Admin { telemetry, routes })
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
    axum::Json(v)
}

async fn metrics(State(a): State<Admin>) -> String {
    let mut out = String::new();
    a.telemetry.registry().prometheus(&mut out);
    let s = a.telemetry.stats().json();
    let _ = writeln!(
        out,
        "# TYPE meshscope_proxy_telemetry_dropped_total counter"
    );
    for signal in ["spans", "logs"] {
        let _ = writeln!(
            out,
            "meshscope_proxy_telemetry_dropped_total{{signal=\"{signal}\"}} {}",
            s[format!("{signal}_dropped")]
        );
    }
    let _ = writeln!(
        out,
        "# TYPE meshscope_proxy_telemetry_exported_total counter"
    );
    for signal in ["spans", "logs"] {
        let _ = writeln!(
            out,
            "meshscope_proxy_telemetry_exported_total{{signal=\"{signal}\"}} {}",
            s[format!("{signal}_exported")]
        );
    }
    let _ = writeln!(out, "# TYPE meshscope_proxy_breaker_open gauge");
    for (name, state) in breakers(&a) {
        let _ = writeln!(
            out,
            "meshscope_proxy_breaker_open{{destination=\"{name}\"}} {}",
            u8::from(state == "open")
        );
    }
    let _ = Arc::strong_count(&a.routes);
    out
}
