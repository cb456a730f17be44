//! End-to-end tests live in tests/tests/; this library holds the harnesses they share
//! (and the benchmarks use): a monitor group of real `pgquorum` processes, and whole clusters with a writer;
//! either may run an older `pgquorum` binary per process (rolling-upgrade tests).

pub mod bench_doc;
pub mod cluster;
pub mod haproxy;
pub mod monitor_group;
pub mod netcluster;
pub mod oracle;
pub mod peers;
pub mod upgrade;
