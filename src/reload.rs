//! Reloading the configuration without a restart: on SIGHUP, and when the config file or any
//! file it names changes (Kubernetes updates a mounted ConfigMap or Secret by swapping a
//! symlink in its directory; that counts as a change).
//!
//! What a reload applies, without touching a request in flight (a request keeps the caller it
//! authenticated as and the credentials it started with):
//!
//! * **`[callers]`** (gateway mode): callers added, removed (the kill switch: a removed
//!   store's next request is refused) or changed take effect at once.
//! * **Profiles added or removed** (gateway mode): a store comes with its own Tango identity.
//!   An added profile takes a new place in the proxy's profiles before any caller can name it,
//!   and starts idle like every gateway profile; a removed one refuses from then on (no caller
//!   names it any more), leaves `/status`, and its token task ends once the requests holding it
//!   have. A profile keeps its place for the life of the process, so a gateway that adds and
//!   removes stores for months grows by one small record per store added.
//! * **Credential rotation**, profile by profile:
//!   * *Secrets only* (`client_secret`, `password` or their files changed, nothing else that
//!     makes a token different): the profile keeps its token and sends the new secrets at its
//!     next mint, whenever that falls due — `min_token_interval` still applies, so rotating a
//!     client-credentials secret never costs a token. If the token endpoint refuses them at
//!     that mint, the refusal is reported (WARN, `/status` `profiles.NAME.secret_rotation`,
//!     `tango_proxy_credential_rotations_total{result="secret_refused"}`) and the previous
//!     secrets, kept in memory since the rotation, are tried once (see
//!     [`crate::auth::oauth::TokenClient`]).
//!   * *Token identity* (token URL, grant, client id, user name, audience, scope or DPoP key —
//!     what the cache fingerprint is made of): a new profile is built under the new
//!     fingerprint and must obtain a token (from the shared cache, or minted — one mint for
//!     the whole fleet) before it replaces the old one. Until then, and if it fails, the old
//!     profile keeps serving; the outcome is logged, counted in
//!     `tango_proxy_credential_rotations_total{result}` and shown in `/status`
//!     (`config.rotations.NAME`: `testing`, `waiting_for_mint_budget`, `applied` or `refused`
//!     with the problem). A refused rotation is tried again at the next reload.
//!   * A profile that keeps its client (same token URL and client id) and has a mint budget
//!     (`min_token_interval`: by default 20 h 15 m for client credentials, as Tango allows one
//!     token per client per 20 hours) shares that budget with the token in hand: the old profile
//!     stops renewing inside its refresh window, and the new identity asks for the client's next
//!     token once the budget allows (status `waiting_for_mint_budget`, `until`), after writing
//!     the old fingerprint's mint ledger so replicas still on the old configuration do not
//!     renew as well. A token that becomes unusable or is rejected meanwhile is still replaced,
//!     and the wait starts again from that mint.
//!   * Every changed identity is tested, idle gateway profiles too (a broken one must never
//!     replace one that works, and stores call rarely); at most four at a time, so a change to
//!     hundreds of stores is a trickle of token requests.
//!   * A refused change is tried again after a minute, then at doubling intervals up to an
//!     hour, and at every reload; the old profile serves meanwhile.
//!   * A Basic profile's new platform name or key replaces the old at once (there is no token
//!     to obtain first).
//!
//! A new configuration that is invalid, or whose callers name a profile the process does not
//! run, is **refused whole**: the running configuration keeps serving, and the refusal is logged
//! at WARN, counted in `tango_proxy_config_reloads_total{result}` and shown in `/status`
//! (`config.last_refusal`) with its problems. Changes only a restart applies (listeners,
//! upstream, cache, a sidecar's profile added or removed, a profile's `refresh_window`,
//! `min_token_interval` or `token_timeout`, a switch between Basic and OAuth, a sidecar gaining
//! callers, the contents of the cache and upstream files) never hold back what a reload can
//! apply — the kill switch must work whatever else changed in the file — they are logged at
//! WARN and listed in `/status` (`config.pending_restart`) until a restart. The inbound TLS
//! files are watched by the listener itself (see [`crate::tls`]). `config.generation` grows by
//! one with every reload that took effect. Reading and checking the file runs off the async
//! threads (a 500-profile file takes about a second).
//!
//! Changes are found by polling: the config file every [`POLL`], the other files it names
//! every [`FILES_POLL`] — the file each path leads to (device and inode), its size and
//! modification time, so a symlink swap counts. A change is applied once the files have been quiet for [`SETTLE`] (an editor's or
//! the kubelet's several writes become one reload). A process whose configuration comes from
//! the environment alone has no file to read again: SIGHUP only logs that. A refused
//! configuration is read again every [`REFUSED_RETRY`] (a file it names may arrive after it,
//! as when a ConfigMap lands before the Secret); the refusal is logged and counted once per
//! distinct set of problems.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::auth::{Authorizer, Profile, ProfileSet, Target};
use crate::config::{AuthConfig, Config, OAuthConfig, ProfileConfig, UpstreamConfig};
use crate::gateway::spend::SpendLedger;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::token::store::TokenStore;
use crate::token::Tuning;

/// How often the config file is looked at.
pub const POLL: Duration = Duration::from_millis(250);
/// How often the other files the configuration names (secrets, keys, CA files) are looked at.
pub const FILES_POLL: Duration = Duration::from_secs(1);
/// How long changed files must stay unchanged before they are read.
pub const SETTLE: Duration = Duration::from_millis(100);

