//! The monitor leader's decisions: what a heartbeat must record, which goals to assign,
//! and what each keeper is told.

use serde::{Deserialize, Serialize};

use crate::candidate::{fast_forward_source, rank, witnesses};
use crate::command::Command;
use crate::error::CoreError;
use crate::health::{HealthTable, NodeReport};
use crate::input::HostName;
use crate::lease::lease_surely_expired;
use crate::lsn::Lsn;
use crate::model::{
    ClusterState, FormationSettings, Group, GroupId, Millis, Node, NodeId, NodeState,
    QuorumLossPolicy,
};
use crate::sync::{render, requirement, Requirement};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub node_id: NodeId,
    pub name: String,
    pub host: HostName,
    pub port: u16,
    /// The node has streamed from a primary: its reported state is one a standby
    /// reaches only by streaming ([`NodeState::has_streamed`]). A primary creates a
    /// replication slot only for such a node, so that a registration that never
    /// streams holds no WAL.
    #[serde(default)]
    pub streamed: bool,
}

/// What a keeper is told in answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub goal_state: NodeState,
    pub primary: Option<PeerNode>,
    pub synchronous_standby_names: String,
    pub peers: Vec<PeerNode>,
    pub lease_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub on_quorum_loss: String,
    /// The node's rebuild request number (`perform reinit`): a keeper that completed a
    /// lower one wipes its data directory and clones the primary afresh.
    #[serde(default)]
    pub reinit: u64,
}

/// How far (bytes of WAL) a standby may lag and still count as caught up.
pub const CATCHUP_LAG_BYTES: u64 = 16 * 1024 * 1024;

/// Commands a heartbeat makes necessary (a reported state change), to be proposed by
/// the leader. Empty in steady state: heartbeats alone never cost a Raft write.
///
/// Call it after [`HealthTable::observe`]; a reordered beat (see
/// [`HealthTable::is_reordered`]) is ignored. During a failover, a node whose LSN report predates the
/// fencing of the old primary is recorded again (one write per node per failover).
pub fn on_heartbeat(
    state: &ClusterState,
    health: &HealthTable,
    report: &NodeReport,
    _now: Millis,
) -> Vec<Command> {
    let Some(node) = state.nodes.get(&report.node_id) else {
        return Vec::new();
    };
    if health.is_reordered(report) {
        return Vec::new();
    }
    let stale_lsn = report.current_state.reports_lsn()
        && node.goal_state.reports_lsn()
        && state
            .group(&node.formation, node.group_id)
            .and_then(|g| g.failover.as_ref())
            .and_then(|f| f.fenced_at)
            .is_some_and(|f| node.lsn_at < f);
    // A fast-forward that fetched more WAL (from a new source) records its new LSN.
    let failover = state
        .group(&node.formation, node.group_id)
        .and_then(|g| g.failover.as_ref());
    let lsn_moved = report.current_lsn != node.reported_lsn
        && report.current_state == node.reported_state
        && ((report.current_state.reports_lsn() && node.goal_state.reports_lsn())
            // The stopped old primary's final LSN, should it have to restart in place.
            || (report.current_state.is_stopped()
                && failover.is_some_and(|f| f.old_primary == node.id)));
    // Learned once per node (a Raft write the first time only), and refused when it
    // contradicts the group's: the service refuses such a heartbeat before this.
    let mut out = Vec::new();
    if report.system_identifier != 0
        && report.system_identifier != node.system_identifier
        && state
            .check_system_identifier(node.id, report.system_identifier)
            .is_ok()
    {
        out.push(Command::RecordSystemIdentifier {
            node_id: node.id,
            system_identifier: report.system_identifier,
        });
    }
    if node.reported_state == report.current_state
        && node.pg_running == report.pg_running
        && (node.timeline == report.timeline || report.timeline == 0)
        && !stale_lsn
        && !lsn_moved
    {
        return out;
    }
    out.push(Command::ReportState {
        node_id: node.id,
        state: report.current_state,
        lsn: report.current_lsn,
        timeline: report.timeline,
        pg_running: report.pg_running,
        sequence: report.sequence,
    });
    out
}

