//! The services table (sortable, with sparklines) and a service's own page.

use std::collections::HashMap;

use leptos::prelude::*;
use leptos_router::hooks::use_params_map;
use serde_json::Value;

use crate::charts::Sparkline;
use crate::mesh::ChangesTable;
use crate::state::{Range, tick, use_url};
use crate::topology::{SignalCharts, versions_table};
use crate::util::{self, enc, f, fmt_ms, fmt_num, fmt_pct, fmt_rate, health, s};
use crate::{ErrorBox, Kpi, Loading, data_table};

const BUCKETS: usize = 30;

/// Per-service buckets of (rate, error rate, p50, p95, p99) for the sparklines.
type Sparks = HashMap<String, Vec<[f64; 5]>>;

/// The sparklines from the API's per-step series of every service (`/api/v1/series`):
/// whole minutes, at most [`BUCKETS`] of them.
async fn sparklines(range: Range) -> Result<Sparks, String> {
    let (a, b) = range.bounds();
    let minutes = ((b - a) / 60e3).ceil().max(1.0);
    let step = (minutes / BUCKETS as f64).ceil().max(1.0) * 60.0;
    let v = util::get_json(format!("/api/v1/series?{}&step={step:.0}", range.api())).await?;
    let mut out: Sparks = HashMap::new();
    for series in v["series"].as_array().cloned().unwrap_or_default() {
        let buckets = out
            .entry(s(&series, "service"))
            .or_insert_with(|| vec![[0.0; 5]; BUCKETS]);
        for p in series["points"].as_array().cloned().unwrap_or_default() {
            let i = ((util::ts_ms(&p["time"]) - a) / (step * 1e3)).floor();
            if i < 0.0 || i as usize >= BUCKETS {
                continue;
            }
            buckets[i as usize] = [
                f(&p, "rate"),
                f(&p, "error_rate"),
                f(&p, "p50_ms"),
                f(&p, "p95_ms"),
                f(&p, "p99_ms"),
            ];
        }
    }
    Ok(out)
}

const COLUMNS: [(&str, &str); 6] = [
    ("name", "Service"),
    ("rate", "Rate"),
    ("error_rate", "Errors"),
    ("p50_ms", "p50"),
    ("p95_ms", "p95"),
    ("p99_ms", "p99"),
];

#[component]
pub fn ServicesPage() -> impl IntoView {
    let url = use_url();
    let list = LocalResource::new(move || {
        let q = url.range().api();
        tick();
        util::get_json(format!("/api/v1/services?{q}"))
    });
    let sparks = LocalResource::new(move || {
        let r = url.range();
        tick();
        sparklines(r)
    });
    let sort = RwSignal::new(("rate".to_string(), true));
    let filter = RwSignal::new(String::new());
    let header = COLUMNS
        .iter()
        .map(|(k, label)| {
            let k = k.to_string();
            let k2 = k.clone();
            let k3 = k.clone();
            let arrow = move || {
                let (c, desc) = sort.get();
                if c == k2 { if desc { " ▾" } else { " ▴" } } else { "" }
            };
            view! {
                <th class="sortable" class:num=k != "name" data-sort=k.clone()
                    on:click=move |_| sort.update(|(c, desc)| {
                        if *c == k3 { *desc = !*desc } else { *c = k3.clone(); *desc = k3 != "name" }
                    })>
                    {*label}{arrow}
                </th>
            }
        })
        .collect_view();
    view! {
        <div class="page">
            <div class="toolbar">
                <h1>"Services"</h1>
                <label class="field grow">
                    <span>"Filter"</span>
                    <input type="search" placeholder="service or namespace…" prop:value=move || filter.get()
                        on:input=move |e| filter.set(event_target_value(&e))/>
                </label>
            </div>
            {move || match list.get() {
                None => view! { <Loading/> }.into_any(),
                Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
                Some(Ok(v)) => {
                    let mut rows = v.as_array().cloned().unwrap_or_default();
                    let q = filter.get().to_lowercase();
                    rows.retain(|r| q.is_empty() || s(r, "name").to_lowercase().contains(&q) || s(r, "namespace").to_lowercase().contains(&q));
                    let (col, desc) = sort.get();
                    rows.sort_by(|a, b| {
                        let o = if col == "name" {
                            s(a, "name").cmp(&s(b, "name"))
                        } else {
                            f(a, &col).partial_cmp(&f(b, &col)).unwrap_or(std::cmp::Ordering::Equal)
                        };
                        if desc { o.reverse() } else { o }
                    });
                    let sp = sparks.get().and_then(Result::ok).unwrap_or_default();
                    if rows.is_empty() {
                        return view! { <div class="empty"><h2>"No services in this range"</h2><p>"Services appear once meshscope receives their SERVER spans."</p></div> }.into_any();
                    }
                    let head = view! {
                        {header.clone()}
                    }
                    .into_any();
                    data_table("table services-table", "services-table", head, rows, |r| {
                        let name = s(&r, "name");
                        let series = sp.get(&name).cloned().unwrap_or_default();
                        let col = |i: usize| series.iter().map(|b| b[i]).collect::<Vec<f64>>();
                        let er = f(&r, "error_rate");
                        let href = url.link(&format!("/services/{}", enc(&name)), &[]);
                        view! {
                            <tr data-service=name.clone()>
                                <td>
                                    <a class="svc-link" href=href><i class=format!("dot {}", health(er))></i>{name.clone()}</a>
                                    <div class="muted small">{s(&r, "namespace")}</div>
                                </td>
                                <td class="num"><div class="cell">{fmt_rate(f(&r, "rate"))}<Sparkline values=col(0)/></div></td>
                                <td class="num"><div class=format!("cell {}", health(er))>{fmt_pct(er)}<Sparkline values=col(1) color="#ef4444"/></div></td>
                                <td class="num"><div class="cell">{fmt_ms(f(&r, "p50_ms"))}<Sparkline values=col(2) color="#34d399"/></div></td>
                                <td class="num"><div class="cell">{fmt_ms(f(&r, "p95_ms"))}<Sparkline values=col(3) color="#fbbf24"/></div></td>
                                <td class="num"><div class="cell">{fmt_ms(f(&r, "p99_ms"))}<Sparkline values=col(4) color="#f472b6"/></div></td>
                            </tr>
                        }
                        .into_any()
                    })
                }
            }}
        </div>
    }
}

