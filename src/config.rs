//! Configuration: raw serde structs read by figment, validated into [`Config`].
//!
//! Sources, later ones winning: built-in defaults, the TOML file (`--config` or
//! `$TANGO_PROXY_CONFIG`), then environment variables `TANGO_PROXY_<SECTION>__<KEY>`.
//! [`Config::load`] reads the file and the environment and hands both to
//! [`Config::from_sources`], the one path every configuration takes (and a fuzzer's entry point).
//! Each section is extracted on its own and every value is checked before anything fails, so
//! `check-config` can list **all** problems at once, each naming its key as the README does and
//! saying in plain words what the key takes (never a Rust type).
//!
//! Decisions not spelled out in DESIGN.md:
//! * durations accept humantime strings (`"30s"`, `"4h"`) or a bare number of seconds; sizes accept
//!   `"10MiB"`, `"512KiB"`, `"1MB"` or a bare number of bytes;
//! * a secret set both inline and as a `*_file` is an error (which one wins would be a guess);
//!   secret files have one trailing newline stripped;
//! * the config file must be a regular file of at most 1 MiB, and every secret, key or CA file at
//!   most 64 KiB: a FIFO, device or directory is refused without being opened;
//! * every duration and size has a range (`duration_between`, `size_between`), and a size must
//!   be a whole number of bytes;
//! * Redis URLs are checked as strictly as `upstream.url` (`check_redis_url`) and shown only
//!   through `redact_url_password`;
//! * `listen.max_header_size` (default 32 KiB), `listen.grace_period` (default 30 s) and
//!   `listen.allow_non_loopback` (default false) extend the `[listen]` section;
//! * methods and cache backends that this version does not implement yet are accepted by the parser
//!   (the key names are the stable interface) and reported as problems by validation.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use http::uri::{Authority, Scheme};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::secret::Secret;

mod callers;
pub use callers::{
    currency_decimals, parse_sha256, valid_caller_name, CallerConfig, Money, Rate, San,
};

/// Prefix of every configuration environment variable.
pub const ENV_PREFIX: &str = "TANGO_PROXY_";
/// Variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "TANGO_PROXY_CONFIG";
/// Environment variables with the prefix that are not configuration keys.
const NON_CONFIG_ENV: &[&str] = &["config", "log_format"];

/// Tango's sandbox API origin.
pub const SANDBOX_URL: &str = "https://integration-api.tangocard.com";
/// Tango's production API origin.
pub const PRODUCTION_URL: &str = "https://api.tangocard.com";

// ---------------------------------------------------------------------------------------------
// Problems

/// One thing wrong with the configuration, tied to the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `profiles.default.api_key_file`.
    pub key: String,
    /// What is wrong, for an operator.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The problems, in key order of discovery.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "configuration has {n} problem{}:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Reports a figment error met while reading the section at `section` (`""` for the top
    /// level, `"listen"`, `"profiles.default"`), each under the key as the README spells it and
    /// in words an operator knows: never a Rust type name.
    fn figment(&mut self, error: figment::Error, section: &str) {
        for e in error {
            let mut key = section.to_string();
            for part in &e.path {
                if part.parse::<usize>().is_ok() {
                    key = format!("{key}[{part}]");
                } else if key.is_empty() {
                    key = part.clone();
                } else {
                    key = format!("{key}.{part}");
                }
            }
            let message = match &e.kind {
                figment::error::Kind::UnknownField(_, expected) => {
                    format!("unknown key; expected one of: {}", expected.join(", "))
                }
                figment::error::Kind::UnknownVariant(found, _) => format!(
                    "expected {}, found {}",
                    expected_for(&key, None),
                    shown_string(found, &key)
                ),
                figment::error::Kind::InvalidType(actual, serde_expected)
                | figment::error::Kind::InvalidValue(actual, serde_expected) => format!(
                    "expected {}, found {}",
                    expected_for(&key, Some(serde_expected)),
                    shown_actual(actual, &key)
                ),
                figment::error::Kind::InvalidLength(..)
                | figment::error::Kind::ISizeOutOfRange(_)
                | figment::error::Kind::USizeOutOfRange(_)
                | figment::error::Kind::Unsupported(_)
                | figment::error::Kind::UnsupportedKey(..)
                | figment::error::Kind::DuplicateField(_)
                | figment::error::Kind::MissingField(_) => {
                    format!("expected {}", expected_for(&key, None))
                }
                // Our own deserializers' messages (already plain).
                figment::error::Kind::Message(m) => m.clone(),
            };
            self.push(key, message);
        }
    }
}

/// What a key holds, in an operator's words, for "expected ..." messages. `serde_expected` (what
/// serde would have said) is only used to pick a plain phrase for keys not listed here.
fn expected_for(key: &str, serde_expected: Option<&str>) -> &'static str {
    if key.ends_with(']') {
        // An element of a list.
        return if key.starts_with("cache.previous_encryption_key_files[") {
            "a file path (a string)"
        } else {
            "a string"
        };
    }
    const DURATION: &str = "a duration such as \"30s\" or \"1h 30m\"";
    const SIZE: &str = "a size such as \"10MiB\" or a whole number of bytes";
    match key {
        "listen" | "upstream" | "cache" => return "a table (a [section])",
        "profiles" => return "a table of [profiles.NAME] sections",
        _ if key.starts_with("profiles.") && key.matches('.').count() == 1 => {
            return "a table (a [profiles.NAME] section)"
        }
        "callers" => return "a table of [callers.NAME] sections",
        _ if key.starts_with("callers.") && key.matches('.').count() == 1 => {
            return "a table (a [callers.NAME] section)"
        }
        _ => {}
    }
    let leaf = key.rsplit('.').next().unwrap_or(key);
    match leaf {
        "proxy" | "admin" => "an IP:port address such as \"127.0.0.1:8080\"",
        "max_body" | "max_header_size" | "replay_max_body" => SIZE,
        "timeout" | "grace_period" | "refresh_window" | "min_token_interval" => DURATION,
        _ if leaf.ends_with("_timeout") || leaf.ends_with("_interval") => DURATION,
        "workers" => "a whole number",
        "allow_non_loopback"
        | "allow_http"
        | "require_external_ref_id"
        | "spend_limit_fail_open" => "true or false",
        "allow" => "a list of \"METHOD /path\" strings",
        "trusted_proxies" => "a list of IP addresses or networks (\"10.0.0.0/8\")",
        "accounts" | "customers" => "a list of identifiers (strings)",
        "rate" => "a rate such as \"10/s\"",
        "burst" => "a whole number",
        "daily_spend_limit" => "an amount and a currency such as \"500 USD\"",
        "key_sha256" | "cert_sha256" => "64 hex digits (a string)",
        "cert_san" => "a DNS name or URI (a string)",
        "tls_client_auth" => "\"optional\" or \"required\"",
        "environment" => "\"sandbox\" or \"production\"",
        "backend" => "\"memory\", \"file\" or \"redis\"",
        "auth" => "\"basic\", \"client_credentials\" or \"service_account\"",
        "url" | "token_url" | "redis_url" => "a URL (a string)",
        "path" => "a directory path (a string)",
        "previous_encryption_key_files" => "a list of file paths",
        _ if leaf.ends_with("_file") => "a file path (a string)",
        _ => match serde_expected.unwrap_or_default() {
            e if e.contains("bool") => "true or false",
            e if [
                "usize", "u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64", "integer",
            ]
            .iter()
            .any(|t| e.contains(t)) =>
            {
                "a whole number"
            }
            e if e.contains("f32") || e.contains("f64") || e.contains("float") => "a number",
            e if e.contains("sequence") => "a list",
            e if e.contains("struct") || e.contains("map") => "a table",
            _ => "a string",
        },
    }
}

/// True for keys whose values may be secrets: their values are never repeated in messages.
fn is_secret_key(key: &str) -> bool {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    matches!(leaf, "api_key" | "client_secret" | "password" | "redis_url")
}

/// A found string as a message shows it: quoted, cut short, never for a secret key.
fn shown_string(s: &str, key: &str) -> String {
    if is_secret_key(key) {
        return "a string".into();
    }
    let mut shown: String = s.chars().take(40).collect();
    if shown.len() < s.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

/// What serde met, in plain words.
fn shown_actual(actual: &figment::error::Actual, key: &str) -> String {
    use figment::error::Actual;
    match actual {
        Actual::Bool(b) => b.to_string(),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Signed(n) => n.to_string(),
        Actual::Float(f) => format!("{f:?}"),
        Actual::Char(c) => shown_string(&c.to_string(), key),
        Actual::Str(s) => shown_string(s, key),
        Actual::Seq => "a list".into(),
        Actual::Map => "a table".into(),
        Actual::Unit | Actual::Option => "nothing".into(),
        _ => "a value of another kind".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw configuration, as written by people

/// A string that also accepts numbers and booleans: environment overrides arrive parsed, so
/// `TANGO_PROXY_PROFILES__DEFAULT__CLIENT_ID=12345` would otherwise be a type error.
pub fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_any(ScalarVisitor).map(|(s, _)| s)
}

/// Which kind of scalar a [`Text`] was written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    Str,
    Int,
    Float,
    Bool,
}

struct ScalarVisitor;

impl serde::de::Visitor<'_> for ScalarVisitor {
    type Value = (String, Scalar);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok((v.to_string(), Scalar::Str))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok((v, Scalar::Str))
    }
    fn visit_char<E: serde::de::Error>(self, v: char) -> Result<Self::Value, E> {
        Ok((v.to_string(), Scalar::Str))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok((v.to_string(), Scalar::Int))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok((v.to_string(), Scalar::Int))
    }
    fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Self::Value, E> {
        Ok((v.to_string(), Scalar::Int))
    }
    fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Self::Value, E> {
        Ok((v.to_string(), Scalar::Int))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        // `{:?}` keeps `1.0` a float (`Display` would print `1`).
        Ok((format!("{v:?}"), Scalar::Float))
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok((v.to_string(), Scalar::Bool))
    }
}

/// A text value read leniently (see [`lenient_string`]), remembering whether it was written as
/// a string, a whole number, a fractional number or a boolean.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Text(pub String, #[serde(skip)] Scalar);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor).map(|(s, k)| Text(s, k))
    }
}

impl Text {
    fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    proxy: Option<Text>,
    admin: Option<Text>,
    max_body: Option<Text>,
    max_header_size: Option<Text>,
    workers: Option<usize>,
    grace_period: Option<Text>,
    allow_non_loopback: Option<bool>,
    body_idle_timeout: Option<Text>,
    header_timeout: Option<Text>,
    max_connections: Option<usize>,
    admin_max_connections: Option<usize>,
    trusted_proxies: Option<Vec<Text>>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_client_ca_file: Option<PathBuf>,
    tls_client_auth: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    environment: Option<Environment>,
    url: Option<Text>,
    ca_file: Option<PathBuf>,
    allow_http: Option<bool>,
    timeout: Option<Text>,
    replay_max_body: Option<Text>,
    body_idle_timeout: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    backend: Option<CacheBackend>,
    path: Option<PathBuf>,
    redis_url: Option<RedisUrl>,
    key_prefix: Option<Text>,
    encryption_key_file: Option<PathBuf>,
    previous_encryption_key_files: Option<Vec<PathBuf>>,
    redis_password_file: Option<PathBuf>,
    redis_ca_file: Option<PathBuf>,
    check_interval: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    auth: Option<AuthMethod>,
    // Basic
    platform_name: Option<Text>,
    api_key: Option<Secret>,
    api_key_file: Option<PathBuf>,
    // OAuth 2.0 (service_account, client_credentials)
    token_url: Option<Text>,
    audience: Option<Text>,
    scope: Option<Text>,
    client_id: Option<Text>,
    client_secret: Option<Secret>,
    client_secret_file: Option<PathBuf>,
    username: Option<Text>,
    password: Option<Secret>,
    password_file: Option<PathBuf>,
    refresh_window: Option<Text>,
    min_token_interval: Option<Text>,
    token_timeout: Option<Text>,
    dpop_key_file: Option<PathBuf>,
}

const TOP_LEVEL_KEYS: &[&str] = &["listen", "upstream", "cache", "profiles", "callers"];

// ---------------------------------------------------------------------------------------------
// Validated configuration

/// Which Tango environment the defaults point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Tango's integration (sandbox) environment.
    #[default]
    Sandbox,
    /// Tango's production environment.
    Production,
}

/// How a profile authenticates to Tango.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// `Authorization: Basic base64(platform_name:api_key)`.
    Basic,
    /// OAuth 2.0 `grant_type=client_credentials`.
    ClientCredentials,
    /// OAuth 2.0 `grant_type=password` with a service account.
    ServiceAccount,
}

impl AuthMethod {
    /// The name used in config files and `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Basic => "basic",
            AuthMethod::ClientCredentials => "client_credentials",
            AuthMethod::ServiceAccount => "service_account",
        }
    }
}

/// Where tokens are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    /// In this process only.
    #[default]
    Memory,
    /// A file on this host.
    File,
    /// Redis, shared by every replica.
    Redis,
}

impl CacheBackend {
    /// The name used in config files and `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheBackend::Memory => "memory",
            CacheBackend::File => "file",
            CacheBackend::Redis => "redis",
        }
    }
}

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// `[listen]`
    pub listen: ListenConfig,
    /// `[upstream]`
    pub upstream: UpstreamConfig,
    /// `[cache]`
    pub cache: CacheConfig,
    /// `[profiles.*]`, by name.
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// `[callers.*]`, by name: any puts the proxy in gateway mode.
    pub callers: BTreeMap<String, CallerConfig>,
    /// The file this was loaded from, if any (reloads read it again).
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// When loading began: a file the configuration names that changed after this is read
    /// again when the reloader starts.
    #[serde(skip)]
    pub loaded_at: Option<std::time::SystemTime>,
}