/// A node is unhealthy when the leader has not heard from it for a lease and its margin.
pub fn unhealthy_after(settings: &FormationSettings) -> Millis {
    settings.lease_ms.saturating_add(settings.lease_margin_ms)
}

/// The leader's periodic decision: goal assignments (failover, promotion, ...).
pub fn orchestrate(state: &ClusterState, health: &HealthTable, now: Millis) -> Vec<Command> {
    let mut out = Vec::new();
    for (fname, formation) in &state.formations {
        for gid in formation.groups.keys() {
            decide_group(state, health, now, fname, *gid, &mut out);
        }
    }
    out
}

/// The same decisions for one group only: what a heartbeat from one of its nodes may
/// have made necessary. Deciding on every heartbeat over the whole fleet would cost
/// O(nodes) per beat; one group is a handful of nodes.
pub fn orchestrate_group(
    state: &ClusterState,
    health: &HealthTable,
    now: Millis,
    formation: &str,
    group_id: GroupId,
) -> Vec<Command> {
    let mut out = Vec::new();
    decide_group(state, health, now, formation, group_id, &mut out);
    out
}

fn decide_group(
    state: &ClusterState,
    health: &HealthTable,
    now: Millis,
    formation: &str,
    group_id: GroupId,
    out: &mut Vec<Command>,
) {
    let Some(f) = state.formations.get(formation) else {
        return;
    };
    let Some(group) = f.groups.get(&group_id) else {
        return;
    };
    let ctx = Ctx {
        state,
        health,
        now,
        formation,
        group_id,
        group,
        settings: &f.settings,
        ua: unhealthy_after(&f.settings),
    };
    ctx.run(out);
}

struct Ctx<'a> {
    state: &'a ClusterState,
    health: &'a HealthTable,
    now: Millis,
    formation: &'a str,
    group_id: GroupId,
    group: &'a Group,
    settings: &'a FormationSettings,
    ua: Millis,
}

fn assign(out: &mut Vec<Command>, n: &Node, goal: NodeState, reason: String) {
    if n.goal_state != goal {
        out.push(Command::AssignGoal {
            node_id: n.id,
            goal,
            reason,
            expected: Some(n.goal_state),
        });
    }
}

impl<'a> Ctx<'a> {
    fn nodes(&self) -> impl Iterator<Item = &'a Node> + 'a {
        let (f, g) = (self.formation, self.group_id);
        self.state.group_nodes(f, g).filter(|n| !n.is_dropping())
    }

    /// Heard from recently with PostgreSQL running.
    fn healthy(&self, n: &Node) -> bool {
        self.health.is_healthy(n.id, self.now, self.ua)
    }

    /// Heard from recently (the keeper is alive), whatever PostgreSQL does.
    fn alive(&self, n: &Node) -> bool {
        self.health.health(n.id, self.now, self.ua) == crate::health::Health::Healthy
    }

    /// Observed and then lost: unknown is never down.
    fn lost(&self, n: &Node) -> bool {
        self.health.health(n.id, self.now, self.ua) == crate::health::Health::Unhealthy
            || self
                .health
                .pg_down_since
                .get(&n.id)
                .is_some_and(|since| self.now.saturating_sub(*since) >= self.ua)
    }

    /// PostgreSQL down for a lease and its margin since the node was given its goal.
    fn pg_down_too_long(&self, n: &Node) -> bool {
        self.alive(n)
            && self
                .health
                .pg_down_since
                .get(&n.id)
                .is_some_and(|since| self.now.saturating_sub((*since).max(n.goal_since)) >= self.ua)
    }

    fn run(&self, out: &mut Vec<Command>) {
        self.forget_silent_dropped(out);
        match self.state.primary_of(self.formation, self.group_id) {
            Some(p) => self.with_primary(p, out),
            None => self.failover(out),
        }
    }

