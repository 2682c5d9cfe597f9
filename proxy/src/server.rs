//! Accepting connections: HTTP/1.1 (keep-alive) and h2c on the same port (hyper-util's
//! auto builder), or the same over mutual TLS ([`crate::tls::accept`]), each request
//! handed to a layer stack with its connection's [`PeerSecurity`]; graceful stop, and the
//! draining of plaintext connections when the listener turns strict.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;

use crate::config::MtlsMode;

use crate::identity::MeshIdentity;
use crate::layers::trace::RemoteAddr;
use crate::tls::{Accepted, PeerSecurity};

enum Io {
    Plain(TokioIo<tokio::net::TcpStream>),
    Mtls(TokioIo<Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>),
}
use crate::layers::{Body, BoxFuture, HttpService};

/// Drives one connection until it ends; when `stopping` turns true, or `modes` (a
/// plaintext connection's listener mode) turns strict, finishes its requests in flight and
/// closes it (HTTP/1: after the current response; h2: GOAWAY).
macro_rules! drive {
    ($conn:expr, $stopping:expr, $modes:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let strict = async {
            match $modes {
                Some(mut m) => {
                    let _ = m.wait_for(|m| *m == MtlsMode::Strict).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let stopping = async {
            let _ = $stopping.wait_for(|s| *s).await;
        };
        tokio::select! {
            r = conn.as_mut() => r,
            () = strict => {
                tracing::debug!("a plaintext connection drained: the listener is strict now");
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            () = stopping => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

/// Serves `listener` with `svc` until `stop`; then lets open requests finish (up to 5 s).
/// With `mesh`, its mode decides whether a connection must, may or must not be mTLS.
pub async fn serve(
    listener: TcpListener,
    svc: HttpStack,
    stop: impl Future<Output = ()>,
    mesh: Option<Arc<MeshIdentity>>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    // Shutdown as mini-redis does it: `stopping` tells every connection to finish and
    // close; each holds a clone of `done`, so `all_done` ends when the last has.
    let (stopping_tx, stopping) = watch::channel(false);
    let (done, mut all_done) = mpsc::channel::<()>(1);
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
        let (mut stopping, done) = (stopping.clone(), done.clone());
        let mesh = mesh.clone();
        tokio::spawn(async move {
            let _done = done;
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
                    // Taken by a permissive listener: drained if it turns strict.
                    let modes = mesh.as_ref().map(|m| m.modes());
                    drive!(builder.serve_connection(io, hyper_svc), stopping, modes)
                }
                Io::Mtls(io) => {
                    let modes: Option<watch::Receiver<MtlsMode>> = None;
                    drive!(builder.serve_connection(io, hyper_svc), stopping, modes)
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    drop(done);
    if tokio::time::timeout(Duration::from_secs(5), all_done.recv())
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
