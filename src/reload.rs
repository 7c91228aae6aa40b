//! Reloading a gateway's callers without a restart: on SIGHUP, and when the config file (or
//! the directory entry it is reached through — Kubernetes updates a mounted Secret by swapping
//! a symlink) changes.
//!
//! What a reload may change in this version is **`[callers]`**: callers added, removed (the kill
//! switch: a removed store's next request is refused) or changed take effect at once, without
//! touching a request in flight (it keeps the caller it authenticated as). A new configuration
//! that is invalid, or whose callers name a profile the process does not run, is **refused
//! whole**: the running configuration keeps serving, and the refusal is logged at WARN, counted
//! in `tango_proxy_config_reloads_total{result}` and shown in `/status` (`config.last_refusal`)
//! with its problems. Changes a reload cannot apply (listeners, upstream, cache, profiles and
//! their credentials, the contents of any file the configuration names) never hold back a
//! caller change — the kill switch must work whatever else changed in the file — they are
//! logged at WARN and listed in `/status` (`config.pending_restart`) until a restart.
//! `/status` shows `config.generation`, which grows by one with every reload that took effect.
//! Reading and checking the file runs off the async threads (a 500-profile file takes about a
//! second).
//!
//! Changes are found by polling every [`POLL`]: the config path's target, size and modification
//! time, so a symlink swap counts; a change is applied once the file has been quiet for
//! [`SETTLE`] (an editor's or kubelet's several writes become one reload).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::config::{AuthConfig, Config};
use crate::gateway::spend::SpendLedger;
use crate::gateway::Gateway;
use crate::metrics::Metrics;

/// How often the config file is looked at.
pub const POLL: Duration = Duration::from_millis(250);
/// How long a changed file must stay unchanged before it is read.
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
}

/// A refused reload.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    /// When (RFC 3339).
    pub at: String,
    /// What was wrong.
    pub problems: Vec<String>,
}

/// The gateway as requests see it, swapped whole by reloads.
pub type GatewayCell = watch::Receiver<Option<Arc<Gateway>>>;

/// Applies reloads: holds the running configuration and the sender requests read from.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    running: Config,
    gateway: watch::Sender<Option<Arc<Gateway>>>,
    ledger: Arc<dyn SpendLedger>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<ReloadStatus>>,
    /// Registered when the reloader is made, before the process says it is listening: a
    /// SIGHUP from then on reloads instead of ending the process (its default action).
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Reloader {
    /// A reloader for the configuration at `path`, running as `running`. Needs a Tokio
    /// runtime (it registers the SIGHUP handler at once).
    pub fn new(
        path: PathBuf,
        running: Config,
        gateway: watch::Sender<Option<Arc<Gateway>>>,
        ledger: Arc<dyn SpendLedger>,
        metrics: Arc<Metrics>,
        status: Arc<Mutex<ReloadStatus>>,
    ) -> Self {
        Self {
            path,
            running,
            gateway,
            ledger,
            metrics,
            status,
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// Reads the file again and applies its callers if it may; returns whether it took effect.
    pub async fn reload(&mut self, why: &str) -> bool {
        let (path, running, ledger, metrics) = (
            self.path.clone(),
            self.running.clone(),
            self.ledger.clone(),
            self.metrics.clone(),
        );
        let outcome =
            tokio::task::spawn_blocking(move || prepare(&path, running, ledger, &metrics))
                .await
                .unwrap_or_else(|e| Err(vec![format!("the reload failed: {e}")]));
        let now = rfc3339(SystemTime::now());
        match outcome {
            Ok((new, gateway, pending)) => {
                let before: Vec<&String> = self.running.callers.keys().collect();
                let added = new.callers.keys().filter(|c| !before.contains(c)).count();
                let removed = before
                    .iter()
                    .filter(|c| !new.callers.contains_key(**c))
                    .count();
                let gateway = match self.gateway.borrow().as_ref() {
                    Some(previous) => gateway.keeping_throttle_of(previous),
                    None => gateway,
                };
                self.gateway.send_replace(Some(Arc::new(gateway)));
                if !pending.is_empty() {
                    tracing::warn!(
                        pending = %pending.join("; "),
                        "the reloaded file also changes what only a restart applies"
                    );
                }
                let generation = {
                    let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                    s.generation += 1;
                    s.last_reload = Some(now);
                    s.last_refusal = None;
                    s.pending_restart = pending;
                    s.generation
                };
                self.metrics.config_reload("applied");
                tracing::info!(
                    generation,
                    callers = new.callers.len(),
                    added,
                    removed,
                    "configuration reloaded ({why})"
                );
                self.running.callers = new.callers;
                true
            }
            Err(problems) => {
                self.metrics.config_reload("refused");
                tracing::warn!(
                    problems = %problems.join("; "),
                    "configuration reload refused ({why}); the running configuration keeps serving"
                );
                let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                s.last_refusal = Some(Refusal { at: now, problems });
                false
            }
        }
    }

    /// Runs until `stop` resolves: reloads on SIGHUP and when the file changes.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let mut seen = stamp(&self.path);
        #[cfg(unix)]
        let mut hangup = self.hangup.take();
        tokio::pin!(stop);
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    seen = stamp(&self.path);
                    self.reload("SIGHUP").await;
                }
                _ = poll.tick() => {
                    let now = stamp(&self.path);
                    if now != seen {
                        // Let a burst of writes finish, then read what is there.
                        tokio::time::sleep(SETTLE).await;
                        seen = stamp(&self.path);
                        self.reload("the config file changed").await;
                    }
                }
            }
        }
    }
}

