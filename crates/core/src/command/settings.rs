//! Node and formation settings, and the quorum capacity they must leave.

use super::{FormationSetting, NodeSetting, Outcome, MAX_SYNC_STANDBYS};
use crate::error::CoreError;
use crate::model::{ClusterState, GroupId, Millis, NodeId, QuorumLossPolicy};

impl ClusterState {
    /// How many standbys could count toward synchronous commit in a group, if `without`
    /// were out of it, whichever node is primary: the least, over every node that is or
    /// may become primary (the current primary and every candidate), of the quorum nodes
    /// not in maintenance besides it. Counting only the current primary accepted
    /// `replication-quorum false` on the primary of a 2-node group, and after a failover
    /// the new primary had no standby that counted (its commits blocked for good).
    /// `quorum_override` / `priority_override`: a setting about to change.
    fn quorum_capacity(
        &self,
        formation: &str,
        group_id: GroupId,
        without: Option<NodeId>,
        quorum_override: Option<(NodeId, bool)>,
    ) -> (usize, usize) {
        self.quorum_capacity_with(formation, group_id, without, quorum_override, None)
    }

    fn quorum_capacity_with(
        &self,
        formation: &str,
        group_id: GroupId,
        without: Option<NodeId>,
        quorum_override: Option<(NodeId, bool)>,
        priority_override: Option<(NodeId, u8)>,
    ) -> (usize, usize) {
        let mut live = 0;
        let mut members = Vec::new();
        for n in self.group_nodes(formation, group_id) {
            if n.is_dropping() {
                continue;
            }
            live += 1;
            if Some(n.id) == without {
                continue;
            }
            let quorum = match quorum_override {
                Some((id, q)) if id == n.id => q,
                _ => n.replication_quorum,
            };
            let priority = match priority_override {
                Some((id, p)) if id == n.id => p,
                _ => n.candidate_priority,
            };
            let in_maintenance = n.goal_state.is_maintenance();
            let counts = quorum && !in_maintenance;
            let may_be_primary = n.goal_state.is_writable() || (priority > 0 && !in_maintenance);
            members.push((n.id, counts, may_be_primary));
        }
        let counting = members.iter().filter(|m| m.1).count();
        let capacity = members
            .iter()
            .filter(|m| m.2)
            .map(|p| counting - usize::from(p.1))
            .min()
            .unwrap_or(counting.saturating_sub(1));
        (live, capacity)
    }

    /// Refuse a change that would leave a group with fewer quorum standbys than
    /// number_sync_standbys while the policy is to block writes.
    pub(super) fn check_capacity(
        &self,
        formation: &str,
        group_id: GroupId,
        without: Option<NodeId>,
        quorum_override: Option<(NodeId, bool)>,
        leaves_group: bool,
        what: &str,
    ) -> Result<(), CoreError> {
        // Dropping down to one node leaves a single primary: explicit, and nothing to
        // synchronise with. Maintenance keeps the node in the group.
        let leaves = leaves_group;
        let settings = self.settings(formation);
        if settings.number_sync_standbys == 0
            || settings.on_quorum_loss == QuorumLossPolicy::Continue
        {
            return Ok(());
        }
        let (live, capacity) = self.quorum_capacity(formation, group_id, without, quorum_override);
        let remaining = if leaves { live.saturating_sub(1) } else { live };
        if remaining >= 2 && (capacity as u32) < settings.number_sync_standbys {
            return Err(CoreError::NotAllowed(format!(
                "{what} would leave {capacity} quorum standby(s) for number_sync_standbys = {} (counting a failover to any candidate): the primary could not keep synchronous replication. Lower number-sync-standbys or set on-quorum-loss continue first",
                settings.number_sync_standbys
            )));
        }
        Ok(())
    }

