//! The alert state machine, pure: given a rule, what crossed its threshold at `now` and
//! the alerts as they were, [`step`] moves each alert along
//! inactive → pending → firing → resolved and says which moves happened.
//!
//! - an instance that crosses and has no live alert becomes `pending` (or `firing` at once
//!   when the rule's `for` is 0);
//! - a `pending` alert that has crossed for at least `for` becomes `firing`;
//! - a `pending` alert that stops crossing is dropped (back to inactive, nobody was told);
//! - a `firing` alert that stops crossing becomes `resolved`;
//! - a `resolved` alert that crosses again starts over as `pending`.
//!
//! Which notifications are owed follows from the states and what each receiver was last
//! told (`notified`), so a restart that reloads both sends nothing twice.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::clock::rfc3339;
use crate::rule::Rule;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Pending,
    Firing,
    Resolved,
}

impl AlertState {
    pub fn name(self) -> &'static str {
        match self {
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

/// Why an alert fired: the value that crossed, and requests that show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The signal's value (SQL rules: the `value` column, when there is one).
    pub value: Option<f64>,
    /// The rule's threshold (threshold rules).
    pub threshold: Option<f64>,
    /// What the value is (`error_rate`, `p99_ms`, `sql`, `edge-appeared` …).
    pub signal: String,
    /// Up to 5 traces of failing or slow requests behind the value.
    pub exemplar_trace_ids: Vec<String>,
}

/// One instance of a rule that crosses its threshold now.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The instance's own labels (`service`, `source`/`target`, a SQL row's columns).
    pub labels: BTreeMap<String, String>,
    pub evidence: Evidence,
}

/// One alert: a rule's instance, identified by its full label set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub rule: String,
    pub fingerprint: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub state: AlertState,
    /// When it first crossed (pending since).
    #[serde(with = "rfc3339")]
    pub active_at: DateTime<Utc>,
    #[serde(with = "rfc3339::option", default)]
    pub fired_at: Option<DateTime<Utc>>,
    #[serde(with = "rfc3339::option", default)]
    pub resolved_at: Option<DateTime<Utc>>,
    /// The last evaluation that saw it cross.
    #[serde(with = "rfc3339")]
    pub last_seen: DateTime<Utc>,
    pub evidence: Evidence,
    /// What each receiver was last told about it (`firing` or `resolved`).
    #[serde(default)]
    pub notified: BTreeMap<String, AlertState>,
}

/// A move of one alert, as [`step`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub fingerprint: String,
    pub from: Option<AlertState>,
    pub to: Option<AlertState>,
}

/// Every alert by fingerprint.
pub type Alerts = BTreeMap<String, Alert>;

