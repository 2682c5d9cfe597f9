//! The traffic-policy stack: small tower layers, each a type with its own tests.
//!
//! Every layer wraps a service from `Request<Body>` to `Response<Body>` that never fails:
//! a problem (no connection, timeout, open breaker, injected fault) becomes an HTTP
//! response made by the proxy, so the layers above see a status they can classify, and
//! each layer leaves its decision in the response's extensions for the span, the metrics
//! and the access log ([`Decisions`]).
//!
//! A layer reads its policy from the request's extensions, where the outbound router put
//! the destination's current policy (and the state that outlives a config reload: breaker,
//! token bucket, retry budget). A request without the layer's policy passes untouched.
//!
//! Order on the outbound side, outermost first:
//! `mirror → trace → rate_limit → fault → timeout → breaker → retry → split → forward`
//! (a mirrored copy goes `trace → split → forward` on a task of its own).

/// The head of every stack service's `impl Service<Request<Body>>`: the stack's types
/// (never fails, boxed future) and ready as soon as `self.inner` is.
macro_rules! http_service_head {
    () => {
        type Response = http::Response<$crate::layers::Body>;
        type Error = std::convert::Infallible;
        type Future = $crate::layers::BoxFuture;

        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            self.inner.poll_ready(cx)
        }
    };
}
pub(crate) use http_service_head;

/// Declares a policy layer: the unit `$layer`, the `$service` it wraps a service in, and
/// the tower `Service` impl, ready as soon as the inner service is, whose `call` is
/// `$service::handle` (each layer writes only that).
macro_rules! policy_layer {
    ($layer:ident, $service:ident) => {
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $layer;

        impl<S> tower::Layer<S> for $layer {
            type Service = $service<S>;
            fn layer(&self, inner: S) -> Self::Service {
                $service { inner }
            }
        }

        #[derive(Debug, Clone)]
        pub struct $service<S> {
            inner: S,
        }

        impl<S: $crate::layers::HttpService> tower::Service<http::Request<$crate::layers::Body>>
            for $service<S>
        {
            $crate::layers::http_service_head!();

            fn call(&mut self, req: http::Request<$crate::layers::Body>) -> Self::Future {
                self.handle(req)
            }
        }
    };
}

pub mod authz;
pub mod breaker;
pub mod bucket;
pub mod fault;
pub mod forward;
pub mod mirror;
pub mod rate_limit;
pub mod retry;
pub mod split;
pub mod timeout;
pub mod trace;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::Service;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
/// Request and response bodies, streamed (never buffered whole, except a small request
/// body kept for a retry).
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;
pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// What every layer wraps.
pub trait HttpService:
    Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = BoxFuture>
    + Clone
    + Send
    + 'static
{
}

impl<S> HttpService for S where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = BoxFuture>
        + Clone
        + Send
        + 'static
{
}

pub fn empty() -> Body {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed()
}

/// A response the proxy makes itself; `x-meshscope-proxy` names why.
pub fn local_response(status: StatusCode, reason: &'static str) -> Response<Body> {
    let mut r = Response::new(full(format!("meshscope-proxy: {reason}\n")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("x-meshscope-proxy", HeaderValue::from_static(reason));
    r
}

/// The policy decisions one request went through, gathered from the response extensions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decisions {
    pub retries: u32,
    pub breaker: Option<breaker::BreakerState>,
    pub fault: Option<fault::Injected>,
    pub rate_limited: bool,
    pub timed_out: bool,
    pub chosen: Option<split::Chosen>,
    pub upstream: Option<forward::Upstream>,
    /// Why this proxy, or the proxy behind it, answered by itself (`x-meshscope-proxy`),
    /// as one of [`PROXY_RESPONSES`].
    pub proxy_response: Option<&'static str>,
    /// Inbound: what authorization decided (none without rules).
    pub authz: Option<authz::AuthzDecision>,
    /// Outbound: the mTLS connection the request went over, when it went over one.
    pub security: Option<crate::tls::PeerSecurity>,
    /// The attempt's failure put this endpoint out of rotation (outlier ejection).
    pub ejected: Option<std::net::SocketAddr>,
    /// A retry was due but the retry budget had none left.
    pub budget_exhausted: bool,
    /// The state this request moved its destination's breaker to.
    pub breaker_transition: Option<breaker::BreakerState>,
}

/// The reasons `x-meshscope-proxy` may carry; any other value is not recorded (it comes
/// from the network, and telemetry keeps its label values bounded).
pub const PROXY_RESPONSES: &[&str] = &[
    "circuit-open",
    "rate-limited",
    "fault-abort",
    "timeout",
    "no-route",
    "no-endpoint",
    "connect-failed",
    "upstream-error",
    "bad-uri",
    "request-body-error",
    "unauthorized",
];

/// The known reason a response's `x-meshscope-proxy` header names.
pub fn proxy_response(headers: &http::HeaderMap) -> Option<&'static str> {
    let v = headers.get("x-meshscope-proxy")?.as_bytes();
    PROXY_RESPONSES.iter().copied().find(|r| r.as_bytes() == v)
}

impl Decisions {
    pub fn of(x: &http::Extensions) -> Decisions {
        Decisions {
            retries: x.get::<retry::Retries>().map(|r| r.0).unwrap_or(0),
            breaker: x.get::<breaker::BreakerState>().copied(),
            fault: x.get::<fault::Injected>().cloned(),
            rate_limited: x.get::<rate_limit::RateLimited>().is_some(),
            timed_out: x.get::<timeout::TimedOut>().is_some(),
            chosen: x.get::<split::Chosen>().cloned(),
            upstream: x.get::<forward::Upstream>().cloned(),
            proxy_response: None,
            authz: x.get::<authz::AuthzDecision>().copied(),
            security: x.get::<crate::tls::PeerSecurity>().cloned(),
            ejected: x.get::<split::Ejected>().map(|e| e.0),
            budget_exhausted: x.get::<retry::BudgetExhausted>().is_some(),
            breaker_transition: x.get::<breaker::Transition>().map(|t| t.0),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A scripted inner service for the layer tests.
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Answers with the given statuses in turn (the last one repeats) and counts calls;
    /// records each request body it saw.
    #[derive(Clone)]
    pub struct Script {
        pub calls: Arc<AtomicUsize>,
        statuses: Arc<Vec<u16>>,
        pub bodies: Arc<Mutex<Vec<Bytes>>>,
    }

    impl Script {
        pub fn new(statuses: &[u16]) -> Script {
            Script {
                calls: Arc::new(AtomicUsize::new(0)),
                statuses: Arc::new(statuses.to_vec()),
                bodies: Arc::default(),
            }
        }
        pub fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Service<Request<Body>> for Script {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: Request<Body>) -> BoxFuture {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let status = self
                .statuses
                .get(n)
                .or(self.statuses.last())
                .copied()
                .unwrap_or(200);
            let bodies = Arc::clone(&self.bodies);
            Box::pin(async move {
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                bodies.lock().expect("lock").push(body);
                let mut r = Response::new(empty());
                *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                Ok(r)
            })
        }
    }

    pub async fn call<S: HttpService>(svc: &mut S, req: Request<Body>) -> Response<Body> {
        use tower::ServiceExt;
        match svc.ready().await {
            Ok(s) => match s.call(req).await {
                Ok(r) => r,
                Err(e) => match e {},
            },
            Err(e) => match e {},
        }
    }

    pub fn get() -> Request<Body> {
        Request::get("http://cart/items")
            .body(empty())
            .expect("request")
    }
}
