//! The outbound request body: the app's body streamed upstream frame by frame, never read whole.
//!
//! [`OutboundBody::streaming`] wraps the app's body (linkerd's `ReplayBody` and tower-http's
//! `TimeoutBody` ideas in one wrapper) and
//! * cuts it off past `listen.max_body`, on every profile and every framing: a chunked upload gives
//!   no length up front, so the limit trips mid-stream and fails the upstream request, which leaves
//!   Tango with an incomplete request it will not process;
//! * fails it when the app sends nothing for `listen.body_idle_timeout` while the proxy is waiting
//!   for more. The clock starts when the wrapper finds no frame ready, not when the last frame
//!   arrived, so time Tango spends not reading (back-pressure) is never blamed on the app;
//! * keeps a copy of the frames while their total stays within `upstream.replay_max_body`, for a
//!   second send (a 401 replay, or a resend of a request Tango refused unprocessed), and drops it
//!   as soon as it would grow past that. The copy shares the frames' `Bytes`: nothing is copied,
//!   the frames just live until the response headers arrive;
//! * when the client gives up on the body before its end (Tango refused the stream while it was
//!   still being sent), hands what is left of the app's body, with the copy so far, to the
//!   forwarder: a second send reads the rest from the app, within the same limits.
//!
//! The wrapper is owned by the HTTP client once sent, so it reports through a [`BodyWatch`]: the
//! forwarder reads it to turn a failed upstream call into 413, 408 or 400 rather than 502 (over
//! HTTP/2 the client's error does not carry the body's), and to get the copy for another send
//! ([`Kept`]). Bodies that are already at their end (GETs) never get here:
//! [`OutboundBody::empty`] costs nothing.
//!
//! ```ignore
//! let (body, watch) = OutboundBody::streaming(incoming, limits);
//! let response = client.request(Request::from_parts(parts, body)).await;
//! if let Ok(copy) = watch.replay(limits.idle_timeout).await { /* send `copy` again */ }
//! ```

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::idle::IdleClock;

/// Errors while streaming the app's body upstream; the HTTP client sees these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundBodyError {
    /// Reading from the app failed (it went away, or sent broken framing).
    #[error("cannot read the request body: {0}")]
    Inbound(Box<dyn std::error::Error + Send + Sync>),
    /// More than `listen.max_body` bytes arrived.
    #[error("request body exceeds {0} bytes")]
    TooLarge(u64),
    /// Nothing arrived for `listen.body_idle_timeout`.
    #[error("request body stalled for {}", humantime::format_duration(*.0))]
    Stalled(Duration),
}

/// What a streamed body is allowed to do.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    /// `listen.max_body`.
    pub max_body: u64,
    /// `listen.body_idle_timeout`.
    pub idle_timeout: Duration,
    /// `upstream.replay_max_body`: a copy is kept while the body stays within it.
    pub replay_cap: u64,
}

/// Why the app's body failed, as the forwarder learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFailure {
    /// Crossed `listen.max_body`.
    TooLarge,
    /// Nothing arrived for `listen.body_idle_timeout`.
    Stalled,
    /// Reading from the app failed.
    Broken,
}

/// The frames of a body read whole, for more sends. Cloning shares the frames.
#[derive(Debug, Default, Clone)]
pub(crate) struct BodyCopy {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: u64,
}

impl BodyCopy {
    /// A body already read whole.
    pub fn whole(data: Bytes) -> Self {
        Self {
            len: data.len() as u64,
            chunks: vec![data],
            trailers: None,
        }
    }

    /// Keeps `data`, which brings the body read so far to `read` bytes; false, keeping
    /// nothing, once that is past `cap`.
    fn keep(&mut self, data: &Bytes, read: u64, cap: u64) -> bool {
        if read > cap {
            return false;
        }
        self.chunks.push(data.clone());
        self.len = read;
        true
    }
}

/// What the body tells the forwarder; written at most a few times per request, never per frame.
#[derive(Debug)]
struct Report<B> {
    failure: Option<BodyFailure>,
    copy: CopyState<B>,
}

