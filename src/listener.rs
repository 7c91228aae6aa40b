//! The accept loop both listeners share: HTTP/1.1 per connection (or, with `listen.tls_cert_file`
//! on the proxy listener, TLS carrying HTTP/2 or HTTP/1.1 as ALPN chose), a header-read timeout,
//! a cap on open connections, a limit on stalled writes, and a drain on shutdown.
//!
//! Limits (README "Security"):
//! * `listen.header_timeout` (default 30 s) is how long a client has to send a whole request head,
//!   on the proxy and the admin listener alike, for the first request and for every later request
//!   on a kept-alive connection (so it is also the keep-alive idle timeout). A slowloris client is
//!   cut off when it runs out.
//! * `listen.max_connections` / `listen.admin_max_connections` cap the connections each listener
//!   holds open. A connection beyond the cap is accepted only to be told so: it gets a `503`
//!   (`too_many_connections`, `Retry-After: 1`) and is closed, so an app sees a clear, retryable
//!   answer at once rather than hanging in the kernel's backlog, and the descriptors the other
//!   listener needs are never used up by this one. Refusals are counted in
//!   `tango_proxy_connections_refused_total{listener}` and logged at WARN at most once every
//!   ten seconds with the number refused since the last line. At most 64 refusals run at once;
//!   past that a connection is closed unanswered, so a flood costs a bounded number of
//!   descriptors.
//! * An app that takes no part of its response for `listen.body_idle_timeout` loses the
//!   connection (`AppIo`), so it cannot hold a slot (and Tango's stream) for ever.
//! * A connection closing while the app may still be sending (the rest of a body answered 413,
//!   say) lingers (RFC 9112 §9.6): its write side is shut and what still arrives is read and
//!   dropped, for at most 2 s, 250 ms without data, or 1 MiB (`AppIo::poll_shutdown`), so the
//!   app reads its answer rather than a reset.
//! * Every connection the listener ends itself is counted by why in
//!   `tango_proxy_connections_ended_total{listener,reason}` ([`ENDED_KINDS`]).
//! * When accepting fails (out of descriptors), the loop pauses 50 ms instead of spinning, and says
//!   so at most once every ten seconds.
//!
//! TLS connections (see [`serve_tls`]) take the server configuration current when they are
//! accepted (`tls_reload` swaps it when the files change; a connection keeps the one it was
//! accepted with), and keep every limit above: the handshake must finish within
//! `listen.header_timeout` (else `tls_handshake`), and the connection holds its slot from accept.
//! ALPN picks the protocol: `h2` is HTTP/2, anything else (or no ALPN) HTTP/1.1, so no
//! connection waits on sniffing a preface. HTTP/2 runs with hyper's protections: at most
//! [`H2_MAX_STREAMS`] concurrent streams, at most [`H2_MAX_PENDING_RESETS`] streams reset before
//! they were served (rapid reset, CVE-2023-44487: past it the connection gets GOAWAY), a header
//! list bounded like an HTTP/1.1 head (which bounds a CONTINUATION flood too), keep-alive pings
//! every `listen.header_timeout`, and a connection with no request for `listen.header_timeout`
//! is closed (`idle`), as a kept-alive HTTP/1.1 connection is. An HTTP/2 answer that has waited
//! on its client (no flow-control window to send it) for `listen.body_idle_timeout` ends the
//! connection (`write_stalled`): nothing is then written, so `AppIo` sees no write stall. The
//! client's certificate, when it sent one, is handed to the service builder with the remote
//! address.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::config::ListenConfig;
use crate::idle::IdleClock;
use crate::metrics::Metrics;
use crate::tls::ClientCert;

