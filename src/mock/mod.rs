//! A mock of Tango for local development, the demo and tests.
//!
//! It serves the RaaS endpoints apps use most (see `raas` and `orders`) behind the credential
//! checks Tango makes (Basic, or a Bearer token from its own token endpoint, see `oauth`),
//! answers errors in Tango's JSON shape, and counts and records what it sees. Hooks for tests and
//! local experiments live under `/mock`:
//!
//! | hook | does |
//! | --- | --- |
//! | `GET /mock/stats` | RaaS requests by credential and by principal, token requests by grant, orders |
//! | `GET /mock/requests` | the last 20,000 RaaS requests: principal, method, path, query, JSON body (see [`SeenRequest`]); `DELETE` empties it |
//! | `POST /mock/revoke` | invalidates every issued token (as deactivating credentials does) |
//! | `POST /mock/token-endpoint/fail?mode=500\|timeout\|rate_limit\|slow&count=N` | the next N token requests fail that way (`slow`: answer after 5 s) |
//! | `POST /mock/orders/fail?mode=500\|timeout\|reset\|402\|409&count=N[&hold_ms=M]` | the next N order placements fail that way (see [`OrderFailure`]; `timeout` holds 35 s or `hold_ms`) |
//! | `POST /mock/reject-bearer?on=true\|false` | every Bearer or DPoP token is refused with 401 while on |
//! | `POST /mock/dpop-nonce/rotate` | a new DPoP server nonce (nonce mode); the old one stops working |
//!
//! # Principals and ownership
//!
//! Every accepted RaaS request is made by a *principal*: with Basic, the platform name; with a
//! Bearer or DPoP token, the service account it was minted for (password grant), else the
//! client id (client credentials). Customers and accounts have an owner principal (seeded ones
//! from [`MockAccount::owner`], created ones from whoever created them); a principal sees only
//! its own and ownerless records, and orders and line items of the accounts it sees. Anything
//! else answers Tango's 404 (`Account not found`, `404.002`). The seed customer
//! [`SEED_CUSTOMER`] and account [`SEED_ACCOUNT`] are ownerless: every principal sees them.
//!
//! # RaaS routes (under `/raas/v2`)
//!
//! | route | answers |
//! | --- | --- |
//! | `GET catalogs` | brands with items (`utid`, `currencyCode`): `U000001` USD, `U000002` EUR, `U561593` and `U157189` USD |
//! | `GET/POST customers`, `GET customers/{id}`, `GET/POST customers/{id}/accounts` | the principal's customers with its accounts |
//! | `GET accounts`, `GET accounts/{id}` | the principal's accounts (balance, currency) |
//! | `POST orders` | 201 new, 200 repeat of an `externalRefID` on the same account, 402 short of funds |
//! | `POST asyncOrders` | 202 `PENDING` (the order is complete at once for lookups), 200 repeat |
//! | `GET orders/{id}`, `GET orders?accountIdentifier=&customerIdentifier=&externalRefID=&elementsPerPage=&page=` | orders with `reward.credentials`; a list without filters holds every order of every account the principal sees, as Tango's does |
//! | `GET lineItems/{id}`, `GET lineItems?...` (the same filters) | one line item per order, naming its account and customer, with the order's reward credentials |
//! | `POST creditCardDeposits`, `POST transferFunds` | 200 `SUCCESS`, moving money between visible accounts |
//!
//! An order's `denomination` is in its reward's currency; `amountCharged` is in the account's, at
//! fixed rates (1 EUR = 1.10 USD, 1 GBP = 1.25 USD, 1 CAD = 0.75 USD).
//!
//! # Credentials
//!
//! | config | kind | name | secret | owns |
//! | --- | --- | --- | --- | --- |
//! | [`MockConfig::default`] | Basic platform | `demo-platform` | `demo-api-key` | nothing (sees the seed) |
//! | [`MockConfig::default`] | OAuth client | `demo-client` | `demo-client-secret` | nothing |
//! | [`MockConfig::default`] | service account of `demo-client` | `demo-user` | `demo-password` | nothing |
//! | [`MockConfig::with_stores`]`(n)` | OAuth client | `franchise` | `franchise-secret` | nothing |
//! | [`MockConfig::with_stores`]`(n)` | service account of `franchise`, N = 1..=n | `store-N` | `store-N-password` | customer `C-STORE-N`, account `A-STORE-N` ($100,000.00 USD) |
//!
//! `mock-tango --stores N` adds the `with_stores` rows to the credentials given on the command
//! line. [`MockConfig::platforms`] adds Basic platforms; [`MockConfig::accounts`] seeds accounts.
//!
//! Besides the hooks, [`MockConfig::token_failure_rate`] (`mock-tango --token-failure-rate`)
//! answers a random share of token requests with 503 `temporarily_unavailable`, for soak runs
//! against an identity provider that fails now and then.
//!
//! DPoP is checked strictly on both the token endpoint and the RaaS routes (see `dpop`); a
//! token request with a valid proof gets a DPoP-bound token (`token_type` `DPoP`), which then
//! only works as `Authorization: DPoP` with a proof from the same key.
//!
//! Data lives in memory and starts with one customer and one funded account, plus the accounts
//! of [`MockConfig::accounts`].