#[derive(Debug)]
enum CopyState<B> {
    /// Still reading, copy within the cap so far.
    Pending,
    /// Read to the end within the cap.
    Ready(BodyCopy),
    /// Given up by the client before its end, within the cap so far: the rest is with the app.
    Unfinished(Box<Unfinished<B>>),
    /// Past the cap, failed, or never kept.
    Gone,
}

#[derive(Debug)]
struct Shared<B> {
    report: Mutex<Report<B>>,
    changed: Notify,
    /// True while the wrapper waits for the app's next frame: written when a wait starts and
    /// ends, never for frames that were already there.
    waiting_on_app: AtomicBool,
}

impl<B> Shared<B> {
    fn update(&self, f: impl FnOnce(&mut Report<B>)) {
        // A poisoned lock only means another holder panicked; the report itself stays valid.
        f(&mut self.report.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_one();
    }
}

/// The forwarder's side of a streamed body.
#[derive(Debug)]
pub(crate) struct BodyWatch<B = Incoming> {
    shared: Arc<Shared<B>>,
    keeps_copy: bool,
}

impl<B> BodyWatch<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// True when the body started out small enough to be kept for another send.
    pub fn keeps_copy(&self) -> bool {
        self.keeps_copy
    }

    /// Why the body failed, if it did (a failing body reports before the client sees the error).
    pub fn failure(&self) -> Option<BodyFailure> {
        self.report().failure
    }

    /// True when the body is unfinished and the proxy is waiting for the app to send more: the
    /// request is held up by the app, not by Tango.
    pub fn waiting_on_app(&self) -> bool {
        self.shared.waiting_on_app.load(Ordering::Acquire)
    }

    fn report(&self) -> std::sync::MutexGuard<'_, Report<B>> {
        self.shared
            .report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The whole body, for another send, when the copy stayed within the cap. Tango may answer
    /// before the client has finished sending a small body, so this waits for that; a body the
    /// client gave up on is read on from the app. Both take at most `wait`. `Err(None)` when the
    /// body was not kept (past the cap, or not done in time), `Err(Some(_))` when the app's body
    /// failed.
    pub async fn replay(self, wait: Duration) -> Result<BodyCopy, Option<BodyFailure>> {
        let deadline = Instant::now() + wait;
        let rest = loop {
            {
                let mut report = self.report();
                match std::mem::replace(&mut report.copy, CopyState::Gone) {
                    CopyState::Pending => report.copy = CopyState::Pending,
                    CopyState::Ready(copy) => return Ok(copy),
                    CopyState::Unfinished(rest) => break rest,
                    CopyState::Gone => return Err(report.failure),
                }
            }
            // notify_one keeps a permit, so a change between the check and here is not lost.
            tokio::time::timeout_at(deadline, self.shared.changed.notified())
                .await
                .map_err(|_| None)?;
        };
        tokio::time::timeout_at(deadline, rest.read_on())
            .await
            .unwrap_or(Err(None))
    }
}

/// The app's body as sends after the first need it: taken once from the first send's
/// [`BodyWatch`], then shared by every later send.
#[derive(Debug)]
pub(crate) enum Kept<B = Incoming> {
    /// The request has no body.
    Empty,
    /// The first send's body, until a later send asks for it.
    Watch(BodyWatch<B>),
    /// The whole body.
    Copy(BodyCopy),
    /// Not kept whole; why, when the app's body failed.
    Lost(Option<BodyFailure>),
}

