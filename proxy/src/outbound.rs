//! The outbound side: the app's calls to other services. The router picks the destination
//! by `Host` / `:authority` (port ignored) from the static registry, then the first of its
//! routes by request that matches (`crate::routes`: backends, timeout, retries of its own),
//! and attaches the policy to the request; the layer stack then applies it:
//! `mirror → trace → rate_limit → fault → timeout → breaker → retry → split → forward`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{Request, StatusCode};
use tower::{Service, ServiceBuilder};

use crate::config::{Destination, ProxyConfig};
use crate::layers::breaker::{Breaker, BreakerLayer};
use crate::layers::fault::FaultLayer;
use crate::layers::forward::{Forward, H2c};
use crate::layers::mirror::{MirrorLayer, MirrorPolicy};
use crate::layers::rate_limit::{RateLimitLayer, TokenBucket};
use crate::layers::retry::{RetryLayer, RetryPolicy};
use crate::layers::split::{Split, SplitLayer};
use crate::layers::timeout::{Timeout, TimeoutLayer};
use crate::layers::trace::{Peer, TraceLayer};
use crate::layers::{Body, BoxFuture, HttpService, local_response};
use crate::routes::{Match, RouteName, first_match};
use crate::telemetry::{Direction, Telemetry};

/// One destination with its policy objects. The stateful ones (breaker, bucket, retry
/// budget) are carried over a config reload when their settings did not change.
#[derive(Debug)]
pub struct Route {
    pub config: Destination,
    pub peer: Peer,
    pub split: Arc<Split>,
    pub timeout: Option<Timeout>,
    pub retry: Option<Arc<RetryPolicy>>,
    pub breaker: Option<Arc<Breaker>>,
    pub bucket: Option<Arc<TokenBucket>>,
    pub fault: Option<Arc<crate::config::FaultConfig>>,
    /// Routes by request, in order (`[[destination.route]]`).
    pub http_routes: Vec<HttpRoute>,
}

/// One of a destination's routes by request, compiled: its matches, its backends as a
/// split of their own, its timeout and retries (the destination's when it has none).
#[derive(Debug)]
pub struct HttpRoute {
    pub name: RouteName,
    pub matches: Vec<Match>,
    pub split: Arc<Split>,
    pub timeout: Option<Timeout>,
    pub retry: Option<Arc<RetryPolicy>>,
    pub mirror: Option<Arc<MirrorPolicy>>,
}

impl Route {
    /// Its own split and those of its routes by request (each keeps its endpoints' state).
    pub fn splits(&self) -> impl Iterator<Item = &Arc<Split>> {
        std::iter::once(&self.split).chain(self.http_routes.iter().map(|r| &r.split))
    }
}

/// The registry, by lower-case host name.
#[derive(Debug, Default)]
pub struct Routes {
    by_host: HashMap<String, Arc<Route>>,
    pub routes: Vec<Arc<Route>>,
}

/// The current registry, swapped whole on reload.
pub type SharedRoutes = Arc<RwLock<Arc<Routes>>>;

