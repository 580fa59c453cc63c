//! The receiver's own PKI: a CA, the receiver's server certificate, and one
//! identity per enrolled server. TLS 1.3 only, with mutual authentication.
//!
//! Files in the receiver directory: `ca.pem`, `ca.key` (0600), `server.pem`,
//! `server.key` (0600). An agent identity is one PEM file holding the agent
//! certificate, the CA certificate and the agent's private key (0600).
//!
//! The agent certificate's common name is its server name, and its serial is
//! recorded in the catalog: only the newest identity of a server that has not
//! been revoked is accepted.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use pilotlight_protocol::tls::{ALPN, RECEIVER_NAME};

use crate::ReceiveError;

/// Organizational unit that marks agent certificates.
const AGENT_OU: &str = "pilotlight-agent";
/// The organizational unit of an operator identity (remote export, console):
/// never accepted where an agent is, nor an agent's where an operator is.
const OPERATOR_OU: &str = "pilotlight-operator";

fn cfg_err(what: &str, e: impl std::fmt::Display) -> ReceiveError {
    ReceiveError::Config(format!("{what}: {e}"))
}

/// Write `data` to a new file with the given mode; refuses to overwrite.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), ReceiveError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                ReceiveError::Refused(format!(
                    "{} already exists; not overwriting it",
                    path.display()
                ))
            } else {
                ReceiveError::storage(path, e)
            }
        })?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| ReceiveError::storage(path, e))?;
    // The new name too: without it a power cut can lose the file whose
    // contents were synced (the catalog may already name its serial).
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    crate::store::sync_dir(parent)
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Valid from the Unix epoch: a source server whose clock is wrong (reset
/// to 1970, or behind the receiver's) still connects, since its points are
/// dated by the receiver's clock; the catalog's serial decides who is
/// enrolled, and the certificates still expire.
fn validity(params: &mut CertificateParams, years: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = time::OffsetDateTime::UNIX_EPOCH;
    params.not_after = now + time::Duration::days(365 * years);
}

/// Create the CA and the receiver's certificate in `dir`. `extra_ips` are
/// added to the certificate beside the fixed name and localhost.
pub fn create_ca(dir: &Path, extra_ips: &[IpAddr]) -> Result<(), ReceiveError> {
    let ca_key = KeyPair::generate().map_err(|e| cfg_err("generating the CA key", e))?;
    let mut ca =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| cfg_err("CA parameters", e))?;
    ca.distinguished_name
        .push(DnType::CommonName, "pilotlight receiver CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.serial_number = Some(serial());
    validity(&mut ca, 20);
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|e| cfg_err("signing the CA", e))?;
    let issuer = Issuer::new(ca, ca_key);

    let srv_key = KeyPair::generate().map_err(|e| cfg_err("generating the server key", e))?;
    let mut srv = CertificateParams::new(vec![RECEIVER_NAME.to_owned(), "localhost".to_owned()])
        .map_err(|e| cfg_err("server certificate parameters", e))?;
    srv.distinguished_name
        .push(DnType::CommonName, RECEIVER_NAME);
    for ip in extra_ips.iter().chain(&[IpAddr::from([127, 0, 0, 1])]) {
        srv.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    srv.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    srv.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    srv.serial_number = Some(serial());
    validity(&mut srv, 10);
    let srv_cert = srv
        .signed_by(&srv_key, &issuer)
        .map_err(|e| cfg_err("signing the server certificate", e))?;

    write_new(&dir.join("ca.pem"), ca_cert.pem().as_bytes(), 0o644)?;
    write_new(
        &dir.join("ca.key"),
        issuer.key().serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&dir.join("server.pem"), srv_cert.pem().as_bytes(), 0o644)?;
    write_new(
        &dir.join("server.key"),
        srv_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    Ok(())
}

/// Issue an agent identity for `server`: returns the PEM text (agent cert,
/// CA cert, private key) and the certificate serial (hex).
pub fn issue_identity(dir: &Path, server: &str) -> Result<(String, String), ReceiveError> {
    let c = issue_client(dir, server, AGENT_OU)?;
    let pem = format!("{}{}{}", c.cert, c.ca.trim_end().to_owned() + "\n", c.key);
    Ok((pem, c.serial))
}

/// A client identity: PEM texts of its certificate, the CA and its key,
/// and the certificate's serial (hex).
pub struct ClientIdentity {
    /// The client certificate (PEM).
    pub cert: String,
    /// The receiver's CA certificate (PEM).
    pub ca: String,
    /// The private key (PEM).
    pub key: String,
    /// Serial number (hex).
    pub serial: String,
}

/// An operator identity named `name` (remote export over TLS): never
/// accepted where an agent is, nor an agent's where an operator is.
pub fn issue_operator(dir: &Path, name: &str) -> Result<ClientIdentity, ReceiveError> {
    issue_client(dir, name, OPERATOR_OU)
}

/// A client certificate for `cn` in organizational unit `ou`, signed by
/// the receiver's CA.
fn issue_client(dir: &Path, cn: &str, ou: &str) -> Result<ClientIdentity, ReceiveError> {
    let ca_pem = read(&dir.join("ca.pem"))?;
    let ca_key_pem = read(&dir.join("ca.key"))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| cfg_err("reading ca.key", e))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| cfg_err("reading ca.pem", e))?;
    let key = KeyPair::generate().map_err(|e| cfg_err("generating the client key", e))?;
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| cfg_err("client parameters", e))?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, ou);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let sn = serial();
    let serial_hex = crate::catalog::hex(&sn.to_bytes());
    params.serial_number = Some(sn);
    validity(&mut params, 10);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| cfg_err("signing the client certificate", e))?;
    Ok(ClientIdentity {
        cert: cert.pem(),
        ca: ca_pem,
        key: key.serialize_pem(),
        serial: serial_hex,
    })
}

