//! OAuth 2.0 profiles: the token endpoint client and the [`OAuthAuthorizer`].
//!
//! [`TokenClient`] is the profile's [`TokenSource`]: one form POST per mint, parsed
//! defensively. [`OAuthAuthorizer`] turns the token the profile's [`TokenManager`] holds into
//! the headers of each request (a fresh DPoP proof per send for DPoP profiles) and decides
//! what a 401 from Tango means (see [`Challenge`]).
//!
//! Tango's answers vary: `expires_in` arrives as a number, a numeric string, `0` or not at all;
//! `token_type` in any case; errors as JSON (`error`, `error_description`) or plain text. The
//! rate-limit answer is a 400 whose text says "exceeded the daily rate limit". Nothing secret is
//! ever put into an error: bodies are quoted only after the access token field is known absent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue};
use serde::Deserialize;

use super::dpop::{self, htu, origin, Dpop};
use super::{
    AfterRejection, AuthError, Authorization, Authorizer, Credential, ProfileStatus, Replay, Target,
};
use crate::config::{AuthMethod, OAuthConfig, UpstreamConfig};
use crate::describe;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::token::{MintError, MintFuture, Minted, Need, Token, TokenManager, TokenSource};

/// Posts token requests for one profile.
///
/// **Secret rotation**: [`TokenClient::rotate`] replaces the client secret and password in
/// place; the token in hand is kept and the new secrets are first sent at the next mint, whenever
/// that falls due (the mint budget is the token manager's and is untouched). If the token
/// endpoint rejects the new secrets at that mint, the failure is logged at WARN and shown in
/// `/status`, and the previous secrets — kept in memory since the rotation, whether or not their
/// file still exists — are tried **once**. They are forgotten after that attempt, or as soon as
/// the new secrets have produced a token.
#[derive(Debug)]
pub struct TokenClient {
    http: reqwest::Client,
    url: String,
    form: Vec<(&'static str, FormValue)>,
    /// The values of the form's plain fields.
    plain: Vec<String>,
    timeout: Duration,
    dpop: Option<Arc<Dpop>>,
    /// The token endpoint's `htu` and origin, normalised once.
    htu: String,
    origin: String,
    secrets: RwLock<Arc<Secrets>>,
    rotation: std::sync::Mutex<Rotation>,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Debug, Clone, Copy)]
enum FormValue {
    Plain(usize),
    ClientSecret,
    Password,
}

/// What a token request sends that is secret.
#[derive(Debug)]
struct Secrets {
    client_secret: Secret,
    password: Option<Secret>,
}

impl Secrets {
    fn of(config: &OAuthConfig) -> Self {
        Self {
            client_secret: config.client_secret.clone(),
            password: config.password.clone(),
        }
    }

    fn same_as(&self, other: &Secrets) -> bool {
        self.client_secret.expose() == other.client_secret.expose()
            && self.password.as_ref().map(Secret::expose)
                == other.password.as_ref().map(Secret::expose)
    }
}

/// The state of the last secret rotation.
#[derive(Debug, Default)]
struct Rotation {
    /// The secrets replaced by the last rotation, until they have been tried once or the new
    /// ones have worked.
    previous: Option<Arc<Secrets>>,
    /// What `/status` shows.
    status: Option<SecretRotation>,
}

