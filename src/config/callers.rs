//! `[callers.NAME]`: the stores a gateway serves, each with its key hash, its profile and its
//! policy. Any caller configured puts the proxy in gateway mode.
//!
//! Decisions not spelled out in DESIGN.md:
//! * caller names use letters, digits, `-` and `_`, at most 64 (a Basic user name cannot hold
//!   `:`, and names become metric labels); a name may not start with `_`, kept for aggregate
//!   labels such as `_unknown`;
//! * two callers with the same `key_sha256` are refused: a `Bearer` key must name one caller;
//!   likewise a `cert_sha256` or a `cert_san` names one caller;
//! * a caller needs at least one identity: `key_sha256`, `cert_sha256` or `cert_san`; with both
//!   certificate keys a certificate must match both; certificate identities need
//!   `listen.tls_client_ca_file` (checked with the other cross-section rules in `config`);
//! * `cert_sha256` takes the fingerprint as `openssl x509 -noout -fingerprint -sha256` prints it
//!   (colons and either case accepted); `cert_san` is a URI when it starts with a scheme
//!   (`spiffe:`, `urn:`: a letter, then letters, digits, `+`, `-` or `.`, then `:`), compared
//!   exactly with the certificate's URI names only, and otherwise a DNS name, compared without
//!   regard to case with its DNS names only ([`San`]); any other value with a `:` is refused;
//! * `rate` is `N/s`, `N/m` or `N/h` (whole N); `burst` defaults to the rate per second rounded
//!   up, at least 1;
//! * `daily_spend_limit` is an amount and an ISO 4217 code (`"500 USD"`, `"50000 JPY"`), counted
//!   in the currency's minor units (2 decimals unless the code is one of the few with 0 or 3);
//! * `allow` entries are checked by the gateway's own pattern parser, so `check-config` reports
//!   a bad pattern as it reports any other bad value.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use super::{Problems, Text};

/// `[callers.NAME]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCaller {
    key_sha256: Option<Text>,
    cert_sha256: Option<Text>,
    cert_san: Option<Text>,
    profile: Option<Text>,
    allow: Option<Vec<Text>>,
    accounts: Option<Vec<Text>>,
    customers: Option<Vec<Text>>,
    require_external_ref_id: Option<bool>,
    rate: Option<Text>,
    burst: Option<u64>,
    daily_spend_limit: Option<Text>,
    spend_limit_fail_open: Option<bool>,
}

/// One caller of a gateway, validated.
#[derive(Debug, Clone, Serialize)]
pub struct CallerConfig {
    /// The caller's name (its Basic user name, its metric label).
    pub name: String,
    /// SHA-256 of the caller's key; shown only by its first 8 hex digits. `None` for a caller
    /// known only by its client certificate.
    #[serde(serialize_with = "ser_key_hash")]
    pub key_sha256: Option<[u8; 32]>,
    /// SHA-256 of the DER of the client certificate that identifies the caller.
    #[serde(serialize_with = "ser_fingerprint")]
    pub cert_sha256: Option<[u8; 32]>,
    /// A DNS or URI subject alternative name the caller's client certificate carries.
    pub cert_san: Option<San>,
    /// The profile (Tango identity) its requests use.
    pub profile: String,
    /// `METHOD /pattern` entries; empty means every path.
    pub allow: Vec<String>,
    /// `accountIdentifier` values it may name; `None` means any.
    pub accounts: Option<BTreeSet<String>>,
    /// `customerIdentifier` values it may name; `None` means any.
    pub customers: Option<BTreeSet<String>>,
    /// Orders without `externalRefID` are refused.
    pub require_external_ref_id: bool,
    /// Token bucket, per replica.
    pub rate: Option<Rate>,
    /// Spend per UTC day, reserved before an order is forwarded.
    pub daily_spend_limit: Option<Money>,
    /// While the spend ledger is unreachable, forward limited orders anyway.
    pub spend_limit_fail_open: bool,
}

/// A token bucket: `per_second` refill, `burst` capacity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_second: f64,
    /// Requests allowed at once.
    pub burst: u64,
    /// As written: the count and the period.
    #[serde(skip)]
    pub written: (u64, Duration),
}

/// An amount of money in a currency's minor units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    /// Minor units (cents for USD).
    pub minor: u64,
    /// ISO 4217 code, upper case.
    pub currency: String,
    /// Decimal places of the currency's minor unit.
    pub decimals: u32,
}

