//! Structural rules: the graph's shape in the rule's window against the window before.
//!
//! - `edge-appeared`: an edge with requests now that had none in the previous window;
//! - `edge-vanished`: an edge that had requests in the previous window and has none now;
//! - `new-virtual-peer`: an appeared edge whose target is a `virtual` node (a call to an
//!   uninstrumented, often external, peer).
//!
//! - `plaintext-edge`: an edge between two meshed services (each named by a certificate
//!   on some edge of the window) with requests that were not mutual TLS (`mtls_ratio` < 1);
//! - `denied-requests`: an edge on which authorization refused requests (`denied` > 0).
//!
//! With no edge at all in the previous window there is no baseline (a fresh deployment, or
//! meshscope just started), so nothing "appears". An alert stays firing while the change
//! is visible (one window) and resolves when the windows agree again.

use std::collections::BTreeSet;

use meshscope_query::analysis::graph::{NodeKind, ServiceGraph};

use crate::rule::{Change, Structural};

/// One edge of the graph, as structural rules compare them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeKey {
    pub source: String,
    pub target: String,
    pub target_virtual: bool,
}

/// The edges with at least one request.
pub fn edge_set(g: &ServiceGraph) -> BTreeSet<EdgeKey> {
    g.edges()
        .filter(|e| e.signals.requests > 0)
        .map(|e| EdgeKey {
            source: e.source.clone(),
            target: e.target.clone(),
            target_virtual: g
                .find(&e.target)
                .is_some_and(|n| n.kind == NodeKind::Virtual),
        })
        .collect()
}

/// The edges a structural rule reports, given the previous and the current edge sets.
pub fn changes(
    rule: &Structural,
    previous: &BTreeSet<EdgeKey>,
    current: &BTreeSet<EdgeKey>,
) -> Vec<EdgeKey> {
    let wanted = |e: &&EdgeKey| {
        rule.source.as_ref().is_none_or(|s| *s == e.source)
            && rule.target.as_ref().is_none_or(|t| *t == e.target)
    };
    match rule.change {
        Change::EdgeAppeared | Change::NewVirtualPeer if previous.is_empty() => Vec::new(),
        Change::EdgeAppeared => current
            .difference(previous)
            .filter(wanted)
            .cloned()
            .collect(),
        Change::NewVirtualPeer => current
            .difference(previous)
            .filter(|e| e.target_virtual)
            .filter(wanted)
            .cloned()
            .collect(),
        Change::EdgeVanished => previous
            .difference(current)
            .filter(wanted)
            .cloned()
            .collect(),
        // Judged on the current graph alone: see [`security_findings`].
        Change::PlaintextEdge | Change::DeniedRequests => Vec::new(),
    }
}

/// The workload a SPIFFE ID names (`…/sa/<workload>`).
fn workload_of(id: &str) -> Option<&str> {
    id.rsplit_once("/sa/").map(|(_, w)| w)
}

/// The edges a security rule reports in `g`, each with its value: the share of requests
/// that were not mTLS, or the requests denied.
pub fn security_findings(rule: &Structural, g: &ServiceGraph) -> Vec<(EdgeKey, f64)> {
    let wanted = |source: &str, target: &str| {
        rule.source.as_ref().is_none_or(|s| s == source)
            && rule.target.as_ref().is_none_or(|t| t == target)
    };
    // Meshed: a certificate names the service (or one of its workloads) somewhere.
    let meshed: BTreeSet<&str> = g
        .edges()
        .flat_map(|e| {
            e.security
                .client_identities
                .iter()
                .chain(&e.security.server_identities)
        })
        .filter_map(|id| workload_of(id))
        .collect();
    let is_meshed = |service: &str| {
        meshed.contains(service)
            || meshed
                .iter()
                .any(|w| w.strip_prefix(service).is_some_and(|v| v.starts_with('-')))
    };
    g.edges()
        .filter(|e| wanted(&e.source, &e.target))
        .filter_map(|e| {
            let value = match rule.change {
                Change::PlaintextEdge => {
                    let ratio = e.security.mtls_ratio?;
                    (ratio < 1.0 && is_meshed(&e.source) && is_meshed(&e.target))
                        .then_some(1.0 - ratio)?
                }
                Change::DeniedRequests => {
                    (e.security.denied > 0).then_some(e.security.denied as f64)?
                }
                _ => return None,
            };
            Some((
                EdgeKey {
                    source: e.source.clone(),
                    target: e.target.clone(),
                    target_virtual: g
                        .find(&e.target)
                        .is_some_and(|n| n.kind == NodeKind::Virtual),
                },
                value,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn e(s: &str, t: &str, v: bool) -> EdgeKey {
        EdgeKey {
            source: s.into(),
            target: t.into(),
            target_virtual: v,
        }
    }

    fn rule(change: Change, source: Option<&str>) -> Structural {
        Structural {
            change,
            source: source.map(str::to_string),
            target: None,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn appeared_vanished_and_new_peers() {
        let prev: BTreeSet<_> = [e("a", "b", false), e("b", "db", true)].into();
        let cur: BTreeSet<_> = [
            e("a", "b", false),
            e("a", "c", false),
            e("c", "api.stripe.com", true),
        ]
        .into();
        assert_eq!(
            changes(&rule(Change::EdgeAppeared, None), &prev, &cur),
            vec![e("a", "c", false), e("c", "api.stripe.com", true)]
        );
        assert_eq!(
            changes(&rule(Change::EdgeAppeared, Some("a")), &prev, &cur),
            vec![e("a", "c", false)]
        );
        assert_eq!(
            changes(&rule(Change::NewVirtualPeer, None), &prev, &cur),
            vec![e("c", "api.stripe.com", true)]
        );
        assert_eq!(
            changes(&rule(Change::EdgeVanished, None), &prev, &cur),
            vec![e("b", "db", true)]
        );
    }

    #[test]
    fn no_baseline_means_nothing_appears() {
        let cur: BTreeSet<_> = [e("a", "b", false)].into();
        assert!(changes(&rule(Change::EdgeAppeared, None), &BTreeSet::new(), &cur).is_empty());
        assert!(changes(&rule(Change::NewVirtualPeer, None), &BTreeSet::new(), &cur).is_empty());
    }
}
