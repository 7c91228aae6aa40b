//! Logging setup: `tracing` to stderr, human-readable or JSON (`TANGO_PROXY_LOG_FORMAT=json`),
//! level from `RUST_LOG` (default `info`).
//!
//! Access lines use the target `tango_auth_proxy::access`, so they can be turned off or routed
//! separately: `RUST_LOG=info,tango_auth_proxy::access=off`. Nothing the proxy logs contains a
//! credential; header values are never logged.

use tracing_subscriber::EnvFilter;

/// Variable choosing the log format.
pub const FORMAT_ENV: &str = "TANGO_PROXY_LOG_FORMAT";

/// Installs the global subscriber. Call once, from `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var(FORMAT_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
