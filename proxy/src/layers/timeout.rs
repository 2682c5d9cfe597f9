//! Whole-request timeout: a request whose response headers have not come within the
//! destination's `timeout-ms` is answered 504 by the proxy (and the attempt is dropped).

use std::time::Duration;

use http::{Request, StatusCode};

use super::{Body, BoxFuture, HttpService, local_response};

/// The policy, as a request extension.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeout(pub Duration);

/// Response extension: the proxy gave up waiting.
#[derive(Debug, Clone, Copy)]
pub struct TimedOut;

policy_layer!(TimeoutLayer, TimeoutService);

impl<S: HttpService> TimeoutService<S> {
    fn handle(&mut self, req: Request<Body>) -> BoxFuture {
        let limit = req.extensions().get::<Timeout>().copied();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let Some(Timeout(limit)) = limit else {
                return fut.await;
            };
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => {
                    let mut r = local_response(StatusCode::GATEWAY_TIMEOUT, "timeout");
                    r.extensions_mut().insert(TimedOut);
                    Ok(r)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::{call, get};
    use crate::layers::{BoxFuture, empty};
    use std::convert::Infallible;
    use std::task::{Context, Poll};
    use tower::{Layer, Service};

    /// Answers 200 after `delay`.
    #[derive(Clone)]
    struct Slow(Duration);
    impl Service<Request<Body>> for Slow {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<Body>) -> BoxFuture {
            let d = self.0;
            Box::pin(async move {
                tokio::time::sleep(d).await;
                Ok(http::Response::new(empty()))
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slow_answers_become_504_and_fast_ones_pass() {
        let mut svc = TimeoutLayer.layer(Slow(Duration::from_millis(300)));
        let mut req = get();
        req.extensions_mut()
            .insert(Timeout(Duration::from_millis(100)));
        let started = tokio::time::Instant::now();
        let r = call(&mut svc, req).await;
        assert_eq!(r.status(), 504);
        assert!(r.extensions().get::<TimedOut>().is_some());
        assert_eq!(started.elapsed(), Duration::from_millis(100));

        let mut req = get();
        req.extensions_mut()
            .insert(Timeout(Duration::from_millis(500)));
        assert_eq!(call(&mut svc, req).await.status(), 200);
        // No policy: no limit.
        assert_eq!(call(&mut svc, get()).await.status(), 200);
    }
}
