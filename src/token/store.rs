//! Where tokens are kept between mints: the [`TokenStore`] seam and its in-memory implementation.
//!
//! The manager keeps its own in-process copy; a store is where a new manager (a restart, another
//! replica) looks before minting, and where a fresh token is written. Keys are a fingerprint of
//! what makes a token different, never anything secret.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{Record, Sealer, Token};
use crate::metrics::Metrics;

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or answered an error.
    #[error("token store unavailable: {0}")]
    Unavailable(String),
}

/// A boxed store future.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// What [`TokenStore::lookup`] finds.
#[derive(Debug, Default)]
pub struct Found {
    /// The stored token record.
    pub token: Option<Record>,
    /// A fleet-wide backoff in force: time left and why.
    pub backoff: Option<(Duration, String)>,
    /// The `ath` of the token a replica last saw rejected, while that matters.
    pub rejected: Option<String>,
    /// Whether the refresh lease is held (`None` where the store cannot tell).
    pub lease_held: Option<bool>,
}

/// A shared place for tokens, keyed by profile fingerprint.
///
/// Times that several processes compare (the mint ledger, the fleet backoff) are exchanged as
/// durations measured by the store itself ("minted 3 h ago", "back off for 40 s"), so replicas
/// never compare their wall clocks with each other's.
pub trait TokenStore: fmt::Debug + Send + Sync {
    /// The backend's name for `/status`.
    fn name(&self) -> &'static str;
    /// The stored token record, if any (expired records read as absent).
    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Record>>;
    /// Stores a token, unless the store holds one expiring later.
    fn save<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()>;
    /// Removes the stored token only if it is still the one whose `ath` is given
    /// (compare-and-delete). Shared stores also remember the `ath` for a while, so replicas
    /// that still hold that token stop using it and none writes it back.
    fn evict_if<'a>(&'a self, key: &'a str, ath: &'a str) -> StoreFuture<'a, bool>;

    /// Everything a refresh reads before deciding to mint (the token, a fleet backoff, the
    /// fleet's last rejection, the lease), in one round trip where the backend allows it.
    fn lookup<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Found> {
        Box::pin(async move {
            Ok(Found {
                token: self.load(key).await?,
                backoff: self.fleet_backoff(key).await?,
                ..Found::default()
            })
        })
    }

    /// True when other processes share this store, so a refresh must take the fleet lease.
    fn shared(&self) -> bool {
        false
    }

    /// Tries to take the refresh lease for `key` as `owner` for `ttl`. Stores without peers
    /// always grant it: single-flight inside the process is enough.
    fn try_lease<'a>(
        &'a self,
        _key: &'a str,
        _owner: &'a str,
        _ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async { Ok(true) })
    }

    /// Extends a lease still held by `owner`; false when it was lost.
    fn extend_lease<'a>(
        &'a self,
        _key: &'a str,
        _owner: &'a str,
        _ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async { Ok(true) })
    }

    /// Releases a lease still held by `owner` (compare-and-delete).
    fn release_lease<'a>(&'a self, _key: &'a str, _owner: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// How long ago any process sharing this store last minted a token for `key`.
    fn last_mint<'a>(&'a self, _key: &'a str) -> StoreFuture<'a, Option<Duration>> {
        Box::pin(async { Ok(None) })
    }

    /// Records a mint (now) in the shared ledger.
    fn record_mint<'a>(&'a self, _key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Waits until another process may have stored a token for `key`, at most `limit`: stores
    /// with a notification channel return early on a notice; others just wait (polling).
    fn wait_for_change<'a>(&'a self, _key: &'a str, limit: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            tokio::time::sleep(limit).await;
            Ok(())
        })
    }

    /// Tells waiting processes that a token for `key` was stored.
    fn announce<'a>(&'a self, _key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// A fleet-wide "do not ask Tango for this long" and its reason (set after the token
    /// endpoint refused or failed a replica's request), if one is in force.
    fn fleet_backoff<'a>(&'a self, _key: &'a str) -> StoreFuture<'a, Option<(Duration, String)>> {
        Box::pin(async { Ok(None) })
    }

    /// Tells every process sharing the store not to ask Tango for `left`.
    fn set_fleet_backoff<'a>(
        &'a self,
        _key: &'a str,
        _left: Duration,
        _reason: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// Tokens in this process only.
#[derive(Debug, Default)]
pub struct MemoryStore {
    tokens: Mutex<HashMap<String, Record>>,
}

impl MemoryStore {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TokenStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Record>> {
        let record = self.map().get(key).cloned();
        Box::pin(async move { Ok(record) })
    }

    fn save<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
        let mut map = self.map();
        // Keep the later-expiring token if two writers race.
        let keep_old = map
            .get(key)
            .is_some_and(|t| t.expires_at > token.expires_at);
        if !keep_old {
            map.insert(key.to_string(), token.record());
        }
        Box::pin(async { Ok(()) })
    }

    fn evict_if<'a>(&'a self, key: &'a str, ath: &'a str) -> StoreFuture<'a, bool> {
        let mut map = self.map();
        let same = map
            .get(key)
            .is_some_and(|t| super::ath(t.access_token.expose()) == ath);
        if same {
            map.remove(key);
        }
        Box::pin(async move { Ok(same) })
    }
}