mod data;
mod dpop;
mod oauth;
mod orders;
mod raas;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;

pub use oauth::{FailMode, TokenTimeline};
pub use orders::OrderFailure;

use crate::random_hex;
use crate::secret::Secret;

/// The account every mock starts with.
pub const SEED_ACCOUNT: &str = "A00000001";
/// The customer that owns it.
pub const SEED_CUSTOMER: &str = "demo-customer";

/// An OAuth client the mock knows, with its service accounts.
#[derive(Debug, Clone)]
pub struct MockClient {
    /// Shown in the rate-limit message, like Tango's "Client {name} {id}".
    pub name: String,
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: Secret,
    /// Service accounts: user name and password.
    pub service_accounts: Vec<(String, Secret)>,
}

/// An account the mock starts with, owned by one principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockAccount {
    /// The principal that owns it (and its customer, when the seed creates the customer): a
    /// platform name, service-account user name or client id.
    pub owner: String,
    /// Its customer; created (owned by `owner`) unless it exists.
    pub customer: String,
    /// The account identifier; a repeated identifier is ignored (the first seed wins).
    pub account: String,
    /// The starting balance in cents.
    pub balance_cents: i64,
    /// Its currency (`USD`, `EUR`, `GBP` or `CAD` can be ordered from).
    pub currency: String,
}

/// The OAuth client [`MockConfig::with_stores`] adds.
pub const STORES_CLIENT_ID: &str = "franchise";

/// What the mock accepts and how it behaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Basic user name.
    pub platform_name: String,
    /// Basic password.
    pub api_key: Secret,
    /// More Basic credential sets (platform name, API key) besides the one above.
    pub platforms: Vec<(String, Secret)>,
    /// Accounts to seed besides [`SEED_ACCOUNT`], each owned by a principal.
    pub accounts: Vec<MockAccount>,
    /// OAuth clients.
    pub clients: Vec<MockClient>,
    /// Multiplies every token lifetime and the rate-limit window (0.001 turns 24 h into 86 s).
    pub time_scale: f64,
    /// Client-credentials tokens one client may mint per 20-hour window (scaled); None = no limit.
    pub client_credentials_limit: Option<u32>,
    /// Demand DPoP server nonces (`use_dpop_nonce`) on both endpoints.
    pub dpop_nonces: bool,
    /// The share of token requests (0 to 1), drawn at random, answered 503
    /// `temporarily_unavailable` instead of a token: an identity provider that fails now and then.
    pub token_failure_rate: f64,
}