/// Header fields hyper accepts before the proxy's own size check sees the request.
const MAX_HEADER_FIELDS: usize = 512;
/// Shortest gap between two log lines about refused connections or failed accepts.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a refused connection is given to take its 503.
const REFUSAL_WRITE_LIMIT: Duration = Duration::from_secs(1);
/// Concurrent HTTP/2 streams per connection (the SETTINGS a client is sent).
pub const H2_MAX_STREAMS: u32 = 100;
/// HTTP/2 streams a client may reset before they are served, at once, before the connection is
/// ended with GOAWAY (hyper's rapid-reset protection).
pub const H2_MAX_PENDING_RESETS: usize = 20;
/// Request-body bytes one HTTP/2 stream may send ahead of the proxy reading them.
pub const H2_STREAM_WINDOW: u32 = 64 << 10;
/// The same for a whole HTTP/2 connection.
pub const H2_CONNECTION_WINDOW: u32 = 256 << 10;
/// Longest wait for the answer to an HTTP/2 keep-alive ping.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How one listener behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `"proxy"` or `"admin"`: log lines and metric labels.
    pub name: &'static str,
    /// Time a client has to send a request head.
    pub header_timeout: Duration,
    /// Longest an app may take no part of a response it is being sent.
    pub write_idle_timeout: Duration,
    /// Connections held open at most.
    pub max_connections: usize,
    /// The configuration key of `max_connections`, for the log line.
    pub max_connections_key: &'static str,
    /// Read buffer per connection: above the largest header section the service checks itself.
    pub read_buffer: usize,
    /// How long shutdown waits for in-flight requests.
    pub grace: Duration,
    /// Connections open now.
    pub open: Gauge,
    /// Connections refused at the cap.
    pub refused: Counter,
    /// Connections the listener itself ended, by why (in [`ENDED_KINDS`] order).
    pub ended: [Counter; 6],
    /// TLS for every connection (the proxy listener with `listen.tls_cert_file`): each new
    /// connection takes the configuration current at its accept.
    pub tls: Option<crate::tls_reload::ServerConfigCell>,
}