/// `[listen]`: sockets and inbound limits.
#[derive(Debug, Clone, Serialize)]
pub struct ListenConfig {
    /// Where apps send requests.
    pub proxy: SocketAddr,
    /// Where `/livez`, `/readyz`, `/status` and `/metrics` are served.
    pub admin: SocketAddr,
    /// Largest request body accepted, in bytes.
    #[serde(serialize_with = "ser_size")]
    pub max_body: u64,
    /// Largest request header section accepted, in bytes.
    #[serde(serialize_with = "ser_size")]
    pub max_header_size: u64,
    /// Runtime worker threads; 0 means one per core.
    pub workers: usize,
    /// How long shutdown waits for in-flight requests.
    #[serde(serialize_with = "ser_duration")]
    pub grace_period: Duration,
    /// Allow the proxy listener on a non-loopback address.
    pub allow_non_loopback: bool,
    /// Longest wait for the next piece of an app's request body before it gets 408.
    #[serde(serialize_with = "ser_duration")]
    pub body_idle_timeout: Duration,
    /// Time a client has to send a request head, on either listener.
    #[serde(serialize_with = "ser_duration")]
    pub header_timeout: Duration,
    /// Connections the proxy listener holds open at most.
    pub max_connections: usize,
    /// Connections the admin listener holds open at most.
    pub admin_max_connections: usize,
    /// Peers (load balancers) whose `X-Forwarded-For` names the client, for the gateway's
    /// throttling of failed authentications.
    pub trusted_proxies: Vec<crate::gateway::throttle::Network>,
    /// PEM certificate chain of the proxy listener (HTTPS inbound when set).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub tls_key_file: Option<PathBuf>,
    /// PEM roots client certificates are verified against.
    pub tls_client_ca_file: Option<PathBuf>,
    /// Whether a client certificate is required (only with `tls_client_ca_file`).
    pub tls_client_auth: crate::tls::ClientAuth,
    /// The proxy listener's TLS as built from the files above at load time (a running listener
    /// takes later versions of the files from `tls_reload`).
    #[serde(skip)]
    pub tls: Option<crate::tls::InboundTls>,
}

/// `[upstream]`: where requests go.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamConfig {
    /// The environment the defaults came from.
    pub environment: Environment,
    /// The upstream origin (and optional base path).
    pub url: UpstreamUrl,
    /// Extra PEM roots file.
    pub ca_file: Option<PathBuf>,
    /// Certificates loaded from `ca_file`.
    #[serde(skip)]
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Whether plain http upstreams are allowed.
    pub allow_http: bool,
    /// Time allowed from sending a request until the upstream's response headers arrive.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Request bodies up to this size keep a copy as they stream, so a request Tango did not
    /// process (a 401 on OAuth profiles; a stream its HTTP/2 edge refused, on every profile)
    /// can be sent once more.
    #[serde(serialize_with = "ser_size")]
    pub replay_max_body: u64,
    /// Longest wait for the next piece of a response body from the upstream.
    #[serde(serialize_with = "ser_duration")]
    pub body_idle_timeout: Duration,
}

/// A parsed upstream URL: scheme, authority and a base path without trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and optional port as written.
    pub authority: Authority,
    /// Path prefix put before every forwarded path; empty or starting with `/`, no trailing `/`.
    pub base_path: String,
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

impl Serialize for UpstreamUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl UpstreamUrl {
    /// Parses and checks an upstream URL.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("not a valid URL ({e}): {text:?}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("needs a scheme (https://...): {text:?}"))?;
        if scheme != Scheme::HTTPS && scheme != Scheme::HTTP {
            return Err(format!(
                "scheme must be https (or http for mocks): {text:?}"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("needs a host: {text:?}"))?;
        if authority.as_str().contains('@') {
            return Err(
                "must not contain user information; credentials belong in [profiles]".into(),
            );
        }
        // The URI parser accepts any digits after the host; a port out of range would silently
        // become the scheme's default port when connecting.
        let a = authority.as_str();
        let after_host = a.rfind(']').map_or(a, |i| &a[i + 1..]);
        if let Some((_, port)) = after_host.rsplit_once(':') {
            if !matches!(port.parse::<u16>(), Ok(1..)) {
                return Err(format!("port must be 1 to 65535: {text:?}"));
            }
        }
        if uri.query().is_some() {
            return Err(format!("must not have a query string: {text:?}"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(Self {
            scheme,
            authority,
            base_path,
        })
    }

    /// True for `https`.
    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }
}

/// `[cache]`: where tokens are kept.
#[derive(Debug, Clone, Serialize)]
pub struct CacheConfig {
    /// Which store.
    pub backend: CacheBackend,
    /// File backend location.
    pub path: Option<PathBuf>,
    /// Redis URL (its passwords, if any, are redacted when printed).
    pub redis_url: Option<RedisUrl>,
    /// Prefix of every cache key.
    pub key_prefix: String,
    /// AES-256-GCM key file for tokens at rest.
    pub encryption_key_file: Option<PathBuf>,
    /// Keys that sealed records before the last rotation; still opened, never used to seal.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub previous_encryption_key_files: Vec<PathBuf>,
    /// The current key's id (a truncated hash; safe to show).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_key_id: Option<String>,
    /// Seals and opens records with those keys.
    #[serde(skip)]
    pub sealer: std::sync::Arc<crate::token::Sealer>,
    /// File holding the Redis password (overrides one in the URL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_password_file: Option<PathBuf>,
    /// Extra PEM roots for `rediss://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_ca_file: Option<PathBuf>,
    /// How to reach Redis (URL, password, roots), resolved.
    #[serde(skip)]
    pub redis: crate::token::RedisOptions,
    /// How often each replica compares the shared token with its own (one read per interval):
    /// how soon a replica notices a token another wrote, or a Redis that lost its data.
    #[serde(serialize_with = "ser_duration")]
    pub check_interval: Duration,
}

/// One Tango identity.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileConfig {
    /// The profile's name (the key under `[profiles]`).
    #[serde(skip)]
    pub name: String,
    /// How it authenticates, with its credentials.
    #[serde(flatten)]
    pub auth: AuthConfig,
}

/// A profile's method and credentials.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "auth", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuthConfig {
    /// Basic auth with a platform name and API key.
    Basic {
        /// The platform name (Basic user).
        platform_name: String,
        /// The API key (Basic password).
        api_key: Secret,
        /// Where the key was read from, if a file.
        #[serde(skip_serializing_if = "Option::is_none")]
        api_key_file: Option<PathBuf>,
    },
    /// OAuth 2.0 `grant_type=client_credentials`.
    ClientCredentials(OAuthConfig),
    /// OAuth 2.0 `grant_type=password` with a service account.
    ServiceAccount(OAuthConfig),
}

impl AuthConfig {
    /// The method this configures.
    pub fn method(&self) -> AuthMethod {
        match self {
            AuthConfig::Basic { .. } => AuthMethod::Basic,
            AuthConfig::ClientCredentials(_) => AuthMethod::ClientCredentials,
            AuthConfig::ServiceAccount(_) => AuthMethod::ServiceAccount,
        }
    }
}

/// Tango's documented default audience: 24-hour tokens.
pub const DEFAULT_AUDIENCE: &str = "https://api.tangocard.com/";
/// Tango's sandbox token endpoint.
pub const SANDBOX_TOKEN_URL: &str = "https://sandbox-auth.tangocard.com/oauth/token";
/// Tango's production token endpoint.
pub const PRODUCTION_TOKEN_URL: &str = "https://auth.tangocard.com/oauth/token";

/// An OAuth 2.0 profile's token endpoint, identity and refresh policy.
#[derive(Debug, Clone, Serialize)]
pub struct OAuthConfig {
    /// The token endpoint.
    pub token_url: String,
    /// `audience` form field; picks the token lifetime at Tango.
    pub audience: String,
    /// `scope` form field.
    pub scope: String,
    /// The OAuth client id (not secret; shown in `/status`).
    pub client_id: String,
    /// The OAuth client secret.
    pub client_secret: Secret,
    /// Where the secret was read from, if a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// Service-account user name (`service_account` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Service-account password (`service_account` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Where the password was read from, if a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Renew from `expires_at - min(refresh_window, lifetime / 4)` on.
    #[serde(serialize_with = "ser_duration")]
    pub refresh_window: Duration,
    /// No mint sooner than this after the last one, unless the token is unusable or rejected.
    #[serde(serialize_with = "ser_opt_duration")]
    pub min_token_interval: Option<Duration>,
    /// Time allowed for one token request.
    #[serde(serialize_with = "ser_duration")]
    pub token_timeout: Duration,
    /// The DPoP key, when the profile uses DPoP-bound tokens.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub dpop: Option<DpopConfig>,
}

/// A profile's DPoP key, loaded at start.
#[derive(Debug, Clone, Serialize)]
pub struct DpopConfig {
    /// Where the key was read from.
    #[serde(rename = "dpop_key_file")]
    pub key_file: PathBuf,
    /// The key itself (never printed; its thumbprint is).
    #[serde(skip)]
    pub key: std::sync::Arc<crate::auth::dpop::DpopKey>,
    /// RFC 7638 thumbprint of the public key.
    #[serde(rename = "dpop_thumbprint")]
    pub thumbprint: String,
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.collect_str(&humantime::format_duration(*d)),
        None => s.serialize_str("0s"),
    }
}

fn ser_size<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_size(*n))
}

/// A Redis URL as configured. Its `Debug`, `Display` and serialized forms redact every password
/// it carries (see [`redact_url_password`]); [`RedisUrl::expose`] gives the URL itself.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its passwords. Call only to connect.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url_password(&self.0))
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url_password(&self.0))
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&redact_url_password(&self.0))
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_string(d).map(RedisUrl)
    }
}

/// Query parameters whose values are shown; every other one's value is redacted.
const SHOWN_QUERY_PARAMETERS: &[&str] = &["db", "protocol", "user"];

/// A URL with every password replaced by `<redacted>`: the password of each `user:pass@`
/// (every seed of a cluster or sentinel URL), every query parameter value but `db`, `protocol`
/// and `user` (so `unix:///run/redis.sock?pass=...` is covered), and any `#fragment`. Works on
/// any text, valid URL or not; where it cannot tell what a part is, it redacts it.
pub fn redact_url_password(url: &str) -> String {
    let redacted = crate::secret::REDACTED;
    let scheme_ok = |scheme: &str| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    };
    let Some((scheme, mut rest)) = url.split_once("://").filter(|(s, _)| scheme_ok(s)) else {
        // Not `scheme://...`: nothing here can be told apart from a password.
        return if url.contains(['@', '?', '#', ':']) {
            redacted.to_string()
        } else {
            url.to_string()
        };
    };
    let unix = scheme.ends_with("unix");
    let mut out = format!("{scheme}://");
    if !unix {
        // An '@' after the authority means a password with an unencoded '/', '?' or '#': the
        // user information runs to the last '@'.
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest.rfind('@').filter(|&at| at > authority_end) {
            out.push_str(redacted);
            out.push('@');
            rest = &rest[at + 1..];
        }
    }
    let (before_fragment, fragment) = match rest.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (rest, None),
    };
    let (before_query, query) = match before_fragment.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (before_fragment, None),
    };
    if unix {
        out.push_str(before_query);
    } else {
        let (authority, path) =
            before_query.split_at(before_query.find('/').unwrap_or(before_query.len()));
        out.push_str(&redact_authority(authority));
        out.push_str(path);
    }
    push_query(&mut out, query);
    push_fragment(&mut out, fragment);
    out
}

/// `user:pass@host,user:pass@host2,host3` with each password redacted.
///
/// A password may hold `,` (and `@` percent-encoded), so seeds are not split on `,` first: the
/// text is cut at each `@`. Before the first `@` is the first seed's user information; each later
/// piece is a host list up to its first `,`, then the next seed's user information. Whatever is
/// taken for user information shows only what precedes its first `:` — conservative: a password
/// is never shown, at worst a host is shown as a user name.
fn redact_authority(authority: &str) -> String {
    let redacted = crate::secret::REDACTED;
    let userinfo = |info: &str| match info.split_once(':') {
        Some((user, _)) => format!("{user}:{redacted}"),
        None => redacted.to_string(),
    };
    let pieces: Vec<&str> = authority.split('@').collect();
    let Some((last, userinfos)) = pieces.split_last() else {
        return authority.to_string();
    };
    let mut out = String::with_capacity(authority.len());
    for (i, piece) in userinfos.iter().enumerate() {
        let info = if i == 0 {
            piece
        } else {
            // The hosts of the previous seed, then this seed's user information.
            match piece.split_once(',') {
                Some((host, info)) => {
                    out.push_str(host);
                    out.push(',');
                    info
                }
                None => piece,
            }
        };
        out.push_str(&userinfo(info));
        out.push('@');
    }
    out.push_str(last);
    out
}

fn push_query(out: &mut String, query: Option<&str>) {
    let Some(query) = query else { return };
    let redacted = crate::secret::REDACTED;
    out.push('?');
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if SHOWN_QUERY_PARAMETERS.contains(&name) => {
                format!("{name}={value}")
            }
            Some((name, _)) if is_plain_name(name) => format!("{name}={redacted}"),
            _ if pair.is_empty() => String::new(),
            _ => redacted.to_string(),
        })
        .collect();
    out.push_str(&pairs.join("&"));
}

fn push_fragment(out: &mut String, fragment: Option<&str>) {
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(if f == "insecure" {
            f
        } else {
            crate::secret::REDACTED
        });
    }
}

/// A short name of letters, digits, '_' and '-': safe to repeat in a message.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The URL forms `cache.redis_url` takes, for messages.
const REDIS_URL_FORMS: &str = "redis://, rediss://, unix://, redis+cluster://, \
rediss+cluster://, redis+sentinel:// or rediss+sentinel://";

