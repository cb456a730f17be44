#![no_main]
//! Arbitrary command sequences (operators, keepers' heartbeats, the orchestrator,
//! random proposals) applied to a ClusterState: see `pgquorum_fuzz::script`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pgquorum_fuzz::script::run(data));
