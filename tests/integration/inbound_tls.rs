//! HTTPS and mutual TLS on the proxy listener: stores identified by their client certificate,
//! HTTP/2 (ALPN) and HTTP/1.1 both held to the gateway's guardrails, certificates that must be
//! refused, and the listener's limits on TLS connections (an unfinished handshake, HTTP/2 stream
//! floods, rapid resets and CONTINUATION floods).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rcgen::SanType;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tango_auth_proxy::config::Config;
use tango_auth_proxy::mock::{MockConfig, MockTango};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::transport::{basic, https, tls_client, Ca, Identity, TlsFiles};
use crate::support::*;

const POS3_KEY: &str = "pos-3-key-9f1c2e7a5b3d";
const POS2_KEY: &str = "pos-2-key-4d6a8c0e2f1b";

/// A gateway over mutual TLS: pos-1 known by a URI SAN, pos-2 by its fingerprint (and a key),
/// pos-3 by a key only. Returns the proxy, its https base URL, the mock and the certificates
/// of pos-1 and pos-2.
struct Gateway {
    proxy: TestProxy,
    base: String,
    mock: MockTango,
    files: TlsFiles,
    pos1: Identity,
    pos2: Identity,
}

async fn start_gateway(extra_listen: &str) -> Gateway {
    let (mock, mock_url) = start_mock(MockConfig::with_stores(3)).await;
    for secret in [POS2_KEY, POS3_KEY, "franchise-secret"] {
        logs::watch_secret(secret.to_string());
    }
    for i in 1..=3 {
        logs::watch_secret(format!("store-{i}-password"));
    }
    let files = TlsFiles::new();
    let pos1 = files.ca.client(&["spiffe://franchise/pos-1"], false);
    let pos2 = files.ca.client(&["till.pos-2.example"], false);
    let toml = format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"
{tls}
{extra_listen}
[upstream]
url = "{mock_url}"
allow_http = true
{profiles}
[callers.pos-1]
cert_san = "spiffe://franchise/pos-1"
profile = "store-1"
accounts = ["A-STORE-1"]
customers = ["C-STORE-1"]
[callers.pos-2]
cert_sha256 = "{fp2}"
key_sha256 = "{key2}"
profile = "store-2"
accounts = ["A-STORE-2"]
customers = ["C-STORE-2"]
[callers.pos-3]
key_sha256 = "{key3}"
profile = "store-3"
accounts = ["A-STORE-3"]
customers = ["C-STORE-3"]
"#,
        tls = files.listen_keys(true),
        profiles = store_profiles(&mock_url, 3),
        fp2 = pos2.openssl_fingerprint(),
        key2 = sha256_hex(POS2_KEY.as_bytes()),
        key3 = sha256_hex(POS3_KEY.as_bytes()),
    );
    let proxy = TestProxy::start(&toml).await;
    let base = format!("https://{}", proxy.addr());
    Gateway {
        proxy,
        base,
        mock,
        files,
        pos1,
        pos2,
    }
}

/// The principal the mock saw for the last request to `path`.
fn principal_of(mock: &MockTango, path: &str) -> Option<String> {
    mock.requests()
        .into_iter()
        .rev()
        .find(|r| r.path == path)
        .and_then(|r| r.principal)
}

