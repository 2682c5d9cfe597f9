//! The service-dependency graph.
//!
//! Semantics (the contract, `interfaces.md`, "Service graph semantics"):
//! - a CLIENT span of A whose child (same trace, `parent_span_id` = its `span_id`) is a
//!   SERVER span of B is one request on edge A→B; likewise PRODUCER→CONSUMER;
//! - a CLIENT or PRODUCER span with no such child is a request to the peer its `peer_name`
//!   names (the first present of `peer.service`, `db.namespace`/`db.name`,
//!   `db.system.name`/`db.system`, `server.address`/`net.peer.name`,
//!   `messaging.destination.name`, Envoy's `upstream_cluster`, the host of `url.full` /
//!   `http.url`): the edge to that service when it is an instrumented service of the range
//!   (its proxy answered by itself, or the call never reached it), else to a `virtual` node;
//! - a SERVER span with no parent in the trace is a request from the `user` node (whose id
//!   is `user (entry)` when a service is itself called `user`);
//! - a request is an error when either side has status ERROR; its latency is the client
//!   span's duration (the server span's for `user` edges);
//! - every node id appears once and every (source, target) once; each service carries its
//!   `versions` (resource `service.version`), each edge `by_version` (the callee's) and
//!   `reasons` (requests a proxy answered itself: `proxy_reason`);
//! - percentiles are exact (linear interpolation, as `percentile_cont`).
//!
//! From raw spans, one scan of the range feeds the pairing in Rust ([`super::pairing`]),
//! which the rollups and the `/metrics` counters use too. Children are looked for in a window widened by [`PAIR_WINDOW`] so that a pair that
//! straddles the range's edge, or clock skew between services, does not break it. Both
//! paths hand [`ServiceGraph::build`] the same cells (one per edge or service, version and
//! reason), so the graph's rules are written once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use serde::Serialize;

pub use super::model::{
    ComputedFrom, NodeKind, PAIR_WINDOW, Signals, UNKNOWN_VERSION, USER, USER_ENTRY, VersionSignals,
};
use super::model::{EdgeCell, Measure, Raw, SERVED_SQL, ServiceCell, summarise};
use super::range::TimeRange;
pub use super::resilience::EdgeResilience;
use super::round3;
pub use super::security::EdgeSecurity;
use crate::engine::{Params, QueryEngine, QueryError};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub id: String,
    pub kind: NodeKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(flatten)]
    pub signals: Signals,
    /// Per version, busiest first; empty when no span says a version.
    pub versions: Vec<VersionSignals>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Edge {
    pub source: String,
    pub target: String,
    #[serde(flatten)]
    pub signals: Signals,
    /// Per version of the callee, busiest first; empty when it says none.
    pub by_version: Vec<VersionSignals>,
    /// Requests a proxy answered itself, per reason (`circuit-open`, `rate-limited` …).
    pub reasons: BTreeMap<String, u64>,
    /// Where the edge was seen: `spans`, `metrics` (the proxies' request metrics),
    /// `access_logs`. The signals above come from the first of these.
    pub sources: Vec<&'static str>,
    /// The signals each source saw, when more than one saw the edge.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_source: BTreeMap<&'static str, Signals>,
    /// `mtls_ratio`, `client_identities`, `server_identities`, `denied`, `would_deny`.
    #[serde(flatten)]
    pub security: EdgeSecurity,
    /// `ejections`, `breaker_opened`, `breaker_closed`, `retry_budget_exhausted`: from
    /// the range's spans, so absent when the graph comes from the rollups.
    #[serde(flatten)]
    pub resilience: Option<EdgeResilience>,
}

/// The graph as petgraph holds it; node ids are unique.
#[derive(Debug, Clone, Default)]
pub struct ServiceGraph {
    pub(crate) graph: DiGraph<Node, Edge>,
    index: HashMap<String, NodeIndex>,
}

/// A service's own requests (its SERVER and CONSUMER spans), per service: the statement
/// and the values it binds.
pub(crate) fn services_sql(range: &TimeRange, service: Option<&str>) -> (String, Params) {
    let mut params = Params::default();
    let only = service
        .map(|s| format!(" AND service_name = {}", params.bind(s)))
        .unwrap_or_default();
    let sql = format!(
        "SELECT service_name AS name, max(service_namespace) AS namespace, count(*) AS requests,
                sum(CASE WHEN status_code = 'ERROR' THEN 1 ELSE 0 END) AS errors,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ns) AS p50_ns,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ns) AS p95_ns,
                percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_ns) AS p99_ns
         FROM spans WHERE {} AND {served}{only}
         GROUP BY service_name",
        range.sql("start_time"),
        served = SERVED_SQL,
    );
    (sql, params)
}

