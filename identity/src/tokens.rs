//! Bootstrap tokens: what a proxy shows the mesh CA to get a certificate. Each is bound to
//! one namespace and the workloads it may ask for, is printed once when it is made
//! (`meshscope identity token`), and only its SHA-256 is kept, in
//! `<data-dir>/ca/bootstrap-tokens.toml` (mode 0600). A presented token is compared with
//! every stored digest in constant time.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::IdentityError;
use crate::spiffe::{SpiffeId, valid_name};

pub const FILE: &str = "bootstrap-tokens.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TokenEntry {
    /// Hex SHA-256 of the token.
    pub sha256: String,
    pub namespace: String,
    pub workloads: Vec<String>,
    /// When it was made (RFC 3339), for the operator.
    #[serde(default)]
    pub created: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// Why a certificate request's token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("no bootstrap token was given (field \"token\")")]
    Missing,
    #[error("the bootstrap token is not one this CA made")]
    Unknown,
    #[error("the bootstrap token does not cover {0} (it covers {1})")]
    NotCovered(String, String),
}

/// The stored digests, read from the file on each use (certificate requests are rare).
#[derive(Debug, Clone)]
pub struct BootstrapTokens {
    path: PathBuf,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl BootstrapTokens {
    pub fn in_dir(ca_dir: &Path) -> BootstrapTokens {
        BootstrapTokens {
            path: ca_dir.join(FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<TokenFile, IdentityError> {
        match std::fs::read_to_string(&self.path) {
            Ok(t) => toml::from_str(&t).map_err(|e| IdentityError::Invalid {
                what: self.path.display().to_string(),
                why: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
            Err(e) => Err(IdentityError::io(&self.path, e)),
        }
    }

    pub fn entries(&self) -> Result<Vec<TokenEntry>, IdentityError> {
        Ok(self.read()?.token)
    }

    /// Makes a token for `workloads` of `namespace`, stores its digest, returns it (the
    /// only time it is seen).
    pub fn mint(&self, namespace: &str, workloads: &[String]) -> Result<String, IdentityError> {
        let bad = |why: String| IdentityError::Invalid {
            what: "identity token".into(),
            why,
        };
        if !valid_name(namespace) {
            return Err(bad(format!("namespace {namespace:?} is not one DNS label")));
        }
        if workloads.is_empty() {
            return Err(bad("name at least one --workload".into()));
        }
        if let Some(w) = workloads.iter().find(|w| !valid_name(w)) {
            return Err(bad(format!("workload {w:?} is not one DNS label")));
        }
        let secret: [u8; 32] = rand::random();
        let token = format!("msb_{}", hex::encode(secret));
        let mut file = self.read()?;
        file.token.push(TokenEntry {
            sha256: hex::encode(digest(&token)),
            namespace: namespace.to_string(),
            workloads: workloads.to_vec(),
            created: crate::rfc3339(std::time::SystemTime::now()),
        });
        let text = toml::to_string(&file).map_err(|e| bad(e.to_string()))?;
        crate::write_private(&self.path, text.as_bytes())?;
        Ok(token)
    }

    /// The token may ask for `id`'s certificate.
    pub fn check(&self, token: Option<&str>, id: &SpiffeId) -> Result<(), CheckError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(CheckError::Refused(TokenRefusal::Missing))?;
        let presented = digest(token);
        let mut found: Option<TokenEntry> = None;
        for e in self.read().map_err(CheckError::Store)?.token {
            let mut stored = [0u8; 32];
            if hex::decode_to_slice(&e.sha256, &mut stored).is_err() {
                continue;
            }
            // Every entry is compared, found or not.
            if bool::from(stored.ct_eq(&presented)) && found.is_none() {
                found = Some(e);
            }
        }
        let e = found.ok_or(CheckError::Refused(TokenRefusal::Unknown))?;
        if e.namespace == id.namespace() && e.workloads.iter().any(|w| w == id.workload()) {
            Ok(())
        } else {
            Err(CheckError::Refused(TokenRefusal::NotCovered(
                format!("ns/{}/sa/{}", id.namespace(), id.workload()),
                e.workloads
                    .iter()
                    .map(|w| format!("ns/{}/sa/{w}", e.namespace))
                    .collect::<Vec<_>>()
                    .join(", "),
            )))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Refused(TokenRefusal),
    #[error(transparent)]
    Store(IdentityError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_covers_its_workloads_only_and_is_stored_hashed() {
        let dir = tempfile::tempdir().expect("dir");
        let tokens = BootstrapTokens::in_dir(dir.path());
        let t = tokens
            .mint("shop", &["cart".into(), "cart-v2".into()])
            .expect("mint");
        let other = tokens.mint("shop", &["payments".into()]).expect("mint");
        let stored = std::fs::read_to_string(tokens.path()).expect("read");
        assert!(!stored.contains(&t), "the token itself is never written");
        let cart = SpiffeId::new("meshscope.local", "shop", "cart").expect("id");
        let payments = SpiffeId::new("meshscope.local", "shop", "payments").expect("id");
        let cart_ops = SpiffeId::new("meshscope.local", "ops", "cart").expect("id");
        assert!(tokens.check(Some(&t), &cart).is_ok());
        assert!(tokens.check(Some(&other), &payments).is_ok());
        let refused = |r: Result<(), CheckError>| match r {
            Err(CheckError::Refused(r)) => r,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(matches!(
            refused(tokens.check(Some(&t), &payments)),
            TokenRefusal::NotCovered(..)
        ));
        assert!(matches!(
            refused(tokens.check(Some(&t), &cart_ops)),
            TokenRefusal::NotCovered(..)
        ));
        assert_eq!(
            refused(tokens.check(Some("msb_nope"), &cart)),
            TokenRefusal::Unknown
        );
        assert_eq!(refused(tokens.check(None, &cart)), TokenRefusal::Missing);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(tokens.path())
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
        assert!(tokens.mint("Shop", &["cart".into()]).is_err());
        assert!(tokens.mint("shop", &[]).is_err());
    }
}
