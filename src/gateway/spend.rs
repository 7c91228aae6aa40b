//! The daily spend ledger: what each caller has spent (or has in flight) per UTC day.
//!
//! An order of a limited caller is **reserved** before it is forwarded: the amount is added to
//! the day's total only if the total stays within the limit, in one atomic step (a Lua script on
//! Redis, a mutex in memory), so concurrent orders on any number of replicas can never pass the
//! limit together. The reservation is then settled by Tango's answer: a new order (201, or 202
//! for `asyncOrders`) keeps it; a definite refusal (a 4xx, an order Tango repeated with 200, or
//! a request the proxy never sent) releases it; an unknown outcome (a timeout, a 5xx, a broken
//! connection) keeps it, because the order may exist.
//!
//! Redis keys: `{prefix}:spend:{caller}:{YYYY-MM-DD}`, an integer in the limit currency's minor
//! units, expiring two days after it was last written. Caller names are not secret.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures_util::future::BoxFuture;

use crate::token::RedisStore;

/// The ledger could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("spend ledger unavailable: {0}")]
pub struct LedgerError(pub String);

/// The outcome of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// Reserved; the day's total with it.
    Granted(u64),
    /// Refused: it would pass the limit; the day's total without it.
    Refused(u64),
}

/// Where spend is counted: in memory (one replica) or in Redis (every replica).
pub trait SpendLedger: Debug + Send + Sync {
    /// Adds `amount` to `caller`'s total for `day` if the total stays at most `limit`.
    fn reserve<'a>(
        &'a self,
        caller: &'a str,
        day: &'a str,
        amount: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<Reserved, LedgerError>>;
    /// Adds `delta` (positive: more was charged than reserved) or takes it away (a release),
    /// never below zero.
    fn adjust<'a>(
        &'a self,
        caller: &'a str,
        day: &'a str,
        delta: i64,
    ) -> BoxFuture<'a, Result<(), LedgerError>>;
    /// The day's total.
    fn spent<'a>(
        &'a self,
        caller: &'a str,
        day: &'a str,
    ) -> BoxFuture<'a, Result<u64, LedgerError>>;
    /// Whether totals are shared with other replicas.
    fn shared(&self) -> bool;
}

/// Today's date in UTC, `YYYY-MM-DD`: the day a spend limit counts.
pub fn utc_day(now: SystemTime) -> String {
    let mut text = humantime::format_rfc3339_seconds(now).to_string();
    text.truncate(10);
    text
}

/// One replica's ledger.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    totals: Mutex<HashMap<(String, String), u64>>,
}

impl MemoryLedger {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<(String, String), u64>) -> T) -> T {
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut totals)
    }
}

impl SpendLedger for MemoryLedger {
    fn reserve<'a>(
        &'a self,
        caller: &'a str,
        day: &'a str,
        amount: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<Reserved, LedgerError>> {
        let outcome = self.with(|totals| {
            // Yesterday's totals go when a new day's first order arrives.
            totals.retain(|(_, d), _| d.as_str() >= day);
            let total = totals
                .entry((caller.to_string(), day.to_string()))
                .or_default();
            match total.checked_add(amount).filter(|t| *t <= limit) {
                Some(t) => {
                    *total = t;
                    Reserved::Granted(t)
                }
                None => Reserved::Refused(*total),
            }
        });
        Box::pin(async move { Ok(outcome) })
    }

    fn adjust<'a>(
        &'a self,
        caller: &'a str,
        day: &'a str,
        delta: i64,
    ) -> BoxFuture<'a, Result<(), LedgerError>> {
        self.with(|totals| {
            let total = totals
                .entry((caller.to_string(), day.to_string()))
                .or_default();
            *total = total.saturating_add_signed(delta);
        });
        Box::pin(async { Ok(()) })
    }

    fn spent<'a>(
        &'a self,
        caller: &'a str,
        day: &'a str,
    ) -> BoxFuture<'a, Result<u64, LedgerError>> {
        let total = self.with(|totals| {
            totals
                .get(&(caller.to_string(), day.to_string()))
                .copied()
                .unwrap_or(0)
        });
        Box::pin(async move { Ok(total) })
    }

    fn shared(&self) -> bool {
        false
    }
}

/// Keys live two days past their last write: long enough for late settlements and `/status`.
const TTL_SECONDS: i64 = 2 * 86_400;

