//! The per-profile token manager.
//!
//! * **Hot path**: a usable token in memory answers [`Authorizer::authorize`] without waiting or
//!   allocating beyond a header clone. Inside the refresh window it also nudges the refresher.
//! * **Single-flight**: one refresh task at a time per profile. Requests with no usable token
//!   subscribe to a generation counter and wait (at most the token timeout plus a second) for that
//!   task, so any number of concurrent requests cause one token request and share its outcome.
//! * **Failures**: after a failed token request, requests that find no usable token get
//!   `token_unavailable` at once (with `Retry-After`) instead of waiting; only the background
//!   refresher retries, with capped exponential backoff and jitter (longer after Tango's
//!   rate-limit answer). While a usable token exists, requests keep flowing.
//! * **Refresher**: a background task mints at start, inside the refresh window (jittered), and when
//!   the token becomes unusable; it honours `min_token_interval` except for unusable or rejected
//!   tokens.
//! * **401**: [`Authorizer::rejected`] evicts the token only if it is still the current one, and
//!   starts one mint; the forwarder then replays a buffered request once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::store::TokenStore;
use super::{expiry, Token};
use crate::auth::dpop::{self, Dpop};
use crate::auth::oauth::{TokenClient, TokenError};
use crate::auth::{AuthError, Authorization, Authorizer, Credential, ProfileStatus, Target};
use crate::config::{AuthMethod, OAuthConfig};
use crate::metrics::Metrics;

/// First retry delay after a failed token request.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay after ordinary failures.
const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// First retry delay after Tango's rate-limit answer.
const RATE_LIMIT_BACKOFF_BASE: Duration = Duration::from_secs(60);
/// Longest retry delay after rate-limit answers.
const RATE_LIMIT_BACKOFF_CAP: Duration = Duration::from_secs(3600);
/// After a mint caused by a 401, another 401-caused mint waits this long: if Tango rejects fresh
/// tokens too, minting more of them would only hammer the token endpoint.
const REJECTED_MINT_INTERVAL: Duration = Duration::from_secs(10);
/// How often a token that could not be written to the cache is retried.
const WRITE_BACK_INTERVAL: Duration = Duration::from_secs(2);
/// How often a process sharing a cache checks that the cache still holds its token (a Redis
/// restarted empty, an eviction) and picks up a newer one a replica wrote: one read per replica
/// per interval, never per request.
const STORE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Longest the refresher sleeps without re-planning.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Cold,
    Window,
    Expired,
    Rejected,
    Retry,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Cold => "cold",
            Reason::Window => "window",
            Reason::Expired => "expired",
            Reason::Rejected => "rejected",
            Reason::Retry => "retry",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    minting: bool,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    last_refresh: Option<SystemTime>,
    last_mint: Option<SystemTime>,
    mints: u64,
    refresh_at: Option<SystemTime>,
    last_rejected_mint: Option<Instant>,
    cache_degraded: bool,
    unsaved: bool,
}

/// What `/status` shows about a token profile; no secret.
#[derive(Debug, Clone, Serialize)]
pub struct ManagerStatus {
    /// When the current token expires (RFC 3339).
    pub expires_at: Option<String>,
    /// Seconds until then.
    pub seconds_left: u64,
    /// When the current token was obtained (minted or read from the store).
    pub last_refresh: Option<String>,
    /// Tokens minted by this process.
    pub mints: u64,
    /// Consecutive failed token requests.
    pub consecutive_failures: u32,
    /// The last token request error, kept after recovery for diagnosis.
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_at: Option<String>,
    /// Seconds until the next retry while backing off.
    pub retry_in_seconds: Option<u64>,
    /// True while the token endpoint is failing.
    pub degraded: bool,
    /// True while the shared token cache is unreachable (the proxy coordinates in-process).
    pub cache_degraded: bool,
    /// The DPoP key's thumbprint, for DPoP profiles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpop_jkt: Option<String>,
}

#[derive(Debug)]
struct Shared {
    profile: String,
    method: AuthMethod,
    identity: String,
    audience: String,
    client: TokenClient,
    dpop: Option<Arc<Dpop>>,
    refresh_window: Duration,
    min_interval: Option<Duration>,
    wait: Duration,
    store: Arc<dyn TokenStore>,
    key: String,
    current: RwLock<Option<Arc<Token>>>,
    /// `State::refresh_at` as Unix ms, readable without the lock on the request path.
    refresh_at_ms: AtomicU64,
    state: Mutex<State>,
    generation: watch::Sender<u64>,
    wake: Notify,
    metrics: Arc<Metrics>,
}