/// Checks `host[:port]` of a Redis URL: a host, and a port (when given) from 1 to 65535 written
/// as digits. Messages never repeat the text (it may be a piece of a password).
pub fn check_host_port(hostport: &str) -> Result<(), String> {
    let after_host = match hostport.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some(("", _)) | None => return Err("has a malformed [IPv6] host".into()),
            Some((_, after)) => after,
        },
        None => {
            let host = hostport.split(':').next().unwrap_or_default();
            if host.is_empty() {
                return Err("needs a host".into());
            }
            &hostport[host.len()..]
        }
    };
    match after_host.strip_prefix(':') {
        None if after_host.is_empty() => Ok(()),
        None => Err("has something after the host that is not a :port".into()),
        Some(port) => {
            let ok = !port.is_empty()
                && port.len() <= 5
                && port.chars().all(|c| c.is_ascii_digit())
                && matches!(port.parse::<u32>(), Ok(1..=65535));
            if ok {
                Ok(())
            } else {
                Err("port must be 1 to 65535".into())
            }
        }
    }
}

/// Checks a Redis URL's form without connecting (the Redis client then checks it too). Every
/// part the client would drop or read differently from what is written is an error, so what
/// `check-config` shows is what is used. Messages never repeat the URL.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("needs a scheme: {REDIS_URL_FORMS}"));
    };
    let tcp = matches!(scheme, "redis" | "rediss" | "valkey" | "valkeys");
    let unix = matches!(scheme, "unix" | "redis+unix" | "valkey+unix");
    let multi = matches!(
        scheme,
        "redis+cluster" | "rediss+cluster" | "redis+sentinel" | "rediss+sentinel"
    );
    if !(tcp || unix || multi) {
        return Err(format!("unsupported scheme; use {REDIS_URL_FORMS}"));
    }
    if url.contains('#') {
        return Err(
            "must not have a #fragment (#insecure, which turns off TLS certificate \
                    checks, is not supported: trust a private CA with cache.redis_ca_file)"
                .into(),
        );
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let encode = "has an '@' after the host: percent-encode '@', '/', '?' and '#' in a user \
                  name or password (%40, %2F, %3F, %23)";
    if !unix {
        let authority_end = before_query.find('/').unwrap_or(before_query.len());
        if before_query[authority_end..].contains('@') || query.is_some_and(|q| q.contains('@')) {
            return Err(encode.into());
        }
    }
    if multi {
        // The seeds, their credentials and the path are checked where they are read.
        return crate::token::check_redis_options(&crate::token::RedisOptions {
            url: url.to_string(),
            ..Default::default()
        });
    }
    let allowed: &[&str] = if unix {
        &["db", "user", "pass", "protocol"]
    } else {
        &["protocol"]
    };
    if let Some(query) = query {
        let mut seen = Vec::new();
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name.is_empty() {
                return Err("has an empty query parameter".into());
            }
            if !allowed.contains(&name) {
                return Err(if is_plain_name(name) {
                    format!(
                        "unknown query parameter {name:?}; a {scheme}:// URL takes {}",
                        allowed.join(", ")
                    )
                } else {
                    format!(
                        "has an unknown query parameter; a {scheme}:// URL takes {}",
                        allowed.join(", ")
                    )
                });
            }
            if seen.contains(&name) {
                return Err(format!("query parameter {name:?} is given twice"));
            }
            seen.push(name);
            let ok = match name {
                "protocol" => matches!(value, "2" | "3" | "resp2" | "resp3"),
                "db" => is_database_number(value),
                _ => !value.is_empty(),
            };
            if !ok {
                return Err(match name {
                    "protocol" => "protocol must be 2, 3, resp2 or resp3".to_string(),
                    "db" => "db must be a database number such as 0".to_string(),
                    _ => format!("query parameter {name:?} is empty"),
                });
            }
        }
    }
    if unix {
        let path = before_query
            .strip_prefix("localhost")
            .unwrap_or(before_query);
        if !path.starts_with('/') || path.len() < 2 {
            return Err("needs the socket's absolute path: unix:///run/redis/redis.sock".into());
        }
    } else {
        let (authority, path) =
            before_query.split_at(before_query.find('/').unwrap_or(before_query.len()));
        let hostport = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                match userinfo.split_once(':') {
                    Some(("", "")) => {
                        return Err("has an empty user:password@".into());
                    }
                    Some((_, "")) => return Err("has an empty password after user:".into()),
                    None if userinfo.is_empty() => return Err("has an empty user@".into()),
                    _ => {}
                }
                hostport
            }
            None => authority,
        };
        if hostport.contains(',') {
            return Err(
                "has several hosts: use redis+cluster:// or redis+sentinel:// for those".into(),
            );
        }
        check_host_port(hostport)?;
        let db = path.trim_start_matches('/');
        let db = db.strip_suffix('/').unwrap_or(db);
        if !(db.is_empty() || is_database_number(db)) || path.starts_with("//") {
            return Err("the path must be a database number such as /0".into());
        }
    }
    // What the Redis client itself parses (the `url` crate): anything else it refuses.
    reqwest::Url::parse(url).map_err(|e| format!("not a valid URL ({e})"))?;
    Ok(())
}

fn is_database_number(text: &str) -> bool {
    !text.is_empty() && text.len() <= 9 && text.chars().all(|c| c.is_ascii_digit())
}

// ---------------------------------------------------------------------------------------------
// Values

/// Parses a duration: humantime (`"30s"`, `"1h 30m"`) or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    // Every configured time ends up added to a clock reading; nothing sensible is longer.
    const MAX: Duration = Duration::from_secs(400 * 86_400);
    match read_duration(text)? {
        Some(d) if d <= MAX => Ok(d),
        _ => Err(format!(
            "{} is longer than 400 days",
            shown_string(text, "")
        )),
    }
}

/// A duration, or `None` for one too long to represent.
fn read_duration(text: &str) -> Result<Option<Duration>, String> {
    let t = text.trim();
    let shown = || shown_string(text, "");
    if t.starts_with('-') {
        return Err(format!("must not be negative: {}", shown()));
    }
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        return Ok(t.parse::<u64>().ok().map(Duration::from_secs));
    }
    match humantime::parse_duration(t) {
        Ok(d) => Ok(Some(d)),
        Err(humantime::DurationError::NumberOverflow) => Ok(None),
        Err(_) => Err(format!(
            "not a duration: {}; write it like \"30s\", \"500ms\" or \"1h 30m\"",
            shown()
        )),
    }
}

/// A parser for durations from `min` to `max`, saying so when out of range.
fn duration_between(min: Duration, max: Duration) -> impl Fn(&str) -> Result<Duration, String> {
    move |text| {
        match read_duration(text)? {
            Some(d) if d >= min && d <= max => return Ok(d),
            _ => {}
        }
        let max_text = humantime::format_duration(max);
        let shown = shown_string(text, "");
        Err(if min.is_zero() {
            format!("must be at most {max_text}, not {shown}")
        } else if min == POSITIVE {
            format!("must be greater than zero and at most {max_text}, not {shown}")
        } else {
            format!(
                "must be between {} and {max_text}, not {shown}",
                humantime::format_duration(min)
            )
        })
    }
}

/// Parses a size: `"10MiB"`, `"512 KiB"`, `"1MB"`, `"1.5MiB"`, `"64k"` or a bare whole number of
/// bytes. Exact: a size that is not a whole number of bytes is an error, not rounded.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let shown = || shown_string(text, "");
    let bad = || {
        format!(
            "not a size: {}; write it like \"10MiB\" or \"4096\"",
            shown()
        )
    };
    if t.starts_with('-') {
        return Err(format!("must not be negative: {}", shown()));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u128 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.is_empty() || frac.contains('.') || (num.contains('.') && frac.is_empty()) {
        return Err(bad());
    }
    let too_big = || format!("{} is too large", shown());
    // At most 18 fraction digits keeps 10^digits in range; more would be no size anyone means.
    if whole.len() > 30 || frac.len() > 18 {
        return Err(too_big());
    }
    let whole: u128 = whole.parse().map_err(|_| bad())?;
    let scale = 10u128.pow(frac.len() as u32);
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    let frac_bytes = frac_value.checked_mul(mult).ok_or_else(too_big)?;
    if frac_bytes % scale != 0 {
        return Err(format!("{} is not a whole number of bytes", shown()));
    }
    let bytes = whole
        .checked_mul(mult)
        .and_then(|b| b.checked_add(frac_bytes / scale))
        .ok_or_else(too_big)?;
    u64::try_from(bytes).map_err(|_| too_big())
}

/// A parser for sizes from `min` to `max` bytes, saying so when out of range.
fn size_between(min: u64, max: u64) -> impl Fn(&str) -> Result<u64, String> {
    move |text| {
        let n = parse_size(text)?;
        if n < min || n > max {
            return Err(format!(
                "must be between {} and {}, not {}",
                format_size(min),
                format_size(max),
                shown_string(text, "")
            ));
        }
        Ok(n)
    }
}

/// Formats a byte count the way config files write it.
pub fn format_size(n: u64) -> String {
    for (unit, m) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= m && n.is_multiple_of(m) {
            return format!("{}{unit}", n / m);
        }
    }
    n.to_string()
}

fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let bytes = read_small_file(path, MAX_SECRET_FILE, "secret file")?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        let mut bytes = e.into_bytes();
        bytes.fill(0);
        format!("secret file {} is not UTF-8 text", path.display())
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    let secret = Secret::new(text);
    if secret.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(secret)
}

/// Loads the PEM certificates of an extra-roots file (at most [`MAX_SECRET_FILE`] bytes).
pub fn load_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_small_file(path, MAX_SECRET_FILE, "CA file")?;
    pem_certificates(path, &bytes)
}

/// The PEM certificates in `bytes`, read from `path` (named in messages).
pub(crate) fn pem_certificates(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no CERTIFICATE blocks", path.display()));
    }
    Ok(certs)
}

/// Reads a DPoP key file (at most [`MAX_SECRET_FILE`] bytes).
fn load_dpop_key(path: &Path) -> Result<crate::auth::dpop::DpopKey, String> {
    use crate::auth::dpop::{DpopError, DpopKey};
    let mut bytes = read_small_file(path, MAX_SECRET_FILE, "DPoP key file")?;
    let key = DpopKey::from_pem(&bytes).map_err(|e| match e {
        DpopError::Unreadable(m) | DpopError::Unsupported(m) => {
            format!("{}: {m}", path.display())
        }
        other => other.to_string(),
    });
    zeroize::Zeroize::zeroize(&mut bytes);
    key
}

// ---------------------------------------------------------------------------------------------
// Loading

