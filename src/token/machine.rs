//! The token lifecycle of one profile as a pure state machine.
//!
//! [`Machine::step`] takes the state, one [`Event`] and the current monotonic time and returns
//! the [`Effect`]s to carry out; it does no I/O, reads no clock and logs only. The owner task in
//! `manager` runs the effects and feeds their outcomes back as events, one at a time, so every
//! decision about a profile's token is made here, in one place, and can be unit-tested under
//! paused time.
//!
//! The rules (README "Tokens"):
//!
//! * A token is used until `expires − skew`; renewal starts at
//!   `expires − min(refresh_window, lifetime/4)` plus a per-replica jitter, never earlier than
//!   the mint budget (`min_token_interval` after the fleet's last mint) allows — unless the
//!   token is unusable or proven rejected.
//! * Every refresh first looks in the store. **Adoption by reason**: a cold, expired, rejected or
//!   retry refresh adopts any stored token usable now; a window renewal only one outside its own
//!   window. A token whose `ath` was seen rejected is never adopted again.
//! * With a shared store, one replica takes the lease and mints; the others poll for its token
//!   and take over once if the lease runs out without one.
//! * A minted token is published at once; saving it, the ledger and the wake-up are background
//!   bookkeeping whose failure only marks the cache degraded. While the cache is degraded, a
//!   refresh makes no store call before minting.
//! * Failures back off exponentially with ±20 % jitter (longer after a rate-limit answer). A
//!   lease holder whose mint got an answer from the endpoint shares the backoff with the fleet.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::store::StoreError;
use super::{MintError, Token};

/// While the shared store is failing (or may have lost our token), it is checked at least this
/// often, so a Redis that comes back gets the token written back soon.
const RECOVERY_CHECK: Duration = Duration::from_secs(2);

/// `now + d`, or far in the future when that does not fit the clock (configured and untrusted
/// durations never panic here).
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(super::MAX_LIFETIME))
        .unwrap_or(now)
}

/// How many rejected tokens are remembered (by `ath`) so they are never adopted again.
const REJECTED_MEMORY: usize = 8;

/// The tunable intervals; defaults in `manager::Tuning`.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Renew from `expires - min(refresh_window, lifetime / 4)` on.
    pub refresh_window: Duration,
    /// The mint budget: no renewal sooner than this after the fleet's last mint.
    pub min_interval: Option<Duration>,
    /// True when other processes share the store (lease, ledger, polling).
    pub shared: bool,
    /// How long a replica waits for the lease holder's token before taking over, unless the
    /// store shows the lease gone sooner: as long as the holder's mint may take.
    pub fleet_wait: Duration,
    /// How often the shared copy is compared with ours.
    pub store_check: Duration,
    /// First retry delay after a failed token request.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
    /// First retry delay after Tango's rate-limit answer.
    pub rate_limit_base: Duration,
    /// Longest retry delay after rate-limit answers.
    pub rate_limit_cap: Duration,
    /// After a mint caused by a 401, another 401 within this time is passed on without minting:
    /// if Tango rejects fresh tokens too, more of them would only hammer the token endpoint.
    pub rejected_mint_interval: Duration,
}

/// Why a refresh runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No token yet.
    Cold,
    /// The token is inside its refresh window.
    Window,
    /// The token is no longer usable.
    Expired,
    /// Tango rejected the token.
    Rejected,
    /// An earlier refresh failed.
    Retry,
}

impl Reason {
    /// The metric and log label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Cold => "cold",
            Reason::Window => "window",
            Reason::Expired => "expired",
            Reason::Rejected => "rejected",
            Reason::Retry => "retry",
        }
    }
}

/// What the owner is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing in flight; the timer decides what is next.
    Idle,
    /// Looking in the store before minting.
    Loading(Reason),
    /// Reading the fleet's mint ledger before a window renewal under a mint budget.
    Ledger(Reason),
    /// Asking for the fleet's refresh lease.
    Leasing {
        /// Why.
        reason: Reason,
        /// True on the second try, after the holder's lease ran out.
        takeover: bool,
    },
    /// Another replica holds the lease: polling for its token until `until`.
    AwaitingFleet {
        /// Why.
        reason: Reason,
        /// When to try taking the lease over.
        until: Instant,
    },
    /// A token request is in flight.
    Minting {
        /// Why.
        reason: Reason,
        /// True when this process holds the fleet lease.
        lease: bool,
    },
    /// Comparing the shared copy with ours.
    Checking,
}

/// Something that happened.
#[derive(Debug)]
pub enum Event {
    /// The timer fired, or a request found no usable token: re-plan.
    Tick,
    /// Tango rejected the token with this `ath` (a 401 that costs the token).
    Rejected(String),
    /// The outcome of [`Effect::Load`] or [`Effect::PollFleet`].
    Loaded(Result<Seen, StoreError>),
    /// The outcome of [`Effect::ReadLedger`]: how long ago the fleet last minted.
    Ledger(Result<Option<Duration>, StoreError>),
    /// The outcome of [`Effect::TryLease`].
    Lease(Result<bool, StoreError>),
    /// The outcome of [`Effect::Mint`].
    Minted(Result<Arc<Token>, MintError>),
    /// The outcome of background bookkeeping.
    Bookkept(Result<(), StoreError>),
    /// Stop (true) or resume (false) renewals inside the refresh window.
    HoldRenewals(bool),
}

/// What one look at the store found.
#[derive(Debug, Default)]
pub struct Seen {
    /// The stored token, already checked against this process's clocks.
    pub stored: Option<Arc<Token>>,
    /// A fleet-wide backoff in force: time left and reason.
    pub backoff: Option<(Duration, String)>,
    /// The `ath` of the token the fleet last saw rejected (a replica's 401).
    pub rejected: Option<String>,
    /// Whether the refresh lease is held, where the store can tell.
    pub lease_held: Option<bool>,
}

/// A store write done in the background, in order.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// Save the token (the store keeps the later-expiring one).
    Save(Arc<Token>),
    /// Record a mint in the fleet ledger.
    RecordMint,
    /// Tell the fleet not to ask Tango for this long.
    ShareBackoff(Duration, String),
    /// Release the refresh lease.
    ReleaseLease,
    /// Wake replicas waiting for a token.
    Announce,
    /// Compare-and-delete the token with this `ath`.
    Evict(String),
}

/// Something the owner must do.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Read the store (token and fleet backoff) → [`Event::Loaded`].
    Load,
    /// Wait for a wake-up or a short poll interval, then as [`Effect::Load`].
    PollFleet,
    /// Read the ledger → [`Event::Ledger`].
    ReadLedger,
    /// Try to take the lease → [`Event::Lease`].
    TryLease,
    /// Keep extending the lease while the mint runs (stopped by [`StoreOp::ReleaseLease`]).
    HoldLease,
    /// Request a token → [`Event::Minted`].
    Mint(Reason),
    /// Store writes in the background, in this order → [`Event::Bookkept`].
    Background(Vec<StoreOp>),
}

/// A failure requests can see while there is no usable token.
#[derive(Debug, Clone)]
pub struct Failing {
    /// Safe to show an operator.
    pub reason: String,
    /// When the next attempt is due.
    pub retry_at: Instant,
}