/// What `/status` shows of reloads.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadStatus {
    /// Reloads that took effect (0 = the configuration the process started with).
    pub generation: u64,
    /// When the last reload took effect (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<String>,
    /// The last refused reload, since the last one that took effect: when and why (problems
    /// by key, never a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refusal: Option<Refusal>,
    /// What the file changes that only a restart applies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending_restart: Vec<String>,
    /// Each rotated profile's last (or current) change of token identity.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rotations: BTreeMap<String, RotationStatus>,
}

/// A refused reload.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    /// When (RFC 3339).
    pub at: String,
    /// What was wrong.
    pub problems: Vec<String>,
}

/// Where a profile's change of token identity stands.
#[derive(Debug, Clone, Serialize)]
pub struct RotationStatus {
    /// `testing` (obtaining a token under the new identity), `waiting_for_mint_budget`,
    /// `applied` or `refused`.
    pub state: &'static str,
    /// Since when (RFC 3339).
    pub since: String,
    /// Until when it waits for the mint budget (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Why it was refused (no secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Which test this is (a superseded one's task may still report).
    #[serde(skip)]
    id: u64,
}

/// The gateway as requests see it, swapped whole by reloads.
pub type GatewayCell = watch::Receiver<Option<Arc<Gateway>>>;

/// What a profile built by a reload is made with: the running process's upstream, token
/// cache, metrics and tuning (a reload does not change those).
#[derive(Debug, Clone)]
pub struct Builder {
    /// The running upstream settings.
    pub upstream: UpstreamConfig,
    /// The running token cache.
    pub store: Arc<dyn TokenStore>,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// The running tuning (`lazy` for a gateway).
    pub tuning: Tuning,
}

/// The running state a reloader changes.
#[derive(Debug)]
pub struct Targets {
    /// The gateway requests read (`None` in a sidecar, and it stays so).
    pub gateway: watch::Sender<Option<Arc<Gateway>>>,
    /// The spend ledger new gateways use.
    pub ledger: Arc<dyn SpendLedger>,
    /// The running profiles.
    pub profiles: Arc<ProfileSet>,
    /// How new profiles are built.
    pub builder: Builder,
    /// What `/status` shows.
    pub status: Arc<Mutex<ReloadStatus>>,
}

/// A change of token identity being tested; aborted when dropped (a later reload changed
/// the profile again).
#[derive(Debug)]
struct InFlight {
    id: u64,
    target: ProfileConfig,
    /// A later reload's version of the profile with the same token identity (new secrets or
    /// settings): applied over the target once it is in, rather than restarting a test that
    /// may already have its token.
    latest: Option<ProfileConfig>,
    /// The wait before this test, when it tries a refused change again (the next wait doubles).
    retried_after: Option<Duration>,
    task: JoinHandle<()>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A refused change of token identity, tried again later.
#[derive(Debug)]
struct Retry {
    target: ProfileConfig,
    at: tokio::time::Instant,
    delay: Duration,
}

/// The first wait before a refused change of token identity is tried again; it doubles up to
/// [`ROTATION_RETRY_CAP`].
pub const ROTATION_RETRY: Duration = Duration::from_secs(60);
/// The longest wait between tries of a refused change of token identity.
pub const ROTATION_RETRY_CAP: Duration = Duration::from_secs(3600);
/// How often a refused configuration is read again (a file it needs may arrive later, as when
/// a ConfigMap lands before the Secret it names).
pub const REFUSED_RETRY: Duration = Duration::from_secs(5);
/// Changes of token identity tested at once (a change to hundreds of store profiles is a
/// trickle of token requests, not a burst).
const ROTATIONS_AT_ONCE: usize = 4;

/// A rotation task's result.
struct Done {
    name: String,
    id: u64,
    outcome: Result<Arc<dyn Authorizer>, String>,
}

/// Applies reloads: holds the running configuration and the handles requests read from.
#[derive(Debug)]
pub struct Reloader {
    path: Option<PathBuf>,
    running: Config,
    targets: Targets,
    rotations: HashMap<String, InFlight>,
    retries: HashMap<String, Retry>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    next_id: u64,
    testing: Arc<tokio::sync::Semaphore>,
    /// The problems of the last refused reload, while no reload has taken effect since, and
    /// when it was.
    refused: Option<(Vec<String>, tokio::time::Instant)>,
    /// Registered when the reloader is made, before the process says it is listening: a
    /// SIGHUP from then on reloads instead of ending the process (its default action).
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
    /// The files' stamps when the reloader was made (before the process says it is
    /// listening): a change from then on is seen by comparison, whatever the file's clock.
    started: Stamps,
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Done").field("name", &self.name).finish()
    }
}

/// How a profile differs between the running and the new configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Same,
    /// Only secrets changed.
    Secrets,
    /// What makes a token different changed (or a Basic credential).
    Identity,
    /// Something only a restart applies; `true` when the secrets changed as well.
    Restart(String, bool),
}

/// What a new configuration brings, prepared off the async threads.
struct Plan {
    new: Config,
    gateway: Option<Gateway>,
    pending: Vec<String>,
    changes: Vec<(String, Change)>,
    /// Profiles the gateway adds, in the order they take their places.
    added: Vec<String>,
    /// Profiles the gateway removes.
    removed: Vec<String>,
}

