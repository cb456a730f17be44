//! Lease arithmetic, with time passed in.
//!
//! The keeper counts its lease from the moment it *sent* the heartbeat that got a
//! successful answer and stops taking writes when `lease_ms` has passed. The monitor
//! leader counts from when it *received* that heartbeat (always later), and treats the
//! lease as surely expired only after `lease_ms + lease_margin_ms`: the margin covers the
//! keeper's clock running slower than the monitor's and the time the answer spent in
//! flight. A node this leader has never heard from is counted from `leader_since`: an
//! earlier leader may have granted it a lease just before losing office, and a deposed
//! leader stops granting leases before the next one is elected (the monitor confirms
//! its leadership before answering a heartbeat).

use crate::health::HealthTable;
use crate::model::{FormationSettings, Millis, NodeId};

/// The instant from which the leader counts `node`'s lease.
pub fn lease_base(health: &HealthTable, node: NodeId) -> Millis {
    match health.last_seen.get(&node) {
        Some((at, _)) => (*at).max(health.leader_since),
        None => health.leader_since,
    }
}

/// When the leader may treat `node`'s lease as surely expired.
pub fn lease_surely_expired_at(
    health: &HealthTable,
    node: NodeId,
    settings: &FormationSettings,
) -> Millis {
    lease_base(health, node)
        .saturating_add(settings.lease_ms)
        .saturating_add(settings.lease_margin_ms)
}

pub fn lease_surely_expired(
    health: &HealthTable,
    node: NodeId,
    settings: &FormationSettings,
    now: Millis,
) -> bool {
    now >= lease_surely_expired_at(health, node, settings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::tests::report;

    #[test]
    fn lease_counts_from_last_heartbeat_received_plus_margin() {
        let s = FormationSettings::default();
        let mut h = HealthTable::new(0);
        h.observe(report(1), 10_000);
        assert!(!lease_surely_expired(&h, 1, &s, 10_000 + s.lease_ms));
        assert!(!lease_surely_expired(
            &h,
            1,
            &s,
            10_000 + s.lease_ms + s.lease_margin_ms - 1
        ));
        assert!(lease_surely_expired(
            &h,
            1,
            &s,
            10_000 + s.lease_ms + s.lease_margin_ms
        ));
    }

    #[test]
    fn unseen_node_counts_from_leader_since() {
        let s = FormationSettings::default();
        let h = HealthTable::new(50_000);
        assert!(!lease_surely_expired(&h, 7, &s, 50_000 + s.lease_ms));
        assert!(lease_surely_expired(
            &h,
            7,
            &s,
            50_000 + s.lease_ms + s.lease_margin_ms
        ));
    }
}