/// Tokens in files on this host: one file per profile fingerprint, written atomically
/// (temporary file, fsync, rename) with mode 0600, sealed with AES-256-GCM when a key is
/// configured. Survives restarts; processes on one host share it.
///
/// File I/O (and the fsync) runs on Tokio's blocking pool, never on a runtime worker, so a slow
/// disk cannot stall request handling even with `workers = 1`.
///
/// Compare-and-delete reads, compares and removes without a lock: two processes on one host
/// racing on a rejected token can at worst remove the newer one, which costs one extra mint.
#[derive(Debug, Clone)]
pub struct FileStore(Arc<FileInner>);

#[derive(Debug)]
struct FileInner {
    dir: PathBuf,
    prefix: String,
    sealer: Arc<Sealer>,
    metrics: Arc<Metrics>,
}

impl FileStore {
    /// Uses (and creates, mode 0700) the directory `dir`.
    pub fn new(
        dir: &Path,
        prefix: &str,
        sealer: Arc<Sealer>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        create_private_dir(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
        Ok(Self(Arc::new(FileInner {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            sealer,
            metrics,
        })))
    }

    /// Runs `f` on the blocking pool.
    fn blocking<'a, T: Send + 'static>(
        &self,
        f: impl FnOnce(&FileInner) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'a, T> {
        let inner = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&inner))
                .await
                .map_err(|e| StoreError::Unavailable(format!("token file task failed: {e}")))?
        })
    }
}

impl FileInner {
    /// The record's logical name (the sealing associated data), as in Redis.
    fn record_name(&self, key: &str) -> String {
        format!("{}:{{{key}}}:token", self.prefix)
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}-{key}.token", self.prefix))
    }

    fn read(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let path = self.path(key);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        match self.sealer.open(&self.record_name(key), text.trim()) {
            Some(t) if t.expires_at > SystemTime::now() => Ok(Some(t)),
            Some(_) => Ok(None),
            None => {
                self.metrics.cache_unreadable_record("file");
                tracing::warn!(
                    file = %path.display(),
                    "ignoring a cached token record that does not open (tampered, or sealed with a key no longer configured)"
                );
                Ok(None)
            }
        }
    }

    fn write(&self, key: &str, token: &Token) -> Result<(), StoreError> {
        if matches!(self.read(key), Ok(Some(existing)) if existing.expires_at > token.expires_at) {
            return Ok(());
        }
        let sealed = zeroize::Zeroizing::new(
            self.sealer
                .seal(&self.record_name(key), token)
                .ok_or_else(|| StoreError::Unavailable("cannot seal the token record".into()))?,
        );
        let path = self.path(key);
        let tmp = self
            .dir
            .join(format!(".{}-{key}.{}.tmp", self.prefix, std::process::id()));
        let io = |e: std::io::Error| {
            StoreError::Unavailable(format!("cannot write {}: {e}", path.display()))
        };
        write_private(&tmp, sealed.as_bytes()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })
    }

    fn evict_if(&self, key: &str, ath: &str) -> Result<bool, StoreError> {
        match self.read(key)? {
            Some(t) if super::ath(t.access_token.expose()) == ath => {
                match std::fs::remove_file(self.path(key)) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(StoreError::Unavailable(e.to_string())),
                }
            }
            _ => Ok(false),
        }
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl TokenStore for FileStore {
    fn name(&self) -> &'static str {
        "file"
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Record>> {
        let key = key.to_string();
        self.blocking(move |f| f.read(&key))
    }

    fn save<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
        let (key, token) = (key.to_string(), token.clone());
        self.blocking(move |f| f.write(&key, &token))
    }

    fn evict_if<'a>(&'a self, key: &'a str, ath: &'a str) -> StoreFuture<'a, bool> {
        let (key, ath) = (key.to_string(), ath.to_string());
        self.blocking(move |f| f.evict_if(&key, &ath))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::secret::Secret;

    fn token(v: &str, secs: u64) -> Token {
        Token::new(
            Secret::new(v),
            Duration::from_secs(secs),
            Duration::from_secs(secs),
            false,
            tokio::time::Instant::now(),
            SystemTime::now(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn memory_store_keeps_the_later_token_and_compare_deletes() {
        let store = MemoryStore::default();
        assert!(store.load("k").await.unwrap().is_none());
        store.save("k", &token("a", 100)).await.unwrap();
        store.save("k", &token("b", 50)).await.unwrap();
        assert_eq!(
            store
                .load("k")
                .await
                .unwrap()
                .unwrap()
                .access_token
                .expose(),
            "a"
        );
        assert!(!store.evict_if("k", token("b", 50).ath()).await.unwrap());
        assert!(store.evict_if("k", token("a", 100).ath()).await.unwrap());
        assert!(store.load("k").await.unwrap().is_none());
    }
}
