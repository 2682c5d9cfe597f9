//! The service-dependency graph.
//!
//! Semantics (the contract, `interfaces.md`, "Service graph semantics"):
//! - a CLIENT span of A whose child (same trace, `parent_span_id` = its `span_id`) is a
//!   SERVER span of B is one request on edge A→B; likewise PRODUCER→CONSUMER;
//! - a CLIENT or PRODUCER span with no such child is a request to a `virtual` node named by
//!   the first present of `peer.service`, `db.namespace`/`db.name`,
//!   `db.system.name`/`db.system`, `server.address`/`net.peer.name`,
//!   `messaging.destination.name`;
//! - a SERVER span with no parent in the trace is a request from the `user` node;
//! - a request is an error when either side has status ERROR; its latency is the client
//!   span's duration (the server span's for `user` edges);
//! - percentiles are exact (linear interpolation, DataFusion's `percentile_cont`).
//!
//! From raw spans, one scan of the range feeds the pairing in Rust ([`super::pairing`]),
//! which the rollups and the `/metrics` counters use too. Children are looked for in a window widened by [`PAIR_WINDOW`] so that a pair that
//! straddles the range's edge, or clock skew between services, does not break it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use serde::Serialize;

use super::range::{TimeRange, sql_str};
use super::{f64_of, round3, u64_of};
use crate::engine::{QueryEngine, QueryError};

/// How far outside the range the other half of a pair may start.
pub const PAIR_WINDOW: i64 = 5; // minutes

/// Where a range's signals are computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputedFrom {
    /// Raw spans: exact percentiles; the default for ranges up to an hour.
    Spans,
    /// Per-minute rollups (and raw spans for the minutes not rolled up yet): percentiles
    /// within 1%; the default for longer ranges.
    Rollups,
}

impl ComputedFrom {
    /// From the `source` query parameter (`spans`, `rollups` or `auto`).
    pub fn choose(param: Option<&str>, range: &TimeRange) -> Result<ComputedFrom, QueryError> {
        match param {
            Some("spans") | Some("raw") => Ok(ComputedFrom::Spans),
            Some("rollups") => Ok(ComputedFrom::Rollups),
            None | Some("") | Some("auto") => Ok(if range.seconds() > 3600.0 {
                ComputedFrom::Rollups
            } else {
                ComputedFrom::Spans
            }),
            Some(other) => Err(QueryError::Invalid(format!(
                "source must be spans, rollups or auto, got {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ComputedFrom::Spans => "spans",
            ComputedFrom::Rollups => "rollups",
        }
    }
}

/// The node kinds of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Service,
    Virtual,
    User,
}

/// Request-level golden signals of a node or an edge.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Signals {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl Signals {
    /// Signals of `requests` over `seconds`, with p50/p95/p99 latencies in nanoseconds.
    pub(crate) fn new(
        requests: u64,
        errors: u64,
        seconds: f64,
        [p50_ns, p95_ns, p99_ns]: [f64; 3],
    ) -> Signals {
        Signals {
            requests,
            errors,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            rate: round3(requests as f64 / seconds),
            p50_ms: round3(p50_ns / 1e6),
            p95_ms: round3(p95_ns / 1e6),
            p99_ms: round3(p99_ns / 1e6),
        }
    }

    pub(crate) fn from_row(
        row: &serde_json::Map<String, serde_json::Value>,
        seconds: f64,
    ) -> Signals {
        let ns = |k: &str| f64_of(row, k);
        Signals::new(
            u64_of(row, "requests"),
            u64_of(row, "errors"),
            seconds,
            [ns("p50_ns"), ns("p95_ns"), ns("p99_ns")],
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub id: String,
    pub kind: NodeKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(flatten)]
    pub signals: Signals,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Edge {
    pub source: String,
    pub target: String,
    #[serde(flatten)]
    pub signals: Signals,
    /// Where the edge was seen: `spans`, `metrics` (the proxies' request metrics),
    /// `access_logs`. The signals above come from the first of these.
    pub sources: Vec<&'static str>,
    /// The signals each source saw, when more than one saw the edge.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_source: BTreeMap<&'static str, Signals>,
}

/// The graph as petgraph holds it.
#[derive(Debug, Clone, Default)]
pub struct ServiceGraph {
    pub graph: DiGraph<Node, Edge>,
    index: HashMap<(NodeKind, String), NodeIndex>,
}

/// A service's own requests (its SERVER and CONSUMER spans), per service.
pub(crate) fn services_sql(range: &TimeRange, service: Option<&str>) -> String {
    let only = service
        .map(|s| format!(" AND service_name = {}", sql_str(s)))
        .unwrap_or_default();
    format!(
        "SELECT service_name AS name, max(service_namespace) AS namespace, count(*) AS requests,
                sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) AS errors,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ns) AS p50_ns,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ns) AS p95_ns,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ns) AS p99_ns
         FROM spans WHERE {} AND span_kind IN ('SERVER', 'CONSUMER'){only}
         GROUP BY service_name",
        range.sql("start_time")
    )
}

