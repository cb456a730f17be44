//! `ClusterState::apply` on arbitrary command sequences.
//!
//! The input is a script of operations in a compact byte form (one opcode byte, then
//! one or a few bytes per parameter; a missing byte reads as 0). Parameters pick from
//! small pools of formations and node names so that commands hit the nodes earlier
//! commands registered; the `Json` operation feeds any command at all, with any field
//! value, through the Raft log's own decoder. Besides operators' commands, a script
//! drives what the monitor leader runs: keepers' heartbeats through
//! `HealthTable::observe` and `on_heartbeat`, and `orchestrate`, whose proposals are
//! applied like any other entry (they may be stale: apply must refuse those cleanly).
//!
//! The format is written by [`Script`], so seeds are readable scenarios (see
//! `crate::seeds`), and libFuzzer mutates them into new ones. After every apply,
//! `crate::check::apply` checks the invariants.

use pgquorum_core::{
    on_heartbeat, orchestrate, ClusterState, Command, FormationSetting, HealthTable, HostName, Lsn,
    NodeId, NodeReport, NodeSetting, NodeState, QuorumLossPolicy, ReplicationPeer,
    DEFAULT_FORMATION,
};

use crate::check;

/// Where scripts start their clock (ms since the epoch, as the leader proposes it).
pub const T0: u64 = 1_000_000;
/// Operations one input may run: keeps each run short, so that libFuzzer runs many.
const MAX_OPS: usize = 256;

const FORMATIONS: [&str; 4] = ["", DEFAULT_FORMATION, "sales", "b-2"];
const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const HOSTS: [&str; 4] = ["10.0.0.1", "::1", "db-1.example.com", "localhost"];

/// Operation codes (the first byte of an operation, modulo their number).
pub mod op {
    pub const REGISTER: u8 = 0;
    pub const REPORT: u8 = 1;
    pub const ASSIGN: u8 = 2;
    pub const BEAT: u8 = 3;
    pub const ORCHESTRATE: u8 = 4;
    pub const TICK: u8 = 5;
    pub const SWITCHOVER: u8 = 6;
    pub const FAILOVER: u8 = 7;
    pub const MAINTENANCE: u8 = 8;
    pub const DROP_NODE: u8 = 9;
    pub const NODE_SETTING: u8 = 10;
    pub const FORMATION_SETTING: u8 = 11;
    pub const CREATE_FORMATION: u8 = 12;
    pub const DROP_FORMATION: u8 = 13;
    pub const SYSTEM_ID: u8 = 14;
    pub const JSON: u8 = 15;
    pub const NEW_LEADER: u8 = 16;
    pub const COUNT: u8 = 17;
}

/// Reads parameters; past the end every read is 0.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        u64::from_le_bytes(b)
    }
    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    fn pick<T: Copy>(&mut self, pool: &[T]) -> T {
        pool[usize::from(self.u8()) % pool.len()]
    }
    fn state(&mut self) -> NodeState {
        self.pick(&NodeState::ALL)
    }
    /// A small number most of the time, any u64 when the selector's top bit is set.
    fn lsn(&mut self) -> u64 {
        if self.u8() & 0x80 != 0 {
            self.u64()
        } else {
            u64::from(self.u16()) << 8
        }
    }
    fn slice(&mut self, len: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = (start + len).min(self.data.len());
        self.pos += len;
        &self.data[start..end]
    }
}

/// The simulated monitor leader: the replicated state, its health table and its clock.
pub struct World {
    pub state: ClusterState,
    /// Another member's copy, applying the same entries.
    replica: ClusterState,
    pub health: HealthTable,
    pub now: u64,
    seq: u64,
}

impl Default for World {
    fn default() -> Self {
        World {
            state: ClusterState::default(),
            replica: ClusterState::default(),
            health: HealthTable::new(T0),
            now: T0,
            seq: 0,
        }
    }
}

impl World {
    fn id(&self, formation: &str, name: &str) -> NodeId {
        let f = if formation.is_empty() {
            DEFAULT_FORMATION
        } else {
            formation
        };
        self.state
            .node_by_name(f, name)
            .map(|n| n.id)
            // Unknown: an id nobody has, or a guess among the small ones.
            .unwrap_or_else(|| 1 + name.len() as u64 * 7)
    }

    fn apply(&mut self, cmd: &Command, by: Option<&str>) {
        let _ = check::apply(&mut self.state, &mut self.replica, cmd, self.now, by);
    }

    /// The leader's proposals are applied in order, as their log entries would be.
    fn apply_all(&mut self, cmds: Vec<Command>) {
        for c in cmds {
            self.apply(&c, None);
        }
    }