/// A profile's last secret rotation, as `/status` shows it (`profiles.NAME.secret_rotation`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecretRotation {
    /// When the new secrets were loaded (RFC 3339).
    pub rotated_at: String,
    /// `pending` (not sent yet: the token in hand is still in use), `in_use` (a token was
    /// minted with them), `refused_previous_used` (the token endpoint refused them; the previous
    /// secrets produced the token) or `refused` (refused, and no previous secrets were left).
    pub state: &'static str,
    /// The token endpoint's answer to the new secrets, when it refused them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl TokenClient {
    /// Builds the client: same roots as the API client, no redirects, per-request timeout.
    /// With `dpop`, every token request carries a proof.
    pub fn new(
        config: &OAuthConfig,
        upstream: &UpstreamConfig,
        dpop: Option<Arc<Dpop>>,
    ) -> Result<Self, String> {
        let uri: http::Uri = config
            .token_url
            .parse()
            .map_err(|e| format!("token_url: {e}"))?;
        let tls = crate::tls::tls_config(&upstream.extra_roots).map_err(|e| e.to_string())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.token_timeout)
            .user_agent(concat!("tango-auth-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the token client: {e}"))?;
        let grant = if config.username.is_some() {
            "password"
        } else {
            "client_credentials"
        };
        let mut plain = vec![grant.to_string(), config.client_id.clone()];
        let mut form = vec![
            ("grant_type", FormValue::Plain(0)),
            ("client_id", FormValue::Plain(1)),
            ("client_secret", FormValue::ClientSecret),
        ];
        if let (Some(u), Some(_)) = (&config.username, &config.password) {
            plain.push(u.clone());
            form.push(("username", FormValue::Plain(plain.len() - 1)));
            form.push(("password", FormValue::Password));
        }
        plain.push(config.scope.clone());
        form.push(("scope", FormValue::Plain(plain.len() - 1)));
        plain.push(config.audience.clone());
        form.push(("audience", FormValue::Plain(plain.len() - 1)));
        Ok(Self {
            http,
            url: config.token_url.clone(),
            form,
            plain,
            timeout: config.token_timeout,
            dpop,
            htu: htu(&uri),
            origin: origin(&uri),
            secrets: RwLock::new(Arc::new(Secrets::of(config))),
            rotation: std::sync::Mutex::default(),
            metrics: None,
        })
    }

    /// Counts refused secret rotations in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Takes the client secret and password of `config` (the same profile, reloaded) for the
    /// next mint. Returns false when they are the ones already in use.
    pub fn rotate(&self, config: &OAuthConfig) -> bool {
        let new = Arc::new(Secrets::of(config));
        let mut current = self.secrets.write().unwrap_or_else(|p| p.into_inner());
        if current.same_as(&new) {
            return false;
        }
        let old = std::mem::replace(&mut *current, new);
        let mut rotation = self.rotation();
        rotation.previous = Some(old);
        rotation.status = Some(SecretRotation {
            rotated_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            state: "pending",
            problem: None,
        });
        true
    }

    /// The last secret rotation, for `/status`.
    pub fn rotation_status(&self) -> Option<SecretRotation> {
        self.rotation().status.clone()
    }

    fn rotation(&self) -> std::sync::MutexGuard<'_, Rotation> {
        self.rotation.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> Arc<Secrets> {
        self.secrets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests one token. With DPoP, a `use_dpop_nonce` answer is retried once with the nonce.
    /// After a secret rotation, a refusal of the new secrets is followed by one attempt with the
    /// previous ones (see [`TokenClient`]). An error never carries this client's secrets, even
    /// when the endpoint echoes them back.
    async fn request(&self) -> Result<Minted, MintError> {
        let current = self.current();
        let result = self.exchange(&current).await.map_err(|e| self.scrub(e));
        let refused = match &result {
            Err(e @ MintError::Rejected { .. }) => e.to_string(),
            _ => {
                let mut rotation = self.rotation();
                // A success with the secrets in use now ends a rotation (not one with secrets
                // a rotation replaced while this request was out).
                if result.is_ok() && Arc::ptr_eq(&current, &self.current()) {
                    rotation.previous = None;
                    if let Some(s) = rotation.status.as_mut() {
                        s.state = "in_use";
                        s.problem = None;
                    }
                }
                return result;
            }
        };
        let previous = {
            let mut rotation = self.rotation();
            // Never rotated, rotated secrets already proven, or secrets replaced while the
            // request was out: the mint failed as any other does.
            let Some(status) = rotation.status.as_mut() else {
                return result;
            };
            if status.state == "in_use" || !Arc::ptr_eq(&current, &self.current()) {
                return result;
            }
            status.state = "refused";
            status.problem = Some(refused.clone());
            if let Some(m) = &self.metrics {
                m.credential_rotation("secret_refused");
            }
            // Kept until the attempt is over, so an echo of them is redacted too.
            rotation.previous.clone()
        };
        let Some(previous) = previous else {
            tracing::warn!("the token endpoint refused the rotated credentials ({refused})");
            return result;
        };
        tracing::warn!(
            "the token endpoint refused the rotated credentials ({refused}); trying the previous \
             ones once"
        );
        let fallback = self.exchange(&previous).await.map_err(|e| self.scrub(e));
        self.rotation().previous = None;
        match &fallback {
            Ok(_) => {
                if let Some(s) = self.rotation().status.as_mut() {
                    s.state = "refused_previous_used";
                }
                tracing::warn!(
                    "the previous credentials produced the token; the rotated ones are tried \
                     again at the next mint and the previous ones are forgotten"
                );
                fallback
            }
            Err(e) => {
                tracing::warn!("the previous credentials failed too: {e}");
                result
            }
        }
    }

    /// Replaces every secret this client sends (as sent, form-encoded, or raw) in an error.
    fn scrub(&self, e: MintError) -> MintError {
        let secrets = self.secrets();
        let secrets: Vec<&str> = secrets.iter().map(|s| s.expose()).collect();
        let clean = |text: String| redact_all(text, &secrets);
        match e {
            MintError::RateLimited(m) => MintError::RateLimited(clean(m)),
            MintError::Rejected { status, message } => MintError::Rejected {
                status,
                message: clean(message),
            },
            MintError::ServerError { status, message } => MintError::ServerError {
                status,
                message: clean(message),
            },
            MintError::InvalidResponse(m) => MintError::InvalidResponse(clean(m)),
            MintError::Transport(m) => MintError::Transport(clean(m)),
            other => other,
        }
    }

    async fn exchange(&self, secrets: &Secrets) -> Result<Minted, MintError> {
        let body = zeroize::Zeroizing::new(self.encoded_form(secrets));
        let mut retried = false;
        loop {
            let mut request = self
                .http
                .post(&self.url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("accept", "application/json")
                .body(body.as_bytes().to_vec());
            if let Some(dpop) = &self.dpop {
                let nonce = dpop.nonces.get(&self.origin);
                let proof = dpop
                    .key
                    .proof("POST", &self.htu, None, nonce.as_deref())
                    .map_err(|e| MintError::Dpop(e.to_string()))?;
                request = request.header("DPoP", proof);
            }
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) if e.is_timeout() => return Err(MintError::Timeout(self.timeout)),
                Err(e) => return Err(MintError::Transport(describe(&e))),
            };
            let mut new_nonce = false;
            if let (Some(dpop), Some(n)) = (
                &self.dpop,
                response
                    .headers()
                    .get("dpop-nonce")
                    .and_then(|v| v.to_str().ok()),
            ) {
                new_nonce = dpop.nonces.update(&self.origin, n);
            }
            let status = response.status().as_u16();
            let bytes = self.read_answer(response).await?;
            if status == 400
                && new_nonce
                && !retried
                && oauth_error_code(&bytes) == Some("use_dpop_nonce".into())
            {
                retried = true;
                continue;
            }
            let known = self.secrets();
            let known: Vec<&str> = known.iter().map(|s| s.expose()).collect();
            return parse_answer(status, &bytes, &known);
        }
    }

    /// The answer's body, read only up to [`MAX_ANSWER`]: a longer one is refused unread, so a
    /// broken or hostile endpoint can neither fill the proxy's memory nor hold a mint for
    /// `token_timeout` while it streams.
    async fn read_answer(&self, mut response: reqwest::Response) -> Result<Vec<u8>, MintError> {
        let status = response.status().as_u16();
        let too_long = || {
            MintError::InvalidResponse(format!(
                "the token endpoint answered {status} with more than {} KiB; refused unread",
                MAX_ANSWER / 1024
            ))
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_ANSWER as u64)
        {
            return Err(too_long());
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) if body.len() + chunk.len() > MAX_ANSWER => return Err(too_long()),
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => return Ok(body),
                Err(e) if e.is_timeout() => return Err(MintError::Timeout(self.timeout)),
                Err(e) => return Err(MintError::Transport(describe(&e))),
            }
        }
    }

    /// The secrets this client sends or has sent since its last rotation, for redaction.
    fn secrets(&self) -> Vec<Secret> {
        let mut all = vec![self.current()];
        all.extend(self.rotation().previous.clone());
        all.iter()
            .flat_map(|s| std::iter::once(&s.client_secret).chain(s.password.as_ref()))
            .filter(|s| !s.expose().is_empty())
            .cloned()
            .collect()
    }

    fn encoded_form(&self, secrets: &Secrets) -> String {
        let mut out = String::new();
        for (i, (k, v)) in self.form.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(k);
            out.push('=');
            let v = match *v {
                FormValue::Plain(i) => self.plain[i].as_str(),
                FormValue::ClientSecret => secrets.client_secret.expose(),
                FormValue::Password => secrets.password.as_ref().map_or("", Secret::expose),
            };
            out.extend(form_urlencoded_byte_serialize(v));
        }
        out
    }
}

