//! Routes by request inside one destination, with the Gateway API's HTTPRoute semantics:
//! a destination's `[[destination.route]]` tables are tried in order and the first whose
//! any `match` holds wins; within one match every condition must hold (path exact or
//! prefix by path segments, method, headers exact or regex, query parameters exact or
//! regex). A route sends to its own backends (versions of the destination, weighted) with
//! its own timeout and retries; a request no route matches takes the destination's own
//! split and policy.

use std::sync::Arc;

use http::Request;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::config::RetryConfig;

/// A route as written in the proxy's TOML.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RouteConfig {
    /// Its name, on the CLIENT span as `meshscope.route` [`route-<n>`, from 1].
    #[serde(default)]
    pub name: Option<String>,
    /// Any of these matches the request; none given matches every request.
    #[serde(default, rename = "match")]
    pub matches: Vec<MatchConfig>,
    /// Versions of the destination and their weights [the destination's own split].
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Whole-request timeout for this route [the destination's].
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Retries for this route [the destination's].
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// A share of this route's requests copied to a shadow version, fire-and-forget.
    #[serde(default)]
    pub mirror: Option<MirrorConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MirrorConfig {
    /// The shadow: a `version` of the destination's endpoints (usually weight 0).
    pub version: String,
    /// Share of the route's requests copied, 0–100 [100].
    #[serde(default = "hundred")]
    pub percent: f64,
    /// Requests with a larger (or unknown-length) body are not copied [65536].
    #[serde(default = "max_mirror_body")]
    pub max_body_bytes: u64,
}

fn hundred() -> f64 {
    100.0
}

fn max_mirror_body() -> u64 {
    64 * 1024
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MatchConfig {
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// `GET`, `POST` … (case-insensitive).
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query: Vec<ValueMatch>,
}

/// `{ exact = "/cart" }` or `{ prefix = "/api" }` (`/api` matches `/api` and `/api/x`,
/// not `/apix`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PathMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
}

/// A header or query parameter by name: `value` exactly or `regex` (the whole value).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ValueMatch {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BackendConfig {
    /// A `version` of the destination's endpoints (all its endpoints take part).
    pub version: String,
    /// Share, relative to the route's other backends [1].
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug)]
enum Path {
    Exact(String),
    Prefix(String),
}

#[derive(Debug)]
enum Value {
    Exact(String),
    Regex(Regex),
}

impl Value {
    fn holds(&self, v: &str) -> bool {
        match self {
            Value::Exact(e) => e == v,
            Value::Regex(r) => r.is_match(v),
        }
    }
}

/// One `match`, compiled.
#[derive(Debug, Default)]
pub struct Match {
    path: Option<Path>,
    method: Option<http::Method>,
    headers: Vec<(http::HeaderName, Value)>,
    query: Vec<(String, Value)>,
}

fn value(what: &str, m: &ValueMatch) -> Result<Value, String> {
    match (&m.value, &m.regex) {
        (Some(v), None) => Ok(Value::Exact(v.clone())),
        (None, Some(r)) => Regex::new(&format!("^(?:{r})$"))
            .map(Value::Regex)
            .map_err(|e| format!("{what} {:?}: regex {r:?}: {e}", m.name)),
        _ => Err(format!(
            "{what} {:?}: give exactly one of value or regex",
            m.name
        )),
    }
}

