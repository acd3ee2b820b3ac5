//! rustls configuration of the server (mutual TLS), with aws-lc-rs as the
//! only crypto provider. Reading certificates and keys, and the client side
//! (operator CLI, agents, tests), are `rollguard_shared::tls_client`'s.

use std::path::Path;
use std::sync::Arc;

pub use rollguard_shared::tls_client::{load_certs, load_key, provider};
use rollguard_shared::tls_client::{root_store, TlsError as CredentialError};

#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The server side: requires a client certificate issued by one of
/// `client_issuers` (the agents and operators issuing CAs).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_issuers: &[&Path],
) -> Result<Arc<rustls::ServerConfig>, ServerTlsError> {
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(client_issuers)?),
        provider.clone(),
    )
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The enrollment listener's side: the same server certificate, and no
/// client certificate asked for (a host enrolling has none yet). Serves
/// only `/v1/enroll*` (`crate::enroll`).
pub fn server_auth_only_config(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, ServerTlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
