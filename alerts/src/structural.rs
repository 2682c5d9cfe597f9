//! Structural rules: the graph's shape in the rule's window against the window before.
//!
//! - `edge-appeared`: an edge with requests now that had none in the previous window;
//! - `edge-vanished`: an edge that had requests in the previous window and has none now;
//! - `new-virtual-peer`: an appeared edge whose target is a `virtual` node (a call to an
//!   uninstrumented, often external, peer).
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
    }
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
