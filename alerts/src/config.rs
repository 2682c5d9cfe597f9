//! The `[alerts]` table of the `--config` TOML file (kebab-case keys, unknown keys refused):
//!
//! ```toml
//! [alerts]
//! evaluation-interval-secs = 15
//! external-url = "http://meshscope.example:8080"
//!
//! [[alerts.rules]]
//! name = "checkout-errors"
//! signal = "error_rate"
//! service = "checkout"
//! threshold = 0.05
//! window-secs = 300
//! for-secs = 120
//! severity = "critical"
//!
//! [[alerts.receivers]]
//! name = "ops"
//! url = "http://127.0.0.1:9000/hook"
//! format = "alertmanager"          # or "json"
//! group-by = ["alertname", "service"]
//! hmac-secret = "s3cret"
//!
//! [[alerts.alertmanagers]]
//! url = "http://127.0.0.1:9093"
//! ```

use serde::{Deserialize, Serialize};

use crate::rule::RuleSpec;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AlertsConfig {
    /// How often every rule is evaluated [15].
    #[serde(default = "default_interval")]
    pub evaluation_interval_secs: u64,
    /// Base of the links in notifications (`generatorURL`, `externalURL`); the HTTP API's
    /// address when absent.
    #[serde(default)]
    pub external_url: Option<String>,
    /// How long resolved alerts stay visible in `GET /api/v1/alerts` [3600].
    #[serde(default = "default_keep_resolved")]
    pub keep_resolved_secs: u64,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    #[serde(default)]
    pub receivers: Vec<ReceiverConfig>,
    /// Alertmanager instances to push alerts to (`POST /api/v2/alerts`).
    #[serde(default)]
    pub alertmanagers: Vec<AlertmanagerConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            evaluation_interval_secs: default_interval(),
            external_url: None,
            keep_resolved_secs: default_keep_resolved(),
            rules: Vec::new(),
            receivers: Vec::new(),
            alertmanagers: Vec::new(),
        }
    }
}

fn default_interval() -> u64 {
    15
}

fn default_keep_resolved() -> u64 {
    3600
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Alertmanager's webhook payload, version 4.
    Alertmanager,
    /// meshscope's own JSON, with structured evidence.
    Json,
}

/// A webhook that gets notifications.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReceiverConfig {
    pub name: String,
    /// `http://…` or `https://…` (verified against the system's roots and `ca-file`).
    pub url: String,
    /// PEM CA certificates an `https://` receiver is also verified against [none].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(default = "default_format")]
    pub format: Format,
    /// Alerts with the same values of these labels go out together [["alertname"]].
    #[serde(default = "default_group_by")]
    pub group_by: Vec<String>,
    /// Also notify when alerts resolve [true].
    #[serde(default = "yes")]
    pub send_resolved: bool,
    /// Per attempt [10].
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Tries per notification before giving up until the next evaluation [5].
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// The first wait between tries; it doubles each time [500].
    #[serde(default = "default_backoff")]
    pub initial_backoff_ms: u64,
    /// The longest wait between tries [30000].
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
    /// Signs each body: `X-Meshscope-Signature: sha256=<hex HMAC-SHA256 of the body>`.
    #[serde(default, skip_serializing)]
    pub hmac_secret: Option<String>,
}

fn default_format() -> Format {
    Format::Alertmanager
}
fn default_group_by() -> Vec<String> {
    vec!["alertname".into()]
}
fn yes() -> bool {
    true
}
fn default_timeout() -> u64 {
    10
}
fn default_attempts() -> u32 {
    5
}
fn default_backoff() -> u64 {
    500
}
fn default_max_backoff() -> u64 {
    30_000
}

impl ReceiverConfig {
    /// A webhook receiver with the defaults.
    pub fn webhook(name: &str, url: &str) -> ReceiverConfig {
        ReceiverConfig {
            name: name.into(),
            url: url.into(),
            format: default_format(),
            group_by: default_group_by(),
            send_resolved: true,
            timeout_secs: default_timeout(),
            max_attempts: default_attempts(),
            initial_backoff_ms: default_backoff(),
            max_backoff_ms: default_max_backoff(),
            hmac_secret: None,
            ca_file: None,
        }
    }
}

/// An Alertmanager to push to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AlertmanagerConfig {
    /// Its base URL, e.g. `http://127.0.0.1:9093` or `https://alertmanager.internal:9093`.
    pub url: String,
    /// PEM CA certificates an `https://` Alertmanager is also verified against [none].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_table_parses_and_typos_do_not() {
        let c: AlertsConfig = toml::from_str(
            r#"
            evaluation-interval-secs = 5
            [[rules]]
            name = "r"
            signal = "p99_ms"
            service = "a"
            threshold = 300.0
            [[receivers]]
            name = "ops"
            url = "http://127.0.0.1:9/x"
            format = "json"
            hmac-secret = "k"
            [[alertmanagers]]
            url = "http://127.0.0.1:9093"
            "#,
        )
        .expect("parse");
        assert_eq!(c.evaluation_interval_secs, 5);
        assert_eq!(c.receivers[0].format, Format::Json);
        assert_eq!(c.receivers[0].group_by, vec!["alertname"]);
        assert_eq!(c.receivers[0].max_attempts, 5);
        assert!(
            toml::from_str::<AlertsConfig>("[[receivers]]\nname = \"x\"\nurl = \"u\"\nretries = 3")
                .is_err()
        );
    }
}
