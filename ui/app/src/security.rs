//! The Security view: every edge of the range with its mTLS share, the identities its
//! certificates proved and what authorization decided; plaintext and denied edges first.

use leptos::prelude::*;
use serde_json::Value;

use crate::charts::{LineChart, Series};
use crate::state::{tick, use_url};
use crate::util::{self, f, fmt_rate, s};
use crate::{ErrorBox, Loading};

/// Worst first: plaintext between meshed proxies and denials ahead of clean mTLS.
fn rank(e: &Value) -> (u8, i64) {
    let denied = f(e, "denied") + f(e, "would_deny");
    let level = match util::mtls_level(e) {
        Some("none") => 1,
        Some("partial") => 0,
        Some(_) => 3,
        None => 4,
    };
    (
        if denied > 0.0 { level.min(2) } else { level },
        -(f(e, "requests") as i64),
    )
}

#[component]
pub fn SecurityPage() -> impl IntoView {
    let url = use_url();
    let graph = LocalResource::new(move || {
        let q = url.range().api();
        tick();
        util::get_json(format!("/api/v1/graph?{q}"))
    });
    let per_minute = LocalResource::new(move || {
        let q = url.range().api();
        tick();
        util::get_json(format!("/api/v1/security/series?{q}"))
    });
    // The mesh's requests per minute by transport, and the denials: when plaintext or
    // refusals began.
    let chart = move || {
        let Some(Ok(v)) = per_minute.get() else {
            return None;
        };
        let minutes = v["minutes"].as_array().cloned().unwrap_or_default();
        if minutes.is_empty() {
            return None;
        }
        let line = |label: &str, key: &str, color: &'static str| Series {
            label: label.into(),
            color,
            points: minutes
                .iter()
                .map(|m| (util::ts_ms(&m["time"]), f(m, key)))
                .collect(),
        };
        let series = vec![
            line("mTLS", "mtls", "#22c55e"),
            line("plaintext", "plaintext", "#ef4444"),
            line("denied", "denied", "#f59e0b"),
            line("would deny", "would_deny", "#a78bfa"),
        ];
        let from = match s(&v, "computed_from").as_str() {
            "metrics" => "the proxies' request metrics",
            "access-logs" => "the proxies' access logs",
            "spans" => "the proxies' spans",
            _ => "no source",
        };
        Some(view! {
            <div class="security-chart" data-test="security-chart" data-computed-from=s(&v, "computed_from")>
                <LineChart title=format!("Requests per minute by transport, and denials (from {from})") series=series fmt=|x| format!("{x:.0}") width=1100.0 height=200.0/>
            </div>
        })
    };
    let body = move || match graph.get() {
        None => view! { <Loading/> }.into_any(),
        Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
        Some(Ok(g)) => {
            let mut edges: Vec<Value> = g["edges"].as_array().cloned().unwrap_or_default();
            edges.sort_by_key(rank);
            let count = |level: &str| {
                edges
                    .iter()
                    .filter(|e| util::mtls_level(e) == Some(level))
                    .count()
            };
            let denied: f64 = edges.iter().map(|e| f(e, "denied")).sum();
            let summary = view! {
                <div class="security-summary" data-test="security-summary">
                    <span><b>{count("full")}</b>" all mTLS"</span>
                    <span><b>{count("partial")}</b>" partly plaintext"</span>
                    <span><b>{count("none")}</b>" plaintext"</span>
                    <span><b>{edges.iter().filter(|e| util::mtls_level(e).is_none()).count()}</b>" unknown"</span>
                    <span><b>{format!("{denied:.0}")}</b>" requests denied"</span>
                </div>
            };
            let rows = edges
                .into_iter()
                .map(|e| {
                    let level = util::mtls_level(&e).unwrap_or("unknown");
                    let ids = |k: &str| {
                        util::identities(&e, k)
                            .into_iter()
                            .map(|i| view! { <code class="identity">{i}</code> })
                            .collect_view()
                    };
                    let outcome = match (f(&e, "denied"), f(&e, "would_deny")) {
                        (d, _) if d > 0.0 => format!("{d:.0} denied"),
                        (_, w) if w > 0.0 => format!("{w:.0} would be denied"),
                        _ => "allowed".into(),
                    };
                    let denied_class = if f(&e, "denied") > 0.0 { "denied" } else { "" };
                    let link = url.link(
                        "/",
                        &[("sel", format!("edge:{}>{}", s(&e, "source"), s(&e, "target")))],
                    );
                    view! {
                        <tr data-test="security-row" data-source=s(&e, "source") data-target=s(&e, "target") data-mtls=level>
                            <td><a href=link>{s(&e, "source")}" → "{s(&e, "target")}</a></td>
                            <td><span class=format!("tls-badge lock-{level}")>{match util::mtls_text(&e) { t if t.is_empty() => "unknown".to_string(), t => t }}</span></td>
                            <td>{fmt_rate(f(&e, "rate"))}</td>
                            <td>{ids("client_identities")}</td>
                            <td>{ids("server_identities")}</td>
                            <td class=denied_class>{outcome}</td>
                        </tr>
                    }
                })
                .collect_view();
            view! {
                {summary}
                {chart}
                <table class="table" data-test="security-table">
                    <thead><tr><th>"Edge"</th><th>"Transport"</th><th>"Rate"</th><th>"Client identities"</th><th>"Server identities"</th><th>"Authorization"</th></tr></thead>
                    <tbody>{rows}</tbody>
                </table>
            }
            .into_any()
        }
    };
    view! {
        <div class="page">
            <div class="toolbar"><h1>"Security"</h1></div>
            <p class="muted small">"Mutual TLS share, the SPIFFE identities certificates proved, and authorization outcomes per edge, from the proxies' own metrics and access logs."</p>
            {body}
        </div>
    }
}