    pub(super) fn set_node_setting(
        &mut self,
        formation: &str,
        node: &str,
        setting: &NodeSetting,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let id = self.lookup(formation, node)?;
        let group_id = self.nodes.get(&id).map(|n| n.group_id).unwrap_or(0);
        let text = match setting {
            NodeSetting::CandidatePriority(p) => {
                if *p > 100 {
                    return Err(CoreError::InvalidSetting(format!(
                        "candidate priority {p} is outside 0-100"
                    )));
                }
                // A node that may become primary takes its own vote out of the quorum.
                if *p > 0 {
                    let settings = self.settings(formation);
                    let (live, capacity) =
                        self.quorum_capacity_with(formation, group_id, None, None, Some((id, *p)));
                    if settings.number_sync_standbys > 0
                        && settings.on_quorum_loss != QuorumLossPolicy::Continue
                        && live >= 2
                        && (capacity as u32) < settings.number_sync_standbys
                    {
                        return Err(CoreError::NotAllowed(format!(
                            "candidate priority {p} for node {node} would let it become a primary with {capacity} quorum standby(s) for number_sync_standbys = {}: after a failover to it the primary could not keep synchronous replication. Set replication-quorum true on the other nodes, lower number-sync-standbys or set on-quorum-loss continue first",
                            settings.number_sync_standbys
                        )));
                    }
                }
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.candidate_priority = *p;
                }
                format!("node {node} candidate priority set to {p}")
            }
            NodeSetting::ReplicationQuorum(q) => {
                if !q {
                    self.check_capacity(
                        formation,
                        group_id,
                        None,
                        Some((id, false)),
                        false,
                        &format!("taking node {node} out of the replication quorum"),
                    )?;
                }
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.replication_quorum = *q;
                }
                format!("node {node} replication quorum set to {q}")
            }
        };
        self.node_event(now, id, text.clone());
        self.refresh_sync(formation, group_id, now);
        Ok(Outcome::Done { description: text })
    }

    pub(super) fn set_formation_setting(
        &mut self,
        formation: &str,
        setting: &FormationSetting,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let Some(f) = self.formations.get(formation) else {
            return Err(CoreError::UnknownFormation(formation.to_string()));
        };
        let mut s = f.settings.clone();
        let groups: Vec<GroupId> = {
            let mut g: Vec<GroupId> = self
                .nodes
                .values()
                .filter(|n| n.formation == formation)
                .map(|n| n.group_id)
                .collect();
            g.dedup();
            g
        };
        let text = match setting {
            FormationSetting::NumberSyncStandbys(n) => {
                if *n > MAX_SYNC_STANDBYS {
                    return Err(CoreError::InvalidSetting(format!(
                        "number_sync_standbys {n} is above the maximum {MAX_SYNC_STANDBYS}"
                    )));
                }
                for g in &groups {
                    let (live, capacity) = self.quorum_capacity(formation, *g, None, None);
                    if live >= 2 && (capacity as u32) < *n {
                        return Err(CoreError::NotAllowed(format!(
                            "number_sync_standbys {n} is more than the {capacity} quorum standby(s) of group {g}"
                        )));
                    }
                }
                s.number_sync_standbys = *n;
                format!("number_sync_standbys set to {n}")
            }
            FormationSetting::HeartbeatIntervalMs(v) => {
                if !(10..=60_000).contains(v) || v.saturating_mul(2) > s.lease_ms {
                    return Err(CoreError::InvalidSetting(format!(
                        "heartbeat interval {v} ms: use 10-60000 ms and at most half the lease ({} ms)",
                        s.lease_ms
                    )));
                }
                s.heartbeat_interval_ms = *v;
                format!("heartbeat interval set to {v} ms")
            }
            FormationSetting::LeaseMs(v) => {
                if *v > 3_600_000
                    || *v < s.heartbeat_interval_ms.saturating_mul(2)
                    || s.lease_margin_ms.saturating_mul(20) < *v
                {
                    return Err(CoreError::InvalidSetting(format!(
                        "lease {v} ms: use at least two heartbeat intervals ({} ms), at most 3600000 ms, and at most 20 times the lease margin ({} ms)",
                        s.heartbeat_interval_ms.saturating_mul(2),
                        s.lease_margin_ms
                    )));
                }
                s.lease_ms = *v;
                format!("lease set to {v} ms")
            }
            FormationSetting::LeaseMarginMs(v) => {
                if v.saturating_mul(20) < s.lease_ms || *v > s.lease_ms.max(1) {
                    return Err(CoreError::InvalidSetting(format!(
                        "lease margin {v} ms: use between a twentieth of the lease and the lease ({}-{} ms), to cover clock-rate drift and message delay",
                        s.lease_ms.div_ceil(20),
                        s.lease_ms
                    )));
                }
                s.lease_margin_ms = *v;
                format!("lease margin set to {v} ms")
            }
            FormationSetting::OnQuorumLoss(p) => {
                s.on_quorum_loss = *p;
                match p {
                    QuorumLossPolicy::Block => "on_quorum_loss set to block: a primary without quorum standby blocks commits".to_string(),
                    QuorumLossPolicy::Continue => "on_quorum_loss set to continue: a primary that loses its last quorum standby will acknowledge commits unsynchronized (they can be lost by a failover)".to_string(),
                }
            }
        };
        if let Some(f) = self.formations.get_mut(formation) {
            f.settings = s;
        }
        self.push_event(now, formation, 0, None, text.clone());
        for g in groups {
            self.refresh_sync(formation, g, now);
        }
        Ok(Outcome::Done { description: text })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::fixture::{id, refused, steady, T0};
    use super::super::{Command, FormationSetting, NodeSetting, MAX_SYNC_STANDBYS};
    use crate::{CoreError, ErrorClass, QuorumLossPolicy, DEFAULT_FORMATION};

    fn node_setting(node: &str, setting: NodeSetting) -> Command {
        Command::SetNodeSetting {
            formation: DEFAULT_FORMATION.into(),
            node: node.into(),
            setting,
        }
    }

    fn formation_setting(setting: FormationSetting) -> Command {
        Command::SetFormationSetting {
            formation: DEFAULT_FORMATION.into(),
            setting,
        }
    }

    #[test]
    fn settings_are_recorded() {
        let mut c = steady(&["a", "b", "c"]);
        let b = id(&c, "b");
        c.apply(&node_setting("b", NodeSetting::CandidatePriority(0)), T0)
            .unwrap();
        assert_eq!(c.nodes[&b].candidate_priority, 0);
        c.apply(
            &node_setting("b", NodeSetting::ReplicationQuorum(false)),
            T0,
        )
        .unwrap();
        assert!(!c.nodes[&b].replication_quorum);
        for s in [
            FormationSetting::LeaseMs(3000),
            FormationSetting::LeaseMarginMs(600),
            FormationSetting::HeartbeatIntervalMs(500),
            FormationSetting::OnQuorumLoss(QuorumLossPolicy::Continue),
            FormationSetting::NumberSyncStandbys(0),
        ] {
            c.apply(&formation_setting(s), T0).unwrap();
        }
        let s = c.settings(DEFAULT_FORMATION);
        assert_eq!(
            (s.lease_ms, s.lease_margin_ms, s.heartbeat_interval_ms),
            (3000, 600, 500)
        );
        assert_eq!(s.on_quorum_loss, QuorumLossPolicy::Continue);
        assert_eq!(s.number_sync_standbys, 0);
    }

    #[test]
    fn invalid_values_are_refused_and_change_nothing() {
        let mut c = steady(&["a", "b", "c"]);
        let bad = [
            node_setting("b", NodeSetting::CandidatePriority(101)),
            formation_setting(FormationSetting::NumberSyncStandbys(MAX_SYNC_STANDBYS + 1)),
            // Below 10 ms, and more than half the lease (1500 ms).
            formation_setting(FormationSetting::HeartbeatIntervalMs(5)),
            formation_setting(FormationSetting::HeartbeatIntervalMs(800)),
            // Under two heartbeats, and over 20 margins (300 ms).
            formation_setting(FormationSetting::LeaseMs(300)),
            formation_setting(FormationSetting::LeaseMs(6_001)),
            // Under a twentieth of the lease, and over the lease.
            formation_setting(FormationSetting::LeaseMarginMs(70)),
            formation_setting(FormationSetting::LeaseMarginMs(1_501)),
        ];
        for cmd in &bad {
            let e = refused(&mut c, cmd, ErrorClass::Invalid);
            assert!(matches!(e, CoreError::InvalidSetting(_)), "{cmd:?}: {e:?}");
        }
        let e = refused(
            &mut c,
            &node_setting("zz", NodeSetting::CandidatePriority(1)),
            ErrorClass::NotFound,
        );
        assert!(matches!(e, CoreError::UnknownNode(_)), "{e:?}");
        let e = refused(
            &mut c,
            &Command::SetFormationSetting {
                formation: "nope".into(),
                setting: FormationSetting::LeaseMs(2000),
            },
            ErrorClass::NotFound,
        );
        assert!(matches!(e, CoreError::UnknownFormation(_)), "{e:?}");
    }

    #[test]
    fn settings_that_would_leave_too_few_quorum_standbys_are_refused() {
        // Three nodes: whichever is primary, two standbys count; three cannot be required.
        let mut c = steady(&["a", "b", "c"]);
        c.apply(
            &formation_setting(FormationSetting::NumberSyncStandbys(2)),
            T0,
        )
        .unwrap();
        let e = refused(
            &mut c,
            &formation_setting(FormationSetting::NumberSyncStandbys(3)),
            ErrorClass::NotAllowedNow,
        );
        assert!(e.to_string().contains("more than the"), "{e}");
        // Out of the quorum, b leaves c as the only standby that counts, and after a
        // failover to c none: refused under `block`, allowed under `continue`.
        let mut c = steady(&["a", "b"]);
        let e = refused(
            &mut c,
            &node_setting("b", NodeSetting::ReplicationQuorum(false)),
            ErrorClass::NotAllowedNow,
        );
        assert!(e.to_string().contains("replication quorum"), "{e}");
        let continue_ =
            formation_setting(FormationSetting::OnQuorumLoss(QuorumLossPolicy::Continue));
        c.apply(&continue_, T0).unwrap();
        c.apply(
            &node_setting("b", NodeSetting::ReplicationQuorum(false)),
            T0,
        )
        .unwrap();
        // Back under `block`, with b out of the quorum no standby counts for any
        // primary: a candidate priority above 0 is checked against that and refused.
        c.apply(
            &formation_setting(FormationSetting::OnQuorumLoss(QuorumLossPolicy::Block)),
            T0,
        )
        .unwrap();
        let e = refused(
            &mut c,
            &node_setting("b", NodeSetting::CandidatePriority(10)),
            ErrorClass::NotAllowedNow,
        );
        assert!(e.to_string().contains("candidate priority 10"), "{e}");
        // Priority 0 takes nothing away.
        c.apply(&node_setting("b", NodeSetting::CandidatePriority(0)), T0)
            .unwrap();
    }
}
