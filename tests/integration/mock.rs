//! The mock Tango behind the proxy, as the demo runs it.

use tango_auth_proxy::mock::{
    MockAccount, MockConfig, MockTango, OrderFailure, SeenRequest, SEED_ACCOUNT, SEED_CUSTOMER,
    STORES_CLIENT_ID,
};
use tango_auth_proxy::secret::Secret;

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

// ---- Principals, ownership and what gateway tests observe at the mock ----

/// Requests to the mock as one Tango identity.
struct Caller {
    url: String,
    auth: Auth,
}

enum Auth {
    Bearer(String),
    Basic(String, String),
    None,
}

impl Caller {
    /// Service account `store-{i}` of [`MockConfig::with_stores`], with a fresh token.
    async fn store(url: &str, i: usize) -> Caller {
        let resp = client()
            .post(format!("{url}/oauth/token"))
            .form(&[
                ("grant_type", "password"),
                ("client_id", STORES_CLIENT_ID),
                ("client_secret", "franchise-secret"),
                ("username", &format!("store-{i}")),
                ("password", &format!("store-{i}-password")),
                ("scope", "raas.all"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let token: serde_json::Value = resp.json().await.unwrap();
        Caller {
            url: url.to_string(),
            auth: Auth::Bearer(token["access_token"].as_str().unwrap().to_string()),
        }
    }

    fn basic(url: &str, name: &str, key: &str) -> Caller {
        Caller {
            url: url.to_string(),
            auth: Auth::Basic(name.into(), key.into()),
        }
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Auth::Bearer(t) => req.bearer_auth(t),
            Auth::Basic(n, k) => req.basic_auth(n, Some(k)),
            Auth::None => req,
        }
    }

    async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self
            .authorize(client().get(format!("{}{path}", self.url)))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self.send_post(path, body).await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    async fn send_post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> reqwest::Result<reqwest::Response> {
        self.authorize(client().post(format!("{}{path}", self.url)))
            .json(&body)
            .send()
            .await
    }

    async fn balance(&self, account: &str) -> f64 {
        let (status, body) = self.get(&format!("/raas/v2/accounts/{account}")).await;
        assert_eq!(status, 200, "{body}");
        body["currentBalance"].as_f64().unwrap()
    }
}

fn order_body(account: &str, amount: f64, utid: &str, external: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "accountIdentifier": account,
        "amount": amount,
        "utid": utid,
        "externalRefID": external,
        "recipient": null,
        "sendEmail": false
    })
}

fn ids(list: &serde_json::Value, field: &str) -> Vec<String> {
    let mut ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v[field].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn assert_account_not_found(status: u16, body: &serde_json::Value) {
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["i18nKey"], "404.002", "{body}");
    assert_eq!(body["message"], "Account not found", "{body}");
}

