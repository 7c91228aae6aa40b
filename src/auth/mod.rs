//! How a profile authorizes a request: the seam between the forwarder and the auth methods.
//!
//! The forwarder asks a profile's [`Authorizer`] for a [`Credential`] (the headers to attach) and
//! never cares which method produced it. Methods that can answer from memory return
//! [`Authorization::Ready`] so the hot path allocates nothing; methods that may have to wait
//! (a token being minted) return [`Authorization::Pending`].

mod basic;
pub mod dpop;
pub mod oauth;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use serde::Serialize;

pub use basic::BasicAuth;

use crate::config::{AuthConfig, AuthMethod, ProfileConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::token::store::TokenStore;
use crate::token::{SystemClock, TokenManager, Tuning};

/// The headers that authorize one outbound request.
#[derive(Clone)]
pub struct Credential {
    /// Value of the `Authorization` header.
    pub authorization: HeaderValue,
    /// Value of the `DPoP` header, for DPoP-bound tokens.
    pub dpop: Option<HeaderValue>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("authorization", &crate::secret::REDACTED)
            .field("dpop", &self.dpop.as_ref().map(|_| crate::secret::REDACTED))
            .finish()
    }
}

/// Why no credential could be produced.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No usable credential now; the caller may retry after the given time.
    #[error("no usable credential for profile {profile}: {reason}")]
    Unavailable {
        /// The profile's name.
        profile: String,
        /// What went wrong, safe to show an operator.
        reason: String,
        /// When a retry may succeed.
        retry_after: Duration,
    },
}

/// The boxed future of a credential that is not ready yet.
pub type PendingCredential<'a> =
    Pin<Box<dyn Future<Output = Result<Credential, AuthError>> + Send + 'a>>;

/// A credential now, or a future one.
pub enum Authorization<'a> {
    /// Available without waiting.
    Ready(Result<Credential, AuthError>),
    /// Has to be waited for.
    Pending(PendingCredential<'a>),
}

impl fmt::Debug for Authorization<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authorization::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            Authorization::Pending(_) => f.write_str("Pending"),
        }
    }
}

impl Authorization<'_> {
    /// Waits for the credential if needed.
    pub async fn resolve(self) -> Result<Credential, AuthError> {
        match self {
            Authorization::Ready(r) => r,
            Authorization::Pending(f) => f.await,
        }
    }
}

/// What becomes of a request Tango answered 401, once the authorizer has decided.
#[derive(Debug)]
pub enum AfterRejection {
    /// A credential worth one replay is ready (a new token, or a fresh DPoP proof).
    Replay,
    /// Tango's 401 goes back to the app (nothing better to send: Tango refuses fresh tokens
    /// too, or the profile has no other credential).
    PassOn,
    /// The refused token cannot be replaced now (the token endpoint is failing): the app gets
    /// `token_unavailable`, as every request without a usable token does, rather than a 401 it
    /// would take for bad credentials.
    Unavailable(AuthError),
}

/// Resolves once the authorizer knows what becomes of a request Tango answered 401.
pub type Replay<'a> = Pin<Box<dyn Future<Output = AfterRejection> + Send + 'a>>;

/// The request a credential is for; DPoP proofs sign the method and target URL.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The outbound method.
    pub method: &'a http::Method,
    /// The exact upstream URL the request is sent to.
    pub uri: &'a http::Uri,
}

/// A profile's view of itself for `/status`; never holds a secret.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileStatus {
    /// The auth method.
    pub auth: &'static str,
    /// True when a request can be authorized right now.
    pub ready: bool,
    /// The non-secret identity (platform name, client id).
    pub identity: String,
    /// False while the profile's shared token cache is failing.
    #[serde(skip)]
    pub cache_healthy: bool,
    /// Token details for OAuth profiles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<serde_json::Value>,
    /// The last rotation of the profile's secrets, once a reload has changed them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_rotation: Option<oauth::SecretRotation>,
}

impl ProfileStatus {
    /// An OAuth profile whose token owner has not started: no token, no refresh, no failure
    /// yet (a gateway's profiles start when their first request arrives).
    pub fn is_idle(&self) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        !self.ready
            && token["expires_at"].is_null()
            && token["last_refresh"].is_null()
            && token["last_error"].is_null()
            && token["refreshing"] == false
            && token["consecutive_failures"] == 0
    }
}

