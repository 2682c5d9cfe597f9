//! The alerts page: what fires now (with the value that crossed and traces that show it),
//! the rules behind it, and every delivery attempt to the receivers. Reads the alerts API
//! (`/api/v1/alerts`, `/api/v1/alerts/rules`, `/api/v1/alerts/deliveries`); the state
//! filters are kept in the URL (`state=firing|pending|resolved`, `receiver=`).

use std::collections::{BTreeSet, HashMap};

use leptos::prelude::*;
use serde_json::Value;

use crate::state::{go, tick, use_url};
use crate::util::{self, enc, f, fmt_ms, fmt_num, fmt_pct, s};
use crate::{ErrorBox, Kpi, Loading, data_table, fetched_list};

const STATES: [(&str, &str); 4] = [
    ("", "All"),
    ("firing", "Firing"),
    ("pending", "Pending"),
    ("resolved", "Resolved"),
];

/// A signal's value as text: rates as percentages, latencies in ms.
fn fmt_signal(signal: &str, v: f64) -> String {
    match signal {
        "error_rate" => fmt_pct(v),
        s if s.ends_with("_ms") => fmt_ms(v),
        "rate" | "rate_drop" => util::fmt_rate(v),
        _ => fmt_num(v),
    }
}

/// "3m 20s" since `ms`.
fn ago(ms: f64) -> String {
    if ms <= 0.0 {
        return String::new();
    }
    let secs = ((util::now_ms() - ms) / 1000.0).max(0.0) as u64;
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h ago")
    } else if h > 0 {
        format!("{h}h {m}m ago")
    } else if m > 0 {
        format!("{m}m {s}s ago")
    } else {
        format!("{s}s ago")
    }
}

/// A trace id shortened to its first 6 and last 4 digits.
fn short_id(id: &str) -> String {
    match (id.get(..6), id.get(id.len().saturating_sub(4)..)) {
        (Some(a), Some(b)) if id.len() > 12 => format!("{a}…{b}"),
        _ => id.to_string(),
    }
}

fn state_class(state: &str) -> &'static str {
    match state {
        "firing" => "firing",
        "pending" => "pending",
        "resolved" => "resolved",
        _ => "",
    }
}

/// What a rule watches, in a few words.
fn rule_target(r: &Value) -> String {
    let kind = s(r, "kind");
    if kind == "sql" {
        return s(r, "sql");
    }
    let (src, dst) = (s(r, "source"), s(r, "target"));
    if !src.is_empty() || !dst.is_empty() {
        let side = |x: String| if x.is_empty() { "any".to_string() } else { x };
        return format!("{} → {}", side(src), side(dst));
    }
    let svc = s(r, "service");
    let ep = s(r, "endpoint");
    match (svc.is_empty(), ep.is_empty()) {
        (true, _) => "every service".into(),
        (false, true) => svc,
        (false, false) => format!("{svc} {ep}"),
    }
}

/// "error_rate > 5.0%" for threshold rules, the kind otherwise.
fn rule_condition(r: &Value) -> String {
    let signal = s(r, "signal");
    match r.get("threshold").and_then(Value::as_f64) {
        Some(t) => {
            let op = s(r, "op");
            let op = if op.is_empty() { ">".to_string() } else { op };
            format!("{signal} {op} {}", fmt_signal(&signal, t))
        }
        None if !signal.is_empty() => signal,
        None => "—".into(),
    }
}

fn secs(r: &Value, k: &str) -> String {
    match r.get(k).and_then(Value::as_u64) {
        Some(n) if n >= 60 && n % 60 == 0 => format!("{}m", n / 60),
        Some(n) => format!("{n}s"),
        None => "—".into(),
    }
}

