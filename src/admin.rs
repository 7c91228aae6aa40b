//! The admin listener: `/livez`, `/readyz`, `/status` and `/metrics`, on its own port.
//!
//! It may listen on a pod address (Kubernetes probes reach it there) because nothing it serves
//! is secret: `/status` shows methods, identities (platform name or client id) and readiness,
//! never a credential.
//!
//! In gateway mode `/readyz` is 200 once the listeners are up and never waits for a profile's
//! token: one store's deleted service account must not take every store out of the load
//! balancer. Each profile's readiness is in `/status` (`profiles.NAME.ready`) and in the
//! `tango_proxy_profile_ready{profile}` gauge; `/status` also shows each caller's counts and,
//! for limited callers, today's spend. With `listen.tls_cert_file`, `/status` shows `tls`: the
//! certificate new connections get (fingerprint, expiry) and its reloads.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::auth::ProfileSet;
use crate::config::Config;
use crate::gateway::spend::utc_day;
use crate::gateway::Gateway;
use crate::metrics::Metrics;

/// What the admin endpoints report on.
#[derive(Debug, Clone)]
pub struct AdminState(Arc<AdminInner>);

#[derive(Debug)]
struct AdminInner {
    profiles: Arc<ProfileSet>,
    gateway: crate::reload::GatewayCell,
    reloads: Arc<std::sync::Mutex<crate::reload::ReloadStatus>>,
    tls: Option<Arc<std::sync::Mutex<crate::tls_reload::TlsStatus>>>,
    metrics: Arc<Metrics>,
    cache_backend: &'static str,
    upstream: String,
    started: Instant,
}

impl AdminState {
    /// Collects the state to report.
    pub fn new(
        config: &Config,
        profiles: Arc<ProfileSet>,
        gateway: crate::reload::GatewayCell,
        reloads: Arc<std::sync::Mutex<crate::reload::ReloadStatus>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self(Arc::new(AdminInner {
            profiles,
            gateway,
            reloads,
            tls: None,
            metrics,
            cache_backend: config.cache.backend.as_str(),
            upstream: config.upstream.url.to_string(),
            started: Instant::now(),
        }))
    }

    /// Reports on the proxy listener's TLS and its reloads too (`tls` in `/status`).
    pub fn with_tls(
        mut self,
        tls: Option<Arc<std::sync::Mutex<crate::tls_reload::TlsStatus>>>,
    ) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.tls = tls;
        }
        self
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
    if state.0.gateway.borrow().is_some() {
        return (
            StatusCode::OK,
            Json(json!({ "ready": true, "mode": "gateway" })),
        )
            .into_response();
    }
    let not_ready: Vec<String> = state
        .0
        .profiles
        .iter()
        .into_iter()
        .filter(|(_, a)| !a.is_ready())
        .map(|(name, _)| name)
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
        .into_iter()
        .map(|(name, authorizer)| {
            let status = authorizer.status();
            cache_healthy &= status.cache_healthy;
            let ready = authorizer.is_ready();
            let idle = !ready && status.is_idle();
            let mut value = serde_json::to_value(status).unwrap_or_default();
            s.metrics.set_profile_ready(&name, (!idle).then_some(ready));
            if let Some(map) = value.as_object_mut() {
                map.insert("ready".into(), ready.into());
                if idle {
                    map.insert("idle".into(), true.into());
                }
            }
            (name, value)
        })
        .collect();
    let mut body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "upstream": s.upstream,
        "mode": if s.gateway.borrow().is_some() { "gateway" } else { "sidecar" },
        "cache": { "backend": s.cache_backend, "healthy": cache_healthy },
        "profiles": profiles,
    });
    if let Some(tls) = &s.tls {
        let tls = tls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        body["tls"] = serde_json::to_value(tls).unwrap_or_default();
    }
    let gateway = s.gateway.borrow().clone();
    if let Some(gateway) = &gateway {
        body["callers"] = callers_status(gateway).await;
    }
    let reloads = s.reloads.lock().unwrap_or_else(|p| p.into_inner()).clone();
    body["config"] = serde_json::to_value(reloads).unwrap_or_default();
    Json(body).into_response()
}

/// Each caller's counts and, for limited callers, today's spend (from the ledger; absent when
/// it does not answer).
async fn callers_status(gateway: &Gateway) -> serde_json::Value {
    let day = utc_day(std::time::SystemTime::now());
    let mut out = serde_json::Map::new();
    // After one failed read the ledger is taken as down: /status must not wait on it per caller.
    let mut reachable = true;
    for caller in gateway.callers() {
        let spent = match caller.spend_limit {
            Some(_) if reachable => {
                let spent = gateway.ledger().spent(&caller.name, &day).await.ok();
                reachable = spent.is_some();
                spent
            }
            _ => None,
        };
        out.insert(
            caller.name.clone(),
            serde_json::to_value(caller.status(spent)).unwrap_or_default(),
        );
    }
    serde_json::Value::Object(out)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    for (name, authorizer) in state.0.profiles.iter() {
        let ready = authorizer.is_ready();
        let idle = !ready && authorizer.status().is_idle();
        state
            .0
            .metrics
            .set_profile_ready(&name, (!idle).then_some(ready));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.0.metrics.encode(),
    )
        .into_response()
}
