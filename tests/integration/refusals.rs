//! Requests Tango's HTTP/2 edge refused without processing them — streams above a GOAWAY's
//! last-stream-id, `RST_STREAM(REFUSED_STREAM)`, a connection retired before its first stream —
//! are sent once more, whatever their method, when their body was kept; each reaches Tango's
//! business logic exactly once.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use futures_util::stream;

use crate::support::h2_upstream::{H2Options, H2Upstream, RefusedBy};
use crate::support::*;

/// An HTTP/2 edge run with `options` and a proxy (Basic profile) in front of it; `extra` is
/// more `[upstream]` TOML. The directory holds the file of the edge's private CA.
async fn edge_and_proxy(
    options: H2Options,
    extra: &str,
) -> (H2Upstream, TestProxy, tempfile::TempDir) {
    let (up, dir, ca_file) = edge(options).await;
    let toml = config_toml(
        &up.url(),
        "",
        &format!("ca_file = \"{}\"\n{extra}", ca_file.display()),
    )
    .replace("allow_http = true", "allow_http = false");
    (up, TestProxy::start(&toml).await, dir)
}

/// An HTTP/2 edge with a private CA, the CA written to a file in a new directory.
async fn edge(options: H2Options) -> (H2Upstream, tempfile::TempDir, std::path::PathBuf) {
    let (ca_pem, tls) = private_ca_server();
    let up = H2Upstream::start(tls, options).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    (up, dir, ca_file)
}

/// The value of one sample in the proxy's `/metrics`, 0 when absent.
async fn metric(proxy: &TestProxy, sample: &str) -> f64 {
    let text = get_text(&format!("{}/metrics", proxy.admin_url)).await;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn retries(proxy: &TestProxy, reason: &str) -> f64 {
    metric(
        proxy,
        &format!("tango_proxy_upstream_retries_total{{reason=\"{reason}\"}}"),
    )
    .await
}

/// One app request: what was sent and what came back.
struct Exchange {
    id: String,
    method: &'static str,
    body: Vec<u8>,
    status: u16,
    answer: String,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (id, method, len) = (&self.id, self.method, self.body.len());
        write!(
            f,
            "{method} {id} ({len} bytes) -> {} {}",
            self.status, self.answer
        )
    }
}

