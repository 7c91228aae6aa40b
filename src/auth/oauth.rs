//! The OAuth 2.0 token endpoint client: one form POST per mint, parsed defensively.
//!
//! Tango's answers vary: `expires_in` arrives as a number, a numeric string, `0` or not at all;
//! `token_type` in any case; errors as JSON (`error`, `error_description`) or plain text. The
//! rate-limit answer is a 400 whose text says "exceeded the daily rate limit". Nothing secret is
//! ever put into an error: bodies are quoted only after the access token field is known absent.

use std::time::Duration;

use serde::Deserialize;

use std::sync::Arc;

use super::dpop::{htu, origin, Dpop};
use crate::config::{OAuthConfig, UpstreamConfig};
use crate::proxy::describe;
use crate::secret::Secret;

/// What a successful token response carried.
#[derive(Debug)]
pub struct TokenResponse {
    /// The access token.
    pub access_token: Secret,
    /// `token_type`, lower-cased.
    pub token_type: String,
    /// `expires_in` in seconds when present and parseable.
    pub expires_in: Option<u64>,
}

/// Why a token request failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Tango's daily mint limit was hit.
    #[error("token endpoint rate limit: {0}")]
    RateLimited(String),
    /// The endpoint refused the request (bad credentials, bad audience).
    #[error("token endpoint answered {status}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// `error`/`error_description` or a short excerpt of the body.
        message: String,
    },
    /// The endpoint failed (5xx).
    #[error("token endpoint failed with {status}: {message}")]
    ServerError {
        /// HTTP status.
        status: u16,
        /// A short excerpt of the body.
        message: String,
    },
    /// No answer within `token_timeout`.
    #[error("token endpoint did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Connection or TLS failure.
    #[error("token endpoint unreachable: {0}")]
    Transport(String),
    /// A 2xx answer the proxy cannot use.
    #[error("token endpoint answer unusable: {0}")]
    InvalidResponse(String),
    /// No DPoP proof could be made.
    #[error("{0}")]
    Dpop(String),
    /// Another replica is minting; this one did not get a token in time.
    #[error("{0}")]
    Coordination(String),
}

impl TokenError {
    /// The metric outcome label.
    pub fn outcome(&self) -> &'static str {
        match self {
            TokenError::RateLimited(_) => "rate_limited",
            TokenError::Rejected { .. } => "rejected",
            TokenError::ServerError { .. } => "server_error",
            TokenError::Timeout(_) => "timeout",
            TokenError::Transport(_) => "unreachable",
            TokenError::InvalidResponse(_) => "invalid_response",
            TokenError::Dpop(_) => "dpop_error",
            TokenError::Coordination(_) => "lease_busy",
        }
    }
}

