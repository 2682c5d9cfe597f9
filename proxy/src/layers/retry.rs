//! Retries with exponential backoff, jitter and a retry budget.
//!
//! A request is retried when its answer is a retryable status (`retry-on`, 502/503/504 by
//! default) or the proxy could not reach the upstream, only if:
//! - its method is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE), or the policy says
//!   `all-methods`;
//! - its body can be replayed: empty, or of a known length up to `max-body-bytes` (kept in
//!   memory for the retries). A larger or unsized body is streamed once, never buffered;
//! - the budget allows it: every request deposits `budget-ratio` of a retry, and
//!   `budget-min-per-sec` retries per second are allowed on top, so a failing upstream is
//!   not hit with a multiple of its load.
//!
//! Backoff before retry `n` (1-based) is drawn uniformly from `[b/2, b]` with
//! `b = min(backoff-max, backoff-base · 2^(n-1))` ("equal jitter").

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body::Body as _;
use http_body_util::BodyExt;

use super::bucket::AtomicBucket;
use super::{Body, BoxFuture, HttpService, full, local_response};
use crate::config::RetryConfig;

/// Response extension: how many retries this request took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retries(pub u32);

/// Response extension: a retry was wanted but the budget was spent.
#[derive(Debug, Clone, Copy)]
pub struct BudgetExhausted;

/// The policy of one destination with its budget (request extension, `Arc`); the budget
/// is deposited into and withdrawn from without a lock.
#[derive(Debug)]
pub struct RetryPolicy {
    pub config: RetryConfig,
    budget: AtomicBucket,
    /// Retries the budget refused (`meshscope_proxy_retry_budget_exhausted_total`).
    pub exhausted: std::sync::atomic::AtomicU64,
}

impl RetryPolicy {
    pub fn new(config: RetryConfig) -> RetryPolicy {
        // Up to ten seconds' worth of the minimum (at least 10 retries) can be saved up.
        let cap = (config.budget_min_per_sec * 10.0).max(10.0);
        RetryPolicy {
            budget: AtomicBucket::new(
                config.budget_min_per_sec.max(1.0),
                config.budget_min_per_sec,
                cap,
            ),
            exhausted: Default::default(),
            config,
        }
    }

    fn deposit(&self) {
        self.budget.deposit(self.config.budget_ratio);
    }

    fn withdraw(&self) -> bool {
        self.budget.try_take()
    }

    /// The backoff before retry `n` (1-based), jittered.
    pub fn backoff(&self, n: u32) -> Duration {
        let base = self.config.backoff_base_ms as f64;
        let b = (base * 2f64.powi(n.saturating_sub(1).min(30) as i32))
            .min(self.config.backoff_max_ms as f64);
        Duration::from_secs_f64(rand::random_range(b / 2.0..=b.max(f64::MIN_POSITIVE)) / 1000.0)
    }

    fn method_allowed(&self, m: &Method) -> bool {
        self.config.all_methods
            || matches!(
                *m,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            )
    }

    fn retryable<B>(&self, r: &http::Response<B>) -> bool {
        r.extensions()
            .get::<super::forward::ConnectFailed>()
            .is_some()
            || self.config.retry_on.contains(&r.status().as_u16())
    }
}

policy_layer!(RetryLayer, RetryService);

