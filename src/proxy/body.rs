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
//! * for profiles that replay after a 401, keeps a copy of the frames while their total stays within
//!   `upstream.replay_max_body`, and drops it as soon as it would grow past that.
//!
//! The wrapper is owned by the HTTP client once sent, so it reports through a [`BodyWatch`]: the
//! forwarder reads it to turn a failed upstream call into 413, 408 or 400 rather than 502 (over
//! HTTP/2 the client's error does not carry the body's), and to get the copy for a replay. Bodies
//! that are already at their end (GETs) never get here: [`OutboundBody::empty`] costs nothing.
//!
//! ```ignore
//! let (body, watch) = OutboundBody::streaming(incoming, limits);
//! let response = client.request(Request::from_parts(parts, body)).await;
//! if let Some(copy) = watch.replay(limits.idle_timeout).await { /* send `copy` again */ }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

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
    /// `upstream.replay_max_body` when the profile replays after a 401; `None` keeps no copy.
    pub replay_cap: Option<u64>,
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

/// The frames of a body read whole, for one more send.
#[derive(Debug, Default)]
pub(crate) struct BodyCopy {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    len: u64,
}

/// What the body tells the forwarder; written at most a few times per request, never per frame.
#[derive(Debug, Default)]
struct Report {
    failure: Option<BodyFailure>,
    copy: CopyState,
}

#[derive(Debug, Default)]
enum CopyState {
    /// Still reading, copy within the cap so far.
    #[default]
    Pending,
    /// Read to the end within the cap.
    Ready(BodyCopy),
    /// Past the cap, failed, never kept, or abandoned by the client.
    Gone,
}

#[derive(Debug, Default)]
struct Shared {
    report: Mutex<Report>,
    changed: Notify,
    /// True while the wrapper waits for the app's next frame: written when a wait starts and
    /// ends, never for frames that were already there.
    waiting_on_app: AtomicBool,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Report)) {
        // A poisoned lock only means another holder panicked; the report itself stays valid.
        f(&mut self.report.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_one();
    }
}

/// The forwarder's side of a streamed body.
#[derive(Debug)]
pub(crate) struct BodyWatch {
    shared: Arc<Shared>,
    keeps_copy: bool,
}

impl BodyWatch {
    /// True when the body started out small enough to be kept for a replay.
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

    fn report(&self) -> std::sync::MutexGuard<'_, Report> {
        self.shared
            .report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The body to send again: only when the first send read the app's body to its end and the
    /// copy stayed within the cap. Tango may answer before the client has finished sending a
    /// small body, so this waits for that, at most `wait`; it answers at once when the copy is
    /// already gone (past the cap, failed, or given up by the client).
    pub async fn replay<B>(self, wait: Duration) -> Option<OutboundBody<B>> {
        let deadline = Instant::now() + wait;
        loop {
            {
                let mut report = self.report();
                if !matches!(report.copy, CopyState::Pending) {
                    return match std::mem::replace(&mut report.copy, CopyState::Gone) {
                        CopyState::Ready(copy) => Some(OutboundBody::replay(copy)),
                        _ => None,
                    };
                }
            }
            // notify_one keeps a permit, so a change between the check and here is not lost.
            tokio::time::timeout_at(deadline, self.shared.changed.notified())
                .await
                .ok()?;
        }
    }
}

