//! Trace search and the trace view: a waterfall with the critical path highlighted, span
//! details (attributes, events, links) and the trace's logs beside it.

use leptos::prelude::*;
use leptos_router::hooks::use_params_map;
use serde_json::Value;

use crate::state::{go, tick, use_url};
use crate::util::{self, enc, f, fmt_ms, lit, pairs, s, service_color, show};
use crate::{ErrorBox, InputField, Loading, SelectField, ServiceField, search_submit};

const FIELDS: [&str; 6] = [
    "service",
    "span_name",
    "status",
    "min_duration_ms",
    "attribute",
    "limit",
];

#[component]
pub fn TracesPage() -> impl IntoView {
    let url = use_url();
    let services = LocalResource::new(move || {
        let q = url.range().api();
        util::get_json(format!("/api/v1/services?{q}"))
    });
    let form: Vec<RwSignal<String>> = FIELDS
        .iter()
        .map(|k| RwSignal::new(url.get_untracked(k).unwrap_or_default()))
        .collect();
    let [service, span_name, status, min_dur, attribute, limit] =
        [form[0], form[1], form[2], form[3], form[4], form[5]];
    // Keep the form in step with the URL (back/forward, links from other pages).
    Effect::new(move |_| {
        for (k, sig) in FIELDS
            .iter()
            .zip([service, span_name, status, min_dur, attribute, limit])
        {
            sig.set(url.get(k).unwrap_or_default());
        }
    });
    let results = LocalResource::new(move || {
        let mut q = url.range().api();
        for k in FIELDS {
            if let Some(v) = url.get(k) {
                q.push_str(&format!("&{k}={}", enc(&v)));
            }
        }
        if url.get("limit").is_none() {
            q.push_str("&limit=50");
        }
        tick();
        util::get_json(format!("/api/v1/traces?{q}"))
    });
    let submit = search_submit(
        url,
        FIELDS,
        [service, span_name, status, min_dur, attribute, limit],
    );
    let names = Signal::derive(move || match services.get() {
        Some(Ok(Value::Array(a))) => a.iter().map(|v| s(v, "name")).collect(),
        _ => Vec::new(),
    });
    view! {
        <div class="page">
            <div class="toolbar"><h1>"Traces"</h1></div>
            <form class="search-form card" on:submit=submit data-test="trace-search">
                <ServiceField value=service names=names/>
                <InputField label="Operation" name="span_name" value=span_name placeholder="span name"/>
                <SelectField label="Status" name="status" value=status options=&[("", "Any"), ("error", "Has errors"), ("ok", "No errors")]/>
                <InputField label="Min duration (ms)" name="min_duration_ms" value=min_dur kind="number" min="0" placeholder="0"/>
                <InputField label="Attribute" name="attribute" value=attribute grow=true placeholder="http.route=/checkout region=eu"/>
                <InputField label="Limit" name="limit" value=limit kind="number" min="1" max="1000" placeholder="50"/>
                <button class="btn primary" type="submit">"Search"</button>
            </form>
            {move || match results.get() {
                None => view! { <Loading/> }.into_any(),
                Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
                Some(Ok(v)) => {
                    let mut list = v.as_array().cloned().unwrap_or_default();
                    let slowest = url.get("sort").as_deref() == Some("slowest");
                    if slowest {
                        list.sort_by(|a, b| f(b, "duration_ms").partial_cmp(&f(a, "duration_ms")).unwrap_or(std::cmp::Ordering::Equal));
                    }
                    if list.is_empty() {
                        return view! { <div class="empty"><h2>"No traces match"</h2><p>"Widen the time range or loosen the filters."</p></div> }.into_any();
                    }
                    let max = list.iter().map(|t| f(t, "duration_ms")).fold(0.0, f64::max);
                    view! {
                        <div class="result-bar">
                            <span class="muted small">{format!("{} traces", list.len())}</span>
                            <div class="segmented small">
                                <button class=if slowest { "seg" } else { "seg active" } on:click=move |_| go(&url.with(&[("sort", None)]), true)>"Newest first"</button>
                                <button class=if slowest { "seg active" } else { "seg" } on:click=move |_| go(&url.with(&[("sort", Some("slowest".into()))]), true)>"Slowest first"</button>
                            </div>
                        </div>
                        <table class="table traces-table" data-test="trace-results">
                            <thead><tr><th>"Started"</th><th>"Root"</th><th>"Duration"</th><th class="num">"Spans"</th><th>"Services"</th></tr></thead>
                            <tbody>
                                {list.into_iter().map(|t| {
                                    let id = s(&t, "trace_id");
                                    let href = url.link(&format!("/traces/{id}"), &[]);
                                    let d = f(&t, "duration_ms");
                                    let errs = f(&t, "error_count");
                                    let width = if max > 0.0 { (d / max * 100.0).max(1.0) } else { 1.0 };
                                    let root = s(&t, "root_service");
                                    let services = t["services"].as_array().cloned().unwrap_or_default();
                                    view! {
                                        <tr class="trace-row" data-trace-id=id.clone()>
                                            <td class="mono small">{util::datetime(util::ts_ms(&t["start_time"]))}</td>
                                            <td>
                                                <a href=href class="trace-link"><b style=format!("color:{}", service_color(&root))>{root.clone()}</b>" "{s(&t, "root_span_name")}</a>
                                                <div class="mono muted tiny">{id.clone()}</div>
                                            </td>
                                            <td>
                                                <div class="dur-cell">
                                                    <div class="dur-bar"><i class:err={errs > 0.0} style=format!("width:{width:.1}%")></i></div>
                                                    <span>{fmt_ms(d)}</span>
                                                </div>
                                            </td>
                                            <td class="num">
                                                {f(&t, "span_count")}
                                                {(errs > 0.0).then(|| view! { <span class="badge bad">{format!("{errs} err")}</span> })}
                                            </td>
                                            <td>{services.iter().map(|sv| { let n = show(sv); view! { <span class="chip" style=format!("border-color:{}", service_color(&n))>{n.clone()}</span> } }).collect_view()}</td>
                                        </tr>
                                    }
                                }).collect_view()}
                            </tbody>
                        </table>
                    }.into_any()
                }
            }}
        </div>
    }
}

