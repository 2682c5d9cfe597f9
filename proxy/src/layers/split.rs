//! Weighted split between a destination's versions (canary: e.g. v1 90, v2 10), peak-EWMA
//! balancing among a version's endpoints and outlier ejection ([`Split`]). Picks one
//! endpoint per attempt, points the request at it ([`Target`]) and names it in the
//! response ([`Chosen`]: version and workload labels, span attribute `meshscope.version`;
//! [`Ejected`] when the attempt put its endpoint out of rotation).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Request;
use tower::{Layer, Service};

use meshscope_identity::SpiffeId;

use super::forward::MeshTarget;
use super::{Body, BoxFuture, HttpService};
use crate::config::{Endpoint, OutlierConfig};

/// Request extension read by [`super::forward`]: where to send this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target(pub SocketAddr);

/// Response extension: the endpoint that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub version: Arc<str>,
    pub workload: Arc<str>,
    pub address: SocketAddr,
    /// The identity it must prove when the destination is meshed.
    pub identity: Option<Arc<SpiffeId>>,
}

/// One endpoint's load and health, updated by every attempt that went to it.
#[derive(Debug, Default)]
struct EndpointState {
    /// Attempts in flight.
    pending: AtomicU32,
    /// Peak-EWMA round trip (f64 nanoseconds, as bits) and when it was last updated (ms
    /// since the split was made).
    ewma_bits: AtomicU64,
    stamp_ms: AtomicU64,
    /// 5xx answers (and connection failures) in a row.
    consecutive_5xx: AtomicU32,
    /// Ejected until then (ms since the split was made); 0 when in rotation.
    ejected_until_ms: AtomicU64,
    /// Times ejected: the next ejection lasts one base time longer.
    ejections: AtomicU32,
}

/// Peak EWMA's decay: the estimate forgets a slow answer over about ten seconds.
const EWMA_DECAY_MS: f64 = 10_000.0;

/// Response extension: this attempt's failure ejected its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejected(pub SocketAddr);

/// One destination's endpoints (request extension, `Arc`): the version by weight, then
/// among that version's endpoints the less loaded of two picked at random, by peak-EWMA
/// latency times requests in flight (linkerd2-proxy's balancer); with `[outlier]`, an
/// endpoint answering `consecutive-5xx` failures in a row is out of rotation for
/// `base-ejection-ms` times the number of its ejections (Envoy's outlier detection).
#[derive(Debug)]
pub struct Split {
    endpoints: Vec<Chosen>,
    weights: Vec<u64>,
    state: Vec<EndpointState>,
    outlier: Option<OutlierConfig>,
    epoch: Instant,
    /// Ejections so far (`meshscope_proxy_ejections_total`).
    pub ejections: AtomicU64,
}

impl Split {
    /// `identities[i]`: what endpoint `i` must prove over mTLS (`None`: plaintext).
    pub fn new(
        destination: &str,
        endpoints: &[Endpoint],
        identities: Vec<Option<SpiffeId>>,
    ) -> Split {
        Split::with_outlier(destination, endpoints, identities, None)
    }

