//! Tokens and their lifecycle: expiry rules, the [`TokenStore`] seam, and the per-profile
//! [`TokenManager`] (usable / refresh window / mint budget, single-flight, backoff).

mod manager;
mod redis_store;
mod seal;
pub mod store;
pub use redis_store::{check_options as check_redis_options, RedisOptions, RedisStore};
pub use seal::{KeyError, Sealer};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::HeaderValue;

pub use manager::{ManagerStatus, TokenManager};

use crate::secret::Secret;

/// Lifetime Tango documents for the default audience.
pub const DAY_LIFETIME: Duration = Duration::from_secs(86_400);
/// Lifetime of the five-minute audience.
pub const FIVE_MINUTE_LIFETIME: Duration = Duration::from_secs(300);
/// Default margin before `expires_at` after which a token is no longer used.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(30);

/// An access token and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token itself.
    pub access_token: Secret,
    /// When it expires.
    pub expires_at: SystemTime,
    /// How long it was valid for when obtained.
    pub lifetime: Duration,
    /// True for a DPoP-bound token (`Authorization: DPoP ...`).
    pub dpop: bool,
    header: HeaderValue,
    ath: String,
}

impl Token {
    /// A token expiring at `expires_at`, obtained `lifetime` before that; `dpop` picks the
    /// `Authorization` scheme. `None` when the token cannot be carried in a header.
    pub fn new(
        access_token: Secret,
        expires_at: SystemTime,
        lifetime: Duration,
        dpop: bool,
    ) -> Option<Self> {
        let scheme = if dpop { "DPoP" } else { "Bearer" };
        let value = zeroize::Zeroizing::new(format!("{scheme} {}", access_token.expose()));
        let mut header = HeaderValue::from_str(&value).ok()?;
        header.set_sensitive(true);
        let ath = crate::auth::dpop::ath(access_token.expose());
        Some(Self {
            access_token,
            expires_at,
            lifetime,
            dpop,
            header,
            ath,
        })
    }

    /// `ath` for DPoP proofs: base64url(SHA-256(token)), computed once.
    pub fn ath(&self) -> &str {
        &self.ath
    }

    /// The pre-encoded `Authorization` value.
    pub fn authorization(&self) -> HeaderValue {
        self.header.clone()
    }

    /// The margin before expiry: 30 s, or a tenth of the lifetime for short-lived tokens.
    pub fn skew(&self) -> Duration {
        DEFAULT_SKEW.min(self.lifetime / 10)
    }

    /// Usable until `expires_at - skew`.
    pub fn usable_at(&self, now: SystemTime) -> bool {
        now + self.skew() < self.expires_at
    }

    /// Start of the refresh window: `expires_at - min(refresh_window, lifetime / 4)`.
    pub fn refresh_from(&self, refresh_window: Duration) -> SystemTime {
        self.expires_at - refresh_window.min(self.lifetime / 4)
    }

    /// Seconds until expiry (0 once expired).
    pub fn seconds_left(&self, now: SystemTime) -> u64 {
        self.expires_at
            .duration_since(now)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// The expiry DESIGN.md §4 prescribes: a positive `expires_in`; else the JWT `exp` if the token
/// is a JWT with a future `exp`; else the audience's documented lifetime.
pub fn expiry(
    expires_in: Option<u64>,
    access_token: &str,
    audience: &str,
    now: SystemTime,
) -> (SystemTime, Duration) {
    if let Some(secs) = expires_in.filter(|s| *s > 0) {
        let lifetime = Duration::from_secs(secs);
        return (now + lifetime, lifetime);
    }
    if let Some(exp) = jwt_exp(access_token) {
        let at = UNIX_EPOCH + Duration::from_secs(exp);
        if let Ok(lifetime) = at.duration_since(now) {
            if !lifetime.is_zero() {
                return (at, lifetime);
            }
        }
    }
    let lifetime = audience_lifetime(audience);
    (now + lifetime, lifetime)
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
fn jwt_exp(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_f64().map(|f| f as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.sig",
            enc(r#"{"alg":"RS256","typ":"JWT"}"#),
            enc(&format!(r#"{{"sub":"x","exp":{exp}}}"#))
        )
    }

    #[test]
    fn expires_in_variants_follow_design_section_4() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = "https://api.tangocard.com/";
        let five = "https://api.bhn.com/fiveminute";
        // A positive number (parsed from a number or a numeric string upstream).
        assert_eq!(
            expiry(Some(86_400), "opaque", day, now).0,
            now + DAY_LIFETIME
        );
        assert_eq!(
            expiry(Some(300), "opaque", day, now).1,
            Duration::from_secs(300)
        );
        // 0 or missing, with a JWT exp: the exp.
        let exp = 1_800_000_000 + 3_600;
        assert_eq!(
            expiry(Some(0), &jwt(exp), day, now),
            (
                UNIX_EPOCH + Duration::from_secs(exp),
                Duration::from_secs(3_600)
            )
        );
        assert_eq!(
            expiry(None, &jwt(exp), day, now).1,
            Duration::from_secs(3_600)
        );
        // A JWT already expired is no hint; the audience decides.
        assert_eq!(expiry(None, &jwt(1_000), day, now).1, DAY_LIFETIME);
        // Missing, not a JWT: the audience's documented lifetime.
        assert_eq!(expiry(None, "opaque", day, now).1, DAY_LIFETIME);
        assert_eq!(expiry(Some(0), "opaque", five, now).1, FIVE_MINUTE_LIFETIME);
        assert_eq!(
            expiry(None, "opaque", "https://tango-api.bhn.com/fiveminute", now).0,
            now + FIVE_MINUTE_LIFETIME
        );
    }

    #[test]
    fn usable_and_window_rules() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Token::new(Secret::new("t"), now + DAY_LIFETIME, DAY_LIFETIME, false).unwrap();
        assert!(day.usable_at(now + DAY_LIFETIME - Duration::from_secs(31)));
        assert!(!day.usable_at(now + DAY_LIFETIME - Duration::from_secs(30)));
        // 24 h token renews in its last 4 h; a 5-minute token in its last 75 s.
        let window = Duration::from_secs(4 * 3600);
        assert_eq!(
            day.refresh_from(window),
            now + Duration::from_secs(20 * 3600)
        );
        let five = Token::new(
            Secret::new("t"),
            now + FIVE_MINUTE_LIFETIME,
            FIVE_MINUTE_LIFETIME,
            false,
        )
        .unwrap();
        assert_eq!(five.refresh_from(window), now + Duration::from_secs(225));
        assert_eq!(five.skew(), Duration::from_secs(30));
        // A 10-second token keeps a 1-second margin, not 30.
        let short = Token::new(
            Secret::new("t"),
            now + Duration::from_secs(10),
            Duration::from_secs(10),
            false,
        )
        .unwrap();
        assert!(short.usable_at(now + Duration::from_secs(8)));
        assert!(!short.usable_at(now + Duration::from_secs(9)));
    }
}
