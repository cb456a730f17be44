//! The HA systems the side-by-side benchmark (`peer-bench`) compares: pgquorum,
//! pg_auto_failover and Patroni with etcd. Each one runs three PostgreSQL 15 nodes on
//! loopback with synchronous replication; the benchmark drives them all through this
//! one interface, with one client ([`crate::cluster::Writer`]) and one measurement path,
//! so that differences come from the systems and not from the harness.
//!
//! Implementations own every process they start and kill them all on drop (by PID).

pub mod patroni;
pub mod pg_auto_failover;
pub mod pgquorum;

use std::time::Duration;

/// One HA system with three nodes, started and ready (a primary and two streaming
/// standbys, one of them synchronous).
#[allow(async_fn_in_trait)]
pub trait HaSystem {
    /// For the report: "pgquorum", "pg_auto_failover 2.0", "Patroni 3.0.2 + etcd 3.4".
    fn system(&self) -> String;
    /// For the report: the settings in use and, for non-default ones, why they are safe.
    fn settings(&self) -> String;
    /// Every PostgreSQL's (host, port), for the writer's multi-host read-write address.
    fn hosts(&self) -> Vec<(String, u16)>;
    /// The name of the node that is primary now, waiting (up to `within`) until there is one.
    async fn primary(&self, within: Duration) -> String;
    /// The node vanishes: its agent and its postgres SIGKILLed together.
    async fn kill_node(&mut self, node: &str);
    /// Brings a node killed by `kill_node` back (agent restarted; it must rejoin).
    async fn restart_node(&mut self, node: &str);
    /// Only the node's postmaster is SIGKILLed (the agent lives on).
    fn kill_postmaster(&self, node: &str);
    /// Asks for a planned switchover (returns once the request is accepted, not done).
    async fn switchover(&self);
    /// Waits (up to `within`) for a primary with two streaming standbys, one synchronous.
    async fn wait_healthy(&self, within: Duration);
    /// PIDs of the per-node agents (keeper, pg_autoctl, patroni) for RSS/CPU figures;
    /// the monitor/etcd processes are not agents.
    fn agent_pids(&self) -> Vec<u32>;
}
