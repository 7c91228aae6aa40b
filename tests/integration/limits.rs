//! Listener limits against hostile or broken peers: the header-read timeout on both listeners,
//! the connection caps, and the idle timeout on response bodies from Tango.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Generous bound on anything that should end soon; only reached when it never ends.
const HANG: Duration = Duration::from_secs(10);

/// Reads until the peer closes; `None` if it is still open after [`HANG`].
async fn read_until_closed(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    match tokio::time::timeout(HANG, stream.read_to_end(&mut buf)).await {
        Ok(_) => Some(buf),
        Err(_) => None,
    }
}

/// Sends one keep-alive request and reads its whole response (sized by Content-Length).
async fn request_on(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed mid-response");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    return text;
                }
            }
        }
    };
    tokio::time::timeout(HANG, read).await.expect("no response")
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in metrics"))
}

async fn assert_serving(proxy: &TestProxy) {
    assert_eq!(proxy.get("/raas/v2/catalogs").await.status(), 200);
    let live = client()
        .get(format!("{}/livez", proxy.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
}

#[tokio::test]
async fn a_request_head_sent_too_slowly_is_cut_off_on_both_listeners() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(
        &upstream.url(),
        "header_timeout = \"500ms\"",
        "",
    ))
    .await;
    let admin: SocketAddr = proxy.admin_url["http://".len()..].parse().unwrap();
    for addr in [proxy.addr(), admin] {
        // Silent: connects and sends nothing.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // Slowloris: a header line every 200 ms, never the blank line that ends the head.
        let mut trickle = TcpStream::connect(addr).await.unwrap();
        trickle
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let (mut read, mut write) = trickle.into_split();
        let feeder = tokio::spawn(async move {
            while write.write_all(b"X-Slow: 1\r\n").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        assert!(
            read_until_closed(&mut silent).await.is_some(),
            "{addr}: a connection that sends nothing stays open"
        );
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(HANG, read.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "{addr}: a trickled request head is never cut off"
        );
        feeder.abort();
        assert!(
            !String::from_utf8_lossy(&rest).contains("200 OK"),
            "{addr}: the trickled request was served"
        );
    }
    assert_eq!(upstream.requests().len(), 0, "nothing reached Tango");

    // A kept-alive connection left idle is closed too, and counted as idle, not as a slow client.
    let mut kept = TcpStream::connect(proxy.addr()).await.unwrap();
    let get = "GET /raas/v2/catalogs HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(raw_status(&request_on(&mut kept, get).await), 200);
    assert!(
        read_until_closed(&mut kept).await.is_some(),
        "an idle kept-alive connection stays open"
    );

    // Requests the listener refuses itself leave a trace an operator can see.
    let smuggle = b"POST /raas/v2/orders HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello";
    assert_eq!(raw_status(&raw_request(proxy.addr(), smuggle).await), 400);
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    assert_eq!(
        raw_status(&raw_request(proxy.addr(), huge.as_bytes()).await),
        431
    );
    // A connection is counted once it has ended, after its lingering close (the app already
    // saw the end of its answer): wait for the last of them.
    let deadline = Instant::now() + HANG;
    let metrics = loop {
        let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
        let counted = |reason: &str| {
            metric(
                &metrics,
                &format!(
                    "tango_proxy_connections_ended_total{{listener=\"proxy\",reason=\"{reason}\"}}"
                ),
            )
        };
        if counted("malformed") + counted("too_large") >= 2.0 || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ended = |listener: &str, reason: &str| {
        metric(
            &metrics,
            &format!("tango_proxy_connections_ended_total{{listener=\"{listener}\",reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(ended("proxy", "header_timeout"), 2.0);
    assert_eq!(ended("admin", "header_timeout"), 2.0);
    assert_eq!(ended("proxy", "idle"), 1.0);
    assert_eq!(ended("proxy", "malformed"), 1.0);
    assert_eq!(ended("proxy", "too_large"), 1.0);
    assert_eq!(
        upstream.requests().len(),
        1,
        "only the kept-alive request reached Tango"
    );
    assert_serving(&proxy).await;
}

#[tokio::test]
async fn connections_past_a_listeners_cap_get_503_and_the_other_listener_keeps_serving() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(
        &upstream.url(),
        "max_connections = 3\nadmin_max_connections = 2\nheader_timeout = \"30s\"",
        "",
    ))
    .await;
    let admin: SocketAddr = proxy.admin_url["http://".len()..].parse().unwrap();
    let get = "GET /raas/v2/catalogs HTTP/1.1\r\nHost: x\r\n\r\n";

    // Three kept-alive app connections fill the proxy listener.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(raw_status(&request_on(&mut s, get).await), 200);
        held.push(s);
    }
    let refused = raw_request(proxy.addr(), get.as_bytes()).await;
    let body = assert_raw_proxy_error(&refused, 503, "too_many_connections");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("listen.max_connections"));
    assert!(refused.to_ascii_lowercase().contains("retry-after: 1"));
    assert_eq!(
        upstream.requests().len(),
        3,
        "the refused request reached Tango"
    );

    // The admin listener is unaffected, and counts what happened.
    let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
    assert_eq!(
        metric(
            &metrics,
            "tango_proxy_connections_refused_total{listener=\"proxy\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "tango_proxy_open_connections{listener=\"proxy\"}"),
        3.0
    );
    assert!(crate::support::logs::captured().contains("refusing new connections with 503"));

    // A freed slot is usable again.
    drop(held.pop());
    let deadline = Instant::now() + HANG;
    loop {
        let answer = raw_request(
            proxy.addr(),
            get.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        if raw_status(&answer) == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a freed slot was never reused: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Filling the admin listener refuses admin connections only.
    let livez = "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut admin_held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        assert_eq!(raw_status(&request_on(&mut s, livez).await), 200);
        admin_held.push(s);
    }
    let refused = raw_request(admin, livez.as_bytes()).await;
    let body = assert_raw_proxy_error(&refused, 503, "too_many_connections");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("listen.admin_max_connections"));
    let mut app = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(raw_status(&request_on(&mut app, get).await), 200);
    drop(admin_held);
}

#[tokio::test]
async fn a_response_body_tango_stops_sending_is_cut_off() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(
        &upstream.url(),
        "",
        "body_idle_timeout = \"500ms\"",
    ))
    .await;
    let resp = proxy.get("/raas/v2/stall?bytes=10").await;
    assert_eq!(resp.status(), 200, "the headers arrive as Tango sent them");
    let body = tokio::time::timeout(HANG, resp.bytes())
        .await
        .expect("a stalled response body is never cut off");
    assert!(body.is_err(), "a cut-off body must not look complete");

    let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
    assert_eq!(
        metric(
            &metrics,
            "tango_proxy_upstream_errors_total{kind=\"body_stalled\"}"
        ),
        1.0
    );
    assert!(crate::support::logs::captured()
        .contains("the upstream stopped sending a response body for 500ms"));
    assert_serving(&proxy).await;
}

#[tokio::test]
async fn an_app_that_stops_reading_its_response_loses_the_connection_not_the_slot() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(
        &upstream.url(),
        "body_idle_timeout = \"500ms\"\nmax_connections = 1",
        "",
    ))
    .await;
    // 64 MiB the app never reads: the socket buffers fill and the proxy's writes stall.
    let mut stuck = TcpStream::connect(proxy.addr()).await.unwrap();
    stuck
        .write_all(b"GET /raas/v2/download?bytes=67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let series = "tango_proxy_connections_ended_total{listener=\"proxy\",reason=\"write_stalled\"}";
    let deadline = Instant::now() + HANG;
    loop {
        let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
        if metric(&metrics, series) == 1.0 {
            assert_eq!(
                metric(&metrics, "tango_proxy_open_connections{listener=\"proxy\"}"),
                0.0,
                "the stalled connection still holds its slot"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a stalled write is never cut off"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The only slot is free again for the next app connection.
    assert_eq!(proxy.get("/raas/v2/catalogs").await.status(), 200);
    drop(stuck);
}

#[tokio::test]
async fn a_flood_past_the_cap_costs_a_bounded_number_of_descriptors() {
    let upstream = FakeUpstream::start().await;
    let p = ProxyProcess::start_toml(
        &config_toml(&upstream.url(), "max_connections = 1", ""),
        &[],
    );
    let descriptors = || {
        std::fs::read_dir(format!("/proc/{}/fd", p.pid()))
            .unwrap()
            .count()
    };
    let mut held = TcpStream::connect(p.proxy_addr).await.unwrap();
    let get = "GET /raas/v2/catalogs HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(raw_status(&request_on(&mut held, get).await), 200);
    let before = descriptors();
    // 300 connections that never close: each refusal waits up to a second for its peer to go.
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(TcpStream::connect(p.proxy_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let during = descriptors();
    assert!(
        during <= before + 64 + 8,
        "a flood of 300 held {} descriptors more",
        during - before
    );
    // Refused ones got their 503 (up to the bound) or a close; none hangs.
    let mut answered = 0;
    for mut s in flood.drain(..64) {
        if let Some(bytes) = read_until_closed(&mut s).await {
            answered += usize::from(raw_status(&String::from_utf8_lossy(&bytes)) == 503);
        }
    }
    assert!(answered > 0, "no refused connection got its 503");
    drop(flood);
    drop(held);
    let metrics = get_text(&format!("http://{}/metrics", p.admin_addr)).await;
    assert_eq!(
        metric(
            &metrics,
            "tango_proxy_connections_refused_total{listener=\"proxy\"}"
        ),
        300.0
    );
    assert_eq!(p.terminate().0, 0);
}