/// The part of a machine's state a restarted owner starts from (besides the token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carry {
    budget_open_at: Option<Instant>,
    rejected: VecDeque<String>,
    failures: u32,
    retry_at: Option<Instant>,
    last_rejected_mint: Option<Instant>,
    rejections: u64,
    renewals_held: bool,
}

/// One profile's token state.
#[derive(Debug)]
pub struct Machine {
    policy: Policy,
    /// The token in use.
    pub token: Option<Arc<Token>>,
    /// When the current token's renewal is due (jittered window start).
    refresh_at: Option<Instant>,
    /// What is in flight.
    pub phase: Phase,
    /// Consecutive failed refreshes.
    pub failures: u32,
    /// No token request before this.
    pub retry_at: Option<Instant>,
    /// The last failure, kept after recovery for diagnosis.
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_at: Option<Instant>,
    /// No renewal before this (the mint budget, this process's or the fleet's).
    budget_open_at: Option<Instant>,
    rejected: VecDeque<String>,
    last_rejected_mint: Option<Instant>,
    /// True while the shared store is failing.
    pub cache_degraded: bool,
    /// True when the store may not hold our token (a save failed).
    unsaved: bool,
    next_check: Option<Instant>,
    /// Tokens this process minted.
    pub mints: u64,
    /// 401 rejections handled (lets a waiting request recognise the owner's answer to its own).
    pub rejections: u64,
    /// The last rejection passed on without a mint: the token's `ath` and its rejection count.
    pub declined: Option<(String, u64)>,
    /// When the current token was obtained (minted or adopted).
    pub last_refresh: Option<Instant>,
    /// No renewal inside the refresh window while set (a credential rotation that shares this
    /// client's mint budget is waiting to make the next mint); an unusable or rejected token
    /// is still replaced.
    renewals_held: bool,
    rng: u64,
}

impl Machine {
    /// A machine with no token; `seed` drives the jitter (any value; tests fix it).
    pub fn new(policy: Policy, seed: u64) -> Self {
        Self {
            policy,
            token: None,
            refresh_at: None,
            phase: Phase::Idle,
            failures: 0,
            retry_at: None,
            last_error: None,
            last_error_at: None,
            budget_open_at: None,
            rejected: VecDeque::new(),
            last_rejected_mint: None,
            cache_degraded: false,
            unsaved: false,
            next_check: None,
            mints: 0,
            rejections: 0,
            declined: None,
            last_refresh: None,
            renewals_held: false,
            rng: seed | 1,
        }
    }

    /// A machine that starts where a dead owner left off (no mint needed): its token, and what
    /// keeps the budget, the backoff and the never-re-adopt rule in force.
    pub fn resume(
        policy: Policy,
        seed: u64,
        token: Option<Arc<Token>>,
        carry: Carry,
        now: Instant,
    ) -> Self {
        let mut m = Self::new(policy, seed);
        if let Some(t) = token {
            m.adopt(t, now);
        }
        m.budget_open_at = carry.budget_open_at;
        m.rejected = carry.rejected;
        m.failures = carry.failures;
        m.retry_at = carry.retry_at;
        m.last_rejected_mint = carry.last_rejected_mint;
        m.rejections = carry.rejections;
        m.renewals_held = carry.renewals_held;
        m
    }

    /// What a restarted owner must not forget.
    pub fn carry(&self) -> Carry {
        Carry {
            budget_open_at: self.budget_open_at,
            rejected: self.rejected.clone(),
            failures: self.failures,
            retry_at: self.retry_at,
            last_rejected_mint: self.last_rejected_mint,
            rejections: self.rejections,
            renewals_held: self.renewals_held,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The usable token, if any.
    pub fn usable(&self, now: Instant) -> Option<&Arc<Token>> {
        self.token.as_ref().filter(|t| t.usable_at(now))
    }

    /// What requests without a usable token are told, while refreshes fail.
    pub fn failing(&self) -> Option<Failing> {
        if self.failures == 0 {
            return None;
        }
        Some(Failing {
            reason: format!(
                "token request failing: {}",
                self.last_error.as_deref().unwrap_or("unknown error")
            ),
            retry_at: self.retry_at?,
        })
    }

    /// True while a refresh is in flight.
    pub fn refreshing(&self) -> bool {
        !matches!(self.phase, Phase::Idle | Phase::Checking)
    }

    /// When the owner should wake up to re-plan if nothing else happens.
    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        if self.phase != Phase::Idle {
            return None;
        }
        let mut wake: Option<Instant> = None;
        let mut add = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        if let Some(r) = self.retry_at.filter(|r| *r > now) {
            add(r);
        } else if let Some(t) = &self.token {
            add(t.usable_until());
            if let Some(at) = self.renew_at(t) {
                add(at);
            }
        }
        if let (true, Some(c)) = (self.policy.shared, self.next_check) {
            add(c);
        }
        wake
    }

    /// Handles one event at `now`.
    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        match event {
            Event::Tick => {}
            Event::HoldRenewals(hold) => self.renewals_held = hold,
            Event::Rejected(ath) => self.on_rejected(ath, now, &mut fx),
            Event::Loaded(seen) => self.on_loaded(seen, now, &mut fx),
            Event::Ledger(result) => self.on_ledger(result, now, &mut fx),
            Event::Lease(result) => self.on_lease(result, now, &mut fx),
            Event::Minted(result) => self.on_minted(result, now, &mut fx),
            Event::Bookkept(result) => {
                if self.store_answer(result).is_none() {
                    self.unsaved = true;
                }
            }
        }
        self.plan(now, &mut fx);
        fx
    }

    // ---- planning -------------------------------------------------------------------------

    /// When the current token's renewal may start: the jittered window start, not before the
    /// mint budget opens; `None` when the budget forbids renewing before the token is unusable.
    fn renew_at(&self, token: &Token) -> Option<Instant> {
        if self.renewals_held {
            return None;
        }
        let window = self
            .refresh_at
            .unwrap_or_else(|| token.refresh_from(self.policy.refresh_window));
        let at = self.budget_open_at.map_or(window, |b| window.max(b));
        (at < token.usable_until()).then_some(at)
    }

    fn due(&self, now: Instant) -> Option<Reason> {
        let retrying = self.failures > 0;
        let pick = |r| if retrying { Reason::Retry } else { r };
        match &self.token {
            None => Some(pick(Reason::Cold)),
            Some(t) if !t.usable_at(now) => Some(pick(Reason::Expired)),
            Some(t) => {
                let at = self.renew_at(t)?;
                (now >= at).then(|| pick(Reason::Window))
            }
        }
    }

    fn plan(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let backing_off = self.retry_at.is_some_and(|r| now < r);
        // A periodic check in flight never holds up a refresh that requests wait for (it can
        // hang for the store's timeouts while Redis comes back): the refresh starts now and the
        // owner drops the check. Backing off, the check goes on: it may find a peer's token.
        let preempt = self.phase == Phase::Checking && !backing_off && self.urgent(now);
        if self.phase != Phase::Idle && !preempt {
            return;
        }
        if let (false, Some(reason)) = (backing_off, self.due(now)) {
            self.begin(reason, now, fx);
            return;
        }
        // The shared copy is also read while backing off without a token: a replica whose own
        // token request failed adopts the one a peer stored instead of answering 503 meanwhile.
        if self.policy.shared && self.next_check.is_none_or(|c| now >= c) {
            self.next_check = Some(later(now, self.check_interval(now)));
            self.phase = Phase::Checking;
            fx.push(Effect::Load);
        }
    }

