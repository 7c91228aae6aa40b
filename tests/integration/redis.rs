//! The Redis token cache: the store suite, a fleet of real proxy processes sharing one Redis,
//! restarts, the hot path, encryption, and Redis outages.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use tango_auth_proxy::metrics::Metrics;
use tango_auth_proxy::token::store::TokenStore;
use tango_auth_proxy::token::{RedisOptions, RedisStore, Sealer};

use crate::store::token;
use crate::support::*;

fn key_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("cache-key");
    std::fs::write(
        &p,
        base64::engine::general_purpose::STANDARD.encode([3u8; 32]),
    )
    .unwrap();
    p
}

/// `toml` with a `[cache]` section for Redis at `redis_url`, sealed with `key`.
fn with_redis_cache(toml: &str, redis_url: &str, key: &Path) -> String {
    toml.replace(
        "[profiles.default]",
        &format!(
            "[cache]\nbackend = \"redis\"\nredis_url = \"{redis_url}\"\nencryption_key_file = \"{}\"\n[profiles.default]",
            key.display()
        ),
    )
}

/// A service-account proxy config using `redis` as its cache, with encryption.
fn fleet_toml(mock_url: &str, redis: &RedisServer, key: &Path) -> String {
    with_redis_cache(
        &oauth_toml(mock_url, "service_account", ""),
        &redis.url(),
        key,
    )
}

