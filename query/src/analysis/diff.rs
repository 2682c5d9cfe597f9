//! The topology of one window against a base window (`GET /api/v1/graph/diff`): each node
//! and edge of either marked `added`, `removed`, `changed` or `same`, with both windows'
//! requests, error rates and p99s side by side.
//!
//! "changed" means the error rate moved by at least [`Thresholds::error_rate_delta`]
//! (absolute, 0–1) or the p99 by at least [`Thresholds::p99_ratio`] of the base's and at
//! least [`Thresholds::p99_floor_ms`]; the floor keeps sub-millisecond jitter on fast
//! edges from reading as a change. Both windows are computed by the same path (rollups for
//! long windows), so a day compared with the day before costs two rollup scans.

use std::collections::BTreeMap;

use serde::Serialize;

use super::graph::{NodeKind, ServiceGraph, Signals};

/// When a node or edge present in both windows counts as changed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    /// Absolute change of the error rate (0–1) [0.02: two percentage points].
    pub error_rate_delta: f64,
    /// Relative change of the p99 [0.5: 50% slower or faster].
    pub p99_ratio: f64,
    /// Smallest absolute change of the p99 that counts, in ms [1].
    pub p99_floor_ms: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            error_rate_delta: 0.02,
            p99_ratio: 0.5,
            p99_floor_ms: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    Changed,
    Same,
}

/// The signals of the window and of the base, side by side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Compared {
    pub change: Change,
    pub requests: u64,
    pub base_requests: u64,
    pub rate: f64,
    pub base_rate: f64,
    pub error_rate: f64,
    pub base_error_rate: f64,
    pub p99_ms: f64,
    pub base_p99_ms: f64,
    /// What moved beyond its threshold: `error_rate`, `p99`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffNode {
    pub id: String,
    pub kind: NodeKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(flatten)]
    pub compared: Compared,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffEdge {
    pub source: String,
    pub target: String,
    #[serde(flatten)]
    pub compared: Compared,
}

/// How many nodes and edges of each kind of change.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
    pub same: usize,
}