impl TokenSource for TokenClient {
    fn fetch(&self) -> MintFuture<'_> {
        Box::pin(self.request())
    }

    fn grant(&self) -> &str {
        self.plain.first().map_or("", String::as_str)
    }
}

/// `text` with every secret, raw or form-encoded (with upper- or lower-case hex, as an echoing
/// endpoint may re-encode it), replaced by the redaction marker.
fn redact_all(text: String, secrets: &[&str]) -> String {
    secrets.iter().fold(text, |t, secret| {
        let upper: String = form_urlencoded_byte_serialize(secret).collect();
        let lower = lower_hex_escapes(&upper);
        t.replace(secret, crate::secret::REDACTED)
            .replace(&upper, crate::secret::REDACTED)
            .replace(&lower, crate::secret::REDACTED)
    })
}

/// `%AB` escapes in `encoded` with lower-case hex digits; everything else unchanged.
fn lower_hex_escapes(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut hex_left = 0;
    for c in encoded.chars() {
        if hex_left > 0 {
            out.push(c.to_ascii_lowercase());
            hex_left -= 1;
        } else {
            hex_left = if c == '%' { 2 } else { 0 };
            out.push(c);
        }
    }
    out
}

/// application/x-www-form-urlencoded encoding of one value.
fn form_urlencoded_byte_serialize(v: &str) -> impl Iterator<Item = char> + '_ {
    v.bytes().flat_map(|b| {
        let mut buf = [None, None, None];
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                buf[0] = Some(b as char)
            }
            b' ' => buf[0] = Some('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                buf[0] = Some('%');
                buf[1] = Some(HEX[(b >> 4) as usize] as char);
                buf[2] = Some(HEX[(b & 15) as usize] as char);
            }
        }
        buf.into_iter().flatten()
    })
}

