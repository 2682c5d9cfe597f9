//! The service graph as Graphviz DOT (`GET /api/v1/graph?format=dot`): one cluster per
//! namespace, services as rounded boxes, virtual nodes (databases, external hosts) as
//! cylinders, the entry point as a circle; each edge labelled with the chosen signal and
//! coloured by its error rate, dashed where some of its requests were plaintext.
//! `dot -Tsvg` draws it.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::graph::{Edge, Node, NodeKind, ServiceGraph};

/// What each edge's label shows (`label=` on the graph endpoints and the UI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EdgeLabel {
    /// Requests per second.
    #[default]
    Rate,
    /// Error rate, with the count.
    Errors,
    P99,
    /// Share over mutual TLS.
    Mtls,
    None,
}

impl std::str::FromStr for EdgeLabel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "rate" => EdgeLabel::Rate,
            "errors" => EdgeLabel::Errors,
            "p99" => EdgeLabel::P99,
            "mtls" => EdgeLabel::Mtls,
            "none" => EdgeLabel::None,
            other => {
                return Err(format!(
                    "label must be rate, errors, p99, mtls or none, got {other:?}"
                ));
            }
        })
    }
}

/// A DOT double-quoted string.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn edge_label(e: &Edge, label: EdgeLabel) -> Option<String> {
    let s = &e.signals;
    match label {
        EdgeLabel::Rate => Some(format!("{:.2}/s", s.rate)),
        EdgeLabel::Errors => Some(format!("{:.1}% ({})", s.error_rate * 100.0, s.errors)),
        EdgeLabel::P99 => Some(format!("p99 {} ms", s.p99_ms)),
        EdgeLabel::Mtls => e
            .security
            .mtls_ratio
            .map(|r| format!("mTLS {:.0}%", r * 100.0)),
        EdgeLabel::None => None,
    }
}

fn node_line(out: &mut String, indent: &str, n: &Node) {
    let shape = match n.kind {
        NodeKind::Service => "box, style=rounded",
        NodeKind::Virtual => "cylinder",
        NodeKind::User => "circle",
    };
    let mut label = n.id.clone();
    if n.kind == NodeKind::Service && n.signals.requests > 0 {
        let _ = write!(
            label,
            "\n{:.2}/s, {:.1}% errors",
            n.signals.rate,
            n.signals.error_rate * 100.0
        );
    }
    if n.versions.len() > 1 {
        let versions: Vec<&str> = n.versions.iter().map(|v| v.version.as_str()).collect();
        let _ = write!(label, "\n{}", versions.join(" · "));
    }
    // `\n` in a DOT label is its line break; `quoted` removes raw newlines.
    let label = quoted(&label.replace('\n', "\u{1}")).replace('\u{1}', "\\n");
    let _ = writeln!(
        out,
        "{indent}{} [shape={shape}, label={label}];",
        quoted(&n.id)
    );
}

impl ServiceGraph {
    /// The graph in DOT, sorted for stable output.
    pub fn to_dot(&self, label: EdgeLabel) -> String {
        let mut out = String::from(
            "digraph meshscope {\n  rankdir=LR;\n  node [fontname=\"Helvetica\", fontsize=11];\n  edge [fontname=\"Helvetica\", fontsize=9];\n",
        );
        let mut by_namespace: BTreeMap<Option<&str>, Vec<&Node>> = BTreeMap::new();
        for n in self.nodes() {
            by_namespace
                .entry(n.namespace.as_deref())
                .or_default()
                .push(n);
        }
        for (ns, mut nodes) in by_namespace {
            nodes.sort_by(|a, b| a.id.cmp(&b.id));
            match ns {
                Some(ns) => {
                    let _ = writeln!(out, "  subgraph {} {{", quoted(&format!("cluster_{ns}")));
                    let _ = writeln!(out, "    label={}; style=dashed;", quoted(ns));
                    for n in nodes {
                        node_line(&mut out, "    ", n);
                    }
                    out.push_str("  }\n");
                }
                None => {
                    for n in nodes {
                        node_line(&mut out, "  ", n);
                    }
                }
            }
        }
        let mut edges: Vec<&Edge> = self.edges().collect();
        edges.sort_by(|a, b| (&a.source, &a.target).cmp(&(&b.source, &b.target)));
        for e in edges {
            let mut attrs = Vec::new();
            if let Some(l) = edge_label(e, label) {
                attrs.push(format!("label={}", quoted(&l)));
            }
            let color = match e.signals.error_rate {
                r if r >= 0.05 => "red",
                r if r > 0.0 => "orange",
                _ => "gray40",
            };
            attrs.push(format!("color={color}"));
            if e.security.mtls_ratio.is_some_and(|r| r < 1.0) {
                attrs.push("style=dashed".into());
            }
            let _ = writeln!(
                out,
                "  {} -> {} [{}];",
                quoted(&e.source),
                quoted(&e.target),
                attrs.join(", ")
            );
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::model::{EdgeCell, Raw, ServiceCell};

    #[test]
    fn namespaces_are_clusters_and_names_are_escaped() {
        let raw = |n: usize, errors: u64| Raw {
            latencies_ns: vec![2_000_000; n],
            errors,
        };
        let g = ServiceGraph::build(
            vec![ServiceCell {
                service: "cart \"v\"".into(),
                namespace: Some("shop".into()),
                version: None,
                measure: raw(60, 6),
            }],
            vec![
                EdgeCell {
                    source: None,
                    target: "cart \"v\"".into(),
                    target_kind: NodeKind::Service,
                    version: None,
                    reason: None,
                    measure: raw(60, 6),
                },
                EdgeCell {
                    source: Some("cart \"v\"".into()),
                    target: "postgres".into(),
                    target_kind: NodeKind::Virtual,
                    version: None,
                    reason: None,
                    measure: raw(30, 0),
                },
            ],
            60.0,
        );
        let dot = g.to_dot(EdgeLabel::Errors);
        assert!(dot.starts_with("digraph meshscope {"), "{dot}");
        assert!(dot.contains("subgraph \"cluster_shop\" {"), "{dot}");
        assert!(
            dot.contains("\"cart \\\"v\\\"\" [shape=box, style=rounded, label=\"cart \\\"v\\\"\\n1.00/s, 10.0% errors\"];"),
            "{dot}"
        );
        assert!(dot.contains("\"postgres\" [shape=cylinder"), "{dot}");
        assert!(dot.contains("\"user\" [shape=circle"), "{dot}");
        assert!(
            dot.contains("\"user\" -> \"cart \\\"v\\\"\" [label=\"10.0% (6)\", color=red];"),
            "{dot}"
        );
        assert!(
            dot.contains("\"cart \\\"v\\\"\" -> \"postgres\" [label=\"0.0% (0)\", color=gray40];"),
            "{dot}"
        );
        assert!(!g.to_dot(EdgeLabel::None).contains("label=\"0.0%"));
        assert!("bogus".parse::<EdgeLabel>().is_err());
    }
}
