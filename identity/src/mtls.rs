//! Mutual TLS 1.3 between proxies, with rustls (ring).
//!
//! The server side requires a client certificate that chains to the mesh root; the client
//! side presents its own and verifies the server as the destination's expected identity:
//! WebPKI checks the chain and the DNS name the CA derives from the SPIFFE ID
//! ([`SpiffeId::dns_name`]), and [`verify_peer`] then checks the SPIFFE ID itself.

use std::sync::Arc;

use rustls::client::ClientConfig;
use rustls::pki_types::ServerName;
use rustls::server::{ServerConfig, WebPkiClientVerifier};

use crate::IdentityError;
use crate::spiffe::SpiffeId;
use crate::workload::CertStore;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(why: impl ToString) -> IdentityError {
    IdentityError::Invalid {
        what: "mTLS".into(),
        why: why.to_string(),
    }
}

/// The inbound side: TLS 1.3, a client certificate from the mesh root required, ALPN
/// h2 and http/1.1.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, IdentityError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(store.roots(), provider())
        .build()
        .map_err(invalid)?;
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(invalid)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(store);
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// The outbound side: TLS 1.3, this workload's certificate, the mesh root; `h2` picks
/// the ALPN protocol offered.
pub fn client_config(store: Arc<CertStore>, h2: bool) -> Result<Arc<ClientConfig>, IdentityError> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(invalid)?
        .with_root_certificates(store.roots())
        .with_client_cert_resolver(store);
    c.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(Arc::new(c))
}

/// The name a client asks for when it expects `id`.
pub fn server_name(id: &SpiffeId) -> Result<ServerName<'static>, IdentityError> {
    ServerName::try_from(id.dns_name()).map_err(invalid)
}

/// The peer's SPIFFE ID, from the leaf certificate it presented.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|der| crate::x509::spiffe_id(der))
}

/// After a client handshake: the server is `expected`, or the connection is not used.
pub fn verify_peer(
    conn: &rustls::CommonState,
    expected: &SpiffeId,
) -> Result<SpiffeId, IdentityError> {
    match peer_identity(conn) {
        Some(id) if &id == expected => Ok(id),
        Some(id) => Err(invalid(format!(
            "the server is {id}, not the expected {expected}"
        ))),
        None => Err(invalid(format!(
            "the server presented no SPIFFE ID (expected {expected})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertifyRequest, MeshCa};
    use crate::workload::WorkloadKey;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn store(ca: &MeshCa, ns: &str, workload: &str) -> Arc<CertStore> {
        let id = SpiffeId::new(ca.trust_domain(), ns, workload).expect("id");
        let token = ca
            .tokens()
            .mint(ns, &[workload.to_string()])
            .expect("token");
        let key = WorkloadKey::generate(id.clone()).expect("key");
        let issued = ca
            .certify(&CertifyRequest {
                csr: key.csr_pem().expect("csr"),
                token: Some(token),
            })
            .expect("issued");
        Arc::new(CertStore::new(id, key.certified(&issued).expect("certified")).expect("store"))
    }

    /// One handshake over loopback; the server's view of the client and the client's of
    /// the server.
    async fn handshake(
        server: Arc<CertStore>,
        client: Arc<CertStore>,
        expect: SpiffeId,
    ) -> Result<(Option<SpiffeId>, SpiffeId), String> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(server).expect("server"));
        let srv = tokio::spawn(async move {
            let (s, _) = l.accept().await.map_err(|e| e.to_string())?;
            let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
            let peer = peer_identity(tls.get_ref().1);
            let mut b = [0u8; 4];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            tls.write_all(&b).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer)
        });
        let connector =
            tokio_rustls::TlsConnector::from(client_config(client, false).expect("client"));
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = server_name(&expect).expect("name");
        let client_side = async {
            let mut tls = connector
                .connect(name, s)
                .await
                .map_err(|e| e.to_string())?;
            let seen = verify_peer(tls.get_ref().1, &expect).map_err(|e| e.to_string())?;
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 4];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(seen)
        };
        let seen = client_side.await;
        let peer = srv.await.expect("join");
        // The client's reason first: the server only hears an alert.
        let seen = seen?;
        Ok((peer?, seen))
    }

    #[tokio::test]
    async fn both_sides_prove_who_they_are_and_a_wrong_server_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let ca =
            MeshCa::open(dir.path(), "meshscope.local", crate::ca::DEFAULT_LIFETIME).expect("ca");
        let cart = store(&ca, "shop", "cart");
        let frontend = store(&ca, "shop", "frontend");
        let (peer, seen) = handshake(Arc::clone(&cart), Arc::clone(&frontend), cart.id().clone())
            .await
            .expect("mTLS");
        assert_eq!(peer.as_ref(), Some(frontend.id()));
        assert_eq!(&seen, cart.id());
        // The client expected payments, cart answered: WebPKI's name check refuses it.
        let payments = SpiffeId::new("meshscope.local", "shop", "payments").expect("id");
        let e = handshake(Arc::clone(&cart), Arc::clone(&frontend), payments)
            .await
            .expect_err("wrong server");
        assert!(
            e.contains("certificate") || e.contains("NotValidForName"),
            "{e}"
        );
        // A client from another CA is refused by the server.
        let dir2 = tempfile::tempdir().expect("dir");
        let other_ca =
            MeshCa::open(dir2.path(), "meshscope.local", crate::ca::DEFAULT_LIFETIME).expect("ca");
        let stranger = store(&other_ca, "shop", "frontend");
        let e = handshake(Arc::clone(&cart), stranger, cart.id().clone())
            .await
            .expect_err("foreign client");
        assert!(!e.is_empty());
    }
}
