//! A mock of Tango for local development, the demo and tests.
//!
//! It serves the RaaS endpoints apps use most (see [`raas`]) behind the credential checks Tango
//! makes (Basic, or a Bearer token from its own token endpoint, see [`oauth`]), answers errors in
//! Tango's JSON shape, and counts what it sees. Hooks for tests and local experiments live under
//! `/mock`:
//!
//! | hook | does |
//! | --- | --- |
//! | `GET /mock/stats` | RaaS requests by credential, token requests by grant, orders |
//! | `POST /mock/revoke` | invalidates every issued token (as deactivating credentials does) |
//! | `POST /mock/token-endpoint/fail?mode=500\|timeout\|rate_limit\|slow&count=N` | the next N token requests fail that way (`slow`: answer after 5 s) |
//! | `POST /mock/reject-bearer?on=true\|false` | every Bearer or DPoP token is refused with 401 while on |
//! | `POST /mock/dpop-nonce/rotate` | a new DPoP server nonce (nonce mode); the old one stops working |
//!
//! Besides the hooks, [`MockConfig::token_failure_rate`] (`mock-tango --token-failure-rate`)
//! answers a random share of token requests with 503 `temporarily_unavailable`, for soak runs
//! against an identity provider that fails now and then.
//!
//! DPoP is checked strictly on both the token endpoint and the RaaS routes (see [`dpop`]); a
//! token request with a valid proof gets a DPoP-bound token (`token_type` `DPoP`), which then
//! only works as `Authorization: DPoP` with a proof from the same key.
//!
//! Data lives in memory and starts with one customer and one funded account.

mod dpop;
mod oauth;
mod raas;

use std::collections::BTreeMap;
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

/// What the mock accepts and how it behaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Basic user name.
    pub platform_name: String,
    /// Basic password.
    pub api_key: Secret,
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
    data: Mutex<raas::Data>,
    tokens: oauth::Tokens,
    dpop: dpop::Verifier,
}

impl MockTango {
    /// A mock accepting `config`'s credentials, with seed data.
    pub fn new(config: MockConfig) -> Self {
        let verifier = dpop::Verifier::default();
        if config.dpop_nonces {
            verifier.require_nonces();
        }
        Self(Arc::new(MockInner {
            config,
            stats: Mutex::default(),
            data: Mutex::new(raas::Data::seeded()),
            tokens: oauth::Tokens::default(),
            dpop: verifier,
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

    /// Makes the next `count` token requests fail with `mode`.
    pub fn fail_token_requests(&self, mode: FailMode, count: usize) {
        self.0.tokens.fail_next(mode, count);
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
            .route("/mock/revoke", post(revoke))
            .route("/mock/token-endpoint/fail", post(fail_hook))
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

    fn data(&self) -> MutexGuard<'_, raas::Data> {
        lock(&self.0.data)
    }

    fn count(&self, f: impl FnOnce(&mut MockStats)) {
        f(&mut lock(&self.0.stats));
    }
}

/// Locks a mutex, recovering the data if a handler panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn stats(State(mock): State<MockTango>) -> Json<MockStats> {
    Json(mock.stats())
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

/// Classifies the credential, counts it, and rejects anything Tango would reject.
async fn check_credential(State(mock): State<MockTango>, req: Request, next: Next) -> Response {
    let seen = classify(&req, &mock);
    mock.count(|s| {
        s.requests += 1;
        *s.credentials.entry(seen.label()).or_default() += 1;
    });
    let mut resp = match seen {
        Seen::Basic(_) | Seen::Bearer(_) | Seen::Dpop(_) => next.run(req).await,
        other => {
            let mut resp = tango_error(
                StatusCode::UNAUTHORIZED,
                req.uri().path(),
                "401.001",
                &other.reason(),
            );
            if let Ok(v) = HeaderValue::from_str(&other.challenge()) {
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
    Bearer(String),
    Dpop(String),
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
            Seen::Bearer(c) => format!("bearer:{c}"),
            Seen::Dpop(c) => format!("dpop:{c}"),
            Seen::BasicInvalid => "basic-invalid".into(),
            Seen::BearerInvalid => "bearer-invalid".into(),
            Seen::DpopInvalid(_) => "dpop-invalid".into(),
            Seen::DpopUseNonce => "dpop-use-nonce".into(),
            Seen::OtherScheme => "other-scheme".into(),
            Seen::Missing => "none".into(),
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
            Some((client, None)) => Seen::Bearer(client),
            _ => Seen::BearerInvalid,
        };
    }
    if let Some(token) = value.strip_prefix("DPoP ") {
        let token = token.trim();
        let Some((client, Some(jkt))) = mock.0.tokens.check(token) else {
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
            Ok(thumbprint) if thumbprint == jkt => Seen::Dpop(client),
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
    let expected = zeroize::Zeroizing::new(format!(
        "{}:{}",
        config.platform_name,
        config.api_key.expose()
    ));
    if decoded.as_slice() == expected.as_bytes() {
        Seen::Basic(config.platform_name.clone())
    } else {
        Seen::BasicInvalid
    }
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
