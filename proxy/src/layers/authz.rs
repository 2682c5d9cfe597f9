//! Inbound authorization: which client identities may reach the local app. The identity
//! is the one the caller proved with its certificate ([`PeerSecurity`]); a plaintext
//! caller has none and matches no rule.
//!
//! A request is allowed when any `[[authorization]]` rule admits its identity. Otherwise
//! it is denied (403, `x-meshscope-proxy: unauthorized`, the app never sees it) when any
//! rule is `enforce`, and marked `would-deny` and passed when every rule is `audit`.
//! Without rules every request passes unmarked.

use std::sync::{Arc, RwLock};

use http::{Request, StatusCode};
use meshscope_identity::{IdentityPattern, SpiffeId};
use tower::{Layer, Service};

use super::{Body, BoxFuture, HttpService, local_response};
use crate::config::{AuthzMode, ProxyConfig};
use crate::tls::PeerSecurity;

/// Response extension: what authorization decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthzDecision {
    Allow,
    Deny,
    WouldDeny,
}

impl AuthzDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzDecision::Allow => "allow",
            AuthzDecision::Deny => "deny",
            AuthzDecision::WouldDeny => "would-deny",
        }
    }
}

/// The rules in force.
#[derive(Debug, Default)]
pub struct Authz {
    rules: Vec<(Vec<IdentityPattern>, AuthzMode)>,
}

/// Swapped whole when the file changes.
pub type SharedAuthz = Arc<RwLock<Arc<Authz>>>;

impl Authz {
    /// The config's rules (validated already: a pattern that does not parse is skipped).
    pub fn build(config: &ProxyConfig) -> Authz {
        let td = config.identity.trust_domain();
        Authz {
            rules: config
                .authorization
                .iter()
                .map(|r| {
                    (
                        r.allow
                            .iter()
                            .filter_map(|a| IdentityPattern::parse(a, td).ok())
                            .collect(),
                        r.mode,
                    )
                })
                .collect(),
        }
    }

    pub fn decide(&self, peer: Option<&SpiffeId>) -> Option<AuthzDecision> {
        if self.rules.is_empty() {
            return None;
        }
        let admitted = peer.is_some_and(|id| {
            self.rules
                .iter()
                .any(|(allow, _)| allow.iter().any(|p| p.matches(id)))
        });
        Some(if admitted {
            AuthzDecision::Allow
        } else if self.rules.iter().any(|(_, m)| *m == AuthzMode::Enforce) {
            AuthzDecision::Deny
        } else {
            AuthzDecision::WouldDeny
        })
    }
}

#[derive(Clone)]
pub struct AuthzLayer(pub SharedAuthz);

impl<S> Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthzService {
            authz: Arc::clone(&self.0),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct AuthzService<S> {
    authz: SharedAuthz,
    inner: S,
}

impl<S: HttpService> Service<Request<Body>> for AuthzService<S> {
    crate::layers::http_service_head!();

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        let peer = req
            .extensions()
            .get::<PeerSecurity>()
            .and_then(|s| s.peer.clone());
        let decision = self
            .authz
            .read()
            .ok()
            .and_then(|a| a.decide(peer.as_deref()));
        if decision == Some(AuthzDecision::Deny) {
            return Box::pin(async {
                let mut r = local_response(StatusCode::FORBIDDEN, "unauthorized");
                r.extensions_mut().insert(AuthzDecision::Deny);
                Ok(r)
            });
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let Ok(mut r) = fut.await;
            if let Some(d) = decision {
                r.extensions_mut().insert(d);
            }
            Ok(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rules: &str) -> ProxyConfig {
        ProxyConfig::parse(&format!(
            "[service]\nname = \"payments\"\nnamespace = \"shop\"\n{rules}"
        ))
        .expect("parse")
    }

    #[test]
    fn enforce_denies_audit_marks_and_plaintext_matches_nothing() {
        let td = "meshscope.local";
        let checkout = SpiffeId::new(td, "shop", "checkout").expect("id");
        let frontend = SpiffeId::new(td, "shop", "frontend").expect("id");
        let ops = SpiffeId::new(td, "ops", "debug").expect("id");
        let a = Authz::build(&config(
            "[[authorization]]\nallow = [\"ns/shop/sa/checkout\"]\n[[authorization]]\nallow = [\"ns/ops/*\"]\nmode = \"audit\"\n",
        ));
        assert_eq!(a.decide(Some(&checkout)), Some(AuthzDecision::Allow));
        assert_eq!(a.decide(Some(&ops)), Some(AuthzDecision::Allow));
        assert_eq!(a.decide(Some(&frontend)), Some(AuthzDecision::Deny));
        assert_eq!(a.decide(None), Some(AuthzDecision::Deny));
        let audit = Authz::build(&config(
            "[[authorization]]\nallow = [\"ns/shop/sa/checkout\"]\nmode = \"audit\"\n",
        ));
        assert_eq!(
            audit.decide(Some(&frontend)),
            Some(AuthzDecision::WouldDeny)
        );
        assert_eq!(Authz::default().decide(None), None);
        let e = ProxyConfig::parse(
            "[service]\nname = \"a\"\n[[authorization]]\nallow = [\"shop/checkout\"]\n",
        )
        .expect_err("bad pattern");
        assert!(e.to_string().contains("authorization #1"), "{e}");
    }
}
