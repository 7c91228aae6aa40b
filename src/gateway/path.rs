//! Request paths the gateway may match, and the `allow` rules matched against them.
//!
//! Gateway mode refuses rather than normalises: a path with a percent-escape, a backslash, a path
//! parameter, a dot or empty segment, or any byte outside visible ASCII is refused before any rule
//! sees it. Whatever Tango (or a proxy in front of it) would decode, collapse or resolve in such a
//! path can therefore never turn a request that matches one rule into one for another resource.
//!
//! ```
//! use tango_auth_proxy::gateway::path::{AllowRule, CleanPath};
//!
//! let rule = AllowRule::parse("GET /raas/v2/orders/*").unwrap();
//! let path = CleanPath::parse("/raas/v2/orders/RA-1").unwrap();
//! assert!(rule.matches(&http::Method::GET, &path));
//! assert!(CleanPath::parse("/raas/v2/orders/%2e%2e/accounts").is_err());
//! ```

use std::fmt;

use http::Method;

/// A request path that is safe to match: absolute, ASCII, no escapes, no dot or empty segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanPath<'a> {
    path: &'a str,
    segments: Vec<&'a str>,
}

/// Why a request path was refused; the message is meant for the app that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRefused(pub String);

impl fmt::Display for PathRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PathRefused {}

fn refused(message: &str) -> PathRefused {
    PathRefused(message.to_owned())
}

impl<'a> CleanPath<'a> {
    /// Accepts `path` only if it is plain: see the module documentation for what is refused.
    pub fn parse(path: &'a str) -> Result<Self, PathRefused> {
        if path.is_empty() {
            return Err(refused(
                "path is empty; the gateway matches only absolute paths",
            ));
        }
        if !path.starts_with('/') {
            return Err(refused("path must start with /"));
        }
        // The first offending byte decides the message, so the app hears about the trick it used.
        for &b in path.as_bytes() {
            let problem = match b {
                b'%' => "path contains a percent-escape; the gateway matches only plain paths",
                b'\\' => "path contains a backslash; the gateway matches only plain paths",
                b';' => "path contains ';' (a path parameter); the gateway matches only plain paths",
                b'?' | b'#' => "path contains '?' or '#'; the query belongs after the path",
                b' ' => "path contains a space; the gateway matches only plain paths",
                0x00..=0x1f | 0x7f => "path contains a control character",
                0x80..=0xff => {
                    "path contains a non-ASCII character; the gateway matches only plain ASCII paths"
                }
                _ => continue,
            };
            return Err(refused(problem));
        }
        let mut segments = Vec::new();
        if path != "/" {
            for segment in path[1..].split('/') {
                match segment {
                    "" => {
                        return Err(refused(
                            "path contains an empty segment (// or a trailing /)",
                        ))
                    }
                    "." | ".." => {
                        return Err(refused(
                            "path contains a . or .. segment; the gateway does not resolve them",
                        ))
                    }
                    _ => segments.push(segment),
                }
            }
        }
        Ok(CleanPath { path, segments })
    }

    /// The segments between the slashes; empty for the bare path `/`.
    pub fn segments(&self) -> &[&'a str] {
        &self.segments
    }

    /// The path exactly as the request carried it.
    pub fn as_str(&self) -> &'a str {
        self.path
    }
}

/// One segment of an allow pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternSegment {
    /// Matches this segment only, byte for byte (so a case variant does not match).
    Literal(String),
    /// `*`: any one segment.
    One,
    /// `**` (last only): one or more remaining segments.
    Rest,
}

/// One `allow` entry: "METHOD /pattern" — `*` one whole segment, `**` (last segment only) the rest
/// (one or more segments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    /// `None` for `*`, any method.
    method: Option<Method>,
    pattern: String,
    segments: Vec<PatternSegment>,
}

/// Config text quoted for an error message, cut short so a pasted blob stays readable.
fn quoted(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
}

