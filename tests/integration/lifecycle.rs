//! The token lifecycle in an incident, against the real binary: a replica starting inside the
//! refresh window, absurd lifetimes, each class of 401, a Redis that accepts connections but
//! never answers, and a healthy fleet that leaves Redis alone between renewals.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use tango_auth_proxy::mock::FailMode;

use crate::dpop::{dpop_toml, keygen};
use crate::support::*;

/// `toml` with a plaintext Redis cache section (records readable by the test).
fn redis_cache(toml: &str, redis: &RedisServer, extra: &str) -> String {
    toml.replace(
        "[profiles.default]",
        &format!(
            "[cache]\nbackend = \"redis\"\nredis_url = \"{}\"\n{extra}\n[profiles.default]",
            redis.url()
        ),
    )
}

/// `toml` (from `oauth_toml(token_base, ..)`) sending API calls to `upstream` instead.
fn api_upstream(toml: &str, token_base: &str, upstream: &str) -> String {
    toml.replace(
        &format!("url = \"{token_base}\"\nallow_http"),
        &format!("url = \"{upstream}\"\nallow_http"),
    )
}

fn write_config(dir: &tempfile::TempDir, toml: &str) -> std::path::PathBuf {
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// Polls `/readyz` until 200 or `limit`.
async fn ready_within(admin: SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(r) = client().get(format!("http://{admin}/readyz")).send().await {
            if r.status() == 200 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Rewrites the one shared token record so that it expires in `left` (for a 24 h token, 3 h
/// left is inside its 4 h refresh window). The token itself stays valid at the mock.
fn move_shared_token_to(redis: &RedisServer, left: Duration) {
    let keys: Vec<String> = redis.cmd(&["KEYS", "tango-auth-proxy:*:token"]);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let value: String = redis.cmd(&["GET", &keys[0]]);
    let mut parts = value.splitn(3, '.');
    let (_, ath, sealed) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let json = B64.decode(sealed.strip_prefix("tap0.").unwrap()).unwrap();
    let mut record: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let expires = now_ms() + left.as_millis() as u64;
    record["expires_at_ms"] = expires.into();
    let rewritten = format!("{expires}.{ath}.tap0.{}", B64.encode(record.to_string()));
    let _: () = redis.cmd(&[
        "SET",
        &keys[0],
        &rewritten,
        "PX",
        &left.as_millis().to_string(),
    ]);
}

async fn get_status(p: &ProxyProcess, path: &str) -> u16 {
    client()
        .get(format!("{}{path}", p.url()))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn admin_json(p: &ProxyProcess, path: &str) -> serde_json::Value {
    get_json(&format!("http://{}{path}", p.admin_addr)).await
}

/// Runs replica A until it has minted and shared its token, stops it, then moves the shared
/// token into its refresh window (3 h of 24 h left): what a replica started in the last hours
/// of the fleet's token finds.
async fn shared_token_in_its_window(redis: &RedisServer, toml: &str, dir: &tempfile::TempDir) {
    let a = ProxyProcess::start(&write_config(dir, toml), &[]);
    assert!(ready_within(a.admin_addr, Duration::from_secs(10)).await);
    assert_eq!(get_status(&a, "/raas/v2/catalogs").await, 200);
    // The record is written in the background right after the mint.
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis
        .cmd::<Vec<String>>(&["KEYS", "tango-auth-proxy:*:token"])
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "replica A never shared its token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.terminate().0, 0);
    move_shared_token_to(redis, Duration::from_secs(3 * 3600));
}

#[tokio::test]
async fn a_replica_starting_inside_the_window_serves_the_shared_token_while_the_endpoint_fails() {
    let redis = RedisServer::start();
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = redis_cache(&oauth_toml(&url, "service_account", ""), &redis, "");
    shared_token_in_its_window(&redis, &toml, &dir).await;
    // Tango's auth server goes down; a rollout starts replica B.
    mock.fail_token_requests(FailMode::ServerError, 10_000);
    let b = ProxyProcess::start(&write_config(&dir, &toml), &[]);
    // Its very first request is served with the shared token...
    for _ in 0..5 {
        assert_eq!(get_status(&b, "/raas/v2/catalogs").await, 200);
    }
    // ...and it is ready, although its own renewal attempts fail.
    let readyz = client()
        .get(format!("http://{}/readyz", b.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 200, "{}", admin_json(&b, "/status").await);
    assert_eq!(mock.stats().tokens_issued, 1);
    assert_eq!(b.terminate().0, 0);
}

#[tokio::test]
async fn a_replica_starting_inside_the_window_mints_nothing_under_the_mint_budget() {
    let redis = RedisServer::start();
    // Client credentials: one token per 20 h at the mock; default min_token_interval.
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = redis_cache(&oauth_toml(&url, "client_credentials", ""), &redis, "");
    shared_token_in_its_window(&redis, &toml, &dir).await;
    let b = ProxyProcess::start(&write_config(&dir, &toml), &[]);
    for _ in 0..5 {
        assert_eq!(get_status(&b, "/raas/v2/catalogs").await, 200);
    }
    // Give a wrongly eager renewal time to happen.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mock.stats().total_token_requests(), 1, "{:?}", mock.stats());
    let status = admin_json(&b, "/status").await;
    assert_eq!(
        status["profiles"]["default"]["token"]["mints"], 0,
        "{status}"
    );
    assert_eq!(b.terminate().0, 0);
}

/// A token endpoint that always answers `body`; returns its base URL and a call counter.
async fn fixed_token_endpoint(body: String) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().route(
        "/oauth/token",
        axum::routing::post(move || {
            let counter = counter.clone();
            let body = body.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                ([("content-type", "application/json")], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), calls)
}

fn jwt_with_exp(exp: &str) -> String {
    format!(
        "{}.{}.sig",
        B64.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
        B64.encode(format!(r#"{{"sub":"svc","exp":{exp}}}"#))
    )
}

#[tokio::test]
async fn absurd_token_lifetimes_are_ignored_with_a_warning_and_the_token_is_used() {
    let upstream = FakeUpstream::start().await;
    let cases = [
        ("tok-absurd-1".to_string(), "1e300", "expires_in"),
        (
            "tok-absurd-2".to_string(),
            "18446744073709551615",
            "expires_in",
        ),
        (jwt_with_exp("1e300"), "0", "jwt_exp"),
    ];
    for (token, expires_in, hint) in cases {
        let body = format!(
            r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{expires_in}}}"#
        );
        let (base, calls) = fixed_token_endpoint(body).await;
        let dir = tempfile::tempdir().unwrap();
        let toml = api_upstream(
            &oauth_toml(&base, "service_account", "token_timeout = \"2s\""),
            &base,
            &upstream.url(),
        );
        let p = ProxyProcess::start(&write_config(&dir, &toml), &[]);
        assert_eq!(
            get_status(&p, "/raas/v2/catalogs").await,
            200,
            "{expires_in}"
        );
        assert_eq!(
            upstream.last().headers["authorization"],
            format!("Bearer {token}").as_str()
        );
        // The documented 24 h of the default audience was used instead.
        let status = admin_json(&p, "/status").await;
        let left = status["profiles"]["default"]["token"]["seconds_left"]
            .as_u64()
            .unwrap();
        assert!((86_000..=86_400).contains(&left), "{status}");
        let metrics = get_text(&format!("http://{}/metrics", p.admin_addr)).await;
        let line = format!(
            "tango_proxy_token_lifetime_ignored_total{{profile=\"default\",hint=\"{hint}\"}} 1"
        );
        assert!(metrics.contains(&line), "{metrics}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let (code, logs) = p.terminate();
        assert_eq!(code, 0);
        assert!(
            logs.lines()
                .any(|l| l.contains("WARN") && l.contains("over 400 days")),
            "{logs}"
        );
        assert!(!logs.contains("panicked"), "{logs}");
    }
}

/// The requests the fake upstream saw on `path`, with their Authorization and DPoP headers.
fn seen_on(upstream: &FakeUpstream, path: &str) -> Vec<(String, String)> {
    upstream
        .requests()
        .into_iter()
        .filter(|r| r.uri.ends_with(path))
        .map(|r| {
            let h = |n: &str| {
                r.headers
                    .get(n)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default()
            };
            (h("authorization"), h("dpop"))
        })
        .collect()
}

fn proof_nonce(proof: &str) -> Option<String> {
    let claims: serde_json::Value =
        serde_json::from_slice(&B64.decode(proof.split('.').nth(1).unwrap()).unwrap()).unwrap();
    claims["nonce"].as_str().map(str::to_string)
}

#[tokio::test]
async fn each_class_of_401_is_handled_by_its_www_authenticate() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keygen(dir.path(), "ES256");
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let p = ProxyProcess::start(
        &write_config(&dir, &dpop_toml(&url, &upstream.url(), &key)),
        &[],
    );
    let tokens = || mock.stats().total_token_requests();

    // A refused proof (a skewed clock): one replay with a fresh proof, the token kept.
    assert_eq!(get_status(&p, "/raas/v2/401/invalid_dpop_proof").await, 401);
    let seen = seen_on(&upstream, "/401/invalid_dpop_proof");
    assert_eq!(seen.len(), 2, "exactly one replay");
    assert_eq!(seen[0].0, seen[1].0, "same token");
    assert_ne!(seen[0].1, seen[1].1, "a new proof");
    assert_eq!(tokens(), 1, "no mint for a refused proof");

    // A nonce challenge: one replay carrying the nonce, the token kept.
    assert_eq!(get_status(&p, "/raas/v2/401/use_dpop_nonce").await, 401);
    let seen = seen_on(&upstream, "/401/use_dpop_nonce");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0, seen[1].0);
    assert_eq!(proof_nonce(&seen[1].1).as_deref(), Some("upstream-nonce-1"));
    assert_eq!(tokens(), 1);

    // A refused token: evicted, one mint, one replay with the new token.
    assert_eq!(get_status(&p, "/raas/v2/401/invalid_token").await, 401);
    let seen = seen_on(&upstream, "/401/invalid_token");
    assert_eq!(seen.len(), 2);
    assert_ne!(seen[0].0, seen[1].0, "the replay uses a new token");
    assert_eq!(tokens(), 2);
    let (code, logs) = p.terminate();
    assert_eq!(code, 0);
    assert_eq!(
        logs.lines()
            .filter(|l| l.contains("invalid_dpop_proof") && l.contains("clock"))
            .count(),
        1,
        "one clock-skew warning: {logs}"
    );

    // A Bearer profile sends no proof, so every 401 costs it the token: without a challenge, or
    // with a DPoP challenge ("another scheme") even beside a Bearer one.
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let toml = api_upstream(
        &oauth_toml(&url, "service_account", ""),
        &url,
        &upstream.url(),
    );
    let p = ProxyProcess::start(&write_config(&dir, &toml), &[]);
    let resp = client()
        .get(format!("{}/raas/v2/401/none", p.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Tango gave no challenge: the app gets one in the scheme of the profile's credential.
    assert_eq!(
        resp.headers()["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    let seen = seen_on(&upstream, "/401/none");
    assert_eq!(seen.len(), 2);
    assert_ne!(seen[0].0, seen[1].0);
    assert_eq!(mock.stats().total_token_requests(), 2);
    assert_eq!(p.terminate().0, 0);
    // (A second refusal within 10 s of that replacement would be passed on: a fresh replica.)
    let p = ProxyProcess::start(&write_config(&dir, &toml), &[]);
    assert_eq!(get_status(&p, "/raas/v2/401/use_dpop_nonce").await, 401);
    let seen = seen_on(&upstream, "/401/use_dpop_nonce");
    assert_eq!(seen.len(), 4, "one replay");
    assert_ne!(seen[2].0, seen[3].0, "with a new token");
    assert_eq!(seen[3].1, "", "and no proof");
    assert_eq!(mock.stats().total_token_requests(), 4);
    assert_eq!(p.terminate().0, 0);
}

#[tokio::test]
async fn a_redis_that_accepts_but_never_answers_costs_the_first_request_under_three_seconds() {
    let redis = RedisServer::start();
    redis.freeze(true);
    let (_mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = redis_cache(&oauth_toml(&url, "service_account", ""), &redis, "");
    let cfg = write_config(&dir, &toml);
    let started = Instant::now();
    let p = ProxyProcess::start(&cfg, &[]);
    assert_eq!(get_status(&p, "/raas/v2/catalogs").await, 200);
    let first = started.elapsed();
    assert!(
        first < Duration::from_secs(3),
        "first answer after {first:?}"
    );
    // Later requests are served from memory, without waiting on Redis.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(get_status(&p, "/raas/v2/catalogs").await, 200);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    let status = admin_json(&p, "/status").await;
    assert_eq!(status["cache"]["healthy"], false, "{status}");
    assert_eq!(
        status["profiles"]["default"]["token"]["cache_degraded"], true,
        "{status}"
    );
    let metrics = get_text(&format!("http://{}/metrics", p.admin_addr)).await;
    assert!(
        metrics.contains("tango_proxy_cache_degraded{profile=\"default\"} 1"),
        "{metrics}"
    );
    // Redis answers again: the token is written back and the cache reported healthy.
    redis.freeze(false);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = admin_json(&p, "/status").await;
        let keys: Vec<String> = redis.cmd(&["KEYS", "tango-auth-proxy:*:token"]);
        if status["cache"]["healthy"] == true && keys.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(p.terminate().0, 0);
}

#[tokio::test]
async fn a_healthy_replica_writes_nothing_to_redis_and_logs_nothing_between_renewals() {
    let redis = RedisServer::start();
    let (_mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = redis_cache(
        &oauth_toml(&url, "service_account", ""),
        &redis,
        "check_interval = \"200ms\"",
    );
    let p = ProxyProcess::start(&write_config(&dir, &toml), &[]);
    assert_eq!(get_status(&p, "/raas/v2/catalogs").await, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Commands a script runs are counted under their own names too, so reads done by the
    // read script show up as GETs and any write as a SET, DEL, PEXPIRE or PUBLISH.
    let writes = || redis.calls_of(&["set", "del", "publish", "pexpire"]);
    let reads = || redis.calls_of(&["get"]);
    let logged = p.logs.lock().unwrap().lines().count();
    let (w0, r0) = (writes(), reads());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (w1, r1) = (writes(), reads());
    assert_eq!(w1, w0, "writes to Redis between renewals");
    assert!(
        r1 >= r0 + 5,
        "the shared copy was not checked: {r0} -> {r1} reads"
    );
    let (code, logs) = p.terminate();
    assert_eq!(code, 0);
    // Between the first request and shutdown: nothing about the cache.
    let quiet: Vec<&str> = logs
        .lines()
        .skip(logged)
        .filter(|l| l.contains("cache") || l.contains("writing it back"))
        .collect();
    assert!(quiet.is_empty(), "{quiet:?}");
}

#[tokio::test]
async fn a_token_one_replica_saw_rejected_is_dropped_by_the_others_and_never_written_back() {
    let redis = RedisServer::start();
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = redis_cache(
        &oauth_toml(&url, "service_account", ""),
        &redis,
        "check_interval = \"200ms\"",
    );
    let a = ProxyProcess::start(&write_config(&dir, &toml), &[]);
    assert_eq!(get_status(&a, "/raas/v2/catalogs").await, 200);
    let b = ProxyProcess::start(&write_config(&dir, &toml), &[]);
    assert_eq!(get_status(&b, "/raas/v2/catalogs").await, 200);
    assert_eq!(mock.stats().tokens_issued, 1, "B adopted A's token");
    // The credentials are deactivated: B's next request is refused, B evicts the token and
    // mints one replacement.
    mock.revoke_all();
    assert_eq!(get_status(&b, "/raas/v2/catalogs").await, 200);
    assert_eq!(mock.stats().tokens_issued, 2);
    // A learns of it from the store within a check or two: it neither writes the refused token
    // back nor sends it to Tango again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused_before = mock.stats().credentials.get("bearer-invalid").copied();
    for _ in 0..5 {
        assert_eq!(get_status(&a, "/raas/v2/catalogs").await, 200);
    }
    assert_eq!(
        mock.stats().credentials.get("bearer-invalid").copied(),
        refused_before,
        "A still used the refused token"
    );
    assert_eq!(mock.stats().tokens_issued, 2, "A adopted B's replacement");
    for p in [a, b] {
        let (code, logs) = p.terminate();
        assert_eq!(code, 0);
        assert!(!logs.contains("lost the token"), "{logs}");
    }
}

#[tokio::test]
async fn garbage_under_the_fleet_keys_neither_blocks_nor_pins_minting() {
    let redis = RedisServer::start();
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = redis_cache(&oauth_toml(&url, "service_account", ""), &redis, "");
    let a = ProxyProcess::start(&write_config(&dir, &toml), &[]);
    assert_eq!(get_status(&a, "/raas/v2/catalogs").await, 200);
    assert_eq!(a.terminate().0, 0);
    let keys: Vec<String> = redis.cmd(&["KEYS", "tango-auth-proxy:*:token"]);
    let base = keys[0].trim_end_matches(":token").to_string();
    // Records no replica could have written: a token "expiring" in 3 billion years with no TTL,
    // a lock with no TTL, a hash where the backoff belongs.
    let _: () = redis.cmd(&[
        "SET",
        &format!("{base}:token"),
        "99999999999999999999999999.x.tap0.garbage",
    ]);
    let _: () = redis.cmd(&["SET", &format!("{base}:lock"), "garbage-owner"]);
    let _: () = redis.cmd(&["HSET", &format!("{base}:backoff"), "f", "v"]);
    // A cold replica still gets a token at once, and replaces the garbage with it...
    let b = ProxyProcess::start(&write_config(&dir, &toml), &[]);
    assert_eq!(get_status(&b, "/raas/v2/catalogs").await, 200);
    assert_eq!(mock.stats().tokens_issued, 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let record: String = redis.cmd(&["GET", &format!("{base}:token")]);
        if !record.starts_with("9999") {
            break;
        }
        assert!(Instant::now() < deadline, "the garbage record was kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...so the next cold replica adopts that token instead of minting.
    let c = ProxyProcess::start(&write_config(&dir, &toml), &[]);
    assert_eq!(get_status(&c, "/raas/v2/catalogs").await, 200);
    assert_eq!(mock.stats().tokens_issued, 2);
    for p in [b, c] {
        assert_eq!(p.terminate().0, 0);
    }
}
