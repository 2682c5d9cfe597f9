//! Following a control plane: `meshscope proxy --control-plane URL --workload NAME` asks
//! `GET URL/api/v1/mesh/policy/NAME` for its policy document, long-polling for the next
//! version (`after=<applied>`), applies each new version atomically (the registry,
//! routes and policies, and the authorization rules swap whole, as a file reload does),
//! and reports back with every poll what it runs: `applied`, `error` (the last document
//! it could not apply, the previous one kept) and its certificate's expiry. Without a
//! control plane the proxy's file is the policy, as before.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde::{Deserialize, Serialize};

use crate::config::{AuthorizationRule, Destination, ProxyConfig};

/// One workload's policy: the destinations (with their routes and policies) and the
/// inbound authorization rules, in the proxy file's own TOML form.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// What the inbound listener accepts: `strict` (mutual TLS only) or `permissive`
    /// (mutual TLS or plaintext); absent: the proxy file's `[identity] mode`. Needs a proxy
    /// with a certificate (`[identity]` on).
    #[serde(default, rename = "mtls-mode", skip_serializing_if = "Option::is_none")]
    pub mtls_mode: Option<crate::config::MtlsMode>,
    #[serde(default, rename = "destination")]
    pub destinations: Vec<Destination>,
    #[serde(default)]
    pub authorization: Vec<AuthorizationRule>,
}

impl PolicyDocument {
    /// Parses and checks a document against `base` (the proxy's own settings); the error
    /// lists every problem found.
    pub fn parse(
        text: &str,
        base: &ProxyConfig,
    ) -> Result<(PolicyDocument, ProxyConfig), Vec<String>> {
        Self::parse_as(text, base, true)
    }

    /// Checks a document as the control plane does, for any proxy of the workload: as
    /// [`PolicyDocument::parse`], except that `mtls-mode` is not refused for want of the
    /// proxy's certificate (each proxy checks that when it applies the document).
    pub fn check(text: &str, base: &ProxyConfig) -> Result<PolicyDocument, Vec<String>> {
        Self::parse_as(text, base, false).map(|(d, _)| d)
    }

    fn parse_as(
        text: &str,
        base: &ProxyConfig,
        needs_identity: bool,
    ) -> Result<(PolicyDocument, ProxyConfig), Vec<String>> {
        use crate::config::MtlsMode;
        let doc: PolicyDocument = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut problems = Vec::new();
        let mut identity = base.identity.clone();
        match doc.mtls_mode {
            None => {}
            Some(MtlsMode::Off) => problems.push(
                "mtls-mode is \"strict\" or \"permissive\"; whether a proxy has a certificate at all is its own file's [identity]"
                    .to_string(),
            ),
            Some(m) if base.identity.mode == MtlsMode::Off && needs_identity => {
                problems.push(format!(
                    "mtls-mode {:?} needs a certificate, and this proxy runs without one ([identity] mode is \"off\" in its file)",
                    format!("{m:?}").to_ascii_lowercase()
                ))
            }
            // The control plane's check: each proxy decides when it applies it.
            Some(_) if base.identity.mode == MtlsMode::Off => {}
            Some(m) => identity.mode = m,
        }
        let config = ProxyConfig {
            destinations: doc.destinations.clone(),
            authorization: doc.authorization.clone(),
            identity,
            ..base.clone()
        };
        if let Err(e) = config.validate() {
            problems.extend(e.problems());
        }
        if problems.is_empty() {
            Ok((doc, config))
        } else {
            Err(problems)
        }
    }
}

/// What the control plane answers.
#[derive(Debug, Deserialize)]
struct Answer {
    version: u64,
    document: String,
}

/// Where to follow.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// `http://host:port` of `meshscope serve` (or `query`).
    pub url: String,
    pub workload: String,
}

/// What the proxy runs, as it reports it.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub version: u64,
    pub last_error: Option<String>,
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

/// One long poll: the document when there is one newer than `applied`.
async fn poll(
    client: &Client,
    cp: &ControlPlane,
    instance: &str,
    applied: &Applied,
    cert_expiry: Option<u64>,
) -> Result<Option<Answer>, String> {
    let mut url = format!(
        "{}/api/v1/mesh/policy/{}?after={}&wait_ms=20000&instance={}&applied={}",
        cp.url.trim_end_matches('/'),
        encode(&cp.workload),
        applied.version,
        encode(instance),
        applied.version
    );
    if let Some(e) = &applied.last_error {
        url.push_str(&format!("&error={}", encode(e)));
    }
    if let Some(t) = cert_expiry {
        url.push_str(&format!("&cert_expiry={t}"));
    }
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.get(uri))
        .await
        .map_err(|_| "the control plane did not answer within 30 s".to_string())?
        .map_err(|e| format!("cannot reach the control plane: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    match status.as_u16() {
        200 => {
            let a: Answer = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            Ok((a.version > applied.version).then_some(a))
        }
        // No document for this workload yet.
        404 => Ok(None),
        s => Err(format!(
            "the control plane answered {s}: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// Follows the control plane until `stop`, handing each valid new document to `apply`.
pub async fn follow(
    cp: ControlPlane,
    base: ProxyConfig,
    cert_expiry: impl Fn() -> Option<u64> + Send + 'static,
    applied: std::sync::Arc<std::sync::Mutex<Applied>>,
    apply: impl Fn(&ProxyConfig) + Send + 'static,
    stop: impl std::future::Future<Output = ()>,
) {
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    // This process and a random part: two proxies of one workload on one host differ.
    let instance = format!(
        "{}-{}-{:06x}",
        cp.workload,
        std::process::id(),
        rand::random_range(0..0x100_0000u32)
    );
    let mut backoff = Duration::from_millis(200);
    tokio::pin!(stop);
    loop {
        let now = applied.lock().map(|a| a.clone()).unwrap_or_default();
        let polled = tokio::select! {
            r = poll(&client, &cp, &instance, &now, cert_expiry()) => r,
            () = &mut stop => return,
        };
        match polled {
            Ok(Some(a)) => {
                backoff = Duration::from_millis(200);
                let outcome = PolicyDocument::parse(&a.document, &base);
                let mut state = applied.lock().unwrap_or_else(|p| p.into_inner());
                match outcome {
                    Ok((_, config)) => {
                        apply(&config);
                        state.version = a.version;
                        state.last_error = None;
                        tracing::info!(workload = %cp.workload, version = a.version, "policy applied from the control plane");
                    }
                    Err(e) => {
                        tracing::warn!(workload = %cp.workload, version = a.version, error = %e.join("; "), "policy refused; keeping the previous one");
                        // Not applied: reported, and not asked for again until a newer one.
                        state.version = a.version;
                        state.last_error = Some(format!("version {}: {}", a.version, e.join("; ")));
                    }
                }
            }
            Ok(None) => backoff = Duration::from_millis(200),
            Err(e) => {
                tracing::warn!(error = %e, "control plane poll failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {},
                    () = &mut stop => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