/// Keeps one profile's token fresh and hands it to requests.
#[derive(Debug)]
pub struct TokenManager {
    shared: Arc<Shared>,
    refresher: JoinHandle<()>,
}

impl Drop for TokenManager {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl TokenManager {
    /// Builds the manager and starts its refresher (which mints at once). Needs a Tokio runtime.
    pub fn start(
        profile: &str,
        method: AuthMethod,
        config: &OAuthConfig,
        client: TokenClient,
        dpop: Option<Arc<Dpop>>,
        store: Arc<dyn TokenStore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let identity = match &config.username {
            Some(u) => format!("{} / {u}", config.client_id),
            None => config.client_id.clone(),
        };
        let shared = Arc::new(Shared {
            profile: profile.to_string(),
            method,
            identity,
            audience: config.audience.clone(),
            key: fingerprint(config, client.grant(), dpop.as_deref()),
            client,
            dpop,
            refresh_window: config.refresh_window,
            min_interval: config.min_token_interval,
            wait: config.token_timeout + Duration::from_secs(1),
            store,
            current: RwLock::new(None),
            refresh_at_ms: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            generation: watch::channel(0).0,
            wake: Notify::new(),
            metrics,
        });
        let refresher = tokio::spawn(refresher(Arc::downgrade(&shared)));
        Self { shared, refresher }
    }
}

/// A stable, non-secret key for what makes a token different.
fn fingerprint(config: &OAuthConfig, grant: &str, dpop: Option<&Dpop>) -> String {
    let material = [
        config.token_url.as_str(),
        grant,
        config.client_id.as_str(),
        config.username.as_deref().unwrap_or(""),
        config.audience.as_str(),
        config.scope.as_str(),
        dpop.map_or("", |d| d.key.thumbprint()),
    ]
    .join("\n");
    let digest = ring::digest::digest(&ring::digest::SHA256, material.as_bytes());
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A random fraction in [0, 1).
fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u32::from_le_bytes(b) as f64 / (u32::MAX as f64 + 1.0)
}

impl Shared {
    /// The headers for one request: the token, plus a fresh proof for DPoP tokens.
    fn credential(&self, token: &Token, target: Target<'_>) -> Result<Credential, AuthError> {
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
            authorization: token.authorization(),
            dpop: proof,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> Option<Arc<Token>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_current(&self, token: Option<Arc<Token>>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = token;
    }

    fn usable(&self, now: SystemTime) -> Option<Arc<Token>> {
        self.current().filter(|t| t.usable_at(now))
    }

    fn unavailable(&self, st: &State) -> AuthError {
        let retry_after = st
            .retry_at
            .map(|r| r.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_secs(1));
        let reason = match &st.last_error {
            Some(e) if st.failures > 0 => format!("token request failing: {e}"),
            _ => "no token yet".to_string(),
        };
        AuthError::Unavailable {
            profile: self.profile.clone(),
            reason,
            retry_after,
        }
    }

    /// Starts a refresh task unless one is running. Returns whether one is running now.
    fn start_refresh(self: &Arc<Self>, reason: Reason) -> bool {
        {
            let mut st = self.state();
            if st.minting {
                return true;
            }
            st.minting = true;
        }
        let me = self.clone();
        tokio::spawn(async move { me.refresh(reason).await });
        true
    }

    async fn refresh(self: Arc<Self>, reason: Reason) {
        if reason != Reason::Rejected && self.adopt_stored().await {
            self.finish();
            return;
        }
        if reason == Reason::Window && self.fleet_minted_recently().await {
            self.finish();
            return;
        }
        if !self.store.shared() {
            self.mint(reason).await;
            self.finish();
            return;
        }
        // Fleet single-flight: one process mints, the others wait for its token.
        let owner = crate::random_hex(16);
        let ttl = self.lease_ttl();
        match self.store.try_lease(&self.key, &owner, ttl).await {
            Ok(true) => self.mint_holding_lease(reason, &owner, ttl).await,
            Ok(false) => {
                self.metrics.lease_wait();
                let started = Instant::now();
                let done = self.await_fleet_token(ttl).await;
                self.metrics.lease_waited(started.elapsed());
                if !done {
                    // The holder produced no token (it died or its mint failed): take over once.
                    match self.store.try_lease(&self.key, &owner, ttl).await {
                        Ok(true) => self.mint_holding_lease(reason, &owner, ttl).await,
                        Ok(false) => self.fail(
                            &TokenError::Coordination(
                                "another replica holds the refresh lease and has not produced a token yet".into(),
                            ),
                            reason,
                        ),
                        Err(e) => {
                            self.cache_error(&e);
                            self.mint(reason).await;
                        }
                    }
                }
            }
            Err(e) => {
                self.cache_error(&e);
                self.mint(reason).await;
            }
        }
        self.finish();
    }

    /// How long a refresh lease lives without being extended.
    fn lease_ttl(&self) -> Duration {
        self.wait + Duration::from_secs(1)
    }

    /// With `min_token_interval`, a window refresh waits while any process minted recently.
    async fn fleet_minted_recently(&self) -> bool {
        let Some(interval) = self.min_interval else {
            return false;
        };
        match self.store.last_mint(&self.key).await {
            Ok(Some(at)) if at + interval > SystemTime::now() => {
                let mut st = self.state();
                if st.last_mint.is_none_or(|m| m < at) {
                    st.last_mint = Some(at);
                }
                tracing::debug!(profile = %self.profile, "a replica minted recently; renewal waits for the mint budget");
                true
            }
            Ok(_) => false,
            Err(e) => {
                self.cache_error(&e);
                false
            }
        }
    }

    async fn mint_holding_lease(&self, reason: Reason, owner: &str, ttl: Duration) {
        let keep_alive = async {
            loop {
                tokio::time::sleep(ttl / 3).await;
                if let Err(e) = self.store.extend_lease(&self.key, owner, ttl).await {
                    self.cache_error(&e);
                }
            }
        };
        tokio::select! {
            () = self.mint(reason) => {}
            () = keep_alive => {}
        }
        if let Err(e) = self.store.release_lease(&self.key, owner).await {
            self.cache_error(&e);
        }
    }

    /// Polls the shared store until another process's token appears (or the fleet is told to
    /// back off), at most `ttl`. True when nothing is left to do.
    async fn await_fleet_token(&self, ttl: Duration) -> bool {
        let deadline = Instant::now() + ttl;
        while Instant::now() < deadline {
            // Returns early when the holder announces its token; else a 50 ms poll.
            if let Err(e) = self
                .store
                .wait_for_change(&self.key, Duration::from_millis(50))
                .await
            {
                self.cache_error(&e);
            }
            if self.adopt_stored().await || self.honour_fleet_backoff().await {
                return true;
            }
        }
        false
    }

    /// Applies a fleet-wide backoff another replica recorded; true when one is in force.
    async fn honour_fleet_backoff(&self) -> bool {
        let (until, why) = match self.store.fleet_backoff(&self.key).await {
            Ok(Some(b)) => b,
            Ok(None) => return false,
            Err(e) => {
                self.cache_error(&e);
                return false;
            }
        };
        let left = until.duration_since(SystemTime::now()).unwrap_or_default();
        let mut st = self.state();
        st.failures = st.failures.max(1);
        st.retry_at = Some(Instant::now() + left);
        st.last_error = Some(format!("{why} (answer given to another replica)"));
        st.last_error_at = Some(SystemTime::now());
        tracing::warn!(
            profile = %self.profile,
            retry_in_s = left.as_secs(),
            "not asking Tango for a token: the fleet is backing off ({why})"
        );
        true
    }

    fn cache_error(&self, e: &super::store::StoreError) {
        let mut st = self.state();
        if !st.cache_degraded {
            tracing::warn!(profile = %self.profile, "token cache degraded, coordinating inside this process only: {e}");
            self.metrics.set_cache_degraded(&self.profile, true);
        }
        st.cache_degraded = true;
    }

    fn cache_ok(&self) {
        let mut st = self.state();
        if st.cache_degraded {
            tracing::info!(profile = %self.profile, "token cache reachable again");
            self.metrics.set_cache_degraded(&self.profile, false);
        }
        st.cache_degraded = false;
    }

    /// Compares the shared copy with ours: writes ours back when the cache lost it, adopts a
    /// newer one a replica stored.
    async fn check_shared_copy(&self) {
        if self.state().minting {
            return;
        }
        let Some(ours) = self.usable(SystemTime::now()) else {
            return;
        };
        match self.store.load(&self.key).await {
            Err(e) => {
                self.cache_error(&e);
                self.state().unsaved = true;
            }
            Ok(Some(theirs)) if theirs.expires_at > ours.expires_at => {
                self.cache_ok();
                self.adopt(Arc::new(theirs), false);
            }
            Ok(Some(theirs)) if theirs.expires_at == ours.expires_at => self.cache_ok(),
            Ok(_) => {
                tracing::info!(profile = %self.profile, "the token cache lost the token; writing it back");
                self.state().unsaved = true;
                self.write_back().await;
            }
        }
    }

    /// Writes the current token back after the store was unreachable.
    async fn write_back(&self) {
        let Some(token) = self.usable(SystemTime::now()) else {
            self.state().unsaved = false;
            return;
        };
        match self.store.save(&self.key, &token).await {
            Ok(()) => {
                self.state().unsaved = false;
                self.cache_ok();
                tracing::info!(profile = %self.profile, "wrote the token back to the cache");
            }
            Err(e) => self.cache_error(&e),
        }
    }

    async fn mint(&self, reason: Reason) {
        if self.honour_fleet_backoff().await {
            return;
        }
        let dpop = self.dpop.is_some();
        match self.client.fetch().await.and_then(|r| {
            let expected = if dpop { "dpop" } else { "bearer" };
            if r.token_type != expected {
                return Err(TokenError::InvalidResponse(format!(
                    "token_type {:?}; this profile needs {expected} tokens",
                    r.token_type
                )));
            }
            let (expires_at, lifetime) = expiry(
                r.expires_in,
                r.access_token.expose(),
                &self.audience,
                SystemTime::now(),
            );
            Token::new(r.access_token, expires_at, lifetime, dpop).ok_or_else(|| {
                TokenError::InvalidResponse("access_token is not valid in an HTTP header".into())
            })
        }) {
            Ok(token) => {
                self.metrics.token_request(&self.profile, "success");
                self.metrics.mint(&self.profile, reason.as_str());
                tracing::info!(
                    profile = %self.profile,
                    reason = reason.as_str(),
                    lifetime_s = token.lifetime.as_secs(),
                    "obtained a new token"
                );
                let saved = self.store.save(&self.key, &token).await;
                let recorded = self.store.record_mint(&self.key, SystemTime::now()).await;
                let announced = self.store.announce(&self.key).await;
                match saved.and(recorded).and(announced) {
                    Ok(()) => self.cache_ok(),
                    Err(e) => {
                        self.cache_error(&e);
                        self.state().unsaved = true;
                    }
                }
                self.adopt(Arc::new(token), true);
            }
            Err(e) => {
                self.fail(&e, reason);
                if let TokenError::RateLimited(_) = &e {
                    let until = self
                        .state()
                        .retry_at
                        .map(|r| SystemTime::now() + r.saturating_duration_since(Instant::now()));
                    if let Some(until) = until {
                        if let Err(err) = self
                            .store
                            .set_fleet_backoff(&self.key, until, &e.to_string())
                            .await
                        {
                            self.cache_error(&err);
                        }
                    }
                }
            }
        }
    }

    /// Uses a stored token if it is better than what this process holds.
    async fn adopt_stored(&self) -> bool {
        let now = SystemTime::now();
        let stored = match self.store.load(&self.key).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                self.metrics.lookup(true, false);
                return false;
            }
            Err(e) => {
                self.cache_error(&e);
                return false;
            }
        };
        self.metrics.lookup(true, true);
        let newer = self
            .current()
            .is_none_or(|c| stored.expires_at > c.expires_at);
        if stored.usable_at(now) && stored.refresh_from(self.refresh_window) > now && newer {
            self.adopt(Arc::new(stored), false);
            return true;
        }
        false
    }