impl Config {
    /// Loads from an optional file (else `$TANGO_PROXY_CONFIG`) plus `TANGO_PROXY_*` variables.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(from_env);
        let loaded_at = std::time::SystemTime::now();
        let text = match &path {
            None => String::new(),
            Some(p) => read_config_file(p).map_err(|message| ConfigError {
                problems: vec![Problem {
                    key: String::new(),
                    message,
                }],
            })?,
        };
        let env: Vec<(String, String)> = std::env::vars_os()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        let mut config = Self::load_sources(&text, path.as_deref(), &env)?;
        config.source = path;
        config.loaded_at = Some(loaded_at);
        Ok(config)
    }

    /// Loads from TOML text alone (tests, the demo): [`Config::from_sources`] without variables.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_sources(text, &[])
    }

    /// Loads from TOML text and environment variables given as `(name, value)` pairs, exactly as
    /// [`Config::load`] does with the file's text and the process environment (which it calls
    /// this to do): pairs whose name does not start with `TANGO_PROXY_` are ignored, the rest
    /// override the file by the same `TANGO_PROXY_<SECTION>__<KEY>` mapping. Deterministic
    /// (the pairs are applied in name order, whatever their order here) and never panics, so a
    /// fuzzer can call it with anything. Secret, CA and DPoP key files named in the
    /// configuration are still read from disk.
    pub fn from_sources(toml_text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        Self::load_sources(toml_text, None, env)
    }

    fn load_sources(
        text: &str,
        file: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        // A file that does not parse is reported alone: nothing after it would be true.
        let dict = toml_dict(text).map_err(|message| {
            let message = match file {
                Some(f) => format!("{} is not valid TOML: {message}", f.display()),
                None => format!("not valid TOML: {message}"),
            };
            ConfigError {
                problems: vec![Problem {
                    key: String::new(),
                    message,
                }],
            }
        })?;
        let mut figment = Figment::from(Layer(dict));
        let overrides = env_overrides(env);
        for (_, dict) in &overrides {
            figment = figment.merge(Layer(dict.clone()));
        }
        let mut result = Self::from_figment(&figment);
        if let Err(e) = &mut result {
            // Name the variable a problem's value came from.
            for problem in &mut e.problems {
                let from = overrides
                    .iter()
                    .filter(|(o, _)| {
                        problem.key == o.key || problem.key.starts_with(&format!("{}.", o.key))
                    })
                    .max_by_key(|(o, _)| o.key.len());
                if let Some((o, _)) = from {
                    problem.message = format!("{} (from {})", problem.message, o.var);
                }
            }
        }
        result
    }

    /// Validates whatever the figment holds.
    fn from_figment(figment: &Figment) -> Result<Config, ConfigError> {
        let mut problems = Problems::default();

        match figment.extract::<BTreeMap<String, figment::value::Value>>() {
            Ok(top) => {
                for key in top.keys() {
                    if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
                        problems.push(
                            key.clone(),
                            format!(
                                "unknown section; expected one of: {}",
                                TOP_LEVEL_KEYS.join(", ")
                            ),
                        );
                    }
                }
            }
            Err(e) => problems.figment(e, ""),
        }

        let listen = section::<RawListen>(figment, "listen", &mut problems);
        let upstream = section::<RawUpstream>(figment, "upstream", &mut problems);
        let cache = section::<RawCache>(figment, "cache", &mut problems);
        let mut raw_profiles = BTreeMap::new();
        if let Ok(dict) = figment.extract_inner::<figment::value::Dict>("profiles") {
            for name in dict.keys() {
                if !valid_profile_name(name) {
                    problems.push(
                        format!("profiles.{}", shown_string(name, "")),
                        "profile names use letters, digits, '-' and '_' only",
                    );
                    continue;
                }
                let key = format!("profiles.{name}");
                if let Some(raw) = section::<RawProfile>(figment, &key, &mut problems) {
                    raw_profiles.insert(name.clone(), raw);
                }
            }
        } else if figment.contains("profiles") {
            problems.push(
                "profiles",
                format!("expected {}", expected_for("profiles", None)),
            );
        }
        let mut raw_callers = BTreeMap::new();
        let mut raw_callers_seen = 0;
        if let Ok(dict) = figment.extract_inner::<figment::value::Dict>("callers") {
            raw_callers_seen = dict.len();
            for name in dict.keys() {
                if !valid_caller_name(name) {
                    problems.push(
                        format!("callers.{}", shown_string(name, "")),
                        "caller names use letters, digits, '-' and '_' only (at most 64, not \
                         starting with '_')",
                    );
                    continue;
                }
                let key = format!("callers.{name}");
                if let Some(raw) = section::<callers::RawCaller>(figment, &key, &mut problems) {
                    raw_callers.insert(name.clone(), raw);
                }
            }
        } else if figment.contains("callers") {
            problems.push(
                "callers",
                format!("expected {}", expected_for("callers", None)),
            );
        }

        let listen = listen.map(|raw| validate_listen(raw, &mut problems));
        let upstream = upstream.map(|raw| validate_upstream(raw, &mut problems));
        let cache = cache.map(|raw| validate_cache(raw, &mut problems));
        let env = upstream.as_ref().map(|u| (u.environment, u.allow_http));
        let (environment, allow_http) = env.unwrap_or_default();
        let mut profiles = BTreeMap::new();
        for (name, raw) in raw_profiles {
            if let Some(p) = validate_profile(&name, raw, environment, allow_http, &mut problems) {
                profiles.insert(name, p);
            }
        }
        if profiles.is_empty() && !problems.0.iter().any(|p| p.key.starts_with("profiles")) {
            problems.push(
                "profiles",
                "no profile configured; add a [profiles.default] section",
            );
        }
        let profile_names: Vec<&str> = profiles.keys().map(String::as_str).collect();
        let mut callers = BTreeMap::new();
        for (name, raw) in raw_callers {
            if let Some(c) = callers::validate_caller(&name, raw, &profile_names, &mut problems) {
                callers.insert(name, c);
            }
        }
        let gateway = !callers.is_empty();
        if figment.contains("callers") && raw_callers_seen == 0 {
            // An empty table would look like gateway mode and be a sidecar: every request
            // unauthenticated, perhaps on a public address.
            problems.push(
                "callers",
                "an empty [callers] table: configure at least one [callers.NAME] section, or \
                 remove the table",
            );
        }
        if profiles.len() > 1 && !gateway {
            problems.push(
                "profiles",
                format!(
                    "{} profiles configured ({}); a sidecar serves exactly one — several \
                     profiles need [callers.NAME] sections (gateway mode) to choose between them",
                    profiles.len(),
                    profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        let mut by_hash: BTreeMap<[u8; 32], &str> = BTreeMap::new();
        for c in callers.values() {
            if let Some(other) = c.key_sha256.and_then(|h| by_hash.insert(h, &c.name)) {
                problems.push(
                    format!("callers.{}.key_sha256", c.name),
                    format!(
                        "the same as callers.{other}.key_sha256: each caller needs its own key"
                    ),
                );
            }
        }
        check_cert_identities(&callers, listen.as_ref(), &mut problems);
        if let Some(listen) = &listen {
            let proxy = listen.proxy;
            if !proxy.ip().is_loopback() && !listen.allow_non_loopback && !gateway {
                problems.push(
                    "listen.proxy",
                    format!(
                        "{proxy} is not a loopback address: anything that can reach it could use \
                         the Tango credentials. Configure [callers.NAME] sections (gateway mode: \
                         every request must authenticate) or set listen.allow_non_loopback = true \
                         if the network around it is trusted"
                    ),
                );
            }
        }

        match (listen, upstream, cache) {
            (Some(listen), Some(upstream), Some(cache)) if problems.0.is_empty() => Ok(Config {
                listen,
                upstream,
                cache,
                profiles,
                callers,
                source: None,
                loaded_at: None,
            }),
            _ => Err(ConfigError {
                problems: problems.0,
            }),
        }
    }

    /// The profile a sidecar serves.
    pub fn default_profile(&self) -> Option<&ProfileConfig> {
        self.profiles.values().next()
    }

    /// Gateway mode: callers are configured, and every request must authenticate as one.
    pub fn is_gateway(&self) -> bool {
        !self.callers.is_empty()
    }

    /// Things that work but deserve an operator's attention (printed by `check-config`, logged
    /// by `serve`).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.cache_warnings(&mut out);
        self.gateway_warnings(&mut out);
        for p in self.profiles.values() {
            if let AuthConfig::ClientCredentials(o) | AuthConfig::ServiceAccount(o) = &p.auth {
                if let Some(d) = &o.dpop {
                    if crate::auth::dpop::is_too_open(&d.key_file) {
                        out.push(format!(
                            "profiles.{}.dpop_key_file: {} is readable by group or others; chmod 600 it",
                            p.name,
                            d.key_file.display()
                        ));
                    }
                }
            }
        }
        out
    }

    /// Warnings about gateway mode: profiles no caller uses, spend limits one replica keeps.
    fn gateway_warnings(&self, out: &mut Vec<String>) {
        if !self.is_gateway() {
            return;
        }
        for name in self.profiles.keys() {
            if !self.callers.values().any(|c| &c.profile == name) {
                out.push(format!("profiles.{name}: no caller uses this profile"));
            }
        }
        let limited = self.callers.values().any(|c| c.daily_spend_limit.is_some());
        if limited && self.cache.backend != CacheBackend::Redis {
            out.push(format!(
                "callers.*.daily_spend_limit: with cache.backend = \"{}\" each replica counts \
                 spend on its own; use the redis backend so the limit holds fleet-wide",
                self.cache.backend.as_str()
            ));
        }
    }

    /// Warnings about the cache (encryption off for a persistent backend).
    fn cache_warnings(&self, out: &mut Vec<String>) {
        if self.cache.backend != CacheBackend::Memory && !self.cache.sealer.encrypts() {
            out.push(format!(
                "cache.encryption_key_file is not set: tokens in the {} cache are stored unencrypted",
                self.cache.backend.as_str()
            ));
        }
    }

    /// The effective configuration as TOML, every secret shown as `"<redacted>"`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Certificate identities of callers: each names one caller, and they need client certificates
/// to be asked for (`listen.tls_client_ca_file`).
fn check_cert_identities(
    callers: &BTreeMap<String, CallerConfig>,
    listen: Option<&ListenConfig>,
    problems: &mut Problems,
) {
    let mut by_cert: BTreeMap<[u8; 32], &str> = BTreeMap::new();
    let mut by_san: BTreeMap<&San, &str> = BTreeMap::new();
    let verifies = listen.is_none_or(|l| l.tls_client_ca_file.is_some());
    for c in callers.values() {
        if let Some(other) = c.cert_sha256.and_then(|h| by_cert.insert(h, &c.name)) {
            problems.push(
                format!("callers.{}.cert_sha256", c.name),
                format!("the same as callers.{other}.cert_sha256: a certificate names one caller"),
            );
        }
        if let Some(other) = c.cert_san.as_ref().and_then(|s| by_san.insert(s, &c.name)) {
            problems.push(
                format!("callers.{}.cert_san", c.name),
                format!("the same as callers.{other}.cert_san: a certificate names one caller"),
            );
        }
        if !verifies {
            for (set, what) in [
                (c.cert_sha256.is_some(), "cert_sha256"),
                (c.cert_san.is_some(), "cert_san"),
            ] {
                if set {
                    problems.push(
                        format!("callers.{}.{what}", c.name),
                        "needs listen.tls_client_ca_file (and listen.tls_cert_file / \
                         tls_key_file): client certificates are asked for and verified only then",
                    );
                }
            }
        }
    }
}

/// One source of configuration values, already parsed.
struct Layer(figment::value::Dict);

impl figment::Provider for Layer {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("configuration")
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.0.clone()))
    }
}

/// The largest config file read.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;
/// The largest secret, key or CA file read.
pub const MAX_SECRET_FILE: u64 = 64 << 10;

/// Reads a whole regular file of at most `max` bytes: a directory, FIFO, device or socket is
/// refused by name (never opened, so a FIFO cannot block and `/dev/zero` is not read), and so is
/// a larger file. `what` names the file in messages ("config file").
pub fn read_small_file(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    check_small_file(path, max, what)?;
    let shown = path.display();
    let file =
        open_without_blocking(path).map_err(|e| format!("cannot read {what} {shown}: {e}"))?;
    // The path may have been replaced since it was looked at: check what was opened.
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {what} {shown}: {e}"))?;
    if let Some(kind) = file_kind(&meta) {
        return Err(format!("{what} {shown} is {kind}, not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {what} {shown}: {e}"))?;
    if bytes.len() as u64 > max {
        bytes.fill(0);
        return Err(format!(
            "{what} {shown} is larger than {} (the limit)",
            format_size(max)
        ));
    }
    Ok(bytes)
}

/// Opens `path` for reading. On Linux (x86-64, AArch64) with `O_NONBLOCK`, so a FIFO swapped in
/// after the check cannot block the open (the flag changes nothing for a regular file's reads).
fn open_without_blocking(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    {
        use std::os::unix::fs::OpenOptionsExt;
        /// `O_NONBLOCK` on Linux x86-64 and AArch64 (other architectures number it differently).
        const O_NONBLOCK: i32 = 0o4000;
        options.custom_flags(O_NONBLOCK);
    }
    options.open(path)
}

/// Checks, without opening it, that `path` is a regular file of at most `max` bytes.
fn check_small_file(path: &Path, max: u64, what: &str) -> Result<(), String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{what} {shown} does not exist"),
        _ => format!("cannot read {what} {shown}: {e}"),
    })?;
    if let Some(kind) = file_kind(&meta) {
        return Err(format!("{what} {shown} is {kind}, not a regular file"));
    }
    if meta.len() > max {
        return Err(format!(
            "{what} {shown} is larger than {} (the limit)",
            format_size(max)
        ));
    }
    Ok(())
}

/// What a non-regular file is, in words; `None` for a regular file.
fn file_kind(meta: &std::fs::Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        return None;
    }
    if t.is_dir() {
        return Some("a directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some("a named pipe (FIFO)");
        }
        if t.is_char_device() || t.is_block_device() {
            return Some("a device");
        }
        if t.is_socket() {
            return Some("a socket");
        }
    }
    Some("not a regular file")
}

/// Reads the config file: a regular file of at most [`MAX_CONFIG_FILE`] bytes of UTF-8.
pub fn read_config_file(path: &Path) -> Result<String, String> {
    let bytes = read_small_file(path, MAX_CONFIG_FILE, "config file")?;
    String::from_utf8(bytes)
        .map_err(|_| format!("config file {} is not UTF-8 text", path.display()))
}

/// Parses TOML text into figment values; the error names the line and column, never the text
/// (a line may hold a secret).
fn toml_dict(text: &str) -> Result<figment::value::Dict, String> {
    toml::from_str::<figment::value::Dict>(text).map_err(|e| {
        let message = e.message().trim().replace('\n', "; ");
        match e.span() {
            Some(span) => {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!("line {line}, column {column}: {message}")
            }
            None => message,
        }
    })
}

/// One `TANGO_PROXY_*` variable that sets a key.
struct Override {
    /// The variable's name, as given.
    var: String,
    /// The dotted key it sets (`listen.workers`).
    key: String,
}

/// The deepest `[`/`{` nesting parsed in a variable's value; a deeper one is taken as text (the
/// value parser recurses).
const MAX_ENV_NESTING: usize = 16;

