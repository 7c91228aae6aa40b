//! Configuration: raw serde structs read by figment, validated into [`Config`].
//!
//! Sources, later ones winning: built-in defaults, the TOML file (`--config` or
//! `$TANGO_PROXY_CONFIG`), then environment variables `TANGO_PROXY_<SECTION>__<KEY>`.
//! Each section is extracted on its own and every value is checked before anything fails, so
//! `check-config` can list **all** problems at once, each naming its key.
//!
//! Decisions not spelled out in DESIGN.md:
//! * durations accept humantime strings (`"30s"`, `"4h"`) or a bare number of seconds; sizes accept
//!   `"10MiB"`, `"512KiB"`, `"1MB"` or a bare number of bytes;
//! * a secret set both inline and as a `*_file` is an error (which one wins would be a guess);
//!   secret files have one trailing newline stripped;
//! * `listen.max_header_size` (default 32 KiB), `listen.grace_period` (default 30 s) and
//!   `listen.allow_non_loopback` (default false) extend the `[listen]` section;
//! * methods and cache backends that this version does not implement yet are accepted by the parser
//!   (the key names are the stable interface) and reported as problems by validation.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use http::uri::{Authority, Scheme};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::secret::Secret;

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

    fn figment(&mut self, error: figment::Error) {
        for e in error {
            let key = e.path.join(".");
            let mut message = e.kind.to_string();
            if let Some(md) = &e.metadata {
                let source = md
                    .interpolate(&e.profile.clone().unwrap_or_default(), &e.path)
                    .to_string();
                let origin = md
                    .source
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| md.name.to_string());
                if e.path.is_empty() || source.starts_with(ENV_PREFIX) {
                    message = format!("{message} (from {origin}{})", env_note(&source));
                } else {
                    message = format!("{message} (in {origin})");
                }
            }
            self.push(key, message);
        }
    }
}

fn env_note(source: &str) -> String {
    if source.starts_with(ENV_PREFIX) {
        format!(": {source}")
    } else {
        String::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Raw configuration, as written by people

/// A string that also accepts numbers and booleans: environment overrides arrive parsed, so
/// `TANGO_PROXY_PROFILES__DEFAULT__CLIENT_ID=12345` would otherwise be a type error.
pub fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Str(String),
        Int(i64),
        UInt(u64),
        Float(f64),
        Bool(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::Str(s) => s,
        Scalar::Int(n) => n.to_string(),
        Scalar::UInt(n) => n.to_string(),
        Scalar::Float(n) => n.to_string(),
        Scalar::Bool(b) => b.to_string(),
    })
}

/// A text value read leniently (see [`lenient_string`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lenient_string(d).map(Text)
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    backend: Option<CacheBackend>,
    path: Option<PathBuf>,
    redis_url: Option<Text>,
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

const TOP_LEVEL_KEYS: &[&str] = &["listen", "upstream", "cache", "profiles"];

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
    /// Redis URL (its password, if any, is redacted when printed).
    #[serde(serialize_with = "ser_redis_url")]
    pub redis_url: Option<String>,
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

fn ser_redis_url<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        None => s.serialize_none(),
        Some(u) => s.serialize_str(&redact_url_password(u)),
    }
}

/// Replaces the password of `scheme://user:pass@host` with `<redacted>`.
pub fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..auth_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split(':').next().unwrap_or_default();
    let redacted = if userinfo.contains(':') {
        format!("{user}:{}", crate::secret::REDACTED)
    } else {
        crate::secret::REDACTED.to_string()
    };
    format!("{}{redacted}{}", &url[..scheme_end + 3], &rest[at..])
}

// ---------------------------------------------------------------------------------------------
// Values

/// Parses a duration: humantime (`"30s"`, `"1h 30m"`) or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    // Every configured time ends up added to a clock reading; nothing sensible is longer.
    const MAX: Duration = Duration::from_secs(400 * 86_400);
    let t = text.trim();
    let d = match t.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(t)
            .map_err(|e| format!("not a duration ({e}): {text:?}; try \"30s\""))?,
    };
    if d > MAX {
        return Err(format!("{text:?} is longer than 400 days"));
    }
    Ok(d)
}

/// Parses a size: `"10MiB"`, `"512 KiB"`, `"1MB"`, `"64k"` or a bare number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("not a size: {text:?}; try \"10MiB\"");
    let value: f64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
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
    let mut text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
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