impl Reloader {
    /// A reloader for the configuration at `path` (`None`: the configuration came from the
    /// environment alone), running as `running`. Needs a Tokio runtime (it registers the
    /// SIGHUP handler at once).
    pub fn new(path: Option<PathBuf>, running: Config, targets: Targets) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        // A few stats, once, while the process starts.
        let started = match &path {
            Some(p) => stamps_of(p, named_files(&running)),
            None => Stamps::default(),
        };
        Self {
            started,
            path,
            running,
            targets,
            rotations: HashMap::new(),
            retries: HashMap::new(),
            done_tx,
            done_rx,
            next_id: 0,
            testing: Arc::new(tokio::sync::Semaphore::new(ROTATIONS_AT_ONCE)),
            refused: None,
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, ReloadStatus> {
        lock(&self.targets.status)
    }

    /// Reads the file again and applies what it may; returns whether it took effect.
    pub async fn reload(&mut self, why: &str) -> bool {
        let Some(path) = self.path.clone() else {
            tracing::warn!(
                "{why}: the configuration came from the environment alone; there is no file \
                 to read again (restart to apply a change)"
            );
            return false;
        };
        let (running, places, ledger, metrics) = (
            self.running.clone(),
            self.targets.profiles.names(),
            self.targets.ledger.clone(),
            self.targets.builder.metrics.clone(),
        );
        let outcome =
            tokio::task::spawn_blocking(move || prepare(&path, running, places, ledger, &metrics))
                .await
                .unwrap_or_else(|e| Err(vec![format!("the reload failed: {e}")]));
        let now = rfc3339(SystemTime::now());
        let plan = match outcome {
            Ok(plan) => plan,
            Err(problems) => {
                let again = self.refused.as_ref().is_some_and(|(p, _)| *p == problems);
                self.refused = Some((problems.clone(), tokio::time::Instant::now()));
                if again {
                    // Read again on its own (see `REFUSED_RETRY`): said once, not every time.
                    tracing::debug!("the configuration is still refused ({why})");
                    return false;
                }
                self.targets.builder.metrics.config_reload("refused");
                tracing::warn!(
                    problems = %problems.join("; "),
                    "configuration reload refused ({why}); the running configuration keeps serving"
                );
                self.status().last_refusal = Some(Refusal { at: now, problems });
                return false;
            }
        };
        self.refused = None;
        let Plan {
            new,
            gateway,
            pending,
            changes,
            added: profiles_added,
            removed: profiles_removed,
        } = plan;
        // Profiles added take their places before a caller can name them.
        let built: Result<Vec<Profile>, String> = profiles_added
            .iter()
            .filter_map(|name| new.profiles.get(name))
            .map(|p| {
                Profile::from_config(
                    p,
                    &self.targets.builder.upstream,
                    self.targets.builder.store.clone(),
                    self.targets.builder.metrics.clone(),
                    self.targets.builder.tuning.clone(),
                )
                .map_err(|e| format!("profiles.{}: {e}", p.name))
            })
            .collect();
        let built = match built {
            Ok(b) => b,
            Err(problem) => {
                self.targets.builder.metrics.config_reload("refused");
                tracing::warn!(problems = %problem, "configuration reload refused ({why}); the running configuration keeps serving");
                self.status().last_refusal = Some(Refusal {
                    at: now,
                    problems: vec![problem],
                });
                return false;
            }
        };
        for profile in built {
            let name = profile.name.clone();
            self.targets.profiles.push(profile);
            if let Some(config) = new.profiles.get(&name) {
                self.running.profiles.insert(name, config.clone());
            }
        }
        let before: Vec<&String> = self.running.callers.keys().collect();
        let added = new.callers.keys().filter(|c| !before.contains(c)).count();
        let removed = before
            .iter()
            .filter(|c| !new.callers.contains_key(**c))
            .count();
        if let Some(gateway) = gateway {
            let gateway = match self.targets.gateway.borrow().as_ref() {
                Some(previous) => gateway.keeping_throttle_of(previous),
                None => gateway,
            };
            self.targets.gateway.send_replace(Some(Arc::new(gateway)));
        }
        for (name, change) in changes {
            if let Some(profile) = new.profiles.get(&name) {
                self.apply_profile(&name, change, profile, &now);
            }
        }
        // Profiles removed: refused from now on (no caller names them), their token tasks end.
        for name in &profiles_removed {
            self.drop_rotation(name);
            if let Some(i) = self.targets.profiles.index(name) {
                self.targets.profiles.retire(i);
            }
            self.targets.builder.metrics.set_profile_ready(name, None);
            self.running.profiles.remove(name);
        }
        // A profile the file no longer has is not changed by it: a rotation of it is no
        // longer wanted.
        let gone: Vec<String> = self
            .rotations
            .keys()
            .chain(self.retries.keys())
            .filter(|n| !new.profiles.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.drop_rotation(&name);
        }
        if !pending.is_empty() {
            tracing::warn!(
                pending = %pending.join("; "),
                "the reloaded configuration also changes what only a restart applies"
            );
        }
        let generation = {
            let mut s = self.status();
            s.generation += 1;
            s.last_reload = Some(now);
            s.last_refusal = None;
            s.pending_restart = pending;
            s.generation
        };
        self.targets.builder.metrics.config_reload("applied");
        tracing::info!(
            generation,
            callers = new.callers.len(),
            added,
            removed,
            profiles_added = profiles_added.len(),
            profiles_removed = profiles_removed.len(),
            "configuration reloaded ({why})"
        );
        if self.running.is_gateway() {
            self.running.callers = new.callers;
        }
        true
    }

    /// Applies one profile's change (see the module documentation).
    fn apply_profile(&mut self, name: &str, change: Change, new: &ProfileConfig, now: &str) {
        let Some(i) = self.targets.profiles.index(name) else {
            return;
        };
        match change {
            // Back to what runs, or a change only a restart applies: a rotation still being
            // tested or waiting to be tried again is no longer wanted.
            Change::Same | Change::Restart(_, false) => self.drop_rotation(name),
            Change::Secrets | Change::Restart(_, true) => {
                self.drop_rotation(name);
                self.load_secrets(name, i, new);
            }
            Change::Identity => {
                // The running profile mints with the secrets on disk too until it is replaced
                // (a client secret is the client's, whichever of its users is in use).
                let running_secrets = self.running.profiles.get(name).map(|p| secrets(&p.auth));
                if running_secrets.is_some_and(|s| s != secrets(&new.auth)) {
                    self.load_secrets(name, i, new);
                }
                if let Some(flight) = self.rotations.get_mut(name) {
                    if same_profile(&flight.target, new) {
                        flight.latest = None;
                        return;
                    }
                    if identity(&flight.target.auth) == identity(&new.auth) {
                        flight.latest = Some(new.clone());
                        return;
                    }
                }
                self.start_rotation(name, i, new.clone(), now, None);
            }
        }
    }

    /// Gives profile `i` (`name`) the secrets of `new` for its next mint, keeping its token.
    fn load_secrets(&mut self, name: &str, i: usize, new: &ProfileConfig) {
        if self
            .targets
            .profiles
            .authorizer(i)
            .rotate_secrets(&new.auth)
        {
            self.targets
                .builder
                .metrics
                .credential_rotation("secrets_loaded");
            if let Some(running) = self.running.profiles.get_mut(name) {
                take_secrets(&mut running.auth, &new.auth);
            }
        }
    }

    /// Forgets a rotation of `name` in flight or waiting to be tried again.
    fn drop_rotation(&mut self, name: &str) {
        let had = self.rotations.remove(name).is_some() | self.retries.remove(name).is_some();
        if had {
            self.status().rotations.remove(name);
        }
    }

    /// Starts testing `new` as profile `i`'s replacement (replacing a test in flight);
    /// `retried_after`: the wait before it, when it tries a refused change again.
    fn start_rotation(
        &mut self,
        name: &str,
        i: usize,
        new: ProfileConfig,
        now: &str,
        retried_after: Option<Duration>,
    ) {
        self.retries.remove(name);
        self.next_id += 1;
        let id = self.next_id;
        let job = Job {
            name: name.to_string(),
            id,
            new: new.clone(),
            old: self.targets.profiles.authorizer(i),
            old_config: self.running.profiles.get(name).cloned(),
            builder: self.targets.builder.clone(),
            status: self.targets.status.clone(),
            testing: self.testing.clone(),
        };
        lock(&self.targets.status).rotations.insert(
            name.to_string(),
            RotationStatus {
                state: "testing",
                since: now.to_string(),
                until: None,
                problem: None,
                id,
            },
        );
        tracing::info!(profile = %name, "new token identity: obtaining a token with it before it replaces the running one");
        let done = self.done_tx.clone();
        let task_name = name.to_string();
        let task = tokio::spawn(async move {
            // In a task of its own, so a panic is a refusal rather than a test that never ends;
            // aborted with this one.
            let mut inner = AbortOnDrop(tokio::spawn(rotate(job)));
            let outcome = match (&mut inner.0).await {
                Ok(outcome) => outcome,
                Err(e) => Err(format!("the rotation failed: {e}")),
            };
            let _ = done.send(Done {
                name: task_name,
                id,
                outcome,
            });
        });
        self.rotations.insert(
            name.to_string(),
            InFlight {
                id,
                target: new,
                latest: None,
                retried_after,
                task,
            },
        );
    }

    /// A rotation task ended: swaps the profile in, or reports why not.
    fn finish_rotation(&mut self, done: Done) {
        // A superseded test's result is dropped with it.
        if self.rotations.get(&done.name).map(|f| f.id) != Some(done.id) {
            return;
        }
        let Some(mut flight) = self.rotations.remove(&done.name) else {
            return;
        };
        let (target, latest) = (flight.target.clone(), flight.latest.take());
        let now = rfc3339(SystemTime::now());
        let metrics = self.targets.builder.metrics.clone();
        let entry = match done.outcome {
            Ok(authorizer) => {
                let Some(i) = self.targets.profiles.index(&done.name) else {
                    return;
                };
                self.targets.profiles.replace(i, authorizer);
                self.running
                    .profiles
                    .insert(done.name.clone(), target.clone());
                metrics.credential_rotation("applied");
                tracing::info!(profile = %done.name, "new token identity in use; the old one is retired once its requests end");
                self.status().rotations.insert(
                    done.name.clone(),
                    RotationStatus {
                        state: "applied",
                        since: now.clone(),
                        until: None,
                        problem: None,
                        id: done.id,
                    },
                );
                // A later version of the same identity (new secrets, settings) goes on top.
                if let Some(latest) = latest {
                    let change = classify(&target, &latest);
                    if let Change::Restart(what, _) = &change {
                        self.status()
                            .pending_restart
                            .push(needs_restart(&format!("profiles.{}.{what}", done.name)));
                    }
                    self.apply_profile(&done.name, change, &latest, &now);
                }
                return;
            }
            Err(problem) => {
                metrics.credential_rotation("refused");
                let delay = flight
                    .retried_after
                    .map_or(ROTATION_RETRY, |d| (d * 2).min(ROTATION_RETRY_CAP));
                let retry_at = SystemTime::now() + delay;
                tracing::warn!(profile = %done.name, problem = %problem, "the new token identity could not obtain a token; the running one keeps serving (tried again in {})", humantime::format_duration(delay));
                self.retries.insert(
                    done.name.clone(),
                    Retry {
                        target: latest.unwrap_or(target),
                        at: tokio::time::Instant::now() + delay,
                        delay,
                    },
                );
                RotationStatus {
                    state: "refused",
                    since: now,
                    until: Some(rfc3339(retry_at)),
                    problem: Some(problem),
                    id: done.id,
                }
            }
        };
        self.status().rotations.insert(done.name, entry);
    }

    /// Starts the refused rotations whose time to be tried again has come.
    fn retry_due(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<String> = self
            .retries
            .iter()
            .filter(|(_, r)| r.at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let Some(retry) = self.retries.remove(&name) else {
                continue;
            };
            let Some(i) = self.targets.profiles.index(&name) else {
                continue;
            };
            let stamp = rfc3339(SystemTime::now());
            self.start_rotation(&name, i, retry.target, &stamp, Some(retry.delay));
        }
    }

    /// Runs until `stop` resolves: reloads on SIGHUP and when the files change.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let mut seen = std::mem::take(&mut self.started);
        // A file written while the process was starting (after its configuration was read,
        // before the stamps above were taken) is read now rather than at its next change.
        let loaded = self.running.loaded_at;
        let newer = |s: &Stamp| matches!((s, loaded), (Some((_, _, Some(m))), Some(l)) if *m > l);
        if newer(&seen.config) || seen.files.iter().any(|(_, s)| newer(s)) {
            self.reload("a file changed while the proxy was starting")
                .await;
        }
        #[cfg(unix)]
        let mut hangup = self.hangup.take();
        tokio::pin!(stop);
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let every = (FILES_POLL.as_millis() / POLL.as_millis()).max(1) as u64;
        let mut ticks: u64 = 0;
        loop {
            #[cfg(unix)]
            let signal = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signal = std::future::pending::<Option<()>>();
            tokio::select! {
                () = &mut stop => return,
                Some(()) = signal => {
                    seen = self.stamps(true).await;
                    self.reload("SIGHUP").await;
                }
                Some(done) = self.done_rx.recv() => self.finish_rotation(done),
                _ = poll.tick() => {
                    ticks += 1;
                    self.retry_due();
                    if self
                        .refused
                        .as_ref()
                        .is_some_and(|(_, at)| at.elapsed() >= REFUSED_RETRY)
                    {
                        seen = self.stamps(true).await;
                        self.reload("reading a refused configuration again").await;
                        continue;
                    }
                    let all = ticks.is_multiple_of(every);
                    let now = self.stamps(all).await;
                    let config_changed = now.config != seen.config;
                    if config_changed || (all && now.files != seen.files) {
                        // Let a burst of writes finish, then read what is there.
                        tokio::time::sleep(SETTLE).await;
                        let why = if config_changed {
                            "the config file changed"
                        } else {
                            "a file the configuration names changed"
                        };
                        // Taken before reading, so a write during the reload is seen next time.
                        seen = self.stamps(true).await;
                        self.reload(why).await;
                        // The files named may be others now: new ones are stamped as they are.
                        let after = self.stamps(true).await;
                        seen.files = after
                            .files
                            .into_iter()
                            .map(|(f, now)| {
                                let before = seen.files.iter().position(|(g, _)| *g == f);
                                match before {
                                    Some(k) => {
                                        let was = std::mem::take(&mut seen.files[k].1);
                                        (f, was)
                                    }
                                    None => (f, now),
                                }
                            })
                            .collect();
                    }
                }
            }
        }
    }

