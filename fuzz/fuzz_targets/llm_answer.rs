//! Fuzz target `llm_answer`: see `bodies::llm_answer`.
#![no_main]
#[path = "../bodies.rs"]
#[allow(dead_code)]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::llm_answer(data));