#[tokio::test]
async fn redis_passes_the_store_suite_and_keeps_tokens_sealed() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let none: [&Path; 0] = [];
    let metrics = Arc::new(Metrics::new());
    let options = RedisOptions {
        url: redis.url(),
        ..RedisOptions::default()
    };
    let plain = RedisStore::new(
        &options,
        "plain",
        Arc::new(Sealer::plaintext()),
        metrics.clone(),
    )
    .unwrap();
    crate::store::store_suite(&plain).await;
    let sealed = RedisStore::new(
        &options,
        "sealed",
        Arc::new(Sealer::from_files(&key, &none).unwrap()),
        metrics.clone(),
    )
    .unwrap();
    crate::store::store_suite(&sealed).await;

    // The raw value holds no token; its TTL is the token's remaining life; tampering is a miss.
    sealed
        .save("fp", &token("redis-raw-token", 100))
        .await
        .unwrap();
    let raw: String = redis.cmd(&["GET", "sealed:{fp}:token"]);
    assert!(!raw.contains("redis-raw-token"), "{raw}");
    let ttl: i64 = redis.cmd(&["PTTL", "sealed:{fp}:token"]);
    assert!((90_000..=100_000).contains(&ttl), "{ttl}");
    let tampered = format!("{}A", &raw[..raw.len() - 1]).replace("AA", "AB");
    let tampered = if tampered == raw {
        format!("{raw}x")
    } else {
        tampered
    };
    // A rotated key still opens the record.
    let new_key = dir.path().join("new-key");
    std::fs::write(
        &new_key,
        base64::engine::general_purpose::STANDARD.encode([4u8; 32]),
    )
    .unwrap();
    let rotated = RedisStore::new(
        &options,
        "sealed",
        Arc::new(Sealer::from_files(&new_key, &[&key]).unwrap()),
        metrics.clone(),
    )
    .unwrap();
    assert_eq!(
        rotated
            .load("fp")
            .await
            .unwrap()
            .unwrap()
            .access_token
            .expose(),
        "redis-raw-token"
    );
    let _: () = redis.cmd(&["SET", "sealed:{fp}:token", &tampered]);
    assert!(sealed.load("fp").await.unwrap().is_none());
    assert!(metrics
        .encode()
        .contains(r#"tango_proxy_cache_unreadable_records_total{backend="redis"} 1"#));

    // A waiter is woken by another process's announcement, long before its limit.
    let waiter = Arc::new(
        RedisStore::new(
            &options,
            "sealed",
            Arc::new(Sealer::plaintext()),
            metrics.clone(),
        )
        .unwrap(),
    );
    let w = waiter.clone();
    // Subscribe first, then announce until the waiter returns.
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        w.wait_for_change("fp", Duration::from_secs(60))
            .await
            .unwrap();
        started.elapsed()
    });
    let announced_at = Instant::now();
    while !waiting.is_finished() {
        sealed.announce("fp").await.unwrap();
        assert!(
            announced_at.elapsed() < Duration::from_secs(30),
            "the waiter was never woken"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(waiting.await.unwrap() < Duration::from_secs(30));

    // Leases: one owner at a time, released only by the owner.
    let ttl = Duration::from_secs(5);
    assert!(sealed.try_lease("fp", "a", ttl).await.unwrap());
    assert!(!sealed.try_lease("fp", "b", ttl).await.unwrap());
    sealed.release_lease("fp", "b").await.unwrap();
    assert!(!sealed.try_lease("fp", "b", ttl).await.unwrap());
    assert!(sealed.extend_lease("fp", "a", ttl).await.unwrap());
    sealed.release_lease("fp", "a").await.unwrap();
    assert!(sealed.try_lease("fp", "b", ttl).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_eight_mints_one_token_and_restarts_mint_none() {
    let redis = RedisServer::start();
    let (mock, url) = start_mock(mock_config(1.0)).await;
    // The token answer is slow, so every process wants a token while the first mint runs.
    mock.fail_token_requests(
        tango_auth_proxy::mock::FailMode::Slow(Duration::from_millis(800)),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, fleet_toml(&url, &redis, &key_file(dir.path()))).unwrap();

    for round in 0..2 {
        let fleet: Vec<ProxyProcess> = (0..8)
            .map(|_| ProxyProcess::start(&cfg, &[("RUST_LOG", "info")]))
            .collect();
        let urls = (0..400)
            .map(|i| format!("{}/raas/v2/catalogs", fleet[i % 8].url()))
            .collect();
        for status in concurrent_gets(urls).await {
            assert_eq!(status, 200, "round {round}");
        }
        let stats = mock.stats();
        assert_eq!(stats.total_token_requests(), 1, "round {round}: {stats:?}");
        if round == 0 {
            // Processes that started while the first mint ran waited on its lease.
            let mut waits = 0;
            for p in &fleet {
                let text = get_text(&format!("http://{}/metrics", p.admin_addr)).await;
                waits += text
                    .lines()
                    .find(|l| l.starts_with("tango_proxy_lease_waits_total"))
                    .and_then(|l| l.split_whitespace().last())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            assert!(waits >= 1, "no process waited on the refresh lease");
        }
        for p in fleet {
            let (code, _) = p.terminate();
            assert_eq!(code, 0);
        }
    }
}

#[tokio::test]
async fn the_hot_path_sends_no_redis_command_per_request() {
    let redis = RedisServer::start();
    let (_mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    // No periodic check during the run: every command counted would be the requests' doing.
    let toml = fleet_toml(&url, &redis, &key_file(dir.path())).replace(
        "[profiles.default]",
        "check_interval = \"1h\"\n[profiles.default]",
    );
    let proxy = TestProxy::start(&toml).await;
    proxy.wait_ready().await;
    // Let the background writes after the first mint land first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = redis.total_calls();
    let c = client();
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..20 {
        let c = c.clone();
        let url = format!("{}/raas/v2/catalogs", proxy.url);
        handles.push(tokio::spawn(async move {
            for _ in 0..500 {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200, "worker {w}");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let after = redis.total_calls();
    // INFO itself is the only command: nothing per request.
    assert!(
        after - before <= 2,
        "{} Redis commands for 10,000 requests in {:?}",
        after - before,
        started.elapsed()
    );
}

#[tokio::test]
async fn redis_down_at_start_then_back_gets_the_token_written_back() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    // Redis is not running yet: the proxy mints in-process and serves.
    let placeholder = format!("redis://127.0.0.1:{port}/0");
    let toml = with_redis_cache(&oauth_toml(&url, "service_account", ""), &placeholder, &key);
    let first = TestProxy::start(&toml).await;
    first.wait_ready().await;
    for _ in 0..20 {
        assert_eq!(first.get("/raas/v2/catalogs").await.status(), 200);
    }
    let status = first.status().await;
    assert_eq!(
        status["profiles"]["default"]["token"]["cache_degraded"], true,
        "{status}"
    );

    // Redis comes back empty; the token is written back within a few seconds and the cache is
    // reported healthy again.
    let redis = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let tokens: Vec<String> = redis.cmd(&["KEYS", "*:token"]);
        let degraded =
            first.status().await["profiles"]["default"]["token"]["cache_degraded"] == true;
        if !tokens.is_empty() && !degraded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the token was never written back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A new process now finds it and mints nothing.
    let second = TestProxy::start(&toml).await;
    second.wait_ready().await;
    assert_eq!(second.get("/raas/v2/catalogs").await.status(), 200);
    assert_eq!(mock.stats().total_token_requests(), 1);
}

#[tokio::test]
async fn redis_killed_mid_load_costs_no_request_and_gets_the_token_back_when_it_returns() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = fleet_toml(&url, &redis, &key_file(dir.path()));
    let proxy = TestProxy::start(&toml).await;
    proxy.wait_ready().await;
    for i in 0..300 {
        if i == 100 {
            redis.kill();
        }
        let status = proxy.get("/raas/v2/catalogs").await.status();
        assert_eq!(status, 200, "request {i}");
    }
    // Redis comes back empty: the running proxy notices and writes its token back.
    let redis = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n: i64 = redis.cmd(&["DBSIZE"]);
        if n > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the token was never written back"
        );
        assert_eq!(proxy.get("/raas/v2/catalogs").await.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A cold process then mints nothing.
    let cold = TestProxy::start(&toml).await;
    cold.wait_ready().await;
    assert_eq!(cold.get("/raas/v2/catalogs").await.status(), 200);
    assert_eq!(mock.stats().total_token_requests(), 1);
}

#[tokio::test]
async fn a_dead_lease_holder_is_replaced_after_the_lease_expires() {
    let redis = RedisServer::start();
    let (mock, url) = start_mock(mock_config(1.0)).await;
    // The first token request hangs for 5 s; the holder is killed meanwhile.
    mock.fail_token_requests(
        tango_auth_proxy::mock::FailMode::Slow(Duration::from_secs(5)),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    // token_timeout 2 s: a lease lives 4 s unless its holder extends it.
    let toml = fleet_toml(&url, &redis, &key_file(dir.path())).replace(
        "[profiles.default]\n",
        "[profiles.default]\ntoken_timeout = \"2s\"\n",
    );
    std::fs::write(&cfg, toml).unwrap();
    let mut holder = ProxyProcess::start(&cfg, &[("RUST_LOG", "info")]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.stats().total_token_requests() == 0 {
        assert!(
            Instant::now() < deadline,
            "the holder never asked for a token"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = holder.child.kill();
    let _ = holder.child.wait();
    let killed_at = Instant::now();

    let other = ProxyProcess::start(&cfg, &[("RUST_LOG", "info")]);
    let c = client();
    loop {
        let r = c
            .get(format!("http://{}/readyz", other.admin_addr))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "no token within lease + delay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = c
        .get(format!("{}/raas/v2/catalogs", other.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The dead holder's request plus one replacement: exactly one extra.
    assert_eq!(mock.stats().total_token_requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_fleet_asks_once_and_backs_off_together() {
    let redis = RedisServer::start();
    // Client credentials, one token per (scaled) 20 h, 6 s tokens; min_token_interval 20 h.
    let (mock, url) = start_mock(mock_config(6.0 / 300.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    let toml = with_redis_cache(
        &oauth_toml(
            &url,
            "client_credentials",
            &format!("audience = \"{FIVE_MINUTE_AUDIENCE}\"\ntoken_timeout = \"2s\""),
        ),
        &redis.url(),
        &key_file(dir.path()),
    );
    std::fs::write(&cfg, toml).unwrap();
    let fleet: Vec<ProxyProcess> = (0..4)
        .map(|_| ProxyProcess::start(&cfg, &[("RUST_LOG", "info")]))
        .collect();
    let c = client();
    let start = Instant::now();
    let mut saw_503 = false;
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(9) {
        let resp = c
            .get(format!("{}/raas/v2/catalogs", fleet[i % 4].url()))
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => assert!(!saw_503, "a 200 after the fleet token became unusable"),
            503 => saw_503 = true,
            other => panic!("unexpected {other}"),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_503, "the token never became unusable");
    // One mint, one refused renewal, and the rest of the fleet stayed quiet.
    let stats = mock.stats();
    assert_eq!(stats.token_requests["client_credentials"], 2, "{stats:?}");
    for p in &fleet {
        let status = get_json(&format!("http://{}/status", p.admin_addr)).await;
        let token = &status["profiles"]["default"]["token"];
        assert!(
            token["last_error"]
                .as_str()
                .unwrap_or_default()
                .contains("rate limit"),
            "{status}"
        );
        assert!(
            token["retry_in_seconds"].as_u64().unwrap() >= 30,
            "{status}"
        );
    }
    for p in fleet {
        p.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_three_master_cluster_the_fleet_mints_once_and_restarts_mint_none() {
    let cluster = RedisCluster::start();
    let options = RedisOptions {
        url: cluster.url(),
        ..RedisOptions::default()
    };
    let metrics = Arc::new(Metrics::new());
    crate::store::store_suite(
        &RedisStore::new(&options, "suite", Arc::new(Sealer::plaintext()), metrics).unwrap(),
    )
    .await;

    let (mock, url) = start_mock(mock_config(1.0)).await;
    mock.fail_token_requests(
        tango_auth_proxy::mock::FailMode::Slow(Duration::from_millis(600)),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    let toml = with_redis_cache(
        &oauth_toml(&url, "service_account", ""),
        &cluster.url(),
        &key_file(dir.path()),
    );
    std::fs::write(&cfg, toml).unwrap();
    for round in 0..2 {
        let fleet: Vec<ProxyProcess> = (0..3)
            .map(|_| ProxyProcess::start(&cfg, &[("RUST_LOG", "info")]))
            .collect();
        let urls = (0..150)
            .map(|i| format!("{}/raas/v2/catalogs", fleet[i % 3].url()))
            .collect();
        for status in concurrent_gets(urls).await {
            assert_eq!(status, 200, "round {round}");
        }
        assert_eq!(mock.stats().total_token_requests(), 1, "round {round}");
        for p in fleet {
            assert_eq!(p.terminate().0, 0);
        }
    }
}

#[tokio::test]
async fn rediss_with_an_extra_ca_and_a_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, cert_pem, key_pem) = private_ca_cert_and_key();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (ca, cert, key) = (
        write("ca.pem", &ca_pem),
        write("cert.pem", &cert_pem),
        write("key.pem", &key_pem),
    );
    let password = write("redis-password", "s3cret-redis-pass\n");
    let server = RedisServer::start_tls(&cert, &key, &ca, "s3cret-redis-pass");
    let toml = format!(
        "[cache]\nbackend = \"redis\"\nredis_url = \"rediss://127.0.0.1:{}/0\"\nredis_ca_file = \"{}\"\nredis_password_file = \"{}\"\n[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n",
        server.port,
        ca.display(),
        password.display()
    );
    let config =
        tango_auth_proxy::config::Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.to_redacted_toml().contains("s3cret-redis-pass"));
    let store = RedisStore::new(
        &config.cache.redis,
        "tls",
        Arc::new(Sealer::plaintext()),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    crate::store::store_suite(&store).await;

    // Without the CA, the server's certificate is not trusted.
    let mut untrusted = config.cache.redis.clone();
    untrusted.ca_pem = None;
    let store = RedisStore::new(
        &untrusted,
        "tls",
        Arc::new(Sealer::plaintext()),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    assert!(store.load("fp").await.is_err());
}

#[tokio::test]
async fn through_sentinel_the_store_reaches_the_primary_and_a_fleet_shares_it() {
    let sentinel = RedisSentinel::start();
    let options = RedisOptions {
        url: sentinel.url(),
        ..RedisOptions::default()
    };
    crate::store::store_suite(
        &RedisStore::new(
            &options,
            "sentinel",
            Arc::new(Sealer::plaintext()),
            Arc::new(Metrics::new()),
        )
        .unwrap(),
    )
    .await;

    let (mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = with_redis_cache(
        &oauth_toml(&url, "service_account", ""),
        &sentinel.url(),
        &key_file(dir.path()),
    );
    let first = TestProxy::start(&toml).await;
    first.wait_ready().await;
    let second = TestProxy::start(&toml).await;
    second.wait_ready().await;
    assert_eq!(first.get("/raas/v2/catalogs").await.status(), 200);
    assert_eq!(second.get("/raas/v2/catalogs").await.status(), 200);
    assert_eq!(mock.stats().total_token_requests(), 1);
    // The record lives on the primary the sentinel names.
    let keys: Vec<String> = sentinel.primary.cmd(&["KEYS", "tango-auth-proxy:*:token"]);
    assert_eq!(keys.len(), 1, "{keys:?}");
}

#[tokio::test]
async fn without_redis_each_process_renews_at_most_once() {
    let mut redis = RedisServer::start();
    // 6 s tokens: renewal from 4.5 s.
    let (mock, url) = start_mock(mock_config(6.0 / 300.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = fleet_toml(&url, &redis, &key_file(dir.path())).replace(
        "[profiles.default]\n",
        &format!("[profiles.default]\naudience = \"{FIVE_MINUTE_AUDIENCE}\"\n"),
    );
    let mut fleet = Vec::new();
    for _ in 0..3 {
        let p = TestProxy::start(&toml).await;
        p.wait_ready().await;
        fleet.push(p);
    }
    assert_eq!(mock.stats().total_token_requests(), 1);
    redis.kill();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(8) {
        let status = fleet[i % 3].get("/raas/v2/catalogs").await.status();
        assert_eq!(status, 200, "request {i}");
        i += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // The cold mint, then at most one renewal per process while they cannot coordinate.
    let calls = mock.stats().total_token_requests();
    assert!((2..=4).contains(&calls), "{calls} token requests");
    for p in &fleet {
        let status = p.status().await;
        assert_eq!(
            status["profiles"]["default"]["token"]["cache_degraded"], true,
            "{status}"
        );
    }
}

#[tokio::test]
async fn after_a_revocation_a_peers_equally_dead_token_is_replaced_before_the_app_sees_a_401() {
    // Tango invalidates every token at once (credentials deactivated) while two replicas hold
    // different ones: the shared record was lost (a Redis outage does that) and the second
    // replica minted its own.
    let redis = RedisServer::start();
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    // The first replica never looks at the shared copy on its own before the revocation.
    let toml = fleet_toml(&url, &redis, &key_file(dir.path()))
        .replace("[cache]\n", "[cache]\ncheck_interval = \"1h\"\n");
    let first = TestProxy::start(&toml).await;
    first.wait_ready().await;
    assert_eq!(first.get("/raas/v2/catalogs").await.status(), 200);
    let _: () = redis.cmd(&["FLUSHALL"]);
    let second = TestProxy::start(&toml).await;
    second.wait_ready().await;
    assert_eq!(second.get("/raas/v2/catalogs").await.status(), 200);
    assert_eq!(
        mock.stats().total_token_requests(),
        2,
        "two different tokens"
    );

    mock.revoke_all();
    // The first replica's token is refused; the cache offers the second's, newer and not known
    // to be refused, so it is adopted — and refused too. Then one mint, and the app gets 200.
    let resp = first.get("/raas/v2/catalogs").await;
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    assert_eq!(
        mock.stats().total_token_requests(),
        3,
        "one mint for the revocation"
    );
    assert_eq!(second.get("/raas/v2/catalogs").await.status(), 200);
}
