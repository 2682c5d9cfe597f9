//! The workload's side of identity: a key pair made in memory (ECDSA P-256, never
//! written anywhere), the CSR for its SPIFFE ID, and the [`CertStore`] the TLS configs
//! read the current certificate from. A renewed certificate replaces the old one for new
//! handshakes; connections already open keep theirs.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::RootCertStore;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::IdentityError;
use crate::ca::Issued;
use crate::spiffe::SpiffeId;

/// The key and the identity it is for.
pub struct WorkloadKey {
    id: SpiffeId,
    key: KeyPair,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn invalid(what: &str, why: impl ToString) -> IdentityError {
    IdentityError::Invalid {
        what: what.to_string(),
        why: why.to_string(),
    }
}

/// A certificate the CA issued for this key, ready for rustls.
#[derive(Clone)]
pub struct Certified {
    pub key: Arc<CertifiedKey>,
    pub roots: Vec<CertificateDer<'static>>,
    pub received: SystemTime,
    pub not_after: SystemTime,
}

impl Certified {
    /// 70% into the certificate's life, from when it was received.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.received)
            .unwrap_or(Duration::ZERO);
        self.received + life.mul_f64(0.7)
    }
}

impl WorkloadKey {
    pub fn generate(id: SpiffeId) -> Result<WorkloadKey, IdentityError> {
        let key = KeyPair::generate().map_err(|e| invalid("a workload key", e))?;
        Ok(WorkloadKey { id, key })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// PEM `CERTIFICATE REQUEST` naming the SPIFFE ID as its URI SAN.
    pub fn csr_pem(&self) -> Result<String, IdentityError> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            self.id
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| invalid("the SPIFFE ID", e))?,
        )];
        p.distinguished_name
            .push(rcgen::DnType::CommonName, self.id.workload());
        let csr = p
            .serialize_request(&self.key)
            .map_err(|e| invalid("the CSR", e))?;
        csr.pem().map_err(|e| invalid("the CSR", e))
    }

    /// Checks the CA's answer is for this identity and makes it usable.
    pub fn certified(&self, issued: &Issued) -> Result<Certified, IdentityError> {
        let chain = crate::x509::certificates(&issued.certificate_chain)?;
        let leaf_id = crate::x509::spiffe_id(&chain[0]);
        if leaf_id.as_ref() != Some(&self.id) {
            return Err(invalid(
                "the issued certificate",
                format!(
                    "it is for {}, not {}",
                    leaf_id.map_or("no SPIFFE ID".to_string(), |i| i.to_string()),
                    self.id
                ),
            ));
        }
        let not_after = crate::x509::not_after(&chain[0])
            .ok_or_else(|| invalid("the issued certificate", "no readable expiry"))?;
        let roots = crate::x509::certificates(&issued.trust_anchors)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_supported_type(&der)
            .map_err(|e| invalid("the workload key", e))?;
        Ok(Certified {
            key: Arc::new(CertifiedKey::new(chain, signer)),
            roots,
            received: SystemTime::now(),
            not_after,
        })
    }
}

/// The current certificate, shared by every TLS config of the proxy.
#[derive(Debug)]
pub struct CertStore {
    id: SpiffeId,
    roots: Arc<RootCertStore>,
    current: RwLock<(Arc<CertifiedKey>, SystemTime)>,
}

impl CertStore {
    pub fn new(id: SpiffeId, first: Certified) -> Result<CertStore, IdentityError> {
        let mut roots = RootCertStore::empty();
        for r in &first.roots {
            roots
                .add(r.clone())
                .map_err(|e| invalid("the mesh root", e))?;
        }
        Ok(CertStore {
            id,
            roots: Arc::new(roots),
            current: RwLock::new((first.key, first.not_after)),
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.roots)
    }

    /// New handshakes use `next` from now on.
    pub fn replace(&self, next: Certified) {
        if let Ok(mut c) = self.current.write() {
            *c = (next.key, next.not_after);
        }
    }

    pub fn not_after(&self) -> Option<SystemTime> {
        self.current.read().ok().map(|c| c.1)
    }

    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| Arc::clone(&c.0))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
