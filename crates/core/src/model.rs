use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::input::HostName;

/// Milliseconds since the Unix epoch, as passed in by the caller.
pub type Millis = u64;
pub type NodeId = u64;
pub type GroupId = u32;
/// A PostgreSQL WAL position (pg_lsn as u64).
pub type Lsn = u64;

pub const DEFAULT_FORMATION: &str = "default";

/// The states of a PostgreSQL node, after pg_auto_failover's state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Init,
    Single,
    WaitPrimary,
    Primary,
    JoinPrimary,
    ApplySettings,
    WaitStandby,
    Catchingup,
    Secondary,
    PreparePromotion,
    StopReplication,
    DemoteTimeout,
    Demoted,
    Draining,
    ReportLsn,
    FastForward,
    JoinSecondary,
    PrepareMaintenance,
    WaitMaintenance,
    Maintenance,
    Dropped,
}

impl NodeState {
    pub const ALL: [NodeState; 21] = [
        NodeState::Init,
        NodeState::Single,
        NodeState::WaitPrimary,
        NodeState::Primary,
        NodeState::JoinPrimary,
        NodeState::ApplySettings,
        NodeState::WaitStandby,
        NodeState::Catchingup,
        NodeState::Secondary,
        NodeState::PreparePromotion,
        NodeState::StopReplication,
        NodeState::DemoteTimeout,
        NodeState::Demoted,
        NodeState::Draining,
        NodeState::ReportLsn,
        NodeState::FastForward,
        NodeState::JoinSecondary,
        NodeState::PrepareMaintenance,
        NodeState::WaitMaintenance,
        NodeState::Maintenance,
        NodeState::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Init => "init",
            NodeState::Single => "single",
            NodeState::WaitPrimary => "wait_primary",
            NodeState::Primary => "primary",
            NodeState::JoinPrimary => "join_primary",
            NodeState::ApplySettings => "apply_settings",
            NodeState::WaitStandby => "wait_standby",
            NodeState::Catchingup => "catchingup",
            NodeState::Secondary => "secondary",
            NodeState::PreparePromotion => "prepare_promotion",
            NodeState::StopReplication => "stop_replication",
            NodeState::DemoteTimeout => "demote_timeout",
            NodeState::Demoted => "demoted",
            NodeState::Draining => "draining",
            NodeState::ReportLsn => "report_lsn",
            NodeState::FastForward => "fast_forward",
            NodeState::JoinSecondary => "join_secondary",
            NodeState::PrepareMaintenance => "prepare_maintenance",
            NodeState::WaitMaintenance => "wait_maintenance",
            NodeState::Maintenance => "maintenance",
            NodeState::Dropped => "dropped",
        }
    }

    pub fn parse(s: &str) -> Option<NodeState> {
        NodeState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a primary does when it has lost its last quorum standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuorumLossPolicy {
    /// Keep synchronous_standby_names: commits wait (keeps invariant 2). The default.
    Block,
    /// Clear synchronous_standby_names: commits go on unsynchronised (explicit choice).
    Continue,
}

/// Per-formation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormationSettings {
    pub number_sync_standbys: u32,
    pub heartbeat_interval_ms: u64,
    /// A primary's lease: the keeper stops taking writes when it has not renewed it
    /// for this long.
    pub lease_ms: u64,
    /// Extra wait on the monitor side before a lease counts as surely expired
    /// (covers clock-rate drift and message delay).
    pub lease_margin_ms: u64,
    pub on_quorum_loss: QuorumLossPolicy,
}

impl Default for FormationSettings {
    fn default() -> Self {
        FormationSettings {
            number_sync_standbys: 1,
            heartbeat_interval_ms: 200,
            lease_ms: 1500,
            lease_margin_ms: 300,
            on_quorum_loss: QuorumLossPolicy::Block,
        }
    }
}

/// One PostgreSQL node and its keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub formation: String,
    pub group_id: GroupId,
    pub name: String,
    pub host: HostName,
    pub port: u16,
    /// 0 = never promote; 1-100.
    pub candidate_priority: u8,
    /// Counts toward synchronous commit.
    pub replication_quorum: bool,
    pub reported_state: NodeState,
    pub goal_state: NodeState,
    pub reported_lsn: Lsn,
    pub timeline: u32,
    pub pg_running: bool,
    pub system_identifier: u64,
    pub pg_major_version: u32,
    /// When the LSN above was recorded (the apply time of the last ReportState).
    #[serde(default)]
    pub lsn_at: Millis,
    /// When the goal last changed.
    #[serde(default)]
    pub goal_since: Millis,
    /// The node has reached `secondary` under the current primary, so it belongs to the
    /// synchronous set (if it is a quorum node). Cleared when it leaves that set by an
    /// explicit operation (maintenance, drop, replication_quorum off).
    #[serde(default)]
    pub in_sync_set: bool,
    /// Sequence number of the newest synchronous configuration when the goal was
    /// assigned: a primary that reports reaching its goal has applied that one or newer.
    #[serde(default)]
    pub goal_sync_seq: u64,
    /// How many times an operator asked for this standby to be rebuilt from the primary
    /// (`perform reinit`): the keeper rebuilds when the number it is told is above the
    /// last one it completed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reinit_seq: u64,
}

