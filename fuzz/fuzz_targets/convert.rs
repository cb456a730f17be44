#![no_main]
//! Arbitrary bytes decoded as each Monitor API request (and the keeper's Assignment),
//! then converted to core types: see `pgquorum_fuzz::convert`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pgquorum_fuzz::convert::run(data));
