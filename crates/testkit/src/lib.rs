//! pgquorum-testkit: dev-only helpers for tests and benchmarks that run real processes.
//! Never used outside tests and benchmarks.

pub mod postgres;
