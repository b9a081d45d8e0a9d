//! Fuzz target `trec_run`: see `bodies::trec_run`.
#![no_main]
#[path = "../bodies.rs"]
#[allow(dead_code)]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::trec_run(data));
