//! The upstream connection pool towards Tango: rustls with the webpki roots plus
//! `upstream.ca_file`, ALPN for HTTP/2 and HTTP/1.1, no redirect following (hyper never follows),
//! and what its errors prove about whether Tango processed a request ([`Refusal`]).
//!
//! The proxy has one upstream origin, so the pool is one list, not a map keyed per request:
//! * **HTTP/2** (what Tango's edge negotiates): one connection, every request a stream on it. It
//!   is made once for all the requests that arrive while it is being made (they wait for it),
//!   and replaced when it closes or fails with anything but a stream's own reset.
//! * **HTTP/1.1** (plain-HTTP upstreams, mocks, an edge that does not offer h2): keep-alive
//!   connections, each carrying one request at a time; a request takes the most recently used
//!   one that is free, else opens one. There is no limit beyond the requests in flight.
//! * Connections unused for 90 s are closed (checked every 30 s).
//!
//! A connection that has received a GOAWAY opens no more streams: h2 fails every stream opened
//! after it with the GOAWAY, hyper's dispatcher for that connection then shuts down, the pool
//! drops it and makes a new one; requests handed to it but not yet sent come back whole and go
//! on another connection when theirs had carried requests before (a connection's first request
//! coming back unsent is a [`Refusal::Unsent`] for the proxy to send once more).
//! `tests/integration/refusals.rs` checks it: no stream is opened on a connection after the
//! proxy has acknowledged the PING its edge sent behind the GOAWAY.
//!
//! This replaces hyper-util's general-purpose client, whose pool (keyed per request, with a
//! checkout racing a connect) cost about 11,000 instructions a request on this path — a fifth
//! of the proxy's whole cost (`scripts/instructions.sh`).

use std::error::Error as StdError;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

use super::body::OutboundBody;
use crate::config::UpstreamConfig;
use crate::tls::{tls_config, TlsError};

/// How long a connection may stay unused before the pool closes it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often unused and closed connections are looked for.
const REAP_EVERY: Duration = Duration::from_secs(30);
/// Sends of one request handed back unsent by connections that had served others before (each
/// such connection is dropped), before the failure is the answer.
const UNSENT_RETRIES: usize = 3;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// The client every forwarded request goes through: a cheap handle to the pool.
#[derive(Debug, Clone)]
pub struct UpstreamClient(Arc<Pool>);

struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// The upstream origin connections are made to.
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// `Host` of an HTTP/1.1 request (HTTP/2 sends `:authority` from the request's URI); an
    /// authority is always a valid header value.
    host: Option<HeaderValue>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    conns: Mutex<Conns>,
    /// Held while a connection that may be HTTP/2 is being made, so that requests arriving
    /// meanwhile share it instead of opening their own.
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("authority", &self.authority)
            .finish()
    }
}

#[derive(Default)]
struct Conns {
    http2: Option<Http2Conn>,
    /// Every HTTP/1.1 connection, free or carrying a request; the most recently used last.
    http1: Vec<Http1Conn>,
    /// What the last connection made negotiated (`None` before the first).
    speaks_h2: Option<bool>,
    next_id: u64,
    reaping: bool,
}

struct Http1Conn {
    id: u64,
    tx: http1::SendRequest<OutboundBody>,
    used: Instant,
}

struct Http2Conn {
    id: u64,
    tx: http2::SendRequest<OutboundBody>,
    used: Instant,
}

/// A connection taken for one request.
enum Taken {
    Http1(u64, http1::SendRequest<OutboundBody>),
    Http2(u64, http2::SendRequest<OutboundBody>),
}

/// Why an upstream call failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (TCP, TLS or the HTTP/2 handshake).
    #[error("cannot connect to the upstream")]
    Connect(#[source] Box<dyn StdError + Send + Sync>),
    /// The request failed on its connection.
    #[error("upstream request failed")]
    Request(#[source] hyper::Error),
}

impl UpstreamError {
    /// Whether no connection could be made at all.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

/// Builds the upstream pool.
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
    let url = &config.url;
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new());
    Ok(UpstreamClient(Arc::new(Pool {
        connector,
        scheme: url.scheme.clone(),
        authority: url.authority.clone(),
        host: HeaderValue::from_str(url.authority.as_str()).ok(),
        h1: http1::Builder::new(),
        h2,
        conns: Mutex::new(Conns::default()),
        connecting: tokio::sync::Mutex::new(()),
    })))
}

impl UpstreamClient {
    /// Sends `req` (its URI absolute, naming the upstream origin) and returns Tango's response
    /// head; the body streams on.
    pub async fn request(
        &self,
        mut req: Request<OutboundBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pool = &*self.0;
        let uri = req.uri().clone();
        let mut retries = 0;
        loop {
            let (taken, reused) = self.0.take().await?;
            let (id, sent) = match taken {
                Taken::Http2(id, mut tx) => (id, tx.try_send_request(req).await),
                Taken::Http1(id, mut tx) => {
                    if let Some(host) = &pool.host {
                        req.headers_mut()
                            .entry(header::HOST)
                            .or_insert_with(|| host.clone());
                    }
                    *req.uri_mut() = origin_form(req.uri());
                    // The request is in the connection's hands: the connection goes back to
                    // the list, free again once this response's body has been read.
                    let sent = tx.try_send_request(req);
                    pool.put_back(id, tx);
                    (id, sent.await)
                }
            };
            let mut err = match sent {
                Ok(response) => return Ok(response),
                Err(err) => err,
            };
            let stream_reset = is_stream_reset(err.error());
            if !stream_reset {
                pool.forget(id);
            }
            match err.take_message() {
                Some(unsent) if reused && retries < UNSENT_RETRIES => {
                    retries += 1;
                    req = unsent;
                    *req.uri_mut() = uri.clone();
                }
                _ => return Err(UpstreamError::Request(err.into_error())),
            }
        }
    }
}

