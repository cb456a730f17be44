#![no_main]
//! Arbitrary bytes through every decoder of a Raft message or stored Raft value the
//! monitor has: see `pgquorum_fuzz::raft`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pgquorum_fuzz::raft::run(data));