    fn adopt(&self, token: Arc<Token>, minted: bool) {
        let now = SystemTime::now();
        let window = self.refresh_window.min(token.lifetime / 4);
        let jitter = (window / 10)
            .min(Duration::from_secs(60))
            .mul_f64(random_unit());
        {
            let mut st = self.state();
            st.failures = 0;
            st.retry_at = None;
            st.last_refresh = Some(now);
            if minted {
                st.last_mint = Some(now);
                st.mints += 1;
            }
            let at = token.refresh_from(self.refresh_window) + jitter;
            st.refresh_at = Some(at);
            self.refresh_at_ms.store(unix_ms(at), Ordering::Relaxed);
        }
        let expiry_unix = token
            .expires_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.metrics.token_expiry(&self.profile, expiry_unix);
        self.set_current(Some(token));
    }

    fn fail(&self, e: &TokenError, reason: Reason) {
        self.metrics.token_request(&self.profile, e.outcome());
        let mut st = self.state();
        st.failures = st.failures.saturating_add(1);
        let (base, cap) = match e {
            TokenError::RateLimited(_) => (RATE_LIMIT_BACKOFF_BASE, RATE_LIMIT_BACKOFF_CAP),
            _ => (BACKOFF_BASE, BACKOFF_CAP),
        };
        let exp = base.saturating_mul(1u32 << st.failures.saturating_sub(1).min(16));
        // ±20 % jitter so replicas and profiles do not retry in step.
        let delay = exp.min(cap).mul_f64(0.8 + 0.4 * random_unit());
        st.retry_at = Some(Instant::now() + delay);
        st.last_error = Some(e.to_string());
        st.last_error_at = Some(SystemTime::now());
        let have_token = self.usable(SystemTime::now()).is_some();
        if let TokenError::RateLimited(_) = e {
            tracing::error!(
                profile = %self.profile,
                reason = reason.as_str(),
                retry_in_s = delay.as_secs(),
                usable_token = have_token,
                "Tango refused a new token: daily rate limit exceeded ({e}); not asking again before the retry time"
            );
        } else {
            tracing::warn!(
                profile = %self.profile,
                reason = reason.as_str(),
                retry_in_ms = delay.as_millis() as u64,
                usable_token = have_token,
                "token request failed: {e}"
            );
        }
    }