#[derive(Deserialize)]
struct RawSuccess {
    access_token: Option<Secret>,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawError {
    error: Option<String>,
    error_description: Option<String>,
    message: Option<String>,
}

/// The most of a token endpoint answer that is read. Tango's answers are well under 1 KiB, and
/// tokens longer than 16 KiB are refused anyway.
const MAX_ANSWER: usize = 64 * 1024;

/// Interprets a token endpoint answer.
pub fn parse_response(status: u16, body: &[u8]) -> Result<Minted, MintError> {
    parse_answer(status, body, &[])
}

/// Interprets a token endpoint answer; `secrets` are redacted from error text before it is
/// shortened, so no excerpt can end partway through one.
fn parse_answer(status: u16, body: &[u8], secrets: &[&str]) -> Result<Minted, MintError> {
    if (200..300).contains(&status) {
        let raw: RawSuccess = serde_json::from_slice(body)
            .map_err(|e| MintError::InvalidResponse(format!("not JSON ({e})")))?;
        let access_token = raw
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| MintError::InvalidResponse("no access_token".into()))?;
        let token_type = raw
            .token_type
            .unwrap_or_else(|| "bearer".into())
            .to_ascii_lowercase();
        let expires_in = match raw.expires_in {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().or_else(|| n.as_f64().map(|f| f as u64))
            }
            Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        return Ok(Minted {
            access_token,
            token_type,
            expires_in,
        });
    }
    let message = error_message(body, secrets);
    if message.contains("exceeded the daily rate limit") {
        return Err(MintError::RateLimited(message));
    }
    if status >= 500 {
        Err(MintError::ServerError { status, message })
    } else {
        Err(MintError::Rejected { status, message })
    }
}