impl ServiceGraph {
    fn node(&mut self, kind: NodeKind, id: &str) -> NodeIndex {
        if let Some(i) = self.index.get(&(kind, id.to_string())) {
            return *i;
        }
        let i = self.graph.add_node(Node {
            id: id.to_string(),
            kind,
            namespace: None,
            signals: Signals::default(),
        });
        self.index.insert((kind, id.to_string()), i);
        i
    }

    /// Computes the graph of a time range from the raw spans (exact percentiles).
    pub async fn compute(
        engine: &QueryEngine,
        range: &TimeRange,
    ) -> Result<ServiceGraph, QueryError> {
        let seconds = range.seconds();
        let found = super::pairing::analyse(engine, range).await?;
        Ok(ServiceGraph::assemble(found.services, found.edges, seconds))
    }

    /// Computes the graph from per-minute rollups (sketch percentiles, within 1%).
    pub async fn compute_from_rollups(
        engine: &QueryEngine,
        range: &TimeRange,
    ) -> Result<ServiceGraph, QueryError> {
        let seconds = range.seconds();
        let mut services = Vec::new();
        let mut edges = Vec::new();
        for ((kind, source, target, target_kind, ns), agg) in
            super::rollup::aggregates(engine, range).await?
        {
            match kind.as_str() {
                "service" => services.push((source, ns, agg.signals(seconds))),
                "edge" => {
                    let tk = if target_kind.as_deref() == Some("virtual") {
                        NodeKind::Virtual
                    } else {
                        NodeKind::Service
                    };
                    edges.push((source, target.unwrap_or_default(), tk, agg.signals(seconds)));
                }
                _ => {}
            }
        }
        Ok(ServiceGraph::assemble(services, edges, seconds))
    }

    /// Computes the graph by the path the range calls for, with the edges the mesh's own
    /// telemetry (request metrics, access logs) adds.
    pub async fn compute_by(
        engine: &QueryEngine,
        range: &TimeRange,
        path: ComputedFrom,
    ) -> Result<ServiceGraph, QueryError> {
        let mut g = match path {
            ComputedFrom::Spans => ServiceGraph::compute(engine, range).await?,
            ComputedFrom::Rollups => ServiceGraph::compute_from_rollups(engine, range).await?,
        };
        g.add_source(
            "metrics",
            super::mesh_edges::from_metrics(engine, range).await?,
        );
        g.add_source(
            "access_logs",
            super::mesh_edges::from_access_logs(engine, range).await?,
        );
        Ok(g)
    }

    /// Adds what another source of telemetry saw: an edge it shares with what is already
    /// there gains the source's name and its signals under `by_source`; an edge only it saw
    /// is added with its signals (its ends become service nodes).
    pub fn add_source(&mut self, name: &'static str, edges: super::mesh_edges::EdgeSignals) {
        for ((source, target), signals) in edges {
            let existing = self
                .graph
                .edge_indices()
                .find(|e| self.graph[*e].source == source && self.graph[*e].target == target);
            match existing {
                Some(e) => {
                    let edge = &mut self.graph[e];
                    if edge.by_source.is_empty() {
                        let first = edge.sources[0];
                        edge.by_source.insert(first, edge.signals.clone());
                    }
                    edge.sources.push(name);
                    edge.by_source.insert(name, signals);
                }
                None => {
                    // An end the spans already know (e.g. a database seen as a virtual
                    // node) keeps its node; only unknown ends become services.
                    let known = |g: &Self, id: &str| {
                        [NodeKind::Service, NodeKind::Virtual]
                            .into_iter()
                            .find_map(|k| g.index.get(&(k, id.to_string())).copied())
                    };
                    let s = known(self, &source)
                        .unwrap_or_else(|| self.node(NodeKind::Service, &source));
                    let t = known(self, &target)
                        .unwrap_or_else(|| self.node(NodeKind::Service, &target));
                    self.graph.add_edge(
                        s,
                        t,
                        Edge {
                            source,
                            target,
                            signals,
                            sources: vec![name],
                            by_source: BTreeMap::new(),
                        },
                    );
                }
            }
        }
    }

