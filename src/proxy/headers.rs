//! Inbound and outbound header hygiene.
//!
//! Requests lose every credential the app sent (`Authorization`, `Proxy-Authorization`, `DPoP`,
//! `Cookie`), hop-by-hop headers and every header named in `Connection`, plus `Host` and `Expect`
//! (the proxy answers `100-continue` itself and the client sets `Host` from the upstream URL).
//! Responses lose hop-by-hop headers the same way, and a `Content-Length` that their
//! `Transfer-Encoding` overrides.

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The request id header, kept when the app sent a sane one, echoed on every response.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Where Tango's own request id goes when it differs from the proxy's.
pub const X_TANGO_REQUEST_ID: HeaderName = HeaderName::from_static("x-tango-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const DPOP: HeaderName = HeaderName::from_static("dpop");
const DPOP_NONCE: HeaderName = HeaderName::from_static("dpop-nonce");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy `Proxy-Connection` and `Keep-Alive`:
/// dropped from requests and responses alike. `Connection` comes first (see [`Seen`]).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Where `Transfer-Encoding` is in [`HOP_BY_HOP`].
const TRANSFER_ENCODING_AT: usize = 6;

/// What a request loses beyond the hop-by-hop set: credentials an app may send that must never
/// reach Tango, `Expect` (the proxy answers `100-continue` itself) and `Host` (the upstream's
/// is set by the pool; the app's goes on as `X-Forwarded-Host`).
const APP_ONLY: [HeaderName; 6] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    DPOP,
    header::COOKIE,
    header::EXPECT,
    header::HOST,
];

/// Request headers looked at but kept (or replaced): their presence spares a hashed look-up
/// when they are absent, as they mostly are.
const REQUEST_NOTED: [HeaderName; 2] = [X_FORWARDED_FOR, X_FORWARDED_HOST];

/// Response headers looked at: `Content-Length` (dropped when `Transfer-Encoding` came too),
/// Tango's `DPoP-Nonce` (dropped) and `X-Request-Id` (replaced by the proxy's).
const RESPONSE_NOTED: [HeaderName; 3] = [header::CONTENT_LENGTH, DPOP_NONCE, X_REQUEST_ID];

/// Which names of a few static lists a message has, found in one pass over its own names: a
/// bit per list entry, no hashing and no allocation.
#[derive(Debug, Clone, Copy, Default)]
struct Seen(u32);

impl Seen {
    /// Looks for `lists` (at most 32 names in all) among the names of `headers`.
    fn scan(headers: &HeaderMap, lists: &[&[HeaderName]]) -> Seen {
        let mut seen = 0u32;
        for name in headers.keys() {
            let mut bit = 0;
            for list in lists {
                if let Some(k) = list.iter().position(|n| n == name) {
                    seen |= 1 << (bit + k);
                    break;
                }
                bit += list.len();
            }
        }
        Seen(seen)
    }

    /// Whether entry `k` of the `lists` scanned is present (`k` counts across the lists).
    fn has(self, k: usize) -> bool {
        self.0 & (1 << k) != 0
    }

    /// Removes the present entries of `list`, which starts at bit `first`.
    fn remove(self, headers: &mut HeaderMap, list: &[HeaderName], first: usize) {
        for (k, name) in list.iter().enumerate() {
            if self.has(first + k) {
                headers.remove(name);
            }
        }
    }
}

