//! The proxy's TOML configuration: who it stands in front of, where it listens, where its
//! telemetry goes, and the static service registry with each destination's traffic policy.
//!
//! Parsed with `deny_unknown_fields` and validated once ([`ProxyConfig::parse`]); the
//! `[[destination]]` tables are re-read while the proxy runs (see [`crate::reload`]).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read proxy config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid proxy config: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid proxy config: {0}")]
    Invalid(String),
    /// Every problem `validate` found, each on its own.
    #[error("invalid proxy config: {}", .0.join("; "))]
    Problems(Vec<String>),
}

impl ConfigError {
    /// The problems one by one (one for any error but `Problems`).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Problems(p) => p.clone(),
            ConfigError::Parse(e) => vec![e.to_string()],
            other => vec![other.to_string()],
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProxyConfig {
    /// The proxied service instance.
    pub service: ServiceIdentity,
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Workload identity and mutual TLS (absent: `mode = "off"`).
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Who may call the local app (inbound); reloaded with the registry.
    #[serde(default, rename = "authorization")]
    pub authorization: Vec<AuthorizationRule>,
    /// The static service registry: where the app's outbound calls may go.
    #[serde(default, rename = "destination")]
    pub destinations: Vec<Destination>,
}

/// How the inbound listener treats connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MtlsMode {
    /// Only mutual TLS: a plaintext connection, or TLS without a mesh certificate, is refused.
    Strict,
    /// Mutual TLS or plaintext on the same port (told apart by the first byte).
    Permissive,
    /// No identity: plaintext in and out.
    #[default]
    Off,
}

/// `[identity]`: where the proxy gets its certificate.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IdentityConfig {
    #[serde(default)]
    pub mode: MtlsMode,
    /// The mesh CA: meshscope's HTTP API, e.g. `http://127.0.0.1:8080` (https with `ca-file`).
    pub ca_url: Option<String>,
    /// A file holding the bootstrap token from `meshscope identity token`.
    pub token_file: Option<std::path::PathBuf>,
    /// PEM the CA URL's server certificate is verified with, for an `https://` CA URL.
    pub ca_file: Option<std::path::PathBuf>,
    /// [meshscope.local]
    pub trust_domain: Option<String>,
    /// [service.namespace, else "default"]
    pub namespace: Option<String>,
}

impl IdentityConfig {
    pub fn trust_domain(&self) -> &str {
        self.trust_domain.as_deref().unwrap_or("meshscope.local")
    }
}

/// Whether a rule refuses (enforce) or only marks (audit) the calls it does not allow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthzMode {
    #[default]
    Enforce,
    Audit,
}

/// One `[[authorization]]` rule: the client identities admitted to the local app.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AuthorizationRule {
    /// `spiffe://…/ns/<ns>/sa/<workload>`, `ns/<ns>/sa/<workload>` or `ns/<ns>/*`.
    pub allow: Vec<String>,
    #[serde(default)]
    pub mode: AuthzMode,
}

/// Resource attributes of everything the proxy reports.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServiceIdentity {
    /// `service.name`.
    pub name: String,
    /// `service.namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// `service.version`.
    #[serde(default)]
    pub version: Option<String>,
    /// The workload label of metrics and access logs [the service name].
    #[serde(default)]
    pub workload: Option<String>,
}

impl ServiceIdentity {
    pub fn workload(&self) -> &str {
        self.workload.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Listen {
    /// Inbound listener, in front of the local app (absent: no inbound side).
    pub inbound: Option<SocketAddr>,
    /// The local app the inbound side forwards to.
    pub app: Option<SocketAddr>,
    /// Outbound listener: the app's calls to other services (absent: no outbound side).
    pub outbound: Option<SocketAddr>,
    /// Admin endpoint: `/stats` (JSON), `/metrics` (Prometheus text), `/ready`.
    pub admin: Option<SocketAddr>,
    /// Speak h2c (prior knowledge) to the local app instead of HTTP/1.1.
    #[serde(default)]
    pub app_h2c: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint (absent: telemetry is counted but not exported).
    pub otlp_endpoint: Option<String>,
    /// A file holding the token (with the `ingest` scope) sent as `authorization: Bearer`
    /// on every export, for a server started with `--auth-file` [none].
    pub otlp_token_file: Option<std::path::PathBuf>,
    /// How often a batch is sent [1000 ms].
    pub batch_interval_ms: u64,
    /// Finished requests waiting for the exporter (which makes each one's span and log
    /// record); beyond it their spans and log records are dropped and counted [20000].
    pub queue_capacity: usize,
    /// Largest batch of spans or log records in one export request; a full batch is sent
    /// within 100 ms, so export work is spread over the interval [512].
    pub max_batch: usize,
    /// An export that takes longer is abandoned and its records counted as dropped [2000 ms].
    pub export_timeout_ms: u64,
    /// Emit one access-log record per request [true].
    pub access_logs: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            otlp_token_file: None,
            batch_interval_ms: 1000,
            queue_capacity: 20_000,
            max_batch: 512,
            export_timeout_ms: 2000,
            access_logs: true,
        }
    }
}