    fn assemble(
        services: Vec<(String, Option<String>, Signals)>,
        edges: Vec<(String, String, NodeKind, Signals)>,
        seconds: f64,
    ) -> ServiceGraph {
        let mut g = ServiceGraph::default();
        for (name, namespace, signals) in services {
            let i = g.node(NodeKind::Service, &name);
            g.graph[i].signals = signals;
            g.graph[i].namespace = namespace;
        }
        // Virtual and user nodes carry the sum of their edges' traffic.
        let mut derived: BTreeMap<(NodeKind, String), (u64, u64)> = BTreeMap::new();
        for (source, target, target_kind, signals) in edges {
            let source_kind = if source == "user" {
                NodeKind::User
            } else {
                NodeKind::Service
            };
            for (kind, id) in [(source_kind, &source), (target_kind, &target)] {
                if kind != NodeKind::Service {
                    let e = derived.entry((kind, id.clone())).or_default();
                    e.0 += signals.requests;
                    e.1 += signals.errors;
                }
            }
            let s = g.node(source_kind, &source);
            let t = g.node(target_kind, &target);
            g.graph.add_edge(
                s,
                t,
                Edge {
                    source,
                    target,
                    signals,
                    sources: vec!["spans"],
                    by_source: BTreeMap::new(),
                },
            );
        }
        for ((kind, id), (requests, errors)) in derived {
            let i = g.node(kind, &id);
            let n = &mut g.graph[i].signals;
            n.requests = requests;
            n.errors = errors;
            n.error_rate = if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            };
            n.rate = round3(requests as f64 / seconds);
        }
        g
    }

    /// Keeps the services of `namespace` (and the virtual and user nodes they touch).
    pub fn in_namespace(&self, namespace: &str) -> ServiceGraph {
        let keep: HashSet<NodeIndex> = self
            .graph
            .node_indices()
            .filter(|i| self.graph[*i].namespace.as_deref() == Some(namespace))
            .collect();
        let mut with_neighbours = keep.clone();
        for e in self.graph.edge_references() {
            let (s, t) = (e.source(), e.target());
            if keep.contains(&s) && self.graph[t].kind != NodeKind::Service {
                with_neighbours.insert(t);
            }
            if keep.contains(&t) && self.graph[s].kind != NodeKind::Service {
                with_neighbours.insert(s);
            }
        }
        self.subgraph(&with_neighbours)
    }

    /// Keeps `service` and every node within `depth` hops of it, in either direction.
    pub fn around(&self, service: &str, depth: usize) -> ServiceGraph {
        let Some(start) = self
            .graph
            .node_indices()
            .find(|i| self.graph[*i].id == service)
        else {
            return ServiceGraph::default();
        };
        let mut seen = HashSet::from([start]);
        let mut queue = VecDeque::from([(start, 0usize)]);
        while let Some((n, d)) = queue.pop_front() {
            if d == depth {
                continue;
            }
            for m in self.graph.neighbors_undirected(n) {
                if seen.insert(m) {
                    queue.push_back((m, d + 1));
                }
            }
        }
        self.subgraph(&seen)
    }

    fn subgraph(&self, keep: &HashSet<NodeIndex>) -> ServiceGraph {
        let graph = self.graph.filter_map(
            |i, n| keep.contains(&i).then(|| n.clone()),
            |_, e| Some(e.clone()),
        );
        let index = graph
            .node_indices()
            .map(|i| ((graph[i].kind, graph[i].id.clone()), i))
            .collect();
        ServiceGraph { graph, index }
    }

    /// `{"nodes": […], "edges": […]}`, sorted for stable output.
    pub fn to_json(&self) -> serde_json::Value {
        let mut nodes: Vec<&Node> = self.graph.node_weights().collect();
        nodes.sort_by(|a, b| (a.kind, &a.id).cmp(&(b.kind, &b.id)));
        let mut edges: Vec<&Edge> = self.graph.edge_weights().collect();
        edges.sort_by(|a, b| (&a.source, &a.target).cmp(&(&b.source, &b.target)));
        serde_json::json!({ "nodes": nodes, "edges": edges })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &str)]) -> ServiceGraph {
        let mut g = ServiceGraph::default();
        for (s, t) in edges {
            let sk = if *s == "user" {
                NodeKind::User
            } else {
                NodeKind::Service
            };
            let a = g.node(sk, s);
            let b = g.node(NodeKind::Service, t);
            g.graph.add_edge(
                a,
                b,
                Edge {
                    source: s.to_string(),
                    target: t.to_string(),
                    signals: Signals::default(),
                    sources: vec!["spans"],
                    by_source: BTreeMap::new(),
                },
            );
        }
        g
    }

    #[test]
    fn neighbourhood_by_hops() {
        let g = graph(&[
            ("user", "a"),
            ("a", "b"),
            ("b", "c"),
            ("c", "d"),
            ("x", "y"),
        ]);
        let ids = |g: &ServiceGraph| {
            let mut v: Vec<String> = g.graph.node_weights().map(|n| n.id.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(ids(&g.around("b", 1)), vec!["a", "b", "c"]);
        assert_eq!(ids(&g.around("b", 2)), vec!["a", "b", "c", "d", "user"]);
        assert_eq!(g.around("b", 1).graph.edge_count(), 2);
        assert!(g.around("nope", 3).graph.node_count() == 0);
    }
}
