//! The owner of one profile's token, and the handle requests use.
//!
//! * **One owner**: a single task holds the [`Machine`], does every store, lease and mint call the
//!   machine asks for (one at a time; bookkeeping writes go to background tasks) and publishes a
//!   [`Snapshot`] through a `watch` channel after each event.
//! * **Requests** read the snapshot: a usable token answers at once without touching the owner.
//!   Without one, a request nudges the owner (a coalescing `Notify`, so 500 cold requests are one
//!   wake-up) and waits for the outcome of the refresh it is waiting on — long enough for a lease
//!   wait, a takeover mint and a DPoP nonce retry — or gets `token_unavailable` at once while
//!   refreshes are failing. A 401 that costs the token is a message to the owner.
//! * **Supervised**: if the owner task dies, the failure is logged at ERROR, shown in `/status`,
//!   `/readyz` fails while it is down, and a new owner starts from the last published token,
//!   so a restart costs no mint. Repeated deaths back off.
//! * **Clocks**: every in-process time is a `tokio::time::Instant`; the wall clock ([`Clock`],
//!   injectable) is read only to turn stored records into deadlines and to show times.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, watch, Mutex, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::machine::{
    Carry, Effect, Event, Failing, Machine, Phase, Policy, Reason, Seen, StoreOp,
};
use super::store::{StoreError, StoreFuture, TokenStore};
use super::{lifetime, MintError, Token, TokenSource};
use crate::config::OAuthConfig;
use crate::metrics::Metrics;

/// The wall clock, injectable so tests can step it.
pub trait Clock: fmt::Debug + Send + Sync {
    /// Now, by the wall clock.
    fn wall(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Intervals that production leaves at their defaults and tests shorten.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How often a replica compares the shared copy with its own (one read, never per request).
    pub store_check: Duration,
    /// How often a replica waiting on another's lease polls when no wake-up arrives.
    pub fleet_poll: Duration,
    /// The refresh lease's lifetime without extension; `None`: the token timeout plus 2 s, as
    /// earlier versions use (the holder extends it every third of it while its mint runs, so
    /// only a dead holder's lease runs out).
    pub lease_ttl: Option<Duration>,
    /// First retry delay after a failed token request.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
    /// First retry delay after Tango's rate-limit answer.
    pub rate_limit_base: Duration,
    /// Longest retry delay after rate-limit answers.
    pub rate_limit_cap: Duration,
    /// A second 401 this soon after a 401-caused mint is passed on without minting.
    pub rejected_mint_interval: Duration,
    /// First delay before restarting a crashed owner task (doubles up to 30 s).
    pub restart_delay: Duration,
    /// Start idle: look for (or mint) the first token only when a request needs one. A gateway
    /// with hundreds of store profiles starts without a burst of cache reads and mints, and a
    /// store that never calls never costs Tango a token.
    pub lazy: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            store_check: Duration::from_secs(5),
            fleet_poll: Duration::from_millis(50),
            lease_ttl: None,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            rate_limit_base: Duration::from_secs(60),
            rate_limit_cap: Duration::from_secs(3600),
            rejected_mint_interval: Duration::from_secs(10),
            restart_delay: Duration::from_millis(100),
            lazy: false,
        }
    }
}

/// What requests and `/status` see of a profile's token state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The token in use (check [`Token::usable_at`]).
    pub token: Option<Arc<Token>>,
    /// Set while refreshes fail.
    pub failing: Option<Failing>,
    /// True while a refresh is in flight.
    pub refreshing: bool,
    /// 401 rejections the owner has handled (a waiter's ticket).
    pub rejections: u64,
    /// The last rejection the owner passed on without minting: `ath` and its count.
    pub declined: Option<(String, u64)>,
    /// Tokens minted by this process.
    pub mints: u64,
    /// Consecutive failed refreshes.
    pub failures: u32,
    /// The last error, kept after recovery.
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_at: Option<Instant>,
    /// When the current token was obtained.
    pub last_refresh: Option<Instant>,
    /// True while the shared cache is failing.
    pub cache_degraded: bool,
    /// Set while the owner task is down after a crash.
    pub crashed: Option<String>,
    /// Owner restarts after crashes.
    pub restarts: u64,
    /// What a restarted owner starts from.
    carry: Carry,
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
    /// True while a refresh is in flight.
    pub refreshing: bool,
    /// True while the shared token cache is unreachable (the proxy coordinates in-process).
    pub cache_degraded: bool,
    /// Times the token task crashed and was restarted.
    pub task_restarts: u64,
    /// The DPoP key's thumbprint, for DPoP profiles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpop_jkt: Option<String>,
}

/// Why a request cannot have a token now.
#[derive(Debug, Clone)]
pub struct Unavailable {
    /// Safe to show an operator.
    pub reason: String,
    /// When a retry may succeed.
    pub retry_after: Duration,
}

