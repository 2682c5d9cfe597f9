//! The mesh CA on the HTTP API (`serve` and `query`) and `meshscope identity token`.
//!
//! - `POST /api/v1/identity/certify` `{"csr": PEM, "token": "msb_…"}` → 200 with
//!   [`Issued`](meshscope_identity::ca::Issued), or 400 / 401 / 403 `{"error": …}`. The
//!   bootstrap token in the body is its authentication, so the API's bearer check leaves
//!   this path alone.
//! - `GET /api/v1/identity/trust-anchors`: the mesh root (PEM), for anyone verifying a
//!   workload certificate (openssl, a sidecar of another make).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshscope_identity::ca::{CertifyError, CertifyRequest, MeshCa};
use meshscope_query::analysis::prometheus::Escaped;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use crate::config::{ServeConfig, TokenArgs};

/// The CA and what it has done, for `/metrics`.
#[derive(Debug)]
pub struct Identity {
    pub ca: MeshCa,
    pub issued: AtomicU64,
    /// Refusals by status: 400, 401, 403, 500.
    pub refused: [AtomicU64; 4],
    /// The newest certificate's expiry (Unix seconds) per identity. Bounded: only the
    /// identities a bootstrap token covers are ever issued.
    pub expiry: Mutex<BTreeMap<String, u64>>,
}

impl Identity {
    /// `<data-dir>/ca/`, made on first start.
    pub fn open(config: &ServeConfig) -> Result<Arc<Identity>, String> {
        let ca = MeshCa::open(
            &config.data_dir.join("ca"),
            &config.trust_domain,
            config.cert_lifetime,
        )
        .map_err(|e| format!("cannot open the mesh CA: {e}"))?;
        Ok(Arc::new(Identity {
            ca,
            issued: AtomicU64::new(0),
            refused: Default::default(),
            expiry: Mutex::default(),
        }))
    }

    pub fn refusals(&self) -> [(u16, u64); 4] {
        let n = |i: usize| self.refused[i].load(Ordering::Relaxed);
        [(400, n(0)), (401, n(1)), (403, n(2)), (500, n(3))]
    }
}

/// `meshscope_identity_*` on `/metrics`.
#[derive(Debug, Clone)]
pub struct IdentityCollector(pub Arc<Identity>);

impl Collector for IdentityCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        use prometheus_client::encoding::NoLabelSet;
        let id = &self.0;
        enc.encode_descriptor(
            "meshscope_identity_certificates_issued",
            "Workload certificates the mesh CA signed.",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, _, u64>(&id.issued.load(Ordering::Relaxed), None)?;
        {
            let mut refused = enc.encode_descriptor(
                "meshscope_identity_certify_refused",
                "Certificate requests refused, by HTTP status (400 bad CSR, 401 no or unknown \
                 token, 403 identity not covered by the token).",
                None,
                MetricType::Counter,
            )?;
            for (status, n) in id.refusals() {
                let code = status.to_string();
                refused
                    .encode_family(&[("status", code.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        enc.encode_descriptor(
            "meshscope_identity_root_expiry_timestamp_seconds",
            "When the mesh root certificate expires (Unix seconds).",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&unix(id.ca.root_not_after()))?;
        let mut expiry = enc.encode_descriptor(
            "meshscope_identity_certificate_expiry_timestamp_seconds",
            "When each workload identity's newest certificate expires (Unix seconds): a proxy \
             that stopped renewing shows here before its peers refuse it.",
            None,
            MetricType::Gauge,
        )?;
        let m = id.expiry.lock().map(|m| m.clone()).unwrap_or_default();
        for (identity, t) in &m {
            expiry
                .encode_family(&[("identity", Escaped(identity))])?
                .encode_gauge(&(*t as i64))?;
        }
        Ok(())
    }
}

fn unix(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn router(identity: Arc<Identity>) -> Router {
    Router::new()
        .route("/api/v1/identity/certify", post(certify))
        .route("/api/v1/identity/trust-anchors", get(trust_anchors))
        // A CSR is a few hundred bytes.
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(identity)
}

/// Paths the API's bearer-token gate leaves to this module.
pub fn is_identity_path(path: &str) -> bool {
    path == "/api/v1/identity/certify" || path == "/api/v1/identity/trust-anchors"
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

async fn certify(State(identity): State<Arc<Identity>>, body: axum::body::Bytes) -> Response {
    let req: CertifyRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            identity.refused[0].fetch_add(1, Ordering::Relaxed);
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not {{\"csr\": PEM, \"token\": \"…\"}}: {e}"),
            );
        }
    };
    // Verifying the CSR, reading the token file and signing: off the async threads.
    let id = Arc::clone(&identity);
    let answer = tokio::task::spawn_blocking(move || id.ca.certify(&req)).await;
    match answer {
        Ok(Ok(issued)) => {
            identity.issued.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut m) = identity.expiry.lock() {
                m.insert(issued.identity.clone(), issued.not_after_unix);
            }
            axum::Json(issued).into_response()
        }
        Ok(Err(e)) => {
            let i = match e {
                CertifyError::BadRequest(_) => 0,
                CertifyError::Unauthenticated(_) => 1,
                CertifyError::Forbidden(_) => 2,
                CertifyError::Internal(_) => 3,
            };
            identity.refused[i].fetch_add(1, Ordering::Relaxed);
            tracing::info!(status = e.status(), reason = %e, "certificate request refused");
            let status =
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            error(status, e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn trust_anchors(State(identity): State<Arc<Identity>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        identity.ca.root_pem().to_string(),
    )
        .into_response()
}

/// `meshscope identity token`: prints the token, once.
pub fn token(args: TokenArgs) -> Result<(), String> {
    let dir = args.data_dir.join("ca");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let tokens = meshscope_identity::tokens::BootstrapTokens::in_dir(&dir);
    let token = tokens
        .mint(&args.namespace, &args.workloads)
        .map_err(|e| e.to_string())?;
    println!("{token}");
    eprintln!(
        "bootstrap token for {} in namespace {:?}; it is shown only now (its SHA-256 is in {})",
        args.workloads.join(", "),
        args.namespace,
        tokens.path().display()
    );
    Ok(())
}
