//! Raw HTTP/1.1 on both sides of the proxy, for hostile-input tests.
//!
//! * [`RawServer`] is a scripted TCP peer: it reads each request off the wire and answers with
//!   whatever bytes the test's closure hands back (malformed responses, a hostile token
//!   endpoint, a body streamed until the proxy stops reading), recording what it received.
//! * [`exchange`] writes bytes to the proxy on a fresh connection and reads everything that comes
//!   back until the proxy closes the connection, so a test sees every response it wrote (a
//!   smuggled second answer included) and whether it closed or left the app hanging.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long [`exchange`] waits for the proxy to close the connection.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// One request a [`RawServer`] received.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    pub path: String,
    /// Request line and header section, lower-cased.
    pub head: String,
    pub body: Vec<u8>,
    /// Which accepted connection it came on, counting from 0.
    pub connection: usize,
}

/// What a [`RawServer`] does with a request.
#[derive(Debug)]
pub enum Reply {
    /// Write these bytes, then wait for the next request on the same connection.
    KeepAlive(Vec<u8>),
    /// Write these bytes, then close the connection.
    Close(Vec<u8>),
    /// Write `head`, then `len` filler bytes in 64 KiB pieces for as long as the peer takes
    /// them, then close; how many were written goes to [`RawServer::streamed`].
    Stream { head: Vec<u8>, len: usize },
}

type Script = dyn Fn(&RawRequest) -> Reply + Send + Sync;

/// A TCP peer answering every request with what its script says.
pub struct RawServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<RawRequest>>>,
    streamed: tokio::sync::Mutex<mpsc::UnboundedReceiver<usize>>,
}

impl RawServer {
    pub async fn start(script: impl Fn(&RawRequest) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (streamed_tx, streamed_rx) = mpsc::unbounded_channel();
        let script: Arc<Script> = Arc::new(script);
        let recorder = seen.clone();
        tokio::spawn(async move {
            for connection in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (script, seen, streamed) =
                    (script.clone(), recorder.clone(), streamed_tx.clone());
                tokio::spawn(async move {
                    serve(stream, connection, &*script, &seen, &streamed).await;
                });
            }
        });
        RawServer {
            addr,
            seen,
            streamed: tokio::sync::Mutex::new(streamed_rx),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// The requests received for `path`.
    pub fn requests_for(&self, path: &str) -> Vec<RawRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Waits for the next [`Reply::Stream`] to end and returns how many filler bytes the peer
    /// took before it stopped reading (all of them when it read everything).
    pub async fn streamed(&self) -> usize {
        let mut rx = self.streamed.lock().await;
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("the streamed answer never ended")
            .unwrap()
    }
}

async fn serve(
    mut stream: TcpStream,
    connection: usize,
    script: &Script,
    seen: &Mutex<Vec<RawRequest>>,
    streamed: &mpsc::UnboundedSender<usize>,
) {
    let mut buf = Vec::new();
    while let Some(request) = read_request(&mut stream, &mut buf, connection).await {
        seen.lock().unwrap().push(request.clone());
        match script(&request) {
            Reply::KeepAlive(bytes) => {
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Reply::Close(bytes) => {
                let _ = stream.write_all(&bytes).await;
                return;
            }
            Reply::Stream { head, len } => {
                let _ = streamed.send(stream_filler(&mut stream, &head, len).await);
                return;
            }
        }
    }
}

async fn stream_filler(stream: &mut TcpStream, head: &[u8], len: usize) -> usize {
    if stream.write_all(head).await.is_err() {
        return 0;
    }
    let piece = vec![b'a'; 64 << 10];
    let mut sent = 0;
    while sent < len {
        let n = piece.len().min(len - sent);
        if stream.write_all(&piece[..n]).await.is_err() {
            break;
        }
        sent += n;
    }
    sent
}

/// Reads one request (head, and a body framed by Content-Length or chunked); `None` at EOF.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    connection: usize,
) -> Option<RawRequest> {
    let end = loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            break end;
        }
        read_more(stream, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    buf.drain(..end + 4);
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or_default().to_ascii_uppercase();
    let path = words.next().unwrap_or_default().to_string();
    let body = if let Some(len) = header(&head, "content-length").and_then(|v| v.parse().ok()) {
        while buf.len() < len {
            read_more(stream, buf).await?;
        }
        buf.drain(..len).collect()
    } else if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            if let (body, Some(used)) = decode_chunked(buf) {
                buf.drain(..used);
                break body;
            }
            read_more(stream, buf).await?;
        }
    } else {
        Vec::new()
    };
    Some(RawRequest {
        method,
        path,
        head,
        body,
        connection,
    })
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut piece = [0u8; 16 << 10];
    match stream.read(&mut piece).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&piece[..n]);
            Some(())
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The value of header `name` in a lower-cased header section.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        (n.trim() == name).then(|| v.trim())
    })
}