impl Default for MockConfig {
    /// The demo's credentials: platform `demo-platform` / `demo-api-key`, client `demo-client` /
    /// `demo-client-secret` with service account `demo-user` / `demo-password`.
    fn default() -> Self {
        Self {
            platform_name: "demo-platform".into(),
            api_key: Secret::new("demo-api-key"),
            platforms: Vec::new(),
            accounts: Vec::new(),
            clients: vec![MockClient {
                name: "Demo".into(),
                client_id: "demo-client".into(),
                client_secret: Secret::new("demo-client-secret"),
                service_accounts: vec![("demo-user".into(), Secret::new("demo-password"))],
            }],
            time_scale: 1.0,
            client_credentials_limit: Some(1),
            dpop_nonces: false,
            token_failure_rate: 0.0,
        }
    }
}

impl MockConfig {
    /// The default config plus a franchise of `n` stores: OAuth client `franchise` (secret
    /// `franchise-secret`) with service accounts `store-1`..`store-n` (passwords
    /// `store-N-password`), each owning customer `C-STORE-N` with account `A-STORE-N` holding
    /// $100,000.00 USD.
    pub fn with_stores(n: usize) -> MockConfig {
        let mut config = MockConfig::default();
        config.add_stores(n);
        config
    }

    /// Adds [`MockConfig::with_stores`]'s client and store accounts to this config.
    pub(crate) fn add_stores(&mut self, n: usize) {
        self.clients.push(MockClient {
            name: "Franchise".into(),
            client_id: STORES_CLIENT_ID.into(),
            client_secret: Secret::new("franchise-secret"),
            service_accounts: (1..=n)
                .map(|i| {
                    (
                        format!("store-{i}"),
                        Secret::new(format!("store-{i}-password")),
                    )
                })
                .collect(),
        });
        self.accounts.extend((1..=n).map(|i| MockAccount {
            owner: format!("store-{i}"),
            customer: format!("C-STORE-{i}"),
            account: format!("A-STORE-{i}"),
            balance_cents: 10_000_000,
            currency: "USD".into(),
        }));
    }
}

/// One RaaS request as the mock received it (`MockTango::requests`, `GET /mock/requests`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeenRequest {
    /// Who sent it; None when its credential was refused.
    pub principal: Option<String>,
    /// The HTTP method.
    pub method: String,
    /// The path, as received (not decoded).
    pub path: String,
    /// The query string, as received.
    pub query: Option<String>,
    /// The body, when it was JSON (by content type) of at most 64 KiB, from an accepted request.
    pub body: Option<serde_json::Value>,
}

/// How many requests [`MockTango::requests`] keeps (the oldest are dropped first).
pub const REQUEST_LOG_CAP: usize = 20_000;
/// The largest body the request log keeps.
const LOGGED_BODY_MAX: usize = 64 * 1024;
/// The largest body a RaaS request may have (axum's default limit, which the routes had).
const BODY_MAX: usize = 2 * 1024 * 1024;

/// What the mock has seen.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MockStats {
    /// RaaS requests received.
    pub requests: u64,
    /// RaaS requests by credential: `basic:<platform>`, `bearer:<client id>`, `dpop:<client id>`,
    /// `basic-invalid`, `bearer-invalid`, `dpop-invalid`, `dpop-use-nonce`, `other-scheme` or
    /// `none`.
    pub credentials: BTreeMap<String, u64>,
    /// Token endpoint requests by `grant_type` (every request, failed ones included).
    pub token_requests: BTreeMap<String, u64>,
    /// Tokens issued.
    pub tokens_issued: u64,
    /// Token requests answered with a failure that was asked for (`token_failure_rate` or the
    /// `/mock/token-endpoint/fail` hook) instead of a token.
    pub token_failures: u64,
    /// Times every issued token was revoked (`/mock/revoke`).
    pub revocations: u64,
    /// Orders created.
    pub orders: u64,
    /// Accepted RaaS requests by principal (see the module documentation).
    pub by_principal: BTreeMap<String, u64>,
}