#[component]
pub fn AlertsPage() -> impl IntoView {
    let url = use_url();
    let alerts = LocalResource::new(move || {
        tick();
        util::get_json("/api/v1/alerts".into())
    });
    let rules = LocalResource::new(move || {
        tick();
        util::get_json("/api/v1/alerts/rules".into())
    });
    let receiver = move || url.get("receiver").unwrap_or_default();
    let deliveries = LocalResource::new(move || {
        let r = receiver();
        tick();
        util::get_json(format!(
            "/api/v1/alerts/deliveries?limit=100&receiver={}",
            enc(&r)
        ))
    });
    // Every receiver seen in the log so far, for the receiver filter.
    let receivers = RwSignal::new(BTreeSet::<String>::new());
    Effect::new(move |_| {
        if let Some(Ok(v)) = deliveries.get() {
            let seen: Vec<String> = v
                .as_array()
                .map(|d| d.iter().map(|x| s(x, "receiver")).collect())
                .unwrap_or_default();
            if seen
                .iter()
                .any(|r| !receivers.with_untracked(|set| set.contains(r)))
            {
                receivers.update(|set| set.extend(seen));
            }
        }
    });
    let receiver_filter = move || {
        let current = receiver();
        let mut names = receivers.get();
        if !current.is_empty() {
            names.insert(current.clone());
        }
        view! {
            <select class="receiver-filter" data-test="receiver-filter" title="Receiver"
                on:change=move |e| go(&url.with(&[("receiver", Some(event_target_value(&e)))]), false)>
                <option value="" selected=current.is_empty()>"Every receiver"</option>
                {names.into_iter().map(|n| {
                    let sel = n == current;
                    view! { <option value=n.clone() selected=sel>{n.clone()}</option> }
                }).collect_view()}
            </select>
        }
    };
    let state = move || url.get("state").unwrap_or_default();
    let filters = STATES
        .iter()
        .map(|(k, label)| {
            let k = *k;
            view! {
                <button class=move || if state() == k { "seg active" } else { "seg" } data-state=k
                    on:click=move |_| go(&url.with(&[("state", Some(k.to_string()))]), false)>{*label}</button>
            }
        })
        .collect_view();

    // Rule name → comparison operator, to read "value > threshold".
    let ops = move || -> HashMap<String, String> {
        rules
            .get()
            .and_then(Result::ok)
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|r| (s(r, "name"), s(r, "op")))
            .collect()
    };

    let summary = move || {
        alerts.get().and_then(Result::ok).map(|v| {
            let list = v.as_array().cloned().unwrap_or_default();
            let count = |st: &str| list.iter().filter(|a| s(a, "state") == st).count();
            let (firing, pending, resolved) = (count("firing"), count("pending"), count("resolved"));
            let failed = deliveries
                .get()
                .and_then(Result::ok)
                .and_then(|d| d.as_array().map(|d| d.iter().filter(|x| x["ok"] == false).count()))
                .unwrap_or(0);
            let firing_class = if firing > 0 { "bad" } else { "ok" };
            let pending_class = if pending > 0 { "warn" } else { "" };
            let failed_class = if failed > 0 { "warn" } else { "" };
            view! {
                <div class="kpis alert-summary" data-test="alert-summary">
                    <Kpi label="Firing" value=firing.to_string() class=firing_class/>
                    <Kpi label="Pending" value=pending.to_string() class=pending_class/>
                    <Kpi label="Resolved" value=resolved.to_string()/>
                    <Kpi label="Failed deliveries (last 100)" value=failed.to_string() class=failed_class/>
                </div>
            }
        })
    };

    let alerts_table = move || match alerts.get() {
        None => view! { <Loading/> }.into_any(),
        Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
        Some(Ok(v)) => {
            let want = state();
            let list: Vec<Value> = v
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|a| want.is_empty() || s(a, "state") == want)
                .collect();
            if list.is_empty() {
                let what = if want.is_empty() {
                    "No alerts".to_string()
                } else {
                    format!("No {want} alerts")
                };
                return view! { <div class="empty small-empty"><h2>{what}</h2><p>"Alerts appear here when a rule's condition holds."</p></div> }.into_any();
            }
            let ops = ops();
            let head = view! {
                <th>"State"</th><th>"Rule"</th><th>"Labels"</th><th class="num">"Value"</th>
                <th>"Since"</th><th>"Exemplar traces"</th>
            }
            .into_any();
            data_table("table alerts-table", "alerts-table", head, list, |a| {
                let st = s(&a, "state");
                let rule = s(&a, "rule");
                let ev = &a["evidence"];
                let signal = s(ev, "signal");
                let value = ev.get("value").and_then(Value::as_f64);
                let threshold = ev.get("threshold").and_then(Value::as_f64);
                let op = ops
                    .get(&rule)
                    .filter(|o| !o.is_empty())
                    .cloned()
                    .unwrap_or_else(|| ">".into());
                let since_key = if st == "firing" && a["fired_at"].is_string() {
                    "fired_at"
                } else {
                    "active_at"
                };
                let since = util::ts_ms(&a[since_key]);
                let resolved = util::ts_ms(&a["resolved_at"]);
                let summary = a["annotations"]["summary"].as_str().map(str::to_string);
                let labels: Vec<(String, String)> = util::pairs(&a["labels"])
                    .into_iter()
                    .filter(|(k, _)| k != "alertname")
                    .collect();
                let traces: Vec<String> = ev["exemplar_trace_ids"]
                    .as_array()
                    .map(|t| {
                        t.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                view! {
                    <tr class=format!("alert-row {}", state_class(&st)) data-rule=rule.clone() data-state=st.clone()>
                        <td><span class=format!("state-badge {}", state_class(&st))>{st.clone()}</span></td>
                        <td>
                            <div class="rule-name">{rule.clone()}</div>
                            {summary.map(|t| view! { <div class="muted small">{t}</div> })}
                        </td>
                        <td class="labels">
                            {labels.into_iter().map(|(k, v)| view! { <span class="chip"><span class="muted">{k}"="</span>{v}</span> }).collect_view()}
                        </td>
                        <td class="num nowrap">
                            {match (value, threshold) {
                                (Some(v), Some(t)) => view! {
                                    <b class={if st == "resolved" { "" } else { "bad" }}>{fmt_signal(&signal, v)}</b>
                                    <span class="muted">{format!(" {op} {}", fmt_signal(&signal, t))}</span>
                                    <div class="muted tiny">{signal.clone()}</div>
                                }.into_any(),
                                (Some(v), None) => view! { <b>{fmt_signal(&signal, v)}</b><div class="muted tiny">{signal.clone()}</div> }.into_any(),
                                _ => view! { <span class="muted">{signal.clone()}</span> }.into_any(),
                            }}
                        </td>
                        <td class="nowrap" title=util::datetime(since)>
                            {ago(since)}
                            {(resolved > 0.0).then(|| view! { <div class="muted tiny">{format!("resolved {}", ago(resolved))}</div> })}
                        </td>
                        <td class="exemplars">
                            {if traces.is_empty() {
                                view! { <span class="muted">"—"</span> }.into_any()
                            } else {
                                traces.into_iter().map(|t| {
                                    let href = url.link(&format!("/traces/{}", enc(&t)), &[]);
                                    view! { <a class="trace-chip mono exemplar" href=href data-trace-id=t.clone() title="Open the trace">{short_id(&t)}</a> }
                                }).collect_view().into_any()
                            }}
                        </td>
                    </tr>
                }
                .into_any()
            })
        }
    };

    let rules_table = move || {
        let empty = (
            "No rules",
            "Add rules under [alerts] in the config file or POST /api/v1/alerts/rules.",
        );
        fetched_list(rules.get(), empty, |list| {
            let head = view! {
                <th>"Rule"</th><th>"Kind"</th><th>"Target"</th><th>"Condition"</th>
                <th class="num">"Window"</th><th class="num">"For"</th><th>"Severity"</th><th>"Source"</th><th>"Health"</th>
            }
            .into_any();
            data_table("table rules-table", "rules-table", head, list, |r| {
                let name = s(&r, "name");
                let kind = s(&r, "kind");
                let kind = if kind.is_empty() {
                    "threshold".to_string()
                } else {
                    kind
                };
                let sev = s(&r, "severity");
                let sev = if sev.is_empty() {
                    "warning".to_string()
                } else {
                    sev
                };
                let origin = s(&r, "origin");
                let h = &r["health"];
                let err = s(h, "last_error");
                let last = util::ts_ms(&h["last_evaluation"]);
                let target = rule_target(&r);
                view! {
                    <tr data-rule=name.clone()>
                        <td class="rule-name">{name.clone()}</td>
                        <td>{kind}</td>
                        <td class="target" title=target.clone()>{target.clone()}</td>
                        <td class="mono small nowrap">{rule_condition(&r)}</td>
                        <td class="num">{secs(&r, "window-secs")}</td>
                        <td class="num">{secs(&r, "for-secs")}</td>
                        <td><span class=format!("sev-tag {sev}")>{sev.clone()}</span></td>
                        <td><span class="chip">{origin}</span></td>
                        <td class="small">
                            {if !err.is_empty() {
                                view! { <span class="bad" title=err.clone()>"error: "{err.clone()}</span> }.into_any()
                            } else if last > 0.0 {
                                view! { <span class="muted"><span class="dot ok"></span>{format!("ok · {} · {} ms", ago(last), f(h, "last_duration_ms"))}</span> }.into_any()
                            } else {
                                view! { <span class="muted">"not evaluated yet"</span> }.into_any()
                            }}
                        </td>
                    </tr>
                }
                .into_any()
            })
        })
    };

    let deliveries_table = move || {
        let empty = (
            "No deliveries yet",
            "Every attempt to notify a webhook or Alertmanager is listed here.",
        );
        fetched_list(deliveries.get(), empty, |list| {
            let head = view! {
                <th>"Time"</th><th>"Receiver"</th><th>"Kind"</th><th>"Notification"</th><th>"Outcome"</th>
                <th class="num">"HTTP"</th><th class="num">"Attempt"</th><th class="num">"Took"</th><th>"Error"</th>
            }
            .into_any();
            data_table(
                "table deliveries-table",
                "deliveries-table",
                head,
                list,
                |d| {
                    let receiver = s(&d, "receiver");
                    let (format, name) = match receiver.strip_prefix("alertmanager:") {
                        Some(_) => ("Alertmanager API", "alertmanager".to_string()),
                        None => ("webhook", receiver.clone()),
                    };
                    let ok = d["ok"] == true;
                    let status = s(&d, "status");
                    let n = d["alerts"].as_array().map(Vec::len).unwrap_or(0);
                    let http = s(&d, "http_status");
                    let err = s(&d, "error");
                    view! {
                    <tr class="delivery-row" data-receiver=receiver.clone() data-ok=ok.to_string()>
                        <td class="mono small nowrap">{util::datetime(util::ts_ms(&d["time"]))}</td>
                        <td><div class="rule-name">{name}</div><div class="muted tiny mono">{s(&d, "url")}</div></td>
                        <td>{format}</td>
                        <td><span class=format!("state-badge {}", state_class(&status))>{status.clone()}</span>
                            <span class="muted small">{format!(" {n} alert{}", if n == 1 { "" } else { "s" })}</span></td>
                        <td>{if ok {
                            view! { <span class="outcome ok">"✓ delivered"</span> }.into_any()
                        } else {
                            view! { <span class="outcome bad">"✗ failed"</span> }.into_any()
                        }}</td>
                        <td class="num mono">{if http.is_empty() { "—".to_string() } else { http }}</td>
                        <td class="num">{f(&d, "attempt")}</td>
                        <td class="num">{format!("{} ms", f(&d, "duration_ms"))}</td>
                        <td class="error-cell small" title=err.clone()>{err.clone()}</td>
                    </tr>
                }
                .into_any()
                },
            )
        })
    };

    view! {
        <div class="page" data-test="alerts-page">
            <div class="toolbar">
                <h1>"Alerts"</h1>
                <div class="segmented" data-test="state-filter">{filters}</div>
            </div>
            {summary}
            <section class="card flush">
                <h3 class="card-title">"Alerts"</h3>
                {alerts_table}
            </section>
            <section class="card flush">
                <h3 class="card-title">"Rules"</h3>
                {rules_table}
            </section>
            <section class="card flush">
                <div class="card-head">
                    <h3 class="card-title">"Deliveries" <span class="muted tiny">"newest first, last 100"</span></h3>
                    {receiver_filter}
                </div>
                {deliveries_table}
            </section>
        </div>
    }
}