/// Removes the headers named in `Connection` (when `seen` says it is there).
fn strip_connection_named(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// What [`sanitize_request`] learned from the headers it removed.
#[derive(Debug)]
pub struct Inbound {
    /// The app's `Host`, for `X-Forwarded-Host`.
    pub host: Option<HeaderValue>,
}

/// Cleans an inbound request's headers and adds the forwarding headers.
pub fn sanitize_request(
    headers: &mut HeaderMap,
    remote_ip: std::net::IpAddr,
    request_id: &HeaderValue,
) -> Inbound {
    let lists: [&[HeaderName]; 3] = [&HOP_BY_HOP, &APP_ONLY, &REQUEST_NOTED];
    let (app_only, noted) = (HOP_BY_HOP.len(), HOP_BY_HOP.len() + APP_ONLY.len());
    let seen = Seen::scan(headers, &lists);
    if seen.has(0) {
        strip_connection_named(headers);
    }
    seen.remove(headers, &HOP_BY_HOP, 0);
    let host_bit = app_only + APP_ONLY.len() - 1;
    let host = if seen.has(host_bit) {
        headers.remove(header::HOST)
    } else {
        None
    };
    seen.remove(headers, &APP_ONLY[..APP_ONLY.len() - 1], app_only);

    let ip = ip_text(remote_ip);
    let prior = if seen.has(noted) {
        headers
            .get(&X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|p| !p.is_empty())
    } else {
        None
    };
    let xff = match prior {
        Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", ip.as_str())),
        None => HeaderValue::from_str(ip.as_str()),
    };
    if let Ok(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match &host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST, h.clone());
        }
        None if seen.has(noted + 1) => {
            headers.remove(X_FORWARDED_HOST);
        }
        None => {}
    }
    headers.insert(X_REQUEST_ID, request_id.clone());
    Inbound { host }
}

/// An address as text without the formatting machinery (IPv4, once per request); IPv6 the
/// usual way.
struct IpText {
    buf: [u8; 39],
    len: usize,
}

impl IpText {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

fn ip_text(ip: std::net::IpAddr) -> IpText {
    let mut text = IpText {
        buf: [0; 39],
        len: 0,
    };
    let mut push = |b: u8| {
        if let Some(slot) = text.buf.get_mut(text.len) {
            *slot = b;
            text.len += 1;
        }
    };
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    push(b'.');
                }
                if octet >= 100 {
                    push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    push(b'0' + octet / 10 % 10);
                }
                push(b'0' + octet % 10);
            }
        }
        std::net::IpAddr::V6(v6) => v6.to_string().bytes().for_each(push),
    }
    text
}

/// Cleans an upstream response's headers and stamps the request id.
///
/// Returns Tango's own request id when it sent one, for the access log.
pub fn sanitize_response(
    headers: &mut HeaderMap,
    request_id: &HeaderValue,
    status: http::StatusCode,
    challenge: &HeaderValue,
) -> Option<HeaderValue> {
    let lists: [&[HeaderName]; 2] = [&HOP_BY_HOP, &RESPONSE_NOTED];
    let noted = HOP_BY_HOP.len();
    let seen = Seen::scan(headers, &lists);
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and an intermediary removes the
    // Content-Length before forwarding. The body arrives de-chunked; a stale length passed on
    // would make the app read a cut body as complete (or wait for bytes that never come).
    if seen.has(TRANSFER_ENCODING_AT) && seen.has(noted) {
        headers.remove(header::CONTENT_LENGTH);
    }
    if seen.has(0) {
        strip_connection_named(headers);
    }
    seen.remove(headers, &HOP_BY_HOP, 0);
    // DPoP is between the proxy and Tango; the app never sends a proof.
    if seen.has(noted + 1) {
        headers.remove(DPOP_NONCE);
    }
    if status == http::StatusCode::UNAUTHORIZED {
        app_facing_challenges(headers, challenge);
    }
    let upstream_id = if seen.has(noted + 2) {
        headers.remove(X_REQUEST_ID)
    } else {
        None
    };
    if let Some(id) = &upstream_id {
        if id != request_id {
            headers.insert(X_TANGO_REQUEST_ID, id.clone());
        }
    }
    headers.insert(X_REQUEST_ID, request_id.clone());
    upstream_id
}

/// The challenge a 401 carries to the app when Tango's own are all DPoP ones, or Tango sent
/// none: the scheme of the profile's credential, `Basic realm="Tango RaaS"` or
/// `Bearer error="invalid_token"`.
pub fn app_challenge(basic: bool) -> HeaderValue {
    HeaderValue::from_static(if basic {
        r#"Basic realm="Tango RaaS""#
    } else {
        r#"Bearer error="invalid_token""#
    })
}