impl MockStats {
    /// All token endpoint requests.
    pub fn total_token_requests(&self) -> u64 {
        self.token_requests.values().sum()
    }
}

/// The mock Tango server's shared state.
#[derive(Debug, Clone)]
pub struct MockTango(Arc<MockInner>);

#[derive(Debug)]
struct MockInner {
    config: MockConfig,
    stats: Mutex<MockStats>,
    data: Mutex<data::Data>,
    tokens: oauth::Tokens,
    dpop: dpop::Verifier,
    requests: Mutex<VecDeque<SeenRequest>>,
    order_failures: orders::FailurePlan,
}

/// The principal a RaaS request was accepted for, handed to the routes as a request extension.
#[derive(Debug, Clone)]
struct Principal(String);

impl MockTango {
    /// A mock accepting `config`'s credentials, with seed data.
    pub fn new(config: MockConfig) -> Self {
        let verifier = dpop::Verifier::default();
        if config.dpop_nonces {
            verifier.require_nonces();
        }
        let data = data::Data::seeded(&config.accounts);
        Self(Arc::new(MockInner {
            config,
            stats: Mutex::default(),
            data: Mutex::new(data),
            tokens: oauth::Tokens::default(),
            dpop: verifier,
            requests: Mutex::default(),
            order_failures: orders::FailurePlan::default(),
        }))
    }

    /// Replaces the DPoP server nonce (nonce mode); proofs with the old one get `use_dpop_nonce`.
    pub fn rotate_dpop_nonce(&self) {
        self.0.dpop.rotate_nonce();
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MockStats {
        lock(&self.0.stats).clone()
    }

    /// Invalidates every issued token.
    pub fn revoke_all(&self) {
        self.0.tokens.revoke_all();
        self.count(|s| s.revocations += 1);
    }

    /// Stops accepting a client secret or service-account password, as an identity provider
    /// does once a rotation is finished: token requests sending it get `invalid_client` (or
    /// `invalid_grant`). A client may be configured more than once with the same id and
    /// different secrets, so an old and a new secret can both be valid meanwhile.
    pub fn retire_secret(&self, secret: &str) {
        lock(&self.0.tokens.retired).insert(secret.to_string());
    }

    /// Makes the next `count` token requests fail with `mode`.
    pub fn fail_token_requests(&self, mode: FailMode, count: usize) {
        self.0.tokens.fail_next(mode, count);
    }

    /// Makes the next `count` order placements (`POST /orders` or `/asyncOrders` that name a
    /// visible account and pass validation) fail with `failure`.
    pub fn fail_orders(&self, failure: OrderFailure, count: usize) {
        self.0.order_failures.push(failure, count);
    }

    /// The last [`REQUEST_LOG_CAP`] RaaS requests, oldest first.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.0.requests).iter().cloned().collect()
    }

    /// Forgets the recorded requests (a test's next phase starts from an empty log).
    pub fn clear_requests(&self) {
        lock(&self.0.requests).clear();
    }

    /// While on, every Bearer token is refused with 401.
    pub fn reject_all_bearer(&self, on: bool) {
        self.0.tokens.reject_all(on);
    }

    /// While on, the token endpoint ignores DPoP proofs and issues Bearer tokens (a
    /// misconfigured server; a DPoP profile must refuse such tokens).
    pub fn issue_bearer_despite_dpop(&self, on: bool) {
        self.0.tokens.ignore_dpop(on);
    }

    /// Issue time, expiry and first use of every token, in issue order.
    pub fn token_timeline(&self) -> Vec<TokenTimeline> {
        self.0.tokens.timeline()
    }

