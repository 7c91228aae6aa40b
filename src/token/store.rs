//! Where tokens are kept between mints: the [`TokenStore`] seam and its in-memory implementation.
//!
//! The manager keeps its own in-process copy; a store is where a new manager (a restart, another
//! replica) looks before minting, and where a fresh token is written. Keys are a fingerprint of
//! what makes a token different, never anything secret.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use super::Token;

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

/// A shared place for tokens, keyed by profile fingerprint.
pub trait TokenStore: fmt::Debug + Send + Sync {
    /// The backend's name for `/status`.
    fn name(&self) -> &'static str;
    /// The stored token, if any.
    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Token>>;
    /// Stores a token.
    fn save<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()>;
    /// Removes the stored token only if it is still `rejected` (compare-and-delete).
    fn evict_if<'a>(&'a self, key: &'a str, rejected: &'a Token) -> StoreFuture<'a, bool>;
}

/// Tokens in this process only.
#[derive(Debug, Default)]
pub struct MemoryStore {
    tokens: Mutex<HashMap<String, Token>>,
}

impl MemoryStore {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Token>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TokenStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Token>> {
        let token = self.map().get(key).cloned();
        Box::pin(async move { Ok(token) })
    }

    fn save<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
        let mut map = self.map();
        // Keep the later-expiring token if two writers race.
        let keep_old = map
            .get(key)
            .is_some_and(|t| t.expires_at > token.expires_at);
        if !keep_old {
            map.insert(key.to_string(), token.clone());
        }
        Box::pin(async { Ok(()) })
    }

    fn evict_if<'a>(&'a self, key: &'a str, rejected: &'a Token) -> StoreFuture<'a, bool> {
        let mut map = self.map();
        let same = map
            .get(key)
            .is_some_and(|t| t.access_token == rejected.access_token);
        if same {
            map.remove(key);
        }
        Box::pin(async move { Ok(same) })
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
            SystemTime::now() + Duration::from_secs(secs),
            Duration::from_secs(secs),
            false,
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
        assert!(!store.evict_if("k", &token("b", 50)).await.unwrap());
        assert!(store.evict_if("k", &token("a", 100)).await.unwrap());
        assert!(store.load("k").await.unwrap().is_none());
    }
}