/// Amounts are at most 10^12 minor units (config and order checks), far inside an i64.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// Reserves ARGV[1] if the total stays within ARGV[2]. Returns {1, total} or {0, total}.
const RESERVE: &str = r"
local total = tonumber(redis.call('GET', KEYS[1]) or '0')
if not total then return redis.error_reply('spend total is not a number') end
local amount = tonumber(ARGV[1])
if total + amount > tonumber(ARGV[2]) then return {0, total} end
total = redis.call('INCRBY', KEYS[1], amount)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, total}
";

// Adds ARGV[1] (may be negative), never going below zero.
const ADJUST: &str = r"
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if total < 0 then redis.call('SET', KEYS[1], 0) total = 0 end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return total
";

/// The fleet's ledger, in the token cache's Redis.
#[derive(Debug)]
pub struct RedisLedger {
    store: Arc<RedisStore>,
    reserve: redis::Script,
    adjust: redis::Script,
}

impl RedisLedger {
    /// A ledger in `store`'s Redis, under its key prefix.
    pub fn new(store: Arc<RedisStore>) -> Self {
        Self {
            store,
            reserve: redis::Script::new(RESERVE),
            adjust: redis::Script::new(ADJUST),
        }
    }

    fn key(&self, caller: &str, day: &str) -> String {
        format!("{}:spend:{caller}:{day}", self.store.prefix())
    }
}

impl SpendLedger for RedisLedger {
    fn reserve<'a>(
        &'a self,
        caller: &'a str,
        day: &'a str,
        amount: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<Reserved, LedgerError>> {
        Box::pin(async move {
            let key = self.key(caller, day);
            let (granted, total): (u8, u64) = self
                .store
                .run_script(
                    &self.reserve,
                    &key,
                    &[clamp(amount), clamp(limit), TTL_SECONDS],
                )
                .await
                .map_err(|e| LedgerError(e.to_string()))?;
            Ok(if granted == 1 {
                Reserved::Granted(total)
            } else {
                Reserved::Refused(total)
            })
        })
    }

    fn adjust<'a>(
        &'a self,
        caller: &'a str,
        day: &'a str,
        delta: i64,
    ) -> BoxFuture<'a, Result<(), LedgerError>> {
        Box::pin(async move {
            let key = self.key(caller, day);
            let _: i64 = self
                .store
                .run_script(&self.adjust, &key, &[delta, TTL_SECONDS])
                .await
                .map_err(|e| LedgerError(e.to_string()))?;
            Ok(())
        })
    }

    fn spent<'a>(
        &'a self,
        caller: &'a str,
        day: &'a str,
    ) -> BoxFuture<'a, Result<u64, LedgerError>> {
        Box::pin(async move {
            let key = self.key(caller, day);
            let total: Option<u64> = self
                .store
                .get_value(&key)
                .await
                .map_err(|e| LedgerError(e.to_string()))?;
            Ok(total.unwrap_or(0))
        })
    }

    fn shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_ledger_reserves_within_the_limit_and_releases() {
        let l = MemoryLedger::default();
        assert_eq!(
            l.reserve("s1", "2026-11-27", 300, 500).await.unwrap(),
            Reserved::Granted(300)
        );
        assert_eq!(
            l.reserve("s1", "2026-11-27", 201, 500).await.unwrap(),
            Reserved::Refused(300)
        );
        assert_eq!(
            l.reserve("s1", "2026-11-27", 200, 500).await.unwrap(),
            Reserved::Granted(500)
        );
        // Another caller and another day count apart.
        assert_eq!(
            l.reserve("s2", "2026-11-27", 500, 500).await.unwrap(),
            Reserved::Granted(500)
        );
        l.adjust("s1", "2026-11-27", -300).await.unwrap();
        assert_eq!(l.spent("s1", "2026-11-27").await.unwrap(), 200);
        l.adjust("s1", "2026-11-27", -1000).await.unwrap();
        assert_eq!(l.spent("s1", "2026-11-27").await.unwrap(), 0);
        assert_eq!(
            l.reserve("s1", "2026-11-28", 500, 500).await.unwrap(),
            Reserved::Granted(500)
        );
        // The new day dropped the old day's totals.
        assert_eq!(l.spent("s2", "2026-11-27").await.unwrap(), 0);
    }

    #[test]
    fn days_are_utc_dates() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_910_399);
        assert_eq!(utc_day(t), "2026-11-28");
        assert_eq!(utc_day(SystemTime::UNIX_EPOCH), "1970-01-01");
    }
}
