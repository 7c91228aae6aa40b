//! The accept loop both listeners share: HTTP/1.1 per connection, a header-read timeout, a cap on
//! open connections, and a drain on shutdown.
//!
//! Limits (README "Security"):
//! * `listen.header_timeout` (default 30 s) is how long a client has to send a whole request head,
//!   on the proxy and the admin listener alike, for the first request and for every later request
//!   on a kept-alive connection. A slowloris client is cut off when it runs out.
//! * `listen.max_connections` / `listen.admin_max_connections` cap the connections each listener
//!   holds open. A connection beyond the cap is accepted only to be told so: it gets a `503`
//!   (`too_many_connections`, `Retry-After: 1`) and is closed, so an app sees a clear, retryable
//!   answer at once rather than hanging in the kernel's backlog, and the descriptors the other
//!   listener needs are never used up by this one. Refusals are counted in
//!   `tango_proxy_connections_refused_total{listener}` and logged at WARN at most once every
//!   ten seconds with the number refused since the last line.
//! * When accepting fails (out of descriptors), the loop pauses 50 ms instead of spinning, and says
//!   so at most once every ten seconds.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::ListenConfig;
use crate::metrics::Metrics;

/// Header fields hyper accepts before the proxy's own size check sees the request.
const MAX_HEADER_FIELDS: usize = 512;
/// Shortest gap between two log lines about refused connections or failed accepts.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a refused connection is given to take its 503.
const REFUSAL_WRITE_LIMIT: Duration = Duration::from_secs(1);

/// How one listener behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `"proxy"` or `"admin"`: log lines and metric labels.
    pub name: &'static str,
    /// Time a client has to send a request head.
    pub header_timeout: Duration,
    /// Connections held open at most.
    pub max_connections: usize,
    /// The configuration key of `max_connections`, for the log line.
    pub max_connections_key: &'static str,
    /// Read buffer per connection: above the largest header section the service checks itself.
    pub read_buffer: usize,
    /// How long shutdown waits for in-flight requests.
    pub grace: Duration,
    /// Open connections (a gauge) and refused ones (a counter).
    pub open: Gauge,
    /// Connections refused at the cap.
    pub refused: Counter,
    /// Connections the listener itself ended, by why: `malformed` (a bare 400), `too_large`
    /// (a bare 431) and `header_timeout`.
    pub ended: [Counter; 3],
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
            max_connections,
            max_connections_key,
            read_buffer,
            grace: listen.grace_period,
            open,
            refused,
            ended,
        }
    }
}

/// Why the listener ended a connection itself, for `Settings::ended`.
pub const ENDED_KINDS: [&str; 3] = ["malformed", "too_large", "header_timeout"];

/// Serves HTTP/1.1 on `listener` with the service `make(remote)` builds for each connection until
/// `shutdown` resolves, then waits up to `settings.grace` for in-flight requests to finish.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    settings: Settings,
    make: M,
    shutdown: impl Future<Output = ()>,
) where
    M: Fn(SocketAddr) -> S,
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

    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let refusals = Quiet::default();
    let accept_failures = Quiet::default();
    let graceful = GracefulShutdown::new();
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
                    tokio::spawn(refuse(stream, refusal(settings.max_connections_key)));
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = builder.serve_connection(TokioIo::new(stream), make(remote));
                let conn = graceful.watch(conn);
                let open = settings.open.clone();
                let ended = settings.ended.clone();
                open.inc();
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        // Requests the listener refused before the service saw them (smuggling
                        // attempts, slowloris) would otherwise leave no trace an operator sees.
                        let kind = if e.is_parse_too_large() {
                            Some(1)
                        } else if e.is_parse() {
                            Some(0)
                        } else if e.is_timeout() {
                            Some(2)
                        } else {
                            None
                        };
                        if let Some(k) = kind {
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
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = settings.name, "all connections drained"),
        () = tokio::time::sleep(settings.grace) => {
            tracing::warn!(
                listener = settings.name,
                "grace period of {} over; closing remaining connections",
                humantime::format_duration(settings.grace)
            );
        }
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
        while let Ok(n) = stream.try_read(&mut scratch) {
            if n == 0 {
                break;
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

/// Rate limit for a repeated log line: `note` counts an event and says whether to log now, with
/// the number of events since the last line.
#[derive(Debug, Default)]
struct Quiet {
    count: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Quiet {
    fn note(&self) -> Option<u64> {
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