    fn finish(&self) {
        self.state().minting = false;
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
        self.wake.notify_one();
    }

    /// What the refresher should do now, and how long to sleep otherwise.
    fn plan(&self, now: SystemTime) -> (Option<Reason>, Duration) {
        let st = self.state();
        if st.minting {
            return (None, MAX_SLEEP);
        }
        if let Some(r) = st.retry_at {
            let left = r.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                return (None, left);
            }
        }
        let retrying = st.failures > 0;
        let Some(token) = self.current() else {
            return (
                Some(if retrying {
                    Reason::Retry
                } else {
                    Reason::Cold
                }),
                MAX_SLEEP,
            );
        };
        if !token.usable_at(now) {
            return (
                Some(if retrying {
                    Reason::Retry
                } else {
                    Reason::Expired
                }),
                MAX_SLEEP,
            );
        }
        let window_at = st
            .refresh_at
            .unwrap_or_else(|| token.refresh_from(self.refresh_window));
        let budget_at = match (self.min_interval, st.last_mint) {
            (Some(i), Some(m)) => m + i,
            _ => UNIX_EPOCH,
        };
        let at = window_at.max(budget_at);
        let unusable_at = token.expires_at - token.skew();
        if at >= unusable_at {
            // The mint budget forbids renewing before the token becomes unusable.
            return (None, unusable_at.duration_since(now).unwrap_or_default());
        }
        match at.duration_since(now) {
            Ok(wait) if !wait.is_zero() => (None, wait),
            _ => (
                Some(if retrying {
                    Reason::Retry
                } else {
                    Reason::Window
                }),
                MAX_SLEEP,
            ),
        }
    }

    async fn wait_for_token(self: Arc<Self>, target: Target<'_>) -> Result<Credential, AuthError> {
        let mut generation = self.generation.subscribe();
        let now = SystemTime::now();
        // A refresh may have finished between the caller's check and the subscription; starting
        // another one then would mint a second token.
        if let Some(t) = self.usable(now) {
            return self.credential(&t, target);
        }
        if self.state().failures > 0 {
            return Err(self.unavailable(&self.state()));
        }
        let reason = if self.current().is_some() {
            Reason::Expired
        } else {
            Reason::Cold
        };
        self.start_refresh(reason);
        let _ = tokio::time::timeout(self.wait, generation.changed()).await;
        match self.usable(SystemTime::now().max(now)) {
            Some(t) => self.credential(&t, target),
            None => Err(self.unavailable(&self.state())),
        }
    }
}

