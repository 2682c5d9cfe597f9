//! The inbound side: requests to the local app. Records the SERVER span, metrics
//! (`reporter="destination"`) and the access log, applies the authorization rules to the
//! caller's proven identity, and forwards to the app:
//! `trace → authz → forward (to the app)`.

use std::net::SocketAddr;

use http::Request;
use tower::{Service, ServiceBuilder};

use crate::layers::authz::{AuthzLayer, SharedAuthz};
use crate::layers::forward::{Forward, H2c};
use crate::layers::split::Target;
use crate::layers::trace::TraceLayer;
use crate::layers::{Body, BoxFuture, HttpService};
use crate::telemetry::{Direction, Telemetry};

/// Points every request at the app.
#[derive(Clone)]
pub struct ToApp<S> {
    app: SocketAddr,
    h2c: bool,
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for ToApp<S> {
    crate::layers::http_service_head!();

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        req.extensions_mut().insert(Target(self.app));
        if self.h2c {
            req.extensions_mut().insert(H2c);
        }
        Box::pin(self.inner.call(req))
    }
}

pub fn stack(
    app: SocketAddr,
    h2c: bool,
    telemetry: Telemetry,
    forward: Forward,
    authz: SharedAuthz,
) -> impl HttpService {
    ServiceBuilder::new()
        .layer(TraceLayer::new(Direction::Inbound, telemetry))
        .layer(AuthzLayer(authz))
        .service(ToApp {
            app,
            h2c,
            inner: forward,
        })
}