impl Match {
    pub fn compile(c: &MatchConfig) -> Result<Match, String> {
        let path = match &c.path {
            None => None,
            Some(PathMatch {
                exact: Some(p),
                prefix: None,
            }) if p.starts_with('/') => Some(Path::Exact(p.clone())),
            Some(PathMatch {
                exact: None,
                prefix: Some(p),
            }) if p.starts_with('/') => Some(Path::Prefix(p.trim_end_matches('/').to_string())),
            Some(_) => {
                return Err(
                    "path: give exactly one of exact or prefix, starting with /".to_string()
                );
            }
        };
        let method = c
            .method
            .as_deref()
            .map(|m| {
                http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("method {m:?} is not an HTTP method"))
            })
            .transpose()?;
        let headers = c
            .headers
            .iter()
            .map(|h| {
                let name = http::HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("header {:?} is not a header name", h.name))?;
                Ok((name, value("header", h)?))
            })
            .collect::<Result<_, String>>()?;
        let query = c
            .query
            .iter()
            .map(|q| Ok((q.name.clone(), value("query parameter", q)?)))
            .collect::<Result<_, String>>()?;
        Ok(Match {
            path,
            method,
            headers,
            query,
        })
    }

    /// Whether every condition holds for `req`.
    pub fn holds<B>(&self, req: &Request<B>) -> bool {
        let path = req.uri().path();
        let path_ok = match &self.path {
            None => true,
            Some(Path::Exact(p)) => path == p,
            // By segments: `/api` is `/api` or `/api/…`; the prefix `/` is everything.
            Some(Path::Prefix(p)) => {
                p.is_empty()
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| req.method() == m)
            && self.headers.iter().all(|(name, want)| {
                req.headers()
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| want.holds(v)))
            })
            && self.query.iter().all(|(name, want)| {
                req.uri().query().is_some_and(|q| {
                    q.split('&').any(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        k == name && want.holds(v)
                    })
                })
            })
    }
}

/// A route's name, on the request for the trace layer (`meshscope.route`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteName(pub Arc<str>);

/// The first route of `routes` any of whose matches holds.
pub fn first_match<'a, B, R>(
    routes: &'a [R],
    matches: impl Fn(&'a R) -> &'a [Match],
    req: &Request<B>,
) -> Option<&'a R> {
    routes.iter().find(|r| {
        let m = matches(r);
        m.is_empty() || m.iter().any(|m| m.holds(req))
    })
}

