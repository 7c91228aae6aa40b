//! Gateway mode: stores authenticate as callers, reach Tango only with their own profile's
//! credential, and only name (and read) their own accounts and customers.
//!
//! The guardrail tests run once per way a store reaches the gateway ([`every_way!`]): plain
//! HTTP/1.1, HTTPS over HTTP/1.1 and over HTTP/2, the store known by its key or, over HTTPS, by
//! its client certificate.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tango_auth_proxy::mock::{MockAccount, MockClient, MockConfig, MockTango, SeenRequest};
use tango_auth_proxy::secret::Secret;

use crate::support::redis_server::RedisServer;
use crate::support::transport::{basic, Front, IdentifiedBy, Store, Transport, Way};
use crate::support::*;

/// Runs `async fn NAME(way: Way)` once per way a store reaches the gateway, each run a test of
/// its own: `NAME::plain_key`, `NAME::https1_key`, `NAME::https1_cert`, `NAME::https2_key`,
/// `NAME::https2_cert`. `every_way!(NAME, by_key)` runs the three with a key, `by_cert` the two
/// with a certificate, `http2` the two over HTTP/2.
macro_rules! every_way {
    ($test:ident) => {
        every_way!($test: plain_key = PLAIN_KEY, https1_key = HTTPS1_KEY,
            https1_cert = HTTPS1_CERT, https2_key = HTTPS2_KEY, https2_cert = HTTPS2_CERT);
    };
    ($test:ident, by_key) => {
        every_way!($test: plain_key = PLAIN_KEY, https1_key = HTTPS1_KEY, https2_key = HTTPS2_KEY);
    };
    ($test:ident, by_cert) => {
        every_way!($test: https1_cert = HTTPS1_CERT, https2_cert = HTTPS2_CERT);
    };
    ($test:ident, http2) => {
        every_way!($test: https2_key = HTTPS2_KEY, https2_cert = HTTPS2_CERT);
    };
    ($test:ident: $($run:ident = $way:ident),+) => {
        mod $test {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $run() {
                    super::$test(crate::support::transport::Way::$way).await;
                }
            )+
        }
    };
}

/// The key store `i`'s point-of-sale system holds (random per run, so a leak is recognisable).
fn store_key(i: usize) -> String {
    format!("pos-key-{i}-{}", &KEY_SALT[..12])
}

const KEY_SALT: &str = "f0e1d2c3b4a5968778695a4b3c2d1e0f";

/// `[callers.pos-i]`: identified as `front` identifies stores, profile `store-i`, bound to the
/// store's account and customer.
fn store_callers(front: &Front, stores: usize, extra: &str) -> String {
    (1..=stores)
        .map(|i| {
            format!(
                r#"
[callers.pos-{i}]
{}profile = "store-{i}"
accounts = ["A-STORE-{i}"]
customers = ["C-STORE-{i}"]
{extra}
"#,
                front.identity_keys(&format!("pos-{i}"), &store_key(i))
            )
        })
        .collect()
}

/// Store `i`'s client (caller `pos-i`).
fn pos(front: &Front, i: usize) -> Store {
    front.store(&format!("pos-{i}"), &store_key(i))
}

fn gateway_toml(mock_url: &str, body: &str, extra_cache: &str) -> String {
    format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"
[upstream]
url = "{mock_url}"
allow_http = true
[cache]
{extra_cache}
{body}
"#
    )
}

fn as_store(i: usize) -> String {
    basic(&format!("pos-{i}"), &store_key(i))
}

async fn start_stores(stores: usize) -> (MockTango, String) {
    let (mock, url) = start_mock(MockConfig::with_stores(stores)).await;
    for i in 1..=stores {
        logs::watch_secret(store_key(i));
        logs::watch_secret(as_store(i)["Basic ".len()..].to_string());
        logs::watch_secret(format!("store-{i}-password"));
    }
    logs::watch_secret("franchise-secret".into());
    (mock, url)
}

/// A gateway in front of a recording fake Tango with one caller, `pos-1` (key `key`, bound to
/// account `A-1`), reached as `front` says.
async fn one_caller(
    front: &Front,
    key: &str,
) -> (crate::support::upstream::FakeUpstream, TestProxy) {
    let upstream = crate::support::upstream::FakeUpstream::start().await;
    logs::watch_secret(key.into());
    logs::watch_secret(basic("pos-1", key)["Basic ".len()..].to_string());
    let toml = front.configure(&format!(
        "{}[callers.pos-1]\n{}accounts = [\"A-1\"]\n",
        config_toml(&upstream.url(), "", ""),
        front.identity_keys("pos-1", key)
    ));
    (upstream, TestProxy::start(&toml).await)
}

/// A gateway in front of the mock with two stores (`pos-1`, `pos-2`), reached as `front` says.
async fn two_stores(front: &Front) -> (MockTango, TestProxy) {
    let (mock, mock_url) = start_stores(2).await;
    let toml = front.configure(&gateway_toml(
        &mock_url,
        &format!(
            "{}{}",
            store_profiles(&mock_url, 2),
            store_callers(front, 2, "")
        ),
        "",
    ));
    (mock, TestProxy::start(&toml).await)
}

fn order(account: &str, customer: &str, amount: f64, external: &str) -> Value {
    json!({
        "accountIdentifier": account,
        "customerIdentifier": customer,
        "amount": amount,
        "utid": "U000001",
        "externalRefID": external,
        "sendEmail": false,
        "recipient": null,
        "sender": null,
    })
}

async fn send(
    method: reqwest::Method,
    url: String,
    auth: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut req = client().request(method, url).header("authorization", auth);
    if let Some(b) = body {
        req = req.json(b);
    }
    req.send().await.unwrap()
}

/// The accounts and customers a request the mock received names, anywhere.
fn named(seen: &SeenRequest) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut parts = seen.path.split('/').peekable();
    while let Some(p) = parts.next() {
        if p.eq_ignore_ascii_case("accounts") || p.eq_ignore_ascii_case("customers") {
            if let Some(id) = parts.peek() {
                out.insert(id.to_string());
            }
        }
    }
    for pair in seen.query.as_deref().unwrap_or_default().split('&') {
        if let Some((k, v)) = pair.split_once('=') {
            if k.to_ascii_lowercase().ends_with("identifier") {
                out.insert(v.to_string());
            }
        }
    }
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let k = k.to_ascii_lowercase();
                    if k.ends_with("accountidentifier") || k.ends_with("customeridentifier") {
                        out.insert(v.as_str().map_or_else(|| v.to_string(), str::to_string));
                    }
                    walk(v, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    if let Some(b) = &seen.body {
        walk(b, &mut out);
    }
    out
}

/// Every request the mock saw from store `i`'s identity named only its own account and
/// customer, and no other identity named them.
fn assert_no_crossing(mock: &MockTango, stores: usize) {
    for seen in mock.requests() {
        let Some(principal) = &seen.principal else {
            continue;
        };
        let Some(i) = principal.strip_prefix("store-") else {
            continue;
        };
        let own: BTreeSet<String> = [format!("A-STORE-{i}"), format!("C-STORE-{i}")].into();
        let names = named(&seen);
        assert!(
            names.is_subset(&own),
            "{principal} reached Tango naming {names:?}: {seen:?}"
        );
    }
    let _ = stores;
}

