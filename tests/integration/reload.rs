//! A gateway reloads its callers on SIGHUP and when its config file changes, without dropping a
//! request in flight; a broken or non-reloadable config is refused whole and the old one serves.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use tango_auth_proxy::mock::MockConfig;

use crate::support::*;

fn config(mock_url: &str, callers: &[usize], extra_upstream: &str) -> String {
    let mut toml = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[upstream]\nurl = \"{mock_url}\"\nallow_http = true\n{extra_upstream}\n"
    );
    for i in 1..=3 {
        toml.push_str(&format!(
            "[profiles.store-{i}]\nauth = \"service_account\"\ntoken_url = \"{mock_url}/oauth/token\"\nclient_id = \"franchise\"\nclient_secret = \"franchise-secret\"\nusername = \"store-{i}\"\npassword = \"store-{i}-password\"\n"
        ));
    }
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

async fn status_of(proxy: &ProxyProcess, i: usize) -> u16 {
    client()
        .get(format!("{}/raas/v2/accounts/A-STORE-{i}", proxy.url()))
        .header("authorization", auth(i))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Writes the config the way Kubernetes updates a mounted Secret: a new file, then a rename.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn hangup(proxy: &ProxyProcess) {
    let ok = Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Polls until `pos-3`'s answer is `want`; returns how long that took (at most `limit`).
async fn until(proxy: &ProxyProcess, want: u16, since: Instant, limit: Duration) -> Duration {
    loop {
        if status_of(proxy, 3).await == want {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "pos-3 was not answered {want} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_reload_on_sighup_and_file_change_without_dropping_a_request() {
    let (_mock, mock_url) = start_mock(MockConfig::with_stores(3)).await;
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
            replace(&path, &config(&mock_url, callers, ""));
            hangup(&proxy);
        } else {
            replace(&path, &config(&mock_url, callers, ""));
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
    replace(&path, "[listen\nproxy = ");
    hangup(&proxy);
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
    // A change outside [callers] (here the upstream's timeout) is refused too, by name.
    replace(&path, &config(&mock_url, &[1], "timeout = \"5s\""));
    hangup(&proxy);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = get_json(&format!("{}/status", proxy.admin_url())).await;
        let problems = s["config"]["last_refusal"]["problems"].to_string();
        if problems.contains("upstream: changed") {
            break;
        }
        assert!(Instant::now() < deadline, "no upstream refusal: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        status_of(&proxy, 3).await,
        200,
        "a refused reload removed a caller"
    );
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
