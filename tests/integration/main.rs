//! Integration tests: real sockets on 127.0.0.1:0, a fake upstream recording what it received,
//! the proxy in-process or as the real binary.

// A panic in a test is a failing test; the no-unwrap rule is for the product.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin;
mod config;
mod dpop;
mod errors;
mod forwarding;
mod fuzzing;
mod gateway;
mod hostile;
mod inbound_tls;
mod lifecycle;
mod limits;
mod logs;
mod mock;
mod oauth;
mod redis;
mod refusals;
mod reload;
mod replay;
mod rotation;
mod sdk;
mod store;
mod streaming;
mod support;
mod tls;
