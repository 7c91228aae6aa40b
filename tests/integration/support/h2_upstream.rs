//! A fake Tango edge speaking HTTP/2 over TLS (ALPN h2 only) that refuses streams the way real
//! edges do: a GOAWAY when it retires a connection (nginx after `keepalive_requests`), and
//! `RST_STREAM(REFUSED_STREAM)` when it sheds a stream. It records which requests it processed
//! (answered, body read whole) and which it refused, by the app's `x-test-id` header.
//!
//! Each TLS connection goes through a frame relay to an `h2` server on an in-memory pipe. The
//! relay passes frames through byte for byte (header blocks unchanged, so HPACK stays in step)
//! and adds what the `h2` server API cannot do: a GOAWAY whose last-stream-id is *below* streams
//! already received, followed by a PING; it drops the server's own frames on the streams that
//! GOAWAY refused. The client's ACK of that PING proves it had read the GOAWAY (frames are read
//! in order): a stream it opens after the ACK is counted in [`H2Upstream::opened_after_goaway`].
//!
//! Refusals happen every run, by rule rather than by timing:
//! * `x-refuse: once` is answered `REFUSED_STREAM` the first time its `x-test-id` arrives,
//!   `x-refuse: always` every time;
//! * [`H2Options::rotate_after`] runs the edge in lockstep with the app's workers (see
//!   [`H2Upstream::workers`]): answers are held until every request the app is waiting for has
//!   reached the edge. Then each connection that has carried more than that many streams gets a
//!   GOAWAY refusing the newest streams beyond the limit that are first attempts — never a
//!   request that was refused before, so one resend always suffices — and is retired even when
//!   there is nothing to refuse. Since nothing is in flight anywhere else, no stream can reach a
//!   retired connection between the decision and the client reading the GOAWAY.
//! * [`H2Options::goaway_first_connection`] sends GOAWAY(0) right after the server's SETTINGS
//!   on the first connection, so its first request is refused before or as it is opened.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

const HEADERS: u8 = 0x1;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const PING_MARKER: [u8; 8] = *b"goaway!!";
const PREFACE_LEN: usize = 24;

#[derive(Debug, Clone, Copy, Default)]
pub struct H2Options {
    /// Retire connections after this many streams, in lockstep with the app's workers.
    pub rotate_after: Option<usize>,
    /// GOAWAY(0) on the first connection before any stream.
    pub goaway_first_connection: bool,
}

/// A request the edge answered.
#[derive(Debug, Clone)]
pub struct Processed {
    pub test_id: String,
    pub method: String,
    pub body_len: u64,
    pub body_sha256: String,
    /// The request body ended cleanly.
    pub complete: bool,
    pub dpop: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedBy {
    GoAway,
    RefusedStream,
}

/// A stream the edge refused without processing it.
#[derive(Debug, Clone)]
pub struct Refused {
    pub test_id: String,
    pub by: RefusedBy,
    pub dpop: Option<String>,
}

#[derive(Clone)]
pub struct H2Upstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    options: H2Options,
    state: Mutex<State>,
    connections: AtomicU64,
    opened_after_goaway: AtomicUsize,
}

#[derive(Default)]
struct State {
    processed: Vec<Processed>,
    refused: Vec<Refused>,
    /// Test ids refused at least once: their next stream is a resend.
    refused_ids: HashSet<String>,
    /// Test ids seen by the `x-refuse: once` rule.
    seen_once: HashSet<String>,
    /// App workers still sending (lockstep mode).
    workers: usize,
    held: Vec<Held>,
    books: HashMap<u64, Book>,
    goaways: usize,
}

/// What lockstep mode knows about one connection.
#[derive(Default)]
struct Book {
    streams: usize,
    highest_answered: u32,
    retired: bool,
}

struct Held {
    conn: Arc<Conn>,
    stream: u32,
    test_id: String,
    first_attempt: bool,
    verdict: oneshot::Sender<bool>,
}

/// One TLS connection, shared by its relay and its `h2` server.
struct Conn {
    id: u64,
    /// Streams above this id were refused by an injected GOAWAY (`u32::MAX`: none).
    refused_above: AtomicU32,
    /// Frames for the client, in order.
    to_client: mpsc::UnboundedSender<Bytes>,
    goaway_acked: AtomicBool,
}

impl Conn {
    /// Sends GOAWAY(`last`) and the PING whose ACK shows the client read it.
    fn goaway(&self, last: u32) {
        if self.refused_above.load(Ordering::SeqCst) != u32::MAX {
            return;
        }
        self.refused_above.store(last, Ordering::SeqCst);
        let mut goaway = frame_head(8, GOAWAY, 0, 0);
        goaway.extend_from_slice(&last.to_be_bytes());
        goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR: a graceful retirement
        let mut ping = frame_head(8, PING, 0, 0);
        ping.extend_from_slice(&PING_MARKER);
        let _ = self.to_client.send(Bytes::from(goaway));
        let _ = self.to_client.send(Bytes::from(ping));
    }
}

