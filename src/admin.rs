//! The admin listener: `/livez`, `/readyz`, `/status` and `/metrics`, on its own port.
//!
//! It may listen on a pod address (Kubernetes probes reach it there) because nothing it serves
//! is secret: `/status` shows methods, identities (platform name or client id) and readiness,
//! never a credential.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::auth::Profile;
use crate::config::Config;
use crate::metrics::Metrics;

/// What the admin endpoints report on.
#[derive(Debug, Clone)]
pub struct AdminState(Arc<AdminInner>);

#[derive(Debug)]
struct AdminInner {
    profiles: Vec<Profile>,
    metrics: Arc<Metrics>,
    cache_backend: &'static str,
    upstream: String,
    started: Instant,
}

impl AdminState {
    /// Collects the state to report.
    pub fn new(config: &Config, profiles: Vec<Profile>, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(AdminInner {
            profiles,
            metrics,
            cache_backend: config.cache.backend.as_str(),
            upstream: config.upstream.url.to_string(),
            started: Instant::now(),
        }))
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let not_ready: Vec<&str> = state
        .0
        .profiles
        .iter()
        .filter(|p| !p.authorizer.is_ready())
        .map(|p| p.name.as_str())
        .collect();
    if not_ready.is_empty() {
        (StatusCode::OK, Json(json!({ "ready": true }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "not_ready": not_ready })),
        )
            .into_response()
    }
}

async fn status(State(state): State<AdminState>) -> Response {
    let s = &state.0;
    let mut cache_healthy = true;
    let profiles: serde_json::Map<String, serde_json::Value> = s
        .profiles
        .iter()
        .map(|p| {
            let status = p.authorizer.status();
            cache_healthy &= status.cache_healthy;
            (
                p.name.clone(),
                serde_json::to_value(status).unwrap_or_default(),
            )
        })
        .collect();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "upstream": s.upstream,
        "cache": { "backend": s.cache_backend, "healthy": cache_healthy },
        "profiles": profiles,
    }))
    .into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.0.metrics.encode(),
    )
        .into_response()
}