/// Alertmanager-style fingerprint: FNV-1a 64 over the sorted label pairs, 16 hex digits.
pub fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The full label set of an instance: `alertname`, `severity`, the rule's labels, then the
/// instance's own.
pub fn labels_of(rule: &Rule, instance: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    labels.insert("alertname".to_string(), rule.name.clone());
    labels.insert("severity".to_string(), rule.severity.clone());
    labels.extend(rule.labels.clone());
    for (k, v) in instance {
        if k != "alertname" {
            labels.insert(k.clone(), v.clone());
        }
    }
    labels
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Fills `{{ $value }}`, `{{ $threshold }}` and `{{ $labels.NAME }}` in the annotations and
/// adds the evidence as `value`, `threshold` and `exemplar_trace_ids` annotations (plain
/// strings, so Alertmanager receivers that show annotations show the evidence).
pub fn annotations_of(
    rule: &Rule,
    labels: &BTreeMap<String, String>,
    evidence: &Evidence,
) -> BTreeMap<String, String> {
    let value = evidence.value.map(number).unwrap_or_default();
    let threshold = evidence.threshold.map(number).unwrap_or_default();
    let mut out = BTreeMap::new();
    for (k, template) in &rule.annotations {
        let mut text = template.clone();
        for (pat, with) in [("$value", &value), ("$threshold", &threshold)] {
            for form in [format!("{{{{ {pat} }}}}"), format!("{{{{{pat}}}}}")] {
                text = text.replace(&form, with);
            }
        }
        for (name, v) in labels {
            for form in [
                format!("{{{{ $labels.{name} }}}}"),
                format!("{{{{$labels.{name}}}}}"),
            ] {
                text = text.replace(&form, v);
            }
        }
        out.insert(k.clone(), text);
    }
    if evidence.value.is_some() {
        out.entry("value".into()).or_insert(value);
    }
    if evidence.threshold.is_some() {
        out.entry("threshold".into()).or_insert(threshold);
    }
    if !evidence.exemplar_trace_ids.is_empty() {
        out.entry("exemplar_trace_ids".into())
            .or_insert(evidence.exemplar_trace_ids.join(","));
    }
    out
}

/// Moves the alerts of `rule` given what crosses now. Alerts of other rules are untouched.
pub fn step(
    alerts: &mut Alerts,
    rule: &Rule,
    crossing: Vec<Observation>,
    now: DateTime<Utc>,
) -> Vec<Transition> {
    let mut moves = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for obs in crossing {
        let labels = labels_of(rule, &obs.labels);
        let fp = fingerprint(&labels);
        if !seen.insert(fp.clone()) {
            continue; // two rows with the same labels: the first wins
        }
        let annotations = annotations_of(rule, &labels, &obs.evidence);
        let fires_now =
            |since: DateTime<Utc>| (now - since).to_std().unwrap_or_default() >= rule.for_;
        match alerts.get_mut(&fp) {
            Some(a) if a.state != AlertState::Resolved => {
                a.last_seen = now;
                a.evidence = obs.evidence;
                a.annotations = annotations;
                if a.state == AlertState::Pending && fires_now(a.active_at) {
                    a.state = AlertState::Firing;
                    a.fired_at = Some(now);
                    moves.push(Transition {
                        fingerprint: fp,
                        from: Some(AlertState::Pending),
                        to: Some(AlertState::Firing),
                    });
                }
            }
            existing => {
                let from = existing.as_ref().map(|a| a.state);
                let notified = existing.map(|a| a.notified.clone()).unwrap_or_default();
                let state = if fires_now(now) {
                    AlertState::Firing
                } else {
                    AlertState::Pending
                };
                alerts.insert(
                    fp.clone(),
                    Alert {
                        rule: rule.name.clone(),
                        fingerprint: fp.clone(),
                        labels,
                        annotations,
                        state,
                        active_at: now,
                        fired_at: (state == AlertState::Firing).then_some(now),
                        resolved_at: None,
                        last_seen: now,
                        evidence: obs.evidence,
                        notified,
                    },
                );
                moves.push(Transition {
                    fingerprint: fp,
                    from,
                    to: Some(state),
                });
            }
        }
    }
    let gone: Vec<String> = alerts
        .values()
        .filter(|a| a.rule == rule.name && !seen.contains(&a.fingerprint))
        .filter(|a| a.state != AlertState::Resolved)
        .map(|a| a.fingerprint.clone())
        .collect();
    for fp in gone {
        let Some(a) = alerts.get_mut(&fp) else {
            continue;
        };
        match a.state {
            AlertState::Pending => {
                alerts.remove(&fp);
                moves.push(Transition {
                    fingerprint: fp,
                    from: Some(AlertState::Pending),
                    to: None,
                });
            }
            AlertState::Firing => {
                a.state = AlertState::Resolved;
                a.resolved_at = Some(now);
                moves.push(Transition {
                    fingerprint: fp,
                    from: Some(AlertState::Firing),
                    to: Some(AlertState::Resolved),
                });
            }
            AlertState::Resolved => {}
        }
    }
    moves
}

/// Resolves every live alert of a rule (the rule was deleted or changed).
pub fn resolve_rule(alerts: &mut Alerts, rule: &str, now: DateTime<Utc>) {
    alerts.retain(|_, a| !(a.rule == rule && a.state == AlertState::Pending));
    for a in alerts.values_mut() {
        if a.rule == rule && a.state == AlertState::Firing {
            a.state = AlertState::Resolved;
            a.resolved_at = Some(now);
        }
    }
}

/// Drops resolved alerts older than `keep` once every receiver in `receivers` was told
/// (or never needed telling).
pub fn forget_resolved(
    alerts: &mut Alerts,
    receivers: &[String],
    now: DateTime<Utc>,
    keep: chrono::Duration,
) {
    alerts.retain(|_, a| {
        if a.state != AlertState::Resolved {
            return true;
        }
        let old = a.resolved_at.is_some_and(|t| now - t > keep);
        let told = receivers
            .iter()
            .all(|r| a.notified.get(r) != Some(&AlertState::Firing));
        !(old && told)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::{Origin, RuleSpec};

    fn rule(for_secs: u64) -> Rule {
        Rule::from_spec(
            RuleSpec {
                name: "errors".into(),
                signal: Some("error_rate".into()),
                service: Some("checkout".into()),
                threshold: Some(0.1),
                for_secs: Some(for_secs),
                annotations: [(
                    "summary".to_string(),
                    "{{ $labels.service }} fails {{ $value }} > {{ $threshold }}".to_string(),
                )]
                .into(),
                ..Default::default()
            },
            Origin::Config,
        )
        .expect("rule")
    }

    fn crossing(v: f64) -> Vec<Observation> {
        vec![Observation {
            labels: [("service".to_string(), "checkout".to_string())].into(),
            evidence: Evidence {
                value: Some(v),
                threshold: Some(0.1),
                signal: "error_rate".into(),
                exemplar_trace_ids: vec!["ab".into()],
            },
        }]
    }

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("t")
    }

    #[test]
    fn pending_then_firing_after_for_then_resolved() {
        let r = rule(60);
        let mut alerts = Alerts::new();
        let m = step(&mut alerts, &r, crossing(0.5), t(0));
        assert_eq!(m[0].to, Some(AlertState::Pending));
        let m = step(&mut alerts, &r, crossing(0.4), t(30));
        assert!(m.is_empty(), "still pending at 30 s: {m:?}");
        let m = step(&mut alerts, &r, crossing(0.3), t(60));
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].from, m[0].to),
            (Some(AlertState::Pending), Some(AlertState::Firing))
        );
        let a = alerts.values().next().expect("alert");
        assert_eq!(a.active_at, t(0));
        assert_eq!(a.fired_at, Some(t(60)));
        assert_eq!(a.labels["alertname"], "errors");
        assert_eq!(a.labels["severity"], "warning");
        assert_eq!(a.annotations["summary"], "checkout fails 0.3 > 0.1");
        assert_eq!(a.annotations["exemplar_trace_ids"], "ab");
        let m = step(&mut alerts, &r, vec![], t(90));
        assert_eq!(
            (m[0].from, m[0].to),
            (Some(AlertState::Firing), Some(AlertState::Resolved))
        );
        assert_eq!(
            alerts.values().next().expect("kept").resolved_at,
            Some(t(90))
        );
        // Crossing again starts over.
        let m = step(&mut alerts, &r, crossing(0.9), t(120));
        assert_eq!(
            (m[0].from, m[0].to),
            (Some(AlertState::Resolved), Some(AlertState::Pending))
        );
    }

    #[test]
    fn a_pending_alert_that_recovers_never_fires() {
        let r = rule(60);
        let mut alerts = Alerts::new();
        step(&mut alerts, &r, crossing(0.5), t(0));
        let m = step(&mut alerts, &r, vec![], t(15));
        assert_eq!((m[0].from, m[0].to), (Some(AlertState::Pending), None));
        assert!(alerts.is_empty());
    }

    #[test]
    fn for_zero_fires_at_once() {
        let mut alerts = Alerts::new();
        let m = step(&mut alerts, &rule(0), crossing(0.5), t(0));
        assert_eq!((m[0].from, m[0].to), (None, Some(AlertState::Firing)));
    }

    #[test]
    fn fingerprints_depend_on_every_label() {
        let a: BTreeMap<String, String> = [("a".to_string(), "1".to_string())].into();
        let b: BTreeMap<String, String> = [("a".to_string(), "2".to_string())].into();
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        assert_eq!(fingerprint(&a).len(), 16);
    }
}
