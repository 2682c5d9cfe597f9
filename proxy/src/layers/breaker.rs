//! Circuit breaker: after `consecutive-failures` failed answers (5xx, or no connection) in
//! a row the breaker opens and the proxy answers 503 itself for `open-ms`; then it is
//! half-open and lets one probe through: success closes it, failure opens it again.
//!
//! While it is closed (nearly always) a request reads one flag and updates one counter;
//! the lock is taken only to open it, while it is open or half-open, and to close it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use tokio::time::Instant;

use super::{Body, BoxFuture, HttpService, local_response};
use crate::config::BreakerConfig;

/// Response extension (and span attribute `meshscope.breaker_state`): the state the
/// request met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// One destination's breaker (request extension, `Arc`).
#[derive(Debug)]
pub struct Breaker {
    pub config: BreakerConfig,
    /// `state` is `Closed`: read by every request without the lock.
    closed: AtomicBool,
    /// Failures in a row while closed.
    failures: AtomicU32,
    /// Every change of state is made under this lock.
    state: Mutex<State>,
    /// State changes so far (`meshscope_proxy_breaker_transitions_total`).
    pub transitions: std::sync::atomic::AtomicU64,
}

/// Response extension: the state this request moved the breaker to (it opened it, its
/// probe closed it or opened it again); span attribute and event
/// `meshscope.breaker_transition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition(pub BreakerState);

enum Admit {
    Yes(BreakerState),
    No,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            closed: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            state: Mutex::new(State::Closed),
            transitions: Default::default(),
        }
    }

    /// The state now, as a dashboard would show it.
    pub fn state(&self) -> BreakerState {
        if self.closed.load(Ordering::Acquire) {
            return BreakerState::Closed;
        }
        match self.state.lock().as_deref() {
            Ok(State::Closed) | Err(_) => BreakerState::Closed,
            Ok(State::Open { until }) if Instant::now() < *until => BreakerState::Open,
            Ok(State::Open { .. }) | Ok(State::HalfOpen { .. }) => BreakerState::HalfOpen,
        }
    }

    fn admit(&self) -> Admit {
        if self.closed.load(Ordering::Acquire) {
            return Admit::Yes(BreakerState::Closed);
        }
        let Ok(mut s) = self.state.lock() else {
            return Admit::Yes(BreakerState::Closed);
        };
        match *s {
            State::Closed => Admit::Yes(BreakerState::Closed),
            State::Open { until } if Instant::now() < until => Admit::No,
            State::Open { .. } | State::HalfOpen { probing: false } => {
                *s = State::HalfOpen { probing: true };
                Admit::Yes(BreakerState::HalfOpen)
            }
            State::HalfOpen { probing: true } => Admit::No,
        }
    }

    /// Records an admitted request's outcome; the new state when it changed the breaker's.
    fn record(&self, admitted_as: BreakerState, ok: bool) -> Option<BreakerState> {
        let to = if admitted_as == BreakerState::Closed {
            if !self.closed.load(Ordering::Acquire) {
                // Opened meanwhile by other requests' failures.
                return None;
            }
            if ok {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
                return None;
            }
            let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
            if failures < self.config.consecutive_failures {
                return None;
            }
            let mut s = self.state.lock().ok()?;
            if !matches!(*s, State::Closed) {
                return None; // another failure opened it first
            }
            self.open(&mut s);
            BreakerState::Open
        } else {
            let mut s = self.state.lock().ok()?;
            match (&*s, ok) {
                (State::HalfOpen { .. }, true) => {
                    *s = State::Closed;
                    self.failures.store(0, Ordering::Relaxed);
                    self.closed.store(true, Ordering::Release);
                    BreakerState::Closed
                }
                (State::HalfOpen { .. }, false) => {
                    self.open(&mut s);
                    BreakerState::Open
                }
                _ => return None,
            }
        };
        self.transitions.fetch_add(1, Ordering::Relaxed);
        Some(to)
    }

    /// Opens the breaker for `open-ms` from now (under the lock).
    fn open(&self, s: &mut State) {
        *s = State::Open {
            until: Instant::now() + Duration::from_millis(self.config.open_ms),
        };
        self.closed.store(false, Ordering::Release);
        self.failures.store(0, Ordering::Relaxed);
    }
}

