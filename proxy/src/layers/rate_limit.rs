//! Token-bucket rate limit per destination: `requests-per-sec` tokens a second, up to
//! `burst`; a request that finds the bucket empty is answered 429 by the proxy.

use std::sync::Arc;

use http::{Request, StatusCode};

use super::bucket::AtomicBucket;
use super::{Body, BoxFuture, HttpService, local_response};
use crate::config::RateLimitConfig;

/// Response extension: the proxy refused the request.
#[derive(Debug, Clone, Copy)]
pub struct RateLimited;

/// One destination's bucket (request extension, `Arc`), taken from without a lock.
#[derive(Debug)]
pub struct TokenBucket {
    pub config: RateLimitConfig,
    bucket: AtomicBucket,
}

impl TokenBucket {
    pub fn new(config: RateLimitConfig) -> TokenBucket {
        let burst = config.burst.unwrap_or(config.requests_per_sec).max(1.0);
        TokenBucket {
            bucket: AtomicBucket::new(burst, config.requests_per_sec, burst),
            config,
        }
    }

    pub fn try_take(&self) -> bool {
        self.bucket.try_take()
    }
}

policy_layer!(RateLimitLayer, RateLimitService);

impl<S: HttpService> RateLimitService<S> {
    fn handle(&mut self, req: Request<Body>) -> BoxFuture {
        if let Some(bucket) = req.extensions().get::<Arc<TokenBucket>>()
            && !bucket.try_take()
        {
            let mut r = local_response(StatusCode::TOO_MANY_REQUESTS, "rate-limited");
            r.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
            r.extensions_mut().insert(RateLimited);
            return Box::pin(async move { Ok(r) });
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;
    use tower::Layer;

    use super::*;
    use crate::layers::testing::{Script, call, get};

    #[tokio::test(start_paused = true)]
    async fn admits_the_burst_then_the_rate() {
        let bucket = Arc::new(TokenBucket::new(RateLimitConfig {
            requests_per_sec: 10.0,
            burst: Some(5.0),
        }));
        let inner = Script::new(&[200]);
        let mut svc = RateLimitLayer.layer(inner.clone());
        let mut statuses = vec![];
        for _ in 0..8 {
            let mut r = get();
            r.extensions_mut().insert(Arc::clone(&bucket));
            statuses.push(call(&mut svc, r).await.status().as_u16());
        }
        assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
        // One second later: 10 more tokens, capped at the burst of 5.
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut ok = 0;
        for _ in 0..8 {
            let mut r = get();
            r.extensions_mut().insert(Arc::clone(&bucket));
            if call(&mut svc, r).await.status() == 200 {
                ok += 1;
            }
        }
        assert_eq!(ok, 5);
        assert_eq!(inner.calls(), 10);
    }
}