#[derive(Clone)]
struct Span {
    v: Value,
    id: String,
    parent: String,
    service: String,
    name: String,
    depth: f64,
    start: f64,
    dur: f64,
    critical: bool,
    error: bool,
}

#[component]
pub fn TracePage() -> impl IntoView {
    let url = use_url();
    let params = use_params_map();
    let id = move || params.with(|p| p.get("id")).unwrap_or_default();
    let trace = LocalResource::new(move || {
        let i = id();
        util::get_json(format!("/api/v1/traces/{}", enc(&i)))
    });
    let logs = LocalResource::new(move || {
        let i = id();
        util::sql_rows(format!(
            "SELECT time, severity_text, severity_number, service_name, body, span_id FROM logs WHERE trace_id = {} ORDER BY time LIMIT 500",
            lit(&i.to_lowercase())
        ))
    });
    let selected = RwSignal::new(Option::<String>::None);
    // `compare=<trace id>`: this trace against another, by service and operation.
    let other = LocalResource::new(move || {
        let c = url.get("compare");
        async move {
            match c {
                Some(c) => util::get_json(format!("/api/v1/traces/{}", enc(c.trim())))
                    .await
                    .map(Some),
                None => Ok(None),
            }
        }
    });
    let compare_input = RwSignal::new(url.get_untracked("compare").unwrap_or_default());
    let download = move |_| {
        if let Some(Ok(v)) = trace.get_untracked() {
            util::download(
                &format!("trace-{}.json", id()),
                "application/json",
                &serde_json::to_string_pretty(&v).unwrap_or_default(),
            );
        }
    };
    view! {
        <div class="page trace-page">
            <div class="crumbs"><a href=move || url.link("/traces", &[])>"Traces"</a>" / "<span class="mono">{id}</span></div>
            <div class="toolbar trace-tools">
                <button class="btn ghost" data-test="trace-json" on:click=download>"Download JSON"</button>
                <label class="field grow">
                    <span>"Compare with trace"</span>
                    <input type="text" data-test="compare-trace" placeholder="another trace id…" prop:value=move || compare_input.get()
                        on:input=move |e| compare_input.set(event_target_value(&e))
                        on:change=move |e| go(&url.with(&[("compare", Some(event_target_value(&e)))]), false)/>
                </label>
            </div>
            {move || match (trace.get(), other.get()) {
                (Some(Ok(a)), Some(Ok(Some(b)))) => Some(view! { <TraceCompare a=a b=b/> }.into_any()),
                (_, Some(Err(e))) => Some(view! { <ErrorBox msg=format!("the trace to compare with: {e}")/> }.into_any()),
                _ => None,
            }}
            {move || match trace.get() {
                None => view! { <Loading/> }.into_any(),
                Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
                Some(Ok(v)) => view! { <Waterfall trace=v selected=selected logs=logs/> }.into_any(),
            }}
        </div>
    }
}

