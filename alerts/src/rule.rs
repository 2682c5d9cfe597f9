//! Alert rules: the spec people write (TOML in the config file, JSON through the API) and
//! the checked, typed [`Rule`] the evaluator runs.
//!
//! Three kinds:
//! - `threshold`: a golden signal of a service, an endpoint or an edge over a window,
//!   compared with a threshold (`error_rate`, `p50_ms`, `p95_ms`, `p99_ms`, `rate`,
//!   `requests`, `errors`, and `rate_drop`, the fraction by which the request rate fell
//!   against the window before);
//! - `sql`: a read-only query run on every evaluation; each row is a firing instance;
//! - `edge-appeared`, `edge-vanished`, `new-virtual-peer`: the graph's edges in the window
//!   against the window before; `plaintext-edge` (plaintext requests between two meshed
//!   services) and `denied-requests` (authorization refused requests): the edges' security
//!   in the window.
//!
//! Checks that need no data ([`Rule::from_spec`]) give errors; checks against the engine
//! ([`check_with_engine`]) plan a SQL rule read-only (errors) and look for the services a
//! rule names (an unknown one is only a warning: it may not have sent anything yet).

use std::collections::BTreeMap;
use std::time::Duration;

use datafusion::prelude::SQLOptions;
use datafusion::sql::parser::DFParser;
use meshscope_query::readonly::{self, Surface};
use meshscope_query::{Params, QueryEngine};
use serde::{Deserialize, Serialize};

/// A rule as written. Keys are kebab-case in TOML and JSON alike.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuleSpec {
    /// Unique; becomes the `alertname` label. Letters, digits, `_ - . :`.
    #[serde(default)]
    pub name: String,
    /// `threshold` (the default), `sql`, `edge-appeared`, `edge-vanished`, `new-virtual-peer`,
    /// `plaintext-edge`, `denied-requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Threshold rules: which golden signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// `service`, `endpoint` or `edge`; inferred from the fields below when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// A service (absent: every service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// An endpoint of `service` (its `http_route`, or span name); absent: every endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Edge rules: the calling side (`user` for entry points); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Edge rules: the called side; absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `>` (the default), `>=`, `<`, `<=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// The window the signal is computed over [300].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_secs: Option<u64>,
    /// How long the condition must hold before the alert fires [0].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_secs: Option<u64>,
    /// Fewer requests than this in the window never alert [1; 0 for rate rules].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    /// SQL rules: the query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// `severity` label [warning].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `{{ $value }}`, `{{ $threshold }}` and `{{ $labels.NAME }}` are filled in.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The golden signals a threshold rule can watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    ErrorRate,
    P50,
    P95,
    P99,
    Rate,
    RateDrop,
    Requests,
    Errors,
}

pub const SIGNALS: &str = "error_rate, p50_ms, p95_ms, p99_ms, rate, rate_drop, requests, errors";

impl Signal {
    pub fn parse(s: &str) -> Option<Signal> {
        Some(match s.replace('-', "_").as_str() {
            "error_rate" => Signal::ErrorRate,
            "p50_ms" | "p50" | "p50_latency" => Signal::P50,
            "p95_ms" | "p95" | "p95_latency" => Signal::P95,
            "p99_ms" | "p99" | "p99_latency" => Signal::P99,
            "rate" | "request_rate" => Signal::Rate,
            "rate_drop" | "request_rate_drop" => Signal::RateDrop,
            "requests" => Signal::Requests,
            "errors" => Signal::Errors,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::ErrorRate => "error_rate",
            Signal::P50 => "p50_ms",
            Signal::P95 => "p95_ms",
            Signal::P99 => "p99_ms",
            Signal::Rate => "rate",
            Signal::RateDrop => "rate_drop",
            Signal::Requests => "requests",
            Signal::Errors => "errors",
        }
    }

    /// The latency percentile, for signals whose evidence is slow requests.
    pub fn is_latency(self) -> bool {
        matches!(self, Signal::P50 | Signal::P95 | Signal::P99)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s.trim() {
            ">" | "gt" => Op::Gt,
            ">=" | "ge" => Op::Ge,
            "<" | "lt" => Op::Lt,
            "<=" | "le" => Op::Le,
            _ => return None,
        })
    }

    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
        }
    }
}

/// What a threshold rule looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Service(Option<String>),
    Endpoint {
        service: String,
        endpoint: Option<String>,
    },
    Edge {
        source: Option<String>,
        target: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub scope: Scope,
    pub signal: Signal,
    pub op: Op,
    pub threshold: f64,
    pub window: Duration,
    pub min_requests: u64,
}

/// The graph changes a structural rule watches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    EdgeAppeared,
    EdgeVanished,
    NewVirtualPeer,
    PlaintextEdge,
    DeniedRequests,
}