/// The configuration variables among `env`, in name order, each as the table it sets. The
/// mapping is figment's `Env::prefixed("TANGO_PROXY_").split("__")`: the prefix is matched
/// without regard to case, the rest is lowercased and `__` (or `.`) separates keys; names with
/// an empty key part are ignored, as are `TANGO_PROXY_CONFIG` and `TANGO_PROXY_LOG_FORMAT`.
/// Values are read as figment reads them (numbers, booleans, `[lists]`, `{tables}`), except
/// that a number whose text would change by being read as one (`007`, `1e3`) stays text.
fn env_overrides(env: &[(String, String)]) -> Vec<(Override, figment::value::Dict)> {
    let mut out: Vec<(Override, figment::value::Dict)> = Vec::new();
    for (var, raw) in env {
        let name = var.trim();
        let Some(rest) = name
            .get(..ENV_PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
            .and_then(|_| name.get(ENV_PREFIX.len()..))
        else {
            continue;
        };
        let key = rest.replace("__", ".").trim().to_ascii_lowercase();
        if key.split('.').any(str::is_empty) || NON_CONFIG_ENV.contains(&key.as_str()) {
            continue;
        }
        let (key, value) = if key.split('.').count() > MAX_ENV_NESTING {
            // No key is this deep: keep the (recursive) nesting from going deeper; what is
            // left is still reported as an unknown key.
            let key: Vec<&str> = key.split('.').take(MAX_ENV_NESTING).collect();
            (key.join("."), figment::value::Value::from(String::new()))
        } else {
            let value = env_value(raw);
            (key, value)
        };
        let Some(dict) = figment::util::nest(&key, value).into_dict() else {
            continue;
        };
        out.push((
            Override {
                var: name.to_string(),
                key,
            },
            dict,
        ));
    }
    out.sort_by(|(a, _), (b, _)| a.var.cmp(&b.var));
    out
}

fn env_value(raw: &str) -> figment::value::Value {
    use figment::value::{Num, Value};
    let mut depth = 0usize;
    let mut deepest = 0usize;
    for c in raw.chars() {
        match c {
            '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > MAX_ENV_NESTING {
        return Value::from(raw.to_string());
    }
    let value: Value = match raw.parse() {
        Ok(v) => v,
        Err(never) => match never {},
    };
    if let Value::Num(_, n) = &value {
        let canonical = match *n {
            Num::F32(f) => format!("{f:?}"),
            Num::F64(f) => format!("{f:?}"),
            n => n
                .to_i128()
                .map(|i| i.to_string())
                .or_else(|| n.to_u128().map(|u| u.to_string()))
                .unwrap_or_default(),
        };
        if canonical != raw.trim() {
            return Value::from(raw.to_string());
        }
    }
    value
}

fn valid_profile_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Extracts one section; a missing section is its defaults.
fn section<T: DeserializeOwned + Default>(
    figment: &Figment,
    key: &str,
    problems: &mut Problems,
) -> Option<T> {
    let Ok(mut value) = figment.find_value(key) else {
        return Some(T::default());
    };
    // serde stops at a section's first bad key: drop each one reported and read again, so
    // every bad key of the section is reported at once.
    let mut failed = false;
    loop {
        match value.deserialize::<T>() {
            Ok(v) => return (!failed).then_some(v),
            Err(e) => {
                failed = true;
                let paths: Vec<Vec<String>> = e.clone().into_iter().map(|e| e.path).collect();
                problems.figment(e, key);
                let mut removed = false;
                for path in &paths {
                    removed |= remove_path(&mut value, path);
                }
                if !removed {
                    return None;
                }
            }
        }
    }
}

/// Removes the value at `path` (dictionary keys and list indices); false when there is none.
fn remove_path(value: &mut figment::value::Value, path: &[String]) -> bool {
    use figment::value::Value;
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = value;
    for part in parents {
        at = match at {
            Value::Dict(_, d) => match d.get_mut(part) {
                Some(v) => v,
                None => return false,
            },
            Value::Array(_, a) => match part.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match at {
        Value::Dict(_, d) => d.remove(last).is_some(),
        Value::Array(_, a) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

fn value<T>(
    raw: Option<Text>,
    default: &str,
    key: &str,
    parse: impl Fn(&str) -> Result<T, String>,
    problems: &mut Problems,
    fallback: T,
) -> T {
    if let Some(Text(found, Scalar::Float | Scalar::Bool)) = &raw {
        problems.push(
            key,
            format!("expected {}, found {found}", expected_for(key, None)),
        );
        return fallback;
    }
    let text = raw.map(|t| t.0).unwrap_or_else(|| default.to_string());
    match parse(&text) {
        Ok(v) => v,
        Err(e) => {
            problems.push(key, e);
            fallback
        }
    }
}

/// Upper bound of the body sizes: bodies are counted (and replayed ones held) in memory.
const MAX_BODY: u64 = 1 << 30;
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const WEEK: Duration = Duration::from_secs(7 * 86_400);
/// As a lower bound: "greater than zero".
const POSITIVE: Duration = Duration::from_nanos(1);

/// A count within `1..=max`; the default when unset.
fn bounded_count(
    raw: Option<usize>,
    default: usize,
    key: &str,
    max: usize,
    p: &mut Problems,
) -> usize {
    let n = raw.unwrap_or(default);
    if !(1..=max).contains(&n) {
        p.push(key, format!("must be between 1 and {max}"));
        return default;
    }
    n
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!(
            "not an IP:port address: {}; try \"127.0.0.1:8080\"",
            shown_string(text, "")
        )
    })
}

fn validate_listen(raw: RawListen, p: &mut Problems) -> ListenConfig {
    let unspecified = SocketAddr::from(([127, 0, 0, 1], 0));
    let proxy = value(
        raw.proxy,
        "127.0.0.1:8080",
        "listen.proxy",
        parse_addr,
        p,
        unspecified,
    );
    let admin = value(
        raw.admin,
        "127.0.0.1:9090",
        "listen.admin",
        parse_addr,
        p,
        unspecified,
    );
    let max_body = value(
        raw.max_body,
        "10MiB",
        "listen.max_body",
        size_between(1, MAX_BODY),
        p,
        0,
    );
    let max_header_size = value(
        raw.max_header_size,
        "32KiB",
        "listen.max_header_size",
        size_between(1 << 10, 1 << 20),
        p,
        32 << 10,
    );
    let grace_period = value(
        raw.grace_period,
        "30s",
        "listen.grace_period",
        duration_between(Duration::ZERO, HOUR),
        p,
        Duration::ZERO,
    );
    let body_idle_timeout = value(
        raw.body_idle_timeout,
        "30s",
        "listen.body_idle_timeout",
        duration_between(POSITIVE, HOUR),
        p,
        Duration::ZERO,
    );
    let header_timeout = value(
        raw.header_timeout,
        "30s",
        "listen.header_timeout",
        duration_between(Duration::from_millis(100), 10 * MINUTE),
        p,
        Duration::from_secs(30),
    );
    let max_connections = bounded_count(
        raw.max_connections,
        512,
        "listen.max_connections",
        1_000_000,
        p,
    );
    let admin_max_connections = bounded_count(
        raw.admin_max_connections,
        32,
        "listen.admin_max_connections",
        10_000,
        p,
    );
    let allow_non_loopback = raw.allow_non_loopback.unwrap_or(false);
    let mut trusted_proxies = Vec::new();
    for (i, t) in raw.trusted_proxies.unwrap_or_default().iter().enumerate() {
        match crate::gateway::throttle::Network::parse(t.as_str()) {
            Ok(n) => trusted_proxies.push(n),
            Err(e) => p.push(format!("listen.trusted_proxies[{i}]"), e),
        }
    }
    if proxy == admin && proxy.port() != 0 {
        p.push("listen.admin", "must differ from listen.proxy");
    }
    let workers = raw.workers.unwrap_or(0);
    if workers > 1024 {
        p.push(
            "listen.workers",
            format!("must be between 0 (one per core) and 1024, not {workers}"),
        );
    }
    let tls_client_auth = match raw.tls_client_auth.as_ref().map(Text::as_str) {
        None | Some("optional") => crate::tls::ClientAuth::Optional,
        Some("required") => crate::tls::ClientAuth::Required,
        Some(other) => {
            p.push(
                "listen.tls_client_auth",
                format!("expected \"optional\" or \"required\", found {other:?}"),
            );
            crate::tls::ClientAuth::Optional
        }
    };
    let files = (
        raw.tls_cert_file.as_deref(),
        raw.tls_key_file.as_deref(),
        raw.tls_client_ca_file.as_deref(),
    );
    let tls = inbound_tls(files, tls_client_auth, p);
    ListenConfig {
        proxy,
        admin,
        max_body,
        max_header_size,
        workers,
        grace_period,
        allow_non_loopback,
        body_idle_timeout,
        header_timeout,
        max_connections,
        admin_max_connections,
        trusted_proxies,
        tls_cert_file: raw.tls_cert_file,
        tls_key_file: raw.tls_key_file,
        tls_client_ca_file: raw.tls_client_ca_file,
        tls_client_auth,
        tls,
    }
}

/// The proxy listener's TLS configuration from `listen.tls_*`: both the certificate and the key
/// or neither; client roots and `tls_client_auth = "required"` only with them.
fn inbound_tls(
    (cert_file, key_file, ca_file): (Option<&Path>, Option<&Path>, Option<&Path>),
    client_auth: crate::tls::ClientAuth,
    p: &mut Problems,
) -> Option<crate::tls::InboundTls> {
    let (cert_file, key_file) = match (cert_file, key_file) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => {
            if ca_file.is_some() {
                p.push(
                    "listen.tls_client_ca_file",
                    "only used together with listen.tls_cert_file and listen.tls_key_file",
                );
            }
            if client_auth == crate::tls::ClientAuth::Required {
                p.push(
                    "listen.tls_client_auth",
                    "\"required\" needs listen.tls_client_ca_file (and the listener's certificate)",
                );
            }
            return None;
        }
        (Some(_), None) => {
            p.push(
                "listen.tls_key_file",
                "required with listen.tls_cert_file: the certificate's private key (PEM)",
            );
            return None;
        }
        (None, Some(_)) => {
            p.push(
                "listen.tls_cert_file",
                "required with listen.tls_key_file: the listener's certificate chain (PEM)",
            );
            return None;
        }
    };
    let unverifiable = ca_file.is_none() && client_auth == crate::tls::ClientAuth::Required;
    if unverifiable {
        p.push(
            "listen.tls_client_auth",
            "\"required\" needs listen.tls_client_ca_file: the roots client certificates are \
             verified against",
        );
    }
    let files = crate::tls::InboundFiles {
        cert: cert_file.to_path_buf(),
        key: key_file.to_path_buf(),
        client_ca: ca_file.map(Path::to_path_buf),
        client_auth,
    };
    match crate::tls::InboundTls::load(&files) {
        Ok(tls) => (!unverifiable).then_some(tls),
        Err(problems) => {
            p.0.extend(problems);
            None
        }
    }
}

/// The private key in `bytes`, read from `path` (named in messages): PEM PKCS#8, RSA or SEC1.
/// Messages never quote the file.
pub(crate) fn pem_private_key(
    path: &Path,
    bytes: &[u8],
) -> Result<rustls::pki_types::PrivateKeyDer<'static>, String> {
    // The parser's own message is left out: it may quote a line of the file.
    rustls::pki_types::PrivateKeyDer::from_pem_slice(bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "{} holds no private key (PEM PKCS#8, RSA or SEC1 expected)",
            path.display()
        ),
        _ => format!("{} is not a valid PEM private key file", path.display()),
    })
}

fn validate_upstream(raw: RawUpstream, p: &mut Problems) -> UpstreamConfig {
    let environment = raw.environment.unwrap_or_default();
    let default_url = match environment {
        Environment::Sandbox => SANDBOX_URL,
        Environment::Production => PRODUCTION_URL,
    };
    let fallback = UpstreamUrl {
        scheme: Scheme::HTTPS,
        authority: Authority::from_static("invalid"),
        base_path: String::new(),
    };
    let url = value(
        raw.url,
        default_url,
        "upstream.url",
        UpstreamUrl::parse,
        p,
        fallback,
    );
    let allow_http = raw.allow_http.unwrap_or(false);
    if !url.is_https() && !allow_http {
        p.push(
            "upstream.url",
            format!(
                "{url} is plain http; Tango requires https. Set upstream.allow_http = true only \
                 for a mock on a trusted network"
            ),
        );
    }
    let extra_roots = match &raw.ca_file {
        None => Vec::new(),
        Some(path) => load_pem_certificates(path).unwrap_or_else(|e| {
            p.push("upstream.ca_file", e);
            Vec::new()
        }),
    };
    let timeout = value(
        raw.timeout,
        "30s",
        "upstream.timeout",
        duration_between(POSITIVE, HOUR),
        p,
        Duration::ZERO,
    );
    let replay_max_body = value(
        raw.replay_max_body,
        "64KiB",
        "upstream.replay_max_body",
        size_between(0, MAX_BODY),
        p,
        64 << 10,
    );
    let body_idle_timeout = value(
        raw.body_idle_timeout,
        "30s",
        "upstream.body_idle_timeout",
        duration_between(Duration::from_millis(100), HOUR),
        p,
        Duration::from_secs(30),
    );
    UpstreamConfig {
        environment,
        url,
        ca_file: raw.ca_file,
        extra_roots,
        allow_http,
        timeout,
        replay_max_body,
        body_idle_timeout,
    }
}

fn validate_cache(raw: RawCache, p: &mut Problems) -> CacheConfig {
    let backend = raw.backend.unwrap_or_default();
    match backend {
        CacheBackend::Memory => {}
        CacheBackend::File => {
            if raw.path.is_none() {
                p.push(
                    "cache.path",
                    "required for backend = \"file\" (a directory)",
                );
            }
        }
        CacheBackend::Redis => {
            if raw.redis_url.as_ref().is_none_or(|u| u.expose().is_empty()) {
                p.push("cache.redis_url", "required for backend = \"redis\"");
            }
        }
    }
    let password = raw.redis_password_file.as_ref().and_then(|f| {
        read_secret_file(f)
            .map_err(|e| p.push("cache.redis_password_file", e))
            .ok()
    });
    let ca_pem = raw.redis_ca_file.as_ref().and_then(|f| {
        read_small_file(f, MAX_SECRET_FILE, "CA file")
            .and_then(|bytes| pem_certificates(f, &bytes).map(|_| bytes))
            .map_err(|e| p.push("cache.redis_ca_file", e))
            .ok()
    });
    let redis = crate::token::RedisOptions {
        url: raw
            .redis_url
            .as_ref()
            .map(|u| u.expose().to_string())
            .unwrap_or_default(),
        password,
        ca_pem,
    };
    if !redis.url.is_empty() {
        // A URL that is not checked here could show a password where it is printed.
        match check_redis_url(&redis.url) {
            Err(e) => p.push("cache.redis_url", e),
            Ok(()) if backend == CacheBackend::Redis => {
                if let Err(e) = crate::token::check_redis_options(&redis) {
                    p.push(
                        "cache.redis_url",
                        format!("{e} ({})", redact_url_password(&redis.url)),
                    );
                }
            }
            Ok(()) => {}
        }
    }
    let key_prefix = raw
        .key_prefix
        .map(|t| t.0)
        .unwrap_or_else(|| "tango-auth-proxy".to_string());
    if key_prefix.is_empty()
        || !key_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        p.push(
            "cache.key_prefix",
            "must be non-empty: letters, digits, '-', '_', '.', ':'",
        );
    }
    let previous = raw.previous_encryption_key_files.unwrap_or_default();
    let sealer = match &raw.encryption_key_file {
        None => {
            if !previous.is_empty() {
                p.push(
                    "cache.previous_encryption_key_files",
                    "needs cache.encryption_key_file (the key that seals new records)",
                );
            }
            crate::token::Sealer::plaintext()
        }
        Some(current) => {
            // The sealer reads the files itself; refuse what it must not open or read whole.
            let mut unreadable = false;
            for (key, f) in std::iter::once(("cache.encryption_key_file", current)).chain(
                previous
                    .iter()
                    .map(|f| ("cache.previous_encryption_key_files", f)),
            ) {
                if let Err(e) = check_small_file(f, MAX_SECRET_FILE, "key file") {
                    p.push(key, e);
                    unreadable = true;
                }
            }
            if unreadable {
                crate::token::Sealer::plaintext()
            } else {
                match crate::token::Sealer::from_files(current, &previous) {
                    Ok(s) => s,
                    Err(e) => {
                        p.push("cache.encryption_key_file", e.to_string());
                        crate::token::Sealer::plaintext()
                    }
                }
            }
        }
    };
    let check_interval = value(
        raw.check_interval,
        "5s",
        "cache.check_interval",
        duration_between(Duration::from_millis(100), HOUR),
        p,
        Duration::from_secs(5),
    );
    CacheConfig {
        check_interval,
        backend,
        path: raw.path,
        redis_url: raw.redis_url.filter(|u| !u.expose().is_empty()),
        key_prefix,
        encryption_key_file: raw.encryption_key_file,
        previous_encryption_key_files: previous,
        encryption_key_id: sealer.key_id().map(str::to_string),
        sealer: std::sync::Arc::new(sealer),
        redis_password_file: raw.redis_password_file,
        redis_ca_file: raw.redis_ca_file,
        redis,
    }
}

