//! The mock Tango behind the proxy, as the demo runs it.

use tango_auth_proxy::mock::{MockConfig, MockTango, SEED_ACCOUNT};

use crate::support::*;

async fn mock_and_proxy() -> (MockTango, String, TestProxy) {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let proxy = TestProxy::start(&config_toml(&url, "", "")).await;
    (mock, url, proxy)
}

#[tokio::test]
async fn orders_are_idempotent_by_external_ref_id() {
    let (mock, _, proxy) = mock_and_proxy().await;
    let order = serde_json::json!({
        "accountIdentifier": SEED_ACCOUNT,
        "customerIdentifier": "demo-customer",
        "amount": 10,
        "utid": "U561593",
        "externalRefID": "order42",
        "recipient": null,
        "sendEmail": false
    });
    let c = client();
    let first = c
        .post(format!("{}/raas/v2/orders", proxy.url))
        .json(&order)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let first: serde_json::Value = first.json().await.unwrap();
    let repeat = c
        .post(format!("{}/raas/v2/orders", proxy.url))
        .json(&order)
        .send()
        .await
        .unwrap();
    assert_eq!(repeat.status(), 200);
    let repeat: serde_json::Value = repeat.json().await.unwrap();
    assert_eq!(first["referenceOrderID"], repeat["referenceOrderID"]);

    let id = first["referenceOrderID"].as_str().unwrap();
    let fetched = c
        .get(format!("{}/raas/v2/orders/{id}", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200);

    let account = get_json(&format!("{}/raas/v2/accounts/{SEED_ACCOUNT}", proxy.url)).await;
    assert_eq!(account["currentBalance"], 990.0);

    let stats = mock.stats();
    assert_eq!(stats.orders, 1);
    assert_eq!(stats.requests, 4);
    assert_eq!(stats.credentials[&format!("basic:{PLATFORM}")], 4);
}

#[tokio::test]
async fn the_mock_rejects_wrong_or_missing_credentials_in_tangos_shape() {
    let (mock, url, _proxy) = mock_and_proxy().await;
    let c = client();
    let resp = c
        .get(format!("{url}/raas/v2/catalogs"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["httpCode"], 401);
    assert_eq!(body["path"], "/raas/v2/catalogs");
    let resp = c
        .get(format!("{url}/raas/v2/catalogs"))
        .basic_auth(PLATFORM, Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let stats = mock.stats();
    assert_eq!(stats.credentials["none"], 1);
    assert_eq!(stats.credentials["basic-invalid"], 1);
}

#[tokio::test]
async fn customers_and_validation_errors() {
    let (_mock, _, proxy) = mock_and_proxy().await;
    let c = client();
    let created = c
        .post(format!("{}/raas/v2/customers", proxy.url))
        .json(&serde_json::json!({"customerIdentifier": "store17", "displayName": "Store 17"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let list = get_json(&format!("{}/raas/v2/customers", proxy.url)).await;
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["customerIdentifier"] == "store17"));
    let form = c
        .post(format!("{}/raas/v2/orders", proxy.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("amount=1")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 415);
    let missing = c
        .post(format!("{}/raas/v2/orders", proxy.url))
        .json(&serde_json::json!({"accountIdentifier": SEED_ACCOUNT, "amount": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 400);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["errors"][0]["path"], "utid");
}

/// One service-account token request straight to the mock's token endpoint.
async fn token_request(url: &str) -> reqwest::Response {
    client()
        .post(format!("{url}/oauth/token"))
        .form(&[
            ("grant_type", "password"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("username", USERNAME),
            ("password", PASSWORD),
            ("scope", "raas.all"),
        ])
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_token_failure_rate_of_one_fails_every_token_request_in_oauth_shape() {
    let (mock, url) = start_mock(MockConfig {
        token_failure_rate: 1.0,
        ..mock_config(1.0)
    })
    .await;
    for _ in 0..3 {
        let resp = token_request(&url).await;
        assert_eq!(resp.status(), 503);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "temporarily_unavailable", "{body}");
    }
    let stats = mock.stats();
    assert_eq!(
        (stats.token_failures, stats.tokens_issued),
        (3, 0),
        "{stats:?}"
    );

    // The proxy cannot get a token: it says so itself, naming the endpoint's answer.
    let proxy = TestProxy::start(&oauth_toml(&url, "service_account", "")).await;
    let resp = proxy.get("/raas/v2/catalogs").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-tango-proxy-error"], "token_unavailable");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("token endpoint failed with 503"),
        "{body}"
    );
    assert_eq!(mock.stats().tokens_issued, 0);
}

#[tokio::test]
async fn a_token_failure_rate_of_one_half_fails_some_requests_and_serves_the_rest() {
    let (mock, url) = start_mock(MockConfig {
        token_failure_rate: 0.5,
        ..mock_config(1.0)
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..64 {
        statuses.push(token_request(&url).await.status().as_u16());
    }
    // Both outcomes appear (each is missing with probability 2^-64).
    assert!(
        statuses.contains(&503) && statuses.contains(&200),
        "{statuses:?}"
    );
    let failed = statuses.iter().filter(|s| **s == 503).count() as u64;
    let stats = mock.stats();
    assert_eq!(stats.token_failures, failed, "{stats:?}");
    assert_eq!(stats.tokens_issued, 64 - failed, "{stats:?}");
}

#[tokio::test]
async fn revocations_are_counted_and_refuse_the_token_with_invalid_token() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let token: serde_json::Value = token_request(&url).await.json().await.unwrap();
    let token = token["access_token"].as_str().unwrap().to_string();
    let catalogs = || {
        client()
            .get(format!("{url}/raas/v2/catalogs"))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(catalogs().await.unwrap().status(), 200);
    let resp = client()
        .post(format!("{url}/mock/revoke"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = catalogs().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("error=\"invalid_token\""));
    let stats = mock.stats();
    assert_eq!(stats.revocations, 1, "{stats:?}");
    assert_eq!(stats.token_failures, 0, "{stats:?}");
}
