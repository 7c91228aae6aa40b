//! The Redis token store: one record per profile fingerprint, shared by every replica.
//!
//! Keys share a hash tag so one profile's records live in one cluster slot:
//! `{prefix}:{fp}:token` (value `expires_ms.ath.sealed`, Redis TTL = remaining life),
//! `{prefix}:{fp}:lock` (refresh lease: `SET NX PX` with a random owner, extended while a mint
//! runs, released by compare-and-delete), `{prefix}:{fp}:minted` (the fleet's last mint: value
//! Unix ms, TTL 7 days), `{prefix}:{fp}:backoff` (value `until_ms|reason`, TTL = the backoff,
//! after the token endpoint answered a replica with an error, so one answer quiets every replica)
//! and `{prefix}:{fp}:rejected` (the `ath` of the token a replica last saw rejected, TTL 26 h:
//! replicas still holding it replace it, and none writes it back).
//! Writes keep the later-expiring token (compare-and-set in Lua); eviction deletes only the
//! rejected token. The `ath` (SHA-256 of the token) in clear lets those scripts compare tokens
//! without decrypting; it is what DPoP proofs carry anyway and cannot be reversed.
//!
//! Times replicas share are read by their TTL (`PTTL`), so Redis's clock measures them and no
//! replica's clock is compared with another's; the values keep their Unix-ms form for replicas
//! of earlier versions, which read those instead.
//!
//! Processes waiting for another's mint are woken by a `PUBLISH` on `{prefix}:{fp}:wake`
//! (standalone Redis; a pattern subscription per process) and otherwise poll every 50 ms.
//!
//! Every call has a short timeout. The connection is made lazily; the standalone connection
//! manager and the cluster connection reconnect by themselves, a sentinel connection is remade.
//! Redis down at start, killed, restarted or frozen only makes calls fail fast; the token owner
//! then keeps serving from memory and coordinates inside the process.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{IntoConnectionInfo, Script, TlsCertificates};
use tokio::sync::Mutex;

use crate::secret::Secret;

use super::store::{Found, StoreError, StoreFuture, TokenStore};
use super::{unix_ms, Record, Sealer, Token};
use crate::metrics::Metrics;

/// Time allowed for one Redis call (connecting included).
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the ledger remembers a mint.
const LEDGER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

// Keeps a later-expiring record, but only a believable one: a string with a TTL and an expiry
// no later than ARGV[4] (now + 400 days). Anything else under the key is overwritten, so garbage
// cannot pin the fleet to minting on every cold start.
const SAVE_LATER: &str = r"
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('PTTL', KEYS[1]) > 0 then
  local exp = tonumber(string.match(redis.call('GET', KEYS[1]), '^(%d+)%.'))
  if exp and exp >= tonumber(ARGV[2]) and exp <= tonumber(ARGV[4]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
";

// Takes the lease (SET NX PX). A lock that no replica could have written (another type, no
// TTL, or a TTL past ARGV[3]) is removed first, or it would block every refresh forever.
const TAKE_LEASE: &str = r"
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'none' then
  local pttl = redis.call('PTTL', KEYS[1])
  if t ~= 'string' or pttl < 0 or pttl > tonumber(ARGV[3]) then redis.call('DEL', KEYS[1]) end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
";

// One profile's records as a refresh reads them; a key holding another type reads as absent
// instead of failing the whole read.
const READ_ALL: &str = r"
local function str(k)
  if redis.call('TYPE', k).ok == 'string' then return redis.call('GET', k) end
  return false
end
return {str(KEYS[1]), str(KEYS[2]), redis.call('PTTL', KEYS[2]), str(KEYS[3]),
        redis.call('EXISTS', KEYS[4])}
";

const DELETE_IF_ATH: &str = r"
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local cur = redis.call('GET', KEYS[1])
if cur and string.match(cur, '^%d+%.([^.]+)%.') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// How long the fleet remembers a rejected token: longer than any token it could be.
const REJECTED_TTL: Duration = Duration::from_secs(26 * 3600);

const EXTEND_IF_OWNER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

const DELETE_IF_OWNER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// How to reach Redis.
#[derive(Clone, Default)]
pub struct RedisOptions {
    /// `redis://`, `rediss://` (TLS), or `redis+cluster://` / `rediss+cluster://` with a
    /// comma-separated list of seed nodes; user and password may be in the URL.
    pub url: String,
    /// A password that overrides the URL's (from `cache.redis_password_file`).
    pub password: Option<Secret>,
    /// PEM roots to trust for `rediss` (from `cache.redis_ca_file`); else the system's.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &crate::config::redact_url_password(&self.url))
            .field("password", &self.password)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .finish()
    }
}