    fn step(&mut self, r: &mut Reader<'_>) {
        let code = r.u8() % op::COUNT;
        match code {
            op::REGISTER => {
                let formation = r.pick(&FORMATIONS).to_owned();
                let name = r.pick(&NAMES).to_owned();
                let host = HostName::parse(r.pick(&HOSTS)).expect("pool hosts are valid");
                let prio = r.u8() % 104;
                let quorum = r.bool();
                let state = r.state();
                self.apply(
                    &Command::RegisterNode {
                        formation,
                        name,
                        host,
                        port: 5432,
                        candidate_priority: prio,
                        replication_quorum: quorum,
                        system_identifier: u64::from(r.u8() % 3),
                        pg_major_version: 15,
                        current_state: state,
                    },
                    Some("keeper/x"),
                );
            }
            op::REPORT => {
                let f = r.pick(&FORMATIONS);
                let node_id = self.id(f, r.pick(&NAMES));
                let cmd = Command::ReportState {
                    node_id,
                    state: r.state(),
                    lsn: Lsn::new(r.lsn()),
                    timeline: u32::from(r.u8() % 4),
                    pg_running: r.bool(),
                    // Few values, so that stale (not above the newest) ones are common.
                    sequence: u64::from(r.u8() % 8),
                };
                self.apply(&cmd, None);
            }
            op::ASSIGN => {
                let f = r.pick(&FORMATIONS);
                let node_id = self.id(f, r.pick(&NAMES));
                let goal = r.state();
                let expected = match r.u8() % 3 {
                    0 => None,
                    1 => self.state.nodes.get(&node_id).map(|n| n.goal_state),
                    _ => Some(r.state()),
                };
                self.apply(
                    &Command::AssignGoal {
                        node_id,
                        goal,
                        reason: "fuzz".into(),
                        expected,
                    },
                    None,
                );
            }
            op::BEAT => {
                let f = r.pick(&FORMATIONS);
                let node_id = self.id(f, r.pick(&NAMES));
                let current_state = r.state();
                let flags = r.u8();
                let lsn = r.lsn();
                let timeline = u32::from(r.u8() % 4);
                // Mostly in order; sometimes reordered, sometimes a restarted keeper,
                // sometimes any sequence a keeper may send.
                let seq = match r.u8() {
                    0..=199 => {
                        self.seq += 1;
                        self.seq
                    }
                    200..=239 => self.seq.saturating_sub(u64::from(r.u8() % 16)),
                    240..=254 => u64::from(r.u8()),
                    255 => r.u64(),
                };
                let peers = (0..r.u8() % 4)
                    .map(|_| {
                        let l = r.lsn();
                        ReplicationPeer {
                            application_name: r.pick(&NAMES).to_owned(),
                            state: if r.bool() { "streaming" } else { "catchup" }.into(),
                            sync_state: if r.bool() { "quorum" } else { "async" }.into(),
                            write_lsn: Lsn::new(l),
                            flush_lsn: Lsn::new(l),
                            replay_lsn: Lsn::new(l),
                            write_lag_ms: None,
                            flush_lag_ms: None,
                            replay_lag_ms: None,
                        }
                    })
                    .collect();
                let report = NodeReport {
                    node_id,
                    current_state,
                    pg_running: flags & 1 != 0,
                    pg_in_recovery: flags & 2 != 0,
                    current_lsn: Lsn::new(lsn),
                    received_lsn: Lsn::new(lsn),
                    replayed_lsn: Lsn::new(if flags & 4 != 0 { lsn / 2 } else { lsn }),
                    timeline,
                    system_identifier: u64::from(flags >> 6),
                    replication: peers,
                    sequence: seq,
                    // A keeper's counters: growing ones become events.
                    pg_restarts: u64::from((flags >> 6) & 1),
                    fences: 0,
                };
                self.health.observe(report.clone(), self.now);
                let cmds = on_heartbeat(&self.state, &self.health, &report, self.now);
                self.apply_all(cmds);
            }
            op::ORCHESTRATE => {
                let cmds = orchestrate(&self.state, &self.health, self.now);
                self.apply_all(cmds);
            }
            op::TICK => {
                // Up to about 65 s, in 1 ms steps (heartbeats are 200 ms, leases 1.5 s).
                self.now += u64::from(r.u16());
            }
            op::SWITCHOVER => {
                let formation = r.pick(&FORMATIONS).to_owned();
                let group_id = u32::from(r.u8() % 2);
                let candidate = if r.bool() {
                    Some(r.pick(&NAMES).to_owned())
                } else {
                    None
                };
                self.apply(
                    &Command::PerformSwitchover {
                        formation,
                        group_id,
                        candidate,
                    },
                    Some("operator/o"),
                );
            }
            op::FAILOVER => {
                let formation = r.pick(&FORMATIONS).to_owned();
                let group_id = u32::from(r.u8() % 2);
                self.apply(
                    &Command::PerformFailover {
                        formation,
                        group_id,
                    },
                    Some("operator/o"),
                );
            }
            op::MAINTENANCE => {
                let formation = r.pick(&FORMATIONS).to_owned();
                let node = r.pick(&NAMES).to_owned();
                let enable = r.bool();
                self.apply(
                    &Command::SetMaintenance {
                        formation,
                        node,
                        enable,
                    },
                    Some("operator/o"),
                );
            }
            op::DROP_NODE => {
                let formation = r.pick(&FORMATIONS).to_owned();
                let node = r.pick(&NAMES).to_owned();
                self.apply(&Command::DropNode { formation, node }, Some("operator/o"));
            }
            op::NODE_SETTING => {
                let formation = r.pick(&FORMATIONS).to_owned();
                let node = r.pick(&NAMES).to_owned();
                let v = r.u8();
                let setting = if r.bool() {
                    NodeSetting::CandidatePriority(v % 110)
                } else {
                    NodeSetting::ReplicationQuorum(v & 1 == 1)
                };
                self.apply(
                    &Command::SetNodeSetting {
                        formation,
                        node,
                        setting,
                    },
                    Some("operator/o"),
                );
            }
            op::FORMATION_SETTING => {
                let formation = r.pick(&FORMATIONS).to_owned();
                let which = r.u8() % 5;
                let v = if r.bool() {
                    r.u64()
                } else {
                    u64::from(r.u16())
                };
                let setting = match which {
                    0 => FormationSetting::NumberSyncStandbys((v % 6) as u32),
                    1 => FormationSetting::HeartbeatIntervalMs(v),
                    2 => FormationSetting::LeaseMs(v),
                    3 => FormationSetting::LeaseMarginMs(v),
                    _ => FormationSetting::OnQuorumLoss(if v & 1 == 1 {
                        QuorumLossPolicy::Continue
                    } else {
                        QuorumLossPolicy::Block
                    }),
                };
                self.apply(
                    &Command::SetFormationSetting { formation, setting },
                    Some("operator/o"),
                );
            }
            op::CREATE_FORMATION => {
                let name = r.pick(&FORMATIONS).to_owned();
                let n = r.u8();
                let number_sync_standbys = if n & 0x80 != 0 {
                    Some(u32::from(n % 8))
                } else {
                    None
                };
                self.apply(
                    &Command::CreateFormation {
                        name,
                        number_sync_standbys,
                    },
                    Some("operator/o"),
                );
            }
            op::DROP_FORMATION => {
                let name = r.pick(&FORMATIONS).to_owned();
                self.apply(&Command::DropFormation { name }, Some("operator/o"));
            }
            op::SYSTEM_ID => {
                let f = r.pick(&FORMATIONS);
                let node_id = self.id(f, r.pick(&NAMES));
                let system_identifier = u64::from(r.u8() % 3);
                self.apply(
                    &Command::RecordSystemIdentifier {
                        node_id,
                        system_identifier,
                    },
                    None,
                );
            }
            op::JSON => {
                // Any command at all, as a Raft entry would carry it.
                let len = usize::from(r.u8());
                let raw = r.slice(len);
                if let Ok(cmd) = serde_json::from_slice::<Command>(raw) {
                    self.apply(&cmd, None);
                }
            }
            op::NEW_LEADER => {
                // A new leader starts with an empty health table.
                self.health = HealthTable::new(self.now);
            }
            _ => unreachable!("opcode is taken modulo COUNT"),
        }
    }
}

