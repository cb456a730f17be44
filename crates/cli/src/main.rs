//! The `pgquorum` binary (placeholder until the subcommands land).
fn main() {}