impl Settings {
    /// The settings of listener `name` (`"proxy"` or `"admin"`): its cap and the key that sets
    /// it, its read buffer, the shared `[listen]` timeouts and its metrics.
    pub fn new(
        name: &'static str,
        (max_connections, max_connections_key): (usize, &'static str),
        read_buffer: usize,
        listen: &ListenConfig,
        metrics: &Metrics,
    ) -> Self {
        let (open, refused, ended) = metrics.listener(name);
        Self {
            name,
            header_timeout: listen.header_timeout,
            write_idle_timeout: listen.body_idle_timeout,
            max_connections,
            max_connections_key,
            read_buffer,
            grace: listen.grace_period,
            open,
            refused,
            ended,
            tls: None,
        }
    }
}

/// Why the listener ended a connection itself, for `Settings::ended`: a malformed request (a
/// bare 400, or an HTTP/2 protocol error), an oversized head (a bare 431), a head started but not
/// finished within `listen.header_timeout` (or never started on a new connection), a kept-alive
/// connection idle that long, an app that took no part of its response for
/// `listen.body_idle_timeout`, and a TLS handshake that failed or did not finish within
/// `listen.header_timeout`.
pub const ENDED_KINDS: [&str; 6] = [
    "malformed",
    "too_large",
    "header_timeout",
    "idle",
    "write_stalled",
    "tls_handshake",
];
const MALFORMED: usize = 0;
const TOO_LARGE: usize = 1;
const HEADER_TIMEOUT: usize = 2;
const IDLE: usize = 3;
const WRITE_STALLED: usize = 4;
const TLS_HANDSHAKE: usize = 5;

/// Refusals at the cap in progress at once; beyond it a connection is closed without its 503,
/// so a flood costs no more than this many descriptors and tasks.
const MAX_REFUSING: usize = 64;

/// Serves `listener` with the service `make(remote, client_cert)` builds for each connection until
/// `shutdown` resolves, then waits up to `settings.grace` for in-flight requests to finish:
/// HTTP/1.1 in plain text, or TLS with HTTP/2 or HTTP/1.1 when `settings.tls` is set.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    settings: Settings,
    make: M,
    shutdown: impl Future<Output = ()>,
) where
    M: Fn(SocketAddr, Option<ClientCert>) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(settings.read_buffer.max(8 << 10))
        .max_headers(MAX_HEADER_FIELDS)
        .keep_alive(true);
    let tls = settings.tls.clone().map(|config| TlsServing {
        config,
        builders: Arc::new(tls_builders(&settings)),
        header_timeout: settings.header_timeout,
        body_idle: settings.write_idle_timeout,
    });
    let make = Arc::new(make);

    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let refusals = Quiet::default();
    let accept_failures = Quiet::default();
    let graceful = GracefulShutdown::new();
    // TLS connections drain themselves: each is told to stop by `stopping` and holds a clone of
    // `tls_open`, so the receiver sees the channel close once the last one has ended.
    let (stopping, stop_seen) = watch::channel(false);
    let (tls_open, mut tls_drained) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        if let Some(n) = accept_failures.note() {
                            tracing::warn!(listener = settings.name, failures = n, "accept failed: {e}; pausing 50 ms");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    settings.refused.inc();
                    if let Some(n) = refusals.note() {
                        tracing::warn!(
                            listener = settings.name,
                            refused = n,
                            "{} open connections, the limit ({}): refusing new connections with 503",
                            settings.max_connections,
                            settings.max_connections_key,
                        );
                    }
                    // Past MAX_REFUSING the stream is dropped here: closed without an answer.
                    // A TLS listener's client would not understand a plain 503: it is closed.
                    if let (Ok(permit), None) = (refusing.clone().try_acquire_owned(), &tls) {
                        let answer = refusal(settings.max_connections_key);
                        tokio::spawn(async move {
                            refuse(stream, answer).await;
                            drop(permit);
                        });
                    }
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (io, progress) = AppIo::new(stream, settings.write_idle_timeout);
                let open = settings.open.clone();
                let ended = settings.ended.clone();
                open.inc();
                if let Some(tls) = &tls {
                    let tls = tls.clone();
                    let make = make.clone();
                    let stop = stop_seen.clone();
                    let tracked = tls_open.clone();
                    tokio::spawn(async move {
                        if let Some(k) = serve_tls(io, &progress, remote, &tls, &*make, stop).await {
                            ended[k].inc();
                        }
                        open.dec();
                        drop(slot);
                        drop(tracked);
                    });
                    continue;
                }
                let conn = builder.serve_connection(TokioIo::new(io), make(remote, None));
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        // Requests the listener refused before the service saw them (smuggling
                        // attempts, slowloris) would otherwise leave no trace an operator sees.
                        if let Some(k) = why_ended(&e, &progress) {
                            ended[k].inc();
                        }
                        tracing::debug!(%remote, "connection ended with an error: {e}");
                    }
                    open.dec();
                    drop(slot);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!(
        listener = settings.name,
        "listener closed; draining in-flight requests"
    );
    let _ = stopping.send(true);
    drop(tls_open);
    let drained = async {
        graceful.shutdown().await;
        let _ = tls_drained.recv().await;
    };
    tokio::select! {
        () = drained => tracing::info!(listener = settings.name, "all connections drained"),
        () = tokio::time::sleep(settings.grace) => {
            tracing::warn!(
                listener = settings.name,
                "grace period of {} over; closing remaining connections",
                humantime::format_duration(settings.grace)
            );
        }
    }
}

/// Why a connection hyper ended with `e` ended, as an index into [`ENDED_KINDS`]; `None` when
/// the client went away or anything else not counted.
fn why_ended(e: &hyper::Error, progress: &Progress) -> Option<usize> {
    if e.is_parse_too_large() {
        Some(TOO_LARGE)
    } else if e.is_parse() {
        Some(MALFORMED)
    } else if e.is_timeout() {
        Some(if progress.idle() {
            IDLE
        } else {
            HEADER_TIMEOUT
        })
    } else if progress.write_stalled() {
        Some(WRITE_STALLED)
    } else if StdError::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h| h.is_go_away() || h.reason().is_some_and(|r| r != h2::Reason::NO_ERROR))
    {
        // An HTTP/2 protocol violation (including a rapid reset past the limit).
        Some(MALFORMED)
    } else {
        None
    }
}

