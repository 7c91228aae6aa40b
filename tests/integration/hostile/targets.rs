//! Absolute-form, method and Host tricks: whatever the app names, requests go to the configured
//! upstream or nowhere. A decoy server stands in for "another host" and must never be reached.

use super::*;
use crate::support::raw::exchange;

#[tokio::test]
async fn requests_reach_the_configured_upstream_or_nothing() {
    use Expect::*;
    let upstream = FakeUpstream::start().await;
    let decoy = FakeUpstream::start().await;
    let proxy = TestProxy::basic(&upstream).await;
    let me = proxy.addr();
    let port = me.port();
    let (up, other) = (upstream.addr, decoy.addr);
    let bad = Some("bad_request");
    let not_allowed = Some("method_not_allowed");
    // Every request asks for the connection to close, so the exchange ends with the answer.
    let req = |line: &str, headers: &str| {
        format!("{line}\r\n{headers}Authorization: {CALLER_AUTH}\r\nConnection: close\r\n\r\n")
    };
    let host = format!("Host: {me}\r\n");
    let get = |target: &str| req(&format!("GET {target} HTTP/1.1"), &host);
    let mut cases = Vec::new();
    // Absolute-form naming anything but the proxy itself or the upstream, or another scheme.
    for target in [
        format!("http://{other}/raas/v2/x"),
        format!("http://user:pw@{other}/raas/v2/x"),
        format!("http://user:pw@{me}/raas/v2/x"),
        format!("http://user:pw@{up}/raas/v2/x"),
        format!("http://127.0.0.1:{}/raas/v2/x", other.port()),
        format!("http://[::1]:{port}/raas/v2/x"),
        format!("http://localhost.:{port}/raas/v2/x"),
        format!("https://{me}/raas/v2/x"),
        "OPTIONS *".into(),
    ] {
        let request = match target.strip_prefix("OPTIONS ") {
            Some(star) => req(&format!("OPTIONS {star} HTTP/1.1"), &host),
            None => get(&target),
        };
        cases.push((target, request, Refused(400, bad)));
    }
    // Targets the listener itself cannot parse.
    for target in ["file:///etc/passwd", "@evil.example/raas/v2/x"] {
        cases.push((target.into(), get(target), Refused(400, None)));
    }
    // Methods that would tunnel past the proxy, or reflect the credential it adds.
    for (line, host) in [
        (
            format!("CONNECT {other} HTTP/1.1"),
            format!("Host: {other}\r\n"),
        ),
        (format!("CONNECT {up} HTTP/1.1"), format!("Host: {up}\r\n")),
        ("TRACE /raas/v2/x HTTP/1.1".into(), host.clone()),
        (
            format!("TRACE http://{me}/raas/v2/x HTTP/1.1"),
            host.clone(),
        ),
    ] {
        cases.push((line.clone(), req(&line, &host), Refused(405, not_allowed)));
    }
    // Host: exactly one on HTTP/1.1, none needed on HTTP/1.0.
    let two_hosts = format!("{host}Host: {other}\r\n");
    for (name, line, hosts, expect) in [
        (
            "HTTP/1.1 without Host",
            "GET /raas/v2/x HTTP/1.1",
            "",
            Refused(400, bad),
        ),
        (
            "HTTP/1.1 with two Hosts",
            "GET /raas/v2/x HTTP/1.1",
            &two_hosts,
            Refused(400, bad),
        ),
        (
            "HTTP/1.0 without Host",
            "GET /raas/v2/ten HTTP/1.0",
            "",
            Forwarded("/raas/v2/ten", b""),
        ),
    ] {
        cases.push((name.into(), req(line, hosts), expect));
    }
    // What may be forwarded goes to the configured upstream, whatever the app names.
    for (target, path) in [
        (format!("http://{me}/raas/v2/a"), "/raas/v2/a"),
        (format!("http://{up}/raas/v2/b"), "/raas/v2/b"),
        (format!("http://LOCALHOST:{port}/raas/v2/c"), "/raas/v2/c"),
        (
            "//evil.example/raas/v2/d".into(),
            "//evil.example/raas/v2/d",
        ),
    ] {
        cases.push((target.clone(), get(&target), Forwarded(path, b"")));
    }
    let elsewhere = req("GET /raas/v2/e HTTP/1.1", &format!("Host: {other}\r\n"));
    cases.push((
        "Host naming another host".into(),
        elsewhere,
        Forwarded("/raas/v2/e", b""),
    ));

    for (name, request, expect) in &cases {
        let before = upstream.requests().len();
        let ex = exchange(me, request.as_bytes()).await;
        check(name, expect, &ex, &upstream, before);
    }
    assert_eq!(decoy.connections(), 0, "a request reached another host");
    assert_still_serves(&proxy.url, "/raas/v2/catalogs", 200).await;
}
