use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::input::HostName;
use crate::lsn::{zero_is_none, Lsn};

/// Milliseconds since the Unix epoch, as passed in by the caller.
pub type Millis = u64;
pub type NodeId = u64;
pub type GroupId = u32;

pub const DEFAULT_FORMATION: &str = "default";

/// Declares [`NodeState`] and derives [`NodeState::ALL`] from the same list, so that a
/// new state cannot be left out of it.
macro_rules! node_states {
    ($(#[$meta:meta])* pub enum NodeState { $($state:ident,)* }) => {
        $(#[$meta])*
        pub enum NodeState {
            $($state,)*
        }

        impl NodeState {
            /// Every state, in declaration order.
            pub const ALL: [NodeState; [$(NodeState::$state),*].len()] =
                [$(NodeState::$state),*];
        }
    };
}

node_states! {
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
}

/// What a state means for the rest of the system: a set of [`StateClass`] flags per
/// state, from the one table [`NodeState::class`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateClass(u16);

impl StateClass {
    const NONE: StateClass = StateClass(0);
    /// PostgreSQL runs as a primary that accepts writes (under the keeper's lease).
    pub const WRITABLE: StateClass = StateClass(1);
    /// Reaching it means the keeper confirmed a synchronous commit under the
    /// synchronous_standby_names it was given.
    pub const CONFIRMS_SYNC: StateClass = StateClass(1 << 1);
    /// On the way down from writable: the keeper may still take writes until it has
    /// reached the state (or its lease ran out).
    pub const DEMOTING: StateClass = StateClass(1 << 2);
    /// Reported: PostgreSQL is stopped and will not be restarted as a primary unless
    /// given a writable goal (a confirmed demotion).
    pub const STOPPED: StateClass = StateClass(1 << 3);
    /// As a goal of an old primary: it accepts no writes and will not.
    pub const FENCED: StateClass = StateClass(1 << 4);
    /// In, or entering, maintenance: the node holds no quorum vote and is no candidate.
    pub const MAINTENANCE: StateClass = StateClass(1 << 5);
    /// A standby that has streamed from the primary (so a replication slot for it is
    /// made, and it holds WAL).
    pub const STREAMED: StateClass = StateClass(1 << 6);
    /// Its LSN, reported after the old primary was fenced, can serve as a witness for
    /// candidate choice.
    pub const REPORTS_LSN: StateClass = StateClass(1 << 7);
    /// The node leaves the group: no state follows it.
    pub const GONE: StateClass = StateClass(1 << 8);

    const fn with(self, other: StateClass) -> StateClass {
        StateClass(self.0 | other.0)
    }

    pub const fn contains(self, other: StateClass) -> bool {
        self.0 & other.0 == other.0
    }
}

impl NodeState {
    /// The one table of what each state means. An exhaustive match: a new state does
    /// not compile until it is classified here, and every predicate below (and the
    /// "from anywhere" transitions, the maintenance and fenced sets) follows from it.
    pub const fn class(self) -> StateClass {
        use NodeState::*;
        use StateClass as C;
        match self {
            Init => C::NONE,
            Single | WaitPrimary => C::WRITABLE,
            Primary | JoinPrimary | ApplySettings => C::WRITABLE.with(C::CONFIRMS_SYNC),
            WaitStandby => C::NONE,
            Catchingup | Secondary | JoinSecondary => C::STREAMED,
            PreparePromotion | ReportLsn | FastForward => C::STREAMED.with(C::REPORTS_LSN),
            StopReplication => C::NONE,
            DemoteTimeout | Draining => C::DEMOTING.with(C::STOPPED),
            Demoted => C::STOPPED.with(C::FENCED),
            PrepareMaintenance => C::DEMOTING.with(C::STOPPED).with(C::MAINTENANCE),
            WaitMaintenance => C::MAINTENANCE,
            Maintenance => C::STOPPED.with(C::FENCED).with(C::MAINTENANCE),
            Dropped => C::FENCED.with(C::GONE),
        }
    }

    pub const fn is(self, class: StateClass) -> bool {
        self.class().contains(class)
    }

    /// Number of states of a class.
    const fn count(class: StateClass) -> usize {
        let mut n = 0;
        let mut i = 0;
        while i < NodeState::ALL.len() {
            if NodeState::ALL[i].is(class) {
                n += 1;
            }
            i += 1;
        }
        n
    }

    /// Every state but the gone ones (`dropped`), in declaration order: the states a
    /// keeper can be in and report, and from which it can stop PostgreSQL or be dropped
    /// ("from anywhere").
    pub const LIVE: [NodeState; NodeState::ALL.len() - NodeState::count(StateClass::GONE)] = {
        let mut out = [NodeState::Init; NodeState::ALL.len() - NodeState::count(StateClass::GONE)];
        let (mut i, mut j) = (0, 0);
        while i < NodeState::ALL.len() {
            if !NodeState::ALL[i].is(StateClass::GONE) {
                out[j] = NodeState::ALL[i];
                j += 1;
            }
            i += 1;
        }
        out
    };

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
    /// Where its WAL ended at its last report; None: its keeper could not know
    /// (PostgreSQL down after a crash, or never started).
    #[serde(with = "zero_is_none")]
    pub reported_lsn: Option<Lsn>,
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
    /// The sequence of the newest keeper report applied to this node (0: none stamped
    /// yet). Reports reach the leader out of order (stuck in TCP retransmission, or
    /// judged by a new leader that never saw the newer one): a ReportState whose
    /// sequence is not above it is not applied, on every member alike, whichever
    /// leader proposed it. Keeper sequences count from the wall clock at the keeper's
    /// start, so a restarted keeper's reports are above its previous life's.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub report_sequence: u64,
}

/// Fields added later are left out while they hold their default, so that a state
/// that never used them is stored byte for byte as before.
pub(crate) fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Node {
    /// Whether the last report said where this node's WAL ends. A keeper that cannot
    /// know (PostgreSQL down after a crash, or never started) reports none: that proves
    /// nothing.
    pub fn position_known(&self) -> bool {
        self.reported_lsn.is_some()
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
    /// the current timeline: the next primary must have at least this much. None: no
    /// floor (no primary's epoch has ended with a known position yet).
    #[serde(with = "zero_is_none")]
    pub lsn_floor: Option<Lsn>,
    pub failover: Option<Failover>,
    /// The current (or last) primary's LSN and timeline when it was given its writable
    /// goal: if it is found stopped on that timeline at that LSN, it never took a write.
    /// None: its position was unknown then, which proves nothing.
    #[serde(default, with = "zero_is_none")]
    pub promoted_at_lsn: Option<Lsn>,
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

impl Group {
    /// Whether a node at `lsn` holds everything up to the floor. An unknown position
    /// never does, unless there is no floor.
    pub fn floor_met_by(&self, lsn: Option<Lsn>) -> bool {
        match self.lsn_floor {
            None => true,
            Some(floor) => lsn.is_some_and(|l| l >= floor),
        }
    }

    /// Raise the floor to `lsn` (a floor never goes down).
    pub fn raise_floor(&mut self, lsn: Lsn) {
        self.lsn_floor = Some(self.lsn_floor.map_or(lsn, |f| f.max(lsn)));
    }
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
        self.is(StateClass::STREAMED)
    }

    /// PostgreSQL runs as a primary that accepts writes (under the keeper's lease).
    pub fn is_writable(self) -> bool {
        self.is(StateClass::WRITABLE)
    }

    /// Reaching this state means the keeper confirmed a synchronous commit under the
    /// synchronous_standby_names it was given.
    pub fn confirms_sync(self) -> bool {
        self.is(StateClass::CONFIRMS_SYNC)
    }

    /// Reported by a keeper whose PostgreSQL is stopped and will not be restarted as a
    /// primary unless assigned a writable goal: a confirmed demotion.
    pub fn is_stopped(self) -> bool {
        self.is(StateClass::STOPPED)
    }

    /// A state in which the node's LSN, reported after the old primary was fenced, can
    /// serve as a witness for candidate choice.
    pub fn reports_lsn(self) -> bool {
        self.is(StateClass::REPORTS_LSN)
    }

    /// As a goal: the node is in, or entering, maintenance.
    pub fn is_maintenance(self) -> bool {
        self.is(StateClass::MAINTENANCE)
    }

    /// As the goal of an old primary: it accepts no writes and will not.
    pub fn is_fenced(self) -> bool {
        self.is(StateClass::FENCED)
    }

    /// As a goal: on the way down from writable; the node may still take writes until
    /// it has reached it (or its lease ran out).
    pub fn is_demoting(self) -> bool {
        self.is(StateClass::DEMOTING)
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

#[cfg(test)]
mod tests {
    use super::*;
    use NodeState::*;

    fn with(p: fn(NodeState) -> bool) -> Vec<NodeState> {
        NodeState::ALL.into_iter().filter(|s| p(*s)).collect()
    }

    /// `ALL` is derived from the enum's own list; this pins that it is in declaration
    /// order (listings and golden files follow it) and complete: every state's discriminant
    /// is its index, and the exhaustive match below has no `_` arm.
    #[test]
    fn all_lists_every_state_once_in_order() {
        for (i, s) in NodeState::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, i, "{s}");
            assert_eq!(NodeState::parse(s.as_str()), Some(s));
            let last = match s {
                Init | Single | WaitPrimary | Primary | JoinPrimary | ApplySettings
                | WaitStandby | Catchingup | Secondary | PreparePromotion | StopReplication
                | DemoteTimeout | Demoted | Draining | ReportLsn | FastForward | JoinSecondary
                | PrepareMaintenance | WaitMaintenance | Maintenance => false,
                Dropped => true,
            };
            assert_eq!(last, i + 1 == NodeState::ALL.len(), "{s}");
        }
        assert_eq!(NodeState::LIVE.len(), NodeState::ALL.len() - 1);
        assert!(!NodeState::LIVE.contains(&Dropped));
    }

    /// The sets the table derives are the ones the code relied on when each was written
    /// by hand (a change here is a change of behaviour, not of layout).
    #[test]
    fn the_class_table_gives_the_known_sets() {
        assert_eq!(
            with(NodeState::is_writable),
            [Single, WaitPrimary, Primary, JoinPrimary, ApplySettings]
        );
        assert_eq!(
            with(NodeState::confirms_sync),
            [Primary, JoinPrimary, ApplySettings]
        );
        assert_eq!(
            with(NodeState::is_stopped),
            [
                DemoteTimeout,
                Demoted,
                Draining,
                PrepareMaintenance,
                Maintenance
            ]
        );
        assert_eq!(
            with(NodeState::is_demoting),
            [DemoteTimeout, Draining, PrepareMaintenance]
        );
        assert_eq!(with(NodeState::is_fenced), [Demoted, Maintenance, Dropped]);
        assert_eq!(
            with(NodeState::is_maintenance),
            [PrepareMaintenance, WaitMaintenance, Maintenance]
        );
        assert_eq!(
            with(NodeState::has_streamed),
            [
                Catchingup,
                Secondary,
                PreparePromotion,
                ReportLsn,
                FastForward,
                JoinSecondary
            ]
        );
        assert_eq!(
            with(NodeState::reports_lsn),
            [PreparePromotion, ReportLsn, FastForward]
        );
        // A writable state is never also a stopped or fenced one.
        for s in NodeState::ALL {
            assert!(
                !(s.is_writable() && (s.is_stopped() || s.is_fenced())),
                "{s}"
            );
        }
    }
}