/// What a TLS listener's connection tasks share.
#[derive(Clone)]
struct TlsServing {
    /// The server configuration as reloads leave it.
    config: crate::tls_reload::ServerConfigCell,
    /// For HTTP/1.1 and for HTTP/2, chosen by ALPN.
    builders: Arc<(auto::Builder<TokioExecutor>, auto::Builder<TokioExecutor>)>,
    header_timeout: Duration,
    /// `listen.body_idle_timeout`: how long an HTTP/2 answer may wait on its client.
    body_idle: Duration,
}

/// The connection builders of a TLS listener: HTTP/1.1 with the plain listener's settings, and
/// HTTP/2 with hyper's protections set from the same limits.
fn tls_builders(
    settings: &Settings,
) -> (auto::Builder<TokioExecutor>, auto::Builder<TokioExecutor>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_buf_size(settings.read_buffer.max(8 << 10))
        .max_headers(MAX_HEADER_FIELDS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        // Receive windows bound what one connection can make the proxy hold of request bodies
        // it has not read yet (hyper's defaults: 1 MiB each); Tango's bodies are small.
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        // The same bound as an HTTP/1.1 head: above listen.max_header_size, so the proxy's own
        // check answers with its JSON 431; a header block (HEADERS plus CONTINUATION frames)
        // past it is refused by the HTTP/2 layer without being kept.
        .max_header_list_size(u32::try_from(settings.read_buffer).unwrap_or(u32::MAX))
        .keep_alive_interval(settings.header_timeout)
        .keep_alive_timeout(settings.header_timeout.min(H2_PING_TIMEOUT));
    (builder.clone().http1_only(), builder.http2_only())
}

/// One TLS connection from accept to end: the handshake within `listen.header_timeout`, then
/// HTTP/2 or HTTP/1.1 as ALPN chose, until the client leaves, the connection idles out or the
/// listener stops (then in-flight requests finish first). Returns why the listener ended it,
/// as an index into [`ENDED_KINDS`], when it did.
async fn serve_tls<M, S, B>(
    io: AppIo,
    progress: &Progress,
    remote: SocketAddr,
    tls: &TlsServing,
    make: &M,
    mut stop: watch::Receiver<bool>,
) -> Option<usize>
where
    M: Fn(SocketAddr, Option<ClientCert>) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    // The configuration current now; a reload later does not touch this connection.
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.borrow().clone());
    let handshake = tokio::time::timeout(tls.header_timeout, acceptor.accept(io));
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!(%remote, "TLS handshake failed: {e}");
                return Some(TLS_HANDSHAKE);
            }
            Err(_) => {
                tracing::debug!(%remote, "TLS handshake not finished within listen.header_timeout");
                return Some(TLS_HANDSHAKE);
            }
        },
        _ = stop.wait_for(|s| *s) => return None,
    };
    let session = stream.get_ref().1;
    let cert = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| ClientCert(Arc::new(leaf.clone().into_owned())));
    let h2 = session.alpn_protocol() == Some(b"h2".as_slice());
    let activity = Arc::new(Activity::new());
    let service = Tracked {
        inner: make(remote, cert),
        activity: activity.clone(),
    };
    let builder = if h2 { &tls.builders.1 } else { &tls.builders.0 };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    // HTTP/1.1 idles out in hyper (its header timeout); HTTP/2 has no such timer, so a
    // connection with no request in progress (an answer still streaming counts) is closed here,
    // gracefully: GOAWAY, then whatever is still buffered for a stream is delivered. A peer that
    // stops answering meanwhile is ended by the keep-alive ping's timeout.
    //
    // An HTTP/2 client can also stop taking an answer without stopping the connection: it opens
    // no flow-control window (or never opens it again) while answering pings. Nothing is then
    // written, so `AppIo` sees no stalled write, and the answer's body is never dropped, so the
    // connection never idles. Such a connection is ended (not gracefully: GOAWAY would wait on
    // the same stream) when an answer has waited on its client for `listen.body_idle_timeout`,
    // or, once idle-closing, when what the last answers left buffered is still not taken that
    // long after the GOAWAY.
    let mut closing = None;
    // Armed (with listen.body_idle_timeout) only by an idle close.
    let drain = tokio::time::sleep(Duration::MAX);
    tokio::pin!(drain);
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            _ = stop.wait_for(|s| *s), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(None);
            }
            () = activity.idle_for(tls.header_timeout), if h2 && closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                let why = if activity.served() { IDLE } else { HEADER_TIMEOUT };
                closing = Some(Some(why));
                drain.as_mut().reset(tokio::time::Instant::now() + tls.body_idle);
            }
            () = activity.stalled_for(tls.body_idle), if h2 => {
                tracing::debug!(
                    %remote,
                    "an HTTP/2 answer waited on its client for {} (listen.body_idle_timeout); closing",
                    humantime::format_duration(tls.body_idle)
                );
                return Some(WRITE_STALLED);
            }
            () = &mut drain, if matches!(closing, Some(Some(_))) => {
                tracing::debug!(
                    %remote,
                    "buffered HTTP/2 answers not taken within {} of closing (listen.body_idle_timeout)",
                    humantime::format_duration(tls.body_idle)
                );
                return Some(WRITE_STALLED);
            }
        }
    };
    let idle = closing.flatten();
    match result {
        Ok(()) => idle,
        Err(e) => {
            tracing::debug!(%remote, "connection ended with an error: {e}");
            match e
                .downcast_ref::<hyper::Error>()
                .map(|e| why_ended(e, progress))
            {
                // The handshake wrote last (session tickets): without a request yet, a timeout
                // is a silent client, not an idle one.
                Some(Some(IDLE)) if !activity.served() => Some(HEADER_TIMEOUT),
                Some(why) => why.or(idle),
                None => idle,
            }
        }
    }
}

