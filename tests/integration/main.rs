//! Integration tests: real sockets on 127.0.0.1:0, a fake upstream recording what it received,
//! the proxy in-process or as the real binary.

mod admin;
mod config;
mod errors;
mod forwarding;
mod logs;
mod mock;
mod streaming;
mod support;
mod tls;
