//! Reloading a gateway's callers without a restart: on SIGHUP, and when the config file (or
//! the directory entry it is reached through — Kubernetes updates a mounted Secret by swapping
//! a symlink) changes.
//!
//! What a reload may change in this version is **`[callers]`**: callers added, removed (the kill
//! switch: a removed store's next request is refused) or changed take effect at once, without
//! touching a request in flight (it keeps the caller it authenticated as). A new configuration
//! that is invalid, or that changes anything else (listeners, upstream, cache, profiles and
//! their credentials), is **refused whole**: the running configuration keeps serving, and the
//! refusal is logged at WARN, counted in `tango_proxy_config_reloads_total{result}` and shown in
//! `/status` (`config.last_refusal`) with its problems. `/status` shows `config.generation`,
//! which grows by one with every reload that took effect.
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
    /// The last refused reload: when and why (problems by key, never a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refusal: Option<Refusal>,
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

    /// Reads the file again and applies it if it may be; returns whether it took effect.
    pub fn reload(&mut self, why: &str) -> bool {
        let outcome = Config::load(Some(&self.path))
            .map_err(|e| e.problems.iter().map(ToString::to_string).collect::<Vec<_>>())
            .and_then(|new| {
                let changed = fixed_changes(&self.running, &new);
                if changed.is_empty() {
                    Ok(new)
                } else {
                    Err(changed
                        .into_iter()
                        .map(|what| {
                            format!("{what}: changed, and only [callers] can be reloaded; restart to apply it")
                        })
                        .collect())
                }
            })
            .and_then(|new| {
                Gateway::new(&new, self.ledger.clone(), &self.metrics)
                    .map_err(|e| vec![e])
                    .and_then(|g| match g {
                        Some(g) => Ok((new, g)),
                        None => Err(vec![
                            "callers: none left; a gateway cannot become a sidecar by reload".into(),
                        ]),
                    })
            });
        let now = rfc3339(SystemTime::now());
        match outcome {
            Ok((new, gateway)) => {
                let before: Vec<&String> = self.running.callers.keys().collect();
                let added = new.callers.keys().filter(|c| !before.contains(c)).count();
                let removed = before
                    .iter()
                    .filter(|c| !new.callers.contains_key(**c))
                    .count();
                self.gateway.send_replace(Some(Arc::new(gateway)));
                let generation = {
                    let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                    s.generation += 1;
                    s.last_reload = Some(now);
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
                self.running = new;
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
                    self.reload("SIGHUP");
                }
                _ = poll.tick() => {
                    let now = stamp(&self.path);
                    if now != seen {
                        // Let a burst of writes finish, then read what is there.
                        tokio::time::sleep(SETTLE).await;
                        seen = stamp(&self.path);
                        self.reload("the config file changed");
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

/// The sections a reload may not change, named, where `new` differs from `running`.
fn fixed_changes(running: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let section = |c: &Config, which: &str| -> String {
        let value = match which {
            "listen" => toml::to_string(&c.listen),
            "upstream" => toml::to_string(&c.upstream),
            _ => toml::to_string(&c.cache),
        };
        value.unwrap_or_default()
    };
    for which in ["listen", "upstream", "cache"] {
        if section(running, which) != section(new, which) {
            out.push(which.to_string());
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
        let same = toml::to_string(old).ok() == toml::to_string(new).ok()
            && secrets(&old.auth) == secrets(&new.auth);
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

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
