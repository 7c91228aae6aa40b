//! The mock's token endpoint (`POST /oauth/token`) and the tokens it has issued.
//!
//! Accepts `grant_type=password` (service accounts) and `client_credentials` as Tango does, with
//! lifetimes by audience (24 h, or 5 min for the five-minute audiences) scaled by `time_scale`.
//! Client-credentials minting is limited per 20-hour (scaled) window and answers Tango's 400
//! rate-limit text beyond it. Failures can be injected for the next N requests, or for a random
//! share of all requests (`MockConfig::token_failure_rate`). Each token remembers whom it was
//! minted for, so the RaaS routes can tell which principal sent a request.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use super::{lock, random_hex, MockTango};

/// How an injected token endpoint failure looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// 500 with a JSON error.
    ServerError,
    /// No answer for 60 s (clients time out first).
    Timeout,
    /// Tango's 400 daily rate-limit answer.
    RateLimit,
    /// A normal answer, after this delay.
    Slow(Duration),
}

/// One issued token's life, in milliseconds since the mock's tokens registry started.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenTimeline {
    /// When it was issued.
    pub issued_ms: u64,
    /// When the mock stops accepting it.
    pub expires_ms: u64,
    /// When a RaaS request first carried it.
    pub first_used_ms: Option<u64>,
}

#[derive(Debug)]
struct Issued {
    value: String,
    client_id: String,
    /// The service account of a password grant; None for client credentials.
    username: Option<String>,
    issued: Instant,
    expires: Instant,
    first_used: Option<Instant>,
    revoked: bool,
    jkt: Option<String>,
}

/// Whom a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TokenUse {
    /// The OAuth client it was minted from.
    pub(super) client_id: String,
    /// The service account it was minted for (password grant), else the client id.
    pub(super) principal: String,
    /// The key thumbprint of a DPoP-bound token.
    pub(super) jkt: Option<String>,
}

/// The issued tokens and the failure plan.
#[derive(Debug)]
pub(super) struct Tokens {
    started: Instant,
    issued: Mutex<Vec<Issued>>,
    by_value: Mutex<HashMap<String, usize>>,
    failures: Mutex<VecDeque<FailMode>>,
    reject_all: Mutex<bool>,
    ignore_dpop: Mutex<bool>,
    cc_mints: Mutex<HashMap<String, Vec<Instant>>>,
    /// Client secrets and passwords no longer accepted (rotated out at the identity provider).
    pub(super) retired: Mutex<std::collections::HashSet<String>>,
}

impl Default for Tokens {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            issued: Mutex::default(),
            by_value: Mutex::default(),
            failures: Mutex::default(),
            reject_all: Mutex::new(false),
            ignore_dpop: Mutex::new(false),
            cc_mints: Mutex::default(),
            retired: Mutex::default(),
        }
    }
}

impl Tokens {
    pub(super) fn revoke_all(&self) {
        for t in lock(&self.issued).iter_mut() {
            t.revoked = true;
        }
    }

    pub(super) fn fail_next(&self, mode: FailMode, count: usize) {
        lock(&self.failures).extend(std::iter::repeat_n(mode, count));
    }

    pub(super) fn reject_all(&self, on: bool) {
        *lock(&self.reject_all) = on;
    }

    pub(super) fn ignore_dpop(&self, on: bool) {
        *lock(&self.ignore_dpop) = on;
    }

    /// Whom a valid token speaks for and its DPoP binding, recording its first use.
    pub(super) fn check(&self, value: &str) -> Option<TokenUse> {
        if *lock(&self.reject_all) {
            return None;
        }
        let idx = *lock(&self.by_value).get(value)?;
        let mut issued = lock(&self.issued);
        let t = issued.get_mut(idx)?;
        let now = Instant::now();
        if t.revoked || now >= t.expires {
            return None;
        }
        t.first_used.get_or_insert(now);
        Some(TokenUse {
            client_id: t.client_id.clone(),
            principal: t.username.clone().unwrap_or_else(|| t.client_id.clone()),
            jkt: t.jkt.clone(),
        })
    }

    pub(super) fn timeline(&self) -> Vec<TokenTimeline> {
        let ms = |i: Instant| i.duration_since(self.started).as_millis() as u64;
        lock(&self.issued)
            .iter()
            .map(|t| TokenTimeline {
                issued_ms: ms(t.issued),
                expires_ms: ms(t.expires),
                first_used_ms: t.first_used.map(ms),
            })
            .collect()
    }

    pub(super) fn values(&self) -> Vec<String> {
        lock(&self.issued).iter().map(|t| t.value.clone()).collect()
    }

    fn issue(
        &self,
        client_id: &str,
        username: Option<&str>,
        ttl: Duration,
        jkt: Option<String>,
    ) -> String {
        let value = random_hex(24);
        let now = Instant::now();
        let mut issued = lock(&self.issued);
        issued.push(Issued {
            value: value.clone(),
            client_id: client_id.to_string(),
            username: username.map(str::to_string),
            issued: now,
            expires: now + ttl,
            first_used: None,
            revoked: false,
            jkt,
        });
        lock(&self.by_value).insert(value.clone(), issued.len() - 1);
        value
    }
}

#[derive(Deserialize)]
pub(super) struct TokenForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    username: Option<String>,
    password: Option<String>,
    scope: Option<String>,
    audience: Option<String>,
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