#[component]
fn Waterfall(
    trace: Value,
    selected: RwSignal<Option<String>>,
    logs: LocalResource<Result<Vec<serde_json::Map<String, Value>>, String>>,
) -> impl IntoView {
    let spans: Vec<Span> = trace["spans"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|v| Span {
            id: s(&v, "span_id"),
            parent: s(&v, "parent_span_id"),
            service: s(&v, "service_name"),
            name: s(&v, "span_name"),
            depth: f(&v, "depth"),
            start: util::ts_ns(&v["start_time"]),
            dur: f(&v, "duration_ns"),
            critical: v["critical_path"] == Value::Bool(true),
            error: s(&v, "status_code") == "ERROR",
            v,
        })
        .collect();
    let t0 = spans.iter().map(|s| s.start).fold(f64::MAX, f64::min);
    let t1 = spans
        .iter()
        .map(|s| s.start + s.dur)
        .fold(f64::MIN, f64::max);
    let total = (t1 - t0).max(1.0);
    let services: std::collections::BTreeSet<String> =
        spans.iter().map(|s| s.service.clone()).collect();
    // Colours by order of appearance, so the services of one trace never share one.
    let mut order: Vec<String> = Vec::new();
    for sp in &spans {
        if !order.contains(&sp.service) {
            order.push(sp.service.clone());
        }
    }
    let errors = spans.iter().filter(|s| s.error).count();
    let root = spans
        .first()
        .map(|s| format!("{}: {}", s.service, s.name))
        .unwrap_or_default();
    if selected.get_untracked().is_none() {
        selected.set(spans.first().map(|s| s.id.clone()));
    }
    // Collapsible subtrees: a row is hidden while any of its ancestors is collapsed.
    let collapsed: RwSignal<std::collections::HashSet<String>> = RwSignal::new(Default::default());
    let parent_of: std::collections::HashMap<String, String> = spans
        .iter()
        .map(|sp| (sp.id.clone(), sp.parent.clone()))
        .collect();
    let ancestors = |id: &str| {
        let mut out = Vec::new();
        let mut at = parent_of.get(id).cloned().unwrap_or_default();
        while !at.is_empty() && !out.contains(&at) && parent_of.contains_key(&at) {
            out.push(at.clone());
            at = parent_of.get(&at).cloned().unwrap_or_default();
        }
        out
    };
    let has_children: std::collections::HashSet<String> =
        spans.iter().map(|sp| sp.parent.clone()).collect();
    // The minimap: every span as a thin bar, the whole trace at a glance.
    let n_spans = spans.len().max(1) as f64;
    let minimap = spans
        .iter()
        .enumerate()
        .map(|(i, sp)| {
            let style = format!(
                "left:{:.3}%;width:{:.3}%;top:{:.2}%;background:{}",
                (sp.start - t0) / total * 100.0,
                (sp.dur / total * 100.0).max(0.2),
                i as f64 / n_spans * 100.0,
                if sp.error {
                    "#ef4444"
                } else {
                    palette(&order, &sp.service)
                }
            );
            view! { <div class="mini-bar" style=style></div> }
        })
        .collect_view();
    let ticks = (0..=4)
        .map(|i| {
            let style = format!("left:{}%", i * 25);
            view! { <span class="tick" style=style>{fmt_ms(total * i as f64 / 4.0 / 1e6)}</span> }
        })
        .collect_view();
    let rows = spans
        .iter()
        .map(|sp| {
            let left = (sp.start - t0) / total * 100.0;
            let width = (sp.dur / total * 100.0).max(0.3);
            let color = palette(&order, &sp.service);
            let id = sp.id.clone();
            let id2 = sp.id.clone();
            let is_sel = move || selected.get().as_deref() == Some(id2.as_str());
            let indent = format!("padding-left:{}px", 8.0 + sp.depth * 16.0);
            let above = ancestors(&sp.id);
            let hidden = move || collapsed.with(|c| above.iter().any(|a| c.contains(a)));
            let toggle = has_children.contains(&sp.id).then(|| {
                let (me, me2) = (sp.id.clone(), sp.id.clone());
                let open = move || !collapsed.with(|c| c.contains(&me2));
                view! {
                    <button class="twisty" data-test="collapse" title="Collapse or expand the spans below"
                        on:click=move |e| {
                            e.stop_propagation();
                            let me = me.clone();
                            collapsed.update(|c| if !c.remove(&me) { c.insert(me); });
                        }>
                        {move || if open() { "▾" } else { "▸" }}
                    </button>
                }
            });
            let bar = format!("left:{left:.3}%;width:{width:.3}%;background:{color}");
            let inside = left + width > 80.0;
            let label = fmt_ms(sp.dur / 1e6);
            let label_style = if inside {
                format!("right:{:.3}%", 100.0 - left - width + 0.6)
            } else {
                format!("left:{:.3}%", left + width + 0.6)
            };
            view! {
                <div class="span-row" class:critical=sp.critical class:error=sp.error class:selected=is_sel
                    style:display=move || if hidden() { "none" } else { "" }
                    data-span-id=sp.id.clone() on:click=move |_| selected.set(Some(id.clone()))>
                    <div class="span-name" style=indent>
                        {toggle}
                        <i class="svc-swatch" style=format!("background:{color}")></i>
                        <span class="svc">{sp.service.clone()}</span>
                        <span class="op">{sp.name.clone()}</span>
                        {sp.error.then(|| view! { <span class="badge bad">"error"</span> })}
                    </div>
                    <div class="span-track">
                        <div class="span-bar" style=bar></div>
                        <span class="span-dur" class:inside=inside style=label_style>{label}</span>
                    </div>
                </div>
            }
        })
        .collect_view();
    let spans_for_detail = spans.clone();
    let detail = move || {
        let sel = selected.get()?;
        let sp = spans_for_detail.iter().find(|s| s.id == sel)?.clone();
        Some(view! { <SpanDetail span=sp.v t0=t0/> })
    };
    let trace_id = s(&trace, "trace_id");
    view! {
        <div class="trace-head">
            <h1 class="trace-title">{root}</h1>
            <div class="trace-meta">
                <span><b>{fmt_ms(total / 1e6)}</b>" total"</span>
                <span><b data-test="span-count">{spans.len()}</b>" spans"</span>
                <span><b>{services.len()}</b>" services"</span>
                <span class:bad={errors > 0}><b>{errors}</b>" errors"</span>
                <span class="legend-crit"><i></i>"critical path"</span>
                <span class="mono muted small">{trace_id}</span>
            </div>
        </div>
        <div class="trace-layout">
            <div class="waterfall card" data-test="waterfall">
                <div class="minimap" data-test="minimap">{minimap}</div>
                <div class="wf-head"><div class="span-name">"Service · operation"</div><div class="span-track ticks">{ticks}</div></div>
                {rows}
            </div>
            <div class="trace-side">
                {detail}
                <div class="card logs-card" data-test="trace-logs">
                    <h3>"Logs and access logs of this trace"</h3>
                    {move || match logs.get() {
                        None => view! { <Loading/> }.into_any(),
                        Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
                        Some(Ok(rows)) if rows.is_empty() => view! { <div class="muted small">"No logs carry this trace id."</div> }.into_any(),
                        Some(Ok(rows)) => rows.into_iter().map(|r| {
                            let r = Value::Object(r);
                            let sev = s(&r, "severity_text");
                            let span_id = s(&r, "span_id");
                            let cls = format!("log-line sev-{}", severity_class(f(&r, "severity_number")));
                            view! {
                                <div class=cls on:click=move |_| if !span_id.is_empty() { selected.set(Some(span_id.clone())) }>
                                    <span class="mono tiny muted">{util::clock(util::ts_ms(&r["time"]))}</span>
                                    <span class="sev">{if sev.is_empty() { "LOG".to_string() } else { sev }}</span>
                                    <span class="svc" style=format!("color:{}", service_color(&s(&r, "service_name")))>{s(&r, "service_name")}</span>
                                    <span class="body">{s(&r, "body")}</span>
                                </div>
                            }
                        }).collect_view().into_any(),
                    }}
                </div>
            </div>
        </div>
    }
}

