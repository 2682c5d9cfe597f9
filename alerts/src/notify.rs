//! Webhook notifications: which are owed, grouped how, in which format, sent how.
//!
//! - **Owed** ([`owed`]): a firing alert the receiver was not told is firing; a resolved
//!   alert the receiver was told is firing (when it wants resolved notifications). A
//!   receiver's acknowledgement (2xx) is what marks an alert as told, so nothing is sent
//!   twice and a receiver that was down gets what it missed.
//! - **Grouped** by the receiver's `group-by` labels: one notification per group with a
//!   change, carrying the changed alerts and the group's other firing alerts.
//! - **Formats**: Alertmanager's webhook payload version 4 ([`alertmanager_v4`]) so
//!   existing receivers work, or meshscope's JSON with structured evidence ([`plain`]).
//! - **Sent** ([`send`]) with a per-attempt timeout, retries with exponential backoff on
//!   network errors, 5xx and 429, an optional HMAC-SHA256 signature header, and every
//!   attempt reported.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::clock::{Sleeper, rfc3339};
use crate::config::{Format, ReceiverConfig};
use crate::eval::{Alert, AlertState, Alerts};
use crate::state::DeliveryAttempt;

/// The signature header: `sha256=<hex HMAC-SHA256(secret, body)>`.
pub const SIGNATURE_HEADER: &str = "X-Meshscope-Signature";

/// One notification to one receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub receiver: String,
    pub group_key: String,
    pub group_labels: BTreeMap<String, String>,
    /// The alerts it carries, as they are now.
    pub alerts: Vec<Alert>,
    /// The alerts whose change it announces (the receiver is told about these).
    pub changed: Vec<(String, AlertState)>,
}

impl Notification {
    /// `firing` when any alert in it fires, else `resolved`.
    pub fn status(&self) -> &'static str {
        if self.alerts.iter().any(|a| a.state == AlertState::Firing) {
            "firing"
        } else {
            "resolved"
        }
    }
}

/// `{}:{alertname="x", service="y"}`, Alertmanager's shape of a group key.
fn group_key(labels: &BTreeMap<String, String>) -> String {
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}={}", serde_json::Value::String(v.clone())))
        .collect();
    format!("{{}}:{{{}}}", inner.join(", "))
}

/// What a receiver is owed now, grouped. Alerts that resolved before the receiver heard
/// they fired need no notification; they are returned in `silently` so the caller marks
/// them as told.
pub fn owed(alerts: &Alerts, receiver: &ReceiverConfig) -> (Vec<Notification>, Vec<String>) {
    let mut silently = Vec::new();
    let mut groups: BTreeMap<BTreeMap<String, String>, Notification> = BTreeMap::new();
    let group_of = |a: &Alert| -> BTreeMap<String, String> {
        receiver
            .group_by
            .iter()
            .filter_map(|k| a.labels.get(k).map(|v| (k.clone(), v.clone())))
            .collect()
    };
    for a in alerts.values() {
        let told = a.notified.get(&receiver.name).copied();
        let change = match (a.state, told) {
            (AlertState::Firing, Some(AlertState::Firing)) => None,
            (AlertState::Firing, _) => Some(AlertState::Firing),
            (AlertState::Resolved, Some(AlertState::Firing)) if receiver.send_resolved => {
                Some(AlertState::Resolved)
            }
            (AlertState::Resolved, Some(AlertState::Resolved)) => None,
            (AlertState::Resolved, _) => {
                silently.push(a.fingerprint.clone());
                None
            }
            (AlertState::Pending, _) => None,
        };
        if let Some(state) = change {
            let labels = group_of(a);
            let n = groups
                .entry(labels.clone())
                .or_insert_with(|| Notification {
                    receiver: receiver.name.clone(),
                    group_key: group_key(&labels),
                    group_labels: labels,
                    alerts: Vec::new(),
                    changed: Vec::new(),
                });
            n.alerts.push(a.clone());
            n.changed.push((a.fingerprint.clone(), state));
        }
    }
    // The group's other firing alerts ride along, as Alertmanager sends whole groups.
    for n in groups.values_mut() {
        for a in alerts.values() {
            if a.state == AlertState::Firing
                && group_of(a) == n.group_labels
                && !n.changed.iter().any(|(fp, _)| *fp == a.fingerprint)
            {
                n.alerts.push(a.clone());
            }
        }
    }
    (groups.into_values().collect(), silently)
}