enum Target {
    Single(redis::Client),
    Cluster(ClusterClient),
    Sentinel(Mutex<SentinelClient>),
}

/// A standalone or cluster connection behind one interface.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    Sentinel(redis::aio::MultiplexedConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
        }
    }
}

/// The pieces of a multi-host URL: `redis+cluster://user:pass@h1:p1,h2:p2` or
/// `redis+sentinel://user:pass@s1:p1,s2:p2/service[/db]` (and their `rediss+` TLS forms).
/// Each seed may carry the `user:pass@` (the same on every seed that does: a cluster, or a
/// sentinel's primary, has one); user and password are percent-decoded.
struct MultiHostUrl {
    tls: bool,
    user: Option<String>,
    password: Option<String>,
    hosts: Vec<String>,
    path: Vec<String>,
}

#[derive(PartialEq)]
struct MultiHostCredentials(Option<String>, Option<String>);

/// `Ok(None)` when `url` is not of this `kind` (`cluster`, `sentinel`). Messages never repeat
/// any part of the URL.
fn multi_host_parts(url: &str, kind: &str) -> Result<Option<MultiHostUrl>, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix(&format!("rediss+{kind}://")) {
        (true, r)
    } else if let Some(r) = url.strip_prefix(&format!("redis+{kind}://")) {
        (false, r)
    } else {
        return Ok(None);
    };
    if rest.contains(['?', '#']) {
        return Err(format!("a {kind} URL takes no ?query or #fragment"));
    }
    let (authority, path_text) = rest.split_once('/').unwrap_or((rest, ""));
    if path_text.contains('@') {
        return Err(
            "has an '@' after the hosts: percent-encode '@' and '/' in a user name or \
                    password (%40, %2F)"
                .into(),
        );
    }
    let path: Vec<String> = path_text
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if authority.is_empty() {
        return Err(format!("a {kind} URL needs at least one host:port"));
    }
    let mut credentials: Option<MultiHostCredentials> = None;
    let mut hosts = Vec::new();
    for (i, seed) in authority.split(',').enumerate() {
        let n = i + 1;
        if seed.is_empty() {
            return Err(format!("host {n} is empty (two commas, or one at an end)"));
        }
        let host = match seed.rsplit_once('@') {
            None => seed,
            Some((userinfo, host)) => {
                let (user, password) = match userinfo.split_once(':') {
                    Some((user, pass)) => (
                        (!user.is_empty())
                            .then(|| percent_decode(user))
                            .transpose()?,
                        Some(percent_decode(pass)?),
                    ),
                    None => (None, Some(percent_decode(userinfo)?)),
                };
                if password.as_deref() == Some("") {
                    return Err(format!("host {n} has an empty password"));
                }
                let these = MultiHostCredentials(user, password);
                match &credentials {
                    None => credentials = Some(these),
                    Some(first) if *first != these => {
                        return Err(format!(
                            "the hosts carry different user names or passwords; a {kind} \
                             URL has one: write it once, on the first host"
                        ))
                    }
                    Some(_) => {}
                }
                host
            }
        };
        crate::config::check_host_port(host).map_err(|e| format!("host {n}: {e}"))?;
        hosts.push(host.to_string());
    }
    match (kind, path.len()) {
        ("cluster", 0) | ("sentinel", 1 | 2) => {}
        ("cluster", _) => {
            return Err("a cluster URL has no /path: Redis Cluster has only database 0".into())
        }
        _ => {
            return Err(
                "a sentinel URL names the service: redis+sentinel://host:port,.../SERVICE[/DB]"
                    .into(),
            )
        }
    }
    let MultiHostCredentials(user, password) =
        credentials.unwrap_or(MultiHostCredentials(None, None));
    Ok(Some(MultiHostUrl {
        tls,
        user,
        password,
        hosts,
        path,
    }))
}