impl<B> Kept<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// The watch on the first send's body, while it is being sent.
    pub fn watch(&self) -> Option<&BodyWatch<B>> {
        match self {
            Kept::Watch(watch) => Some(watch),
            _ => None,
        }
    }

    /// False when the body is known from the start to be too large to keep.
    pub fn may_resend(&self) -> bool {
        match self {
            Kept::Watch(watch) => watch.keeps_copy(),
            _ => true,
        }
    }

    /// The body for one more send (see [`BodyWatch::replay`] for `wait` and the errors).
    pub async fn body(&mut self, wait: Duration) -> Result<OutboundBody<B>, Option<BodyFailure>> {
        *self = match std::mem::replace(self, Kept::Lost(None)) {
            Kept::Watch(watch) => match watch.replay(wait).await {
                Ok(copy) => Kept::Copy(copy),
                Err(failure) => Kept::Lost(failure),
            },
            other => other,
        };
        match self {
            Kept::Empty => Ok(OutboundBody::empty()),
            Kept::Copy(copy) => Ok(OutboundBody::replay(copy.clone())),
            Kept::Lost(failure) => Err(*failure),
            Kept::Watch(_) => Err(None),
        }
    }
}

/// The rest of a body the client gave up on, and the copy of what it had read.
#[derive(Debug)]
struct Unfinished<B> {
    inner: B,
    copy: BodyCopy,
    read: u64,
    limits: BodyLimits,
}

impl<B> Unfinished<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Reads the rest from the app into the copy, within the same limits.
    async fn read_on(mut self) -> Result<BodyCopy, Option<BodyFailure>> {
        while !self.inner.is_end_stream() {
            let frame =
                match tokio::time::timeout(self.limits.idle_timeout, self.inner.frame()).await {
                    Err(_) => return Err(Some(BodyFailure::Stalled)),
                    Ok(None) => break,
                    Ok(Some(Err(_))) => return Err(Some(BodyFailure::Broken)),
                    Ok(Some(Ok(frame))) => frame,
                };
            match frame.into_data() {
                Ok(data) => {
                    self.read = self.read.saturating_add(data.len() as u64);
                    if self.read > self.limits.max_body {
                        return Err(Some(BodyFailure::TooLarge));
                    }
                    if !self.copy.keep(&data, self.read, self.limits.replay_cap) {
                        return Err(None);
                    }
                }
                Err(frame) => self.copy.trailers = frame.into_trailers().ok(),
            }
        }
        Ok(self.copy)
    }
}

/// The body sent upstream: nothing, the app's body streamed through the limits, or a copy
/// being sent again. Production bodies wrap hyper's [`Incoming`]; tests feed anything else.
#[derive(Debug)]
pub struct OutboundBody<B = Incoming>(Kind<B>);

// Both non-empty variants are boxed so the empty body of a GET stays two words to move.
#[derive(Debug)]
enum Kind<B> {
    Empty,
    Stream(Box<Streaming<B>>),
    Replay(Box<Replaying>),
}

#[derive(Debug)]
struct Streaming<B> {
    /// Taken on drop when the client gave up before the end, for another send to read on.
    inner: Option<B>,
    limits: BodyLimits,
    /// Bytes read so far.
    read: u64,
    /// Present while the body may still be sent again.
    copy: Option<BodyCopy>,
    shared: Arc<Shared<B>>,
    /// Set once the body has ended, however it ended.
    done: bool,
    /// Counts while the app has no frame ready; its timer is made on first need, since most
    /// small bodies arrive with their headers and never wait.
    clock: IdleClock,
    /// Whether `shared.waiting_on_app` is set.
    waiting: bool,
}

#[derive(Debug)]
struct Replaying {
    chunks: std::vec::IntoIter<Bytes>,
    trailers: Option<HeaderMap>,
    remaining: u64,
}

impl<B> OutboundBody<B> {
    /// No body at all: what bodies already at their end are sent as.
    pub fn empty() -> Self {
        Self(Kind::Empty)
    }

    /// Sends a copy kept by an earlier send (or a body read whole before the first).
    pub(crate) fn replay(copy: BodyCopy) -> Self {
        Self(Kind::Replay(Box::new(Replaying {
            chunks: copy.chunks.into_iter(),
            trailers: copy.trailers,
            remaining: copy.len,
        })))
    }
}