    /// True when requests are (or soon will be) waiting: no usable token.
    fn urgent(&self, now: Instant) -> bool {
        self.usable(now).is_none()
    }

    fn begin(&mut self, reason: Reason, now: Instant, fx: &mut Vec<Effect>) {
        if self.cache_degraded && self.urgent(now) {
            // The store is failing and requests wait: no store call may delay the token.
            self.lease_or_mint(reason, false, fx);
        } else {
            // A renewal with a usable token in hand can afford to ask the store first.
            self.phase = Phase::Loading(reason);
            fx.push(Effect::Load);
        }
    }

    /// A store call failed during a refresh. With no usable token the refresh goes on inside
    /// this process; with one, it is retried shortly rather than minted without the fleet's
    /// lease or ledger (one failed call must not make every replica mint against the budget).
    fn store_failed_during(&mut self, reason: Reason, now: Instant, fx: &mut Vec<Effect>) {
        if self.urgent(now) {
            self.lease_or_mint(reason, false, fx);
        } else {
            tracing::debug!("token renewal postponed: the token cache did not answer");
            self.phase = Phase::Idle;
            self.retry_at = Some(later(now, RECOVERY_CHECK));
        }
    }

    fn lease_or_mint(&mut self, reason: Reason, takeover: bool, fx: &mut Vec<Effect>) {
        if self.policy.shared && !self.cache_degraded {
            self.phase = Phase::Leasing { reason, takeover };
            fx.push(Effect::TryLease);
        } else {
            self.phase = Phase::Minting {
                reason,
                lease: false,
            };
            fx.push(Effect::Mint(reason));
        }
    }

    // ---- events ---------------------------------------------------------------------------

    /// Notes whether the store answered; its answer, if any.
    fn store_answer<T>(&mut self, result: Result<T, StoreError>) -> Option<T> {
        match result {
            Ok(v) => {
                self.cache_ok();
                Some(v)
            }
            Err(e) => {
                self.cache_error(&e);
                None
            }
        }
    }

    fn on_loaded(&mut self, seen: Result<Seen, StoreError>, now: Instant, fx: &mut Vec<Effect>) {
        let seen = match self.store_answer(seen) {
            Some(seen) => seen,
            None => {
                match self.phase {
                    Phase::Loading(reason) => self.store_failed_during(reason, now, fx),
                    // The store went away under us: coordinate inside this process.
                    Phase::AwaitingFleet { reason, .. } => self.lease_or_mint(reason, false, fx),
                    Phase::Checking => self.phase = Phase::Idle,
                    _ => {}
                }
                return;
            }
        };
        if let Some(ath) = &seen.rejected {
            self.fleet_rejected(ath);
        }
        let Seen {
            stored,
            backoff,
            lease_held,
            ..
        } = seen;
        match self.phase {
            Phase::Checking => {
                self.phase = Phase::Idle;
                self.check_shared_copy(stored, now, fx);
                self.next_check = Some(later(now, self.check_interval(now)));
            }
            Phase::Loading(reason) => {
                if self.settled_by_store(stored, backoff, reason, now) {
                    self.phase = Phase::Idle;
                } else if reason == Reason::Window
                    && self.policy.min_interval.is_some()
                    && self.policy.shared
                {
                    self.phase = Phase::Ledger(reason);
                    fx.push(Effect::ReadLedger);
                } else {
                    self.lease_or_mint(reason, false, fx);
                }
            }
            Phase::AwaitingFleet { reason, until } => {
                if self.settled_by_store(stored, backoff, reason, now) {
                    self.phase = Phase::Idle;
                } else if now >= until || lease_held == Some(false) {
                    // The holder produced no token and its lease ran out or was released (it
                    // died, or its mint failed without an answer worth sharing): take over once.
                    self.lease_or_mint(reason, true, fx);
                } else {
                    fx.push(Effect::PollFleet);
                }
            }
            _ => {}
        }
    }

    /// Another replica saw the token with this `ath` rejected (and evicted it): never adopt it,
    /// and stop using it if it is ours.
    fn fleet_rejected(&mut self, ath: &str) {
        self.remember_rejected(ath.to_string());
        if self.token.as_ref().is_some_and(|t| t.ath() == ath) {
            tracing::warn!("another replica saw this token rejected (401); replacing it");
            self.token = None;
            self.refresh_at = None;
        }
    }

    /// What the store says ends a refresh: a token to adopt for `reason`, or a fleet backoff to
    /// honour. True when it did.
    fn settled_by_store(
        &mut self,
        stored: Option<Arc<Token>>,
        backoff: Option<(Duration, String)>,
        reason: Reason,
        now: Instant,
    ) -> bool {
        if let Some(t) = stored.filter(|t| self.adoptable(t, reason, now)) {
            self.adopt(t, now);
            true
        } else if let Some((left, why)) = backoff {
            self.honour_fleet_backoff(left, &why, now);
            true
        } else {
            false
        }
    }

    fn on_ledger(
        &mut self,
        result: Result<Option<Duration>, StoreError>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let Phase::Ledger(reason) = self.phase else {
            return;
        };
        let Some(ago) = self.store_answer(result) else {
            return self.store_failed_during(reason, now, fx);
        };
        match (self.policy.min_interval, ago) {
            (Some(interval), Some(ago)) if ago < interval => {
                let open = later(now, interval - ago);
                self.budget_open_at = Some(self.budget_open_at.map_or(open, |b| b.max(open)));
                tracing::debug!(
                    "a replica minted {}s ago; renewal waits for the mint budget",
                    ago.as_secs()
                );
                self.phase = Phase::Idle;
            }
            _ => self.lease_or_mint(reason, false, fx),
        }
    }

    fn on_lease(&mut self, result: Result<bool, StoreError>, now: Instant, fx: &mut Vec<Effect>) {
        let Phase::Leasing { reason, takeover } = self.phase else {
            return;
        };
        match self.store_answer(result) {
            Some(true) => {
                self.phase = Phase::Minting {
                    reason,
                    lease: true,
                };
                fx.push(Effect::HoldLease);
                fx.push(Effect::Mint(reason));
            }
            Some(false) if takeover => {
                self.phase = Phase::Idle;
                self.fail(
                    &MintError::Coordination(
                        "another replica holds the refresh lease and has not produced a token yet"
                            .into(),
                    ),
                    reason,
                    now,
                );
            }
            Some(false) => {
                self.phase = Phase::AwaitingFleet {
                    reason,
                    until: later(now, self.policy.fleet_wait),
                };
                fx.push(Effect::PollFleet);
            }
            None => self.store_failed_during(reason, now, fx),
        }
    }

