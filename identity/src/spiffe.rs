//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<workload>`, the
//! shape Istio uses, and the patterns authorization rules name them by.

use std::fmt;
use std::str::FromStr;

/// One workload's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    workload: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadId(String);

/// A trust domain: DNS-like, lower case letters, digits, `-`, `.` (SPIFFE ID spec 2.1).
pub fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['.', '-'])
        && !s.ends_with(['.', '-'])
}

/// A namespace or workload name: one DNS label (lower case, digits, `-`, at most 63), so
/// that [`SpiffeId::dns_name`] names it without ambiguity.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, workload: &str) -> Result<SpiffeId, BadId> {
        if !valid_trust_domain(trust_domain) {
            return Err(BadId(format!(
                "trust domain {trust_domain:?} is not a DNS-like name (a-z, 0-9, '-', '.')"
            )));
        }
        for (what, v) in [("namespace", namespace), ("workload", workload)] {
            if !valid_name(v) {
                return Err(BadId(format!(
                    "{what} {v:?} is not one DNS label (a-z, 0-9, '-', at most 63)"
                )));
            }
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            workload: workload.to_string(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn workload(&self) -> &str {
        &self.workload
    }

    /// The DNS name the mesh CA also writes into the certificate, so a client verifies the
    /// server with plain WebPKI name checks: `<workload>.<namespace>.<trust-domain>`.
    pub fn dns_name(&self) -> String {
        format!("{}.{}.{}", self.workload, self.namespace, self.trust_domain)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.workload
        )
    }
}

impl FromStr for SpiffeId {
    type Err = BadId;
    fn from_str(s: &str) -> Result<SpiffeId, BadId> {
        let bad = || {
            BadId(format!(
                "{s:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<workload>"
            ))
        };
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (td, path) = rest.split_once('/').ok_or_else(bad)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", w] => SpiffeId::new(td, ns, w),
            _ => Err(bad()),
        }
    }
}

/// Whom an authorization rule admits: one identity, or every workload of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPattern {
    Exact(SpiffeId),
    /// `ns/<namespace>/*` (within the proxy's own trust domain).
    Namespace {
        trust_domain: String,
        namespace: String,
    },
}

impl IdentityPattern {
    /// `spiffe://…` exactly, `ns/<namespace>/sa/<workload>`, or `ns/<namespace>/*`; the
    /// short forms are in `trust_domain`.
    pub fn parse(s: &str, trust_domain: &str) -> Result<IdentityPattern, BadId> {
        if s.starts_with("spiffe://") {
            return s.parse().map(IdentityPattern::Exact);
        }
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "*"] if valid_name(ns) => Ok(IdentityPattern::Namespace {
                trust_domain: trust_domain.to_string(),
                namespace: ns.to_string(),
            }),
            ["ns", ns, "sa", w] => SpiffeId::new(trust_domain, ns, w).map(IdentityPattern::Exact),
            _ => Err(BadId(format!(
                "{s:?} is none of spiffe://…/ns/<ns>/sa/<workload>, ns/<ns>/sa/<workload>, ns/<ns>/*"
            ))),
        }
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdentityPattern::Exact(e) => e == id,
            IdentityPattern::Namespace {
                trust_domain,
                namespace,
            } => id.trust_domain == *trust_domain && id.namespace == *namespace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_bad_ones_say_why() {
        let id: SpiffeId = "spiffe://meshscope.local/ns/shop/sa/cart-v2"
            .parse()
            .expect("valid");
        assert_eq!(id.workload(), "cart-v2");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(
            id.to_string(),
            "spiffe://meshscope.local/ns/shop/sa/cart-v2"
        );
        assert_eq!(id.dns_name(), "cart-v2.shop.meshscope.local");
        for bad in [
            "http://meshscope.local/ns/shop/sa/cart",
            "spiffe://meshscope.local/ns/shop/cart",
            "spiffe://meshscope.local/ns/shop/sa/cart/extra",
            "spiffe://Mesh/ns/shop/sa/cart",
            "spiffe://meshscope.local/ns/sh.op/sa/cart",
            "spiffe://meshscope.local/ns/shop/sa/",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_match_exactly_or_by_namespace() {
        let td = "meshscope.local";
        let checkout = SpiffeId::new(td, "shop", "checkout").expect("id");
        let other_ns = SpiffeId::new(td, "ops", "checkout").expect("id");
        let other_td = SpiffeId::new("other.local", "shop", "checkout").expect("id");
        let exact = IdentityPattern::parse("ns/shop/sa/checkout", td).expect("short");
        assert!(exact.matches(&checkout) && !exact.matches(&other_ns));
        let full = IdentityPattern::parse(&checkout.to_string(), td).expect("full");
        assert_eq!(full, exact);
        let ns = IdentityPattern::parse("ns/shop/*", td).expect("ns");
        assert!(ns.matches(&checkout) && !ns.matches(&other_ns) && !ns.matches(&other_td));
        assert!(IdentityPattern::parse("shop/*", td).is_err());
        assert!(IdentityPattern::parse("ns/*/*", td).is_err());
    }
}
