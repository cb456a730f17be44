//! Synchronous replication: which standbys a primary waits for, and how that is written
//! as `synchronous_standby_names`.
//!
//! A commit acknowledged under `ANY n (m1, ..., mk)` is on at least `n` of those `k`
//! standbys. So LSNs reported (after the primary was fenced) by `k - n + 1` of them
//! include one at or past every acknowledged commit. The primary may be running an
//! older configuration than the newest one for a while; every configuration it may be
//! running stays in the group's `sync_history` until it confirms a synchronous commit
//! under a newer one, and a failover must satisfy all of them.

use crate::model::{ClusterState, GroupId, Node, NodeId, NodeState, QuorumLossPolicy, SyncConfig};

/// Whether `n` belongs in the synchronous set of its group's primary `primary`.
pub fn is_sync_member(n: &Node, primary: NodeId) -> bool {
    n.in_sync_set && may_be_sync_member(n, primary)
}

/// Whether `n` is a standby the primary `primary` expects to wait for once it has joined:
/// a quorum node of the group, not in (or entering) maintenance, not dropped.
fn may_be_sync_member(n: &Node, primary: NodeId) -> bool {
    n.id != primary
        && n.replication_quorum
        && !n.goal_state.is_maintenance()
        && n.goal_state != NodeState::Dropped
}

/// The configuration the group's primary should run now, or None without a primary.
pub fn desired_sync(
    state: &ClusterState,
    formation: &str,
    group_id: GroupId,
) -> Option<SyncConfig> {
    let primary = state.primary_of(formation, group_id)?;
    let settings = state.formations.get(formation)?.settings.clone();
    let mut members: Vec<NodeId> = state
        .group_nodes(formation, group_id)
        .filter(|n| is_sync_member(n, primary.id))
        .map(|n| n.id)
        .collect();
    if members.is_empty()
        && settings.number_sync_standbys > 0
        && settings.on_quorum_loss == QuorumLossPolicy::Block
        && primary.goal_state != NodeState::Single
    {
        // No standby is in sync yet (a new primary after a failover whose standbys have
        // not joined, a first primary whose first standby is still catching up). Under
        // block the count must not silently become 0: name the standbys expected, so
        // that commits wait until one of them streams and has flushed them.
        members = state
            .group_nodes(formation, group_id)
            .filter(|n| may_be_sync_member(n, primary.id))
            .map(|n| n.id)
            .collect();
        let others = state
            .group_nodes(formation, group_id)
            .any(|n| n.id != primary.id && n.goal_state != NodeState::Dropped);
        if members.is_empty() && others {
            // Standbys, but none may count toward synchronous commit (the operator took
            // them out of the quorum): commits wait for a name no standby has.
            return Some(SyncConfig {
                seq: 0,
                number: 1,
                members: Vec::new(),
                async_by_choice: false,
            });
        }
    }
    let (number, async_by_choice) = if settings.number_sync_standbys == 0 {
        (0, true)
    } else if primary.goal_state == NodeState::WaitPrimary
        && settings.on_quorum_loss == QuorumLossPolicy::Continue
        && !members.is_empty()
    {
        // The orchestrator put the primary in wait_primary because its quorum standbys
        // are gone and the operator chose to keep writing.
        (0, true)
    } else {
        let n = settings.number_sync_standbys.min(members.len() as u32);
        (n, false)
    };
    Some(SyncConfig {
        seq: 0,
        number,
        members,
        async_by_choice,
    })
}

/// Quote a node name as a PostgreSQL identifier inside synchronous_standby_names.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A standby name no node can have (node names are lowercase letters, digits, `-`, `_`):
/// what a primary waits for under `on_quorum_loss = block` when no standby may count.
pub const NO_STANDBY: &str = "pgquorum: no quorum standby";

/// `ANY n ("b", "c")`, or "" when nothing is waited for (`number` 0). A configuration
/// that must wait but names no existing node waits for [`NO_STANDBY`]: the count of
/// synchronous standbys never silently becomes 0.
pub fn render(state: &ClusterState, config: &SyncConfig) -> String {
    if config.number == 0 {
        return String::new();
    }
    let names: Vec<String> = config
        .members
        .iter()
        .filter_map(|id| state.nodes.get(id))
        .map(|n| quote(&n.name))
        .collect();
    if names.is_empty() {
        return format!("ANY 1 ({})", quote(NO_STANDBY));
    }
    format!(
        "ANY {} ({})",
        config.number.min(names.len() as u32),
        names.join(", ")
    )
}

/// What a failover must know before promoting anyone: for every configuration the old
/// primary may have run, enough of its members reported an LSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// Reports of these nodes cover every acknowledged commit.
    Met,
    /// Need `needed` reports among `members`, have `have`.
    Waiting {
        needed: usize,
        have: usize,
        members: Vec<NodeId>,
    },
    /// The primary acknowledged commits that no standby was required to hold (no
    /// synchronous standby yet): no standby can be proven to hold them.
    Unprotected,
}

pub fn requirement(history: &[SyncConfig], witnesses: &[NodeId]) -> Requirement {
    if history.is_empty() {
        return if witnesses.is_empty() {
            Requirement::Waiting {
                needed: 1,
                have: 0,
                members: Vec::new(),
            }
        } else {
            Requirement::Met
        };
    }
    for c in history {
        if c.number == 0 {
            if !c.async_by_choice {
                return Requirement::Unprotected;
            }
            if witnesses.is_empty() {
                return Requirement::Waiting {
                    needed: 1,
                    have: 0,
                    members: c.members.clone(),
                };
            }
            continue;
        }
        if c.members.is_empty() {
            // Waited for a standby that does not exist: nothing was acknowledged under it.
            continue;
        }
        let k = c.members.len();
        let needed = k + 1 - (c.number as usize).min(k);
        let have = c.members.iter().filter(|m| witnesses.contains(m)).count();
        if have < needed {
            return Requirement::Waiting {
                needed,
                have,
                members: c.members.clone(),
            };
        }
    }
    Requirement::Met
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(number: u32, members: &[NodeId]) -> SyncConfig {
        SyncConfig {
            seq: 0,
            number,
            members: members.to_vec(),
            async_by_choice: false,
        }
    }

    #[test]
    fn any_one_of_two_needs_both_reports() {
        let h = [cfg(1, &[2, 3])];
        assert!(matches!(
            requirement(&h, &[2]),
            Requirement::Waiting {
                needed: 2,
                have: 1,
                ..
            }
        ));
        assert_eq!(requirement(&h, &[2, 3]), Requirement::Met);
    }

    #[test]
    fn any_two_of_three_needs_two_reports() {
        let h = [cfg(2, &[2, 3, 4])];
        assert_eq!(requirement(&h, &[2, 4]), Requirement::Met);
    }

    #[test]
    fn every_config_the_primary_may_run_counts() {
        let h = [cfg(1, &[2, 3]), cfg(1, &[2])];
        assert!(matches!(requirement(&h, &[2]), Requirement::Waiting { .. }));
    }

    #[test]
    fn a_configuration_waiting_for_no_existing_standby_protects_nothing_to_wait_for() {
        assert_eq!(requirement(&[cfg(1, &[])], &[]), Requirement::Met);
        let h = [cfg(1, &[2, 3]), cfg(1, &[])];
        assert!(matches!(requirement(&h, &[2]), Requirement::Waiting { .. }));
        assert_eq!(requirement(&h, &[2, 3]), Requirement::Met);
    }

    #[test]
    fn no_sync_standby_means_unprotected() {
        assert_eq!(requirement(&[cfg(0, &[])], &[2]), Requirement::Unprotected);
    }
}