/// A 401 the app receives: DPoP challenges (the proxy's business) are dropped, and when that
/// leaves none — or Tango sent none — `challenge` says what happened (RFC 9110: a 401 carries a
/// challenge).
fn app_facing_challenges(headers: &mut HeaderMap, challenge: &HeaderValue) {
    let is_dpop = |v: &HeaderValue| {
        v.as_bytes()
            .get(..4)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"dpop"))
    };
    let challenges: Vec<HeaderValue> = headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .cloned()
        .collect();
    if !challenges.is_empty() && !challenges.iter().any(is_dpop) {
        return;
    }
    headers.remove(header::WWW_AUTHENTICATE);
    let kept: Vec<HeaderValue> = challenges.into_iter().filter(|v| !is_dpop(v)).collect();
    if kept.is_empty() {
        headers.insert(header::WWW_AUTHENTICATE, challenge.clone());
    }
    for v in kept {
        headers.append(header::WWW_AUTHENTICATE, v);
    }
}

/// Size of the header section as it came over the wire, approximately (`name: value\r\n`).
pub fn header_section_size(headers: &HeaderMap, uri: &http::Uri, method: &http::Method) -> u64 {
    let target = uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len() + 8);
    let line = method.as_str().len() + target + 12;
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    (line + fields) as u64
}

/// Request ids: the app's when it is sane, else a new one.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    /// Seeds the generator with 64 random bits so ids differ across processes.
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        // Falls back to the clock when the system RNG is unavailable; ids need only be unique.
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed).is_err() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or_default();
            seed = now.to_le_bytes();
        }
        Self {
            prefix: u64::from_le_bytes(seed),
            counter: AtomicU64::new(0),
        }
    }

    /// The id to use for a request: the inbound one if acceptable, else a fresh one.
    pub fn for_request(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(v) = headers.get(&X_REQUEST_ID) {
            if is_acceptable_id(v.as_bytes()) {
                return v.clone();
            }
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // `{prefix:016x}{n:016x}`, without the formatting machinery (once per request).
        let mut id = [0u8; 32];
        hex16(&mut id[..16], self.prefix);
        hex16(&mut id[16..], n);
        HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    }
}

