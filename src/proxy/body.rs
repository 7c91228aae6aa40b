//! The outbound request body: the app's body streamed through, cut off at `listen.max_body`.
//!
//! Nothing is buffered here; each frame goes upstream as it arrives. A body that turns out to be
//! longer than the limit (chunked uploads give no length up front) fails the upstream request and
//! raises a flag the forwarder reads to answer 413 rather than 502.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The app's body exceeded `listen.max_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// Errors while streaming the app's body upstream.
#[derive(Debug, thiserror::Error)]
pub enum OutboundBodyError {
    /// Reading from the app failed.
    #[error(transparent)]
    Inbound(#[from] hyper::Error),
    /// The limit was crossed.
    #[error(transparent)]
    TooLarge(#[from] BodyTooLarge),
}

/// The body sent upstream: the app's body streamed with a byte limit, or a buffered copy
/// (small bodies of OAuth requests, kept so a 401 can be replayed once).
#[derive(Debug)]
pub struct OutboundBody(Kind);

#[derive(Debug)]
enum Kind {
    Stream {
        inner: Incoming,
        remaining: u64,
        limit: u64,
        exceeded: Arc<AtomicBool>,
    },
    Buffered(Option<Bytes>),
}

impl OutboundBody {
    /// Streams `inner`; `exceeded` is set when more than `limit` bytes arrive.
    pub fn streaming(inner: Incoming, limit: u64, exceeded: Arc<AtomicBool>) -> Self {
        Self(Kind::Stream {
            inner,
            remaining: limit,
            limit,
            exceeded,
        })
    }

    /// Sends `bytes`, already read from the app.
    pub fn buffered(bytes: Bytes) -> Self {
        Self(Kind::Buffered((!bytes.is_empty()).then_some(bytes)))
    }
}

impl Body for OutboundBody {
    type Data = Bytes;
    type Error = OutboundBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.0 {
            Kind::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream {
                inner,
                remaining,
                limit,
                exceeded,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let len = data.len() as u64;
                        if len > *remaining {
                            exceeded.store(true, Ordering::Release);
                            return Poll::Ready(Some(Err(BodyTooLarge(*limit).into())));
                        }
                        *remaining -= len;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Buffered(b) => b.is_none(),
            Kind::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream { inner, .. } => inner.size_hint(),
        }
    }
}