    /// The access tokens issued so far (tests check they never reach a log).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.0.tokens.values()
    }

    /// Every reward credential (claim codes, PINs) of the orders placed so far: secrets of the
    /// recipients, which tests check never reach a log.
    pub fn reward_credentials(&self) -> Vec<String> {
        self.data()
            .orders
            .iter()
            .filter_map(|o| o.json.pointer("/reward/credentials")?.as_object().cloned())
            .flat_map(|c| {
                c.into_iter()
                    .filter_map(|(_, v)| v.as_str().map(str::to_string))
            })
            .collect()
    }

    /// The routes: RaaS under `/raas/v2`, the token endpoint at `/oauth/token`, hooks under `/mock`.
    pub fn router(&self) -> Router {
        let raas = raas::routes()
            .layer(middleware::from_fn_with_state(
                self.clone(),
                check_credential,
            ))
            .with_state(self.clone());
        Router::new()
            .merge(raas)
            .route("/oauth/token", post(oauth::token_endpoint))
            .route("/mock/stats", get(stats))
            .route("/mock/requests", get(requests).delete(clear_requests))
            .route("/mock/revoke", post(revoke))
            .route("/mock/token-endpoint/fail", post(fail_hook))
            .route("/mock/orders/fail", post(fail_orders_hook))
            .route("/mock/reject-bearer", post(reject_hook))
            .route("/mock/dpop-nonce/rotate", post(rotate_hook))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Binds `addr` and serves in the background; returns the bound address.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = self.serve(listener, std::future::pending()).await {
                tracing::error!("mock Tango stopped: {e}");
            }
        });
        Ok(bound)
    }

    fn data(&self) -> MutexGuard<'_, data::Data> {
        lock(&self.0.data)
    }

    fn count(&self, f: impl FnOnce(&mut MockStats)) {
        f(&mut lock(&self.0.stats));
    }

    fn record(&self, seen: SeenRequest) {
        let mut log = lock(&self.0.requests);
        if log.len() >= REQUEST_LOG_CAP {
            log.pop_front();
        }
        log.push_back(seen);
    }
}

/// Locks a mutex, recovering the data if a handler panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn stats(State(mock): State<MockTango>) -> Json<MockStats> {
    Json(mock.stats())
}

async fn requests(State(mock): State<MockTango>) -> Json<Vec<SeenRequest>> {
    Json(mock.requests())
}

async fn clear_requests(State(mock): State<MockTango>) -> StatusCode {
    mock.clear_requests();
    StatusCode::NO_CONTENT
}

async fn revoke(State(mock): State<MockTango>) -> StatusCode {
    mock.revoke_all();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct FailQuery {
    mode: String,
    count: Option<usize>,
}

async fn fail_hook(State(mock): State<MockTango>, Query(q): Query<FailQuery>) -> Response {
    let mode = match q.mode.as_str() {
        "500" => FailMode::ServerError,
        "timeout" => FailMode::Timeout,
        "rate_limit" => FailMode::RateLimit,
        "slow" => FailMode::Slow(std::time::Duration::from_secs(5)),
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("unknown mode {other:?}; use 500, timeout, rate_limit or slow\n"),
            )
                .into_response()
        }
    };
    mock.fail_token_requests(mode, q.count.unwrap_or(1));
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct OrderFailQuery {
    mode: String,
    count: Option<usize>,
    hold_ms: Option<u64>,
}

/// The longest `hold_ms` accepted: long enough for any client timeout, short enough to end.
const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(600);

async fn fail_orders_hook(
    State(mock): State<MockTango>,
    Query(q): Query<OrderFailQuery>,
) -> Response {
    let hold = match q.hold_ms.map(std::time::Duration::from_millis) {
        Some(h) if h > MAX_HOLD => {
            return (
                StatusCode::BAD_REQUEST,
                format!("hold_ms must be at most {}\n", MAX_HOLD.as_millis()),
            )
                .into_response()
        }
        Some(h) => h,
        None => OrderFailure::TIMEOUT_HOLD,
    };
    let failure = match q.mode.as_str() {
        "500" => OrderFailure::ServerError,
        "timeout" => OrderFailure::Timeout(hold),
        "reset" => OrderFailure::Reset,
        "402" => OrderFailure::InsufficientFunds,
        "409" => OrderFailure::StillProcessing,
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("unknown mode {other:?}; use 500, timeout, reset, 402 or 409\n"),
            )
                .into_response()
        }
    };
    mock.fail_orders(failure, q.count.unwrap_or(1));
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct RejectQuery {
    on: bool,
}