/// One destination service of the registry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Destination {
    /// The name the app calls it by (the `Host` / `:authority`, port ignored); also
    /// `peer.service` of the CLIENT span and the destination label.
    pub name: String,
    /// Other host names routed here.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `db.system` on the CLIENT span, for database-like peers.
    #[serde(default)]
    pub db_system: Option<String>,
    /// Speak h2c (prior knowledge) upstream instead of HTTP/1.1 (over mTLS: h2 by ALPN).
    #[serde(default)]
    pub h2c: bool,
    /// Call it over mutual TLS [true when `[identity]` is on]; `false` for a peer outside
    /// the mesh (no sidecar), which is then called in plaintext and shows so.
    #[serde(default)]
    pub mtls: Option<bool>,
    /// The namespace of its workloads' identities [this proxy's namespace].
    #[serde(default)]
    pub namespace: Option<String>,
    /// The versions (endpoints) and their weights.
    #[serde(rename = "endpoint")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub policy: Policy,
    /// Routes by request (`[[destination.route]]`), first match wins; requests no route
    /// matches take the endpoints' split and the policy above.
    #[serde(default, rename = "route")]
    pub routes: Vec<crate::routes::RouteConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Endpoint {
    pub address: SocketAddr,
    /// `destination_version` label [v1].
    #[serde(default = "default_version")]
    pub version: String,
    /// `destination_workload` label [the destination name].
    #[serde(default)]
    pub workload: Option<String>,
    /// Share of traffic, relative to the other endpoints [1].
    #[serde(default = "one")]
    pub weight: u32,
    /// The SPIFFE ID it must prove over mTLS
    /// [`spiffe://<trust-domain>/ns/<namespace>/sa/<workload>`].
    #[serde(default)]
    pub identity: Option<String>,
}

fn default_version() -> String {
    "v1".into()
}

fn one() -> u32 {
    1
}

/// Traffic policy of one destination; every part is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Policy {
    /// Whole-request timeout (answered 504).
    pub timeout_ms: Option<u64>,
    pub retry: Option<RetryConfig>,
    pub breaker: Option<BreakerConfig>,
    pub rate_limit: Option<RateLimitConfig>,
    pub fault: Option<FaultConfig>,
    /// Outlier ejection of endpoints (Envoy's outlier detection).
    pub outlier: Option<OutlierConfig>,
}

/// Takes an endpoint out of rotation after failures in a row.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OutlierConfig {
    /// 5xx answers (connection failures included) in a row that eject it [5].
    #[serde(default = "five")]
    pub consecutive_5xx: u32,
    /// The first ejection's length; the n-th lasts n times as long, up to 10× [30000].
    #[serde(default = "base_ejection")]
    pub base_ejection_ms: u64,
    /// At most this share of the destination's endpoints out at once [50].
    #[serde(default = "fifty")]
    pub max_ejection_percent: u32,
}

