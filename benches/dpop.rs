//! DPoP proof cost: the proxy's proof creation against a raw signature with the same key, and
//! against `jsonwebtoken::encode` of the same header and claims.
//!
//! `cargo bench --bench dpop`

// Set-up failures abort the benchmark; the no-panic rule is for the product.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Serialize;
use tango_auth_proxy::auth::dpop::{ath, DpopAlg, DpopKey};

const HTU: &str = "https://integration-api.tangocard.com/raas/v2/orders";
const IAT: u64 = 1_800_000_000;

#[derive(Serialize)]
struct Claims<'a> {
    jti: &'a str,
    htm: &'a str,
    htu: &'a str,
    iat: u64,
    ath: &'a str,
}

fn bench(c: &mut Criterion) {
    let token_ath = ath("an-access-token-of-realistic-length-0123456789abcdef0123456789");
    let (es_key, es_der) = DpopKey::generate(DpopAlg::Es256).unwrap();
    let (ed_key, ed_der) = DpopKey::generate(DpopAlg::EdDsa).unwrap();
    let sample = es_key
        .proof_at("POST", HTU, Some(&token_ath), None, IAT)
        .unwrap();
    let signing_input = sample
        .rsplit_once('.')
        .map(|(i, _)| i.to_string())
        .unwrap_or_default();

    let mut group = c.benchmark_group("dpop");
    group.bench_function("proof_es256", |b| {
        b.iter(|| es_key.proof_at("POST", black_box(HTU), Some(&token_ath), None, IAT))
    });
    let rng = SystemRandom::new();
    let raw = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &es_der, &rng).unwrap();
    group.bench_function("raw_sign_es256", |b| {
        b.iter(|| raw.sign(&rng, black_box(signing_input.as_bytes())))
    });

    let header_json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sample.split('.').next().unwrap_or_default())
        .unwrap_or_default();
    let header_value: serde_json::Value = serde_json::from_slice(&header_json).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.typ = Some("dpop+jwt".into());
    header.jwk = Some(serde_json::from_value(header_value["jwk"].clone()).unwrap());
    let encoding = jsonwebtoken::EncodingKey::from_ec_der(&es_der);
    let jti = "3q2-7_ABCD1234efgh5678ij";
    group.bench_function("jsonwebtoken_encode_es256", |b| {
        b.iter(|| {
            let claims = Claims {
                jti,
                htm: "POST",
                htu: black_box(HTU),
                iat: IAT,
                ath: &token_ath,
            };
            jsonwebtoken::encode(&header, &claims, &encoding)
        })
    });

    group.bench_function("proof_eddsa", |b| {
        b.iter(|| ed_key.proof_at("POST", black_box(HTU), Some(&token_ath), None, IAT))
    });
    let raw_ed = Ed25519KeyPair::from_pkcs8(&ed_der).unwrap();
    group.bench_function("raw_sign_eddsa", |b| {
        b.iter(|| raw_ed.sign(black_box(signing_input.as_bytes())))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