impl<B: Body<Data = Bytes>> OutboundBody<B> {
    /// Streams `inner` within `limits`. A copy is kept only when the body's own size hint
    /// allows it to fit the cap; what is actually read decides the rest.
    pub(crate) fn streaming(inner: B, limits: BodyLimits) -> (Self, BodyWatch<B>) {
        let keeps_copy = inner.size_hint().lower() <= limits.replay_cap;
        let shared = Arc::new(Shared {
            report: Mutex::new(Report {
                failure: None,
                copy: if keeps_copy {
                    CopyState::Pending
                } else {
                    CopyState::Gone
                },
            }),
            changed: Notify::new(),
            waiting_on_app: AtomicBool::new(false),
        });
        let body = Self(Kind::Stream(Box::new(Streaming {
            inner: Some(inner),
            limits,
            read: 0,
            copy: keeps_copy.then(BodyCopy::default),
            shared: shared.clone(),
            done: false,
            clock: IdleClock::new(limits.idle_timeout),
            waiting: false,
        })));
        (body, BodyWatch { shared, keeps_copy })
    }
}

impl<B> Streaming<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, OutboundBodyError>>> {
        let (false, Some(inner)) = (self.done, self.inner.as_mut()) else {
            return Poll::Ready(None);
        };
        let poll = Pin::new(inner).poll_frame(cx);
        if poll.is_ready() {
            self.clock.progressed();
            if self.waiting {
                self.waiting = false;
                self.shared.waiting_on_app.store(false, Ordering::Release);
            }
        }
        match poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.read = self.read.saturating_add(data.len() as u64);
                    if self.read > self.limits.max_body {
                        let err = OutboundBodyError::TooLarge(self.limits.max_body);
                        return Poll::Ready(Some(Err(self.fail(BodyFailure::TooLarge, err))));
                    }
                    let (read, cap) = (self.read, self.limits.replay_cap);
                    // Past the cap the copy is useless: free it now, and say so now, so a
                    // 401 that arrives mid-upload goes back without waiting for the rest.
                    if self.copy.as_mut().is_some_and(|c| !c.keep(data, read, cap)) {
                        self.copy = None;
                        self.shared.update(|r| r.copy = CopyState::Gone);
                    }
                } else if let (Some(trailers), Some(copy)) = (frame.trailers_ref(), &mut self.copy)
                {
                    copy.trailers = Some(trailers.clone());
                }
                // The client may stop polling once the body says it is done, so report now.
                if self.inner.as_ref().is_some_and(Body::is_end_stream) {
                    self.complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let err = OutboundBodyError::Inbound(e.into());
                Poll::Ready(Some(Err(self.fail(BodyFailure::Broken, err))))
            }
            Poll::Ready(None) => {
                self.complete();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if !self.waiting {
                    self.waiting = true;
                    self.shared.waiting_on_app.store(true, Ordering::Release);
                }
                if self.clock.expired(cx) {
                    let err = OutboundBodyError::Stalled(self.limits.idle_timeout);
                    return Poll::Ready(Some(Err(self.fail(BodyFailure::Stalled, err))));
                }
                Poll::Pending
            }
        }
    }

    fn complete(&mut self) {
        self.done = true;
        if let Some(copy) = self.copy.take() {
            self.shared.update(|r| r.copy = CopyState::Ready(copy));
        }
    }

    fn fail(&mut self, failure: BodyFailure, err: OutboundBodyError) -> OutboundBodyError {
        self.done = true;
        self.copy = None;
        self.shared.waiting_on_app.store(false, Ordering::Release);
        self.shared.update(|r| {
            r.failure = Some(failure);
            r.copy = CopyState::Gone;
        });
        err
    }
}

impl<B> Drop for Streaming<B> {
    fn drop(&mut self) {
        // The client gave up on an unfinished body (Tango refused the stream, or closed the
        // connection). When the copy still holds all that was read, the rest is with the app:
        // hand both over, so another send can read on.
        if self.done {
            return;
        }
        if let (Some(copy), Some(inner)) = (self.copy.take(), self.inner.take()) {
            let rest = Unfinished {
                inner,
                copy,
                read: self.read,
                limits: self.limits,
            };
            self.shared
                .update(|r| r.copy = CopyState::Unfinished(Box::new(rest)));
        }
    }
}

