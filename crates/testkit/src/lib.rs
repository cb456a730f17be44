//! pgquorum-testkit: helpers for end-to-end tests and benchmarks.
//!
//! Its job: start real processes (the `pgquorum` binary, PostgreSQL), kill them with
//! SIGKILL by the PID this process started, find free loopback ports, wait on
//! conditions with deadlines, and clean up on drop. It must never be used outside
//! tests and benchmarks, never kill a process by name, never sleep as synchronisation.

pub mod certs;
pub mod golden;
pub mod netns;
pub mod postgres;
pub mod process;

pub use certs::{insecure_requested, TestCerts};
pub use process::{
    free_addr, free_port, pgquorum_bin, temp_dir, wait_until, wait_until_async, Proc,
};
