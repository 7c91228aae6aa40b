//! tango-auth-proxy: a local reverse proxy that lets apps call the Tango RaaS API without ever
//! holding Tango credentials.
//!
//! # Layout
//!
//! * [`config`] reads the TOML file and `TANGO_PROXY_*` variables into raw structs and validates
//!   them into a [`config::Config`], reporting every problem at once.
//! * [`auth`] turns a profile's configuration into an [`auth::Authorizer`], the one seam every
//!   method plugs into: it hands the forwarder the headers to attach and decides what a 401
//!   means. `auth::basic` pre-encodes a Basic header; `auth::oauth` holds the token endpoint
//!   client and the OAuth authorizer (a DPoP proof per send, 401 classification by
//!   `WWW-Authenticate`); `auth::dpop` holds DPoP keys, thumbprints, proofs and nonces.
//! * [`token`] is the token lifecycle and knows nothing of HTTP requests: the pure per-profile
//!   state machine ([`token::machine`]), the one task per profile that owns it and does its cache,
//!   lease and mint I/O ([`token::TokenManager`]), and the [`token::store::TokenStore`] seam with
//!   memory, file and Redis backends (fleet lease, mint ledger, AES-256-GCM sealing). It reaches
//!   the token endpoint through its own [`token::TokenSource`] trait, implemented in `auth`.
//! * [`proxy`] is the request path: inbound checks, header hygiene, the pooled upstream client
//!   and what its errors prove (a refused stream), the response-body idle timeout, and the single
//!   place errors become Tango-shaped JSON responses.
//! * [`gateway`] is gateway mode: callers and how they authenticate, their policies (allow
//!   lists, account and customer bindings checked in paths, queries, bodies and answers, rate
//!   buckets) and the daily spend ledger; the proxy's `guard` drives it for each request.
//! * [`admin`] serves `/livez`, `/readyz`, `/status` and `/metrics` on a separate port;
//!   [`metrics`] holds the Prometheus registry.
//! * [`mock`] is a mock of Tango for the demo, local development and tests.
//! * [`tls`] is the trust for every outbound TLS connection, shared by `proxy` and `auth`, and the
//!   proxy listener's server configuration;
//!   [`secret`] the redacting secret type; [`logging`] the log setup.
//! * [`reload`] applies a changed configuration on SIGHUP and when the config file or a file it
//!   names changes: a gateway's callers and profiles, and every profile's credentials (secrets
//!   for the next mint, a new token identity once it holds a token);
//!   [`tls_reload`] reloads the proxy listener's certificate, key and client CAs when their
//!   files change (new handshakes get them, open connections keep theirs).
//! * [`listener`] is the accept loop both listeners share (on the proxy listener optionally TLS,
//!   HTTP/2 or HTTP/1.1 by ALPN, with the client certificate passed on): header timeout,
//!   connection caps, stalled writes, lingering close, what ended each connection, drain; [`idle`] the idle clock behind every body and
//!   write timeout; [`app`] wires listeners, proxy and admin together; [`cli`] is the command line
//!   (`serve`, `check-config`, `keygen`, `mock-tango`, `demo`, `healthcheck`).
//!
//! # A request's path
//!
//! An app sends plain HTTP to the proxy listener. [`proxy::Proxy::handle`] refuses what must not be
//! forwarded (CONNECT, absolute-form requests for another host, oversized headers or bodies),
//! asks the profile for a credential (a Basic header, or the token the profile's owner task
//! published plus, for DPoP, a proof signed for this send — no cache or network round trip, no
//! message to the owner, while the token is usable), strips every
//! credential and hop-by-hop header the app sent, attaches the profile's `Authorization`, and
//! sends the request to `upstream.url` + the app's
//! path through a pooled HTTPS client (HTTP/2 when the upstream offers it). Bodies stream both ways
//! without being buffered, cut off at `listen.max_body` and `listen.body_idle_timeout`. The
//! upstream's answer goes back as it is, minus hop-by-hop headers, with the request id echoed; when
//! the proxy cannot forward, it answers itself in Tango's error shape with `x-tango-proxy-error`
//! naming the cause. The body keeps a copy of itself as it streams (up to
//! `upstream.replay_max_body`), so a request Tango provably did not process can be sent again:
//! once more for a stream its HTTP/2 edge refused (GOAWAY, `REFUSED_STREAM`), on every profile;
//! and for OAuth profiles after a 401, with a new token after the owner replaced a refused one or
//! with a fresh DPoP proof after a nonce challenge or a refused proof — and a second time only
//! with a new token, when the replacement (a peer's token from the cache) was refused too.
//! When no replacement token can be had, the app gets `token_unavailable`, not the 401.
//!
//! In gateway mode (any `[callers.NAME]`), a request first authenticates as a caller and passes
//! the caller's policy; it is then forwarded with the caller's profile, and an answer to a
//! caller bound to accounts is read whole and checked before the caller sees any of it.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod gateway;
pub mod idle;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod reload;
pub mod secret;
pub mod tls;
pub mod tls_reload;
pub mod token;

/// `n` random bytes as hex (lease owners and similar unique ids).
pub(crate) fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An error and its sources on one line ("cannot connect to the upstream: tcp connect error: ...").
pub(crate) fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}