/// The OAuth `error` code of an error body.
fn oauth_error_code(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<RawError>(body).ok()?.error
}

/// `error: error_description` from JSON, else the text; `secrets` redacted, then shortened.
fn error_message(body: &[u8], secrets: &[&str]) -> String {
    truncate(&printable(&redact_all(raw_error_message(body), secrets)))
}

/// The message with control characters (CR, LF, escapes) turned into spaces: it reaches text
/// logs, `/status` and error bodies.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn raw_error_message(body: &[u8]) -> String {
    if let Ok(raw) = serde_json::from_slice::<RawError>(body) {
        let parts: Vec<String> = [raw.error, raw.error_description, raw.message]
            .into_iter()
            .flatten()
            .collect();
        if !parts.is_empty() {
            return parts.join(": ");
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".into()
    } else {
        text.to_string()
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 300;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// What a 401 from Tango means, from its `WWW-Authenticate` parameters.
///
/// | answer | class | the proxy |
/// | --- | --- | --- |
/// | `DPoP error="use_dpop_nonce"` | [`Challenge::Nonce`] | replays once with a proof carrying the new nonce; keeps the token |
/// | `DPoP error="invalid_dpop_proof"` | [`Challenge::Proof`] | replays once with a fresh proof; keeps the token; warns once about clock skew |
/// | `error="invalid_token"`, any Bearer 401, no header, another scheme | [`Challenge::Token`] | evicts the token (compare-and-delete), mints once, replays once |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// The server wants a (new) DPoP nonce.
    Nonce,
    /// The DPoP proof was refused (often: `iat` outside the server's window).
    Proof,
    /// The token itself was refused.
    Token,
}

impl Challenge {
    /// Classifies a 401 by every `WWW-Authenticate` header it carries.
    pub fn of(headers: &HeaderMap) -> Challenge {
        let mut class = Challenge::Token;
        for value in headers.get_all(header::WWW_AUTHENTICATE) {
            let Ok(text) = value.to_str() else { continue };
            for code in error_codes(text) {
                match code {
                    "use_dpop_nonce" => return Challenge::Nonce,
                    "invalid_dpop_proof" => class = Challenge::Proof,
                    _ => {}
                }
            }
        }
        class
    }
}

/// The values of every `error` auth-param in a `WWW-Authenticate` value (not `error_description`
/// or `error_uri`), quoted or not.
fn error_codes(text: &str) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        while let Some(found) = text[at..].to_ascii_lowercase().find("error") {
            let start = at + found;
            let mut i = start + "error".len();
            at = i;
            let boundary = start == 0 || matches!(bytes[start - 1], b' ' | b',' | b'\t');
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
            if !boundary || bytes.get(i) != Some(&b'=') {
                continue;
            }
            i += 1;
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
            let rest = &text[i..];
            let value = match rest.strip_prefix('"') {
                Some(q) => q.split('"').next().unwrap_or_default(),
                None => rest.split([',', ' ']).next().unwrap_or_default(),
            };
            at = i;
            return Some(value);
        }
        None
    })
}

/// Authorizes requests for an OAuth profile from the token its [`TokenManager`] holds.
#[derive(Debug)]
pub struct OAuthAuthorizer {
    profile: String,
    method: AuthMethod,
    identity: String,
    manager: TokenManager,
    /// The token endpoint client the manager mints with (its secrets rotate in place).
    client: Arc<TokenClient>,
    dpop: Option<Arc<Dpop>>,
    metrics: Arc<Metrics>,
    skew_warned: AtomicBool,
    /// The current token's `Authorization` value, encoded once per token (the token layer
    /// knows no HTTP types); compared by `Arc` identity on every request.
    header: RwLock<Option<(Arc<Token>, HeaderValue)>>,
}