    /// A node being dropped is removed when its keeper acknowledges (it reports
    /// `dropped`). One whose keeper is silent for a lease and its margin (or was never
    /// heard by this leader for that long) cannot acknowledge: it is removed anyway, so
    /// that nothing (a switchover, a re-registration of the name) waits for it. Its
    /// PostgreSQL is no primary (DropNode refuses a primary that others depend on) and,
    /// if it ever was, its lease has run out by then.
    fn forget_silent_dropped(&self, out: &mut Vec<Command>) {
        for n in self.state.group_nodes(self.formation, self.group_id) {
            if !n.is_dropping() {
                continue;
            }
            let silent_for = match self.health.last_seen_ago(n.id, self.now) {
                Some(ago) => ago,
                None => self.now.saturating_sub(self.health.leader_since),
            };
            if silent_for >= self.ua {
                out.push(Command::ForgetNode {
                    node_id: n.id,
                    reason: format!(
                        "dropped, and its keeper has been silent for {silent_for} ms: removed without its acknowledgement"
                    ),
                });
            }
        }
    }

    fn caught_up(&self, p: &Node, n: &Node) -> bool {
        let Some(pr) = self.health.report(p.id) else {
            return false;
        };
        // Bytes the standby's flush is behind the primary's position. A standby that
        // has not reported a flush position yet is behind all of it; a primary whose
        // position is unknown while it streams (one that has written no WAL yet, in the
        // simulation) has nothing to be behind.
        let lag = |flush: Option<Lsn>| match (pr.current_lsn, flush) {
            (None, _) => 0,
            (Some(c), None) => c.get(),
            (Some(c), Some(f)) => c.bytes_since(f),
        };
        let by_primary = pr.replication.iter().any(|r| {
            r.application_name == n.name
                && r.state == "streaming"
                && lag(r.flush_lsn) <= CATCHUP_LAG_BYTES
        });
        by_primary && self.healthy(n)
    }

    /// One decision round for a group with a primary: demote a primary that is gone,
    /// else move the primary along its own progression, then the standbys.
    fn with_primary(&self, p: &'a Node, out: &mut Vec<Command>) {
        let others: Vec<&'a Node> = self.nodes().filter(|n| n.id != p.id).collect();
        if self.demote_if_gone(p, &others, out) {
            return;
        }
        self.primary_progression(p, &others, out);
        self.standbys(p, &others, out);
    }