pub(super) async fn token_endpoint(
    State(mock): State<MockTango>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Response {
    let mut resp = issue_token(&mock, &headers, form).await;
    if let Some(nonce) = mock.0.dpop.current_nonce() {
        if let Ok(v) = HeaderValue::from_str(&nonce) {
            resp.headers_mut().insert("dpop-nonce", v);
        }
    }
    resp
}

async fn issue_token(mock: &MockTango, headers: &HeaderMap, form: TokenForm) -> Response {
    let grant = form.grant_type.clone().unwrap_or_default();
    mock.count(|s| *s.token_requests.entry(grant.clone()).or_default() += 1);
    let tokens = &mock.0.tokens;
    let config = &mock.0.config;

    let injected = lock(&tokens.failures).pop_front();
    let failing = matches!(
        injected,
        Some(FailMode::ServerError | FailMode::Timeout | FailMode::RateLimit)
    );
    if failing {
        mock.count(|s| s.token_failures += 1);
    }
    if !failing && chance(config.token_failure_rate) {
        mock.count(|s| s.token_failures += 1);
        return oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "The token endpoint is temporarily unavailable (mock token failure rate)",
        );
    }
    match injected {
        Some(FailMode::ServerError) => {
            return oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "Internal error",
            )
        }
        Some(FailMode::Timeout) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return oauth_error(StatusCode::GATEWAY_TIMEOUT, "timeout", "Timed out");
        }
        Some(FailMode::Slow(delay)) => tokio::time::sleep(delay).await,
        Some(FailMode::RateLimit) => {
            let (name, id) = config
                .clients
                .first()
                .map(|c| (c.name.as_str(), c.client_id.as_str()))
                .unwrap_or(("Client", "unknown"));
            return rate_limited(name, id);
        }
        None => {}
    }

    let retired = lock(&tokens.retired).clone();
    let client = config.clients.iter().find(|c| {
        Some(c.client_id.as_str()) == form.client_id.as_deref()
            && Some(c.client_secret.expose()) == form.client_secret.as_deref()
            && !retired.contains(c.client_secret.expose())
    });
    let Some(client) = client else {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "Unauthorized");
    };
    match grant.as_str() {
        "password" => {
            let ok = client.service_accounts.iter().any(|(u, p)| {
                Some(u.as_str()) == form.username.as_deref()
                    && Some(p.expose()) == form.password.as_deref()
                    && !retired.contains(p.expose())
            });
            if !ok {
                return oauth_error(
                    StatusCode::FORBIDDEN,
                    "invalid_grant",
                    "Wrong username or password.",
                );
            }
        }
        "client_credentials" => {
            if let Some(limit) = config.client_credentials_limit {
                let window = Duration::from_secs(20 * 3600).mul_f64(config.time_scale);
                let now = Instant::now();
                let mut mints = lock(&tokens.cc_mints);
                let list = mints.entry(client.client_id.clone()).or_default();
                list.retain(|t| now.duration_since(*t) < window);
                if list.len() >= limit as usize {
                    return rate_limited(&client.name, &client.client_id);
                }
                list.push(now);
            }
        }
        other => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("grant type {other:?} is not supported"),
            )
        }
    }
    // A DPoP proof makes the token DPoP-bound to the proof's key.
    let ignore = *lock(&tokens.ignore_dpop);
    let jkt = match headers.get("dpop").map(|v| v.to_str().unwrap_or_default()) {
        None => None,
        Some(_) if ignore => None,
        Some(proof) => {
            let url = super::request_url(headers, "/oauth/token");
            match mock.0.dpop.verify(proof, "POST", &url, None) {
                Ok(jkt) => Some(jkt),
                Err(super::dpop::ProofError::UseNonce) => {
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "use_dpop_nonce",
                        "Authorization server requires nonce in DPoP proof",
                    )
                }
                Err(super::dpop::ProofError::Invalid(why)) => {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_dpop_proof", &why)
                }
            }
        }
    };
    let token_type = if jkt.is_some() { "DPoP" } else { "Bearer" };
    let audience = form.audience.unwrap_or_default();
    let base = crate::token::audience_lifetime(&audience);
    let secs = (base.as_secs_f64() * config.time_scale).round().max(1.0) as u64;
    // A password grant speaks for its service account; client credentials for the client.
    let username = (grant == "password")
        .then_some(form.username.as_deref())
        .flatten();
    let value = tokens.issue(&client.client_id, username, Duration::from_secs(secs), jkt);
    mock.count(|s| s.tokens_issued += 1);
    Json(json!({
        "access_token": value,
        "scope": form.scope.unwrap_or_else(|| "raas.all".into()),
        "expires_in": secs,
        "token_type": token_type,
    }))
    .into_response()
}

/// True with probability `rate` (0 never, 1 always), from the system's random source.
fn chance(rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    let mut b = [0u8; 4];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return false;
    }
    f64::from(u32::from_le_bytes(b)) < rate * f64::from(u32::MAX) + 1.0
}

fn rate_limited(name: &str, id: &str) -> Response {
    oauth_error(
        StatusCode::BAD_REQUEST,
        "access_denied",
        &format!("Client {name} {id} has exceeded the daily rate limit"),
    )
}