impl Change {
    pub fn name(self) -> &'static str {
        match self {
            Change::EdgeAppeared => "edge-appeared",
            Change::EdgeVanished => "edge-vanished",
            Change::NewVirtualPeer => "new-virtual-peer",
            Change::PlaintextEdge => "plaintext-edge",
            Change::DeniedRequests => "denied-requests",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Structural {
    pub change: Change,
    pub source: Option<String>,
    pub target: Option<String>,
    pub window: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Threshold(Threshold),
    Sql(String),
    Structural(Structural),
}

/// Where a rule was defined: the config file's rules change only there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Config,
    Api,
}

/// A checked rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub spec: RuleSpec,
    pub origin: Origin,
    pub name: String,
    pub kind: Kind,
    pub for_: Duration,
    pub severity: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Why a rule was refused: every problem found, each a readable sentence.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid rule {name:?}: {}", problems.join("; "))]
pub struct RuleError {
    pub name: String,
    pub problems: Vec<String>,
}

const DEFAULT_WINDOW: u64 = 300;

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
}

fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Rule {
    /// Checks everything that needs no data.
    pub fn from_spec(spec: RuleSpec, origin: Origin) -> Result<Rule, RuleError> {
        let mut problems = Vec::new();
        if !valid_name(&spec.name) {
            problems.push(format!(
                "name must be 1-128 letters, digits, '_', '-', '.' or ':', got {:?}",
                spec.name
            ));
        }
        for k in spec.labels.keys().chain(spec.annotations.keys()) {
            if !valid_label_name(k) {
                problems.push(format!(
                    "label and annotation names are [a-zA-Z_][a-zA-Z0-9_]*, got {k:?}"
                ));
            }
        }
        if spec.labels.contains_key("alertname") {
            problems.push("the alertname label is the rule's name; do not set it".into());
        }
        let window = Duration::from_secs(spec.window_secs.unwrap_or(DEFAULT_WINDOW));
        if window.is_zero() {
            problems.push("window-secs must be at least 1".into());
        }
        let kind_name = spec.kind.clone().unwrap_or_else(|| {
            if spec.sql.is_some() {
                "sql".into()
            } else {
                "threshold".into()
            }
        });
        let forbid = |problems: &mut Vec<String>, field: &str, present: bool| {
            if present {
                problems.push(format!("{field} does not apply to {kind_name} rules"));
            }
        };
        let kind = match kind_name.as_str() {
            "threshold" => {
                forbid(&mut problems, "sql", spec.sql.is_some());
                let signal = match spec.signal.as_deref() {
                    None => {
                        problems.push(format!("signal is required (one of {SIGNALS})"));
                        None
                    }
                    Some(s) => {
                        let parsed = Signal::parse(s);
                        if parsed.is_none() {
                            problems.push(format!("unknown signal {s:?}; one of {SIGNALS}"));
                        }
                        parsed
                    }
                };
                let op = match spec.op.as_deref() {
                    None => Some(Op::Gt),
                    Some(o) => {
                        let parsed = Op::parse(o);
                        if parsed.is_none() {
                            problems.push(format!("op must be >, >=, < or <=, got {o:?}"));
                        }
                        parsed
                    }
                };
                let threshold = match spec.threshold {
                    Some(t) if t.is_finite() => Some(t),
                    Some(t) => {
                        problems.push(format!("threshold must be a finite number, got {t}"));
                        None
                    }
                    None => {
                        problems.push("threshold is required".into());
                        None
                    }
                };
                let scope = scope_of(&spec, &mut problems);
                let min_requests = spec.min_requests.unwrap_or(match signal {
                    Some(Signal::Rate | Signal::Requests) => 0,
                    _ => 1,
                });
                match (signal, op, threshold, scope) {
                    (Some(signal), Some(op), Some(threshold), Some(scope)) => {
                        Some(Kind::Threshold(Threshold {
                            scope,
                            signal,
                            op,
                            threshold,
                            window,
                            min_requests,
                        }))
                    }
                    _ => None,
                }
            }
            "sql" => {
                for (f, present) in [
                    ("signal", spec.signal.is_some()),
                    ("threshold", spec.threshold.is_some()),
                    ("service", spec.service.is_some()),
                    ("endpoint", spec.endpoint.is_some()),
                    ("source", spec.source.is_some()),
                    ("target", spec.target.is_some()),
                    ("window-secs", spec.window_secs.is_some()),
                ] {
                    forbid(&mut problems, f, present);
                }
                match spec.sql.as_deref().map(str::trim) {
                    Some(s) if !s.is_empty() => Some(Kind::Sql(s.to_string())),
                    _ => {
                        problems.push("sql is required for sql rules".into());
                        None
                    }
                }
            }
            "edge-appeared" | "edge-vanished" | "new-virtual-peer" | "plaintext-edge"
            | "denied-requests" => {
                for (f, present) in [
                    ("signal", spec.signal.is_some()),
                    ("threshold", spec.threshold.is_some()),
                    ("sql", spec.sql.is_some()),
                    ("endpoint", spec.endpoint.is_some()),
                ] {
                    forbid(&mut problems, f, present);
                }
                let change = match kind_name.as_str() {
                    "edge-appeared" => Change::EdgeAppeared,
                    "edge-vanished" => Change::EdgeVanished,
                    "plaintext-edge" => Change::PlaintextEdge,
                    "denied-requests" => Change::DeniedRequests,
                    _ => Change::NewVirtualPeer,
                };
                // `service` is shorthand for "edges from this service".
                let source = spec.source.clone().or_else(|| spec.service.clone());
                Some(Kind::Structural(Structural {
                    change,
                    source,
                    target: spec.target.clone(),
                    window,
                }))
            }
            other => {
                problems.push(format!(
                    "unknown kind {other:?}; one of threshold, sql, edge-appeared, edge-vanished, new-virtual-peer, plaintext-edge, denied-requests"
                ));
                None
            }
        };
        match kind {
            Some(kind) if problems.is_empty() => {
                let severity = spec.severity.clone().unwrap_or_else(|| "warning".into());
                Ok(Rule {
                    name: spec.name.clone(),
                    for_: Duration::from_secs(spec.for_secs.unwrap_or(0)),
                    severity,
                    labels: spec.labels.clone(),
                    annotations: spec.annotations.clone(),
                    kind,
                    origin,
                    spec,
                })
            }
            _ => Err(RuleError {
                name: spec.name,
                problems,
            }),
        }
    }

    /// The window the rule looks back over (SQL rules choose their own in the query).
    pub fn window(&self) -> Option<Duration> {
        match &self.kind {
            Kind::Threshold(t) => Some(t.window),
            Kind::Structural(s) => Some(s.window),
            Kind::Sql(_) => None,
        }
    }

    /// The services the rule names, to warn about those never seen.
    fn named_services(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.kind {
            Kind::Threshold(t) => match &t.scope {
                Scope::Service(s) => out.extend(s.clone()),
                Scope::Endpoint { service, .. } => out.push(service.clone()),
                Scope::Edge { source, target } => {
                    out.extend(source.clone().filter(|s| s != "user"));
                    out.extend(target.clone());
                }
            },
            Kind::Structural(s) => {
                out.extend(s.source.clone().filter(|s| s != "user"));
            }
            Kind::Sql(_) => {}
        }
        out
    }
}