async fn error_cause(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let cause = r
        .headers()
        .get("x-tango-proxy-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, cause)
}

/// Own account 200 (reaching Tango as the caller's own profile), another store's account 403,
/// a body naming another store's account 403: the gateway's guardrails, on one client.
async fn assert_guardrails(
    gw: &Gateway,
    client: &reqwest::Client,
    store: usize,
    auth: Option<&str>,
) {
    let other = store % 3 + 1;
    let with_auth = |rb: reqwest::RequestBuilder| match auth {
        Some(a) => rb.header("authorization", a),
        None => rb,
    };
    let path = format!("/raas/v2/accounts/A-STORE-{store}");
    let own = with_auth(client.get(format!("{}{path}", gw.base)))
        .send()
        .await
        .unwrap();
    let version = own.version();
    assert_eq!(own.status(), 200, "{:?}", own.text().await);
    assert_eq!(
        principal_of(&gw.mock, &path).as_deref(),
        Some(format!("store-{store}").as_str()),
        "reached Tango under another profile ({version:?})"
    );
    let theirs = with_auth(client.get(format!("{}/raas/v2/accounts/A-STORE-{other}", gw.base)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_cause(theirs).await,
        (403, "caller_forbidden".to_string()),
        "{version:?}"
    );
    let before = gw.mock.requests().len();
    let trick = json!({
        "accountIdentifier": format!("A-STORE-{store}"),
        "customerIdentifier": format!("C-STORE-{store}"),
        "amount": 1,
        "utid": "U000001",
        "recipient": {"accountIdentifier": format!("A-STORE-{other}")},
    });
    let r = with_auth(client.post(format!("{}/raas/v2/orders", gw.base)))
        .json(&trick)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_cause(r).await,
        (403, "caller_forbidden".to_string()),
        "{version:?}"
    );
    assert_eq!(
        gw.mock.requests().len(),
        before,
        "a body trick reached Tango"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_with_client_certificates_are_identified_without_a_key_over_http1_and_http2() {
    let gw = start_gateway("").await;
    let ca = gw.files.ca.pem.clone();
    for h2 in [false, true] {
        let pos1 = https(&ca, Some(&gw.pos1), h2);
        let r = pos1
            .get(format!("{}/raas/v2/accounts/A-STORE-1", gw.base))
            .send()
            .await
            .unwrap();
        let expected = if h2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(r.version(), expected);
        assert_guardrails(&gw, &pos1, 1, None).await;
        // Known by its fingerprint, written with colons as openssl prints it.
        assert_guardrails(&gw, &https(&ca, Some(&gw.pos2), h2), 2, None).await;
        // No certificate: a key still authenticates (client certificates are optional).
        let auth = basic("pos-3", POS3_KEY);
        assert_guardrails(&gw, &https(&ca, None, h2), 3, Some(&auth)).await;

        // A credential beside a certificate must name the certificate's caller.
        let own_key = basic("pos-2", POS2_KEY);
        let r = https(&ca, Some(&gw.pos2), h2)
            .get(format!("{}/raas/v2/accounts/A-STORE-2", gw.base))
            .header("authorization", &own_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        for auth in [own_key.as_str(), &basic("pos-3", POS3_KEY)] {
            let before = gw.mock.requests().len();
            let r = pos1
                .get(format!("{}/raas/v2/accounts/A-STORE-1", gw.base))
                .header("authorization", auth)
                .send()
                .await
                .unwrap();
            assert_eq!(
                error_cause(r).await,
                (401, "caller_unauthorized".to_string())
            );
            assert_eq!(gw.mock.requests().len(), before);
        }
        // Neither a certificate nor a key.
        let r = https(&ca, None, h2)
            .get(format!("{}/raas/v2/accounts/A-STORE-1", gw.base))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_cause(r).await,
            (401, "caller_unauthorized".to_string())
        );
    }
    // Plain HTTP on the TLS listener gets no HTTP answer.
    let plain = client()
        .get(format!(
            "http://{}/raas/v2/accounts/A-STORE-1",
            gw.proxy.addr()
        ))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_another_ca_expired_or_matching_no_caller_are_refused() {
    let gw = start_gateway("").await;
    let ca = gw.files.ca.pem.clone();
    let stranger = Ca::new().client(&["spiffe://franchise/pos-1"], false);
    let expired = gw.files.ca.client(&["spiffe://franchise/pos-1"], true);
    let before = gw.mock.requests().len();
    for (what, id) in [("another CA's", &stranger), ("an expired", &expired)] {
        for h2 in [false, true] {
            let r = https(&ca, Some(id), h2)
                .get(format!("{}/raas/v2/accounts/A-STORE-1", gw.base))
                .send()
                .await;
            assert!(r.is_err(), "{what} certificate was accepted: {r:?}");
        }
    }
    let refused = ended_count(
        &gw.proxy.admin_url,
        "tango_proxy_connections_ended_total{listener=\"proxy\",reason=\"tls_handshake\"}",
    )
    .await;
    assert_eq!(refused, 4.0);
    // Valid, but no caller carries its name: authenticated TLS, unauthenticated caller.
    let nobody = gw.files.ca.client(&["spiffe://franchise/pos-99"], false);
    for h2 in [false, true] {
        let r = https(&ca, Some(&nobody), h2)
            .get(format!("{}/raas/v2/accounts/A-STORE-1", gw.base))
            .send()
            .await
            .unwrap();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["httpCode"], 401, "{body}");
        assert_eq!(body["i18nKey"], "proxy.caller_unauthorized", "{body}");
    }
    assert_eq!(
        gw.mock.requests().len(),
        before,
        "a refused certificate reached Tango"
    );
}

/// A `cert_san` names one kind of subject alternative name: a DNS name matches only a
/// certificate's DNS name, a URI (a value with a scheme) only its URI. A certificate whose URI
/// reads like a DNS caller's name, or whose DNS name reads like a URI caller's, names no caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_name_matches_only_a_caller_of_its_kind() {
    let (mock, mock_url) = start_mock(MockConfig::with_stores(2)).await;
    logs::watch_secret("franchise-secret".to_string());
    for i in 1..=2 {
        logs::watch_secret(format!("store-{i}-password"));
    }
    let files = TlsFiles::new();
    let toml = format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"
{tls}
[upstream]
url = "{mock_url}"
allow_http = true
{profiles}
[callers.till-dns]
cert_san = "till.store-1.pos.example"
profile = "store-1"
accounts = ["A-STORE-1"]
[callers.till-uri]
cert_san = "spiffe://franchise/store-2"
profile = "store-2"
accounts = ["A-STORE-2"]
"#,
        tls = files.listen_keys(true),
        profiles = store_profiles(&mock_url, 2),
    );
    let proxy = TestProxy::start(&toml).await;
    let base = format!("https://{}", proxy.addr());
    let ia5 = |s: &str| rcgen::Ia5String::try_from(s).unwrap();
    let cases = [
        (SanType::DnsName(ia5("Till.Store-1.POS.example")), 1, true),
        (SanType::URI(ia5("till.store-1.pos.example")), 1, false),
        (SanType::URI(ia5("spiffe://franchise/store-2")), 2, true),
        (
            SanType::DnsName(ia5("spiffe://franchise/store-2")),
            2,
            false,
        ),
    ];
    for (san, store, matches) in cases {
        let shown = format!("{san:?}");
        let id = files.ca.client_with(vec![san], false);
        let before = mock.requests().len();
        let r = https(&files.ca.pem, Some(&id), false)
            .get(format!("{base}/raas/v2/accounts/A-STORE-{store}"))
            .send()
            .await
            .unwrap();
        if matches {
            assert_eq!(r.status(), 200, "{shown}");
        } else {
            assert_eq!(
                error_cause(r).await,
                (401, "caller_unauthorized".to_string()),
                "{shown} named a caller of the other kind"
            );
            assert_eq!(mock.requests().len(), before, "{shown}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_refuse_a_handshake_without_one() {
    let gw = start_gateway("tls_client_auth = \"required\"").await;
    let ca = gw.files.ca.pem.clone();
    let r = https(&ca, None, false)
        .get(format!("{}/raas/v2/accounts/A-STORE-3", gw.base))
        .header("authorization", basic("pos-3", POS3_KEY))
        .send()
        .await;
    assert!(r.is_err(), "{r:?}");
    let r = https(&ca, Some(&gw.pos1), true)
        .get(format!("{}/raas/v2/accounts/A-STORE-1", gw.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A sidecar may take HTTPS too (no client identity then); an unfinished TLS handshake is closed
/// after listen.header_timeout and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_serves_https_and_closes_an_unfinished_handshake() {
    let upstream = FakeUpstream::start().await;
    let files = TlsFiles::new();
    let listen = format!("{}header_timeout = \"300ms\"\n", files.listen_keys(false));
    let proxy = TestProxy::start(&config_toml(&upstream.url(), &listen, "")).await;
    let base = format!("https://{}", proxy.addr());
    for h2 in [false, true] {
        let r = https(&files.ca.pem, None, h2)
            .get(format!("{base}/raas/v2/catalogs"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    let started = Instant::now();
    let mut silent = TcpStream::connect(proxy.addr()).await.unwrap();
    // Half a ClientHello, then nothing.
    silent
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the listener kept an unfinished handshake open")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected the connection closed, got {:?}", &buf[..n]);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    let ended = ended_count(
        &proxy.admin_url,
        "tango_proxy_connections_ended_total{listener=\"proxy\",reason=\"tls_handshake\"}",
    )
    .await;
    assert_eq!(ended, 1.0);
    // A finished handshake and then no HTTP/1.1 request: closed as a silent client.
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(tls_client(&files.ca.pem, None, &[b"http/1.1"])));
    let tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut stream = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a silent TLS client was kept");
    let silent = ended_count(
        &proxy.admin_url,
        "tango_proxy_connections_ended_total{listener=\"proxy\",reason=\"header_timeout\"}",
    )
    .await;
    assert_eq!(silent, 1.0);
    // An HTTP/2 connection with no request is closed after the same time.
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_client(&files.ca.pem, None, &[b"h2"])));
    let tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    let stream = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(stream).await.unwrap();
    let opened = Instant::now();
    let conn = tokio::spawn(conn);
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was kept open");
    assert!(opened.elapsed() >= Duration::from_millis(250));
    drop(send);
}

/// The value of a connections-ended series once it stops changing: the listener counts a
/// connection after closing it, so a client may see the close first. Polls for at most 5 s,
/// returning as soon as two reads 50 ms apart agree on a non-zero value.
async fn ended_count(admin_url: &str, series: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = metric(admin_url, series).await;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = metric(admin_url, series).await;
        if now == last && now > 0.0 {
            break;
        }
        last = now;
    }
    last
}

/// A TLS HTTP/2 connection to `addr` with the raw h2 client.
async fn h2_connection(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    h2_connection_with(addr, config, h2::client::Builder::new()).await
}

/// [`h2_connection`] with the client settings of `builder` (a flow-control window, say).
async fn h2_connection_with(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
    builder: h2::client::Builder,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) = builder.handshake::<_, Bytes>(stream).await.unwrap();
    (send, tokio::spawn(conn))
}

fn h2_get(path: &str, auth: &str) -> http::Request<()> {
    http::Request::builder()
        .uri(format!("https://localhost{path}"))
        .header("authorization", auth)
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stream_floods_and_rapid_resets_are_bounded_and_others_still_served() {
    let gw = start_gateway("").await;
    let ca = gw.files.ca.pem.clone();
    let auth = basic("pos-3", POS3_KEY);

    // The server announces its stream limit; the client can open no more at once.
    let (mut send, conn) = h2_connection(gw.proxy.addr(), tls_client(&ca, None, &[b"h2"])).await;
    send = send.ready().await.unwrap();
    let response = send
        .send_request(h2_get("/raas/v2/accounts/A-STORE-3", &auth), true)
        .unwrap()
        .0
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(send.current_max_send_streams(), 100);
    drop((send, response));
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;

    // Rapid reset: streams opened and cancelled at once. Past the limit the server ends the
    // connection with GOAWAY instead of serving an unbounded number of cancelled requests.
    let before = gw.mock.requests().len();
    let (mut send, conn) = h2_connection(gw.proxy.addr(), tls_client(&ca, None, &[b"h2"])).await;
    let mut refused = None;
    for n in 0..5_000 {
        match send.clone().ready().await {
            Ok(ready) => send = ready,
            Err(_) => {
                refused = Some(n);
                break;
            }
        }
        match send.send_request(h2_get("/raas/v2/accounts/A-STORE-3", &auth), true) {
            Ok((answer, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                drop(answer);
            }
            Err(_) => {
                refused = Some(n);
                break;
            }
        }
    }
    let outcome = tokio::time::timeout(Duration::from_secs(5), conn).await;
    // The client may see the GOAWAY, or the closed connection its next write met. How many
    // streams it got out first depends on how fast it writes before the GOAWAY arrives (all of
    // them may be in its buffers by then), so the bound is on what the server let through: the
    // cancelled requests that reached Tango, below.
    let ended_with_error = matches!(outcome, Ok(Ok(Err(_))));
    assert!(
        ended_with_error,
        "rapid resets were not stopped: refused after {refused:?} streams, {outcome:?}"
    );
    let counted = ended_count(
        &gw.proxy.admin_url,
        "tango_proxy_connections_ended_total{listener=\"proxy\",reason=\"malformed\"}",
    )
    .await;
    assert_eq!(counted, 1.0, "the rapid-reset connection was not counted");
    let forwarded = gw.mock.requests().len() - before;
    assert!(
        forwarded < 1_000,
        "{forwarded} cancelled requests reached Tango"
    );

    // CONTINUATION flood: a header block that never ends. The server stops reading it once the
    // header list limit is passed, instead of buffering without bound.
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_client(&ca, None, &[b"h2"])));
    let tcp = TcpStream::connect(gw.proxy.addr()).await.unwrap();
    let mut raw = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    raw.write_all(&frame(0x4, 0, 0, &[])).await.unwrap(); // SETTINGS
    let mut first = Vec::new();
    first.extend_from_slice(&[0x82, 0x87, 0x84]); // :method GET, :scheme https, :path /
    first.extend_from_slice(&literal(b":authority", b"localhost"));
    raw.write_all(&frame(0x1, 0x0, 1, &first)).await.unwrap(); // HEADERS without END_HEADERS
    let filler = literal(b"x-flood", &[b'a'; 100]);
    let block: Vec<u8> = filler
        .iter()
        .copied()
        .cycle()
        .take(filler.len() * 100)
        .collect();
    // 20 frames of ~11 KiB: past the 80 KiB header list limit, well within socket buffers.
    for _ in 0..20 {
        if raw.write_all(&frame(0x9, 0x0, 1, &block)).await.is_err() {
            break;
        }
    }
    let _ = raw.flush().await;
    let goaway = tokio::time::timeout(Duration::from_secs(5), async {
        let mut head = [0u8; 9];
        loop {
            raw.read_exact(&mut head).await.ok()?;
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            raw.read_exact(&mut payload).await.ok()?;
            if head[3] == 0x7 {
                return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
        }
    })
    .await
    .expect("the server kept reading an endless header block");
    // ENHANCE_YOUR_CALM (too many CONTINUATION frames) or COMPRESSION_ERROR (block too large).
    assert!(matches!(goaway, Some(0xb) | Some(0x9)), "{goaway:?}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection stayed open after GOAWAY");

    // Others are still served, over both protocols.
    for h2 in [false, true] {
        let r = https(&ca, Some(&gw.pos1), h2)
            .get(format!("{}/raas/v2/accounts/A-STORE-1", gw.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK literal header field without indexing, new name (both under 127 bytes).
fn literal(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00, u8::try_from(name.len()).unwrap()];
    out.extend_from_slice(name);
    out.push(u8::try_from(value.len()).unwrap());
    out.extend_from_slice(value);
    out
}

/// Every `[listen]` TLS mistake and every certificate identity mistake is reported by its key.
#[test]
fn tls_and_certificate_identity_mistakes_are_reported_by_key() {
    let files = TlsFiles::new();
    std::fs::write(files.path("empty.pem"), "").unwrap();
    std::fs::write(
        files.path("garbage.key"),
        "-----BEGIN PRIVATE KEY-----\nnot base64!\n",
    )
    .unwrap();
    let other = Ca::new().server();
    std::fs::write(files.path("other.key"), &other.key_pem).unwrap();
    let cert = files.path("server.pem");
    let key = files.path("server.key");
    let ca = files.path("clients-ca.pem");
    let hash = sha256_hex(b"some caller key");
    let fp = sha256_hex(b"some certificate");
    let base = "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n";
    let profile = "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n";
    let cases: Vec<(String, &str)> = vec![
        (format!("tls_cert_file = \"{cert}\"\n"), "listen.tls_key_file: required with listen.tls_cert_file"),
        (format!("tls_key_file = \"{key}\"\n"), "listen.tls_cert_file: required with listen.tls_key_file"),
        (format!("tls_client_ca_file = \"{ca}\"\n"), "listen.tls_client_ca_file: only used together with listen.tls_cert_file"),
        ("tls_client_auth = \"required\"\n".into(), "listen.tls_client_auth: \"required\" needs listen.tls_client_ca_file"),
        (format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\ntls_client_auth = \"always\"\n"), "listen.tls_client_auth: expected \"optional\" or \"required\", found \"always\""),
        (format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\ntls_client_auth = \"required\"\n"), "listen.tls_client_auth: \"required\" needs listen.tls_client_ca_file"),
        (format!("tls_cert_file = \"/dev/zero\"\ntls_key_file = \"{key}\"\n"), "listen.tls_cert_file: "),
        (format!("tls_cert_file = \"{}\"\ntls_key_file = \"{key}\"\n", files.path("empty.pem")), "listen.tls_cert_file: "),
        (format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{}\"\n", files.path("garbage.key")), "listen.tls_key_file: "),
        (format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{cert}\"\n"), "listen.tls_key_file: "),
        (format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{}\"\n", files.path("other.key")), "listen.tls_key_file: the certificate and key do not make a server identity"),
        (format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\ntls_client_ca_file = \"{}\"\n", files.path("missing.pem")), "listen.tls_client_ca_file: "),
        (format!("[callers.a]\ncert_sha256 = \"{fp}\"\n"), "callers.a.cert_sha256: needs listen.tls_client_ca_file"),
        (format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\ntls_client_ca_file = \"{ca}\"\n[callers.a]\ncert_sha256 = \"12:34\"\n"), "callers.a.cert_sha256: expected the SHA-256 fingerprint"),
        (format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\ntls_client_ca_file = \"{ca}\"\n[callers.a]\ncert_san = \"a b\"\n"), "callers.a.cert_san: expected a DNS name or a URI"),
        (format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\ntls_client_ca_file = \"{ca}\"\n[callers.a]\ncert_san = \"17:till\"\n"), "callers.a.cert_san: expected a DNS name or a URI"),
        (format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\ntls_client_ca_file = \"{ca}\"\n[callers.a]\ncert_sha256 = \"{fp}\"\n[callers.b]\ncert_sha256 = \"{}\"\n", fp.to_ascii_uppercase()), "callers.b.cert_sha256: the same as callers.a.cert_sha256"),
        (format!("tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\ntls_client_ca_file = \"{ca}\"\n[callers.a]\ncert_san = \"Till.Example\"\n[callers.b]\ncert_san = \"till.example\"\n"), "callers.b.cert_san: the same as callers.a.cert_san"),
        ("[callers.a]\nprofile = \"default\"\n".into(), "callers.a.key_sha256: required (unless cert_sha256 or cert_san identifies the caller)"),
    ];
    for (listen, expected) in cases {
        // Caller sections go after the profile; listen keys into [listen].
        let (listen_keys, callers) = match listen.find("[callers") {
            Some(i) => listen.split_at(i),
            None => (listen.as_str(), ""),
        };
        let toml = format!("{base}{listen_keys}{profile}{callers}");
        let err = Config::from_toml(&toml).err().map(|e| e.to_string());
        let err = err.unwrap_or_else(|| panic!("accepted: {toml}"));
        assert!(
            err.contains(expected),
            "{toml}\nexpected {expected:?} in:\n{err}"
        );
        assert!(!err.contains("BEGIN"), "{err}");
    }
    // A complete mutual-TLS gateway config is accepted, and shows its certificate identities.
    let toml = format!(
        "{base}tls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\ntls_client_ca_file = \"{ca}\"\n\
         tls_client_auth = \"required\"\n{profile}[callers.a]\ncert_san = \"till.example\"\n\
         [callers.b]\ncert_sha256 = \"{fp}\"\nkey_sha256 = \"{hash}\"\n"
    );
    let config = Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.listen.tls.is_some());
    assert!(config.callers["a"].key_sha256.is_none());
    let shown = config.to_redacted_toml();
    assert!(
        shown.contains(&fp) && shown.contains("till.example"),
        "{shown}"
    );
}