impl Money {
    /// `"500 USD"` or `"12.50 EUR"`.
    pub fn parse(text: &str) -> Result<Money, String> {
        let mut words = text.split_whitespace();
        let (Some(amount), Some(currency), None) = (words.next(), words.next(), words.next())
        else {
            return Err(format!(
                "expected an amount and a currency such as \"500 USD\", found {text:?}"
            ));
        };
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "{currency:?} is not an ISO 4217 currency code (three capital letters, such as USD)"
            ));
        }
        let decimals = currency_decimals(currency);
        let minor = parse_decimal(amount, decimals).ok_or_else(|| {
            format!(
                "{amount:?} is not an amount of {currency} (a positive number with at most \
                 {decimals} decimal places)"
            )
        })?;
        if minor == 0 {
            return Err("must be greater than zero".into());
        }
        Ok(Money {
            minor,
            currency: currency.to_string(),
            decimals,
        })
    }

    /// The amount as written in major units (`"500.00 USD"`).
    pub fn display_minor(minor: u64, decimals: u32, currency: &str) -> String {
        if decimals == 0 {
            return format!("{minor} {currency}");
        }
        let unit = 10u64.pow(decimals);
        format!(
            "{}.{:0width$} {currency}",
            minor / unit,
            minor % unit,
            width = decimals as usize
        )
    }
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&Money::display_minor(
            self.minor,
            self.decimals,
            &self.currency,
        ))
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Largest amount a limit may hold, in minor units (ten billion in major units).
const MAX_MINOR: u64 = 1_000_000_000_000;

/// ISO 4217 minor-unit digits for the codes that do not use two.
pub fn currency_decimals(code: &str) -> u32 {
    match code {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// `"12.5"` with `decimals` = 2 → 1250; `None` for anything but plain digits with at most
/// `decimals` places, or more than [`MAX_MINOR`].
fn parse_decimal(text: &str, decimals: u32) -> Option<u64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > decimals as usize
        || (text.contains('.') && frac.is_empty())
        || whole.len() > 13
    {
        return None;
    }
    let mut minor: u64 = whole.parse().ok()?;
    for i in 0..decimals as usize {
        let digit = frac.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
        minor = minor.checked_mul(10)?.checked_add(digit)?;
    }
    (minor <= MAX_MINOR).then_some(minor)
}

fn ser_key_hash<S: Serializer>(hash: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match hash {
        Some(hash) => {
            let prefix: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
            s.collect_str(&format_args!("{prefix}…"))
        }
        None => s.serialize_none(),
    }
}

/// A certificate's fingerprint is public: shown whole.
fn ser_fingerprint<S: Serializer>(hash: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match hash {
        Some(hash) => s.collect_str(&hash.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        None => s.serialize_none(),
    }
}

/// A subject alternative name as compared, with its kind: a certificate's DNS name never
/// matches a URI, nor its URI a DNS name, however alike they read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum San {
    /// A `dNSName`, in lower case (DNS names are compared without regard to case).
    Dns(String),
    /// A `uniformResourceIdentifier`, as written (compared exactly).
    Uri(String),
}

impl San {
    /// A `cert_san` as configured: a URI when it starts with a scheme (`spiffe:`, `urn:`), else
    /// a DNS name. `None` for a value with a `:` that is not a scheme's (a DNS name has none).
    pub fn from_config(value: &str) -> Option<San> {
        match value.split_once(':') {
            None => Some(San::Dns(value.to_ascii_lowercase())),
            Some((scheme, _)) if is_uri_scheme(scheme) => Some(San::Uri(value.to_string())),
            Some(_) => None,
        }
    }

    /// The name, without its kind.
    pub fn as_str(&self) -> &str {
        match self {
            San::Dns(name) | San::Uri(name) => name,
        }
    }
}

impl Serialize for San {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // As configured: the kind follows from the value (a URI starts with its scheme).
        s.serialize_str(self.as_str())
    }
}

