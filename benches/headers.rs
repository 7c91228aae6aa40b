//! Header hygiene on the request path: what one request's and one answer's headers cost the
//! proxy (`sanitize_request`, `sanitize_response`), for the headers a Tango SDK sends and the
//! headers an answer carries.
//!
//! `cargo bench --bench headers`

// Set-up failures abort the benchmark; the no-panic rule is for the product.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderMap, HeaderValue, StatusCode};
use tango_auth_proxy::proxy::headers::{app_challenge, sanitize_request, sanitize_response};

fn sdk_request() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("host", "127.0.0.1:8080"),
        ("user-agent", "raas-python-sdk/2.2.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate"),
        ("content-type", "application/json"),
        ("authorization", "Basic cGxhdGZvcm06cGxhY2Vob2xkZXI="),
        ("connection", "keep-alive"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    h
}

fn answer() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("content-type", "application/json"),
        ("content-length", "97"),
        ("date", "Sat, 28 Nov 2026 05:00:00 GMT"),
        ("x-request-id", "0f6c3a9e-tango"),
        ("connection", "keep-alive"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    h
}

fn bench(c: &mut Criterion) {
    let id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    let challenge = app_challenge(true);
    let mut group = c.benchmark_group("headers");
    group.bench_function("sanitize_request", |b| {
        b.iter_batched(
            sdk_request,
            |mut h| sanitize_request(&mut h, black_box([10, 1, 2, 3].into()), &id),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("sanitize_response", |b| {
        b.iter_batched(
            answer,
            |mut h| sanitize_response(&mut h, &id, StatusCode::OK, &challenge),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
