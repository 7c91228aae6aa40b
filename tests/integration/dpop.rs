//! DPoP: keys and keygen, proofs checked by an independent JOSE library (jsonwebtoken), `htu`
//! for awkward URLs, and the mock in nonce-demanding mode.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tango_auth_proxy::mock::FailMode;

use crate::support::*;

pub fn keygen(dir: &Path, alg: &str) -> (PathBuf, String) {
    let out = dir.join(format!("dpop-{alg}.pem"));
    let (code, stdout, stderr) = run_bin(
        &["keygen", "--alg", alg, "--out", out.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    (out, stdout.trim().to_string())
}

pub fn dpop_toml(mock_url: &str, upstream_url: &str, key: &Path) -> String {
    oauth_toml_via(
        mock_url,
        upstream_url,
        "service_account",
        &format!("dpop_key_file = \"{}\"", key.display()),
    )
}

#[derive(Debug, Deserialize)]
struct ProofClaims {
    jti: String,
    htm: String,
    htu: String,
    iat: u64,
    ath: Option<String>,
    nonce: Option<String>,
}

/// Verifies a proof with jsonwebtoken, using only the key in its own header.
fn verify_independently(proof: &str, alg: Algorithm) -> ProofClaims {
    let header = decode_header(proof).unwrap();
    assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
    assert_eq!(header.alg, alg);
    let jwk = header.jwk.expect("proof header has no jwk");
    let key = DecodingKey::from_jwk(&jwk).unwrap();
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    decode::<ProofClaims>(proof, &key, &validation)
        .unwrap()
        .claims
}

#[test]
fn keygen_writes_a_private_pkcs8_key_and_prints_its_thumbprint() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    for alg in ["ES256", "EdDSA"] {
        let (path, thumbprint) = keygen(dir.path(), alg);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let pem = std::fs::read_to_string(&path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(thumbprint.len(), 43);
        // check-config loads it and shows the same thumbprint, never the key.
        let cfg = dir.path().join(format!("{alg}.toml"));
        std::fs::write(
            &cfg,
            dpop_toml("https://idp.example", "https://api.example", &path),
        )
        .unwrap();
        let (code, out, err) = run_bin(&["check-config", "--config", cfg.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(&format!("dpop_thumbprint = \"{thumbprint}\"")),
            "{out}"
        );
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!out.contains(&body[..40]) && !err.contains(&body[..40]));
        assert!(!err.contains("readable by group"), "{err}");
        // Never overwrites.
        let (code, _, err) = run_bin(&["keygen", "--out", path.to_str().unwrap()], &[]);
        assert_ne!(code, 0);
        assert!(err.contains("exists"), "{err}");
    }
}

#[test]
fn keys_of_other_types_are_refused_and_open_files_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let check = |key: &Path| {
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            dpop_toml("https://idp.example", "https://api.example", key),
        )
        .unwrap();
        run_bin(&["check-config", "--config", cfg.to_str().unwrap()], &[])
    };
    let p384 = dir.path().join("p384.pem");
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    std::fs::write(&p384, kp.serialize_pem()).unwrap();
    let (code, _, err) = check(&p384);
    assert_ne!(code, 0);
    assert!(
        err.contains("profiles.default.dpop_key_file") && err.contains("P-256 or Ed25519"),
        "{err}"
    );

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a key").unwrap();
    let (code, _, err) = check(&garbage);
    assert_ne!(code, 0);
    assert!(err.contains("no PEM private key"), "{err}");

    let (open, _) = keygen(dir.path(), "ES256");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = check(&open);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("readable by group or others"), "{err}");
    // Readable by the process's own group (a Kubernetes Secret: mode 0440 with the pod's
    // fsGroup) is fine: the file here belongs to this process's group.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o440)).unwrap();
    let (code, _, err) = check(&open);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("readable by group"), "{err}");
}

