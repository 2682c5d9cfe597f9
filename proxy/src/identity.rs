//! The proxy's workload identity: a key made in memory at start, its certificate from
//! the mesh CA (`POST <ca-url>/api/v1/identity/certify` with the bootstrap token), renewed
//! at 70% of its lifetime and swapped into the [`CertStore`] every TLS config reads, so
//! open connections keep going and new handshakes use the new certificate.
//!
//! A renewal that fails is retried (1 s doubling to 30 s) while the old certificate is
//! still valid; its failures are counted and logged, and the expiry is on `/metrics`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshscope_identity::SpiffeId;
use meshscope_identity::ca::{CertifyRequest, Issued};
use meshscope_identity::workload::{CertStore, WorkloadKey};

use crate::config::{IdentityConfig, MtlsMode};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity: cannot read the token file {path}: {why}")]
    Token { path: String, why: String },
    #[error("identity: {0}")]
    Ca(String),
    #[error("identity: {0}")]
    Tls(#[from] meshscope_identity::IdentityError),
}

/// What the TLS side of the proxy shares.
pub struct MeshIdentity {
    /// The inbound listener's mode (strict or permissive), which the control plane's
    /// `mtls-mode` may switch at run time; read with [`MeshIdentity::mode`], watched by
    /// the plaintext connections a permissive listener took ([`MeshIdentity::modes`]).
    mode: tokio::sync::watch::Sender<MtlsMode>,
    pub store: Arc<CertStore>,
    pub server: Arc<rustls::ServerConfig>,
    pub client_http1: Arc<rustls::ClientConfig>,
    pub client_h2: Arc<rustls::ClientConfig>,
    /// Renewals that succeeded and failed.
    pub renewed: AtomicU64,
    pub renew_failures: AtomicU64,
    /// Inbound connections refused: plaintext on a strict listener, or a failed handshake
    /// (no client certificate, one from another CA).
    pub inbound_refused: AtomicU64,
}

impl std::fmt::Debug for MeshIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshIdentity")
            .field("mode", &self.mode())
            .field("id", self.store.id())
            .finish_non_exhaustive()
    }
}

impl MeshIdentity {
    /// What the inbound listener accepts now.
    pub fn mode(&self) -> MtlsMode {
        *self.mode.borrow()
    }

    /// The mode as it changes.
    pub fn modes(&self) -> tokio::sync::watch::Receiver<MtlsMode> {
        self.mode.subscribe()
    }

    /// Switches between strict and permissive: new connections are accepted by the new
    /// mode, and going strict drains the plaintext connections already open (their
    /// requests in flight finish, then they close). `Off` is ignored: without a
    /// certificate there is nothing to switch.
    pub fn set_mode(&self, mode: MtlsMode) {
        if mode == MtlsMode::Off {
            return;
        }
        let changed = self.mode.send_if_modified(|m| {
            let changed = *m != mode;
            *m = mode;
            changed
        });
        if changed {
            tracing::info!(mode = ?mode, "inbound mutual TLS mode changed");
        }
    }

    pub fn id(&self) -> &SpiffeId {
        self.store.id()
    }

    /// Seconds since the epoch when the current certificate expires.
    pub fn expiry_unix(&self) -> u64 {
        self.store
            .not_after()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs())
    }
}

/// Talks to the mesh CA.
#[derive(Clone)]
struct CaClient {
    url: String,
    token: String,
    /// For an `https://` CA URL.
    tls: Option<tokio_rustls::TlsConnector>,
}