fn base_ejection() -> u64 {
    30_000
}
fn fifty() -> u32 {
    50
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetryConfig {
    /// Retries after the first attempt [2].
    #[serde(default = "two")]
    pub max_retries: u32,
    /// First backoff; doubles each retry [25 ms].
    #[serde(default = "backoff_base")]
    pub backoff_base_ms: u64,
    /// Largest backoff [250 ms].
    #[serde(default = "backoff_max")]
    pub backoff_max_ms: u64,
    /// Statuses that are retried [502, 503, 504]; connection failures always are.
    #[serde(default = "retry_on")]
    pub retry_on: Vec<u16>,
    /// Retry non-idempotent methods (POST, PATCH) too [false].
    #[serde(default)]
    pub all_methods: bool,
    /// Largest request body kept for replay; larger bodies are never retried [65536].
    #[serde(default = "max_replay")]
    pub max_body_bytes: u64,
    /// Retry budget: retries may add this share of the requests [0.2].
    #[serde(default = "budget_ratio")]
    pub budget_ratio: f64,
    /// ... plus this many retries per second regardless [10].
    #[serde(default = "min_per_sec")]
    pub budget_min_per_sec: f64,
}

fn two() -> u32 {
    2
}
fn backoff_base() -> u64 {
    25
}
fn backoff_max() -> u64 {
    250
}
fn retry_on() -> Vec<u16> {
    vec![502, 503, 504]
}
fn max_replay() -> u64 {
    64 * 1024
}
fn budget_ratio() -> f64 {
    0.2
}
fn min_per_sec() -> f64 {
    10.0
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BreakerConfig {
    /// Consecutive failures (5xx or no connection) that open the breaker [5].
    #[serde(default = "five")]
    pub consecutive_failures: u32,
    /// How long it stays open before one probe is let through [5000 ms].
    #[serde(default = "open_ms")]
    pub open_ms: u64,
}

fn five() -> u32 {
    5
}
fn open_ms() -> u64 {
    5000
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RateLimitConfig {
    /// Tokens added per second.
    pub requests_per_sec: f64,
    /// Bucket size [requests-per-sec].
    pub burst: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FaultConfig {
    /// Share of requests answered with `abort-status` without being sent, 0–100 [0].
    #[serde(default)]
    pub abort_percent: f64,
    /// [503]
    #[serde(default = "abort_status")]
    pub abort_status: u16,
    /// Share of requests delayed by `delay-ms`, 0–100 [0].
    #[serde(default)]
    pub delay_percent: f64,
    #[serde(default)]
    pub delay_ms: u64,
}

fn abort_status() -> u16 {
    503
}

impl ProxyConfig {
    pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<ProxyConfig, ConfigError> {
        let config: ProxyConfig = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        // Every problem, not the first: a document is fixed in one round.
        let mut problems: Vec<String> = Vec::new();
        if self.service.name.is_empty() {
            problems.push("service.name is empty".into());
        }
        if self.listen.inbound.is_some() != self.listen.app.is_some() {
            problems.push("listen.inbound and listen.app go together".into());
        }
        if self.telemetry.batch_interval_ms == 0 || self.telemetry.max_batch == 0 {
            problems.push("telemetry.batch-interval-ms and max-batch must be positive".into());
        }
        let id = &self.identity;
        if id.mode != MtlsMode::Off {
            if id.ca_url.is_none() || id.token_file.is_none() {
                problems
                    .push("identity: a mode other than \"off\" needs ca-url and token-file".into());
            }
            if let Err(e) = self.workload_identity() {
                problems.push(format!("identity: {e}"));
            }
        }
        for (i, r) in self.authorization.iter().enumerate() {
            if r.allow.is_empty() {
                problems.push(format!("authorization #{}: allow is empty", i + 1));
            }
            for a in &r.allow {
                if let Err(e) = meshscope_identity::IdentityPattern::parse(a, id.trust_domain()) {
                    problems.push(format!("authorization #{}: {e}", i + 1));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for d in &self.destinations {
            if self.mtls_to(d) {
                for e in &d.endpoints {
                    if let Err(err) = self.expected_identity(d, e) {
                        problems.push(format!("destination {:?}: {err}", d.name));
                    }
                }
            }
            for n in std::iter::once(&d.name).chain(&d.aliases) {
                if !names.insert(n.to_ascii_lowercase()) {
                    problems.push(format!("destination name {n:?} appears twice"));
                }
            }
            if d.endpoints.is_empty() {
                problems.push(format!("destination {:?} has no endpoint", d.name));
            }
            if !d.endpoints.is_empty() && d.endpoints.iter().all(|e| e.weight == 0) {
                problems.push(format!("destination {:?}: every weight is 0", d.name));
            }
            let p = &d.policy;
            if let Some(f) = &p.fault {
                if !(0.0..=100.0).contains(&f.abort_percent)
                    || !(0.0..=100.0).contains(&f.delay_percent)
                {
                    problems.push(format!(
                        "destination {:?}: fault percentages must be within 0–100",
                        d.name
                    ));
                }
                if http::StatusCode::from_u16(f.abort_status).is_err() {
                    problems.push(format!(
                        "destination {:?}: abort-status {} is not an HTTP status",
                        d.name, f.abort_status
                    ));
                }
            }
            if let Some(r) = &p.rate_limit
                && (r.requests_per_sec <= 0.0 || r.burst.is_some_and(|b| b < 1.0))
            {
                problems.push(format!(
                    "destination {:?}: rate-limit needs requests-per-sec > 0 and burst >= 1",
                    d.name
                ));
            }
            if let Some(r) = &p.retry
                && (r.budget_ratio < 0.0 || r.backoff_base_ms > r.backoff_max_ms.max(1))
            {
                problems.push(format!(
                    "destination {:?}: retry needs budget-ratio >= 0 and backoff-base-ms <= backoff-max-ms",
                    d.name
                ));
            }
            if let Some(b) = &p.breaker
                && b.consecutive_failures == 0
            {
                problems.push(format!(
                    "destination {:?}: breaker.consecutive-failures must be positive",
                    d.name
                ));
            }
            if p.timeout_ms == Some(0) {
                problems.push(format!("destination {:?}: timeout-ms is 0", d.name));
            }
            if let Some(o) = &p.outlier
                && (o.consecutive_5xx == 0
                    || o.base_ejection_ms == 0
                    || o.max_ejection_percent > 100)
            {
                problems.push(format!(
                    "destination {:?}: outlier needs consecutive-5xx and base-ejection-ms above 0 and max-ejection-percent within 0–100",
                    d.name
                ));
            }
            let versions: Vec<&str> = d.endpoints.iter().map(|e| e.version.as_str()).collect();
            problems.extend(crate::routes::validate(&d.name, &d.routes, &versions));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Problems(problems))
        }
    }

    /// This proxy's SPIFFE ID.
    pub fn workload_identity(
        &self,
    ) -> Result<meshscope_identity::SpiffeId, meshscope_identity::spiffe::BadId> {
        meshscope_identity::SpiffeId::new(
            self.identity.trust_domain(),
            self.namespace(),
            self.service.workload(),
        )
    }

    /// `[identity] namespace`, else `service.namespace`, else `default`.
    pub fn namespace(&self) -> &str {
        self.identity
            .namespace
            .as_deref()
            .or(self.service.namespace.as_deref())
            .unwrap_or("default")
    }

    /// Whether calls to `d` originate mutual TLS.
    pub fn mtls_to(&self, d: &Destination) -> bool {
        self.identity.mode != MtlsMode::Off && d.mtls.unwrap_or(true)
    }

    /// The identity endpoint `e` of `d` must prove.
    pub fn expected_identity(
        &self,
        d: &Destination,
        e: &Endpoint,
    ) -> Result<meshscope_identity::SpiffeId, meshscope_identity::spiffe::BadId> {
        match &e.identity {
            Some(id) => id.parse(),
            None => meshscope_identity::SpiffeId::new(
                self.identity.trust_domain(),
                d.namespace.as_deref().unwrap_or(self.namespace()),
                e.workload.as_deref().unwrap_or(&d.name),
            ),
        }
    }

    pub fn batch_interval(&self) -> Duration {
        Duration::from_millis(self.telemetry.batch_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sidecar configuration the README shows (its ```toml block that starts with
    /// `[service]`): the documented example must be one the proxy takes.
    fn readme_example() -> &'static str {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\n[service]\n")
            .map(|i| i + "```toml\n".len())
            .expect("the README's sidecar example");
        let len = readme[start..].find("```").expect("its end");
        &readme[start..start + len]
    }

    #[test]
    fn the_readme_example_parses() {
        let c = ProxyConfig::parse(readme_example()).expect("parse");
        assert_eq!(c.service.workload(), "frontend");
        let d = &c.destinations[0];
        assert_eq!(d.endpoints[1].workload.as_deref(), Some("cart-v2"));
        assert_eq!(d.endpoints[0].weight, 90);
        let r = d.policy.retry.as_ref().expect("retry");
        assert_eq!(r.retry_on, vec![502, 503, 504]);
        assert!(!r.all_methods);
        assert_eq!(d.policy.fault.as_ref().map(|f| f.abort_status), Some(503));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let e = ProxyConfig::parse("[service]\nname = \"a\"\nnmae = 1\n").expect_err("unknown");
        assert!(e.to_string().contains("unknown field"), "{e}");
        let no_endpoint = "[service]\nname = \"a\"\n[[destination]]\nname = \"b\"\nendpoint = []\n";
        let e = ProxyConfig::parse(no_endpoint).expect_err("no endpoint");
        assert!(e.to_string().contains("has no endpoint"), "{e}");
        let bad_fault = readme_example().replace("delay-percent = 10", "delay-percent = 140");
        assert_ne!(bad_fault, readme_example());
        let e = ProxyConfig::parse(&bad_fault).expect_err("percent");
        assert!(e.to_string().contains("0–100"), "{e}");
        // A partial table takes the defaults for the rest.
        let partial = "[service]\nname = \"a\"\n[telemetry]\nbatch-interval-ms = 200\n";
        let c = ProxyConfig::parse(partial).expect("partial telemetry");
        assert_eq!(c.telemetry.queue_capacity, 20_000);
        assert_eq!(c.telemetry.batch_interval_ms, 200);
        let half = "[service]\nname = \"a\"\n[listen]\ninbound = \"127.0.0.1:1\"\n";
        let e = ProxyConfig::parse(half).expect_err("inbound without app");
        assert!(e.to_string().contains("go together"), "{e}");
    }
}
