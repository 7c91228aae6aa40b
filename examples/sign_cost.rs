//! The cost of one raw DPoP signature on this machine, for `scripts/bench.sh` (the DPoP
//! throughput limit) and `scripts/instructions.sh` (instructions per signature): signs the
//! signing input of a real proof (header and claims as the proxy builds them) `N` times with
//! ring and the proxy's key type, and prints the time per signature.
//!
//! Usage: `cargo run --release --example sign_cost -- [es256|eddsa] N`

use std::process::ExitCode;
use std::time::Instant;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use tango_auth_proxy::auth::dpop::{ath, DpopAlg, DpopKey};

const HTU: &str = "https://integration-api.tangocard.com/raas/v2/catalogs";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (alg, n) = match args.as_slice() {
        [alg, n] => match (alg.to_ascii_lowercase().as_str(), n.parse::<u64>()) {
            ("es256", Ok(n)) => (DpopAlg::Es256, n),
            ("eddsa", Ok(n)) => (DpopAlg::EdDsa, n),
            _ => return usage(),
        },
        _ => return usage(),
    };
    let Ok((key, der)) = DpopKey::generate(alg) else {
        eprintln!("sign_cost: cannot generate a key");
        return ExitCode::FAILURE;
    };
    let token_ath = ath("an-access-token-of-realistic-length-0123456789abcdef0123456789");
    let Ok(sample) = key.proof_at("GET", HTU, Some(&token_ath), None, 1_800_000_000) else {
        eprintln!("sign_cost: cannot build a proof");
        return ExitCode::FAILURE;
    };
    let input = sample.rsplit_once('.').map(|(i, _)| i).unwrap_or_default();
    let rng = SystemRandom::new();
    let start = Instant::now();
    let mut bytes = 0usize;
    match alg {
        DpopAlg::Es256 => {
            let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
            else {
                eprintln!("sign_cost: cannot load the key");
                return ExitCode::FAILURE;
            };
            for _ in 0..n {
                bytes += k
                    .sign(&rng, input.as_bytes())
                    .map_or(0, |s| s.as_ref().len());
            }
        }
        DpopAlg::EdDsa => {
            let Ok(k) = Ed25519KeyPair::from_pkcs8(&der) else {
                eprintln!("sign_cost: cannot load the key");
                return ExitCode::FAILURE;
            };
            for _ in 0..n {
                bytes += k.sign(input.as_bytes()).as_ref().len();
            }
        }
    }
    let elapsed = start.elapsed();
    let per = elapsed.as_nanos() as f64 / n.max(1) as f64;
    println!("signatures {n}");
    println!("signature_bytes {bytes}");
    println!("signing_input_bytes {}", input.len());
    println!("ns_per_signature {per:.0}");
    ExitCode::SUCCESS
}

fn usage() -> ExitCode {
    eprintln!("usage: sign_cost [es256|eddsa] N");
    ExitCode::from(2)
}