    /// The stamps of the config file and (with `all`) of every file it names.
    async fn stamps(&self, all: bool) -> Stamps {
        let Some(path) = self.path.clone() else {
            return Stamps::default();
        };
        if !all {
            // One stat: cheap enough to make on the async thread, four times a second.
            return Stamps {
                config: stamp(&path),
                files: Vec::new(),
            };
        }
        let files = named_files(&self.running);
        tokio::task::spawn_blocking(move || stamps_of(&path, files))
            .await
            .unwrap_or_default()
    }
}

/// The stamps of the config file at `path` and of `files`.
fn stamps_of(path: &Path, files: Vec<PathBuf>) -> Stamps {
    Stamps {
        config: stamp(path),
        files: files
            .into_iter()
            .map(|f| {
                let s = stamp(&f);
                (f, s)
            })
            .collect(),
    }
}

/// What identifies a file's current content without reading it: the file the path leads to
/// (device and inode; a symlink swap leads elsewhere), its size and modification time.
type Stamp = Option<(FileId, u64, Option<SystemTime>)>;

#[cfg(unix)]
type FileId = (u64, u64);
#[cfg(not(unix))]
type FileId = PathBuf;

/// The stamps of the config file and of the files it names.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stamps {
    config: Stamp,
    files: Vec<(PathBuf, Stamp)>,
}