impl ServiceGraph {
    /// The node `id`, made with `kind` when it is new.
    fn node(&mut self, kind: NodeKind, id: &str) -> NodeIndex {
        if let Some(i) = self.index.get(id) {
            return *i;
        }
        let i = self.graph.add_node(Node {
            id: id.to_string(),
            kind,
            namespace: None,
            signals: Signals::default(),
            versions: Vec::new(),
        });
        self.index.insert(id.to_string(), i);
        i
    }

    /// The node with this id, if there is one.
    pub fn find(&self, id: &str) -> Option<&Node> {
        self.index.get(id).map(|i| &self.graph[*i])
    }

    /// Computes the graph of a time range from the raw spans (exact percentiles).
    pub async fn compute(
        engine: &QueryEngine,
        range: &TimeRange,
    ) -> Result<ServiceGraph, QueryError> {
        let found = super::pairing::analyse(engine, range).await?;
        let services = found
            .services
            .into_iter()
            .map(|s| ServiceCell {
                service: s.service,
                namespace: s.namespace,
                version: s.version,
                measure: Raw {
                    latencies_ns: s.latencies_ns,
                    errors: s.errors,
                },
            })
            .collect();
        let edges = found
            .edges
            .into_iter()
            .map(|e| EdgeCell {
                source: e.source,
                target: e.target,
                target_kind: e.target_kind,
                version: e.version,
                reason: e.reason,
                measure: Raw {
                    latencies_ns: e.latencies_ns,
                    errors: e.errors,
                },
            })
            .collect();
        // Percentiles and summaries: CPU work, on the query runtime.
        let seconds = range.seconds();
        engine
            .compute(move || ServiceGraph::build(services, edges, seconds))
            .await
    }

    /// Computes the graph from per-minute rollups (sketch percentiles, within 1%).
    pub async fn compute_from_rollups(
        engine: &QueryEngine,
        range: &TimeRange,
    ) -> Result<ServiceGraph, QueryError> {
        let mut services = Vec::new();
        let mut edges = Vec::new();
        for (key, agg) in super::rollup::aggregates(engine, range).await? {
            match key.kind.as_str() {
                "service" => services.push(ServiceCell {
                    service: key.source,
                    namespace: key.namespace,
                    version: key.version,
                    measure: agg,
                }),
                "edge" => {
                    let entry = match key.source_kind.as_deref() {
                        Some(kind) => kind == "user",
                        None => key.source == USER,
                    };
                    edges.push(EdgeCell {
                        source: (!entry).then_some(key.source),
                        target: key.target.unwrap_or_default(),
                        target_kind: if key.target_kind.as_deref() == Some("virtual") {
                            NodeKind::Virtual
                        } else {
                            NodeKind::Service
                        },
                        version: key.version,
                        reason: key.reason,
                        measure: agg,
                    });
                }
                _ => {}
            }
        }
        // Percentiles and summaries: CPU work, on the query runtime.
        let seconds = range.seconds();
        engine
            .compute(move || ServiceGraph::build(services, edges, seconds))
            .await
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
        // Access logs fill the edges they saw that the metrics say nothing about.
        let log_edges: Vec<(String, String)> = g
            .edges()
            .filter(|e| e.sources.contains(&"access_logs"))
            .map(|e| (e.source.clone(), e.target.clone()))
            .collect();
        let security = super::security::by_edge_filling(engine, range, |found| {
            log_edges.iter().any(|k| !found.contains_key(k))
        })
        .await?;
        g.add_security(security);
        if path == ComputedFrom::Spans {
            g.add_resilience(super::resilience::by_edge(engine, range).await?);
        }
        Ok(g)
    }

    /// Puts on each edge what its callers' proxies did (ejections, breaker transitions,
    /// retries the budget refused).
    pub fn add_resilience(&mut self, counts: super::resilience::ResilienceByEdge) {
        for e in self.graph.edge_weights_mut() {
            e.resilience = Some(EdgeResilience::default());
        }
        for ((source, target), r) in counts {
            let (Some(s), Some(t)) = (self.index.get(&source), self.index.get(&target)) else {
                continue;
            };
            if let Some(e) = self.graph.find_edge(*s, *t) {
                self.graph[e].resilience = Some(r);
            }
        }
    }

    /// Puts each edge's security (mTLS share, identities, denials) on it.
    pub fn add_security(&mut self, security: super::security::SecurityByEdge) {
        for ((source, target), sec) in security {
            let (Some(s), Some(t)) = (self.index.get(&source), self.index.get(&target)) else {
                continue;
            };
            if let Some(e) = self.graph.find_edge(*s, *t) {
                self.graph[e].security = sec;
            }
        }
    }

