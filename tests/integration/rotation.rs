//! Credential rotation by reload: a changed secret is taken for the next mint while the token in
//! hand keeps serving; a refused new secret falls back to the previous one once; a new token
//! identity replaces a profile only once it has a token, and a broken one never does; a
//! client-credentials client is never asked for a token sooner than its budget allows; a
//! sidecar reloads on SIGHUP instead of ending.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tango_auth_proxy::mock::{MockClient, MockConfig, MockTango};
use tango_auth_proxy::secret::Secret;

use crate::support::*;

const NEW_SECRET: &str = "n3w-cl13nt-S3cret-Must-N0t-L3ak";
const WRONG_SECRET: &str = "wr0ng-cl13nt-S3cret-Must-N0t-L3ak";
const SECOND_CLIENT: &str = "second-client";
const SECOND_SECRET: &str = "s3c0nd-cl13nt-S3cret-Must-N0t-L3ak";
/// A new secret as long as [`CLIENT_SECRET`].
const SAME_LENGTH_SECRET: &str = "cl13nt-S3cret-Must-N0t-N3w!";

/// The test client, accepted with its current and its new secret (as an identity provider
/// during a rotation), and a second client with the same service account.
fn rotating_mock() -> MockConfig {
    let mut config = mock_config(1.0);
    let first = config.clients[0].clone();
    for secret in [NEW_SECRET, SAME_LENGTH_SECRET] {
        config.clients.push(MockClient {
            client_secret: Secret::new(secret),
            ..first.clone()
        });
    }
    config.clients.push(MockClient {
        name: "Second".into(),
        client_id: SECOND_CLIENT.into(),
        client_secret: Secret::new(SECOND_SECRET),
        ..first
    });
    config
}

async fn start_rotating_mock() -> (MockTango, String) {
    for s in [NEW_SECRET, WRONG_SECRET, SECOND_SECRET, SAME_LENGTH_SECRET] {
        logs::watch_secret(s.to_string());
    }
    start_mock(rotating_mock()).await
}

/// [`oauth_toml`] for `client_id`, its client secret read from the file the test names
/// (`@SECRET@`, filled in by [`files`] and [`Files::rewrite`]).
fn config_text(mock_url: &str, auth: &str, client_id: &str, extra: &str) -> String {
    let toml = oauth_toml(mock_url, auth, extra)
        .replace(
            &format!("client_id = \"{CLIENT_ID}\""),
            &format!("client_id = \"{client_id}\""),
        )
        .replace(
            &format!("client_secret = \"{CLIENT_SECRET}\""),
            "client_secret_file = \"@SECRET@\"",
        );
    assert!(toml.contains("@SECRET@"), "{toml}");
    toml
}

struct Files {
    _dir: tempfile::TempDir,
    config: PathBuf,
    secret: PathBuf,
}

impl Files {
    /// Replaces the config file with `text` (its secret file named in full).
    fn rewrite(&self, text: &str) {
        replace_by_rename(
            &self.config,
            &text.replace("@SECRET@", self.secret.to_str().unwrap()),
        );
    }
}

fn files(config: &str, secret: &str) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, sec) = (dir.path().join("proxy.toml"), dir.path().join("secret"));
    std::fs::write(&sec, secret).unwrap();
    std::fs::write(&cfg, config.replace("@SECRET@", sec.to_str().unwrap())).unwrap();
    Files {
        _dir: dir,
        config: cfg,
        secret: sec,
    }
}