/// Requests in progress on one connection, when the last one ended, and which answers are
/// waiting on the client: what tells an idle HTTP/2 connection, and one whose client stopped
/// taking its answers.
#[derive(Debug)]
struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Debug)]
struct ActivityState {
    /// Requests in progress (their answers not yet dropped).
    in_progress: usize,
    /// When the last request in progress ended.
    last_end: Instant,
    /// A request has been received.
    served: bool,
    /// The id the next request gets.
    next_id: u64,
    /// Answers whose body is waiting on the connection to send, by id, and since when: handed to
    /// hyper and not yet polled, or a frame handed out and the body not polled again. hyper polls
    /// an HTTP/2 body for its next frame only once the client's window lets it send the last
    /// one, so this is time spent waiting on the client; a body waiting on Tango has been polled
    /// and said "pending", and is not here.
    waiting: std::collections::HashMap<u64, Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                in_progress: 0,
                last_end: Instant::now(),
                served: false,
                next_id: 0,
                waiting: std::collections::HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(self: &Arc<Self>) -> ActivityGuard {
        let mut s = self.lock();
        s.in_progress += 1;
        s.served = true;
        let id = s.next_id;
        s.next_id += 1;
        ActivityGuard {
            activity: self.clone(),
            id,
        }
    }

    /// A request has been received on the connection.
    fn served(&self) -> bool {
        self.lock().served
    }

