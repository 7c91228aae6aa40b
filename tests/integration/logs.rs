//! Secrets never reach the logs, even at `RUST_LOG=trace`.

use crate::support::*;

#[tokio::test]
async fn no_secret_in_trace_logs() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, config_toml(&upstream.url(), "", "")).unwrap();
    let proc = ProxyProcess::start(&cfg, &[("RUST_LOG", "trace")]);

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
