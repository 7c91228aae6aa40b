//! TLS: trust for every outbound connection (the API and the token endpoint: one rustls client
//! configuration, shared by `proxy` and `auth` so neither depends on the other for it), and the
//! proxy listener's own server configuration when `listen.tls_cert_file` is set (its identity,
//! ALPN, and the client certificates a gateway may identify callers by). One crypto backend,
//! `ring`, for both directions.

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

/// Whether the proxy listener asks clients for a certificate it must have
/// (`listen.tls_client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client may present a certificate; one without still gets a connection (and must then
    /// authenticate with a key).
    #[default]
    Optional,
    /// A connection without a valid client certificate fails its handshake.
    Required,
}

/// The certificate a client presented on the proxy listener, verified against
/// `listen.tls_client_ca_file`: its leaf, as DER. Requests on that connection carry it as an
/// extension.
#[derive(Debug, Clone)]
pub struct ClientCert(pub Arc<CertificateDer<'static>>);

/// The rustls server configuration of the proxy listener: `chain` and `key` as the server's
/// identity, HTTP/2 and HTTP/1.1 offered by ALPN, and — with `client_roots` — client
/// certificates verified against those roots (asked for, and required with
/// [`ClientAuth::Required`]).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    client_roots: Option<(&[CertificateDer<'static>], ClientAuth)>,
) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some((roots, mode)) => {
            let mut store = rustls::RootCertStore::empty();
            for cert in roots {
                store
                    .add(cert.clone())
                    .map_err(|e| format!("a client CA certificate is unusable: {e}"))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(store.into(), provider);
            let verifier = match mode {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                ClientAuth::Required => verifier,
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("the client CAs are unusable: {e}"))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("the certificate and key do not make a server identity: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