/// Fields added later are left out while they hold their default, so that a state
/// that never used them is stored byte for byte as before.
fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Node {
    /// Whether the last report said where this node's WAL ends. A keeper reports LSN 0
    /// when it cannot know (PostgreSQL down after a crash, or never started): that is
    /// "unknown", never a position, and proves nothing.
    pub fn position_known(&self) -> bool {
        self.reported_lsn != 0
    }

    pub fn is_dropping(&self) -> bool {
        self.goal_state == NodeState::Dropped
    }
}

/// One synchronous replication configuration a primary may be running:
/// `synchronous_standby_names = ANY number (members)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncConfig {
    pub seq: u64,
    pub number: u32,
    pub members: Vec<NodeId>,
    /// Unsynchronised by the operator's choice (number_sync_standbys = 0, or
    /// on_quorum_loss = continue after the last quorum standby was lost). When `number`
    /// is 0 and this is false, nothing protects commits: no failover can be proven safe.
    pub async_by_choice: bool,
}

impl SyncConfig {
    pub fn same_rule(&self, other: &SyncConfig) -> bool {
        self.number == other.number
            && self.members == other.members
            && self.async_by_choice == other.async_by_choice
    }
}

/// A failover or switchover under way in a group (no node holds a writable goal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    pub old_primary: NodeId,
    pub started_at: Millis,
    /// The operator asked for this node.
    pub requested: Option<NodeId>,
    /// Whether the operator asked for it (switchover/failover/maintenance) or the
    /// orchestrator decided it.
    pub planned: bool,
    /// When the old primary was known to accept no more writes (confirmed demotion or
    /// lease surely expired). LSNs reported before this do not count.
    pub fenced_at: Option<Millis>,
    /// The node the candidate fetches missing WAL from during fast_forward.
    pub fast_forward_source: Option<NodeId>,
}

/// A replication group: one primary and its standbys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Synchronous configurations the primary may be running, oldest first. The last is
    /// the desired one; older ones are dropped once the primary confirms a synchronous
    /// commit under a newer one. A failover must satisfy every one of them.
    pub sync_history: Vec<SyncConfig>,
    pub next_sync_seq: u64,
    /// Every acknowledged commit of the previous primaries is at or below this LSN on
    /// the current timeline: the next primary must have at least this much.
    pub lsn_floor: Lsn,
    pub failover: Option<Failover>,
    /// The current (or last) primary's LSN and timeline when it was given its writable
    /// goal: if it is found stopped on that timeline at that LSN, it never took a write.
    #[serde(default)]
    pub promoted_at_lsn: Lsn,
    #[serde(default)]
    pub promoted_at_timeline: u32,
    /// An old primary restarted in place without knowing its position (it had crashed):
    /// its end of WAL is the floor, unknown until it reports a running position. Until
    /// then no other node may be promoted: it alone may hold commits acknowledged
    /// without a synchronous standby.
    #[serde(default)]
    pub floor_unknown: Option<NodeId>,
    /// The PostgreSQL system identifier of the group's cluster, learned from its first
    /// primary (0 until then). A node reporting another one is refused.
    #[serde(default)]
    pub system_identifier: u64,
}

/// An entry of the bounded event history: what changed and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: u64,
    pub at: Millis,
    pub formation: String,
    pub group_id: GroupId,
    pub node_id: Option<NodeId>,
    pub node_name: String,
    pub description: String,
    /// Who asked for the change (`operator/alice`, `keeper/pg1`); empty for the
    /// monitor's own decisions and for entries written before this field existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by: String,
    /// For a node's change of goal: the goal it was assigned (what `show history`
    /// reads, rather than the description's words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned: Option<NodeState>,
    /// For a node's reported change of state: the state it reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reached: Option<NodeState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Formation {
    pub name: String,
    pub settings: FormationSettings,
    #[serde(default)]
    pub groups: BTreeMap<GroupId, Group>,
}

/// The whole replicated state. Plain data: cloning and serialising it is how the
/// monitor takes snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredState")]
pub struct ClusterState {
    pub formations: BTreeMap<String, Formation>,
    /// Added by registration and removed by [`ClusterState::apply`] only (a node never
    /// changes formation or group): the group index below follows these two.
    pub nodes: BTreeMap<NodeId, Node>,
    pub next_node_id: NodeId,
    /// Bounded: the oldest entries are dropped.
    pub events: std::collections::VecDeque<Event>,
    pub next_event_id: u64,
    /// Derived, never stored: each group's node ids in ascending order, so that finding
    /// a group's nodes does not scan the whole fleet (a decision pass over every group
    /// would otherwise cost O(groups x nodes)). Rebuilt when a state is read back.
    #[serde(skip)]
    by_group: BTreeMap<String, BTreeMap<GroupId, Vec<NodeId>>>,
}

