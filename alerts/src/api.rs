//! The alerts API, merged into the HTTP API router by the binary:
//! - `GET /api/v1/alerts/rules` → every rule with its origin and health;
//! - `POST /api/v1/alerts/rules` (a rule spec) → 201 `{"rule", "warnings"}`;
//! - `GET|PUT|DELETE /api/v1/alerts/rules/{name}`;
//! - `GET /api/v1/alerts?state=firing&rule=` → alerts with their state and evidence;
//! - `GET /api/v1/alerts/deliveries?receiver=&limit=` → delivery attempts, newest first.
//!
//! Errors are `{"error": "…"}` (with `"problems": […]` for invalid rules): 400 for a bad
//! rule, 404 for an unknown one, 409 for a duplicate name or a config-file rule.

use std::collections::HashMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::rule::{Rule, RuleSpec};
use crate::{Alerting, AlertsError, RuleHealth};

pub fn router(alerting: Alerting) -> Router {
    Router::new()
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/alerts/deliveries", get(deliveries))
        .route("/api/v1/alerts/rules", get(list_rules).post(create_rule))
        .route(
            "/api/v1/alerts/rules/{name}",
            get(get_rule).put(update_rule).delete(delete_rule),
        )
        .with_state(alerting)
}

impl IntoResponse for AlertsError {
    fn into_response(self) -> Response {
        let status = match &self {
            AlertsError::Rule(_) | AlertsError::Receiver { .. } => StatusCode::BAD_REQUEST,
            AlertsError::NotFound(_) => StatusCode::NOT_FOUND,
            AlertsError::Duplicate(_) | AlertsError::FromConfig(_) => StatusCode::CONFLICT,
            AlertsError::State(_) | AlertsError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut body = json!({ "error": self.to_string() });
        if let AlertsError::Rule(e) = &self {
            body["problems"] = json!(e.problems);
        }
        (status, Json(body)).into_response()
    }
}

fn rule_json(rule: &Rule, health: &RuleHealth) -> Value {
    let mut v = serde_json::to_value(&rule.spec).unwrap_or(Value::Null);
    v["origin"] = json!(rule.origin);
    v["health"] = json!(health);
    v
}

fn bad_body(e: JsonRejection) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": format!("expected a rule as JSON: {e}") })),
    )
        .into_response()
}

async fn list_rules(State(a): State<Alerting>) -> Json<Value> {
    Json(Value::Array(
        a.rules().iter().map(|(r, h)| rule_json(r, h)).collect(),
    ))
}

async fn get_rule(State(a): State<Alerting>, Path(name): Path<String>) -> Response {
    match a.rule(&name) {
        Some((r, h)) => Json(rule_json(&r, &h)).into_response(),
        None => AlertsError::NotFound(name).into_response(),
    }
}

async fn create_rule(
    State(a): State<Alerting>,
    body: Result<Json<RuleSpec>, JsonRejection>,
) -> Response {
    let Json(spec) = match body {
        Ok(b) => b,
        Err(e) => return bad_body(e),
    };
    match a.create_rule(spec).await {
        Ok((rule, warnings)) => (
            StatusCode::CREATED,
            Json(json!({ "rule": rule_json(&rule, &RuleHealth::default()), "warnings": warnings })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn update_rule(
    State(a): State<Alerting>,
    Path(name): Path<String>,
    body: Result<Json<RuleSpec>, JsonRejection>,
) -> Response {
    let Json(spec) = match body {
        Ok(b) => b,
        Err(e) => return bad_body(e),
    };
    match a.update_rule(&name, spec).await {
        Ok((rule, warnings)) => Json(json!({
            "rule": rule_json(&rule, &RuleHealth::default()),
            "warnings": warnings
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn delete_rule(State(a): State<Alerting>, Path(name): Path<String>) -> Response {
    match a.delete_rule(&name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn alerts(State(a): State<Alerting>, Query(p): Query<HashMap<String, String>>) -> Response {
    let state = p.get("state").filter(|s| !s.is_empty());
    if let Some(s) = state
        && !matches!(s.as_str(), "pending" | "firing" | "resolved")
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({ "error": format!("state must be pending, firing or resolved, got {s:?}") }),
            ),
        )
            .into_response();
    }
    let rule = p.get("rule").filter(|s| !s.is_empty());
    let mut list: Vec<_> = a
        .alerts()
        .into_values()
        .filter(|x| state.is_none_or(|s| x.state.name() == s))
        .filter(|x| rule.is_none_or(|r| x.rule == *r))
        .collect();
    // Firing first, then pending, then resolved; newest first within each.
    list.sort_by(|x, y| {
        let rank = |s: crate::eval::AlertState| match s {
            crate::eval::AlertState::Firing => 0,
            crate::eval::AlertState::Pending => 1,
            crate::eval::AlertState::Resolved => 2,
        };
        (rank(x.state), y.active_at).cmp(&(rank(y.state), x.active_at))
    });
    Json(serde_json::to_value(list).unwrap_or(Value::Null)).into_response()
}

async fn deliveries(
    State(a): State<Alerting>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let limit = match p.get("limit").filter(|s| !s.is_empty()) {
        Some(l) => match l.parse::<usize>() {
            Ok(n) => n,
            Err(_) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({ "error": format!("limit must be a whole number, got {l:?}") })),
                )
                    .into_response();
            }
        },
        None => 100,
    };
    let receiver = p.get("receiver").filter(|s| !s.is_empty());
    let list: Vec<_> = a
        .deliveries()
        .into_iter()
        .rev()
        .filter(|d| receiver.is_none_or(|r| d.receiver == *r))
        .take(limit)
        .collect();
    Json(serde_json::to_value(list).unwrap_or(Value::Null)).into_response()
}
