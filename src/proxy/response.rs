//! The response body on its way back to the app: Tango's, streamed frame by frame, cut off when
//! Tango stops sending it for `upstream.body_idle_timeout`.
//!
//! `upstream.timeout` covers the wait for Tango's response headers; once they are on their way to
//! the app, only this timeout guards the body. When it runs out the app already has a status line,
//! so the proxy can only end the response early: hyper closes the connection (a chunked body ends
//! without its last chunk, a sized body short of its length), which every HTTP client reports as
//! a truncated response rather than a complete one. The cut is logged at WARN and counted as
//! `tango_proxy_upstream_errors_total{kind="body_stalled"}`.
//!
//! The clock starts only when no frame is ready, so a response that arrives in one piece (most
//! Tango answers) never arms a timer, and time the app spends not reading (back-pressure) is never
//! blamed on Tango.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;

use crate::idle::IdleClock;

/// Why a response body ended early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamBodyError {
    /// Reading from Tango failed.
    #[error("reading the response body from the upstream failed: {0}")]
    Read(#[from] hyper::Error),
    /// Nothing arrived for `upstream.body_idle_timeout`.
    #[error("the upstream sent no part of the response body for {} (upstream.body_idle_timeout)", humantime::format_duration(*.0))]
    Stalled(Duration),
}

/// Tango's response body with an idle timeout.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    clock: IdleClock,
    stalled: Counter,
}

impl UpstreamBody {
    pub(crate) fn new(inner: Incoming, idle: Duration, stalled: Counter) -> Self {
        Self {
            inner,
            clock: IdleClock::new(idle),
            stalled,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.clock.progressed();
                Poll::Ready(frame.map(|f| f.map_err(UpstreamBodyError::from)))
            }
            Poll::Pending => {
                if !this.clock.expired(cx) {
                    return Poll::Pending;
                }
                let idle = this.clock.limit();
                this.stalled.inc();
                tracing::warn!(
                    "the upstream stopped sending a response body for {} (upstream.body_idle_timeout); \
                     ending the response to the app early",
                    humantime::format_duration(idle)
                );
                Poll::Ready(Some(Err(UpstreamBodyError::Stalled(idle))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