/// Posts token requests for one profile.
#[derive(Debug, Clone)]
pub struct TokenClient {
    http: reqwest::Client,
    url: String,
    form: Vec<(&'static str, FormValue)>,
    timeout: Duration,
    dpop: Option<Arc<Dpop>>,
    /// The token endpoint's `htu` and origin, normalised once.
    htu: String,
    origin: String,
}

#[derive(Debug, Clone)]
enum FormValue {
    Plain(String),
    Secret(Secret),
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
        let tls =
            crate::proxy::client::tls_config(&upstream.extra_roots).map_err(|e| e.to_string())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.token_timeout)
            .user_agent(concat!("tango-auth-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the token client: {e}"))?;
        let mut form = Vec::new();
        let grant = if config.username.is_some() {
            "password"
        } else {
            "client_credentials"
        };
        form.push(("grant_type", FormValue::Plain(grant.into())));
        form.push(("client_id", FormValue::Plain(config.client_id.clone())));
        form.push((
            "client_secret",
            FormValue::Secret(config.client_secret.clone()),
        ));
        if let (Some(u), Some(p)) = (&config.username, &config.password) {
            form.push(("username", FormValue::Plain(u.clone())));
            form.push(("password", FormValue::Secret(p.clone())));
        }
        form.push(("scope", FormValue::Plain(config.scope.clone())));
        form.push(("audience", FormValue::Plain(config.audience.clone())));
        Ok(Self {
            http,
            url: config.token_url.clone(),
            form,
            timeout: config.token_timeout,
            dpop,
            htu: htu(&uri),
            origin: origin(&uri),
        })
    }

    /// The grant this client uses, as sent.
    pub fn grant(&self) -> &str {
        match self.form.first() {
            Some((_, FormValue::Plain(g))) => g,
            _ => "",
        }
    }

    /// Requests one token. With DPoP, a `use_dpop_nonce` answer is retried once with the nonce.
    pub async fn fetch(&self) -> Result<TokenResponse, TokenError> {
        let body = zeroize::Zeroizing::new(self.encoded_form());
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
                    .map_err(|e| TokenError::Dpop(e.to_string()))?;
                request = request.header("DPoP", proof);
            }
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) if e.is_timeout() => return Err(TokenError::Timeout(self.timeout)),
                Err(e) => return Err(TokenError::Transport(describe(&e))),
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
            let bytes = match response.bytes().await {
                Ok(b) => b,
                Err(e) if e.is_timeout() => return Err(TokenError::Timeout(self.timeout)),
                Err(e) => return Err(TokenError::Transport(describe(&e))),
            };
            if status == 400
                && new_nonce
                && !retried
                && oauth_error_code(&bytes) == Some("use_dpop_nonce".into())
            {
                retried = true;
                continue;
            }
            return parse_response(status, &bytes);
        }
    }

    fn encoded_form(&self) -> String {
        let mut out = String::new();
        for (i, (k, v)) in self.form.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(k);
            out.push('=');
            let v = match v {
                FormValue::Plain(s) => s.as_str(),
                FormValue::Secret(s) => s.expose(),
            };
            out.extend(form_urlencoded_byte_serialize(v));
        }
        out
    }
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

/// Interprets a token endpoint answer.
pub fn parse_response(status: u16, body: &[u8]) -> Result<TokenResponse, TokenError> {
    if (200..300).contains(&status) {
        let raw: RawSuccess = serde_json::from_slice(body)
            .map_err(|e| TokenError::InvalidResponse(format!("not JSON ({e})")))?;
        let access_token = raw
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| TokenError::InvalidResponse("no access_token".into()))?;
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
        return Ok(TokenResponse {
            access_token,
            token_type,
            expires_in,
        });
    }
    let message = error_message(body);
    if message.contains("exceeded the daily rate limit") {
        return Err(TokenError::RateLimited(message));
    }
    if status >= 500 {
        Err(TokenError::ServerError { status, message })
    } else {
        Err(TokenError::Rejected { status, message })
    }
}

/// The OAuth `error` code of an error body.
fn oauth_error_code(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<RawError>(body).ok()?.error
}

/// `error: error_description` from JSON, else a short excerpt of the text.
fn error_message(body: &[u8]) -> String {
    if let Ok(raw) = serde_json::from_slice::<RawError>(body) {
        let parts: Vec<String> = [raw.error, raw.error_description, raw.message]
            .into_iter()
            .flatten()
            .collect();
        if !parts.is_empty() {
            return truncate(&parts.join(": "));
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".into()
    } else {
        truncate(text)
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
            Err(TokenError::InvalidResponse(_))
        ));
    }

    #[test]
    fn classifies_errors() {
        let rl = parse_response(
            400,
            br#"{"error":"access_denied","error_description":"Client Acme abc123 has exceeded the daily rate limit"}"#,
        );
        assert!(matches!(rl, Err(TokenError::RateLimited(_))));
        let rl_text = parse_response(400, b"Client Acme abc123 has exceeded the daily rate limit");
        assert!(matches!(rl_text, Err(TokenError::RateLimited(_))));
        match parse_response(
            401,
            br#"{"error":"invalid_client","error_description":"Unauthorized"}"#,
        ) {
            Err(TokenError::Rejected {
                status: 401,
                message,
            }) => {
                assert_eq!(message, "invalid_client: Unauthorized")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_response(503, b"down"),
            Err(TokenError::ServerError { status: 503, .. })
        ));
    }

    #[test]
    fn form_encoding() {
        let s: String = form_urlencoded_byte_serialize("a b&c=d/é").collect();
        assert_eq!(s, "a+b%26c%3Dd%2F%C3%A9");
    }
}
