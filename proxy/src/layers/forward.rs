//! The innermost service: sends the request to its [`Target`](super::split::Target) over
//! a pooled keep-alive connection (hyper-util's client; HTTP/1.1, or h2c when the request
//! carries [`H2c`]), streaming both bodies. No connection → 502 made by the proxy.
//! A request carrying [`MeshTarget`] goes over mutual TLS instead, on a pool of its own
//! per expected server identity (h2 by ALPN where the destination speaks h2c).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderName};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshscope_identity::SpiffeId;
use tower::Service;

use crate::identity::MeshIdentity;
use crate::tls::MtlsConnector;

use super::split::Target;
use super::{Body, BoxFuture, local_response};

/// Response extension: the address that answered (or was tried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream(pub SocketAddr);

/// Response extension: the proxy could not connect (always retryable).
#[derive(Debug, Clone, Copy)]
pub struct ConnectFailed;

/// Request extension: speak h2c (prior knowledge) upstream.
#[derive(Debug, Clone, Copy)]
pub struct H2c;

/// Request extension set by the split: this endpoint is meshed and must prove this
/// identity over mTLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshTarget(pub Arc<SpiffeId>);

type MtlsClients = HashMap<(Arc<SpiffeId>, bool), Client<MtlsConnector, Body>>;

/// Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

#[derive(Clone)]
pub struct Forward {
    http1: Client<HttpConnector, Body>,
    h2c: Client<HttpConnector, Body>,
    mesh: Option<Arc<MeshIdentity>>,
    mtls: Arc<RwLock<MtlsClients>>,
}

impl Default for Forward {
    fn default() -> Self {
        Self::new()
    }
}

impl Forward {
    /// Plaintext only.
    pub fn new() -> Forward {
        Self::with_identity(None)
    }

    /// mTLS to [`MeshTarget`]s with `mesh`'s certificate.
    pub fn with_identity(mesh: Option<Arc<MeshIdentity>>) -> Forward {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector.clone());
        let h2c = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Forward {
            http1,
            h2c,
            mesh,
            mtls: Arc::default(),
        }
    }

    /// The pooled mTLS client for one expected server identity.
    fn mtls_client(
        &self,
        expected: &Arc<SpiffeId>,
        h2: bool,
    ) -> Option<Client<MtlsConnector, Body>> {
        let mesh = self.mesh.as_ref()?;
        let key = (Arc::clone(expected), h2);
        // Every request reads; only the first to an identity writes.
        if let Some(c) = self.mtls.read().ok()?.get(&key) {
            return Some(c.clone());
        }
        let mut clients = self.mtls.write().ok()?;
        if let Some(c) = clients.get(&key) {
            return Some(c.clone());
        }
        let connector = MtlsConnector {
            config: Arc::clone(if h2 {
                &mesh.client_h2
            } else {
                &mesh.client_http1
            }),
            expected: Arc::clone(expected),
        };
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256);
        if h2 {
            b.http2_only(true);
        }
        let c = b.build(connector);
        clients.insert(key, c.clone());
        Some(c)
    }
}

fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
}

impl Service<Request<Body>> for Forward {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let Some(Target(addr)) = req.extensions().get::<Target>().copied() else {
            return Box::pin(async { Ok(local_response(StatusCode::BAD_GATEWAY, "no-endpoint")) });
        };
        let h2c = req.extensions().get::<H2c>().is_some();
        // Keep the authority the caller used as the Host header.
        if !req.headers().contains_key(header::HOST)
            && let Some(a) = req.uri().authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            req.headers_mut().insert(header::HOST, v);
        }
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        match Uri::try_from(format!("http://{addr}{pq}")) {
            Ok(u) => *req.uri_mut() = u,
            Err(_) => {
                return Box::pin(async { Ok(local_response(StatusCode::BAD_REQUEST, "bad-uri")) });
            }
        }
        strip_hop_by_hop(req.headers_mut());
        if h2c {
            *req.version_mut() = http::Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
        } else {
            *req.version_mut() = http::Version::HTTP_11;
        }
        let mesh_client = req
            .extensions()
            .get::<MeshTarget>()
            .and_then(|t| self.mtls_client(&t.0, h2c));
        let fut = match mesh_client {
            Some(c) => c.request(req),
            None if h2c => self.h2c.request(req),
            None => self.http1.request(req),
        };
        Box::pin(async move {
            let mut r = match fut.await {
                Ok(r) => {
                    let (mut parts, body) = r.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    http::Response::from_parts(parts, body.map_err(Into::into).boxed())
                }
                Err(e) => {
                    let connect = e.is_connect();
                    tracing::debug!(upstream = %addr, error = %e, "upstream request failed");
                    let mut r = local_response(
                        StatusCode::BAD_GATEWAY,
                        if connect {
                            "connect-failed"
                        } else {
                            "upstream-error"
                        },
                    );
                    if connect {
                        r.extensions_mut().insert(ConnectFailed);
                    }
                    r
                }
            };
            r.extensions_mut().insert(Upstream(addr));
            Ok(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::call;
    use crate::layers::{empty, full};

    #[tokio::test]
    async fn forwards_over_a_real_socket_and_reports_connect_failures() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.expect("read");
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            s.write_all(
                b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            )
            .await
            .expect("write");
            head
        });
        let mut f = Forward::new();
        let mut req = Request::get("http://cart:80/items?x=1")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "1")
            .body(empty())
            .expect("req");
        req.extensions_mut().insert(Target(addr));
        let r = call(&mut f, req).await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.extensions().get::<Upstream>(), Some(&Upstream(addr)));
        let body = r.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
        let head = server.await.expect("server").to_ascii_lowercase();
        assert!(head.starts_with("get /items?x=1 http/1.1"), "{head}");
        assert!(head.contains("host: cart:80"), "{head}");
        assert!(!head.contains("x-private"), "{head}");

        // Nothing listens there any more.
        let mut req = Request::post("http://cart/").body(full("x")).expect("req");
        req.extensions_mut().insert(Target(addr));
        let r = call(&mut f, req).await;
        assert_eq!(r.status(), 502);
        assert!(r.extensions().get::<ConnectFailed>().is_some());
    }
}
