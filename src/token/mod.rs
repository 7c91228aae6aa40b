//! Tokens and their lifecycle, with no HTTP in sight.
//!
//! * [`Token`]: an access token with its in-process deadline (a monotonic
//!   [`tokio::time::Instant`]) and its wall-clock expiry, used only where a token is persisted or
//!   shown. The pre-encoded `Authorization` value and the DPoP `ath` are computed once.
//! * [`lifetime`]: how long a fresh token lives (DESIGN.md §4), with untrusted numbers capped.
//! * [`TokenSource`]: how the lifecycle reaches a token endpoint; `auth::oauth` implements it.
//! * [`machine`]: the pure per-profile state machine; `manager`: the task that owns it and does
//!   its I/O, and the cheap handle requests read.
//! * [`store`]: where tokens are kept between mints (memory, files, Redis).

pub mod machine;
mod manager;
mod redis_store;
mod seal;
pub mod store;
pub use redis_store::{check_options as check_redis_options, RedisOptions, RedisStore};
pub use seal::{KeyError, Record, Sealer};

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use tokio::time::Instant;

pub use manager::{
    fingerprint, Clock, ManagerStatus, Need, Snapshot, SystemClock, TokenManager, Tuning,
    Unavailable,
};

use crate::secret::Secret;

/// Lifetime Tango documents for the default audience.
pub const DAY_LIFETIME: Duration = Duration::from_secs(86_400);
/// Lifetime of the five-minute audience.
pub const FIVE_MINUTE_LIFETIME: Duration = Duration::from_secs(300);
/// Default margin before expiry after which a token is no longer used.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(30);
/// The longest lifetime believed from a token answer (`expires_in` or a JWT `exp`). Tango
/// documents 30 days (2,592,000 s); anything past this is a broken or hostile answer and is
/// ignored like a missing value.
pub const MAX_LIFETIME: Duration = Duration::from_secs(400 * 86_400);

/// The longest access token accepted (a JWT with many claims is a few KiB; anything near this
/// would not fit in the header limits of the servers it is sent to).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// An access token and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token itself.
    pub access_token: Secret,
    /// When it expires by the wall clock, to the millisecond (what a stored record carries).
    pub expires_at: SystemTime,
    /// How long it was valid for when obtained.
    pub lifetime: Duration,
    /// True for a DPoP-bound token (`Authorization: DPoP ...`).
    pub dpop: bool,
    /// When it expires by this process's monotonic clock.
    expires: Instant,
    ath: String,
}

impl Token {
    /// A token valid for `remaining` from `now` (monotonic) / `wall` (wall clock), obtained
    /// `lifetime` before its expiry. `None` when the token is not a visible-ASCII string (it
    /// could not be carried in an `Authorization` header) or the times do not fit the clocks.
    pub fn new(
        access_token: Secret,
        remaining: Duration,
        lifetime: Duration,
        dpop: bool,
        now: Instant,
        wall: SystemTime,
    ) -> Option<Self> {
        let remaining = remaining.min(MAX_LIFETIME);
        let expires_at = truncate_ms(wall.checked_add(remaining)?);
        let expires = now.checked_add(remaining)?;
        let value = access_token.expose();
        if value.is_empty()
            || value.len() > MAX_TOKEN_LEN
            || !value.bytes().all(|b| b.is_ascii_graphic())
        {
            return None;
        }
        let ath = ath(value);
        Some(Self {
            access_token,
            expires_at,
            lifetime: lifetime.min(MAX_LIFETIME),
            dpop,
            expires,
            ath,
        })
    }

    /// A token read back from a store: its remaining life is measured against this process's
    /// wall clock once, then kept on the monotonic clock. `None` when it has expired, claims more
    /// than [`MAX_LIFETIME`], or cannot be carried in a header.
    pub fn from_record(record: Record, now: Instant, wall: SystemTime) -> Option<Self> {
        let remaining = record.expires_at.duration_since(wall).ok()?;
        if remaining.is_zero() || remaining > MAX_LIFETIME {
            return None;
        }
        Self::new(
            record.access_token,
            remaining,
            record.lifetime,
            record.dpop,
            now,
            wall,
        )
    }

    /// `ath` for DPoP proofs: base64url(SHA-256(token)), computed once. Also how tokens are
    /// compared without exposing them.
    pub fn ath(&self) -> &str {
        &self.ath
    }

