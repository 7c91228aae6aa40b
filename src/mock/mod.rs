//! A mock of Tango for local development, the demo and tests.
//!
//! It serves the RaaS endpoints apps use most (see [`raas`]) behind the same Basic check Tango
//! makes, answers errors in Tango's JSON shape, and counts what it sees: `GET /mock/stats` returns
//! the number of RaaS requests and how many carried each credential (by platform name, never the
//! key). Data lives in memory and starts with one customer and one funded account.

mod raas;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::secret::Secret;

/// The account every mock starts with.
pub const SEED_ACCOUNT: &str = "A00000001";
/// The customer that owns it.
pub const SEED_CUSTOMER: &str = "demo-customer";

/// Credentials the mock accepts.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Basic user name.
    pub platform_name: String,
    /// Basic password.
    pub api_key: Secret,
}

/// What the mock has seen.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MockStats {
    /// RaaS requests received.
    pub requests: u64,
    /// RaaS requests by credential: `basic:<platform>`, `basic-invalid`, `other-scheme` or `none`.
    pub credentials: BTreeMap<String, u64>,
    /// Orders created.
    pub orders: u64,
}

/// The mock Tango server's shared state.
#[derive(Debug, Clone)]
pub struct MockTango(Arc<MockInner>);

#[derive(Debug)]
struct MockInner {
    config: MockConfig,
    stats: Mutex<MockStats>,
    data: Mutex<raas::Data>,
}

impl MockTango {
    /// A mock accepting `config`'s credentials, with seed data.
    pub fn new(config: MockConfig) -> Self {
        Self(Arc::new(MockInner {
            config,
            stats: Mutex::default(),
            data: Mutex::new(raas::Data::seeded()),
        }))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MockStats {
        lock(&self.0.stats).clone()
    }

    /// The routes: RaaS under `/raas/v2`, counters under `/mock`.
    pub fn router(&self) -> Router {
        let raas = raas::routes()
            .layer(middleware::from_fn_with_state(self.clone(), check_basic))
            .with_state(self.clone());
        Router::new()
            .merge(raas)
            .route("/mock/stats", get(stats))
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
}

/// Locks a mutex, recovering the data if a handler panicked while holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn stats(State(mock): State<MockTango>) -> Json<MockStats> {
    Json(mock.stats())
}

/// Classifies the credential, counts it, and rejects anything but the configured Basic pair.
async fn check_basic(State(mock): State<MockTango>, req: Request, next: Next) -> Response {
    let seen = classify(req.headers(), &mock.0.config);
    {
        let mut stats = lock(&mock.0.stats);
        stats.requests += 1;
        *stats.credentials.entry(seen.label()).or_default() += 1;
    }
    let mut resp = match seen {
        Seen::Valid(_) => next.run(req).await,
        other => {
            let mut resp = tango_error(
                StatusCode::UNAUTHORIZED,
                req.uri().path(),
                "401.001",
                other.reason(),
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"tango\""),
            );
            resp
        }
    };
    // Tango stamps its own id on every answer; support asks for it.
    if let Ok(id) = HeaderValue::from_str(&request_id()) {
        resp.headers_mut().insert("x-request-id", id);
    }
    resp
}

enum Seen {
    Valid(String),
    Invalid,
    OtherScheme,
    Missing,
}

impl Seen {
    fn label(&self) -> String {
        match self {
            Seen::Valid(p) => format!("basic:{p}"),
            Seen::Invalid => "basic-invalid".into(),
            Seen::OtherScheme => "other-scheme".into(),
            Seen::Missing => "none".into(),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Seen::Valid(_) => "",
            Seen::Invalid => "Invalid platform name or API key",
            Seen::OtherScheme => "Unsupported authorization scheme",
            Seen::Missing => "Full authentication is required to access this resource",
        }
    }
}

fn classify(headers: &HeaderMap, config: &MockConfig) -> Seen {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Seen::Missing;
    };
    let Some(encoded) = value.to_str().ok().and_then(|v| v.strip_prefix("Basic ")) else {
        return Seen::OtherScheme;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return Seen::Invalid;
    };
    let decoded = zeroize::Zeroizing::new(decoded);
    let expected = zeroize::Zeroizing::new(format!(
        "{}:{}",
        config.platform_name,
        config.api_key.expose()
    ));
    if decoded.as_slice() == expected.as_bytes() {
        Seen::Valid(config.platform_name.clone())
    } else {
        Seen::Invalid
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
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