impl<S: HttpService> RetryService<S> {
    fn handle(&mut self, req: Request<Body>) -> BoxFuture {
        let policy = req
            .extensions()
            .get::<std::sync::Arc<RetryPolicy>>()
            .cloned();
        let Some(policy) = policy.filter(|p| p.config.max_retries > 0) else {
            return Box::pin(self.inner.call(req));
        };
        policy.deposit();
        if !policy.method_allowed(req.method()) {
            return Box::pin(self.inner.call(req));
        }
        let hint = req.body().size_hint();
        let replayable = req.body().is_end_stream()
            || hint
                .upper()
                .is_some_and(|u| u <= policy.config.max_body_bytes);
        if !replayable {
            return Box::pin(self.inner.call(req));
        }
        // `call` was made ready by `poll_ready`; later attempts wait for readiness again.
        let mut inner = self.inner.clone();
        std::mem::swap(&mut inner, &mut self.inner);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes: Bytes = match body.collect().await {
                Ok(c) => c.to_bytes(),
                Err(_) => {
                    return Ok(local_response(
                        http::StatusCode::BAD_REQUEST,
                        "request-body-error",
                    ));
                }
            };
            let mut retries = 0u32;
            let mut first = true;
            loop {
                let attempt = Request::from_parts(parts.clone(), full(bytes.clone()));
                let r = if first {
                    first = false;
                    inner.call(attempt).await
                } else {
                    use tower::ServiceExt;
                    match inner.ready().await {
                        Ok(s) => s.call(attempt).await,
                        Err(e) => match e {},
                    }
                };
                let Ok(mut r) = r;
                if !policy.retryable(&r) || retries >= policy.config.max_retries {
                    r.extensions_mut().insert(Retries(retries));
                    return Ok(r);
                }
                if !policy.withdraw() {
                    policy
                        .exhausted
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    r.extensions_mut().insert(Retries(retries));
                    r.extensions_mut().insert(BudgetExhausted);
                    return Ok(r);
                }
                retries += 1;
                drop(r);
                tokio::time::sleep(policy.backoff(retries)).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use tokio::time::Instant;
    use tower::Layer;

    use super::*;
    use crate::layers::testing::{Script, call, get};

    fn policy(max_retries: u32) -> Arc<RetryPolicy> {
        Arc::new(RetryPolicy::new(RetryConfig {
            max_retries,
            backoff_base_ms: 100,
            backoff_max_ms: 1000,
            retry_on: vec![502, 503, 504],
            all_methods: false,
            max_body_bytes: 16,
            budget_ratio: 0.2,
            budget_min_per_sec: 10.0,
        }))
    }

    fn with(mut req: Request<Body>, p: &Arc<RetryPolicy>) -> Request<Body> {
        req.extensions_mut().insert(Arc::clone(p));
        req
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_with_growing_jittered_backoff() {
        let inner = Script::new(&[503, 503, 200]);
        let mut svc = RetryLayer.layer(inner.clone());
        let p = policy(3);
        let started = Instant::now();
        let r = call(&mut svc, with(get(), &p)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.extensions().get::<Retries>(), Some(&Retries(2)));
        assert_eq!(inner.calls(), 3);
        // backoffs 1: [50, 100] ms, 2: [100, 200] ms
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(150) && waited <= Duration::from_millis(300),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_retries_and_keeps_the_last_answer() {
        let inner = Script::new(&[502]);
        let mut svc = RetryLayer.layer(inner.clone());
        let r = call(&mut svc, with(get(), &policy(2))).await;
        assert_eq!(r.status(), 502);
        assert_eq!(r.extensions().get::<Retries>(), Some(&Retries(2)));
        assert_eq!(inner.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn post_is_not_retried_unless_configured_and_bodies_are_replayed() {
        let inner = Script::new(&[503, 200]);
        let mut svc = RetryLayer.layer(inner.clone());
        let post = || {
            Request::post("http://cart/checkout")
                .body(full("order=1"))
                .expect("req")
        };
        let r = call(&mut svc, with(post(), &policy(2))).await;
        assert_eq!(r.status(), 503);
        assert_eq!(inner.calls(), 1);

        let inner = Script::new(&[503, 200]);
        let mut svc = RetryLayer.layer(inner.clone());
        let mut cfg = policy(2).config.clone();
        cfg.all_methods = true;
        let p = Arc::new(RetryPolicy::new(cfg));
        let r = call(&mut svc, with(post(), &p)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(inner.calls(), 2);
        let bodies = inner.bodies.lock().expect("lock").clone();
        assert_eq!(bodies, vec![Bytes::from("order=1"), Bytes::from("order=1")]);
    }

    #[tokio::test(start_paused = true)]
    async fn large_bodies_are_streamed_once_not_buffered_for_retry() {
        let inner = Script::new(&[503, 200]);
        let mut svc = RetryLayer.layer(inner.clone());
        let req = Request::put("http://cart/blob")
            .body(full(vec![7u8; 1000]))
            .expect("req");
        let r = call(&mut svc, with(req, &policy(2))).await;
        assert_eq!(r.status(), 503);
        assert_eq!(inner.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_under_sustained_failure() {
        let inner = Script::new(&[503]);
        let mut svc = RetryLayer.layer(inner.clone());
        let mut cfg = policy(1).config.clone();
        cfg.budget_min_per_sec = 1.0;
        cfg.budget_ratio = 0.1;
        let p = Arc::new(RetryPolicy::new(cfg));
        let mut exhausted = 0;
        for _ in 0..200 {
            let r = call(&mut svc, with(get(), &p)).await;
            if r.extensions().get::<BudgetExhausted>().is_some() {
                exhausted += 1;
            }
        }
        let retries = inner.calls() - 200;
        // 200 requests deposit 20 retries; the time that passed (backoffs) adds a few more.
        assert!(retries < 60, "{retries} retries");
        assert!(exhausted > 100, "{exhausted}");
    }
}