fn scope_of(spec: &RuleSpec, problems: &mut Vec<String>) -> Option<Scope> {
    let inferred = if spec.source.is_some() || spec.target.is_some() {
        "edge"
    } else if spec.endpoint.is_some() {
        "endpoint"
    } else {
        "service"
    };
    match spec.scope.as_deref().unwrap_or(inferred) {
        "service" => {
            if spec.source.is_some() || spec.target.is_some() || spec.endpoint.is_some() {
                problems.push(
                    "a service rule takes service only (no source, target or endpoint)".into(),
                );
            }
            Some(Scope::Service(spec.service.clone()))
        }
        "endpoint" => match &spec.service {
            Some(service) => Some(Scope::Endpoint {
                service: service.clone(),
                endpoint: spec.endpoint.clone(),
            }),
            None => {
                problems.push("an endpoint rule needs the service the endpoint belongs to".into());
                None
            }
        },
        "edge" => {
            if spec.service.is_some() || spec.endpoint.is_some() {
                problems
                    .push("an edge rule takes source and target (not service or endpoint)".into());
            }
            Some(Scope::Edge {
                source: spec.source.clone(),
                target: spec.target.clone(),
            })
        }
        other => {
            problems.push(format!(
                "scope must be service, endpoint or edge, got {other:?}"
            ));
            None
        }
    }
}

/// The checks that need the engine. A SQL rule is parsed, checked read-only and planned
/// (not run): problems are errors. Services the rule names that have no spans at all are
/// warnings.
pub async fn check_with_engine(
    rule: &Rule,
    engine: &QueryEngine,
) -> Result<Vec<String>, RuleError> {
    if let Kind::Sql(sql) = &rule.kind
        && let Err(e) = plan_read_only(engine, sql).await
    {
        return Err(RuleError {
            name: rule.name.clone(),
            problems: vec![format!("bad SQL: {e}")],
        });
    }
    let mut warnings = Vec::new();
    for service in rule.named_services() {
        let mut params = Params::default();
        let name = params.bind(&service);
        let known = engine
            .sql_with(
                &format!("SELECT 1 FROM spans WHERE service_name = {name} LIMIT 1"),
                params,
            )
            .await
            .map(|r| r.batches.iter().any(|b| b.num_rows() > 0));
        match known {
            Ok(true) => {}
            Ok(false) => warnings.push(format!(
                "service {service:?} has sent no spans yet; the rule will match once it does"
            )),
            Err(e) => warnings.push(format!("could not look for service {service:?}: {e}")),
        }
    }
    Ok(warnings)
}