/// Produces credentials for one profile.
pub trait Authorizer: fmt::Debug + Send + Sync {
    /// Credentials for one outbound request.
    fn authorize<'a>(&'a self, target: Target<'a>) -> Authorization<'a>;
    /// True when [`Authorizer::authorize`] would succeed without waiting.
    fn is_ready(&self) -> bool;
    /// A snapshot for `/status`.
    fn status(&self) -> ProfileStatus;
    /// Whether small request bodies should be buffered so a 401 can be replayed.
    fn replays(&self) -> bool {
        false
    }
    /// Tango answered 401 (`response` holds its headers) to a request sent with `used`. Acts
    /// at once (a rejected token is evicted before this returns); the future resolves to
    /// [`AfterRejection::Replay`] once [`Authorizer::authorize`] would give a credential worth
    /// one replay (a new token, or the same token with a fresh DPoP proof), to `PassOn` to pass
    /// the 401 on, or to `Unavailable` when no replacement can be had. Dropping it (a request
    /// that cannot be replayed) is fine.
    fn rejected<'a>(&'a self, _used: &Credential, _response: &http::HeaderMap) -> Replay<'a> {
        Box::pin(async { AfterRejection::PassOn })
    }
    /// Sees every upstream response to a request sent to `uri` (DPoP reads `DPoP-Nonce` here).
    fn observe(&self, _uri: &http::Uri, _headers: &http::HeaderMap) {}
    /// A reload changed only the secrets of this profile (`auth`, the same identity): take
    /// them for the next mint, keeping the token in hand. False when this authorizer cannot,
    /// and the profile is rebuilt instead.
    fn rotate_secrets(&self, _auth: &AuthConfig) -> bool {
        false
    }
    /// When the token in hand was minted (by any replica), if there is one.
    fn minted_at(&self) -> Option<std::time::SystemTime> {
        None
    }
    /// Stops (`true`) or resumes the token's renewals inside its refresh window (a rotation
    /// sharing the client's mint budget makes the next mint instead).
    fn hold_renewals(&self, _hold: bool) {}
}

/// One Tango identity and the authorizer that speaks for it.
#[derive(Debug, Clone)]
pub struct Profile {
    /// The name under `[profiles]`.
    pub name: String,
    /// The method.
    pub method: AuthMethod,
    /// Produces the credentials.
    pub authorizer: Arc<dyn Authorizer>,
}

impl Profile {
    /// Builds a profile from its validated configuration. OAuth profiles start their token
    /// manager, so this needs a Tokio runtime.
    pub fn from_config(
        config: &ProfileConfig,
        upstream: &UpstreamConfig,
        store: Arc<dyn TokenStore>,
        metrics: Arc<Metrics>,
        tuning: Tuning,
    ) -> Result<Profile, AuthBuildError> {
        let authorizer: Arc<dyn Authorizer> = match &config.auth {
            AuthConfig::Basic {
                platform_name,
                api_key,
                ..
            } => Arc::new(BasicAuth::new(platform_name, api_key)?),
            AuthConfig::ClientCredentials(oauth) | AuthConfig::ServiceAccount(oauth) => {
                let dpop = oauth.dpop.as_ref().map(|d| {
                    Arc::new(dpop::Dpop {
                        key: d.key.clone(),
                        nonces: dpop::NonceCache::default(),
                    })
                });
                let client = Arc::new(
                    oauth::TokenClient::new(oauth, upstream, dpop.clone())
                        .map_err(AuthBuildError::TokenClient)?
                        .with_metrics(metrics.clone()),
                );
                let manager = TokenManager::start(
                    &config.name,
                    oauth,
                    client.clone(),
                    dpop.as_ref().map(|d| d.key.thumbprint()),
                    store,
                    metrics.clone(),
                    Arc::new(SystemClock),
                    tuning,
                );
                Arc::new(oauth::OAuthAuthorizer::new(
                    &config.name,
                    config.auth.method(),
                    oauth,
                    manager,
                    client,
                    dpop,
                    metrics,
                ))
            }
        };
        Ok(Profile {
            name: config.name.clone(),
            method: config.auth.method(),
            authorizer,
        })
    }
}

/// The running profiles: at start in name order, then as reloads add them. Each one's
/// authorizer can be replaced by a reload (a credential rotation) while requests run: a request
/// holds the authorizer it started with until it ends, so a swap never touches a request in
/// flight. A profile keeps its place (its index) for the life of the process: one a reload
/// removes is retired in place (it refuses to authorize, and is no longer listed).
#[derive(Debug)]
pub struct ProfileSet {
    slots: std::sync::RwLock<Vec<Arc<Slot>>>,
}

#[derive(Debug)]
struct Slot {
    name: String,
    method: AuthMethod,
    authorizer: std::sync::RwLock<Arc<dyn Authorizer>>,
    retired: std::sync::atomic::AtomicBool,
}