    fn on_minted(
        &mut self,
        result: Result<Arc<Token>, MintError>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let Phase::Minting { reason, lease } = self.phase else {
            return;
        };
        self.phase = Phase::Idle;
        let mut ops = Vec::new();
        match result {
            Ok(token) => {
                self.mints += 1;
                if reason == Reason::Rejected {
                    self.last_rejected_mint = Some(now);
                }
                self.adopt(token.clone(), now);
                // In the background: the token is already in use. If the store is failing,
                // these fail too and the periodic check writes the token back later.
                ops.push(StoreOp::Save(token));
                ops.push(StoreOp::RecordMint);
            }
            Err(e) => {
                let delay = self.fail(&e, reason, now);
                if lease && e.answered() {
                    ops.push(StoreOp::ShareBackoff(delay, e.to_string()));
                }
            }
        }
        if lease {
            ops.push(StoreOp::ReleaseLease);
        }
        if self.policy.shared && !ops.is_empty() {
            ops.push(StoreOp::Announce);
        }
        if !ops.is_empty() {
            fx.push(Effect::Background(ops));
        }
    }

    fn on_rejected(&mut self, ath: String, now: Instant, fx: &mut Vec<Effect>) {
        self.rejections += 1;
        let current = self.token.as_ref().is_some_and(|t| t.ath() == ath);
        if !current {
            // Already replaced; just never adopt it again.
            self.remember_rejected(ath);
            return;
        }
        let recent = self.last_rejected_mint.is_some_and(|at| {
            now.saturating_duration_since(at) < self.policy.rejected_mint_interval
        });
        if recent || self.failures > 0 {
            self.declined = Some((ath, self.rejections));
            tracing::warn!(
                "Tango rejected a token again (401) soon after a replacement; passing the 401 on without minting"
            );
            return;
        }
        tracing::warn!("Tango rejected the token (401); minting a new one");
        self.remember_rejected(ath.clone());
        self.token = None;
        self.refresh_at = None;
        fx.push(Effect::Background(vec![StoreOp::Evict(ath)]));
        // A periodic check in flight is given up (the owner drops its future when the refresh
        // starts its own I/O): requests are waiting, and the refresh reads the store itself.
        if matches!(self.phase, Phase::Idle | Phase::Checking) {
            self.begin(Reason::Rejected, now, fx);
        }
    }

    // ---- rules ----------------------------------------------------------------------------

    /// Adoption by reason: any stored token usable now, except for a window renewal, which
    /// needs one outside its window; never a token seen rejected; never an older one than ours.
    fn adoptable(&self, stored: &Token, reason: Reason, now: Instant) -> bool {
        if !stored.usable_at(now) || self.rejected.iter().any(|a| a == stored.ath()) {
            return false;
        }
        if let Some(ours) = self.usable(now) {
            // Only a different, later-expiring token beats a usable one.
            if ours.ath() == stored.ath() || stored.expires_ms() <= ours.expires_ms() {
                return false;
            }
        }
        reason != Reason::Window || stored.refresh_from(self.policy.refresh_window) > now
    }

    fn adopt(&mut self, token: Arc<Token>, now: Instant) {
        let window = self.policy.refresh_window.min(token.lifetime / 4);
        // At most 60 s, so the float product cannot overflow.
        let jitter = (window / 10)
            .min(Duration::from_secs(60))
            .mul_f64(self.random_unit());
        self.refresh_at = Some(later(
            token.refresh_from(self.policy.refresh_window),
            jitter,
        ));
        // The budget counts from when the token was minted (by anyone): its expiry minus its
        // lifetime. A replica that adopted a token therefore keeps the budget without a ledger.
        if let Some(interval) = self.policy.min_interval {
            let open = if interval >= token.lifetime {
                token.expires().checked_add(interval - token.lifetime)
            } else {
                token.expires().checked_sub(token.lifetime - interval)
            };
            if let Some(open) = open {
                self.budget_open_at = Some(self.budget_open_at.map_or(open, |b| b.max(open)));
            }
        }
        self.failures = 0;
        self.retry_at = None;
        self.last_refresh = Some(now);
        // The store was just read or written: the next comparison can wait a full interval.
        self.next_check = Some(later(now, self.policy.store_check));
        self.token = Some(token);
    }

    fn check_shared_copy(
        &mut self,
        stored: Option<Arc<Token>>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        if let Some(theirs) = &stored {
            if self.rejected.iter().any(|a| a == theirs.ath()) {
                // A token seen rejected lingers (its eviction lost a race): remove it rather
                // than write around it on every check.
                fx.push(Effect::Background(vec![StoreOp::Evict(
                    theirs.ath().to_string(),
                )]));
                return;
            }
        }
        let Some(ours) = self.usable(now).cloned() else {
            // Backing off without a token: a peer's stored token ends the outage here.
            if let Some(t) = stored.filter(|t| self.adoptable(t, Reason::Retry, now)) {
                tracing::info!("adopting the token a replica stored while this one was failing");
                self.adopt(t, now);
            }
            return;
        };
        match stored {
            Some(theirs) if theirs.ath() == ours.ath() => self.unsaved = false,
            Some(theirs) if self.adoptable(&theirs, Reason::Retry, now) => {
                tracing::debug!("adopting a newer token a replica stored");
                self.adopt(theirs, now);
            }
            Some(_) => {
                // An older token: ours is the better one to share.
                fx.push(Effect::Background(vec![StoreOp::Save(ours)]));
            }
            None => {
                if self.unsaved {
                    tracing::info!("token cache reachable; writing the token back");
                } else {
                    tracing::info!("the token cache lost the token; writing it back");
                }
                fx.push(Effect::Background(vec![StoreOp::Save(ours)]));
            }
        }
    }

    fn honour_fleet_backoff(&mut self, left: Duration, why: &str, now: Instant) {
        self.failures = self.failures.max(1);
        self.retry_at = Some(later(now, left));
        self.next_check = Some(later(now, self.check_interval(now)));
        self.last_error = Some(format!("{why} (answer given to another replica)"));
        self.last_error_at = Some(now);
        tracing::warn!(
            retry_in_s = left.as_secs(),
            "not asking Tango for a token: the fleet is backing off ({why})"
        );
    }

