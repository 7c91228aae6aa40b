//! The fuzz targets in the normal test run: every committed corpus input replayed, then generated
//! inputs — random bytes and mutations of the corpus — through the same target functions
//! `cargo fuzz` drives (`fuzz/targets.rs`, `scripts/fuzz.sh`). A failure prints the input that
//! broke a property; commit it under `fuzz/corpus/<target>/` with the fix, so it stays fixed.

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

#[path = "../../fuzz/targets.rs"]
mod targets;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            (path, data)
        })
        .collect();
    inputs.sort();
    inputs
}

#[test]
fn every_committed_corpus_input_holds_its_properties() {
    for (name, target) in targets::TARGETS {
        let inputs = corpus(name);
        assert!(inputs.len() >= 5, "{name}: the corpus is almost empty");
        for (path, data) in inputs {
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(
                outcome.is_ok(),
                "{name}: {} broke a property",
                path.display()
            );
        }
    }
}

/// An input built from a corpus seed: cut, spliced with bytes, some bytes overwritten.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(seeds),
        any::<prop::sample::Index>(),
        prop::collection::vec(any::<u8>(), 0..64),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    )
        .prop_map(|(mut seed, cut, insert, flips)| {
            if !seed.is_empty() {
                let at = cut.index(seed.len() + 1);
                seed.splice(at..at, insert);
                for (i, b) in flips {
                    let i = i.index(seed.len());
                    seed[i] = b;
                }
            }
            seed
        })
}

#[test]
fn generated_inputs_hold_every_targets_properties() {
    for (name, target) in targets::TARGETS {
        let seeds: Vec<Vec<u8>> = corpus(name).into_iter().map(|(_, d)| d).collect();
        let strategy = prop_oneof![prop::collection::vec(any::<u8>(), 0..512), mutated(seeds),];
        // Fixed seed and case count: the run is the same on every machine, and bounded.
        let mut runner = TestRunner::new_with_rng(
            RunnerConfig {
                cases: 512,
                failure_persistence: None,
                ..RunnerConfig::default()
            },
            proptest::test_runner::TestRng::deterministic_rng(
                proptest::test_runner::RngAlgorithm::ChaCha,
            ),
        );
        let result = runner.run(&strategy, |data| {
            target(&data);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{name}: {e}");
        }
    }
}
