//! # meshscope-identity
//!
//! Workload identity for the mesh, in three parts:
//!
//! - [`ca`]: the mesh CA `meshscope serve` runs: a root under `<data-dir>/ca/`, and
//!   [`ca::MeshCa::certify`] behind `POST /api/v1/identity/certify`, which signs a
//!   workload's CSR for the SPIFFE ID ([`spiffe`]) its bootstrap token ([`tokens`]) covers.
//! - [`workload`]: the proxy's side: a key made in memory, its CSR, and the
//!   [`workload::CertStore`] that holds the current certificate and swaps a renewed one in
//!   without touching open connections.
//! - [`mtls`]: the rustls configurations of mutual TLS 1.3 between proxies (server: a
//!   client certificate from the mesh root required; client: the destination's expected
//!   identity verified), and reading the peer's SPIFFE ID off its certificate ([`x509`]).

pub mod ca;
pub mod mtls;
pub mod spiffe;
pub mod tokens;
pub mod workload;
pub mod x509;

use std::path::Path;
use std::time::SystemTime;

pub use spiffe::{IdentityPattern, SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },
}

impl IdentityError {
    pub fn io(path: &Path, source: std::io::Error) -> IdentityError {
        IdentityError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Writes `bytes` to `path` readable by its owner only, replacing it whole (a temporary
/// file renamed over it).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(&tmp).map_err(|e| IdentityError::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| IdentityError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| IdentityError::io(path, e))
}

/// A key file others can read is refused.
pub fn check_private(path: &Path) -> Result<(), IdentityError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| IdentityError::io(path, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(IdentityError::Invalid {
                what: path.display().to_string(),
                why: format!(
                    "the key file is readable by others (mode {:o}); chmod 600 it",
                    mode & 0o777
                ),
            });
        }
    }
    Ok(())
}

/// `2026-12-02T01:02:03Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(d) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            d.year(),
            u8::from(d.month()),
            d.day(),
            d.hour(),
            d.minute(),
            d.second()
        ),
        Err(_) => secs.to_string(),
    }
}
