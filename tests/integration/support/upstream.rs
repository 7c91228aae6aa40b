//! A recording fake upstream. Every request is hashed as it streams in (never buffered) and
//! recorded with its headers and whether its body arrived complete. Paths:
//! * `/download?bytes=N` streams N pattern bytes;
//! * `/slow?ms=N` answers after N ms;
//! * `/redirect` answers 302 to another host;
//! * `/raas/v2/401/CLASS` answers 401 with the `WWW-Authenticate` of that class
//!   (`invalid_dpop_proof`, `use_dpop_nonce` with a `DPoP-Nonce`, `invalid_token`, `bearer`, or
//!   anything else for no challenge);
//! * anything else answers 200 with `{"len":..,"sha256":..}` of the request body and an
//!   `x-request-id` of its own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body_len: u64,
    pub body_sha256: String,
    /// True only when the request body ended cleanly; false when the sender broke it off.
    pub complete: bool,
}

#[derive(Clone)]
pub struct FakeUpstream {
    pub addr: SocketAddr,
    tls: bool,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    heads: Arc<AtomicUsize>,
}

pub fn pattern_byte(i: usize) -> u8 {
    ((i * 31 + 7) % 251) as u8
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        Self::start_inner(None).await
    }

    pub async fn start_tls(config: rustls::ServerConfig) -> FakeUpstream {
        Self::start_inner(Some(Arc::new(config))).await
    }

    async fn start_inner(tls: Option<Arc<rustls::ServerConfig>>) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(AtomicUsize::new(0));
        let fake = FakeUpstream {
            addr,
            tls: tls.is_some(),
            seen: seen.clone(),
            connections: connections.clone(),
            heads: heads.clone(),
        };
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let (seen, heads) = (seen.clone(), heads.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        heads.fetch_add(1, Ordering::SeqCst);
                        handle(req, seen.clone())
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        fake
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests whose head arrived, recorded in [`Self::requests`] or still receiving a body.
    pub fn heads(&self) -> usize {
        self.heads.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.requests().pop().expect("the upstream saw no request")
    }
}

type FakeBody = Either<Full<Bytes>, PatternBody>;

/// Bytes that never end: the first frame, then nothing, ever.
fn stalled_body(first: usize) -> PatternBody {
    PatternBody {
        sent: 0,
        total: first,
        stall_after: true,
    }
}

async fn handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<FakeBody>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut len = 0u64;
    let mut complete = false;
    loop {
        match body.frame().await {
            None => {
                complete = true;
                break;
            }
            Some(Err(_)) => break,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    len += data.len() as u64;
                    ctx.update(data);
                }
            }
        }
    }
    let sha = super::hex(ctx.finish().as_ref());
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: parts.version,
        headers: parts.headers.clone(),
        body_len: len,
        body_sha256: sha.clone(),
        complete,
    });
    let query = parts.uri.query().unwrap_or_default().to_string();
    let param = |name: &str| -> Option<u64> {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
    };
    let path = parts.uri.path();
    let resp = if path.ends_with("/download") {
        let n = param("bytes").unwrap_or(0);
        Response::builder()
            .header("content-type", "application/octet-stream")
            .body(Either::Right(PatternBody {
                sent: 0,
                total: n as usize,
                stall_after: false,
            }))
            .unwrap()
    } else if path.ends_with("/stall") {
        // Headers and the first `bytes` of a chunked body, then silence.
        Response::builder()
            .header("content-type", "application/octet-stream")
            .body(Either::Right(stalled_body(
                param("bytes").unwrap_or(10) as usize
            )))
            .unwrap()
    } else if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_millis(param("ms").unwrap_or(5000))).await;
        json(200, r#"{"slow":true}"#)
    } else if let Some(class) = path.strip_prefix("/raas/v2/401/") {
        // A 401 of the given class, as Tango sends them.
        let mut r = json(401, r#"{"httpCode":401,"message":"Unauthorized"}"#);
        let challenge = match class {
            "invalid_dpop_proof" => Some(r#"DPoP algs="ES256 EdDSA", error="invalid_dpop_proof""#),
            "use_dpop_nonce" => Some(r#"DPoP error="use_dpop_nonce""#),
            "invalid_token" => Some(r#"DPoP error="invalid_token""#),
            "bearer" => Some(r#"Bearer error="invalid_token""#),
            _ => None,
        };
        if let Some(c) = challenge {
            r.headers_mut()
                .insert("www-authenticate", c.parse().unwrap());
        }
        if class == "use_dpop_nonce" {
            r.headers_mut()
                .insert("dpop-nonce", "upstream-nonce-1".parse().unwrap());
        }
        r
    } else if path.ends_with("/redirect") {
        Response::builder()
            .status(302)
            .header("location", "https://elsewhere.example/raas/v2/catalogs")
            .body(Either::Left(Full::new(Bytes::new())))
            .unwrap()
    } else {
        let mut r = json(200, &format!(r#"{{"len":{len},"sha256":"{sha}"}}"#));
        r.headers_mut()
            .insert("x-request-id", "upstream-request-id".parse().unwrap());
        r
    };
    Ok(resp)
}

fn json(status: u16, body: &str) -> Response<FakeBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Either::Left(Full::new(Bytes::from(body.to_string()))))
        .unwrap()
}

/// Streams the pattern in 64 KiB chunks without holding it in memory.
pub struct PatternBody {
    sent: usize,
    total: usize,
    /// After `total` bytes, stay pending forever instead of ending.
    stall_after: bool,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent >= self.total {
            return if self.stall_after {
                Poll::Pending
            } else {
                Poll::Ready(None)
            };
        }
        let n = (self.total - self.sent).min(64 << 10);
        let start = self.sent;
        let chunk: Vec<u8> = (start..start + n).map(pattern_byte).collect();
        self.sent += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.stall_after {
            return http_body::SizeHint::default();
        }
        http_body::SizeHint::with_exact((self.total - self.sent) as u64)
    }
}