/// A JSON body of about `size` bytes naming `id`.
fn body_for(id: &str, size: usize) -> Vec<u8> {
    format!(r#"{{"externalRefID":"{id}","pad":"{}"}}"#, "x".repeat(size)).into_bytes()
}

async fn send(
    c: &reqwest::Client,
    proxy_url: &str,
    id: String,
    method: &'static str,
    body: Vec<u8>,
    refuse_once: bool,
) -> Exchange {
    let mut req = c
        .request(
            method.parse().unwrap(),
            format!("{proxy_url}/raas/v2/orders/{id}"),
        )
        .header("x-test-id", &id);
    if refuse_once {
        req = req.header("x-refuse", "once");
    }
    if !body.is_empty() {
        req = req
            .header("content-type", "application/json")
            .body(body.clone());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let answer = resp.text().await.unwrap();
    Exchange {
        id,
        method,
        body,
        status,
        answer,
    }
}

/// Every exchange got the edge's own answer for its own request, and the edge processed each
/// request exactly once with its whole body.
fn assert_each_processed_once(exchanges: &[Exchange], up: &H2Upstream) {
    let failed: Vec<_> = exchanges.iter().filter(|e| e.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        exchanges.len(),
        &failed[..failed.len().min(3)]
    );
    let mut processed: HashMap<String, Vec<_>> = HashMap::new();
    for p in up.processed() {
        processed.entry(p.test_id.clone()).or_default().push(p);
    }
    assert_eq!(
        processed.len(),
        exchanges.len(),
        "requests the edge processed"
    );
    for e in exchanges {
        let sha = sha256_hex(&e.body);
        let answer: serde_json::Value = serde_json::from_str(&e.answer).unwrap();
        assert_eq!(answer["id"], e.id.as_str(), "{e:?}");
        assert_eq!(answer["sha256"], sha.as_str(), "{e:?}");
        let seen = &processed[&e.id];
        assert_eq!(seen.len(), 1, "{} processed {} times", e.id, seen.len());
        assert_eq!(seen[0].method, e.method);
        assert!(seen[0].complete, "{} arrived incomplete", e.id);
        assert_eq!(seen[0].body_len, e.body.len() as u64, "{}", e.id);
        assert_eq!(seen[0].body_sha256, sha, "{}", e.id);
    }
}

#[tokio::test]
async fn rotating_http2_connections_lose_no_request_under_concurrent_load() {
    const WORKERS: usize = 8;
    const PER_WORKER: usize = 40;
    let options = H2Options {
        rotate_after: Some(10),
        ..Default::default()
    };
    // Room for the 100 KiB bodies below, which outgrow HTTP/2's initial 64 KiB window: the edge
    // holds them unread, so a refusal catches them half-sent.
    let (up, proxy, _dir) = edge_and_proxy(options, "replay_max_body = \"256KiB\"").await;

    up.workers(WORKERS);
    let c = client();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (c, up, url) = (c.clone(), up.clone(), proxy.url.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                for k in 0..PER_WORKER {
                    let id = format!("w{w}-r{k}");
                    let (method, body) = match k % 5 {
                        0 => ("GET", Vec::new()),
                        1 => ("POST", body_for(&id, 200)),
                        2 => ("DELETE", Vec::new()),
                        3 if k % 10 == 3 => ("POST", body_for(&id, 100 << 10)),
                        3 => ("PATCH", body_for(&id, 2 << 10)),
                        _ => ("PUT", body_for(&id, 50)),
                    };
                    done.push(send(&c, &url, id, method, body, false).await);
                }
                up.worker_done();
                done
            })
        })
        .collect();
    let mut exchanges = Vec::new();
    for w in workers {
        let done = tokio::time::timeout(Duration::from_secs(120), w)
            .await
            .expect("the load did not finish")
            .unwrap();
        exchanges.extend(done);
    }

    assert_each_processed_once(&exchanges, &up);
    let refused = up.refused();
    eprintln!(
        "{} requests, {} connections, {} GOAWAYs, {} streams refused",
        exchanges.len(),
        up.connections(),
        up.goaways(),
        refused.len()
    );
    assert!(
        refused.iter().all(|r| r.by == RefusedBy::GoAway),
        "{refused:?}"
    );
    // Refusals happen every run (see the edge's lockstep rule), connections really rotate,
    // and no stream was opened on a connection after the proxy had read its GOAWAY.
    assert!(!refused.is_empty(), "the edge refused nothing");
    assert!(up.goaways() >= 5, "only {} GOAWAYs", up.goaways());
    assert!(up.connections() > up.goaways() as u64);
    assert_eq!(up.opened_after_goaway(), 0);
    assert_eq!(retries(&proxy, "goaway").await, refused.len() as f64);
    assert_eq!(retries(&proxy, "refused_stream").await, 0.0);
}

#[tokio::test]
async fn refused_streams_are_sent_once_more_whatever_the_method() {
    let (up, proxy, _dir) = edge_and_proxy(H2Options::default(), "").await;
    let c = client();
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];
    let sends: Vec<_> = (0..30)
        .map(|i| {
            let (c, url) = (c.clone(), proxy.url.clone());
            let method = methods[i % methods.len()];
            let id = format!("r{i}");
            let body = match method {
                "GET" | "DELETE" => Vec::new(),
                _ => body_for(&id, 1000 * i),
            };
            // Two in three are refused the first time they arrive.
            tokio::spawn(async move { send(&c, &url, id, method, body, i % 3 != 0).await })
        })
        .collect();
    let mut exchanges = Vec::new();
    for s in sends {
        exchanges.push(s.await.unwrap());
    }

    assert_each_processed_once(&exchanges, &up);
    let refused = up.refused();
    assert_eq!(refused.len(), 20, "{refused:?}");
    assert!(refused.iter().all(|r| r.by == RefusedBy::RefusedStream));
    assert_eq!(retries(&proxy, "refused_stream").await, 20.0);
    assert_eq!(retries(&proxy, "goaway").await, 0.0);
    let logs = logs::captured();
    assert!(
        logs.lines().any(|l| l.contains("DEBUG")
            && l.contains("sending it once more")
            && l.contains("refused_stream")),
        "no DEBUG line per retry"
    );
}

