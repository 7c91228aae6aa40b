//! Large bodies stream through both ways, intact, without the proxy holding them in memory.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// What came back for a raw upload: status, header section (lower-cased) and body.
struct RawAnswer {
    status: u16,
    head: String,
    body: String,
}

/// POSTs about `total` bytes with `Transfer-Encoding: chunked` (no length up front) on a raw
/// socket, reading the answer while still sending. A proxy that answers early and closes the
/// connection makes the sender fail, but the answer it wrote is already in our receive queue,
/// so the status is read either way.
async fn chunked_upload(addr: SocketAddr, path: &str, total: usize) -> RawAnswer {
    let (mut rd, mut wr) = TcpStream::connect(addr).await.unwrap().into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        let chunk = vec![b'u'; 64 << 10];
        let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
        wr.write_all(head.as_bytes()).await?;
        let mut sent = 0;
        while sent < total {
            wr.write_all(&frame).await?;
            sent += chunk.len();
        }
        wr.write_all(b"0\r\n\r\n").await?;
        // Dropping the write half would half-close the socket, which the proxy takes for the
        // app going away; hold it until the answer is read and this task is aborted.
        std::future::pending::<()>().await;
        Ok::<_, std::io::Error>(sent)
    });
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    let read_all = async {
        // Read to the end of the answer: its Content-Length, or EOF / reset.
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if len.is_some_and(|len| body.len() >= len) {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read_all)
        .await
        .expect("no answer to the upload");
    writer.abort();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    RawAnswer {
        status: raw_status(head),
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

#[tokio::test]
async fn a_chunked_upload_over_max_body_to_an_oauth_profile_is_refused_without_buffering_it() {
    let (_mock, mock_url) = start_mock(mock_config(1.0)).await;
    let upstream = FakeUpstream::start().await;
    // Tokens come from the mock; requests go to the recording upstream.
    let toml = oauth_toml_via(&mock_url, &upstream.url(), "service_account", "").replace(
        "[listen]\n",
        "[listen]\nmax_body = \"10MiB\"\nworkers = 1\n",
    );
    assert!(toml.contains("workers = 1"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, toml).unwrap();
    let proc = ProxyProcess::start(&cfg, &[("RUST_LOG", "warn,tango_auth_proxy::app=info")]);
    let url = proc.url();

    // Mint the token, warm up connections and allocator arenas, then take the baseline.
    for _ in 0..3 {
        let resp = client()
            .get(format!("{url}/raas/v2/catalogs"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let baseline = proc.proc_kib("VmHWM:");

    let answer = chunked_upload(proc.proxy_addr, "/raas/v2/upload", 100 * 1000 * 1000).await;
    let peak = proc.proc_kib("VmHWM:");
    let growth_mib = (peak.saturating_sub(baseline)) as f64 / 1024.0;
    eprintln!("proxy peak RSS {peak} KiB, {growth_mib:.2} MiB over the {baseline} KiB baseline");

    assert_eq!(answer.status, 413, "{}\n{}", answer.head, answer.body);
    assert!(
        answer.head.contains("x-tango-proxy-error: body_too_large"),
        "{}",
        answer.head
    );
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_json_error_shape(&body, 413, "body_too_large");
    let complete: Vec<_> = upstream
        .requests()
        .into_iter()
        .filter(|s| s.uri.starts_with("/raas/v2/upload") && s.complete)
        .collect();
    assert!(
        complete.is_empty(),
        "Tango received the over-limit body whole: {complete:?}"
    );
    // Buffering the body would add about 100 MiB; streaming it needs a few socket buffers.
    assert!(
        growth_mib < 32.0,
        "peak RSS grew by {growth_mib:.1} MiB (baseline {baseline} KiB, peak {peak} KiB)"
    );
    let (code, _) = proc.terminate();
    assert_eq!(code, 0);
}