    /// Step 1, is the primary gone? Demotes it (lease surely expired, or PostgreSQL down
    /// too long) when a standby could take over; true when it did.
    fn demote_if_gone(&self, p: &'a Node, others: &[&'a Node], out: &mut Vec<Command>) -> bool {
        let can_take_over = others.iter().any(|n| {
            n.candidate_priority > 0
                && matches!(
                    n.reported_state,
                    NodeState::Secondary
                        | NodeState::Catchingup
                        | NodeState::JoinSecondary
                        | NodeState::ReportLsn
                        | NodeState::FastForward
                        | NodeState::PreparePromotion
                        | NodeState::WaitMaintenance
                )
        });
        if can_take_over {
            if lease_surely_expired(self.health, p.id, self.settings, self.now) {
                let why = match self.health.last_seen_ago(p.id, self.now) {
                    Some(ago) => format!("no heartbeat for {ago} ms: its lease ({} ms + {} ms margin) has surely expired", self.settings.lease_ms, self.settings.lease_margin_ms),
                    None => format!("not heard from since this monitor leader took office {} ms ago: its lease has surely expired", self.now.saturating_sub(self.health.leader_since)),
                };
                assign(
                    out,
                    p,
                    NodeState::Demoted,
                    format!("primary {} failed, {why}", p.name),
                );
                return true;
            }
            if self.pg_down_too_long(p) {
                assign(
                    out,
                    p,
                    NodeState::DemoteTimeout,
                    format!(
                        "PostgreSQL on primary {} has been down for {} ms or more",
                        p.name, self.ua
                    ),
                );
                return true;
            }
        }
        false
    }

    /// Step 2, the primary's own progression (single, wait_primary, primary,
    /// join_primary, apply_settings), once it has reached its goal.
    fn primary_progression(&self, p: &'a Node, others: &[&'a Node], out: &mut Vec<Command>) {
        let members = self
            .group
            .sync_history
            .last()
            .map(|c| c.members.clone())
            .unwrap_or_default();
        let quorum_lost = !members.is_empty()
            && members
                .iter()
                .filter_map(|m| self.state.nodes.get(m))
                .all(|m| self.lost(m));
        let continue_policy = self.settings.on_quorum_loss == QuorumLossPolicy::Continue;
        let some_secondary = others.iter().any(|n| {
            n.reported_state == NodeState::Secondary && n.goal_state == NodeState::Secondary
        });
        if p.reported_state == p.goal_state {
            match p.goal_state {
                NodeState::Single if !others.is_empty() => assign(
                    out,
                    p,
                    NodeState::WaitPrimary,
                    format!("node {} joined the group", others[0].name),
                ),
                NodeState::WaitPrimary => {
                    if others.is_empty() {
                        assign(
                            out,
                            p,
                            NodeState::Single,
                            "no other node left in the group".into(),
                        );
                    } else if some_secondary && !(continue_policy && quorum_lost) {
                        assign(
                            out,
                            p,
                            NodeState::Primary,
                            "a standby is in sync: enabling synchronous replication".into(),
                        );
                    }
                }
                NodeState::Primary | NodeState::JoinPrimary | NodeState::ApplySettings => {
                    let joining = others.iter().find(|n| {
                        n.reported_state == NodeState::WaitStandby
                            && n.goal_state == NodeState::WaitStandby
                    });
                    if others.is_empty() {
                        assign(
                            out,
                            p,
                            NodeState::Single,
                            "no other node left in the group".into(),
                        );
                    } else if continue_policy && quorum_lost {
                        assign(out, p, NodeState::WaitPrimary, "every quorum standby is lost and on_quorum_loss = continue: commits are now acknowledged without a synchronous standby".into());
                    } else if p.goal_state != NodeState::Primary {
                        // Back to primary, which confirms the newest configuration.
                        assign(out, p, NodeState::Primary, format!("{} done", p.goal_state));
                    } else if let Some(j) = joining {
                        assign(
                            out,
                            p,
                            NodeState::JoinPrimary,
                            format!(
                                "node {} is joining: allow its replication connection",
                                j.name
                            ),
                        );
                    } else if self.group.sync_history.len() > 1
                        && self.group.sync_history.last().is_some_and(|c| c.number > 0)
                    {
                        let names = self
                            .group
                            .sync_history
                            .last()
                            .map(|c| render(self.state, c))
                            .unwrap_or_default();
                        assign(
                            out,
                            p,
                            NodeState::ApplySettings,
                            format!("synchronous_standby_names must become '{names}'"),
                        );
                    }
                }
                _ => {}
            }
        }
    }

    /// Step 3, the standbys, given the primary `p`.
    fn standbys(&self, p: &'a Node, others: &[&'a Node], out: &mut Vec<Command>) {
        for &n in others {
            match n.goal_state {
                NodeState::WaitStandby
                    if n.reported_state == NodeState::WaitStandby
                        && matches!(
                            p.reported_state,
                            NodeState::WaitPrimary | NodeState::JoinPrimary
                        )
                        && p.goal_state == p.reported_state =>
                {
                    assign(
                        out,
                        n,
                        NodeState::Catchingup,
                        format!("primary {} accepts its replication connection", p.name),
                    );
                }
                NodeState::Catchingup | NodeState::JoinSecondary
                    if n.reported_state == n.goal_state && self.caught_up(p, n) =>
                {
                    assign(
                        out,
                        n,
                        NodeState::Secondary,
                        format!("caught up with primary {}", p.name),
                    );
                }
                NodeState::Secondary
                    if n.reported_state == NodeState::Secondary && self.lost(n) =>
                {
                    assign(
                        out,
                        n,
                        NodeState::Catchingup,
                        "unhealthy: no heartbeat or PostgreSQL down".into(),
                    );
                }
                NodeState::ReportLsn
                | NodeState::FastForward
                | NodeState::PreparePromotion
                | NodeState::StopReplication => {
                    assign(
                        out,
                        n,
                        NodeState::JoinSecondary,
                        format!("{} is the new primary", p.name),
                    );
                }
                NodeState::Demoted | NodeState::DemoteTimeout | NodeState::Draining
                    if n.reported_state.is_stopped() && p.reported_state.is_writable() =>
                {
                    assign(
                        out,
                        n,
                        NodeState::Catchingup,
                        format!(
                            "rejoin primary {} as a standby (rewinding if needed)",
                            p.name
                        ),
                    );
                }
                NodeState::PrepareMaintenance => {
                    assign(
                        out,
                        n,
                        NodeState::Maintenance,
                        format!("{} took over", p.name),
                    );
                }
                NodeState::WaitMaintenance => {
                    let listed = self
                        .group
                        .sync_history
                        .iter()
                        .any(|c| c.members.contains(&n.id));
                    if !listed {
                        assign(
                            out,
                            n,
                            NodeState::Maintenance,
                            format!("primary {} no longer waits for it", p.name),
                        );
                    }
                }
                _ => {}
            }
        }
    }

    fn failover(&self, out: &mut Vec<Command>) {
        let f = self.group.failover.as_ref();
        if f.is_none()
            && self
                .nodes()
                .all(|n| matches!(n.reported_state, NodeState::Init | NodeState::WaitStandby))
        {
            // No primary and no node holds data (the first node was dropped before it
            // ever ran): the first healthy node initialises the group.
            if let Some(n) = self.nodes().find(|n| self.alive(n)) {
                assign(
                    out,
                    n,
                    NodeState::Single,
                    "no node of the group holds data: it initialises the group".into(),
                );
            }
            return;
        }
        let old = f.and_then(|f| self.state.nodes.get(&f.old_primary));
        // 1. Fence the old primary.
        let fenced_at = match f {
            Some(f) => f.fenced_at,
            None => Some(0),
        };
        let Some(fenced_at) = fenced_at else {
            if let Some(o) = old {
                if lease_surely_expired(self.health, o.id, self.settings, self.now) {
                    let goal = if o.goal_state == NodeState::PrepareMaintenance {
                        NodeState::Maintenance
                    } else {
                        NodeState::Demoted
                    };
                    assign(
                        out,
                        o,
                        goal,
                        format!("old primary {}: lease surely expired", o.name),
                    );
                } else if o.goal_state == NodeState::Draining
                    && self.now.saturating_sub(o.goal_since) >= self.ua
                {
                    assign(
                        out,
                        o,
                        NodeState::DemoteTimeout,
                        format!("{} did not finish draining in {} ms", o.name, self.ua),
                    );
                }
            }
            return;
        };
        if let Some(o) = old {
            if matches!(o.goal_state, NodeState::Draining | NodeState::DemoteTimeout)
                && o.reported_state.is_stopped()
            {
                assign(out, o, NodeState::Demoted, "demotion confirmed".into());
            }
        }
        // 2. Ask the standbys for their LSN.
        let old_name = old.map(|o| o.name.as_str()).unwrap_or("(none)");
        for n in self.nodes() {
            if Some(n.id) == old.map(|o| o.id) || n.goal_state.reports_lsn() {
                continue;
            }
            if matches!(
                n.reported_state,
                NodeState::Secondary
                    | NodeState::Catchingup
                    | NodeState::JoinSecondary
                    | NodeState::WaitMaintenance
                    | NodeState::ReportLsn
                    | NodeState::FastForward
                    | NodeState::PreparePromotion
            ) && !matches!(n.goal_state, NodeState::Maintenance)
            {
                assign(
                    out,
                    n,
                    NodeState::ReportLsn,
                    format!("old primary {old_name} is fenced: report the LSN this node holds"),
                );
            }
        }
        // 3. Enough witnesses?
        let wit: Vec<&Node> = witnesses(self.state, self.formation, self.group_id, f).collect();
        let ids: Vec<NodeId> = wit.iter().map(|n| n.id).collect();
        // An old primary found stopped on the timeline and at the LSN it had when it
        // was made primary never took a write: its epoch holds no acknowledged commit,
        // and everything older lies at or below the group's floor. Only two known
        // positions prove that: a keeper reports none when it cannot know (PostgreSQL
        // crashed), and the first primary was promoted before it ever ran.
        let epoch_empty = old.is_some_and(|o| {
            o.reported_state.is_stopped()
                && o.timeline != 0
                && self.group.promoted_at_timeline != 0
                && o.lsn_at >= fenced_at
                && o.timeline == self.group.promoted_at_timeline
                && matches!(
                    (o.reported_lsn, self.group.promoted_at_lsn),
                    (Some(now_at), Some(promoted_at)) if now_at <= promoted_at
                )
        });
        let req = if epoch_empty {
            Requirement::Met
        } else {
            requirement(&self.group.sync_history, &ids)
        };
        // Witnesses know their position: none known means no witness.
        let target = wit.iter().filter_map(|n| n.reported_lsn).max();
        let safe = req == Requirement::Met
            && self.group.floor_met_by(target)
            && self.group.floor_unknown.is_none();
        if let Some(target) = target.filter(|_| safe) {
            if self.choose(f, &wit, target, out) {
                return;
            }
        }
        // 4. Last resort: restart the demoted old primary in place. It holds every
        // commit it acknowledged, so this is always safe for data.
        if let Some(o) = old {
            let waited = self.now.saturating_sub(fenced_at) >= self.settings.lease_ms;
            // Its data directory held the floor when it was promoted and a primary only
            // appends, so an unknown position (it crashed) is no reason to wait.
            if waited
                && o.reported_state == NodeState::Demoted
                && o.goal_state == NodeState::Demoted
                && (!o.position_known() || self.group.floor_met_by(o.reported_lsn))
                && self.alive(o)
                && !wit
                    .iter()
                    .any(|w| w.goal_state == NodeState::PreparePromotion && self.healthy(w))
            {
                let why = match &req {
                    Requirement::Met => "no standby can be promoted".to_string(),
                    Requirement::Waiting { needed, have, .. } => format!("only {have} of the {needed} LSN reports needed to prove a standby holds every acknowledged commit"),
                    Requirement::Unprotected => "commits were acknowledged without a synchronous standby".to_string(),
                };
                assign(
                    out,
                    o,
                    NodeState::WaitPrimary,
                    format!("{why}: restart {} as primary in place", o.name),
                );
            }
        }
    }

    /// Move the failover towards a promotion; false when no candidate can go on.
    fn choose(
        &self,
        f: Option<&crate::model::Failover>,
        wit: &[&'a Node],
        target: Lsn,
        out: &mut Vec<Command>,
    ) -> bool {
        let mut cands: Vec<&Node> = wit
            .iter()
            .copied()
            .filter(|n| n.candidate_priority > 0 && self.healthy(n))
            .collect();
        if let Some(r) = f.and_then(|f| f.requested) {
            if cands.iter().any(|n| n.id == r) {
                cands.retain(|n| n.id == r);
            } else if self
                .state
                .nodes
                .get(&r)
                .is_some_and(|n| self.healthy(n) && !n.goal_state.reports_lsn())
            {
                // The requested node has not reported yet: wait for it.
                return true;
            }
        }
        // Keep a candidate already on its way, as long as it is healthy.
        let in_progress = wit.iter().find(|n| {
            matches!(
                n.goal_state,
                NodeState::FastForward | NodeState::PreparePromotion
            )
        });
        if let Some(c) = in_progress {
            if cands.iter().any(|x| x.id == c.id) {
                return self.advance(c, target, out);
            }
            assign(
                out,
                c,
                NodeState::ReportLsn,
                "candidate is unhealthy: choosing again".into(),
            );
            return true;
        }
        rank(&mut cands);
        let ff_source = fast_forward_source(self.state, self.formation, self.group_id)
            .and_then(|id| self.state.nodes.get(&id));
        for c in cands {
            if c.reported_lsn.is_some_and(|l| l >= target) {
                return self.advance(c, target, out);
            }
            if ff_source.is_some_and(|s| self.healthy(s)) {
                return self.advance(c, target, out);
            }
        }
        false
    }

    fn advance(&self, c: &Node, target: Lsn, out: &mut Vec<Command>) -> bool {
        // Behind the target, or its position unknown: it must fetch WAL first.
        if c.reported_lsn.is_none_or(|l| l < target) {
            let source = fast_forward_source(self.state, self.formation, self.group_id);
            let current = self
                .group
                .failover
                .as_ref()
                .and_then(|f| f.fast_forward_source);
            if c.goal_state == NodeState::FastForward && source != current {
                // A more advanced witness reported since: fetch from it instead.
                out.push(Command::AssignGoal {
                    node_id: c.id,
                    goal: NodeState::FastForward,
                    reason: format!("a more advanced standby reported: fetch WAL up to {target}"),
                    expected: Some(c.goal_state),
                });
            } else if c.goal_state != NodeState::FastForward {
                let src = fast_forward_source(self.state, self.formation, self.group_id)
                    .and_then(|id| self.state.nodes.get(&id))
                    .map(|n| n.name.clone())
                    .unwrap_or_default();
                assign(
                    out,
                    c,
                    NodeState::FastForward,
                    format!(
                        "chosen by candidate priority {}; fetch WAL from {} up to {}",
                        c.candidate_priority, src, target
                    ),
                );
            }
            return true;
        }
        if c.goal_state != NodeState::PreparePromotion {
            assign(
                out,
                c,
                NodeState::PreparePromotion,
                format!(
                    "chosen by candidate priority {} with lsn {}, the most advanced reported",
                    c.candidate_priority,
                    Lsn::or_unknown(c.reported_lsn)
                ),
            );
        } else if c.reported_state == NodeState::PreparePromotion {
            assign(
                out,
                c,
                NodeState::WaitPrimary,
                format!(
                    "promoted: lsn {} holds every acknowledged commit",
                    Lsn::or_unknown(c.reported_lsn)
                ),
            );
        }
        true
    }
}