/// `v` as 16 lower-case hex digits into `out` (16 bytes).
fn hex16(out: &mut [u8], v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, o) in out.iter_mut().enumerate().take(16) {
        let shift = 60 - 4 * i;
        *o = HEX[((v >> shift) & 0xf) as usize];
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// 1 to 128 characters of `[A-Za-z0-9._:-]`: anything else could garble logs, so it is replaced.
fn is_acceptable_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_credentials_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Basic x"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic y"));
        h.insert("dpop", HeaderValue::from_static("ey"));
        h.insert("cookie", HeaderValue::from_static("a=b"));
        h.insert(
            "connection",
            HeaderValue::from_static("close, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("host", HeaderValue::from_static("127.0.0.1:8080"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        let id = HeaderValue::from_static("abc");
        let inbound = sanitize_request(&mut h, [10, 0, 0, 1].into(), &id);
        for gone in [
            "authorization",
            "proxy-authorization",
            "dpop",
            "cookie",
            "connection",
            "x-secret-hop",
            "keep-alive",
            "te",
            "host",
        ] {
            assert!(!h.contains_key(gone), "{gone} survived");
        }
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-host"], "127.0.0.1:8080");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-request-id"], "abc");
        assert_eq!(
            inbound.host.as_ref().map(|h| h.as_bytes()),
            Some(&b"127.0.0.1:8080"[..])
        );
    }

    #[test]
    fn the_bit_positions_name_the_headers_they_stand_for() {
        assert_eq!(HOP_BY_HOP[0], header::CONNECTION);
        assert_eq!(HOP_BY_HOP[TRANSFER_ENCODING_AT], header::TRANSFER_ENCODING);
        assert_eq!(APP_ONLY[APP_ONLY.len() - 1], header::HOST);
        assert!(HOP_BY_HOP.len() + APP_ONLY.len() + REQUEST_NOTED.len() <= 32);
    }

    #[test]
    fn addresses_are_written_as_the_standard_library_writes_them() {
        let ips: [std::net::IpAddr; 6] = [
            [0, 0, 0, 0].into(),
            [127, 0, 0, 1].into(),
            [10, 99, 100, 255].into(),
            [192, 168, 9, 10].into(),
            "::1".parse().unwrap(),
            "2001:db8::ffff:1:2:3".parse().unwrap(),
        ];
        for ip in ips {
            assert_eq!(ip_text(ip).as_str(), ip.to_string());
        }
        let longest: std::net::IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
        assert_eq!(ip_text(longest).as_str(), longest.to_string());
    }

    #[test]
    fn a_header_named_in_connection_is_gone_even_when_it_is_one_the_proxy_reads() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("x-forwarded-for, host"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        h.insert("host", HeaderValue::from_static("app.local"));
        let inbound =
            sanitize_request(&mut h, [10, 0, 0, 1].into(), &HeaderValue::from_static("a"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert!(inbound.host.is_none() && !h.contains_key("x-forwarded-host"));
        assert!(!h.contains_key("connection") && !h.contains_key("host"));
    }

    #[test]
    fn a_response_loses_hop_by_hop_headers_and_tangos_nonce_and_keeps_tangos_id() {
        let id = HeaderValue::from_static("proxy-id");
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("dpop-nonce", HeaderValue::from_static("n"));
        h.insert("x-request-id", HeaderValue::from_static("tango-id"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let upstream = sanitize_response(&mut h, &id, http::StatusCode::OK, &app_challenge(true));
        assert_eq!(upstream.unwrap(), "tango-id");
        for gone in ["connection", "x-hop", "keep-alive", "dpop-nonce"] {
            assert!(!h.contains_key(gone), "{gone} survived");
        }
        assert_eq!(h["x-request-id"], "proxy-id");
        assert_eq!(h["x-tango-request-id"], "tango-id");
        assert_eq!(h["content-type"], "application/json");
        // No id from Tango: none reported, none invented.
        let mut h = HeaderMap::new();
        assert!(
            sanitize_response(&mut h, &id, http::StatusCode::OK, &app_challenge(true)).is_none()
        );
        assert!(!h.contains_key("x-tango-request-id"));
    }

    #[test]
    fn appends_to_an_existing_forwarded_for() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        sanitize_request(
            &mut h,
            [127, 0, 0, 1].into(),
            &HeaderValue::from_static("a"),
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 127.0.0.1");
    }

    #[test]
    fn a_response_length_that_transfer_encoding_overrides_is_dropped() {
        let id = HeaderValue::from_static("a");
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("3"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        sanitize_response(&mut h, &id, http::StatusCode::OK, &app_challenge(true));
        assert!(!h.contains_key("content-length") && !h.contains_key("transfer-encoding"));
        // Without Transfer-Encoding the length is the framing, and stays.
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("3"));
        sanitize_response(&mut h, &id, http::StatusCode::OK, &app_challenge(true));
        assert_eq!(h["content-length"], "3");
    }

    #[test]
    fn request_ids_keep_sane_ones_and_replace_the_rest() {
        let ids = RequestIds::new();
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("app-42"));
        assert_eq!(ids.for_request(&h), "app-42");
        h.insert(
            "x-request-id",
            HeaderValue::from_static("bad id with spaces"),
        );
        let fresh = ids.for_request(&h);
        assert_ne!(fresh, "bad id with spaces");
        assert_eq!(fresh.len(), 32);
        assert_ne!(
            ids.for_request(&HeaderMap::new()),
            ids.for_request(&HeaderMap::new())
        );
    }

    #[test]
    fn fresh_request_ids_are_the_prefix_and_the_count_in_hex() {
        let ids = RequestIds::new();
        let n = ids.counter.load(Ordering::Relaxed);
        let id = ids.for_request(&HeaderMap::new());
        assert_eq!(
            id.to_str().unwrap(),
            format!("{:016x}{:016x}", ids.prefix, n)
        );
        let mut out = [0u8; 16];
        hex16(&mut out, 0x0123_4567_89ab_cdef);
        assert_eq!(&out, b"0123456789abcdef");
        hex16(&mut out, u64::MAX);
        assert_eq!(&out, b"ffffffffffffffff");
    }
}
