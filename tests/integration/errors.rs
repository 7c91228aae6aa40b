//! Answers the proxy makes itself: status, `x-tango-proxy-error`, Tango's JSON error shape.

use crate::support::*;

#[tokio::test]
async fn body_over_max_body_is_413_by_length_and_by_stream() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(&upstream.url(), "max_body = \"64KiB\"", "")).await;

    let resp = client()
        .post(format!("{}/raas/v2/orders", proxy.url))
        .body(vec![b'x'; 65 << 10])
        .send()
        .await
        .unwrap();
    let body = assert_proxy_error(resp, 413, "body_too_large").await;
    assert_eq!(body["path"], "/raas/v2/orders");
    assert!(
        upstream.requests().is_empty(),
        "a too-large body was forwarded"
    );

    // Chunked: no length up front, so the limit trips mid-stream.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..20).map(|_| Ok(vec![b'y'; 8 << 10])).collect();
    let resp = client()
        .post(format!("{}/raas/v2/orders", proxy.url))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_proxy_error(resp, 413, "body_too_large").await;

    // Exactly at the limit passes.
    let resp = client()
        .post(format!("{}/raas/v2/orders", proxy.url))
        .body(vec![b'z'; 64 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().body_len, 64 << 10);
}

#[tokio::test]
async fn header_section_over_the_limit_is_431() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(
        &upstream.url(),
        "max_header_size = \"8KiB\"",
        "",
    ))
    .await;
    let resp = client()
        .get(format!("{}/raas/v2/catalogs", proxy.url))
        .header("x-big", "a".repeat(9 << 10))
        .send()
        .await
        .unwrap();
    assert_proxy_error(resp, 431, "headers_too_large").await;
    assert!(upstream.requests().is_empty());

    // Under the limit is fine.
    let resp = client()
        .get(format!("{}/raas/v2/catalogs", proxy.url))
        .header("x-big", "a".repeat(6 << 10))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn absolute_form_for_another_authority_is_400() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let resp = raw_request(
        proxy.addr(),
        b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    let body = assert_raw_proxy_error(&resp, 400, "bad_request");
    assert!(body["message"].as_str().unwrap().contains("evil.example"));
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn absolute_form_with_a_scheme_other_than_http_is_400() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let me = proxy.addr().to_string();
    for scheme in ["ftp", "https", "ws"] {
        let request = format!(
            "GET {scheme}://{me}/raas/v2/catalogs HTTP/1.1\r\nHost: {me}\r\nConnection: close\r\n\r\n"
        );
        let resp = raw_request(proxy.addr(), request.as_bytes()).await;
        assert_raw_proxy_error(&resp, 400, "bad_request");
    }
    assert!(upstream.requests().is_empty());
    // Plain http absolute-form naming the proxy itself is still fine.
    let request = format!(
        "GET http://{me}/raas/v2/catalogs HTTP/1.1\r\nHost: {me}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(
        raw_status(&raw_request(proxy.addr(), request.as_bytes()).await),
        200
    );
}

#[tokio::test]
async fn connect_is_405() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let resp = raw_request(
        proxy.addr(),
        b"CONNECT api.tangocard.com:443 HTTP/1.1\r\nHost: api.tangocard.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_raw_proxy_error(&resp, 405, "method_not_allowed");
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn trace_is_405_and_never_reaches_tango() {
    // An upstream that reflects TRACE would show the app the credential the proxy added.
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let resp = raw_request(
        proxy.addr(),
        b"TRACE /raas/v2/catalogs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_raw_proxy_error(&resp, 405, "method_not_allowed");
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn an_http11_request_without_exactly_one_host_is_400() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    for request in [
        &b"GET /raas/v2/catalogs HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        &b"GET /raas/v2/catalogs HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n"[..],
    ] {
        let resp = raw_request(proxy.addr(), request).await;
        assert_raw_proxy_error(&resp, 400, "bad_request");
    }
    assert!(upstream.requests().is_empty());
    // HTTP/1.0 may omit it.
    let resp = raw_request(proxy.addr(), b"GET /raas/v2/catalogs HTTP/1.0\r\n\r\n").await;
    assert_eq!(raw_status(&resp), 200, "{resp}");
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = TestProxy::start(&config_toml(&format!("http://127.0.0.1:{port}"), "", "")).await;
    let resp = proxy.get("/raas/v2/catalogs").await;
    let body = assert_proxy_error(resp, 502, "upstream_unreachable").await;
    assert!(
        body["message"].as_str().unwrap().contains("onnect"),
        "{body}"
    );

    let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
    assert!(
        metrics.contains(r#"tango_proxy_upstream_errors_total{kind="connect"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"tango_proxy_proxy_errors_total{cause="upstream_unreachable"} 1"#));
}

#[tokio::test]
async fn slow_upstream_is_504_after_upstream_timeout() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(&upstream.url(), "", "timeout = \"300ms\"")).await;
    let resp = proxy.get("/raas/v2/slow?ms=3000").await;
    let body = assert_proxy_error(resp, 504, "upstream_timeout").await;
    assert!(
        body["message"].as_str().unwrap().contains("300ms"),
        "{body}"
    );
}

#[tokio::test]
async fn the_proxy_keeps_serving_after_errors() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(&upstream.url(), "max_body = \"1KiB\"", "")).await;
    for _ in 0..3 {
        let resp = client()
            .post(format!("{}/x", proxy.url))
            .body(vec![0u8; 4096])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 413);
        let garbage = raw_request(proxy.addr(), b"\x00\x01 not http at all\r\n\r\n").await;
        assert!(
            raw_status(&garbage) == 400 || garbage.is_empty(),
            "{garbage}"
        );
    }
    let resp = proxy.get("/raas/v2/catalogs").await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_stalled_request_body_is_408_after_body_idle_timeout() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(
        &upstream.url(),
        "body_idle_timeout = \"300ms\"",
        "",
    ))
    .await;
    // One chunk, then silence with the connection held open.
    let started = std::time::Instant::now();
    let resp = raw_request(
        proxy.addr(),
        b"POST /raas/v2/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n",
    )
    .await;
    let body = assert_raw_proxy_error(&resp, 408, "request_timeout");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("listen.body_idle_timeout"),
        "{body}"
    );
    assert!(
        upstream.requests().iter().all(|s| !s.complete),
        "Tango received the stalled request as complete: {:?}",
        upstream.requests()
    );

    // The proxy itself is fine.
    assert_eq!(proxy.get("/raas/v2/catalogs").await.status(), 200);
}

#[tokio::test]
async fn a_request_body_still_awaited_when_upstream_timeout_runs_out_is_408_not_504() {
    // upstream.timeout also covers sending the body; when it runs out while the proxy is waiting
    // for the app (not for Tango), the app is told it was the slow side.
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(&upstream.url(), "", "timeout = \"300ms\"")).await;
    let resp = raw_request(
        proxy.addr(),
        b"POST /raas/v2/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":",
    )
    .await;
    let body = assert_raw_proxy_error(&resp, 408, "request_timeout");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("upstream.timeout"),
        "{body}"
    );
    assert!(upstream.requests().iter().all(|s| !s.complete));

    // A Tango that is slow to answer a complete request is still a 504.
    let resp = client()
        .post(format!("{}/raas/v2/slow?ms=3000", proxy.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_proxy_error(resp, 504, "upstream_timeout").await;
}
