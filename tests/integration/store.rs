//! The token store seam: one suite run against every backend, encryption at rest, and restarts.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use tango_auth_proxy::metrics::Metrics;
use tango_auth_proxy::secret::Secret;
use tango_auth_proxy::token::store::{FileStore, MemoryStore, TokenStore};
use tango_auth_proxy::token::{Sealer, Token};

use crate::support::*;

pub fn token(value: &str, secs: u64) -> Token {
    Token::new(
        Secret::new(value),
        Duration::from_secs(secs),
        Duration::from_secs(secs),
        false,
        tokio::time::Instant::now(),
        SystemTime::now(),
    )
    .unwrap()
}

/// What every backend must do.
pub async fn store_suite(store: &dyn TokenStore) {
    assert!(store.load("fp1").await.unwrap().is_none());
    store.save("fp1", &token("first", 100)).await.unwrap();
    let loaded = store.load("fp1").await.unwrap().unwrap();
    assert_eq!(loaded.access_token.expose(), "first");
    assert!(loaded.expires_at > SystemTime::now() + Duration::from_secs(90));
    // Keys are independent.
    assert!(store.load("fp2").await.unwrap().is_none());
    // The later-expiring token wins a write race.
    store.save("fp1", &token("older", 50)).await.unwrap();
    assert_eq!(
        store
            .load("fp1")
            .await
            .unwrap()
            .unwrap()
            .access_token
            .expose(),
        "first"
    );
    store.save("fp1", &token("newer", 200)).await.unwrap();
    assert_eq!(
        store
            .load("fp1")
            .await
            .unwrap()
            .unwrap()
            .access_token
            .expose(),
        "newer"
    );
    // Compare-and-delete only removes the rejected token.
    assert!(!store
        .evict_if("fp1", token("first", 100).ath())
        .await
        .unwrap());
    assert!(store.load("fp1").await.unwrap().is_some());
    assert!(store
        .evict_if("fp1", token("newer", 200).ath())
        .await
        .unwrap());
    assert!(store.load("fp1").await.unwrap().is_none());
}

fn key_file(dir: &Path, name: &str, byte: u8) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        base64::engine::general_purpose::STANDARD.encode([byte; 32]),
    )
    .unwrap();
    p
}

fn file_store(dir: &Path, sealer: Sealer, metrics: Arc<Metrics>) -> FileStore {
    FileStore::new(&dir.join("tokens"), "tap", Arc::new(sealer), metrics).unwrap()
}

#[tokio::test]
async fn every_backend_passes_the_store_suite() {
    store_suite(&MemoryStore::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    store_suite(&file_store(
        dir.path(),
        Sealer::plaintext(),
        metrics.clone(),
    ))
    .await;
    let key = key_file(dir.path(), "key", 9);
    let none: [&Path; 0] = [];
    let sealed_dir = dir.path().join("sealed");
    store_suite(&file_store(
        &sealed_dir,
        Sealer::from_files(&key, &none).unwrap(),
        metrics,
    ))
    .await;
}

#[tokio::test]
async fn file_records_are_private_sealed_tamper_evident_and_survive_key_rotation() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let old = key_file(dir.path(), "old", 1);
    let new = key_file(dir.path(), "new", 2);
    let none: [&Path; 0] = [];
    let metrics = Arc::new(Metrics::new());
    let store = file_store(
        dir.path(),
        Sealer::from_files(&old, &none).unwrap(),
        metrics.clone(),
    );
    store
        .save("fp", &token("raw-token-value", 100))
        .await
        .unwrap();

    let tokens_dir = dir.path().join("tokens");
    let dir_mode = std::fs::metadata(&tokens_dir).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let file = tokens_dir.join("tap-fp.token");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let raw = std::fs::read_to_string(&file).unwrap();
    assert!(!raw.contains("raw-token-value"));
    assert!(raw.starts_with("tap1."));

    // Rotation: the new key with the old one as previous still reads the record.
    let rotated = file_store(
        dir.path(),
        Sealer::from_files(&new, &[&old]).unwrap(),
        metrics.clone(),
    );
    assert_eq!(
        rotated
            .load("fp")
            .await
            .unwrap()
            .unwrap()
            .access_token
            .expose(),
        "raw-token-value"
    );
    // Without the old key it is a counted miss, not a crash.
    let forgot = file_store(
        dir.path(),
        Sealer::from_files(&new, &none).unwrap(),
        metrics.clone(),
    );
    assert!(forgot.load("fp").await.unwrap().is_none());

    // A tampered record is a counted miss.
    let mut bytes = raw.into_bytes();
    let i = bytes.len() - 5;
    bytes[i] = if bytes[i] == b'x' { b'y' } else { b'x' };
    std::fs::write(&file, bytes).unwrap();
    assert!(store.load("fp").await.unwrap().is_none());
    let text = metrics.encode();
    assert!(
        text.contains(r#"tango_proxy_cache_unreadable_records_total{backend="file"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_restarted_proxy_reuses_the_token_in_its_file_cache() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "cache-key", 5);
    let cfg = dir.path().join("proxy.toml");
    let toml = oauth_toml(&url, "service_account", "").replace(
        "[profiles.default]",
        &format!(
            "[cache]\nbackend = \"file\"\npath = \"{}\"\nencryption_key_file = \"{}\"\n[profiles.default]",
            dir.path().join("tokens").display(),
            key.display()
        ),
    );
    std::fs::write(&cfg, toml).unwrap();
    for round in 0..3 {
        let proc = ProxyProcess::start(&cfg, &[("RUST_LOG", "info")]);
        let resp = client()
            .get(format!("{}/raas/v2/catalogs", proc.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "round {round}");
        let (code, logs) = proc.terminate();
        assert_eq!(code, 0);
        assert!(!logs.contains("stored unencrypted"));
    }
    let stats = mock.stats();
    assert_eq!(stats.total_token_requests(), 1, "{stats:?}");
    assert_eq!(stats.credentials[&format!("bearer:{CLIENT_ID}")], 3);
}