/// Per (service, operation): how many spans and how long in all, in one trace.
fn by_operation(trace: &Value) -> std::collections::BTreeMap<(String, String), (f64, f64)> {
    let mut out: std::collections::BTreeMap<(String, String), (f64, f64)> = Default::default();
    for sp in trace["spans"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let e = out
            .entry((s(sp, "service_name"), s(sp, "span_name")))
            .or_default();
        e.0 += 1.0;
        e.1 += f(sp, "duration_ns") / 1e6;
    }
    out
}

/// Two traces side by side by service and operation: spans only in the other (added),
/// only in this one (missing), slower or faster by at least a fifth, or alike.
#[component]
fn TraceCompare(a: Value, b: Value) -> impl IntoView {
    let (ours, theirs) = (by_operation(&a), by_operation(&b));
    let mut keys: Vec<(String, String)> = ours.keys().chain(theirs.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    let rows = keys
        .into_iter()
        .map(|k| {
            let (na, da) = ours.get(&k).copied().unwrap_or_default();
            let (nb, db) = theirs.get(&k).copied().unwrap_or_default();
            let change = if na == 0.0 {
                "added"
            } else if nb == 0.0 {
                "missing"
            } else if db > da * 1.2 && db - da >= 0.1 {
                "slower"
            } else if da > db * 1.2 && da - db >= 0.1 {
                "faster"
            } else {
                "same"
            };
            view! {
                <tr class=format!("cmp-{change}") data-test="compare-row" data-change=change>
                    <td>{k.0.clone()}</td>
                    <td class="mono">{k.1.clone()}</td>
                    <td class="num">{format!("{na:.0} → {nb:.0}")}</td>
                    <td class="num">{format!("{} → {}", fmt_ms(da), fmt_ms(db))}</td>
                    <td>{change}</td>
                </tr>
            }
        })
        .collect_view();
    view! {
        <div class="card trace-compare" data-test="trace-compare">
            <h3>{format!("This trace → {}", s(&b, "trace_id"))}</h3>
            <table class="table">
                <thead><tr><th>"Service"</th><th>"Operation"</th><th>"Spans"</th><th>"Time"</th><th>"Change"</th></tr></thead>
                <tbody>{rows}</tbody>
            </table>
        </div>
    }
}

fn palette(order: &[String], service: &str) -> &'static str {
    const P: [&str; 8] = [
        "#38bdf8", "#a78bfa", "#34d399", "#fbbf24", "#f472b6", "#fb923c", "#2dd4bf", "#c084fc",
    ];
    order
        .iter()
        .position(|s| s == service)
        .map(|i| P[i % P.len()])
        .unwrap_or(P[0])
}