async fn proofs_verify_independently(alg: &str, jose_alg: Algorithm) {
    let dir = tempfile::tempdir().unwrap();
    let (key, thumbprint) = keygen(dir.path(), alg);
    let (mock, mock_url) = start_mock(mock_config(1.0)).await;
    let upstream = FakeUpstream::start().await;
    let toml = dpop_toml(&mock_url, &format!("{}/base", upstream.url()), &key);
    let proxy = TestProxy::start(&toml).await;

    let resp = client()
        .post(format!(
            "{}/raas/v2/orders/RA1%2F2;x?expand=all&y=%20",
            proxy.url
        ))
        .header("dpop", "app-sent-proof")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.uri, "/base/raas/v2/orders/RA1%2F2;x?expand=all&y=%20");
    let authorization = seen.headers["authorization"].to_str().unwrap();
    let token = authorization
        .strip_prefix("DPoP ")
        .expect("not a DPoP authorization");
    assert!(mock.issued_tokens().contains(&token.to_string()));
    let proof = seen.headers["dpop"].to_str().unwrap();
    assert_ne!(proof, "app-sent-proof");

    let claims = verify_independently(proof, jose_alg);
    assert_eq!(claims.htm, "POST");
    assert_eq!(
        claims.htu,
        format!("{}/base/raas/v2/orders/RA1%2F2;x", upstream.url())
    );
    assert!(!claims.htu.contains(&proxy.addr().port().to_string()));
    use base64::Engine;
    let expected_ath = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        ring::digest::digest(&ring::digest::SHA256, token.as_bytes()),
    );
    assert_eq!(claims.ath.as_deref(), Some(expected_ath.as_str()));
    assert!(claims.nonce.is_none());
    assert!(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&claims.jti)
            .unwrap()
            .len()
            >= 16
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(claims.iat.abs_diff(now) <= 5);

    // The header's jwk is the configured key.
    let header = decode_header(proof).unwrap();
    let jwk = serde_json::to_value(header.jwk.unwrap()).unwrap();
    assert!(jwk.get("d").is_none());
    let status = proxy.status().await;
    assert_eq!(
        status["profiles"]["default"]["token"]["dpop_jkt"],
        thumbprint.as_str()
    );

    // A second request gets a different proof.
    client()
        .get(format!("{}/raas/v2/catalogs", proxy.url))
        .send()
        .await
        .unwrap();
    let second = upstream.last();
    let claims2 = verify_independently(second.headers["dpop"].to_str().unwrap(), jose_alg);
    assert_ne!(claims2.jti, claims.jti);
    assert_eq!(claims2.htm, "GET");
    assert_eq!(
        claims2.htu,
        format!("{}/base/raas/v2/catalogs", upstream.url())
    );
}

#[tokio::test]
async fn es256_proofs_verify_with_an_independent_jose_library() {
    proofs_verify_independently("ES256", Algorithm::ES256).await;
}

#[tokio::test]
async fn eddsa_proofs_verify_with_an_independent_jose_library() {
    proofs_verify_independently("EdDSA", Algorithm::EdDSA).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonce_mode_cold_start_with_200_concurrent_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keygen(dir.path(), "ES256");
    let mut config = mock_config(1.0);
    config.dpop_nonces = true;
    let (mock, url) = start_mock(config).await;
    mock.fail_token_requests(FailMode::Slow(Duration::from_millis(700)), 1);
    let proxy = TestProxy::start(&dpop_toml(&url, &url, &key)).await;
    let urls = vec![format!("{}/raas/v2/catalogs", proxy.url); 200];
    for status in concurrent_gets(urls).await {
        assert_eq!(status, 200);
    }
    let stats = mock.stats();
    // One nonce round trip at the token endpoint, one token.
    assert_eq!(stats.total_token_requests(), 2, "{stats:?}");
    assert_eq!(stats.tokens_issued, 1);
    // Every proof verified, so no jti repeated (the mock refuses repeats).
    assert_eq!(
        stats.credentials[&format!("dpop:{CLIENT_ID}")],
        200,
        "{stats:?}"
    );
    assert_eq!(stats.credentials.get("dpop-invalid"), None, "{stats:?}");
}

#[tokio::test]
async fn api_nonce_rotation_costs_at_most_one_replay_per_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keygen(dir.path(), "EdDSA");
    let mut config = mock_config(1.0);
    config.dpop_nonces = true;
    let (mock, url) = start_mock(config).await;
    let proxy = TestProxy::start(&dpop_toml(&url, &url, &key)).await;
    proxy.wait_ready().await;
    let mut rotations = 0;
    for i in 0..40 {
        if i % 5 == 4 {
            mock.rotate_dpop_nonce();
            rotations += 1;
        }
        let resp = if i % 2 == 0 {
            proxy.get("/raas/v2/catalogs").await
        } else {
            client()
                .post(format!("{}/raas/v2/customers", proxy.url))
                .json(
                    &serde_json::json!({"customerIdentifier": format!("c{i}"), "displayName": "C"}),
                )
                .send()
                .await
                .unwrap()
        };
        assert!(resp.status().is_success(), "request {i}: {}", resp.status());
    }
    let stats = mock.stats();
    let replays = stats
        .credentials
        .get("dpop-use-nonce")
        .copied()
        .unwrap_or(0);
    assert!(
        replays <= rotations,
        "{replays} nonce challenges for {rotations} rotations"
    );
    assert!(replays >= 1, "rotations were never noticed: {stats:?}");
    // Nonce challenges never cost a token.
    assert_eq!(stats.tokens_issued, 1, "{stats:?}");
    assert_eq!(stats.credentials.get("dpop-invalid"), None, "{stats:?}");
}

#[tokio::test]
async fn a_bearer_token_for_a_dpop_profile_is_refused_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = keygen(dir.path(), "ES256");
    let (mock, url) = start_mock(mock_config(1.0)).await;
    mock.issue_bearer_despite_dpop(true);
    let proxy = TestProxy::start(&dpop_toml(&url, &url, &key)).await;
    let resp = proxy.get("/raas/v2/catalogs").await;
    assert_proxy_error(resp, 503, "token_unavailable").await;
    let status = proxy.status().await;
    assert!(
        status["profiles"]["default"]["token"]["last_error"]
            .as_str()
            .unwrap()
            .contains("token_type"),
        "{status}"
    );
    // Nothing reached the API.
    assert_eq!(mock.stats().requests, 0);
}