fn stamp(path: &Path) -> Stamp {
    // `metadata` follows symlinks: one stat, whatever the chain.
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let id = {
        use std::os::unix::fs::MetadataExt;
        (meta.dev(), meta.ino())
    };
    #[cfg(not(unix))]
    let id = std::fs::canonicalize(path).ok()?;
    Some((id, meta.len(), meta.modified().ok()))
}

/// Every file the configuration names whose change a reload applies or reports, except the
/// inbound TLS files (the listener watches those itself).
fn named_files(c: &Config) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    for p in c.profiles.values() {
        match &p.auth {
            AuthConfig::Basic { api_key_file, .. } => files.extend(api_key_file.clone()),
            AuthConfig::ClientCredentials(o) | AuthConfig::ServiceAccount(o) => {
                files.extend(o.client_secret_file.clone());
                files.extend(o.password_file.clone());
                files.extend(o.dpop.as_ref().map(|d| d.key_file.clone()));
            }
        }
    }
    files.extend(restart_files(c));
    files.sort();
    files.dedup();
    files
}

/// The files whose new contents only a restart applies.
fn restart_files(c: &Config) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    files.extend(c.upstream.ca_file.clone());
    files.extend(c.cache.encryption_key_file.clone());
    files.extend(c.cache.previous_encryption_key_files.iter().cloned());
    files.extend(c.cache.redis_password_file.clone());
    files.extend(c.cache.redis_ca_file.clone());
    files
}

