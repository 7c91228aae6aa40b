//! An upstream that answers with garbage: conflicting lengths, bodies where none may be, 1xx
//! followed by junk, bytes that are not HTTP/1 at all, connections closed mid-body. The app gets
//! the proxy's 502 or a response that is visibly cut short, never a hang and never the garbage
//! passed off as a valid answer; the POST is never sent twice, and the next request works.

use super::*;
use crate::support::raw::{exchange, RawServer, Reply};

/// The upstream's well-formed answer, for the requests that prove the proxy still works.
const OK: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";

/// A complete HTTP/1.1 response hidden where no body may be: a proxy that read it as the answer
/// to its next request would hand the app a forged response.
const HIDDEN: &str = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled";

/// An HTTP/2 SETTINGS frame (empty) and a GOAWAY, as a server speaking h2 would send first.
const H2_FRAMES: &[u8] = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01";

/// The upstream's answer to each path.
fn answer(path: &str) -> Reply {
    let text = |s: &str| s.as_bytes().to_vec();
    let hidden = |status: &str| {
        text(&format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{HIDDEN}",
            HIDDEN.len()
        ))
    };
    match path.trim_start_matches("/raas/v2/") {
        "conflicting-lengths" => Reply::Close(text(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        )),
        "length-list" => Reply::Close(text("HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!")),
        "length-and-chunked" => Reply::Close(text(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )),
        "204-with-body" => Reply::KeepAlive(hidden("204 No Content")),
        "304-with-body" => Reply::KeepAlive(hidden("304 Not Modified")),
        "100-then-junk" => Reply::Close(text("HTTP/1.1 100 Continue\r\n\r\nnot-http-at-all\r\n\r\n")),
        "garbage" => Reply::Close(b"\x00\x01\x02junk-bytes \xff\xfe\r\n\r\n".to_vec()),
        "http2-frames" => Reply::Close(H2_FRAMES.to_vec()),
        "nothing" => Reply::Close(Vec::new()),
        "cut-mid-body" => Reply::Close(text(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"partial\":",
        )),
        "cut-mid-chunk" => Reply::Close(text(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )),
        _ => Reply::KeepAlive(text(OK)),
    }
}

/// What the app must get.
enum Sees {
    /// The proxy's 502 `upstream_unreachable`, its message saying this.
    BadGateway(&'static str),
    /// This status and exactly this body, correctly framed.
    Exactly(u16, &'static [u8]),
    /// This status and a body cut short where the upstream stopped, then the connection closed.
    CutShort(u16, &'static [u8]),
}

#[tokio::test]
async fn garbage_from_the_upstream_is_a_502_or_a_visibly_cut_answer_never_a_forgery() {
    const LENGTH: &str = "invalid content-length";
    const NOT_HTTP: &str = "invalid HTTP version";
    let upstream = RawServer::start(|r| answer(&r.path)).await;
    // A hang would turn into a 504 after this, failing the case instead of the run.
    let proxy = TestProxy::start(&config_toml(&upstream.url(), "", "timeout = \"5s\"")).await;
    let cases = [
        ("conflicting-lengths", Sees::BadGateway(LENGTH)),
        ("length-list", Sees::BadGateway(LENGTH)),
        ("length-and-chunked", Sees::Exactly(200, b"hello")),
        ("204-with-body", Sees::Exactly(204, b"")),
        ("304-with-body", Sees::Exactly(304, b"")),
        ("100-then-junk", Sees::BadGateway(NOT_HTTP)),
        ("garbage", Sees::BadGateway(NOT_HTTP)),
        ("http2-frames", Sees::BadGateway(NOT_HTTP)),
        (
            "nothing",
            Sees::BadGateway("connection closed before message completed"),
        ),
        ("cut-mid-body", Sees::CutShort(200, b"{\"partial\":")),
        ("cut-mid-chunk", Sees::CutShort(200, b"hello")),
    ];
    // Each case twice, so an answer left behind on a pooled connection meets the next request.
    for (name, sees) in cases.iter().chain(&cases) {
        let path = format!("/raas/v2/{name}");
        let before = upstream.requests_for(&path).len();
        let close = match sees {
            // An answer cut short must end the app's connection by itself.
            Sees::CutShort(..) => "",
            _ => "Connection: close\r\n",
        };
        let ex = exchange(
            proxy.addr(),
            format!(
                "POST {path} HTTP/1.1\r\nHost: app\r\nAuthorization: {CALLER_AUTH}\r\n{close}\
                 Content-Type: application/json\r\nContent-Length: 12\r\n\r\n{{\"amount\":1}}"
            )
            .as_bytes(),
        )
        .await;
        assert!(ex.closed, "{name}: the app was left hanging: {ex:?}");
        let response = ex.only();
        let body = String::from_utf8_lossy(&response.body);
        for garbage in ["smuggled", "junk-bytes", "not-http-at-all"] {
            assert!(!body.contains(garbage), "{name}: the app got {response:?}");
        }
        match sees {
            Sees::BadGateway(why) => {
                let body = assert_raw_proxy_error(&response.text(), 502, "upstream_unreachable");
                let message = body["message"].as_str().unwrap();
                assert!(message.contains(why), "{name}: {message}");
            }
            Sees::Exactly(status, expected) => {
                assert_eq!(response.status, *status, "{name}: {response:?}");
                assert!(response.complete, "{name}: {response:?}");
                assert_eq!(response.body, *expected, "{name}: {response:?}");
            }
            Sees::CutShort(status, expected) => {
                assert_eq!(response.status, *status, "{name}: {response:?}");
                assert!(!response.complete, "{name}: looked complete: {response:?}");
                assert_eq!(response.body, *expected, "{name}: {response:?}");
            }
        }
        // A money-moving POST is never sent twice on the proxy's own account.
        let seen = upstream.requests_for(&path);
        assert_eq!(seen.len(), before + 1, "{name}: Tango saw {seen:?}");
        let last = seen.last().unwrap();
        assert_eq!(last.body, b"{\"amount\":1}");
        assert!(last.head.contains(&format!(
            "authorization: {}",
            expected_basic().to_ascii_lowercase()
        )));

        // The next request gets the upstream's real answer.
        let resp = proxy.get("/raas/v2/ok").await;
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(resp.text().await.unwrap(), "{\"ok\":true}", "{name}");
    }
}