    /// Adds what another source of telemetry saw: an edge it shares with what is already
    /// there gains the source's name and its signals under `by_source`; an edge only it saw
    /// is added with its signals, versions and reasons (its ends become service nodes
    /// unless the graph already has them).
    pub fn add_source(&mut self, name: &'static str, edges: super::mesh_edges::EdgeSignals) {
        for ((source, target), seen) in edges {
            let s = self.node(NodeKind::Service, &source);
            let t = self.node(NodeKind::Service, &target);
            match self.graph.find_edge(s, t) {
                Some(e) => {
                    let edge = &mut self.graph[e];
                    if edge.by_source.is_empty() {
                        let first = edge.sources[0];
                        edge.by_source.insert(first, edge.signals.clone());
                    }
                    edge.sources.push(name);
                    edge.by_source.insert(name, seen.signals);
                    if edge.by_version.is_empty() {
                        edge.by_version = seen.by_version;
                    }
                    for (reason, n) in seen.reasons {
                        let r = edge.reasons.entry(reason).or_insert(0);
                        *r = (*r).max(n);
                    }
                }
                None => {
                    self.graph.add_edge(
                        s,
                        t,
                        Edge {
                            source,
                            target,
                            signals: seen.signals,
                            by_version: seen.by_version,
                            reasons: seen.reasons,
                            sources: vec![name],
                            by_source: BTreeMap::new(),
                            security: EdgeSecurity::default(),
                            resilience: None,
                        },
                    );
                }
            }
        }
    }

    /// The graph from cells of requests: services first, then every edge's cells summed,
    /// its ends made nodes (one per id); virtual and user nodes carry the sum of their
    /// edges' traffic.
    pub(crate) fn build<M: Measure>(
        services: Vec<ServiceCell<M>>,
        edges: Vec<EdgeCell<M>>,
        seconds: f64,
    ) -> ServiceGraph {
        let mut g = ServiceGraph::default();
        let mut own: BTreeMap<String, (Option<String>, Vec<_>)> = BTreeMap::new();
        for c in services {
            let e = own.entry(c.service).or_default();
            if c.namespace > e.0 {
                e.0 = c.namespace;
            }
            e.1.push((c.version, None, c.measure));
        }
        // Every name a service goes by: its own requests, or calls it makes.
        let mut service_names: BTreeSet<String> = own.keys().cloned().collect();
        service_names.extend(edges.iter().filter_map(|e| e.source.clone()));
        let entry = if service_names.contains(USER)
            || edges
                .iter()
                .any(|e| e.target_kind == NodeKind::Virtual && e.target == USER)
        {
            USER_ENTRY
        } else {
            USER
        };
        for (name, (namespace, cells)) in own {
            let (signals, versions, _) = summarise(cells, seconds);
            let i = g.node(NodeKind::Service, &name);
            let n = &mut g.graph[i];
            n.signals = signals;
            n.versions = versions;
            n.namespace = namespace;
        }
        type EdgeId = (Option<String>, String, NodeKind);
        let mut by_edge: BTreeMap<EdgeId, Vec<_>> = BTreeMap::new();
        for e in edges {
            // A virtual peer that is a service of the range is that service (rollups of
            // older versions kept such requests apart).
            let kind = if e.target_kind == NodeKind::Virtual && service_names.contains(&e.target) {
                NodeKind::Service
            } else {
                e.target_kind
            };
            by_edge
                .entry((e.source, e.target, kind))
                .or_default()
                .push((e.version, e.reason, e.measure));
        }
        let mut derived: BTreeMap<(NodeKind, String), (u64, u64)> = BTreeMap::new();
        for ((source, target, target_kind), cells) in by_edge {
            let (signals, by_version, reasons) = summarise(cells, seconds);
            let (source_kind, source) = match source {
                Some(s) => (NodeKind::Service, s),
                None => (NodeKind::User, entry.to_string()),
            };
            for (kind, id) in [(source_kind, &source), (target_kind, &target)] {
                if kind != NodeKind::Service {
                    let d = derived.entry((kind, id.clone())).or_default();
                    d.0 += signals.requests;
                    d.1 += signals.errors;
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
                    by_version,
                    reasons,
                    sources: vec!["spans"],
                    by_source: BTreeMap::new(),
                    security: EdgeSecurity::default(),
                    resilience: None,
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
            .map(|i| (graph[i].id.clone(), i))
            .collect();
        ServiceGraph { graph, index }
    }

    /// Every node, in no particular order.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.graph.node_weights()
    }

    /// Every edge, in no particular order.
    pub fn edges(&self) -> impl Iterator<Item = &Edge> {
        self.graph.edge_weights()
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
                    by_version: Vec::new(),
                    reasons: BTreeMap::new(),
                    sources: vec!["spans"],
                    by_source: BTreeMap::new(),
                    security: EdgeSecurity::default(),
                    resilience: None,
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
