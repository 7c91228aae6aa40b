//! The pooled HTTPS client towards Tango: rustls with the webpki roots plus `upstream.ca_file`,
//! ALPN for HTTP/2 and HTTP/1.1, keep-alive pooling, no redirect following (hyper never follows).

use std::time::Duration;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::OutboundBody;
use crate::config::UpstreamConfig;
use crate::tls::{tls_config, TlsError};

/// The client every forwarded request goes through.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, OutboundBody>;

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
