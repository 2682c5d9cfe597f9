//! The mesh CA: one root key and certificate under `<data-dir>/ca/` (made on first start,
//! the key file mode 0600, kept across restarts), and the signing of workload
//! certificates from a CSR and a bootstrap token.
//!
//! What the CA signs is its own decision, not the CSR's: the one SPIFFE ID the CSR asks
//! for (its URI SAN, which the token must cover) and the DNS name derived from it, client
//! and server authentication, `--cert-lifetime-secs`, a random serial. Only the public key
//! is taken from the request (its signature is verified, so the caller holds the key).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};

use crate::spiffe::{SpiffeId, valid_trust_domain};
use crate::tokens::{BootstrapTokens, CheckError, TokenRefusal};
use crate::{IdentityError, rfc3339, write_private};

pub const DEFAULT_TRUST_DOMAIN: &str = "meshscope.local";
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(86_400);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);

/// `POST /api/v1/identity/certify`'s body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertifyRequest {
    /// PEM `CERTIFICATE REQUEST` whose one URI SAN is the SPIFFE ID asked for.
    pub csr: String,
    /// The bootstrap token from `meshscope identity token`.
    #[serde(default)]
    pub token: Option<String>,
}

/// The answer: the leaf and its chain, the root to trust, and when the leaf expires.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Issued {
    pub identity: String,
    /// PEM: the leaf first, then the root.
    pub certificate_chain: String,
    /// PEM of the mesh root, for verifying peers.
    pub trust_anchors: String,
    pub not_after: String,
    pub not_after_unix: u64,
    pub serial: String,
}

/// Why a certificate was not issued; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    /// 400: the CSR or the body is not usable.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token, or one this CA did not make.
    #[error("{0}")]
    Unauthenticated(TokenRefusal),
    /// 403: the token does not cover the identity asked for.
    #[error("{0}")]
    Forbidden(TokenRefusal),
    /// 500
    #[error("{0}")]
    Internal(String),
}