/// Loads and checks the file; builds the gateway of its callers over the running profiles
/// (`places`: their names by place, `None` for a retired one) and those it adds, and sorts out
/// how each profile changes.
fn prepare(
    path: &Path,
    running: Config,
    places: Vec<Option<String>>,
    ledger: Arc<dyn SpendLedger>,
    metrics: &Metrics,
) -> Result<Plan, Vec<String>> {
    let new = Config::load(Some(path)).map_err(|e| {
        e.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    })?;
    let gateway_mode = running.is_gateway();
    // A gateway adds and removes profiles (stores come and go); a sidecar's one profile only
    // changes by restart.
    let (added, removed): (Vec<String>, Vec<String>) = if gateway_mode {
        (
            new.profiles
                .keys()
                .filter(|n| !running.profiles.contains_key(*n))
                .cloned()
                .collect(),
            running
                .profiles
                .keys()
                .filter(|n| !new.profiles.contains_key(*n))
                .cloned()
                .collect(),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let mut pending: Vec<String> = fixed_changes(&running, &new, gateway_mode)
        .into_iter()
        .map(|what| needs_restart(&what))
        .collect();
    let mut changes = Vec::new();
    for (name, old) in &running.profiles {
        let Some(now) = new.profiles.get(name) else {
            continue;
        };
        let change = classify(old, now);
        if let Change::Restart(what, _) = &change {
            pending.push(needs_restart(&format!("profiles.{name}.{what}")));
        }
        changes.push((name.clone(), change));
    }
    let gateway = if gateway_mode {
        // The new callers over the running listener settings; a profile's place is its
        // running one, or after them in the order the added ones are pushed.
        let place = |name: &str| {
            places
                .iter()
                .position(|p| p.as_deref() == Some(name))
                .or_else(|| {
                    added
                        .iter()
                        .position(|a| a == name)
                        .map(|k| places.len() + k)
                })
        };
        let mut merged = running;
        merged.callers = new.callers.clone();
        match Gateway::new(&merged, ledger, metrics, &place) {
            Ok(Some(g)) => Some(g),
            Ok(None) => {
                return Err(vec![
                    "callers: none left; a gateway cannot become a sidecar by reload".into(),
                ])
            }
            Err(e) => return Err(vec![e]),
        }
    } else {
        if new.is_gateway() {
            pending.push("callers: added; a sidecar becomes a gateway only by a restart".into());
        }
        None
    };
    Ok(Plan {
        new,
        gateway,
        pending,
        changes,
        added,
        removed,
    })
}

/// How `/status` lists a change only a restart applies.
fn needs_restart(what: &str) -> String {
    format!("{what}: changed; a restart applies it")
}

/// The sections a reload does not apply, named, where `new` differs from `running` (`gateway`:
/// profiles may be added and removed).
fn fixed_changes(running: &Config, new: &Config, gateway: bool) -> Vec<String> {
    let mut out = Vec::new();
    // The inbound TLS files are the listener's to reload: only the rest of `listen` counts.
    let listen = |c: &Config| {
        let mut l = c.listen.clone();
        l.tls = None;
        l
    };
    if differ(&listen(running), &listen(new)) {
        out.push("listen".to_string());
    }
    if differ(&running.upstream, &new.upstream) {
        out.push("upstream".to_string());
    }
    if differ(&running.cache, &new.cache) {
        out.push("cache".to_string());
    }
    let digests = |c: &Config| {
        restart_files(c)
            .into_iter()
            .map(|f| {
                let digest =
                    crate::config::read_small_file(&f, crate::config::MAX_SECRET_FILE, "file")
                        .ok()
                        .map(|bytes| crate::gateway::sha256(&bytes));
                (f, digest)
            })
            .collect::<Vec<_>>()
    };
    let now = digests(new);
    for (file, was) in digests(running) {
        let is = now.iter().find(|(f, _)| *f == file).map(|(_, d)| *d);
        if is != Some(was) {
            out.push(format!("the contents of {}", file.display()));
        }
    }
    if running.cache.sealer.key_id() != new.cache.sealer.key_id() {
        out.push("cache.encryption_key_file".into());
    }
    let names = |c: &Config| c.profiles.keys().cloned().collect::<Vec<_>>();
    if !gateway && names(running) != names(new) {
        out.push("profiles (added or removed)".into());
    }
    out
}

/// Whether two values render differently (one that cannot be rendered counts as changed:
/// never a silent "same").
fn differ<T: serde::Serialize>(a: &T, b: &T) -> bool {
    match (toml::to_string(a), toml::to_string(b)) {
        (Ok(x), Ok(y)) => x != y,
        _ => true,
    }
}

/// The same profile, secrets included.
fn same_profile(a: &ProfileConfig, b: &ProfileConfig) -> bool {
    !differ(a, b) && secrets(&a.auth) == secrets(&b.auth) && identity(&a.auth) == identity(&b.auth)
}

/// How `new` differs from the running `old` (see the module documentation).
fn classify(old: &ProfileConfig, new: &ProfileConfig) -> Change {
    let secrets_changed = secrets(&old.auth) != secrets(&new.auth);
    match (&old.auth, &new.auth) {
        (AuthConfig::Basic { .. }, AuthConfig::Basic { .. }) => {
            if identity(&old.auth) == identity(&new.auth) && !secrets_changed {
                Change::Same
            } else {
                Change::Identity
            }
        }
        (
            AuthConfig::ClientCredentials(a) | AuthConfig::ServiceAccount(a),
            AuthConfig::ClientCredentials(b) | AuthConfig::ServiceAccount(b),
        ) => {
            if identity(&old.auth) != identity(&new.auth) {
                return Change::Identity;
            }
            let mut settings = Vec::new();
            if a.refresh_window != b.refresh_window {
                settings.push("refresh_window");
            }
            if a.min_token_interval != b.min_token_interval {
                settings.push("min_token_interval");
            }
            if a.token_timeout != b.token_timeout {
                settings.push("token_timeout");
            }
            match (settings.is_empty(), secrets_changed) {
                (true, false) => Change::Same,
                (true, true) => Change::Secrets,
                (false, s) => Change::Restart(settings.join(", "), s),
            }
        }
        _ => Change::Restart("auth".into(), secrets_changed),
    }
}

/// What makes a profile's token (or Basic credential's user) different: the cache
/// fingerprint's material, in clear (none of it is secret).
fn identity(auth: &AuthConfig) -> Vec<String> {
    match auth {
        AuthConfig::Basic { platform_name, .. } => vec!["basic".into(), platform_name.clone()],
        AuthConfig::ClientCredentials(o) | AuthConfig::ServiceAccount(o) => vec![
            auth.method().as_str().into(),
            o.token_url.clone(),
            o.client_id.clone(),
            o.username.clone().unwrap_or_default(),
            o.audience.clone(),
            o.scope.clone(),
            o.dpop
                .as_ref()
                .map(|d| d.thumbprint.clone())
                .unwrap_or_default(),
        ],
    }
}

/// A profile's credentials, compared by digest (a changed secret file is a change).
fn secrets(auth: &AuthConfig) -> Vec<[u8; 32]> {
    let digest = |s: &str| crate::gateway::sha256(s.as_bytes());
    match auth {
        AuthConfig::Basic { api_key, .. } => vec![digest(api_key.expose())],
        AuthConfig::ClientCredentials(o) | AuthConfig::ServiceAccount(o) => {
            let mut v = vec![digest(o.client_secret.expose())];
            if let Some(p) = &o.password {
                v.push(digest(p.expose()));
            }
            v
        }
    }
}

/// `running` with the secrets (and the files they came from) of `new`, the same profile.
fn take_secrets(running: &mut AuthConfig, new: &AuthConfig) {
    if let (
        AuthConfig::ClientCredentials(r) | AuthConfig::ServiceAccount(r),
        AuthConfig::ClientCredentials(n) | AuthConfig::ServiceAccount(n),
    ) = (running, new)
    {
        r.client_secret = n.client_secret.clone();
        r.client_secret_file = n.client_secret_file.clone();
        r.password = n.password.clone();
        r.password_file = n.password_file.clone();
    }
}

/// What a rotation task needs.
struct Job {
    name: String,
    id: u64,
    new: ProfileConfig,
    old: Arc<dyn Authorizer>,
    old_config: Option<ProfileConfig>,
    builder: Builder,
    status: Arc<Mutex<ReloadStatus>>,
    testing: Arc<tokio::sync::Semaphore>,
}

impl Job {
    /// Updates this test's `/status` entry (not a later test's).
    fn show(&self, state: &'static str, until: Option<SystemTime>) {
        if let Some(s) = lock(&self.status)
            .rotations
            .get_mut(&self.name)
            .filter(|s| s.id == self.id)
        {
            s.state = state;
            s.until = until.map(rfc3339);
        }
    }
}

/// Resumes the old profile's renewals when a rotation that held them ends without replacing
/// it (refused, superseded or aborted).
struct Held(Option<Arc<dyn Authorizer>>);

impl Held {
    /// The rotation replaced the old profile: it stays held (a retired profile that requests
    /// still hold must not renew into the new one's budget).
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            old.hold_renewals(false);
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tests `job.new` as the replacement of `job.old` (see the module documentation): the
/// replacement's authorizer once it can authorize a request, or why it cannot.
async fn rotate(job: Job) -> Result<Arc<dyn Authorizer>, String> {
    let build = |lazy: bool| {
        let tuning = Tuning {
            lazy,
            ..job.builder.tuning.clone()
        };
        Profile::from_config(
            &job.new,
            &job.builder.upstream,
            job.builder.store.clone(),
            job.builder.metrics.clone(),
            tuning,
        )
        .map(|p| p.authorizer)
        .map_err(|e| e.to_string())
    };
    if matches!(job.new.auth, AuthConfig::Basic { .. }) {
        return build(job.builder.tuning.lazy);
    }
    // Same client, same mint budget: the old profile stops renewing in its window and this
    // rotation makes the client's next mint, once the budget allows it.
    let shared = shared_budget(&job.new, job.old_config.as_ref());
    let held = match shared {
        Some(_) => {
            job.old.hold_renewals(true);
            Held(Some(job.old.clone()))
        }
        None => Held(None),
    };
    if let Some((interval, old_key)) = &shared {
        loop {
            let Some(open) = budget_opens(*interval, old_key, &*job.old, &job.builder).await else {
                break;
            };
            let Ok(wait) = open.duration_since(SystemTime::now()) else {
                break;
            };
            job.show("waiting_for_mint_budget", Some(open));
            tracing::info!(
                profile = %job.name,
                until = %rfc3339(open),
                "the new token identity keeps the client: it asks for a token once the client's mint budget allows"
            );
            tokio::time::sleep(wait).await;
            // The old profile may have minted meanwhile (its token expired or was refused).
        }
    }
    let _permit = job
        .testing
        .acquire()
        .await
        .map_err(|_| "the proxy is stopping".to_string())?;
    job.show("testing", None);
    if let Some((_, old_key)) = &shared {
        // Replicas still on the old configuration read this before they renew.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            job.builder.store.record_mint(old_key),
        )
        .await;
    }
    let authorizer = build(false)?;
    let uri: http::Uri = job
        .builder
        .upstream
        .url
        .to_string()
        .parse()
        .map_err(|e| format!("{e}"))?;
    authorizer
        .authorize(Target {
            method: &http::Method::GET,
            uri: &uri,
        })
        .resolve()
        .await
        .map_err(|e| e.to_string())?;
    held.keep();
    Ok(authorizer)
}

/// For an OAuth profile that keeps its client (token URL and client id) and has a mint budget
/// (`min_token_interval`, by default 20 h 15 m for client credentials): the budget and the
/// old profile's cache key.
fn shared_budget(new: &ProfileConfig, old: Option<&ProfileConfig>) -> Option<(Duration, String)> {
    let oauth = |auth: &AuthConfig| match auth {
        AuthConfig::ClientCredentials(o) | AuthConfig::ServiceAccount(o) => Some(o.clone()),
        AuthConfig::Basic { .. } => None,
    };
    let n = oauth(&new.auth)?;
    let old = old?;
    let o = oauth(&old.auth)?;
    if n.token_url != o.token_url || n.client_id != o.client_id {
        return None;
    }
    let interval = n.min_token_interval.max(o.min_token_interval)?;
    Some((interval, ledger_key(&old.auth, &o)))
}

/// When the client's budget allows its next token: `interval` after the last mint by any
/// replica (the token in hand's, or the shared ledger's).
async fn budget_opens(
    interval: Duration,
    old_key: &str,
    old: &dyn Authorizer,
    builder: &Builder,
) -> Option<SystemTime> {
    let mut last = old.minted_at();
    if let Ok(Ok(Some(ago))) =
        tokio::time::timeout(Duration::from_secs(2), builder.store.last_mint(old_key)).await
    {
        last = last.max(SystemTime::now().checked_sub(ago));
    }
    last?.checked_add(interval)
}

/// The cache key (fingerprint) of an OAuth profile.
fn ledger_key(auth: &AuthConfig, o: &OAuthConfig) -> String {
    let grant = match auth {
        AuthConfig::ServiceAccount(_) => "password",
        _ => "client_credentials",
    };
    crate::token::fingerprint(o, grant, o.dpop.as_ref().map(|d| d.thumbprint.as_str()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(body: &str) -> ProfileConfig {
        let toml = format!(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\nallow_http = true\n[profiles.p]\n{body}\n"
        );
        let config = Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}"));
        config.profiles["p"].clone()
    }

    const OAUTH: &str = "auth = \"service_account\"\ntoken_url = \"http://127.0.0.1:1/oauth/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\nusername = \"u\"\npassword = \"p\"\n";

    fn with(line: &str) -> ProfileConfig {
        // A later key wins in TOML only by replacement: drop the line it overrides.
        let key = line.split('=').next().unwrap_or_default().trim();
        let kept: String = OAUTH
            .lines()
            .filter(|l| l.split('=').next().unwrap_or_default().trim() != key)
            .map(|l| format!("{l}\n"))
            .collect();
        profile(&format!("{kept}{line}\n"))
    }

    #[test]
    fn profile_changes_are_classified_by_what_makes_a_token_different() {
        let base = profile(OAUTH);
        assert_eq!(classify(&base, &profile(OAUTH)), Change::Same);
        assert_eq!(
            classify(&base, &with("client_secret = \"s2\"")),
            Change::Secrets
        );
        assert_eq!(classify(&base, &with("password = \"p2\"")), Change::Secrets);
        for identity in [
            "client_id = \"c2\"",
            "username = \"u2\"",
            "scope = \"raas.read\"",
            "audience = \"https://api.bhn.com/fiveminute\"",
            "token_url = \"http://127.0.0.1:2/oauth/token\"",
        ] {
            assert_eq!(
                classify(&base, &with(identity)),
                Change::Identity,
                "{identity}"
            );
        }
        assert_eq!(
            classify(&base, &with("refresh_window = \"1h\"")),
            Change::Restart("refresh_window".into(), false)
        );
        let both = profile(&format!(
            "{}token_timeout = \"3s\"\n",
            OAUTH.replace("client_secret = \"s\"", "client_secret = \"s2\"")
        ));
        assert_eq!(
            classify(&base, &both),
            Change::Restart("token_timeout".into(), true)
        );
        let basic = profile("auth = \"basic\"\nplatform_name = \"n\"\napi_key = \"k\"\n");
        assert_eq!(
            classify(
                &basic,
                &profile("auth = \"basic\"\nplatform_name = \"n\"\napi_key = \"k2\"\n")
            ),
            Change::Identity
        );
        assert!(matches!(classify(&basic, &base), Change::Restart(..)));
        assert!(same_profile(&base, &profile(OAUTH)));
        assert!(!same_profile(&base, &with("client_secret = \"s2\"")));
    }

    #[test]
    fn taking_new_secrets_leaves_the_identity_and_settings_alone() {
        let mut running = profile(OAUTH);
        let new = with("client_secret = \"s2\"");
        take_secrets(&mut running.auth, &new.auth);
        assert!(same_profile(&running, &new));
        assert_eq!(classify(&running, &new), Change::Same);
    }
}