/// The outcome of waiting for a token to replace a rejected one.
#[derive(Debug)]
pub enum Need {
    /// A different usable token.
    Replaced(Arc<Token>),
    /// The owner decided not to mint (a 401 again right after a 401-caused mint): pass the 401 on.
    Declined,
    /// No token could be had.
    Unavailable(Unavailable),
}

/// Everything the owner needs besides the machine; shared with its I/O futures.
#[derive(Debug)]
struct Ctx {
    profile: String,
    key: String,
    audience: String,
    dpop: bool,
    source: Arc<dyn TokenSource>,
    store: Arc<dyn TokenStore>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    tuning: Tuning,
    lease_ttl: Duration,
    lease_owner: String,
    events: mpsc::UnboundedSender<Event>,
}

/// Keeps one profile's token fresh and hands it to requests.
#[derive(Debug)]
pub struct TokenManager {
    profile: String,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    events: mpsc::UnboundedSender<Event>,
    need: Arc<Notify>,
    wait: Duration,
    clock: Arc<dyn Clock>,
    supervisor: JoinHandle<()>,
}

impl Drop for TokenManager {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

/// A stable, non-secret key for what makes a token different.
pub fn fingerprint(config: &OAuthConfig, grant: &str, jkt: Option<&str>) -> String {
    let material = [
        config.token_url.as_str(),
        grant,
        config.client_id.as_str(),
        config.username.as_deref().unwrap_or(""),
        config.audience.as_str(),
        config.scope.as_str(),
        jkt.unwrap_or(""),
    ]
    .join("\n");
    let digest = ring::digest::digest(&ring::digest::SHA256, material.as_bytes());
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}

impl TokenManager {
    /// Starts the owner task (which looks for or mints a token at once). `jkt` is the DPoP
    /// key's thumbprint for DPoP profiles. Needs a Tokio runtime.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        profile: &str,
        config: &OAuthConfig,
        source: Arc<dyn TokenSource>,
        jkt: Option<&str>,
        store: Arc<dyn TokenStore>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        tuning: Tuning,
    ) -> Self {
        let lease_ttl = tuning
            .lease_ttl
            .unwrap_or(config.token_timeout + Duration::from_secs(2));
        // A live holder's mint, with its DPoP nonce retry, is over by then.
        let fleet_wait = config.token_timeout * 2 + Duration::from_secs(2);
        let policy = Policy {
            refresh_window: config.refresh_window,
            min_interval: config.min_token_interval,
            shared: store.shared(),
            fleet_wait,
            store_check: tuning.store_check,
            backoff_base: tuning.backoff_base,
            backoff_cap: tuning.backoff_cap,
            rate_limit_base: tuning.rate_limit_base,
            rate_limit_cap: tuning.rate_limit_cap,
            rejected_mint_interval: tuning.rejected_mint_interval,
        };
        // A waiter covers what the refresh it waits on can take: store reads (1 s each at
        // most), a wait on the lease holder, a takeover mint and a nonce retry.
        let wait = fleet_wait + config.token_timeout * 2 + Duration::from_secs(3);
        let (events, rx) = mpsc::unbounded_channel();
        let (publish, snapshot) = watch::channel(Arc::new(Snapshot::default()));
        let need = Arc::new(Notify::new());
        let ctx = Arc::new(Ctx {
            profile: profile.to_string(),
            key: fingerprint(config, source.grant(), jkt),
            audience: config.audience.clone(),
            dpop: jkt.is_some(),
            source,
            store,
            metrics,
            clock: clock.clone(),
            tuning,
            lease_ttl,
            lease_owner: crate::random_hex(16),
            events: events.clone(),
        });
        ctx.metrics.init_token_profile(&ctx.profile);
        let supervisor = tokio::spawn(supervise(
            ctx,
            policy,
            Arc::new(Mutex::new(rx)),
            need.clone(),
            publish,
        ));
        Self {
            profile: profile.to_string(),
            snapshot,
            events,
            need,
            wait,
            clock,
            supervisor,
        }
    }

    /// The token to use now, if there is a usable one. The request hot path: no lock held
    /// beyond the snapshot read, no message, no allocation.
    pub fn current(&self) -> Option<Arc<Token>> {
        let snap = self.snapshot.borrow();
        snap.token
            .as_ref()
            .filter(|t| t.usable_at(Instant::now()))
            .cloned()
    }

    /// Stops (`true`) or resumes renewals inside the refresh window: a token that becomes
    /// unusable or is rejected is still replaced. Survives a restart of the owner task.
    pub fn hold_renewals(&self, hold: bool) {
        let _ = self.events.send(Event::HoldRenewals(hold));
    }