impl Routes {
    /// The registry of `config`, meshed destinations' endpoints with their expected
    /// identities; the stateful policy objects of `previous` are kept where unchanged.
    pub fn build(config: &ProxyConfig, previous: Option<&Routes>) -> Routes {
        let mut routes = Routes::default();
        for d in &config.destinations {
            let old = previous.and_then(|p| p.by_host.get(&d.name.to_ascii_lowercase()));
            let p = &d.policy;
            let keep = |same: bool| same && old.is_some();
            let retry = p
                .retry
                .clone()
                .map(|c| match old.and_then(|o| o.retry.clone()) {
                    Some(r) if keep(r.config == c) => r,
                    _ => Arc::new(RetryPolicy::new(c)),
                });
            let breaker = p
                .breaker
                .clone()
                .map(|c| match old.and_then(|o| o.breaker.clone()) {
                    Some(b) if keep(b.config == c) => b,
                    _ => Arc::new(Breaker::new(c)),
                });
            let bucket = p
                .rate_limit
                .clone()
                .map(|c| match old.and_then(|o| o.bucket.clone()) {
                    Some(b) if keep(b.config == c) => b,
                    _ => Arc::new(TokenBucket::new(c)),
                });
            let identities = |endpoints: &[crate::config::Endpoint]| {
                endpoints
                    .iter()
                    .map(|e| {
                        if config.mtls_to(d) {
                            config.expected_identity(d, e).ok()
                        } else {
                            None
                        }
                    })
                    .collect()
            };
            let http_routes = d
                .routes
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    // A route's backends: every endpoint of each version named, weighted by
                    // the backend's weight times its own.
                    let endpoints: Vec<crate::config::Endpoint> = if r.backends.is_empty() {
                        d.endpoints.clone()
                    } else {
                        r.backends
                            .iter()
                            .flat_map(|b| {
                                d.endpoints
                                    .iter()
                                    .filter(|e| e.version == b.version)
                                    .map(|e| crate::config::Endpoint {
                                        weight: b.weight.saturating_mul(e.weight.max(1)),
                                        ..e.clone()
                                    })
                            })
                            .collect()
                    };
                    let retry = r
                        .retry
                        .clone()
                        .map(|c| Arc::new(RetryPolicy::new(c)))
                        .or_else(|| retry.clone());
                    let mirror = r.mirror.as_ref().map(|m| {
                        // The shadow's endpoints, in the split whatever their weight.
                        let shadows: Vec<crate::config::Endpoint> = d
                            .endpoints
                            .iter()
                            .filter(|e| e.version == m.version)
                            .map(|e| crate::config::Endpoint {
                                weight: e.weight.max(1),
                                ..e.clone()
                            })
                            .collect();
                        Arc::new(MirrorPolicy {
                            split: Arc::new(Split::new(&d.name, &shadows, identities(&shadows))),
                            percent: m.percent,
                            max_body_bytes: m.max_body_bytes,
                        })
                    });
                    HttpRoute {
                        mirror,
                        name: RouteName(Arc::from(
                            r.name.clone().unwrap_or_else(|| format!("route-{}", i + 1)),
                        )),
                        // Validated with the config.
                        matches: r
                            .matches
                            .iter()
                            .filter_map(|m| Match::compile(m).ok())
                            .collect(),
                        split: Arc::new(Split::with_outlier(
                            &d.name,
                            &endpoints,
                            identities(&endpoints),
                            p.outlier.clone(),
                        )),
                        timeout: r
                            .timeout_ms
                            .or(p.timeout_ms)
                            .map(|ms| Timeout(Duration::from_millis(ms))),
                        retry,
                    }
                })
                .collect();
            let route = Arc::new(Route {
                peer: Peer {
                    destination: Arc::from(d.name.as_str()),
                    db_system: d.db_system.as_deref().map(Arc::from),
                },
                split: Arc::new(Split::with_outlier(
                    &d.name,
                    &d.endpoints,
                    identities(&d.endpoints),
                    p.outlier.clone(),
                )),
                http_routes,
                timeout: p.timeout_ms.map(|ms| Timeout(Duration::from_millis(ms))),
                retry,
                breaker,
                bucket,
                fault: p.fault.clone().map(Arc::new),
                config: d.clone(),
            });
            for n in std::iter::once(&d.name).chain(&d.aliases) {
                routes
                    .by_host
                    .insert(n.to_ascii_lowercase(), Arc::clone(&route));
            }
            routes.routes.push(route);
        }
        routes
    }

    pub fn get(&self, host: &str) -> Option<&Arc<Route>> {
        self.by_host.get(&host.to_ascii_lowercase())
    }
}

fn host_of<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.host().to_string());
    }
    let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
    // host[:port], or [v6]:port
    let host = match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    };
    Some(host.trim_matches(['[', ']']).to_string())
}