fn edge_table(title: &'static str, edges: Vec<Value>, peer_key: &'static str) -> impl IntoView {
    let url = use_url();
    view! {
        <div class="card">
            <h3>{title}</h3>
            {if edges.is_empty() {
                view! { <div class="muted small">"none in this range"</div> }.into_any()
            } else {
                let head = view! {
                    <th>"Peer"</th><th class="num">"Rate"</th><th class="num">"Errors"</th><th class="num">"p99"</th><th>"Seen in"</th>
                }
                .into_any();
                data_table("table compact", "", head, edges, |e| {
                    let peer = s(&e, peer_key);
                    let href = url.link(&format!("/services/{}", enc(&peer)), &[]);
                    let sources = e["sources"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default();
                    view! {
                        <tr>
                            <td><a href=href>{peer}</a></td>
                            <td class="num">{fmt_rate(f(&e, "rate"))}</td>
                            <td class=format!("num {}", health(f(&e, "error_rate")))>{fmt_pct(f(&e, "error_rate"))}</td>
                            <td class="num">{fmt_ms(f(&e, "p99_ms"))}</td>
                            <td class="muted small">{sources}</td>
                        </tr>
                    }
                    .into_any()
                })
            }}
        </div>
    }
}

#[component]
pub fn ServicePage() -> impl IntoView {
    let url = use_url();
    let params = use_params_map();
    let name = move || params.with(|p| p.get("name")).unwrap_or_default();
    let detail = LocalResource::new(move || {
        let q = url.range().api();
        let n = name();
        tick();
        util::get_json(format!("/api/v1/services/{}?{q}", enc(&n)))
    });
    // The policy changes that touched it, marked on its charts (none when the control
    // plane is not in use, or the token may not read it).
    let changes = LocalResource::new(move || {
        let q = url.range().api();
        let n = name();
        tick();
        util::get_json(format!("/api/v1/mesh/changes?service={}&{q}", enc(&n)))
    });
    let changes = move || changes.get().and_then(Result::ok).unwrap_or(Value::Null);
    view! {
        <div class="page">
            <div class="crumbs"><a href=move || url.link("/services", &[])>"Services"</a>" / "</div>
            {move || {
                let n = name();
                match detail.get() {
                    None => view! { <Loading/> }.into_any(),
                    Some(Err(e)) => view! { <h1>{n}</h1><ErrorBox msg=e/> }.into_any(),
                    Some(Ok(v)) => {
                        let er = f(&v, "error_rate");
                        let endpoints = v["endpoints"].as_array().cloned().unwrap_or_default();
                        let saturation = v["saturation"].as_array().cloned().unwrap_or_default();
                        let versions = v["versions"].as_array().cloned().unwrap_or_default();
                        let slow = url.link("/traces", &[("service", n.clone()), ("min_duration_ms", format!("{:.0}", f(&v, "p95_ms").floor())), ("sort", "slowest".into())]);
                        let failing = url.link("/traces", &[("service", n.clone()), ("status", "error".into())]);
                        let logs = url.link("/logs", &[("service", n.clone())]);
                        let topo = url.link("/", &[("service", n.clone())]);
                        view! {
                            <div class="toolbar">
                                <h1><i class=format!("dot big {}", health(er))></i>{n.clone()}</h1>
                                <div class="spacer"></div>
                                <a class="btn" href=slow>"Slowest traces"</a>
                                <a class="btn" href=failing>"Failing traces"</a>
                                <a class="btn" href=logs>"Logs"</a>
                                <a class="btn ghost" href=topo>"On the map"</a>
                            </div>
                            <div class="kpis wide">
                                <Kpi label="Requests" value=fmt_num(f(&v, "requests"))/>
                                <Kpi label="Rate" value=fmt_rate(f(&v, "rate"))/>
                                <Kpi label="Error rate" value=fmt_pct(er) class=health(er)/>
                                <Kpi label="p50" value=fmt_ms(f(&v, "p50_ms"))/>
                                <Kpi label="p95" value=fmt_ms(f(&v, "p95_ms"))/>
                                <Kpi label="p99" value=fmt_ms(f(&v, "p99_ms"))/>
                                {saturation.iter().map(|m| view! { <Kpi label="saturation" value=format!("{}: avg {} / max {}", s(m, "metric"), fmt_num(f(m, "avg")), fmt_num(f(m, "max")))/> }).collect_view()}
                            </div>
                            <SignalCharts detail=v.clone() marks=crate::mesh::marks(&changes())/>
                            {(changes().as_array().is_some_and(|c| !c.is_empty())).then(|| view! {
                                <div class="card">
                                    <h3>"Policy changes"</h3>
                                    <ChangesTable changes=changes()/>
                                </div>
                            })}
                            {(!versions.is_empty()).then(|| view! {
                                <div class="card">
                                    <h3>"Versions"</h3>
                                    {versions_table(&versions)}
                                </div>
                            })}
                            <div class="card">
                                <h3>"Endpoints"</h3>
                                <table class="table compact" data-test="endpoints">
                                    <thead><tr><th>"Endpoint"</th><th class="num">"Requests"</th><th class="num">"Rate"</th><th class="num">"Errors"</th><th class="num">"p50"</th><th class="num">"p95"</th><th class="num">"p99"</th></tr></thead>
                                    <tbody>
                                        {endpoints.into_iter().map(|e| {
                                            let href = url.link("/traces", &[("service", n.clone()), ("span_name", s(&e, "name"))]);
                                            view! {
                                                <tr>
                                                    <td><a href=href class="mono">{s(&e, "name")}</a></td>
                                                    <td class="num">{fmt_num(f(&e, "requests"))}</td>
                                                    <td class="num">{fmt_rate(f(&e, "rate"))}</td>
                                                    <td class=format!("num {}", health(f(&e, "error_rate")))>{fmt_pct(f(&e, "error_rate"))}</td>
                                                    <td class="num">{fmt_ms(f(&e, "p50_ms"))}</td>
                                                    <td class="num">{fmt_ms(f(&e, "p95_ms"))}</td>
                                                    <td class="num">{fmt_ms(f(&e, "p99_ms"))}</td>
                                                </tr>
                                            }
                                        }).collect_view()}
                                    </tbody>
                                </table>
                            </div>
                            <div class="two-col">
                                {edge_table("Upstream (callers)", v["upstream"].as_array().cloned().unwrap_or_default(), "source")}
                                {edge_table("Downstream (calls)", v["downstream"].as_array().cloned().unwrap_or_default(), "target")}
                            </div>
                        }.into_any()
                    }
                }
            }}
        </div>
    }
}
