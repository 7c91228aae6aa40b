//! Hostile input at the proxy's edges, over raw TCP: request smuggling and broken framing from
//! apps, absolute-form and method tricks, bodies that stall, and upstreams or token endpoints
//! that answer with garbage. Each case asserts what the app sees, what Tango saw (nothing, or
//! exactly the sanitised request, never a smuggled second one nor the app's credential) and that
//! the proxy keeps serving.

mod framing;
mod slow_body;
mod targets;
mod token_endpoint;
mod upstream_answers;

use crate::support::raw::Exchange;
use crate::support::*;

/// A credential an app sends; the proxy must replace it, never forward it.
const CALLER_AUTH: &str = "Basic Y2FsbGVyOmNhbGxlci1zZWNyZXQ=";

/// An ordinary GET of `path` through the proxy at `url` still gets `status`.
async fn assert_still_serves(url: &str, path: &str, status: u16) {
    let resp = client().get(format!("{url}{path}")).send().await.unwrap();
    assert_eq!(resp.status(), status, "the proxy stopped serving");
}

/// Waits (at most 10 s, polling) until `done` says so; `what` names it in the failure.
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "waited in vain for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// What Tango got for one forwarded request: the profile's credential, once, never the app's.
fn assert_sanitised(seen: &upstream::Seen, authorization: &str) {
    let all: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(all.len(), 1, "{seen:?}");
    assert!(
        all[0].to_str().unwrap().starts_with(authorization),
        "Tango got {:?}, not the profile's {authorization} credential",
        all[0]
    );
    assert_ne!(all[0], CALLER_AUTH, "the app's credential reached Tango");
}

/// What one hostile request must come to.
enum Expect {
    /// Refused before anything reached Tango: this status, with the proxy's JSON error of this
    /// cause, or without one the listener's bare answer.
    Refused(u16, Option<&'static str>),
    /// Cut off after forwarding began (a broken body): the proxy's error with this status and
    /// cause; Tango saw no complete request.
    Cut(u16, &'static str),
    /// Forwarded once to the configured upstream: Tango saw exactly this path and body, with
    /// the profile's Basic credential.
    Forwarded(&'static str, &'static [u8]),
}

/// Checks one case: the app's one answer, what Tango saw, and that the connection was closed
/// (no case may leave the app hanging, or let the proxy read on past the broken request).
fn check(name: &str, expect: &Expect, ex: &Exchange, upstream: &FakeUpstream, before: usize) {
    assert!(ex.closed, "{name}: the connection was left open: {ex:?}");
    let response = ex.only();
    let new = &upstream.requests()[before..];
    assert!(
        new.iter().all(|s| !s.uri.contains("smuggled")),
        "{name}: a smuggled request reached Tango: {new:?}"
    );
    match *expect {
        Expect::Refused(status, cause) => {
            match cause {
                Some(cause) => {
                    assert_raw_proxy_error(&response.text(), status, cause);
                }
                None => assert_eq!(response.status, status, "{name}: {response:?}"),
            }
            assert!(new.is_empty(), "{name}: Tango saw {new:?}");
        }
        Expect::Cut(status, cause) => {
            assert_raw_proxy_error(&response.text(), status, cause);
            assert!(
                new.iter().all(|s| !s.complete),
                "{name}: Tango got a complete request: {new:?}"
            );
            assert!(
                new.iter().all(|s| s
                    .headers
                    .get("authorization")
                    .is_none_or(|a| a != CALLER_AUTH)),
                "{name}: the app's credential reached Tango"
            );
        }
        Expect::Forwarded(path, body) => {
            assert_eq!(response.status, 200, "{name}: {response:?}");
            assert_eq!(new.len(), 1, "{name}: Tango saw {new:?}");
            let seen = &new[0];
            assert_eq!(seen.uri, path, "{name}");
            assert!(seen.complete, "{name}: {seen:?}");
            assert_eq!(seen.body_len, body.len() as u64, "{name}");
            assert_eq!(seen.body_sha256, sha256_hex(body), "{name}");
            assert_eq!(seen.headers["host"], upstream.addr.to_string().as_str());
            assert_sanitised(seen, "Basic ");
            assert_eq!(seen.headers["authorization"], expected_basic().as_str());
        }
    }
}