every_way!(fifty_stores_each_reach_tango_only_as_themselves_and_only_for_their_accounts);
async fn fifty_stores_each_reach_tango_only_as_themselves_and_only_for_their_accounts(way: Way) {
    const STORES: usize = 50;
    let front = Front::new(way);
    let (mock, mock_url) = start_stores(STORES).await;
    let toml = front.configure(&gateway_toml(
        &mock_url,
        &format!(
            "{}{}",
            store_profiles(&mock_url, STORES),
            store_callers(&front, STORES, "require_external_ref_id = true")
        ),
        "",
    ));
    let proxy = TestProxy::start(&toml).await;
    // Profiles start idle: no token is minted before a store calls, and an idle store's profile
    // is neither ready nor alerting.
    assert_eq!(mock.stats().tokens_issued, 0);
    let status = proxy.status().await;
    assert_eq!(status["profiles"]["store-3"]["idle"], true, "{status}");
    assert_eq!(status["profiles"]["store-3"]["ready"], false, "{status}");
    let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
    assert!(!metrics.contains("tango_proxy_profile_ready{"), "{metrics}");
    assert_eq!(
        get_json(&format!("{}/readyz", proxy.admin_url)).await["ready"],
        true
    );

    let base = front.base(&proxy);
    // Every store on its own client (its own connections, its own certificate).
    let stores: Vec<Store> = (1..=STORES).map(|i| pos(&front, i)).collect();
    let results = futures_util::future::join_all(stores.iter().enumerate().map(|(n, store)| {
        let base = base.clone();
        let i = n + 1;
        async move {
            let other = i % STORES + 1;
            let own = store
                .send(
                    reqwest::Method::GET,
                    format!("{base}/raas/v2/accounts/A-STORE-{i}"),
                    None,
                )
                .await;
            let own_status = own.status().as_u16();
            let own_body: Value = own.json().await.unwrap();
            let theirs = store
                .send(
                    reqwest::Method::GET,
                    format!("{base}/raas/v2/accounts/A-STORE-{other}"),
                    None,
                )
                .await;
            let theirs = assert_proxy_error(theirs, 403, "caller_forbidden").await;
            let listed = store
                .send(
                    reqwest::Method::GET,
                    format!("{base}/raas/v2/orders?accountIdentifier=A-STORE-{other}"),
                    None,
                )
                .await
                .status()
                .as_u16();
            let placed = store
                .send(
                    reqwest::Method::POST,
                    format!("{base}/raas/v2/orders"),
                    Some(&order(
                        &format!("A-STORE-{i}"),
                        &format!("C-STORE-{i}"),
                        5.0,
                        &format!("ref{i}"),
                    )),
                )
                .await;
            let placed_status = placed.status().as_u16();
            let placed: Value = placed.json().await.unwrap();
            let foreign = store
                .send(
                    reqwest::Method::POST,
                    format!("{base}/raas/v2/orders"),
                    Some(&order(
                        &format!("A-STORE-{other}"),
                        &format!("C-STORE-{i}"),
                        5.0,
                        &format!("steal{i}"),
                    )),
                )
                .await
                .status()
                .as_u16();
            let read_back = store
                .send(
                    reqwest::Method::GET,
                    format!(
                        "{base}/raas/v2/orders/{}",
                        placed["referenceOrderID"].as_str().unwrap_or_default()
                    ),
                    None,
                )
                .await
                .status()
                .as_u16();
            (
                i,
                own_status,
                own_body,
                theirs,
                listed,
                placed_status,
                foreign,
                read_back,
            )
        }
    }))
    .await;
    for (i, own, own_body, theirs, listed, placed, foreign, read_back) in results {
        assert_eq!(own, 200, "store {i}: {own_body}");
        assert_eq!(own_body["accountIdentifier"], format!("A-STORE-{i}"));
        assert!(
            !theirs["message"].as_str().unwrap().contains("key"),
            "{theirs}"
        );
        assert_eq!(listed, 403, "store {i} listed another store's orders");
        assert_eq!(placed, 201, "store {i} could not order on its own account");
        assert_eq!(foreign, 403, "store {i} ordered on another store's account");
        assert_eq!(read_back, 200, "store {i} could not read its own order");
    }
    // Each store's requests reached Tango under its own identity, one token per profile.
    let stats = mock.stats();
    for i in 1..=STORES {
        assert_eq!(
            stats.by_principal.get(&format!("store-{i}")).copied(),
            Some(3),
            "requests of store {i} at the mock: {:?}",
            stats.by_principal
        );
    }
    assert_eq!(stats.tokens_issued, STORES as u64);
    assert_eq!(stats.orders, STORES as u64);
    assert_no_crossing(&mock, STORES);
    // /status shows every profile ready (each has been used) and every caller's counts.
    let status = proxy.status().await;
    assert_eq!(status["mode"], "gateway");
    assert_eq!(status["profiles"]["store-7"]["ready"], true);
    assert_eq!(status["callers"]["pos-7"]["allowed"], 3);
    assert_eq!(status["callers"]["pos-7"]["forbidden"], 3);
    let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
    assert!(
        metrics
            .contains(r#"tango_proxy_caller_requests_total{caller="pos-7",outcome="forbidden"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"tango_proxy_profile_ready{profile="store-7"} 1"#));
}

/// Two stores share one Tango identity; the gateway is what keeps their orders apart.
fn shared_profile_mock() -> MockConfig {
    let mut config = MockConfig::default();
    config.clients.push(MockClient {
        name: "Franchisor".into(),
        client_id: "franchisor".into(),
        client_secret: Secret::new("franchisor-secret"),
        service_accounts: vec![("hq".into(), Secret::new("hq-password"))],
    });
    for i in 1..=2 {
        config.accounts.push(MockAccount {
            owner: "hq".into(),
            customer: format!("C-{i}"),
            account: format!("A-{i}"),
            balance_cents: 1_000_000,
            currency: "USD".into(),
        });
    }
    config
}

/// Tills 1 and 2 on the `hq` profile, each bound to its own account and customer, identified
/// as `front` identifies stores, with `extra` in each `[callers.till-i]`.
fn shared_profile_toml(front: &Front, mock_url: &str, extra: &str) -> String {
    for i in 1..=2 {
        logs::watch_secret(format!("till-key-{i}"));
        logs::watch_secret(till(i)["Basic ".len()..].to_string());
    }
    logs::watch_secret("hq-password".into());
    logs::watch_secret("franchisor-secret".into());
    let callers: String = (1..=2)
        .map(|i| {
            format!(
                r#"
[callers.till-{i}]
{}accounts = ["A-{i}"]
customers = ["C-{i}"]
{extra}
"#,
                front.identity_keys(&format!("till-{i}"), &format!("till-key-{i}"))
            )
        })
        .collect();
    let toml = gateway_toml(
        mock_url,
        &format!(
            r#"
[profiles.hq]
auth = "service_account"
token_url = "{mock_url}/oauth/token"
client_id = "franchisor"
client_secret = "franchisor-secret"
username = "hq"
password = "hq-password"
{callers}"#
        ),
        "",
    );
    front.configure(&toml)
}

/// Till `i`'s credential header (plain HTTP, by key).
fn till(i: usize) -> String {
    basic(&format!("till-{i}"), &format!("till-key-{i}"))
}

/// Tills 1 and 2 as `front` lets them call.
fn tills(front: &Front) -> (Store, Store) {
    let till = |i: usize| front.store(&format!("till-{i}"), &format!("till-key-{i}"));
    (till(1), till(2))
}

/// A front for the tests that run over plain HTTP/1.1 only, stores identified by key.
fn plain() -> Front {
    Front::new(Way::PLAIN_KEY)
}

every_way!(stores_sharing_a_profile_never_read_each_others_orders_or_reward_codes);
async fn stores_sharing_a_profile_never_read_each_others_orders_or_reward_codes(way: Way) {
    let front = Front::new(way);
    let (mock, mock_url) = start_mock(shared_profile_mock()).await;
    let proxy = TestProxy::start(&shared_profile_toml(&front, &mock_url, "")).await;
    let base = &front.base(&proxy);
    let (t1, t2) = tills(&front);
    let placed = t1
        .send(
            reqwest::Method::POST,
            format!("{base}/raas/v2/orders"),
            Some(&order("A-1", "C-1", 10.0, "t1order1")),
        )
        .await;
    assert_eq!(placed.status(), 201);
    let placed: Value = placed.json().await.unwrap();
    let id = placed["referenceOrderID"].as_str().unwrap().to_string();
    let code = placed["reward"]["credentials"].to_string();
    logs::watch_secret(code.trim_matches('"').to_string());

    // Till 1 reads its order; till 2 gets a 403 that carries nothing of it.
    let mine = t1
        .send(
            reqwest::Method::GET,
            format!("{base}/raas/v2/orders/{id}"),
            None,
        )
        .await;
    assert_eq!(mine.status(), 200);
    for path in [
        format!("/raas/v2/orders/{id}"),
        "/raas/v2/orders".to_string(),
        "/raas/v2/lineItems".to_string(),
        "/raas/v2/accounts".to_string(),
        "/raas/v2/customers".to_string(),
    ] {
        let theirs = t2
            .send(reqwest::Method::GET, format!("{base}{path}"), None)
            .await;
        let text = format!("{:?}", theirs.headers());
        let mut body = assert_proxy_error(theirs, 403, "caller_forbidden").await;
        // The error names the path till 2 asked for; nothing else of the answer.
        body["path"].take();
        let all = format!("{text}{body}");
        assert!(
            !all.contains(&id) && !all.contains("A-1") && !all.contains("C-1"),
            "{path}: {all}"
        );
        assert!(
            !all.contains("MOCK-"),
            "{path}: a reward code reached another store: {all}"
        );
    }
    // Filtered to its own account, till 2's list is its own (empty) list.
    let own = t2
        .send(
            reqwest::Method::GET,
            format!("{base}/raas/v2/orders?accountIdentifier=A-2"),
            None,
        )
        .await;
    assert_eq!(own.status(), 200);
    let own: Value = own.json().await.unwrap();
    assert_eq!(own["orders"].as_array().map(Vec::len), Some(0), "{own}");
    // Till 1's line items carry its own codes.
    let items = t1
        .send(
            reqwest::Method::GET,
            format!("{base}/raas/v2/lineItems?accountIdentifier=A-1"),
            None,
        )
        .await;
    assert_eq!(items.status(), 200);
    drop(mock);
}

every_way!(
    callers_authenticate_by_basic_bearer_or_proxy_authorization_and_nothing_else,
    by_key
);
async fn callers_authenticate_by_basic_bearer_or_proxy_authorization_and_nothing_else(way: Way) {
    let front = Front::new(way);
    let (_mock, mock_url) = start_mock(shared_profile_mock()).await;
    let proxy = TestProxy::start(&shared_profile_toml(&front, &mock_url, "")).await;
    let url = format!("{}/raas/v2/accounts/A-1", front.base(&proxy));
    let anonymous = front.anonymous();
    let anonymous = &anonymous;
    let get = |headers: Vec<(&'static str, String)>| {
        let url = url.clone();
        async move {
            let mut req = anonymous.get(url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            req.send().await.unwrap()
        }
    };
    // Accepted: Basic NAME:KEY, Bearer KEY, Proxy-Authorization (beside any Authorization).
    for headers in [
        vec![("authorization", till(1))],
        vec![("authorization", "Bearer till-key-1".to_string())],
        vec![("authorization", "bearer till-key-1".to_string())],
        vec![("proxy-authorization", till(1))],
        vec![
            ("proxy-authorization", "Bearer till-key-1".to_string()),
            ("authorization", "Basic bm9uZTpub25l".to_string()),
        ],
    ] {
        let r = get(headers.clone()).await;
        assert_eq!(r.status(), 200, "{headers:?}");
    }
    // Refused with 401 caller_unauthorized in Tango's shape: nothing, wrong key, another
    // caller's key under this name, a wrong Proxy-Authorization even beside a right
    // Authorization, other schemes.
    for headers in [
        vec![],
        vec![("authorization", basic("till-1", "wrong"))],
        vec![("authorization", basic("till-1", "till-key-2"))],
        vec![("authorization", basic("nobody", "till-key-1"))],
        vec![("authorization", "Bearer wrong".to_string())],
        vec![("authorization", "Bearer".to_string())],
        vec![("authorization", "Digest x".to_string())],
        vec![("authorization", "Basic !!!".to_string())],
        vec![
            ("proxy-authorization", basic("till-1", "wrong")),
            ("authorization", till(1)),
        ],
        vec![("authorization", till(1)), ("authorization", till(2))],
    ] {
        let r = get(headers.clone()).await;
        assert!(r.headers().contains_key("www-authenticate"), "{headers:?}");
        let body = assert_proxy_error(r, 401, "caller_unauthorized").await;
        assert!(!body.to_string().contains("till-key"), "{body}");
    }
    let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
    assert!(
        metrics.contains(
            r#"tango_proxy_caller_requests_total{caller="till-1",outcome="unauthorized"} 3"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"tango_proxy_caller_requests_total{caller="_unknown",outcome="unauthorized"} 7"#
        ),
        "{metrics}"
    );
    assert!(!metrics.contains("nobody"));
    assert_eq!(
        proxy.status().await["callers"]["till-1"]["auth_failures"],
        3
    );
}

every_way!(allow_lists_and_external_ref_ids_are_enforced);
async fn allow_lists_and_external_ref_ids_are_enforced(way: Way) {
    let front = Front::new(way);
    let (mock, mock_url) = start_mock(shared_profile_mock()).await;
    let extra = r#"allow = ["GET /raas/v2/catalogs", "POST /raas/v2/orders", "GET /raas/v2/orders/*"]
require_external_ref_id = true"#;
    let proxy = TestProxy::start(&shared_profile_toml(&front, &mock_url, extra)).await;
    let base = &front.base(&proxy);
    let (t1, _) = tills(&front);
    let ok = t1
        .send(
            reqwest::Method::GET,
            format!("{base}/raas/v2/catalogs"),
            None,
        )
        .await;
    assert_eq!(ok.status(), 200);
    for (method, path) in [
        (reqwest::Method::GET, "/raas/v2/accounts/A-1"),
        (reqwest::Method::DELETE, "/raas/v2/catalogs"),
        (reqwest::Method::GET, "/raas/v2/orders"),
        (reqwest::Method::GET, "/raas/v2/orders/x/resends"),
        (reqwest::Method::GET, "/raas/v2/Catalogs"),
    ] {
        let r = t1.send(method.clone(), format!("{base}{path}"), None).await;
        let body = assert_proxy_error(r, 403, "caller_forbidden").await;
        assert!(
            body["message"].as_str().unwrap().contains("allow"),
            "{method} {path}: {body}"
        );
    }
    let before = mock.stats().orders;
    let mut no_ref = order("A-1", "C-1", 1.0, "x");
    no_ref.as_object_mut().unwrap().remove("externalRefID");
    for body in [
        no_ref.clone(),
        {
            let mut b = no_ref.clone();
            b["externalRefID"] = Value::Null;
            b
        },
        {
            let mut b = no_ref.clone();
            b["externalRefID"] = json!("");
            b
        },
    ] {
        let r = t1
            .send(
                reqwest::Method::POST,
                format!("{base}/raas/v2/orders"),
                Some(&body),
            )
            .await;
        let body = assert_proxy_error(r, 403, "caller_forbidden").await;
        assert!(
            body["message"].as_str().unwrap().contains("externalRefID"),
            "{body}"
        );
    }
    assert_eq!(
        mock.stats().orders,
        before,
        "an order without externalRefID reached Tango"
    );
    let r = t1
        .send(
            reqwest::Method::POST,
            format!("{base}/raas/v2/orders"),
            Some(&order("A-1", "C-1", 1.0, "abc1")),
        )
        .await;
    assert_eq!(r.status(), 201);
}

every_way!(path_tricks_never_cross_stores);
/// Request targets exactly as written (an HTTP/1.1 request line, an HTTP/2 `:path`): path tricks
/// never reach another store's account.
async fn path_tricks_never_cross_stores(way: Way) {
    let front = Front::new(way);
    let (mock, proxy) = two_stores(&front).await;
    let store = pos(&front, 1);
    let mut tricks: Vec<String> = [
        "/raas/v2/accounts/A-STORE-2",
        "/raas/v2/accounts/A-STORE-1/../A-STORE-2",
        "/raas/v2/accounts/A-STORE-1/%2e%2e/A-STORE-2",
        "/raas/v2/accounts/A-STORE-1/%2E%2E/A-STORE-2",
        "/raas/v2/accounts/A-STORE-1%2f..%2fA-STORE-2",
        "/raas/v2/accounts/A-STORE-1%2F..%2FA-STORE-2",
        "/raas/v2/accounts/A-STORE-1%5c..%5cA-STORE-2",
        "/raas/v2/accounts/A-STORE-1%252f..%252fA-STORE-2",
        "/raas/v2/accounts/A-STORE-1\\..\\A-STORE-2",
        "/raas/v2/accounts/./A-STORE-2",
        "/raas/v2//accounts/A-STORE-2",
        "//raas/v2/accounts/A-STORE-2",
        "/raas/v2/accounts//A-STORE-2",
        "/raas/v2/accounts/A-STORE-2/",
        "/raas/v2/accounts/A-STORE-2;A-STORE-1",
        "/raas/v2/accounts/A-STORE-1;/../A-STORE-2",
        "/raas/v2/ACCOUNTS/A-STORE-2",
        "/raas/v2/Accounts/A-STORE-2",
        "/raas/v2/accounts/%41-STORE-2",
        "/raas/v2/accounts/A%2DSTORE%2D2",
        "/raas/v2/customers/C-STORE-2",
        "/raas/v2/customers/C-STORE-2/accounts",
        "/raas/v2/CUSTOMERS/C-STORE-2/accounts",
        "/raas/v2/orders?accountIdentifier=A-STORE-2",
        "/raas/v2/orders?AccountIdentifier=A-STORE-2",
        "/raas/v2/orders?accountIdentifier=A-STORE-1&accountIdentifier=A-STORE-2",
        "/raas/v2/orders?accountIdentifier=A%2DSTORE%2D2",
        "/raas/v2/orders?account%49dentifier=A-STORE-2",
        "/raas/v2/orders?customerIdentifier=C-STORE-2",
        "/raas/v2/lineItems?accountIdentifier=A-STORE-2",
        "/raas/v2/orders?accountIdentifier=",
        "/raas/v2/orders?accountIdentifier=%zz",
        "/raas/v2/accounts/A-STORE-1%00",
        "/raas/v2/accounts/A\u{2010}STORE-2",
        "/raas/v2/accounts/A-STORE-1\u{2215}..\u{2215}A-STORE-2",
        "/raas/v2/accounts/A-STORE-1\u{ff0f}..\u{ff0f}A-STORE-2",
    ]
    .map(String::from)
    .to_vec();
    // A generated, bounded set: each separator and dot spelling in each position.
    for sep in [
        "/",
        "%2f",
        "%2F",
        "%5c",
        "\\",
        "%252f",
        "%c0%af",
        "%e2%88%95",
    ] {
        for dots in ["..", "%2e%2e", ".%2e", "%2e.", "%252e%252e", "%c0%ae%c0%ae"] {
            tricks.push(format!(
                "/raas/v2/accounts/A-STORE-1{sep}{dots}{sep}A-STORE-2"
            ));
            tricks.push(format!(
                "/raas/v2/orders{sep}{dots}{sep}accounts{sep}A-STORE-2"
            ));
        }
    }
    let before = mock.requests().len();
    for trick in &tricks {
        let response = store
            .exchange(proxy.addr(), "GET", trick, &[], b"")
            .await
            .unwrap_or_else(|| panic!("{trick}: no answer"));
        let status = response.status;
        assert!(
            status == 403 || status == 400,
            "{trick} was answered {status}: {response:?}"
        );
        // Refused by the gateway itself: nothing of store 2's account came back.
        assert!(
            response.header("x-tango-proxy-error").is_some(),
            "{trick}: {response:?}"
        );
        assert!(
            !response.text().contains("accountIdentifier\":"),
            "{trick}: {response:?}"
        );
    }
    // Targets that are no path at all: 400, from the gateway or (HTTP/1.1 cannot even parse a
    // target starting with `?`) from the HTTP layer before it.
    for (method, target) in [
        ("GET", "*"),
        ("OPTIONS", "*"),
        ("GET", "?accountIdentifier=A-STORE-2"),
    ] {
        let response = store
            .exchange(proxy.addr(), method, target, &[], b"")
            .await
            .unwrap_or_else(|| panic!("{method} {target}: no answer"));
        assert_eq!(response.status, 400, "{method} {target}: {response:?}");
        assert!(
            !response.text().contains("accountIdentifier\":"),
            "{method} {target}: {response:?}"
        );
    }
    // Nothing reached Tango, and the gateway still serves the store.
    assert_eq!(mock.requests().len(), before, "a trick reached Tango");
    let r = store
        .send(
            reqwest::Method::GET,
            format!("{}/raas/v2/accounts/A-STORE-1", front.base(&proxy)),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_no_crossing(&mock, 2);
}

every_way!(body_tricks_never_cross_stores);
/// Bodies that try to name another store's account are refused before Tango sees them.
async fn body_tricks_never_cross_stores(way: Way) {
    let front = Front::new(way);
    let (mock, proxy) = two_stores(&front).await;
    let store = pos(&front, 1);
    let base = front.base(&proxy);
    let own =
        r#""customerIdentifier":"C-STORE-1","amount":1,"utid":"U000001","externalRefID":"x1""#;
    let tricks: Vec<(String, &str)> = vec![
        (
            format!(r#"{{"accountIdentifier":"A-STORE-1","accountIdentifier":"A-STORE-2",{own}}}"#),
            "application/json",
        ),
        (
            format!(r#"{{"accountIdentifier":"A-STORE-2","accountIdentifier":"A-STORE-1",{own}}}"#),
            "application/json",
        ),
        (
            format!(r#"{{"accountIdentifier":"A-STORE-1","AccountIdentifier":"A-STORE-2",{own}}}"#),
            "application/json",
        ),
        (
            format!(r#"{{"account\u0049dentifier":"A-STORE-2",{own}}}"#),
            "application/json",
        ),
        (
            format!(r#"{{"accountIdentifier":"A-STORE-2",{own}}}"#),
            "application/json",
        ),
        (
            format!(r#"{{"accountIdentifier":["A-STORE-1","A-STORE-2"],{own}}}"#),
            "application/json",
        ),
        (
            format!(r#"{{"accountIdentifier":{{"id":"A-STORE-2"}},{own}}}"#),
            "application/json",
        ),
        (
            format!(r#"{{"accountIdentifier":12,{own}}}"#),
            "application/json",
        ),
        (
            format!(
                r#"{{"accountIdentifier":"A-STORE-1","recipient":{{"accountIdentifier":"A-STORE-2"}},{own}}}"#
            ),
            "application/json",
        ),
        (
            format!(
                r#"{{"accountIdentifier":"A-STORE-1","items":[{{"accountIdentifier":"A-STORE-2"}}],{own}}}"#
            ),
            "application/json",
        ),
        (
            format!(r#"{{"sourceAccountIdentifier":"A-STORE-2",{own}}}"#),
            "application/json",
        ),
        (
            format!(r#"{{"accountIdentifier":"A-STORE-1","account_identifier":"A-STORE-2",{own}}}"#),
            "application/json",
        ),
        (
            format!(r#"{{"accountIdentifier":"A-STORE-1","accountIdentifiers":["A-STORE-2"],{own}}}"#),
            "application/json",
        ),
        (
            format!(r#"{{"accountIdentifier":"A-STORE-1",{own}}}"#),
            "text/plain",
        ),
        (
            format!(r#"{{"accountIdentifier":"A-STORE-1",{own}}}"#),
            "application/x-www-form-urlencoded",
        ),
        (
            "accountIdentifier=A-STORE-2&amount=1".to_string(),
            "application/x-www-form-urlencoded",
        ),
        (
            format!(
                r#"{{"accountIdentifier":"A-STORE-1",{own}}} {{"accountIdentifier":"A-STORE-2"}}"#
            ),
            "application/json",
        ),
        (
            format!(r#"{{"accountIdentifier":"A-STORE-1",{own}"#),
            "application/json",
        ),
        (
            r#"{"customerIdentifier":"C-STORE-2","accountIdentifier":"A-STORE-1","amount":1,"utid":"U000001"}"#
                .to_string(),
            "application/json",
        ),
        (
            r#"{"amount":1,"utid":"U000001","customerIdentifier":"C-STORE-1"}"#.to_string(),
            "application/json",
        ),
        (
            "\u{feff}{\"accountIdentifier\":\"A-STORE-1\"}".to_string(),
            "application/json",
        ),
    ];
    let before = mock.requests().len();
    for (body, content_type) in &tricks {
        for path in [
            "/raas/v2/orders",
            "/raas/v2/creditCardDeposits",
            "/raas/v2/transferFunds",
        ] {
            let r = store
                .post(format!("{base}{path}"))
                .header("content-type", *content_type)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            assert_eq!(
                status,
                403,
                "{path} {content_type} {body}: {:?}",
                r.text().await
            );
        }
    }
    // A body on a read is checked like any other.
    let r = store
        .get(format!("{base}/raas/v2/accounts/A-STORE-1"))
        .header("content-type", "application/json")
        .body(r#"{"accountIdentifier":"A-STORE-2"}"#)
        .send()
        .await
        .unwrap();
    assert_proxy_error(r, 403, "caller_forbidden").await;
    assert_eq!(mock.requests().len(), before, "a body trick reached Tango");
    assert_eq!(mock.stats().orders, 0);
}

every_way!(rate_limits_answer_429_with_a_retry_after_that_holds);
async fn rate_limits_answer_429_with_a_retry_after_that_holds(way: Way) {
    let front = Front::new(way);
    let (_mock, mock_url) = start_mock(shared_profile_mock()).await;
    let proxy = TestProxy::start(&shared_profile_toml(
        &front,
        &mock_url,
        "rate = \"1/m\"\nburst = 2",
    ))
    .await;
    let base = front.base(&proxy);
    let url = format!("{base}/raas/v2/accounts/A-1");
    let (t1, t2) = tills(&front);
    for _ in 0..2 {
        assert_eq!(
            t1.send(reqwest::Method::GET, url.clone(), None)
                .await
                .status(),
            200
        );
    }
    let r = t1.send(reqwest::Method::GET, url.clone(), None).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((55..=60).contains(&retry), "Retry-After {retry}");
    assert_proxy_error(r, 429, "rate_limited").await;
    // Another caller's bucket is its own.
    assert_eq!(
        t2.send(
            reqwest::Method::GET,
            format!("{base}/raas/v2/accounts/A-2"),
            None
        )
        .await
        .status(),
        200
    );
    assert_eq!(proxy.status().await["callers"]["till-1"]["rate_limited"], 1);
}

every_way!(daily_spend_limit_holds_across_three_replicas_under_200_concurrent_orders);
/// Three gateway replicas share one Redis ledger; 200 concurrent orders never take a store past
/// its daily limit, not by one order.
async fn daily_spend_limit_holds_across_three_replicas_under_200_concurrent_orders(way: Way) {
    let front = Front::new(way);
    let redis = RedisServer::start();
    let (mock, mock_url) = start_mock(shared_profile_mock()).await;
    let cache = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"gw-{}\"",
        redis.url(),
        redis.port
    );
    let body = shared_profile_toml(&front, &mock_url, "daily_spend_limit = \"100 USD\"");
    let body = body.split("[cache]").nth(1).unwrap().to_string();
    let toml = front.configure(&gateway_toml(&mock_url, &body, &cache));
    let replicas = [
        TestProxy::start(&toml).await,
        TestProxy::start(&toml).await,
        TestProxy::start(&toml).await,
    ];
    let urls: Vec<String> = replicas.iter().map(|r| front.base(r)).collect();
    let (t1, t2) = tills(&front);
    let (t1, t2) = (&t1, &t2);
    let results = futures_util::future::join_all((0..200).map(|n| {
        let url = format!("{}/raas/v2/orders", urls[n % 3]);
        async move {
            t1.send(
                reqwest::Method::POST,
                url,
                Some(&order("A-1", "C-1", 7.0, &format!("o{n}"))),
            )
            .await
            .status()
            .as_u16()
        }
    }))
    .await;
    let placed = results.iter().filter(|s| **s == 201).count();
    let refused = results.iter().filter(|s| **s == 403).count();
    // $100 holds fourteen $7 orders and not a fifteenth.
    assert_eq!(placed, 14, "{results:?}");
    assert_eq!(refused, 186, "{results:?}");
    assert_eq!(mock.stats().orders, 14);
    let spent = replicas[0].status().await["callers"]["till-1"]["spent_today"].clone();
    assert_eq!(spent, "98.00 USD");
    // The other till's limit is its own.
    let r = t2
        .send(
            reqwest::Method::POST,
            format!("{}/raas/v2/orders", urls[1]),
            Some(&order("A-2", "C-2", 99.0, "other1")),
        )
        .await;
    assert_eq!(r.status(), 201);
    // A repeat of a placed order (Tango's 200) is not counted again; a refused one is released.
    let r = t2
        .send(
            reqwest::Method::POST,
            format!("{}/raas/v2/orders", urls[2]),
            Some(&order("A-2", "C-2", 1.0, "other1")),
        )
        .await;
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        replicas[2].status().await["callers"]["till-2"]["spent_today"],
        "99.00 USD"
    );
    // Amounts Tango would convert unseen (strings, exponent forms past two decimals) are refused.
    for amount in [json!("1.00"), json!(1.005), json!(-5), json!(0), json!([1])] {
        let mut o = order("A-2", "C-2", 1.0, "oddamount");
        o["amount"] = amount.clone();
        let r = t2
            .send(
                reqwest::Method::POST,
                format!("{}/raas/v2/orders", urls[0]),
                Some(&o),
            )
            .await;
        assert_proxy_error(r, 403, "caller_forbidden").await;
    }
    // An order in another currency is refused before Tango sees it.
    let mut euro = order("A-2", "C-2", 0.5, "eur1");
    euro["utid"] = json!("U000002");
    let r = t2
        .send(
            reqwest::Method::POST,
            format!("{}/raas/v2/orders", urls[0]),
            Some(&euro),
        )
        .await;
    let body = assert_proxy_error(r, 403, "caller_forbidden").await;
    assert!(body["message"].as_str().unwrap().contains("EUR"), "{body}");
    let metrics = get_text(&format!("{}/metrics", replicas[0].admin_url)).await;
    assert!(
        metrics.contains("tango_proxy_caller_spend_today_minor_units{caller=\"till-1\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_limited_caller_fails_closed_while_the_ledger_is_unreachable_unless_told_otherwise() {
    let mut redis = RedisServer::start();
    let (mock, mock_url) = start_mock(shared_profile_mock()).await;
    let cache = format!("backend = \"redis\"\nredis_url = \"{}\"", redis.url());
    let body = shared_profile_toml(&plain(), &mock_url, "daily_spend_limit = \"100 USD\"");
    let mut body = body.split("[cache]").nth(1).unwrap().to_string();
    // Till 2 prefers selling to counting.
    let marker = "[callers.till-2]\n";
    body = body.replace(marker, &format!("{marker}spend_limit_fail_open = true\n"));
    let proxy = TestProxy::start(&gateway_toml(&mock_url, &body, &cache)).await;
    let url = format!("{}/raas/v2/orders", proxy.url);
    let r = send(
        reqwest::Method::POST,
        url.clone(),
        &till(1),
        Some(&order("A-1", "C-1", 1.0, "a1")),
    )
    .await;
    assert_eq!(r.status(), 201);
    redis.kill();
    let r = send(
        reqwest::Method::POST,
        url.clone(),
        &till(1),
        Some(&order("A-1", "C-1", 1.0, "a2")),
    )
    .await;
    assert!(r.headers().contains_key("retry-after"));
    assert_proxy_error(r, 503, "spend_limit_unavailable").await;
    let r = send(
        reqwest::Method::POST,
        url.clone(),
        &till(2),
        Some(&order("A-2", "C-2", 1.0, "b1")),
    )
    .await;
    assert_eq!(r.status(), 201);
    // Reads are not money: they keep working.
    let r = send(
        reqwest::Method::GET,
        format!("{}/raas/v2/accounts/A-1", proxy.url),
        &till(1),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(mock.stats().orders, 2);
}

#[tokio::test]
async fn one_broken_store_profile_does_not_make_the_gateway_unready() {
    let (_mock, mock_url) = start_stores(2).await;
    let mut profiles = store_profiles(&mock_url, 2);
    profiles = profiles.replace("store-2-password", "wrong-password");
    let toml = gateway_toml(
        &mock_url,
        &format!("{profiles}{}", store_callers(&plain(), 2, "")),
        "",
    );
    let proxy = TestProxy::start(&toml).await;
    let r = send(
        reqwest::Method::GET,
        format!("{}/raas/v2/accounts/A-STORE-2", proxy.url),
        &as_store(2),
        None,
    )
    .await;
    assert_proxy_error(r, 503, "token_unavailable").await;
    let r = send(
        reqwest::Method::GET,
        format!("{}/raas/v2/accounts/A-STORE-1", proxy.url),
        &as_store(1),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let ready = client()
        .get(format!("{}/readyz", proxy.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let status = proxy.status().await;
    assert_eq!(status["profiles"]["store-1"]["ready"], true);
    assert_eq!(status["profiles"]["store-2"]["ready"], false);
    assert!(
        status["profiles"]["store-2"]["token"]["last_error"].is_string(),
        "{status}"
    );
    let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
    assert!(
        metrics.contains(r#"tango_proxy_profile_ready{profile="store-2"} 0"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn money_moving_requests_are_audited_without_reward_credentials() {
    let (_mock, mock_url) = start_mock(shared_profile_mock()).await;
    let proxy = TestProxy::start(&shared_profile_toml(&plain(), &mock_url, "")).await;
    let from = logs::captured_len();
    let r = send(
        reqwest::Method::POST,
        format!("{}/raas/v2/orders", proxy.url),
        &till(1),
        Some(&order("A-1", "C-1", 12.5, "audit42")),
    )
    .await;
    assert_eq!(r.status(), 201);
    let placed: Value = r.json().await.unwrap();
    let id = placed["referenceOrderID"].as_str().unwrap();
    let code = placed["reward"]["credentials"]
        .as_object()
        .and_then(|m| m.values().next())
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    logs::watch_secret(code.clone());
    let logs = logs::captured_since(from);
    let line = logs
        .lines()
        .find(|l| l.contains("tango_auth_proxy::audit") && l.contains(id) && l.contains("audit42"))
        .unwrap_or_else(|| panic!("no audit line for {id}"));
    for field in [
        "caller=till-1",
        "profile=hq",
        "account_identifier=\"A-1\"",
        "amount=\"12.5\"",
        "currency=\"USD\"",
        "external_ref_id=\"audit42\"",
        "status=201",
        "tango_request_id=",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    assert!(
        !logs.contains(&code),
        "a reward credential reached the logs"
    );
}

every_way!(actions_on_another_stores_items_and_unattributable_resources_are_refused);
/// A store acting on one order or line item (a resend, a cancel) names no account; the gateway
/// asks Tango whose the item is first. Platform-wide and unattributable resources are closed to
/// bound callers; method overrides and misspelt externalRefIDs are refused.
async fn actions_on_another_stores_items_and_unattributable_resources_are_refused(way: Way) {
    let front = Front::new(way);
    let (mock, mock_url) = start_mock(shared_profile_mock()).await;
    let proxy = TestProxy::start(&shared_profile_toml(
        &front,
        &mock_url,
        "require_external_ref_id = true",
    ))
    .await;
    let base = &front.base(&proxy);
    let (t1, t2) = tills(&front);
    let placed: Value = t1
        .send(
            reqwest::Method::POST,
            format!("{base}/raas/v2/orders"),
            Some(&order("A-1", "C-1", 3.0, "item1")),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = placed["referenceOrderID"].as_str().unwrap().to_string();
    let items: Value = t1
        .send(
            reqwest::Method::GET,
            format!("{base}/raas/v2/lineItems?accountIdentifier=A-1"),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    let line_item = items["lineItems"][0]["referenceLineItemID"]
        .as_str()
        .or_else(|| items["lineItems"][0]["referenceLineItemId"].as_str())
        .unwrap_or_else(|| panic!("{items}"))
        .to_string();
    mock.clear_requests();
    for path in [
        format!("/raas/v2/orders/{id}/resends"),
        format!("/raas/v2/lineItems/{line_item}/cancel"),
        format!("/raas/v2/lineItems/{line_item}/reissue"),
    ] {
        let body = json!({"accountIdentifier": "A-2", "customerIdentifier": "C-2"});
        let r = t2
            .send(reqwest::Method::POST, format!("{base}{path}"), Some(&body))
            .await;
        assert_proxy_error(r, 403, "caller_forbidden").await;
    }
    // Only the gateway's own ownership look-ups reached Tango, never an action.
    for seen in mock.requests() {
        assert_eq!(seen.method, "GET", "{seen:?}");
    }
    // The owner's own resend goes through to Tango.
    let r = t1
        .send(
            reqwest::Method::POST,
            format!("{base}/raas/v2/orders/{id}/resends"),
            None,
        )
        .await;
    assert_ne!(
        r.headers()
            .get("x-tango-proxy-error")
            .map(|v| v.to_str().unwrap()),
        Some("caller_forbidden")
    );
    assert!(mock
        .requests()
        .iter()
        .any(|s| s.method == "POST" && s.path.ends_with("/resends")));
    for (method, path) in [
        (reqwest::Method::GET, "/raas/v2/webhooks"),
        (reqwest::Method::POST, "/raas/v2/webhooks"),
        (reqwest::Method::GET, "/raas/v2/digitalTemplates"),
        (reqwest::Method::GET, "/raas/v2/creditCardDeposits/RD-1"),
    ] {
        let r = t1.send(method.clone(), format!("{base}{path}"), None).await;
        assert_proxy_error(r, 403, "caller_forbidden").await;
    }
    // Method overrides, and an externalRefID Tango would not read.
    let r = t1
        .get(format!("{base}/raas/v2/accounts/A-1"))
        .header("x-http-method-override", "DELETE")
        .send()
        .await
        .unwrap();
    assert_proxy_error(r, 403, "caller_forbidden").await;
    let r = t1
        .send(
            reqwest::Method::GET,
            format!("{base}/raas/v2/accounts/A-1?_method=DELETE"),
            None,
        )
        .await;
    assert_proxy_error(r, 403, "caller_forbidden").await;
    let mut misspelt = order("A-1", "C-1", 1.0, "x");
    let refid = misspelt
        .as_object_mut()
        .unwrap()
        .remove("externalRefID")
        .unwrap();
    misspelt["externalRefId"] = refid;
    let r = t1
        .send(
            reqwest::Method::POST,
            format!("{base}/raas/v2/orders"),
            Some(&misspelt),
        )
        .await;
    assert_proxy_error(r, 403, "caller_forbidden").await;
    // An empty key never authenticates.
    let r = front
        .anonymous()
        .get(format!("{base}/raas/v2/accounts/A-1"))
        .header("authorization", basic("till-1", ""))
        .send()
        .await
        .unwrap();
    assert_proxy_error(r, 401, "caller_unauthorized").await;
}

every_way!(an_order_the_store_hangs_up_on_is_still_settled_and_audited);
/// A store that hangs up while its order is with Tango (closes the connection; over HTTP/2,
/// resets the stream and then closes) does not lose the order's settlement or its audit line.
async fn an_order_the_store_hangs_up_on_is_still_settled_and_audited(way: Way) {
    use tango_auth_proxy::mock::OrderFailure;
    use tokio::io::AsyncWriteExt;
    let front = Front::new(way);
    let (mock, mock_url) = start_mock(shared_profile_mock()).await;
    let proxy = TestProxy::start(&shared_profile_toml(
        &front,
        &mock_url,
        "daily_spend_limit = \"50 USD\"",
    ))
    .await;
    let (t1, _) = tills(&front);
    // Tango creates the order, then holds its answer.
    mock.fail_orders(OrderFailure::Timeout(Duration::from_millis(400)), 1);
    let body = order("A-1", "C-1", 20.0, "hangup1").to_string();
    let from = logs::captured_len();
    let placed_at_tango = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while mock.stats().orders == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the order never reached Tango"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    match way.transport {
        Transport::Https2 => {
            let (send, conn) = t1.h2_connection(proxy.addr()).await;
            let mut request = http::Request::builder()
                .method("POST")
                .uri("https://localhost/raas/v2/orders")
                .header("content-type", "application/json")
                .header("content-length", body.len());
            if let Some(auth) = &t1.auth {
                request = request.header("authorization", auth);
            }
            let mut send = send.ready().await.unwrap();
            let (answer, mut stream) = send.send_request(request.body(()).unwrap(), false).unwrap();
            stream.send_data(Bytes::from(body), true).unwrap();
            placed_at_tango().await;
            stream.send_reset(h2::Reason::CANCEL);
            drop((answer, stream, send));
            conn.abort();
        }
        _ => {
            let auth = t1
                .auth
                .as_ref()
                .map(|a| format!("Authorization: {a}\r\n"))
                .unwrap_or_default();
            let request = format!(
                "POST /raas/v2/orders HTTP/1.1\r\nHost: gw\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let mut stream = t1.http1_connection(proxy.addr()).await;
            stream.write_all(request.as_bytes()).await.unwrap();
            stream.flush().await.unwrap();
            placed_at_tango().await;
            drop(stream);
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let logs = logs::captured_since(from);
        if logs.lines().any(|l| {
            l.contains("tango_auth_proxy::audit")
                && l.contains("hangup1")
                && l.contains("status=201")
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit line for the order the store hung up on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mock.stats().orders, 1);
    assert_eq!(
        proxy.status().await["callers"]["till-1"]["spent_today"],
        "20.00 USD"
    );
}

every_way!(store_input_that_could_steer_tango_or_load_the_gateway_is_refused_or_removed);
/// What a store sends that could steer Tango or the gateway's own work is refused or removed:
/// oversized checked bodies, HEAD on bound paths, a second Content-Type, re-routing headers; the
/// name the request was sent to (Host, an absolute-form target, HTTP/2's `:authority`) neither
/// picks where it goes nor under which name it arrives, and a key hidden in it never reaches an
/// error body, Tango or a log.
async fn store_input_that_could_steer_tango_or_load_the_gateway_is_refused_or_removed(way: Way) {
    let front = Front::new(way);
    let key = "steer-key-Qx81";
    let (upstream, proxy) = one_caller(&front, key).await;
    let base = front.base(&proxy);
    let store = front.store("pos-1", key);
    // A checked body over 64 KiB: 413 before it is parsed.
    let big = format!(
        r#"{{"accountIdentifier":"A-1","pad":"{}"}}"#,
        "x".repeat(70_000)
    );
    // Sent as raw bytes: the gateway answers without reading the body, and a client still
    // writing it may meet the closed connection before it reads the answer.
    let response = store
        .exchange(
            proxy.addr(),
            "POST",
            "/raas/v2/orders",
            &[("content-type", "application/json")],
            big.as_bytes(),
        )
        .await
        .unwrap();
    assert_raw_proxy_error(&response.text(), 413, "body_too_large");
    // Two Content-Types.
    let response = store
        .exchange(
            proxy.addr(),
            "POST",
            "/raas/v2/orders",
            &[
                ("content-type", "application/json"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            br#"{"accountIdentifier":"A-1"}"#,
        )
        .await
        .unwrap();
    assert_raw_proxy_error(&response.text(), 403, "caller_forbidden");
    // HEAD would show what a GET's withheld answer carries.
    let r = store
        .request(reqwest::Method::HEAD, format!("{base}/raas/v2/orders/X1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        upstream.requests().len(),
        0,
        "a refused request reached Tango"
    );
    // Re-routing headers never reach Tango; X-Forwarded-For is the gateway's alone.
    let r = store
        .get(format!("{base}/raas/v2/catalogs"))
        .header("x-original-url", "/raas/v2/accounts/A-2")
        .header("x-rewrite-url", "/raas/v2/accounts/A-2")
        .header("x-forwarded-prefix", "/other")
        .header("forwarded", "for=1.2.3.4")
        .header("x-forwarded-for", "1.2.3.4")
        .header("x-original-method", "DELETE")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), way.version());
    let seen = upstream.last();
    for h in [
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-prefix",
        "forwarded",
        "x-original-method",
    ] {
        assert!(!seen.headers.contains_key(h), "{h} reached Tango");
    }
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    // Another host named in Host or (HTTP/2) `:authority`: the request still goes to the
    // configured Tango, under Tango's own name.
    let elsewhere: &[&str] = match way.transport {
        Transport::Https2 => &[
            "https://203.0.113.9:8080/raas/v2/catalogs",
            "http://203.0.113.9/raas/v2/catalogs",
        ],
        _ => &["/raas/v2/catalogs"],
    };
    for target in elsewhere {
        for headers in [&[][..], &[("host", "203.0.113.9:8080")][..]] {
            let before = upstream.requests().len();
            let response = store
                .exchange(proxy.addr(), "GET", target, headers, b"")
                .await
                .unwrap();
            assert_eq!(response.status, 200, "{target} {headers:?}: {response:?}");
            let seen = upstream.requests();
            assert_eq!(seen.len(), before + 1);
            let seen = seen.last().unwrap();
            assert_eq!(seen.uri, "/raas/v2/catalogs", "{seen:?}");
            assert_eq!(
                seen.headers["host"].to_str().unwrap(),
                upstream.addr.to_string(),
                "{target} {headers:?}"
            );
        }
    }
    // A key in an absolute-form target (over HTTP/2: in `:authority`) is neither echoed, nor
    // logged, nor passed on.
    let before = upstream.requests().len();
    match way.transport {
        Transport::Https2 => {
            let target = format!("https://pos-1:{key}@203.0.113.9:8080/raas/v2/catalogs");
            // Served like any request to the gateway: `:authority` names no upstream.
            let response = store
                .exchange(proxy.addr(), "GET", &target, &[], b"")
                .await
                .unwrap();
            assert_eq!(response.status, 200, "{response:?}");
            assert!(!response.text().contains(key), "{response:?}");
            assert_eq!(upstream.requests().len(), before + 1);
        }
        _ => {
            let target = format!("http://pos-1:{key}@203.0.113.9:8080/raas/v2/accounts/A-1");
            let response = store
                .exchange(proxy.addr(), "GET", &target, &[], b"")
                .await
                .unwrap();
            assert_eq!(response.status, 400, "{response:?}");
            let text = response.text();
            assert!(!text.contains(key), "{text}");
            assert!(text.contains("203.0.113.9:8080"), "{text}");
            assert_eq!(upstream.requests().len(), before);
        }
    }
    for seen in &upstream.requests()[before..] {
        assert!(
            !format!("{:?}{:?}", seen.uri, seen.headers).contains(key),
            "the key reached Tango: {seen:?}"
        );
    }
    logs::assert_no_secret_captured();
}

/// Repeated failed authentications: an address is refused for the rest of the window (taken
/// from X-Forwarded-For only when the peer is a trusted proxy); failures naming one caller are
/// slowed down, while the caller's own correct key still works at once.
#[tokio::test]
async fn repeated_authentication_failures_are_slowed_by_address_and_by_name() {
    let (_mock, mock_url) = start_mock(shared_profile_mock()).await;
    let toml = shared_profile_toml(&plain(), &mock_url, "").replacen(
        "[listen]\n",
        "[listen]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        1,
    );
    let proxy = TestProxy::start(&toml).await;
    let url = format!("{}/raas/v2/accounts/A-1", proxy.url);
    let attempt = |from: &'static str, auth: String| {
        let url = url.clone();
        async move {
            client()
                .get(url)
                .header("authorization", auth)
                .header("x-forwarded-for", from)
                .send()
                .await
                .unwrap()
        }
    };
    let till2_from = |from: &'static str| {
        let url = format!("{}/raas/v2/accounts/A-2", proxy.url);
        async move {
            client()
                .get(url)
                .header("authorization", till(2))
                .header("x-forwarded-for", from)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // A failure marks the address; till 2 then authenticates from it (a store sharing it).
    assert_eq!(
        attempt("203.0.113.7", basic("nobody", "guess"))
            .await
            .status(),
        401
    );
    assert_eq!(till2_from("203.0.113.7").await, 200);
    // Twenty more wrong keys for unknown names from that address (behind the trusted proxy).
    for _ in 0..19 {
        let r = attempt("203.0.113.7", basic("nobody", "guess")).await;
        assert_eq!(r.status(), 401);
    }
    // That address is now refused, even with a right key; its neighbour is not.
    let r = attempt("203.0.113.7", till(1)).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_proxy_error(r, 429, "rate_limited").await;
    // Till 2, which authenticated from there before the block, is not locked out by it.
    assert_eq!(till2_from("203.0.113.7").await, 200);
    assert_eq!(attempt("203.0.113.8", till(1)).await.status(), 200);
    // X-Forwarded-For written by the client itself (left of what the proxy appended) is not
    // believed: the right-most untrusted entry counts.
    assert_eq!(
        attempt("203.0.113.7, 203.0.113.9", till(1)).await.status(),
        200
    );

    // Failures naming till-2 from many addresses: after ten, each waits before its 401.
    const FROM: [&str; 11] = [
        "198.51.100.1",
        "198.51.100.2",
        "198.51.100.3",
        "198.51.100.4",
        "198.51.100.5",
        "198.51.100.6",
        "198.51.100.7",
        "198.51.100.8",
        "198.51.100.9",
        "198.51.100.10",
        "198.51.100.11",
    ];
    for from in &FROM[..10] {
        assert_eq!(attempt(from, basic("till-2", "guess")).await.status(), 401);
    }
    let started = std::time::Instant::now();
    assert_eq!(
        attempt(FROM[10], basic("till-2", "guess")).await.status(),
        401
    );
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "the 11th failure was not slowed"
    );
    // Till 2's right key is neither refused nor counted as a failure.
    let r = client()
        .get(format!("{}/raas/v2/accounts/A-2", proxy.url))
        .header("authorization", till(2))
        .header("x-forwarded-for", "198.51.100.50")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
    assert!(
        metrics.contains(
            r#"tango_proxy_caller_requests_total{caller="_unknown",outcome="rate_limited"} 1"#
        ),
        "{metrics}"
    );
}

/// Without trusted proxies, X-Forwarded-For cannot move the blame: the peer is the address.
#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_cannot_dodge_the_address_limit() {
    let (_mock, mock_url) = start_mock(shared_profile_mock()).await;
    let proxy = TestProxy::start(&shared_profile_toml(&plain(), &mock_url, "")).await;
    let url = format!("{}/raas/v2/accounts/A-1", proxy.url);
    for i in 0..20 {
        let r = client()
            .get(&url)
            .header("authorization", basic("nobody", "guess"))
            .header("x-forwarded-for", format!("192.0.2.{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = client()
        .get(&url)
        .header("authorization", till(1))
        .header("x-forwarded-for", "192.0.2.200")
        .send()
        .await
        .unwrap();
    assert_proxy_error(r, 429, "rate_limited").await;
}

every_way!(
    a_certificate_and_another_stores_key_on_one_request_are_refused,
    by_cert
);
/// A store known by its client certificate whose request also carries another store's key is
/// refused (a credential beside a certificate must name the certificate's caller), however the
/// key is sent, over HTTP/1.1 and HTTP/2 alike: the key's store is not reached and is not
/// slowed down for it, and the certificate's store still works without the key.
async fn a_certificate_and_another_stores_key_on_one_request_are_refused(way: Way) {
    assert_eq!(way.by, IdentifiedBy::Cert);
    let front = Front::new(way);
    let (mock, mock_url) = start_stores(3).await;
    // pos-1: a certificate only; pos-2: a key only; pos-3: a certificate and a key.
    let callers = format!(
        r#"
[callers.pos-1]
{}profile = "store-1"
accounts = ["A-STORE-1"]
[callers.pos-2]
key_sha256 = "{}"
profile = "store-2"
accounts = ["A-STORE-2"]
[callers.pos-3]
{}key_sha256 = "{}"
profile = "store-3"
accounts = ["A-STORE-3"]
"#,
        front.identity_keys("pos-1", &store_key(1)),
        sha256_hex(store_key(2).as_bytes()),
        front.identity_keys("pos-3", &store_key(3)),
        sha256_hex(store_key(3).as_bytes()),
    );
    let toml = front.configure(&gateway_toml(
        &mock_url,
        &format!("{}{callers}", store_profiles(&mock_url, 3)),
        "",
    ));
    let proxy = TestProxy::start(&toml).await;
    let base = front.base(&proxy);
    let (pos1, pos3) = (pos(&front, 1), pos(&front, 3));
    let key2 = store_key(2);
    let before = mock.requests().len();
    let refusals = [
        (&pos1, "A-STORE-1", vec![("authorization", as_store(2))]),
        (&pos1, "A-STORE-2", vec![("authorization", as_store(2))]),
        (
            &pos1,
            "A-STORE-2",
            vec![("proxy-authorization", as_store(2))],
        ),
        (
            &pos1,
            "A-STORE-2",
            vec![("authorization", format!("Bearer {key2}"))],
        ),
        (
            &pos1,
            "A-STORE-1",
            vec![("authorization", basic("pos-1", &key2))],
        ),
        (
            &pos1,
            "A-STORE-2",
            vec![
                ("authorization", as_store(2)),
                ("authorization", as_store(2)),
            ],
        ),
        (&pos3, "A-STORE-2", vec![("authorization", as_store(2))]),
    ];
    for (store, account, headers) in &refusals {
        let mut request = store.get(format!("{base}/raas/v2/accounts/{account}"));
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.version(), way.version());
        assert!(r.headers().contains_key("www-authenticate"), "{headers:?}");
        let body = assert_proxy_error(r, 401, "caller_unauthorized").await;
        assert!(!body.to_string().contains(&key2), "{body}");
    }
    assert_eq!(
        mock.requests().len(),
        before,
        "a request with a certificate and another store's key reached Tango"
    );
    // A key naming another caller than the certificate is told so.
    let r = pos1
        .get(format!("{base}/raas/v2/accounts/A-STORE-1"))
        .header("authorization", as_store(2))
        .send()
        .await
        .unwrap();
    let body = assert_proxy_error(r, 401, "caller_unauthorized").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("another caller than the client certificate"),
        "{body}"
    );
    // The certificate alone, or with its own caller's key, is still served.
    let r = pos1
        .send(
            reqwest::Method::GET,
            format!("{base}/raas/v2/accounts/A-STORE-1"),
            None,
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = pos3
        .get(format!("{base}/raas/v2/accounts/A-STORE-3"))
        .header("authorization", as_store(3))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The failures are not the key's own store's: it is not held to them, and is served.
    let status = proxy.status().await;
    assert_eq!(status["callers"]["pos-2"]["auth_failures"], 0, "{status}");
    let r = front
        .anonymous()
        .get(format!("{base}/raas/v2/accounts/A-STORE-2"))
        .header("authorization", as_store(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_no_crossing(&mock, 3);
}

every_way!(http2_framing_carries_no_body_past_the_checks, http2);
/// What HTTP/2 frames (not headers) say about a body: a Content-Length that the DATA frames
/// contradict, two Content-Lengths, a body in one-byte frames, trailers naming another store or
/// another method. The body the gateway checks is the body Tango gets; trailers identify no one.
async fn http2_framing_carries_no_body_past_the_checks(way: Way) {
    assert_eq!(way.transport, Transport::Https2);
    let front = Front::new(way);
    let (mock, proxy) = two_stores(&front).await;
    let store = pos(&front, 1);
    let post = |content_lengths: &[usize]| {
        let mut request = http::Request::builder()
            .method("POST")
            .uri("https://localhost/raas/v2/orders")
            .header("content-type", "application/json");
        if let Some(auth) = &store.auth {
            request = request.header("authorization", auth);
        }
        for n in content_lengths {
            request = request.header("content-length", *n);
        }
        request.body(()).unwrap()
    };
    let own = order("A-STORE-1", "C-STORE-1", 5.0, "framed1").to_string();
    let foreign = order("A-STORE-2", "C-STORE-1", 5.0, "framed2").to_string();
    let smuggled = format!("{own} {foreign}");
    let frames = |text: &str| vec![Bytes::from(text.to_string())];
    // Framing HTTP/2 forbids ends the stream before the gateway sees the request (`None`); a
    // body the gateway does see is checked whole. None reaches Tango.
    let refused = [
        (
            "DATA past the Content-Length",
            post(&[own.len()]),
            vec![Bytes::from(own.clone()), Bytes::from(format!(" {foreign}"))],
            None,
        ),
        (
            "DATA short of the Content-Length",
            post(&[own.len() + 40]),
            frames(&own),
            None,
        ),
        (
            "two different Content-Lengths",
            post(&[own.len(), smuggled.len()]),
            frames(&smuggled),
            None,
        ),
        (
            "a second order after the first",
            post(&[]),
            frames(&smuggled),
            Some(403),
        ),
        (
            "another store's order in one-byte frames",
            post(&[foreign.len()]),
            foreign
                .bytes()
                .map(|b| Bytes::copy_from_slice(&[b]))
                .collect(),
            Some(403),
        ),
    ];
    for (what, request, data, expected) in refused {
        let answer = store.h2_frames(proxy.addr(), request, &data, None).await;
        assert_eq!(
            answer.as_ref().map(|a| a.status),
            expected,
            "{what}: {answer:?}"
        );
        if let Some(answer) = &answer {
            assert_raw_proxy_error(&answer.text(), 403, "caller_forbidden");
        }
    }
    assert_eq!(mock.stats().orders, 0, "a framed body reached Tango");
    // Trailers after the body name another store and method: the order is still the caller's,
    // under its own profile, and placed once.
    let mut trailers = http::HeaderMap::new();
    trailers.insert("authorization", as_store(2).parse().unwrap());
    trailers.insert("x-http-method-override", "DELETE".parse().unwrap());
    trailers.insert("content-type", "text/plain".parse().unwrap());
    let answer = store
        .h2_frames(
            proxy.addr(),
            post(&[own.len()]),
            &frames(&own),
            Some(trailers),
        )
        .await
        .expect("an order with trailers got no answer");
    assert_eq!(answer.status, 201, "{answer:?}");
    let stats = mock.stats();
    assert_eq!(stats.orders, 1);
    assert_eq!(stats.by_principal.get("store-2"), None, "{stats:?}");
    assert_no_crossing(&mock, 2);
}

every_way!(a_store_still_sending_an_oversized_body_reads_its_413);
/// A checked body past 64 KiB is answered 413 while the store is still sending it: the store,
/// using an ordinary HTTP client, reads that answer every time (a lingering close) rather than
/// meeting a reset connection.
async fn a_store_still_sending_an_oversized_body_reads_its_413(way: Way) {
    let front = Front::new(way);
    let key = "linger-key-Zq42";
    let (upstream, proxy) = one_caller(&front, key).await;
    let base = front.base(&proxy);
    let big = format!(
        r#"{{"accountIdentifier":"A-1","pad":"{}"}}"#,
        "x".repeat(512 << 10)
    );
    for round in 0..20 {
        // A new client (and connection) each round, as a point-of-sale retry would be.
        let store = front.store("pos-1", key);
        let resp = store
            .request(reqwest::Method::POST, format!("{base}/raas/v2/orders"))
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}: no answer: {e:?}"));
        assert_proxy_error(resp, 413, "body_too_large").await;
    }
    assert!(upstream.requests().is_empty());
}
