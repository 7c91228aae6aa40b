//! The pooled HTTPS client towards Tango: rustls with the webpki roots plus `upstream.ca_file`,
//! ALPN for HTTP/2 and HTTP/1.1, keep-alive pooling, no redirect following (hyper never follows).

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;

use super::body::OutboundBody;
use crate::config::UpstreamConfig;

/// The client every forwarded request goes through.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, OutboundBody>;

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

/// Builds the pooled upstream client.
pub fn build(config: &UpstreamConfig) -> Result<UpstreamClient, TlsError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    http.set_connect_timeout(Some(config.timeout.min(Duration::from_secs(10))));
    let tls = tls_config(&config.extra_roots)?;
    let builder = HttpsConnectorBuilder::new().with_tls_config(tls);
    let connector = if config.allow_http {
        builder.https_or_http()
    } else {
        builder.https_only()
    }
    .enable_http1()
    .enable_http2()
    .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector))
}