/// The body sent upstream: nothing, the app's body streamed through the limits, or a copy
/// being replayed. Production bodies wrap hyper's [`Incoming`]; tests feed anything else.
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
    inner: B,
    limits: BodyLimits,
    /// Bytes read so far.
    read: u64,
    /// Present while the body may still be replayed.
    copy: Option<BodyCopy>,
    shared: Arc<Shared>,
    /// Set once the body has ended, however it ended.
    done: bool,
    /// Armed when the app had no frame ready; created on first need, since most small bodies
    /// arrive with their headers and never wait.
    idle: Option<Pin<Box<Sleep>>>,
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

    /// Sends a copy kept by an earlier send.
    fn replay(copy: BodyCopy) -> Self {
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
    pub(crate) fn streaming(inner: B, limits: BodyLimits) -> (Self, BodyWatch) {
        let copy = limits
            .replay_cap
            .filter(|cap| inner.size_hint().lower() <= *cap)
            .map(|_| BodyCopy::default());
        let keeps_copy = copy.is_some();
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
            inner,
            limits,
            read: 0,
            copy,
            shared: shared.clone(),
            done: false,
            idle: None,
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
        if self.done {
            return Poll::Ready(None);
        }
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if self.waiting && poll.is_ready() {
            self.waiting = false;
            self.shared.waiting_on_app.store(false, Ordering::Release);
        }
        match poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.read = self.read.saturating_add(data.len() as u64);
                    if self.read > self.limits.max_body {
                        let err = OutboundBodyError::TooLarge(self.limits.max_body);
                        return Poll::Ready(Some(Err(self.fail(BodyFailure::TooLarge, err))));
                    }
                    let within_cap = self.limits.replay_cap.is_some_and(|cap| self.read <= cap);
                    match &mut self.copy {
                        Some(copy) if within_cap => {
                            copy.chunks.push(data.clone());
                            copy.len = self.read;
                        }
                        // Past the cap the copy is useless: free it now, and say so now, so a
                        // 401 that arrives mid-upload goes back without waiting for the rest.
                        Some(_) => {
                            self.copy = None;
                            self.shared.update(|r| r.copy = CopyState::Gone);
                        }
                        None => {}
                    }
                } else if let (Some(trailers), Some(copy)) = (frame.trailers_ref(), &mut self.copy)
                {
                    copy.trailers = Some(trailers.clone());
                }
                // The client may stop polling once the body says it is done, so report now.
                if self.inner.is_end_stream() {
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
                let timeout = self.limits.idle_timeout;
                if !self.waiting {
                    self.waiting = true;
                    self.shared.waiting_on_app.store(true, Ordering::Release);
                    let deadline = Instant::now() + timeout;
                    match &mut self.idle {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => self.idle = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let stalled = self
                    .idle
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if stalled {
                    let err = OutboundBodyError::Stalled(timeout);
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
        // The client gave up on an unfinished body (Tango closed the connection): no replay.
        if !self.done && self.copy.is_some() {
            self.shared.update(|r| r.copy = CopyState::Gone);
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
            Kind::Stream(s) => s.done || s.inner.is_end_stream(),
            Kind::Replay(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Stream(s) => s.inner.size_hint(),
            Kind::Replay(r) => SizeHint::with_exact(r.remaining),
        }
    }
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

    fn limits(max_body: u64, replay_cap: Option<u64>) -> BodyLimits {
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
        let (mut body, watch) = OutboundBody::streaming(app, limits(10, Some(64)));
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
        let (mut body, watch) = OutboundBody::streaming(app, limits(8, Some(8)));
        assert!(watch.keeps_copy());
        send(&tx, b"abcd");
        send(&tx, b"efgh");
        drop(tx);
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "abcd");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "efgh");
        assert!(next(&mut body).await.is_none());
        let replay: OutboundBody<AppBody> = watch.replay(Duration::ZERO).await.unwrap();
        assert_eq!(replay.size_hint().exact(), Some(8));
        assert_eq!(collect(replay).await, "abcdefgh");
    }

    #[tokio::test(start_paused = true)]
    async fn the_copy_is_dropped_past_the_cap_while_the_body_keeps_streaming() {
        let (tx, app) = app_body(SizeHint::new());
        let (mut body, watch) = OutboundBody::streaming(app, limits(1 << 20, Some(6)));
        assert!(watch.keeps_copy(), "no length up front: start copying");
        send(&tx, b"abcd");
        send(&tx, b"efgh");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "abcd");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "efgh");
        // The upload goes on, but a 401 arriving now is passed on without waiting for its end.
        let asked = Instant::now();
        assert!(watch
            .replay::<AppBody>(Duration::from_secs(30))
            .await
            .is_none());
        assert_eq!(asked.elapsed(), Duration::ZERO);
        send(&tx, b"ijkl");
        drop(tx);
        assert_eq!(collect(body).await, "ijkl");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_whose_size_hint_exceeds_the_cap_is_never_copied() {
        let (tx, app) = app_body(SizeHint::with_exact(100));
        let (body, watch) = OutboundBody::streaming(app, limits(1 << 20, Some(64)));
        assert!(!watch.keeps_copy());
        tx.send(Ok(Bytes::from(vec![b'x'; 100]))).unwrap();
        drop(tx);
        assert_eq!(collect(body).await.len(), 100);
        assert!(watch.replay::<AppBody>(Duration::ZERO).await.is_none());

        // And a profile that does not replay keeps nothing, however small the body.
        let (tx, app) = app_body(SizeHint::with_exact(1));
        let (body, watch) = OutboundBody::streaming(app, limits(1 << 20, None));
        assert!(!watch.keeps_copy());
        send(&tx, b"x");
        drop(tx);
        assert_eq!(collect(body).await, "x");
        assert!(watch.replay::<AppBody>(Duration::ZERO).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_replay_waits_for_the_first_send_to_finish_reading() {
        let (tx, app) = app_body(SizeHint::new());
        let (mut body, watch) = OutboundBody::streaming(app, limits(1 << 20, Some(64)));
        send(&tx, b"abcd");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "abcd");
        // Tango answered already; the client is still sending the rest.
        let replay = tokio::spawn(watch.replay::<AppBody>(Duration::from_secs(30)));
        send(&tx, b"efgh");
        drop(tx);
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "efgh");
        assert!(next(&mut body).await.is_none());
        assert_eq!(collect(replay.await.unwrap().unwrap()).await, "abcdefgh");

        // A body the client gave up on half-way is not replayable.
        let (tx, app) = app_body(SizeHint::new());
        let (mut body, watch) = OutboundBody::streaming(app, limits(1 << 20, Some(64)));
        send(&tx, b"abcd");
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "abcd");
        drop(body);
        let asked = Instant::now();
        assert!(watch
            .replay::<AppBody>(Duration::from_secs(30))
            .await
            .is_none());
        assert_eq!(asked.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_fires_only_after_the_app_sent_nothing_for_that_long() {
        let (tx, app) = app_body(SizeHint::new());
        let (mut body, watch) = OutboundBody::streaming(app, limits(1 << 20, Some(64)));
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
        let (mut body, watch) = OutboundBody::streaming(app, limits(1 << 20, Some(64)));
        send(&tx, b"abcd");
        tx.send(Err("reset by peer")).unwrap();
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "abcd");
        let err = next(&mut body).await.unwrap().unwrap_err();
        assert!(err.to_string().contains("reset by peer"), "{err}");
        assert_eq!(watch.failure(), Some(BodyFailure::Broken));
        assert!(watch.replay::<AppBody>(Duration::ZERO).await.is_none());
    }

    #[tokio::test]
    async fn the_empty_body_is_at_its_end_from_the_start() {
        let body = OutboundBody::<AppBody>::empty();
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }
}
