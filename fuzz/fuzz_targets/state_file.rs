//! Fuzz target: see `tidegate_fuzz::state_file` (fuzz/checks.rs) for the input and its invariants.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidegate_fuzz::state_file(data));