fn read(path: &Path) -> Result<String, ReceiveError> {
    std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ReceiveError::NotFound(format!(
                "{} is missing; is this a receiver directory made by `pilotlight-receiver init`?",
                path.display()
            ))
        } else {
            ReceiveError::storage(path, e)
        }
    })
}

/// The TLS server configuration: TLS 1.3 only, client certificates from our
/// CA required.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, ReceiveError> {
    let mut cfg = tls_config(dir)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// The TLS configuration of an export over TLS: as [`server_config`]
/// (TLS 1.3, the receiver's certificate, client certificates from its CA),
/// without the agents' ALPN (NBD clients send none); the operator identity
/// is checked after the handshake ([`operator_identity`]).
pub fn operator_server_config(dir: &Path) -> Result<Arc<ServerConfig>, ReceiveError> {
    Ok(Arc::new(tls_config(dir)?))
}

fn tls_config(dir: &Path) -> Result<ServerConfig, ReceiveError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let ca = CertificateDer::from_pem_slice(read(&dir.join("ca.pem"))?.as_bytes())
        .map_err(|e| cfg_err("reading ca.pem", e))?;
    let mut roots = RootCertStore::empty();
    roots.add(ca).map_err(|e| cfg_err("adding the CA", e))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| cfg_err("building the client verifier", e))?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(read(&dir.join("server.pem"))?.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| cfg_err("reading server.pem", e))?;
    let key = PrivateKeyDer::from_pem_slice(read(&dir.join("server.key"))?.as_bytes())
        .map_err(|e| cfg_err("reading server.key", e))?;
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cfg_err("TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| cfg_err("server certificate", e))
}

/// The operator named by a verified client certificate; an agent's (or any
/// other) certificate is refused.
pub fn operator_identity(certs: &[CertificateDer<'_>]) -> Result<String, ReceiveError> {
    let s = subject_of(certs)?;
    if !s.units.iter().any(|u| u == OPERATOR_OU) {
        return Err(ReceiveError::Unauthorized(
            "certificate is not an operator identity (`enroll --operator`)".into(),
        ));
    }
    s.name
        .filter(|n| pilotlight_protocol::limits::valid_name(n))
        .ok_or_else(|| ReceiveError::Unauthorized("certificate names no valid identity".into()))
}

/// What a verified client certificate says of its holder.
struct Subject {
    /// The first common name.
    name: Option<String>,
    /// Every organizational unit.
    units: Vec<String>,
    /// Serial number (hex).
    serial: String,
}

/// The subject of the first certificate of a verified chain.
fn subject_of(certs: &[CertificateDer<'_>]) -> Result<Subject, ReceiveError> {
    let der = certs
        .first()
        .ok_or_else(|| ReceiveError::Unauthorized("no client certificate".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| ReceiveError::Unauthorized("client certificate does not parse".into()))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let units = subject
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok().map(str::to_owned))
        .collect();
    Ok(Subject {
        name,
        units,
        serial: crate::catalog::hex(cert.raw_serial()),
    })
}

/// The server name and serial (hex) of a verified agent certificate.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<(String, String), ReceiveError> {
    let s = subject_of(certs)?;
    if !s.units.iter().any(|u| u == AGENT_OU) {
        return Err(ReceiveError::Unauthorized(
            "certificate is not an agent identity".into(),
        ));
    }
    let name = s
        .name
        .ok_or_else(|| ReceiveError::Unauthorized("agent certificate has no server name".into()))?;
    if !pilotlight_protocol::limits::valid_name(&name) {
        return Err(ReceiveError::Unauthorized(format!(
            "agent certificate names an invalid server {name:?}"
        )));
    }
    Ok((name, s.serial))
}