    pub fn with_outlier(
        destination: &str,
        endpoints: &[Endpoint],
        identities: Vec<Option<SpiffeId>>,
        outlier: Option<OutlierConfig>,
    ) -> Split {
        let mut identities = identities.into_iter();
        Split {
            endpoints: endpoints
                .iter()
                .map(|e| Chosen {
                    version: Arc::from(e.version.as_str()),
                    workload: Arc::from(e.workload.as_deref().unwrap_or(destination)),
                    address: e.address,
                    identity: identities.next().flatten().map(Arc::new),
                })
                .collect(),
            weights: endpoints.iter().map(|e| u64::from(e.weight)).collect(),
            state: endpoints.iter().map(|_| EndpointState::default()).collect(),
            outlier,
            epoch: Instant::now(),
            ejections: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Endpoints out of rotation now.
    pub fn ejected(&self) -> usize {
        let now = self.now_ms();
        self.state
            .iter()
            .filter(|s| s.ejected_until_ms.load(Ordering::Relaxed) > now)
            .count()
    }

    fn cost(&self, i: usize) -> f64 {
        let s = &self.state[i];
        let ewma = f64::from_bits(s.ewma_bits.load(Ordering::Relaxed));
        ewma * f64::from(s.pending.load(Ordering::Relaxed) + 1)
    }

    /// The endpoint for the next attempt, by index.
    pub fn choose_index(&self) -> Option<usize> {
        let now = self.now_ms();
        let mut live: Vec<usize> = (0..self.endpoints.len())
            .filter(|i| self.state[*i].ejected_until_ms.load(Ordering::Relaxed) <= now)
            .collect();
        if live.is_empty() {
            // Everything ejected: better to try than to fail every request.
            live = (0..self.endpoints.len()).collect();
        }
        // The version by weight (the endpoints' weights summed per version).
        let mut versions: Vec<(&str, u64)> = Vec::new();
        for i in &live {
            let v = &*self.endpoints[*i].version;
            match versions.iter_mut().find(|(name, _)| *name == v) {
                Some(x) => x.1 += self.weights[*i],
                None => versions.push((v, self.weights[*i])),
            }
        }
        let total: u64 = versions.iter().map(|v| v.1).sum();
        let version = if total == 0 {
            &*self.endpoints[*live.first()?].version
        } else {
            let mut x = rand::random_range(0..total);
            versions
                .iter()
                .find(|(_, w)| {
                    if x < *w {
                        true
                    } else {
                        x -= w;
                        false
                    }
                })
                .map(|v| v.0)?
        };
        let group: Vec<usize> = live
            .into_iter()
            .filter(|i| {
                &*self.endpoints[*i].version == version && (total == 0 || self.weights[*i] > 0)
            })
            .collect();
        match group.len() {
            0 => None,
            1 => Some(group[0]),
            n => {
                // Power of two choices.
                let a = rand::random_range(0..n);
                let b = (a + rand::random_range(1..n)) % n;
                let (a, b) = (group[a], group[b]);
                Some(if self.cost(b) < self.cost(a) { b } else { a })
            }
        }
    }

    pub fn choose(&self) -> Option<&Chosen> {
        self.choose_index().and_then(|i| self.endpoints.get(i))
    }

    fn started(&self, i: usize) {
        self.state[i].pending.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an attempt's outcome; true when it ejected the endpoint.
    fn finished(&self, i: usize, rtt: Duration, failed: bool) -> bool {
        let s = &self.state[i];
        s.pending.fetch_sub(1, Ordering::Relaxed);
        // Peak EWMA: a slower answer is taken at once, a faster one decays in.
        let now = self.now_ms();
        let rtt_ns = rtt.as_nanos() as f64;
        let last = s.stamp_ms.swap(now, Ordering::Relaxed);
        let old = f64::from_bits(s.ewma_bits.load(Ordering::Relaxed));
        let new = if rtt_ns > old || old == 0.0 {
            rtt_ns
        } else {
            let w = (-((now.saturating_sub(last)) as f64) / EWMA_DECAY_MS).exp();
            old * w + rtt_ns * (1.0 - w)
        };
        s.ewma_bits.store(new.to_bits(), Ordering::Relaxed);
        if !failed {
            s.consecutive_5xx.store(0, Ordering::Relaxed);
            return false;
        }
        let Some(o) = &self.outlier else {
            return false;
        };
        let c = s.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        if c < o.consecutive_5xx || s.ejected_until_ms.load(Ordering::Relaxed) > now {
            return false;
        }
        // Never more than max-ejection-percent of the endpoints out at once.
        let n = self.endpoints.len() as u64;
        if (self.ejected() as u64 + 1) * 100 > n * u64::from(o.max_ejection_percent) {
            return false;
        }
        let times = u64::from(s.ejections.fetch_add(1, Ordering::Relaxed) + 1);
        s.ejected_until_ms
            .store(now + o.base_ejection_ms * times.min(10), Ordering::Relaxed);
        s.consecutive_5xx.store(0, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// One attempt at an endpoint, in flight until it finishes; dropped unfinished (a timeout
/// above gave up on it, the caller left) it counts as a failure.
struct Attempt {
    split: Arc<Split>,
    index: usize,
    started: Instant,
    done: bool,
}

impl Attempt {
    fn start(split: Arc<Split>, index: usize) -> Attempt {
        split.started(index);
        Attempt {
            split,
            index,
            started: Instant::now(),
            done: false,
        }
    }

    /// Records the outcome; true when it ejected the endpoint.
    fn finish(mut self, failed: bool) -> bool {
        self.done = true;
        self.split
            .finished(self.index, self.started.elapsed(), failed)
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.done {
            self.split
                .finished(self.index, self.started.elapsed(), true);
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SplitLayer;

impl<S> Layer<S> for SplitLayer {
    type Service = SplitService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SplitService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct SplitService<S> {
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for SplitService<S> {
    crate::layers::http_service_head!();

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let split = req.extensions().get::<Arc<Split>>().cloned();
        let picked = split.as_ref().and_then(|s| s.choose_index());
        let chosen = picked.and_then(|i| split.as_ref()?.endpoints.get(i).cloned());
        let mut attempt = split.zip(picked).map(|(split, i)| Attempt::start(split, i));
        if let Some(c) = &chosen {
            req.extensions_mut().insert(Target(c.address));
            match &c.identity {
                Some(id) => req.extensions_mut().insert(MeshTarget(Arc::clone(id))),
                None => req.extensions_mut().remove::<MeshTarget>(),
            };
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let Ok(mut r) = fut.await;
            if let Some(a) = attempt.take()
                && a.finish(r.status().is_server_error())
                && let Some(c) = &chosen
            {
                r.extensions_mut().insert(Ejected(c.address));
            }
            if let Some(c) = chosen {
                r.extensions_mut().insert(c);
            }
            Ok(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::{Script, call, get};

    #[tokio::test]
    async fn a_ten_percent_canary_gets_its_share() {
        let endpoints = vec![
            Endpoint {
                address: "127.0.0.1:1001".parse().expect("addr"),
                version: "v1".into(),
                workload: None,
                weight: 90,
                identity: None,
            },
            Endpoint {
                address: "127.0.0.1:1002".parse().expect("addr"),
                version: "v2".into(),
                workload: Some("cart-v2".into()),
                weight: 10,
                identity: None,
            },
        ];
        let split = Arc::new(Split::new("cart", &endpoints, vec![]));
        let mut svc = SplitLayer.layer(Script::new(&[200]));
        let n = 5000;
        let mut v2 = 0;
        for _ in 0..n {
            let mut req = get();
            req.extensions_mut().insert(Arc::clone(&split));
            let r = call(&mut svc, req).await;
            let c = r.extensions().get::<Chosen>().expect("chosen");
            if &*c.version == "v2" {
                assert_eq!(&*c.workload, "cart-v2");
                assert_eq!(c.address.port(), 1002);
                v2 += 1;
            } else {
                assert_eq!(&*c.workload, "cart");
            }
        }
        // Binomial(5000, 0.1): sd = 21.2; 5 sd.
        assert!((v2 as f64 - 500.0).abs() < 5.0 * 21.3, "{v2} of {n} to v2");
    }

    fn same_version(n: u16) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                address: SocketAddr::from(([127, 0, 0, 1], 2000 + i)),
                version: "v1".into(),
                workload: None,
                weight: 1,
                identity: None,
            })
            .collect()
    }

    #[test]
    fn peak_ewma_prefers_the_fast_endpoint_and_takes_a_slow_answer_at_once() {
        let split = Split::new("shop", &same_version(2), vec![]);
        for _ in 0..3 {
            for (i, ms) in [(0, 40), (1, 2)] {
                split.started(i);
                split.finished(i, Duration::from_millis(ms), false);
            }
        }
        assert!((0..200).all(|_| split.choose_index() == Some(1)));
        // One slow answer from the fast one: its estimate is the peak at once.
        split.started(1);
        split.finished(1, Duration::from_millis(400), false);
        assert!((0..200).all(|_| split.choose_index() == Some(0)));
        // Requests in flight count too: 40 ms with none vs 2 ms with 30 pending.
        let split = Split::new("shop", &same_version(2), vec![]);
        for (i, ms) in [(0, 40), (1, 2)] {
            split.started(i);
            split.finished(i, Duration::from_millis(ms), false);
        }
        for _ in 0..30 {
            split.started(1);
        }
        assert_eq!(split.choose_index(), Some(0));
    }

    #[test]
    fn failures_in_a_row_eject_an_endpoint_until_its_time_is_up() {
        let outlier = OutlierConfig {
            consecutive_5xx: 3,
            base_ejection_ms: 100,
            max_ejection_percent: 50,
        };
        let split = Split::with_outlier("shop", &same_version(2), vec![], Some(outlier));
        let fail = |i: usize| {
            split.started(i);
            split.finished(i, Duration::from_millis(1), true)
        };
        assert!(!fail(0) && !fail(0));
        // A success in between starts the count again.
        split.started(0);
        split.finished(0, Duration::from_millis(1), false);
        assert!(!fail(0) && !fail(0));
        assert!(fail(0), "the third in a row ejects");
        assert_eq!(split.ejected(), 1);
        assert!((0..100).all(|_| split.choose_index() == Some(1)));
        // The other may not go too: at most half of the endpoints out.
        assert!(!fail(1) && !fail(1) && !fail(1));
        assert_eq!(split.ejections.load(Ordering::Relaxed), 1);
        // Back in rotation once the ejection is over.
        let deadline = Instant::now() + Duration::from_secs(5);
        while split.ejected() > 0 {
            assert!(Instant::now() < deadline, "never returned");
            std::thread::yield_now();
        }
        assert!((0..200).any(|_| split.choose_index() == Some(0)));
    }

    #[test]
    fn an_attempt_given_up_on_leaves_nothing_in_flight() {
        let outlier = OutlierConfig {
            consecutive_5xx: 2,
            base_ejection_ms: 1000,
            max_ejection_percent: 50,
        };
        let split = Arc::new(Split::with_outlier(
            "shop",
            &same_version(2),
            vec![],
            Some(outlier),
        ));
        let a = Attempt::start(Arc::clone(&split), 0);
        assert_eq!(split.state[0].pending.load(Ordering::Relaxed), 1);
        drop(a);
        assert_eq!(split.state[0].pending.load(Ordering::Relaxed), 0);
        assert_eq!(split.state[0].consecutive_5xx.load(Ordering::Relaxed), 1);
        let b = Attempt::start(Arc::clone(&split), 1);
        assert!(!b.finish(false));
        assert_eq!(split.state[1].pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn zero_weight_endpoints_are_never_chosen() {
        let endpoints = vec![
            Endpoint {
                address: "127.0.0.1:1".parse().expect("addr"),
                version: "v1".into(),
                workload: None,
                weight: 0,
                identity: None,
            },
            Endpoint {
                address: "127.0.0.1:2".parse().expect("addr"),
                version: "v2".into(),
                workload: None,
                weight: 3,
                identity: None,
            },
        ];
        let s = Split::new("x", &endpoints, vec![]);
        for _ in 0..100 {
            assert_eq!(s.choose().map(|c| c.address.port()), Some(2));
        }
    }
}
