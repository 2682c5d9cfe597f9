//! The HTTP side: a middleware that answers 401 or 403 before any handler runs, so a
//! refused request's body is never read.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::{Auth, Scope, Surface};

/// Renders a refusal in a surface's own error format.
pub type Render = fn(&HeaderMap, StatusCode, String) -> Response;

/// What one HTTP listener asks of each request.
#[derive(Clone)]
pub struct Gate {
    pub auth: Auth,
    pub surface: Surface,
    /// The scope a request needs; `None`: open to anyone (health probes, the UI's files).
    pub scope_of: fn(&Method, &str) -> Option<Scope>,
    pub render: Render,
}

/// The name of the token a request was accepted with, in the request's extensions for the
/// handlers that record who did something (a policy change). Absent when auth is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

/// `{"error": "…"}`, the API's error body.
pub fn json_error(_: &HeaderMap, status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

impl Gate {
    /// `router` behind the gate (unchanged when auth is open).
    pub fn guard<S: Clone + Send + Sync + 'static>(self, router: Router<S>) -> Router<S> {
        if self.auth.is_open() {
            return router;
        }
        router.layer(axum::middleware::from_fn_with_state(self, require))
    }
}

async fn require(State(gate): State<Gate>, req: Request, next: Next) -> Response {
    let Some(scope) = (gate.scope_of)(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    match gate.auth.check_header(gate.surface, presented, scope) {
        Ok(name) => {
            let caller = name.map(|n| Caller(n.to_string()));
            let mut req = req;
            if let Some(caller) = caller {
                req.extensions_mut().insert(caller);
            }
            next.run(req).await
        }
        Err(denied) => {
            let status = if denied.is_unauthenticated() {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::FORBIDDEN
            };
            let mut resp = (gate.render)(req.headers(), status, denied.to_string());
            if status == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"meshscope\""),
                );
            }
            resp
        }
    }
}
