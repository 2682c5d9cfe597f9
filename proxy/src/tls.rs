//! Mutual TLS on the wire: accepting it on the inbound listener (strict: only mTLS;
//! permissive: mTLS or plaintext on the same port, told apart by the first byte, 0x16 for
//! a TLS handshake) and originating it to meshed destinations (hyper-util's pooled client
//! over a connector that verifies the server's SPIFFE ID before the connection is used).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use meshscope_identity::SpiffeId;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream as ClientTls;
use tokio_rustls::server::TlsStream as ServerTls;

use crate::config::MtlsMode;
use crate::identity::MeshIdentity;

/// Request extension (inbound) and response extension (outbound): how the connection
/// this request travelled on is secured, and who is at the other end, as proven by
/// its certificate. Never read from a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSecurity {
    pub mtls: bool,
    pub peer: Option<Arc<SpiffeId>>,
}

impl PeerSecurity {
    pub const PLAINTEXT: PeerSecurity = PeerSecurity {
        mtls: false,
        peer: None,
    };
}

/// An accepted inbound connection.
pub enum Accepted {
    Plain(TcpStream),
    Mtls(Box<ServerTls<TcpStream>>, Arc<SpiffeId>),
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies the listener's mode to a new connection.
pub async fn accept(stream: TcpStream, mesh: Option<&MeshIdentity>) -> io::Result<Accepted> {
    let Some(mesh) = mesh.filter(|m| m.mode() != MtlsMode::Off) else {
        return Ok(Accepted::Plain(stream));
    };
    let refused = |e: io::Error| {
        mesh.inbound_refused.fetch_add(1, Ordering::Relaxed);
        e
    };
    if mesh.mode() == MtlsMode::Permissive {
        let mut first = [0u8; 1];
        let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "nothing sent"))??;
        if n == 0 || first[0] != 0x16 {
            return Ok(Accepted::Plain(stream));
        }
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&mesh.server));
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| {
            refused(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        })?
        .map_err(refused)?;
    // The verifier required a certificate from the mesh root; it must also name a workload.
    match meshscope_identity::mtls::peer_identity(tls.get_ref().1) {
        Some(id) => Ok(Accepted::Mtls(Box::new(tls), Arc::new(id))),
        None => Err(refused(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the client certificate names no SPIFFE ID",
        ))),
    }
}

/// Connects to one meshed endpoint over mTLS and checks it is `expected`.
#[derive(Clone)]
pub struct MtlsConnector {
    pub config: Arc<rustls::ClientConfig>,
    pub expected: Arc<SpiffeId>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for MtlsConnector {
    type Response = MtlsStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MtlsStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = Arc::clone(&self.config);
        let expected = Arc::clone(&self.expected);
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or("no host")?
                .trim_matches(['[', ']'])
                .to_string();
            let port = uri.port_u16().unwrap_or(80);
            let tcp = tokio::time::timeout(
                Duration::from_secs(5),
                TcpStream::connect((host.as_str(), port)),
            )
            .await
            .map_err(|_| "connect timed out")??;
            let _ = tcp.set_nodelay(true);
            let name = meshscope_identity::mtls::server_name(&expected)?;
            let tls = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| "TLS handshake timed out")??;
            let peer = meshscope_identity::mtls::verify_peer(tls.get_ref().1, &expected)?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(MtlsStream {
                io: TokioIo::new(tls),
                peer: Arc::new(peer),
                h2,
            })
        })
    }
}

/// A client connection over mTLS; the pool hands its [`PeerSecurity`] to every response.
pub struct MtlsStream {
    io: TokioIo<ClientTls<TcpStream>>,
    peer: Arc<SpiffeId>,
    h2: bool,
}

impl Connection for MtlsStream {
    fn connected(&self) -> Connected {
        let c = Connected::new().extra(PeerSecurity {
            mtls: true,
            peer: Some(Arc::clone(&self.peer)),
        });
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl hyper::rt::Read for MtlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MtlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
