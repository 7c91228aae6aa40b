//! The admin listener.

use crate::support::*;

#[tokio::test]
async fn livez_readyz_status_and_metrics() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let c = client();

    let livez = c
        .get(format!("{}/livez", proxy.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(livez.status(), 200);
    let readyz = c
        .get(format!("{}/readyz", proxy.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 200);

    for _ in 0..3 {
        c.get(format!("{}/raas/v2/catalogs", proxy.url))
            .send()
            .await
            .unwrap();
    }

    let status = c
        .get(format!("{}/status", proxy.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200);
    let text = status.text().await.unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["profiles"]["default"]["auth"], "basic");
    assert_eq!(json["profiles"]["default"]["ready"], true);
    assert_eq!(json["profiles"]["default"]["identity"], PLATFORM);
    assert_eq!(json["cache"]["backend"], "memory");
    assert!(!text.contains(API_KEY));
    assert!(!text.contains(&expected_basic()[6..]));

    let metrics = c
        .get(format!("{}/metrics", proxy.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains(r#"tango_proxy_requests_total{class="2xx"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"tango_proxy_requests_total{class="4xx"} 0"#),
        "{text}"
    );
    assert!(
        text.contains("tango_proxy_request_duration_seconds_count 3"),
        "{text}"
    );
    assert!(text.contains("tango_proxy_build_info"));
    assert!(!text.contains(API_KEY));
}

/// `tango-auth-proxy healthcheck ARGS` with `envs`, off the runtime; its exit code and stderr.
async fn healthcheck(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let mut all = vec!["healthcheck"];
    all.extend_from_slice(args);
    let args: Vec<String> = all.iter().map(|s| s.to_string()).collect();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (code, _, stderr) = run_bin(&args, &envs);
        (code, stderr)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn healthcheck_exits_by_livez_and_readyz_and_finds_the_admin_address_itself() {
    let (mock, url) = start_mock(mock_config(1.0)).await;
    mock.fail_token_requests(tango_auth_proxy::mock::FailMode::ServerError, 1000);
    let proxy = TestProxy::start(&oauth_toml(&url, "service_account", "")).await;
    let admin = proxy.admin_url.trim_start_matches("http://").to_string();
    // Alive, but not ready: no token while the token endpoint fails.
    assert_eq!(healthcheck(&["--admin", &admin], &[]).await.0, 0);
    // The token counters exist at 0 from start, so an alert can see "no success yet".
    let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
    assert!(
        metrics
            .contains(r#"tango_proxy_token_requests_total{profile="default",outcome="success"} 0"#),
        "{metrics}"
    );
    let (code, stderr) = healthcheck(&["--admin", &admin, "--ready"], &[]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("/readyz answered 503"), "{stderr}");
    // The address from the config file named by $TANGO_PROXY_CONFIG or --config, or from the
    // environment override; an unspecified address is checked on loopback.
    let dir = tempfile::tempdir().unwrap();
    let port = admin.rsplit(':').next().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, format!("[listen]\nadmin = \"0.0.0.0:{port}\"\n")).unwrap();
    let cfg = cfg.to_str().unwrap();
    assert_eq!(healthcheck(&[], &[("TANGO_PROXY_CONFIG", cfg)]).await.0, 0);
    assert_eq!(healthcheck(&["--config", cfg], &[]).await.0, 0);
    assert_eq!(
        healthcheck(&[], &[("TANGO_PROXY_LISTEN__ADMIN", &admin)])
            .await
            .0,
        0
    );
    // Nothing listening: 1, with the reason.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().to_string();
    drop(closed);
    let (code, stderr) = healthcheck(&["--admin", &dead], &[]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains(&dead), "{stderr}");
    // A basic profile is ready at once.
    let upstream = FakeUpstream::start().await;
    let basic = TestProxy::basic(&upstream).await;
    let admin = basic.admin_url.trim_start_matches("http://").to_string();
    assert_eq!(healthcheck(&["--admin", &admin, "--ready"], &[]).await.0, 0);
}