fn frame_head(len: usize, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut head = Vec::with_capacity(9 + len);
    head.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    head.push(kind);
    head.push(flags);
    head.extend_from_slice(&stream.to_be_bytes());
    head
}

/// Reads one frame: (type, flags, stream id, whole frame bytes).
async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut frame = Vec::with_capacity(9 + len);
    frame.extend_from_slice(&head);
    frame.resize(9 + len, 0);
    r.read_exact(&mut frame[9..]).await.ok()?;
    Some((head[3], head[4], stream, frame))
}

impl H2Upstream {
    pub async fn start(tls: rustls::ServerConfig, options: H2Options) -> H2Upstream {
        let mut tls = tls;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            options,
            state: Mutex::new(State::default()),
            connections: AtomicU64::new(0),
            opened_after_goaway: AtomicUsize::new(0),
        });
        let up = H2Upstream {
            addr,
            shared: shared.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let id = shared.connections.fetch_add(1, Ordering::SeqCst);
                let (acceptor, shared) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve_connection(tls, id, shared).await;
                    }
                });
            }
        });
        up
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Lockstep mode: `n` app workers are about to send, one request at a time each.
    pub fn workers(&self, n: usize) {
        self.shared.state.lock().unwrap().workers = n;
    }

    /// Lockstep mode: a worker has had the answer to its last request.
    pub fn worker_done(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.workers -= 1;
        state.decide(self.shared.options.rotate_after.unwrap_or(usize::MAX));
    }

    pub fn processed(&self) -> Vec<Processed> {
        self.shared.state.lock().unwrap().processed.clone()
    }

    pub fn refused(&self) -> Vec<Refused> {
        self.shared.state.lock().unwrap().refused.clone()
    }

    /// GOAWAY frames sent by lockstep mode.
    pub fn goaways(&self) -> usize {
        self.shared.state.lock().unwrap().goaways
    }

    /// TLS connections accepted.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Streams a client opened on a connection after acknowledging its GOAWAY.
    pub fn opened_after_goaway(&self) -> usize {
        self.shared.opened_after_goaway.load(Ordering::SeqCst)
    }
}

impl State {
    /// Lockstep mode: once every request the app waits for is held here, answer them, retiring
    /// connections that have carried more than `after` streams.
    fn decide(&mut self, after: usize) {
        if self.held.is_empty() || self.held.len() < self.workers {
            return;
        }
        let mut by_conn: HashMap<u64, Vec<Held>> = HashMap::new();
        for h in self.held.drain(..) {
            by_conn.entry(h.conn.id).or_default().push(h);
        }
        for (id, mut streams) in by_conn {
            streams.sort_by_key(|h| h.stream);
            let book = self.books.entry(id).or_default();
            let before = book.streams;
            book.streams += streams.len();
            let mut refuse_from = streams.len();
            if book.streams > after && !book.retired {
                // The newest streams past the limit, as long as none of them is a resend.
                while refuse_from > 0
                    && before + refuse_from > after
                    && streams[refuse_from - 1].first_attempt
                {
                    refuse_from -= 1;
                }
                let last = match refuse_from {
                    0 => book.highest_answered,
                    n => streams[n - 1].stream,
                };
                book.retired = true;
                streams[0].conn.goaway(last);
                self.goaways += 1;
            }
            for (i, h) in streams.into_iter().enumerate() {
                let answer = i < refuse_from;
                if answer {
                    book.highest_answered = book.highest_answered.max(h.stream);
                } else {
                    self.refused_ids.insert(h.test_id.clone());
                }
                let _ = h.verdict.send(answer);
            }
        }
    }
}

