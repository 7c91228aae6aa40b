//! HTTPS upstreams: certificates are verified, `upstream.ca_file` adds roots, ALPN picks HTTP/2.

use crate::support::*;

/// An HTTPS upstream whose certificate a private CA signed, and a proxy trusting that CA
/// (`upstream.ca_file`, plain HTTP refused).
async fn private_ca_upstream_and_proxy() -> (FakeUpstream, TestProxy, tempfile::TempDir) {
    let (ca_pem, server) = private_ca_server();
    let upstream = FakeUpstream::start_tls(server).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let toml = config_toml(
        &upstream.url(),
        "",
        &format!("ca_file = \"{}\"", ca_file.display()),
    )
    .replace("allow_http = true", "allow_http = false");
    (upstream, TestProxy::start(&toml).await, dir)
}

#[tokio::test]
async fn https_upstream_with_extra_ca_uses_http2_and_verifies() {
    let (upstream, proxy, _dir) = private_ca_upstream_and_proxy().await;
    for _ in 0..3 {
        let resp = client()
            .get(format!("{}/raas/v2/catalogs", proxy.url))
            .header("authorization", "Basic ZHJvcDptZQ==")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(s.version, http::Version::HTTP_2);
        assert_eq!(s.headers["authorization"], expected_basic().as_str());
    }
}

#[tokio::test]
async fn requests_arriving_together_share_one_http2_connection() {
    let (upstream, proxy, _dir) = private_ca_upstream_and_proxy().await;
    // Twenty at once before any connection exists: they wait for one and share it.
    let url = format!("{}/raas/v2/slow?ms=50", proxy.url);
    assert_eq!(concurrent_gets(vec![url.clone(); 20]).await, [200; 20]);
    assert_eq!(concurrent_gets(vec![url; 20]).await, [200; 20]);
    assert_eq!(upstream.requests().len(), 40);
    assert!(upstream
        .requests()
        .iter()
        .all(|s| s.version == http::Version::HTTP_2));
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused_with_502() {
    let (_ca_pem, server) = private_ca_server();
    let upstream = FakeUpstream::start_tls(server).await;
    let toml = config_toml(&upstream.url(), "", "").replace("allow_http = true", "");
    let proxy = TestProxy::start(&toml).await;
    let resp = proxy.get("/raas/v2/catalogs").await;
    let body = assert_proxy_error(resp, 502, "upstream_unreachable").await;
    assert!(
        body["message"].as_str().unwrap().contains("certificate"),
        "{body}"
    );
    assert!(upstream.requests().is_empty());
}

#[test]
fn a_ca_file_without_certificates_is_a_config_problem() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstream]\nca_file = \"{}\"\n[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n",
            ca.display()
        ),
    )
    .unwrap();
    let (code, _, err) = run_bin(&["check-config", "--config", cfg.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("upstream.ca_file"), "{err}");
}
