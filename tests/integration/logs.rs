//! Secrets never reach the logs, even at `RUST_LOG=trace`.

use crate::support::*;

#[tokio::test]
async fn no_secret_in_trace_logs_over_plain_http1() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, config_toml(&upstream.url(), "", "")).unwrap();
    assert_no_secret_in_trace_logs(&upstream, &cfg).await;
}

/// The TLS and HTTP/2 layers log the most at trace level; they must not log header values either.
#[tokio::test]
async fn no_secret_in_trace_logs_over_tls_and_http2() {
    let (ca_pem, server) = private_ca_server();
    let upstream = FakeUpstream::start_tls(server).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let cfg = dir.path().join("proxy.toml");
    let toml = config_toml(
        &upstream.url(),
        "",
        &format!("ca_file = \"{}\"", ca_file.display()),
    )
    .replace("allow_http = true", "");
    std::fs::write(&cfg, toml).unwrap();
    assert_no_secret_in_trace_logs(&upstream, &cfg).await;
    assert!(upstream
        .requests()
        .iter()
        .all(|s| s.version == http::Version::HTTP_2));
}

async fn assert_no_secret_in_trace_logs(upstream: &FakeUpstream, cfg: &std::path::Path) {
    let proc = ProxyProcess::start(cfg, &[("RUST_LOG", "trace")]);

    let caller_auth = "Basic Y2FsbGVyOmNhbGxlci1zZWNyZXQtdmFsdWU=";
    let caller_dpop = "eyJ0eXAiOiJkcG9wK2p3dCJ9.caller-dpop-proof";
    let c = client();
    for path in ["/raas/v2/catalogs", "/raas/v2/orders", "/raas/v2/slow?ms=1"] {
        let resp = c
            .post(format!("{}{path}", proc.url()))
            .header("authorization", caller_auth)
            .header("dpop", caller_dpop)
            .header("cookie", "sid=caller-cookie-value")
            .body(r#"{"amount":1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(upstream.requests().len(), 3);
    let (code, logs) = proc.terminate();
    assert_eq!(code, 0);

    // The run did log at trace level, access lines included.
    assert!(
        logs.contains("\"level\":\"TRACE\""),
        "no trace output captured"
    );
    assert!(logs.contains("tango_auth_proxy::access"));
    let encoded = &expected_basic()["Basic ".len()..];
    for secret in [
        API_KEY,
        encoded,
        caller_auth,
        "Y2FsbGVyOmNhbGxlci1zZWNyZXQtdmFsdWU",
        caller_dpop,
        "caller-cookie-value",
    ] {
        assert!(!logs.contains(secret), "{secret:?} appeared in the logs");
    }
}

/// OAuth: the client secret, the service-account password and every access token stay out of
/// trace logs, through minting, use, a 401 and the replay.
#[tokio::test]
async fn no_oauth_secret_or_token_in_trace_logs() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, oauth_toml(&url, "service_account", "")).unwrap();
    let proc = ProxyProcess::start(&cfg, &[("RUST_LOG", "trace")]);
    let c = client();
    let get = |path: &str| c.get(format!("{}{path}", proc.url())).send();
    assert_eq!(get("/raas/v2/catalogs").await.unwrap().status(), 200);
    mock.revoke_all();
    assert_eq!(get("/raas/v2/catalogs").await.unwrap().status(), 200);
    let tokens = mock.issued_tokens();
    assert_eq!(tokens.len(), 2, "{:?}", mock.stats());
    let (code, logs) = proc.terminate();
    assert_eq!(code, 0);
    assert!(logs.contains("\"level\":\"TRACE\""));
    assert!(logs.contains("obtained a new token"));
    for secret in [CLIENT_SECRET, PASSWORD]
        .into_iter()
        .chain(tokens.iter().map(String::as_str))
    {
        assert!(!logs.contains(secret), "{secret:?} appeared in the logs");
    }
}

/// DPoP: the private key and the DPoP-bound tokens stay out of trace logs (proofs are not
/// secrets, but the key that signs them is).
#[tokio::test]
async fn no_dpop_key_or_token_in_trace_logs() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("dpop.pem");
    let (code, _, err) = run_bin(&["keygen", "--out", key.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let pem = std::fs::read_to_string(&key).unwrap();
    let mut config = mock_config(1.0);
    config.dpop_nonces = true;
    let (mock, url) = start_mock(config).await;
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        oauth_toml(
            &url,
            "service_account",
            &format!("dpop_key_file = \"{}\"", key.display()),
        ),
    )
    .unwrap();
    let proc = ProxyProcess::start(&cfg, &[("RUST_LOG", "trace")]);
    let c = client();
    for _ in 0..3 {
        let r = c
            .get(format!("{}/raas/v2/catalogs", proc.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        mock.rotate_dpop_nonce();
    }
    let tokens = mock.issued_tokens();
    assert_eq!(tokens.len(), 1);
    let (code, logs) = proc.terminate();
    assert_eq!(code, 0);
    assert!(logs.contains("\"level\":\"TRACE\""));
    for line in pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !logs.contains(line),
            "a line of the private key appeared in the logs"
        );
    }
    assert!(!logs.contains(&tokens[0]));
}