async fn reject_hook(State(mock): State<MockTango>, Query(q): Query<RejectQuery>) -> StatusCode {
    mock.reject_all_bearer(q.on);
    StatusCode::NO_CONTENT
}

async fn rotate_hook(State(mock): State<MockTango>) -> StatusCode {
    mock.rotate_dpop_nonce();
    StatusCode::NO_CONTENT
}

/// Classifies the credential, counts and records the request, rejects anything Tango would
/// reject, and hands the principal of an accepted one to the routes.
async fn check_credential(State(mock): State<MockTango>, req: Request, next: Next) -> Response {
    let seen = classify(&req, &mock);
    let principal = seen.principal().map(str::to_string);
    mock.count(|s| {
        s.requests += 1;
        *s.credentials.entry(seen.label()).or_default() += 1;
        if let Some(p) = &principal {
            *s.by_principal.entry(p.clone()).or_default() += 1;
        }
    });
    let mut entry = SeenRequest {
        principal: principal.clone(),
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().map(str::to_string),
        body: None,
    };
    let mut resp = match principal {
        Some(principal) => {
            let (parts, body) = req.into_parts();
            match read_body(body, &parts.uri).await {
                Ok(bytes) => {
                    entry.body = logged_body(&parts.headers, &bytes);
                    mock.record(entry);
                    let mut req = Request::from_parts(parts, axum::body::Body::from(bytes));
                    req.extensions_mut().insert(Principal(principal));
                    next.run(req).await
                }
                Err(resp) => {
                    mock.record(entry);
                    *resp
                }
            }
        }
        None => {
            mock.record(entry);
            let mut resp = tango_error(
                StatusCode::UNAUTHORIZED,
                req.uri().path(),
                "401.001",
                &seen.reason(),
            );
            if let Ok(v) = HeaderValue::from_str(&seen.challenge()) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            resp
        }
    };
    if let Some(nonce) = mock.0.dpop.current_nonce() {
        if let Ok(v) = HeaderValue::from_str(&nonce) {
            resp.headers_mut().insert("dpop-nonce", v);
        }
    }
    // Tango stamps its own id on every answer; support asks for it.
    if let Ok(id) = HeaderValue::from_str(&request_id()) {
        resp.headers_mut().insert("x-request-id", id);
    }
    resp
}

enum Seen {
    Basic(String),
    Bearer(oauth::TokenUse),
    Dpop(oauth::TokenUse),
    BasicInvalid,
    BearerInvalid,
    DpopInvalid(String),
    DpopUseNonce,
    OtherScheme,
    Missing,
}

impl Seen {
    fn label(&self) -> String {
        match self {
            Seen::Basic(p) => format!("basic:{p}"),
            Seen::Bearer(t) => format!("bearer:{}", t.client_id),
            Seen::Dpop(t) => format!("dpop:{}", t.client_id),
            Seen::BasicInvalid => "basic-invalid".into(),
            Seen::BearerInvalid => "bearer-invalid".into(),
            Seen::DpopInvalid(_) => "dpop-invalid".into(),
            Seen::DpopUseNonce => "dpop-use-nonce".into(),
            Seen::OtherScheme => "other-scheme".into(),
            Seen::Missing => "none".into(),
        }
    }

    /// Who an accepted credential speaks for; None when it is refused.
    fn principal(&self) -> Option<&str> {
        match self {
            Seen::Basic(p) => Some(p),
            Seen::Bearer(t) | Seen::Dpop(t) => Some(&t.principal),
            _ => None,
        }
    }