/// RFC 3986 `scheme`: a letter, then letters, digits, `+`, `-` and `.`.
fn is_uri_scheme(scheme: &str) -> bool {
    let mut bytes = scheme.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// Caller names: letters, digits, `-`, `_`; not starting with `_`; at most 64 bytes.
pub fn valid_caller_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// `N/s`, `N/m`, `N/h` (also `sec`, `min`, `hour`).
fn parse_rate(text: &str) -> Result<(u64, Duration), String> {
    let bad =
        || format!("expected a rate such as \"10/s\", \"600/m\" or \"100/h\", found {text:?}");
    let (count, period) = text.split_once('/').ok_or_else(bad)?;
    let count: u64 = count.trim().parse().map_err(|_| bad())?;
    let period = match period.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    if !(1..=1_000_000).contains(&count) {
        return Err(format!(
            "the count must be between 1 and 1000000, not {count}"
        ));
    }
    Ok((count, period))
}

/// Identifiers in `accounts`/`customers`: non-empty visible ASCII without spaces, as Tango's are.
fn identifier_list(
    raw: Option<Vec<Text>>,
    key: &str,
    p: &mut Problems,
) -> Option<BTreeSet<String>> {
    let raw = raw?;
    let mut out = BTreeSet::new();
    for (i, t) in raw.into_iter().enumerate() {
        let id = t.0;
        if id.is_empty() || id.len() > 100 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            p.push(
                format!("{key}[{i}]"),
                "expected a Tango identifier (1 to 100 visible ASCII characters)",
            );
        } else if !out.insert(id) {
            p.push(format!("{key}[{i}]"), "listed twice");
        }
    }
    if out.is_empty() && !p.0.iter().any(|x| x.key.starts_with(key)) {
        p.push(
            key,
            "an empty list would refuse every request naming one; remove the key to allow any",
        );
    }
    Some(out)
}

/// Validates one caller. `profiles` are the configured profile names (the only one is the
/// default).
pub(super) fn validate_caller(
    name: &str,
    raw: RawCaller,
    profiles: &[&str],
    p: &mut Problems,
) -> Option<CallerConfig> {
    let key = format!("callers.{name}");
    let before = p.0.len();
    let cert_sha256 = raw.cert_sha256.and_then(|Text(hex, _)| {
        let hash = parse_sha256(&hex.replace(':', ""));
        if hash.is_none() {
            p.push(
                format!("{key}.cert_sha256"),
                "expected the SHA-256 fingerprint of the client certificate: 64 hex digits, \
                 colons allowed (openssl x509 -noout -fingerprint -sha256)",
            );
        }
        hash
    });
    let cert_san = raw.cert_san.and_then(|Text(san, _)| {
        let parsed =
            (!san.is_empty() && san.len() <= 255 && san.bytes().all(|b| b.is_ascii_graphic()))
                .then(|| San::from_config(&san))
                .flatten();
        if parsed.is_none() {
            p.push(
                format!("{key}.cert_san"),
                "expected a DNS name or a URI with its scheme (\"spiffe://...\"), 1 to 255 \
                 visible ASCII characters",
            );
        }
        parsed
    });
    let key_sha256 = match raw.key_sha256 {
        None if cert_sha256.is_some() || cert_san.is_some() => None,
        None => {
            if !p
                .0
                .iter()
                .any(|x| x.key.starts_with(&format!("{key}.cert_")))
            {
                p.push(
                    format!("{key}.key_sha256"),
                    "required (unless cert_sha256 or cert_san identifies the caller): the hex \
                     SHA-256 of the caller's key (echo -n KEY | sha256sum)",
                );
            }
            None
        }
        Some(Text(hex, _)) => match parse_sha256(&hex) {
            None => {
                p.push(
                    format!("{key}.key_sha256"),
                    "expected 64 hex digits (the SHA-256 of the key, never the key itself)",
                );
                None
            }
            Some(hash) if WEAK_KEY_HASHES.contains(&hex.trim().to_ascii_lowercase().as_str()) => {
                p.push(
                    format!("{key}.key_sha256"),
                    "is the SHA-256 of an empty key (or a lone newline): was the key variable \
                     unset when it was hashed?",
                );
                Some(hash)
            }
            Some(hash) => Some(hash),
        },
    };
    let profile = match (raw.profile, profiles) {
        (Some(Text(profile, _)), _) => {
            if !profiles.contains(&profile.as_str()) {
                p.push(
                    format!("{key}.profile"),
                    format!(
                        "no profile named {:?}; configured: {}",
                        profile,
                        profiles.join(", ")
                    ),
                );
            }
            profile
        }
        (None, [only]) => (*only).to_string(),
        (None, _) => {
            p.push(
                format!("{key}.profile"),
                "required when several profiles are configured: which Tango identity this \
                 caller's requests use",
            );
            String::new()
        }
    };
    let mut allow = Vec::new();
    for (i, rule) in raw.allow.unwrap_or_default().into_iter().enumerate() {
        if let Err(e) = crate::gateway::path::AllowRule::parse(&rule.0) {
            p.push(format!("{key}.allow[{i}]"), e);
        }
        allow.push(rule.0);
    }
    let accounts = identifier_list(raw.accounts, &format!("{key}.accounts"), p);
    let customers = identifier_list(raw.customers, &format!("{key}.customers"), p);
    let rate = match raw.rate {
        None => {
            if raw.burst.is_some() {
                p.push(format!("{key}.burst"), "only used together with rate");
            }
            None
        }
        Some(Text(text, _)) => match parse_rate(&text) {
            Err(e) => {
                p.push(format!("{key}.rate"), e);
                None
            }
            Ok((count, period)) => {
                let per_second = count as f64 / period.as_secs_f64();
                let burst = raw
                    .burst
                    .unwrap_or_else(|| (per_second.ceil() as u64).max(1));
                if !(1..=1_000_000).contains(&burst) {
                    p.push(format!("{key}.burst"), "must be between 1 and 1000000");
                }
                Some(Rate {
                    per_second,
                    burst,
                    written: (count, period),
                })
            }
        },
    };
    let daily_spend_limit = raw
        .daily_spend_limit
        .and_then(|t| match Money::parse(&t.0) {
            Ok(m) => Some(m),
            Err(e) => {
                p.push(format!("{key}.daily_spend_limit"), e);
                None
            }
        });
    let spend_limit_fail_open = raw.spend_limit_fail_open.unwrap_or(false);
    if spend_limit_fail_open && daily_spend_limit.is_none() {
        p.push(
            format!("{key}.spend_limit_fail_open"),
            "only used together with daily_spend_limit",
        );
    }
    (p.0.len() == before).then(|| CallerConfig {
        name: name.to_string(),
        key_sha256,
        cert_sha256,
        cert_san,
        profile,
        allow,
        accounts,
        customers,
        require_external_ref_id: raw.require_external_ref_id.unwrap_or(false),
        rate,
        daily_spend_limit,
        spend_limit_fail_open,
    })
}

