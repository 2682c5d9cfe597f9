//! Fetching JSON from the API, reading fields of answers, formatting numbers and times.

use gloo_net::http::{Request, RequestBuilder, Response};
use leptos::prelude::*;
use serde_json::Value;
use wasm_bindgen::JsValue;

/// Where the API token lives: the tab's session storage (gone when the tab closes, never
/// sent anywhere but this server).
const TOKEN_KEY: &str = "meshscope-token";

fn session_storage() -> Option<web_sys::Storage> {
    web_sys::window()?.session_storage().ok()?
}

pub fn token() -> Option<String> {
    session_storage()?
        .get_item(TOKEN_KEY)
        .ok()?
        .filter(|t| !t.is_empty())
}

pub fn set_token(t: &str) {
    if let Some(s) = session_storage() {
        let _ = s.set_item(TOKEN_KEY, t.trim());
    }
}

thread_local! {
    /// Set when the server answered 401: the shell asks for a token.
    static NEEDS_TOKEN: RwSignal<bool> = RwSignal::new(false);
}

pub fn needs_token() -> RwSignal<bool> {
    NEEDS_TOKEN.with(|s| *s)
}

/// `req` with `authorization: Bearer <token>` when a token is kept.
fn authorized(req: RequestBuilder) -> RequestBuilder {
    match token() {
        Some(t) => req.header("authorization", &format!("Bearer {t}")),
        None => req,
    }
}

/// `GET url` → the JSON answer, or the API's `{"error"}` message.
pub async fn get_json(url: String) -> Result<Value, String> {
    let resp = authorized(Request::get(&url))
        .send()
        .await
        .map_err(|e| format!("cannot reach meshscope: {e}"))?;
    decode(resp).await
}

/// `POST /api/v1/sql` → `{"columns", "rows"}`.
pub async fn sql(q: String) -> Result<Value, String> {
    let resp = authorized(Request::post("/api/v1/sql"))
        .json(&serde_json::json!({ "sql": q }))
        .map_err(|e| e.to_string())?
        .send()
        .await
        .map_err(|e| format!("cannot reach meshscope: {e}"))?;
    decode(resp).await
}

/// SQL answer as rows of `{column: value}`.
pub async fn sql_rows(q: String) -> Result<Vec<serde_json::Map<String, Value>>, String> {
    let v = sql(q).await?;
    let names: Vec<String> = v["columns"]
        .as_array()
        .map(|c| c.iter().map(|c| s(c, "name")).collect())
        .unwrap_or_default();
    Ok(v["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    names
                        .iter()
                        .cloned()
                        .zip(r.as_array().cloned().unwrap_or_default())
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default())
}

async fn decode(resp: Response) -> Result<Value, String> {
    let status = resp.status();
    if status == 401 {
        needs_token().set(true);
    }
    let text = resp.text().await.map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
    if (200..300).contains(&status) {
        Ok(v)
    } else {
        Err(v
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}: {text}")))
    }
}

pub fn f(v: &Value, k: &str) -> f64 {
    match v.get(k) {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
        Some(Value::String(s)) => s.parse().unwrap_or(0.0),
        _ => 0.0,
    }
}

pub fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

pub fn enc(s: &str) -> String {
    String::from(js_sys::encode_uri_component(s))
}

/// A SQL string literal.
pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub fn fmt_rate(r: f64) -> String {
    // A sum over nothing is -0.0 (f64's `Sum` starts there): no "-0.00/s".
    let r = if r == 0.0 { 0.0 } else { r };
    if r >= 100.0 {
        format!("{r:.0}/s")
    } else if r >= 10.0 {
        format!("{r:.1}/s")
    } else {
        format!("{r:.2}/s")
    }
}

pub fn fmt_pct(e: f64) -> String {
    let p = e * 100.0;
    if p == 0.0 {
        "0%".into()
    } else if p < 0.1 {
        "<0.1%".into()
    } else if p < 10.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

pub fn fmt_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.0} s", ms / 1000.0)
    } else if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else if ms > 0.0 {
        format!("{:.0} µs", ms * 1000.0)
    } else {
        "0".into()
    }
}

pub fn fmt_num(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.1}k", n / 1e3)
    } else if n.fract() == 0.0 {
        format!("{n:.0}")
    } else {
        format!("{n:.2}")
    }
}

/// Health class of an error rate: ok (<1%), warn (<5%), bad.
pub fn health(error_rate: f64) -> &'static str {
    if error_rate < 0.01 {
        "ok"
    } else if error_rate < 0.05 {
        "warn"
    } else {
        "bad"
    }
}

pub fn health_color(error_rate: f64) -> &'static str {
    match health(error_rate) {
        "ok" => "#22c55e",
        "warn" => "#f59e0b",
        _ => "#ef4444",
    }
}

/// A stable colour per service name.
pub fn service_color(name: &str) -> &'static str {
    const P: [&str; 10] = [
        "#38bdf8", "#a78bfa", "#34d399", "#fbbf24", "#f472b6", "#60a5fa", "#fb923c", "#2dd4bf",
        "#c084fc", "#facc15",
    ];
    let h = name.bytes().fold(2166136261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16777619)
    });
    P[h as usize % P.len()]
}

