//! libFuzzer driver for the `www_authenticate` target in `fuzz/targets.rs`.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::www_authenticate(data));
