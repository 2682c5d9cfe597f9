//! # meshscope-alerts
//!
//! Tells teams when the mesh goes wrong, through the tools they already run: rules over the
//! golden signals, SQL and the graph's shape, evaluated on a schedule, delivered to
//! webhooks (Alertmanager's payload or plain JSON) and to Alertmanager's API.
//!
//! ```text
//!  rules (config file, API) ──► Observer (query crate's graph/signals, SQL) ──► eval::step
//!        pending → firing → resolved, persisted in <data-dir>/alerts/state.json
//!                             │
//!                             ▼
//!  notify::owed (per receiver, grouped, de-duplicated) ──► notify::send (retries, HMAC)
//!  alertmanager::postable ──► POST /api/v2/alerts        every attempt in the log
//! ```
//!
//! ## Layout
//! - [`config`]: the `[alerts]` table of the config file.
//! - [`rule`]: rule specs, their checks, the typed [`rule::Rule`].
//! - [`observe`]: what crosses a rule now, with evidence (value, exemplar trace ids).
//! - [`structural`]: edges that appeared, vanished, or reach a new virtual peer.
//! - [`eval`]: the pure state machine.
//! - [`state`]: atomic persistence of alerts, the delivery log and API-made rules.
//! - [`notify`]: which notifications are owed, payloads, signed sending with backoff.
//! - [`alertmanager`]: pushing to Alertmanager's `/api/v2/alerts`.
//! - [`api`]: `/api/v1/alerts…` routes.
//! - [`clock`]: the injected clock and sleeper.

pub mod alertmanager;
pub mod api;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod eval;
pub mod notify;
pub mod observe;
pub mod rule;
pub mod state;
pub mod structural;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use meshscope_query::QueryEngine;
use serde::Serialize;

pub use clock::{Clock, ManualClock, RecordingSleeper, Sleeper, SystemClock, TokioSleeper};
pub use config::{AlertmanagerConfig, AlertsConfig, Format, ReceiverConfig};
use eval::{AlertState, Alerts};
use notify::{Carried, Target};
use rule::{Origin, Rule, RuleError, RuleSpec};
use state::{DeliveryAttempt, MAX_ATTEMPTS_KEPT, Persisted, StateError, StateStore};

/// Why alerting could not start or a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    /// A rule is invalid (all its problems are listed).
    #[error(transparent)]
    Rule(#[from] RuleError),
    /// Two rules have the same name.
    #[error("a rule named {0:?} already exists")]
    Duplicate(String),
    /// No rule of that name.
    #[error("no rule named {0:?}")]
    NotFound(String),
    /// The rule comes from the config file; change it there.
    #[error("rule {0:?} is defined in the config file; change it there")]
    FromConfig(String),
    /// A receiver's settings are unusable.
    #[error("receiver {name:?}: {problem}")]
    Receiver { name: String, problem: String },
    /// Reading or writing `<data-dir>/alerts/` failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The task writing the state did not finish (a panic, a shutdown).
    #[error("{0}")]
    Internal(String),
}

/// Counters for meshscope's own `/metrics`.
#[derive(Debug, Default)]
pub struct AlertStats {
    /// Rule evaluations run.
    pub evaluations: AtomicU64,
    /// Rule evaluations whose query failed.
    pub evaluation_failures: AtomicU64,
    /// Delivery attempts a receiver acknowledged.
    pub attempts_ok: AtomicU64,
    /// Delivery attempts that failed (error, timeout, non-2xx).
    pub attempts_failed: AtomicU64,
}

/// The last evaluation of one rule.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RuleHealth {
    #[serde(with = "clock::rfc3339::option")]
    pub last_evaluation: Option<DateTime<Utc>>,
    pub last_duration_ms: u64,
    pub last_error: Option<String>,
}

struct Inner {
    engine: QueryEngine,
    config: AlertsConfig,
    external_url: String,
    clock: Arc<dyn Clock>,
    sleeper: Arc<dyn Sleeper>,
    delivery: delivery::Delivery,
    store: StateStore,
    rules: Mutex<Vec<Rule>>,
    health: Mutex<BTreeMap<String, RuleHealth>>,
    state: Mutex<Persisted>,
    /// Wakes the delivery loop after an evaluation or a rule change.
    wake: tokio::sync::Notify,
    /// One delivery round at a time.
    delivering: tokio::sync::Mutex<()>,
    /// One rule change (read, check, persist, replace) at a time.
    changing_rules: tokio::sync::Mutex<()>,
    /// One write of the state file at a time, each with the state as it is then.
    saving: Mutex<()>,
    stats: AlertStats,
}

