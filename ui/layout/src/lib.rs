//! The topology's geometry, apart from the browser so it is tested on the host: a layered
//! layout of the service graph (users left, services by call depth, uninstrumented peers
//! right of their callers, each namespace a band of rows of its own, a deep mesh wrapped
//! onto further lines) and the placing of edge labels where they cover no node and no other
//! label. Used by the web app (`ui/app/src/topology.rs`); pure functions over plain data.

use std::collections::HashMap;

use serde_json::Value;

/// A node's request rate, as the graph API gives it.
fn rate(n: &GNode) -> f64 {
    n.data["rate"].as_f64().unwrap_or(0.0)
}

#[derive(Clone, Debug)]
pub struct GNode {
    pub id: String,
    /// `user`, `service` or `virtual`.
    pub kind: String,
    pub namespace: String,
    /// The node as the graph API answers it (`rate` sizes it).
    pub data: Value,
    /// Set by [`layout`]: the column, the position and the radius.
    pub layer: usize,
    pub x: f64,
    pub y: f64,
    pub r: f64,
}

#[derive(Clone, Debug)]
pub struct GEdge {
    pub source: String,
    pub target: String,
    pub data: Value,
}

pub const COL: f64 = 300.0;
/// Columns before a deep mesh wraps onto further lines (see [`layout`]).
pub const MAX_COLS: usize = 6;
pub const ROW: f64 = 118.0;
pub const PAD_X: f64 = 90.0;
pub const PAD_Y: f64 = 70.0;
/// The least room between a namespace box and the drawing's edge.
const MARGIN: f64 = 4.0;

