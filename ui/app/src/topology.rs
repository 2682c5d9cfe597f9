//! The service graph: a layered layout (the `user` node left, services by call depth,
//! uninstrumented `virtual` peers right), nodes sized by rate and coloured by error rate,
//! edges labelled with rate, error rate, p99 and where they were seen. Clicking a node or
//! an edge opens a panel with its golden signals over time.

use std::collections::{BTreeSet, HashMap};

use leptos::prelude::*;
use serde_json::Value;

use crate::charts::{LineChart, Series};
use crate::state::{Range, go, tick, use_url};
use crate::util::{self, enc, f, fmt_ms, fmt_pct, fmt_rate, health, health_color, s};
use crate::{ErrorBox, Kpi, Loading};

#[derive(Clone, Debug)]
struct GNode {
    id: String,
    kind: String,
    namespace: String,
    data: Value,
    layer: usize,
    x: f64,
    y: f64,
    r: f64,
}

#[derive(Clone, Debug)]
struct GEdge {
    source: String,
    target: String,
    data: Value,
}

const COL: f64 = 270.0;
const ROW: f64 = 118.0;
const PAD_X: f64 = 90.0;
const PAD_Y: f64 = 70.0;

/// Assigns layers (longest call path from the users, virtual peers last) and positions
/// (barycentre ordering within a layer). Returns the drawing's width and height.
fn layout(nodes: &mut [GNode], edges: &[GEdge]) -> (f64, f64) {
    let idx: HashMap<String, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("{}\u{0}{}", n.kind, n.id), i))
        .collect();
    let find = |id: &str, nodes: &[GNode]| -> Option<usize> {
        ["user", "service", "virtual"]
            .iter()
            .find_map(|k| idx.get(&format!("{k}\u{0}{id}")).copied())
            .filter(|i| nodes[*i].id == id)
    };
    let pairs: Vec<(usize, usize)> = edges
        .iter()
        .filter_map(|e| Some((find(&e.source, nodes)?, find(&e.target, nodes)?)))
        .collect();
    for n in nodes.iter_mut() {
        n.layer = if n.kind == "user" { 0 } else { 1 };
    }
    // Longest path, bounded so that cycles cannot loop forever.
    for _ in 0..nodes.len() {
        let mut changed = false;
        for &(a, b) in &pairs {
            if nodes[b].kind == "service"
                && nodes[a].kind != "virtual"
                && nodes[b].layer <= nodes[a].layer
                && nodes[a].layer < nodes.len()
            {
                nodes[b].layer = nodes[a].layer + 1;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let max_service = nodes
        .iter()
        .filter(|n| n.kind != "virtual")
        .map(|n| n.layer)
        .max()
        .unwrap_or(0);
    // Uninstrumented peers one column right of their deepest caller.
    for v in 0..nodes.len() {
        if nodes[v].kind == "virtual" {
            let callers = pairs
                .iter()
                .filter(|(_, b)| *b == v)
                .map(|(a, _)| nodes[*a].layer)
                .max();
            nodes[v].layer = callers.map(|l| l + 1).unwrap_or(max_service + 1);
        }
    }
    let layers = nodes.iter().map(|n| n.layer).max().unwrap_or(0) + 1;
    let mut by_layer: Vec<Vec<usize>> = vec![Vec::new(); layers];
    for (i, n) in nodes.iter().enumerate() {
        by_layer[n.layer].push(i);
    }
    for l in &mut by_layer {
        l.sort_by(|a, b| nodes[*a].id.cmp(&nodes[*b].id));
    }
    let mut pos: Vec<f64> = vec![0.0; nodes.len()];
    let place = |by_layer: &Vec<Vec<usize>>, pos: &mut Vec<f64>| {
        for l in by_layer {
            for (k, i) in l.iter().enumerate() {
                pos[*i] = k as f64 - (l.len() as f64 - 1.0) / 2.0;
            }
        }
    };
    place(&by_layer, &mut pos);
    for _ in 0..3 {
        for layer in by_layer.iter_mut().skip(1) {
            let bary = |i: usize| {
                let ns: Vec<f64> = pairs
                    .iter()
                    .filter_map(|&(a, b)| {
                        if b == i {
                            Some(pos[a])
                        } else if a == i {
                            Some(pos[b])
                        } else {
                            None
                        }
                    })
                    .collect();
                if ns.is_empty() {
                    pos[i]
                } else {
                    ns.iter().sum::<f64>() / ns.len() as f64
                }
            };
            let mut keyed: Vec<(f64, usize)> = layer.iter().map(|i| (bary(*i), *i)).collect();
            keyed.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
            *layer = keyed.into_iter().map(|(_, i)| i).collect();
            for (k, i) in layer.iter().enumerate() {
                pos[*i] = k as f64 - (layer.len() as f64 - 1.0) / 2.0;
            }
        }
    }
    let tallest = by_layer.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let height = PAD_Y * 2.0 + (tallest as f64 - 1.0) * ROW;
    let max_rate = nodes.iter().map(|n| f(&n.data, "rate")).fold(0.0, f64::max);
    for (i, n) in nodes.iter_mut().enumerate() {
        n.x = PAD_X + n.layer as f64 * COL;
        n.y = height / 2.0 + pos[i] * ROW;
        let rel = if max_rate > 0.0 {
            (f(&n.data, "rate") / max_rate).sqrt()
        } else {
            0.0
        };
        n.r = 16.0 + 16.0 * rel;
    }
    (PAD_X * 2.0 + (layers as f64 - 1.0) * COL, height)
}

fn source_label(src: &str) -> &str {
    match src {
        "spans" => "spans",
        "metrics" => "proxy metrics",
        "access_logs" => "access logs",
        other => other,
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
        let mut q = url.range().api();
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
        util::get_json(format!("/api/v1/graph?{q}"))
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
                        view! {
                            <div class="graph-summary">
                                <span><b>{count("service")}</b>" services"</span>
                                <span><b>{count("virtual")}</b>" uninstrumented"</span>
                                <span><b>{edges}</b>" edges"</span>
                                <span>"entry rate "<b>{fmt_rate(rate)}</b></span>
                                <span>"entry errors "<b class=health(er)>{fmt_pct(er)}</b></span>
                            </div>
                        }
                    })}
                    {move || match graph.get() {
                        None => view! { <Loading/> }.into_any(),
                        Some(Err(e)) => view! { <ErrorBox msg=e/> }.into_any(),
                        Some(Ok(g)) => view! { <GraphView graph=g search=search selection=selection/> }.into_any(),
                    }}
                </div>
                // The panel lives as long as the selection; refreshes update it in place.
                {move || selection.get().filter(|_| loaded.get()).map(|sel| view! { <SidePanel sel=sel graph=graph/> })}
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
) -> impl IntoView {
    let url = use_url();
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
        .collect();
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
    let (w, h) = layout(&mut nodes, &edges);
    let at: HashMap<String, (f64, f64, f64)> = nodes
        .iter()
        .map(|n| (n.id.clone(), (n.x, n.y, n.r)))
        .collect();
    let max_edge_rate = edges.iter().map(|e| f(&e.data, "rate")).fold(0.0, f64::max);

    let edge_views = edges
        .iter()
        .filter_map(|e| {
            let (x1, y1, r1) = *at.get(&e.source)?;
            let (x2, y2, r2) = *at.get(&e.target)?;
            let forward = x2 > x1 + 1.0;
            let (sx, sy, tx, ty, d) = if forward {
                let (sx, tx) = (x1 + r1, x2 - r2 - 6.0);
                let mx = (sx + tx) / 2.0;
                (sx, y1, tx, y2, format!("M{sx:.1},{y1:.1} C{mx:.1},{y1:.1} {mx:.1},{y2:.1} {tx:.1},{y2:.1}"))
            } else {
                // Same layer or backwards: an arc below.
                let (sx, sy) = (x1, y1 + r1);
                let (tx, ty) = (x2, y2 + r2 + 6.0);
                let dip = sy.max(ty) + 70.0;
                (sx, sy, tx, ty, format!("M{sx:.1},{sy:.1} C{sx:.1},{dip:.1} {tx:.1},{dip:.1} {tx:.1},{ty:.1}"))
            };
            let (lx, ly) = if forward {
                ((sx + tx) / 2.0, (sy + ty) / 2.0)
            } else {
                ((sx + tx) / 2.0, sy.max(ty) + 52.0)
            };
            let er = f(&e.data, "error_rate");
            let color = health_color(er);
            let width = 1.5 + if max_edge_rate > 0.0 { 4.0 * (f(&e.data, "rate") / max_edge_rate).sqrt() } else { 0.0 };
            let sources: Vec<String> = e.data["sources"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).map(|s| source_label(s).to_string()).collect())
                .unwrap_or_default();
            let mesh_only = !sources.iter().any(|s| s == "spans");
            let line1 = format!(
                "{} · {} · p99 {}",
                fmt_rate(f(&e.data, "rate")),
                fmt_pct(er),
                fmt_ms(f(&e.data, "p99_ms"))
            );
            let lock = util::mtls_level(&e.data);
            let line2 = match util::mtls_text(&e.data) {
                t if t.is_empty() => sources.join(" + "),
                t => format!("{} · {t}", sources.join(" + ")),
            };
            let lw = (line1.chars().count().max(line2.chars().count()) as f64) * 6.1 + 14.0;
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
                <g class="edge" class:selected=selected class:dim=dim class:mesh-only=mesh_only
                    data-source=e.source.clone() data-target=e.target.clone() on:click=click>
                    <path d=d.clone() class="edge-hit"></path>
                    <path d=d stroke=color stroke-width=width class="edge-line" marker-end=format!("url(#arrow-{})", health(er))></path>
                    <g class="edge-label" transform=format!("translate({lx:.1},{ly:.1})")>
                        <rect x=-lw / 2.0 y="-15" width=lw height="30" rx="6"></rect>
                        <text y="-2" text-anchor="middle" class="el1">{line1}</text>
                        <text y="10" text-anchor="middle" class="el2">{line2}</text>
                        {lock.map(|level| view! {
                            // A padlock at the label's left: closed and green (all mTLS),
                            // amber (partly), open and red (plaintext).
                            <g class=format!("lock lock-{level}") data-mtls=level transform=format!("translate({:.1},-6)", -lw / 2.0 - 12.0)>
                                <path d=if level == "none" { "M-3,-1 v-4 a3,3 0 0 1 6,0" } else { "M-3,-1 v-3 a3,3 0 0 1 6,0 v3" } class="lock-shackle"></path>
                                <rect x="-5" y="-1" width="10" height="8" rx="1.5" class="lock-body"></rect>
                            </g>
                        })}
                    </g>
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
            let split = version_split(n.data["versions"].as_array().map(Vec::as_slice).unwrap_or_default());
            let sub = match n.kind.as_str() {
                "user" => "users".to_string(),
                _ if f(&n.data, "requests") == 0.0 => "seen by the mesh only".to_string(),
                _ if f(&n.data, "p99_ms") == 0.0 => fmt_rate(f(&n.data, "rate")),
                _ => format!("{} · p99 {}", fmt_rate(f(&n.data, "rate")), fmt_ms(f(&n.data, "p99_ms"))),
            };
            view! {
                <g class=format!("node kind-{}", n.kind) class:selected=selected class:match=matched class:dim=dim
                    data-id=n.id.clone() data-kind=n.kind.clone() data-namespace=n.namespace.clone() on:click=click>
                    {shape}
                    <text x=x y=y + r + 18.0 text-anchor="middle" class="node-label">{n.id.clone()}</text>
                    <text x=x y=y + r + 32.0 text-anchor="middle" class="node-sub">{sub}</text>
                    {split.map(|t| view! { <text x=x y=y + r + 45.0 text-anchor="middle" class="node-versions" data-test="version-split">{t}</text> })}
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
    view! {
        <svg class="graph" data-test="topology" viewBox=format!("0 0 {w:.0} {:.0}", h + 40.0) width=w height=h + 40.0>
            <defs>{markers}</defs>
            <g class="edges">{edge_views}</g>
            <g class="nodes">{node_views}</g>
        </svg>
    }
    .into_any()
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
pub fn SignalCharts(detail: Value, #[prop(optional)] compact: bool) -> impl IntoView {
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
            <LineChart title="Requests / s".into() height=h width=w fmt=|v| fmt_rate(v)
                series=vec![Series { label: "rate".into(), color: "#38bdf8", points: pts("rate", 1.0) }]/>
            <LineChart title="Error rate".into() height=h width=w fmt=|v| fmt_pct(v)
                series=vec![Series { label: "errors".into(), color: "#ef4444", points: pts("error_rate", 1.0) }]/>
            <LineChart title="Latency".into() height=h width=w fmt=|v| fmt_ms(v)
                series=vec![
                    Series { label: "p50".into(), color: "#34d399", points: pts("p50_ms", 1.0) },
                    Series { label: "p95".into(), color: "#fbbf24", points: pts("p95_ms", 1.0) },
                    Series { label: "p99".into(), color: "#f472b6", points: pts("p99_ms", 1.0) },
                ]/>
        </div>
    }
}