    /// Resolves once no request has been in progress for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let wait = {
                let s = self.lock();
                let since = s.last_end.elapsed();
                if s.in_progress == 0 && since >= limit {
                    return;
                }
                if s.in_progress > 0 {
                    limit
                } else {
                    limit - since
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Resolves once an answer has waited on the client for `limit` (seen within half of
    /// `limit` more).
    async fn stalled_for(&self, limit: Duration) {
        loop {
            let wait = {
                let s = self.lock();
                match s.waiting.values().min().map(Instant::elapsed) {
                    Some(since) if since >= limit => return,
                    Some(since) => limit - since,
                    None => limit / 2,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Ends a request's part in [`Activity`] when dropped; marks its answer's body waiting on the
/// connection or not.
#[derive(Debug)]
struct ActivityGuard {
    activity: Arc<Activity>,
    id: u64,
}

impl ActivityGuard {
    /// The answer's body waits on the connection (`true`: from now) or on its source.
    fn waiting(&self, waiting: bool) {
        let mut s = self.activity.lock();
        if waiting {
            s.waiting.insert(self.id, Instant::now());
        } else {
            s.waiting.remove(&self.id);
        }
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let mut s = self.activity.lock();
        s.in_progress = s.in_progress.saturating_sub(1);
        s.last_end = Instant::now();
        s.waiting.remove(&self.id);
    }
}

/// A connection's service that keeps [`Activity`] up to date.
#[derive(Debug)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Guarded<B>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Guarded<B>>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        let answer = self.inner.call(req);
        Box::pin(async move {
            // The request stays in progress until its whole answer is sent (or dropped).
            let result = answer.await;
            // From here the answer is hyper's to send.
            guard.waiting(true);
            Ok(result
                .unwrap_or_else(|never| match never {})
                .map(|body| Guarded {
                    inner: Box::pin(body),
                    guard,
                }))
        })
    }
}

/// An answer's body that keeps its request counted in [`Activity`] until it is dropped, and
/// tells it whether the body is waiting on the connection (ready, not polled) or on its source.
struct Guarded<B> {
    inner: Pin<Box<B>>,
    guard: ActivityGuard,
}

impl<B> std::fmt::Debug for Guarded<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guarded")
    }
}

impl<B: Body> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        // Pending: waiting on the source (Tango, bounded by upstream.body_idle_timeout). Ready:
        // the frame (or the end) is the connection's to send, and hyper asks for the next one
        // only once it could.
        self.guard.waiting(polled.is_ready());
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The whole answer to a connection over the cap: Tango's error shape, like every answer the
/// proxy makes itself, with the cause header. No request was read, so `path` and `requestId` are
/// empty.
fn refusal(key: &str) -> Bytes {
    let body = serde_json::json!({
        "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "requestId": "",
        "path": "",
        "httpCode": 503,
        "httpPhrase": "Service Unavailable",
        "i18nKey": "proxy.too_many_connections",
        "message": format!("the listener holds as many connections as {key} allows; retry shortly"),
    })
    .to_string();
    Bytes::from(format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         x-tango-proxy-error: too_many_connections\r\nretry-after: 1\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    ))
}

/// Tells a connection over the cap why it is closed. What the client already sent is read first,
/// so closing does not reset the connection and lose the answer.
async fn refuse(mut stream: TcpStream, answer: Bytes) {
    let _ = tokio::time::timeout(REFUSAL_WRITE_LIMIT, async {
        let mut scratch = [0u8; 4096];
        for _ in 0..16 {
            match stream.try_read(&mut scratch) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        let _ = stream.write_all(&answer).await;
        let _ = stream.shutdown().await;
        let mut scratch = [0u8; 4096];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// An app's connection as hyper sees it: reads and writes pass through, and it keeps what the
/// accept loop needs to know when the connection ends — whether it was between requests (an idle
/// close, not a slow client) and whether a write to the app stalled past the idle limit, which
/// ends the connection: an app that stops reading its response would otherwise hold its
/// connection slot (and Tango's stream) for ever.
#[derive(Debug)]
struct AppIo {
    stream: TcpStream,
    clock: IdleClock,
    progress: Arc<Progress>,
    /// Set once the connection is closing (see [`AppIo::poll_shutdown`]).
    linger: Option<Linger>,
}

/// A closing connection's lingering close (RFC 9112 §9.6): after the last response the write
/// side is shut, and what the app still sends (the rest of a request body the proxy answered
/// without reading, say a 413) is read and dropped, so the app reads its answer instead of
/// meeting a reset. It ends at the app's end of stream, after [`LINGER_QUIET`] without data,
/// [`LINGER_TOTAL`] in all, or [`LINGER_BYTES`] read.
#[derive(Debug)]
struct Linger {
    total: Pin<Box<tokio::time::Sleep>>,
    quiet: Pin<Box<tokio::time::Sleep>>,
    left: usize,
}

/// The longest a closing connection keeps reading what the app still sends.
const LINGER_TOTAL: Duration = Duration::from_secs(2);
/// A closing connection stops reading once the app has sent nothing for this long.
const LINGER_QUIET: Duration = Duration::from_millis(250);
/// The most a closing connection reads (and drops).
const LINGER_BYTES: usize = 1 << 20;

/// What [`AppIo`] saw, shared with the accept loop's connection task.
#[derive(Debug, Default)]
struct Progress {
    /// Bytes arrived since the last write (a request head has begun).
    read_since_write: AtomicBool,
    /// Something was written (a response was sent).
    wrote: AtomicBool,
    /// A write to the app made no progress for the idle limit.
    stalled: AtomicBool,
}

impl Progress {
    /// The connection ended between requests: a response went out and nothing has arrived since.
    fn idle(&self) -> bool {
        self.wrote.load(Ordering::Relaxed) && !self.read_since_write.load(Ordering::Relaxed)
    }

    fn write_stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }
}

impl AppIo {
    fn new(stream: TcpStream, write_idle: Duration) -> (Self, Arc<Progress>) {
        let progress = Arc::new(Progress::default());
        let io = Self {
            stream,
            clock: IdleClock::new(write_idle),
            progress: progress.clone(),
            linger: None,
        };
        (io, progress)
    }

    /// A write that is pending: fails once the app has taken nothing for the idle limit.
    fn write_pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        if !self.clock.expired(cx) {
            return Poll::Pending;
        }
        self.progress.stalled.store(true, Ordering::Relaxed);
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the app took no part of its response for {} (listen.body_idle_timeout)",
                humantime::format_duration(self.clock.limit())
            ),
        )))
    }

