//! Tango's Python SDK (`raas` 2.2.0 from PyPI), unchanged, against the gateway: a store changes
//! only the base URL and its platform name and key.
//!
//! `scripts/test.sh` installs the SDK into `target/raas-venv` and names its Python in
//! `RAAS_SDK_PYTHON`. Without it the test says so and passes on a developer machine; in
//! CI (`CI` set) a missing SDK fails it.

use std::process::Command;

use serde_json::Value;
use tango_auth_proxy::mock::MockConfig;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raas_python_sdk_works_through_the_gateway_unchanged() {
    let Some(python) = std::env::var_os("RAAS_SDK_PYTHON") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "RAAS_SDK_PYTHON is not set: run the tests with scripts/test.sh"
        );
        eprintln!("skipped: RAAS_SDK_PYTHON not set (scripts/test.sh sets it up)");
        return;
    };
    let (mock, mock_url) = start_mock(MockConfig::with_stores(2)).await;
    let key = |i: usize| format!("sdk-store-key-{i}-7c1d9e");
    let callers: String = (1..=2)
        .map(|i| {
            format!(
                r#"
[callers.pos-{i}]
key_sha256 = "{}"
profile = "store-{i}"
accounts = ["A-STORE-{i}"]
customers = ["C-STORE-{i}"]
require_external_ref_id = true
daily_spend_limit = "100 USD"
"#,
                sha256_hex(key(i).as_bytes())
            )
        })
        .collect();
    for i in 1..=2 {
        logs::watch_secret(key(i));
        logs::watch_secret(format!("store-{i}-password"));
    }
    let toml = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[upstream]\nurl = \"{mock_url}\"\nallow_http = true\n{}{callers}",
        store_profiles(&mock_url, 2)
    );
    let proxy = TestProxy::start(&toml).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/raas_gateway.py");
    let base = format!("{}/raas/v2", proxy.url);
    let key1 = key(1);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args([
                script,
                &base,
                "pos-1",
                &key1,
                "A-STORE-1",
                "C-STORE-1",
                "A-STORE-2",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(out["catalog"]["ok"], true, "{out}");
    assert!(out["catalog"]["value"].as_u64().unwrap() > 0, "{out}");
    assert_eq!(out["account"]["value"], "A-STORE-1", "{out}");
    assert_eq!(out["order"]["ok"], true, "{out}");
    assert_eq!(
        out["read_back"]["value"], out["order"]["reference"],
        "{out}"
    );
    // Another store's account: the SDK's own 403 exception.
    assert_eq!(out["other_account"]["ok"], false, "{out}");
    assert_eq!(out["other_account"]["status"], 403, "{out}");
    assert_eq!(
        out["other_account"]["exception"], "RaasClientException",
        "{out}"
    );
    // A wrong key: the SDK's usual authentication error.
    assert_eq!(out["wrong_key"]["status"], 401, "{out}");
    assert_eq!(
        out["wrong_key"]["reason"], "Unauthorized - Invalid Credentials",
        "{out}"
    );
    // Tango saw store 1's identity only, and one order.
    let stats = mock.stats();
    assert_eq!(stats.orders, 1);
    assert!(
        stats.by_principal.keys().all(|p| p == "store-1"),
        "{:?}",
        stats.by_principal
    );
}