async fn refresher(shared: Weak<Shared>) {
    let mut last_check = Instant::now();
    loop {
        let Some(me) = shared.upgrade() else { return };
        if me.store.shared() && last_check.elapsed() >= STORE_CHECK_INTERVAL {
            last_check = Instant::now();
            me.check_shared_copy().await;
        }
        let (due, mut sleep) = me.plan(SystemTime::now());
        if let Some(reason) = due {
            me.start_refresh(reason);
        }
        if me.state().unsaved {
            me.write_back().await;
            sleep = sleep.min(WRITE_BACK_INTERVAL);
        }
        if me.store.shared() {
            sleep = sleep.min(STORE_CHECK_INTERVAL);
        }
        let sleep = sleep.clamp(Duration::from_millis(10), MAX_SLEEP);
        let me_for_wait = me.clone();
        drop(me);
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = me_for_wait.wake.notified() => {}
        }
    }
}

impl Authorizer for TokenManager {
    fn authorize<'a>(&'a self, target: Target<'a>) -> Authorization<'a> {
        let shared = &self.shared;
        let now = SystemTime::now();
        if let Some(token) = shared.usable(now) {
            shared.metrics.lookup(false, true);
            // An atomic, not the state lock: this runs on every request.
            let refresh_at = shared.refresh_at_ms.load(Ordering::Relaxed);
            if refresh_at != 0 && unix_ms(now) >= refresh_at {
                shared.wake.notify_one();
            }
            return Authorization::Ready(shared.credential(&token, target));
        }
        shared.metrics.lookup(false, false);
        {
            let st = shared.state();
            if st.failures > 0 {
                // The token endpoint is failing: answer now, let the refresher retry.
                return Authorization::Ready(Err(shared.unavailable(&st)));
            }
        }
        Authorization::Pending(Box::pin(shared.clone().wait_for_token(target)))
    }