impl AllowRule {
    /// Parses one `allow` entry, with an error naming what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let (method_text, pattern) = match parts.as_slice() {
            [method, pattern] => (*method, *pattern),
            [only] if only.starts_with('/') => {
                return Err(format!(
                    "missing method: expected \"METHOD /path\" (e.g. \"GET {only}\"), found {}",
                    quoted(text)
                ))
            }
            _ => return Err(format!("expected \"METHOD /path\", found {}", quoted(text))),
        };
        let method = parse_method(method_text)?;
        let segments = parse_pattern(pattern)?;
        Ok(AllowRule {
            method,
            pattern: pattern.to_owned(),
            segments,
        })
    }

    /// True if a request with this method and path is allowed by this rule.
    pub fn matches(&self, method: &Method, path: &CleanPath<'_>) -> bool {
        if let Some(wanted) = &self.method {
            if wanted != method {
                return false;
            }
        }
        let actual = path.segments();
        let (last, fixed) = match self.segments.split_last() {
            Some((PatternSegment::Rest, fixed)) => (true, fixed),
            _ => (false, self.segments.as_slice()),
        };
        let length_fits = if last {
            actual.len() > fixed.len()
        } else {
            actual.len() == fixed.len()
        };
        length_fits
            && fixed.iter().zip(actual).all(|(want, got)| match want {
                PatternSegment::Literal(text) => text == got,
                PatternSegment::One => true,
                // parse_pattern allows `**` only last, where it was split off above.
                PatternSegment::Rest => false,
            })
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.method {
            Some(method) => write!(f, "{method} {}", self.pattern),
            None => write!(f, "* {}", self.pattern),
        }
    }
}

fn parse_method(text: &str) -> Result<Option<Method>, String> {
    if text == "*" {
        return Ok(None);
    }
    if text.starts_with('/') {
        return Err(format!(
            "missing method: expected \"METHOD /path\", found {}",
            quoted(text)
        ));
    }
    if !text.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(format!(
            "method must be an uppercase word such as GET or POST, or * for any, found {}",
            quoted(text)
        ));
    }
    if text.bytes().any(|b| b.is_ascii_lowercase()) {
        // Methods are case-sensitive: a rule for "get" would never match a GET request.
        return Err(format!(
            "method must be uppercase (methods are case-sensitive), found {}; did you mean {:?}?",
            quoted(text),
            text.to_ascii_uppercase()
        ));
    }
    Method::from_bytes(text.as_bytes())
        .map(Some)
        .map_err(|_| format!("{} is not an HTTP method", quoted(text)))
}

