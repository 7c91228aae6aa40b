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