    fn is_ready(&self) -> bool {
        self.shared.usable(SystemTime::now()).is_some()
    }

    fn replays(&self) -> bool {
        true
    }

    fn observe(&self, uri: &http::Uri, headers: &http::HeaderMap) {
        if let (Some(d), Some(nonce)) = (
            &self.shared.dpop,
            headers.get("dpop-nonce").and_then(|v| v.to_str().ok()),
        ) {
            d.nonces.update(&dpop::origin(uri), nonce);
        }
    }

    fn rejected(&self, used: &Credential, challenge: Option<&HeaderValue>) -> bool {
        let shared = &self.shared;
        if challenge
            .and_then(|c| c.to_str().ok())
            .is_some_and(|c| c.contains("use_dpop_nonce"))
        {
            // A nonce challenge is not a bad token: replay with a proof carrying the new nonce
            // (already recorded by `observe`).
            return shared.dpop.is_some();
        }
        shared.metrics.upstream_401(&shared.profile);
        match shared.current() {
            Some(t) if t.authorization() == used.authorization => {
                {
                    let mut st = shared.state();
                    let recent = st
                        .last_rejected_mint
                        .is_some_and(|at| at.elapsed() < REJECTED_MINT_INTERVAL);
                    if recent || st.failures > 0 {
                        tracing::warn!(
                            profile = %shared.profile,
                            "Tango rejected a token again (401) soon after a replacement; passing the 401 on without minting"
                        );
                        return false;
                    }
                    st.last_rejected_mint = Some(Instant::now());
                }
                shared.set_current(None);
                tracing::warn!(profile = %shared.profile, "Tango rejected the token (401); minting a new one");
                let store = shared.store.clone();
                let key = shared.key.clone();
                let me = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.evict_if(&key, &t).await {
                        tracing::warn!(profile = %me.profile, "cannot evict the rejected token: {e}");
                    }
                });
                shared.start_refresh(Reason::Rejected)
            }
            Some(t) if t.usable_at(SystemTime::now()) => true,
            _ => shared.state().minting,
        }
    }

    fn status(&self) -> ProfileStatus {
        let shared = &self.shared;
        let now = SystemTime::now();
        let token = shared.current();
        let st = shared.state();
        let details = ManagerStatus {
            expires_at: token.as_ref().map(|t| rfc3339(t.expires_at)),
            seconds_left: token.as_ref().map_or(0, |t| t.seconds_left(now)),
            last_refresh: st.last_refresh.map(rfc3339),
            mints: st.mints,
            consecutive_failures: st.failures,
            last_error: st.last_error.clone(),
            last_error_at: st.last_error_at.map(rfc3339),
            retry_in_seconds: st
                .retry_at
                .map(|r| r.saturating_duration_since(Instant::now()).as_secs()),
            degraded: st.failures > 0,
            cache_degraded: st.cache_degraded,
            dpop_jkt: shared.dpop.as_ref().map(|d| d.key.thumbprint().to_string()),
        };
        ProfileStatus {
            auth: shared.method.as_str(),
            ready: token.is_some_and(|t| t.usable_at(now)),
            identity: shared.identity.clone(),
            token: serde_json::to_value(details).ok(),
        }
    }
}