/// Decodes `%XX` escapes (as the Redis client does for `redis://` URLs); the result must be
/// UTF-8.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "a user name or password is not UTF-8 once decoded".into())
}

fn build_target(options: &RedisOptions) -> Result<Target, String> {
    let certs = |ca: &Vec<u8>| TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.clone()),
    };
    if let Some(MultiHostUrl {
        tls,
        user,
        password,
        hosts,
        ..
    }) = multi_host_parts(&options.url, "cluster")?
    {
        let scheme = if tls { "rediss" } else { "redis" };
        let nodes: Vec<String> = hosts.iter().map(|h| format!("{scheme}://{h}")).collect();
        let mut builder = ClusterClientBuilder::new(nodes)
            .connection_timeout(CALL_TIMEOUT)
            .response_timeout(CALL_TIMEOUT)
            .retries(1);
        if let Some(u) = user {
            builder = builder.username(u);
        }
        if let Some(p) = options
            .password
            .as_ref()
            .map(|p| p.expose().to_string())
            .or(password)
        {
            builder = builder.password(p);
        }
        if let (true, Some(ca)) = (tls, &options.ca_pem) {
            builder = builder.certs(certs(ca));
        }
        return builder
            .build()
            .map(Target::Cluster)
            .map_err(|e| format!("invalid Redis cluster URL: {e}"));
    }
    if let Some(url) = multi_host_parts(&options.url, "sentinel")? {
        let service = url.path.first().cloned().ok_or(
            "a sentinel URL names the service: redis+sentinel://host:port,.../SERVICE[/DB]",
        )?;
        let db = match url.path.get(1) {
            Some(d) if !d.is_empty() && d.len() <= 9 && d.chars().all(|c| c.is_ascii_digit()) => {
                d.parse().map_err(|_| "bad database number".to_string())?
            }
            Some(_) => return Err("the database after the service must be a number".into()),
            None => 0,
        };
        let node = SentinelNodeConnectionInfo {
            tls_mode: url.tls.then_some(redis::TlsMode::Secure),
            redis_connection_info: Some(redis::RedisConnectionInfo {
                db,
                username: url.user,
                password: options
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_string())
                    .or(url.password),
                ..Default::default()
            }),
        };
        let sentinels: Vec<String> = url.hosts.iter().map(|h| format!("redis://{h}")).collect();
        let client =
            SentinelClient::build(sentinels, service, Some(node), SentinelServerType::Master)
                .map_err(|e| format!("invalid Redis sentinel URL: {e}"))?;
        return Ok(Target::Sentinel(Mutex::new(client)));
    }
    let mut info = options
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| format!("invalid Redis URL: {e}"))?;
    if let Some(p) = &options.password {
        info.redis.password = Some(p.expose().to_string());
    }
    let client = match &options.ca_pem {
        Some(ca) if options.url.starts_with("rediss://") => {
            redis::Client::build_with_tls(info, certs(ca))
        }
        _ => redis::Client::open(info),
    }
    .map_err(|e| format!("invalid Redis URL: {e}"))?;
    Ok(Target::Single(client))
}

/// Checks a Redis URL (and its options) without connecting.
pub fn check_options(options: &RedisOptions) -> Result<(), String> {
    build_target(options).map(|_| ())
}

