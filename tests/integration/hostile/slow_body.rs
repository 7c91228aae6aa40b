//! A body trickled slower than `listen.body_idle_timeout`, on every kind of profile: the app
//! gets 408 `request_timeout`, Tango never gets a complete request, and the proxy serves on.

use super::*;
use crate::support::raw::exchange;

/// A second, so the stalls below cost about that each (they run side by side).
const IDLE: &str = "body_idle_timeout = \"1s\"";

/// A request stalled mid-body with a declared length, and one stalled between chunks.
fn stalled_requests() -> [String; 2] {
    let head = format!("POST /raas/v2/orders HTTP/1.1\r\nHost: app\r\nAuthorization: {CALLER_AUTH}\r\nContent-Type: application/json\r\n");
    [
        format!("{head}Content-Length: 100\r\n\r\n{{\"amount\":"),
        format!("{head}Transfer-Encoding: chunked\r\n\r\n5\r\n{{\"a\":\r\n"),
    ]
}

/// Stalls both requests against `proxy`; `scheme` is the credential Tango must have seen on
/// whatever part of them reached it.
async fn stall(proxy: &TestProxy, upstream: &FakeUpstream, scheme: &str) {
    proxy.wait_ready().await;
    for request in stalled_requests() {
        let before = upstream.requests().len();
        let ex = exchange(proxy.addr(), request.as_bytes()).await;
        check(
            &format!("{scheme}: {request}"),
            &Expect::Cut(408, "request_timeout"),
            &ex,
            upstream,
            before,
        );
        // The cut-off request reached Tango with the profile's credential, not the app's.
        eventually("Tango to see the cut-off request", || async {
            upstream.requests().len() > before
        })
        .await;
        for seen in &upstream.requests()[before..] {
            assert!(!seen.complete, "{seen:?}");
            assert_sanitised(seen, scheme);
        }
    }
    assert_still_serves(&proxy.url, "/raas/v2/catalogs", 200).await;
}

#[tokio::test]
async fn a_stalled_body_is_408_on_basic_bearer_and_dpop_profiles() {
    let (_mock, mock_url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = crate::dpop::keygen(dir.path(), "ES256");
    let upstreams = [
        FakeUpstream::start().await,
        FakeUpstream::start().await,
        FakeUpstream::start().await,
    ];
    let listen = |toml: String| toml.replace("[listen]\n", &format!("[listen]\n{IDLE}\n"));
    let basic = TestProxy::start(&config_toml(&upstreams[0].url(), IDLE, "")).await;
    let bearer = TestProxy::start(&listen(oauth_toml_via(
        &mock_url,
        &upstreams[1].url(),
        "service_account",
        "",
    )))
    .await;
    let dpop = TestProxy::start(&listen(crate::dpop::dpop_toml(
        &mock_url,
        &upstreams[2].url(),
        &key,
    )))
    .await;
    tokio::join!(
        stall(&basic, &upstreams[0], "Basic "),
        stall(&bearer, &upstreams[1], "Bearer "),
        stall(&dpop, &upstreams[2], "DPoP "),
    );
    // The DPoP profile sent a proof with each request.
    assert!(upstreams[2]
        .requests()
        .iter()
        .all(|s| s.headers.contains_key("dpop")));
}
