//! A hostile token endpoint: odd `expires_in` values, control characters meant to forge log
//! lines, a 50 MB answer, the wrong `token_type`, a token that could split a header, and an
//! endpoint that echoes the posted form (client secret and password) back in its error.
//!
//! Each case is one proxy whose `token_url` names the case on one scripted endpoint; API
//! requests go to a recording upstream, which must see the minted token or nothing at all.

use super::*;
use crate::support::raw::{RawRequest, RawServer, Reply};

/// The size of the oversized answer.
const HUGE: usize = 50 * 1000 * 1000;

/// Text meant to start a log line of its own if a CR or LF got through.
const FORGED: &str = "FORGED-LINE level=ERROR msg=operator-password-changed";

fn json(status: &str, body: &str) -> Reply {
    Reply::Close(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn token(case: &str, token_type: &str, expires_in: &str) -> Reply {
    json(
        "200 OK",
        &format!(
            r#"{{"access_token":"tok-{case}","token_type":"{token_type}","expires_in":{expires_in}}}"#
        ),
    )
}

/// The endpoint: `/CASE/oauth/token` answers as CASE says.
fn token_endpoint(r: &RawRequest) -> Reply {
    let case = r
        .path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    let form = String::from_utf8_lossy(&r.body).into_owned();
    let quoted = |s: &str| serde_json::to_string(s).unwrap();
    match case {
        "huge-float" => token(case, "Bearer", "1e300"),
        "huge-integer" => token(case, "Bearer", "99999999999"),
        "beyond-u64" => token(case, "Bearer", "18446744073709551616"),
        "negative" => token(case, "Bearer", "-3600"),
        "word" => token(case, "Bearer", r#""soon""#),
        "null" => token(case, "Bearer", "null"),
        "fraction" => token(case, "Bearer", "3600.9"),
        "numeric-string" => token(case, "Bearer", r#""7200""#),
        "wrong-type" => token(case, "mac", "3600"),
        "bearer-for-dpop" => token(case, "Bearer", "3600"),
        "token-with-crlf" => json(
            "200 OK",
            r#"{"access_token":"tok\r\nX-Injected: 1","token_type":"Bearer","expires_in":3600}"#,
        ),
        "forged-log-json" => json(
            "400 Bad Request",
            &format!(
                r#"{{"error":"invalid_grant","error_description":{}}}"#,
                quoted(&format!("bad grant\r\n{FORGED}\n{FORGED}\u{1b}[2J\u{0}\u{85}"))
            ),
        ),
        "forged-log-text" => Reply::Close(
            format!("HTTP/1.1 500 Oops\r\nContent-Type: text/plain\r\n\r\nbroken\r\n{FORGED}\n{FORGED}")
                .into_bytes(),
        ),
        "huge" => Reply::Stream {
            head: format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {HUGE}\r\n\r\n"
            )
            .into_bytes(),
            len: HUGE,
        },
        "huge-chunked" => Reply::Stream {
            // No length up front, and a chunk header claiming the whole filler.
            head: format!(
                "HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n{HUGE:x}\r\n"
            )
            .into_bytes(),
            len: HUGE,
        },
        "echo-json" => json(
            "401 Unauthorized",
            &format!(r#"{{"error":"invalid_client","error_description":{}}}"#, quoted(&form)),
        ),
        "echo-text" => Reply::Close(
            format!("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n\r\nrejected: {form}")
                .into_bytes(),
        ),
        // Padding that puts the 300th byte of the error text ten bytes into a secret, where an
        // error excerpt would be cut.
        "echo-cut-client_secret" | "echo-cut-password" => {
            let field = format!("&{}=", case.trim_start_matches("echo-cut-"));
            let secret_at = form.find(&field).unwrap() + field.len();
            let prefix = "invalid_request: ".len();
            let pad = "x".repeat(300 - prefix - secret_at - 10);
            json(
                "400 Bad Request",
                &format!(
                    r#"{{"error":"invalid_request","error_description":{}}}"#,
                    quoted(&format!("{pad}{form}"))
                ),
            )
        }
        _ => json("404 Not Found", r#"{"error":"no such case"}"#),
    }
}

/// One proxy per case: tokens from `endpoint`/CASE, API requests to `upstream`.
async fn proxy_for(
    endpoint: &RawServer,
    case: &str,
    upstream: &FakeUpstream,
    extra: &str,
) -> TestProxy {
    let toml = oauth_toml_via(
        &format!("{}/{case}", endpoint.url()),
        &upstream.url(),
        "service_account",
        extra,
    );
    TestProxy::start(&toml).await
}

fn token_status(status: &serde_json::Value) -> &serde_json::Value {
    &status["profiles"]["default"]["token"]
}

#[tokio::test]
async fn odd_expires_in_values_still_give_a_usable_token_with_a_sane_lifetime() {
    let endpoint = RawServer::start(token_endpoint).await;
    const DAY: u64 = 86_400;
    // case, the lifetime the proxy must settle on, and whether it says it ignored a hint.
    let cases = [
        ("huge-float", DAY, true),
        ("huge-integer", DAY, true),
        ("beyond-u64", DAY, true),
        ("negative", DAY, false),
        ("word", DAY, false),
        ("null", DAY, false),
        ("fraction", 3600, false),
        ("numeric-string", 7200, false),
    ];
    let runs = cases.iter().map(|&(case, lifetime, ignored)| {
        let endpoint = &endpoint;
        async move {
            let upstream = FakeUpstream::start().await;
            let proxy = proxy_for(endpoint, case, &upstream, "").await;
            assert_still_serves(&proxy.url, "/raas/v2/catalogs", 200).await;
            assert_eq!(
                upstream.last().headers["authorization"],
                format!("Bearer tok-{case}").as_str()
            );
            let status = proxy.status().await;
            let left = token_status(&status)["seconds_left"].as_u64().unwrap();
            assert!(
                (lifetime - 60..=lifetime).contains(&left),
                "{case}: {left} s left, expected about {lifetime}: {status}"
            );
            let counted = metric(
                &proxy.admin_url,
                r#"tango_proxy_token_lifetime_ignored_total{profile="default",hint="expires_in"}"#,
            )
            .await;
            assert_eq!(counted, if ignored { 1.0 } else { 0.0 }, "{case}");
        }
    });
    futures_util::future::join_all(runs).await;
}

/// The answer to an app while the endpoint misbehaves: 503 `token_unavailable`, nothing sent
/// to Tango; returns the 503's message and the profile's `/status` `last_error`.
async fn refused(proxy: &TestProxy, upstream: &FakeUpstream) -> (String, String) {
    let resp = proxy.get("/raas/v2/catalogs").await;
    let body = assert_proxy_error(resp, 503, "token_unavailable").await;
    assert!(
        upstream.requests().is_empty(),
        "Tango got {:?}",
        upstream.requests()
    );
    let status = proxy.status().await;
    let last_error = token_status(&status)["last_error"]
        .as_str()
        .unwrap_or_else(|| panic!("no last_error: {status}"))
        .to_string();
    (body["message"].as_str().unwrap().to_string(), last_error)
}

#[tokio::test]
async fn unusable_token_answers_are_refused_without_forwarding_anything() {
    let endpoint = RawServer::start(token_endpoint).await;
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = crate::dpop::keygen(dir.path(), "ES256");
    let dpop = format!("dpop_key_file = \"{}\"", key.display());
    let cases = [
        ("wrong-type", "", "token_type"),
        ("bearer-for-dpop", dpop.as_str(), "token_type"),
        ("token-with-crlf", "", "header-safe"),
    ];
    let runs = cases.iter().map(|&(case, extra, why)| {
        let endpoint = &endpoint;
        async move {
            let upstream = FakeUpstream::start().await;
            let proxy = proxy_for(endpoint, case, &upstream, extra).await;
            let (message, last_error) = refused(&proxy, &upstream).await;
            assert!(message.contains(why), "{case}: {message}");
            assert!(last_error.contains(why), "{case}: {last_error}");
            assert!(!message.contains("X-Injected"), "{case}: {message}");
        }
    });
    futures_util::future::join_all(runs).await;
}

#[tokio::test]
async fn control_characters_in_token_errors_cannot_forge_a_log_line() {
    let endpoint = RawServer::start(token_endpoint).await;
    for case in ["forged-log-json", "forged-log-text"] {
        let upstream = FakeUpstream::start().await;
        let proxy = proxy_for(&endpoint, case, &upstream, "").await;
        let (message, last_error) = refused(&proxy, &upstream).await;
        for text in [&message, &last_error] {
            assert!(
                text.contains(FORGED),
                "{case}: the error text was not shown: {text:?}"
            );
            assert!(!text.chars().any(char::is_control), "{case}: {text:?}");
        }
    }
    let logs = logs::captured();
    assert!(
        logs.contains(FORGED),
        "the token endpoint's error was never logged"
    );
    assert!(
        !logs
            .lines()
            .any(|l| l.trim_start().starts_with("FORGED-LINE")),
        "a token endpoint forged a log line"
    );
}

#[tokio::test]
async fn a_50_mb_token_answer_is_refused_without_being_read() {
    for case in ["huge", "huge-chunked"] {
        // An endpoint per case: the retries of one case's proxy must not count for the next.
        let endpoint = RawServer::start(token_endpoint).await;
        let upstream = FakeUpstream::start().await;
        let proxy = proxy_for(&endpoint, case, &upstream, "").await;
        let (_, last_error) = refused(&proxy, &upstream).await;
        // Socket buffers take a few MB; reading the answer would take all 50.
        let taken = endpoint.streamed().await;
        assert!(
            taken < HUGE / 2,
            "{case}: the proxy read {taken} of {HUGE} bytes of a token answer"
        );
        assert!(last_error.contains("KiB"), "{case}: {last_error}");
        // It keeps answering (503 again, at once: the endpoint is still broken).
        refused(&proxy, &upstream).await;
    }
}

#[tokio::test]
async fn a_token_endpoint_echoing_the_form_leaks_no_part_of_a_secret() {
    let endpoint = RawServer::start(token_endpoint).await;
    for case in [
        "echo-json",
        "echo-text",
        "echo-cut-client_secret",
        "echo-cut-password",
    ] {
        let upstream = FakeUpstream::start().await;
        let proxy = proxy_for(&endpoint, case, &upstream, "").await;
        let (message, last_error) = refused(&proxy, &upstream).await;
        let status = proxy.status().await.to_string();
        let metrics = get_text(&format!("{}/metrics", proxy.admin_url)).await;
        assert!(
            last_error.contains("client_id=test-client"),
            "{case}: the echo was not shown: {last_error}"
        );
        for (place, text) in [
            ("503 body", &message),
            ("/status", &status),
            ("/metrics", &metrics),
        ] {
            assert_no_piece_of_a_secret(text, &format!("{case}: the {place}"));
        }
    }
    assert_no_piece_of_a_secret(&logs::captured(), "the logs");
}

/// Half a secret is a leak too: no 8-character piece of the client secret or the password may
/// show in `text`.
fn assert_no_piece_of_a_secret(text: &str, place: &str) {
    for secret in [CLIENT_SECRET, PASSWORD] {
        for piece in secret.as_bytes().windows(8) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(
                !text.contains(piece),
                "{piece:?} of a secret in {place}: {text}"
            );
        }
    }
}