/// Parses, checks read-only and plans one statement without running it.
pub async fn plan_read_only(engine: &QueryEngine, sql: &str) -> Result<(), String> {
    let statements = DFParser::parse_sql(sql).map_err(|e| e.to_string())?;
    if statements.len() != 1 {
        return Err(format!("one statement expected, got {}", statements.len()));
    }
    readonly::check_df(&statements[0], Surface::Http).map_err(|e| e.to_string())?;
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let ctx = engine.context().clone();
    let sql = sql.to_string();
    engine
        .executor()
        .spawn(async move { ctx.sql_with_options(&sql, options).await.map(|_| ()) })
        .await
        .map_err(|e| format!("planning task failed: {e}"))?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> RuleSpec {
        toml::from_str(toml_text).expect("toml")
    }

    #[test]
    fn threshold_rule_from_toml() {
        let r = Rule::from_spec(
            spec(
                r#"name = "checkout-errors"
                   signal = "error_rate"
                   service = "checkout"
                   threshold = 0.1
                   for-secs = 60
                   severity = "critical"
                   labels = { team = "payments" }"#,
            ),
            Origin::Config,
        )
        .expect("valid");
        assert_eq!(r.for_, Duration::from_secs(60));
        assert_eq!(r.severity, "critical");
        let Kind::Threshold(t) = &r.kind else {
            panic!("threshold")
        };
        assert_eq!(t.scope, Scope::Service(Some("checkout".into())));
        assert_eq!(t.signal, Signal::ErrorRate);
        assert_eq!(t.op, Op::Gt);
        assert_eq!(t.window, Duration::from_secs(300));
        assert_eq!(t.min_requests, 1);
    }

    #[test]
    fn scopes_are_inferred() {
        let edge = Rule::from_spec(
            spec("name = \"e\"\nsignal = \"p99_ms\"\nsource = \"a\"\ntarget = \"b\"\nthreshold = 250.0"),
            Origin::Api,
        )
        .expect("edge");
        let Kind::Threshold(t) = edge.kind else {
            panic!()
        };
        assert_eq!(
            t.scope,
            Scope::Edge {
                source: Some("a".into()),
                target: Some("b".into())
            }
        );
        let ep = Rule::from_spec(
            spec("name = \"p\"\nsignal = \"p95\"\nservice = \"a\"\nendpoint = \"GET /x\"\nthreshold = 1.0"),
            Origin::Api,
        )
        .expect("endpoint");
        let Kind::Threshold(t) = ep.kind else {
            panic!()
        };
        assert!(matches!(t.scope, Scope::Endpoint { .. }));
        assert_eq!(t.signal, Signal::P95);
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        let err = Rule::from_spec(
            spec("name = \"bad name!\"\nsignal = \"latency\"\nop = \"=>\""),
            Origin::Api,
        )
        .expect_err("invalid");
        let all = err.to_string();
        assert!(all.contains("name must be"), "{all}");
        assert!(all.contains("unknown signal \"latency\""), "{all}");
        assert!(all.contains("op must be"), "{all}");
        assert!(all.contains("threshold is required"), "{all}");

        let err =
            Rule::from_spec(spec("name = \"x\"\nkind = \"sql\""), Origin::Api).expect_err("no sql");
        assert!(err.to_string().contains("sql is required"), "{err}");

        let err =
            Rule::from_spec(spec("name = \"x\"\nkind = \"weird\""), Origin::Api).expect_err("kind");
        assert!(err.to_string().contains("unknown kind"), "{err}");

        let err = Rule::from_spec(
            spec("name = \"x\"\nsignal = \"rate\"\nthreshold = 1.0\nendpoint = \"/a\""),
            Origin::Api,
        )
        .expect_err("endpoint without service");
        assert!(err.to_string().contains("needs the service"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<RuleSpec>("name = \"x\"\nthreshhold = 1").expect_err("typo");
        assert!(err.to_string().contains("threshhold"), "{err}");
    }

    #[test]
    fn structural_and_sql_kinds() {
        let s = Rule::from_spec(
            spec("name = \"new-edge\"\nkind = \"edge-appeared\"\nwindow-secs = 60"),
            Origin::Config,
        )
        .expect("structural");
        assert!(matches!(
            s.kind,
            Kind::Structural(Structural {
                change: Change::EdgeAppeared,
                ..
            })
        ));
        let q = Rule::from_spec(
            spec("name = \"q\"\nsql = \"SELECT service_name FROM spans\""),
            Origin::Config,
        )
        .expect("sql inferred");
        assert!(matches!(q.kind, Kind::Sql(_)));
    }
}