/// SHA-256 of "" and of "\n": what `echo -n "$KEY" | sha256sum` gives with `KEY` unset.
const WEAK_KEY_HASHES: [&str; 2] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "01ba4719c80b6fe911b091a7c05124b64eeece964e09c058ef8f9805daca546b",
];

/// 64 hex digits, either case.
pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_parses_in_minor_units_and_refuses_the_rest() {
        let m = Money::parse("500 USD").unwrap();
        assert_eq!(
            (m.minor, m.currency.as_str(), m.decimals),
            (50_000, "USD", 2)
        );
        assert_eq!(m.to_string(), "500.00 USD");
        assert_eq!(Money::parse("12.5 EUR").unwrap().minor, 1250);
        assert_eq!(Money::parse("5000 JPY").unwrap().minor, 5000);
        assert_eq!(Money::parse("1.250 KWD").unwrap().minor, 1250);
        for bad in [
            "500",
            "USD 500",
            "500 usd",
            "500 US",
            "1.234 USD",
            "-5 USD",
            "5. USD",
            ".5 USD",
            "0 USD",
            "1e3 USD",
            "5 JPY extra",
            "12.5 JPY",
            "99999999999999 USD",
        ] {
            assert!(Money::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn rates_and_names() {
        assert_eq!(parse_rate("10/s").unwrap(), (10, Duration::from_secs(1)));
        assert_eq!(parse_rate("600/m").unwrap(), (600, Duration::from_secs(60)));
        for bad in ["10", "0/s", "10/d", "x/s", "1.5/s", "-1/s"] {
            assert!(parse_rate(bad).is_err(), "{bad} accepted");
        }
        assert!(valid_caller_name("store-17_east"));
        for bad in ["", "_unknown", "a.b", "a:b", "a b", "ä", &"x".repeat(65)] {
            assert!(!valid_caller_name(bad), "{bad:?} accepted");
        }
        assert!(parse_sha256(&"aB".repeat(32)).is_some());
        // cert_san: a scheme makes a URI, kept as written; anything else is a DNS name.
        let dns = |s: &str| Some(San::Dns(s.to_string()));
        let uri = |s: &str| Some(San::Uri(s.to_string()));
        assert_eq!(
            San::from_config("Till.Store-17.example"),
            dns("till.store-17.example")
        );
        assert_eq!(
            San::from_config("spiffe://Franchise/S17"),
            uri("spiffe://Franchise/S17")
        );
        assert_eq!(San::from_config("urn:store:17"), uri("urn:store:17"));
        assert_eq!(San::from_config("x+y.z-1:a"), uri("x+y.z-1:a"));
        for bad in [":store", "1x:store", "store 17:x", "st_ore:x"] {
            assert_eq!(San::from_config(bad), None, "{bad:?} accepted");
        }
        assert!(parse_sha256(&"g0".repeat(32)).is_none());
        assert!(parse_sha256("abcd").is_none());
    }
}