/// Checks a destination's routes against its endpoints' versions; every problem named.
pub fn validate(destination: &str, routes: &[RouteConfig], versions: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        let name = r.name.clone().unwrap_or_else(|| format!("route-{}", i + 1));
        let at = format!("destination {destination:?}, route {name:?}");
        for m in &r.matches {
            if let Err(e) = Match::compile(m) {
                problems.push(format!("{at}: {e}"));
            }
        }
        for b in &r.backends {
            if !versions.contains(&b.version.as_str()) {
                problems.push(format!(
                    "{at}: backend version {:?} is none of the destination's endpoints' ({})",
                    b.version,
                    versions.join(", ")
                ));
            }
        }
        if !r.backends.is_empty() && r.backends.iter().all(|b| b.weight == 0) {
            problems.push(format!("{at}: every backend weight is 0"));
        }
        if r.timeout_ms == Some(0) {
            problems.push(format!("{at}: timeout-ms is 0"));
        }
        if let Some(m) = &r.mirror {
            if !versions.contains(&m.version.as_str()) {
                problems.push(format!(
                    "{at}: mirror version {:?} is none of the destination's endpoints' ({})",
                    m.version,
                    versions.join(", ")
                ));
            }
            if !(0.0..=100.0).contains(&m.percent) {
                problems.push(format!("{at}: mirror percent must be within 0–100"));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(toml_text: &str) -> Match {
        let c: MatchConfig = toml::from_str(toml_text).expect("toml");
        Match::compile(&c).expect("compiles")
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn paths_match_exactly_or_by_segment_prefix() {
        let exact = m(r#"path = { exact = "/cart" }"#);
        assert!(exact.holds(&req("GET", "/cart", &[])));
        assert!(exact.holds(&req("GET", "/cart?x=1", &[])));
        assert!(!exact.holds(&req("GET", "/cart/1", &[])));
        let prefix = m(r#"path = { prefix = "/api/" }"#);
        assert!(prefix.holds(&req("GET", "/api", &[])));
        assert!(prefix.holds(&req("GET", "/api/items", &[])));
        assert!(!prefix.holds(&req("GET", "/apix", &[])));
        assert!(m(r#"path = { prefix = "/" }"#).holds(&req("GET", "/anything", &[])));
    }

    #[test]
    fn methods_headers_and_query_parameters_must_all_hold() {
        let beta = m(r#"
            method = "post"
            headers = [{ name = "X-User-Group", value = "beta" }, { name = "user-agent", regex = "curl/.*" }]
            query = [{ name = "debug", value = "1" }, { name = "v", regex = "[0-9]+" }]
        "#);
        let good = req(
            "POST",
            "/x?v=12&debug=1",
            &[("x-user-group", "beta"), ("user-agent", "curl/8.5")],
        );
        assert!(beta.holds(&good));
        for bad in [
            req(
                "GET",
                "/x?v=12&debug=1",
                &[("x-user-group", "beta"), ("user-agent", "curl/8")],
            ),
            req(
                "POST",
                "/x?v=12&debug=1",
                &[("x-user-group", "alpha"), ("user-agent", "curl/8")],
            ),
            req(
                "POST",
                "/x?v=12&debug=1",
                &[("x-user-group", "beta"), ("user-agent", "wget curl/8")],
            ),
            req(
                "POST",
                "/x?v=1a&debug=1",
                &[("x-user-group", "beta"), ("user-agent", "curl/8")],
            ),
            req(
                "POST",
                "/x?v=12",
                &[("x-user-group", "beta"), ("user-agent", "curl/8")],
            ),
        ] {
            assert!(!beta.holds(&bad), "{:?} {:?}", bad.uri(), bad.headers());
        }
    }

    #[test]
    fn the_first_route_that_matches_wins() {
        let routes: Vec<(&str, Vec<Match>)> = vec![
            (
                "beta",
                vec![m(
                    r#"headers = [{ name = "x-user-group", value = "beta" }]"#,
                )],
            ),
            (
                "api",
                vec![
                    m(r#"path = { prefix = "/api" }"#),
                    m(r#"method = "DELETE""#),
                ],
            ),
            ("rest", vec![]),
        ];
        let pick = |r: &Request<()>| first_match(&routes, |x| &x.1, r).map(|x| x.0);
        assert_eq!(
            pick(&req("GET", "/api/1", &[("x-user-group", "beta")])),
            Some("beta")
        );
        assert_eq!(pick(&req("GET", "/api/1", &[])), Some("api"));
        assert_eq!(pick(&req("DELETE", "/other", &[])), Some("api"));
        assert_eq!(pick(&req("GET", "/other", &[])), Some("rest"));
        assert_eq!(
            first_match(&routes[..2], |x| &x.1, &req("GET", "/other", &[])).map(|x| x.0),
            None
        );
    }

    #[test]
    fn bad_routes_are_refused_with_every_problem_named() {
        let routes: Vec<RouteConfig> = toml::from_str::<toml::Table>(
            r#"
            [[route]]
            name = "beta"
            match = [{ path = { exact = "cart" } }, { headers = [{ name = "x", regex = "(" }] }]
            backends = [{ version = "v3" }]
            [[route]]
            match = [{ method = "NOT A METHOD", query = [{ name = "q" }] }]
            timeout-ms = 0
            "#,
        )
        .expect("toml")["route"]
            .clone()
            .try_into()
            .expect("routes");
        let problems = validate("cart", &routes, &["v1", "v2"]);
        let text = problems.join("\n");
        assert_eq!(problems.len(), 5, "{text}");
        for want in [
            "route \"beta\": path: give exactly one of exact or prefix",
            "route \"beta\": header \"x\": regex",
            "backend version \"v3\" is none of the destination's endpoints' (v1, v2)",
            "route \"route-2\": method \"NOT A METHOD\" is not an HTTP method",
            "route \"route-2\": timeout-ms is 0",
        ] {
            assert!(text.contains(want), "{want} in:\n{text}");
        }
    }
}
