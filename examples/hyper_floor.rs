//! The least a proxy built on hyper and Tokio can cost, for `scripts/instructions.sh`: what the
//! proxy's own instructions per request are compared with, besides nginx.
//!
//! * `direct`: a hyper HTTP/1.1 server answering every request 200 itself, on one current-thread
//!   runtime — the cost of the inbound side alone.
//! * `proxy`: the same server forwarding every request to the upstream over one hyper HTTP/1.1
//!   client connection per inbound connection, with a static `Authorization` header and nothing
//!   else: no checks, no header hygiene, no timeouts, no metrics, no logs, no pool — everything
//!   the proxy adds stripped away.
//!
//! Usage: `hyper_floor direct|proxy LISTEN [UPSTREAM]`, e.g.
//! `cargo run --release --example hyper_floor -- proxy 127.0.0.1:18080 127.0.0.1:18081`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type Answer = Response<Either<Incoming, Full<Bytes>>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (proxy, listen, upstream) = match args.as_slice() {
        // An upstream given to `direct` is ignored, so both modes take the same arguments.
        [mode, listen] | [mode, listen, _] if mode == "direct" => (false, listen, None),
        [mode, listen, up] if mode == "proxy" => (true, listen, Some(up)),
        _ => {
            eprintln!("usage: hyper_floor direct|proxy LISTEN [UPSTREAM]");
            return ExitCode::from(2);
        }
    };
    let Ok(listen) = listen.parse::<SocketAddr>() else {
        eprintln!("hyper_floor: LISTEN must be an address:port");
        return ExitCode::from(2);
    };
    let upstream = match upstream.map(|u| u.parse::<SocketAddr>()) {
        Some(Ok(u)) => Some(u),
        Some(Err(_)) => {
            eprintln!("hyper_floor: UPSTREAM must be an address:port");
            return ExitCode::from(2);
        }
        None => None,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hyper_floor: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(listen, proxy.then_some(upstream).flatten())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyper_floor: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: SocketAddr, upstream: Option<SocketAddr>) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let sender = match upstream {
                Some(up) => match connect(up).await {
                    Ok(s) => Some(Arc::new(Mutex::new(s))),
                    Err(e) => {
                        eprintln!("hyper_floor: upstream {up}: {e}");
                        return;
                    }
                },
                None => None,
            };
            let svc = service_fn(move |req: Request<Incoming>| {
                let sender = sender.clone();
                async move { Ok::<_, Infallible>(answer(req, sender).await) }
            });
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn connect(up: SocketAddr) -> Result<client::SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(up).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = client::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn answer(
    req: Request<Incoming>,
    sender: Option<Arc<Mutex<client::SendRequest<Empty<Bytes>>>>>,
) -> Answer {
    let Some(sender) = sender else {
        return Response::new(Either::Right(Full::new(Bytes::from_static(b"{}"))));
    };
    let mut out = Request::new(Empty::new());
    *out.uri_mut() = req.uri().clone();
    let headers = out.headers_mut();
    headers.insert(header::HOST, HeaderValue::from_static("upstream"));
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Basic YmVuY2gtcGxhdGZvcm06YmVuY2gtYXBpLWtleQ=="),
    );
    let mut sender = sender.lock().await;
    let sent = match sender.ready().await {
        Ok(()) => sender.send_request(out).await,
        Err(e) => Err(e),
    };
    match sent {
        Ok(resp) => resp.map(Either::Left),
        Err(_) => {
            let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            resp
        }
    }
}
