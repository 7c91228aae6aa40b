//! The pooled HTTPS client towards Tango: rustls with the webpki roots plus `upstream.ca_file`,
//! ALPN for HTTP/2 and HTTP/1.1, keep-alive pooling, no redirect following (hyper never follows),
//! and what its errors prove about whether Tango processed a request ([`Refusal`]).
//!
//! A connection that has received a GOAWAY opens no more streams, without code here: h2 fails
//! every stream opened after it with the GOAWAY, hyper's dispatcher for that connection then
//! shuts down so the pool stops handing it out, and requests already queued on it come back to
//! hyper-util unsent, which sends them on another connection (`retry_canceled_requests`, on by
//! default). `tests/integration/refusals.rs` checks it: no stream is opened on a connection after
//! the proxy has acknowledged the PING its edge sent behind the GOAWAY.

use std::error::Error as StdError;
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

/// Proof, in a failed upstream call, that Tango did not process the request, so sending it
/// once more cannot make anything happen twice (RFC 9113 §8.7), whatever the method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The stream was above the last-stream-id of its connection's GOAWAY (RFC 9113 §6.8), or
    /// the connection had received a GOAWAY before the stream could be opened.
    GoAway,
    /// Tango reset the stream with `REFUSED_STREAM`.
    RefusedStream,
    /// The request never left the proxy: its connection went away before the request was
    /// handed to it (hyper gives such a request back, "canceled", or refuses it, "closed").
    Unsent,
}

impl Refusal {
    /// The `reason` label of `tango_proxy_upstream_retries_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::GoAway => "goaway",
            Refusal::RefusedStream => "refused_stream",
            Refusal::Unsent => "unsent",
        }
    }

    /// Reads the error chain of a failed call. Anything else — a timeout, an I/O error, a reset
    /// with another code, a GOAWAY the proxy itself sent — may have reached Tango's application
    /// and gives `None`.
    pub(crate) fn of(err: &(dyn StdError + 'static)) -> Option<Refusal> {
        let mut source = Some(err);
        while let Some(e) = source {
            if let Some(e) = e.downcast_ref::<hyper::Error>() {
                if e.is_canceled() || e.is_closed() {
                    return Some(Refusal::Unsent);
                }
            }
            if let Some(e) = e.downcast_ref::<h2::Error>() {
                return match e.reason() {
                    _ if !e.is_remote() => None,
                    _ if e.is_go_away() => Some(Refusal::GoAway),
                    Some(h2::Reason::REFUSED_STREAM) if e.is_reset() => {
                        Some(Refusal::RefusedStream)
                    }
                    _ => None,
                };
            }
            source = e.source();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_proof_of_a_refusal_counts() {
        // Timeouts, resets and the like may have reached Tango; errors h2 raises on its own side
        // (here, a reason given by the proxy itself) are not Tango's word either.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        assert_eq!(Refusal::of(&io), None);
        let local = h2::Error::from(h2::Reason::REFUSED_STREAM);
        assert_eq!(Refusal::of(&local), None);
    }
}
