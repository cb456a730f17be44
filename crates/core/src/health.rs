use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lsn::{zero_is_none, Lsn};
use crate::model::{Millis, NodeId, NodeState};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationPeer {
    pub application_name: String,
    pub state: String,
    pub sync_state: String,
    /// pg_stat_replication's positions of the standby; None: NULL, not reported yet
    /// (stored and sent as 0).
    #[serde(with = "zero_is_none")]
    pub write_lsn: Option<Lsn>,
    #[serde(with = "zero_is_none")]
    pub flush_lsn: Option<Lsn>,
    #[serde(with = "zero_is_none")]
    pub replay_lsn: Option<Lsn>,
    /// pg_stat_replication's write_lag / flush_lag / replay_lag in milliseconds (None:
    /// NULL, i.e. nothing to measure since the standby caught up, or not reported).
    #[serde(default)]
    pub write_lag_ms: Option<u64>,
    #[serde(default)]
    pub flush_lag_ms: Option<u64>,
    #[serde(default)]
    pub replay_lag_ms: Option<u64>,
}

/// One keeper heartbeat, as the monitor leader received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node_id: NodeId,
    pub current_state: NodeState,
    pub pg_running: bool,
    pub pg_in_recovery: bool,
    /// A primary's pg_current_wal_lsn(), a standby's received (flushed) position, a
    /// stopped server's from pg_control; None: unknown (stored and sent as 0).
    #[serde(with = "zero_is_none")]
    pub current_lsn: Option<Lsn>,
    #[serde(with = "zero_is_none")]
    pub received_lsn: Option<Lsn>,
    #[serde(with = "zero_is_none")]
    pub replayed_lsn: Option<Lsn>,
    pub timeline: u32,
    pub system_identifier: u64,
    pub replication: Vec<ReplicationPeer>,
    pub sequence: u64,
    /// How many times this keeper process restarted its PostgreSQL in place after it
    /// exited (a crash), and how many times it stopped it because its lease ran out
    /// (a fence): counters since the keeper started, compared beat to beat by the
    /// leader, which records an event when one grows.
    #[serde(default)]
    pub pg_restarts: u64,
    #[serde(default)]
    pub fences: u64,
}

/// How far below the newest sequence seen a beat counts as reordered rather than as
/// coming from a restarted keeper.
pub const REORDER_WINDOW: u64 = 8;

/// The leader's in-memory view of node health. Never replicated: a new leader starts
/// with an empty table, and "not seen yet" means unknown, never down.
#[derive(Debug, Clone)]
pub struct HealthTable {
    pub leader_since: Millis,
    pub last_seen: BTreeMap<NodeId, (Millis, NodeReport)>,
    /// Since when a node has reported its PostgreSQL as not running (continuously).
    pub pg_down_since: BTreeMap<NodeId, Millis>,
}

impl HealthTable {
    pub fn new(leader_since: Millis) -> Self {
        HealthTable {
            leader_since,
            last_seen: BTreeMap::new(),
            pg_down_since: BTreeMap::new(),
        }
    }

    /// Record a heartbeat. A beat slightly older than the last one seen (a sequence
    /// up to [`REORDER_WINDOW`] below) was reordered in flight and is ignored; a much
    /// lower sequence is a restarted keeper process. (A keeper that starts its sequence
    /// from the wall clock in milliseconds never has its first beats ignored.)
    ///
    /// Its time is recorded in every case: the answer to any beat grants the keeper a
    /// lease, so the leader must count the lease from the latest beat it answered.
    pub fn observe(&mut self, report: NodeReport, now: Millis) {
        if self.is_reordered(&report) {
            if let Some(entry) = self.last_seen.get_mut(&report.node_id) {
                entry.0 = entry.0.max(now);
            }
            return;
        }
        if report.pg_running {
            self.pg_down_since.remove(&report.node_id);
        } else {
            self.pg_down_since.entry(report.node_id).or_insert(now);
        }
        self.last_seen.insert(report.node_id, (now, report));
    }

    /// Whether `report` is older than a beat already seen from the same keeper process.
    pub fn is_reordered(&self, report: &NodeReport) -> bool {
        self.last_seen
            .get(&report.node_id)
            .is_some_and(|(_, last)| {
                report.sequence < last.sequence
                    && report.sequence.saturating_add(REORDER_WINDOW) >= last.sequence
            })
    }

    /// Forget a node (dropped).
    pub fn forget(&mut self, node: NodeId) {
        self.last_seen.remove(&node);
        self.pg_down_since.remove(&node);
    }

    pub fn report(&self, node: NodeId) -> Option<&NodeReport> {
        self.last_seen.get(&node).map(|(_, r)| r)
    }
}

