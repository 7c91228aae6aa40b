//! tango-auth-proxy: a local reverse proxy that lets apps call the Tango RaaS API without ever
//! holding Tango credentials.
//!
//! # Layout
//!
//! * [`config`] reads the TOML file and `TANGO_PROXY_*` variables into raw structs and validates
//!   them into a [`config::Config`], reporting every problem at once.
//! * [`auth`] turns a profile's configuration into an [`auth::Authorizer`], the one seam every
//!   method plugs into: it hands the forwarder the headers to attach. `auth::basic` pre-encodes a
//!   Basic header; `auth::oauth` talks to Tango's token endpoint; `auth::dpop` holds DPoP keys,
//!   thumbprints, proofs and nonces.
//! * [`token`] is the OAuth token lifecycle: expiry rules, the per-profile
//!   [`token::TokenManager`] (single-flight, background refresh, backoff, 401 handling) and the
//!   [`token::store::TokenStore`] seam with memory, file and Redis backends (fleet lease, mint
//!   ledger, AES-256-GCM sealing).
//! * [`proxy`] is the request path: listener, inbound checks, header hygiene, the pooled upstream
//!   client, and the single place errors become Tango-shaped JSON responses.
//! * [`admin`] serves `/livez`, `/readyz`, `/status` and `/metrics` on a separate port;
//!   [`metrics`] holds the Prometheus registry.
//! * [`mock`] is a mock of Tango for the demo, local development and tests.
//! * [`app`] wires listeners, proxy and admin together; [`cli`] is the command line.
//!
//! # A request's path
//!
//! An app sends plain HTTP to the proxy listener. [`proxy::Proxy::handle`] refuses what must not be
//! forwarded (CONNECT, absolute-form requests for another host, oversized headers or bodies),
//! asks the profile for a credential (a Basic header, or the in-memory token plus, for DPoP, a
//! fresh proof — no cache or network round trip while the token is usable), strips every
//! credential and hop-by-hop header the app sent, attaches the profile's `Authorization`, and
//! sends the request to `upstream.url` + the app's
//! path through a pooled HTTPS client (HTTP/2 when the upstream offers it). Bodies stream both ways
//! without being buffered. The upstream's answer goes back as it is, minus hop-by-hop headers, with
//! the request id echoed; when the proxy cannot forward, it answers itself in Tango's error shape
//! with `x-tango-proxy-error` naming the cause. For OAuth profiles, small bodies are buffered so a
//! 401 (revoked token, DPoP nonce challenge) can be replayed once with a fresh credential.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod logging;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod secret;
pub mod token;

/// `n` random bytes as hex (lease owners and similar unique ids).
pub(crate) fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
