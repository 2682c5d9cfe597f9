//! The Mesh page (`/mesh`): the control plane's view, as `istioctl proxy-status` gives it —
//! every proxy that follows it with the policy version it runs against the latest, in
//! sync or not, its last refused document and its certificate's expiry; and each
//! workload's policy document with its version; and the change log (what changed in each
//! version, when, who), which the service pages also draw on their charts.

use leptos::prelude::*;
use serde_json::Value;

use crate::charts::Mark;
use crate::state::tick;
use crate::util::{self, f, s};
use crate::{ErrorBox, Loading};

#[component]
pub fn MeshPage() -> impl IntoView {
    let proxies = LocalResource::new(move || {
        tick();
        util::get_json("/api/v1/mesh/proxies".to_string())
    });
    let policies = LocalResource::new(move || {
        tick();
        util::get_json("/api/v1/mesh/policy".to_string())
    });
    let changes = LocalResource::new(move || {
        tick();
        util::get_json("/api/v1/mesh/changes?limit=50".to_string())
    });
    let proxy_table = move || match proxies.get() {
        None => view! { <Loading/> }.into_any(),
        Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
        Some(Ok(v)) => {
            let list = v.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                return view! {
                    <div class="empty"><h2>"No proxy follows the control plane yet"</h2>
                    <p>"Start one with meshscope proxy --config proxy.toml --control-plane http://HOST:8080 --workload NAME."</p></div>
                }
                .into_any();
            }
            let synced = list
                .iter()
                .filter(|p| p["in_sync"] == Value::Bool(true))
                .count();
            view! {
                <div class="security-summary" data-test="mesh-summary">
                    <span><b>{list.len()}</b>" proxies"</span>
                    <span><b>{synced}</b>" in sync"</span>
                    <span><b>{list.len() - synced}</b>" stale or failing"</span>
                </div>
                <table class="table" data-test="proxies">
                    <thead><tr><th>"Workload"</th><th>"Instance"</th><th>"Applied"</th><th>"Latest"</th><th>"Status"</th><th>"Last error"</th><th>"Certificate expires"</th><th>"Last seen"</th></tr></thead>
                    <tbody>
                        {list.into_iter().map(|p| {
                            let ok = p["in_sync"] == Value::Bool(true);
                            let expiry = p["certificate_expiry_unix"].as_f64()
                                .map(|t| util::datetime(t * 1000.0))
                                .unwrap_or_else(|| "—".into());
                            view! {
                                <tr data-test="proxy-row" data-workload=s(&p, "workload") data-sync=if ok { "synced" } else { "stale" }>
                                    <td>{s(&p, "workload")}</td>
                                    <td class="mono small">{s(&p, "instance")}</td>
                                    <td class="num">{f(&p, "applied_version")}</td>
                                    <td class="num">{f(&p, "latest_version")}</td>
                                    <td><span class=if ok { "badge ok" } else { "badge bad" }>{if ok { "SYNCED" } else { "STALE" }}</span></td>
                                    <td class="small">{s(&p, "last_error")}</td>
                                    <td class="small">{expiry}</td>
                                    <td class="small mono">{s(&p, "last_seen")}</td>
                                </tr>
                            }
                        }).collect_view()}
                    </tbody>
                </table>
            }
            .into_any()
        }
    };
    let policy_list = move || {
        match policies.get() {
        None => view! { <Loading/> }.into_any(),
        Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
        Some(Ok(v)) => v
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let workload = s(&p, "workload");
                let doc = LocalResource::new({
                    let w = workload.clone();
                    move || util::get_json(format!("/api/v1/mesh/policy/{}", util::enc(&w)))
                });
                view! {
                    <details class="card policy" data-test="policy" data-workload=workload.clone()>
                        <summary>{format!("{workload} · version {} · {}", f(&p, "version"), s(&p, "updated_at"))}</summary>
                        <pre class="mono small">{move || doc.get().and_then(Result::ok).map(|d| s(&d, "document"))}</pre>
                    </details>
                }
            })
            .collect_view()
            .into_any(),
    }
    };
    view! {
        <div class="page mesh-page">
            <div class="toolbar"><h1>"Mesh"</h1></div>
            <h3>"Proxies"</h3>
            {proxy_table}
            <h3>"Policies"</h3>
            {policy_list}
            <h3>"Changes"</h3>
            {move || match changes.get() {
                None => view! { <Loading/> }.into_any(),
                Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
                Some(Ok(v)) => view! { <ChangesTable changes=v/> }.into_any(),
            }}
        </div>
    }
}

/// The chart marks of a `/api/v1/mesh/changes` answer.
pub fn marks(changes: &Value) -> Vec<Mark> {
    changes
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| Mark {
            at: util::ts_ms(&c["at"]),
            label: format!("v{}", f(c, "version")),
            detail: change_text(c),
        })
        .collect()
}

fn who(c: &Value) -> String {
    match c["by"].as_str() {
        Some(by) => by.to_string(),
        None if s(c, "source") == "api" => "no token (open server)".into(),
        None => s(c, "source"),
    }
}

/// `frontend v3 · 12:04:05 · by platform-team` and each field changed, one a line.
fn change_text(c: &Value) -> String {
    let mut out = format!(
        "policy of {} v{} · {} · by {}",
        s(c, "workload"),
        f(c, "version"),
        util::datetime(util::ts_ms(&c["at"])),
        who(c)
    );
    for line in c["changes"].as_array().into_iter().flatten() {
        out.push_str("\n  ");
        out.push_str(line.as_str().unwrap_or_default());
    }
    out
}

/// A table of policy changes, newest first.
#[component]
pub fn ChangesTable(changes: Value) -> impl IntoView {
    let list = changes.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return view! { <div class="muted small">"no policy change in this range"</div> }
            .into_any();
    }
    view! {
        <table class="table compact" data-test="changes">
            <thead><tr><th>"When"</th><th>"Policy"</th><th>"Who"</th><th>"What changed"</th></tr></thead>
            <tbody>
                {list.into_iter().map(|c| {
                    let lines = c["changes"].as_array().cloned().unwrap_or_default();
                    view! {
                        <tr data-test="change-row">
                            <td class="small mono">{util::datetime(util::ts_ms(&c["at"]))}</td>
                            <td>{format!("{} v{}", s(&c, "workload"), f(&c, "version"))}</td>
                            <td class="small">{who(&c)}</td>
                            <td class="mono small">{lines.iter().map(|l| view! { <div>{l.as_str().unwrap_or_default().to_string()}</div> }).collect_view()}</td>
                        </tr>
                    }
                }).collect_view()}
            </tbody>
        </table>
    }
    .into_any()
}
