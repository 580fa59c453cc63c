//! The agent identity (one PEM file from `pilotlight-receiver enroll`) and the
//! TLS client configuration built from it.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use pilotlight_protocol::tls::ALPN;

use crate::AgentError;

/// The identity file's bytes, refused if another user could change it
/// (checked on the open file, so the path cannot be swapped meanwhile).
fn read_private(path: &Path) -> Result<Vec<u8>, AgentError> {
    use std::io::Read;
    let cannot = |e: std::io::Error| {
        AgentError::Config(format!("cannot read identity {}: {e}", path.display()))
    };
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    crate::state::check_private(path, &meta, "identity file")?;
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o044 != 0 {
        tracing::warn!(
            path = %path.display(),
            "the identity file (it holds the agent's private key) is readable by other users; chmod 600 it"
        );
    }
    let mut pem = Vec::new();
    file.read_to_end(&mut pem).map_err(cannot)?;
    Ok(pem)
}

/// Build the TLS 1.3 client configuration from an identity file: the first
/// certificate is the agent's, the second the receiver's CA.
pub fn client_config(path: &Path) -> Result<Arc<ClientConfig>, AgentError> {
    let pem = read_private(path)?;
    let bad = |what: &str| AgentError::Config(format!("identity {} {what}", path.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|_| bad("has a malformed certificate"))?;
    let [agent, ca, ..] = certs.as_slice() else {
        return Err(bad(
            "must hold the agent certificate and the CA certificate",
        ));
    };
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| bad("has no private key"))?;
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|_| bad("has an unusable CA certificate"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| AgentError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![agent.clone()], key)
        .map_err(|e| AgentError::Config(format!("identity {}: {e}", path.display())))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}
