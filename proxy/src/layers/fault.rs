//! Fault injection: abort `abort-percent` of the requests with `abort-status` (the upstream
//! is not called) and delay `delay-percent` of them by `delay-ms` before sending.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};

use super::{Body, BoxFuture, HttpService, local_response};
use crate::config::FaultConfig;

/// Response extension (span attribute `meshscope.fault`): what was injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injected {
    Abort(u16),
    Delay(Duration),
}

impl Injected {
    pub fn describe(&self) -> String {
        match self {
            Injected::Abort(s) => format!("abort:{s}"),
            Injected::Delay(d) => format!("delay:{}ms", d.as_millis()),
        }
    }
}

policy_layer!(FaultLayer, FaultService);

fn roll(percent: f64) -> bool {
    percent > 0.0 && rand::random_range(0.0..100.0) < percent
}

impl<S: HttpService> FaultService<S> {
    fn handle(&mut self, req: Request<Body>) -> BoxFuture {
        let Some(fault) = req.extensions().get::<Arc<FaultConfig>>().cloned() else {
            return Box::pin(self.inner.call(req));
        };
        if roll(fault.abort_percent) {
            let status =
                StatusCode::from_u16(fault.abort_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut r = local_response(status, "fault-abort");
            r.extensions_mut().insert(Injected::Abort(status.as_u16()));
            return Box::pin(async move { Ok(r) });
        }
        let delay = roll(fault.delay_percent).then(|| Duration::from_millis(fault.delay_ms));
        let fut = self.inner.call(req);
        Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let Ok(mut r) = fut.await;
            if let Some(d) = delay {
                r.extensions_mut().insert(Injected::Delay(d));
            }
            Ok(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::{Script, call, get};
    use tower::Layer;

    /// `n` Bernoulli(p) trials: the count must be within 5 standard deviations.
    fn within(count: usize, n: usize, p: f64) -> bool {
        let mean = n as f64 * p;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        (count as f64 - mean).abs() <= 5.0 * sd
    }

    #[tokio::test(start_paused = true)]
    async fn abort_and_delay_shares_follow_the_config() {
        let fault = Arc::new(FaultConfig {
            abort_percent: 20.0,
            abort_status: 418,
            delay_percent: 30.0,
            delay_ms: 50,
        });
        let inner = Script::new(&[200]);
        let mut svc = FaultLayer.layer(inner.clone());
        let n = 4000;
        let (mut aborted, mut delayed) = (0, 0);
        for _ in 0..n {
            let mut req = get();
            req.extensions_mut().insert(Arc::clone(&fault));
            let started = tokio::time::Instant::now();
            let r = call(&mut svc, req).await;
            match r.extensions().get::<Injected>() {
                Some(Injected::Abort(418)) => {
                    assert_eq!(r.status(), 418);
                    aborted += 1;
                }
                Some(Injected::Delay(d)) => {
                    assert_eq!(*d, Duration::from_millis(50));
                    assert!(started.elapsed() >= Duration::from_millis(50));
                    delayed += 1;
                }
                _ => assert_eq!(r.status(), 200),
            }
        }
        assert!(within(aborted, n, 0.2), "{aborted} aborted of {n}");
        // Delays apply to the requests that were not aborted.
        assert!(within(delayed, n - aborted, 0.3), "{delayed} delayed");
        assert_eq!(inner.calls(), n - aborted);
    }
}