/// Resolves a secret given inline or as a file; reports under the right key.
fn secret(
    profile_key: &str,
    name: &str,
    inline: Option<Secret>,
    file: Option<&PathBuf>,
    p: &mut Problems,
) -> Option<Secret> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            p.push(
                format!("{profile_key}.{name}"),
                format!("set either {name} or {name}_file, not both"),
            );
            None
        }
        (Some(s), None) if s.is_empty() => {
            p.push(format!("{profile_key}.{name}"), "is empty");
            None
        }
        (Some(s), None) => Some(s),
        (None, Some(path)) => match read_secret_file(path) {
            Ok(s) => Some(s),
            Err(e) => {
                p.push(format!("{profile_key}.{name}_file"), e);
                None
            }
        },
        (None, None) => {
            p.push(
                format!("{profile_key}.{name}_file"),
                format!("required (or {name} inline)"),
            );
            None
        }
    }
}

fn validate_profile(
    name: &str,
    raw: RawProfile,
    environment: Environment,
    allow_http: bool,
    p: &mut Problems,
) -> Option<ProfileConfig> {
    let key = format!("profiles.{name}");
    let Some(method) = raw.auth else {
        p.push(
            format!("{key}.auth"),
            "required: basic, client_credentials or service_account",
        );
        return None;
    };
    match method {
        AuthMethod::Basic => {
            let oauth_keys = [
                ("token_url", raw.token_url.is_some()),
                ("audience", raw.audience.is_some()),
                ("scope", raw.scope.is_some()),
                ("client_id", raw.client_id.is_some()),
                ("client_secret", raw.client_secret.is_some()),
                ("client_secret_file", raw.client_secret_file.is_some()),
                ("username", raw.username.is_some()),
                ("password", raw.password.is_some()),
                ("password_file", raw.password_file.is_some()),
                ("refresh_window", raw.refresh_window.is_some()),
                ("min_token_interval", raw.min_token_interval.is_some()),
                ("token_timeout", raw.token_timeout.is_some()),
                ("dpop_key_file", raw.dpop_key_file.is_some()),
            ];
            for (k, set) in oauth_keys {
                if set {
                    p.push(
                        format!("{key}.{k}"),
                        "not used with auth = \"basic\"; remove it",
                    );
                }
            }
            let platform_name = match raw.platform_name.as_ref().map(Text::as_str) {
                None | Some("") => {
                    p.push(
                        format!("{key}.platform_name"),
                        "required for auth = \"basic\"",
                    );
                    None
                }
                Some(n) if n.contains(':') => {
                    p.push(
                        format!("{key}.platform_name"),
                        "must not contain ':' (it is the Basic user name)",
                    );
                    None
                }
                Some(n) => Some(n.to_string()),
            };
            let api_key = secret(&key, "api_key", raw.api_key, raw.api_key_file.as_ref(), p);
            Some(ProfileConfig {
                name: name.to_string(),
                auth: AuthConfig::Basic {
                    platform_name: platform_name?,
                    api_key: api_key?,
                    api_key_file: raw.api_key_file,
                },
            })
        }
        AuthMethod::ClientCredentials | AuthMethod::ServiceAccount => {
            let oauth = validate_oauth(&key, method, raw, environment, allow_http, p)?;
            Some(ProfileConfig {
                name: name.to_string(),
                auth: if method == AuthMethod::ServiceAccount {
                    AuthConfig::ServiceAccount(oauth)
                } else {
                    AuthConfig::ClientCredentials(oauth)
                },
            })
        }
    }
}