    fn wrote(
        &mut self,
        result: Poll<std::io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        match result {
            Poll::Pending => self.write_pending(cx),
            ready => {
                self.clock.progressed();
                self.progress.wrote.store(true, Ordering::Relaxed);
                self.progress
                    .read_since_write
                    .store(false, Ordering::Relaxed);
                ready
            }
        }
    }
}

impl AsyncRead for AppIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.progress
                .read_since_write
                .store(true, Ordering::Relaxed);
        }
        result
    }
}

impl AsyncWrite for AppIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.linger.is_none() {
            // The response is out: the app sees its end now, whatever it still sends.
            std::task::ready!(Pin::new(&mut self.stream).poll_shutdown(cx))?;
            let now = tokio::time::Instant::now();
            self.linger = Some(Linger {
                total: Box::pin(tokio::time::sleep_until(now + LINGER_TOTAL)),
                quiet: Box::pin(tokio::time::sleep_until(now + LINGER_QUIET)),
                left: LINGER_BYTES,
            });
        }
        let this = &mut *self;
        let Some(linger) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 8192];
        loop {
            if linger.left == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    linger.left = linger.left.saturating_sub(buf.filled().len());
                    let at = tokio::time::Instant::now() + LINGER_QUIET;
                    linger.quiet.as_mut().reset(at);
                }
                // End of stream or an error: nothing more to wait for.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    if linger.total.as_mut().poll(cx).is_ready()
                        || linger.quiet.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Rate limit for a repeated log line: `note` counts an event and says whether to log now, with
/// the number of events since the last line.
#[derive(Debug, Default)]
pub(crate) struct Quiet {
    count: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Quiet {
    pub(crate) fn note(&self) -> Option<u64> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        *last = Some(now);
        Some(self.count.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_declares_its_body_length() {
        let answer = refusal("listen.admin_max_connections");
        let text = std::str::from_utf8(&answer).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        let declared = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.parse::<usize>().ok());
        assert_eq!(declared, Some(body.len()));
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert_eq!(json["httpCode"], 503);
        assert!(json["message"]
            .as_str()
            .is_some_and(|m| m.contains("listen.admin_max_connections")));
    }

    #[test]
    fn quiet_logs_the_first_event_then_counts() {
        let quiet = Quiet::default();
        assert_eq!(quiet.note(), Some(1));
        assert_eq!(quiet.note(), None);
        assert_eq!(quiet.note(), None);
        assert_eq!(quiet.count.load(Ordering::Relaxed), 2);
    }
}
