//! Gateway mode: the callers a shared gateway serves, how each authenticates, and the policy
//! that keeps one store inside its own Tango accounts.
//!
//! Any `[callers.NAME]` section turns it on. Every request must then authenticate as a caller
//! ([`Gateway::authenticate`]): `Proxy-Authorization` when present (and then only it), else
//! `Authorization`, each as `Basic base64(NAME:KEY)` — a legacy SDK's platform name and key — or
//! `Bearer KEY`. Keys are known only by their SHA-256, compared in constant time; a Bearer key
//! is found by its digest (a lookup by the hash of a secret reveals nothing about the secret).
//! On a TLS listener a caller may instead be known by its client certificate ([`cert`]): a
//! request without a credential header is then the certificate's caller, and one with a
//! credential header must name that same caller.
//!
//! A caller's policy ([`Caller`]) is checked in request order, cheapest first: its token
//! bucket, the path (refused unless plain, see [`path`]), its `allow` list, its account and
//! customer bindings in the path and query ([`bindings`]), then — for requests whose body
//! matters — the JSON body, parsed strictly ([`json`]): bindings, `externalRefID`, and the daily
//! spend reserved in the [`spend`] ledger. Answers to bound callers are checked before any byte
//! reaches them. The proxy ([`crate::proxy`]) drives these steps; this module decides.

pub mod bindings;
pub mod cert;
pub mod json;
pub mod path;
pub mod spend;
pub mod throttle;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use http::{header, HeaderMap, Method};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::config::{CallerConfig, Config, Money, Rate};
use crate::metrics::Metrics;
use crate::tls::ClientCert;
use bindings::Bindings;
use path::{AllowRule, CleanPath};
use spend::SpendLedger;

/// The longest decoded Basic credential (`NAME:KEY`) accepted.
const MAX_BASIC: usize = 512;

/// The label failures of unknown callers are counted under.
pub const UNKNOWN_CALLER: &str = "_unknown";

/// The callers of a gateway and what it needs to check them.
#[derive(Debug)]
pub struct Gateway {
    callers: Vec<Arc<Caller>>,
    by_name: HashMap<String, usize>,
    by_hash: HashMap<[u8; 32], usize>,
    by_cert: cert::CertIndex,
    unknown_failures: Counter,
    /// Requests refused because their address failed to authenticate too often.
    address_refusals: Counter,
    /// Keeps authentication-failure warnings to a trickle under a flood.
    quiet: crate::listener::Quiet,
    ledger: Arc<dyn SpendLedger>,
    /// Repeated authentication failures, by address and by caller name.
    throttle: Arc<throttle::Throttle>,
    /// `listen.trusted_proxies`: peers whose `X-Forwarded-For` names the client.
    trusted_proxies: Vec<throttle::Network>,
}

/// Why a request from (or claiming to be from) a caller is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No valid caller credential: 401 `caller_unauthorized`.
    Unauthorized(&'static str),
    /// A rule of the caller's policy: 403 `caller_forbidden`.
    Forbidden(String),
    /// The caller's token bucket is empty: 429 `rate_limited`, retry after this long.
    RateLimited(Duration),
    /// The spend ledger cannot be reached and the caller's limit fails closed: 503.
    SpendUnavailable(String),
}

/// One caller: its identity, its policy, its counters.
#[derive(Debug)]
pub struct Caller {
    /// The name under `[callers]`.
    pub name: String,
    key_sha256: Option<[u8; 32]>,
    /// The profile its requests use.
    pub profile: String,
    /// That profile's place in the proxy's profiles.
    pub profile_index: usize,
    allow: Vec<AllowRule>,
    /// The accounts and customers it may name.
    pub bindings: Bindings,
    /// Orders without `externalRefID` are refused.
    pub require_external_ref_id: bool,
    bucket: Option<Bucket>,
    /// The daily spend limit, if any.
    pub spend_limit: Option<Money>,
    /// Forward limited orders while the ledger is unreachable.
    pub spend_limit_fail_open: bool,
    counts: Counts,
    metrics: CallerMetrics,
}

