//! What reaches the upstream, and what comes back to the app.

use crate::support::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn basic_header_is_exact_and_caller_credentials_never_reach_the_upstream() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let resp = client()
        .get(format!("{}/raas/v2/catalogs?verbose=true", proxy.url))
        .header("authorization", "Basic YXBwOmFwcC1zZWNyZXQ=")
        .header("proxy-authorization", "Basic cHJveHk6c2VjcmV0")
        .header("dpop", "eyJhcHAtcHJvb2YiOnRydWV9")
        .header("cookie", "session=app-cookie")
        .header("x-custom", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, "/raas/v2/catalogs?verbose=true");
    assert_eq!(seen.headers["authorization"], expected_basic().as_str());
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    for gone in ["proxy-authorization", "dpop", "cookie"] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    assert_eq!(seen.headers["x-custom"], "kept");
    assert_eq!(seen.headers["host"], upstream.addr.to_string().as_str());
}

#[tokio::test]
async fn headers_named_in_connection_and_hop_by_hop_headers_are_stripped() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let resp = raw_request(
        proxy.addr(),
        b"GET /raas/v2/catalogs HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Connection: close, X-Internal-Hop\r\nX-Internal-Hop: secret-hop\r\n\
          Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n\
          X-Other: stays\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&resp), 200, "{resp}");
    let seen = upstream.last();
    for gone in ["x-internal-hop", "keep-alive", "te", "proxy-connection"] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    if let Some(c) = seen.headers.get("connection") {
        assert!(!c
            .to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("x-internal-hop"));
    }
    assert_eq!(seen.headers["x-other"], "stays");
}

#[tokio::test]
async fn forwarding_headers_and_request_ids() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;

    // The app's id is kept, sent upstream and echoed; Tango's own id is kept aside.
    let resp = client()
        .get(format!("{}/raas/v2/customers", proxy.url))
        .header("x-request-id", "app-req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "app-req-123");
    assert_eq!(resp.headers()["x-tango-request-id"], "upstream-request-id");
    let seen = upstream.last();
    assert_eq!(seen.headers["x-request-id"], "app-req-123");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        proxy.addr().to_string().as_str()
    );

    // Without one, a fresh id is generated, sent and echoed; two requests get two ids.
    let a = proxy.get("/a").await;
    let id_a = a.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(upstream.last().headers["x-request-id"], id_a.as_str());
    let b = proxy.get("/b").await;
    assert_ne!(b.headers()["x-request-id"].to_str().unwrap(), id_a);
    assert!(!id_a.is_empty());
}

#[tokio::test]
async fn methods_statuses_and_bodies_pass_through() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let body = br#"{"accountIdentifier":"A1","amount":5,"externalRefID":null}"#;
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let resp = client()
            .request(
                method.parse().unwrap(),
                format!("{}/raas/v2/orders", proxy.url),
            )
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let echoed: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(echoed["sha256"], sha256_hex(body));
        let seen = upstream.last();
        assert_eq!(seen.method, method);
        assert_eq!(seen.headers["content-type"], "application/json");
        assert_eq!(seen.body_sha256, sha256_hex(body));
    }
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let resp = proxy.get("/raas/v2/redirect").await;
    assert_eq!(resp.status(), 302);
    assert_eq!(
        resp.headers()["location"],
        "https://elsewhere.example/raas/v2/catalogs"
    );
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn an_upstream_base_path_prefixes_every_request() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(&format!("{}/tango/", upstream.url()), "", "")).await;
    proxy.get("/raas/v2/orders/RA1%2F2?x=%20y").await;
    assert_eq!(upstream.last().uri, "/tango/raas/v2/orders/RA1%2F2?x=%20y");
}

#[tokio::test]
async fn absolute_form_for_the_proxy_itself_is_forwarded() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let req = format!(
        "GET http://{addr}/raas/v2/catalogs HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
        addr = proxy.addr()
    );
    let resp = raw_request(proxy.addr(), req.as_bytes()).await;
    assert_eq!(raw_status(&resp), 200, "{resp}");
    assert_eq!(upstream.last().uri, "/raas/v2/catalogs");
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let url = format!("{}/raas/v2/slow?ms=700", proxy.url);
    let in_flight = tokio::spawn(async move { client().get(url).send().await });
    // Wait until the request is inside the proxy (the upstream has not answered yet).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while upstream.requests().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    proxy.stop();
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), r#"{"slow":true}"#);
    let addr = proxy.addr();
    proxy.wait().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    for _ in 0..10 {
        let resp = client()
            .get(format!("{}/raas/v2/catalogs", proxy.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(upstream.requests().len(), 10);
    assert_eq!(
        upstream.connections(),
        1,
        "the proxy opened a connection per request"
    );
}

#[tokio::test]
async fn concurrent_requests_get_their_own_connections_which_later_requests_reuse() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let url = format!("{}/raas/v2/slow?ms=100", proxy.url);
    for _ in 0..5 {
        let statuses = concurrent_gets(vec![url.clone(); 8]).await;
        assert_eq!(statuses, [200; 8]);
    }
    assert_eq!(upstream.requests().len(), 40);
    // Eight at once need eight HTTP/1.1 connections; the rounds after the first find them
    // free (a few may still be finishing their previous answer when the next round starts).
    let opened = upstream.connections();
    assert!(
        (8..=16).contains(&opened),
        "{opened} connections for 5 rounds of 8 concurrent requests"
    );
}

#[tokio::test]
async fn an_upstream_that_closes_idle_connections_costs_no_request() {
    // A keep-alive upstream that closes each connection shortly after its answer, as servers
    // do with idle ones: the proxy notices and opens another for the next request.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                let _ = stream.write_all(answer).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
        }
    });
    let proxy = TestProxy::start(&config_toml(&format!("http://{addr}"), "", "")).await;
    for i in 0..5 {
        let resp = proxy.get("/raas/v2/catalogs").await;
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.text().await.unwrap(), "{}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn dpop_nonces_and_challenges_stay_between_the_proxy_and_tango() {
    // The app never does DPoP: Tango's nonce is the proxy's business, and a 401 the app
    // receives carries a challenge it can act on, in the scheme of the profile's credential
    // (Basic here; Bearer for OAuth profiles, see lifecycle.rs).
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let resp = proxy.get("/raas/v2/401/use_dpop_nonce").await;
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers().get("dpop-nonce").is_none(),
        "{:?}",
        resp.headers()
    );
    let challenges: Vec<&str> = resp
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(challenges, [r#"Basic realm="Tango RaaS""#]);
    // Other challenges pass through unchanged.
    let resp = proxy.get("/raas/v2/401/bearer").await;
    assert_eq!(
        resp.headers()["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    // A 401 Tango sent without any challenge gets one (found by the www_authenticate fuzz target).
    let resp = proxy.get("/raas/v2/401/none").await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        r#"Basic realm="Tango RaaS""#
    );
}
