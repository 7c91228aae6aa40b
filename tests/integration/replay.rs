//! 401 replay is decided by the request body itself, whatever its framing: a body read whole within
//! `upstream.replay_max_body` is sent again once with a new token; a larger one is not.

use futures_util::stream;

use tango_auth_proxy::mock::MockTango;

use crate::support::*;

/// `json` as a chunked body (no Content-Length) in `pieces` chunks.
fn chunked(json: &serde_json::Value, pieces: usize) -> reqwest::Body {
    let bytes = serde_json::to_vec(json).unwrap();
    let size = bytes.len().div_ceil(pieces);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(size).map(|c| Ok(c.to_vec())).collect();
    reqwest::Body::wrap_stream(stream::iter(chunks))
}

async fn revoked(mock: &MockTango, proxy: &TestProxy) {
    assert_eq!(proxy.get("/raas/v2/catalogs").await.status(), 200);
    mock.revoke_all();
}

#[tokio::test]
async fn a_small_chunked_post_is_replayed_once_with_a_new_token() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let proxy = TestProxy::start(&oauth_toml(&url, "service_account", "")).await;
    revoked(&mock, &proxy).await;
    let customer = serde_json::json!({
        "customerIdentifier": "chunked-replay",
        "displayName": "Chunked replay",
    });
    let resp = client()
        .post(format!("{}/raas/v2/customers", proxy.url))
        .header("content-type", "application/json")
        .body(chunked(&customer, 3))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let created: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(created["customerIdentifier"], "chunked-replay");
    let stats = mock.stats();
    assert_eq!(stats.credentials["bearer-invalid"], 1, "{stats:?}");
    assert_eq!(stats.total_token_requests(), 2, "{stats:?}");
}

#[tokio::test]
async fn a_chunked_post_over_replay_max_body_gets_the_401_and_is_not_replayed() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let proxy = TestProxy::start(&oauth_toml(&url, "service_account", "")).await;
    revoked(&mock, &proxy).await;
    let customer = serde_json::json!({
        "customerIdentifier": "chunked-large",
        "displayName": "Chunked large",
        "pad": "x".repeat(100 << 10),
    });
    let resp = client()
        .post(format!("{}/raas/v2/customers", proxy.url))
        .header("content-type", "application/json")
        .body(chunked(&customer, 8))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        401,
        "a body over replay_max_body was replayed"
    );
    assert!(resp.headers().get("x-tango-proxy-error").is_none());
    let stats = mock.stats();
    assert_eq!(stats.credentials["bearer-invalid"], 1, "{stats:?}");
    // The rejected token was still replaced for the next request.
    assert_eq!(proxy.get("/raas/v2/catalogs").await.status(), 200);
    assert_eq!(mock.stats().total_token_requests(), 2);
}