    fn reason(&self) -> String {
        match self {
            Seen::Basic(_) | Seen::Bearer(_) | Seen::Dpop(_) => String::new(),
            Seen::BasicInvalid => "Invalid platform name or API key".into(),
            Seen::BearerInvalid => "The access token is invalid or expired".into(),
            Seen::DpopInvalid(why) => format!("Invalid DPoP proof or token: {why}"),
            Seen::DpopUseNonce => "Resource server requires nonce in DPoP proof".into(),
            Seen::OtherScheme => "Unsupported authorization scheme".into(),
            Seen::Missing => "Full authentication is required to access this resource".into(),
        }
    }

    fn challenge(&self) -> String {
        match self {
            Seen::BearerInvalid => {
                "Bearer error=\"invalid_token\", error_description=\"The access token is invalid or expired\"".into()
            }
            Seen::DpopInvalid(why) if why.starts_with("token") => {
                "DPoP algs=\"ES256 EdDSA\", error=\"invalid_token\"".into()
            }
            Seen::DpopInvalid(_) => "DPoP algs=\"ES256 EdDSA\", error=\"invalid_dpop_proof\"".into(),
            Seen::DpopUseNonce => "DPoP algs=\"ES256 EdDSA\", error=\"use_dpop_nonce\"".into(),
            _ => "Basic realm=\"tango\"".into(),
        }
    }
}

/// The whole body of an accepted request (the routes and the request log both need it).
async fn read_body(body: axum::body::Body, uri: &http::Uri) -> Result<bytes::Bytes, Box<Response>> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, BODY_MAX).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Box::new(tango_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            uri.path(),
            "413.001",
            "Request body too large",
        ))),
        Err(_) => Err(Box::new(tango_error(
            StatusCode::BAD_REQUEST,
            uri.path(),
            "400.001",
            "The request body could not be read",
        ))),
    }
}

/// The body as the request log keeps it: JSON by content type, at most 64 KiB.
fn logged_body(headers: &HeaderMap, body: &[u8]) -> Option<serde_json::Value> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"));
    if !is_json || body.len() > LOGGED_BODY_MAX {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// The URL a request was sent to, as the mock sees it (it serves plain http).
fn request_url(headers: &HeaderMap, path: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}{path}")
}

fn classify(req: &Request, mock: &MockTango) -> Seen {
    let headers = req.headers();
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Seen::Missing;
    };
    if let Some(token) = value.strip_prefix("Bearer ") {
        return match mock.0.tokens.check(token.trim()) {
            Some(t) if t.jkt.is_none() => Seen::Bearer(t),
            _ => Seen::BearerInvalid,
        };
    }
    if let Some(token) = value.strip_prefix("DPoP ") {
        let token = token.trim();
        let Some((jkt, token_use)) = mock
            .0
            .tokens
            .check(token)
            .and_then(|t| Some((t.jkt.clone()?, t)))
        else {
            return Seen::DpopInvalid("token invalid, expired or not DPoP-bound".into());
        };
        let Some(proof) = headers.get("dpop").and_then(|v| v.to_str().ok()) else {
            return Seen::DpopInvalid("no DPoP proof".into());
        };
        let url = request_url(headers, req.uri().path());
        return match mock
            .0
            .dpop
            .verify(proof, req.method().as_str(), &url, Some(token))
        {
            Ok(thumbprint) if thumbprint == jkt => Seen::Dpop(token_use),
            Ok(_) => Seen::DpopInvalid("token bound to another key".into()),
            Err(dpop::ProofError::UseNonce) => Seen::DpopUseNonce,
            Err(dpop::ProofError::Invalid(why)) => Seen::DpopInvalid(why),
        };
    }
    let Some(encoded) = value.strip_prefix("Basic ") else {
        return Seen::OtherScheme;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return Seen::BasicInvalid;
    };
    let config = &mock.0.config;
    let decoded = zeroize::Zeroizing::new(decoded);
    let sets = std::iter::once((&config.platform_name, &config.api_key))
        .chain(config.platforms.iter().map(|(name, key)| (name, key)));
    for (name, key) in sets {
        let expected = zeroize::Zeroizing::new(format!("{name}:{}", key.expose()));
        if decoded.as_slice() == expected.as_bytes() {
            return Seen::Basic(name.clone());
        }
    }
    Seen::BasicInvalid
}

