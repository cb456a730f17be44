//! Candidate choice during a failover: whose reported LSN counts, whether enough of
//! them are in, and which node to promote.

use crate::lsn::Lsn;
use crate::model::{ClusterState, Failover, GroupId, Node, NodeId};

/// Nodes whose reported LSN is final for the old primary's epoch: a keeper in
/// report_lsn, fast_forward or prepare_promotion has stopped streaming before reporting
/// that state (keeper contract), so the LSN recorded with the state is at least
/// everything it ever held. The report must have been recorded after the old primary
/// was fenced: an older one may describe a state the keeper has since left without the
/// monitor hearing of it (a lost heartbeat), streaming again. And the node must be on
/// the old primary's timeline. And it must know its position: a keeper whose PostgreSQL
/// is down after a crash reports none, which says nothing of what it holds.
pub fn witnesses<'a>(
    state: &'a ClusterState,
    formation: &'a str,
    group_id: GroupId,
    failover: Option<&'a Failover>,
) -> impl Iterator<Item = &'a Node> + 'a {
    let fenced_at = failover.map_or(Some(0), |f| f.fenced_at);
    let old = failover.map(|f| f.old_primary);
    // Only nodes on the old primary's timeline can hold what it acknowledged; a node on
    // another timeline (not rewound yet) may have a higher LSN on a dead branch.
    let timeline = old
        .and_then(|id| state.nodes.get(&id))
        .map(|o| o.timeline)
        .filter(|t| *t != 0);
    state.group_nodes(formation, group_id).filter(move |n| {
        fenced_at.is_some_and(|f| n.lsn_at >= f)
            && timeline.is_none_or(|t| n.timeline == t)
            && Some(n.id) != old
            && !n.is_dropping()
            && n.reported_state.reports_lsn()
            && n.goal_state.reports_lsn()
            && n.position_known()
    })
}

/// The most advanced witness (lowest id among equals): the node a candidate that is
/// behind fetches WAL from.
pub fn fast_forward_source(
    state: &ClusterState,
    formation: &str,
    group_id: GroupId,
) -> Option<NodeId> {
    let failover = state
        .group(formation, group_id)
        .and_then(|g| g.failover.as_ref());
    witnesses(state, formation, group_id, failover)
        .filter_map(|n| Some((n.reported_lsn?, n.id)))
        .max_by(|(la, a), (lb, b)| la.cmp(lb).then(b.cmp(a)))
        .map(|(_, id)| id)
}

/// The highest LSN among witnesses.
pub fn target_lsn(state: &ClusterState, formation: &str, group_id: GroupId) -> Option<Lsn> {
    let failover = state
        .group(formation, group_id)
        .and_then(|g| g.failover.as_ref());
    witnesses(state, formation, group_id, failover)
        .filter_map(|n| n.reported_lsn)
        .max()
}

/// Candidate order: highest candidate priority, then highest LSN, then lowest id. An
/// unknown position ranks below every known one (`None` orders first in an `Option`).
pub fn rank(nodes: &mut [&Node]) {
    nodes.sort_by(|a, b| {
        b.candidate_priority
            .cmp(&a.candidate_priority)
            .then(b.reported_lsn.cmp(&a.reported_lsn))
            .then(a.id.cmp(&b.id))
    });
}