/// What `node` must do now.
pub fn assignment(
    state: &ClusterState,
    node: NodeId,
    _now: Millis,
) -> Result<Assignment, CoreError> {
    let n = state
        .nodes
        .get(&node)
        .ok_or_else(|| CoreError::UnknownNode(node.to_string()))?;
    let formation = state
        .formations
        .get(&n.formation)
        .ok_or_else(|| CoreError::UnknownFormation(n.formation.clone()))?;
    let group = formation.groups.get(&n.group_id);
    let peer = |x: &Node| PeerNode {
        node_id: x.id,
        name: x.name.clone(),
        host: x.host.clone(),
        port: x.port,
        streamed: x.reported_state.has_streamed(),
    };
    let primary = if n.goal_state == NodeState::FastForward {
        group
            .and_then(|g| g.failover.as_ref())
            .and_then(|f| f.fast_forward_source)
            .and_then(|id| state.nodes.get(&id))
            .map(peer)
    } else if n.goal_state.is_writable() {
        None
    } else {
        state.primary_of(&n.formation, n.group_id).map(peer)
    };
    let synchronous_standby_names =
        if n.goal_state.is_writable() && n.goal_state != NodeState::Single {
            group
                .and_then(|g| g.sync_history.last())
                .map(|c| render(state, c))
                .unwrap_or_default()
        } else {
            String::new()
        };
    let peers = state
        .group_nodes(&n.formation, n.group_id)
        .filter(|x| x.id != n.id && !x.is_dropping())
        .map(peer)
        .collect();
    let s = &formation.settings;
    Ok(Assignment {
        goal_state: n.goal_state,
        primary,
        synchronous_standby_names,
        peers,
        lease_ms: s.lease_ms,
        heartbeat_interval_ms: s.heartbeat_interval_ms,
        on_quorum_loss: match s.on_quorum_loss {
            QuorumLossPolicy::Block => "block".into(),
            QuorumLossPolicy::Continue => "continue".into(),
        },
        reinit: n.reinit_seq,
    })
}