    /// The `Authorization` scheme it is used with.
    pub fn scheme(&self) -> &'static str {
        if self.dpop {
            "DPoP"
        } else {
            "Bearer"
        }
    }

    /// The margin before expiry: 30 s, or a tenth of the lifetime for short-lived tokens.
    pub fn skew(&self) -> Duration {
        DEFAULT_SKEW.min(self.lifetime / 10)
    }

    /// When it stops being used: `expires - skew`.
    pub fn usable_until(&self) -> Instant {
        self.expires
            .checked_sub(self.skew())
            .unwrap_or(self.expires)
    }

    /// True while `now` is before [`Token::usable_until`].
    pub fn usable_at(&self, now: Instant) -> bool {
        now < self.usable_until()
    }

    /// Start of the refresh window: `expires - min(refresh_window, lifetime / 4)`.
    pub fn refresh_from(&self, refresh_window: Duration) -> Instant {
        self.expires
            .checked_sub(refresh_window.min(self.lifetime / 4))
            .unwrap_or(self.expires)
    }

    /// When it expires by the monotonic clock.
    pub fn expires(&self) -> Instant {
        self.expires
    }

    /// The wall-clock expiry in Unix milliseconds (records compare at this precision).
    pub fn expires_ms(&self) -> u64 {
        unix_ms(self.expires_at)
    }

    /// What a store keeps of this token.
    pub fn record(&self) -> Record {
        Record {
            access_token: self.access_token.clone(),
            expires_at: self.expires_at,
            lifetime: self.lifetime,
            dpop: self.dpop,
        }
    }
}

/// base64url(SHA-256(token)), the DPoP `ath` claim.
pub fn ath(access_token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, access_token.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// Unix milliseconds (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn truncate_ms(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(unix_ms(t))
}

/// Where a fresh token's lifetime came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifetimeSource {
    /// A positive `expires_in`.
    ExpiresIn,
    /// The JWT `exp` claim.
    JwtExp,
    /// The audience's documented lifetime.
    Audience,
}

/// A lifetime hint from a token answer that was not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoredHint {
    /// `expires_in` was above [`MAX_LIFETIME`] (or overflowed while parsing).
    ExpiresIn,
    /// The JWT `exp` was further out than [`MAX_LIFETIME`].
    JwtExp,
}

impl IgnoredHint {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoredHint::ExpiresIn => "expires_in",
            IgnoredHint::JwtExp => "jwt_exp",
        }
    }
}

/// How long a fresh token lives, and what was ignored to decide it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifetime {
    /// The lifetime.
    pub duration: Duration,
    /// Where it came from.
    pub source: LifetimeSource,
    /// Hints that were present but absurd.
    pub ignored: Vec<IgnoredHint>,
}

/// The lifetime DESIGN.md §4 prescribes: a positive `expires_in`; else the JWT `exp` if the token
/// is a JWT with a future `exp`; else the audience's documented lifetime. A hint above
/// [`MAX_LIFETIME`] is ignored like a missing one (and reported), never trusted into clock
/// arithmetic. `wall` is only used to turn a JWT `exp` into a duration.
pub fn lifetime(
    expires_in: Option<u64>,
    access_token: &str,
    audience: &str,
    wall: SystemTime,
) -> Lifetime {
    let mut ignored = Vec::new();
    if let Some(secs) = expires_in.filter(|s| *s > 0) {
        match Duration::from_secs(secs) {
            d if d <= MAX_LIFETIME => {
                return Lifetime {
                    duration: d,
                    source: LifetimeSource::ExpiresIn,
                    ignored,
                }
            }
            _ => ignored.push(IgnoredHint::ExpiresIn),
        }
    }
    if let Some(exp) = jwt_exp(access_token) {
        let left = UNIX_EPOCH
            .checked_add(Duration::from_secs(exp))
            .and_then(|at| at.duration_since(wall).ok());
        match left {
            Some(d) if d > MAX_LIFETIME => ignored.push(IgnoredHint::JwtExp),
            Some(d) if !d.is_zero() => {
                return Lifetime {
                    duration: d,
                    source: LifetimeSource::JwtExp,
                    ignored,
                }
            }
            // Already expired, or too far out for the clock: no hint.
            None if exp > unix_ms(wall) / 1000 => ignored.push(IgnoredHint::JwtExp),
            _ => {}
        }
    }
    Lifetime {
        duration: audience_lifetime(audience),
        source: LifetimeSource::Audience,
        ignored,
    }
}