fn read_token(path: &Path) -> Result<String, IdentityError> {
    let t = std::fs::read_to_string(path).map_err(|e| IdentityError::Token {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(IdentityError::Token {
            path: path.display().to_string(),
            why: "it is empty".into(),
        });
    }
    Ok(t)
}

impl CaClient {
    fn new(config: &IdentityConfig) -> Result<CaClient, IdentityError> {
        let url = config
            .ca_url
            .clone()
            .ok_or_else(|| IdentityError::Ca("no ca-url".into()))?;
        let token_file = config
            .token_file
            .as_deref()
            .ok_or_else(|| IdentityError::Ca("no token-file".into()))?;
        let token = read_token(token_file)?;
        let tls = if url.starts_with("https://") {
            let mut roots = rustls::RootCertStore::empty();
            let path = config.ca_file.as_deref().ok_or_else(|| {
                IdentityError::Ca("an https:// ca-url needs ca-file (the PEM to verify it)".into())
            })?;
            let pem = std::fs::read_to_string(path).map_err(|e| {
                IdentityError::Ca(format!("cannot read ca-file {}: {e}", path.display()))
            })?;
            for c in meshscope_identity::x509::certificates(&pem)? {
                roots
                    .add(c)
                    .map_err(|e| IdentityError::Ca(format!("ca-file: {e}")))?;
            }
            let c = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| IdentityError::Ca(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(c)))
        } else if url.starts_with("http://") {
            None
        } else {
            return Err(IdentityError::Ca(format!(
                "ca-url {url:?} is neither http:// nor https://"
            )));
        };
        Ok(CaClient { url, token, tls })
    }

    /// One certificate request.
    async fn certify(&self, key: &WorkloadKey) -> Result<Issued, IdentityError> {
        let body = serde_json::to_vec(&CertifyRequest {
            csr: key.csr_pem()?,
            token: Some(self.token.clone()),
        })
        .map_err(|e| IdentityError::Ca(e.to_string()))?;
        let uri: http::Uri = format!("{}/api/v1/identity/certify", self.url.trim_end_matches('/'))
            .parse()
            .map_err(|e| IdentityError::Ca(format!("ca-url: {e}")))?;
        let host = uri.host().unwrap_or("localhost").to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let req = http::Request::post(uri.path())
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| IdentityError::Ca(e.to_string()))?;
        let ca = |e: &dyn std::fmt::Display| IdentityError::Ca(format!("{}: {e}", self.url));
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| ca(&e))?;
        let response = match &self.tls {
            Some(tls) => {
                let name =
                    rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| ca(&e))?;
                let stream = tls.connect(name, tcp).await.map_err(|e| ca(&e))?;
                send(TokioIo::new(stream), req).await
            }
            None => send(TokioIo::new(tcp), req).await,
        }
        .map_err(|e| ca(&e))?;
        let (status, bytes) = response;
        if status != 200 {
            let why = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(IdentityError::Ca(format!(
                "the mesh CA refused the certificate request ({status}): {why}"
            )));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| IdentityError::Ca(format!("the mesh CA's answer: {e}")))
    }
}

async fn send<I>(
    io: I,
    req: http::Request<Full<bytes::Bytes>>,
) -> Result<(u16, bytes::Bytes), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let r = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "no answer within 10 s")??;
    let status = r.status().as_u16();
    let bytes = r.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// Gets the first certificate (retrying for up to `patience` while the CA is not up yet),
/// builds the TLS configs, and starts renewing.
pub async fn start(
    config: &IdentityConfig,
    id: SpiffeId,
    patience: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Arc<MeshIdentity>, tokio::task::JoinHandle<()>), IdentityError> {
    let client = CaClient::new(config)?;
    let key = WorkloadKey::generate(id.clone())?;
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = Duration::from_millis(200);
    let first = loop {
        match client
            .certify(&key)
            .await
            .and_then(|i| Ok(key.certified(&i)?))
        {
            Ok(c) => break c,
            // A refusal will not change by waiting.
            Err(IdentityError::Ca(m)) if m.contains("refused") => {
                return Err(IdentityError::Ca(m));
            }
            Err(e) if tokio::time::Instant::now() + backoff > deadline => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "no certificate yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    tracing::info!(identity = %id, not_after = %meshscope_identity::rfc3339(first.not_after), "workload certificate received");
    let renew_at = first.renew_at();
    let store = Arc::new(CertStore::new(id, first)?);
    let mesh = Arc::new(MeshIdentity {
        mode: tokio::sync::watch::channel(config.mode).0,
        server: meshscope_identity::mtls::server_config(Arc::clone(&store))?,
        client_http1: meshscope_identity::mtls::client_config(Arc::clone(&store), false)?,
        client_h2: meshscope_identity::mtls::client_config(Arc::clone(&store), true)?,
        store,
        renewed: AtomicU64::new(0),
        renew_failures: AtomicU64::new(0),
        inbound_refused: AtomicU64::new(0),
    });
    let task = tokio::spawn(renew(Arc::clone(&mesh), client, key, renew_at, stop));
    Ok((mesh, task))
}

async fn renew(
    mesh: Arc<MeshIdentity>,
    client: CaClient,
    key: WorkloadKey,
    mut renew_at: SystemTime,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let wait = renew_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match client
            .certify(&key)
            .await
            .and_then(|i| Ok(key.certified(&i)?))
        {
            Ok(next) => {
                renew_at = next.renew_at();
                tracing::info!(identity = %key.id(), not_after = %meshscope_identity::rfc3339(next.not_after), "workload certificate renewed");
                mesh.store.replace(next);
                mesh.renewed.fetch_add(1, Ordering::Relaxed);
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                mesh.renew_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "certificate renewal failed; the current one stays until it expires");
                renew_at = SystemTime::now() + backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