/// Tokens in Redis.
pub struct RedisStore {
    target: Target,
    conn: Mutex<Option<Conn>>,
    /// Woken by `{prefix}:{fp}:wake` messages (standalone Redis; elsewhere waiters poll).
    wake: Arc<tokio::sync::Notify>,
    subscriber: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    prefix: String,
    sealer: Arc<Sealer>,
    metrics: Arc<Metrics>,
    save_later: Script,
    take_lease: Script,
    read_all: Script,
    delete_if_ath: Script,
    extend_if_owner: Script,
    delete_if_owner: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Milliseconds from now until `t`, at least 1 (a Redis `PX` of 0 is an error).
fn ms_until(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_millis()
        .max(1) as u64
}

impl RedisStore {
    /// Prepares the store; no connection is made until the first call.
    pub fn new(
        options: &RedisOptions,
        prefix: &str,
        sealer: Arc<Sealer>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let target = build_target(options).map_err(StoreError::Unavailable)?;
        Ok(Self {
            target,
            conn: Mutex::new(None),
            wake: Arc::new(tokio::sync::Notify::new()),
            subscriber: std::sync::Mutex::new(None),
            prefix: prefix.to_string(),
            sealer,
            metrics,
            save_later: Script::new(SAVE_LATER),
            take_lease: Script::new(TAKE_LEASE),
            read_all: Script::new(READ_ALL),
            delete_if_ath: Script::new(DELETE_IF_ATH),
            extend_if_owner: Script::new(EXTEND_IF_OWNER),
            delete_if_owner: Script::new(DELETE_IF_OWNER),
        })
    }

    /// The key prefix (`cache.key_prefix`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Runs `script` on one key with integer arguments, with the store's connection, timeout
    /// and error accounting (the gateway's spend ledger shares them).
    pub async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: &[i64],
    ) -> Result<T, StoreError> {
        self.call(|mut c| async move {
            let mut invocation = script.key(key);
            for a in args {
                invocation.arg(*a);
            }
            invocation.invoke_async(&mut c).await
        })
        .await
    }

