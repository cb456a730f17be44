//! The invariants every reachable `ClusterState` keeps, checked after every apply.
//! The same rules as crates/core/tests/properties.rs, widened to every group and
//! formation. A violation panics: libFuzzer then keeps the input as a crash.

use std::collections::BTreeMap;

use pgquorum_core::{
    check_formation_name, check_node_name, ClusterState, Command, CoreError, GroupId, HostName,
    NodeId, NodeState, Outcome, MAX_EVENTS, MAX_GROUP_NODES,
};

/// What a state must look like whatever commands were applied to it.
pub fn state(s: &ClusterState) {
    assert!(s.events.len() <= MAX_EVENTS, "events unbounded");
    let mut writable: BTreeMap<(&str, GroupId), Vec<NodeId>> = BTreeMap::new();
    let mut sizes: BTreeMap<(&str, GroupId), usize> = BTreeMap::new();
    for (id, n) in &s.nodes {
        assert_eq!(*id, n.id, "node stored under another id");
        assert!(*id <= s.next_node_id, "id {id} above next_node_id");
        check_node_name(&n.name).unwrap_or_else(|e| panic!("stored node name: {e}"));
        check_formation_name(&n.formation).unwrap_or_else(|e| panic!("stored formation: {e}"));
        assert_eq!(
            HostName::parse(n.host.as_str()).as_ref(),
            Ok(&n.host),
            "stored host"
        );
        assert!(
            n.candidate_priority <= 100,
            "priority {}",
            n.candidate_priority
        );
        *sizes.entry((n.formation.as_str(), n.group_id)).or_default() += 1;
        if n.goal_state.is_writable() {
            writable
                .entry((n.formation.as_str(), n.group_id))
                .or_default()
                .push(n.id);
        }
    }
    index(s);
    for (g, ids) in writable {
        assert!(ids.len() <= 1, "group {g:?} has writable goals on {ids:?}");
    }
    for (g, n) in sizes {
        assert!(n <= MAX_GROUP_NODES, "group {g:?} has {n} nodes");
    }
    for (name, f) in &s.formations {
        assert_eq!(name, &f.name, "formation stored under another name");
    }
}

/// [`state`], and what a snapshot stores reads back to the same state (the index
/// rebuilt). Costlier: run at the end of a sequence.
pub fn state_and_snapshot(s: &ClusterState) {
    state(s);
    let json = serde_json::to_vec(s).expect("a state always serialises");
    let back: ClusterState = serde_json::from_slice(&json).expect("a snapshot reads back");
    assert_eq!(&back, s, "snapshot round trip");
}

/// Applies `cmd` at `now` to `s` and to `replica` (another member's copy, equal to
/// `s` before the call) and checks everything a single apply must keep. The replica
/// is what the state was before: no clone per command.
pub fn apply(
    s: &mut ClusterState,
    replica: &mut ClusterState,
    cmd: &Command,
    now: u64,
    by: Option<&str>,
) -> Result<Outcome, CoreError> {
    // Every command travels through the Raft log as JSON: it must read back the same.
    let json = serde_json::to_vec(cmd).expect("a command always serialises");
    let back: Command = serde_json::from_slice(&json).expect("a logged command reads back");
    assert_eq!(&back, cmd, "command round trip");

    let r = s.apply_by(cmd, now, by);
    if r.is_err() {
        assert_eq!(*s, *replica, "refused {cmd:?} changed the state");
    }
    if let (Ok(Outcome::Done { .. }), Command::AssignGoal { node_id, goal, .. }) = (&r, cmd) {
        // A writable goal is never given while another node of the group may still
        // take writes unfenced (`replica` is still the state before).
        let before = &*replica;
        let was = &before.nodes[node_id];
        if goal.is_writable() && !was.goal_state.is_writable() {
            for other in before
                .group_nodes(&was.formation, was.group_id)
                .filter(|n| n.id != *node_id)
            {
                let fenced = matches!(
                    other.goal_state,
                    NodeState::Demoted | NodeState::Maintenance | NodeState::Dropped
                ) || other.reported_state.is_stopped();
                assert!(
                    fenced || !other.reported_state.is_writable(),
                    "{node_id} promoted while {} is unfenced",
                    other.name
                );
            }
        }
    }
    // Deterministic: another member applying the same entry gets the same.
    let r2 = replica.apply_by(cmd, now, by);
    assert_eq!(r, r2, "apply is not deterministic");
    assert_eq!(*s, *replica, "apply is not deterministic");
    state(s);
    r
}

/// [`apply`] to a copy of `s` (for a single command).
pub fn apply_once(s: &mut ClusterState, cmd: &Command, now: u64, by: Option<&str>) {
    let mut replica = s.clone();
    let _ = apply(s, &mut replica, cmd, now, by);
}

/// The derived group index agrees with a scan of the nodes (also for a state read
/// back from a snapshot, whatever it holds).
pub fn index(s: &ClusterState) {
    for n in s.nodes.values() {
        let scanned: Vec<NodeId> = s
            .nodes
            .values()
            .filter(|m| m.formation == n.formation && m.group_id == n.group_id)
            .map(|m| m.id)
            .collect();
        let indexed: Vec<NodeId> = s
            .group_nodes(&n.formation, n.group_id)
            .map(|m| m.id)
            .collect();
        assert_eq!(
            scanned, indexed,
            "group index of {}/{}",
            n.formation, n.group_id
        );
    }
}