#[tokio::test]
async fn a_store_sees_only_its_own_and_the_ownerless_customers_accounts_and_orders() {
    let (mock, url) = start_mock(MockConfig::with_stores(2)).await;
    let one = Caller::store(&url, 1).await;
    let two = Caller::store(&url, 2).await;

    let (status, accounts) = one.get("/raas/v2/accounts").await;
    assert_eq!(status, 200);
    assert_eq!(
        ids(&accounts, "accountIdentifier"),
        ["A-STORE-1", SEED_ACCOUNT]
    );
    let (_, customers) = one.get("/raas/v2/customers").await;
    assert_eq!(
        ids(&customers, "customerIdentifier"),
        ["C-STORE-1", SEED_CUSTOMER]
    );
    let (status, c) = one.get("/raas/v2/customers/C-STORE-1/accounts").await;
    assert_eq!(
        (status, ids(&c, "accountIdentifier")),
        (200, vec!["A-STORE-1".to_string()])
    );
    let (_, a) = one.get("/raas/v2/accounts/A-STORE-1").await;
    assert_eq!(
        (
            &a["currentBalance"],
            &a["currencyCode"],
            &a["customerIdentifier"]
        ),
        (
            &serde_json::json!(100000.0),
            &serde_json::json!("USD"),
            &serde_json::json!("C-STORE-1")
        )
    );

    // Store 2's records do not exist for store 1.
    let (status, body) = one.get("/raas/v2/accounts/A-STORE-2").await;
    assert_account_not_found(status, &body);
    for path in [
        "/raas/v2/customers/C-STORE-2",
        "/raas/v2/customers/C-STORE-2/accounts",
    ] {
        let (status, body) = one.get(path).await;
        assert_eq!(
            (status, &body["message"]),
            (404, &serde_json::json!("Customer not found"))
        );
    }

    let (status, order) = two
        .post(
            "/raas/v2/orders",
            order_body("A-STORE-2", 20.0, "U000001", Some("two1")),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(order["accountIdentifier"], "A-STORE-2");
    assert_eq!(order["customerIdentifier"], "C-STORE-2");
    let id = order["referenceOrderID"].as_str().unwrap();
    let (status, _) = two.get(&format!("/raas/v2/orders/{id}")).await;
    assert_eq!(status, 200);
    let (status, body) = one.get(&format!("/raas/v2/orders/{id}")).await;
    assert_eq!(
        (status, &body["i18nKey"]),
        (404, &serde_json::json!("404.003"))
    );
    let (_, items) = two.get("/raas/v2/lineItems").await;
    let line_item = items["lineItems"][0]["referenceLineItemID"]
        .as_str()
        .unwrap();
    let (status, _) = one.get(&format!("/raas/v2/lineItems/{line_item}")).await;
    assert_eq!(status, 404);
    let (status, list) = one.get("/raas/v2/orders").await;
    assert_eq!(
        (status, &list["page"]["totalCount"]),
        (200, &serde_json::json!(0))
    );
    let (status, body) = one.get("/raas/v2/orders?accountIdentifier=A-STORE-2").await;
    assert_account_not_found(status, &body);
    let (status, body) = one
        .get("/raas/v2/lineItems?accountIdentifier=A-STORE-2")
        .await;
    assert_account_not_found(status, &body);

    // Nor can store 1 spend store 2's money, even naming store 2's customer.
    let mut spend = order_body("A-STORE-2", 5.0, "U000001", Some("steal1"));
    spend["customerIdentifier"] = "C-STORE-2".into();
    let (status, body) = one.post("/raas/v2/orders", spend.clone()).await;
    assert_account_not_found(status, &body);
    let (status, body) = one.post("/raas/v2/asyncOrders", spend).await;
    assert_account_not_found(status, &body);
    assert_eq!(two.balance("A-STORE-2").await, 99980.0);
    // Naming its own account under another store's customer is refused too.
    let mut mixed = order_body("A-STORE-1", 5.0, "U000001", None);
    mixed["customerIdentifier"] = "C-STORE-2".into();
    let (status, body) = one.post("/raas/v2/orders", mixed).await;
    assert_account_not_found(status, &body);
    assert_eq!(one.balance("A-STORE-1").await, 100000.0);
    assert_eq!(mock.stats().orders, 1);
}

#[tokio::test]
async fn one_principal_owning_two_accounts_lists_the_orders_and_line_items_of_both() {
    let shared = ("shared-platform", "shared-key");
    let account = |owner: &str, customer: &str, account: &str| MockAccount {
        owner: owner.into(),
        customer: customer.into(),
        account: account.into(),
        balance_cents: 50_000,
        currency: "USD".into(),
    };
    let config = MockConfig {
        platforms: vec![
            (shared.0.into(), Secret::new(shared.1)),
            ("other-platform".into(), Secret::new("other-key")),
        ],
        accounts: vec![
            account(shared.0, "C-SHARED", "A-SHARED-1"),
            account(shared.0, "C-SHARED", "A-SHARED-2"),
            account("other-platform", "C-OTHER", "A-OTHER"),
        ],
        ..mock_config(1.0)
    };
    let (mock, url) = start_mock(config).await;
    let caller = Caller::basic(&url, shared.0, shared.1);
    let other = Caller::basic(&url, "other-platform", "other-key");

    let mut placed = Vec::new();
    for (account, ext) in [
        ("A-SHARED-1", "s1"),
        ("A-SHARED-2", "s2"),
        ("A-SHARED-1", "s3"),
    ] {
        let (status, order) = caller
            .post(
                "/raas/v2/orders",
                order_body(account, 1.0, "U561593", Some(ext)),
            )
            .await;
        assert_eq!(status, 201, "{order}");
        placed.push(order);
    }
    let (status, order) = other
        .post(
            "/raas/v2/orders",
            order_body("A-OTHER", 1.0, "U561593", Some("o1")),
        )
        .await;
    assert_eq!(status, 201, "{order}");

    // Without filters: every order of every account the principal sees, oldest first.
    let (status, list) = caller.get("/raas/v2/orders").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list["page"],
        serde_json::json!({"number": 0, "elementsPerPage": 10, "resultCount": 3, "totalCount": 3})
    );
    let listed: Vec<_> = list["orders"].as_array().unwrap().clone();
    assert_eq!(listed, placed);
    // Each order names its account and carries its reward credentials.
    for o in &listed {
        assert!(o["accountIdentifier"]
            .as_str()
            .unwrap()
            .starts_with("A-SHARED-"));
        assert_eq!(o["customerIdentifier"], "C-SHARED");
        assert!(o["reward"]["credentials"]["Claim Code"].is_string(), "{o}");
    }

    let (_, one) = caller
        .get("/raas/v2/orders?accountIdentifier=A-SHARED-2")
        .await;
    assert_eq!(one["orders"].as_array().unwrap(), &[placed[1].clone()]);
    let (_, by_ref) = caller.get("/raas/v2/orders?externalRefID=s3").await;
    assert_eq!(by_ref["orders"].as_array().unwrap(), &[placed[2].clone()]);
    let (_, by_customer) = caller
        .get("/raas/v2/orders?customerIdentifier=C-SHARED")
        .await;
    assert_eq!(by_customer["page"]["totalCount"], 3);
    let (_, page) = caller.get("/raas/v2/orders?elementsPerPage=2&page=1").await;
    assert_eq!(
        (
            &page["page"]["resultCount"],
            &page["page"]["totalCount"],
            &page["orders"][0]
        ),
        (&serde_json::json!(1), &serde_json::json!(3), &placed[2])
    );

    let (_, items) = caller.get("/raas/v2/lineItems").await;
    let items = items["lineItems"].as_array().unwrap().clone();
    assert_eq!(items.len(), 3);
    for (item, order) in items.iter().zip(&placed) {
        assert_eq!(item["referenceOrderID"], order["referenceOrderID"]);
        assert_eq!(item["accountIdentifier"], order["accountIdentifier"]);
        assert_eq!(item["customerIdentifier"], "C-SHARED");
        assert_eq!(
            item["reward"]["credentials"],
            order["reward"]["credentials"]
        );
        let id = item["referenceLineItemID"].as_str().unwrap();
        let (status, fetched) = caller.get(&format!("/raas/v2/lineItems/{id}")).await;
        assert_eq!((status, &fetched), (200, item));
    }

    // The other platform sees only its own order.
    let (_, list) = other.get("/raas/v2/orders").await;
    assert_eq!(list["page"]["totalCount"], 1);
    assert_eq!(list["orders"][0]["accountIdentifier"], "A-OTHER");

    let stats = mock.stats();
    assert_eq!(stats.by_principal[shared.0], 12, "{stats:?}");
    assert_eq!(stats.by_principal["other-platform"], 2, "{stats:?}");
    assert_eq!(stats.credentials[&format!("basic:{}", shared.0)], 12);
}