impl OAuthAuthorizer {
    /// Wraps a running token manager and the client it mints with.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        profile: &str,
        method: AuthMethod,
        config: &OAuthConfig,
        manager: TokenManager,
        client: Arc<TokenClient>,
        dpop: Option<Arc<Dpop>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let identity = match &config.username {
            Some(u) => format!("{} / {u}", config.client_id),
            None => config.client_id.clone(),
        };
        Self {
            profile: profile.to_string(),
            method,
            identity,
            manager,
            client,
            dpop,
            metrics,
            skew_warned: AtomicBool::new(false),
            header: RwLock::new(None),
        }
    }

    /// `Authorization: <scheme> <token>` for `token`, encoded once and marked sensitive.
    fn authorization(&self, token: &Arc<Token>) -> HeaderValue {
        if let Some((t, h)) = &*self.header.read().unwrap_or_else(|p| p.into_inner()) {
            if Arc::ptr_eq(t, token) {
                return h.clone();
            }
        }
        let value = zeroize::Zeroizing::new(format!(
            "{} {}",
            token.scheme(),
            token.access_token.expose()
        ));
        // Token::new admits visible ASCII only, which a header value always accepts.
        let mut header = HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static(""));
        header.set_sensitive(true);
        *self.header.write().unwrap_or_else(|p| p.into_inner()) =
            Some((token.clone(), header.clone()));
        header
    }

    /// The headers for one send: the token, plus a proof signed now for DPoP tokens.
    fn credential(&self, token: &Arc<Token>, target: Target<'_>) -> Result<Credential, AuthError> {
        let proof = match &self.dpop {
            Some(d) if token.dpop => {
                let nonce = d.nonces.get(&dpop::origin(target.uri));
                let proof = d
                    .key
                    .proof(
                        target.method.as_str(),
                        &dpop::htu(target.uri),
                        Some(token.ath()),
                        nonce.as_deref(),
                    )
                    .map_err(|e| AuthError::Unavailable {
                        profile: self.profile.clone(),
                        reason: e.to_string(),
                        retry_after: Duration::from_secs(1),
                    })?;
                HeaderValue::from_str(&proof).ok()
            }
            _ => None,
        };
        Ok(Credential {
            authorization: self.authorization(token),
            dpop: proof,
        })
    }

    fn unavailable(&self, u: crate::token::Unavailable) -> AuthError {
        AuthError::Unavailable {
            profile: self.profile.clone(),
            reason: u.reason,
            retry_after: u.retry_after,
        }
    }

    /// Warns once per process that proofs are being refused, with both clocks.
    fn warn_proof_refused(&self, response: &HeaderMap) {
        self.metrics.dpop_proof_rejected(&self.profile);
        if self.skew_warned.swap(true, Ordering::Relaxed) {
            return;
        }
        let server = response
            .get(header::DATE)
            .and_then(|d| d.to_str().ok())
            .unwrap_or("(no Date header)");
        let ours = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        tracing::warn!(
            profile = %self.profile,
            server_date = server,
            local_time = %ours,
            "Tango refused a DPoP proof (invalid_dpop_proof); replaying with a fresh proof and keeping the token. A clock skew is the usual cause: check NTP on this host"
        );
    }
}

impl Authorizer for OAuthAuthorizer {
    fn authorize<'a>(&'a self, target: Target<'a>) -> Authorization<'a> {
        if let Some(token) = self.manager.current() {
            self.metrics.lookup(false, true);
            return Authorization::Ready(self.credential(&token, target));
        }
        self.metrics.lookup(false, false);
        Authorization::Pending(Box::pin(async move {
            let token = self
                .manager
                .usable()
                .await
                .map_err(|u| self.unavailable(u))?;
            self.credential(&token, target)
        }))
    }

