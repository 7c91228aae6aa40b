//! A gateway reloads its callers on SIGHUP and when its config file changes, without dropping a
//! request in flight; a broken or non-reloadable config is refused whole and the old one serves.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use tango_auth_proxy::mock::MockConfig;

use crate::support::*;

fn config(mock_url: &str, callers: &[usize], extra_upstream: &str) -> String {
    let mut toml = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n[upstream]\nurl = \"{mock_url}\"\nallow_http = true\n{extra_upstream}\n"
    );
    // Three store profiles, and one for every caller past them (a store added with its own).
    let stores = callers.iter().copied().max().unwrap_or(0).max(3);
    toml.push_str(&store_profiles(mock_url, stores));
    for i in callers {
        toml.push_str(&format!(
            "[callers.pos-{i}]\nkey_sha256 = \"{}\"\nprofile = \"store-{i}\"\naccounts = [\"A-STORE-{i}\"]\n",
            sha256_hex(format!("reload-key-{i}").as_bytes())
        ));
    }
    toml
}

fn auth(i: usize) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("pos-{i}:reload-key-{i}"))
    )
}

/// Each poll comes from an address of its own (through the trusted local proxy), so the
/// gateway's throttle of repeated failures never mistakes the test's polling for a guesser.
static POLLS: AtomicU64 = AtomicU64::new(0);

async fn status_of(proxy: &ProxyProcess, i: usize) -> u16 {
    let n = POLLS.fetch_add(1, Ordering::Relaxed);
    client()
        .get(format!("{}/raas/v2/accounts/A-STORE-{i}", proxy.url()))
        .header("authorization", auth(i))
        .header(
            "x-forwarded-for",
            format!("198.18.{}.{}", (n >> 8) & 0xff, n & 0xff),
        )
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls until `pos-3`'s answer is `want`; returns how long that took (at most `limit`).
async fn until(proxy: &ProxyProcess, want: u16, since: Instant, limit: Duration) -> Duration {
    until_store(proxy, 3, want, since, limit).await
}

/// Polls until `pos-i`'s answer is `want`; returns how long that took (at most `limit`).
async fn until_store(
    proxy: &ProxyProcess,
    i: usize,
    want: u16,
    since: Instant,
    limit: Duration,
) -> Duration {
    loop {
        if status_of(proxy, i).await == want {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "pos-{i} was not answered {want} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_reload_on_sighup_and_file_change_without_dropping_a_request() {
    let (_mock, mock_url) = start_mock(MockConfig::with_stores(4)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config(&mock_url, &[1, 2, 3], "")).unwrap();
    let proxy = ProxyProcess::start(&path, &[("RUST_LOG", "info")]);
    assert_eq!(status_of(&proxy, 3).await, 200);

    // Bounded load as store 1 while the gateway reloads.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        let url = format!("{}/raas/v2/accounts/A-STORE-1", proxy.url());
        tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < 20_000 {
                let ok = c
                    .get(&url)
                    .header("authorization", auth(1))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let mut slowest = Duration::ZERO;
    for round in 0..20 {
        // Even rounds remove pos-3, odd rounds bring it back; half by SIGHUP, half by the file.
        let callers: &[usize] = if round % 2 == 0 { &[1, 2] } else { &[1, 2, 3] };
        let by_signal = round % 4 < 2;
        if by_signal {
            // A write the watcher may also see; the signal makes it immediate.
            replace_by_rename(&path, &config(&mock_url, callers, ""));
            proxy.hangup();
        } else {
            replace_by_rename(&path, &config(&mock_url, callers, ""));
        }
        let since = Instant::now();
        let want = if round % 2 == 0 { 401 } else { 200 };
        let took = until(&proxy, want, since, Duration::from_secs(1)).await;
        slowest = slowest.max(took);
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(sent.load(Ordering::Relaxed) > 20, "the load hardly ran");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed across reloads"
    );
    let status = get_json(&format!("{}/status", proxy.admin_url())).await;
    assert!(
        status["config"]["generation"].as_u64().unwrap() >= 20,
        "{status}"
    );
    eprintln!("slowest reload seen by a request: {slowest:?}");

    // A broken file is refused whole: the old callers keep working and /status says why.
    let generation = status["config"]["generation"].as_u64().unwrap();
    replace_by_rename(&path, "[listen\nproxy = ");
    proxy.hangup();
    let deadline = Instant::now() + Duration::from_secs(5);
    let refusal = loop {
        let s = get_json(&format!("{}/status", proxy.admin_url())).await;
        if s["config"]["last_refusal"].is_object() {
            break s;
        }
        assert!(Instant::now() < deadline, "no refusal shown: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refusal["config"]["generation"], generation);
    assert!(
        refusal["config"]["last_refusal"]["problems"][0]
            .as_str()
            .unwrap()
            .contains("not valid TOML"),
        "{refusal}"
    );
    assert_eq!(status_of(&proxy, 1).await, 200);
    // A change a reload cannot apply (here the upstream's timeout) does not hold back the
    // callers in the same file: pos-3 goes, and /status says what waits for a restart.
    replace_by_rename(&path, &config(&mock_url, &[1, 2], "timeout = \"5s\""));
    proxy.hangup();
    until(&proxy, 401, Instant::now(), Duration::from_secs(5)).await;
    let s = get_json(&format!("{}/status", proxy.admin_url())).await;
    assert!(
        s["config"]["pending_restart"]
            .to_string()
            .contains("upstream: changed"),
        "{s}"
    );
    assert!(s["config"]["last_refusal"].is_null(), "{s}");
    // A store added with a profile of its own is served at once, without a restart.
    replace_by_rename(&path, &config(&mock_url, &[1, 2, 4], ""));
    proxy.hangup();
    until_store(&proxy, 4, 200, Instant::now(), Duration::from_secs(5)).await;
    let s = get_json(&format!("{}/status", proxy.admin_url())).await;
    assert_eq!(s["profiles"]["store-4"]["ready"], true, "{s}");
    // Removed again (caller and profile): refused, and its profile is gone from /status.
    replace_by_rename(&path, &config(&mock_url, &[1, 2], ""));
    proxy.hangup();
    until_store(&proxy, 4, 401, Instant::now(), Duration::from_secs(5)).await;
    let s = get_json(&format!("{}/status", proxy.admin_url())).await;
    assert!(s["profiles"]["store-4"].is_null(), "{s}");
    // A caller of a profile the file does not have is refused whole: pos-3 stays out.
    let mut dangling = config(&mock_url, &[1, 2], "");
    dangling.push_str(&format!(
        "[callers.pos-3]\nkey_sha256 = \"{}\"\nprofile = \"store-9\"\n",
        sha256_hex(b"reload-key-3")
    ));
    replace_by_rename(&path, &dangling);
    proxy.hangup();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = get_json(&format!("{}/status", proxy.admin_url())).await;
        if s["config"]["last_refusal"]["problems"]
            .to_string()
            .contains("store-9")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal for a caller of a missing profile: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status_of(&proxy, 3).await, 401);
    assert_eq!(status_of(&proxy, 1).await, 200);
    let metrics = get_text(&format!("{}/metrics", proxy.admin_url())).await;
    assert!(
        metrics.contains("tango_proxy_config_reloads_total{result=\"refused\"}"),
        "{metrics}"
    );
    let (_, logs) = proxy.terminate();
    assert!(logs.contains("configuration reload refused"), "{logs}");
    assert!(!logs.contains("reload-key-"), "a key reached the logs");
    assert!(
        !logs.contains("store-1-password"),
        "a password reached the logs"
    );
}