#[tokio::test]
async fn list_queries_with_a_repeated_filter_or_a_bad_page_size_are_refused() {
    let (_mock, url) = start_mock(mock_config(1.0)).await;
    let caller = Caller::basic(&url, PLATFORM, API_KEY);
    for (query, field) in [
        (
            "accountIdentifier=A00000001&accountIdentifier=A-X",
            "accountIdentifier",
        ),
        ("elementsPerPage=0", "elementsPerPage"),
        ("elementsPerPage=101", "elementsPerPage"),
        ("page=-1", "page"),
    ] {
        for list in ["orders", "lineItems"] {
            let (status, body) = caller.get(&format!("/raas/v2/{list}?{query}")).await;
            assert_eq!(status, 400, "{query}: {body}");
            assert_eq!(body["errors"][0]["path"], field, "{query}: {body}");
        }
    }
}

#[tokio::test]
async fn external_ref_ids_are_idempotent_per_account() {
    let (mock, url) = start_mock(MockConfig {
        accounts: vec![MockAccount {
            owner: PLATFORM.into(),
            customer: SEED_CUSTOMER.into(),
            account: "A-SECOND".into(),
            balance_cents: 10_000,
            currency: "USD".into(),
        }],
        ..mock_config(1.0)
    })
    .await;
    let caller = Caller::basic(&url, PLATFORM, API_KEY);
    let (first_status, first) = caller
        .post(
            "/raas/v2/orders",
            order_body(SEED_ACCOUNT, 10.0, "U000001", Some("same1")),
        )
        .await;
    let (repeat_status, repeat) = caller
        .post(
            "/raas/v2/orders",
            order_body(SEED_ACCOUNT, 10.0, "U000001", Some("same1")),
        )
        .await;
    let (other_status, other) = caller
        .post(
            "/raas/v2/orders",
            order_body("A-SECOND", 10.0, "U000001", Some("same1")),
        )
        .await;
    assert_eq!((first_status, repeat_status, other_status), (201, 200, 201));
    assert_eq!(first, repeat);
    assert_ne!(first["referenceOrderID"], other["referenceOrderID"]);
    assert_eq!(other["accountIdentifier"], "A-SECOND");
    // The repeat charged nothing; each account paid once.
    assert_eq!(caller.balance(SEED_ACCOUNT).await, 990.0);
    assert_eq!(caller.balance("A-SECOND").await, 90.0);
    let (_, list) = caller.get("/raas/v2/orders?externalRefID=same1").await;
    assert_eq!(list["page"]["totalCount"], 2);
    assert_eq!(mock.stats().orders, 2);
}