/// The stored form of [`ClusterState`]: everything but the derived index.
#[derive(Deserialize)]
struct StoredState {
    formations: BTreeMap<String, Formation>,
    nodes: BTreeMap<NodeId, Node>,
    next_node_id: NodeId,
    events: std::collections::VecDeque<Event>,
    next_event_id: u64,
}

impl From<StoredState> for ClusterState {
    fn from(s: StoredState) -> Self {
        let mut state = ClusterState {
            formations: s.formations,
            nodes: s.nodes,
            next_node_id: s.next_node_id,
            events: s.events,
            next_event_id: s.next_event_id,
            by_group: BTreeMap::new(),
        };
        let ids: Vec<(String, GroupId, NodeId)> = state
            .nodes
            .values()
            .map(|n| (n.formation.clone(), n.group_id, n.id))
            .collect();
        for (f, g, id) in ids {
            state.index_node(&f, g, id);
        }
        state
    }
}

/// How many events the history keeps.
pub const MAX_EVENTS: usize = 1000;

impl NodeState {
    /// A state a standby reaches only once its WAL receiver has streamed (or, for
    /// prepare_promotion and report_lsn, only from such a state). A standby's
    /// keeper names its replication slot in `primary_slot_name` only from one of
    /// these, and a primary creates that slot only for a peer reporting one of them:
    /// both sides decide on the same state, so a standby never waits for a slot the
    /// primary will not make, and a node that never streamed holds no WAL.
    pub fn has_streamed(self) -> bool {
        matches!(
            self,
            NodeState::Catchingup
                | NodeState::Secondary
                | NodeState::JoinSecondary
                | NodeState::PreparePromotion
                | NodeState::ReportLsn
                | NodeState::FastForward
        )
    }

    /// PostgreSQL runs as a primary that accepts writes (under the keeper's lease).
    pub fn is_writable(self) -> bool {
        matches!(
            self,
            NodeState::Single
                | NodeState::WaitPrimary
                | NodeState::Primary
                | NodeState::JoinPrimary
                | NodeState::ApplySettings
        )
    }

    /// Reaching this state means the keeper confirmed a synchronous commit under the
    /// synchronous_standby_names it was given.
    pub fn confirms_sync(self) -> bool {
        matches!(
            self,
            NodeState::Primary | NodeState::JoinPrimary | NodeState::ApplySettings
        )
    }

    /// Reported by a keeper whose PostgreSQL is stopped and will not be restarted as a
    /// primary unless assigned a writable goal: a confirmed demotion.
    pub fn is_stopped(self) -> bool {
        matches!(
            self,
            NodeState::Demoted
                | NodeState::DemoteTimeout
                | NodeState::Draining
                | NodeState::PrepareMaintenance
                | NodeState::Maintenance
        )
    }

    /// A state in which the node's LSN, reported after the old primary was fenced, can
    /// serve as a witness for candidate choice.
    pub fn reports_lsn(self) -> bool {
        matches!(
            self,
            NodeState::ReportLsn | NodeState::FastForward | NodeState::PreparePromotion
        )
    }
}

impl ClusterState {
    pub fn node_by_name(&self, formation: &str, name: &str) -> Option<&Node> {
        self.nodes
            .values()
            .find(|n| n.formation == formation && n.name == name)
    }

    /// Nodes of a group, in id order.
    pub fn group_nodes<'a>(
        &'a self,
        formation: &'a str,
        group_id: GroupId,
    ) -> impl Iterator<Item = &'a Node> + 'a {
        self.by_group
            .get(formation)
            .and_then(|groups| groups.get(&group_id))
            .into_iter()
            .flatten()
            .filter_map(|id| self.nodes.get(id))
    }

    /// Records a node just inserted into `nodes` in the group index.
    pub(crate) fn index_node(&mut self, formation: &str, group_id: GroupId, id: NodeId) {
        let ids = self
            .by_group
            .entry(formation.to_string())
            .or_default()
            .entry(group_id)
            .or_default();
        if let Err(at) = ids.binary_search(&id) {
            ids.insert(at, id);
        }
    }

    /// Forgets a node just removed from `nodes`.
    pub(crate) fn unindex_node(&mut self, formation: &str, group_id: GroupId, id: NodeId) {
        if let Some(groups) = self.by_group.get_mut(formation) {
            if let Some(ids) = groups.get_mut(&group_id) {
                ids.retain(|x| *x != id);
                if ids.is_empty() {
                    groups.remove(&group_id);
                }
            }
            if groups.is_empty() {
                self.by_group.remove(formation);
            }
        }
    }

    /// The node of a group that holds a writable goal (there is at most one).
    pub fn primary_of<'a>(&'a self, formation: &'a str, group_id: GroupId) -> Option<&'a Node> {
        self.group_nodes(formation, group_id)
            .find(|n| n.goal_state.is_writable())
    }

    pub fn group(&self, formation: &str, group_id: GroupId) -> Option<&Group> {
        self.formations
            .get(formation)
            .and_then(|f| f.groups.get(&group_id))
    }

    pub fn settings(&self, formation: &str) -> FormationSettings {
        self.formations
            .get(formation)
            .map(|f| f.settings.clone())
            .unwrap_or_default()
    }
}