/// Loads the PEM certificates of an extra-roots file.
pub fn load_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no CERTIFICATE blocks", path.display()));
    }
    Ok(certs)
}

// ---------------------------------------------------------------------------------------------
// Loading

impl Config {
    /// Loads from an optional file (else `$TANGO_PROXY_CONFIG`) plus `TANGO_PROXY_*` variables.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(from_env);
        let mut figment = Figment::new();
        if let Some(p) = &path {
            if !p.is_file() {
                return Err(ConfigError {
                    problems: vec![Problem {
                        key: String::new(),
                        message: format!("config file {} does not exist", p.display()),
                    }],
                });
            }
            figment = figment.merge(Toml::file_exact(p));
        }
        let env = Env::prefixed(ENV_PREFIX).split("__").ignore(NON_CONFIG_ENV);
        Self::from_figment(figment.merge(env))
    }

    /// Loads from TOML text alone (tests, the demo).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(text)))
    }

    /// Validates whatever the figment holds.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
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
            Err(e) => problems.figment(e),
        }

        let listen = section::<RawListen>(&figment, "listen", &mut problems);
        let upstream = section::<RawUpstream>(&figment, "upstream", &mut problems);
        let cache = section::<RawCache>(&figment, "cache", &mut problems);
        let mut raw_profiles = BTreeMap::new();
        if let Ok(dict) = figment.extract_inner::<figment::value::Dict>("profiles") {
            for name in dict.keys() {
                if !valid_profile_name(name) {
                    problems.push(
                        format!("profiles.{name}"),
                        "profile names use letters, digits, '-' and '_' only",
                    );
                    continue;
                }
                let key = format!("profiles.{name}");
                if let Some(raw) = section::<RawProfile>(&figment, &key, &mut problems) {
                    raw_profiles.insert(name.clone(), raw);
                }
            }
        } else if figment.contains("profiles") {
            problems.push("profiles", "must be a table of [profiles.NAME] sections");
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
        if profiles.len() > 1 {
            problems.push(
                "profiles",
                format!(
                    "{} profiles configured ({}); a sidecar serves exactly one",
                    profiles.len(),
                    profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }

        match (listen, upstream, cache) {
            (Some(listen), Some(upstream), Some(cache)) if problems.0.is_empty() => Ok(Config {
                listen,
                upstream,
                cache,
                profiles,
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

    /// Things that work but deserve an operator's attention (printed by `check-config`, logged
    /// by `serve`).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.cache_warnings(&mut out);
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
    if !figment.contains(key) {
        return Some(T::default());
    }
    match figment.extract_inner::<T>(key) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.figment(e);
            None
        }
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
    let text = raw.map(|t| t.0).unwrap_or_else(|| default.to_string());
    match parse(&text) {
        Ok(v) => v,
        Err(e) => {
            problems.push(key, e);
            fallback
        }
    }
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("not an IP:port address: {text:?}; try \"127.0.0.1:8080\""))
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
    let max_body = value(raw.max_body, "10MiB", "listen.max_body", parse_size, p, 0);
    let max_header_size = value(
        raw.max_header_size,
        "32KiB",
        "listen.max_header_size",
        parse_size,
        p,
        32 << 10,
    );
    if !(1024..=1 << 20).contains(&max_header_size) {
        p.push("listen.max_header_size", "must be between 1KiB and 1MiB");
    }
    let grace_period = value(
        raw.grace_period,
        "30s",
        "listen.grace_period",
        parse_duration,
        p,
        Duration::ZERO,
    );
    let body_idle_timeout = value(
        raw.body_idle_timeout,
        "30s",
        "listen.body_idle_timeout",
        parse_duration,
        p,
        Duration::ZERO,
    );
    if body_idle_timeout.is_zero() && !p.0.iter().any(|x| x.key == "listen.body_idle_timeout") {
        p.push("listen.body_idle_timeout", "must be greater than zero");
    }
    let allow_non_loopback = raw.allow_non_loopback.unwrap_or(false);
    if !proxy.ip().is_loopback() && !allow_non_loopback {
        p.push(
            "listen.proxy",
            format!(
                "{proxy} is not a loopback address: anything that can reach it could use the \
                 Tango credentials. Set listen.allow_non_loopback = true if the network around \
                 it is trusted"
            ),
        );
    }
    if proxy == admin && proxy.port() != 0 {
        p.push("listen.admin", "must differ from listen.proxy");
    }
    let workers = raw.workers.unwrap_or(0);
    if workers > 1024 {
        p.push("listen.workers", "at most 1024");
    }
    ListenConfig {
        proxy,
        admin,
        max_body,
        max_header_size,
        workers,
        grace_period,
        allow_non_loopback,
        body_idle_timeout,
    }
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
        parse_duration,
        p,
        Duration::ZERO,
    );
    if timeout.is_zero() && !p.0.iter().any(|x| x.key == "upstream.timeout") {
        p.push("upstream.timeout", "must be greater than zero");
    }
    let replay_max_body = value(
        raw.replay_max_body,
        "64KiB",
        "upstream.replay_max_body",
        parse_size,
        p,
        64 << 10,
    );
    UpstreamConfig {
        environment,
        url,
        ca_file: raw.ca_file,
        extra_roots,
        allow_http,
        timeout,
        replay_max_body,
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
            if raw.redis_url.as_ref().is_none_or(|u| u.0.is_empty()) {
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
        load_pem_certificates(f)
            .map_err(|e| p.push("cache.redis_ca_file", e))
            .ok()
            .and_then(|_| std::fs::read(f).ok())
    });
    let redis = crate::token::RedisOptions {
        url: raw
            .redis_url
            .as_ref()
            .map(|t| t.0.clone())
            .unwrap_or_default(),
        password,
        ca_pem,
    };
    if backend == CacheBackend::Redis && !redis.url.is_empty() {
        if let Err(e) = crate::token::check_redis_options(&redis) {
            p.push(
                "cache.redis_url",
                format!("{} ({})", e, redact_url_password(&redis.url)),
            );
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
        Some(current) => match crate::token::Sealer::from_files(current, &previous) {
            Ok(s) => s,
            Err(e) => {
                p.push("cache.encryption_key_file", e.to_string());
                crate::token::Sealer::plaintext()
            }
        },
    };
    let check_interval = value(
        raw.check_interval,
        "5s",
        "cache.check_interval",
        parse_duration,
        p,
        Duration::from_secs(5),
    );
    if check_interval < Duration::from_millis(100) || check_interval > Duration::from_secs(3600) {
        p.push("cache.check_interval", "must be between 100ms and 1h");
    }
    CacheConfig {
        check_interval,
        backend,
        path: raw.path,
        redis_url: raw.redis_url.map(|t| t.0),
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
        Some(path) => match crate::auth::dpop::DpopKey::load(path) {
            Ok(k) => Some(DpopConfig {
                key_file: path.clone(),
                thumbprint: k.thumbprint().to_string(),
                key: std::sync::Arc::new(k),
            }),
            Err(e) => {
                p.push(format!("{key}.dpop_key_file"), e.to_string());
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
        parse_duration,
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
        parse_duration,
        p,
        Duration::ZERO,
    );
    let token_timeout = value(
        raw.token_timeout,
        "10s",
        &format!("{key}.token_timeout"),
        parse_duration,
        p,
        Duration::from_secs(10),
    );
    if token_timeout.is_zero() || token_timeout > Duration::from_secs(300) {
        p.push(
            format!("{key}.token_timeout"),
            "must be greater than zero and at most 5m",
        );
    }
    // The fleet's mint ledger lives 7 days: a longer interval could not be enforced.
    if min_token_interval > Duration::from_secs(7 * 86_400) {
        p.push(
            format!("{key}.min_token_interval"),
            "must be at most 7 days",
        );
    }
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
        assert_eq!(
            redact_url_password("redis://app:s3cret@redis:6379/0"),
            "redis://app:<redacted>@redis:6379/0"
        );
        assert_eq!(
            redact_url_password("rediss://s3cret@redis/0"),
            "rediss://<redacted>@redis/0"
        );
        assert_eq!(redact_url_password("redis://redis/0"), "redis://redis/0");
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
            ["listen.body_idle_timeout: must be greater than zero"],
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
    fn production_environment_sets_the_url() {
        let c = Config::from_toml(
            "[upstream]\nenvironment = \"production\"\n[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n",
        )
        .unwrap();
        assert_eq!(c.upstream.url.to_string(), PRODUCTION_URL);
    }
}