    fn is_ready(&self) -> bool {
        self.manager.is_ready()
    }

    fn replays(&self) -> bool {
        true
    }

    fn observe(&self, uri: &http::Uri, headers: &HeaderMap) {
        if let (Some(d), Some(nonce)) = (
            &self.dpop,
            headers.get("dpop-nonce").and_then(|v| v.to_str().ok()),
        ) {
            d.nonces.update(&dpop::origin(uri), nonce);
        }
    }

    fn rejected<'a>(&'a self, used: &Credential, response: &HeaderMap) -> Replay<'a> {
        // A Bearer profile sends no proof: a DPoP challenge to it is "another scheme", and like
        // any other 401 it means the token was refused.
        let class = match self.dpop {
            Some(_) => Challenge::of(response),
            None => Challenge::Token,
        };
        if class != Challenge::Token {
            if class == Challenge::Proof {
                self.warn_proof_refused(response);
            }
            // Same token, fresh proof (with the nonce `observe` recorded).
            return Box::pin(async { AfterRejection::Replay });
        }
        self.metrics.upstream_401(&self.profile);
        match self.manager.current() {
            Some(t) if self.authorization(&t) == used.authorization => {
                let ticket = self.manager.reject(t.ath());
                Box::pin(async move {
                    match self.manager.replacement(&t, ticket).await {
                        Need::Replaced(_) => AfterRejection::Replay,
                        Need::Declined => AfterRejection::PassOn,
                        Need::Unavailable(u) => AfterRejection::Unavailable(self.unavailable(u)),
                    }
                })
            }
            // Another request already had it replaced.
            Some(_) => Box::pin(async { AfterRejection::Replay }),
            None => Box::pin(async move {
                match self.manager.usable().await {
                    Ok(_) => AfterRejection::Replay,
                    Err(u) => AfterRejection::Unavailable(self.unavailable(u)),
                }
            }),
        }
    }

    fn status(&self) -> ProfileStatus {
        let mut details = self.manager.status();
        details.dpop_jkt = self.dpop.as_ref().map(|d| d.key.thumbprint().to_string());
        ProfileStatus {
            auth: self.method.as_str(),
            ready: self.manager.is_ready(),
            identity: self.identity.clone(),
            cache_healthy: self.manager.cache_healthy(),
            token: serde_json::to_value(details).ok(),
            secret_rotation: self.client.rotation_status(),
        }
    }

    fn rotate_secrets(&self, auth: &crate::config::AuthConfig) -> bool {
        match auth {
            crate::config::AuthConfig::ClientCredentials(o)
            | crate::config::AuthConfig::ServiceAccount(o) => {
                if self.client.rotate(o) {
                    tracing::info!(
                        profile = %self.profile,
                        "new client secret / password loaded; the token in hand is kept and they are sent at the next mint"
                    );
                }
                true
            }
            crate::config::AuthConfig::Basic { .. } => false,
        }
    }

    fn minted_at(&self) -> Option<std::time::SystemTime> {
        self.manager.minted_at()
    }

    fn hold_renewals(&self, hold: bool) {
        self.manager.hold_renewals(hold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_variants_tango_sends() {
        let ok = |body: &str| parse_response(200, body.as_bytes()).unwrap();
        let r = ok(
            r#"{"access_token":"t","scope":"raas.all","expires_in":86400,"token_type":"Bearer"}"#,
        );
        assert_eq!(
            (r.expires_in, r.token_type.as_str()),
            (Some(86400), "bearer")
        );
        assert_eq!(
            ok(r#"{"access_token":"t","expires_in":"300"}"#).expires_in,
            Some(300)
        );
        assert_eq!(
            ok(r#"{"access_token":"t","expires_in":0}"#).expires_in,
            Some(0)
        );
        assert_eq!(ok(r#"{"access_token":"t"}"#).expires_in, None);
        assert_eq!(
            ok(r#"{"access_token":"t","expires_in":"<expires>"}"#).expires_in,
            None
        );
        assert_eq!(
            ok(r#"{"access_token":"t","token_type":"DPoP"}"#).token_type,
            "dpop"
        );
        assert!(matches!(
            parse_response(200, b"{}"),
            Err(MintError::InvalidResponse(_))
        ));
    }

    #[test]
    fn classifies_errors() {
        let rl = parse_response(
            400,
            br#"{"error":"access_denied","error_description":"Client Acme abc123 has exceeded the daily rate limit"}"#,
        );
        assert!(matches!(rl, Err(MintError::RateLimited(_))));
        let rl_text = parse_response(400, b"Client Acme abc123 has exceeded the daily rate limit");
        assert!(matches!(rl_text, Err(MintError::RateLimited(_))));
        match parse_response(
            401,
            br#"{"error":"invalid_client","error_description":"Unauthorized"}"#,
        ) {
            Err(MintError::Rejected {
                status: 401,
                message,
            }) => {
                assert_eq!(message, "invalid_client: Unauthorized")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_response(503, b"down"),
            Err(MintError::ServerError { status: 503, .. })
        ));
    }

    #[test]
    fn challenges_are_classified_by_their_error_parameter() {
        let of = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::WWW_AUTHENTICATE, HeaderValue::from_str(v).unwrap());
            }
            Challenge::of(&h)
        };
        assert_eq!(
            of(&[r#"DPoP error="use_dpop_nonce", error_description="x""#]),
            Challenge::Nonce
        );
        assert_eq!(
            of(&[r#"DPoP algs="ES256", error="invalid_dpop_proof""#]),
            Challenge::Proof
        );
        assert_eq!(of(&[r#"DPoP error=invalid_dpop_proof"#]), Challenge::Proof);
        assert_eq!(of(&[r#"Bearer error="invalid_token""#]), Challenge::Token);
        assert_eq!(of(&[r#"DPoP error="invalid_token""#]), Challenge::Token);
        assert_eq!(of(&["Bearer"]), Challenge::Token);
        assert_eq!(of(&[]), Challenge::Token);
        assert_eq!(of(&["Basic realm=\"tango\""]), Challenge::Token);
        // A description mentioning a code is not the code.
        assert_eq!(
            of(&[r#"Bearer error="invalid_token", error_description="not use_dpop_nonce""#]),
            Challenge::Token
        );
        // Several challenges: a nonce request anywhere wins.
        assert_eq!(
            of(&[r#"Bearer realm="x""#, r#"DPoP error="use_dpop_nonce""#]),
            Challenge::Nonce
        );
    }

    #[test]
    fn error_text_is_printable_and_never_echoes_a_secret() {
        let body = b"bad request\r\nINFO forged line: client_secret=s3cr%2Ft&password=pa+ss";
        let message = error_message(body, &[]);
        assert!(
            !message.contains('\n') && !message.contains('\r'),
            "{message}"
        );
        let clean = redact_all(message, &["s3cr/t", "pa ss"]);
        assert!(
            !clean.contains("s3cr") && !clean.contains("pa+ss"),
            "{clean}"
        );
        assert!(clean.contains("client_secret="), "{clean}");
        // An endpoint that re-encodes with lower-case hex echoes it all the same.
        let clean = redact_all("client_secret=s3cr%2ft".into(), &["s3cr/t"]);
        assert_eq!(clean, "client_secret=<redacted>");
    }

    #[test]
    fn a_secret_straddling_the_excerpt_limit_is_redacted_whole() {
        // The cut at 300 bytes falls eleven bytes into the secret: redacting after cutting
        // would leave those eleven bytes in the message.
        let body = format!("{}password=pa55-w0rd-long-secret&x=y", "x".repeat(280));
        let message = error_message(body.as_bytes(), &["pa55-w0rd-long-secret"]);
        assert!(!message.contains("pa55"), "{message}");
        assert!(message.contains(crate::secret::REDACTED), "{message}");
    }

    #[test]
    fn form_encoding() {
        let s: String = form_urlencoded_byte_serialize("a b&c=d/é").collect();
        assert_eq!(s, "a+b%26c%3Dd%2F%C3%A9");
    }
}
