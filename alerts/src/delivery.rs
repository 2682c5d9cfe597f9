//! The HTTP client deliveries go out on: `http://` and `https://` receivers, over pooled
//! keep-alive connections (hyper-util), TLS by rustls (ring) verifying against the system's
//! roots (`rustls-native-certs`: Debian's ca-certificates) plus a receiver's own
//! `ca-file`, one client per distinct CA file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One client for the system's roots, one more per `ca-file`.
#[derive(Clone)]
pub struct Delivery {
    system: HttpsClient,
    by_ca: Arc<HashMap<PathBuf, HttpsClient>>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("ca_files", &self.by_ca.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What one POST got: the status and the start of the body, or why there was none.
pub enum Posted {
    Answered { status: u16, text: String },
    TimedOut,
    Failed(String),
}

fn client(extra: Option<&Path>) -> Result<HttpsClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    // The system's roots; a machine without any still reaches receivers with a ca-file.
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(path) = extra {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read ca-file {}: {e}", path.display()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("ca-file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "ca-file {} holds no PEM CERTIFICATE",
                path.display()
            ));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("ca-file {}: {e}", path.display()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(https))
}

impl Delivery {
    /// Clients for the system's roots and each of `ca_files`; a CA file that cannot be read
    /// is an error naming it.
    pub fn new<'a>(ca_files: impl IntoIterator<Item = &'a Path>) -> Result<Delivery, String> {
        let mut by_ca = HashMap::new();
        for path in ca_files {
            if !by_ca.contains_key(path) {
                by_ca.insert(path.to_path_buf(), client(Some(path))?);
            }
        }
        Ok(Delivery {
            system: client(None)?,
            by_ca: Arc::new(by_ca),
        })
    }

    /// POSTs `body` with `headers` to `url`, waiting at most `timeout` for the answer.
    pub async fn post(
        &self,
        url: &str,
        ca_file: Option<&Path>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        timeout: Duration,
    ) -> Posted {
        let client = ca_file
            .and_then(|p| self.by_ca.get(p))
            .unwrap_or(&self.system);
        let mut req = http::Request::post(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match req.body(Full::new(Bytes::from(body))) {
            Ok(r) => r,
            Err(e) => return Posted::Failed(format!("bad request: {e}")),
        };
        let answer = async {
            let r = client.request(req).await.map_err(|e| {
                // The connector's reason (refused, TLS: unknown issuer …) is in the source.
                let mut msg = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    source = s.source();
                }
                msg
            })?;
            let status = r.status().as_u16();
            let bytes = r
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            Ok::<_, String>((
                status,
                String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            ))
        };
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok((status, text))) => Posted::Answered { status, text },
            Ok(Err(e)) => Posted::Failed(e),
            Err(_) => Posted::TimedOut,
        }
    }
}