impl CertifyError {
    pub fn status(&self) -> u16 {
        match self {
            CertifyError::BadRequest(_) => 400,
            CertifyError::Unauthenticated(_) => 401,
            CertifyError::Forbidden(_) => 403,
            CertifyError::Internal(_) => 500,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct CaMeta {
    trust_domain: String,
}

/// The root and what it signs with.
pub struct MeshCa {
    dir: PathBuf,
    trust_domain: String,
    lifetime: Duration,
    root_pem: String,
    root_not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
    tokens: BootstrapTokens,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

fn rcgen_err(what: &str) -> impl Fn(rcgen::Error) -> IdentityError + '_ {
    move |e| IdentityError::Invalid {
        what: what.to_string(),
        why: e.to_string(),
    }
}

impl MeshCa {
    /// Opens the CA in `dir`, making the root the first time. A root made for another
    /// trust domain is refused (its certificates would not match the SPIFFE IDs).
    pub fn open(
        dir: &Path,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<MeshCa, IdentityError> {
        if !valid_trust_domain(trust_domain) {
            return Err(IdentityError::Invalid {
                what: "--trust-domain".into(),
                why: format!("{trust_domain:?} is not a DNS-like name (a-z, 0-9, '-', '.')"),
            });
        }
        if lifetime < Duration::from_secs(1) {
            return Err(IdentityError::Invalid {
                what: "--cert-lifetime-secs".into(),
                why: "must be at least 1".into(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| IdentityError::io(dir, e))?;
        let (key_path, cert_path, meta_path) = (
            dir.join("root.key"),
            dir.join("root.pem"),
            dir.join("ca.toml"),
        );
        let (issuer, root_pem) = if key_path.exists() {
            let meta: CaMeta = toml::from_str(
                &std::fs::read_to_string(&meta_path)
                    .map_err(|e| IdentityError::io(&meta_path, e))?,
            )
            .map_err(|e| IdentityError::Invalid {
                what: meta_path.display().to_string(),
                why: e.to_string(),
            })?;
            if meta.trust_domain != trust_domain {
                return Err(IdentityError::Invalid {
                    what: "--trust-domain".into(),
                    why: format!(
                        "the CA in {} was made for {:?}, not {trust_domain:?} (use another data dir, or the same trust domain)",
                        dir.display(),
                        meta.trust_domain
                    ),
                });
            }
            crate::check_private(&key_path)?;
            let key_pem =
                std::fs::read_to_string(&key_path).map_err(|e| IdentityError::io(&key_path, e))?;
            let root_pem = std::fs::read_to_string(&cert_path)
                .map_err(|e| IdentityError::io(&cert_path, e))?;
            let key = KeyPair::from_pem(&key_pem).map_err(rcgen_err("the CA key"))?;
            let issuer = Issuer::from_ca_cert_pem(&root_pem, key)
                .map_err(rcgen_err("the CA certificate"))?;
            (issuer, root_pem)
        } else {
            let key = KeyPair::generate().map_err(rcgen_err("a CA key"))?;
            let mut p = CertificateParams::default();
            p.distinguished_name
                .push(DnType::CommonName, "meshscope mesh CA");
            p.distinguished_name
                .push(DnType::OrganizationName, trust_domain);
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::minutes(5);
            p.not_after = now + ROOT_LIFETIME;
            p.serial_number = Some(random_serial());
            p.subject_alt_names = vec![SanType::URI(
                format!("spiffe://{trust_domain}")
                    .try_into()
                    .map_err(rcgen_err("the trust domain"))?,
            )];
            let cert = p
                .self_signed(&key)
                .map_err(rcgen_err("the CA certificate"))?;
            let root_pem = cert.pem();
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            std::fs::write(&cert_path, &root_pem).map_err(|e| IdentityError::io(&cert_path, e))?;
            let meta = toml::to_string(&CaMeta {
                trust_domain: trust_domain.to_string(),
            })
            .map_err(|e| IdentityError::Invalid {
                what: "ca.toml".into(),
                why: e.to_string(),
            })?;
            std::fs::write(&meta_path, meta).map_err(|e| IdentityError::io(&meta_path, e))?;
            tracing::info!(dir = %dir.display(), trust_domain, "made the mesh CA's root");
            (Issuer::new(p, key), root_pem)
        };
        let root_not_after = crate::x509::not_after_pem(&root_pem)?;
        Ok(MeshCa {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            lifetime,
            root_pem,
            root_not_after,
            issuer,
            tokens: BootstrapTokens::in_dir(dir),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }
    pub fn root_not_after(&self) -> SystemTime {
        self.root_not_after
    }
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
    pub fn tokens(&self) -> &BootstrapTokens {
        &self.tokens
    }

    /// Signs the CSR's identity when the token covers it.
    pub fn certify(&self, req: &CertifyRequest) -> Result<Issued, CertifyError> {
        let csr = CertificateSigningRequestParams::from_pem(&req.csr).map_err(|e| {
            CertifyError::BadRequest(format!(
                "the CSR is not a signed PEM CERTIFICATE REQUEST: {e}"
            ))
        })?;
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                SanType::URI(u) => Some(u.as_str()),
                _ => None,
            })
            .collect();
        let [uri] = uris.as_slice() else {
            return Err(CertifyError::BadRequest(format!(
                "the CSR must name exactly one SPIFFE ID as a URI SAN (it names {})",
                uris.len()
            )));
        };
        let id: SpiffeId = uri
            .parse()
            .map_err(|e: crate::spiffe::BadId| CertifyError::BadRequest(e.to_string()))?;
        if id.trust_domain() != self.trust_domain {
            return Err(CertifyError::BadRequest(format!(
                "{id} is not in this CA's trust domain {:?}",
                self.trust_domain
            )));
        }
        self.tokens
            .check(req.token.as_deref(), &id)
            .map_err(|e| match e {
                CheckError::Refused(r @ TokenRefusal::NotCovered(..)) => CertifyError::Forbidden(r),
                CheckError::Refused(r) => CertifyError::Unauthenticated(r),
                CheckError::Store(e) => CertifyError::Internal(e.to_string()),
            })?;
        let internal = |e: rcgen::Error| CertifyError::Internal(e.to_string());
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, id.workload());
        p.subject_alt_names = vec![
            SanType::URI(id.to_string().try_into().map_err(internal)?),
            SanType::DnsName(id.dns_name().try_into().map_err(internal)?),
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        p.serial_number = Some(serial.clone());
        let now = SystemTime::now();
        let not_after = now + self.lifetime;
        // A minute of slack for clocks a little behind.
        p.not_before = time::OffsetDateTime::from(now) - time::Duration::minutes(1);
        p.not_after = time::OffsetDateTime::from(not_after);
        let leaf = p
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(internal)?;
        let not_after_unix = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        tracing::info!(identity = %id, not_after = %rfc3339(not_after), "issued a workload certificate");
        Ok(Issued {
            identity: id.to_string(),
            certificate_chain: format!("{}{}", leaf.pem(), self.root_pem),
            trust_anchors: self.root_pem.clone(),
            not_after: rfc3339(not_after),
            not_after_unix,
            serial: hex::encode(serial.to_bytes()),
        })
    }
}

/// A server certificate the CA made for meshscope's own listeners (`--tls-auto`).
#[derive(Debug, Clone)]
pub struct ServerCertificate {
    /// PEM: the leaf, then the root.
    pub chain_pem: String,
    /// PEM PKCS#8, made here and never sent anywhere.
    pub key_pem: String,
    pub not_after: SystemTime,
}

impl MeshCa {
    /// Signs a server certificate for `dns_names` and `ips` (TLS server authentication
    /// only), with a key made for it, valid for `lifetime`.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        lifetime: Duration,
    ) -> Result<ServerCertificate, IdentityError> {
        let key = KeyPair::generate().map_err(rcgen_err("a server key"))?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(
            DnType::CommonName,
            dns_names.first().map_or("meshscope", String::as_str),
        );
        let mut sans = Vec::new();
        for n in dns_names {
            sans.push(SanType::DnsName(
                n.clone().try_into().map_err(rcgen_err("a DNS name"))?,
            ));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let now = SystemTime::now();
        let not_after = now + lifetime;
        p.not_before = time::OffsetDateTime::from(now) - time::Duration::minutes(1);
        p.not_after = time::OffsetDateTime::from(not_after);
        let leaf = p
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err("the server certificate"))?;
        Ok(ServerCertificate {
            chain_pem: format!("{}{}", leaf.pem(), self.root_pem),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and 16 bytes long
    SerialNumber::from_slice(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::WorkloadKey;

    #[test]
    fn the_ca_signs_what_the_token_covers_and_keeps_its_root_across_restarts() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = MeshCa::open(dir.path(), "meshscope.local", Duration::from_secs(60)).expect("ca");
        let root = ca.root_pem().to_string();
        let token = ca.tokens().mint("shop", &["cart".into()]).expect("token");
        let id = SpiffeId::new("meshscope.local", "shop", "cart").expect("id");
        let key = WorkloadKey::generate(id.clone()).expect("key");
        let req = CertifyRequest {
            csr: key.csr_pem().expect("csr"),
            token: Some(token.clone()),
        };
        let issued = ca.certify(&req).expect("issued");
        assert_eq!(issued.identity, id.to_string());
        assert_eq!(issued.trust_anchors, root);
        let certified = key.certified(&issued).expect("usable");
        let life = certified
            .not_after
            .duration_since(SystemTime::now())
            .expect("in the future");
        assert!(
            life <= Duration::from_secs(61) && life >= Duration::from_secs(55),
            "{life:?}"
        );
        let leaf = crate::x509::certificates(&issued.certificate_chain).expect("chain");
        assert_eq!(leaf.len(), 2);
        assert_eq!(crate::x509::spiffe_id(&leaf[0]), Some(id.clone()));

        // Refusals: each with its status and a readable reason.
        let other = WorkloadKey::generate(
            SpiffeId::new("meshscope.local", "shop", "payments").expect("id"),
        )
        .expect("key");
        let e = ca
            .certify(&CertifyRequest {
                csr: other.csr_pem().expect("csr"),
                token: Some(token.clone()),
            })
            .expect_err("not covered");
        assert_eq!(e.status(), 403, "{e}");
        assert!(e.to_string().contains("does not cover"), "{e}");
        let e = ca
            .certify(&CertifyRequest {
                csr: req.csr.clone(),
                token: Some("msb_00".into()),
            })
            .expect_err("unknown token");
        assert_eq!(e.status(), 401, "{e}");
        let e = ca
            .certify(&CertifyRequest {
                csr: req.csr.clone(),
                token: None,
            })
            .expect_err("no token");
        assert_eq!(e.status(), 401, "{e}");
        let e = ca
            .certify(&CertifyRequest {
                csr:
                    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
                token: Some(token.clone()),
            })
            .expect_err("garbage");
        assert_eq!(e.status(), 400, "{e}");
        let foreign =
            WorkloadKey::generate(SpiffeId::new("other.local", "shop", "cart").expect("id"))
                .expect("key");
        let e = ca
            .certify(&CertifyRequest {
                csr: foreign.csr_pem().expect("csr"),
                token: Some(token),
            })
            .expect_err("other trust domain");
        assert_eq!(e.status(), 400, "{e}");

        // The key is private and survives a restart; another trust domain is refused.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("root.key"))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        drop(ca);
        let again = MeshCa::open(dir.path(), "meshscope.local", DEFAULT_LIFETIME).expect("reopen");
        assert_eq!(again.root_pem(), root);
        let e = MeshCa::open(dir.path(), "other.local", DEFAULT_LIFETIME).expect_err("td");
        assert!(e.to_string().contains("was made for"), "{e}");
    }
}