#[tokio::test]
async fn async_orders_answer_202_pending_and_the_order_can_be_looked_up() {
    let (mock, url) = start_mock(MockConfig::with_stores(1)).await;
    let store = Caller::store(&url, 1).await;
    let (status, pending) = store
        .post(
            "/raas/v2/asyncOrders",
            order_body("A-STORE-1", 15.0, "U000001", Some("async1")),
        )
        .await;
    assert_eq!(status, 202, "{pending}");
    assert_eq!(pending["status"], "PENDING");
    assert_eq!(pending["accountIdentifier"], "A-STORE-1");
    let id = pending["referenceOrderID"].as_str().unwrap();
    let (status, order) = store.get(&format!("/raas/v2/orders/{id}")).await;
    assert_eq!(status, 200, "{order}");
    assert_eq!(order["accountIdentifier"], "A-STORE-1");
    assert!(order["reward"]["credentials"].is_object(), "{order}");
    let (status, repeat) = store
        .post(
            "/raas/v2/asyncOrders",
            order_body("A-STORE-1", 15.0, "U000001", Some("async1")),
        )
        .await;
    assert_eq!(
        (status, &repeat["referenceOrderID"]),
        (200, &pending["referenceOrderID"])
    );
    assert_eq!(store.balance("A-STORE-1").await, 99985.0);
    assert_eq!(mock.stats().orders, 1);
}

