//! Pushing to a real Alertmanager: `POST <url>/api/v2/alerts` with every firing alert on
//! each evaluation (as Prometheus does: Alertmanager expects firing alerts to be re-sent,
//! and ends them itself at `endsAt` if they stop coming), and each resolved alert with its
//! `endsAt` until one push of it succeeded.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::clock::rfc3339;
use crate::config::AlertmanagerConfig;
use crate::eval::{AlertState, Alerts};
use crate::notify::{Target, generator_url};

/// The key under which an alert remembers what this Alertmanager was told.
pub fn key(am: &AlertmanagerConfig) -> String {
    format!("alertmanager:{}", am.url.trim_end_matches('/'))
}

pub fn target(am: &AlertmanagerConfig) -> Target {
    Target {
        name: key(am),
        url: format!("{}/api/v2/alerts", am.url.trim_end_matches('/')),
        timeout: Duration::from_secs(am.timeout_secs.max(1)),
        max_attempts: am.max_attempts.max(1),
        initial_backoff: Duration::from_millis(am.initial_backoff_ms),
        max_backoff: Duration::from_millis(am.max_backoff_ms),
        hmac_secret: None,
        ca_file: am.ca_file.clone(),
    }
}

/// The postable alerts of one push, and the fingerprints (with their state) it carries.
/// Firing alerts end `4 × interval` from now unless pushed again.
pub fn postable(
    alerts: &Alerts,
    key: &str,
    now: DateTime<Utc>,
    interval: Duration,
    external_url: &str,
) -> (Value, Vec<(String, AlertState)>) {
    let grace = chrono::Duration::from_std(interval * 4).unwrap_or(chrono::Duration::minutes(1));
    let mut out = Vec::new();
    let mut carried = Vec::new();
    for a in alerts.values() {
        let ends = match a.state {
            AlertState::Firing => now + grace,
            AlertState::Resolved if a.notified.get(key) == Some(&AlertState::Firing) => {
                a.resolved_at.unwrap_or(now)
            }
            _ => continue,
        };
        out.push(json!({
            "labels": a.labels,
            "annotations": a.annotations,
            "startsAt": rfc3339::format(&a.fired_at.unwrap_or(a.active_at)),
            "endsAt": rfc3339::format(&ends),
            "generatorURL": generator_url(external_url, a),
        }));
        carried.push((a.fingerprint.clone(), a.state));
    }
    (Value::Array(out), carried)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::eval::{Alert, Evidence};

    fn alert(service: &str, state: AlertState, told: Option<AlertState>) -> Alert {
        let labels: BTreeMap<String, String> = [
            ("alertname".to_string(), "r".to_string()),
            ("service".to_string(), service.to_string()),
        ]
        .into();
        let t = DateTime::from_timestamp(1_800_000_000, 0).expect("t");
        Alert {
            rule: "r".into(),
            fingerprint: crate::eval::fingerprint(&labels),
            labels,
            annotations: BTreeMap::new(),
            state,
            active_at: t,
            fired_at: Some(t),
            resolved_at: (state == AlertState::Resolved)
                .then_some(t + chrono::Duration::seconds(30)),
            last_seen: t,
            evidence: Evidence::default(),
            notified: told.map(|s| ("am".to_string(), s)).into_iter().collect(),
        }
    }

    #[test]
    fn firing_alerts_are_resent_and_resolved_ones_end_once() {
        let now = DateTime::from_timestamp(1_800_000_060, 0).expect("now");
        let alerts: Alerts = [
            alert("a", AlertState::Firing, Some(AlertState::Firing)),
            alert("b", AlertState::Resolved, Some(AlertState::Firing)),
            alert("c", AlertState::Resolved, Some(AlertState::Resolved)),
            alert("d", AlertState::Pending, None),
        ]
        .into_iter()
        .map(|a| (a.fingerprint.clone(), a))
        .collect();
        let (body, carried) = postable(&alerts, "am", now, Duration::from_secs(15), "http://m");
        let by_service: BTreeMap<&str, &str> = body
            .as_array()
            .expect("array")
            .iter()
            .map(|a| {
                (
                    a["labels"]["service"].as_str().expect("service"),
                    a["endsAt"].as_str().expect("endsAt"),
                )
            })
            .collect();
        assert_eq!(
            by_service,
            BTreeMap::from([
                ("a", "2027-01-15T08:02:00.000Z"), // now + 4 × 15 s
                ("b", "2027-01-15T08:00:30.000Z"), // when it resolved
            ])
        );
        assert_eq!(carried.len(), 2);
    }
}