impl Slot {
    fn new(p: Profile) -> Arc<Self> {
        Arc::new(Slot {
            name: p.name,
            method: p.method,
            authorizer: std::sync::RwLock::new(p.authorizer),
            retired: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn live(&self) -> bool {
        !self.retired.load(std::sync::atomic::Ordering::Acquire)
    }

    fn authorizer(&self) -> Arc<dyn Authorizer> {
        self.authorizer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ProfileSet {
    /// The set of `profiles`, in the order given.
    pub fn new(profiles: Vec<Profile>) -> Self {
        Self {
            slots: std::sync::RwLock::new(profiles.into_iter().map(Slot::new).collect()),
        }
    }

    fn slots(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Slot>>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, i: usize) -> Option<Arc<Slot>> {
        self.slots().get(i).cloned()
    }

    /// The name of profile `i`.
    pub fn name(&self, i: usize) -> String {
        self.slot(i).map(|s| s.name.clone()).unwrap_or_default()
    }

    /// Where the running profile called `name` is.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.slots().iter().position(|s| s.live() && s.name == name)
    }

    /// The names of the running profiles by place (`None` for a retired place).
    pub fn names(&self) -> Vec<Option<String>> {
        self.slots()
            .iter()
            .map(|s| s.live().then(|| s.name.clone()))
            .collect()
    }

    /// The authorizer of profile `i` as of now (one that refuses, for a place that does not
    /// exist).
    pub fn authorizer(&self, i: usize) -> Arc<dyn Authorizer> {
        match self.slot(i) {
            Some(s) => s.authorizer(),
            None => Arc::new(Retired(String::new())),
        }
    }

    /// Profile `i`'s authorizer as of now and whether it is a Basic profile, in one look (the
    /// request path's).
    pub fn for_request(&self, i: usize) -> (Arc<dyn Authorizer>, bool) {
        let slots = self.slots();
        match slots.get(i) {
            Some(s) => (s.authorizer(), s.method == AuthMethod::Basic),
            None => (Arc::new(Retired(String::new())), false),
        }
    }

    /// Every running profile's name and current authorizer, in place order.
    pub fn iter(&self) -> Vec<(String, Arc<dyn Authorizer>)> {
        self.slots()
            .iter()
            .filter(|s| s.live())
            .map(|s| (s.name.clone(), s.authorizer()))
            .collect()
    }

    /// Makes `authorizer` profile `i`'s for every later request; the replaced one serves the
    /// requests that hold it until they end.
    pub fn replace(&self, i: usize, authorizer: Arc<dyn Authorizer>) {
        let Some(slot) = self.slot(i) else {
            return;
        };
        let old = std::mem::replace(
            &mut *slot.authorizer.write().unwrap_or_else(|p| p.into_inner()),
            authorizer,
        );
        // Dropped outside the lock (an OAuth authorizer's drop stops its token task).
        drop(old);
    }

    /// Adds a profile; returns its place.
    pub fn push(&self, profile: Profile) -> usize {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        slots.push(Slot::new(profile));
        slots.len() - 1
    }

    /// Retires profile `i` (removed by a reload): it refuses every later request and its
    /// token task stops once the requests holding it end.
    pub fn retire(&self, i: usize) {
        let Some(slot) = self.slot(i) else {
            return;
        };
        slot.retired
            .store(true, std::sync::atomic::Ordering::Release);
        self.replace(i, Arc::new(Retired(slot.name.clone())));
    }
}

/// The authorizer of a profile a reload removed.
#[derive(Debug)]
struct Retired(String);

impl Authorizer for Retired {
    fn authorize<'a>(&'a self, _target: Target<'a>) -> Authorization<'a> {
        Authorization::Ready(Err(AuthError::Unavailable {
            profile: self.0.clone(),
            reason: "the profile was removed from the configuration".into(),
            retry_after: Duration::from_secs(1),
        }))
    }

    fn is_ready(&self) -> bool {
        false
    }

    fn status(&self) -> ProfileStatus {
        ProfileStatus {
            auth: "removed",
            ready: false,
            identity: String::new(),
            cache_healthy: true,
            token: None,
            secret_rotation: None,
        }
    }
}

/// A profile that cannot be built from its configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthBuildError {
    /// The credential cannot be carried in an HTTP header.
    #[error("credential for {0} contains characters not allowed in an HTTP header")]
    InvalidHeader(&'static str),
    /// The token endpoint client could not be built.
    #[error("{0}")]
    TokenClient(String),
}