/// Tango's documented lifetime for an audience: five minutes for the "fiveminute" audiences,
/// else 24 hours.
pub fn audience_lifetime(audience: &str) -> Duration {
    if audience.to_ascii_lowercase().contains("fiveminute") {
        FIVE_MINUTE_LIFETIME
    } else {
        DAY_LIFETIME
    }
}

/// The `exp` claim of a JWT, read without verifying it (the proxy only needs a lifetime hint).
/// Fractional and huge values saturate; negative ones are no hint.
fn jwt_exp(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_u64()
        .or_else(|| exp.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

/// What a token endpoint gave.
#[derive(Debug)]
pub struct Minted {
    /// The access token.
    pub access_token: Secret,
    /// `token_type`, lower-cased.
    pub token_type: String,
    /// `expires_in` in seconds when present and parseable (saturating).
    pub expires_in: Option<u64>,
}

/// Why a token request failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
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
    /// Connection, DNS or TLS failure.
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

impl MintError {
    /// The metric outcome label.
    pub fn outcome(&self) -> &'static str {
        match self {
            MintError::RateLimited(_) => "rate_limited",
            MintError::Rejected { .. } => "rejected",
            MintError::ServerError { .. } => "server_error",
            MintError::Timeout(_) => "timeout",
            MintError::Transport(_) => "unreachable",
            MintError::InvalidResponse(_) => "invalid_response",
            MintError::Dpop(_) => "dpop_error",
            MintError::Coordination(_) => "lease_busy",
        }
    }

    /// True when the token endpoint itself answered: every replica would get the same answer,
    /// so the fleet shares the backoff. This process's own connect, DNS, timeout or signing
    /// failures are not shared (one replica with broken egress must not silence healthy ones).
    pub fn answered(&self) -> bool {
        matches!(
            self,
            MintError::RateLimited(_)
                | MintError::Rejected { .. }
                | MintError::ServerError { .. }
                | MintError::InvalidResponse(_)
        )
    }
}

/// A boxed token request.
pub type MintFuture<'a> = Pin<Box<dyn Future<Output = Result<Minted, MintError>> + Send + 'a>>;

/// A token endpoint: one call, one token request (including any DPoP nonce retry).
pub trait TokenSource: std::fmt::Debug + Send + Sync {
    /// Requests one token.
    fn fetch(&self) -> MintFuture<'_>;
    /// The grant it uses, as sent (part of the cache fingerprint).
    fn grant(&self) -> &str;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: &str) -> String {
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.sig",
            enc(r#"{"alg":"RS256","typ":"JWT"}"#),
            enc(&format!(r#"{{"sub":"x","exp":{exp}}}"#))
        )
    }

    const NOW: u64 = 1_800_000_000;
    const DAY_AUD: &str = "https://api.tangocard.com/";
    const FIVE_AUD: &str = "https://api.bhn.com/fiveminute";

    fn wall() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    #[test]
    fn lifetime_sources_follow_design_section_4() {
        let l = |e: Option<u64>, t: &str, a: &str| lifetime(e, t, a, wall());
        assert_eq!(l(Some(86_400), "opaque", DAY_AUD).duration, DAY_LIFETIME);
        assert_eq!(
            l(Some(300), "opaque", DAY_AUD).source,
            LifetimeSource::ExpiresIn
        );
        // Tango documents 30 days once; that is believed.
        assert_eq!(
            l(Some(2_592_000), "opaque", DAY_AUD).duration,
            Duration::from_secs(2_592_000)
        );
        // 0 or missing with a JWT exp: the exp.
        let in_an_hour = jwt(&(NOW + 3_600).to_string());
        let got = l(Some(0), &in_an_hour, DAY_AUD);
        assert_eq!(
            (got.duration, got.source),
            (Duration::from_secs(3_600), LifetimeSource::JwtExp)
        );
        assert_eq!(l(None, &in_an_hour, DAY_AUD).duration, HOUR);
        // An expired JWT is no hint, and not reported as absurd.
        let old = l(None, &jwt("1000"), DAY_AUD);
        assert_eq!((old.duration, old.ignored.len()), (DAY_LIFETIME, 0));
        // Neither: the audience's documented lifetime.
        assert_eq!(l(None, "opaque", DAY_AUD).duration, DAY_LIFETIME);
        assert_eq!(
            l(Some(0), "opaque", FIVE_AUD).duration,
            FIVE_MINUTE_LIFETIME
        );
        assert_eq!(
            l(None, "opaque", "https://tango-api.bhn.com/fiveminute").source,
            LifetimeSource::Audience
        );
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn absurd_lifetimes_are_ignored_and_reported_never_trusted() {
        let l = |e: Option<u64>, t: &str| lifetime(e, t, DAY_AUD, wall());
        // 1e300 parses (saturating) to u64::MAX; both are ignored.
        for huge in [u64::MAX, 400 * 86_400 + 1, 10_000_000_000] {
            let got = l(Some(huge), "opaque");
            assert_eq!(got.duration, DAY_LIFETIME, "{huge}");
            assert_eq!(got.ignored, [IgnoredHint::ExpiresIn]);
        }
        // Exactly 400 days is the last believed value.
        assert_eq!(l(Some(400 * 86_400), "opaque").duration, MAX_LIFETIME);
        // A JWT exp far out, or beyond what a clock can hold: ignored too.
        for exp in ["99999999999999", "1e300", "18446744073709551615"] {
            let got = l(None, &jwt(exp));
            assert_eq!(got.duration, DAY_LIFETIME, "{exp}");
            assert_eq!(got.ignored, [IgnoredHint::JwtExp], "{exp}");
        }
        // Both absurd: both reported, the audience decides.
        let got = l(Some(u64::MAX), &jwt("1e300"));
        assert_eq!(got.ignored, [IgnoredHint::ExpiresIn, IgnoredHint::JwtExp]);
        assert_eq!(got.source, LifetimeSource::Audience);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_never_overflow_the_clocks() {
        let now = Instant::now();
        let t = Token::new(
            Secret::new("t"),
            Duration::MAX,
            Duration::MAX,
            false,
            now,
            wall(),
        )
        .unwrap();
        assert_eq!(t.expires(), now + MAX_LIFETIME);
        assert!(t.usable_at(now));
        // A stored record claiming an absurd expiry is not believed.
        let far = Record {
            access_token: Secret::new("t"),
            expires_at: wall() + Duration::from_secs(500 * 86_400),
            lifetime: DAY_LIFETIME,
            dpop: false,
        };
        assert!(Token::from_record(far, now, wall()).is_none());
        let expired = Record {
            access_token: Secret::new("t"),
            expires_at: wall() - Duration::from_secs(1),
            lifetime: DAY_LIFETIME,
            dpop: false,
        };
        assert!(Token::from_record(expired, now, wall()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn usable_and_window_rules() {
        let now = Instant::now();
        let day = Token::new(
            Secret::new("t"),
            DAY_LIFETIME,
            DAY_LIFETIME,
            false,
            now,
            wall(),
        )
        .unwrap();
        assert!(day.usable_at(now + DAY_LIFETIME - Duration::from_secs(31)));
        assert!(!day.usable_at(now + DAY_LIFETIME - Duration::from_secs(30)));
        // A 24 h token renews in its last 4 h; a 5-minute token in its last 75 s.
        assert_eq!(day.refresh_from(4 * HOUR), now + 20 * HOUR);
        let five = Token::new(
            Secret::new("t"),
            FIVE_MINUTE_LIFETIME,
            FIVE_MINUTE_LIFETIME,
            false,
            now,
            wall(),
        )
        .unwrap();
        assert_eq!(five.refresh_from(4 * HOUR), now + Duration::from_secs(225));
        assert_eq!(five.skew(), Duration::from_secs(30));
        // A 10-second token keeps a 1-second margin, not 30.
        let ten = Duration::from_secs(10);
        let short = Token::new(Secret::new("t"), ten, ten, false, now, wall()).unwrap();
        assert!(short.usable_at(now + Duration::from_secs(8)));
        assert!(!short.usable_at(now + Duration::from_secs(9)));
        // The wall-clock expiry is kept to the millisecond a record stores.
        assert_eq!(day.expires_ms() % 1000, 0);
        assert_eq!(
            day.expires_at,
            UNIX_EPOCH + Duration::from_secs(NOW) + DAY_LIFETIME
        );
    }
}