/// Runs a script from a fresh state; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let w = run_world(data);
    check::state_and_snapshot(&w.state);
}

/// Runs a script and returns where it ended (seeds and other targets start from it).
pub fn run_world(data: &[u8]) -> World {
    let mut w = World::default();
    let mut r = Reader { data, pos: 0 };
    let mut ops = 0;
    while !r.done() && ops < MAX_OPS {
        w.step(&mut r);
        ops += 1;
    }
    w
}

/// Writes scripts in the format [`run`] reads (for seeds).
#[derive(Default)]
pub struct Script(pub Vec<u8>);

impl Script {
    fn op(&mut self, code: u8, params: &[u8]) -> &mut Self {
        self.0.push(code);
        self.0.extend_from_slice(params);
        self
    }
    fn idx<T: PartialEq>(pool: &[T], v: T) -> u8 {
        pool.iter()
            .position(|x| *x == v)
            .expect("value from the pool") as u8
    }
    fn state(s: NodeState) -> u8 {
        Self::idx(&NodeState::ALL, s)
    }
    fn name(n: &str) -> u8 {
        Self::idx(&NAMES, n)
    }
    fn lsn(l: u16) -> [u8; 3] {
        let [a, b] = l.to_le_bytes();
        [0, a, b]
    }

    /// A node `name` of the default formation, from the host pool, priority 50.
    pub fn register(&mut self, name: &str) -> &mut Self {
        self.op(op::REGISTER, &[0, Self::name(name), 0, 50, 1, 0, 1])
    }
    /// A keeper's heartbeat: in `state`, postgres running, at `lsn` (in 256-byte units).
    pub fn beat(&mut self, name: &str, state: NodeState, lsn: u16) -> &mut Self {
        self.beat_with(name, state, lsn, &[])
    }
    /// A heartbeat of a primary whose standbys `streaming` are streaming, in sync, at
    /// `lsn` too.
    pub fn beat_with(
        &mut self,
        name: &str,
        state: NodeState,
        lsn: u16,
        streaming: &[&str],
    ) -> &mut Self {
        let writable = state.is_writable();
        let flags = 1 | if writable { 0 } else { 2 } | (1 << 6);
        let l = Self::lsn(lsn);
        let mut p = vec![
            0,
            Self::name(name),
            Self::state(state),
            flags,
            l[0],
            l[1],
            l[2],
            1,
            0,
            streaming.len() as u8,
        ];
        for peer in streaming {
            p.extend_from_slice(&l);
            p.extend_from_slice(&[Self::name(peer), 1, 1]);
        }
        self.op(op::BEAT, &p)
    }
    /// A keeper whose postgres is down.
    pub fn beat_down(&mut self, name: &str, state: NodeState) -> &mut Self {
        self.op(
            op::BEAT,
            &[
                0,
                Self::name(name),
                Self::state(state),
                2 | (1 << 6),
                0,
                0,
                0,
                1,
                0,
                0,
            ],
        )
    }
    pub fn orchestrate(&mut self) -> &mut Self {
        self.op(op::ORCHESTRATE, &[])
    }
    pub fn tick(&mut self, ms: u16) -> &mut Self {
        let [a, b] = ms.to_le_bytes();
        self.op(op::TICK, &[a, b])
    }
    pub fn switchover(&mut self, candidate: Option<&str>) -> &mut Self {
        match candidate {
            Some(c) => self.op(op::SWITCHOVER, &[0, 0, 1, Self::name(c)]),
            None => self.op(op::SWITCHOVER, &[0, 0, 0]),
        }
    }
    pub fn failover(&mut self) -> &mut Self {
        self.op(op::FAILOVER, &[0, 0])
    }
    pub fn maintenance(&mut self, name: &str, enable: bool) -> &mut Self {
        self.op(op::MAINTENANCE, &[0, Self::name(name), u8::from(enable)])
    }
    pub fn drop_node(&mut self, name: &str) -> &mut Self {
        self.op(op::DROP_NODE, &[0, Self::name(name)])
    }
    pub fn priority(&mut self, name: &str, p: u8) -> &mut Self {
        self.op(op::NODE_SETTING, &[0, Self::name(name), p, 1])
    }
    pub fn number_sync(&mut self, n: u8) -> &mut Self {
        self.op(op::FORMATION_SETTING, &[0, 0, 0, n, 0])
    }
    pub fn create_formation(&mut self, idx: u8) -> &mut Self {
        self.op(op::CREATE_FORMATION, &[idx, 0])
    }
    pub fn json(&mut self, cmd: &Command) -> &mut Self {
        let raw = serde_json::to_vec(cmd).expect("commands serialise");
        let len = u8::try_from(raw.len()).expect("a seed command under 256 bytes");
        self.op(op::JSON, &[len]);
        self.0.extend_from_slice(&raw);
        self
    }
    pub fn new_leader(&mut self) -> &mut Self {
        self.op(op::NEW_LEADER, &[])
    }

    /// Heartbeats from `nodes` in their current goal states, then one orchestration,
    /// `rounds` times, 200 ms apart: how a group moves between two decisions.
    pub fn settle(&mut self, nodes: &[&str], rounds: usize) -> &mut Self {
        for _ in 0..rounds {
            let st = run_world(&self.0);
            let goal = |n: &str| {
                st.state
                    .node_by_name(DEFAULT_FORMATION, n)
                    .map(|x| x.goal_state)
                    .unwrap_or(NodeState::Init)
            };
            let standbys: Vec<&str> = nodes
                .iter()
                .copied()
                .filter(|n| !goal(n).is_writable())
                .collect();
            for n in nodes {
                let g = goal(n);
                if g.is_writable() {
                    self.beat_with(n, g, 16, &standbys);
                } else {
                    self.beat(n, g, 16);
                }
            }
            self.orchestrate().tick(200);
        }
        self
    }
}