impl Pool {
    /// A connection for one request, and whether it served others before.
    async fn take(self: &Arc<Self>) -> Result<(Taken, bool), UpstreamError> {
        if let Some(taken) = self.free() {
            return Ok((taken, true));
        }
        // Requests wait for a connection that may be HTTP/2 rather than open one each.
        let shared = lock(&self.conns).speaks_h2 != Some(false);
        let _connecting = if shared {
            let guard = self.connecting.lock().await;
            if let Some(taken) = self.free() {
                return Ok((taken, true));
            }
            Some(guard)
        } else {
            None
        };
        // Boxed: the connect future (TCP, TLS, handshake) is large, and the request future that
        // would otherwise hold it inline is moved on every request, connecting or not.
        Ok((Box::pin(self.connect()).await?, false))
    }

    /// A free connection, if there is one; closed ones are dropped on the way.
    fn free(&self) -> Option<Taken> {
        let mut conns = lock(&self.conns);
        if let Some(c) = &mut conns.http2 {
            if !c.tx.is_closed() {
                c.used = Instant::now();
                return Some(Taken::Http2(c.id, c.tx.clone()));
            }
            conns.http2 = None;
        }
        while let Some(k) = conns
            .http1
            .iter()
            .rposition(|c| c.tx.is_ready() || c.tx.is_closed())
        {
            let c = conns.http1.remove(k);
            if !c.tx.is_closed() {
                return Some(Taken::Http1(c.id, c.tx));
            }
        }
        None
    }

    fn put_back(&self, id: u64, tx: http1::SendRequest<OutboundBody>) {
        let used = Instant::now();
        lock(&self.conns).http1.push(Http1Conn { id, tx, used });
    }

    /// Drops connection `id` from the pool (requests on it finish; none start).
    fn forget(&self, id: u64) {
        let mut conns = lock(&self.conns);
        if conns.http2.as_ref().is_some_and(|c| c.id == id) {
            conns.http2 = None;
        }
        conns.http1.retain(|c| c.id != id);
    }

    /// Makes a new connection; an HTTP/2 one is shared from now on.
    async fn connect(self: &Arc<Self>) -> Result<Taken, UpstreamError> {
        let origin = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        let io = self
            .connector
            .clone()
            .call(origin)
            .await
            .map_err(UpstreamError::Connect)?;
        let h2 = io.connected().is_negotiated_h2();
        let taken = if h2 {
            let (tx, conn) = self
                .h2
                .handshake::<Io, OutboundBody>(io)
                .await
                .map_err(|e| UpstreamError::Connect(e.into()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("upstream HTTP/2 connection ended: {e}");
                }
            });
            let mut conns = lock(&self.conns);
            let id = conns.id();
            conns.http2 = Some(Http2Conn {
                id,
                tx: tx.clone(),
                used: Instant::now(),
            });
            Taken::Http2(id, tx)
        } else {
            let (mut tx, conn) = self
                .h1
                .handshake::<Io, OutboundBody>(io)
                .await
                .map_err(|e| UpstreamError::Connect(e.into()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("upstream HTTP/1.1 connection ended: {e}");
                }
            });
            tx.ready()
                .await
                .map_err(|e| UpstreamError::Connect(e.into()))?;
            Taken::Http1(lock(&self.conns).id(), tx)
        };
        let start_reaping = {
            let mut conns = lock(&self.conns);
            conns.speaks_h2 = Some(h2);
            !std::mem::replace(&mut conns.reaping, true)
        };
        if start_reaping {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
        Ok(taken)
    }
}

impl Conns {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// Closes connections unused for [`IDLE_TIMEOUT`], every [`REAP_EVERY`], while the pool lives.
async fn reap(pool: Weak<Pool>) {
    let mut every = tokio::time::interval(REAP_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let mut conns = lock(&pool.conns);
        let stale = |used: Instant| used.elapsed() >= IDLE_TIMEOUT;
        let unused = |c: &Http1Conn| c.tx.is_ready() && stale(c.used);
        conns.http1.retain(|c| !c.tx.is_closed() && !unused(c));
        if conns
            .http2
            .as_ref()
            .is_some_and(|c| c.tx.is_closed() || stale(c.used))
        {
            conns.http2 = None;
        }
    }
}

/// `uri` as an HTTP/1.1 request target: its path and query.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

/// Whether Tango reset this one stream (its connection still good for others).
fn is_stream_reset(err: &hyper::Error) -> bool {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            return e.is_reset() && e.is_remote() && !e.is_go_away();
        }
        source = e.source();
    }
    false
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
