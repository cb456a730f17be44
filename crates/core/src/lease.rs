//! Lease arithmetic, with time passed in.
//!
//! The keeper counts its lease from the moment it *sent* the heartbeat that got a
//! successful answer and stops taking writes when `lease_ms` has passed. The monitor
//! leader counts from when it *received* that heartbeat (always later), and treats the
//! lease as surely expired only after `lease_ms + lease_margin_ms`: the margin covers the
//! keeper's clock running slower than the monitor's and the time the answer spent in
//! flight. A node this leader has never heard from is counted from `leader_since`: an
//! earlier leader may have granted it a lease just before losing office, and a deposed
//! leader stops granting leases before the next one is elected.
//!
//! That last point is [`may_grant_lease`]: a member answers a heartbeat (grants a lease)
//! only while a quorum of voters, itself included, acknowledged an AppendEntries it sent
//! as leader of its current term less than `election_timeout_min` ago
//! ([`quorum_acked_at`]). A voter that acknowledged it refuses to vote for anyone else
//! for at least that long after it received it, so no other leader can exist yet; the
//! timing argument is in docs/ARCHITECTURE.md ("Leases need proof of leadership").

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

/// When a quorum of one voter configuration last acknowledged the leader: the latest
/// instant `t` such that a majority of `acks` acknowledged something the leader sent at
/// or after `t`. `acks` holds one entry per voter: the send time of the newest
/// AppendEntries it accepted in the leader's current term (`None`: none yet); the leader's
/// own entry is `Some(now)`. `None` when no majority has acknowledged anything.
pub fn quorum_acked_at(acks: &[Option<Millis>]) -> Option<Millis> {
    if acks.is_empty() {
        return None;
    }
    let mut sorted: Vec<Option<Millis>> = acks.to_vec();
    // Newest first; `None` (never acknowledged) sorts last.
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted[acks.len() / 2]
}

/// The same over a joint membership (during a membership change a leader needs a quorum
/// of every configuration): the oldest of the configurations' quorum times.
pub fn joint_quorum_acked_at(configs: &[Vec<Option<Millis>>]) -> Option<Millis> {
    if configs.is_empty() {
        return None;
    }
    configs.iter().map(|c| quorum_acked_at(c)).min().flatten()
}

/// Whether a leader whose quorum last acknowledged it at `quorum_acked_at` may grant (or
/// renew) a lease at `now`: only while that proof is younger than the election timeout's
/// minimum, all on the leader's own monotonic clock.
pub fn may_grant_lease(
    quorum_acked_at: Option<Millis>,
    now: Millis,
    election_timeout_min_ms: Millis,
) -> bool {
    quorum_acked_at.is_some_and(|t| now.saturating_sub(t) < election_timeout_min_ms)
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

    #[test]
    fn quorum_ack_is_the_majority_th_newest() {
        // Three voters: the leader (now = 1000) and one follower that acked at 900
        // make a quorum even though the third never answered.
        assert_eq!(quorum_acked_at(&[Some(1000), Some(900), None]), Some(900));
        assert_eq!(
            quorum_acked_at(&[Some(1000), Some(900), Some(950)]),
            Some(950)
        );
        // The leader alone is no quorum of three.
        assert_eq!(quorum_acked_at(&[Some(1000), None, None]), None);
        // Five voters need three.
        assert_eq!(
            quorum_acked_at(&[Some(1000), Some(10), Some(700), None, Some(600)]),
            Some(600)
        );
        assert_eq!(
            quorum_acked_at(&[Some(1000), Some(10), None, None, None]),
            None
        );
        // A single voter is its own quorum; no voters, no quorum.
        assert_eq!(quorum_acked_at(&[Some(5)]), Some(5));
        assert_eq!(quorum_acked_at(&[]), None);
        // Four voters need three.
        assert_eq!(
            quorum_acked_at(&[Some(1000), Some(900), Some(800), None]),
            Some(800)
        );
    }

    #[test]
    fn joint_quorum_needs_every_configuration() {
        let old = vec![Some(1000), Some(900), None];
        let new = vec![Some(1000), None, None];
        assert_eq!(joint_quorum_acked_at(std::slice::from_ref(&old)), Some(900));
        assert_eq!(joint_quorum_acked_at(&[old.clone(), new]), None);
        let new = vec![Some(1000), Some(800), Some(850)];
        assert_eq!(joint_quorum_acked_at(&[old, new]), Some(850));
        assert_eq!(joint_quorum_acked_at(&[]), None);
    }

    #[test]
    fn lease_granted_only_while_the_proof_is_younger_than_the_election_timeout() {
        assert!(may_grant_lease(Some(1000), 1000, 225));
        assert!(may_grant_lease(Some(1000), 1224, 225));
        assert!(!may_grant_lease(Some(1000), 1225, 225));
        assert!(!may_grant_lease(None, 1000, 225));
        // An ack stamped after `now` (clock read races) is not older than `now`.
        assert!(may_grant_lease(Some(1001), 1000, 225));
    }
}