    /// Records a failure; returns the backoff delay.
    fn fail(&mut self, e: &MintError, reason: Reason, now: Instant) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let (base, cap) = match e {
            MintError::RateLimited(_) => (self.policy.rate_limit_base, self.policy.rate_limit_cap),
            _ => (self.policy.backoff_base, self.policy.backoff_cap),
        };
        let exp = base.saturating_mul(1u32 << self.failures.saturating_sub(1).min(16));
        // ±20 % jitter so replicas and profiles do not retry in step.
        let factor = 0.8 + 0.4 * self.random_unit();
        let delay = Duration::try_from_secs_f64(exp.min(cap).as_secs_f64() * factor)
            .unwrap_or(super::MAX_LIFETIME);
        self.retry_at = Some(later(now, delay));
        self.next_check = Some(later(now, self.check_interval(now)));
        self.last_error = Some(e.to_string());
        self.last_error_at = Some(now);
        let usable_token = self.usable(now).is_some();
        if let MintError::RateLimited(_) = e {
            tracing::error!(
                reason = reason.as_str(),
                retry_in_s = delay.as_secs(),
                usable_token,
                "Tango refused a new token: daily rate limit exceeded ({e}); not asking again before the retry time"
            );
        } else {
            tracing::warn!(
                reason = reason.as_str(),
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                usable_token,
                "token request failed: {e}"
            );
        }
        delay
    }

    fn remember_rejected(&mut self, ath: String) {
        if !self.rejected.contains(&ath) {
            if self.rejected.len() == REJECTED_MEMORY {
                self.rejected.pop_front();
            }
            self.rejected.push_back(ath);
        }
    }

    fn check_interval(&self, now: Instant) -> Duration {
        if self.cache_degraded || self.unsaved || self.urgent(now) {
            self.policy.store_check.min(RECOVERY_CHECK)
        } else {
            self.policy.store_check
        }
    }

    fn cache_error(&mut self, e: &StoreError) {
        if !self.cache_degraded {
            tracing::warn!("token cache degraded, coordinating inside this process only: {e}");
        }
        self.cache_degraded = true;
    }

    fn cache_ok(&mut self) {
        if self.cache_degraded {
            tracing::info!("token cache reachable again");
            self.cache_degraded = false;
            // Whatever we hold may be missing there: the next check writes it back.
            self.unsaved = true;
            self.next_check = None;
        }
    }

    /// A fraction in [0, 1) from a xorshift generator (jitter needs spread, not secrecy).
    fn random_unit(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::secret::Secret;

    const DAY: Duration = Duration::from_secs(86_400);
    const HOUR: Duration = Duration::from_secs(3600);

    fn policy(shared: bool, min_interval: Option<Duration>) -> Policy {
        Policy {
            refresh_window: 4 * HOUR,
            min_interval,
            shared,
            fleet_wait: Duration::from_secs(22),
            store_check: Duration::from_secs(5),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            rate_limit_base: Duration::from_secs(60),
            rate_limit_cap: HOUR,
            rejected_mint_interval: Duration::from_secs(10),
        }
    }

    /// A token with `left` to live out of `lifetime`, as of now.
    fn token(value: &str, left: Duration, lifetime: Duration) -> Arc<Token> {
        Arc::new(
            Token::new(
                Secret::new(value),
                left,
                lifetime,
                false,
                Instant::now(),
                SystemTime::now(),
            )
            .unwrap(),
        )
    }

    fn fresh(value: &str) -> Arc<Token> {
        token(value, DAY, DAY)
    }

    fn loaded(stored: Option<Arc<Token>>) -> Event {
        Event::Loaded(Ok(Seen {
            stored,
            ..Seen::default()
        }))
    }

    /// A fleet machine that found no token and a peer holding the refresh lease: it waits.
    fn waiting_on_a_peers_lease(seed: u64) -> Machine {
        let mut m = Machine::new(policy(true, None), seed);
        step(&mut m, Event::Tick);
        step(&mut m, loaded(None));
        step(&mut m, Event::Lease(Ok(false)));
        m
    }

    fn down() -> StoreError {
        StoreError::Unavailable("Redis call timed out".into())
    }

    fn step(m: &mut Machine, e: Event) -> Vec<Effect> {
        m.step(e, Instant::now())
    }

    fn names(fx: &[Effect]) -> Vec<String> {
        fx.iter()
            .map(|e| match e {
                Effect::Background(ops) => format!(
                    "Background({})",
                    ops.iter()
                        .map(|o| match o {
                            StoreOp::Save(_) => "Save",
                            StoreOp::RecordMint => "RecordMint",
                            StoreOp::ShareBackoff(..) => "ShareBackoff",
                            StoreOp::ReleaseLease => "ReleaseLease",
                            StoreOp::Announce => "Announce",
                            StoreOp::Evict(_) => "Evict",
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Effect::Mint(r) => format!("Mint({})", r.as_str()),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// A machine holding `t` after a clean cold start (no shared store).
    fn holding(p: Policy, t: Arc<Token>) -> Machine {
        let mut m = Machine::new(p, 7);
        assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
        step(&mut m, loaded(Some(t)));
        assert!(m.token.is_some());
        m
    }

    #[tokio::test(start_paused = true)]
    async fn cold_start_looks_in_the_store_then_mints_once_and_publishes_before_saving() {
        let mut m = Machine::new(policy(false, None), 1);
        assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
        // Requests nudging the owner while the refresh runs start nothing new.
        assert!(step(&mut m, Event::Tick).is_empty());
        assert_eq!(names(&step(&mut m, loaded(None))), ["Mint(cold)"]);
        assert!(step(&mut m, Event::Tick).is_empty());
        let fx = step(&mut m, Event::Minted(Ok(fresh("t1"))));
        // The token is in hand before any store write is even started.
        assert_eq!(m.token.as_ref().unwrap().access_token.expose(), "t1");
        assert_eq!(names(&fx), ["Background(Save,RecordMint)"]);
        assert_eq!((m.mints, m.phase), (1, Phase::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_starts_in_the_window_with_bounded_jitter_and_keeps_serving() {
        for seed in 1..50 {
            let mut m = holding(policy(false, None), fresh("t1"));
            let window_start = Instant::now() + 20 * HOUR;
            let wake = m.next_wake(Instant::now()).unwrap();
            assert!(wake >= window_start, "seed {seed}");
            assert!(
                wake <= window_start + Duration::from_secs(60),
                "seed {seed}"
            );
            tokio::time::advance(wake - Instant::now()).await;
            assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
            assert!(m.usable(Instant::now()).is_some(), "still serving");
        }
        // A five-minute token: window of 75 s, jitter at most a tenth of it.
        let mut m = holding(
            policy(false, None),
            token("t5", Duration::from_secs(300), Duration::from_secs(300)),
        );
        let wake = m.next_wake(Instant::now()).unwrap() - Instant::now();
        assert!(wake >= Duration::from_secs(225) && wake <= Duration::from_millis(232_500));
        tokio::time::advance(wake).await;
        assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
        assert_eq!(m.phase, Phase::Loading(Reason::Window));
    }

    #[tokio::test(start_paused = true)]
    async fn adoption_depends_on_the_reason() {
        // Cold: a stored token inside its window (3 h of 24 h left) is adopted, not re-minted.
        let in_window = token("shared", 3 * HOUR, DAY);
        let mut m = Machine::new(policy(true, None), 3);
        step(&mut m, Event::Tick);
        let fx = step(&mut m, loaded(Some(in_window.clone())));
        assert_eq!(m.token.as_ref().unwrap().access_token.expose(), "shared");
        // ...and its renewal is due right away, as a window renewal.
        assert_eq!(names(&fx), ["Load"]);
        assert_eq!(m.phase, Phase::Loading(Reason::Window));
        // Window: the same in-window token is not good enough; the refresh goes on to the lease.
        assert_eq!(names(&step(&mut m, loaded(Some(in_window)))), ["TryLease"]);
        // A different token still inside its window is refused too.
        let mut m2 = holding(policy(false, None), token("old", 2 * HOUR, DAY));
        step(&mut m2, Event::Tick);
        assert_eq!(m2.phase, Phase::Loading(Reason::Window));
        let fx = step(
            &mut m2,
            loaded(Some(token("newer-but-in-window", 3 * HOUR, DAY))),
        );
        assert_eq!(names(&fx), ["Mint(window)"]);
        // A token outside its window is adopted by a window renewal.
        let mut m3 = holding(policy(false, None), token("old", 2 * HOUR, DAY));
        step(&mut m3, Event::Tick);
        assert!(step(&mut m3, loaded(Some(fresh("fresh")))).is_empty());
        assert_eq!(m3.token.as_ref().unwrap().access_token.expose(), "fresh");
        // Expired: any usable token, even one in its window.
        let mut m4 = holding(
            policy(false, None),
            token("short", Duration::from_secs(100), Duration::from_secs(100)),
        );
        tokio::time::advance(Duration::from_secs(95)).await;
        step(&mut m4, Event::Tick);
        assert_eq!(m4.phase, Phase::Loading(Reason::Expired));
        step(&mut m4, loaded(Some(token("late", HOUR, DAY))));
        assert_eq!(m4.token.as_ref().unwrap().access_token.expose(), "late");
    }

    #[tokio::test(start_paused = true)]
    async fn the_fleet_mint_budget_defers_window_renewals_but_never_an_unusable_token() {
        let budget = 20 * HOUR + 15 * 60 * Duration::from_secs(1);
        let mut p = policy(true, Some(budget));
        // Keep the periodic store check out of the way of what this test watches.
        p.store_check = DAY;
        let mut m = Machine::new(p, 5);
        step(&mut m, Event::Tick);
        // A replica minted an hour ago; the token has 3 h left (inside its window).
        step(&mut m, loaded(Some(token("t", 3 * HOUR, DAY))));
        assert_eq!(m.phase, Phase::Loading(Reason::Window));
        assert_eq!(names(&step(&mut m, loaded(None))), ["ReadLedger"]);
        let fx = step(&mut m, Event::Ledger(Ok(Some(HOUR))));
        assert!(fx.is_empty(), "{:?}", names(&fx));
        // The budget opens after the token is unusable: nothing until then, no busy loop.
        let until = m.token.as_ref().unwrap().usable_until();
        assert_eq!(m.next_wake(Instant::now()), Some(until));
        tokio::time::advance(until - Instant::now()).await;
        assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
        assert_eq!(m.phase, Phase::Loading(Reason::Expired));
        assert_eq!(names(&step(&mut m, loaded(None))), ["TryLease"]);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_with_jitter_up_to_the_cap() {
        let mut m = Machine::new(policy(false, None), 11);
        step(&mut m, Event::Tick);
        step(&mut m, loaded(None));
        let mut expected = 1.0f64;
        for attempt in 0..14 {
            let err = MintError::ServerError {
                status: 503,
                message: "down".into(),
            };
            assert!(step(&mut m, Event::Minted(Err(err))).is_empty());
            let delay = (m.retry_at.unwrap() - Instant::now()).as_secs_f64();
            let nominal = expected.min(300.0);
            assert!(
                delay >= nominal * 0.8 - 0.001 && delay <= nominal * 1.2 + 0.001,
                "attempt {attempt}: {delay} vs {nominal}"
            );
            let f = m.failing().unwrap();
            assert!(f.reason.contains("503"), "{}", f.reason);
            assert_eq!(m.next_wake(Instant::now()), Some(m.retry_at.unwrap()));
            tokio::time::advance(m.retry_at.unwrap() - Instant::now()).await;
            assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
            assert_eq!(m.phase, Phase::Loading(Reason::Retry));
            step(&mut m, loaded(None));
            expected *= 2.0;
        }
        // Recovery clears the failure for requests.
        step(&mut m, Event::Minted(Ok(fresh("t"))));
        assert!(m.failing().is_none() && m.failures == 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_answer_backs_off_for_a_minute_then_longer_up_to_an_hour() {
        let mut m = Machine::new(policy(false, None), 13);
        let mut nominal = 60.0f64;
        for _ in 0..8 {
            step(&mut m, Event::Tick);
            step(&mut m, loaded(None));
            let err = MintError::RateLimited("exceeded the daily rate limit".into());
            step(&mut m, Event::Minted(Err(err)));
            let delay = (m.retry_at.unwrap() - Instant::now()).as_secs_f64();
            let n = nominal.min(3600.0);
            assert!(
                delay >= n * 0.8 - 0.001 && delay <= n * 1.2 + 0.001,
                "{delay} vs {n}"
            );
            tokio::time::advance(m.retry_at.unwrap() - Instant::now()).await;
            nominal *= 2.0;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_for_the_current_token_evicts_it_and_mints_once_and_it_is_never_readopted() {
        let mut m = holding(policy(false, None), fresh("bad"));
        let bad = m.token.clone().unwrap();
        let fx = step(&mut m, Event::Rejected(bad.ath().to_string()));
        assert_eq!(names(&fx), ["Background(Evict)", "Load"]);
        assert!(m.token.is_none());
        assert_eq!(m.phase, Phase::Loading(Reason::Rejected));
        // The eviction has not landed yet: the store still returns the rejected token.
        assert_eq!(
            names(&step(&mut m, loaded(Some(bad.clone())))),
            ["Mint(rejected)"]
        );
        step(&mut m, Event::Minted(Ok(fresh("good"))));
        // A 401 for the old token, arriving late, changes nothing.
        assert!(step(&mut m, Event::Rejected(bad.ath().to_string())).is_empty());
        assert_eq!(m.token.as_ref().unwrap().access_token.expose(), "good");
        // The fresh token rejected again within 10 s: passed on, no mint, token kept.
        let good = m.token.clone().unwrap();
        assert!(step(&mut m, Event::Rejected(good.ath().to_string())).is_empty());
        assert_eq!(m.mints, 1);
        assert!(m.token.is_some());
        // After that interval a rejection costs the token again.
        tokio::time::advance(Duration::from_secs(11)).await;
        let fx = step(&mut m, Event::Rejected(good.ath().to_string()));
        assert_eq!(names(&fx), ["Background(Evict)", "Load"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_held_elsewhere_is_waited_for_then_taken_over_once() {
        let mut m = Machine::new(policy(true, None), 17);
        step(&mut m, Event::Tick);
        assert_eq!(names(&step(&mut m, loaded(None))), ["TryLease"]);
        assert_eq!(names(&step(&mut m, Event::Lease(Ok(false)))), ["PollFleet"]);
        // Nothing yet: keep polling.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(names(&step(&mut m, loaded(None))), ["PollFleet"]);
        // The holder's token appears: adopted, no mint.
        assert!(step(&mut m, loaded(Some(fresh("theirs")))).is_empty());
        assert_eq!((m.mints, m.phase), (0, Phase::Idle));

        // Lost holder: after the lease time, one takeover.
        let mut m = waiting_on_a_peers_lease(19);
        tokio::time::advance(Duration::from_secs(23)).await;
        assert_eq!(names(&step(&mut m, loaded(None))), ["TryLease"]);
        assert_eq!(
            names(&step(&mut m, Event::Lease(Ok(true)))),
            ["HoldLease", "Mint(cold)"]
        );
        let fx = step(&mut m, Event::Minted(Ok(fresh("mine"))));
        assert_eq!(
            names(&fx),
            ["Background(Save,RecordMint,ReleaseLease,Announce)"]
        );

        // Takeover lost to another replica: a coordination failure, not a storm.
        let mut m = waiting_on_a_peers_lease(23);
        tokio::time::advance(Duration::from_secs(23)).await;
        step(&mut m, loaded(None));
        assert!(step(&mut m, Event::Lease(Ok(false))).is_empty());
        assert!(m.failing().unwrap().reason.contains("lease"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_answer_is_shared_with_the_fleet_and_a_local_failure_is_not() {
        for (err, shared) in [
            (
                MintError::ServerError {
                    status: 500,
                    message: "x".into(),
                },
                true,
            ),
            (
                MintError::Rejected {
                    status: 401,
                    message: "invalid_client".into(),
                },
                true,
            ),
            (MintError::RateLimited("limit".into()), true),
            (MintError::Timeout(Duration::from_secs(10)), false),
            (MintError::Transport("connection refused".into()), false),
        ] {
            let mut m = Machine::new(policy(true, None), 29);
            step(&mut m, Event::Tick);
            step(&mut m, loaded(None));
            step(&mut m, Event::Lease(Ok(true)));
            let fx = step(&mut m, Event::Minted(Err(err.clone())));
            let want = if shared {
                "Background(ShareBackoff,ReleaseLease,Announce)"
            } else {
                "Background(ReleaseLease,Announce)"
            };
            assert_eq!(names(&fx), [want], "{err}");
            if let [Effect::Background(ops)] = fx.as_slice() {
                if let Some(StoreOp::ShareBackoff(left, _)) = ops.first() {
                    assert_eq!(Instant::now() + *left, m.retry_at.unwrap());
                }
            }
        }
        // A waiter that sees the shared backoff stops waiting and does not mint.
        let mut m = waiting_on_a_peers_lease(31);
        let fx = step(
            &mut m,
            Event::Loaded(Ok(Seen {
                backoff: Some((Duration::from_secs(8), "token endpoint failed".into())),
                ..Seen::default()
            })),
        );
        assert!(fx.is_empty());
        assert_eq!(m.phase, Phase::Idle);
        let f = m.failing().unwrap();
        assert!(f.reason.contains("another replica"), "{}", f.reason);
        assert_eq!(f.retry_at, Instant::now() + Duration::from_secs(8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_store_is_skipped_on_the_mint_path_and_written_back_when_it_returns() {
        let mut m = Machine::new(policy(true, None), 37);
        step(&mut m, Event::Tick);
        let fx = step(&mut m, Event::Loaded(Err(down())));
        // No lease call: straight to the token endpoint.
        assert_eq!(names(&fx), ["Mint(cold)"]);
        assert!(m.cache_degraded);
        step(&mut m, Event::Minted(Ok(fresh("t"))));
        step(&mut m, Event::Bookkept(Err(down())));
        assert!(m.cache_degraded);
        // A later refresh while degraded makes no store call before minting either.
        let t = m.token.clone().unwrap();
        step(&mut m, Event::Rejected(t.ath().to_string()));
        assert_eq!(
            m.phase,
            Phase::Minting {
                reason: Reason::Rejected,
                lease: false
            }
        );
        step(&mut m, Event::Minted(Ok(fresh("t2"))));
        step(&mut m, Event::Bookkept(Err(down())));
        // The periodic check finds the store back and empty: the token is written back.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
        assert_eq!(names(&step(&mut m, loaded(None))), ["Background(Save)"]);
        assert!(!m.cache_degraded);
    }

    #[tokio::test(start_paused = true)]
    async fn a_periodic_check_in_flight_never_holds_up_a_refresh_requests_wait_for() {
        // A replica coordinating in-process while Redis is down keeps checking the store; such a
        // check can hang for the store's timeouts while Redis comes back.
        let mut m = Machine::new(policy(true, None), 43);
        step(&mut m, Event::Tick);
        step(&mut m, Event::Loaded(Err(down())));
        step(&mut m, Event::Minted(Ok(fresh("t1"))));
        step(&mut m, Event::Bookkept(Err(down())));
        let wake = m.next_wake(Instant::now()).unwrap();
        tokio::time::advance(wake - Instant::now()).await;
        assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
        assert_eq!(m.phase, Phase::Checking);
        // Tango rejects the token meanwhile: the replacement is minted at once (no store call
        // first while the store is failing), and counted as what it is.
        let t1 = m.token.clone().unwrap();
        let fx = step(&mut m, Event::Rejected(t1.ath().to_string()));
        assert_eq!(names(&fx), ["Background(Evict)", "Mint(rejected)"]);
        // The check's late answer (its future is dropped; were it not) changes nothing.
        assert!(step(&mut m, Event::Loaded(Err(down()))).is_empty());
        assert_eq!(
            m.phase,
            Phase::Minting {
                reason: Reason::Rejected,
                lease: false
            }
        );

        // Likewise a token that becomes unusable while a check is in flight. With a healthy
        // store the refresh reads it first, as any refresh does. (The mint budget keeps the
        // token from renewing in its window, so only its expiry is due.)
        let mut m = Machine::new(policy(true, Some(25 * HOUR)), 47);
        step(&mut m, Event::Tick);
        let short = token("short", Duration::from_secs(40), DAY);
        step(&mut m, loaded(Some(short)));
        assert_eq!(m.phase, Phase::Idle);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
        assert_eq!(m.phase, Phase::Checking);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(m.usable(Instant::now()).is_none());
        assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
        assert_eq!(m.phase, Phase::Loading(Reason::Expired));
    }

    #[tokio::test(start_paused = true)]
    async fn the_periodic_check_writes_nothing_while_the_store_holds_our_token() {
        let mut m = Machine::new(policy(true, None), 41);
        step(&mut m, Event::Tick);
        step(&mut m, loaded(None));
        step(&mut m, Event::Lease(Ok(true)));
        step(&mut m, Event::Minted(Ok(fresh("ours"))));
        step(&mut m, Event::Bookkept(Ok(())));
        let ours = m.token.clone().unwrap();
        for _ in 0..20 {
            let wake = m.next_wake(Instant::now()).unwrap();
            assert_eq!(wake - Instant::now(), Duration::from_secs(5));
            tokio::time::advance(wake - Instant::now()).await;
            assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
            // The same token read back (its expiry now at millisecond precision): no write.
            assert!(step(&mut m, loaded(Some(ours.clone()))).is_empty());
        }
        // A newer token a replica stored is adopted.
        tokio::time::advance(Duration::from_secs(5)).await;
        step(&mut m, Event::Tick);
        let theirs = token("theirs", DAY + HOUR, DAY + HOUR);
        assert!(step(&mut m, loaded(Some(theirs))).is_empty());
        assert_eq!(m.token.as_ref().unwrap().access_token.expose(), "theirs");
        // A store that lost the token gets ours back, once per check.
        tokio::time::advance(Duration::from_secs(5)).await;
        step(&mut m, Event::Tick);
        assert_eq!(names(&step(&mut m, loaded(None))), ["Background(Save)"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_error_postpones_a_window_renewal_instead_of_minting_without_the_fleet() {
        let budget = 20 * HOUR + 15 * 60 * Duration::from_secs(1);
        for failing in ["load", "ledger", "lease"] {
            let mut m = Machine::new(policy(true, Some(budget)), 47);
            step(&mut m, Event::Tick);
            // Adopt a token minted 21 h ago: inside its window, past the budget.
            step(&mut m, loaded(Some(token("t", 3 * HOUR, DAY))));
            assert_eq!(m.phase, Phase::Loading(Reason::Window));
            let fx = match failing {
                "load" => step(&mut m, Event::Loaded(Err(down()))),
                "ledger" => {
                    step(&mut m, loaded(None));
                    step(&mut m, Event::Ledger(Err(down())))
                }
                _ => {
                    step(&mut m, loaded(None));
                    step(&mut m, Event::Ledger(Ok(Some(21 * HOUR))));
                    step(&mut m, Event::Lease(Err(down())))
                }
            };
            assert!(fx.is_empty(), "{failing}: {:?}", names(&fx));
            assert_eq!(m.phase, Phase::Idle, "{failing}");
            assert!(m.failing().is_none(), "requests see no failure");
            // Two seconds later the renewal asks the store again, still not minting blind.
            tokio::time::advance(Duration::from_secs(2)).await;
            assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"], "{failing}");
        }
        // Without a usable token, a failing store does not stop the mint.
        let mut m = Machine::new(policy(true, None), 53);
        step(&mut m, Event::Tick);
        assert_eq!(
            names(&step(&mut m, Event::Loaded(Err(down())))),
            ["Mint(cold)"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_adopted_token_carries_the_budget_of_its_mint() {
        // A 24 h token minted 21 h ago, adopted by a replica that never read the ledger: its
        // renewal waits until 20 h 15 m after that mint.
        let budget = 20 * HOUR + 15 * 60 * Duration::from_secs(1);
        let mut m = Machine::new(policy(false, Some(budget)), 59);
        step(&mut m, Event::Tick);
        step(
            &mut m,
            loaded(Some(token(
                "t",
                3 * HOUR + 30 * 60 * Duration::from_secs(1),
                DAY,
            ))),
        );
        // 20 h 30 m since the mint: the budget is open, the window too.
        assert_eq!(m.phase, Phase::Loading(Reason::Window));
        let mut m = Machine::new(policy(false, Some(budget)), 61);
        step(&mut m, Event::Tick);
        step(
            &mut m,
            loaded(Some(token(
                "t",
                4 * HOUR - 60 * Duration::from_secs(1),
                DAY,
            ))),
        );
        // 20 h 1 m since the mint: in the window, but the budget opens 14 min later.
        assert_eq!(m.phase, Phase::Idle);
        let wake = m.next_wake(Instant::now()).unwrap() - Instant::now();
        assert_eq!(wake, 14 * 60 * Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_the_fleet_saw_rejected_is_dropped_and_never_written_back() {
        let mut m = Machine::new(policy(true, None), 67);
        step(&mut m, Event::Tick);
        step(&mut m, loaded(None));
        step(&mut m, Event::Lease(Ok(true)));
        step(&mut m, Event::Minted(Ok(fresh("x"))));
        let x = m.token.clone().unwrap();
        // A replica got a 401 for x and evicted it; our check finds the record gone and the
        // fleet's rejection marker: no write-back, and x is replaced.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
        let fx = step(
            &mut m,
            Event::Loaded(Ok(Seen {
                rejected: Some(x.ath().to_string()),
                ..Seen::default()
            })),
        );
        assert!(m.token.is_none());
        assert_eq!(names(&fx), ["Load"], "a refresh, not a Save");
        // The eviction lost a race and x is still stored: it is not adopted, and it is evicted.
        let fx = step(&mut m, loaded(Some(x.clone())));
        assert_eq!(names(&fx), ["TryLease"]);
        let mut m2 = holding(policy(true, None), fresh("y"));
        step(
            &mut m2,
            Event::Loaded(Ok(Seen {
                rejected: Some(x.ath().to_string()),
                ..Seen::default()
            })),
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(names(&step(&mut m2, Event::Tick)), ["Load"]);
        assert_eq!(
            names(&step(&mut m2, loaded(Some(x)))),
            ["Background(Evict)"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_ends_the_wait_and_a_peer_token_ends_a_local_outage() {
        let mut m = waiting_on_a_peers_lease(71);
        // The holder released its lease without a token (its own timeout): take over now, not
        // after the whole lease time.
        let fx = step(
            &mut m,
            Event::Loaded(Ok(Seen {
                lease_held: Some(false),
                ..Seen::default()
            })),
        );
        assert_eq!(names(&fx), ["TryLease"]);
        assert_eq!(
            m.phase,
            Phase::Leasing {
                reason: Reason::Cold,
                takeover: true
            }
        );
        // Our own mint times out (not shared): we back off without a token...
        step(&mut m, Event::Lease(Ok(true)));
        step(
            &mut m,
            Event::Minted(Err(MintError::Timeout(Duration::from_secs(10)))),
        );
        assert!(m.failing().is_some());
        // ...but read the store within 2 s and adopt the token a peer stored meanwhile.
        let wake = m.next_wake(Instant::now()).unwrap() - Instant::now();
        assert!(wake <= Duration::from_secs(2), "{wake:?}");
        tokio::time::advance(wake).await;
        assert_eq!(names(&step(&mut m, Event::Tick)), ["Load"]);
        step(&mut m, loaded(Some(fresh("peer"))));
        assert!(m.failing().is_none());
        assert_eq!(m.token.as_ref().unwrap().access_token.expose(), "peer");
    }

    #[tokio::test(start_paused = true)]
    async fn huge_configured_intervals_never_overflow_the_clock() {
        let huge = |shared| {
            let mut p = policy(shared, Some(Duration::MAX));
            p.fleet_wait = Duration::MAX;
            p.store_check = Duration::MAX;
            p.backoff_base = Duration::MAX;
            p.backoff_cap = Duration::MAX;
            p.refresh_window = Duration::MAX;
            p
        };
        // Mint, then a failure with an enormous backoff.
        let mut m = Machine::new(huge(false), 73);
        step(&mut m, Event::Tick);
        step(&mut m, loaded(None));
        step(&mut m, Event::Minted(Ok(fresh("t"))));
        let t = m.token.clone().unwrap();
        step(&mut m, Event::Rejected(t.ath().to_string()));
        step(&mut m, loaded(None));
        let err = MintError::ServerError {
            status: 500,
            message: "x".into(),
        };
        step(&mut m, Event::Minted(Err(err)));
        assert!(m.failing().is_some());
        assert!(m.next_wake(Instant::now()).is_some());
        // A lease wait and a ledger answer with enormous times.
        let mut m = Machine::new(huge(true), 79);
        step(&mut m, Event::Tick);
        step(&mut m, loaded(Some(token("t", 3 * HOUR, DAY))));
        step(&mut m, Event::Tick);
        step(&mut m, Event::Lease(Ok(false)));
        step(&mut m, Event::Ledger(Ok(Some(Duration::ZERO))));
        assert!(m.usable(Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_machine_serves_its_token_without_minting() {
        let t = fresh("held");
        let mut m = Machine::resume(
            policy(false, None),
            43,
            Some(t),
            Carry::default(),
            Instant::now(),
        );
        assert!(m.usable(Instant::now()).is_some());
        assert!(step(&mut m, Event::Tick).is_empty());
        assert_eq!(m.mints, 0);
    }
}
