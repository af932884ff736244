//! Arbitrary bytes as cluster.yaml: the loader must answer with a config or
//! a report, never panic. Run with `cargo +nightly fuzz run config_loader`;
//! seed the corpus with `tests/fixtures/config/*/cluster.yaml`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cluster_agent::config::parse_cluster_yaml(data);
});