fn common(maps: Vec<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    let Some((first, rest)) = maps.split_first() else {
        return BTreeMap::new();
    };
    first
        .iter()
        .filter(|(k, v)| rest.iter().all(|m| m.get(*k) == Some(v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The link to an alert's rule in the API.
pub fn generator_url(external_url: &str, alert: &Alert) -> String {
    format!(
        "{}/api/v1/alerts/rules/{}",
        external_url.trim_end_matches('/'),
        alert.rule
    )
}

/// Go's zero time, which Alertmanager uses for "no end yet".
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

fn starts_at(a: &Alert) -> DateTime<Utc> {
    a.fired_at.unwrap_or(a.active_at)
}

fn ends_at(a: &Alert) -> String {
    match (a.state, a.resolved_at) {
        (AlertState::Resolved, Some(t)) => rfc3339::format(&t),
        _ => ZERO_TIME.to_string(),
    }
}

/// Alertmanager's webhook payload, version 4.
pub fn alertmanager_v4(n: &Notification, external_url: &str) -> Value {
    let alerts: Vec<Value> = n
        .alerts
        .iter()
        .map(|a| {
            json!({
                "status": if a.state == AlertState::Firing { "firing" } else { "resolved" },
                "labels": a.labels,
                "annotations": a.annotations,
                "startsAt": rfc3339::format(&starts_at(a)),
                "endsAt": ends_at(a),
                "generatorURL": generator_url(external_url, a),
                "fingerprint": a.fingerprint,
            })
        })
        .collect();
    json!({
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": 0,
        "status": n.status(),
        "receiver": n.receiver,
        "groupLabels": n.group_labels,
        "commonLabels": common(n.alerts.iter().map(|a| &a.labels).collect()),
        "commonAnnotations": common(n.alerts.iter().map(|a| &a.annotations).collect()),
        "externalURL": external_url,
        "alerts": alerts,
    })
}

/// meshscope's JSON: the same facts, with the evidence structured.
pub fn plain(n: &Notification, external_url: &str) -> Value {
    let alerts: Vec<Value> = n
        .alerts
        .iter()
        .map(|a| {
            json!({
                "rule": a.rule,
                "state": a.state.name(),
                "fingerprint": a.fingerprint,
                "labels": a.labels,
                "annotations": a.annotations,
                "starts_at": rfc3339::format(&starts_at(a)),
                "ends_at": a.resolved_at.filter(|_| a.state == AlertState::Resolved).map(|t| rfc3339::format(&t)),
                "evidence": a.evidence,
                "url": generator_url(external_url, a),
            })
        })
        .collect();
    json!({
        "status": n.status(),
        "receiver": n.receiver,
        "group_key": n.group_key,
        "group_labels": n.group_labels,
        "alerts": alerts,
    })
}

/// The body a receiver gets, in its format.
pub fn body(receiver: &ReceiverConfig, n: &Notification, external_url: &str) -> Vec<u8> {
    let v = match receiver.format {
        Format::Alertmanager => alertmanager_v4(n, external_url),
        Format::Json => plain(n, external_url),
    };
    v.to_string().into_bytes()
}

/// `sha256=<hex>` of the body under the secret.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length; the error cannot happen.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// How to send one body somewhere.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub url: String,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub hmac_secret: Option<String>,
    /// PEM CAs an `https://` receiver's certificate is also verified against.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Target {
    pub fn of(r: &ReceiverConfig) -> Target {
        Target {
            name: r.name.clone(),
            url: r.url.clone(),
            timeout: Duration::from_secs(r.timeout_secs.max(1)),
            max_attempts: r.max_attempts.max(1),
            initial_backoff: Duration::from_millis(r.initial_backoff_ms),
            max_backoff: Duration::from_millis(r.max_backoff_ms),
            hmac_secret: r.hmac_secret.clone(),
            ca_file: r.ca_file.clone(),
        }
    }

    /// The wait before attempt `n + 1` after attempt `n` failed (n from 1).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// What [`send`] tells the caller about the notification it carried.
#[derive(Debug, Clone)]
pub struct Carried {
    pub group_key: String,
    pub status: String,
    pub alerts: Vec<String>,
}

/// Posts `body` as JSON, retrying with backoff; `record` sees every attempt. True once the
/// receiver answered 2xx.
pub async fn send(
    delivery: &crate::delivery::Delivery,
    sleeper: &dyn Sleeper,
    target: &Target,
    body: Vec<u8>,
    carried: &Carried,
    now: &(dyn Fn() -> DateTime<Utc> + Sync),
    record: &mut (dyn FnMut(DeliveryAttempt) + Send),
) -> bool {
    use crate::delivery::Posted;
    let signature = target.hmac_secret.as_deref().map(|s| signature(s, &body));
    let agent = concat!("meshscope/", env!("CARGO_PKG_VERSION"));
    for attempt in 1..=target.max_attempts {
        let started = Instant::now();
        let mut headers = vec![("content-type", "application/json"), ("user-agent", agent)];
        if let Some(sig) = &signature {
            headers.push((SIGNATURE_HEADER, sig.as_str()));
        }
        let posted = delivery
            .post(
                &target.url,
                target.ca_file.as_deref(),
                &headers,
                body.clone(),
                target.timeout,
            )
            .await;
        let (ok, retry, http_status, error) = match posted {
            Posted::Answered { status, text } => {
                if (200..300).contains(&status) {
                    (true, false, Some(status), None)
                } else {
                    let retry = status >= 500 || status == 429 || status == 408;
                    let mut msg = format!("HTTP {status}");
                    if !text.is_empty() {
                        msg.push_str(": ");
                        msg.push_str(&text);
                    }
                    (false, retry, Some(status), Some(msg))
                }
            }
            Posted::TimedOut => (
                false,
                true,
                None,
                Some(format!("timed out after {:?}", target.timeout)),
            ),
            Posted::Failed(e) => (false, true, None, Some(e)),
        };
        record(DeliveryAttempt {
            time: now(),
            receiver: target.name.clone(),
            url: target.url.clone(),
            group_key: carried.group_key.clone(),
            status: carried.status.clone(),
            alerts: carried.alerts.clone(),
            attempt,
            ok,
            http_status,
            error,
            duration_ms: started.elapsed().as_millis() as u64,
        });
        if ok {
            return true;
        }
        if !retry || attempt == target.max_attempts {
            return false;
        }
        sleeper.sleep(target.backoff(attempt)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::Evidence;

    fn alert(name: &str, service: &str, state: AlertState) -> Alert {
        let labels: BTreeMap<String, String> = [
            ("alertname".to_string(), name.to_string()),
            ("service".to_string(), service.to_string()),
        ]
        .into();
        let t = DateTime::from_timestamp(1_800_000_000, 0).expect("t");
        Alert {
            rule: name.into(),
            fingerprint: crate::eval::fingerprint(&labels),
            labels,
            annotations: [("summary".to_string(), "s".to_string())].into(),
            state,
            active_at: t,
            fired_at: Some(t),
            resolved_at: (state == AlertState::Resolved).then_some(t),
            last_seen: t,
            evidence: Evidence::default(),
            notified: BTreeMap::new(),
        }
    }

    fn alerts(list: Vec<Alert>) -> Alerts {
        list.into_iter()
            .map(|a| (a.fingerprint.clone(), a))
            .collect()
    }

    #[test]
    fn grouping_and_dedup() {
        let r = ReceiverConfig::webhook("ops", "http://127.0.0.1:1/");
        let mut told = alert("errors", "b", AlertState::Firing);
        told.notified.insert("ops".into(), AlertState::Firing);
        let set = alerts(vec![
            alert("errors", "a", AlertState::Firing),
            told.clone(),
            alert("latency", "a", AlertState::Firing),
            alert("latency", "c", AlertState::Pending),
            alert("latency", "d", AlertState::Resolved),
        ]);
        let (ns, silently) = owed(&set, &r);
        assert_eq!(ns.len(), 2, "one per alertname");
        let errors = ns
            .iter()
            .find(|n| n.group_labels["alertname"] == "errors")
            .expect("errors");
        assert_eq!(errors.changed.len(), 1, "b was told already");
        assert_eq!(errors.alerts.len(), 2, "b rides along");
        assert_eq!(errors.group_key, "{}:{alertname=\"errors\"}");
        assert_eq!(silently.len(), 1, "d resolved before anyone heard it fire");

        // Nothing owed once everything is told.
        let mut all_told = set.clone();
        for a in all_told.values_mut() {
            if a.state != AlertState::Pending {
                a.notified.insert("ops".into(), a.state);
            }
        }
        assert!(owed(&all_told, &r).0.is_empty());
        // A told-firing alert that resolves is owed a resolved notification.
        let mut resolved = told;
        resolved.state = AlertState::Resolved;
        let (ns, _) = owed(&alerts(vec![resolved]), &r);
        assert_eq!(ns[0].status(), "resolved");
    }

    #[test]
    fn v4_payload_shape() {
        let mut a = alert("errors", "a", AlertState::Resolved);
        a.notified.insert("ops".into(), AlertState::Firing);
        let r = ReceiverConfig::webhook("ops", "http://127.0.0.1:1/");
        let (ns, _) = owed(&alerts(vec![a]), &r);
        let v = alertmanager_v4(&ns[0], "http://m:8080");
        assert_eq!(v["version"], "4");
        assert_eq!(v["status"], "resolved");
        assert_eq!(v["receiver"], "ops");
        assert_eq!(v["commonLabels"]["service"], "a");
        assert_eq!(v["alerts"][0]["status"], "resolved");
        assert_eq!(v["alerts"][0]["endsAt"], "2027-01-15T08:00:00.000Z");
        assert_eq!(
            v["alerts"][0]["generatorURL"],
            "http://m:8080/api/v1/alerts/rules/errors"
        );
        assert_eq!(
            v["alerts"][0]["fingerprint"].as_str().map(str::len),
            Some(16)
        );
    }

    #[test]
    fn hmac_signature_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let t = Target::of(&ReceiverConfig {
            initial_backoff_ms: 100,
            max_backoff_ms: 500,
            ..ReceiverConfig::webhook("x", "http://127.0.0.1:1")
        });
        let waits: Vec<u128> = (1..=5).map(|n| t.backoff(n).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
    }
}