/// Rule evaluation and delivery for one data directory. Cheap to clone.
#[derive(Clone)]
pub struct Alerting {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Alerting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerting")
            .field("rules", &lock(&self.inner.rules).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where the rule `name` is, when it was made through the API (rules from the config file
/// change only with the file).
fn api_rule_position(rules: &[Rule], name: &str) -> Result<usize, AlertsError> {
    let pos = rules
        .iter()
        .position(|r| r.name == name)
        .ok_or_else(|| AlertsError::NotFound(name.into()))?;
    if rules[pos].origin == Origin::Config {
        return Err(AlertsError::FromConfig(name.into()));
    }
    Ok(pos)
}

impl Alerting {
    /// Checks the config's rules (a bad one stops start-up), loads the rules made through
    /// the API and the persisted alert state. `external_url` is the base of links in
    /// notifications unless the config sets `external-url`.
    pub async fn open(
        engine: QueryEngine,
        data_dir: &Path,
        config: AlertsConfig,
        external_url: String,
        clock: Arc<dyn Clock>,
        sleeper: Arc<dyn Sleeper>,
    ) -> Result<Alerting, AlertsError> {
        let store = StateStore::open(data_dir)?;
        let mut names = std::collections::HashSet::new();
        for r in &config.receivers {
            if !r.url.starts_with("http://") && !r.url.starts_with("https://") {
                return Err(AlertsError::Receiver {
                    name: r.name.clone(),
                    problem: format!("url must start with http:// or https:// (got {:?})", r.url),
                });
            }
            if !names.insert(r.name.clone()) || r.name.starts_with("alertmanager:") {
                return Err(AlertsError::Receiver {
                    name: r.name.clone(),
                    problem: "receiver names must be unique and not start with alertmanager:"
                        .into(),
                });
            }
        }
        let mut rules = Vec::new();
        for spec in &config.rules {
            let rule = Rule::from_spec(spec.clone(), Origin::Config)?;
            for w in rule::check_with_engine(&rule, &engine).await? {
                tracing::warn!(rule = %rule.name, "{w}");
            }
            if rules.iter().any(|r: &Rule| r.name == rule.name) {
                return Err(AlertsError::Duplicate(rule.name));
            }
            rules.push(rule);
        }
        for spec in store.load_rules()? {
            let name = spec.name.clone();
            match Rule::from_spec(spec, Origin::Api) {
                Ok(rule) if rules.iter().any(|r| r.name == rule.name) => tracing::warn!(
                    rule = %name,
                    "a rule made through the API has the name of a config rule; the config rule wins"
                ),
                Ok(rule) => rules.push(rule),
                Err(e) => tracing::warn!(rule = %name, error = %e, "skipping a stored rule"),
            }
        }
        let state = store.load_state()?;
        tracing::info!(
            rules = rules.len(),
            alerts = state.alerts.len(),
            receivers = config.receivers.len(),
            "alerting ready"
        );
        let ca_files: Vec<&Path> = config
            .receivers
            .iter()
            .filter_map(|r| r.ca_file.as_deref())
            .chain(
                config
                    .alertmanagers
                    .iter()
                    .filter_map(|a| a.ca_file.as_deref()),
            )
            .collect();
        let delivery =
            delivery::Delivery::new(ca_files).map_err(|problem| AlertsError::Receiver {
                name: "*".into(),
                problem,
            })?;
        let external_url = config
            .external_url
            .clone()
            .unwrap_or(external_url)
            .trim_end_matches('/')
            .to_string();
        Ok(Alerting {
            inner: Arc::new(Inner {
                engine,
                config,
                external_url,
                clock,
                sleeper,
                delivery,
                store,
                rules: Mutex::new(rules),
                health: Mutex::new(BTreeMap::new()),
                state: Mutex::new(state),
                wake: tokio::sync::Notify::new(),
                delivering: tokio::sync::Mutex::new(()),
                changing_rules: tokio::sync::Mutex::new(()),
                saving: Mutex::new(()),
                stats: AlertStats::default(),
            }),
        })
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.inner.config.evaluation_interval_secs.max(1))
    }

    fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    /// Everyone an alert may owe a notification to.
    fn destinations(&self) -> Vec<String> {
        let c = &self.inner.config;
        c.receivers
            .iter()
            .map(|r| r.name.clone())
            .chain(c.alertmanagers.iter().map(alertmanager::key))
            .collect()
    }

    /// Persists the state (write, fsync, rename, fsync the directory) off the async
    /// threads. Writes are serialised and each takes the state as it is when it runs, so
    /// a later state is never overwritten by an earlier one.
    async fn save(&self) {
        let this = self.clone();
        let done = tokio::task::spawn_blocking(move || {
            let _one = lock(&this.inner.saving);
            let snapshot = lock(&this.inner.state).clone();
            this.inner.store.save_state(&snapshot)
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot persist the alert state"),
            Err(e) => tracing::error!(error = %e, "persisting the alert state failed"),
        }
    }

    /// Evaluates every rule once at the clock's now. Rules that fail keep their alerts as
    /// they are (a failing query resolves nothing) and report the error in their health.
    pub async fn evaluate(&self) -> usize {
        let now = self.now();
        let rules = lock(&self.inner.rules).clone();
        let before = lock(&self.inner.state).alerts.clone();
        let mut observer = observe::Observer::new(&self.inner.engine);
        let mut moved = 0;
        for rule in &rules {
            let started = Instant::now();
            let result = observer.observe(rule, now).await;
            let mut health = RuleHealth {
                last_evaluation: Some(now),
                last_duration_ms: started.elapsed().as_millis() as u64,
                last_error: None,
            };
            // The rule may have been changed or deleted through the API meanwhile.
            self.inner.stats.evaluations.fetch_add(1, Ordering::Relaxed);
            let current = lock(&self.inner.rules).iter().any(|r| r == rule);
            match result {
                Ok(_) if !current => continue,
                Ok(crossing) => {
                    let moves =
                        eval::step(&mut lock(&self.inner.state).alerts, rule, crossing, now);
                    for m in &moves {
                        tracing::info!(
                            rule = %rule.name,
                            fingerprint = %m.fingerprint,
                            from = m.from.map(AlertState::name).unwrap_or("inactive"),
                            to = m.to.map(AlertState::name).unwrap_or("inactive"),
                            "alert state changed"
                        );
                    }
                    moved += moves.len();
                }
                Err(e) => {
                    self.inner
                        .stats
                        .evaluation_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(rule = %rule.name, error = %e, "evaluating a rule failed");
                    health.last_error = Some(e.to_string());
                }
            }
            lock(&self.inner.health).insert(rule.name.clone(), health);
        }
        // Alerts of rules that no longer exist (removed from the config file, deleted)
        // resolve, so receivers that heard them fire hear them end.
        let names: std::collections::HashSet<String> = lock(&self.inner.rules)
            .iter()
            .map(|r| r.name.clone())
            .collect();
        {
            let mut state = lock(&self.inner.state);
            let orphans: std::collections::BTreeSet<String> = state
                .alerts
                .values()
                .filter(|a| !names.contains(&a.rule) && a.state != AlertState::Resolved)
                .map(|a| a.rule.clone())
                .collect();
            for rule in orphans {
                eval::resolve_rule(&mut state.alerts, &rule, now);
            }
        }
        let keep = chrono::Duration::seconds(self.inner.config.keep_resolved_secs as i64);
        eval::forget_resolved(
            &mut lock(&self.inner.state).alerts,
            &self.destinations(),
            now,
            keep,
        );
        // Written when anything changed (states, values, evidence): nothing to write on
        // a quiet mesh.
        if lock(&self.inner.state).alerts != before {
            self.save().await;
        }
        moved
    }

    fn record(&self, attempt: DeliveryAttempt) {
        let counter = if attempt.ok {
            &self.inner.stats.attempts_ok
        } else {
            &self.inner.stats.attempts_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !attempt.ok {
            tracing::warn!(
                receiver = %attempt.receiver,
                attempt = attempt.attempt,
                error = attempt.error.as_deref().unwrap_or(""),
                "notification attempt failed"
            );
        }
        let mut s = lock(&self.inner.state);
        s.deliveries.push_back(attempt);
        while s.deliveries.len() > MAX_ATTEMPTS_KEPT {
            s.deliveries.pop_front();
        }
    }

    /// Marks what `receiver` now knows, unless the alert is gone.
    fn mark(&self, receiver: &str, told: &[(String, AlertState)]) {
        let mut s = lock(&self.inner.state);
        for (fp, state) in told {
            if let Some(a) = s.alerts.get_mut(fp) {
                a.notified.insert(receiver.to_string(), *state);
            }
        }
    }

    /// Sends every owed notification (webhooks concurrently, each with its retries) and
    /// pushes to the Alertmanagers. Returns the notifications acknowledged.
    pub async fn deliver(&self) -> usize {
        let _one_round = self.inner.delivering.lock().await;
        let cfg = &self.inner.config;
        let (snapshot, attempts_before) = {
            let s = lock(&self.inner.state);
            (s.alerts.clone(), s.deliveries.back().cloned())
        };
        let mut jobs = Vec::new();
        for r in &cfg.receivers {
            let (notifications, silently) = notify::owed(&snapshot, r);
            let quiet: Vec<(String, AlertState)> = silently
                .into_iter()
                .map(|fp| (fp, AlertState::Resolved))
                .collect();
            self.mark(&r.name, &quiet);
            for n in notifications {
                jobs.push((r, n));
            }
        }
        let sent = futures::future::join_all(jobs.into_iter().map(|(r, n)| async move {
            let body = notify::body(r, &n, &self.inner.external_url);
            let carried = Carried {
                group_key: n.group_key.clone(),
                status: n.status().to_string(),
                alerts: n.alerts.iter().map(|a| a.fingerprint.clone()).collect(),
            };
            let ok = self.send(&Target::of(r), body, &carried).await;
            if ok {
                self.mark(&r.name, &n.changed);
            }
            ok
        }))
        .await;
        let mut acknowledged = sent.into_iter().filter(|ok| *ok).count();
        for am in &cfg.alertmanagers {
            let key = alertmanager::key(am);
            let (body, carried) = alertmanager::postable(
                &snapshot,
                &key,
                self.now(),
                self.interval(),
                &self.inner.external_url,
            );
            if carried.is_empty() {
                continue;
            }
            let info = Carried {
                group_key: "{}".into(),
                status: if carried.iter().any(|(_, s)| *s == AlertState::Firing) {
                    "firing".into()
                } else {
                    "resolved".into()
                },
                alerts: carried.iter().map(|(fp, _)| fp.clone()).collect(),
            };
            if self
                .send(
                    &alertmanager::target(am),
                    body.to_string().into_bytes(),
                    &info,
                )
                .await
            {
                self.mark(&key, &carried);
                acknowledged += 1;
            }
        }
        let changed = {
            let s = lock(&self.inner.state);
            s.alerts != snapshot || s.deliveries.back() != attempts_before.as_ref()
        };
        if changed {
            self.save().await;
        }
        acknowledged
    }

    async fn send(&self, target: &Target, body: Vec<u8>, carried: &Carried) -> bool {
        let clock = Arc::clone(&self.inner.clock);
        let now = move || clock.now();
        let mut record = |a: DeliveryAttempt| self.record(a);
        notify::send(
            &self.inner.delivery,
            self.inner.sleeper.as_ref(),
            target,
            body,
            carried,
            &now,
            &mut record,
        )
        .await
    }

    /// Evaluates every `interval` and delivers after each evaluation, until `shutdown`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let every = self.interval();
        let evaluator = async {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                self.evaluate().await;
                self.inner.wake.notify_one();
            }
        };
        let deliverer = async {
            loop {
                self.inner.wake.notified().await;
                self.deliver().await;
            }
        };
        tokio::select! {
            () = shutdown => {}
            _ = futures::future::join(evaluator, deliverer) => {}
        }
        // What is persisted is all a restart needs; save the last delivery log lines too.
        self.save().await;
    }

    // ---- rules, alerts and deliveries, for the API ----

    pub fn rules(&self) -> Vec<(Rule, RuleHealth)> {
        let health = lock(&self.inner.health).clone();
        lock(&self.inner.rules)
            .iter()
            .map(|r| (r.clone(), health.get(&r.name).cloned().unwrap_or_default()))
            .collect()
    }

    pub fn rule(&self, name: &str) -> Option<(Rule, RuleHealth)> {
        self.rules().into_iter().find(|(r, _)| r.name == name)
    }

    /// Persists the rules made through the API, off the async threads.
    async fn save_api_rules(&self, rules: &[Rule]) -> Result<(), AlertsError> {
        let specs: Vec<RuleSpec> = rules
            .iter()
            .filter(|r| r.origin == Origin::Api)
            .map(|r| r.spec.clone())
            .collect();
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.inner.store.save_rules(&specs))
            .await
            .map_err(|e| AlertsError::Internal(format!("persisting the rules failed: {e}")))??;
        Ok(())
    }

    /// Checks a rule against the engine; returns it with its warnings.
    async fn check(&self, spec: RuleSpec) -> Result<(Rule, Vec<String>), AlertsError> {
        let rule = Rule::from_spec(spec, Origin::Api)?;
        let warnings = rule::check_with_engine(&rule, &self.inner.engine).await?;
        Ok((rule, warnings))
    }

    /// Adds a rule (persisted in `<data-dir>/alerts/rules.json`).
    pub async fn create_rule(&self, spec: RuleSpec) -> Result<(Rule, Vec<String>), AlertsError> {
        let (rule, warnings) = self.check(spec).await?;
        let _one = self.inner.changing_rules.lock().await;
        let mut rules = lock(&self.inner.rules).clone();
        if rules.iter().any(|r| r.name == rule.name) {
            return Err(AlertsError::Duplicate(rule.name));
        }
        rules.push(rule.clone());
        self.save_api_rules(&rules).await?;
        *lock(&self.inner.rules) = rules;
        Ok((rule, warnings))
    }

    /// Replaces a rule made through the API.
    pub async fn update_rule(
        &self,
        name: &str,
        mut spec: RuleSpec,
    ) -> Result<(Rule, Vec<String>), AlertsError> {
        if spec.name.is_empty() {
            spec.name = name.to_string();
        }
        if spec.name != name {
            return Err(RuleError {
                name: spec.name.clone(),
                problems: vec![format!("the name in the body must be {name:?} (or absent)")],
            }
            .into());
        }
        let (rule, warnings) = self.check(spec).await?;
        let _one = self.inner.changing_rules.lock().await;
        let mut rules = lock(&self.inner.rules).clone();
        let pos = api_rule_position(&rules, name)?;
        rules[pos] = rule.clone();
        self.save_api_rules(&rules).await?;
        *lock(&self.inner.rules) = rules;
        Ok((rule, warnings))
    }

    /// Deletes a rule made through the API; its firing alerts resolve (and receivers that
    /// heard them fire are told).
    pub async fn delete_rule(&self, name: &str) -> Result<(), AlertsError> {
        let _one = self.inner.changing_rules.lock().await;
        let mut rules = lock(&self.inner.rules).clone();
        let pos = api_rule_position(&rules, name)?;
        rules.remove(pos);
        self.save_api_rules(&rules).await?;
        *lock(&self.inner.rules) = rules;
        eval::resolve_rule(&mut lock(&self.inner.state).alerts, name, self.now());
        lock(&self.inner.health).remove(name);
        self.save().await;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Counters for `/metrics`.
    pub fn stats(&self) -> &AlertStats {
        &self.inner.stats
    }

    /// How many alerts are in each state now.
    pub fn counts(&self) -> BTreeMap<AlertState, usize> {
        let mut out = BTreeMap::new();
        for a in lock(&self.inner.state).alerts.values() {
            *out.entry(a.state).or_insert(0) += 1;
        }
        out
    }

    /// Every alert, pending, firing or recently resolved.
    pub fn alerts(&self) -> Alerts {
        lock(&self.inner.state).alerts.clone()
    }

    /// The delivery attempt log, oldest first.
    pub fn deliveries(&self) -> Vec<DeliveryAttempt> {
        lock(&self.inner.state).deliveries.iter().cloned().collect()
    }
}
