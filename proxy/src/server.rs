//! Accepting connections: HTTP/1.1 (keep-alive) and h2c on the same port (hyper-util's
//! auto builder), or the same over mutual TLS ([`crate::tls::accept`]), each request
//! handed to a layer stack with its connection's [`PeerSecurity`]; graceful stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::identity::MeshIdentity;
use crate::layers::trace::RemoteAddr;
use crate::tls::{Accepted, PeerSecurity};

enum Io {
    Plain(TokioIo<tokio::net::TcpStream>),
    Mtls(TokioIo<Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>),
}
use crate::layers::{Body, BoxFuture, HttpService};

/// Serves `listener` with `svc` until `stop`; then lets open requests finish (up to 5 s).
/// With `mesh`, its mode decides whether a connection must, may or must not be mTLS.
pub async fn serve(
    listener: TcpListener,
    svc: HttpStack,
    stop: impl Future<Output = ()>,
    mesh: Option<Arc<MeshIdentity>>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let mesh = mesh.clone();
        tokio::spawn(async move {
            let (io, security) = match crate::tls::accept(stream, mesh.as_deref()).await {
                Ok(Accepted::Plain(s)) => (Io::Plain(TokioIo::new(s)), PeerSecurity::PLAINTEXT),
                Ok(Accepted::Mtls(s, id)) => (
                    Io::Mtls(TokioIo::new(s)),
                    PeerSecurity {
                        mtls: true,
                        peer: Some(id),
                    },
                ),
                Err(e) => {
                    tracing::debug!(peer = %peer, error = %e, "connection refused");
                    return;
                }
            };
            let hyper_svc =
                hyper::service::service_fn(move |req: hyper::Request<Incoming>| -> BoxFuture {
                    let mut req = req.map(to_body);
                    req.extensions_mut().insert(RemoteAddr(peer));
                    req.extensions_mut().insert(security.clone());
                    // Every layer is always ready (policy refusals are answers, not back-pressure).
                    Box::pin(svc.clone().oneshot(req))
                });
            let result = match io {
                Io::Plain(io) => {
                    watcher
                        .watch(builder.serve_connection(io, hyper_svc).into_owned())
                        .await
                }
                Io::Mtls(io) => {
                    watcher
                        .watch(builder.serve_connection(io, hyper_svc).into_owned())
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some proxied connections did not finish within 5 s");
    }
}

pub async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, crate::ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::ProxyError::Bind {
            what: what.to_string(),
            addr,
            source,
        })
}

fn to_body(b: Incoming) -> Body {
    b.map_err(|e| -> crate::layers::BoxError { Box::new(e) })
        .boxed()
}

/// A whole stack, boxed.
pub type HttpStack = tower::util::BoxCloneSyncService<
    http::Request<Body>,
    http::Response<Body>,
    std::convert::Infallible,
>;

pub fn boxed<S: HttpService + Sync>(s: S) -> HttpStack {
    tower::util::BoxCloneSyncService::new(s)
}

#[allow(dead_code)]
fn _assert_box_future(f: BoxFuture) -> BoxFuture {
    f
}