/// Polls `/status` until `check` holds (at most 20 s); returns that status.
async fn status_until(proxy: &TestProxy, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = proxy.status().await;
        if check(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The rotating mock, and a proxy of `auth` for the test client (secret in a file) that has
/// served one request.
async fn started(auth: &str, extra: &str) -> (MockTango, String, Files, TestProxy) {
    let (mock, url) = start_rotating_mock().await;
    let f = files(&config_text(&url, auth, CLIENT_ID, extra), CLIENT_SECRET);
    let proxy = TestProxy::start_file(&f.config).await;
    assert_eq!(account(&proxy).await, 200);
    (mock, url, f, proxy)
}

async fn account(proxy: &TestProxy) -> u16 {
    proxy
        .get(&format!(
            "/raas/v2/accounts/{}",
            tango_auth_proxy::mock::SEED_ACCOUNT
        ))
        .await
        .status()
        .as_u16()
}

fn secret_rotation(status: &Value) -> &Value {
    &status["profiles"]["default"]["secret_rotation"]
}

#[tokio::test]
async fn a_rotated_secret_is_used_at_the_next_mint_and_the_token_in_hand_is_kept() {
    let (mock, _, f, proxy) = started("service_account", "").await;
    assert_eq!(mock.stats().tokens_issued, 1);

    // The secret file is rotated and the identity provider stops taking the old secret.
    replace_by_rename(&f.secret, NEW_SECRET);
    mock.retire_secret(CLIENT_SECRET);
    let status = status_until(&proxy, "the new secret loaded", |s| {
        secret_rotation(s)["state"] == "pending"
    })
    .await;
    assert!(status["config"]["generation"].as_u64().unwrap() >= 1);
    assert!(status["config"]["pending_restart"].is_null(), "{status:#}");
    // The token in hand keeps serving: no mint for a secret change.
    assert_eq!(account(&proxy).await, 200);
    assert_eq!(mock.stats().total_token_requests(), 1);
    assert_eq!(
        metric(
            &proxy.admin_url,
            "tango_proxy_credential_rotations_total{result=\"secrets_loaded\"}"
        )
        .await,
        1.0
    );

    // The next mint (Tango revoked the token) sends the new secret, which the identity
    // provider accepts; with the old one it would have been refused.
    mock.revoke_all();
    assert_eq!(account(&proxy).await, 200);
    assert_eq!(mock.stats().tokens_issued, 2);
    assert_eq!(mock.stats().total_token_requests(), 2);
    let status = proxy.status().await;
    assert_eq!(secret_rotation(&status)["state"], "in_use", "{status:#}");
    proxy.stop();
    proxy.wait().await;
}

/// A secret file replaced while the proxy starts is read, even when the new file carries an
/// older modification time than the start (moved in from elsewhere, `cp -p`, a clock behind).
#[tokio::test]
async fn a_secret_replaced_while_the_proxy_starts_is_read_whatever_its_mtime() {
    let (mock, url) = start_rotating_mock().await;
    let f = files(
        &config_text(&url, "service_account", CLIENT_ID, ""),
        CLIENT_SECRET,
    );
    let proxy = TestProxy::start_file(&f.config).await;
    // No await between the start and the move: the proxy's tasks have not run yet.
    let tmp = f.secret.with_extension("new");
    std::fs::write(&tmp, NEW_SECRET).unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    std::fs::rename(&tmp, &f.secret).unwrap();

    status_until(&proxy, "the new secret loaded", |s| {
        secret_rotation(s)["state"] == "pending" || secret_rotation(s)["state"] == "in_use"
    })
    .await;
    assert_eq!(account(&proxy).await, 200);
    // The next mint works with the new secret alone.
    mock.retire_secret(CLIENT_SECRET);
    mock.revoke_all();
    assert_eq!(account(&proxy).await, 200);
    proxy.stop();
    proxy.wait().await;
}

#[tokio::test]
async fn a_refused_new_secret_is_reported_and_the_previous_one_is_tried_once() {
    let (mock, _, f, proxy) = started("service_account", "").await;

    // A secret the identity provider does not know yet (rotated in the wrong order).
    replace_by_rename(&f.secret, WRONG_SECRET);
    status_until(&proxy, "the new secret loaded", |s| {
        secret_rotation(s)["state"] == "pending"
    })
    .await;
    let before = mock.stats().total_token_requests();

    // The next mint: the new secret is refused, the previous one tried once and it works.
    mock.revoke_all();
    assert_eq!(account(&proxy).await, 200);
    assert_eq!(mock.stats().total_token_requests(), before + 2);
    let status = proxy.status().await;
    let rotation = secret_rotation(&status);
    assert_eq!(rotation["state"], "refused_previous_used", "{status:#}");
    assert!(
        rotation["problem"]
            .as_str()
            .unwrap()
            .contains("invalid_client"),
        "{status:#}"
    );
    assert_eq!(
        metric(
            &proxy.admin_url,
            "tango_proxy_credential_rotations_total{result=\"secret_refused\"}"
        )
        .await,
        1.0
    );

    // Once only: the next mint has the new secret alone, which is still refused. (Right
    // after a mint caused by a 401, another 401 is passed on for a few seconds without a
    // mint, so the budget cannot be burnt by a revocation loop; then the mint is tried.)
    mock.revoke_all();
    let deadline = Instant::now() + Duration::from_secs(30);
    let resp = loop {
        let resp = proxy
            .get(&format!(
                "/raas/v2/accounts/{}",
                tango_auth_proxy::mock::SEED_ACCOUNT
            ))
            .await;
        if resp.status() != 401 {
            break resp;
        }
        assert!(
            Instant::now() < deadline,
            "Tango's 401 was passed on for too long"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-tango-proxy-error"], "token_unavailable");
    assert_eq!(mock.stats().total_token_requests(), before + 3);
    let status = proxy.status().await;
    assert_eq!(secret_rotation(&status)["state"], "refused", "{status:#}");
    proxy.stop();
    proxy.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_identity_replaces_the_profile_only_once_it_has_a_token() {
    let (mock, url, f, proxy) = started("service_account", "").await;
    let proxy = Arc::new(proxy);

    // Bounded load for the whole test; every answer must be a 200.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // Eight requests in flight at a time, so the swap lands while some are out.
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (proxy, stop, sent, failed) =
                (proxy.clone(), stop.clone(), sent.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < 40_000 {
                    let status = account(&proxy).await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    if status != 200 {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    // A client id the identity provider does not know: refused, the old profile serves on.
    f.rewrite(&config_text(&url, "service_account", "no-such-client", ""));
    let status = status_until(&proxy, "the broken identity refused", |s| {
        s["config"]["rotations"]["default"]["state"] == "refused"
    })
    .await;
    let problem = status["config"]["rotations"]["default"]["problem"]
        .as_str()
        .unwrap();
    assert!(problem.contains("invalid_client"), "{status:#}");
    assert_eq!(
        status["profiles"]["default"]["identity"],
        format!("{CLIENT_ID} / {USERNAME}")
    );
    assert_eq!(account(&proxy).await, 200);
    assert_eq!(
        metric(
            &proxy.admin_url,
            "tango_proxy_credential_rotations_total{result=\"refused\"}"
        )
        .await,
        1.0
    );
    assert!(!mock
        .stats()
        .credentials
        .keys()
        .any(|k| k.contains("no-such-client")));

    // A working new client: it gets its token, then takes over.
    replace_by_rename(&f.secret, SECOND_SECRET);
    f.rewrite(&config_text(&url, "service_account", SECOND_CLIENT, ""));
    let status = status_until(&proxy, "the new identity applied", |s| {
        s["config"]["rotations"]["default"]["state"] == "applied"
    })
    .await;
    assert_eq!(
        status["profiles"]["default"]["identity"],
        format!("{SECOND_CLIENT} / {USERNAME}")
    );
    let by_second = |m: &MockTango| {
        m.stats()
            .credentials
            .get(&format!("bearer:{SECOND_CLIENT}"))
            .copied()
            .unwrap_or(0)
    };
    let first_before = mock.stats().credentials[&format!("bearer:{CLIENT_ID}")];
    let second_before = by_second(&mock);
    for _ in 0..5 {
        assert_eq!(account(&proxy).await, 200);
    }
    assert!(by_second(&mock) >= second_before + 5);
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.await.unwrap();
    }
    // Requests that began before the swap may still have gone out as the first client (one
    // per worker at most); none after it did.
    let first_after = mock.stats().credentials[&format!("bearer:{CLIENT_ID}")];
    assert!(
        first_after - first_before <= 8,
        "{first_before} -> {first_after}"
    );
    assert!(sent.load(Ordering::Relaxed) > 0);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed across the rotation"
    );
    assert_eq!(
        metric(
            &proxy.admin_url,
            "tango_proxy_credential_rotations_total{result=\"applied\"}"
        )
        .await,
        1.0
    );
    let proxy = Arc::into_inner(proxy).unwrap();
    proxy.stop();
    proxy.wait().await;
}

#[tokio::test]
async fn a_client_credentials_rotation_never_asks_for_a_token_before_the_budget_allows() {
    // The mock allows one client-credentials token per client per 20 hours, as Tango does.
    let (mock, url, f, proxy) = started("client_credentials", "").await;
    let cc = |m: &MockTango| m.stats().token_requests["client_credentials"];
    assert_eq!(cc(&mock), 1);

    // A new secret: loaded for the next mint, no token asked for.
    replace_by_rename(&f.secret, NEW_SECRET);
    status_until(&proxy, "the new secret loaded", |s| {
        secret_rotation(s)["state"] == "pending"
    })
    .await;
    assert_eq!(account(&proxy).await, 200);
    assert_eq!(cc(&mock), 1);

    // A new scope for the same client: a new token identity, but the client minted moments
    // ago, so it waits for the budget (20 h 15 m by default) and the old profile serves on.
    f.rewrite(&config_text(
        &url,
        "client_credentials",
        CLIENT_ID,
        "scope = \"raas.all raas.read\"\n",
    ));
    let status = status_until(&proxy, "the rotation waiting for the budget", |s| {
        s["config"]["rotations"]["default"]["state"] == "waiting_for_mint_budget"
    })
    .await;
    let until = status["config"]["rotations"]["default"]["until"]
        .as_str()
        .unwrap();
    let until = humantime::parse_rfc3339(until).unwrap();
    let wait = until
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        wait > Duration::from_secs(20 * 3600),
        "waits only {wait:?}: {status:#}"
    );
    for _ in 0..3 {
        assert_eq!(account(&proxy).await, 200);
    }
    assert_eq!(
        cc(&mock),
        1,
        "a rotation asked the client for a token early"
    );

    // Taking the change back drops the waiting rotation.
    f.rewrite(&config_text(&url, "client_credentials", CLIENT_ID, ""));
    status_until(&proxy, "the waiting rotation dropped", |s| {
        s["config"]["rotations"]["default"].is_null()
    })
    .await;
    assert_eq!(account(&proxy).await, 200);
    assert_eq!(cc(&mock), 1);
    proxy.stop();
    proxy.wait().await;
}

#[tokio::test]
async fn when_the_budget_opens_the_client_gets_one_token_not_two() {
    // Tokens live 24 s here (the mock's clock runs 3600 times fast): renewal from 18 s, usable
    // until 21.6 s. The budget (19 s) opens inside the window, where the running profile would
    // renew at the same moment as the rotation mints, unless the rotation holds it.
    let mut config = rotating_mock();
    config.time_scale = 1.0 / 3600.0;
    config.client_credentials_limit = None;
    for s in [NEW_SECRET, WRONG_SECRET, SECOND_SECRET, SAME_LENGTH_SECRET] {
        logs::watch_secret(s.to_string());
    }
    let (mock, url) = start_mock(config).await;
    let f = files(
        &config_text(
            &url,
            "client_credentials",
            CLIENT_ID,
            "min_token_interval = \"19s\"\n",
        ),
        CLIENT_SECRET,
    );
    let proxy = TestProxy::start_file(&f.config).await;
    assert_eq!(account(&proxy).await, 200);
    let cc = |m: &MockTango| m.stats().token_requests["client_credentials"];
    assert_eq!(cc(&mock), 1);
    f.rewrite(&config_text(
        &url,
        "client_credentials",
        CLIENT_ID,
        "min_token_interval = \"19s\"\nscope = \"raas.all raas.read\"\n",
    ));
    status_until(&proxy, "the rotation waiting for the budget", |s| {
        s["config"]["rotations"]["default"]["state"] == "waiting_for_mint_budget"
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let status = proxy.status().await;
        if status["config"]["rotations"]["default"]["state"] == "applied" {
            break;
        }
        assert!(Instant::now() < deadline, "never applied: {status:#}");
        assert_eq!(account(&proxy).await, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(account(&proxy).await, 200);
    assert_eq!(
        cc(&mock),
        2,
        "the client was asked for more than one token when its budget opened"
    );
    proxy.stop();
    proxy.wait().await;
}

#[tokio::test]
async fn an_idle_store_profile_is_not_replaced_by_a_broken_identity() {
    let (mock, url) = start_mock(MockConfig::with_stores(2)).await;
    let key = |i: usize| format!("rotation-pos-key-{i}-7a1c9e");
    let text = |store2_user: &str| {
        let mut t = format!(
            "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[upstream]\nurl = \"{url}\"\nallow_http = true\n"
        );
        t.push_str(&store_profiles(&url, 2).replace(
            "username = \"store-2\"",
            &format!("username = \"{store2_user}\""),
        ));
        for i in 1..=2 {
            logs::watch_secret(key(i));
            t.push_str(&format!(
                "[callers.pos-{i}]\nkey_sha256 = \"{}\"\nprofile = \"store-{i}\"\naccounts = [\"A-STORE-{i}\"]\n",
                sha256_hex(key(i).as_bytes())
            ));
        }
        t
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(&cfg, text("store-2")).unwrap();
    let proxy = TestProxy::start_file(&cfg).await;
    let get = |i: usize| {
        let url = format!("{}/raas/v2/accounts/A-STORE-{i}", proxy.url);
        async move {
            client()
                .get(url)
                .bearer_auth(key(i))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get(1).await, 200);
    let status = proxy.status().await;
    assert_eq!(status["profiles"]["store-2"]["idle"], true, "{status:#}");

    // store-2 has never called; its profile is moved to a service account Tango does not know.
    replace_by_rename(&cfg, &text("store-2-typo"));
    let status = status_until(&proxy, "the broken identity refused", |s| {
        s["config"]["rotations"]["store-2"]["state"] == "refused"
    })
    .await;
    assert!(
        status["config"]["rotations"]["store-2"]["until"].is_string(),
        "{status:#}"
    );
    // Its first request is served by the identity that works.
    assert_eq!(get(2).await, 200);
    assert!(
        mock.stats().by_principal.contains_key("store-2"),
        "{:?}",
        mock.stats()
    );
    proxy.stop();
    proxy.wait().await;
}

#[tokio::test]
async fn a_sidecar_reloads_on_sighup_instead_of_ending() {
    let (mock, url) = start_rotating_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        config_text(&url, "service_account", CLIENT_ID, "")
            .replace("@SECRET@", secret.to_str().unwrap()),
    )
    .unwrap();
    let proxy = ProxyProcess::start(&cfg, &[]);
    let get = || async {
        client()
            .get(format!(
                "{}/raas/v2/accounts/{}",
                proxy.url(),
                tango_auth_proxy::mock::SEED_ACCOUNT
            ))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(get().await, 200);
    // The new secret arrives in place, with the same length and modification time as the old
    // (so the file watch cannot see it), and the operator says so with SIGHUP.
    assert_eq!(SAME_LENGTH_SECRET.len(), CLIENT_SECRET.len());
    let mtime = std::fs::metadata(&secret).unwrap().modified().unwrap();
    std::fs::write(&secret, SAME_LENGTH_SECRET).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&secret)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    // Longer than the file watch takes to look, so a reload seen now came from the signal.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = get_json(&format!("{}/status", proxy.admin_url())).await;
    assert_eq!(status["config"]["generation"], 0, "{status:#}");
    proxy.hangup();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = get_json(&format!("{}/status", proxy.admin_url())).await;
        if status["profiles"]["default"]["secret_rotation"]["state"] == "pending" {
            assert!(status["config"]["generation"].as_u64().unwrap() >= 1);
            break;
        }
        assert!(Instant::now() < deadline, "no reload: {status:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    mock.retire_secret(CLIENT_SECRET);
    mock.revoke_all();
    assert_eq!(get().await, 200);
    let (code, logs) = proxy.terminate();
    assert_eq!(code, 0, "{logs}");
    for s in [CLIENT_SECRET, SAME_LENGTH_SECRET] {
        assert!(!logs.contains(s));
    }
}

#[tokio::test]
async fn a_new_dpop_key_gets_its_own_token_before_it_replaces_the_old_one() {
    let (mock, url) = start_rotating_mock().await;
    let keys = tempfile::tempdir().unwrap();
    let (first, first_jkt) = crate::dpop::keygen(keys.path(), "ES256");
    let (second, second_jkt) = crate::dpop::keygen(keys.path(), "EdDSA");
    let f = files(
        &config_text(
            &url,
            "service_account",
            CLIENT_ID,
            &format!("dpop_key_file = \"{}/key.pem\"\n", keys.path().display()),
        ),
        CLIENT_SECRET,
    );
    let key = keys.path().join("key.pem");
    std::fs::copy(&first, &key).unwrap();
    let proxy = TestProxy::start_file(&f.config).await;
    assert_eq!(account(&proxy).await, 200);
    let status = proxy.status().await;
    assert_eq!(
        status["profiles"]["default"]["token"]["dpop_jkt"],
        first_jkt
    );
    let issued = mock.stats().tokens_issued;

    // The key file is replaced (a new Secret version): a new fingerprint, so one new token,
    // bound to the new key, before the swap; requests go on throughout.
    let tmp = keys.path().join("key.pem.new");
    std::fs::copy(&second, &tmp).unwrap();
    std::fs::rename(&tmp, &key).unwrap();
    let status = status_until(&proxy, "the new key in use", |s| {
        s["config"]["rotations"]["default"]["state"] == "applied"
    })
    .await;
    assert_eq!(
        status["profiles"]["default"]["token"]["dpop_jkt"],
        second_jkt
    );
    assert_eq!(mock.stats().tokens_issued, issued + 1);
    // The mock checks each proof against the key the token is bound to.
    for _ in 0..3 {
        assert_eq!(account(&proxy).await, 200);
    }
    assert_eq!(
        mock.stats()
            .credentials
            .get("dpop-invalid")
            .copied()
            .unwrap_or(0),
        0
    );
    proxy.stop();
    proxy.wait().await;
}