/// A namespace's box in the drawing.
#[derive(Clone, Debug, PartialEq)]
pub struct NsBox {
    pub name: String,
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

/// Assigns layers (longest call path from the users, virtual peers last), then rows: each
/// namespace is a band of rows of its own across the drawing (as tall as its busiest
/// layer), and within a band nodes are ordered by the barycentre of their neighbours, so
/// namespaces become boxes that never overlap. Returns the drawing's width and height and
/// the namespace boxes.
pub fn layout(nodes: &mut [GNode], edges: &[GEdge]) -> (f64, f64, Vec<NsBox>) {
    layout_keeping(nodes, edges, &HashMap::new())
}

/// [`layout`] for a drawing that replaces an earlier one (the data refreshed): the nodes
/// of the earlier drawing (`before`: id → its `y`) keep the order they had within their
/// column, and only nodes new to it are placed by their neighbours, so a node joining or
/// a rate changing does not shuffle what the reader already found. Positions do not
/// depend on rates (only the radius does): the same graph draws the same.
pub fn layout_keeping(
    nodes: &mut [GNode],
    edges: &[GEdge],
    before: &HashMap<String, f64>,
) -> (f64, f64, Vec<NsBox>) {
    let idx: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let pairs: Vec<(usize, usize)> = edges
        .iter()
        .filter_map(|e| Some((*idx.get(e.source.as_str())?, *idx.get(e.target.as_str())?)))
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
    // Bands: the namespaces in name order; nodes without one (users, virtual peers) share
    // an unboxed band first.
    // Namespaces in call order: by the mean layer of their nodes, then by name.
    let mut mean: HashMap<&str, (f64, f64)> = HashMap::new();
    for n in nodes.iter() {
        let m = mean.entry(n.namespace.as_str()).or_default();
        m.0 += n.layer as f64;
        m.1 += 1.0;
    }
    let mut bands: Vec<(f64, String)> = mean
        .into_iter()
        .map(|(ns, (sum, count))| {
            (
                if ns.is_empty() { -1.0 } else { sum / count },
                ns.to_string(),
            )
        })
        .collect();
    bands.sort_by(|a, b| {
        a.0.partial_cmp(&b.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.1.cmp(&b.1))
    });
    let bands: Vec<String> = bands.into_iter().map(|(_, ns)| ns).collect();
    let band_of: HashMap<String, usize> = bands
        .iter()
        .enumerate()
        .map(|(i, b)| (b.clone(), i))
        .collect();
    // A node's column: its layer, unless the mesh is deeper than MAX_COLS; then each band
    // numbers the layers it uses and wraps them onto further rows of the band, so a long
    // chain of calls reads left to right, line by line, instead of growing ever wider.
    let wrap = layers > MAX_COLS;
    let mut slot: Vec<(usize, usize)> = vec![(0, 0); nodes.len()]; // (line, column)
    if wrap {
        for band in &bands {
            let mut used: Vec<usize> = nodes
                .iter()
                .filter(|n| &n.namespace == band)
                .map(|n| n.layer)
                .collect();
            used.sort_unstable();
            used.dedup();
            for (i, n) in nodes.iter().enumerate() {
                if &n.namespace == band {
                    let k = used.iter().position(|l| *l == n.layer).unwrap_or(0);
                    slot[i] = (k / MAX_COLS, k % MAX_COLS);
                }
            }
        }
    } else {
        for (i, n) in nodes.iter().enumerate() {
            slot[i] = (0, n.layer);
        }
    }
    let columns = if wrap { MAX_COLS } else { layers };
    // cells[band][line][column] = the nodes there, in order.
    let lines_of = |b: usize| {
        (0..nodes.len())
            .filter(|i| band_of[&nodes[*i].namespace] == b)
            .map(|i| slot[i].0 + 1)
            .max()
            .unwrap_or(1)
    };
    let mut cells: Vec<Vec<Vec<Vec<usize>>>> = (0..bands.len())
        .map(|b| vec![vec![Vec::new(); columns]; lines_of(b)])
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        let (line, col) = slot[i];
        cells[band_of[&n.namespace]][line][col].push(i);
    }
    // Where a node was, in rows, when the earlier drawing had it.
    let was: Vec<Option<f64>> = nodes
        .iter()
        .map(|n| before.get(&n.id).map(|y| (y - PAD_Y) / ROW))
        .collect();
    for cell in cells.iter_mut().flatten().flatten() {
        cell.sort_by(|a, b| {
            let (wa, wb) = (was[*a], was[*b]);
            match (wa, wb) {
                (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal),
                _ => std::cmp::Ordering::Equal,
            }
            .then_with(|| nodes[*a].id.cmp(&nodes[*b].id))
        });
    }
    // Rows of each line of each band (its fullest cell), and where each starts.
    let line_rows: Vec<Vec<usize>> = cells
        .iter()
        .map(|band| {
            band.iter()
                .map(|line| line.iter().map(Vec::len).max().unwrap_or(0).max(1))
                .collect()
        })
        .collect();
    let mut line_top: Vec<Vec<f64>> = Vec::new();
    let mut acc = 0.0;
    for rows in &line_rows {
        line_top.push(
            rows.iter()
                .map(|r| {
                    let top = acc;
                    acc += *r as f64;
                    top
                })
                .collect(),
        );
    }
    let total_rows = acc;
    // A node's row (in units of ROW) from its band, its line and its place in its cell.
    let mut pos: Vec<f64> = vec![0.0; nodes.len()];
    let place = |cells: &Vec<Vec<Vec<Vec<usize>>>>, pos: &mut Vec<f64>| {
        for (b, band) in cells.iter().enumerate() {
            for (l, line) in band.iter().enumerate() {
                for cell in line {
                    let offset = (line_rows[b][l] as f64 - cell.len() as f64) / 2.0;
                    for (k, i) in cell.iter().enumerate() {
                        pos[*i] = line_top[b][l] + offset + k as f64;
                    }
                }
            }
        }
    };
    place(&cells, &mut pos);
    for _ in 0..4 {
        for cell in cells.iter_mut().flatten().flatten() {
            let bary = |i: usize| {
                if let Some(w) = was[i] {
                    return w; // as it was drawn before
                }
                let ns: Vec<f64> = pairs
                    .iter()
                    .filter_map(|&(a, b)| {
                        (b == i)
                            .then_some(pos[a])
                            .or_else(|| (a == i).then_some(pos[b]))
                    })
                    .collect();
                if ns.is_empty() {
                    pos[i]
                } else {
                    ns.iter().sum::<f64>() / ns.len() as f64
                }
            };
            let mut keyed: Vec<(f64, usize)> = cell.iter().map(|i| (bary(*i), *i)).collect();
            // Stable: nodes with equal keys keep the order they have.
            keyed.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
            *cell = keyed.into_iter().map(|(_, i)| i).collect();
        }
        place(&cells, &mut pos);
    }
    let height = PAD_Y * 2.0 + (total_rows - 1.0).max(0.0) * ROW;
    let max_rate = nodes.iter().map(rate).fold(0.0, f64::max);
    for (i, n) in nodes.iter_mut().enumerate() {
        n.x = PAD_X + slot[i].1 as f64 * COL;
        n.y = PAD_Y + pos[i] * ROW;
        let rel = if max_rate > 0.0 {
            (rate(n) / max_rate).sqrt()
        } else {
            0.0
        };
        n.r = 16.0 + 16.0 * rel;
    }
    let width = PAD_X * 2.0 + (columns as f64 - 1.0) * COL;
    let boxes = bands
        .iter()
        .enumerate()
        .filter(|(_, name)| !name.is_empty())
        .filter_map(|(b, name)| {
            let used: Vec<usize> = (0..columns)
                .filter(|c| cells[b].iter().any(|line| !line[*c].is_empty()))
                .collect();
            let (first, last) = (*used.first()?, *used.last()?);
            let rows: usize = line_rows[b].iter().sum();
            // Around its columns, within the drawing (an edge column's box would
            // otherwise run past the padding and be cut off by the view).
            let x0 = (PAD_X + first as f64 * COL - COL * 0.42).max(MARGIN);
            let x1 = (PAD_X + last as f64 * COL + COL * 0.42).min(width - MARGIN);
            Some(NsBox {
                name: name.clone(),
                x: x0,
                y: PAD_Y + line_top[b][0] * ROW - ROW * 0.45,
                w: x1 - x0,
                h: rows as f64 * ROW - ROW * 0.06,
            })
        })
        .collect();
    (width, height, boxes)
}