#[derive(Debug, Default)]
struct Counts {
    allowed: AtomicU64,
    forbidden: AtomicU64,
    rate_limited: AtomicU64,
    spend_refused: AtomicU64,
    auth_failures: AtomicU64,
}

#[derive(Debug)]
struct CallerMetrics {
    allowed: Counter,
    forbidden: Counter,
    rate_limited: Counter,
    spend_refused: Counter,
    auth_failures: Counter,
    spend: prometheus_client::metrics::gauge::Gauge,
}

/// What `/status` shows of a caller (never its key hash).
#[derive(Debug, Serialize)]
pub struct CallerStatus {
    /// Its profile.
    pub profile: String,
    /// Requests let through.
    pub allowed: u64,
    /// Requests refused by a policy rule.
    pub forbidden: u64,
    /// Requests refused by the rate limit.
    pub rate_limited: u64,
    /// Orders refused by the spend limit (or while it could not be checked).
    pub spend_refused: u64,
    /// Failed authentications naming this caller.
    pub auth_failures: u64,
    /// Spent today (UTC) against the limit, when one is set and the ledger answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spent_today: Option<String>,
    /// The limit, when one is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_spend_limit: Option<String>,
}

impl Gateway {
    /// Builds the gateway for `config`'s callers; `None` when there are none (sidecar mode).
    /// `profile_index` gives the place of a profile by name in the proxy's profiles.
    pub fn new(
        config: &Config,
        ledger: Arc<dyn SpendLedger>,
        metrics: &Metrics,
        profile_index: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<Option<Self>, String> {
        if !config.is_gateway() {
            return Ok(None);
        }
        let mut callers = Vec::new();
        let mut by_name = HashMap::new();
        let mut by_hash = HashMap::new();
        let mut by_cert = cert::CertIndex::default();
        for c in config.callers.values() {
            let profile_index = profile_index(&c.profile)
                .ok_or_else(|| format!("callers.{}.profile: no such profile", c.name))?;
            let caller = Caller::new(c, profile_index, metrics)?;
            by_name.insert(c.name.clone(), callers.len());
            if let Some(hash) = c.key_sha256 {
                by_hash.insert(hash, callers.len());
            }
            by_cert.add(callers.len(), c);
            callers.push(Arc::new(caller));
        }
        Ok(Some(Self {
            callers,
            by_name,
            by_hash,
            by_cert,
            unknown_failures: metrics.caller_counter(UNKNOWN_CALLER, "unauthorized"),
            address_refusals: metrics.caller_counter(UNKNOWN_CALLER, "rate_limited"),
            quiet: crate::listener::Quiet::default(),
            ledger,
            throttle: Arc::new(throttle::Throttle::default()),
            trusted_proxies: config.listen.trusted_proxies.clone(),
        }))
    }

    /// The callers, in name order.
    pub fn callers(&self) -> &[Arc<Caller>] {
        &self.callers
    }

    /// The spend ledger.
    pub fn ledger(&self) -> &Arc<dyn SpendLedger> {
        &self.ledger
    }

    /// This gateway with `previous`'s failure counts: a reload must not forgive a blocked
    /// address or a guessed-at name.
    pub fn keeping_throttle_of(mut self, previous: &Gateway) -> Self {
        self.throttle = previous.throttle.clone();
        self
    }

    /// The caller a request's headers (or its connection's client certificate) prove, or why
    /// not. `peer` is the connection's address; failures are slowed down by client address and
    /// caller name (see [`throttle`]).
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        cert: Option<&ClientCert>,
        peer: std::net::IpAddr,
    ) -> Result<&Arc<Caller>, Refusal> {
        let client = throttle::client_address(peer, headers, &self.trusted_proxies);
        let now = Instant::now();
        let blocked = self.throttle.address_refused(client, None, now);
        let (claimed, outcome) = self.identify(headers, cert);
        match (outcome, claimed) {
            (Ok(caller), Some(index)) => {
                // A blocked address still lets through what cannot be a guess: a caller its
                // client certificate names, or one that authenticated from here in the window.
                let by_cert = cert.is_some()
                    && !headers.contains_key(header::AUTHORIZATION)
                    && !headers.contains_key(header::PROXY_AUTHORIZATION);
                if let Some(wait) = blocked {
                    if !by_cert
                        && self
                            .throttle
                            .address_refused(client, Some(index), now)
                            .is_some()
                    {
                        self.address_refusals.inc();
                        return Err(Refusal::RateLimited(wait));
                    }
                } else {
                    self.throttle.succeeded(client, index, now);
                }
                Ok(caller)
            }
            (Ok(caller), None) => Ok(caller),
            (Err(why), _) => {
                let delay = self.throttle.failed(client, claimed, now);
                let named = claimed.and_then(|i| self.callers.get(i));
                match named {
                    Some(c) => {
                        c.counts.auth_failures.fetch_add(1, Ordering::Relaxed);
                        c.metrics.auth_failures.inc();
                    }
                    None => {
                        self.unknown_failures.inc();
                    }
                }
                let caller = named.map_or(UNKNOWN_CALLER, |c| c.name.as_str());
                if let Some(count) = self.quiet.note() {
                    tracing::warn!(
                        caller,
                        failures_since_last_warning = count,
                        "caller authentication failed: {why}"
                    );
                } else {
                    tracing::debug!(caller, "caller authentication failed: {why}");
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                match blocked {
                    // Counted and slowed like any failure, answered like the block it met.
                    Some(wait) => {
                        self.address_refusals.inc();
                        Err(Refusal::RateLimited(wait))
                    }
                    None => Err(Refusal::Unauthorized(why)),
                }
            }
        }
    }

    /// The caller index a certificate or credential named (for counting failures) and the
    /// outcome. Without a credential header the certificate decides; with one, the credential
    /// does, and it must name the certificate's caller when the certificate names one.
    fn identify(
        &self,
        headers: &HeaderMap,
        cert: Option<&ClientCert>,
    ) -> (Option<usize>, Result<&Arc<Caller>, &'static str>) {
        let by_cert = match cert {
            Some(c) if !self.by_cert.is_empty() => Some(self.by_cert.identify(c.0.as_ref())),
            _ => None,
        };
        let has_credential = headers.contains_key(header::PROXY_AUTHORIZATION)
            || headers.contains_key(header::AUTHORIZATION);
        match by_cert {
            Some(Ok(i)) if !has_credential => (Some(i), Ok(&self.callers[i])),
            Some(Err(why)) if !has_credential => (None, Err(why)),
            Some(Ok(i)) => match self.check_credential(headers) {
                (_, Ok(caller)) if Arc::ptr_eq(caller, &self.callers[i]) => (Some(i), Ok(caller)),
                (_, Ok(_)) => (
                    Some(i),
                    Err("the credential names another caller than the client certificate"),
                ),
                failed => failed,
            },
            _ => self.check_credential(headers),
        }
    }

    /// The caller index a credential named (for counting failures) and the outcome.
    fn check_credential(
        &self,
        headers: &HeaderMap,
    ) -> (Option<usize>, Result<&Arc<Caller>, &'static str>) {
        // Proxy-Authorization, when present, is the only credential considered: a wrong one is
        // never rescued by another header.
        let name = if headers.contains_key(header::PROXY_AUTHORIZATION) {
            header::PROXY_AUTHORIZATION
        } else {
            header::AUTHORIZATION
        };
        let mut values = headers.get_all(&name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return (
                None,
                Err(if headers.contains_key(&name) {
                    "more than one credential header"
                } else {
                    "no caller credential: send Authorization: Basic base64(NAME:KEY) or Bearer KEY"
                }),
            );
        };
        let value = value.as_bytes();
        let (scheme, rest) = match value.iter().position(|b| *b == b' ') {
            Some(i) => (&value[..i], value[i + 1..].trim_ascii()),
            None => (value, &[][..]),
        };
        if scheme.eq_ignore_ascii_case(b"basic") {
            // Decoded on the stack (no allocation per request), wiped when done.
            let mut buf = zeroize::Zeroizing::new([0u8; MAX_BASIC]);
            let Ok(n) = base64::engine::general_purpose::STANDARD.decode_slice(rest, &mut buf[..])
            else {
                return (
                    None,
                    Err("Basic credential is not valid base64 (or too long)"),
                );
            };
            let decoded = &buf[..n];
            let Some(colon) = decoded.iter().position(|b| *b == b':') else {
                return (None, Err("Basic credential has no NAME:KEY form"));
            };
            let (user, key) = (&decoded[..colon], &decoded[colon + 1..]);
            if key.is_empty() {
                return (None, Err("empty key"));
            }
            let index = std::str::from_utf8(user)
                .ok()
                .and_then(|u| self.by_name.get(u).copied());
            let digest = sha256(key);
            // An unknown name costs the same comparison as a known one.
            // A caller known only by its certificate has no key: nothing hashes to all 0xa5.
            let expected = index
                .and_then(|i| self.callers[i].key_sha256)
                .unwrap_or([0xa5; 32]);
            let matched = same_digest(&digest, &expected);
            match index {
                Some(i) if matched => (Some(i), Ok(&self.callers[i])),
                _ => (index, Err("unknown caller or wrong key")),
            }
        } else if scheme.eq_ignore_ascii_case(b"bearer") {
            if rest.is_empty() {
                return (None, Err("empty Bearer credential"));
            }
            let digest = sha256(rest);
            match self.by_hash.get(&digest) {
                Some(&i)
                    if self.callers[i]
                        .key_sha256
                        .is_some_and(|k| same_digest(&digest, &k)) =>
                {
                    (Some(i), Ok(&self.callers[i]))
                }
                _ => (None, Err("unknown caller key")),
            }
        } else {
            (
                None,
                Err("unsupported credential scheme: use Basic or Bearer"),
            )
        }
    }
}

impl Caller {
    fn new(config: &CallerConfig, profile_index: usize, metrics: &Metrics) -> Result<Self, String> {
        let allow = config
            .allow
            .iter()
            .map(|rule| {
                AllowRule::parse(rule).map_err(|e| format!("callers.{}.allow: {e}", config.name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let name = config.name.as_str();
        Ok(Self {
            name: name.to_string(),
            key_sha256: config.key_sha256,
            profile: config.profile.clone(),
            profile_index,
            allow,
            bindings: Bindings {
                accounts: config.accounts.clone(),
                customers: config.customers.clone(),
            },
            require_external_ref_id: config.require_external_ref_id,
            bucket: config.rate.map(Bucket::new),
            spend_limit: config.daily_spend_limit.clone(),
            spend_limit_fail_open: config.spend_limit_fail_open,
            counts: Counts::default(),
            metrics: CallerMetrics {
                allowed: metrics.caller_counter(name, "allowed"),
                forbidden: metrics.caller_counter(name, "forbidden"),
                rate_limited: metrics.caller_counter(name, "rate_limited"),
                spend_refused: metrics.caller_counter(name, "spend_refused"),
                auth_failures: metrics.caller_counter(name, "unauthorized"),
                spend: metrics.caller_spend(name),
            },
        })
    }

    /// Takes a token from the caller's bucket, if it has one.
    pub fn admit(&self) -> Result<(), Refusal> {
        match self.bucket.as_ref().map(|b| b.take(Instant::now())) {
            Some(Err(wait)) => {
                self.counts.rate_limited.fetch_add(1, Ordering::Relaxed);
                self.metrics.rate_limited.inc();
                Err(Refusal::RateLimited(wait))
            }
            _ => Ok(()),
        }
    }

    /// Checks what the request line shows: a plain path, the allow list, the bindings named in
    /// the path and query. Returns the checked path.
    pub fn check_target<'a>(
        &self,
        method: &Method,
        path: &'a str,
        query: Option<&str>,
    ) -> Result<CleanPath<'a>, Refusal> {
        let clean = CleanPath::parse(path).map_err(|e| self.forbid(e.to_string()))?;
        if !self.allow.is_empty() && !self.allow.iter().any(|r| r.matches(method, &clean)) {
            return Err(self.forbid(format!(
                "{method} {path} is not in the allow list of caller {}",
                self.name
            )));
        }
        self.bindings
            .check_path(&clean)
            .map_err(|v| self.forbid(v.message()))?;
        self.bindings
            .check_query(query)
            .map_err(|v| self.forbid(v.message()))?;
        Ok(clean)
    }

    /// True when the request's body must be read and checked before it is forwarded.
    pub fn inspects_body(&self, method: &Method, path: &CleanPath<'_>) -> bool {
        self.bindings.is_bound()
            || (bindings::is_order(method, path)
                && (self.require_external_ref_id || self.spend_limit.is_some()))
    }

    /// True when answers must be read and checked before they reach the caller.
    pub fn inspects_answers(&self) -> bool {
        self.bindings.is_bound()
    }

    /// Counts a refusal and builds it.
    pub fn forbid(&self, message: String) -> Refusal {
        self.counts.forbidden.fetch_add(1, Ordering::Relaxed);
        self.metrics.forbidden.inc();
        Refusal::Forbidden(message)
    }

    /// Counts a spend-limit refusal.
    pub fn spend_refused(&self) {
        self.counts.spend_refused.fetch_add(1, Ordering::Relaxed);
        self.metrics.spend_refused.inc();
    }

    /// Shows the day's total after a reservation (the `caller_spend_today_minor_units` gauge).
    pub fn record_spend(&self, total: u64) {
        self.metrics
            .spend
            .set(i64::try_from(total).unwrap_or(i64::MAX));
    }

    /// Counts a request let through to Tango.
    pub fn allowed(&self) {
        self.counts.allowed.fetch_add(1, Ordering::Relaxed);
        self.metrics.allowed.inc();
    }

    /// What `/status` shows; `spent` is today's spend when the ledger answered.
    pub fn status(&self, spent: Option<u64>) -> CallerStatus {
        let c = &self.counts;
        let limit = self.spend_limit.as_ref();
        CallerStatus {
            profile: self.profile.clone(),
            allowed: c.allowed.load(Ordering::Relaxed),
            forbidden: c.forbidden.load(Ordering::Relaxed),
            rate_limited: c.rate_limited.load(Ordering::Relaxed),
            spend_refused: c.spend_refused.load(Ordering::Relaxed),
            auth_failures: c.auth_failures.load(Ordering::Relaxed),
            spent_today: limit
                .zip(spent)
                .map(|(l, s)| Money::display_minor(s, l.decimals, &l.currency)),
            daily_spend_limit: limit.map(ToString::to_string),
        }
    }
}

/// A token bucket: `burst` tokens at most, refilled at `per_second`.
#[derive(Debug)]
struct Bucket {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: Rate) -> Self {
        let burst = rate.burst as f64;
        Self {
            per_second: rate.per_second,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes one token, or says how long until one is there.
    fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = *state;
        let elapsed = now.saturating_duration_since(last).as_secs_f64();
        let tokens = (tokens + elapsed * self.per_second).min(self.burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            Ok(())
        } else {
            *state = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / self.per_second))
        }
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Compares two digests in time independent of where they differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: u64) -> Rate {
        Rate {
            per_second,
            burst,
            written: (1, Duration::from_secs(1)),
        }
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate_and_says_when() {
        let b = Bucket::new(rate(2.0, 3));
        let t0 = *b.state.lock().unwrap();
        let t0 = t0.1;
        for _ in 0..3 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        assert!(b.take(t0 + Duration::from_millis(499)).is_err());
        assert!(b.take(t0 + Duration::from_millis(501)).is_ok());
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(b.take(later).is_ok());
        }
        assert!(b.take(later).is_err());
    }

    #[test]
    fn slow_rates_wait_long() {
        let b = Bucket::new(rate(1.0 / 60.0, 1));
        let t0 = b.state.lock().unwrap().1;
        assert!(b.take(t0).is_ok());
        let wait = b.take(t0 + Duration::from_secs(15)).unwrap_err();
        assert_eq!(wait.as_secs_f64().ceil() as u64, 45);
    }

    #[test]
    fn digests_compare() {
        let a = sha256(b"key-1");
        assert!(same_digest(&a, &sha256(b"key-1")));
        assert!(!same_digest(&a, &sha256(b"key-2")));
    }
}