impl Replaying {
    fn next_frame(&mut self) -> Option<Frame<Bytes>> {
        if let Some(chunk) = self.chunks.next() {
            self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
            return Some(Frame::data(chunk));
        }
        self.trailers.take().map(Frame::trailers)
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.len() == 0 && self.trailers.is_none()
    }
}

impl<B> Body for OutboundBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = OutboundBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Stream(s) => s.poll_frame(cx),
            Kind::Replay(r) => Poll::Ready(r.next_frame().map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty => true,
            Kind::Stream(s) => s.done || s.inner.as_ref().is_none_or(Body::is_end_stream),
            Kind::Replay(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Stream(s) => s.inner.as_ref().map(Body::size_hint).unwrap_or_default(),
            Kind::Replay(r) => SizeHint::with_exact(r.remaining),
        }
    }
}

/// Reads a whole body of at most `max` bytes, waiting at most `idle` for each frame (trailers
/// are dropped): for bodies the gateway must see whole before deciding.
pub(crate) async fn read_whole<B>(
    mut body: B,
    max: u64,
    idle: Duration,
) -> Result<Bytes, BodyFailure>
where
    B: Body<Data = Bytes> + Unpin,
{
    if body.size_hint().lower() > max {
        return Err(BodyFailure::TooLarge);
    }
    let mut out = bytes::BytesMut::new();
    while !body.is_end_stream() {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(BodyFailure::Stalled),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(BodyFailure::Broken),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if (out.len() + data.len()) as u64 > max {
                return Err(BodyFailure::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    use super::*;

    /// An app body fed by the test, one frame per message; an `Err` is a broken connection.
    #[derive(Debug)]
    struct AppBody {
        rx: mpsc::UnboundedReceiver<Result<Bytes, &'static str>>,
        hint: SizeHint,
    }

    fn app_body(hint: SizeHint) -> (mpsc::UnboundedSender<Result<Bytes, &'static str>>, AppBody) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, AppBody { rx, hint })
    }

    impl Body for AppBody {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.rx.poll_recv(cx).map(|m| {
                m.map(|r| {
                    r.map(Frame::data)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionReset, e))
                })
            })
        }

        fn size_hint(&self) -> SizeHint {
            self.hint
        }
    }

    fn limits(max_body: u64, replay_cap: u64) -> BodyLimits {
        BodyLimits {
            max_body,
            idle_timeout: Duration::from_secs(30),
            replay_cap,
        }
    }

    async fn next(body: &mut OutboundBody<AppBody>) -> Option<Result<Bytes, OutboundBodyError>> {
        body.frame()
            .await
            .map(|r| r.map(|f| f.into_data().unwrap_or_default()))
    }

    fn send(tx: &mpsc::UnboundedSender<Result<Bytes, &'static str>>, data: &'static [u8]) {
        tx.send(Ok(Bytes::from_static(data))).unwrap();
    }

    async fn collect<B>(body: OutboundBody<B>) -> Bytes
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        body.collect().await.unwrap().to_bytes()
    }

    #[tokio::test(start_paused = true)]
    async fn crossing_max_body_fails_the_body_and_reports_too_large() {
        let (tx, app) = app_body(SizeHint::new());
        let (mut body, watch) = OutboundBody::streaming(app, limits(10, 64));
        for _ in 0..2 {
            send(&tx, b"abcd");
            assert_eq!(next(&mut body).await.unwrap().unwrap(), "abcd");
        }
        send(&tx, b"efg");
        let err = next(&mut body).await.unwrap().unwrap_err();
        assert!(matches!(err, OutboundBodyError::TooLarge(10)), "{err}");
        assert_eq!(watch.failure(), Some(BodyFailure::TooLarge));
        // The body is over: the client gets nothing more, whatever the app still sends.
        send(&tx, b"h");
        assert!(next(&mut body).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_exactly_at_max_body_passes_and_its_copy_replays_the_same_frames() {
        let (tx, app) = app_body(SizeHint::new());
        let (mut body, watch) = OutboundBody::streaming(app, limits(8, 8));
        assert!(watch.keeps_copy());
        send(&tx, b"abcd");
        send(&tx, b"efgh");
        drop(tx);
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "abcd");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "efgh");
        assert!(next(&mut body).await.is_none());
        let replay = OutboundBody::<AppBody>::replay(watch.replay(Duration::ZERO).await.unwrap());
        assert_eq!(replay.size_hint().exact(), Some(8));
        assert_eq!(collect(replay).await, "abcdefgh");
    }

    #[tokio::test(start_paused = true)]
    async fn the_copy_is_dropped_past_the_cap_while_the_body_keeps_streaming() {
        let (tx, app) = app_body(SizeHint::new());
        let (mut body, watch) = OutboundBody::streaming(app, limits(1 << 20, 6));
        assert!(watch.keeps_copy(), "no length up front: start copying");
        send(&tx, b"abcd");
        send(&tx, b"efgh");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "abcd");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "efgh");
        // The upload goes on, but a 401 arriving now is passed on without waiting for its end.
        let asked = Instant::now();
        assert_eq!(
            watch.replay(Duration::from_secs(30)).await.unwrap_err(),
            None
        );
        assert_eq!(asked.elapsed(), Duration::ZERO);
        send(&tx, b"ijkl");
        drop(tx);
        assert_eq!(collect(body).await, "ijkl");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_whose_size_hint_exceeds_the_cap_is_never_copied() {
        let (tx, app) = app_body(SizeHint::with_exact(100));
        let (body, watch) = OutboundBody::streaming(app, limits(1 << 20, 64));
        assert!(!watch.keeps_copy());
        tx.send(Ok(Bytes::from(vec![b'x'; 100]))).unwrap();
        drop(tx);
        assert_eq!(collect(body).await.len(), 100);
        assert_eq!(watch.replay(Duration::ZERO).await.unwrap_err(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replay_waits_for_the_first_send_to_finish_reading() {
        let (tx, app) = app_body(SizeHint::new());
        let (mut body, watch) = OutboundBody::streaming(app, limits(1 << 20, 64));
        send(&tx, b"abcd");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "abcd");
        // Tango answered already; the client is still sending the rest.
        let replay = tokio::spawn(watch.replay(Duration::from_secs(30)));
        send(&tx, b"efgh");
        drop(tx);
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "efgh");
        assert!(next(&mut body).await.is_none());
        let copy = replay.await.unwrap().unwrap();
        assert_eq!(
            collect(OutboundBody::<AppBody>::replay(copy)).await,
            "abcdefgh"
        );
    }

    /// A body whose first frame, "abcd", the client read before giving up on it.
    async fn given_up_after_abcd(
        limits: BodyLimits,
    ) -> (
        mpsc::UnboundedSender<Result<Bytes, &'static str>>,
        BodyWatch<AppBody>,
    ) {
        let (tx, app) = app_body(SizeHint::new());
        let (mut body, watch) = OutboundBody::streaming(app, limits);
        send(&tx, b"abcd");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "abcd");
        // Tango refused the stream half-way: the client drops the body; the app goes on.
        drop(body);
        (tx, watch)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_the_client_gave_up_on_is_read_on_from_the_app_for_the_next_send() {
        let (tx, watch) = given_up_after_abcd(limits(1 << 20, 64)).await;
        let replay = tokio::spawn(watch.replay(Duration::from_secs(30)));
        send(&tx, b"efgh");
        drop(tx);
        let copy = replay.await.unwrap().unwrap();
        let again = OutboundBody::<AppBody>::replay(copy);
        assert_eq!(again.size_hint().exact(), Some(8));
        assert_eq!(collect(again).await, "abcdefgh");
    }

    #[tokio::test(start_paused = true)]
    async fn reading_on_keeps_the_limits_of_the_first_send() {
        // The rest crosses the cap: not kept, at once.
        let (tx, watch) = given_up_after_abcd(limits(1 << 20, 6)).await;
        send(&tx, b"efgh");
        assert_eq!(
            watch.replay(Duration::from_secs(30)).await.unwrap_err(),
            None
        );

        // The rest crosses listen.max_body: the app's fault.
        let (tx, watch) = given_up_after_abcd(limits(6, 64)).await;
        send(&tx, b"efgh");
        let failure = watch.replay(Duration::from_secs(30)).await.unwrap_err();
        assert_eq!(failure, Some(BodyFailure::TooLarge));

        // The app stops sending: stalled after listen.body_idle_timeout (30 s here).
        let (_tx, watch) = given_up_after_abcd(limits(1 << 20, 64)).await;
        let asked = Instant::now();
        let failure = watch.replay(Duration::from_secs(60)).await.unwrap_err();
        assert_eq!(failure, Some(BodyFailure::Stalled));
        assert_eq!(asked.elapsed(), Duration::from_secs(30));

        // The app breaks off.
        let (tx, watch) = given_up_after_abcd(limits(1 << 20, 64)).await;
        tx.send(Err("reset by peer")).unwrap();
        let failure = watch.replay(Duration::from_secs(60)).await.unwrap_err();
        assert_eq!(failure, Some(BodyFailure::Broken));
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_body_serves_every_later_send() {
        let (tx, app) = app_body(SizeHint::new());
        let (body, watch) = OutboundBody::streaming(app, limits(1 << 20, 64));
        let mut kept = Kept::Watch(watch);
        send(&tx, b"abcd");
        drop(tx);
        assert_eq!(collect(body).await, "abcd");
        for _ in 0..2 {
            let again = kept.body(Duration::ZERO).await.unwrap();
            assert_eq!(collect(again).await, "abcd");
        }
        let mut none = Kept::<AppBody>::Empty;
        assert!(none.body(Duration::ZERO).await.unwrap().is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_fires_only_after_the_app_sent_nothing_for_that_long() {
        let (tx, app) = app_body(SizeHint::new());
        let (mut body, watch) = OutboundBody::streaming(app, limits(1 << 20, 64));
        send(&tx, b"a");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "a");

        assert!(!watch.waiting_on_app());

        // 29 s of silence: still waiting, and the request is known to be held up by the app.
        let waited = tokio::time::timeout(Duration::from_secs(29), next(&mut body)).await;
        assert!(waited.is_err(), "gave up early: {waited:?}");
        assert!(watch.waiting_on_app());
        // A frame restarts the clock.
        send(&tx, b"b");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "b");
        assert!(!watch.waiting_on_app());

        // Time the client spends not asking (Tango not reading) does not count against the app.
        tokio::time::advance(Duration::from_secs(45)).await;
        let asked = Instant::now();
        let err = next(&mut body).await.unwrap().unwrap_err();
        assert_eq!(asked.elapsed(), Duration::from_secs(30));
        assert!(matches!(err, OutboundBodyError::Stalled(d) if d == Duration::from_secs(30)));
        assert_eq!(watch.failure(), Some(BodyFailure::Stalled));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_app_body_is_reported_and_not_replayable() {
        let (tx, app) = app_body(SizeHint::new());
        let (mut body, watch) = OutboundBody::streaming(app, limits(1 << 20, 64));
        send(&tx, b"abcd");
        tx.send(Err("reset by peer")).unwrap();
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "abcd");
        let err = next(&mut body).await.unwrap().unwrap_err();
        assert!(err.to_string().contains("reset by peer"), "{err}");
        assert_eq!(watch.failure(), Some(BodyFailure::Broken));
        let failure = watch.replay(Duration::ZERO).await.unwrap_err();
        assert_eq!(failure, Some(BodyFailure::Broken));
    }

    #[tokio::test]
    async fn the_empty_body_is_at_its_end_from_the_start() {
        let body = OutboundBody::<AppBody>::empty();
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }
}
