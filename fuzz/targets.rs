//! The fuzz targets, written once and driven two ways: by libFuzzer through `cargo fuzz`
//! (`scripts/fuzz.sh`, the binaries in `fuzz_targets/`), and by the normal test run, which replays
//! every committed input in `fuzz/corpus/<target>/` and a batch of generated ones
//! (`tests/integration/fuzzing.rs`).
//!
//! Each target takes arbitrary bytes, feeds them to one parser the proxy points at untrusted input,
//! and panics when a property the proxy relies on does not hold — a panic is what both drivers
//! report. Properties, not just "no crash":
//! * `config`: TOML plus `TANGO_PROXY_*` overrides never panic; a valid result renders (as
//!   `check-config` prints it) without any of its secrets.
//! * `request_head`: after sanitising, no caller credential, hop-by-hop header or
//!   `Connection`-named header is left, the forwarding headers are the proxy's, and a request id
//!   taken from the app is short, plain text.
//! * `token_answer`: a success has a token; an error's text is printable and bounded, and never
//!   holds the secret form values the proxy sent.
//! * `www_authenticate`: the class follows the `error` parameters, and the 401 an app receives
//!   carries a challenge, never a DPoP one, and no `DPoP-Nonce`.
//! * `dpop_nonce`: a nonce is kept exactly when it is 1–512 visible ASCII characters without `"`
//!   or `\`; otherwise the previous one stays.

#![allow(dead_code)]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use tango_auth_proxy::auth::dpop::NonceCache;
use tango_auth_proxy::auth::oauth::{parse_response, Challenge};
use tango_auth_proxy::config::{AuthConfig, Config};
use tango_auth_proxy::proxy::headers::{
    app_challenge, sanitize_request, sanitize_response, RequestIds,
};

/// A target: panics when a property does not hold for the input.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("request_head", request_head),
    ("token_answer", token_answer),
    ("www_authenticate", www_authenticate),
    ("dpop_nonce", dpop_nonce),
];

/// Header fields from `Name: value` lines (CRLF or LF); lines that are not a valid field are
/// skipped, as the HTTP parser in front of the proxy would have refused them.
fn header_map(text: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in text.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.trim_ascii();
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            map.append(n, v);
        }
    }
    map
}

/// A TOML document, then (after a line `--env--`) `NAME=value` lines as environment overrides.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (toml, env) = text.split_once("\n--env--\n").unwrap_or((&text, ""));
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match Config::from_sources(toml, &env) {
        Ok(config) => {
            let shown = config.to_redacted_toml();
            for profile in config.profiles.values() {
                let secrets = match &profile.auth {
                    AuthConfig::Basic { api_key, .. } => vec![api_key.expose()],
                    AuthConfig::ClientCredentials(o) | AuthConfig::ServiceAccount(o) => {
                        let mut s = vec![o.client_secret.expose()];
                        s.extend(o.password.as_ref().map(|p| p.expose()));
                        s
                    }
                    _ => Vec::new(),
                };
                // Short values could appear in the output by coincidence (a key name, a number).
                for secret in secrets.into_iter().filter(|s| s.len() >= 12) {
                    assert!(
                        !shown.contains(secret),
                        "check-config output shows a secret"
                    );
                }
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty());
        }
    }
}

/// A request head's header lines, sanitised as the proxy does before forwarding.
pub fn request_head(data: &[u8]) {
    let mut headers = header_map(data);
    let connection_named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let ids = RequestIds::new();
    let id = ids.for_request(&headers);
    assert!(
        (1..=128).contains(&id.len())
            && id
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(b)),
        "request id {id:?} would garble logs"
    );
    let inbound = sanitize_request(&mut headers, [127, 0, 0, 1].into(), &id);
    for gone in [
        "authorization",
        "proxy-authorization",
        "dpop",
        "cookie",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "expect",
    ] {
        assert!(!headers.contains_key(gone), "{gone} survived sanitising");
    }
    for name in connection_named {
        let ours = [
            "x-request-id",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
        ];
        if !ours.contains(&name.as_str()) {
            assert!(
                !headers.contains_key(&name),
                "Connection-named {name} survived"
            );
        }
    }
    assert_eq!(headers.get_all("x-request-id").iter().count(), 1);
    assert_eq!(headers["x-request-id"], id);
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(
        headers.get("x-forwarded-host"),
        inbound.host.as_ref(),
        "X-Forwarded-Host must be the app's Host or absent"
    );
}

/// A token endpoint answer: two bytes of status, then the body.
pub fn token_answer(data: &[u8]) {
    let (status, body) = match data {
        [a, b, rest @ ..] => (100 + u16::from_be_bytes([*a, *b]) % 500, rest),
        _ => (200, data),
    };
    match parse_response(status, body) {
        Ok(minted) => {
            assert!((200..300).contains(&status));
            assert!(!minted.access_token.expose().is_empty());
            assert_eq!(minted.token_type, minted.token_type.to_ascii_lowercase());
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                !message.chars().any(char::is_control),
                "control character in {message:?}"
            );
            assert!(message.chars().count() < 400, "unbounded error text");
        }
    }
}

/// A 401's `WWW-Authenticate` and other header lines, classified and made app-facing.
pub fn www_authenticate(data: &[u8]) {
    let mut headers = header_map(data);
    let class = Challenge::of(&headers);
    let has_code = |code: &str| {
        headers
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains(code))
    };
    if class == Challenge::Nonce {
        assert!(has_code("use_dpop_nonce"));
    }
    if class == Challenge::Proof {
        assert!(has_code("invalid_dpop_proof"));
    }
    let id = HeaderValue::from_static("fuzz-request");
    let basic = data.first().is_some_and(|b| b & 1 == 1);
    sanitize_response(
        &mut headers,
        &id,
        http::StatusCode::UNAUTHORIZED,
        &app_challenge(basic),
    );
    assert!(!headers.contains_key("dpop-nonce"));
    let challenges: Vec<&HeaderValue> = headers
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .collect();
    assert!(
        !challenges.is_empty(),
        "a 401 for the app without a challenge"
    );
    for c in challenges {
        let lower = c.as_bytes().to_ascii_lowercase();
        assert!(
            !lower.starts_with(b"dpop"),
            "a DPoP challenge reached the app: {c:?}"
        );
    }
    assert_eq!(headers["x-request-id"], "fuzz-request");
}

/// A sequence of `DPoP-Nonce` values (one per line) for one origin.
pub fn dpop_nonce(data: &[u8]) {
    let cache = NonceCache::default();
    let mut expected: Option<String> = None;
    for line in data.split(|&b| b == b'\n') {
        let nonce = String::from_utf8_lossy(line);
        let valid = (1..=512).contains(&nonce.len())
            && nonce
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        let changed = cache.update("https://tango.example", &nonce);
        if valid {
            assert_eq!(changed, expected.as_deref() != Some(&*nonce));
            expected = Some(nonce.into_owned());
        } else {
            assert!(!changed, "an unusable nonce {nonce:?} was kept");
        }
        assert_eq!(cache.get("https://tango.example"), expected);
    }
}