/// A response in Tango's error shape.
pub fn tango_error(status: StatusCode, path: &str, i18n_key: &str, message: &str) -> Response {
    tango_error_with(status, path, i18n_key, message, Vec::new())
}

/// A response in Tango's error shape with field errors.
pub fn tango_error_with(
    status: StatusCode,
    path: &str,
    i18n_key: &str,
    message: &str,
    errors: Vec<serde_json::Value>,
) -> Response {
    let mut body = json!({
        "timestamp": now(),
        "requestId": request_id(),
        "path": path,
        "httpCode": status.as_u16(),
        "httpPhrase": status.canonical_reason().unwrap_or_default(),
        "i18nKey": i18n_key,
        "message": message,
    });
    if !errors.is_empty() {
        body["errors"] = serde_json::Value::Array(errors);
    }
    (status, Json(body)).into_response()
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn request_id() -> String {
    random_hex(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(n: usize) -> SeenRequest {
        SeenRequest {
            principal: None,
            method: "GET".into(),
            path: format!("/raas/v2/orders/{n}"),
            query: None,
            body: None,
        }
    }

    #[test]
    fn the_request_log_keeps_the_newest_entries_up_to_its_cap() {
        let mock = MockTango::new(MockConfig::default());
        for n in 0..REQUEST_LOG_CAP + 5 {
            mock.record(seen(n));
        }
        let log = mock.requests();
        assert_eq!(log.len(), REQUEST_LOG_CAP);
        assert_eq!(log[0], seen(5));
        assert_eq!(log[REQUEST_LOG_CAP - 1], seen(REQUEST_LOG_CAP + 4));
    }

    #[test]
    fn only_json_bodies_up_to_64_kib_are_logged() {
        let json = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            h
        };
        let body = br#"{"accountIdentifier":"A1"}"#;
        assert_eq!(
            logged_body(&json("application/json; charset=utf-8"), body),
            Some(json!({"accountIdentifier": "A1"}))
        );
        assert_eq!(logged_body(&json("text/plain"), body), None);
        assert_eq!(logged_body(&HeaderMap::new(), body), None);
        assert_eq!(logged_body(&json("application/json"), b"{not json"), None);
        let exact = format!("\"{}\"", "x".repeat(LOGGED_BODY_MAX - 2));
        assert!(logged_body(&json("application/json"), exact.as_bytes()).is_some());
        let over = format!("\"{}\"", "x".repeat(LOGGED_BODY_MAX - 1));
        assert_eq!(
            logged_body(&json("application/json"), over.as_bytes()),
            None
        );
    }

    #[test]
    fn with_stores_adds_a_franchise_client_whose_service_accounts_own_one_account_each() {
        let config = MockConfig::with_stores(3);
        let default = MockConfig::default();
        assert_eq!(config.clients.len(), default.clients.len() + 1);
        let franchise = config
            .clients
            .iter()
            .find(|c| c.client_id == STORES_CLIENT_ID)
            .unwrap();
        assert_eq!(franchise.client_secret.expose(), "franchise-secret");
        let accounts: Vec<_> = franchise
            .service_accounts
            .iter()
            .map(|(u, p)| (u.as_str(), p.expose()))
            .collect();
        assert_eq!(
            accounts,
            [
                ("store-1", "store-1-password"),
                ("store-2", "store-2-password"),
                ("store-3", "store-3-password")
            ]
        );
        assert_eq!(
            config.accounts[2],
            MockAccount {
                owner: "store-3".into(),
                customer: "C-STORE-3".into(),
                account: "A-STORE-3".into(),
                balance_cents: 10_000_000,
                currency: "USD".into(),
            }
        );
        assert_eq!(config.accounts.len(), 3);
        assert_eq!(config.platform_name, default.platform_name);
    }
}