async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    id: u64,
    shared: Arc<Shared>,
) {
    let (to_client, mut outbox) = mpsc::unbounded_channel::<Bytes>();
    let conn = Arc::new(Conn {
        id,
        refused_above: AtomicU32::new(u32::MAX),
        to_client,
        goaway_acked: AtomicBool::new(false),
    });
    let (relay_end, server_end) = tokio::io::duplex(1 << 16);
    let (mut client_rd, mut client_wr) = tokio::io::split(tls);
    let (mut server_rd, mut server_wr) = tokio::io::split(relay_end);

    // Client -> server: byte for byte, minus the ACK of our own PING.
    let up = conn.clone();
    let counters = shared.clone();
    tokio::spawn(async move {
        let mut preface = [0u8; PREFACE_LEN];
        if client_rd.read_exact(&mut preface).await.is_err()
            || server_wr.write_all(&preface).await.is_err()
        {
            return;
        }
        let mut highest = 0u32;
        while let Some((kind, flags, stream, frame)) = read_frame(&mut client_rd).await {
            if kind == PING && flags & ACK != 0 && frame[9..] == PING_MARKER[..] {
                up.goaway_acked.store(true, Ordering::SeqCst);
                continue;
            }
            if kind == HEADERS && stream > highest {
                highest = stream;
                if up.goaway_acked.load(Ordering::SeqCst) {
                    counters.opened_after_goaway.fetch_add(1, Ordering::SeqCst);
                }
            }
            if server_wr.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = server_wr.shutdown().await;
    });

    // Server -> client: the server's frames, minus those on streams our GOAWAY refused.
    let down = conn.clone();
    let goaway_first = shared.options.goaway_first_connection && id == 0;
    tokio::spawn(async move {
        let mut first = true;
        while let Some((_, _, stream, frame)) = read_frame(&mut server_rd).await {
            if stream != 0 && stream > down.refused_above.load(Ordering::SeqCst) {
                continue;
            }
            if down.to_client.send(Bytes::from(frame)).is_err() {
                return;
            }
            if std::mem::take(&mut first) && goaway_first {
                down.goaway(0);
            }
        }
    });

    // The writer owns the client's side of the socket: frames leave in the order queued.
    tokio::spawn(async move {
        while let Some(frame) = outbox.recv().await {
            if client_wr.write_all(&frame).await.is_err() {
                return;
            }
            while let Ok(more) = outbox.try_recv() {
                if client_wr.write_all(&more).await.is_err() {
                    return;
                }
            }
            if client_wr.flush().await.is_err() {
                return;
            }
        }
        let _ = client_wr.shutdown().await;
    });

    let Ok(mut server) = h2::server::Builder::new()
        .max_concurrent_streams(1000)
        .handshake::<_, Bytes>(server_end)
        .await
    else {
        return;
    };
    while let Some(Ok((req, respond))) = server.accept().await {
        tokio::spawn(handle(req, respond, conn.clone(), shared.clone()));
    }
    // `conn` (and with it the writer's sender) goes when the streams do.
}

async fn handle(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
) {
    let stream = u32::from(respond.stream_id());
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let test_id = header("x-test-id").unwrap_or_default();
    let dpop = header("dpop");
    let refuse = |state: &mut State, by| {
        state.refused_ids.insert(test_id.clone());
        state.refused.push(Refused {
            test_id: test_id.clone(),
            by,
            dpop: dpop.clone(),
        });
    };

    if stream > conn.refused_above.load(Ordering::SeqCst) {
        refuse(&mut shared.state.lock().unwrap(), RefusedBy::GoAway);
        respond.send_reset(Reason::CANCEL); // dropped by the relay: the GOAWAY said it all
        return;
    }
    let refusal = header("x-refuse");
    if let Some(rule @ ("once" | "always")) = refusal.as_deref() {
        let mut state = shared.state.lock().unwrap();
        if state.seen_once.insert(test_id.clone()) || rule == "always" {
            refuse(&mut state, RefusedBy::RefusedStream);
            drop(state);
            respond.send_reset(Reason::REFUSED_STREAM);
            return;
        }
    }
    if let Some(after) = shared.options.rotate_after {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = shared.state.lock().unwrap();
            let first_attempt = !state.refused_ids.contains(&test_id);
            state.held.push(Held {
                conn: conn.clone(),
                stream,
                test_id: test_id.clone(),
                first_attempt,
                verdict: tx,
            });
            state.decide(after);
        }
        if !rx.await.unwrap_or(false) {
            refuse(&mut shared.state.lock().unwrap(), RefusedBy::GoAway);
            respond.send_reset(Reason::CANCEL);
            return;
        }
    }

    let method = req.method().to_string();
    let mut body = req.into_body();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut len = 0u64;
    let mut complete = true;
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(data) => {
                let _ = body.flow_control().release_capacity(data.len());
                len += data.len() as u64;
                ctx.update(&data);
            }
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    let sha = super::hex(ctx.finish().as_ref());
    shared.state.lock().unwrap().processed.push(Processed {
        test_id: test_id.clone(),
        method,
        body_len: len,
        body_sha256: sha.clone(),
        complete,
        dpop,
    });
    let json = format!(r#"{{"id":"{test_id}","len":{len},"sha256":"{sha}"}}"#);
    let head = Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    if let Ok(mut send) = respond.send_response(head, false) {
        let _ = send.send_data(Bytes::from(json), true);
    }
}