/// Puts a half-open breaker back to "probe again" when a probe is abandoned.
struct ProbeGuard {
    breaker: Option<Arc<Breaker>>,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Some(b) = self.breaker.take()
            && let Ok(mut s) = b.state.lock()
            && matches!(*s, State::HalfOpen { probing: true })
        {
            *s = State::HalfOpen { probing: false };
        }
    }
}

policy_layer!(BreakerLayer, BreakerService);

impl<S: HttpService> BreakerService<S> {
    fn handle(&mut self, req: Request<Body>) -> BoxFuture {
        let Some(breaker) = req.extensions().get::<Arc<Breaker>>().cloned() else {
            return Box::pin(self.inner.call(req));
        };
        let admitted_as = match breaker.admit() {
            Admit::Yes(s) => s,
            Admit::No => {
                let mut r = local_response(StatusCode::SERVICE_UNAVAILABLE, "circuit-open");
                r.extensions_mut().insert(BreakerState::Open);
                return Box::pin(async move { Ok(r) });
            }
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut guard = ProbeGuard {
                breaker: (admitted_as == BreakerState::HalfOpen).then(|| Arc::clone(&breaker)),
            };
            let Ok(mut r) = fut.await;
            let ok = !r.status().is_server_error();
            if let Some(to) = breaker.record(admitted_as, ok) {
                r.extensions_mut().insert(Transition(to));
            }
            guard.breaker = None;
            r.extensions_mut().insert(admitted_as);
            Ok(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::{Script, call, get};
    use tower::Layer;

    fn req(b: &Arc<Breaker>) -> Request<Body> {
        let mut r = get();
        r.extensions_mut().insert(Arc::clone(b));
        r
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_recovers_through_a_probe() {
        let b = Arc::new(Breaker::new(BreakerConfig {
            consecutive_failures: 3,
            open_ms: 1000,
        }));
        // Fails 3 times, then the upstream is healthy.
        let inner = Script::new(&[500, 503, 502, 200]);
        let mut svc = BreakerLayer.layer(inner.clone());
        for _ in 0..3 {
            let r = call(&mut svc, req(&b)).await;
            assert!(r.status().is_server_error());
            assert_eq!(
                r.extensions().get::<BreakerState>(),
                Some(&BreakerState::Closed)
            );
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.transitions.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Open: answered by the proxy, the upstream is not called.
        let r = call(&mut svc, req(&b)).await;
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.extensions().get::<BreakerState>(),
            Some(&BreakerState::Open)
        );
        assert_eq!(inner.calls(), 3);
        // After open-ms: one probe, which succeeds and closes the breaker.
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let r = call(&mut svc, req(&b)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.extensions().get::<BreakerState>(),
            Some(&BreakerState::HalfOpen)
        );
        assert_eq!(
            r.extensions().get::<Transition>(),
            Some(&Transition(BreakerState::Closed)),
            "the probe that closed it says so"
        );
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.transitions.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn failures_on_many_threads_open_it_once() {
        let b = Arc::new(Breaker::new(BreakerConfig {
            consecutive_failures: 5,
            open_ms: 60_000,
        }));
        let opened: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let b = Arc::clone(&b);
                    s.spawn(move || {
                        (0..1000)
                            .filter_map(|_| match b.admit() {
                                Admit::Yes(as_) => b.record(as_, false),
                                Admit::No => None,
                            })
                            .count()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("worker")).sum()
        });
        assert_eq!(opened, 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.transitions.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_again_and_successes_reset_the_count() {
        let b = Arc::new(Breaker::new(BreakerConfig {
            consecutive_failures: 2,
            open_ms: 500,
        }));
        let inner = Script::new(&[500, 200, 500, 500, 500]);
        let mut svc = BreakerLayer.layer(inner.clone());
        call(&mut svc, req(&b)).await; // fail 1
        call(&mut svc, req(&b)).await; // success resets
        call(&mut svc, req(&b)).await; // fail 1
        assert_eq!(b.state(), BreakerState::Closed);
        call(&mut svc, req(&b)).await; // fail 2: open
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(501)).await;
        let r = call(&mut svc, req(&b)).await; // probe fails
        assert_eq!(r.status(), 500);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(call(&mut svc, req(&b)).await.status(), 503);
        assert_eq!(inner.calls(), 5);
    }
}
