//! Reloading the proxy listener's TLS files (`listen.tls_cert_file`, `listen.tls_key_file`,
//! `listen.tls_client_ca_file`) when they change, without a restart and without touching a
//! connection.
//!
//! The files are looked at every [`POLL`]: each path's canonical target, size and modification
//! time, so a file replaced by rename and a Kubernetes Secret update (the kubelet swaps a
//! `..data` symlink in the mounted directory) both count. Once the stamps have stayed the same
//! for [`SETTLE`], the files are read and the server configuration is built again with the code
//! used at start ([`InboundTls::load`]). A set that builds is swapped in whole: new handshakes
//! use it, and a connection already open keeps the certificate and client CAs it was
//! accepted with until it ends. A set that does not build — a file missing or half-written, a
//! PEM that does not parse, a key that is not the certificate's (a pair replaced one file at a
//! time, caught in between) — is **refused**: the running configuration keeps serving, a WARN
//! names the problems by key (files are named, never quoted), the refusal is counted in
//! `tango_proxy_tls_reloads_total{result="refused"}` and shown in `/status`
//! (`tls.last_refusal`). The files are tried again when they next change. Files rewritten with
//! the bytes already serving change nothing.
//!
//! The watched paths are the ones the process started with; pointing `listen.tls_*` at other
//! files takes a restart.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::tls::{FileStamp, FilesDigest, InboundFiles, InboundTls, ServingCert};

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(1);
/// How long changed files must stay unchanged before they are read.
pub const SETTLE: Duration = Duration::from_millis(100);
/// Settling rounds at most: files that never stop changing are read after this many.
const MAX_SETTLE_ROUNDS: u32 = 20;

/// The server configuration new handshakes on the proxy listener take (one clone of an `Arc`
/// per connection).
pub type ServerConfigCell = watch::Receiver<Arc<rustls::ServerConfig>>;

/// What `/status` shows of the listener's TLS (`tls`).
#[derive(Debug, Clone, Serialize)]
pub struct TlsStatus {
    /// Changes of the files that took effect (0 = the files read at start).
    pub generation: u64,
    /// When the last change took effect (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<String>,
    /// The last refused change since the last one that took effect: when and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refusal: Option<TlsRefusal>,
    /// The certificate new handshakes get.
    pub certificate: ServingCert,
}

/// A refused change of the TLS files.
#[derive(Debug, Clone, Serialize)]
pub struct TlsRefusal {
    /// When (RFC 3339).
    pub at: String,
    /// What was wrong, by key (files named, never quoted).
    pub problems: Vec<String>,
}

/// Watches the files and swaps the listener's server configuration when they change.
#[derive(Debug)]
pub struct TlsReloader {
    files: InboundFiles,
    serving: watch::Sender<Arc<rustls::ServerConfig>>,
    status: Arc<Mutex<TlsStatus>>,
    metrics: Arc<Metrics>,
    /// The stamps of the files last read.
    seen: Vec<FileStamp>,
    /// What the serving configuration was built from.
    applied: FilesDigest,
}

impl TlsReloader {
    /// A reloader for the listener's TLS as loaded at start. Returns it, the cell the listener
    /// takes each connection's configuration from, and the status `/status` shows.
    pub fn new(
        start: &InboundTls,
        metrics: Arc<Metrics>,
    ) -> (Self, ServerConfigCell, Arc<Mutex<TlsStatus>>) {
        let (serving, cell) = watch::channel(start.config.clone());
        let status = Arc::new(Mutex::new(TlsStatus {
            generation: 0,
            last_reload: None,
            last_refusal: None,
            certificate: start.serving.clone(),
        }));
        let reloader = Self {
            files: start.files.clone(),
            serving,
            status: status.clone(),
            metrics,
            // Taken before the files were read at start: a change since then is seen.
            seen: start.stamps.clone(),
            applied: start.digest,
        };
        (reloader, cell, status)
    }

    /// Runs until `stop` resolves.
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let files = self.files.clone();
            let seen = self.seen.clone();
            let changed = async {
                loop {
                    poll.tick().await;
                    if let Some(now) = settled_change(&files, &seen).await {
                        return now;
                    }
                }
            };
            tokio::select! {
                () = &mut stop => return,
                now = changed => {
                    self.seen = now;
                    self.reload().await;
                }
            }
        }
    }

    /// Reads the files and applies them if they build; returns whether they took effect.
    async fn reload(&mut self) -> bool {
        let files = self.files.clone();
        let loaded = tokio::task::spawn_blocking(move || InboundTls::load(&files))
            .await
            .unwrap_or_else(|e| {
                Err(vec![crate::config::Problem {
                    key: "listen".into(),
                    message: format!("reading the TLS files failed: {e}"),
                }])
            });
        let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match loaded {
            Ok(tls) if tls.digest == self.applied => {
                // Touched, or back to the serving set after a refusal: nothing to swap.
                if status.last_refusal.take().is_some() {
                    tracing::info!(
                        generation = status.generation,
                        "the TLS files hold the serving certificate and key again"
                    );
                }
                false
            }
            Ok(tls) => {
                self.serving.send_replace(tls.config.clone());
                self.applied = tls.digest;
                status.generation += 1;
                status.last_reload = Some(now);
                status.last_refusal = None;
                status.certificate = tls.serving.clone();
                self.metrics.tls_reload("applied");
                tracing::info!(
                    generation = status.generation,
                    certificate_sha256 = %tls.serving.sha256,
                    not_after = tls.serving.not_after.as_deref().unwrap_or("unknown"),
                    "TLS files reloaded: new connections get them, open ones keep theirs"
                );
                true
            }
            Err(problems) => {
                let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
                self.metrics.tls_reload("refused");
                tracing::warn!(
                    generation = status.generation,
                    problems = %problems.join("; "),
                    "changed TLS files refused; the running certificate keeps serving"
                );
                status.last_refusal = Some(TlsRefusal { at: now, problems });
                false
            }
        }
    }
}

/// The files' stamps once they differ from `seen` and have then held still for [`SETTLE`] (at
/// most [`MAX_SETTLE_ROUNDS`] rounds: a burst of writes is read once); `None` when nothing
/// changed.
async fn settled_change(files: &InboundFiles, seen: &[FileStamp]) -> Option<Vec<FileStamp>> {
    let mut now = stamps(files).await;
    if now == seen {
        return None;
    }
    for _ in 0..MAX_SETTLE_ROUNDS {
        tokio::time::sleep(SETTLE).await;
        let again = stamps(files).await;
        if again == now {
            break;
        }
        now = again;
    }
    Some(now)
}

/// [`InboundFiles::stamps`] off the async threads (a slow volume must not stall them).
async fn stamps(files: &InboundFiles) -> Vec<FileStamp> {
    let files = files.clone();
    tokio::task::spawn_blocking(move || files.stamps())
        .await
        .unwrap_or_default()
}