/// A cubic Bézier's four points.
pub type Curve = [(f64, f64); 4];

/// An axis-aligned box: left, top, right, bottom.
pub type Rect = (f64, f64, f64, f64);

pub fn overlaps(a: &Rect, b: &Rect) -> bool {
    a.0 < b.2 && b.0 < a.2 && a.1 < b.3 && b.1 < a.3
}

/// The point at `t` of the cubic Bézier `p`.
pub fn bezier(p: &Curve, t: f64) -> (f64, f64) {
    let u = 1.0 - t;
    let (a, b, c, d) = (u * u * u, 3.0 * u * u * t, 3.0 * u * t * t, t * t * t);
    (
        a * p[0].0 + b * p[1].0 + c * p[2].0 + d * p[3].0,
        a * p[0].1 + b * p[1].1 + c * p[2].1 + d * p[3].1,
    )
}

/// Places edge labels (`(curve, width)`, busiest first) along their curves where they
/// cover no node (`obstacles`) and no label placed before; `None` where there is no room
/// (the edge's hover card still tells its numbers).
pub fn place_labels(labels: &[(Curve, f64)], obstacles: &[Rect]) -> Vec<Option<(f64, f64)>> {
    const TS: [f64; 11] = [
        0.5, 0.42, 0.58, 0.34, 0.66, 0.26, 0.74, 0.2, 0.8, 0.14, 0.86,
    ];
    // On the curve first, then just above or below it.
    const DY: [f64; 3] = [0.0, -18.0, 18.0];
    let mut placed: Vec<Rect> = Vec::new();
    labels
        .iter()
        .map(|(curve, w)| {
            let candidates = DY.iter().flat_map(|dy| TS.iter().map(move |t| (*t, *dy)));
            let spot = candidates.into_iter().find_map(|(t, dy)| {
                let (x, y) = bezier(curve, t);
                let y = y + dy;
                // The padlock sits left of the label.
                let r = (x - w / 2.0 - 20.0, y - 16.0, x + w / 2.0 + 2.0, y + 16.0);
                (!obstacles.iter().any(|o| overlaps(o, &r))
                    && !placed.iter().any(|p| overlaps(p, &r)))
                .then_some((x, y, r))
            });
            spot.map(|(x, y, r)| {
                placed.push(r);
                (x, y)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(id: &str, kind: &str, namespace: &str, rate: f64) -> GNode {
        GNode {
            id: id.into(),
            kind: kind.into(),
            namespace: namespace.into(),
            data: json!({ "rate": rate }),
            layer: 0,
            x: 0.0,
            y: 0.0,
            r: 0.0,
        }
    }

    fn edge(a: &str, b: &str) -> GEdge {
        GEdge {
            source: a.into(),
            target: b.into(),
            data: Value::Null,
        }
    }

    fn at<'a>(nodes: &'a [GNode], id: &str) -> &'a GNode {
        nodes.iter().find(|n| n.id == id).expect("node")
    }

    #[test]
    fn users_left_callees_by_depth_virtual_peers_right_of_their_callers() {
        let mut nodes = vec![
            node("db", "virtual", "", 1.0),
            node("cart", "service", "shop", 4.0),
            node("user", "user", "", 10.0),
            node("frontend", "service", "shop", 10.0),
        ];
        let edges = [
            edge("user", "frontend"),
            edge("frontend", "cart"),
            edge("cart", "db"),
        ];
        layout(&mut nodes, &edges);
        let x = |id| at(&nodes, id).x;
        assert!(x("user") < x("frontend"), "user left");
        assert!(x("frontend") < x("cart"), "by call depth");
        assert!(x("cart") < x("db"), "a virtual peer right of its caller");
        // Sized by rate: the busiest is the biggest.
        assert!(at(&nodes, "frontend").r > at(&nodes, "cart").r);
        assert!(at(&nodes, "cart").r > at(&nodes, "db").r);
    }

    #[test]
    fn namespace_boxes_hold_their_nodes_and_never_overlap() {
        let mut nodes = Vec::new();
        let mut edges = Vec::new();
        for ns in ["shop", "pay", "ops"] {
            for i in 0..4 {
                nodes.push(node(&format!("{ns}-{i}"), "service", ns, 1.0));
                if i > 0 {
                    edges.push(edge(&format!("{ns}-{}", i - 1), &format!("{ns}-{i}")));
                }
            }
        }
        edges.push(edge("shop-3", "pay-0"));
        edges.push(edge("pay-3", "ops-0"));
        let (w, h, boxes) = layout(&mut nodes, &edges);
        assert_eq!(boxes.len(), 3, "{boxes:?}");
        for b in &boxes {
            assert!(
                b.x >= 0.0 && b.y >= 0.0 && b.x + b.w <= w + 1e-9 && b.y + b.h <= h + 1e-9,
                "{b:?} in {w}×{h}"
            );
            for n in nodes.iter().filter(|n| n.namespace == b.name) {
                assert!(
                    n.x >= b.x && n.x <= b.x + b.w && n.y >= b.y && n.y <= b.y + b.h,
                    "{} outside {b:?}",
                    n.id
                );
            }
        }
        for (i, a) in boxes.iter().enumerate() {
            for b in &boxes[i + 1..] {
                let apart =
                    a.x + a.w <= b.x || b.x + b.w <= a.x || a.y + a.h <= b.y || b.y + b.h <= a.y;
                assert!(apart, "{a:?} overlaps {b:?}");
            }
        }
        // No two nodes on one spot.
        for (i, a) in nodes.iter().enumerate() {
            for b in &nodes[i + 1..] {
                assert!(
                    (a.x, a.y) != (b.x, b.y),
                    "{} and {} share a spot",
                    a.id,
                    b.id
                );
            }
        }
    }

    #[test]
    fn a_refresh_keeps_nodes_in_their_order_and_the_same_graph_draws_the_same() {
        // A graph where laying out afresh after `a` joins (called by s2) would swap s2 and
        // s3 in the first column (the barycentres move); kept, they stay.
        let ids = ["s0", "s1", "s2", "s3", "s4", "s5"];
        let mut nodes: Vec<GNode> = ids.iter().map(|id| node(id, "service", "", 1.0)).collect();
        let mut edges: Vec<GEdge> = [
            ("s0", "s1"),
            ("s0", "s4"),
            ("s0", "s5"),
            ("s1", "s4"),
            ("s3", "s5"),
            ("s4", "s5"),
        ]
        .into_iter()
        .map(|(a, b)| edge(a, b))
        .collect();
        layout(&mut nodes, &edges);
        let first: HashMap<String, (f64, f64)> =
            nodes.iter().map(|n| (n.id.clone(), (n.x, n.y))).collect();
        let before: HashMap<String, f64> = nodes.iter().map(|n| (n.id.clone(), n.y)).collect();

        // The same graph with other rates: the same places.
        for n in nodes.iter_mut() {
            n.data = json!({ "rate": if n.id == "s5" { 50.0 } else { 0.5 } });
        }
        layout(&mut nodes, &edges);
        for n in &nodes {
            assert_eq!(first[&n.id], (n.x, n.y), "{} moved", n.id);
        }

        // A service joins, called by s2: the others keep their column and, within it,
        // their order top to bottom.
        nodes.push(node("a", "service", "", 1.0));
        edges.push(edge("s2", "a"));
        layout_keeping(&mut nodes, &edges, &before);
        let order = |at: &dyn Fn(&str) -> (f64, f64), ids: &[&str]| {
            let mut columns: std::collections::BTreeMap<i64, Vec<(f64, String)>> =
                Default::default();
            for id in ids {
                let (x, y) = at(id);
                columns
                    .entry(x as i64)
                    .or_default()
                    .push((y, id.to_string()));
            }
            columns
                .into_values()
                .map(|mut c| {
                    c.sort_by(|p, q| p.0.partial_cmp(&q.0).unwrap_or(std::cmp::Ordering::Equal));
                    c.into_iter().map(|(_, id)| id).collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        };
        let now = |id: &str| {
            let n = at(&nodes, id);
            (n.x, n.y)
        };
        assert_eq!(order(&now, &ids), order(&|id: &str| first[id], &ids));
        assert_eq!(order(&now, &ids).len(), 4, "four columns");
    }

    #[test]
    fn a_deep_mesh_wraps_instead_of_growing_wider() {
        let n = 3 * MAX_COLS;
        let mut nodes: Vec<GNode> = (0..n)
            .map(|i| node(&format!("s{i}"), "service", "", 1.0))
            .collect();
        let edges: Vec<GEdge> = (1..n)
            .map(|i| edge(&format!("s{}", i - 1), &format!("s{i}")))
            .collect();
        let (w, h, _) = layout(&mut nodes, &edges);
        assert!(
            w <= PAD_X * 2.0 + (MAX_COLS as f64 - 1.0) * COL + 1e-9,
            "{w}"
        );
        assert!(
            h >= PAD_Y * 2.0 + 2.0 * ROW,
            "wrapped onto further lines: {h}"
        );
        for nd in &nodes {
            assert!(
                nd.x <= w && nd.y <= h,
                "{} at ({}, {}) outside {w}×{h}",
                nd.id,
                nd.x,
                nd.y
            );
        }
    }

    #[test]
    fn labels_avoid_nodes_and_each_other_or_are_left_out() {
        let curve: Curve = [(0.0, 0.0), (100.0, 0.0), (200.0, 0.0), (300.0, 0.0)];
        // Two labels on one curve: both placed, apart.
        let spots = place_labels(&[(curve, 60.0), (curve, 60.0)], &[]);
        let (a, b) = (spots[0].expect("first"), spots[1].expect("second"));
        assert_eq!(a, bezier(&curve, 0.5), "the first sits mid-curve");
        let box_of = |(x, y): (f64, f64)| (x - 50.0, y - 16.0, x + 32.0, y + 16.0);
        assert!(!overlaps(&box_of(a), &box_of(b)), "{a:?} {b:?}");
        // A node covering the whole curve: no room, no label.
        let wall: Rect = (-100.0, -100.0, 400.0, 100.0);
        assert_eq!(place_labels(&[(curve, 60.0)], &[wall]), vec![None]);
    }
}