/// An HTTP/2 answer still streaming is a request in progress: the idle close never cuts it, and
/// a reader that is slow but keeps taking it is not a stalled one (listen.body_idle_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_answer_read_slowly_outlives_the_idle_timeout() {
    let upstream = FakeUpstream::start().await;
    let files = TlsFiles::new();
    let listen = format!(
        "{}header_timeout = \"200ms\"\nbody_idle_timeout = \"300ms\"\n",
        files.listen_keys(false)
    );
    let proxy = TestProxy::start(&config_toml(&upstream.url(), &listen, "")).await;
    // A small window: the proxy can send only as fast as the client reads.
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(16 << 10);
    let (send, conn) = h2_connection_with(
        proxy.addr(),
        tls_client(&files.ca.pem, None, &[b"h2"]),
        builder,
    )
    .await;
    let mut send = send.ready().await.unwrap();
    let request = http::Request::builder()
        .uri("https://localhost/raas/v2/download?bytes=524288")
        .body(())
        .unwrap();
    let (answer, _) = send.send_request(request, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    let started = Instant::now();
    let mut received = 0usize;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        received += chunk.len();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        // A slow reader: the whole answer takes several idle timeouts.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    assert_eq!(received, 524_288);
    assert!(
        started.elapsed() > Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    drop((send, body));
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}

/// An HTTP/2 client that never opens its flow-control window (answering pings all along) cannot
/// hold a connection slot: an answer that makes no progress for `listen.body_idle_timeout` ends
/// the connection, counted as `write_stalled`, whether the proxy still holds part of the body
/// (window 0) or has handed all of it to the connection (window 1). Others are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_never_opens_its_window_loses_the_connection() {
    let upstream = FakeUpstream::start().await;
    let files = TlsFiles::new();
    let listen = format!(
        "{}header_timeout = \"500ms\"\nbody_idle_timeout = \"300ms\"\n",
        files.listen_keys(false)
    );
    let proxy = TestProxy::start(&config_toml(
        &upstream.url(),
        &listen,
        "body_idle_timeout = \"1500ms\"\n",
    ))
    .await;
    for window in [0u32, 1] {
        let mut builder = h2::client::Builder::new();
        builder.initial_window_size(window);
        // The connection task keeps running, so the server's pings are answered.
        let (send, conn) = h2_connection_with(
            proxy.addr(),
            tls_client(&files.ca.pem, None, &[b"h2"]),
            builder,
        )
        .await;
        let mut send = send.ready().await.unwrap();
        let request = http::Request::builder()
            .uri("https://localhost/raas/v2/catalogs")
            .body(())
            .unwrap();
        let started = Instant::now();
        let (answer, _) = send.send_request(request, true).unwrap();
        // The head needs no window; the body is never taken.
        let answer = answer.await.unwrap();
        assert_eq!(answer.status(), 200);
        let body = answer.into_body();
        let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
        assert!(
            ended.is_ok(),
            "a client with window {window} kept its connection"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "window {window}: closed after {:?}",
            started.elapsed()
        );
        drop((send, body));
    }
    let stalled = ended_count(
        &proxy.admin_url,
        "tango_proxy_connections_ended_total{listener=\"proxy\",reason=\"write_stalled\"}",
    )
    .await;
    assert_eq!(stalled, 2.0);
    for h2 in [false, true] {
        let r = https(&files.ca.pem, None, h2)
            .get(format!("https://{}/raas/v2/catalogs", proxy.addr()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // An answer slow because Tango is slow is not the client's stall: it runs until
    // upstream.body_idle_timeout (1.5 s), well past listen.body_idle_timeout (300 ms).
    let client = https(&files.ca.pem, None, true);
    let started = Instant::now();
    let mut r = client
        .get(format!("https://{}/raas/v2/stall?bytes=10", proxy.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut received = 0;
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match r.chunk().await {
                Ok(Some(chunk)) => received += chunk.len(),
                other => return other.map(|_| ()),
            }
        }
    })
    .await
    .expect("a stalled Tango answer was never ended");
    assert!(end.is_err(), "a cut-off answer looked complete");
    assert_eq!(received, 10);
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "a slow Tango answer was cut after {:?}",
        started.elapsed()
    );
    let cut = ended_count(
        &proxy.admin_url,
        "tango_proxy_upstream_errors_total{kind=\"body_stalled\"}",
    )
    .await;
    assert_eq!(cut, 1.0);
    let stalled = metric(
        &proxy.admin_url,
        "tango_proxy_connections_ended_total{listener=\"proxy\",reason=\"write_stalled\"}",
    )
    .await;
    assert_eq!(
        stalled, 2.0,
        "a slow Tango answer was counted as the client's stall"
    );
}

// ---------------------------------------------------------------------------------------------
// Reloading the listener's TLS files

/// Registers every base64 line of a PEM private key with the log scan: no line of a key may
/// appear in a log.
fn watch_key(key_pem: &str) {
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        logs::watch_secret(line.to_string());
    }
}

