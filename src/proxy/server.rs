//! The proxy listener: accepts connections, serves HTTP/1.1 on each, drains on shutdown.
//!
//! Apps speak HTTP/1.1 to the proxy (Tango's SDKs and every legacy client do). The read buffer is
//! sized above `listen.max_header_size` so an oversized header section reaches the proxy's own
//! check and gets the JSON 431; only a header section beyond twice the limit (or more than 512
//! fields) is refused by hyper itself with a bare 431. Slow clients get 30 s to send their headers.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::Proxy;

/// Time a client has to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Header fields hyper accepts before the proxy's own size check sees the request.
const MAX_HEADER_FIELDS: usize = 512;

/// Serves `proxy` on `listener` until `shutdown` resolves, then waits up to `grace` for
/// in-flight requests to finish.
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut builder = http1::Builder::new();
    let buffer = (proxy.max_header_size() as usize)
        .saturating_mul(2)
        .saturating_add(16 << 10)
        .max(8 << 10);
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(buffer)
        .max_headers(MAX_HEADER_FIELDS)
        .keep_alive(true);

    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                let service = service_fn(move |req| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, Infallible>(proxy.handle(req, remote).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%remote, "connection ended with an error: {e}");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("proxy listener closed; draining in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all proxy connections drained"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!("grace period of {} over; closing remaining connections", humantime::format_duration(grace));
        }
    }
}