/// What identifies the file's current content without reading it: where the path leads, its
/// size and modification time.
fn stamp(path: &Path) -> Option<(PathBuf, u64, Option<SystemTime>)> {
    let target = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&target).ok()?;
    Some((target, meta.len(), meta.modified().ok()))
}

/// Loads and checks the file; builds the gateway of its callers over the running profiles.
/// Returns the new configuration, its gateway and what only a restart would apply.
fn prepare(
    path: &Path,
    running: Config,
    ledger: Arc<dyn SpendLedger>,
    metrics: &Metrics,
) -> Result<(Config, Gateway, Vec<String>), Vec<String>> {
    let new = Config::load(Some(path)).map_err(|e| {
        e.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    })?;
    let missing: Vec<String> = new
        .callers
        .values()
        .filter(|c| !running.profiles.contains_key(&c.profile))
        .map(|c| {
            format!(
                "callers.{}.profile: profile {:?} is not running; adding a profile needs a restart",
                c.name, c.profile
            )
        })
        .collect();
    if !missing.is_empty() {
        return Err(missing);
    }
    let pending: Vec<String> = fixed_changes(&running, &new)
        .into_iter()
        .map(|what| format!("{what}: changed; a restart applies it"))
        .collect();
    // The new callers over the running profiles: their indexes are the running proxy's.
    let mut merged = running;
    merged.callers = new.callers.clone();
    match Gateway::new(&merged, ledger, metrics) {
        Ok(Some(g)) => Ok((new, g, pending)),
        Ok(None) => Err(vec![
            "callers: none left; a gateway cannot become a sidecar by reload".into(),
        ]),
        Err(e) => Err(vec![e]),
    }
}

/// The sections a reload does not apply, named, where `new` differs from `running`.
fn fixed_changes(running: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    // A section that cannot be rendered counts as changed: never a silent "same".
    fn differ<T: serde::Serialize>(a: &T, b: &T) -> bool {
        match (toml::to_string(a), toml::to_string(b)) {
            (Ok(x), Ok(y)) => x != y,
            _ => true,
        }
    }
    if differ(&running.listen, &new.listen) {
        out.push("listen".to_string());
    }
    if differ(&running.upstream, &new.upstream) {
        out.push("upstream".to_string());
    }
    if differ(&running.cache, &new.cache) {
        out.push("cache".to_string());
    }
    for (file, was) in file_digests(running) {
        let now = file_digests(new)
            .into_iter()
            .find(|(f, _)| *f == file)
            .map(|(_, d)| d);
        if now != Some(was) {
            out.push(format!("the contents of {}", file.display()));
        }
    }
    if running.cache.sealer.key_id() != new.cache.sealer.key_id() {
        out.push("cache.encryption_key_file".into());
    }
    let names = |c: &Config| c.profiles.keys().cloned().collect::<Vec<_>>();
    if names(running) != names(new) {
        out.push("profiles (added or removed)".into());
        return out;
    }
    for (name, old) in &running.profiles {
        let Some(new) = new.profiles.get(name) else {
            continue;
        };
        let same = !differ(old, new) && secrets(&old.auth) == secrets(&new.auth);
        if !same {
            out.push(format!("profiles.{name}"));
        }
    }
    out
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

/// The files the configuration names outside profiles (whose secrets are compared as loaded),
/// with a digest of their contents (`None` when unreadable).
fn file_digests(c: &Config) -> Vec<(PathBuf, Option<[u8; 32]>)> {
    let mut files: Vec<PathBuf> = Vec::new();
    files.extend(c.listen.tls_cert_file.clone());
    files.extend(c.listen.tls_key_file.clone());
    files.extend(c.listen.tls_client_ca_file.clone());
    files.extend(c.upstream.ca_file.clone());
    files.extend(c.cache.encryption_key_file.clone());
    files.extend(c.cache.previous_encryption_key_files.iter().cloned());
    files.extend(c.cache.redis_password_file.clone());
    files.extend(c.cache.redis_ca_file.clone());
    files
        .into_iter()
        .map(|f| {
            let digest = crate::config::read_small_file(&f, crate::config::MAX_SECRET_FILE, "file")
                .ok()
                .map(|bytes| crate::gateway::sha256(&bytes));
            (f, digest)
        })
        .collect()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
