//! TLS on the listeners: one certificate and key (PEM) for all of them, rustls with the
//! ring provider, and client certificates required when a client CA is given.
//!
//! The HTTP listeners (the API and UI, OTLP/HTTP) are served here through hyper's
//! automatic HTTP/1.1-or-HTTP/2 connection with ALPN; OTLP/gRPC takes the PEM through
//! tonic's own TLS, the Postgres wire an acceptor for its `SSLRequest`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
pub use tokio_rustls::TlsAcceptor;

/// The files `--tls-cert`, `--tls-key` and `--tls-client-ca` name.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {why}")]
    Read {
        what: &'static str,
        path: String,
        why: String,
    },
    #[error("{path} holds no {what} in PEM")]
    Empty { what: &'static str, path: String },
    #[error("the TLS certificate and key do not make a server identity: {0}")]
    Config(String),
}

/// The loaded certificate, key and client CA, and the server configurations made of them.
#[derive(Clone)]
pub struct Tls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    http: TlsAcceptor,
    postgres: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_certificates", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read {
            what,
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

impl Tls {
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let cert_pem = read("the TLS certificate", &files.cert)?;
        let key_pem = read("the TLS key", &files.key)?;
        let chain = certificates("certificate", &files.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Read {
            what: "the TLS key",
            path: files.key.display().to_string(),
            why: e.to_string(),
        })?;
        let client_ca_pem = match &files.client_ca {
            Some(path) => Some((path.clone(), read("the client CA", path)?)),
            None => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &client_ca_pem {
            Some((path, pem)) => {
                let mut roots = RootCertStore::empty();
                for c in certificates("CA certificate", path, pem)? {
                    roots
                        .add(c)
                        .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let with_alpn = |protocols: &[&[u8]]| {
            let mut c = config.clone();
            c.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
            TlsAcceptor::from(Arc::new(c))
        };
        Ok(Tls {
            http: with_alpn(&[b"h2", b"http/1.1"]),
            // Direct TLS connections (PostgreSQL 17's sslnegotiation=direct) must say so.
            postgres: with_alpn(&[b"postgresql"]),
            cert_pem,
            key_pem,
            client_ca_pem: client_ca_pem.map(|(_, pem)| pem),
        })
    }

    /// The certificate chain and key, PEM, for tonic's TLS.
    pub fn identity_pem(&self) -> (&[u8], &[u8]) {
        (&self.cert_pem, &self.key_pem)
    }

    /// The client CA, PEM, when client certificates are required.
    pub fn client_ca_pem(&self) -> Option<&[u8]> {
        self.client_ca_pem.as_deref()
    }

    pub fn postgres(&self) -> TlsAcceptor {
        self.postgres.clone()
    }

    pub fn http(&self) -> TlsAcceptor {
        self.http.clone()
    }
}

/// A TLS handshake taking longer is abandoned (a client that connects and says nothing).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` over TLS on `listener` until `shutdown`, then lets open connections
/// finish their requests (10 s at most). HTTP/2 or HTTP/1.1, as ALPN agrees.
pub async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (acceptor, builder) = (acceptor.clone(), builder.clone());
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}