/// `/status`'s `tls` once `ready` holds for it; fails after 15 s with what it last showed.
async fn tls_status_once(proxy: &TestProxy, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let tls = proxy.status().await["tls"].clone();
        if ready(&tls) {
            return tls;
        }
        assert!(
            Instant::now() < deadline,
            "TLS status never got there: {tls}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The certificate a new handshake with the listener is shown (the client trusts `ca_pem`).
async fn presented_certificate(addr: std::net::SocketAddr, ca_pem: &str) -> Vec<u8> {
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_client(ca_pem, None, &[b"http/1.1"])));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// An HTTP/2 request on an open connection; its status.
async fn h2_status(send: &mut h2::client::SendRequest<Bytes>, path: &str) -> u16 {
    let request = http::Request::builder()
        .uri(format!("https://localhost{path}"))
        .body(())
        .unwrap();
    let ready = send.clone().ready().await.unwrap();
    *send = ready;
    let (answer, _) = send.send_request(request, true).unwrap();
    let answer = answer.await.unwrap();
    let status = answer.status().as_u16();
    let mut body = answer.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    status
}

/// The certificate and key files replaced — by rename, then by a Kubernetes-style swap of the
/// `..data` symlink in the mounted directory — reach new handshakes without a restart, while a
/// connection opened before keeps the session it has and keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_files_reach_new_handshakes_and_spare_open_connections() {
    use std::os::unix::fs::symlink;

    let upstream = FakeUpstream::start().await;
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name);
    // What the kubelet makes of a mounted Secret: tls.crt -> ..data/tls.crt, ..data -> ..v1.
    let write_version = |version: &str, id: &Identity| {
        std::fs::create_dir(at(version)).unwrap();
        std::fs::write(at(version).join("tls.crt"), &id.cert_pem).unwrap();
        std::fs::write(at(version).join("tls.key"), &id.key_pem).unwrap();
    };
    let first = ca.server();
    write_version("..v1", &first);
    symlink("..v1", at("..data")).unwrap();
    symlink("..data/tls.crt", at("tls.crt")).unwrap();
    symlink("..data/tls.key", at("tls.key")).unwrap();
    let (second, third) = (ca.server(), ca.server());
    for id in [&first, &second, &third] {
        watch_key(&id.key_pem);
    }
    let listen = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        at("tls.crt").display(),
        at("tls.key").display()
    );
    let proxy = TestProxy::start(&config_toml(&upstream.url(), &listen, "")).await;
    let tls = proxy.status().await["tls"].clone();
    assert_eq!(tls["generation"], 0, "{tls}");
    assert_eq!(
        tls["certificate"]["sha256"],
        sha256_hex(&first.der),
        "{tls}"
    );
    assert!(tls["certificate"]["not_after"].is_string(), "{tls}");
    assert_eq!(
        presented_certificate(proxy.addr(), &ca.pem).await,
        first.der
    );

    // A connection opened with the first certificate, kept open across both replacements.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_client(&ca.pem, None, &[b"h2"])));
    let tcp = TcpStream::connect(proxy.addr()).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let shown = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(shown, first.der);
    let (mut open, conn) = h2::client::handshake(stream).await.unwrap();
    let conn = tokio::spawn(conn);
    assert_eq!(h2_status(&mut open, "/raas/v2/catalogs").await, 200);

    // By rename, inside the current version's directory.
    replace_by_rename(&at("..v1").join("tls.key"), &second.key_pem);
    replace_by_rename(&at("..v1").join("tls.crt"), &second.cert_pem);
    let tls = tls_status_once(&proxy, |t| t["generation"] == 1).await;
    assert_eq!(
        tls["certificate"]["sha256"],
        sha256_hex(&second.der),
        "{tls}"
    );
    assert!(tls["last_reload"].is_string(), "{tls}");
    assert_eq!(
        presented_certificate(proxy.addr(), &ca.pem).await,
        second.der
    );
    assert_eq!(h2_status(&mut open, "/raas/v2/catalogs").await, 200);

    // By the kubelet's swap: a new version directory, and ..data pointed at it in one rename.
    write_version("..v2", &third);
    symlink("..v2", at("..data_tmp")).unwrap();
    std::fs::rename(at("..data_tmp"), at("..data")).unwrap();
    let tls = tls_status_once(&proxy, |t| t["generation"] == 2).await;
    assert_eq!(
        tls["certificate"]["sha256"],
        sha256_hex(&third.der),
        "{tls}"
    );
    assert_eq!(
        presented_certificate(proxy.addr(), &ca.pem).await,
        third.der
    );
    for h2 in [false, true] {
        let r = https(&ca.pem, None, h2)
            .get(format!("https://{}/raas/v2/catalogs", proxy.addr()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // The connection from before both is still served, on its first session.
    assert_eq!(h2_status(&mut open, "/raas/v2/catalogs").await, 200);
    assert!(!conn.is_finished(), "the open connection was closed");
    let applied = metric(
        &proxy.admin_url,
        "tango_proxy_tls_reloads_total{result=\"applied\"}",
    )
    .await;
    assert_eq!(applied, 2.0);
    assert!(
        logs::captured().contains("TLS files reloaded"),
        "no log line says the certificate was reloaded"
    );
    drop(open);
}

/// A replacement that does not make a server identity — a key file of garbage, or a new
/// certificate beside the old key (a pair replaced one file at a time, caught in between) — is
/// refused: the running certificate keeps serving, `/status` shows the refusal and the metric
/// counts it. Once the pair is whole it is applied. No key text reaches a log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_certificate_files_are_refused_and_the_running_certificate_keeps_serving() {
    let upstream = FakeUpstream::start().await;
    let files = TlsFiles::new();
    let key_path = files.dir.path().join("server.key");
    let cert_path = files.dir.path().join("server.pem");
    let original_key = std::fs::read_to_string(&key_path).unwrap();
    // Valid base64 that is no key: it gets past the PEM reader to the key loader.
    let garbage = "-----BEGIN PRIVATE KEY-----\n\
                   R2FyYmFnZS1rZXktbWF0ZXJpYWwtdGhhdC1tdXN0LW5vdC1sZWFr\n\
                   -----END PRIVATE KEY-----\n";
    let next = files.ca.server();
    for key in [original_key.as_str(), garbage, &next.key_pem] {
        watch_key(key);
    }
    let proxy =
        TestProxy::start(&config_toml(&upstream.url(), &files.listen_keys(false), "")).await;
    let logged_from = logs::captured_len();
    let serving = proxy.status().await["tls"]["certificate"]["sha256"].clone();
    let original = presented_certificate(proxy.addr(), &files.ca.pem).await;
    assert_eq!(serving, sha256_hex(&original));
    let counted = |result: &'static str| {
        let admin = proxy.admin_url.clone();
        async move {
            metric(
                &admin,
                &format!("tango_proxy_tls_reloads_total{{result=\"{result}\"}}"),
            )
            .await
        }
    };

    replace_by_rename(&key_path, garbage);
    let tls = tls_status_once(&proxy, |t| t["last_refusal"].is_object()).await;
    let problems = tls["last_refusal"]["problems"].to_string();
    assert!(problems.contains("listen.tls_key_file"), "{tls}");
    assert!(tls["last_refusal"]["at"].is_string(), "{tls}");
    assert_eq!(tls["generation"], 0, "{tls}");
    assert_eq!(tls["certificate"]["sha256"], serving, "{tls}");
    assert_eq!(
        presented_certificate(proxy.addr(), &files.ca.pem).await,
        original
    );
    assert_eq!(counted("refused").await, 1.0);
    assert_eq!(counted("applied").await, 0.0);
    let r = https(&files.ca.pem, None, true)
        .get(format!("https://{}/raas/v2/catalogs", proxy.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The serving key back: nothing to apply, and no refusal left standing.
    replace_by_rename(&key_path, &original_key);
    let tls = tls_status_once(&proxy, |t| t["last_refusal"].is_null()).await;
    assert_eq!(tls["generation"], 0, "{tls}");

    // Half a pair: the new certificate beside the old key.
    replace_by_rename(&cert_path, &next.cert_pem);
    let tls = tls_status_once(&proxy, |t| t["last_refusal"].is_object()).await;
    assert!(
        tls["last_refusal"]["problems"]
            .to_string()
            .contains("do not make a server identity"),
        "{tls}"
    );
    assert_eq!(
        presented_certificate(proxy.addr(), &files.ca.pem).await,
        original
    );
    assert_eq!(counted("refused").await, 2.0);

    // The other half arrives: the pair is applied whole.
    replace_by_rename(&key_path, &next.key_pem);
    let tls = tls_status_once(&proxy, |t| t["generation"] == 1).await;
    assert!(tls["last_refusal"].is_null(), "{tls}");
    assert_eq!(tls["certificate"]["sha256"], sha256_hex(&next.der), "{tls}");
    assert_eq!(
        presented_certificate(proxy.addr(), &files.ca.pem).await,
        next.der
    );
    assert_eq!(counted("applied").await, 1.0);

    let logged = logs::captured_since(logged_from);
    assert!(
        logged.contains("changed TLS files refused"),
        "the refusal was not logged"
    );
    assert!(
        !logged.contains("PRIVATE KEY"),
        "a key file was quoted in the logs"
    );
}

/// A new client CA file takes effect without a restart: a store certificate from the new CA is
/// accepted (and still names its caller), one from the old CA is refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_ca_file_admits_its_certificates_and_refuses_the_old_ones() {
    let gw = start_gateway("").await;
    let server_ca = gw.files.ca.pem.clone();
    let new_ca = Ca::new();
    let moved = new_ca.client(&["spiffe://franchise/pos-1"], false);
    watch_key(&moved.key_pem);
    watch_key(&gw.pos1.key_pem);
    let url = format!("{}/raas/v2/accounts/A-STORE-1", gw.base);
    let serving = gw.proxy.status().await["tls"]["certificate"]["sha256"].clone();
    let r = https(&server_ca, Some(&moved), false)
        .get(&url)
        .send()
        .await;
    assert!(
        r.is_err(),
        "a certificate of a CA not yet trusted was accepted: {r:?}"
    );

    replace_by_rename(&gw.files.dir.path().join("clients-ca.pem"), &new_ca.pem);
    let tls = tls_status_once(&gw.proxy, |t| t["generation"] == 1).await;
    // The listener's own certificate did not change.
    assert_eq!(tls["certificate"]["sha256"], serving, "{tls}");
    for h2 in [false, true] {
        let r = https(&server_ca, Some(&moved), h2)
            .get(&url)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "h2: {h2}");
        assert_eq!(
            principal_of(&gw.mock, "/raas/v2/accounts/A-STORE-1").as_deref(),
            Some("store-1")
        );
        let r = https(&server_ca, Some(&gw.pos1), h2).get(&url).send().await;
        assert!(
            r.is_err(),
            "h2: {h2}: the old CA's certificate was accepted: {r:?}"
        );
    }
    // A store known by its key is not affected.
    let r = https(&server_ca, None, true)
        .get(format!("{}/raas/v2/accounts/A-STORE-3", gw.base))
        .header("authorization", basic("pos-3", POS3_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