    /// When the token in hand was minted, by this process or another replica (its wall-clock
    /// expiry less its lifetime), usable or not.
    pub fn minted_at(&self) -> Option<SystemTime> {
        let snap = self.snapshot.borrow();
        let t = snap.token.as_ref()?;
        t.expires_at.checked_sub(t.lifetime)
    }

    /// True when a request can be authorized right now (and the owner task is alive).
    pub fn is_ready(&self) -> bool {
        let snap = self.snapshot.borrow();
        snap.crashed.is_none()
            && snap
                .token
                .as_ref()
                .is_some_and(|t| t.usable_at(Instant::now()))
    }

    /// Waits for a usable token: at once if there is one; `Unavailable` at once while
    /// refreshes fail; otherwise until the refresh in flight ends.
    pub async fn usable(&self) -> Result<Arc<Token>, Unavailable> {
        let deadline = self.deadline();
        let mut rx = self.snapshot.clone();
        loop {
            {
                let snap = rx.borrow_and_update();
                let now = Instant::now();
                if let Some(t) = snap.token.as_ref().filter(|t| t.usable_at(now)) {
                    return Ok(t.clone());
                }
                if let Some(f) = &snap.failing {
                    return Err(unavailable(Some(f), now));
                }
            }
            self.need.notify_one();
            if !matches!(
                tokio::time::timeout_at(deadline, rx.changed()).await,
                Ok(Ok(()))
            ) {
                return Err(self.timed_out());
            }
        }
    }

    /// Tango rejected the token whose `ath` is given (a 401 that costs it): tells the owner.
    /// Returns a ticket for [`TokenManager::replacement`].
    pub fn reject(&self, ath: &str) -> u64 {
        let seen = self.snapshot.borrow().rejections;
        let _ = self.events.send(Event::Rejected(ath.to_string()));
        seen
    }

    /// Waits for a usable token other than `rejected`, or for the owner's decision not to mint
    /// (it counts the rejection without replacing the token).
    pub async fn replacement(&self, rejected: &Token, ticket: u64) -> Need {
        let deadline = self.deadline();
        let mut rx = self.snapshot.clone();
        loop {
            {
                let snap = rx.borrow_and_update();
                let now = Instant::now();
                let token = snap.token.as_ref().filter(|t| t.usable_at(now));
                match token {
                    Some(t) if t.ath() != rejected.ath() => return Need::Replaced(t.clone()),
                    Some(_)
                        if snap
                            .declined
                            .as_ref()
                            .is_some_and(|(a, n)| a == rejected.ath() && *n > ticket) =>
                    {
                        return Need::Declined
                    }
                    _ => {}
                }
                if let Some(f) = &snap.failing {
                    return Need::Unavailable(unavailable(Some(f), now));
                }
            }
            if !matches!(
                tokio::time::timeout_at(deadline, rx.changed()).await,
                Ok(Ok(()))
            ) {
                return Need::Unavailable(self.timed_out());
            }
        }
    }

    fn deadline(&self) -> Instant {
        let now = Instant::now();
        now.checked_add(self.wait).unwrap_or(now)
    }

    fn timed_out(&self) -> Unavailable {
        Unavailable {
            reason: format!(
                "no token for profile {} within {}",
                self.profile,
                humantime::format_duration(self.wait)
            ),
            retry_after: Duration::from_secs(1),
        }
    }

    /// A snapshot for `/status`.
    pub fn status(&self) -> ManagerStatus {
        let snap = self.snapshot.borrow().clone();
        let now = Instant::now();
        let wall = self.clock.wall();
        // In-process instants shown as wall-clock times, relative to now.
        let at = |i: Instant| rfc3339(wall.checked_sub(now.saturating_duration_since(i)));
        let token = snap.token.as_ref();
        let last_error = match (&snap.crashed, &snap.last_error) {
            (Some(c), _) => Some(c.clone()),
            (None, e) => e.clone(),
        };
        ManagerStatus {
            expires_at: token.and_then(|t| rfc3339(Some(t.expires_at))),
            seconds_left: token.map_or(0, |t| t.expires().saturating_duration_since(now).as_secs()),
            last_refresh: snap.last_refresh.and_then(at),
            mints: snap.mints,
            consecutive_failures: snap.failures,
            last_error,
            last_error_at: snap.last_error_at.and_then(at),
            retry_in_seconds: snap
                .failing
                .as_ref()
                .map(|f| f.retry_at.saturating_duration_since(now).as_secs()),
            degraded: snap.failures > 0,
            refreshing: snap.refreshing,
            cache_degraded: snap.cache_degraded,
            task_restarts: snap.restarts,
            dpop_jkt: None,
        }
    }

    /// True while the shared cache answers (or the store needs no network).
    pub fn cache_healthy(&self) -> bool {
        !self.snapshot.borrow().cache_degraded
    }
}

