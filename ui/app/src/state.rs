//! State shared by every page and kept in the URL: the time range (`range=5m|15m|1h|6h`,
//! or `range=custom&from=…&to=…` in RFC 3339) and auto-refresh (`refresh=off|10s|30s|1m`).
//! Page filters live in the same query string, so any view can be shared by its link.

use leptos::prelude::*;
use leptos_router::NavigateOptions;
use leptos_router::hooks::{use_location, use_navigate};

use crate::util::{enc, iso, now_ms};

/// The query keys every page carries along.
pub const SHARED: [&str; 4] = ["range", "from", "to", "refresh"];

pub const PRESETS: [(&str, f64); 4] = [
    ("5m", 5.0 * 60e3),
    ("15m", 15.0 * 60e3),
    ("1h", 3600e3),
    ("6h", 6.0 * 3600e3),
];

/// Bumped by auto-refresh and the refresh button; every data fetch reads it.
#[derive(Clone, Copy)]
pub struct Tick(pub RwSignal<u64>);

pub fn tick() -> u64 {
    use_context::<Tick>().map(|t| t.0.get()).unwrap_or(0)
}

#[derive(Clone, Debug, PartialEq)]
pub struct Range {
    pub preset: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

impl Range {
    /// `(start, end)` in epoch milliseconds, relative ranges ending now.
    pub fn bounds(&self) -> (f64, f64) {
        if self.preset == "custom" {
            let p = |s: &Option<String>| {
                s.as_deref()
                    .map(js_sys::Date::parse)
                    .filter(|v| !v.is_nan())
            };
            if let (Some(a), Some(b)) = (p(&self.from), p(&self.to))
                && a < b
            {
                return (a, b);
            }
        }
        let len = PRESETS
            .iter()
            .find(|(k, _)| *k == self.preset)
            .map(|(_, l)| *l)
            .unwrap_or(15.0 * 60e3);
        let end = now_ms();
        (end - len, end)
    }

    /// `start=…&end=…` for the API.
    pub fn api(&self) -> String {
        let (a, b) = self.bounds();
        format!("start={}&end={}", enc(&iso(a)), enc(&iso(b)))
    }

    /// `<col> >= … AND <col> < …` for SQL.
    pub fn sql(&self, col: &str) -> String {
        self.sql_widened(col, 0.0)
    }

    /// The same, widened by `ms` on both sides (to find the other half of a pair).
    pub fn sql_widened(&self, col: &str, ms: f64) -> String {
        let (a, b) = self.bounds();
        let (a, b) = (a - ms, b + ms);
        format!(
            "{col} >= CAST('{}' AS TIMESTAMP) AND {col} < CAST('{}' AS TIMESTAMP)",
            iso(a),
            iso(b)
        )
    }
}

/// The URL's query string, readable and writable.
#[derive(Clone, Copy)]
pub struct Url {
    pub query: Memo<leptos_router::params::ParamsMap>,
    pub path: Memo<String>,
}

pub fn use_url() -> Url {
    let loc = use_location();
    Url {
        query: loc.query,
        path: loc.pathname,
    }
}

impl Url {
    pub fn get(&self, k: &str) -> Option<String> {
        self.query.with(|q| q.get(k)).filter(|v| !v.is_empty())
    }

    pub fn get_untracked(&self, k: &str) -> Option<String> {
        self.query
            .with_untracked(|q| q.get(k))
            .filter(|v| !v.is_empty())
    }

    pub fn range(&self) -> Range {
        Range {
            preset: self.get("range").unwrap_or_else(|| "15m".into()),
            from: self.get("from"),
            to: self.get("to"),
        }
    }

    /// A link to `path` carrying the shared keys plus `extra`.
    pub fn link(&self, path: &str, extra: &[(&str, String)]) -> String {
        let mut parts = Vec::new();
        for k in SHARED {
            if let Some(v) = self.get(k) {
                parts.push(format!("{k}={}", enc(&v)));
            }
        }
        for (k, v) in extra {
            if !v.is_empty() {
                parts.push(format!("{k}={}", enc(v)));
            }
        }
        if parts.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", parts.join("&"))
        }
    }

    /// The current path with some keys set (`Some`) or removed (`None`), others kept.
    pub fn with(&self, updates: &[(&str, Option<String>)]) -> String {
        let mut parts: Vec<(String, String)> = self.query.with_untracked(|q| {
            q.clone()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect()
        });
        for (k, v) in updates {
            parts.retain(|(pk, _)| pk != k);
            if let Some(v) = v.as_ref().filter(|v| !v.is_empty()) {
                parts.push((k.to_string(), v.clone()));
            }
        }
        let qs: Vec<String> = parts
            .iter()
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect();
        let path = self.path.get_untracked();
        if qs.is_empty() {
            path
        } else {
            format!("{path}?{}", qs.join("&"))
        }
    }
}

type Navigate = Box<dyn Fn(&str, NavigateOptions)>;

thread_local! {
    static NAVIGATE: std::cell::RefCell<Option<Navigate>> = const { std::cell::RefCell::new(None) };
}

/// Keeps the router's navigate function for [`go`]; called once inside the `<Router>`.
pub fn install_navigate() {
    let navigate = use_navigate();
    NAVIGATE.with(|n| *n.borrow_mut() = Some(Box::new(navigate)));
}

/// Navigates to `href` (a new history entry, unless `replace`).
pub fn go(href: &str, replace: bool) {
    NAVIGATE.with(|n| {
        if let Some(nav) = n.borrow().as_ref() {
            nav(
                href,
                NavigateOptions {
                    replace,
                    scroll: false,
                    ..Default::default()
                },
            );
        }
    });
}