pub fn severity_class(n: f64) -> &'static str {
    match n as i64 {
        1..=8 => "debug",
        9..=12 => "info",
        13..=16 => "warn",
        17.. => "error",
        _ => "info",
    }
}

#[component]
fn SpanDetail(span: Value, t0: f64) -> impl IntoView {
    let attrs = pairs(&span["span_attributes"]);
    let res = pairs(&span["resource_attributes"]);
    let events = span["events"].as_array().cloned().unwrap_or_default();
    let links = span["links"].as_array().cloned().unwrap_or_default();
    let url = use_url();
    let kv = |rows: Vec<(String, String)>| {
        rows.into_iter()
            .map(|(k, v)| view! { <tr><td class="k">{k}</td><td class="v">{v}</td></tr> })
            .collect_view()
    };
    let basics = vec![
        ("service".to_string(), s(&span, "service_name")),
        ("kind".to_string(), s(&span, "span_kind")),
        (
            "status".to_string(),
            format!("{} {}", s(&span, "status_code"), s(&span, "status_message"))
                .trim()
                .to_string(),
        ),
        (
            "start".to_string(),
            format!("+{}", fmt_ms((util::ts_ns(&span["start_time"]) - t0) / 1e6)),
        ),
        (
            "duration".to_string(),
            fmt_ms(f(&span, "duration_ns") / 1e6),
        ),
        ("span id".to_string(), s(&span, "span_id")),
        ("parent".to_string(), s(&span, "parent_span_id")),
    ];
    view! {
        <div class="card span-detail" data-test="span-detail">
            <h3>{s(&span, "span_name")}{(span["critical_path"] == Value::Bool(true)).then(|| view! { <span class="badge crit">"critical path"</span> })}</h3>
            <table class="kv">{kv(basics)}</table>
            <h4>"Attributes"</h4>
            {if attrs.is_empty() { view! { <div class="muted small">"none"</div> }.into_any() } else { view! { <table class="kv">{kv(attrs)}</table> }.into_any() }}
            <h4>{format!("Events ({})", events.len())}</h4>
            {events.into_iter().map(|e| {
                let when = fmt_ms((util::ts_ns(&e["time"]) - t0) / 1e6);
                view! {
                    <div class="event">
                        <div><b>{s(&e, "name")}</b>" "<span class="muted small">{format!("+{when}")}</span></div>
                        <table class="kv">{kv(pairs(&e["attributes"]))}</table>
                    </div>
                }
            }).collect_view()}
            <h4>{format!("Links ({})", links.len())}</h4>
            {links.into_iter().map(|l| {
                let tid = s(&l, "trace_id");
                let href = url.link(&format!("/traces/{tid}"), &[]);
                view! { <div class="link-row"><a class="mono small" href=href>{tid.clone()}</a>" "<span class="mono tiny muted">{s(&l, "span_id")}</span></div> }
            }).collect_view()}
            <details>
                <summary>{format!("Resource ({})", res.len())}</summary>
                <table class="kv">{kv(res)}</table>
            </details>
        </div>
    }
}