impl Summary {
    fn count(&mut self, c: Change) {
        match c {
            Change::Added => self.added += 1,
            Change::Removed => self.removed += 1,
            Change::Changed => self.changed += 1,
            Change::Same => self.same += 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GraphDiff {
    pub nodes: Vec<DiffNode>,
    pub edges: Vec<DiffEdge>,
    pub thresholds: Thresholds,
    pub node_changes: Summary,
    pub edge_changes: Summary,
}

fn compare(now: Option<&Signals>, base: Option<&Signals>, t: &Thresholds) -> Compared {
    let zero = Signals::default();
    let (n, b) = (now.unwrap_or(&zero), base.unwrap_or(&zero));
    let mut moved = Vec::new();
    let change = match (now, base) {
        (Some(_), None) => Change::Added,
        (None, _) => Change::Removed,
        (Some(n), Some(b)) => {
            // A side without requests (a node only seen calling out) has no rate to compare.
            if n.requests > 0 && b.requests > 0 {
                if (n.error_rate - b.error_rate).abs() >= t.error_rate_delta {
                    moved.push("error_rate");
                }
                let dp = (n.p99_ms - b.p99_ms).abs();
                if dp >= t.p99_floor_ms && dp >= t.p99_ratio * b.p99_ms {
                    moved.push("p99");
                }
            }
            if moved.is_empty() {
                Change::Same
            } else {
                Change::Changed
            }
        }
    };
    Compared {
        change,
        requests: n.requests,
        base_requests: b.requests,
        rate: n.rate,
        base_rate: b.rate,
        error_rate: n.error_rate,
        base_error_rate: b.error_rate,
        p99_ms: n.p99_ms,
        base_p99_ms: b.p99_ms,
        moved,
    }
}

/// `now` against `base`: every node and edge of either, sorted for stable output.
pub fn diff(now: &ServiceGraph, base: &ServiceGraph, t: Thresholds) -> GraphDiff {
    let mut nodes: BTreeMap<(NodeKind, &str), (Option<_>, Option<_>)> = BTreeMap::new();
    for n in now.nodes() {
        nodes.entry((n.kind, n.id.as_str())).or_default().0 = Some(n);
    }
    for n in base.nodes() {
        nodes.entry((n.kind, n.id.as_str())).or_default().1 = Some(n);
    }
    let mut edges: BTreeMap<(&str, &str), (Option<_>, Option<_>)> = BTreeMap::new();
    for e in now.edges() {
        edges
            .entry((e.source.as_str(), e.target.as_str()))
            .or_default()
            .0 = Some(e);
    }
    for e in base.edges() {
        edges
            .entry((e.source.as_str(), e.target.as_str()))
            .or_default()
            .1 = Some(e);
    }
    let mut out = GraphDiff {
        nodes: Vec::with_capacity(nodes.len()),
        edges: Vec::with_capacity(edges.len()),
        thresholds: t,
        node_changes: Summary::default(),
        edge_changes: Summary::default(),
    };
    for ((kind, id), (n, b)) in nodes {
        let compared = compare(n.map(|n| &n.signals), b.map(|b| &b.signals), &t);
        out.node_changes.count(compared.change);
        out.nodes.push(DiffNode {
            id: id.to_string(),
            kind,
            namespace: n.or(b).and_then(|x| x.namespace.clone()),
            compared,
        });
    }
    for ((source, target), (e, b)) in edges {
        let compared = compare(e.map(|e| &e.signals), b.map(|b| &b.signals), &t);
        out.edge_changes.count(compared.change);
        out.edges.push(DiffEdge {
            source: source.to_string(),
            target: target.to_string(),
            compared,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::model::{EdgeCell, Raw, ServiceCell};

    /// A graph of `user → a` plus the given edges, each with `n` requests of `ms` latency
    /// and `errors` errors.
    fn graph(edges: &[(&str, &str, u64, u64, i64)]) -> ServiceGraph {
        let cell = |n: u64, errors: u64, ms: i64| Raw {
            latencies_ns: vec![ms * 1_000_000; n as usize],
            errors,
        };
        let services = edges
            .iter()
            .map(|(_, t, n, e, ms)| ServiceCell {
                service: t.to_string(),
                namespace: Some("shop".into()),
                version: None,
                measure: cell(*n, *e, *ms),
            })
            .collect();
        let cells = edges
            .iter()
            .map(|(s, t, n, e, ms)| EdgeCell {
                source: (*s != "user").then(|| s.to_string()),
                target: t.to_string(),
                target_kind: NodeKind::Service,
                version: None,
                reason: None,
                measure: cell(*n, *e, *ms),
            })
            .collect();
        ServiceGraph::build(services, cells, 60.0)
    }

    #[test]
    fn each_node_and_edge_is_marked_against_the_base() {
        let base = graph(&[
            ("user", "a", 100, 0, 10),
            ("a", "b", 100, 1, 10),
            ("a", "old", 10, 0, 5),
            ("a", "slow", 100, 0, 10),
        ]);
        let now = graph(&[
            ("user", "a", 100, 0, 10),
            // 1% → 10% errors: changed.
            ("a", "b", 100, 10, 10),
            ("a", "new", 10, 0, 5),
            // p99 10 → 30 ms: changed.
            ("a", "slow", 100, 0, 30),
        ]);
        let d = diff(&now, &base, Thresholds::default());
        let edge = |s: &str, t: &str| {
            d.edges
                .iter()
                .find(|e| e.source == s && e.target == t)
                .unwrap_or_else(|| panic!("no edge {s}→{t}: {d:?}"))
        };
        assert_eq!(edge("user", "a").compared.change, Change::Same);
        let b = &edge("a", "b").compared;
        assert_eq!(b.change, Change::Changed);
        assert_eq!(b.moved, vec!["error_rate"]);
        assert_eq!((b.error_rate, b.base_error_rate), (0.1, 0.01));
        assert_eq!(edge("a", "new").compared.change, Change::Added);
        let old = &edge("a", "old").compared;
        assert_eq!(old.change, Change::Removed);
        assert_eq!((old.requests, old.base_requests), (0, 10));
        let slow = &edge("a", "slow").compared;
        assert_eq!(slow.moved, vec!["p99"]);
        assert_eq!((slow.p99_ms, slow.base_p99_ms), (30.0, 10.0));
        let node = |id: &str| d.nodes.iter().find(|n| n.id == id).unwrap();
        assert_eq!(node("new").compared.change, Change::Added);
        assert_eq!(node("old").compared.change, Change::Removed);
        assert_eq!(node("old").namespace.as_deref(), Some("shop"));
        assert_eq!(
            d.edge_changes,
            Summary {
                added: 1,
                removed: 1,
                changed: 2,
                same: 1
            }
        );
    }

    #[test]
    fn small_moves_stay_same() {
        let base = graph(&[("user", "a", 100, 1, 10), ("a", "fast", 100, 0, 1)]);
        // One point more errors, and 1 → 1.6 ms on a fast edge: under the thresholds
        // (2 points; 50% but at least 1 ms).
        let now = graph(&[("user", "a", 100, 2, 14), ("a", "fast", 100, 0, 1)]);
        let d = diff(&now, &base, Thresholds::default());
        assert!(
            d.edges.iter().all(|e| e.compared.change == Change::Same),
            "{d:?}"
        );
        // Tighter thresholds see them.
        let tight = Thresholds {
            error_rate_delta: 0.005,
            p99_ratio: 0.2,
            p99_floor_ms: 0.0,
        };
        let d = diff(&now, &base, tight);
        let a = d.edges.iter().find(|e| e.target == "a").unwrap();
        assert_eq!(a.compared.moved, vec!["error_rate", "p99"]);
    }
}