/// Events worth recording when `report` follows `prev` (the previous beat of the same
/// node): the keeper restarted PostgreSQL after a crash, or fenced it. Counters belong to
/// one keeper process; a counter that went down is a restarted keeper, whose new counts
/// are all news.
pub fn keeper_events(prev: Option<&NodeReport>, report: &NodeReport, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let before = |f: fn(&NodeReport) -> u64| match prev {
        Some(p) if f(p) <= f(report) => f(p),
        _ => 0,
    };
    let restarts = report.pg_restarts - before(|r| r.pg_restarts);
    if restarts > 0 {
        out.push(format!(
            "PostgreSQL on node {name} exited unexpectedly and its keeper restarted it in place ({restarts} time(s) since the previous report; {} since the keeper started)",
            report.pg_restarts
        ));
    }
    let fences = report.fences - before(|r| r.fences);
    if fences > 0 {
        out.push(format!(
            "node {name} fenced itself: its keeper stopped PostgreSQL because its lease ran out without an answer from the monitor group ({fences} time(s) since the previous report)"
        ));
    }
    out
}

/// Health as the current leader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Unhealthy,
    /// Not heard from since this leader took office.
    Unknown,
}

impl HealthTable {
    /// Milliseconds since the last heartbeat of `node`, if this leader has seen one.
    pub fn last_seen_ago(&self, node: NodeId, now: Millis) -> Option<Millis> {
        self.last_seen
            .get(&node)
            .map(|(at, _)| now.saturating_sub(*at))
    }

    pub fn health(&self, node: NodeId, now: Millis, unhealthy_after_ms: Millis) -> Health {
        match self.last_seen_ago(node, now) {
            None => Health::Unknown,
            Some(ago) if ago > unhealthy_after_ms => Health::Unhealthy,
            Some(_) => Health::Healthy,
        }
    }

    /// Heard from recently and its PostgreSQL runs.
    pub fn is_healthy(&self, node: NodeId, now: Millis, unhealthy_after_ms: Millis) -> bool {
        self.health(node, now, unhealthy_after_ms) == Health::Healthy
            && self.report(node).is_some_and(|r| r.pg_running)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn report(node_id: NodeId) -> NodeReport {
        NodeReport {
            node_id,
            current_state: NodeState::Secondary,
            pg_running: true,
            pg_in_recovery: true,
            current_lsn: None,
            received_lsn: None,
            replayed_lsn: None,
            timeline: 1,
            system_identifier: 1,
            replication: Vec::new(),
            sequence: 1,
            pg_restarts: 0,
            fences: 0,
        }
    }

    #[test]
    fn unseen_is_unknown_not_down() {
        let h = HealthTable::new(1_000);
        assert_eq!(h.health(3, 1_000_000, 10), Health::Unknown);
    }

    #[test]
    fn reordered_beat_is_ignored() {
        let mut h = HealthTable::new(0);
        let mut r = report(1);
        r.sequence = 5;
        h.observe(r.clone(), 100);
        r.sequence = 4;
        r.pg_running = false;
        h.observe(r, 200);
        assert!(
            h.report(1).is_some_and(|r| r.pg_running),
            "content of the newer beat kept"
        );
        assert_eq!(
            h.last_seen_ago(1, 300),
            Some(100),
            "but the lease counts from the later receipt"
        );
    }

    /// Seen while writing the `apply` fuzz target, whose corpus replays it
    /// (fuzz/corpus/apply/crash-sequence-overflow): a keeper's sequence is any u64 it
    /// sends, and a beat just below u64::MAX after one at u64::MAX overflowed the window
    /// arithmetic (a panic in debug builds; in release it wrapped and took the
    /// reordered beat for a restarted keeper).
    #[test]
    fn a_sequence_near_the_end_of_u64_is_still_ordered() {
        let mut h = HealthTable::new(0);
        let mut r = report(1);
        r.sequence = u64::MAX;
        h.observe(r.clone(), 100);
        r.sequence = u64::MAX - 1;
        r.pg_running = false;
        assert!(h.is_reordered(&r));
        h.observe(r, 200);
        assert!(
            h.report(1).is_some_and(|r| r.pg_running),
            "the reordered beat is ignored"
        );
    }

    #[test]
    fn restarted_keeper_is_heard_despite_a_lower_sequence() {
        let mut h = HealthTable::new(0);
        let mut r = report(1);
        r.sequence = 500;
        h.observe(r.clone(), 100);
        r.sequence = 1;
        r.pg_running = false;
        h.observe(r, 200);
        assert!(h.report(1).is_some_and(|r| !r.pg_running));
    }
}
