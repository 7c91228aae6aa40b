//! OAuth 2.0 profiles against the mock Tango: single-flight minting, background renewal,
//! failures and backoff, the rate limit, and 401 replay.

use std::time::{Duration, Instant};

use tango_auth_proxy::mock::FailMode;

use crate::support::*;

fn bearer_label() -> String {
    format!("bearer:{CLIENT_ID}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_with_500_concurrent_requests_mints_exactly_one_token() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    // The first token answer takes a while, so every request arrives while it is in flight.
    mock.fail_token_requests(FailMode::Slow(Duration::from_millis(700)), 1);
    let proxy = TestProxy::start(&oauth_toml(&url, "service_account", "")).await;
    let urls = vec![format!("{}/raas/v2/catalogs", proxy.url); 500];
    for status in concurrent_gets(urls).await {
        assert_eq!(status, 200);
    }
    let stats = mock.stats();
    assert_eq!(stats.total_token_requests(), 1, "{stats:?}");
    assert_eq!(stats.token_requests["password"], 1);
    assert_eq!(stats.credentials[&bearer_label()], 500, "{stats:?}");
    assert_eq!(mock.issued_tokens().len(), 1);
}

#[tokio::test]
async fn short_lived_tokens_are_renewed_in_the_background_before_expiry() {
    // Five-minute audience scaled to 6 s: refresh window from 4.5 s, usable until 5.4 s.
    let (mock, url) = start_mock(mock_config(6.0 / 300.0)).await;
    let proxy = TestProxy::start(&oauth_toml(
        &url,
        "service_account",
        &format!("audience = \"{FIVE_MINUTE_AUDIENCE}\""),
    ))
    .await;
    let until = Instant::now() + Duration::from_secs(10);
    let mut sent = 0;
    while Instant::now() < until {
        let resp = proxy.get("/raas/v2/catalogs").await;
        assert_eq!(resp.status(), 200, "request {sent} failed");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let timeline = mock.token_timeline();
    assert!(timeline.len() >= 2, "expected renewals: {timeline:?}");
    for pair in timeline.windows(2) {
        let first_use = pair[1]
            .first_used_ms
            .expect("a renewed token was never used");
        assert!(
            first_use < pair[0].expires_ms,
            "the new token was first used after the old one expired: {timeline:?}"
        );
        assert!(pair[1].issued_ms < pair[0].expires_ms);
    }
    let stats = mock.stats();
    assert_eq!(stats.credentials.get("bearer-invalid"), None, "{stats:?}");
    assert_eq!(stats.credentials[&bearer_label()], sent);
}

#[tokio::test]
async fn token_endpoint_outage_is_invisible_until_the_token_is_unusable_then_503_fast() {
    // 6 s tokens: window from 4.5 s, unusable at 5.4 s.
    let (mock, url) = start_mock(mock_config(6.0 / 300.0)).await;
    let proxy = TestProxy::start(&oauth_toml(
        &url,
        "service_account",
        &format!("audience = \"{FIVE_MINUTE_AUDIENCE}\"\ntoken_timeout = \"1s\""),
    ))
    .await;
    proxy.wait_ready().await;
    mock.fail_token_requests(FailMode::ServerError, 2);
    mock.fail_token_requests(FailMode::Timeout, 100);

    let start = Instant::now();
    let mut ok_while_degraded = 0;
    let mut first_503 = None;
    // Phase 1: until the first 503, every request succeeds.
    while start.elapsed() < Duration::from_secs(8) {
        let resp = proxy.get("/raas/v2/catalogs").await;
        if resp.status() == 503 {
            first_503 = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 200);
        if proxy.status().await["profiles"]["default"]["token"]["degraded"] == true {
            ok_while_degraded += 1;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        ok_while_degraded > 0,
        "no request was served while the endpoint was failing"
    );
    let first_503 = first_503.expect("the token never became unusable");
    assert!(first_503.headers().contains_key("retry-after"));
    assert_proxy_error(first_503, 503, "token_unavailable").await;

    // Phase 2: 503 within a second each, even while a retry is hanging on a timeout.
    while start.elapsed() < Duration::from_secs(9) {
        let t = Instant::now();
        let resp = proxy.get("/raas/v2/catalogs").await;
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-tango-proxy-error"], "token_unavailable");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = proxy.status().await;
    let token = &status["profiles"]["default"]["token"];
    assert_eq!(token["degraded"], true, "{status}");
    assert!(
        token["consecutive_failures"].as_u64().unwrap() >= 2,
        "{status}"
    );
    assert!(
        token["last_error"]
            .as_str()
            .unwrap()
            .contains("token endpoint"),
        "{status}"
    );
    assert_eq!(status["profiles"]["default"]["ready"], false);
    let readyz = client()
        .get(format!("{}/readyz", proxy.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);

    // 1 good mint, then retries spaced by backoff (about 4.5 s, 5.5 s, 7.5 s): not a storm.
    let calls = mock.stats().total_token_requests();
    assert!((3..=5).contains(&calls), "{calls} token requests");
}

#[tokio::test]
async fn rate_limit_answer_backs_off_without_a_retry_storm() {
    // Client credentials: one mint per (scaled) 20 h; 6 s tokens.
    let (mock, url) = start_mock(mock_config(6.0 / 300.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        oauth_toml(
            &url,
            "client_credentials",
            &format!("audience = \"{FIVE_MINUTE_AUDIENCE}\""),
        ),
    )
    .unwrap();
    let proc = ProxyProcess::start(&cfg, &[("RUST_LOG", "info")]);
    let c = client();
    let start = Instant::now();
    let mut saw_503 = false;
    while start.elapsed() < Duration::from_secs(8) {
        let resp = c
            .get(format!("{}/raas/v2/catalogs", proc.url()))
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => assert!(!saw_503, "a 200 after the token became unusable"),
            503 => saw_503 = true,
            other => panic!("unexpected {other}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_503, "the token never became unusable");
    let status = get_json(&format!("http://{}/status", proc.admin_addr)).await;
    let token = &status["profiles"]["default"]["token"];
    assert!(
        token["last_error"].as_str().unwrap().contains("rate limit"),
        "{status}"
    );
    assert!(
        token["retry_in_seconds"].as_u64().unwrap() >= 30,
        "{status}"
    );
    // One mint, one refused renewal, nothing more.
    let stats = mock.stats();
    assert_eq!(stats.token_requests["client_credentials"], 2, "{stats:?}");
    let (_, logs) = proc.terminate();
    assert!(
        logs.lines()
            .any(|l| l.contains("\"ERROR\"") && l.contains("daily rate limit")),
        "{logs}"
    );
}

#[tokio::test]
async fn a_revoked_token_is_replaced_once_and_the_request_replayed() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let proxy = TestProxy::start(&oauth_toml(&url, "service_account", "")).await;
    assert_eq!(proxy.get("/raas/v2/catalogs").await.status(), 200);
    mock.revoke_all();
    let resp = post_order(&proxy.url, "replay1").await;
    assert_eq!(resp.status(), 201);
    let stats = mock.stats();
    assert_eq!(stats.total_token_requests(), 2, "{stats:?}");
    assert_eq!(stats.credentials["bearer-invalid"], 1, "{stats:?}");
    assert_eq!(stats.orders, 1);
    // Later requests use the new token directly.
    assert_eq!(proxy.get("/raas/v2/catalogs").await.status(), 200);
    assert_eq!(mock.stats().total_token_requests(), 2);
    let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
    assert!(
        metrics.contains(r#"tango_proxy_upstream_401_total{profile="default"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_revoked_token_that_cannot_be_replaced_answers_token_unavailable_not_the_401() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let proxy = TestProxy::start(&oauth_toml(&url, "service_account", "")).await;
    assert_eq!(proxy.get("/raas/v2/catalogs").await.status(), 200);
    // Tango revokes the token and its token endpoint fails: no token can be had. The app gets
    // what any request without a usable token gets, not a 401 it would read as bad credentials.
    mock.revoke_all();
    mock.fail_token_requests(FailMode::ServerError, 1000);
    let resp = post_order(&proxy.url, "unreplaced1").await;
    assert!(resp.headers().contains_key("retry-after"));
    let body = assert_proxy_error(resp, 503, "token_unavailable").await;
    assert!(
        body["message"].as_str().unwrap().contains("token endpoint"),
        "{body}"
    );
    let stats = mock.stats();
    assert_eq!(
        stats.credentials["bearer-invalid"], 1,
        "not replayed: {stats:?}"
    );
    assert_eq!(stats.orders, 0);
    assert_eq!(stats.total_token_requests(), 2, "{stats:?}");
}

#[tokio::test]
async fn a_permanent_401_goes_back_to_the_app_after_exactly_one_replay() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let proxy = TestProxy::start(&oauth_toml(&url, "service_account", "")).await;
    proxy.wait_ready().await;
    mock.reject_all_bearer(true);
    let resp = proxy.get("/raas/v2/catalogs").await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("x-tango-proxy-error").is_none());
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    let stats = mock.stats();
    assert_eq!(
        stats.credentials["bearer-invalid"], 2,
        "one replay: {stats:?}"
    );
    assert_eq!(stats.total_token_requests(), 2);

    // Tango still refuses fresh tokens: the next 401 is passed on without another mint.
    let resp = proxy.get("/raas/v2/catalogs").await;
    assert_eq!(resp.status(), 401);
    let stats = mock.stats();
    assert_eq!(stats.credentials["bearer-invalid"], 3, "{stats:?}");
    assert_eq!(stats.total_token_requests(), 2);
}

#[tokio::test]
async fn large_bodies_are_streamed_and_not_replayed_after_a_401() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let proxy = TestProxy::start(&oauth_toml(&url, "service_account", "")).await;
    proxy.wait_ready().await;
    mock.revoke_all();
    let big = serde_json::json!({ "pad": "x".repeat(100 << 10) });
    let resp = client()
        .post(format!("{}/raas/v2/customers", proxy.url))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "a large body was replayed");
    assert_eq!(mock.stats().credentials["bearer-invalid"], 1);
    // The rejected token was still replaced for the next request.
    assert_eq!(proxy.get("/raas/v2/catalogs").await.status(), 200);
    assert_eq!(mock.stats().total_token_requests(), 2);
}