#[tokio::test]
async fn orders_are_charged_in_the_account_currency_and_denominated_in_the_reward_currency() {
    let (_mock, url) = start_mock(MockConfig {
        accounts: vec![MockAccount {
            owner: PLATFORM.into(),
            customer: "C-EU".into(),
            account: "A-EUR".into(),
            balance_cents: 100_000,
            currency: "EUR".into(),
        }],
        ..mock_config(1.0)
    })
    .await;
    let caller = Caller::basic(&url, PLATFORM, API_KEY);
    let (status, catalog) = caller.get("/raas/v2/catalogs").await;
    assert_eq!(status, 200);
    let items: Vec<(String, String)> = catalog["brands"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["items"].as_array().unwrap().clone())
        .map(|i| {
            (
                i["utid"].as_str().unwrap().to_string(),
                i["currencyCode"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (utid, currency) in [
        ("U000001", "USD"),
        ("U000002", "EUR"),
        ("U561593", "USD"),
        ("U157189", "USD"),
    ] {
        assert!(
            items.contains(&(utid.to_string(), currency.to_string())),
            "{utid}: {items:?}"
        );
    }

    // A EUR reward from a USD account: 10 EUR at the mock's fixed 1.10 costs 11 USD.
    let (status, order) = caller
        .post(
            "/raas/v2/orders",
            order_body(SEED_ACCOUNT, 10.0, "U000002", None),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(
        order["denomination"],
        serde_json::json!({"value": 10.0, "currencyCode": "EUR"})
    );
    assert_eq!(order["amountCharged"]["currencyCode"], "USD");
    assert_eq!(order["amountCharged"]["value"], 11.0);
    assert_eq!(order["amountCharged"]["total"], 11.0);
    assert_eq!(caller.balance(SEED_ACCOUNT).await, 989.0);

    // A USD reward from a EUR account.
    let (status, order) = caller
        .post(
            "/raas/v2/orders",
            order_body("A-EUR", 11.0, "U000001", None),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(order["denomination"]["currencyCode"], "USD");
    assert_eq!(order["amountCharged"]["currencyCode"], "EUR");
    assert_eq!(order["amountCharged"]["total"], 10.0);
    assert_eq!(caller.balance("A-EUR").await, 990.0);

    let (status, body) = caller
        .post(
            "/raas/v2/orders",
            order_body(SEED_ACCOUNT, 1.0, "U999999", None),
        )
        .await;
    assert_eq!(
        (status, &body["errors"][0]["path"]),
        (400, &serde_json::json!("utid"))
    );
    let (status, body) = caller
        .post(
            "/raas/v2/orders",
            order_body(SEED_ACCOUNT, 5000.0, "U000001", None),
        )
        .await;
    assert_eq!(
        (status, &body["i18nKey"]),
        (402, &serde_json::json!("402.001"))
    );
}

#[tokio::test]
async fn deposits_and_transfers_move_money_only_between_visible_accounts() {
    let (_mock, url) = start_mock(MockConfig::with_stores(2)).await;
    let one = Caller::store(&url, 1).await;
    let two = Caller::store(&url, 2).await;
    let deposit = |account: &str, customer: &str, amount: f64| {
        serde_json::json!({
            "customerIdentifier": customer,
            "accountIdentifier": account,
            "creditCardToken": "card-token-1",
            "amount": amount
        })
    };
    let (status, body) = one
        .post(
            "/raas/v2/creditCardDeposits",
            deposit("A-STORE-1", "C-STORE-1", 50.0),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "SUCCESS");
    assert_eq!(body["accountIdentifier"], "A-STORE-1");
    assert_eq!(body["amount"], 50.0);
    assert!(body["referenceDepositID"].is_string());
    assert_eq!(one.balance("A-STORE-1").await, 100050.0);
    let (status, body) = one
        .post(
            "/raas/v2/creditCardDeposits",
            deposit("A-STORE-2", "C-STORE-2", 50.0),
        )
        .await;
    assert_account_not_found(status, &body);

    let transfer = |source: &str, destination: &str, amount: f64| {
        serde_json::json!({
            "customerIdentifier": "C-STORE-1",
            "sourceAccountIdentifier": source,
            "destinationAccountIdentifier": destination,
            "amount": amount
        })
    };
    // Into the ownerless seed account, which store 1 can see.
    let (status, body) = one
        .post(
            "/raas/v2/transferFunds",
            transfer("A-STORE-1", SEED_ACCOUNT, 25.0),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "SUCCESS");
    assert_eq!(one.balance("A-STORE-1").await, 100025.0);
    assert_eq!(one.balance(SEED_ACCOUNT).await, 1025.0);
    // Not into, nor out of, store 2's account.
    let (status, body) = one
        .post(
            "/raas/v2/transferFunds",
            transfer("A-STORE-1", "A-STORE-2", 25.0),
        )
        .await;
    assert_account_not_found(status, &body);
    let (status, body) = one
        .post(
            "/raas/v2/transferFunds",
            transfer("A-STORE-2", "A-STORE-1", 25.0),
        )
        .await;
    assert_account_not_found(status, &body);
    let (status, body) = one
        .post(
            "/raas/v2/transferFunds",
            transfer("A-STORE-1", SEED_ACCOUNT, 1_000_000.0),
        )
        .await;
    assert_eq!(
        (status, &body["i18nKey"]),
        (402, &serde_json::json!("402.001"))
    );
    let (status, body) = one
        .post(
            "/raas/v2/transferFunds",
            transfer("A-STORE-1", SEED_ACCOUNT, -1.0),
        )
        .await;
    assert_eq!(
        (status, &body["errors"][0]["path"]),
        (400, &serde_json::json!("amount"))
    );
    assert_eq!(one.balance("A-STORE-1").await, 100025.0);
    assert_eq!(two.balance("A-STORE-2").await, 100000.0);
}

#[tokio::test]
async fn injected_order_failures_answer_as_asked_and_create_the_order_only_when_tango_would() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let caller = Caller::basic(&url, PLATFORM, API_KEY);
    let hook = |query: &str| {
        client()
            .post(format!("{url}/mock/orders/fail?{query}"))
            .send()
    };
    let orders = || async { caller.get("/raas/v2/orders").await.1["page"]["totalCount"].clone() };

    assert_eq!(hook("mode=500&count=2").await.unwrap().status(), 204);
    for ext in ["f1", "f2"] {
        let (status, body) = caller
            .post(
                "/raas/v2/orders",
                order_body(SEED_ACCOUNT, 1.0, "U000001", Some(ext)),
            )
            .await;
        assert_eq!((status, &body["httpCode"]), (500, &serde_json::json!(500)));
    }
    assert_eq!(orders().await, 0);
    // Count 2 was used up: the next order goes through.
    let (status, _) = caller
        .post(
            "/raas/v2/orders",
            order_body(SEED_ACCOUNT, 1.0, "U000001", Some("f1")),
        )
        .await;
    assert_eq!(status, 201);

    mock.fail_orders(OrderFailure::InsufficientFunds, 1);
    mock.fail_orders(OrderFailure::StillProcessing, 1);
    let (status, body) = caller
        .post(
            "/raas/v2/orders",
            order_body(SEED_ACCOUNT, 1.0, "U000001", Some("f3")),
        )
        .await;
    assert_eq!(
        (status, &body["i18nKey"]),
        (402, &serde_json::json!("402.001"))
    );
    let (status, body) = caller
        .post(
            "/raas/v2/orders",
            order_body(SEED_ACCOUNT, 1.0, "U000001", Some("f3")),
        )
        .await;
    assert_eq!(
        (status, &body["i18nKey"]),
        (409, &serde_json::json!("409.002"))
    );
    assert_eq!(orders().await, 1);

    // A refused request (another account) does not use up a failure.
    assert_eq!(hook("mode=reset").await.unwrap().status(), 204);
    let (status, _) = caller
        .post(
            "/raas/v2/orders",
            order_body("A-NOWHERE", 1.0, "U000001", None),
        )
        .await;
    assert_eq!(status, 404);
    let err = caller
        .send_post(
            "/raas/v2/orders",
            order_body(SEED_ACCOUNT, 1.0, "U000001", Some("r1")),
        )
        .await
        .unwrap_err();
    assert!(!err.is_status() && !err.is_timeout(), "{err:?}");
    assert_eq!(
        orders().await,
        2,
        "reset: the order exists though no answer came"
    );

    // timeout: the order exists at once; the answer comes after the hold (longer than the client
    // waits here).
    assert_eq!(
        hook("mode=timeout&hold_ms=60000").await.unwrap().status(),
        204
    );
    let err = caller
        .authorize(client().post(format!("{url}/raas/v2/orders")))
        .timeout(std::time::Duration::from_millis(500))
        .json(&order_body(SEED_ACCOUNT, 1.0, "U000001", Some("t1")))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(orders().await, 3);
    // A repeat finds the order the timed-out request created.
    let (status, _) = caller
        .post(
            "/raas/v2/orders",
            order_body(SEED_ACCOUNT, 1.0, "U000001", Some("t1")),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(mock.stats().orders, 3);

    let resp = hook("mode=teapot").await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("500, timeout, reset, 402 or 409"));
}

#[tokio::test]
async fn the_request_log_names_the_principal_and_what_each_request_named() {
    let (mock, url) = start_mock(MockConfig::with_stores(1)).await;
    let store = Caller::store(&url, 1).await;
    let basic = Caller::basic(&url, "demo-platform", "demo-api-key");
    let nobody = Caller {
        url: url.clone(),
        auth: Auth::None,
    };
    let order = order_body("A-STORE-1", 2.0, "U000001", Some("log1"));
    assert_eq!(store.post("/raas/v2/orders", order.clone()).await.0, 201);
    basic
        .get("/raas/v2/orders?accountIdentifier=A00000001&page=0")
        .await;
    nobody.get("/raas/v2/accounts/A-STORE-1").await;
    let big = serde_json::json!({"accountIdentifier": "A-STORE-1", "pad": "x".repeat(70 * 1024)});
    store.post("/raas/v2/orders", big).await;

    let seen = mock.requests();
    let expected = vec![
        SeenRequest {
            principal: Some("store-1".into()),
            method: "POST".into(),
            path: "/raas/v2/orders".into(),
            query: None,
            body: Some(order),
        },
        SeenRequest {
            principal: Some("demo-platform".into()),
            method: "GET".into(),
            path: "/raas/v2/orders".into(),
            query: Some("accountIdentifier=A00000001&page=0".into()),
            body: None,
        },
        SeenRequest {
            principal: None,
            method: "GET".into(),
            path: "/raas/v2/accounts/A-STORE-1".into(),
            query: None,
            body: None,
        },
        // Over 64 KiB: recorded without its body.
        SeenRequest {
            principal: Some("store-1".into()),
            method: "POST".into(),
            path: "/raas/v2/orders".into(),
            query: None,
            body: None,
        },
    ];
    assert_eq!(seen, expected);
    let over_http: Vec<SeenRequest> = client()
        .get(format!("{url}/mock/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(over_http, expected);

    let stats = mock.stats();
    assert_eq!(stats.by_principal["store-1"], 2, "{stats:?}");
    assert_eq!(stats.by_principal["demo-platform"], 1, "{stats:?}");
    assert_eq!(
        stats.credentials[&format!("bearer:{STORES_CLIENT_ID}")],
        2,
        "{stats:?}"
    );
    assert_eq!(stats.requests, 4);

    let resp = client()
        .delete(format!("{url}/mock/requests"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert!(mock.requests().is_empty());
}

#[tokio::test]
async fn a_client_credentials_token_speaks_for_its_client() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let resp = client()
        .post(format!("{url}/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap();
    let token: serde_json::Value = resp.json().await.unwrap();
    let caller = Caller {
        url: url.clone(),
        auth: Auth::Bearer(token["access_token"].as_str().unwrap().into()),
    };
    assert_eq!(caller.get("/raas/v2/accounts").await.0, 200);
    let password: serde_json::Value = token_request(&url).await.json().await.unwrap();
    let user = Caller {
        url: url.clone(),
        auth: Auth::Bearer(password["access_token"].as_str().unwrap().into()),
    };
    assert_eq!(user.get("/raas/v2/accounts").await.0, 200);
    let principals: Vec<_> = mock.requests().into_iter().map(|r| r.principal).collect();
    assert_eq!(
        principals,
        [Some(CLIENT_ID.to_string()), Some(USERNAME.to_string())]
    );
}

#[tokio::test]
async fn fifty_stores_ordering_at_once_each_reach_only_their_own_account() {
    const STORES: usize = 50;
    let (mock, url) = start_mock(MockConfig::with_stores(STORES)).await;
    let mut tasks = Vec::new();
    for i in 1..=STORES {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let store = Caller::store(&url, i).await;
            let account = format!("A-STORE-{i}");
            let (status, order) = store
                .post(
                    "/raas/v2/orders",
                    order_body(&account, i as f64, "U000001", Some(&format!("pos{i}"))),
                )
                .await;
            assert_eq!(status, 201, "{order}");
            let other = format!("A-STORE-{}", i % STORES + 1);
            let (status, body) = store
                .post("/raas/v2/orders", order_body(&other, 1.0, "U000001", None))
                .await;
            assert_account_not_found(status, &body);
            let (_, list) = store.get("/raas/v2/orders").await;
            assert_eq!(list["page"]["totalCount"], 1, "{list}");
            assert_eq!(list["orders"][0]["accountIdentifier"], account.as_str());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = mock.requests();
    assert_eq!(seen.len(), 3 * STORES);
    // The log tells who asked for what: each store's two orders named its own account and its
    // neighbour's.
    for i in 1..=STORES {
        let who = format!("store-{i}");
        let named: Vec<_> = seen
            .iter()
            .filter(|r| r.principal.as_deref() == Some(who.as_str()) && r.method == "POST")
            .map(|r| r.body.as_ref().unwrap()["accountIdentifier"].clone())
            .collect();
        let own = format!("A-STORE-{i}");
        let neighbour = format!("A-STORE-{}", i % STORES + 1);
        assert_eq!(named, [own.as_str(), neighbour.as_str()], "{who}");
    }
    let stats = mock.stats();
    assert_eq!(stats.orders, STORES as u64);
    assert_eq!(stats.by_principal.len(), STORES);
    assert!(stats.by_principal.values().all(|n| *n == 3), "{stats:?}");
}
