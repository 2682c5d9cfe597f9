//! The service graph: a layered layout (the `user` node left, services by call depth,
//! uninstrumented `virtual` peers right), nodes sized by rate and coloured by error rate,
//! edges labelled with rate, error rate, p99 and where they were seen. Clicking a node or
//! an edge opens a panel with its golden signals over time.

use std::collections::{BTreeSet, HashMap};

use leptos::prelude::*;
use serde_json::Value;
use wasm_bindgen::JsCast;

use crate::charts::{LineChart, Series};
use crate::state::{Range, go, tick, use_url};
use crate::util::{self, enc, f, fmt_ms, fmt_pct, fmt_rate, health, health_color, s};
use crate::{ErrorBox, Kpi, Loading};
use meshscope_ui_layout::{Curve, GEdge, GNode, Rect, bezier, layout_keeping, place_labels};

thread_local! {
    /// Where each node was last drawn (id → y), so a refresh keeps nodes in their order.
    static LAST_DRAWN: std::cell::RefCell<HashMap<String, f64>> = Default::default();
}

fn source_label(src: &str) -> &str {
    match src {
        "spans" => "spans",
        "metrics" => "proxy metrics",
        "access_logs" => "access logs",
        other => other,
    }
}

/// `compare=hour|day`: the graph drawn against the same window an hour or a day earlier.
#[derive(Clone, Copy, PartialEq)]
enum Compare {
    Hour,
    Day,
}

impl Compare {
    fn of(v: Option<&str>) -> Option<Compare> {
        match v {
            Some("hour") => Some(Compare::Hour),
            Some("day") => Some(Compare::Day),
            _ => None,
        }
    }

    fn shift_ms(self) -> f64 {
        match self {
            Compare::Hour => 3600e3,
            Compare::Day => 86400e3,
        }
    }
}