    /// `GET key`, read as `T`.
    pub async fn get_value<T: redis::FromRedisValue>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.get(key).await
    }

    fn name(&self, key: &str, what: &str) -> String {
        format!("{}:{{{key}}}:{what}", self.prefix)
    }

    async fn connection(&self) -> Result<Conn, StoreError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let connect = async {
            match &self.target {
                Target::Single(client) => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(CALL_TIMEOUT)
                        .set_response_timeout(CALL_TIMEOUT)
                        .set_number_of_retries(1);
                    ConnectionManager::new_with_config(client.clone(), config)
                        .await
                        .map(Conn::Single)
                }
                Target::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
                // Asks the sentinels for the current primary on every (re)connect, so a
                // failover is followed at the next call after the old primary fails.
                Target::Sentinel(client) => client
                    .lock()
                    .await
                    .get_async_connection()
                    .await
                    .map(Conn::Sentinel),
            }
        };
        let conn = tokio::time::timeout(CALL_TIMEOUT * 2, connect)
            .await
            .map_err(|_| StoreError::Unavailable("Redis connect timed out".into()))?
            .map_err(|e| StoreError::Unavailable(format!("Redis: {e}")))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Runs one Redis call with the timeout. The standalone connection manager and the cluster
    /// connection reconnect by themselves and are kept; a sentinel connection is dropped after a
    /// failure so the next call asks the sentinels for the current primary.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.connection().await?;
        let result = match tokio::time::timeout(CALL_TIMEOUT, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("Redis: {e}"))),
            Err(_) => Err(StoreError::Unavailable("Redis call timed out".into())),
        };
        if result.is_err() {
            self.metrics.redis_error();
            if matches!(self.target, Target::Sentinel(_)) {
                *self.conn.lock().await = None;
            }
        }
        result
    }

    /// Starts the wake-up subscriber once (standalone Redis only); it reconnects after errors.
    fn ensure_subscriber(&self) {
        let Target::Single(client) = &self.target else {
            return;
        };
        let mut slot = self.subscriber.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let client = client.clone();
        let wake = self.wake.clone();
        let pattern = format!("{}:*:wake", self.prefix);
        *slot = Some(tokio::spawn(async move {
            use futures_util::StreamExt;
            loop {
                if let Ok(Ok(mut pubsub)) =
                    tokio::time::timeout(CALL_TIMEOUT, client.get_async_pubsub()).await
                {
                    if pubsub.psubscribe(&pattern).await.is_ok() {
                        let mut messages = pubsub.on_message();
                        while messages.next().await.is_some() {
                            wake.notify_waiters();
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }

    /// `GET name`.
    async fn get<T: redis::FromRedisValue>(&self, name: &str) -> Result<Option<T>, StoreError> {
        self.call(|mut c| async move { redis::cmd("GET").arg(name).query_async(&mut c).await })
            .await
    }

    /// `SET name value PX ttl_ms`.
    async fn set_px(&self, name: &str, value: &str, ttl_ms: u64) -> Result<(), StoreError> {
        self.call(|mut c| async move {
            redis::cmd("SET")
                .arg(name)
                .arg(value)
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut c)
                .await
        })
        .await
    }

    /// `PTTL name`: the time left, or `None` when the key is missing or has no expiry.
    async fn pttl(&self, name: &str) -> Result<Option<Duration>, StoreError> {
        let ms: i64 = self
            .call(|mut c| async move { redis::cmd("PTTL").arg(name).query_async(&mut c).await })
            .await?;
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }

    /// Opens a `expires_ms.ath.sealed` value; `None` (counted) when it does not open.
    fn open_value(&self, name: &str, value: &str) -> Option<Record> {
        let mut parts = value.splitn(3, '.');
        let opened = match (parts.next(), parts.next(), parts.next()) {
            (Some(exp), Some(_ath), Some(sealed)) => self
                .sealer
                .open(name, sealed)
                .filter(|t| exp.parse::<u64>().ok() == Some(unix_ms(t.expires_at))),
            _ => None,
        };
        if opened.is_none() {
            self.metrics.cache_unreadable_record("redis");
            tracing::warn!(key = %name, "ignoring a cached token record that does not open");
        }
        opened.filter(|t| t.expires_at > SystemTime::now())
    }

    fn prefix_of(token: &Token) -> String {
        format!("{}.{}.", unix_ms(token.expires_at), token.ath())
    }
}

/// A fleet backoff from its `until_ms|reason` value and its PTTL. The time before `|` is for
/// replicas that predate PTTL reading; this one trusts Redis's clock.
fn backoff_left(value: Option<String>, pttl: i64) -> Option<(Duration, String)> {
    let left = u64::try_from(pttl).ok().map(Duration::from_millis)?;
    let v = value?;
    let reason = v.split_once('|').map_or(v.as_str(), |(_, r)| r);
    (!left.is_zero()).then(|| (left, reason.to_string()))
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(h) = self
            .subscriber
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            h.abort();
        }
    }
}

impl TokenStore for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn wait_for_change<'a>(&'a self, _key: &'a str, limit: Duration) -> StoreFuture<'a, ()> {
        self.ensure_subscriber();
        Box::pin(async move {
            let _ = tokio::time::timeout(limit, self.wake.notified()).await;
            Ok(())
        })
    }

    fn announce<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let channel = self.name(key, "wake");
            let _: i64 = self
                .call(|mut c| async move {
                    redis::cmd("PUBLISH")
                        .arg(&channel)
                        .arg(1)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            Ok(())
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Record>> {
        Box::pin(async move {
            let name = self.name(key, "token");
            let value = self.get::<String>(&name).await?;
            Ok(value.and_then(|v| self.open_value(&name, &v)))
        })
    }

    fn lookup<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Found> {
        Box::pin(async move {
            let token = self.name(key, "token");
            let backoff = self.name(key, "backoff");
            let rejected = self.name(key, "rejected");
            let lock = self.name(key, "lock");
            type Answer = (Option<String>, Option<String>, i64, Option<String>, i64);
            let script = &self.read_all;
            let (value, backoff_value, backoff_pttl, rejected, lock): Answer = self
                .call(|mut c| {
                    let keys = [
                        token.clone(),
                        backoff.clone(),
                        rejected.clone(),
                        lock.clone(),
                    ];
                    async move {
                        let mut invocation = script.prepare_invoke();
                        for k in &keys {
                            invocation.key(k);
                        }
                        invocation.invoke_async(&mut c).await
                    }
                })
                .await?;
            Ok(Found {
                token: value.and_then(|v| self.open_value(&token, &v)),
                backoff: backoff_left(backoff_value, backoff_pttl),
                rejected,
                lease_held: Some(lock > 0),
            })
        })
    }

    fn save<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let name = self.name(key, "token");
            let sealed = self
                .sealer
                .seal(&name, token)
                .ok_or_else(|| StoreError::Unavailable("cannot seal the token record".into()))?;
            let value = zeroize::Zeroizing::new(format!("{}{sealed}", Self::prefix_of(token)));
            let ttl = ms_until(token.expires_at);
            let exp = unix_ms(token.expires_at);
            let believable = unix_ms(SystemTime::now())
                .saturating_add(u64::try_from(super::MAX_LIFETIME.as_millis()).unwrap_or(u64::MAX));
            let script = &self.save_later;
            let _: i64 = self
                .call(|mut c| async move {
                    script
                        .key(&name)
                        .arg(value.as_str())
                        .arg(exp)
                        .arg(ttl)
                        .arg(believable)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(())
        })
    }

    fn evict_if<'a>(&'a self, key: &'a str, ath: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let name = self.name(key, "token");
            let rejected = self.name(key, "rejected");
            let script = &self.delete_if_ath;
            let ttl = REJECTED_TTL.as_millis() as u64;
            let n: i64 = self
                .call(|mut c| async move {
                    script
                        .key(&name)
                        .key(&rejected)
                        .arg(ath)
                        .arg(ttl)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(n == 1)
        })
    }

    fn try_lease<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let name = self.name(key, "lock");
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            let script = &self.take_lease;
            let got: i64 = self
                .call(|mut c| async move {
                    script
                        .key(&name)
                        .arg(owner)
                        .arg(ms)
                        .arg(ms.saturating_mul(4))
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(got == 1)
        })
    }

    fn extend_lease<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let name = self.name(key, "lock");
            let ms = ttl.as_millis() as u64;
            let script = &self.extend_if_owner;
            let n: i64 = self
                .call(|mut c| async move {
                    script
                        .key(&name)
                        .arg(owner)
                        .arg(ms)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            Ok(n == 1)
        })
    }

    fn release_lease<'a>(&'a self, key: &'a str, owner: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let name = self.name(key, "lock");
            let script = &self.delete_if_owner;
            let _: i64 = self
                .call(
                    |mut c| async move { script.key(&name).arg(owner).invoke_async(&mut c).await },
                )
                .await?;
            Ok(())
        })
    }

    fn last_mint<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Duration>> {
        Box::pin(async move {
            // The ledger's age by Redis's own clock: it was written with PX = LEDGER_TTL, so
            // LEDGER_TTL - PTTL is how long ago, whatever the replicas' clocks say.
            let left = self.pttl(&self.name(key, "minted")).await?;
            Ok(left.map(|left| LEDGER_TTL.saturating_sub(left)))
        })
    }

    fn fleet_backoff<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<(Duration, String)>> {
        Box::pin(async move {
            let name = self.name(key, "backoff");
            let (value, pttl): (Option<String>, i64) = self
                .call(|mut c| {
                    let name = name.clone();
                    async move {
                        redis::pipe()
                            .cmd("GET")
                            .arg(&name)
                            .cmd("PTTL")
                            .arg(&name)
                            .query_async(&mut c)
                            .await
                    }
                })
                .await?;
            Ok(backoff_left(value, pttl))
        })
    }

    fn set_fleet_backoff<'a>(
        &'a self,
        key: &'a str,
        left: Duration,
        reason: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let until = SystemTime::now()
                .checked_add(left)
                .unwrap_or(SystemTime::now());
            let value = format!("{}|{reason}", unix_ms(until));
            let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
            self.set_px(&self.name(key, "backoff"), &value, ms).await
        })
    }

    fn record_mint<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // The value (Unix ms) is what earlier versions read; this one reads the PTTL.
            let ms = unix_ms(SystemTime::now()).to_string();
            let ttl = LEDGER_TTL.as_millis() as u64;
            self.set_px(&self.name(key, "minted"), &ms, ttl).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_host_urls_name_every_node() {
        let parts = |url: &str, kind: &str| multi_host_parts(url, kind).unwrap().unwrap();
        let c = parts(
            "redis+cluster://app:pw@10.0.0.1:7000,10.0.0.2:7001",
            "cluster",
        );
        assert!(!c.tls);
        assert_eq!(c.user.as_deref(), Some("app"));
        assert_eq!(c.password.as_deref(), Some("pw"));
        assert_eq!(c.hosts, ["10.0.0.1:7000", "10.0.0.2:7001"]);
        let c = parts("rediss+cluster://h:1", "cluster");
        assert!(c.tls && c.user.is_none() && c.password.is_none());
        assert!(multi_host_parts("redis://h:1", "cluster")
            .unwrap()
            .is_none());
        assert!(multi_host_parts("redis+cluster://", "cluster").is_err());
        let s = parts(
            "redis+sentinel://:pw@s1:26379,s2:26379/mymaster/2",
            "sentinel",
        );
        assert_eq!(s.hosts, ["s1:26379", "s2:26379"]);
        assert_eq!(s.path, ["mymaster", "2"]);
        assert_eq!(s.password.as_deref(), Some("pw"));
        assert!(s.user.is_none());
    }

    #[test]
    fn every_seed_may_carry_the_credentials_but_only_the_same_ones() {
        let c = multi_host_parts(
            "redis+cluster://u:p%40w@h1:7000,u:p%40w@h2:7001,h3:7002",
            "cluster",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.hosts, ["h1:7000", "h2:7001", "h3:7002"]);
        assert_eq!(c.user.as_deref(), Some("u"));
        assert_eq!(c.password.as_deref(), Some("p@w"));
        for (bad, expected) in [
            (
                "redis+cluster://u:pw1@h1:7000,u:pw2@h2:7001,h3:7002",
                "different user names or passwords",
            ),
            (
                "redis+cluster://h1:7000,h2:99999",
                "host 2: port must be 1 to 65535",
            ),
            ("redis+cluster://h1:7000,,h2:7001", "host 2 is empty"),
            ("redis+cluster://h1:7000/0", "no /path"),
            ("redis+cluster://h1:7000?pass=x", "no ?query"),
            ("redis+cluster://u:p/w@h1:7000", "percent-encode"),
            ("redis+sentinel://s1:26379", "names the service"),
            ("redis+sentinel://s1:26379/a/b/c", "names the service"),
        ] {
            let kind = if bad.contains("sentinel") {
                "sentinel"
            } else {
                "cluster"
            };
            let e = multi_host_parts(bad, kind).err().unwrap_or_default();
            assert!(e.contains(expected), "{bad}: {e}");
            assert!(!e.contains("pw") && !e.contains("99999"), "{bad}: {e}");
        }
    }

    #[test]
    fn options_never_show_a_password_in_debug() {
        let options = RedisOptions {
            url: "rediss://app:url-pa55word@redis.example:6380/0".into(),
            password: Some(Secret::new("file-pa55word")),
            ca_pem: None,
        };
        let shown = format!("{options:?}");
        assert!(!shown.contains("pa55word"), "{shown}");
        assert!(shown.contains("redis.example:6380"), "{shown}");
    }

    #[test]
    fn options_are_checked_without_connecting() {
        let ok = |url: &str| {
            check_options(&RedisOptions {
                url: url.into(),
                ..RedisOptions::default()
            })
        };
        assert!(ok("redis://127.0.0.1:6379/0").is_ok());
        assert!(ok("rediss://user:pw@redis.example:6380/1").is_ok());
        assert!(ok("redis+cluster://a:1,b:2").is_ok());
        assert!(ok("redis+sentinel://a:26379,b:26379/mymaster").is_ok());
        assert!(ok("redis+sentinel://a:26379").is_err());
        assert!(ok("http://nope").is_err());
    }
}
