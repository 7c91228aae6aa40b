//! Request smuggling and broken framing from apps, against the real binary: conflicting
//! lengths, obfuscated `Transfer-Encoding`, folded or badly terminated header lines, control
//! bytes, oversized header sections, malformed chunked bodies, pipelining and aborted uploads.

use super::*;
use crate::support::raw::{exchange, exchange_half_closed};

struct Case {
    name: String,
    request: Vec<u8>,
    /// Half-close the connection after sending, as an app that stops sending does.
    half_close: bool,
    expect: Expect,
}

fn case(name: impl Into<String>, request: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        request: request.into(),
        half_close: false,
        expect,
    }
}

/// A POST to /raas/v2/orders with `headers` (each line ending in CRLF) and the raw `body`.
fn post(headers: &str, body: &str) -> String {
    format!("POST /raas/v2/orders HTTP/1.1\r\nHost: app\r\nAuthorization: {CALLER_AUTH}\r\n{headers}\r\n{body}")
}

/// A chunked "hello" followed by a second request that must never reach Tango.
const SMUGGLING_BODY: &str =
    "5\r\nhello\r\n0\r\n\r\nGET /raas/v2/smuggled HTTP/1.1\r\nHost: app\r\n\r\n";

fn cases() -> Vec<Case> {
    use Expect::*;
    let chunked = "Transfer-Encoding: chunked\r\n";
    let mut cases = vec![
        // Lengths that disagree, or do not parse.
        case("CL list 5, 5", post("Content-Length: 5, 5\r\n", "hello"), Refused(400, None)),
        case("CL list 5, 6", post("Content-Length: 5, 6\r\n", "hello!"), Refused(400, None)),
        case(
            "two CLs 5 and 6",
            post("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"),
            Refused(400, None),
        ),
        case("CL +5", post("Content-Length: +5\r\n", "hello"), Refused(400, None)),
        case("CL -5", post("Content-Length: -5\r\n", "hello"), Refused(400, None)),
        // Transfer-Encoding obfuscation.
        case(
            "TE chunked, identity",
            post("Transfer-Encoding: chunked, identity\r\n", SMUGGLING_BODY),
            Refused(400, None),
        ),
        case(
            "TE xchunked",
            post("Transfer-Encoding: xchunked\r\n", SMUGGLING_BODY),
            Refused(400, None),
        ),
        case(
            "TE with a space before the colon",
            post("Transfer-Encoding : chunked\r\n", SMUGGLING_BODY),
            Refused(400, None),
        ),
        case(
            "TE folded onto the previous line",
            post("X-Padding: a\r\n Transfer-Encoding: chunked\r\n", SMUGGLING_BODY),
            Refused(400, None),
        ),
        case(
            "TE on HTTP/1.0",
            format!("POST /raas/v2/orders HTTP/1.0\r\n{chunked}\r\n{SMUGGLING_BODY}"),
            Refused(400, None),
        ),
        // Header lines folded or ended badly.
        case(
            "obs-fold continuation",
            post("X-Note: first\r\n\tsecond\r\n", ""),
            Refused(400, None),
        ),
        case(
            "bare CR in the request line",
            "GET /raas/v2/catalogs HTTP/1.1\rHost: app\r\n\r\n",
            Refused(400, None),
        ),
        case(
            "bare CR inside a header",
            "GET /raas/v2/catalogs HTTP/1.1\r\nHost: app\rX-Injected: 1\r\n\r\n",
            Refused(400, None),
        ),
        // 1 MiB in one header line; 10,000 header lines.
        case(
            "1 MiB header line",
            post(&format!("X-Big: {}\r\n", "a".repeat(1 << 20)), ""),
            Refused(431, None),
        ),
        case(
            "10,000 headers",
            post(
                &(0..10_000).map(|i| format!("X-H{i}: v\r\n")).collect::<String>(),
                "",
            ),
            Refused(431, None),
        ),
        // Malformed chunked bodies: the proxy has started forwarding when it finds out.
        case(
            "bad chunk size",
            post(chunked, "zz\r\nhello\r\n0\r\n\r\n"),
            Cut(400, "bad_request"),
        ),
        case(
            "chunk longer than declared",
            post(chunked, "3\r\nhello\r\n0\r\n\r\n"),
            Cut(400, "bad_request"),
        ),
        case(
            "chunk size overflowing 64 bits",
            post(chunked, "fffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
            Cut(400, "bad_request"),
        ),
        case(
            "no final CRLF, connection held open",
            post(chunked, "5\r\nhello\r\n0\r\n"),
            Cut(408, "request_timeout"),
        ),
        Case {
            half_close: true,
            ..case(
                "no final CRLF, then the app stops sending",
                post(chunked, "5\r\nhello\r\n0\r\n"),
                Cut(400, "bad_request"),
            )
        },
        // Framings that are valid, if unusual: forwarded once, re-framed by the proxy.
        case(
            "CL and TE: TE wins, the connection closes",
            post(&format!("Content-Length: 4\r\n{chunked}"), SMUGGLING_BODY),
            Forwarded("/raas/v2/orders", b"hello"),
        ),
        case(
            "TE and CL: TE wins, the connection closes",
            post(&format!("{chunked}Content-Length: 50\r\n"), SMUGGLING_BODY),
            Forwarded("/raas/v2/orders", b"hello"),
        ),
        case(
            "TE with a tab before chunked",
            post("Transfer-Encoding:\tchunked\r\nConnection: close\r\n", SMUGGLING_BODY),
            Forwarded("/raas/v2/orders", b"hello"),
        ),
        case(
            "TE with spaces around chunked",
            post("Transfer-Encoding:   chunked  \r\nConnection: close\r\n", SMUGGLING_BODY),
            Forwarded("/raas/v2/orders", b"hello"),
        ),
        case(
            "two equal CLs",
            post("Content-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n", "hello"),
            Forwarded("/raas/v2/orders", b"hello"),
        ),
        case(
            "bare LF line endings",
            format!("GET /raas/v2/catalogs HTTP/1.1\nHost: app\nAuthorization: {CALLER_AUTH}\nConnection: close\n\n"),
            Forwarded("/raas/v2/catalogs", b""),
        ),
    ];
    // NUL, DEL and other control bytes, in a header value and in the path.
    for (byte, name) in [(0u8, "NUL"), (0x7f, "DEL"), (0x01, "SOH"), (0x1b, "ESC")] {
        let mut request = b"GET /raas/v2/catalogs HTTP/1.1\r\nHost: app\r\nX-Note: a".to_vec();
        request.extend([byte, b'b']);
        request.extend(b"\r\n\r\n");
        cases.push(case(
            format!("{name} in a header value"),
            request,
            Refused(400, None),
        ));
        let mut request = b"GET /raas/v2/cat".to_vec();
        request.extend([byte]);
        request.extend(b"alogs HTTP/1.1\r\nHost: app\r\n\r\n");
        cases.push(case(
            format!("{name} in the path"),
            request,
            Refused(400, None),
        ));
    }
    cases
}

#[tokio::test]
async fn broken_framing_is_refused_or_reframed_and_never_smuggles_a_request() {
    let upstream = FakeUpstream::start().await;
    let proc = ProxyProcess::start_toml(
        &config_toml(&upstream.url(), "body_idle_timeout = \"1s\"", ""),
        &[("RUST_LOG", "debug")],
    );
    let admin = proc.admin_url();

    for case in cases() {
        let before = upstream.requests().len();
        let ex = if case.half_close {
            exchange_half_closed(proc.proxy_addr, &case.request).await
        } else {
            exchange(proc.proxy_addr, &case.request).await
        };
        check(&case.name, &case.expect, &ex, &upstream, before);
        assert_still_serves(&proc.url(), "/raas/v2/catalogs", 200).await;
    }
    // Body failures are the app's: counted as its errors, never as Tango's.
    assert_eq!(
        metric(&admin, "tango_proxy_upstream_errors_total").await,
        0.0
    );
    assert_eq!(
        metric(
            &admin,
            r#"tango_proxy_proxy_errors_total{cause="upstream_unreachable"}"#
        )
        .await,
        0.0
    );
    assert!(
        metric(
            &admin,
            r#"tango_proxy_proxy_errors_total{cause="bad_request"}"#
        )
        .await
            >= 4.0
    );

    let (code, _) = proc.terminate();
    assert_eq!(code, 0);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_a_broken_one_ends_the_connection() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let addr = proxy.addr();

    // Three valid requests in one write, a body in the middle: answered in order, each
    // forwarded on its own with its own body.
    let ex = exchange(
        addr,
        format!(
            "GET /raas/v2/p1 HTTP/1.1\r\nHost: app\r\nX-Request-Id: p1\r\n\r\n\
             POST /raas/v2/p2 HTTP/1.1\r\nHost: app\r\nX-Request-Id: p2\r\nAuthorization: {CALLER_AUTH}\r\nContent-Length: 5\r\n\r\nhello\
             GET /raas/v2/p3 HTTP/1.1\r\nHost: app\r\nX-Request-Id: p3\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(ex.closed);
    let ids: Vec<_> = ex
        .responses
        .iter()
        .map(|r| r.header("x-request-id"))
        .collect();
    assert_eq!(ids, [Some("p1"), Some("p2"), Some("p3")], "{ex:?}");
    assert!(ex.responses.iter().all(|r| r.status == 200 && r.complete));
    let seen = upstream.requests();
    let paths: Vec<_> = seen.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(paths, ["/raas/v2/p1", "/raas/v2/p2", "/raas/v2/p3"]);
    assert_eq!(
        seen.iter().map(|s| s.body_len).collect::<Vec<_>>(),
        [0, 5, 0]
    );
    seen.iter().for_each(|s| assert_sanitised(s, "Basic "));

    // Broken framing followed by a valid request: the connection ends with the error, and the
    // valid request is never read, neither on its own nor as part of the broken one's body.
    let smuggled = "GET /raas/v2/smuggled HTTP/1.1\r\nHost: app\r\n\r\n";
    for broken in [
        post("Content-Length: 5, 6\r\n", "hello!"),
        post("Transfer-Encoding: chunked\r\n", "zz\r\nhello\r\n0\r\n\r\n"),
        post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
    ] {
        let before = upstream.requests().len();
        let ex = exchange(addr, format!("{broken}{smuggled}").as_bytes()).await;
        assert!(ex.closed, "{ex:?}");
        assert_eq!(ex.only().status, 400, "{ex:?}");
        let new = &upstream.requests()[before..];
        assert!(
            new.iter()
                .all(|s| !s.complete && !s.uri.contains("smuggled")),
            "{new:?}"
        );
    }

    // Well-framed requests the proxy refuses, each with a body holding another request: the
    // body is never read as a request, and the request after it is answered on its own.
    let follower = "GET /raas/v2/follower HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n";
    let with_body = |head: &str| {
        format!(
            "{head}\r\nContent-Length: {}\r\n\r\n{smuggled}{follower}",
            smuggled.len()
        )
    };
    for (refused, status) in [
        (
            with_body("GET /raas/v2/x HTTP/1.1\r\nHost: a\r\nHost: b"),
            400,
        ),
        (with_body("TRACE /raas/v2/x HTTP/1.1\r\nHost: app"), 405),
        (
            with_body("POST http://evil.example/raas/v2/x HTTP/1.1\r\nHost: evil.example"),
            400,
        ),
        (
            with_body(&format!(
                "POST /raas/v2/x HTTP/1.1\r\nHost: app\r\nX-Big: {}",
                "a".repeat(40 << 10)
            )),
            431,
        ),
    ] {
        let before = upstream.requests().len();
        let ex = exchange(addr, refused.as_bytes()).await;
        assert!(ex.closed, "{ex:?}");
        assert_eq!(
            ex.responses.first().map(|r| r.status),
            Some(status),
            "{ex:?}"
        );
        let new = &upstream.requests()[before..];
        assert!(new.iter().all(|s| s.uri == "/raas/v2/follower"), "{new:?}");
        // Whether the proxy read on to the follower or closed the connection, the two agree.
        assert_eq!(ex.responses.len(), 1 + new.len(), "{ex:?}");
    }
    assert_still_serves(&proxy.url, "/raas/v2/catalogs", 200).await;
}

#[tokio::test]
async fn an_app_aborting_mid_upload_is_a_quiet_close_not_an_upstream_error() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let upstream_errors = metric(&proxy.admin_url, "tango_proxy_upstream_errors_total").await;

    let mut stream = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"POST /raas/v2/orders HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\n{\"amount\":",
    )
    .await
    .unwrap();
    // Wait for the request to reach Tango, then go away mid-body.
    eventually("the request to reach Tango", || async {
        upstream.heads() == 1
    })
    .await;
    drop(stream);
    // The request is over once Tango saw it end and the proxy holds nothing in flight.
    eventually("the aborted request to end", || async {
        upstream.requests().len() == 1
            && metric(&proxy.admin_url, "tango_proxy_in_flight_requests").await == 0.0
    })
    .await;
    assert!(!upstream.last().complete, "Tango got a complete request");
    assert_eq!(
        metric(&proxy.admin_url, "tango_proxy_upstream_errors_total").await,
        upstream_errors,
        "an app going away was counted against Tango"
    );
    assert_eq!(
        metric(
            &proxy.admin_url,
            r#"tango_proxy_requests_total{class="5xx"}"#
        )
        .await,
        0.0
    );
    assert_still_serves(&proxy.url, "/raas/v2/catalogs", 200).await;
}
