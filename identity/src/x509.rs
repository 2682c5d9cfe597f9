//! Reading the few things the mesh needs off a certificate: its SPIFFE ID (the URI SAN)
//! and when it expires.

use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::IdentityError;
use crate::spiffe::SpiffeId;

fn parse<'a>(der: &'a [u8]) -> Option<X509Certificate<'a>> {
    X509Certificate::from_der(der).ok().map(|(_, c)| c)
}

/// The certificate's SPIFFE ID, when it has exactly one `spiffe://` URI SAN.
pub fn spiffe_id(der: &[u8]) -> Option<SpiffeId> {
    let cert = parse(der)?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let first = ids.next()?;
    if ids.next().is_some() {
        return None;
    }
    first.parse().ok()
}

pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    let cert = parse(der)?;
    let secs = cert.validity().not_after.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// The first certificate of a PEM bundle's expiry.
pub fn not_after_pem(pem: &str) -> Result<SystemTime, IdentityError> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| IdentityError::Invalid {
            what: "certificate".into(),
            why: "no PEM CERTIFICATE".into(),
        })?;
    not_after(&der).ok_or_else(|| IdentityError::Invalid {
        what: "certificate".into(),
        why: "not a readable X.509 certificate".into(),
    })
}

/// Every certificate of a PEM bundle.
pub fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Invalid {
            what: "certificate chain".into(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::Invalid {
            what: "certificate chain".into(),
            why: "no PEM CERTIFICATE".into(),
        });
    }
    Ok(certs)
}
