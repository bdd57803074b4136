//! Fuzz target: see `tidegate_fuzz::affinity_cookie` (fuzz/checks.rs) for the input and its invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidegate_fuzz::affinity_cookie(data));
