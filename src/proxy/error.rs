//! Errors the proxy itself answers with, and the one place they become HTTP responses.
//!
//! Bodies use Tango's own error shape so SDK error handling keeps working; the header
//! `x-tango-proxy-error` names the cause so operators can tell the proxy's answers from Tango's.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

/// Header naming the cause of an answer the proxy produced itself.
pub const PROXY_ERROR_HEADER: &str = "x-tango-proxy-error";

/// Everything the proxy can answer with instead of Tango's own response.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The request cannot be forwarded as sent (absolute-form for another host, bad target).
    #[error("{0}")]
    BadRequest(String),
    /// The method cannot be proxied (CONNECT).
    #[error("method {0} is not supported by this proxy")]
    MethodNotAllowed(http::Method),
    /// The request body exceeds `listen.max_body`.
    #[error("request body exceeds the {limit}-byte limit (listen.max_body)")]
    BodyTooLarge {
        /// The configured limit in bytes.
        limit: u64,
    },
    /// The app's request body stopped arriving: nothing for `listen.body_idle_timeout`, or the
    /// proxy was still waiting for it when `upstream.timeout` ran out.
    #[error("the request body stalled: the proxy was still waiting for it from the app after {} ({key})", humantime::format_duration(*limit))]
    RequestTimeout {
        /// The limit that ran out.
        limit: Duration,
        /// Its configuration key.
        key: &'static str,
    },
    /// The request header section exceeds `listen.max_header_size`.
    #[error("request header section of {size} bytes exceeds the {limit}-byte limit (listen.max_header_size)")]
    HeadersTooLarge {
        /// Bytes received.
        size: u64,
        /// The configured limit in bytes.
        limit: u64,
    },
    /// No usable credential; the request was not forwarded.
    #[error("{reason}")]
    TokenUnavailable {
        /// Why, without secrets.
        reason: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// The upstream could not be reached or broke the connection.
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    /// Gateway mode: the request did not authenticate as a configured caller.
    #[error("{0}")]
    CallerUnauthorized(String),
    /// Gateway mode: a rule of the caller's policy refuses the request (or Tango's answer).
    #[error("{0}")]
    CallerForbidden(String),
    /// Gateway mode: the caller's rate limit, or an address with too many failed
    /// authentications.
    #[error("{reason}; retry in {}s", retry_after.as_secs().max(1))]
    RateLimited {
        /// Which limit, without secrets.
        reason: String,
        /// When a token will be back.
        retry_after: Duration,
    },
    /// Gateway mode: the caller's daily spend limit cannot be checked (its ledger is
    /// unreachable) and fails closed.
    #[error("{0}")]
    SpendLimitUnavailable(String),
    /// Gateway mode: Tango's answer to a bound caller could not be checked (not JSON, too
    /// large, broken off), so it is withheld.
    #[error("{0}")]
    AnswerUnchecked(String),
    /// The upstream did not answer within `upstream.timeout`.
    #[error("upstream did not answer within {} (upstream.timeout)", humantime::format_duration(*.0))]
    UpstreamTimeout(Duration),
}

impl ProxyError {
    /// The stable cause name used in `x-tango-proxy-error`, `i18nKey` and metrics.
    pub fn cause(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::RequestTimeout { .. } => "request_timeout",
            ProxyError::HeadersTooLarge { .. } => "headers_too_large",
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::CallerUnauthorized(_) => "caller_unauthorized",
            ProxyError::CallerForbidden(_) => "caller_forbidden",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::SpendLimitUnavailable(_) => "spend_limit_unavailable",
            ProxyError::AnswerUnchecked(_) => "answer_unchecked",
        }
    }

    /// The HTTP status for this cause.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::CallerUnauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::CallerForbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::SpendLimitUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::AnswerUnchecked(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The Tango-shaped JSON response, with the cause header and the request id.
    pub fn to_response(&self, request_id: &HeaderValue, path: &str) -> Response<Full<Bytes>> {
        let status = self.status();
        let body = ErrorBody {
            timestamp: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            request_id: request_id.to_str().unwrap_or_default(),
            path,
            http_code: status.as_u16(),
            http_phrase: status.canonical_reason().unwrap_or_default(),
            i18n_key: format!("proxy.{}", self.cause()),
            message: self.to_string(),
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = Response::new(Full::new(Bytes::from(json)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(PROXY_ERROR_HEADER, HeaderValue::from_static(self.cause()));
        headers.insert(super::headers::X_REQUEST_ID, request_id.clone());
        match self {
            ProxyError::TokenUnavailable { retry_after, .. } => {
                headers.insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(retry_after.as_secs().max(1)),
                );
            }
            ProxyError::RateLimited { retry_after, .. } => {
                // Whole seconds, rounded up: a client that waits this long finds a token.
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            ProxyError::SpendLimitUnavailable(_) => {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from(5u64));
            }
            ProxyError::CallerUnauthorized(_) => {
                headers.insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"tango-auth-proxy gateway\""),
                );
            }
            _ => {}
        }
        if let ProxyError::MethodNotAllowed(_) = self {
            headers.insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        response
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    timestamp: String,
    request_id: &'a str,
    path: &'a str,
    http_code: u16,
    http_phrase: &'a str,
    #[serde(rename = "i18nKey")]
    i18n_key: String,
    message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the cause → status table of DESIGN.md §3 (plus `request_timeout`, which it omits).
    #[test]
    fn causes_map_to_the_documented_statuses() {
        let cases = [
            (ProxyError::BadRequest("x".into()), "bad_request", 400),
            (
                ProxyError::MethodNotAllowed(http::Method::CONNECT),
                "method_not_allowed",
                405,
            ),
            (ProxyError::BodyTooLarge { limit: 1 }, "body_too_large", 413),
            (
                ProxyError::RequestTimeout {
                    limit: Duration::from_secs(30),
                    key: "listen.body_idle_timeout",
                },
                "request_timeout",
                408,
            ),
            (
                ProxyError::HeadersTooLarge { size: 2, limit: 1 },
                "headers_too_large",
                431,
            ),
            (
                ProxyError::TokenUnavailable {
                    reason: "x".into(),
                    retry_after: Duration::from_secs(2),
                },
                "token_unavailable",
                503,
            ),
            (
                ProxyError::UpstreamUnreachable("x".into()),
                "upstream_unreachable",
                502,
            ),
            (
                ProxyError::UpstreamTimeout(Duration::from_secs(1)),
                "upstream_timeout",
                504,
            ),
            (
                ProxyError::CallerUnauthorized("x".into()),
                "caller_unauthorized",
                401,
            ),
            (
                ProxyError::CallerForbidden("x".into()),
                "caller_forbidden",
                403,
            ),
            (
                ProxyError::RateLimited {
                    reason: "s".into(),
                    retry_after: Duration::from_millis(1500),
                },
                "rate_limited",
                429,
            ),
            (
                ProxyError::SpendLimitUnavailable("x".into()),
                "spend_limit_unavailable",
                503,
            ),
            (
                ProxyError::AnswerUnchecked("x".into()),
                "answer_unchecked",
                502,
            ),
        ];
        for (err, cause, status) in cases {
            assert_eq!(err.cause(), cause);
            assert_eq!(err.status().as_u16(), status);
            let resp = err.to_response(&HeaderValue::from_static("rid-1"), "/raas/v2/orders");
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[PROXY_ERROR_HEADER], cause);
            assert_eq!(resp.headers()["x-request-id"], "rid-1");
        }
    }
}