fn unavailable(failing: Option<&Failing>, now: Instant) -> Unavailable {
    match failing {
        Some(f) => Unavailable {
            reason: f.reason.clone(),
            retry_after: f
                .retry_at
                .saturating_duration_since(now)
                .max(Duration::from_secs(1)),
        },
        None => Unavailable {
            reason: "no token yet".into(),
            retry_after: Duration::from_secs(1),
        },
    }
}

/// RFC 3339, for times the formatter can show (not before 1970: a wall clock set that far back
/// shows no time rather than failing the status page).
fn rfc3339(t: Option<SystemTime>) -> Option<String> {
    t.filter(|t| *t >= std::time::UNIX_EPOCH)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

/// Runs owners one after another: a dead owner is reported and replaced, starting from the last
/// published token.
async fn supervise(
    ctx: Arc<Ctx>,
    policy: Policy,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Event>>>,
    need: Arc<Notify>,
    publish: watch::Sender<Arc<Snapshot>>,
) {
    let publish = Arc::new(publish);
    let mut delay = ctx.tuning.restart_delay;
    loop {
        let last = publish.borrow().clone();
        let mut machine = Machine::resume(
            policy.clone(),
            seed(),
            last.token.clone(),
            last.carry.clone(),
            Instant::now(),
        );
        if let Some(crash) = &last.crashed {
            machine.last_error = Some(crash.clone());
            machine.last_error_at = Some(Instant::now());
        }
        // Aborted with the supervisor (a dropped manager), so no owner outlives its handle.
        let mut owner = AbortOnDrop(tokio::spawn(run(
            ctx.clone(),
            machine,
            last,
            rx.clone(),
            need.clone(),
            publish.clone(),
        )));
        let started = Instant::now();
        let failure = match (&mut owner.0).await {
            Ok(()) => return,
            Err(e) if e.is_cancelled() => return,
            Err(e) => panic_message(e),
        };
        let restarts = publish.borrow().restarts + 1;
        let message = format!("the token task crashed ({failure}); restarted {restarts} time(s)");
        tracing::error!(
            profile = %ctx.profile,
            "{message}; restarting it with the token it held, without a new mint"
        );
        ctx.metrics.token_task_restart(&ctx.profile);
        publish.send_modify(|s| {
            let mut next = (**s).clone();
            next.crashed = Some(message);
            next.restarts = restarts;
            *s = Arc::new(next);
        });
        if started.elapsed() > Duration::from_secs(60) {
            delay = ctx.tuning.restart_delay;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// A task aborted when this is dropped: the lease keep-alive dies with the owner that started
/// it (a crash included), and the owner with its supervisor.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into()),
        Err(e) => e.to_string(),
    }
}

/// The owner loop: one event at a time into the machine, effects out, snapshot published.
async fn run(
    ctx: Arc<Ctx>,
    mut machine: Machine,
    last: Arc<Snapshot>,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Event>>>,
    need: Arc<Notify>,
    publish: Arc<watch::Sender<Arc<Snapshot>>>,
) {
    let mut rx = rx.lock().await;
    let mut io: Option<futures_util::future::BoxFuture<'static, Event>> = None;
    let mut lease_keeper: Option<AbortOnDrop> = None;
    let mut waiting_since: Option<Instant> = None;
    let restarts = last.restarts;
    let mut degraded = false;
    let mut event = Event::Tick;
    if ctx.tuning.lazy && last.token.is_none() && restarts == 0 {
        // Idle until the first request asks (a permit stored by an earlier ask counts) or a
        // message arrives.
        event = tokio::select! {
            Some(e) = rx.recv() => e,
            () = need.notified() => Event::Tick,
        };
    }
    loop {
        if let Event::Loaded(Ok(seen)) = &event {
            ctx.metrics.lookup(true, seen.stored.is_some());
        }
        let effects = machine.step(event, Instant::now());
        for effect in effects {
            match effect {
                Effect::Load => io = Some(Box::pin(load(ctx.clone(), None))),
                Effect::PollFleet => {
                    io = Some(Box::pin(load(ctx.clone(), Some(ctx.tuning.fleet_poll))))
                }
                Effect::ReadLedger => {
                    let c = ctx.clone();
                    io = Some(Box::pin(async move {
                        Event::Ledger(limited(c.store.last_mint(&c.key)).await)
                    }));
                }
                Effect::TryLease => {
                    let c = ctx.clone();
                    io = Some(Box::pin(async move {
                        Event::Lease(
                            limited(c.store.try_lease(&c.key, &c.lease_owner, c.lease_ttl)).await,
                        )
                    }));
                }
                Effect::HoldLease => {
                    lease_keeper.replace(AbortOnDrop(tokio::spawn(hold_lease(ctx.clone()))));
                }
                Effect::Mint(reason) => io = Some(Box::pin(mint(ctx.clone(), reason))),
                Effect::Background(ops) => {
                    if ops.iter().any(|o| matches!(o, StoreOp::ReleaseLease)) {
                        drop(lease_keeper.take());
                    }
                    tokio::spawn(bookkeep(ctx.clone(), ops));
                }
            }
        }
        // Lease-wait metrics.
        match (machine.phase, waiting_since) {
            (Phase::AwaitingFleet { .. }, None) => {
                ctx.metrics.lease_wait();
                waiting_since = Some(Instant::now());
            }
            (Phase::AwaitingFleet { .. }, Some(_)) => {}
            (_, Some(since)) => {
                ctx.metrics.lease_waited(since.elapsed());
                waiting_since = None;
            }
            _ => {}
        }
        if machine.cache_degraded != degraded {
            degraded = machine.cache_degraded;
            ctx.metrics.set_cache_degraded(&ctx.profile, degraded);
        }
        publish_snapshot(&publish, &machine, restarts, &ctx);

        let wake = machine.next_wake(Instant::now());
        event = tokio::select! {
            Some(e) = rx.recv() => e,
            e = async {
                match io.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            } => {
                io = None;
                e
            }
            () = need.notified() => Event::Tick,
            () = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => Event::Tick,
        };
    }
}

/// Publishes the machine's visible state when it changed.
fn publish_snapshot(
    publish: &watch::Sender<Arc<Snapshot>>,
    machine: &Machine,
    restarts: u64,
    ctx: &Ctx,
) {
    let next = Snapshot {
        token: machine.token.clone(),
        failing: machine.failing(),
        refreshing: machine.refreshing(),
        rejections: machine.rejections,
        declined: machine.declined.clone(),
        mints: machine.mints,
        failures: machine.failures,
        last_error: machine.last_error.clone(),
        last_error_at: machine.last_error_at,
        last_refresh: machine.last_refresh,
        cache_degraded: machine.cache_degraded,
        crashed: None,
        restarts,
        carry: machine.carry(),
    };
    publish.send_if_modified(|cur| {
        let same_token = match (&cur.token, &next.token) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        let changed = !same_token
            || cur.failing.as_ref().map(|f| f.retry_at)
                != next.failing.as_ref().map(|f| f.retry_at)
            || cur.refreshing != next.refreshing
            || cur.rejections != next.rejections
            || cur.mints != next.mints
            || cur.failures != next.failures
            || cur.last_error_at != next.last_error_at
            || cur.cache_degraded != next.cache_degraded
            || cur.carry != next.carry
            || cur.crashed.is_some();
        if changed {
            if let (false, Some(t)) = (same_token, &next.token) {
                let unix = i64::try_from(t.expires_ms() / 1000).unwrap_or(i64::MAX);
                let lifetime = i64::try_from(t.lifetime.as_secs()).unwrap_or(i64::MAX);
                ctx.metrics.token_expiry(&ctx.profile, unix, lifetime);
            }
            *cur = Arc::new(next);
        }
        changed
    });
}

/// Reads the stored token and any fleet backoff, after waiting up to `poll` for a wake-up.
async fn load(ctx: Arc<Ctx>, poll: Option<Duration>) -> Event {
    if let Some(limit) = poll {
        let _ = ctx.store.wait_for_change(&ctx.key, limit).await;
    }
    let found = limited(ctx.store.lookup(&ctx.key)).await;
    let now = Instant::now();
    let wall = ctx.clock.wall();
    Event::Loaded(found.map(|f| {
        Seen {
            stored: f
                .token
                .and_then(|r| Token::from_record(r, now, wall).map(Arc::new)),
            backoff: f.backoff,
            rejected: f.rejected,
            lease_held: f.lease_held,
        }
    }))
}

/// One token request, turned into a token with a trusted lifetime.
async fn mint(ctx: Arc<Ctx>, reason: Reason) -> Event {
    let answer = ctx.source.fetch().await;
    let now = Instant::now();
    let wall = ctx.clock.wall();
    let result = answer.and_then(|m| {
        let expected = if ctx.dpop { "dpop" } else { "bearer" };
        if m.token_type != expected {
            return Err(MintError::InvalidResponse(format!(
                "token_type {:?}; this profile needs {expected} tokens",
                m.token_type
            )));
        }
        let life = lifetime(m.expires_in, m.access_token.expose(), &ctx.audience, wall);
        for hint in &life.ignored {
            ctx.metrics.lifetime_ignored(&ctx.profile, hint.as_str());
            tracing::warn!(
                profile = %ctx.profile,
                hint = hint.as_str(),
                "the token answer claims a lifetime over 400 days; ignoring it and using the next source ({:?})",
                life.source
            );
        }
        Token::new(m.access_token, life.duration, life.duration, ctx.dpop, now, wall)
            .map(Arc::new)
            .ok_or_else(|| {
                MintError::InvalidResponse(
                    "access_token is not a header-safe string of at most 16 KiB".into(),
                )
            })
    });
    match &result {
        Ok(token) => {
            ctx.metrics.token_request(&ctx.profile, "success");
            ctx.metrics.mint(&ctx.profile, reason.as_str());
            tracing::info!(
                profile = %ctx.profile,
                reason = reason.as_str(),
                lifetime_s = token.lifetime.as_secs(),
                "obtained a new token"
            );
        }
        Err(e) => ctx.metrics.token_request(&ctx.profile, e.outcome()),
    }
    Event::Minted(result)
}

/// The longest any one store call may take, whatever the backend: a hung file system or a
/// store without its own timeouts must not wedge the owner.
const STORE_CALL_LIMIT: Duration = Duration::from_secs(5);

/// A store call bounded by [`STORE_CALL_LIMIT`].
async fn limited<T>(call: StoreFuture<'_, T>) -> Result<T, StoreError> {
    tokio::time::timeout(STORE_CALL_LIMIT, call)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "token cache call did not finish within {}s",
                STORE_CALL_LIMIT.as_secs()
            )))
        })
}