pub fn now_ms() -> f64 {
    js_sys::Date::now()
}

pub fn iso(ms: f64) -> String {
    String::from(js_sys::Date::new(&JsValue::from_f64(ms)).to_iso_string())
}

/// Milliseconds since the epoch of an API timestamp (RFC 3339, or without a zone = UTC).
pub fn ts_ms(v: &Value) -> f64 {
    ts_ns(v) / 1e6
}

/// Nanoseconds since the epoch, keeping the sub-millisecond digits.
pub fn ts_ns(v: &Value) -> f64 {
    let t = match v {
        Value::String(t) => t.as_str(),
        Value::Number(n) => return n.as_f64().unwrap_or(0.0),
        _ => return 0.0,
    };
    if t.len() < 19 {
        return 0.0;
    }
    let secs = js_sys::Date::parse(&format!("{}Z", &t[..19]));
    let rest = &t[19..];
    let (frac_ns, tz) = match rest.strip_prefix('.') {
        Some(r) => {
            let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
            let padded = format!("{digits:0<9}");
            (
                padded[..9].parse::<f64>().unwrap_or(0.0),
                &r[digits.len()..],
            )
        }
        None => (0.0, rest),
    };
    let mut ns = secs * 1e6 + frac_ns;
    // "+hh:mm" offsets (the API answers UTC, but be exact if one appears).
    if tz.len() >= 6 && (tz.starts_with('+') || tz.starts_with('-')) {
        let h: f64 = tz[1..3].parse().unwrap_or(0.0);
        let m: f64 = tz[4..6].parse().unwrap_or(0.0);
        let off = (h * 60.0 + m) * 60.0 * 1e9;
        ns = if tz.starts_with('+') {
            ns - off
        } else {
            ns + off
        };
    }
    ns
}

/// `HH:MM:SS` in UTC.
pub fn clock(ms: f64) -> String {
    let s = iso(ms);
    s.get(11..19).unwrap_or("").to_string()
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC.
pub fn datetime(ms: f64) -> String {
    let s = iso(ms);
    format!(
        "{} {}",
        s.get(..10).unwrap_or(""),
        s.get(11..23).unwrap_or("")
    )
}

/// Any JSON value as short display text.
pub fn show(v: &Value) -> String {
    match v {
        Value::Null => "∅".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Key/value pairs of an attribute map as the API renders it (an object, or a list of
/// `{key, value}` entries).
pub fn pairs(v: &Value) -> Vec<(String, String)> {
    match v {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), show(v))).collect(),
        Value::Array(a) => a
            .iter()
            .map(|e| match e {
                Value::Object(m) if m.contains_key("key") => (
                    show(m.get("key").unwrap_or(&Value::Null)),
                    show(m.get("value").unwrap_or(&Value::Null)),
                ),
                Value::Array(kv) if kv.len() == 2 => (show(&kv[0]), show(&kv[1])),
                other => (String::new(), show(other)),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// An edge's padlock: `full` (all mTLS), `partial`, `none` (all plaintext), or `None` when
/// no source says.
pub fn mtls_level(edge: &Value) -> Option<&'static str> {
    let r = edge["mtls_ratio"].as_f64()?;
    Some(if r >= 1.0 {
        "full"
    } else if r > 0.0 {
        "partial"
    } else {
        "none"
    })
}

/// `mTLS`, `mTLS 60%`, `plaintext`, or `` when unknown.
pub fn mtls_text(edge: &Value) -> String {
    match (mtls_level(edge), edge["mtls_ratio"].as_f64()) {
        (Some("full"), _) => "mTLS".into(),
        (Some("partial"), Some(r)) => format!("mTLS {:.0}%", r * 100.0),
        (Some(_), _) => "plaintext".into(),
        (None, _) => String::new(),
    }
}

/// The SPIFFE IDs of a list, short (`ns/<ns>/sa/<workload>`) for display.
pub fn identities(edge: &Value, key: &str) -> Vec<String> {
    edge[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Saves `text` as a file called `name` (through a Blob and a clicked link).
pub fn download(name: &str, mime: &str, text: &str) {
    let parts = js_sys::Array::of1(&JsValue::from_str(text));
    let opts = web_sys::BlobPropertyBag::new();
    opts.set_type(mime);
    if let Ok(blob) = web_sys::Blob::new_with_str_sequence_and_options(&parts, &opts) {
        download_blob(name, &blob);
    }
}

/// Saves a Blob as a file called `name`.
pub fn download_blob(name: &str, blob: &web_sys::Blob) {
    use wasm_bindgen::JsCast;
    let Ok(href) = web_sys::Url::create_object_url_with_blob(blob) else {
        return;
    };
    if let Some(a) = document()
        .create_element("a")
        .ok()
        .and_then(|e| e.dyn_into::<web_sys::HtmlAnchorElement>().ok())
    {
        a.set_href(&href);
        a.set_download(name);
        a.click();
    }
    let _ = web_sys::Url::revoke_object_url(&href);
}
