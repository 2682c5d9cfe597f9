//! Weighted split between a destination's versions (canary: e.g. v1 90, v2 10). Picks one
//! endpoint per attempt, points the request at it ([`Target`]) and names it in the
//! response ([`Chosen`]: version and workload labels, span attribute `meshscope.version`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use meshscope_identity::SpiffeId;

use super::forward::MeshTarget;
use super::{Body, BoxFuture, HttpService};
use crate::config::Endpoint;

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

/// One destination's endpoints (request extension, `Arc`).
#[derive(Debug)]
pub struct Split {
    endpoints: Vec<Chosen>,
    /// Cumulative weights.
    cumulative: Vec<u64>,
}

impl Split {
    /// `identities[i]`: what endpoint `i` must prove over mTLS (`None`: plaintext).
    pub fn new(
        destination: &str,
        endpoints: &[Endpoint],
        identities: Vec<Option<SpiffeId>>,
    ) -> Split {
        let mut identities = identities.into_iter();
        let mut total = 0u64;
        let mut cumulative = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            total += u64::from(e.weight);
            cumulative.push(total);
        }
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
            cumulative,
        }
    }

    pub fn choose(&self) -> Option<&Chosen> {
        let total = *self.cumulative.last()?;
        if self.endpoints.len() == 1 || total == 0 {
            return self.endpoints.first();
        }
        let x = rand::random_range(0..total);
        let i = self.cumulative.partition_point(|c| *c <= x);
        self.endpoints.get(i)
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
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let chosen = req
            .extensions()
            .get::<Arc<Split>>()
            .and_then(|s| s.choose().cloned());
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
