//! Prometheus metrics, all prefixed `tango_proxy_`, served by the admin listener.
//!
//! Hot-path counters are resolved once at start (a `Counter` clone shares its atomic), so recording
//! a request costs a few atomic adds and one histogram observation, no label lookups.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabel {
    reason: &'static str,
}

/// Why a request was sent to Tango once more (`proxy::client::Refusal`).
const RETRY_REASONS: [&str; 3] = ["goaway", "refused_stream", "unsent"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileLabel {
    profile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    profile: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndedLabel {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    by_class: [Counter; 6],
    duration: Histogram,
    upstream_errors: Family<KindLabel, Counter>,
    upstream_retries: Family<RetryLabel, Counter>,
    proxy_errors: Family<CauseLabel, Counter>,
    in_flight: Gauge,
    connections: Family<ListenerLabel, Gauge>,
    connections_refused: Family<ListenerLabel, Counter>,
    connections_ended: Family<EndedLabel, Counter>,
    token_requests: Family<OutcomeLabel, Counter>,
    token_expiry: Family<ProfileLabel, Gauge>,
    token_lifetime: Family<ProfileLabel, Gauge>,
    upstream_401: Family<ProfileLabel, Counter>,
    cache_unreadable: Family<BackendLabel, Counter>,
    redis_errors: Counter,
    mints: Family<ReasonLabel, Counter>,
    lease_waits: Counter,
    lease_wait_seconds: Histogram,
    /// memory hit, memory miss, store hit, store miss.
    lookups: [Counter; 4],
    cache_degraded: Family<ProfileLabel, Gauge>,
    lifetime_ignored: Family<HintLabel, Counter>,
    task_restarts: Family<ProfileLabel, Counter>,
    dpop_proof_rejected: Family<ProfileLabel, Counter>,
    caller_requests: Family<CallerLabel, Counter>,
    caller_spend: Family<CallerOnlyLabel, Gauge>,
    profile_ready: Family<ProfileLabel, Gauge>,
    config_reloads: Family<ResultLabel, Counter>,
    credential_rotations: Family<ResultLabel, Counter>,
    tls_reloads: Family<ResultLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerLabel {
    caller: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerOnlyLabel {
    caller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HintLabel {
    profile: String,
    hint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabel {
    level: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    profile: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: &'static str,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tango_proxy");
        let requests = Family::<ClassLabel, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by HTTP status class",
            requests.clone(),
        );
        let by_class = CLASSES.map(|class| requests.get_or_create(&ClassLabel { class }).clone());
        let duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to sending the response headers",
            duration.clone(),
        );
        let upstream_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "upstream_errors",
            "Forwarded requests that got no response from the upstream, by kind",
            upstream_errors.clone(),
        );
        let upstream_retries = Family::<RetryLabel, Counter>::default();
        for reason in RETRY_REASONS {
            let _ = upstream_retries.get_or_create(&RetryLabel { reason });
        }
        registry.register(
            "upstream_retries",
            "Requests sent to Tango once more because Tango provably had not processed them, by reason",
            upstream_retries.clone(),
        );
        let proxy_errors = Family::<CauseLabel, Counter>::default();
        registry.register(
            "proxy_errors",
            "Responses produced by the proxy itself, by cause",
            proxy_errors.clone(),
        );
        let connections = Family::<ListenerLabel, Gauge>::default();
        registry.register(
            "open_connections",
            "Client connections open now, by listener (proxy or admin)",
            connections.clone(),
        );
        let connections_refused = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Client connections refused with 503 because the listener was at its connection limit",
            connections_refused.clone(),
        );
        let connections_ended = Family::<EndedLabel, Counter>::default();
        registry.register(
            "connections_ended",
            "Connections the listener ended itself: a malformed request (bare 400), an oversized \
             head (bare 431), a head not sent within listen.header_timeout, a kept-alive \
             connection idle that long, an app that took no part of its response for \
             listen.body_idle_timeout, or a TLS handshake that failed or did not finish within \
             listen.header_timeout",
            connections_ended.clone(),
        );
        for listener in ["proxy", "admin"] {
            let _ = connections.get_or_create(&ListenerLabel { listener });
            let _ = connections_refused.get_or_create(&ListenerLabel { listener });
            for reason in crate::listener::ENDED_KINDS {
                let _ = connections_ended.get_or_create(&EndedLabel { listener, reason });
            }
        }
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being handled now",
            in_flight.clone(),
        );
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information", build);
        let token_requests = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "token_requests",
            "Token endpoint requests, by profile and outcome",
            token_requests.clone(),
        );
        let token_expiry = Family::<ProfileLabel, Gauge>::default();
        registry.register(
            "token_expiry_seconds",
            "Unix time at which the profile's current token expires",
            token_expiry.clone(),
        );
        let token_lifetime = Family::<ProfileLabel, Gauge>::default();
        registry.register(
            "token_lifetime_seconds",
            "How long the profile's current token was valid for when obtained",
            token_lifetime.clone(),
        );
        let upstream_401 = Family::<ProfileLabel, Counter>::default();
        registry.register(
            "upstream_401",
            "401 answers from Tango, by profile",
            upstream_401.clone(),
        );
        let cache_unreadable = Family::<BackendLabel, Counter>::default();
        registry.register(
            "cache_unreadable_records",
            "Cached token records that did not open (tampered or sealed with an unknown key) and were treated as misses",
            cache_unreadable.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Redis calls that failed or timed out",
            redis_errors.clone(),
        );
        let mints = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "token_mints",
            "Tokens minted by this process, by reason (cold, window, expired, rejected, retry)",
            mints.clone(),
        );
        let lease_waits = Counter::default();
        registry.register(
            "lease_waits",
            "Refreshes that waited for another replica holding the refresh lease",
            lease_waits.clone(),
        );
        let lease_wait_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        registry.register(
            "lease_wait_seconds",
            "Time spent waiting for another replica's token",
            lease_wait_seconds.clone(),
        );
        let lookup_family = Family::<LookupLabel, Counter>::default();
        registry.register(
            "cache_lookups",
            "Token lookups by level (memory: per request; store: at start and refresh) and result",
            lookup_family.clone(),
        );
        let lookups = [
            ("memory", "hit"),
            ("memory", "miss"),
            ("store", "hit"),
            ("store", "miss"),
        ]
        .map(|(level, result)| {
            lookup_family
                .get_or_create(&LookupLabel { level, result })
                .clone()
        });
        let cache_degraded = Family::<ProfileLabel, Gauge>::default();
        registry.register(
            "cache_degraded",
            "1 while the shared token cache is unreachable and the profile coordinates in-process",
            cache_degraded.clone(),
        );
        let lifetime_ignored = Family::<HintLabel, Counter>::default();
        registry.register(
            "token_lifetime_ignored",
            "Token answers whose expires_in or JWT exp claimed more than 400 days and was ignored",
            lifetime_ignored.clone(),
        );
        let task_restarts = Family::<ProfileLabel, Counter>::default();
        registry.register(
            "token_task_restarts",
            "Times a profile's token task died and was restarted",
            task_restarts.clone(),
        );
        let dpop_proof_rejected = Family::<ProfileLabel, Counter>::default();
        registry.register(
            "dpop_proof_rejected",
            "401 invalid_dpop_proof answers from Tango (often clock skew); replayed with a new proof",
            dpop_proof_rejected.clone(),
        );
        let caller_requests = Family::<CallerLabel, Counter>::default();
        registry.register(
            "caller_requests",
            "Gateway callers' requests by outcome (allowed, forbidden, rate_limited, spend_refused, unauthorized)",
            caller_requests.clone(),
        );
        let caller_spend = Family::<CallerOnlyLabel, Gauge>::default();
        registry.register(
            "caller_spend_today_minor_units",
            "Gateway callers' spend today (UTC) against their daily limit, in the limit currency's minor units",
            caller_spend.clone(),
        );
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result: applied or refused",
            config_reloads.clone(),
        );
        for result in ["applied", "refused"] {
            let _ = config_reloads.get_or_create(&ResultLabel { result });
        }
        let credential_rotations = Family::<ResultLabel, Counter>::default();
        registry.register(
            "credential_rotations",
            "Profile credential changes a reload brought, by result: applied (a new identity \
             obtained a token and replaced the old one), refused (it could not; the old one \
             keeps serving), secrets_loaded (new secrets taken for the next mint), \
             secret_refused (the token endpoint refused rotated secrets at a mint)",
            credential_rotations.clone(),
        );
        for result in ["applied", "refused", "secrets_loaded", "secret_refused"] {
            let _ = credential_rotations.get_or_create(&ResultLabel { result });
        }
        let tls_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "tls_reloads",
            "Changes of the proxy listener's TLS files (listen.tls_*), by result: applied or \
             refused (the running certificate kept serving)",
            tls_reloads.clone(),
        );
        for result in ["applied", "refused"] {
            let _ = tls_reloads.get_or_create(&ResultLabel { result });
        }
        let profile_ready = Family::<ProfileLabel, Gauge>::default();
        registry.register(
            "profile_ready",
            "Whether a profile can authorize a request now (1) or not (0), as of the last scrape",
            profile_ready.clone(),
        );
        Self {
            registry,
            by_class,
            duration,
            upstream_errors,
            upstream_retries,
            proxy_errors,
            in_flight,
            connections,
            connections_refused,
            connections_ended,
            token_requests,
            token_expiry,
            token_lifetime,
            upstream_401,
            cache_unreadable,
            redis_errors,
            mints,
            lease_waits,
            lease_wait_seconds,
            lookups,
            cache_degraded,
            lifetime_ignored,
            task_restarts,
            dpop_proof_rejected,
            caller_requests,
            caller_spend,
            profile_ready,
            config_reloads,
            credential_rotations,
            tls_reloads,
        }
    }

    /// Counts a credential rotation outcome (see the metric's help).
    pub fn credential_rotation(&self, result: &'static str) {
        self.credential_rotations
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts a configuration reload: `applied` or `refused`.
    pub fn config_reload(&self, result: &'static str) {
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts a change of the listener's TLS files: `applied` or `refused`.
    pub fn tls_reload(&self, result: &'static str) {
        self.tls_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// The counter of one caller's requests with one outcome (`allowed`, `forbidden`,
    /// `rate_limited`, `spend_refused`, `unauthorized`). Labels are configured caller names
    /// only; failed authentications of unknown names share `caller="_unknown"`.
    pub fn caller_counter(&self, caller: &str, outcome: &'static str) -> Counter {
        self.caller_requests
            .get_or_create(&CallerLabel {
                caller: caller.to_string(),
                outcome,
            })
            .clone()
    }

    /// A caller's spend today, in the minor units of its limit's currency.
    pub fn caller_spend(&self, caller: &str) -> Gauge {
        self.caller_spend
            .get_or_create(&CallerOnlyLabel {
                caller: caller.to_string(),
            })
            .clone()
    }

    /// Whether a profile can authorize a request now (1) or not (0); `None` for a gateway
    /// profile no request has used yet (no series: an idle store is not an unready one).
    pub fn set_profile_ready(&self, profile: &str, ready: Option<bool>) {
        let label = ProfileLabel {
            profile: profile.to_string(),
        };
        match ready {
            Some(ready) => {
                self.profile_ready
                    .get_or_create(&label)
                    .set(i64::from(ready));
            }
            None => {
                self.profile_ready.remove(&label);
            }
        }
    }

    /// Records a lifetime hint that was ignored as absurd.
    pub fn lifetime_ignored(&self, profile: &str, hint: &'static str) {
        self.lifetime_ignored
            .get_or_create(&HintLabel {
                profile: profile.to_string(),
                hint,
            })
            .inc();
    }

    /// Records a restart of a profile's token task.
    pub fn token_task_restart(&self, profile: &str) {
        self.profile_counter(&self.task_restarts, profile);
    }

    /// Records a 401 `invalid_dpop_proof`.
    pub fn dpop_proof_rejected(&self, profile: &str) {
        self.profile_counter(&self.dpop_proof_rejected, profile);
    }

    fn profile_counter(&self, family: &Family<ProfileLabel, Counter>, profile: &str) {
        family
            .get_or_create(&ProfileLabel {
                profile: profile.to_string(),
            })
            .inc();
    }

    /// Records whether a profile's shared cache is reachable.
    pub fn set_cache_degraded(&self, profile: &str, degraded: bool) {
        self.cache_degraded
            .get_or_create(&ProfileLabel {
                profile: profile.to_string(),
            })
            .set(i64::from(degraded));
    }

    /// Records a lookup of the in-process token (`memory`) or the shared store.
    pub fn lookup(&self, store: bool, hit: bool) {
        let idx = usize::from(store) * 2 + usize::from(!hit);
        self.lookups[idx].inc();
    }

    /// Records how long a refresh waited on another replica.
    pub fn lease_waited(&self, waited: Duration) {
        self.lease_wait_seconds.observe(waited.as_secs_f64());
    }

    /// Records a mint and why it happened.
    pub fn mint(&self, profile: &str, reason: &'static str) {
        self.mints
            .get_or_create(&ReasonLabel {
                profile: profile.to_string(),
                reason,
            })
            .inc();
    }

    /// Records a refresh that waited on another replica's lease.
    pub fn lease_wait(&self) {
        self.lease_waits.inc();
    }

    /// Records a failed Redis call.
    pub fn redis_error(&self) {
        self.redis_errors.inc();
    }

    /// Records a cached token record that did not open.
    pub fn cache_unreadable_record(&self, backend: &'static str) {
        self.cache_unreadable
            .get_or_create(&BackendLabel { backend })
            .inc();
    }

    /// Records one token endpoint request.
    pub fn token_request(&self, profile: &str, outcome: &'static str) {
        self.token_requests
            .get_or_create(&OutcomeLabel {
                profile: profile.to_string(),
                outcome,
            })
            .inc();
    }

    /// Records the current token's expiry (Unix seconds) and lifetime (seconds).
    pub fn token_expiry(&self, profile: &str, unix_seconds: i64, lifetime_seconds: i64) {
        let label = ProfileLabel {
            profile: profile.to_string(),
        };
        self.token_expiry.get_or_create(&label).set(unix_seconds);
        self.token_lifetime
            .get_or_create(&label)
            .set(lifetime_seconds);
    }

    /// Creates a profile's token series at zero, so alerts can tell "none yet" from "absent"
    /// (a counter that does not exist cannot be compared with 0, and its first increment
    /// would not count as an increase).
    pub fn init_token_profile(&self, profile: &str) {
        for outcome in [
            "success",
            "rate_limited",
            "rejected",
            "server_error",
            "timeout",
            "unreachable",
            "invalid_response",
            "dpop_error",
        ] {
            let _ = self.token_requests.get_or_create(&OutcomeLabel {
                profile: profile.to_string(),
                outcome,
            });
        }
        let label = ProfileLabel {
            profile: profile.to_string(),
        };
        let _ = self.upstream_401.get_or_create(&label);
        let _ = self.task_restarts.get_or_create(&label);
        let _ = self.cache_degraded.get_or_create(&label);
    }

    /// Records a 401 from Tango.
    pub fn upstream_401(&self, profile: &str) {
        self.upstream_401
            .get_or_create(&ProfileLabel {
                profile: profile.to_string(),
            })
            .inc();
    }

    /// Records one answered request.
    pub fn record_response(&self, status: u16, elapsed: Duration) {
        let idx = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            500..=599 => 4,
            _ => 5,
        };
        self.by_class[idx].inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Records a forwarded request that got no upstream response.
    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// The counter behind one kind of `upstream_errors`, for a hot path to keep.
    pub fn upstream_error_counter(&self, kind: &'static str) -> Counter {
        self.upstream_errors
            .get_or_create(&KindLabel { kind })
            .clone()
    }

    /// Records a request sent to Tango once more; `reason` is one of `goaway`, `refused_stream`,
    /// `unsent`.
    pub fn upstream_retry(&self, reason: &'static str) {
        self.upstream_retries
            .get_or_create(&RetryLabel { reason })
            .inc();
    }

    /// Records an answer the proxy produced itself.
    pub fn proxy_error(&self, cause: &'static str) {
        self.proxy_errors.get_or_create(&CauseLabel { cause }).inc();
    }

    /// The open-connection gauge, refusal counter and ended-connection counters (in
    /// [`crate::listener::ENDED_KINDS`] order) of one listener (`"proxy"` or `"admin"`).
    pub fn listener(&self, listener: &'static str) -> (Gauge, Counter, [Counter; 6]) {
        let label = ListenerLabel { listener };
        (
            self.connections.get_or_create(&label).clone(),
            self.connections_refused.get_or_create(&label).clone(),
            crate::listener::ENDED_KINDS.map(|reason| {
                self.connections_ended
                    .get_or_create(&EndedLabel { listener, reason })
                    .clone()
            }),
        )
    }

    /// Counts a request as in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements the in-flight gauge on drop.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