fn parse_pattern(pattern: &str) -> Result<Vec<PatternSegment>, String> {
    if !pattern.starts_with('/') {
        return Err(format!(
            "path pattern must start with /, found {}",
            quoted(pattern)
        ));
    }
    if pattern.contains('?') {
        return Err(format!(
            "path pattern {} contains a query string; allow rules match paths only",
            quoted(pattern)
        ));
    }
    let clean =
        CleanPath::parse(pattern).map_err(|e| format!("path pattern {}: {e}", quoted(pattern)))?;
    let count = clean.segments().len();
    clean
        .segments()
        .iter()
        .enumerate()
        .map(|(i, segment)| match *segment {
            "**" if i + 1 == count => Ok(PatternSegment::Rest),
            "**" => Err(format!(
                "path pattern {}: ** may only be the last segment",
                quoted(pattern)
            )),
            "*" => Ok(PatternSegment::One),
            s if s.contains('*') => Err(format!(
                "path pattern {}: * must be a whole segment, found {}",
                quoted(pattern),
                quoted(s)
            )),
            s => Ok(PatternSegment::Literal(s.to_owned())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(path: &str) -> String {
        CleanPath::parse(path).unwrap_err().0
    }

    fn allows(rule: &str, method: Method, path: &str) -> bool {
        AllowRule::parse(rule)
            .unwrap()
            .matches(&method, &CleanPath::parse(path).unwrap())
    }

    #[test]
    fn plain_paths_parse_into_their_segments() {
        let p = CleanPath::parse("/raas/v2/accounts/A-1").unwrap();
        assert_eq!(p.segments(), ["raas", "v2", "accounts", "A-1"]);
        assert_eq!(p.as_str(), "/raas/v2/accounts/A-1");
        let root = CleanPath::parse("/").unwrap();
        assert!(root.segments().is_empty());
        assert_eq!(root.as_str(), "/");
        // Visible ASCII that servers do not treat specially stays literal.
        let p = CleanPath::parse("/a/b.json/...x/~u/!$&'()*+,=:@-_").unwrap();
        assert_eq!(
            p.segments(),
            ["a", "b.json", "...x", "~u", "!$&'()*+,=:@-_"]
        );
    }

    #[test]
    fn each_trick_is_refused_with_its_own_message() {
        let cases: &[(&str, &str)] = &[
            ("", "path is empty"),
            ("raas/v2/orders", "must start with /"),
            ("*", "must start with /"),
            ("http://x/raas", "must start with /"),
            ("/raas/v2/%2e%2e/x", "percent-escape"),
            ("/raas/v2/a%2fb", "percent-escape"),
            ("/raas/v2/a%5cb", "percent-escape"),
            ("/raas/v2/%252e%252e", "percent-escape"),
            ("/raas/v2/orders%", "percent-escape"),
            ("/raas/v2\\..\\accounts", "backslash"),
            ("/raas/v2/orders;jsessionid=1", "path parameter"),
            ("/raas/v2/orders/..;/accounts", "path parameter"),
            ("/raas/v2/orders?x=1", "'?' or '#'"),
            ("/raas/v2/orders#x", "'?' or '#'"),
            ("/raas/v2/ord ers", "space"),
            ("/raas/v2/orders\t", "control character"),
            ("/raas/v2/orders\0", "control character"),
            ("/raas/v2/orders\x7f", "control character"),
            ("/raas/v2/orders\u{ff0f}x", "non-ASCII"),
            ("/raas/v2/ＯＲＤＥＲＳ", "non-ASCII"),
            ("/raas/v2/orde\u{0301}rs", "non-ASCII"),
            ("/raas//v2/orders", "empty segment"),
            ("//raas/v2/orders", "empty segment"),
            ("/raas/v2/orders/", "empty segment"),
            ("/raas/v2/./orders", ". or .. segment"),
            ("/raas/v2/x/../orders", ". or .. segment"),
            ("/..", ". or .. segment"),
            ("/raas/v2/orders/.", ". or .. segment"),
        ];
        for (path, expected) in cases {
            let message = refusal(path);
            assert!(
                message.contains(expected),
                "{path:?}: {message:?} should mention {expected:?}"
            );
        }
        assert_eq!(
            refusal("/a/%2e"),
            "path contains a percent-escape; the gateway matches only plain paths"
        );
    }

    #[test]
    fn allow_rules_match_literals_exactly() {
        let rule = "GET /raas/v2/catalogs";
        assert!(allows(rule, Method::GET, "/raas/v2/catalogs"));
        assert!(!allows(rule, Method::POST, "/raas/v2/catalogs"));
        assert!(!allows(rule, Method::HEAD, "/raas/v2/catalogs"));
        // A case variant is a different path to the gateway: refusing it is the safe direction.
        assert!(!allows(rule, Method::GET, "/raas/v2/Catalogs"));
        assert!(!allows(rule, Method::GET, "/RAAS/v2/catalogs"));
        assert!(!allows(rule, Method::GET, "/raas/v2/catalogs.json"));
        assert!(!allows(rule, Method::GET, "/raas/v2/catalogs/x"));
        assert!(!allows(rule, Method::GET, "/raas/v2"));
        // An extension method spelled in lowercase is not GET.
        let lower_get = Method::from_bytes(b"get").unwrap();
        assert!(!allows(rule, lower_get, "/raas/v2/catalogs"));
    }

    #[test]
    fn one_star_matches_exactly_one_segment() {
        let rule = "GET /raas/v2/orders/*";
        assert!(allows(rule, Method::GET, "/raas/v2/orders/RA-1"));
        assert!(allows(rule, Method::GET, "/raas/v2/orders/*"));
        assert!(!allows(rule, Method::GET, "/raas/v2/orders"));
        assert!(!allows(rule, Method::GET, "/raas/v2/orders/RA-1/resends"));
        assert!(!allows(rule, Method::GET, "/raas/v2/accounts/RA-1"));
        let middle = "GET /raas/v2/customers/*/accounts";
        assert!(allows(
            middle,
            Method::GET,
            "/raas/v2/customers/C-1/accounts"
        ));
        assert!(!allows(
            middle,
            Method::GET,
            "/raas/v2/customers/C-1/x/accounts"
        ));
        assert!(!allows(middle, Method::GET, "/raas/v2/customers/accounts"));
    }

    #[test]
    fn double_star_matches_one_or_more_remaining_segments() {
        let rule = "POST /raas/v2/lineItems/**";
        assert!(allows(rule, Method::POST, "/raas/v2/lineItems/L-1"));
        assert!(allows(rule, Method::POST, "/raas/v2/lineItems/L-1/reissue"));
        assert!(!allows(rule, Method::POST, "/raas/v2/lineItems"));
        assert!(!allows(rule, Method::POST, "/raas/v2/lineitems/L-1"));
        assert!(allows("GET /**", Method::GET, "/x"));
        assert!(!allows("GET /**", Method::GET, "/"));
        assert!(allows("GET /", Method::GET, "/"));
        assert!(!allows("GET /", Method::GET, "/x"));
    }

    #[test]
    fn star_method_matches_any_method() {
        let rule = "* /raas/v2/orders";
        for method in [Method::GET, Method::POST, Method::DELETE, Method::PATCH] {
            assert!(allows(rule, method, "/raas/v2/orders"));
        }
        assert!(!allows(rule, Method::GET, "/raas/v2/orders/x"));
    }

    #[test]
    fn rules_render_back_as_written() {
        for text in [
            "GET /raas/v2/catalogs",
            "POST /raas/v2/orders",
            "GET /raas/v2/orders/*",
            "* /raas/v2/**",
            "PURGE /",
        ] {
            assert_eq!(AllowRule::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            AllowRule::parse("  GET   /raas/v2/catalogs ")
                .unwrap()
                .to_string(),
            "GET /raas/v2/catalogs"
        );
    }

    #[test]
    fn bad_rules_are_config_errors_that_say_why() {
        let cases: &[(&str, &str)] = &[
            ("", "expected \"METHOD /path\", found \"\""),
            ("GET", "expected \"METHOD /path\", found \"GET\""),
            ("/raas/v2/orders", "missing method"),
            ("GET /a /b", "expected \"METHOD /path\""),
            ("get /raas/v2/orders", "method must be uppercase"),
            ("Get /raas/v2/orders", "did you mean \"GET\""),
            ("G3T /raas/v2/orders", "uppercase word"),
            ("GET raas/v2/orders", "must start with /"),
            ("GET /raas/v2/orders?accountIdentifier=A", "query string"),
            (
                "GET /raas/v2/ord*",
                "* must be a whole segment, found \"ord*\"",
            ),
            ("GET /raas/v2/*x*", "* must be a whole segment"),
            ("GET /raas/v2/***", "* must be a whole segment"),
            ("GET /raas/**/orders", "** may only be the last segment"),
            ("GET /raas/v2/%2e", "percent-escape"),
            ("GET /raas/v2/../x", ". or .. segment"),
            ("GET /raas//v2", "empty segment"),
            ("GET /raas/v2/", "empty segment"),
            ("GET /raas/v2/orders;x", "path parameter"),
            ("GET /raas/v2\\orders", "backslash"),
            ("GET /raas/v2/ｏrders", "non-ASCII"),
        ];
        for (text, expected) in cases {
            let error = AllowRule::parse(text).unwrap_err();
            assert!(
                error.contains(expected),
                "{text:?}: {error:?} should mention {expected:?}"
            );
        }
        let long = format!("GET /{}?", "x".repeat(500));
        assert!(AllowRule::parse(&long).unwrap_err().len() < 200);
    }

    /// What a lenient server in front of or inside Tango might make of a path: decode escapes
    /// (twice), turn backslashes and look-alike slashes into `/`, drop path parameters, collapse
    /// empty segments and resolve dot segments. A path the gateway accepts must mean the same
    /// to such a server as to the gateway.
    fn lenient(path: &str) -> String {
        let mut text = path.to_owned();
        for _ in 0..3 {
            text = percent_decode_lossy(&text);
        }
        let text = text
            .replace('\\', "/")
            .replace(['\u{ff0f}', '\u{2215}', '\u{2044}'], "/")
            .replace('\u{ff0e}', ".");
        let mut out: Vec<&str> = Vec::new();
        for segment in text.split('/') {
            let segment = segment.split(';').next().unwrap_or("");
            match segment {
                "" | "." => {}
                ".." => {
                    out.pop();
                }
                s => out.push(s),
            }
        }
        format!("/{}", out.join("/"))
    }

    fn percent_decode_lossy(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match (bytes[i], hex) {
                (b'%', Some(b)) => {
                    out.push(b);
                    i += 3;
                }
                (b, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Path tricks: every way found in the wild to make two servers disagree about a path.
    fn trick_path() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        // Each piece is mostly plain, so the corpus holds accepted paths as well as refused ones.
        fn plain_or(plain: &str, tricks: Vec<&str>) -> BoxedStrategy<String> {
            let tricks: Vec<String> = tricks.into_iter().map(str::to_owned).collect();
            prop_oneof![3 => Just(plain.to_owned()), 1 => prop::sample::select(tricks)].boxed()
        }
        let separator = || {
            plain_or(
                "/",
                vec![
                    "//",
                    "%2f",
                    "%2F",
                    "%252f",
                    "\\",
                    "%5c",
                    "%5C",
                    "%255c",
                    "\u{ff0f}",
                    "\u{2215}",
                    "/./",
                    "/%2e/",
                    "/%2E/",
                    "/x/../",
                    "/x/%2e%2e/",
                    "/x/..%2f",
                    "/x/%252e%252e/",
                    "/.\u{ff0e}/",
                    ";x=1/",
                    "/;/",
                    "/..;/",
                    "/x/.%2e/",
                ],
            )
        };
        let word = |w: &str| {
            let tricks = vec![
                w.to_uppercase(),
                format!("{}{}", w[..1].to_uppercase(), &w[1..]),
                format!("{w}."),
                format!("{w}.json"),
                format!("%{:02X}{}", w.as_bytes()[0], &w[1..]),
                format!("{w}%00"),
                format!("{w}\u{301}"),
            ];
            prop_oneof![3 => Just(w.to_owned()), 1 => prop::sample::select(tricks)]
        };
        let account = plain_or(
            "A-1",
            vec![
                "A-2",
                "a-1",
                "A%2d1",
                "A%2D2",
                "A-%31",
                "A-%32",
                "A-1%00",
                "A-1 ",
                "A-1.",
                "A-1;x",
                "A-2;A-1",
                "\u{ff21}-1",
                "A\u{2010}1",
                "A-2/../A-1",
                "A-1/../A-2",
                "A-1%2f..%2fA-2",
                "%41-2",
                "A-2%20",
                "A-1/",
                "A-1/.",
                "A-1/..",
                "A-1?x",
                "A-1#x",
                "A-1\t",
            ],
        );
        let lead = plain_or(
            "/",
            vec!["//", "\\", "%2f", "/./", "/%2e/", "/x/../", "\u{ff0f}", ""],
        );
        (
            lead,
            word("raas"),
            separator(),
            word("v2"),
            separator(),
            prop_oneof![word("accounts"), word("orders")],
            separator(),
            account,
        )
            .prop_map(|(lead, raas, s1, v2, s2, collection, s3, account)| {
                format!("{lead}{raas}{s1}{v2}{s2}{collection}{s3}{account}")
            })
    }

    #[test]
    fn no_generated_path_trick_widens_a_match() {
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let account_rule = AllowRule::parse("GET /raas/v2/accounts/A-1").unwrap();
        let orders_rule = AllowRule::parse("GET /raas/v2/orders/*").unwrap();
        let mut runner = TestRunner::new_with_rng(
            Config {
                cases: 512,
                failure_persistence: None,
                ..Config::default()
            },
            TestRng::deterministic_rng(RngAlgorithm::ChaCha),
        );
        let accepted = std::cell::Cell::new(0);
        let refused = std::cell::Cell::new(0);
        runner
            .run(&trick_path(), |path| {
                let Ok(clean) = CleanPath::parse(&path) else {
                    refused.set(refused.get() + 1);
                    return Ok(());
                };
                accepted.set(accepted.get() + 1);
                // Whatever parses means the same to a lenient server as to the gateway.
                proptest::prop_assert_eq!(lenient(&path), path.clone());
                if account_rule.matches(&Method::GET, &clean) {
                    proptest::prop_assert_eq!(clean.as_str(), "/raas/v2/accounts/A-1");
                }
                if orders_rule.matches(&Method::GET, &clean) {
                    let segments = clean.segments();
                    proptest::prop_assert_eq!(&segments[..3], &["raas", "v2", "orders"]);
                    proptest::prop_assert_eq!(segments.len(), 4);
                }
                Ok(())
            })
            .unwrap();
        // The corpus exercises both outcomes, so the property above is not vacuous.
        let (accepted, refused) = (accepted.get(), refused.get());
        assert!(accepted > 20, "only {accepted} generated paths parsed");
        assert!(refused > 200, "only {refused} generated paths were refused");
    }
}
