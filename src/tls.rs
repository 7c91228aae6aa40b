//! Trust for every outbound TLS connection (the API and the token endpoint): one rustls client
//! configuration, shared by `proxy` and `auth` so neither depends on the other for it.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

/// Building the TLS configuration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the protocol set or a certificate.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls client configuration for every outbound TLS connection (API and token endpoint):
/// Mozilla's roots from webpki-roots plus any extra roots; certificates are always verified.
pub fn tls_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert.clone())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