/// Decodes a chunked body: the data so far, and the bytes used when it is complete.
fn decode_chunked(buf: &[u8]) -> (Vec<u8>, Option<usize>) {
    let mut data = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = find(&buf[at..], b"\r\n") else {
            return (data, None);
        };
        let size_text = String::from_utf8_lossy(&buf[at..at + line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return (data, None);
        };
        at += line_end + 2;
        if size == 0 {
            // No trailers in test traffic: the final CRLF ends the body.
            return match buf.get(at..at + 2) {
                Some(b"\r\n") => (data, Some(at + 2)),
                _ => (data, None),
            };
        }
        let Some(chunk) = buf.get(at..at + size) else {
            data.extend_from_slice(&buf[at.min(buf.len())..]);
            return (data, None);
        };
        data.extend_from_slice(chunk);
        at += size + 2;
        if at > buf.len() {
            return (data, None);
        }
    }
}

// ------------------------------------------------------------------------------------------
// The app's side

/// One response as read off the wire.
#[derive(Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Status line and header section, lower-cased.
    pub head: String,
    pub body: Vec<u8>,
    /// False when the connection ended before the body its framing announced.
    pub complete: bool,
}

impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.complete { "" } else { " (cut short)" };
        write!(f, "{:?}{state}", self.text())
    }
}

impl RawResponse {
    /// A header's value (names are lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.head, name)
    }

    /// Head and body as one text, the form [`super::assert_raw_proxy_error`] reads.
    pub fn text(&self) -> String {
        format!(
            "{}\r\n\r\n{}",
            self.head,
            String::from_utf8_lossy(&self.body)
        )
    }
}

/// Everything the proxy wrote back on one connection.
#[derive(Debug)]
pub struct Exchange {
    pub responses: Vec<RawResponse>,
    /// True when the proxy closed the connection (or reset it) within 10 s.
    pub closed: bool,
}

impl Exchange {
    /// The one response of an exchange that must have exactly one.
    pub fn only(&self) -> &RawResponse {
        assert_eq!(self.responses.len(), 1, "{:#?}", self.responses);
        &self.responses[0]
    }
}

/// Writes `request` on a new connection, keeps the connection open, and reads until the proxy
/// closes it. Reading goes on while writing, so an answer the proxy sends before it has read
/// everything (a refused 1 MB header) is not lost when it closes early.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> Exchange {
    exchange_inner(addr, request, false).await
}

/// Like [`exchange`], but half-closes the connection after writing, as an app that stops
/// sending does.
pub async fn exchange_half_closed(addr: SocketAddr, request: &[u8]) -> Exchange {
    exchange_inner(addr, request, true).await
}

async fn exchange_inner(addr: SocketAddr, request: &[u8], half_close: bool) -> Exchange {
    let (mut rd, mut wr) = TcpStream::connect(addr).await.unwrap().into_split();
    let request = request.to_vec();
    let writer = tokio::spawn(async move {
        if wr.write_all(&request).await.is_ok() && half_close {
            let _ = wr.shutdown().await;
        }
        // Dropping the write half would half-close the socket: hold it until aborted.
        std::future::pending::<()>().await;
    });
    let mut received = Vec::new();
    let closed = tokio::time::timeout(CLOSE_WAIT, async {
        let mut piece = vec![0u8; 64 << 10];
        loop {
            match rd.read(&mut piece).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&piece[..n]),
            }
        }
    })
    .await
    .is_ok();
    writer.abort();
    Exchange {
        responses: parse_responses(&received),
        closed,
    }
}

/// Splits what a server wrote into responses, the last possibly incomplete.
pub fn parse_responses(mut buf: &[u8]) -> Vec<RawResponse> {
    let mut responses = Vec::new();
    while let Some(end) = find(buf, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status = super::raw_status(&head);
        let rest = &buf[end + 4..];
        let (body, used, complete) = if (100..200).contains(&status) || [204, 304].contains(&status)
        {
            (Vec::new(), 0, true)
        } else if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            match decode_chunked(rest) {
                (body, Some(used)) => (body, used, true),
                (body, None) => (body, rest.len(), false),
            }
        } else if let Some(len) = header(&head, "content-length").and_then(|v| v.parse().ok()) {
            let n = rest.len().min(len);
            (rest[..n].to_vec(), n, n == len)
        } else {
            (rest.to_vec(), rest.len(), true)
        };
        responses.push(RawResponse {
            status,
            head,
            body,
            complete,
        });
        buf = &rest[used..];
        if !complete {
            break;
        }
    }
    responses
}