#[tokio::test]
async fn a_refused_request_whose_body_was_not_kept_gets_502_and_is_not_sent_again() {
    // upstream.replay_max_body keeps its default, 64 KiB.
    let (up, proxy, _dir) = edge_and_proxy(H2Options::default(), "").await;
    let c = client();

    // A declared length over the cap: no copy is kept from the start.
    let resp = c
        .post(format!("{}/raas/v2/orders", proxy.url))
        .header("x-test-id", "by-length")
        .header("x-refuse", "once")
        .body(body_for("by-length", 100 << 10))
        .send()
        .await
        .unwrap();
    assert_proxy_error(resp, 502, "upstream_unreachable").await;

    // A chunked body that grows past the cap: the copy is dropped on the way.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![b'c'; 10 << 10])).collect();
    let resp = c
        .post(format!("{}/raas/v2/orders", proxy.url))
        .header("x-test-id", "chunked")
        .header("x-refuse", "once")
        .body(reqwest::Body::wrap_stream(stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_proxy_error(resp, 502, "upstream_unreachable").await;

    // Each reached the edge exactly once — refused, so processed zero times: had either been
    // sent again, the edge would have answered it 200.
    let refused: Vec<_> = up.refused().into_iter().map(|r| r.test_id).collect();
    assert_eq!(refused, ["by-length", "chunked"]);
    assert!(up.processed().is_empty(), "{:?}", up.processed());
    assert_eq!(retries(&proxy, "refused_stream").await, 0.0);
}

#[tokio::test]
async fn a_request_refused_again_on_its_resend_gets_502() {
    let (up, proxy, _dir) = edge_and_proxy(H2Options::default(), "").await;
    let resp = client()
        .post(format!("{}/raas/v2/orders", proxy.url))
        .header("x-test-id", "stubborn")
        .header("x-refuse", "always")
        .body(body_for("stubborn", 100))
        .send()
        .await
        .unwrap();
    let body = assert_proxy_error(resp, 502, "upstream_unreachable").await;
    assert!(
        body["message"].as_str().unwrap().contains("refused stream"),
        "{body}"
    );
    // Sent twice, not more; processed never.
    assert_eq!(up.refused().len(), 2);
    assert!(up.processed().is_empty());
    assert_eq!(retries(&proxy, "refused_stream").await, 1.0);
}

#[tokio::test]
async fn a_connection_retired_before_its_first_stream_costs_one_resend() {
    let options = H2Options {
        goaway_first_connection: true,
        ..Default::default()
    };
    let (up, proxy, _dir) = edge_and_proxy(options, "").await;

    let id = "first".to_string();
    let body = body_for(&id, 300);
    let exchange = send(&client(), &proxy.url, id, "POST", body, false).await;
    assert_each_processed_once(&[exchange], &up);
    assert_eq!(up.connections(), 2);
    // Whether the proxy had opened the stream when it read the GOAWAY (reason goaway) or not
    // (unsent) is a matter of timing; either way it is sent exactly once more.
    let resent = retries(&proxy, "goaway").await + retries(&proxy, "unsent").await;
    assert_eq!(resent, 1.0);
}

/// The claims of a DPoP proof (signature not checked: only `jti`, `htm`, `htu` matter here).
fn proof_claims(proof: &str) -> serde_json::Value {
    let payload = proof.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

#[tokio::test]
async fn a_dpop_request_is_sent_again_with_a_fresh_proof() {
    let (_mock, mock_url) = start_mock(mock_config(1.0)).await;
    let (up, dir, ca_file) = edge(H2Options::default()).await;
    let (key, _) = crate::dpop::keygen(dir.path(), "ES256");
    let toml = crate::dpop::dpop_toml(&mock_url, &up.url(), &key).replace(
        "allow_http = true",
        &format!("allow_http = true\nca_file = \"{}\"", ca_file.display()),
    );
    let proxy = TestProxy::start(&toml).await;

    let id = "dpop-order".to_string();
    let exchange = send(
        &client(),
        &proxy.url,
        id,
        "POST",
        body_for("dpop-order", 500),
        true,
    )
    .await;
    assert_each_processed_once(&[exchange], &up);

    let refused = up.refused();
    assert_eq!(refused.len(), 1);
    let first = proof_claims(
        refused[0]
            .dpop
            .as_deref()
            .expect("no proof on the first send"),
    );
    let second = proof_claims(
        up.processed()[0]
            .dpop
            .as_deref()
            .expect("no proof on the resend"),
    );
    assert_ne!(first["jti"], second["jti"], "a DPoP proof was reused");
    for claims in [&first, &second] {
        assert_eq!(claims["htm"], "POST");
        assert_eq!(
            claims["htu"],
            format!("{}/raas/v2/orders/dpop-order", up.url())
        );
    }
    assert_eq!(retries(&proxy, "refused_stream").await, 1.0);
}