/// The nodes hidden from the drawing (`hide=a,b`; `ns:<namespace>` hides a namespace).
fn hidden_of(url: &crate::state::Url) -> Vec<String> {
    url.get("hide")
        .map(|h| {
            h.split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `hide` with `item` added.
fn hide_more(url: &crate::state::Url, item: &str) -> String {
    let mut h = hidden_of(url);
    if !h.iter().any(|x| x == item) {
        h.push(item.to_string());
    }
    url.with(&[("hide", Some(h.join(","))), ("sel", None)])
}

/// The pan and zoom of the drawing: `translate(x, y) scale(k)` in drawing units.
#[derive(Clone, Copy, PartialEq, Debug)]
struct View {
    x: f64,
    y: f64,
    k: f64,
}

impl View {
    const FIT: View = View {
        x: 0.0,
        y: 0.0,
        k: 1.0,
    };

    /// Zoomed by `factor` around the drawing point `(px, py)`, which stays put.
    fn zoom(self, factor: f64, px: f64, py: f64) -> View {
        let k = (self.k * factor).clamp(0.2, 8.0);
        let f = k / self.k;
        View {
            x: px - (px - self.x) * f,
            y: py - (py - self.y) * f,
            k,
        }
    }

    fn transform(self) -> String {
        format!(
            "translate({:.1},{:.1}) scale({:.3})",
            self.x, self.y, self.k
        )
    }
}

#[derive(Clone, PartialEq)]
enum Selection {
    Node(String),
    Edge(String, String),
}

fn parse_sel(v: Option<String>) -> Option<Selection> {
    let v = v?;
    if let Some(n) = v.strip_prefix("node:") {
        return Some(Selection::Node(n.to_string()));
    }
    let e = v.strip_prefix("edge:")?;
    let (a, b) = e.split_once('>')?;
    Some(Selection::Edge(a.to_string(), b.to_string()))
}

#[component]
pub fn TopologyPage() -> impl IntoView {
    let url = use_url();
    let graph = LocalResource::new(move || {
        let range_q = url.range().api();
        let mut q = range_q.clone();
        if let Some(ns) = url.get("namespace") {
            q.push_str(&format!("&namespace={}", enc(&ns)));
        }
        if let Some(svc) = url.get("service") {
            q.push_str(&format!(
                "&service={}&depth={}",
                enc(&svc),
                url.get("depth").unwrap_or_else(|| "1".into())
            ));
        }
        tick();
        // Replay: one minute of the range (`at=`), from the rollups.
        if let Some(at) = url
            .get("at")
            .map(|a| js_sys::Date::parse(&a))
            .filter(|a| !a.is_nan())
        {
            let minute = format!(
                "start={}&end={}&source=rollups",
                enc(&util::iso(at)),
                enc(&util::iso(at + 60e3))
            );
            q = q.replacen(&range_q, &minute, 1);
        }
        let compare = Compare::of(url.get("compare").as_deref());
        async move {
            match compare {
                None => util::get_json(format!("/api/v1/graph?{q}")).await,
                Some(c) => {
                    let (a, b) = url.range().bounds();
                    let shift = c.shift_ms();
                    let base = format!(
                        "&base_start={}&base_end={}",
                        enc(&util::iso(a - shift)),
                        enc(&util::iso(b - shift))
                    );
                    util::get_json(format!("/api/v1/graph/diff?{q}{base}")).await
                }
            }
        }
    });
    let services = LocalResource::new(move || {
        let q = url.range().api();
        tick();
        util::get_json(format!("/api/v1/services?{q}"))
    });
    let namespaces = move || {
        let mut set = BTreeSet::new();
        if let Some(Ok(Value::Array(a))) = services.get() {
            for v in a {
                let ns = s(&v, "namespace");
                if !ns.is_empty() {
                    set.insert(ns);
                }
            }
        }
        set.into_iter().collect::<Vec<_>>()
    };
    let service_names = move || match services.get() {
        Some(Ok(Value::Array(a))) => a.iter().map(|v| s(v, "name")).collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    let search = RwSignal::new(url.get_untracked("q").unwrap_or_default());
    let selection = Memo::new(move |_| parse_sel(url.get("sel")));
    // Pan and zoom outlive refreshes (the layout is the same for the same graph).
    let pan = RwSignal::new(View::FIT);
    // The panel opens once the graph is there (a shared link may name a selection).
    let loaded = Memo::new(move |_| graph.get().is_some());

    view! {
        <div class="page topology-page">
            <div class="toolbar">
                <h1>"Topology"</h1>
                <label class="field">
                    <span>"Namespace"</span>
                    <select data-test="namespace" prop:value=move || url.get("namespace").unwrap_or_default()
                        on:change=move |e| go(&url.with(&[("namespace", Some(event_target_value(&e))), ("sel", None)]), false)>
                        <option value="">"All namespaces"</option>
                        {move || namespaces().into_iter().map(|n| { let m = n.clone(); view! { <option value=n.clone() selected=move || url.get("namespace").as_deref() == Some(m.as_str())>{n.clone()}</option> } }).collect_view()}
                    </select>
                </label>
                <label class="field">
                    <span>"Around service"</span>
                    <select data-test="focus" prop:value=move || url.get("service").unwrap_or_default()
                        on:change=move |e| go(&url.with(&[("service", Some(event_target_value(&e))), ("sel", None)]), false)>
                        <option value="">"Whole mesh"</option>
                        {move || service_names().into_iter().map(|n| { let m = n.clone(); view! { <option value=n.clone() selected=move || url.get("service").as_deref() == Some(m.as_str())>{n.clone()}</option> } }).collect_view()}
                    </select>
                </label>
                <Show when=move || url.get("service").is_some()>
                    <label class="field">
                        <span>"Hops"</span>
                        <select prop:value=move || url.get("depth").unwrap_or_else(|| "1".into())
                            on:change=move |e| go(&url.with(&[("depth", Some(event_target_value(&e)))]), true)>
                            <option value="1">"1"</option><option value="2">"2"</option><option value="3">"3"</option>
                        </select>
                    </label>
                </Show>
                <label class="field grow">
                    <span>"Find a node"</span>
                    <input type="search" placeholder="name…" data-test="node-search" prop:value=move || search.get()
                        on:input=move |e| {
                            let v = event_target_value(&e);
                            search.set(v.clone());
                            go(&url.with(&[("q", Some(v))]), true);
                        }/>
                </label>
                <label class="field">
                    <span>"Edge labels"</span>
                    <select data-test="edge-labels" prop:value=move || url.get("label").unwrap_or_else(|| "all".into())
                        on:change=move |e| go(&url.with(&[("label", Some(event_target_value(&e)).filter(|v| v != "all"))]), true)>
                        {[("all", "Rate · errors · p99"), ("rate", "Rate"), ("errors", "Errors"), ("p99", "p99"), ("mtls", "mTLS"), ("none", "None (hover)")].into_iter().map(|(v, l)| view! { <option value=v selected=move || url.get("label").unwrap_or_else(|| "all".into()) == v>{l}</option> }).collect_view()}
                    </select>
                </label>
                <label class="field">
                    <span>"Compare"</span>
                    <select data-test="compare" prop:value=move || url.get("compare").unwrap_or_default()
                        on:change=move |e| go(&url.with(&[("compare", Some(event_target_value(&e))), ("sel", None)]), false)>
                        <option value="">"No comparison"</option>
                        <option value="hour" selected=move || url.get("compare").as_deref() == Some("hour")>"With the hour before"</option>
                        <option value="day" selected=move || url.get("compare").as_deref() == Some("day")>"With the day before"</option>
                    </select>
                </label>
                <Replay/>
                <label class="check">
                    <input type="checkbox" data-test="idle-edges" prop:checked=move || url.get("idle").as_deref() != Some("hide")
                        on:change=move |e| go(&url.with(&[("idle", (!event_target_checked(&e)).then(|| "hide".to_string()))]), true)/>
                    " idle edges"
                </label>
                {move || {
                    let hidden = hidden_of(&url);
                    (!hidden.is_empty()).then(|| view! {
                        <button class="btn ghost" data-test="show-hidden" title=hidden.join(", ")
                            on:click=move |_| go(&url.with(&[("hide", None)]), false)>
                            {format!("{} hidden · show all", hidden.len())}
                        </button>
                    })
                }}
                <Legend/>
            </div>
            <div class="topology-body">
                <div class="graph-wrap">
                    {move || graph.get().and_then(Result::ok).map(|g| {
                        let nodes = g["nodes"].as_array().cloned().unwrap_or_default();
                        let edges = g["edges"].as_array().map(Vec::len).unwrap_or(0);
                        let count = |k: &str| nodes.iter().filter(|n| s(n, "kind") == k).count();
                        // What the users see: the edges out of the `user` node.
                        let entry: Vec<Value> = g["edges"].as_array().cloned().unwrap_or_default().into_iter().filter(|e| s(e, "source") == "user").collect();
                        let (req, err) = entry.iter().fold((0.0, 0.0), |(r, e), x| (r + f(x, "requests"), e + f(x, "errors")));
                        let rate: f64 = entry.iter().map(|e| f(e, "rate")).sum();
                        let er = if req > 0.0 { err / req } else { 0.0 };
                        let diff = g.get("edge_changes").cloned().map(|c| {
                            let n = |k: &str| c[k].as_u64().unwrap_or(0);
                            format!("against {}: {} added, {} removed, {} changed", if url.get("compare").as_deref() == Some("day") { "the day before" } else { "the hour before" }, n("added"), n("removed"), n("changed"))
                        });
                        view! {
                            <div class="graph-summary">
                                {diff.map(|d| view! { <span class="diff-summary" data-test="diff-summary">{d}</span> })}
                                <span><b>{count("service")}</b>" services"</span>
                                <span><b>{count("virtual")}</b>" uninstrumented"</span>
                                <span><b>{edges}</b>" edges"</span>
                                <span>"entry rate "<b>{fmt_rate(rate)}</b></span>
                                <span>"entry errors "<b class=health(er)>{fmt_pct(er)}</b></span>
                            </div>
                        }
                    })}
                    {move || {
                        // Drawing choices redraw without refetching.
                        url.get("label");
                        url.get("hide");
                        url.get("idle");
                        match graph.get() {
                            None => view! { <Loading/> }.into_any(),
                            Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
                            Some(Ok(g)) => view! { <GraphView graph=g search=search selection=selection view=pan/> }.into_any(),
                        }
                    }}
                </div>
                // The panel lives as long as the selection; refreshes update it in place.
                {move || selection.get().filter(|_| loaded.get()).map(|sel| view! { <SidePanel sel=sel graph=graph/> })}
            </div>
        </div>
    }
}

/// The minutes of the range, as epoch milliseconds of each minute's start.
fn minutes_of(range: &crate::state::Range) -> Vec<f64> {
    let (a, b) = range.bounds();
    let first = (a / 60e3).floor() * 60e3;
    let n = ((b - first) / 60e3).ceil().clamp(1.0, 1440.0) as usize;
    (0..n).map(|i| first + i as f64 * 60e3).collect()
}

/// Replays the topology minute by minute over the range (`at=` the minute shown): a slider,
/// and play / pause stepping a minute every second and a half.
#[component]
fn Replay() -> impl IntoView {
    let url = use_url();
    let minutes = Memo::new(move |_| minutes_of(&url.range()));
    let index = move || {
        let at = url.get("at").map(|a| js_sys::Date::parse(&a))?;
        minutes.get().iter().position(|m| (*m - at).abs() < 1.0)
    };
    let show = move |i: usize| {
        if let Some(m) = minutes.get_untracked().get(i) {
            go(
                &url.with(&[("at", Some(util::iso(*m))), ("compare", None)]),
                true,
            );
        }
    };
    let playing: StoredValue<Option<IntervalHandle>, LocalStorage> = StoredValue::new_local(None);
    let is_playing = RwSignal::new(false);
    let stop = move || {
        if let Some(h) = playing.get_value() {
            h.clear();
        }
        playing.set_value(None);
        is_playing.set(false);
    };
    let play = move |_| {
        if is_playing.get_untracked() {
            stop();
            return;
        }
        if index().is_none() {
            show(0);
        }
        let h = set_interval_with_handle(
            move || {
                let n = minutes.get_untracked().len();
                match index() {
                    Some(i) if i + 1 < n => show(i + 1),
                    _ => stop(),
                }
            },
            std::time::Duration::from_millis(1500),
        )
        .ok();
        playing.set_value(h);
        is_playing.set(true);
    };
    on_cleanup(move || {
        if let Some(h) = playing.try_get_value().flatten() {
            h.clear();
        }
    });
    view! {
        <div class="field replay" data-test="replay">
            <span>{move || match index() {
                Some(i) => format!("Replay · {}", util::iso(minutes.get()[i]).get(11..16).unwrap_or("")),
                None => "Replay".to_string(),
            }}</span>
            <div class="replay-row">
                <button class="btn icon" data-test="replay-play" title="Play the range minute by minute" on:click=play>
                    {move || if is_playing.get() { "❚❚" } else { "▶" }}
                </button>
                <input type="range" min="0" data-test="replay-slider" prop:max=move || minutes.get().len().saturating_sub(1).to_string()
                    prop:value=move || index().unwrap_or(0).to_string()
                    on:input=move |e| { if let Ok(i) = event_target_value(&e).parse::<usize>() { show(i) } }/>
                <Show when=move || url.get("at").is_some()>
                    <button class="btn ghost small" data-test="replay-off" on:click=move |_| { stop(); go(&url.with(&[("at", None)]), true) }>"Whole range"</button>
                </Show>
            </div>
        </div>
    }
}

#[component]
fn Legend() -> impl IntoView {
    view! {
        <div class="legend-box">
            <span class="lg"><i class="dot ok"></i>"< 1% errors"</span>
            <span class="lg"><i class="dot warn"></i>"< 5%"</span>
            <span class="lg"><i class="dot bad"></i>"≥ 5%"</span>
            <span class="lg"><i class="shape user"></i>"users"</span>
            <span class="lg"><i class="shape virtual"></i>"uninstrumented"</span>
            <span class="lg"><i class="line dashed"></i>"seen only by the mesh"</span>
            <span class="lg"><i class="lock-dot full"></i>"mTLS"</span>
            <span class="lg"><i class="lock-dot partial"></i>"partly"</span>
            <span class="lg"><i class="lock-dot none"></i>"plaintext"</span>
        </div>
    }
}

#[component]
fn GraphView(
    graph: Value,
    search: RwSignal<String>,
    selection: Memo<Option<Selection>>,
    view: RwSignal<View>,
) -> impl IntoView {
    let url = use_url();
    let hidden = hidden_of(&url);
    let hide_idle = url.get_untracked("idle").as_deref() == Some("hide");
    let label_mode = url.get_untracked("label").unwrap_or_else(|| "all".into());
    let is_hidden = |id: &str, ns: &str| {
        hidden
            .iter()
            .any(|h| h == id || (!ns.is_empty() && h.strip_prefix("ns:") == Some(ns)))
    };
    let mut nodes: Vec<GNode> = graph["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|v| GNode {
            id: s(&v, "id"),
            kind: s(&v, "kind"),
            namespace: s(&v, "namespace"),
            data: v,
            layer: 0,
            x: 0.0,
            y: 0.0,
            r: 20.0,
        })
        .filter(|n| !is_hidden(&n.id, &n.namespace))
        .collect();
    let shown: std::collections::HashSet<String> = nodes.iter().map(|n| n.id.clone()).collect();
    let edges: Vec<GEdge> = graph["edges"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|v| GEdge {
            source: s(&v, "source"),
            target: s(&v, "target"),
            data: v,
        })
        .filter(|e| shown.contains(&e.source) && shown.contains(&e.target))
        .filter(|e| !hide_idle || f(&e.data, "requests") > 0.0 || s(&e.data, "change") == "removed")
        .collect();
    if nodes.is_empty() {
        return view! {
            <div class="empty">
                <h2>"No traffic in this range"</h2>
                <p>"Send OTLP spans to meshscope (gRPC :4317, HTTP :4318) or widen the time range."</p>
            </div>
        }
        .into_any();
    }
    let (w, h, boxes) = LAST_DRAWN.with_borrow_mut(|last| {
        let drawn = layout_keeping(&mut nodes, &edges, last);
        *last = nodes.iter().map(|n| (n.id.clone(), n.y)).collect();
        drawn
    });
    let shown_nodes: Vec<Value> = nodes.iter().map(|n| n.data.clone()).collect();
    let shown_edges: Vec<Value> = edges.iter().map(|e| e.data.clone()).collect();
    let at: HashMap<String, (f64, f64, f64)> = nodes
        .iter()
        .map(|n| (n.id.clone(), (n.x, n.y, n.r)))
        .collect();
    let max_edge_rate = edges.iter().map(|e| f(&e.data, "rate")).fold(0.0, f64::max);

    // Geometry and text of every edge first, so that labels can be placed together.
    let curve_of = |e: &GEdge| -> Option<(String, Curve)> {
        let (x1, y1, r1) = *at.get(&e.source)?;
        let (x2, y2, r2) = *at.get(&e.target)?;
        Some(if x2 > x1 + 1.0 {
            let (sx, tx) = (x1 + r1, x2 - r2 - 6.0);
            let mx = (sx + tx) / 2.0;
            (
                format!("M{sx:.1},{y1:.1} C{mx:.1},{y1:.1} {mx:.1},{y2:.1} {tx:.1},{y2:.1}"),
                [(sx, y1), (mx, y1), (mx, y2), (tx, y2)],
            )
        } else {
            // Same layer or backwards: an arc below.
            let (sx, sy) = (x1, y1 + r1);
            let (tx, ty) = (x2, y2 + r2 + 6.0);
            let dip = sy.max(ty) + 70.0;
            (
                format!("M{sx:.1},{sy:.1} C{sx:.1},{dip:.1} {tx:.1},{dip:.1} {tx:.1},{ty:.1}"),
                [(sx, sy), (sx, dip), (tx, dip), (tx, ty)],
            )
        })
    };
    let texts: Vec<EdgeText> = edges
        .iter()
        .map(|e| edge_text(&e.data, &label_mode))
        .collect();
    let curves: Vec<Option<(String, Curve)>> = edges.iter().map(curve_of).collect();
    // Obstacles: each node's shape, and the name and numbers under it; the busiest edges
    // choose their label's place first.
    let obstacles: Vec<Rect> = nodes
        .iter()
        .flat_map(|n| {
            // The name (13 px, bold) or the numbers under it (about 20 characters of 11 px).
            let text = (n.id.chars().count() as f64 * 3.9).max(60.0) + 2.0;
            // A service with versions: its box, which holds them.
            let shape = app_box(&n.data, n.x, n.y, n.r).unwrap_or((
                n.x - n.r - 6.0,
                n.y - n.r - 6.0,
                n.x + n.r + 6.0,
                n.y + n.r + 6.0,
            ));
            [
                shape,
                (n.x - text, n.y + n.r + 6.0, n.x + text, n.y + n.r + 48.0),
            ]
        })
        .collect();
    let mut order: Vec<usize> = (0..edges.len())
        .filter(|i| curves[*i].is_some() && texts[*i].shown)
        .collect();
    order.sort_by(|a, b| {
        f(&edges[*b].data, "rate")
            .partial_cmp(&f(&edges[*a].data, "rate"))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let wanted: Vec<(Curve, f64)> = order
        .iter()
        .filter_map(|i| Some((curves[*i].as_ref()?.1, texts[*i].width)))
        .collect();
    let mut spot: Vec<Option<(f64, f64)>> = vec![None; edges.len()];
    for (i, p) in order.iter().zip(place_labels(&wanted, &obstacles)) {
        spot[*i] = p;
    }

    let edge_views = edges
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let (d, curve) = curves[i].clone()?;
            let EdgeText { line1, line2, hover, width: lw, .. } = texts[i].clone();
            let label_at = spot[i];
            let er = f(&e.data, "error_rate");
            let color = health_color(er);
            let width = 1.5 + if max_edge_rate > 0.0 { 4.0 * (f(&e.data, "rate") / max_edge_rate).sqrt() } else { 0.0 };
            let change = s(&e.data, "change");
            let mesh_only = change.is_empty()
                && !e.data["sources"].as_array().is_some_and(|a| a.iter().any(|s| s.as_str() == Some("spans")));
            let lock = util::mtls_level(&e.data);
            let hover = format!("{} → {}\n{hover}", e.source, e.target);
            let (src, dst) = (e.source.clone(), e.target.clone());
            let (src2, dst2) = (e.source.clone(), e.target.clone());
            let selected = move || selection.get() == Some(Selection::Edge(src2.clone(), dst2.clone()));
            let (qa, qb) = (e.source.clone(), e.target.clone());
            let dim = move || {
                let q = search.get().to_lowercase();
                !q.is_empty() && !qa.to_lowercase().contains(&q) && !qb.to_lowercase().contains(&q)
            };
            let click = move |_| go(&url.with(&[("sel", Some(format!("edge:{src}>{dst}")))]), false);
            Some(view! {
                <g class=format!("edge change-{}", if change.is_empty() { "none" } else { change.as_str() }) class:selected=selected class:dim=dim class:mesh-only=mesh_only
                    data-source=e.source.clone() data-target=e.target.clone() data-change=change.clone() data-hover=hover on:click=click>
                    <path d=d.clone() class="edge-hit"></path>
                    <path d=d stroke=color stroke-width=width class="edge-line" marker-end=format!("url(#arrow-{})", health(er))></path>
                    {label_at.map(|(lx, ly)| view! {
                    <g class="edge-label" transform=format!("translate({lx:.1},{ly:.1})")>
                        <rect x=-lw / 2.0 y="-15" width=lw height="30" rx="6"></rect>
                        <text y="-2" text-anchor="middle" class="el1">{line1}</text>
                        <text y="10" text-anchor="middle" class="el2">{line2}</text>
                        // At the label's left.
                        {lock.map(|level| padlock(level, -lw / 2.0 - 12.0, -6.0))}
                    </g>
                    })}
                    // No room for the label: the padlock alone, on the curve's middle.
                    {lock.filter(|_| label_at.is_none()).map(|level| {
                        let (x, y) = bezier(&curve, 0.5);
                        padlock(level, x, y - 4.0)
                    })}
                </g>
            })
        })
        .collect_view();

    let node_views = nodes
        .iter()
        .map(|n| {
            let er = f(&n.data, "error_rate");
            let color = health_color(er);
            let (x, y, r) = (n.x, n.y, n.r);
            let shape = match n.kind.as_str() {
                "user" => view! {
                    <g>
                        <rect x=x - r y=y - r width=r * 2.0 height=r * 2.0 rx="10" class="user-shape"></rect>
                        <circle cx=x cy=y - r * 0.28 r=r * 0.26 class="user-icon"></circle>
                        <path d=format!("M{:.1},{:.1} a{:.1},{:.1} 0 0 1 {:.1},0", x - r * 0.5, y + r * 0.5, r * 0.5, r * 0.45, r) class="user-icon"></path>
                    </g>
                }
                .into_any(),
                "virtual" => view! {
                    <g>
                        <polygon points=format!("{x:.1},{:.1} {:.1},{y:.1} {x:.1},{:.1} {:.1},{y:.1}", y - r, x + r, y + r, x - r) class="virtual-shape" stroke=color></polygon>
                    </g>
                }
                .into_any(),
                _ => view! {
                    <g>
                        <circle cx=x cy=y r=r + 5.0 fill=color class="halo"></circle>
                        <circle cx=x cy=y r=r class="service-shape" stroke=color></circle>
                        <text x=x y=y + 4.0 text-anchor="middle" class="node-rate">{fmt_pct(er)}</text>
                    </g>
                }
                .into_any(),
            };
            let id = n.id.clone();
            let id2 = n.id.clone();
            let id3 = n.id.clone();
            let selected = move || selection.get() == Some(Selection::Node(id2.clone()));
            let matched = move || {
                let q = search.get().to_lowercase();
                !q.is_empty() && id3.to_lowercase().contains(&q)
            };
            let id4 = n.id.clone();
            let dim = move || {
                let q = search.get().to_lowercase();
                !q.is_empty() && !id4.to_lowercase().contains(&q)
            };
            let click = move |_| go(&url.with(&[("sel", Some(format!("node:{id}")))]), false);
            let node_change = s(&n.data, "change");
            let split = version_split(n.data["versions"].as_array().map(Vec::as_slice).unwrap_or_default());
            let sub = match n.kind.as_str() {
                _ if node_change == "removed" => format!("gone · was {}", fmt_rate(f(&n.data, "base_rate"))),
                "user" => "users".to_string(),
                _ if f(&n.data, "requests") == 0.0 => "seen by the mesh only".to_string(),
                _ if f(&n.data, "p99_ms") == 0.0 => fmt_rate(f(&n.data, "rate")),
                _ => format!("{} · p99 {}", fmt_rate(f(&n.data, "rate")), fmt_ms(f(&n.data, "p99_ms"))),
            };
            view! {
                <g class=format!("node kind-{} change-{}", n.kind, if node_change.is_empty() { "none" } else { node_change.as_str() }) class:selected=selected class:match=matched class:dim=dim
                    data-id=n.id.clone() data-kind=n.kind.clone() data-namespace=n.namespace.clone() data-change=node_change.clone() on:click=click>
                    {app_box(&n.data, x, y, r).map(|(x0, y0, x1, y1)| view! {
                        <rect x=x0 y=y0 width=x1 - x0 height=y1 - y0 rx="12" class="app-box" data-test="app-box"></rect>
                    })}
                    {shape}
                    <text x=x y=y + r + 18.0 text-anchor="middle" class="node-label">{n.id.clone()}</text>
                    <text x=x y=y + r + 32.0 text-anchor="middle" class="node-sub">{sub}</text>
                    {split.map(|t| view! { <text x=x y=y + r + 45.0 text-anchor="middle" class="node-versions" data-test="version-split">{t}</text> })}
                    {version_dots(&n.data, x, y, r)}
                </g>
            }
        })
        .collect_view();

    let markers = ["ok", "warn", "bad"]
        .into_iter()
        .map(|h| {
            let color = match h { "ok" => "#22c55e", "warn" => "#f59e0b", _ => "#ef4444" };
            view! {
                <marker id=format!("arrow-{h}") viewBox="0 0 10 10" refX="8" refY="5" markerWidth="11" markerHeight="11" markerUnits="userSpaceOnUse" orient="auto-start-reverse">
                    <path d="M0,0 L10,5 L0,10 z" fill=color></path>
                </marker>
            }
        })
        .collect_view();
    let (vw, vh) = (w, h + 40.0);
    // Client pixels → drawing units (the viewBox is fitted, centred, into the element).
    let to_drawing = move |e: &web_sys::MouseEvent| -> Option<(f64, f64, f64)> {
        let el: web_sys::Element = e.current_target()?.dyn_into().ok()?;
        let r = el.get_bounding_client_rect();
        let scale = (vw / r.width()).max(vh / r.height());
        let ox = (r.width() * scale - vw) / 2.0;
        let oy = (r.height() * scale - vh) / 2.0;
        Some((
            (f64::from(e.client_x()) - r.left()) * scale - ox,
            (f64::from(e.client_y()) - r.top()) * scale - oy,
            scale,
        ))
    };
    let wheel = move |e: web_sys::WheelEvent| {
        e.prevent_default();
        if let Some((px, py, _)) = to_drawing(&e) {
            let factor = if e.delta_y() < 0.0 { 1.15 } else { 1.0 / 1.15 };
            view.update(|v| *v = v.zoom(factor, px, py));
        }
    };
    let drag: StoredValue<Option<(f64, f64)>> = StoredValue::new(None);
    let down = move |e: web_sys::PointerEvent| {
        if e.button() == 0 {
            drag.set_value(to_drawing(&e).map(|(x, y, _)| (x, y)));
        }
    };
    let moved = move |e: web_sys::PointerEvent| {
        if let (Some((x0, y0)), Some((x, y, _))) = (drag.get_value(), to_drawing(&e))
            && (x - x0).abs() + (y - y0).abs() > 2.0
        {
            view.update(|v| {
                v.x += x - x0;
                v.y += y - y0;
            });
            drag.set_value(Some((x, y)));
        }
    };
    let up = move |_| drag.set_value(None);
    let centre = (vw / 2.0, vh / 2.0);
    // The hover card: what an edge or a version dot says (`data-hover`), beside the
    // pointer, styled, and gone when the pointer leaves it.
    let card = RwSignal::new(None::<(String, f64, f64)>);
    let over = move |ev: web_sys::PointerEvent| {
        let hit = ev
            .target()
            .and_then(|t| t.dyn_into::<web_sys::Element>().ok())
            .and_then(|t| t.closest("[data-hover]").ok().flatten());
        card.set(hit.map(|el| {
            (
                el.get_attribute("data-hover").unwrap_or_default(),
                f64::from(ev.client_x()),
                f64::from(ev.client_y()),
            )
        }));
    };
    let hover_card = move || {
        card.get().map(|(text, x, y)| {
            let mut lines = text.lines();
            let head = lines.next().unwrap_or_default().to_string();
            let rest: Vec<String> = lines.map(str::to_string).collect();
            view! {
                <div class="hover-card" data-test="hover-card" style=format!("left:{:.0}px;top:{:.0}px", x + 14.0, y + 14.0)>
                    <div class="hover-head">{head}</div>
                    {rest.into_iter().map(|l| view! { <div>{l}</div> }).collect_view()}
                </div>
            }
        })
    };
    view! {
        <div class="zoom-controls">
            <button class="btn icon" data-test="zoom-in" title="Zoom in" on:click=move |_| view.update(|v| *v = v.zoom(1.3, centre.0, centre.1))>"+"</button>
            <button class="btn icon" data-test="zoom-out" title="Zoom out" on:click=move |_| view.update(|v| *v = v.zoom(1.0 / 1.3, centre.0, centre.1))>"−"</button>
            <button class="btn icon" data-test="zoom-fit" title="Fit to screen" on:click=move |_| view.set(View::FIT)>"⤢"</button>
        </div>
        <div class="export-controls">
            <button class="btn ghost small" data-test="export-svg" title="Save the drawing as SVG" on:click=move |_| crate::export::save_svg()>"SVG"</button>
            <button class="btn ghost small" data-test="export-png" title="Save the drawing as PNG" on:click=move |_| crate::export::save_png()>"PNG"</button>
            <button class="btn ghost small" data-test="export-json" title="Save the nodes and edges shown as JSON" on:click=move |_| crate::export::save_json(&shown_nodes, &shown_edges)>"JSON"</button>
        </div>
        <svg class="graph" data-test="topology" viewBox=format!("0 0 {vw:.0} {vh:.0}") preserveAspectRatio="xMidYMid meet"
            on:wheel=wheel on:pointerdown=down on:pointermove=moved on:pointerup=up
            on:pointerleave=move |e| { up(e); card.set(None) } on:pointerover=over>
            <defs>{markers}</defs>
            <g class="viewport" data-test="viewport" transform=move || view.get().transform()>
                <g class="namespaces">
                    {boxes.into_iter().map(|b| { let ns = b.name.clone(); view! {
                        <g class="ns-box" data-namespace=ns>
                            <rect x=b.x y=b.y width=b.w height=b.h rx="14"></rect>
                            <text x=b.x + 12.0 y=b.y + 18.0 class="ns-label">{b.name}</text>
                        </g>
                    }}).collect_view()}
                </g>
                <g class="edges">{edge_views}</g>
                <g class="nodes">{node_views}</g>
            </g>
        </svg>
        {hover_card}
    }
    .into_any()
}

/// A padlock at `(x, y)`: closed and green (all mTLS), amber (partly), open and red
/// (plaintext).
fn padlock(level: &'static str, x: f64, y: f64) -> impl IntoView + use<> {
    view! {
        <g class=format!("lock lock-{level}") data-mtls=level transform=format!("translate({x:.1},{y:.1})")>
            <path d=if level == "none" { "M-3,-1 v-4 a3,3 0 0 1 6,0" } else { "M-3,-1 v-3 a3,3 0 0 1 6,0 v3" } class="lock-shackle"></path>
            <rect x="-5" y="-1" width="10" height="8" rx="1.5" class="lock-body"></rect>
        </g>
    }
}

/// An edge's label lines as `label=` chooses, its hover card, and the label's width.
#[derive(Clone)]
struct EdgeText {
    line1: String,
    line2: String,
    hover: String,
    width: f64,
    /// False for `label=none` (or nothing to say): the hover card only.
    shown: bool,
}

fn edge_text(data: &Value, mode: &str) -> EdgeText {
    let sources: Vec<String> = data["sources"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|s| source_label(s).to_string())
                .collect()
        })
        .unwrap_or_default();
    let change = s(data, "change");
    let er = f(data, "error_rate");
    let full = if change == "removed" {
        format!(
            "was {} · {} · p99 {}",
            fmt_rate(f(data, "base_rate")),
            fmt_pct(f(data, "base_error_rate")),
            fmt_ms(f(data, "base_p99_ms"))
        )
    } else {
        format!(
            "{} · {} · p99 {}",
            fmt_rate(f(data, "rate")),
            fmt_pct(er),
            fmt_ms(f(data, "p99_ms"))
        )
    };
    let line1 = match mode {
        "rate" => fmt_rate(f(data, "rate")),
        "errors" => format!("{} errors", fmt_pct(er)),
        "p99" => format!("p99 {}", fmt_ms(f(data, "p99_ms"))),
        "mtls" => util::mtls_text(data),
        _ => full.clone(),
    };
    let split = version_split(
        data["by_version"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default(),
    );
    let line2 = if !change.is_empty() {
        change_text(data)
    } else if let Some(split) = split.filter(|_| mode == "all") {
        split
    } else if mode == "all" {
        match util::mtls_text(data) {
            t if t.is_empty() => sources.join(" + "),
            t => format!("{} · {t}", sources.join(" + ")),
        }
    } else {
        String::new()
    };
    let mut detail = if change.is_empty() {
        sources.join(" + ")
    } else {
        change_text(data)
    };
    if let Some(r) = resilience_text(data) {
        detail = format!("{detail}\n{r}");
    }
    EdgeText {
        width: (line1.chars().count().max(line2.chars().count()) as f64) * 6.1 + 14.0,
        shown: mode != "none" && !(line1.is_empty() && line2.is_empty()),
        hover: format!("{full}\n{detail}"),
        line1,
        line2,
    }
}

/// What the callers' proxies did on an edge: `1 endpoint ejected · breaker opened 1,
/// closed 1 · 5 retries refused by the budget`; `None` when nothing happened.
fn resilience_text(edge: &Value) -> Option<String> {
    let n = |k: &str| f(edge, k) as u64;
    let mut parts = Vec::new();
    match n("ejections") {
        0 => {}
        1 => parts.push("1 endpoint ejected".to_string()),
        k => parts.push(format!("{k} endpoints ejected")),
    }
    let (opened, closed) = (n("breaker_opened"), n("breaker_closed"));
    if opened + closed > 0 {
        parts.push(format!("breaker opened {opened}, closed {closed}"));
    }
    match n("retry_budget_exhausted") {
        0 => {}
        1 => parts.push("1 retry refused by the budget".to_string()),
        k => parts.push(format!("{k} retries refused by the budget")),
    }
    (!parts.is_empty()).then(|| parts.join(" · "))
}

/// What changed on a node or edge of a diff: `added`, `removed`, or what moved.
fn change_text(v: &Value) -> String {
    match s(v, "change").as_str() {
        "added" => "new in this window".into(),
        "removed" => format!("gone ({} requests before)", f(v, "base_requests")),
        "changed" => {
            let moved: Vec<String> = v["moved"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter_map(Value::as_str)
                        .map(|k| match k {
                            "error_rate" => format!(
                                "errors {} → {}",
                                fmt_pct(f(v, "base_error_rate")),
                                fmt_pct(f(v, "error_rate"))
                            ),
                            _ => format!(
                                "p99 {} → {}",
                                fmt_ms(f(v, "base_p99_ms")),
                                fmt_ms(f(v, "p99_ms"))
                            ),
                        })
                        .collect()
                })
                .unwrap_or_default();
            moved.join(", ")
        }
        _ => "unchanged".into(),
    }
}

/// An edge's security in its panel: the mTLS share, the identities each side proved, and
/// what authorization refused (nothing for a node, or an edge no source says about).
pub fn security_block(edge: &Value) -> Option<impl IntoView + use<>> {
    let level = util::mtls_level(edge)?;
    let clients = util::identities(edge, "client_identities");
    let servers = util::identities(edge, "server_identities");
    let (denied, would) = (f(edge, "denied"), f(edge, "would_deny"));
    let list = |ids: Vec<String>| {
        if ids.is_empty() {
            view! { <span class="muted">"none proven"</span> }.into_any()
        } else {
            ids.into_iter()
                .map(|i| view! { <code class="identity">{i}</code> })
                .collect_view()
                .into_any()
        }
    };
    Some(view! {
        <div class="security" data-test="edge-security" data-mtls=level>
            <div><span class=format!("tls-badge lock-{level}")>{util::mtls_text(edge)}</span></div>
            <div class="small">"Client: "{list(clients)}</div>
            <div class="small">"Server: "{list(servers)}</div>
            {(denied > 0.0 || would > 0.0).then(|| view! {
                <div class="small denied" data-test="denied">{format!("Denied {denied:.0} · would deny {would:.0}")}</div>
            })}
        </div>
    })
}

/// The node's or edge's entry in the graph answer.
fn lookup(graph: &Value, sel: &Selection) -> Value {
    let found = match sel {
        Selection::Node(id) => graph["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| s(n, "id") == *id)),
        Selection::Edge(a, b) => graph["edges"].as_array().and_then(|x| {
            x.iter()
                .find(|e| s(e, "source") == *a && s(e, "target") == *b)
        }),
    };
    found.cloned().unwrap_or(Value::Null)
}

#[component]
fn SidePanel(sel: Selection, graph: LocalResource<Result<Value, String>>) -> impl IntoView {
    let url = use_url();
    let close = move |_| go(&url.with(&[("sel", None)]), false);
    let graph_now = graph
        .get_untracked()
        .and_then(Result::ok)
        .unwrap_or(Value::Null);
    let graph_live = graph;
    let graph = graph_now;
    let find_node = |id: &str| {
        graph["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| s(n, "id") == id).cloned())
    };
    let (title, kind, data) = match &sel {
        Selection::Node(id) => {
            let n = find_node(id).unwrap_or(Value::Null);
            (id.clone(), s(&n, "kind"), n)
        }
        Selection::Edge(a, b) => {
            let e = graph["edges"]
                .as_array()
                .and_then(|x| {
                    x.iter()
                        .find(|e| s(e, "source") == *a && s(e, "target") == *b)
                        .cloned()
                })
                .unwrap_or(Value::Null);
            (format!("{a} → {b}"), "edge".to_string(), e)
        }
    };
    let seen_in_spans = data["sources"]
        .as_array()
        .is_some_and(|a| a.iter().any(|s| s.as_str() == Some("spans")));
    let caller = match &sel {
        Selection::Node(id) => Some(id.clone()).filter(|_| kind == "service"),
        Selection::Edge(a, _) => Some(a.clone()).filter(|a| a != "user"),
    };
    // Signals over time: a service's from the API, an edge's from its spans by SQL.
    let detail = match &sel {
        Selection::Node(id) if kind == "service" => {
            let id = id.clone();
            Some(LocalResource::new(move || {
                let q = url.range().api();
                tick();
                util::get_json(format!("/api/v1/services/{}?{q}", enc(&id)))
            }))
        }
        Selection::Edge(a, b) if seen_in_spans => {
            let (a, b) = (a.clone(), b.clone());
            Some(LocalResource::new(move || {
                let r = url.range();
                tick();
                edge_series(r, a.clone(), b.clone())
            }))
        }
        _ => None,
    };
    // Mirrored traffic on this edge: each route's primary against its shadow.
    let mirrors = match &sel {
        Selection::Edge(a, b) if a != "user" => {
            let (a, b) = (a.clone(), b.clone());
            Some(LocalResource::new(move || {
                let q = url.range().api();
                tick();
                util::get_json(format!(
                    "/api/v1/mirrors?{q}&source={}&target={}",
                    enc(&a),
                    enc(&b)
                ))
            }))
        }
        _ => None,
    };
    let mirror_block = move || {
        let list = mirrors?.get()?.ok()?;
        let list = list.as_array().filter(|l| !l.is_empty())?.clone();
        let classes = |v: &Value| {
            v.as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, n)| format!("{k} {}", n.as_u64().unwrap_or(0)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        Some(view! {
            <div class="mirrors" data-test="mirror-compare">
                <h3 class="panel-sub">"Mirrored traffic: primary vs shadow"</h3>
                {list.into_iter().map(|m| view! {
                    <div class="small mirror-row" data-route=s(&m, "route")>
                        <div><b>{format!("route {}", s(&m, "route"))}</b>{format!(" · {} pairs", f(&m, "pairs"))}</div>
                        <div>{format!("bodies alike {} · status classes alike {}", fmt_pct(f(&m, "body_match_ratio")), fmt_pct(f(&m, "status_class_match_ratio")))}</div>
                        <table class="mini-table">
                            <thead><tr><th></th><th>"p50"</th><th>"p99"</th><th>"Statuses"</th></tr></thead>
                            <tbody>
                                <tr><td>"primary"</td><td>{fmt_ms(f(&m["primary"], "p50_ms"))}</td><td>{fmt_ms(f(&m["primary"], "p99_ms"))}</td><td>{classes(&m["primary"]["status_classes"])}</td></tr>
                                <tr><td>"shadow"</td><td>{fmt_ms(f(&m["shadow"], "p50_ms"))}</td><td>{fmt_ms(f(&m["shadow"], "p99_ms"))}</td><td>{classes(&m["shadow"]["status_classes"])}</td></tr>
                            </tbody>
                        </table>
                    </div>
                }).collect_view()}
            </div>
        })
    };
    let no_series_note = (kind == "edge" && !seen_in_spans)
        .then(|| view! { <div class="muted small">"Seen only in the mesh's own telemetry: no spans to chart this edge over time."</div> });
    let sel_live = sel.clone();
    let numbers = move || {
        let g = graph_live.get().and_then(Result::ok).unwrap_or(Value::Null);
        let data = lookup(&g, &sel_live);
        let by_source = data["by_source"].as_object().cloned().unwrap_or_default();
        let reasons = data["reasons"].as_object().cloned().unwrap_or_default();
        let sources_row = data["sources"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(|s| source_label(s).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        view! {
            <div class="kpis">
                <Kpi label="Rate" value=fmt_rate(f(&data, "rate"))/>
                <Kpi label="Errors" value=fmt_pct(f(&data, "error_rate")) class=health(f(&data, "error_rate"))/>
                <Kpi label="p50" value=fmt_ms(f(&data, "p50_ms"))/>
                <Kpi label="p99" value=fmt_ms(f(&data, "p99_ms"))/>
            </div>
            <div class="muted small">{format!("{} requests, {} errors in range", f(&data, "requests"), f(&data, "errors"))}</div>
            {(!sources_row.is_empty()).then(|| view! { <div class="small sources">"Seen in: "<b>{sources_row}</b></div> })}
            {versions_table(data["versions"].as_array().or(data["by_version"].as_array()).map(Vec::as_slice).unwrap_or_default())}
            {(!reasons.is_empty()).then(|| view! {
                <div class="small reasons" data-test="reasons">"Answered by a proxy: "
                    {reasons.iter().map(|(k, v)| format!("{k} {}", v.as_u64().unwrap_or(0))).collect::<Vec<_>>().join(", ")}
                </div>
            })}
            {resilience_text(&data).map(|r| view! {
                <div class="small reasons" data-test="resilience">"Resilience: "{r}</div>
            })}
            {security_block(&data)}
            {(!by_source.is_empty()).then(|| view! {
                <table class="mini-table">
                    <thead><tr><th>"Source"</th><th>"Rate"</th><th>"Errors"</th><th>"p99"</th></tr></thead>
                    <tbody>
                        {by_source.into_iter().map(|(k, v)| view! {
                            <tr><td>{source_label(&k).to_string()}</td><td>{fmt_rate(f(&v, "rate"))}</td><td>{fmt_pct(f(&v, "error_rate"))}</td><td>{fmt_ms(f(&v, "p99_ms"))}</td></tr>
                        }).collect_view()}
                    </tbody>
                </table>
            })}
        }
    };
    let p95 = f(&data, "p95_ms");
    let trace_links = caller.clone().map(|svc| {
        let slow = url.link(
            "/traces",
            &[
                ("service", svc.clone()),
                ("min_duration_ms", format!("{:.0}", p95.floor())),
                ("sort", "slowest".into()),
            ],
        );
        let failing = url.link(
            "/traces",
            &[("service", svc.clone()), ("status", "error".into())],
        );
        let page = url.link(&format!("/services/{}", enc(&svc)), &[]);
        view! {
            <div class="panel-links">
                <a class="btn" href=slow data-test="slowest-traces">"Slowest traces ›"</a>
                <a class="btn" href=failing data-test="failing-traces">"Failing traces ›"</a>
                <a class="btn ghost" href=page>"Service page ›"</a>
            </div>
        }
    });
    // The live requests of this node or edge, and hiding a node or its namespace.
    let tap_query: Vec<(&str, String)> = match &sel {
        Selection::Node(id) if kind == "service" => vec![("service", id.clone())],
        Selection::Node(_) => Vec::new(),
        Selection::Edge(a, b) if a == "user" || a == "user (entry)" => vec![("service", b.clone())],
        Selection::Edge(a, b) => vec![("service", a.clone()), ("peer", b.clone())],
    };
    let tap_link = (!tap_query.is_empty()).then(|| {
        let href = url.link("/tap", &tap_query);
        view! { <a class="btn" href=href data-test="tap-link">"Live tap ›"</a> }
    });
    let hide_buttons = match &sel {
        Selection::Node(id) => {
            let namespace = s(&data, "namespace");
            let id = id.clone();
            Some(view! {
                <div class="panel-links">
                    <button class="btn ghost" data-test="hide-node" on:click=move |_| go(&hide_more(&url, &id), false)>"Hide node"</button>
                    {(!namespace.is_empty()).then(|| {
                        let label = format!("Hide namespace {namespace}");
                        let item = format!("ns:{namespace}");
                        view! { <button class="btn ghost" data-test="hide-namespace" on:click=move |_| go(&hide_more(&url, &item), false)>{label}</button> }
                    })}
                </div>
            })
        }
        Selection::Edge(..) => None,
    };
    let kind_label = match kind.as_str() {
        "service" => "Service",
        "virtual" => "Uninstrumented peer",
        "user" => "Users (entry points)",
        "edge" => "Edge",
        _ => "",
    };
    view! {
        <aside class="side-panel" data-test="signals-panel">
            <div class="panel-head">
                <div>
                    <div class="panel-kind">{kind_label}</div>
                    <h2 class="panel-title">{title}</h2>
                </div>
                <button class="btn icon" on:click=close title="Close">"✕"</button>
            </div>
            {numbers}
            {trace_links}
            <div class="panel-links">{tap_link}</div>
            {hide_buttons}
            {mirror_block}
            {no_series_note}
            {detail.map(|res| view! {
                <h3 class="panel-sub">{if kind == "edge" { "Requests on this edge over time" } else { "Golden signals over time" }}</h3>
                {move || match res.get() {
                    None => view! { <Loading/> }.into_any(),
                    Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
                    Some(Ok(v)) => view! { <SignalCharts detail=v compact=true/> }.into_any(),
                }}
            })}
        </aside>
    }
}

/// The edge's per-minute signals from the API (`/api/v1/series`), which follows the
/// graph's own rules, in the shape of a service's `series`.
async fn edge_series(range: Range, source: String, target: String) -> Result<Value, String> {
    let v = util::get_json(format!(
        "/api/v1/series?{}&source={}&target={}",
        range.api(),
        enc(&source),
        enc(&target)
    ))
    .await?;
    let points = v["series"][0]["points"].clone();
    Ok(
        serde_json::json!({ "series": if points.is_null() { Value::Array(Vec::new()) } else { points } }),
    )
}

/// A version breakdown (`versions` of a node, `by_version` of an edge) as a small table.
pub fn versions_table(list: &[Value]) -> impl IntoView + use<> {
    let total: f64 = list.iter().map(|v| f(v, "requests")).sum();
    (!list.is_empty()).then(|| {
        view! {
            <table class="mini-table" data-test="versions">
                <thead><tr><th>"Version"</th><th>"Share"</th><th>"Rate"</th><th>"Errors"</th><th>"p99"</th></tr></thead>
                <tbody>
                    {list.iter().map(|v| view! {
                        <tr>
                            <td class="mono">{s(v, "version")}</td>
                            <td>{fmt_pct(if total > 0.0 { f(v, "requests") / total } else { 0.0 })}</td>
                            <td>{fmt_rate(f(v, "rate"))}</td>
                            <td>{fmt_pct(f(v, "error_rate"))}</td>
                            <td>{fmt_ms(f(v, "p99_ms"))}</td>
                        </tr>
                    }).collect_view()}
                </tbody>
            </table>
        }
    })
}

/// The box of a service with more than one version (as Kiali's app box): around the
/// service and, above it, its versions. `None` for a service with one version.
fn app_box(data: &Value, x: f64, y: f64, r: f64) -> Option<Rect> {
    data["versions"].as_array().filter(|l| l.len() > 1)?;
    let half = (r + 6.0).max(52.0);
    Some((x - half, y - r - 38.0, x + half, y + r + 6.0))
}

/// A service's versions as small nodes in a row above it, inside its [`app_box`], each
/// sized by its share of the requests and coloured by its own error rate, with its name:
/// where the canary is and how it fares at a glance. Nothing for a service with one version.
fn version_dots(data: &Value, x: f64, y: f64, r: f64) -> Option<impl IntoView + use<>> {
    let list = data["versions"].as_array().filter(|l| l.len() > 1)?;
    let total: f64 = list.iter().map(|v| f(v, "requests")).sum::<f64>().max(1.0);
    let shown = list.len().min(4);
    let dots = list
        .iter()
        .take(shown)
        .enumerate()
        .map(|(i, v)| {
            let dx = (i as f64 - (shown as f64 - 1.0) / 2.0) * 26.0;
            let (cx, cy) = (x + dx, y - r - 13.0);
            let share = f(v, "requests") / total;
            let dot = 3.0 + 6.0 * share.sqrt();
            let color = health_color(f(v, "error_rate"));
            let title = format!(
                "{} · {} of requests · {} errors",
                s(v, "version"),
                fmt_pct(share),
                fmt_pct(f(v, "error_rate"))
            );
            view! {
                <g class="version-dot" data-version=s(v, "version") data-hover=title>
                    <circle cx=cx cy=cy r=dot fill=color></circle>
                    <text x=cx y=cy - dot - 3.0 text-anchor="middle" class="version-label">{s(v, "version")}</text>
                </g>
            }
        })
        .collect_view();
    Some(view! { <g class="versions" data-test="version-nodes">{dots}</g> })
}

/// `v1 90% · v2 10%`: a node's split across its versions, when it has more than one.
fn version_split(list: &[Value]) -> Option<String> {
    if list.len() < 2 {
        return None;
    }
    let total: f64 = list.iter().map(|v| f(v, "requests")).sum();
    (total > 0.0).then(|| {
        list.iter()
            .map(|v| {
                format!(
                    "{} {:.0}%",
                    s(v, "version"),
                    100.0 * f(v, "requests") / total
                )
            })
            .collect::<Vec<_>>()
            .join(" · ")
    })
}

/// Charts of a service's per-minute series: rate, error rate, latency percentiles.
#[component]
pub fn SignalCharts(
    detail: Value,
    #[prop(optional)] compact: bool,
    /// Policy changes to mark on every chart.
    #[prop(optional)]
    marks: Vec<crate::charts::Mark>,
) -> impl IntoView {
    let series = detail["series"].as_array().cloned().unwrap_or_default();
    let pts = |k: &str, scale: f64| -> Vec<(f64, f64)> {
        series
            .iter()
            .map(|p| (util::ts_ms(&p["time"]), f(p, k) * scale))
            .collect()
    };
    let h = if compact { 130.0 } else { 190.0 };
    let w = if compact { 360.0 } else { 480.0 };
    view! {
        <div class=if compact { "charts compact" } else { "charts" }>
            <LineChart title="Requests / s".into() height=h width=w fmt=|v| fmt_rate(v) marks=marks.clone()
                series=vec![Series { label: "rate".into(), color: "#38bdf8", points: pts("rate", 1.0) }]/>
            <LineChart title="Error rate".into() height=h width=w fmt=|v| fmt_pct(v) marks=marks.clone()
                series=vec![Series { label: "errors".into(), color: "#ef4444", points: pts("error_rate", 1.0) }]/>
            <LineChart title="Latency".into() height=h width=w fmt=|v| fmt_ms(v) marks=marks
                series=vec![
                    Series { label: "p50".into(), color: "#34d399", points: pts("p50_ms", 1.0) },
                    Series { label: "p95".into(), color: "#fbbf24", points: pts("p95_ms", 1.0) },
                    Series { label: "p99".into(), color: "#f472b6", points: pts("p99_ms", 1.0) },
                ]/>
        </div>
    }
}