/// Looks the destination up and attaches its policy.
#[derive(Clone)]
pub struct Router<S> {
    routes: SharedRoutes,
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for Router<S> {
    crate::layers::http_service_head!();

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let route =
            host_of(&req).and_then(|h| self.routes.read().ok().and_then(|r| r.get(&h).cloned()));
        let Some(route) = route else {
            return Box::pin(async { Ok(local_response(StatusCode::NOT_FOUND, "no-route")) });
        };
        // The first route by request that matches, else the destination's own.
        let by_request = first_match(&route.http_routes, |r| &r.matches, &req);
        let (split, timeout, retry) = match by_request {
            Some(r) => (&r.split, r.timeout, r.retry.as_ref()),
            None => (&route.split, route.timeout, route.retry.as_ref()),
        };
        let name = by_request.map(|r| r.name.clone());
        let mirror = by_request.and_then(|r| r.mirror.clone());
        let x = req.extensions_mut();
        if let Some(m) = mirror {
            x.insert(m);
        }
        x.insert(route.peer.clone());
        x.insert(Arc::clone(split));
        if let Some(n) = name {
            x.insert(n);
        }
        if let Some(t) = timeout {
            x.insert(t);
        }
        if let Some(r) = retry {
            x.insert(Arc::clone(r));
        }
        if let Some(b) = &route.breaker {
            x.insert(Arc::clone(b));
        }
        if let Some(b) = &route.bucket {
            x.insert(Arc::clone(b));
        }
        if let Some(f) = &route.fault {
            x.insert(Arc::clone(f));
        }
        if route.config.h2c {
            x.insert(H2c);
        }
        Box::pin(self.inner.call(req))
    }
}

/// The whole outbound stack.
pub fn stack(routes: SharedRoutes, telemetry: Telemetry, forward: Forward) -> impl HttpService {
    // Mirrored copies: traced and split to the shadow, no other policy.
    let shadow = ServiceBuilder::new()
        .layer(TraceLayer::new(Direction::Outbound, telemetry.clone()))
        .layer(SplitLayer)
        .service(forward.clone());
    let inner = ServiceBuilder::new()
        .layer(MirrorLayer::new(shadow))
        .layer(TraceLayer::new(Direction::Outbound, telemetry))
        .layer(RateLimitLayer)
        .layer(FaultLayer)
        .layer(TimeoutLayer)
        .layer(BreakerLayer)
        .layer(RetryLayer)
        .layer(SplitLayer)
        .service(forward);
    Router { routes, inner }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_route_with_or_without_port_and_state_survives_an_unchanged_reload() {
        let c = ProxyConfig::parse(
            r#"
[service]
name = "frontend"
[[destination]]
name = "cart"
aliases = ["cart.shop.svc"]
endpoint = [{ address = "127.0.0.1:9001" }]
policy = { breaker = { consecutive-failures = 3 }, timeout-ms = 100 }
"#,
        )
        .expect("parse");
        let r = Routes::build(&c, None);
        for h in ["cart", "cart:8080", "CART.shop.svc"] {
            let req = Request::get("/").header("host", h).body(()).expect("req");
            let host = host_of(&req).expect("host");
            assert!(r.get(&host).is_some(), "{h}");
        }
        let req = Request::get("http://cart:80/x").body(()).expect("req");
        assert_eq!(host_of(&req).as_deref(), Some("cart"));

        let again = Routes::build(&c, Some(&r));
        let (a, b) = (r.get("cart").expect("a"), again.get("cart").expect("b"));
        assert!(Arc::ptr_eq(
            a.breaker.as_ref().expect("breaker"),
            b.breaker.as_ref().expect("breaker")
        ));
        let mut changed = c.clone();
        changed.destinations[0].policy.breaker = Some(crate::config::BreakerConfig {
            consecutive_failures: 9,
            open_ms: 10,
        });
        let third = Routes::build(&changed, Some(&again));
        let c3 = third.get("cart").expect("c");
        assert_eq!(
            c3.breaker.as_ref().map(|b| b.config.consecutive_failures),
            Some(9)
        );
    }
}
