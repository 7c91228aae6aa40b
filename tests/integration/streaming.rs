//! Large bodies stream through both ways, intact, without the proxy holding them in memory.

use crate::support::*;

const SIZE: usize = 20 * 1000 * 1000;

async fn upload(url: &str) -> (String, serde_json::Value) {
    let payload = pattern(SIZE);
    let expected = sha256_hex(&payload);
    let resp = client()
        .post(format!("{url}/raas/v2/upload"))
        .body(payload)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    (expected, resp.json().await.unwrap())
}

async fn download(url: &str) -> (usize, String) {
    let mut resp = client()
        .get(format!("{url}/raas/v2/download?bytes={SIZE}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut len = 0;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        len += chunk.len();
        ctx.update(&chunk);
    }
    (len, hex(ctx.finish().as_ref()))
}

#[tokio::test]
async fn twenty_megabytes_up_and_down_with_matching_sha256() {
    let upstream = FakeUpstream::start().await;
    let proxy = TestProxy::start(&config_toml(&upstream.url(), "max_body = \"32MiB\"", "")).await;

    let (expected, echoed) = upload(&proxy.url).await;
    assert_eq!(echoed["len"], SIZE);
    assert_eq!(echoed["sha256"], expected.as_str());
    assert_eq!(upstream.last().body_sha256, expected);

    let (len, sha) = download(&proxy.url).await;
    assert_eq!(len, SIZE);
    assert_eq!(sha, sha256_hex(&pattern(SIZE)));
}

#[tokio::test]
async fn the_proxy_process_memory_stays_bounded_while_streaming() {
    let upstream = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        config_toml(&upstream.url(), "max_body = \"32MiB\"\nworkers = 1", ""),
    )
    .unwrap();
    let proc = ProxyProcess::start(&cfg, &[("RUST_LOG", "warn,tango_auth_proxy::app=info")]);
    let url = proc.url();

    // Warm up connections and allocator arenas, then take the baseline.
    for _ in 0..3 {
        client()
            .get(format!("{url}/raas/v2/catalogs"))
            .send()
            .await
            .unwrap();
    }
    let baseline = proc.proc_kib("VmHWM:");

    for _ in 0..2 {
        let (expected, echoed) = upload(&url).await;
        assert_eq!(echoed["sha256"], expected.as_str());
        let (len, _) = download(&url).await;
        assert_eq!(len, SIZE);
    }
    let peak = proc.proc_kib("VmHWM:");
    let growth_mib = (peak.saturating_sub(baseline)) as f64 / 1024.0;
    eprintln!("proxy peak RSS {peak} KiB, {growth_mib:.2} MiB over the {baseline} KiB baseline");
    // Buffering either body whole would add at least 19 MiB.
    assert!(
        growth_mib < 8.0,
        "peak RSS grew by {growth_mib:.1} MiB (baseline {baseline} KiB, peak {peak} KiB)"
    );
    let (code, _) = proc.terminate();
    assert_eq!(code, 0);
}
