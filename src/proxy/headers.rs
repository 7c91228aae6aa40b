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

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy `Proxy-Connection` and `Keep-Alive`.
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

/// Credentials an app may send that must never reach Tango, and `Expect` (the proxy answers
/// `100-continue` itself).
const APP_ONLY: [HeaderName; 5] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    DPOP,
    header::COOKIE,
    header::EXPECT,
];

/// Removes every header named in `set` that is present: one pass over the (few) names the
/// message has, instead of a hashed look-up per name in the set.
fn strip(headers: &mut HeaderMap, set: &[HeaderName]) {
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| set.contains(name))
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
}

/// Removes the headers named in `Connection`.
fn strip_connection_named(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
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
}

/// Removes the headers named in `Connection`, then the hop-by-hop set.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_connection_named(headers);
    strip(headers, &HOP_BY_HOP);
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
    strip_hop_by_hop(headers);
    strip(headers, &APP_ONLY);
    let host = headers.remove(header::HOST);

    let ip = remote_ip.to_string();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match &host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST, h.clone());
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    headers.insert(X_REQUEST_ID, request_id.clone());
    Inbound { host }
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
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and an intermediary removes the
    // Content-Length before forwarding. The body arrives de-chunked; a stale length passed on
    // would make the app read a cut body as complete (or wait for bytes that never come).
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(headers);
    // DPoP is between the proxy and Tango; the app never sends a proof.
    headers.remove(DPOP_NONCE);
    if status == http::StatusCode::UNAUTHORIZED {
        app_facing_challenges(headers, challenge);
    }
    let upstream_id = headers.remove(X_REQUEST_ID);
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