fn validate_oauth(
    key: &str,
    method: AuthMethod,
    raw: RawProfile,
    environment: Environment,
    allow_http: bool,
    p: &mut Problems,
) -> Option<OAuthConfig> {
    let auth = method.as_str();
    let mut unused = vec![
        ("platform_name", raw.platform_name.is_some()),
        ("api_key", raw.api_key.is_some()),
        ("api_key_file", raw.api_key_file.is_some()),
    ];
    if method == AuthMethod::ClientCredentials {
        unused.push(("username", raw.username.is_some()));
        unused.push(("password", raw.password.is_some()));
        unused.push(("password_file", raw.password_file.is_some()));
    }
    for (k, set) in unused {
        if set {
            p.push(
                format!("{key}.{k}"),
                format!("not used with auth = \"{auth}\"; remove it"),
            );
        }
    }
    let dpop = match &raw.dpop_key_file {
        None => None,
        Some(path) => match load_dpop_key(path) {
            Ok(k) => Some(DpopConfig {
                key_file: path.clone(),
                thumbprint: k.thumbprint().to_string(),
                key: std::sync::Arc::new(k),
            }),
            Err(e) => {
                p.push(format!("{key}.dpop_key_file"), e);
                None
            }
        },
    };
    let default_token_url = match environment {
        Environment::Sandbox => SANDBOX_TOKEN_URL,
        Environment::Production => PRODUCTION_TOKEN_URL,
    };
    let token_url = raw
        .token_url
        .map(|t| t.0)
        .unwrap_or_else(|| default_token_url.to_string());
    match UpstreamUrl::parse(&token_url) {
        Ok(u) if !u.is_https() && !allow_http => p.push(
            format!("{key}.token_url"),
            format!("{token_url} is plain http; set upstream.allow_http = true only for a mock"),
        ),
        Ok(_) => {}
        Err(e) => p.push(format!("{key}.token_url"), e),
    }
    let non_empty = |v: Option<Text>, default: &str, name: &str, p: &mut Problems| {
        let v = v.map(|t| t.0).unwrap_or_else(|| default.to_string());
        if v.is_empty() {
            p.push(format!("{key}.{name}"), "must not be empty");
        }
        v
    };
    let audience = non_empty(raw.audience, DEFAULT_AUDIENCE, "audience", p);
    let scope = non_empty(raw.scope, "raas.all", "scope", p);
    let client_id = raw.client_id.map(|t| t.0).filter(|c| !c.is_empty());
    if client_id.is_none() {
        p.push(
            format!("{key}.client_id"),
            format!("required for auth = \"{auth}\""),
        );
    }
    let client_secret = secret(
        key,
        "client_secret",
        raw.client_secret,
        raw.client_secret_file.as_ref(),
        p,
    );
    let (username, password) = if method == AuthMethod::ServiceAccount {
        let username = raw.username.map(|t| t.0).filter(|u| !u.is_empty());
        if username.is_none() {
            p.push(
                format!("{key}.username"),
                "required for auth = \"service_account\"",
            );
        }
        let password = secret(key, "password", raw.password, raw.password_file.as_ref(), p);
        (username, password)
    } else {
        (None, None)
    };
    let refresh_window = value(
        raw.refresh_window,
        "4h",
        &format!("{key}.refresh_window"),
        duration_between(POSITIVE, WEEK),
        p,
        Duration::from_secs(4 * 3600),
    );
    // Tango allows one client-credentials token per 20 h; the extra 15 minutes keep a replica
    // whose clock runs a little ahead from asking early and being refused.
    let default_interval = if method == AuthMethod::ClientCredentials {
        "20h 15m"
    } else {
        "0s"
    };
    let min_token_interval = value(
        raw.min_token_interval,
        default_interval,
        &format!("{key}.min_token_interval"),
        // The fleet's mint ledger lives 7 days: a longer interval could not be enforced.
        duration_between(Duration::ZERO, WEEK),
        p,
        Duration::ZERO,
    );
    let token_timeout = value(
        raw.token_timeout,
        "10s",
        &format!("{key}.token_timeout"),
        duration_between(POSITIVE, Duration::from_secs(300)),
        p,
        Duration::from_secs(10),
    );
    let password_ok =
        method != AuthMethod::ServiceAccount || (username.is_some() && password.is_some());
    if !password_ok {
        return None;
    }
    Some(OAuthConfig {
        token_url,
        audience,
        scope,
        client_id: client_id?,
        client_secret: client_secret?,
        client_secret_file: raw.client_secret_file,
        username,
        password,
        password_file: raw.password_file,
        refresh_window,
        min_token_interval: (!min_token_interval.is_zero()).then_some(min_token_interval),
        token_timeout,
        dpop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert_eq!(format_size(10 << 20), "10MiB");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn url_ports_must_be_real_ports() {
        for bad in [
            "http://127.0.0.1:99999",
            "https://api.example:0",
            "https://api.example:",
            "https://api.example:65536/raas",
        ] {
            let e = UpstreamUrl::parse(bad).err();
            assert!(
                e.as_deref().is_some_and(|e| e.contains("port")),
                "{bad}: {e:?}"
            );
        }
        assert!(UpstreamUrl::parse("https://api.example:8443").is_ok());
        assert!(UpstreamUrl::parse("http://127.0.0.1:65535").is_ok());
        assert!(UpstreamUrl::parse("http://[::1]:8080").is_ok());
        assert!(UpstreamUrl::parse("http://[::1]").is_ok());
        assert!(UpstreamUrl::parse("http://[::1]:0").is_err());
    }

    #[test]
    fn upstream_urls() {
        let u = UpstreamUrl::parse("https://api.example.com/base/").unwrap();
        assert_eq!(u.base_path, "/base");
        assert_eq!(u.to_string(), "https://api.example.com/base");
        assert!(UpstreamUrl::parse("ftp://x").is_err());
        assert!(UpstreamUrl::parse("https://user:pw@x").is_err());
        assert!(UpstreamUrl::parse("/relative").is_err());
    }

    #[test]
    fn redis_url_passwords_are_redacted() {
        for (url, shown) in [
            (
                "redis://app:s3cret@redis:6379/0",
                "redis://app:<redacted>@redis:6379/0",
            ),
            ("rediss://s3cret@redis/0", "rediss://<redacted>@redis/0"),
            ("redis://redis/0", "redis://redis/0"),
            ("redis://h:1/0?protocol=3", "redis://h:1/0?protocol=3"),
            (
                "unix:///tmp/r.sock?pass=s3cret",
                "unix:///tmp/r.sock?pass=<redacted>",
            ),
            (
                "unix:///tmp/r.sock?db=2&user=app&pass=s3cret",
                "unix:///tmp/r.sock?db=2&user=app&pass=<redacted>",
            ),
            (
                "unix:///tmp/r.sock?pass=s3@cret#x",
                "unix:///tmp/r.sock?pass=<redacted>#<redacted>",
            ),
            ("unix:///tmp/r.sock?s3cret", "unix:///tmp/r.sock?<redacted>"),
            (
                "redis://h?password=s3cret&token=s3cret",
                "redis://h?password=<redacted>&token=<redacted>",
            ),
            (
                "redis+cluster://u:s3cret1@h1:7000,u:s3cret2@h2:7001,h3:7002",
                "redis+cluster://u:<redacted>@h1:7000,u:<redacted>@h2:7001,h3:7002",
            ),
            // A password holding ',' is one password, not a seed boundary.
            (
                "redis://u:pa,s3cret@host:6379/0",
                "redis://u:<redacted>@host:6379/0",
            ),
            // Ambiguous (is "h2:7001" a seed or part of a password?): redacted, never shown.
            (
                "redis+cluster://u:p,s3cret@h1:7000,h2:7001,u:q,s3cret@h3:7002",
                "redis+cluster://u:<redacted>@h1:7000,h2:<redacted>@h3:7002",
            ),
            (
                "redis+sentinel://:s3cret@s1:1,s2:2/m/0",
                "redis+sentinel://:<redacted>@s1:1,s2:2/m/0",
            ),
            // Passwords that break the URL are still not shown.
            ("redis://u:s3/cret@h:1/0", "redis://<redacted>@h:1/0"),
            ("redis://u:s3?cret@h:1", "redis://<redacted>@h:1"),
            ("redis://u:s3#cret@h:1", "redis://<redacted>@h:1"),
            ("redis://u:s3cret@h:1/0#x@y", "redis://<redacted>@y"),
            ("u:s3cret@h", "<redacted>"),
            ("u:s3cret@redis://h", "<redacted>"),
        ] {
            assert_eq!(redact_url_password(url), shown, "{url}");
        }
    }

    #[test]
    fn no_config_type_shows_a_redis_password() {
        for url in [
            "redis://app:s3cret@127.0.0.1:6379/0",
            "unix:///tmp/r.sock?pass=s3cret",
            "redis+cluster://u:s3cret@h1:7000,u:s3cret@h2:7001,h3:7002",
        ] {
            let c = Config::from_toml(&format!(
                "[cache]\nbackend = \"redis\"\nredis_url = \"{url}\"\n{BASIC}"
            ))
            .unwrap();
            for shown in [
                format!("{c:?}"),
                format!("{:?}", c.cache),
                c.to_redacted_toml(),
                serde_json::to_string(&c).unwrap_or_default(),
            ] {
                assert!(!shown.contains("s3cret"), "{shown}");
            }
            assert_eq!(c.cache.redis_url.as_ref().map(RedisUrl::expose), Some(url));
            assert!(c.to_redacted_toml().contains("<redacted>"));
        }
        let c = Config::from_toml(&format!(
            "[cache]\nbackend = \"redis\"\nredis_url = \"redis+cluster://u:s3cret@h1:7000,u:s3cret@h2:7001,h3:7002\"\n{BASIC}"
        ))
        .unwrap();
        assert!(c.to_redacted_toml().contains(
            "redis_url = \"redis+cluster://u:<redacted>@h1:7000,u:<redacted>@h2:7001,h3:7002\""
        ));
        // A bad URL's message does not repeat it.
        let found = problems(&format!(
            "[cache]\nbackend = \"redis\"\nredis_url = \"redis://app:s3cret@h:99999\"\n{BASIC}"
        ));
        assert_eq!(found, ["cache.redis_url: port must be 1 to 65535"]);
    }

    #[test]
    fn defaults_follow_design() {
        let c = Config::from_toml(
            "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n",
        )
        .unwrap();
        assert_eq!(c.listen.proxy, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.listen.admin, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.listen.max_body, 10 << 20);
        assert_eq!(c.listen.workers, 0);
        assert_eq!(c.listen.body_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.upstream.url.to_string(), SANDBOX_URL);
        assert_eq!(c.upstream.timeout, Duration::from_secs(30));
        assert!(!c.upstream.allow_http);
        assert_eq!(c.cache.backend, CacheBackend::Memory);
        assert_eq!(c.cache.key_prefix, "tango-auth-proxy");
    }

    fn problems(toml: &str) -> Vec<String> {
        match Config::from_toml(toml) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn oauth_profiles_get_tango_defaults() {
        let c = Config::from_toml(
            "[upstream]\nenvironment = \"production\"\n[profiles.default]\nauth = \"client_credentials\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
        )
        .unwrap();
        let AuthConfig::ClientCredentials(o) = &c.profiles["default"].auth else {
            panic!("wrong method")
        };
        assert_eq!(o.token_url, PRODUCTION_TOKEN_URL);
        assert_eq!(o.audience, DEFAULT_AUDIENCE);
        assert_eq!(o.scope, "raas.all");
        assert_eq!(o.refresh_window, Duration::from_secs(4 * 3600));
        assert_eq!(
            o.min_token_interval,
            Some(Duration::from_secs(20 * 3600 + 15 * 60))
        );
        assert_eq!(o.token_timeout, Duration::from_secs(10));
        let c = Config::from_toml(
            "[profiles.default]\nauth = \"service_account\"\nclient_id = \"c\"\nclient_secret = \"s\"\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        let AuthConfig::ServiceAccount(o) = &c.profiles["default"].auth else {
            panic!("wrong method")
        };
        assert_eq!(o.token_url, SANDBOX_TOKEN_URL);
        assert_eq!(o.min_token_interval, None);
        assert!(!c.to_redacted_toml().contains("\"s\""));
    }

    #[test]
    fn oauth_profiles_report_every_missing_or_misplaced_key() {
        let found = problems(
            "[profiles.default]\nauth = \"service_account\"\napi_key = \"k\"\ntoken_url = \"http://idp.example/token\"\n",
        );
        for expected in [
            "profiles.default.api_key: not used",
            "profiles.default.token_url: http://idp.example/token is plain http",
            "profiles.default.client_id: required",
            "profiles.default.client_secret_file: required",
            "profiles.default.username: required",
            "profiles.default.password_file: required",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "{expected}: {found:?}"
            );
        }
        let found = problems(
            "[profiles.default]\nauth = \"client_credentials\"\nclient_id = \"c\"\nclient_secret = \"s\"\nusername = \"u\"\n",
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("profiles.default.username: not used"));
    }

    #[test]
    fn body_idle_timeout_must_be_positive() {
        let basic =
            "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n";
        let found = problems(&format!("[listen]\nbody_idle_timeout = \"0s\"\n{basic}"));
        assert_eq!(
            found,
            ["listen.body_idle_timeout: must be greater than zero and at most 1h, not \"0s\""],
            "{found:?}"
        );
        let found = problems(&format!("[listen]\nbody_idle_timeout = \"soon\"\n{basic}"));
        assert!(
            found.len() == 1 && found[0].starts_with("listen.body_idle_timeout: not a duration"),
            "{found:?}"
        );
        let c = Config::from_toml(&format!("[listen]\nbody_idle_timeout = \"250ms\"\n{basic}"))
            .unwrap();
        assert_eq!(c.listen.body_idle_timeout, Duration::from_millis(250));
    }

    #[test]
    fn listener_limits_have_defaults_and_ranges() {
        let basic =
            "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n";
        let c = Config::from_toml(basic).unwrap();
        assert_eq!(c.listen.header_timeout, Duration::from_secs(30));
        assert_eq!(c.listen.max_connections, 512);
        assert_eq!(c.listen.admin_max_connections, 32);
        assert_eq!(c.upstream.body_idle_timeout, Duration::from_secs(30));
        let found = problems(&format!(
            "[listen]\nheader_timeout = \"0s\"\nmax_connections = 0\nadmin_max_connections = 20000\n\
             [upstream]\nbody_idle_timeout = \"2h\"\n{basic}"
        ));
        assert_eq!(
            found,
            [
                "listen.header_timeout: must be between 100ms and 10m, not \"0s\"",
                "listen.max_connections: must be between 1 and 1000000",
                "listen.admin_max_connections: must be between 1 and 10000",
                "upstream.body_idle_timeout: must be between 100ms and 1h, not \"2h\"",
            ]
        );
    }

    #[test]
    fn hostile_input_never_panics() {
        let deep_headers = format!("[{}]\nx = 1\n", vec!["a"; 50_000].join("."));
        let deep_dotted = format!("{} = 1\n", vec!["a"; 50_000].join("."));
        let deep_inline = format!("a = {}1{}\n", "[".repeat(50_000), "]".repeat(50_000));
        let deep_tables = format!("a = {}\n", "{b = ".repeat(50_000));
        for toml in [
            deep_headers.as_str(),
            &deep_dotted,
            &deep_inline,
            &deep_tables,
        ] {
            let _ = Config::from_toml(toml);
        }
    }

    const BASIC: &str =
        "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn problems_with_env(toml: &str, pairs: &[(&str, &str)]) -> Vec<String> {
        match Config::from_sources(toml, &env(pairs)) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(ToString::to_string).collect(),
        }
    }

    /// No message may show how the program is written.
    fn assert_plain(found: &[String]) {
        for p in found {
            for word in [
                "usize",
                "u64",
                "i64",
                "struct",
                "enum ",
                "Raw",
                "PathBuf",
                "Option",
                "invalid type",
                "sequence",
                "map",
                "untagged",
                "Scalar",
            ] {
                assert!(!p.contains(word), "{word:?} in {p:?}");
            }
        }
    }

    #[test]
    fn type_errors_name_the_key_as_written_in_plain_words() {
        let cases: &[(&str, &str)] = &[
            ("[listen]\nworkers = \"x\"", "listen.workers: expected a whole number, found \"x\""),
            ("[listen]\nworkers = -1", "listen.workers: expected a whole number, found -1"),
            ("[listen]\nallow_non_loopback = \"yes\"", "listen.allow_non_loopback: expected true or false, found \"yes\""),
            ("[listen]\nmax_body = 1.5", "listen.max_body: expected a size such as \"10MiB\" or a whole number of bytes, found 1.5"),
            ("[listen]\ngrace_period = true", "listen.grace_period: expected a duration such as \"30s\" or \"1h 30m\", found true"),
            ("[listen]\nproxy = [1]", "listen.proxy: expected an IP:port address such as \"127.0.0.1:8080\", found a list"),
            ("[upstream]\ntimeout = 2.5", "upstream.timeout: expected a duration such as \"30s\" or \"1h 30m\", found 2.5"),
            ("[upstream]\nenvironment = \"prod\"", "upstream.environment: expected \"sandbox\" or \"production\", found \"prod\""),
            ("[upstream]\nallow_http = 1", "upstream.allow_http: expected true or false, found 1"),
            ("[upstream]\nca_file = 3", "upstream.ca_file: expected a file path (a string), found 3"),
            ("[cache]\nbackend = \"disk\"", "cache.backend: expected \"memory\", \"file\" or \"redis\", found \"disk\""),
            ("[cache]\nprevious_encryption_key_files = \"k\"", "cache.previous_encryption_key_files: expected a list of file paths, found \"k\""),
            ("[cache]\nprevious_encryption_key_files = [\"k\", 2]", "cache.previous_encryption_key_files[1]: expected a file path (a string), found 2"),
            ("[cache]\ncheck_interval = {}", "cache.check_interval: expected a duration such as \"30s\" or \"1h 30m\", found a table"),
            ("[cache]\nredis_url = [\"redis://u:pw@h\"]", "cache.redis_url: expected a URL (a string), found a list"),
            ("listen = 3", "listen: expected a table (a [section]), found 3"),
        ];
        for (toml, expected) in cases {
            let found = problems(&format!("{toml}\n{BASIC}"));
            assert_eq!(found, [*expected], "{toml}");
            assert_plain(&found);
        }
        let profile_cases: &[(&str, &str)] = &[
            ("auth = \"oauth\"", "profiles.default.auth: expected \"basic\", \"client_credentials\" or \"service_account\", found \"oauth\""),
            ("auth = \"client_credentials\"\nclient_id = \"c\"\nclient_secret = \"s\"\nrefresh_window = 1.5", "profiles.default.refresh_window: expected a duration such as \"30s\" or \"1h 30m\", found 1.5"),
            ("auth = \"basic\"\nplatform_name = \"p\"\napi_key = [\"s3cret\"]", "profiles.default.api_key: expected a string, found a list"),
            ("auth = \"basic\"\nplatform_name = \"p\"\napi_key_file = {}", "profiles.default.api_key_file: expected a file path (a string), found a table"),
        ];
        for (body, expected) in profile_cases {
            let found = problems(&format!("[profiles.default]\n{body}\n"));
            assert_eq!(found, [*expected], "{body}");
            assert_plain(&found);
        }
        let found = problems("[profiles]\ndefault = 5\n");
        assert_eq!(
            found,
            ["profiles.default: expected a table (a [profiles.NAME] section), found 5"]
        );
        // Every bad key of a section at once, not only serde's first.
        let found = problems(&format!(
            "[listen]\nworkers = \"x\"\nproxyy = 1\nallow_non_loopback = 2\n{BASIC}"
        ));
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("listen.proxyy: unknown key; expected one of: proxy,")),
            "{found:?}"
        );
        assert_plain(&found);
    }

    #[test]
    fn environment_type_errors_name_the_variable() {
        let found = problems_with_env(BASIC, &[("TANGO_PROXY_LISTEN__WORKERS", "abc")]);
        assert_eq!(
            found,
            ["listen.workers: expected a whole number, found \"abc\" (from TANGO_PROXY_LISTEN__WORKERS)"]
        );
        let found = problems_with_env("", &[("TANGO_PROXY_PROFILES__DEFAULT__AUTH", "5")]);
        assert_eq!(
            found,
            ["profiles.default.auth: expected \"basic\", \"client_credentials\" or \"service_account\", found 5 (from TANGO_PROXY_PROFILES__DEFAULT__AUTH)"]
        );
        let found = problems_with_env(BASIC, &[("TANGO_PROXY_LISTEN__MAX_BODY", "1.5")]);
        assert_eq!(
            found,
            ["listen.max_body: expected a size such as \"10MiB\" or a whole number of bytes, found 1.5 (from TANGO_PROXY_LISTEN__MAX_BODY)"]
        );
        let found = problems_with_env(BASIC, &[("TANGO_PROXY_UPSTREAM__TIMEOUT", "soon")]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("upstream.timeout: not a duration")
                && found[0].ends_with("(from TANGO_PROXY_UPSTREAM__TIMEOUT)"),
            "{found:?}"
        );
    }

    #[test]
    fn environment_values_keep_their_text() {
        let c = Config::from_sources(
            "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\n",
            &env(&[
                ("TANGO_PROXY_PROFILES__DEFAULT__API_KEY", "000123"),
                ("TANGO_PROXY_PROFILES__DEFAULT__PLATFORM_NAME", "1e3"),
                ("TANGO_PROXY_LISTEN__WORKERS", "3"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        let AuthConfig::Basic {
            api_key,
            platform_name,
            ..
        } = &c.profiles["default"].auth
        else {
            panic!("wrong method")
        };
        assert_eq!(api_key.expose(), "000123");
        assert_eq!(platform_name, "1e3");
        assert_eq!(c.listen.workers, 3);
    }

    #[test]
    fn environment_order_does_not_matter() {
        let a = [
            ("TANGO_PROXY_LISTEN", "{ workers = 2 }"),
            ("TANGO_PROXY_LISTEN__WORKERS", "3"),
        ];
        let b = [a[1], a[0]];
        let workers = |pairs: &[(&str, &str)]| {
            Config::from_sources(BASIC, &env(pairs))
                .map(|c| c.listen.workers)
                .ok()
        };
        assert_eq!(workers(&a), workers(&b));
        assert!(workers(&a).is_some());
    }

    #[test]
    fn a_syntax_error_is_reported_alone() {
        let found = problems("[listen\nworkers = 1\n");
        assert_eq!(
            found,
            ["not valid TOML: line 1, column 8: invalid table header; expected `.`, `]`"]
        );
        // The offending line is not echoed: it may hold a secret.
        let found = problems("[profiles.default]\napi_key = \"hunter2\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("not valid TOML: line 2, column "),
            "{found:?}"
        );
        assert!(!found[0].contains("hunter2"), "{found:?}");
    }

    #[test]
    fn sizes_are_exact_whole_byte_counts() {
        assert_eq!(parse_size("1.5MiB"), Ok(3 << 19));
        assert_eq!(parse_size("0.3KB"), Ok(300));
        assert_eq!(parse_size("1.0"), Ok(1));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        for (bad, expected) in [
            ("1.5", "not a whole number of bytes"),
            ("0.1KiB", "not a whole number of bytes"),
            ("-1", "must not be negative"),
            ("-1MiB", "must not be negative"),
            ("18446744073709551616", "too large"),
            ("99999999999999999999GiB", "too large"),
            ("1e9", "not a size"),
            ("1.", "not a size"),
            (".5KiB", "not a size"),
            ("1.2.3", "not a size"),
            ("", "not a size"),
        ] {
            let e = parse_size(bad).err().unwrap_or_default();
            assert!(e.contains(expected), "{bad}: {e}");
        }
        assert!(parse_duration("-5s").is_err_and(|e| e.contains("negative")));
        assert!(parse_duration("9223372036854775807h").is_err());
        assert!(parse_duration("18446744073709551615").is_err());
    }

    #[test]
    fn every_duration_and_size_has_a_range() {
        let oauth = "[profiles.default]\nauth = \"client_credentials\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
        let cases: &[(&str, &str)] = &[
            (
                "[listen]\nmax_body = 0",
                "listen.max_body: must be between 1 and 1GiB, not \"0\"",
            ),
            (
                "[listen]\nmax_body = \"2GiB\"",
                "listen.max_body: must be between 1 and 1GiB, not \"2GiB\"",
            ),
            (
                "[listen]\nmax_header_size = \"512\"",
                "listen.max_header_size: must be between 1KiB and 1MiB, not \"512\"",
            ),
            (
                "[listen]\nworkers = 5000",
                "listen.workers: must be between 0 (one per core) and 1024, not 5000",
            ),
            (
                "[listen]\ngrace_period = \"2h\"",
                "listen.grace_period: must be at most 1h, not \"2h\"",
            ),
            (
                "[listen]\nbody_idle_timeout = \"2h\"",
                "listen.body_idle_timeout: must be greater than zero and at most 1h, not \"2h\"",
            ),
            (
                "[upstream]\ntimeout = 0",
                "upstream.timeout: must be greater than zero and at most 1h, not \"0\"",
            ),
            (
                "[upstream]\nreplay_max_body = \"5GiB\"",
                "upstream.replay_max_body: must be between 0 and 1GiB, not \"5GiB\"",
            ),
            (
                "[cache]\ncheck_interval = \"10ms\"",
                "cache.check_interval: must be between 100ms and 1h, not \"10ms\"",
            ),
        ];
        for (toml, expected) in cases {
            assert_eq!(problems(&format!("{toml}\n{BASIC}")), [*expected], "{toml}");
        }
        let cases: &[(&str, &str)] = &[
            ("refresh_window = \"0s\"", "profiles.default.refresh_window: must be greater than zero and at most 7days, not \"0s\""),
            ("min_token_interval = 9223372036854775807", "profiles.default.min_token_interval: must be at most 7days, not \"9223372036854775807\""),
            ("min_token_interval = \"99999999999999999999999d\"", "profiles.default.min_token_interval: must be at most 7days, not \"99999999999999999999999d\""),
            ("refresh_window = \"18446744073709551616\"", "profiles.default.refresh_window: must be greater than zero and at most 7days, not \"18446744073709551616\""),
            ("min_token_interval = \"8d\"", "profiles.default.min_token_interval: must be at most 7days, not \"8d\""),
            ("token_timeout = \"6m\"", "profiles.default.token_timeout: must be greater than zero and at most 5m, not \"6m\""),
            ("token_timeout = -1", "profiles.default.token_timeout: must not be negative: \"-1\""),
        ];
        for (line, expected) in cases {
            assert_eq!(problems(&format!("{oauth}{line}\n")), [*expected], "{line}");
        }
        // The bounds themselves are accepted.
        let c = Config::from_toml(&format!(
            "[listen]\nmax_body = \"1GiB\"\ngrace_period = \"1h\"\n[upstream]\nreplay_max_body = 0\n{oauth}min_token_interval = \"7d\"\ntoken_timeout = \"5m\"\n"
        ))
        .unwrap();
        assert_eq!(c.listen.max_body, 1 << 30);
    }

    #[test]
    fn from_sources_survives_hostile_input() {
        let huge = "9".repeat(10_000);
        let nested_env = "[".repeat(100_000);
        let deep_name = format!("TANGO_PROXY_{}", vec!["A"; 100_000].join("__"));
        let toml_cases = [
            String::from("\0"),
            format!("[listen]\nworkers = {huge}\n"),
            format!("[listen]\nmax_body = \"{huge}GiB\"\n{BASIC}"),
            format!("[listen]\nmax_body = {huge}.5\n{BASIC}"),
            format!("[listen]\nmax_body = -9223372036854775808\n{BASIC}"),
            format!("[listen]\nmax_body = 1e308\n{BASIC}"),
            format!("[listen]\ngrace_period = \"{huge}s\"\n{BASIC}"),
            format!("[listen]\ngrace_period = \"18446744073709551615s 18446744073709551615s\"\n{BASIC}"),
            format!("[profiles.default]\nauth = \"client_credentials\"\nclient_id = \"c\"\nclient_secret = \"s\"\nmin_token_interval = \"{huge}d\"\n"),
            format!("[{}]\nx = 1\n", vec!["a"; 50_000].join(".")),
            format!("{} = 1\n", vec!["a"; 50_000].join(".")),
            format!("a = {}1{}\n", "[".repeat(50_000), "]".repeat(50_000)),
            format!("a = {}\n", "{b = ".repeat(50_000)),
            "[profiles.\"\\u0000\"]\nauth = \"basic\"\n".to_string(),
            format!("[cache]\nbackend = \"redis\"\nredis_url = \"redis://u:p\\u0000w@h:1\"\n{BASIC}"),
            "\u{feff}[listen]\n".to_string(),
        ];
        for toml in &toml_cases {
            let _ = Config::from_sources(toml, &[]);
        }
        let env_cases: Vec<Vec<(String, String)>> = vec![
            env(&[("TANGO_PROXY_LISTEN__WORKERS", &huge)]),
            env(&[
                ("TANGO_PROXY_LISTEN__WORKERS", "-1"),
                ("TANGO_PROXY_LISTEN__MAX_BODY", "-1"),
            ]),
            env(&[("TANGO_PROXY_LISTEN__PROXY", &nested_env)]),
            env(&[("TANGO_PROXY_LISTEN__PROXY", "{a = [1, {b = 2}]}")]),
            env(&[(deep_name.as_str(), "1")]),
            env(&[
                ("TANGO_PROXY_", "1"),
                ("TANGO_PROXY___", "1"),
                ("TANGO_PROXY_.", "1"),
            ]),
            env(&[
                ("TANGO_PROXY_LISTEN", "3"),
                ("TANGO_PROXY_LISTEN__WORKERS", "3"),
            ]),
            env(&[
                ("tango_proxy_profiles__default__api_key", "\0"),
                ("TANGO_PROXY_\0", "\0"),
            ]),
            env(&[("TANGO_PROXY_CACHE__REDIS_URL", "unix://\0?pass=\0")]),
            env(&[("TANGO_PROXY_PROFILES__DEFAULT__MIN_TOKEN_INTERVAL", "1e308")]),
            env(&[("TANGO_PROXY_PROFILES", "[1, 2]")]),
        ];
        for pairs in &env_cases {
            let _ = Config::from_sources(BASIC, pairs);
            let _ = Config::from_sources("", pairs);
        }
        let found = problems_with_env(
            BASIC,
            &env(&[(deep_name.as_str(), "1")])
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
        );
        assert!(
            found.iter().any(|p| p.starts_with("a: unknown section")),
            "{found:?}"
        );
    }

    #[test]
    fn config_and_secret_files_must_be_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_config_file(dir.path()).unwrap_err();
        assert!(e.ends_with("is a directory, not a regular file"), "{e}");
        let e = read_config_file(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(e, "config file /dev/zero is a device, not a regular file");
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; (MAX_CONFIG_FILE + 1) as usize]).unwrap();
        let e = read_config_file(&big).unwrap_err();
        assert!(e.ends_with("is larger than 1MiB (the limit)"), "{e}");
        let e = read_secret_file(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(e, "secret file /dev/zero is a device, not a regular file");
        let big = dir.path().join("big.key");
        std::fs::write(&big, vec![b'k'; (MAX_SECRET_FILE + 1) as usize]).unwrap();
        let e = read_secret_file(&big).unwrap_err();
        assert!(e.ends_with("is larger than 64KiB (the limit)"), "{e}");
        #[cfg(unix)]
        {
            let fifo = dir.path().join("fifo");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            if made.is_ok_and(|s| s.success()) {
                let e = read_secret_file(&fifo).unwrap_err();
                assert!(
                    e.ends_with("is a named pipe (FIFO), not a regular file"),
                    "{e}"
                );
            }
        }
        // Every file-valued key goes through the same checks.
        for toml in [
            "[upstream]\nca_file = \"/dev/zero\"\n".to_string(),
            "[cache]\nredis_ca_file = \"/dev/zero\"\n".to_string(),
            "[cache]\nredis_password_file = \"/dev/zero\"\n".to_string(),
            "[cache]\nencryption_key_file = \"/dev/zero\"\n".to_string(),
            format!("[cache]\nencryption_key_file = \"{}\"\n", big.display()),
        ] {
            let found = problems(&format!("{toml}{BASIC}"));
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(
                found[0].contains("/dev/zero is a device") || found[0].contains("(the limit)"),
                "{found:?}"
            );
        }
        for key in ["client_secret_file", "dpop_key_file"] {
            let found = problems(&format!(
                "[profiles.default]\nauth = \"client_credentials\"\nclient_id = \"c\"\n{}{key} = \"/dev/zero\"\n",
                if key == "client_secret_file" { "" } else { "client_secret = \"s\"\n" }
            ));
            assert_eq!(
                found,
                [format!(
                    "profiles.default.{key}: {} file /dev/zero is a device, not a regular file",
                    if key == "dpop_key_file" {
                        "DPoP key"
                    } else {
                        "secret"
                    }
                )]
            );
        }
    }

    #[test]
    fn redis_urls_are_checked_like_upstream_urls() {
        for good in [
            "redis://127.0.0.1:6379/0",
            "redis://h",
            "redis://h:6379/",
            "rediss://app:s3cret@redis.example:6380/1?protocol=resp3",
            "redis://:s3cret@[::1]:6379/0",
            "redis://app:p%40ss@h:1",
            "unix:///run/redis.sock",
            "unix:///run/redis.sock?db=1&user=app&pass=s3cret",
            "redis+unix:///run/redis.sock?pass=s3cret",
            "redis+cluster://a:1,b:2",
            "redis+cluster://u:pw@h1:7000,u:pw@h2:7001,h3:7002",
            "rediss+cluster://:pw@h1:7000",
            "redis+sentinel://s1:26379,s2:26379/mymaster/2",
        ] {
            assert_eq!(check_redis_url(good), Ok(()), "{good}");
        }
        for (bad, expected) in [
            ("redis://h:99999", "port must be 1 to 65535"),
            ("redis://h:0", "port must be 1 to 65535"),
            ("redis://h:", "port must be 1 to 65535"),
            ("redis://h:+80", "port must be 1 to 65535"),
            ("redis://[::1]:65536", "port must be 1 to 65535"),
            (
                "redis+cluster://h1:7000,h2:99999",
                "port must be 1 to 65535",
            ),
            ("redis+sentinel://s1:0/m", "port must be 1 to 65535"),
            ("redis://h:6379/0#insecure", "#fragment"),
            ("redis://h/0/1", "database number"),
            ("redis://h/./0", "database number"),
            ("redis://h/x", "database number"),
            ("redis://h?", "empty query parameter"),
            (
                "redis://h?password=s3cret",
                "unknown query parameter \"password\"",
            ),
            ("redis://h?protocol=4", "protocol must be"),
            ("unix:///s?db=x", "db must be"),
            ("unix:///s?pass=a&pass=b", "given twice"),
            ("unix://", "absolute path"),
            ("redis://h\t:1", "spaces or control"),
            (" redis://h", "spaces or control"),
            ("redis://u:s3cret/x@h", "percent-encode"),
            ("redis://u:s3cret?x@h", "percent-encode"),
            ("redis://u:@h", "empty password"),
            ("redis://h1,h2", "several hosts"),
            ("REDIS://h", "unsupported scheme"),
            ("http://h", "unsupported scheme"),
            ("h:6379", "needs a scheme"),
            (
                "redis+cluster://u:pw1@h1:7000,u:pw2@h2:7001",
                "different user names or passwords",
            ),
            ("redis+cluster://h1:7000/0", "no /path"),
        ] {
            let e = check_redis_url(bad).err().unwrap_or_default();
            assert!(e.contains(expected), "{bad}: {e:?}");
            assert!(!e.contains("s3cret") && !e.contains("pw1"), "{bad}: {e}");
        }
    }

    #[test]
    fn production_environment_sets_the_url() {
        let c = Config::from_toml(
            "[upstream]\nenvironment = \"production\"\n[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n",
        )
        .unwrap();
        assert_eq!(c.upstream.url.to_string(), PRODUCTION_URL);
    }
}