/// Extends the lease every third of its life while the mint runs (aborted when it ends).
async fn hold_lease(ctx: Arc<Ctx>) {
    loop {
        tokio::time::sleep(ctx.lease_ttl / 3).await;
        if let Ok(false) | Err(_) = limited(ctx.store.extend_lease(
            &ctx.key,
            &ctx.lease_owner,
            ctx.lease_ttl,
        ))
        .await
        {
            tracing::debug!(profile = %ctx.profile, "could not extend the refresh lease");
        }
    }
}

/// Store writes after the fact, in order. After a failure only the lease release is still
/// tried (a store that just failed would make each write wait out its timeout, and a ledger entry
/// without its token helps nobody); the failure is reported to the owner and the periodic check
/// writes the token back later.
async fn bookkeep(ctx: Arc<Ctx>, ops: Vec<StoreOp>) {
    let store = &ctx.store;
    let key = ctx.key.as_str();
    let mut outcome = Ok(());
    for op in ops {
        if outcome.is_err() && !matches!(op, StoreOp::ReleaseLease) {
            continue;
        }
        let result = match &op {
            StoreOp::Save(token) => limited(store.save(key, token)).await,
            StoreOp::RecordMint => limited(store.record_mint(key)).await,
            StoreOp::ShareBackoff(left, why) => {
                limited(store.set_fleet_backoff(key, *left, why)).await
            }
            StoreOp::ReleaseLease => limited(store.release_lease(key, &ctx.lease_owner)).await,
            StoreOp::Announce => limited(store.announce(key)).await,
            StoreOp::Evict(ath) => limited(store.evict_if(key, ath)).await.map(|_| ()),
        };
        if let Err(e) = result {
            tracing::debug!(profile = %ctx.profile, "token cache write failed: {e}");
            if outcome.is_ok() {
                outcome = Err(e);
            }
        }
    }
    let _ = ctx.events.send(Event::Bookkept(outcome));
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::secret::Secret;
    use crate::token::store::{MemoryStore, StoreFuture};
    use crate::token::{MintFuture, Minted, Record};

    /// A token endpoint that answers after `delay`, panics on the calls listed in `panic_on`.
    #[derive(Debug)]
    struct FakeSource {
        calls: AtomicU32,
        delay: Duration,
        lifetime: u64,
        panic_on: Vec<u32>,
    }

    impl FakeSource {
        fn new(delay: Duration, lifetime: u64) -> Arc<Self> {
            Self::panicking(delay, lifetime, vec![])
        }

        fn panicking(delay: Duration, lifetime: u64, panic_on: Vec<u32>) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicU32::new(0),
                delay,
                lifetime,
                panic_on,
            })
        }

        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl TokenSource for FakeSource {
        fn fetch(&self) -> MintFuture<'_> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                if self.panic_on.contains(&n) {
                    panic!("simulated crash in a token request");
                }
                Ok(Minted {
                    access_token: Secret::new(format!("token-{n}")),
                    token_type: "bearer".into(),
                    expires_in: Some(self.lifetime),
                })
            })
        }

        fn grant(&self) -> &str {
            "password"
        }
    }

    /// A wall clock tests can step.
    #[derive(Debug)]
    struct SteppedClock(AtomicU64);

    impl SteppedClock {
        fn new() -> Arc<Self> {
            Arc::new(Self(AtomicU64::new(1_800_000_000_000)))
        }

        fn step(&self, forward: bool, by: Duration) {
            let ms = by.as_millis() as u64;
            if forward {
                self.0.fetch_add(ms, Ordering::SeqCst);
            } else {
                self.0.fetch_sub(ms, Ordering::SeqCst);
            }
        }
    }

    impl Clock for SteppedClock {
        fn wall(&self) -> SystemTime {
            std::time::UNIX_EPOCH + Duration::from_millis(self.0.load(Ordering::SeqCst))
        }
    }

    /// A shared store whose lease answers are scripted (true once the script runs out), which
    /// counts lease extensions, and whose reads can hang forever.
    #[derive(Debug, Default)]
    struct FleetStore {
        tokens: MemoryStore,
        leases: StdMutex<VecDeque<bool>>,
        extends: AtomicU32,
        hang: bool,
    }

    impl TokenStore for FleetStore {
        fn name(&self) -> &'static str {
            "fleet"
        }
        fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Record>> {
            if self.hang {
                return Box::pin(std::future::pending());
            }
            self.tokens.load(key)
        }
        fn save<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
            self.tokens.save(key, token)
        }
        fn evict_if<'a>(&'a self, key: &'a str, ath: &'a str) -> StoreFuture<'a, bool> {
            self.tokens.evict_if(key, ath)
        }
        fn shared(&self) -> bool {
            true
        }
        fn try_lease<'a>(&'a self, _: &'a str, _: &'a str, _: Duration) -> StoreFuture<'a, bool> {
            let next = self.leases.lock().unwrap().pop_front().unwrap_or(true);
            Box::pin(async move { Ok(next) })
        }
        fn extend_lease<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: Duration,
        ) -> StoreFuture<'a, bool> {
            self.extends.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(true) })
        }
    }

    fn config(token_timeout: Duration) -> OAuthConfig {
        OAuthConfig {
            token_url: "https://auth.example/oauth/token".into(),
            audience: "https://api.tangocard.com/".into(),
            scope: "raas.all".into(),
            client_id: "client".into(),
            client_secret: Secret::new("secret"),
            client_secret_file: None,
            username: Some("svc".into()),
            password: Some(Secret::new("pw")),
            password_file: None,
            refresh_window: Duration::from_secs(4 * 3600),
            min_token_interval: None,
            token_timeout,
            dpop: None,
        }
    }

    fn start(
        source: Arc<FakeSource>,
        store: Arc<dyn TokenStore>,
        clock: Arc<dyn Clock>,
        token_timeout: Duration,
    ) -> TokenManager {
        start_tuned(source, store, clock, token_timeout, Tuning::default())
    }

    fn start_tuned(
        source: Arc<FakeSource>,
        store: Arc<dyn TokenStore>,
        clock: Arc<dyn Clock>,
        token_timeout: Duration,
        tuning: Tuning,
    ) -> TokenManager {
        TokenManager::start(
            "default",
            &config(token_timeout),
            source,
            None,
            store,
            Arc::new(Metrics::new()),
            clock,
            tuning,
        )
    }

    /// Lets the owner and spawned tasks run without moving paused time.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn five_hundred_cold_requests_share_one_token_request() {
        let source = FakeSource::new(Duration::from_millis(700), 86_400);
        let manager = Arc::new(start(
            source.clone(),
            Arc::new(MemoryStore::default()),
            Arc::new(SystemClock),
            Duration::from_secs(10),
        ));
        let waiters: Vec<_> = (0..500)
            .map(|_| {
                let m = manager.clone();
                tokio::spawn(async move { m.usable().await.map(|t| t.ath().to_string()) })
            })
            .collect();
        let mut aths = std::collections::HashSet::new();
        for w in waiters {
            aths.insert(w.await.unwrap().unwrap());
        }
        assert_eq!((source.calls(), aths.len()), (1, 1));
        assert!(manager.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_outlasts_a_lease_wait_and_a_slow_takeover_mint() {
        // Another replica holds the lease and never produces a token; the takeover mint is
        // slow. token_timeout 10 s: lease 22 s, then a 9 s mint.
        let store = Arc::new(FleetStore::default());
        store.leases.lock().unwrap().push_back(false);
        let source = FakeSource::new(Duration::from_secs(9), 86_400);
        let manager = start(
            source.clone(),
            store,
            Arc::new(SystemClock),
            Duration::from_secs(10),
        );
        let started = Instant::now();
        let token = manager.usable().await.unwrap();
        assert_eq!(token.access_token.expose(), "token-1");
        assert!(
            started.elapsed() >= Duration::from_secs(31),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(source.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashed_owner_is_reported_and_restarted_with_its_token_without_a_mint() {
        // 100 s tokens renew from 75 s (+ up to 2.5 s jitter); the renewal's request panics.
        let source = FakeSource::panicking(Duration::from_millis(10), 100, vec![2]);
        let manager = start_tuned(
            source.clone(),
            Arc::new(MemoryStore::default()),
            Arc::new(SystemClock),
            Duration::from_secs(10),
            Tuning {
                restart_delay: Duration::from_secs(5),
                ..Tuning::default()
            },
        );
        let first = manager.usable().await.unwrap();
        // The crash comes between 75 s and 77.5 s; the restart 5 s later.
        tokio::time::sleep(Duration::from_secs(79)).await;
        settle().await;
        // Down: reported, not ready, and the held token is still what requests would get once
        // the owner is back.
        let status = manager.status();
        assert_eq!(status.task_restarts, 1);
        assert!(status.last_error.unwrap().contains("crashed"));
        assert!(!manager.is_ready());
        // Restarted after the back-off, from the held token.
        tokio::time::sleep(Duration::from_secs(5)).await;
        settle().await;
        let token = manager.usable().await.unwrap();
        assert!(manager.is_ready());
        // The restart itself minted nothing: the renewal it still owed is the only new call.
        assert!(source.calls() <= 3, "{} calls", source.calls());
        assert!(
            token.ath() == first.ath() || token.access_token.expose() == "token-3",
            "unexpected token"
        );
        let status = manager.status();
        assert!(status.last_error.unwrap().contains("crashed"));
        assert_eq!(status.task_restarts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn wall_clock_steps_neither_expire_nor_extend_the_token() {
        let clock = SteppedClock::new();
        let source = FakeSource::new(Duration::from_millis(10), 3600);
        let store = Arc::new(FleetStore::default());
        let manager = start(
            source.clone(),
            store,
            clock.clone(),
            Duration::from_secs(10),
        );
        let t = manager.usable().await.unwrap();
        // NTP steps the wall clock two hours forward, then back: the token is still the one
        // in use, and no mint happens (the periodic store checks run meanwhile).
        clock.step(true, Duration::from_secs(2 * 3600));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(manager.current().unwrap().ath(), t.ath());
        clock.step(false, Duration::from_secs(4 * 3600));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(manager.current().unwrap().ath(), t.ath());
        assert_eq!(source.calls(), 1);
        // The token still expires by the monotonic clock: the renewal comes at 45 min.
        tokio::time::sleep(Duration::from_secs(45 * 60)).await;
        settle().await;
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_token_is_replaced_once_and_a_second_rejection_is_declined() {
        let source = FakeSource::new(Duration::from_millis(10), 86_400);
        let manager = start(
            source.clone(),
            Arc::new(MemoryStore::default()),
            Arc::new(SystemClock),
            Duration::from_secs(10),
        );
        let bad = manager.usable().await.unwrap();
        let ticket = manager.reject(bad.ath());
        let Need::Replaced(fresh) = manager.replacement(&bad, ticket).await else {
            panic!("no replacement");
        };
        assert_ne!(fresh.ath(), bad.ath());
        // Rejected again at once: the owner declines to mint again within 10 s.
        let ticket = manager.reject(fresh.ath());
        assert!(matches!(
            manager.replacement(&fresh, ticket).await,
            Need::Declined
        ));
        assert_eq!(source.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_during_a_leased_mint_stops_extending_the_lease() {
        // The first token request takes 20 s (the keep-alive extends the lease meanwhile), then
        // crashes the owner.
        let source = FakeSource::panicking(Duration::from_secs(20), 86_400, vec![1]);
        let store = Arc::new(FleetStore::default());
        let manager = start(
            source.clone(),
            store.clone(),
            Arc::new(SystemClock),
            Duration::from_secs(10),
        );
        tokio::time::sleep(Duration::from_secs(21)).await;
        settle().await;
        let before = store.extends.load(Ordering::SeqCst);
        assert!(
            before >= 2,
            "the lease was extended during the mint: {before}"
        );
        // The restarted owner mints (the second request succeeds) and holds no lease after.
        let token = manager.usable().await.unwrap();
        assert_eq!(token.access_token.expose(), "token-2");
        let after_mint = store.extends.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(store.extends.load(Ordering::SeqCst), after_mint);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_manager_stops_its_owner() {
        let source = FakeSource::new(Duration::from_millis(10), 100);
        let manager = start(
            source.clone(),
            Arc::new(MemoryStore::default()),
            Arc::new(SystemClock),
            Duration::from_secs(10),
        );
        manager.usable().await.unwrap();
        drop(manager);
        // 100 s tokens would be renewed ten times in 1,000 s by a leftover owner.
        tokio::time::sleep(Duration::from_secs(1000)).await;
        settle().await;
        assert_eq!(source.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_never_answers_delays_the_first_token_by_the_call_limit_only() {
        let source = FakeSource::new(Duration::from_millis(10), 86_400);
        let store = Arc::new(FleetStore {
            hang: true,
            ..FleetStore::default()
        });
        let manager = start(
            source.clone(),
            store,
            Arc::new(SystemClock),
            Duration::from_secs(10),
        );
        let started = Instant::now();
        manager.usable().await.unwrap();
        assert!(started.elapsed() <= STORE_CALL_LIMIT + Duration::from_secs(1));
        assert_eq!(source.calls(), 1);
    }
}
