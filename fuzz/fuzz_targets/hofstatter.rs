//! Fuzz target `hofstatter`: see `bodies::hofstatter`.
#![no_main]
#[path = "../bodies.rs"]
#[allow(dead_code)]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::hofstatter(data));
