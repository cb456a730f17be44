//! A deterministic simulation of a pgquorum cluster: a monitor leader running the core
//! state machine and its heartbeat protocol (and at times a deposed leader still
//! answering, see monitor.rs), keepers running the production decision (`decide`, see
//! keeper.rs) on simulated PostgreSQL (WAL as a chain of records, streaming replication,
//! synchronous commit),
//! a simulated clock, and faults: crashes and restarts, lost and delayed heartbeats
//! (some held back for seconds, past newer ones and past the end of a partition, and
//! judged by each monitor member's own `ReportOrder`, see order.rs), partitions between
//! keepers and the monitor, monitor leader changes and operator commands. Everything
//! comes from one seed, so a failure replays exactly.

use pgquorum_core::*;

mod keeper;
mod monitor;

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }
    pub fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability p/1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Primary,
    Standby,
}

struct Pg {
    /// WAL as record ids; LSN = length.
    wal: Option<Vec<u64>>,
    running: Option<Role>,
    /// Node index this standby streams from.
    following: Option<usize>,
    /// Applied synchronous_standby_names: (n, names).
    sync: (u32, Vec<String>),
    /// The empty names above were chosen by the operator (number_sync_standbys = 0):
    /// commits acknowledged then are not protected by invariant 2.
    async_by_choice: bool,
    /// Empty names above are allowed by invariant 2 even under `on_quorum_loss = block`:
    /// the operator's choice, a lone node (`single`), or `continue`. Otherwise a commit
    /// acknowledged under empty names is a violation (DESIGN.md invariant 2).
    alone_allowed: bool,
    /// Commits waiting for synchronous acknowledgement: (lsn, record id).
    pending: Vec<(usize, u64)>,
    /// Timeline of the WAL this node holds; a promotion starts a new one.
    timeline: u32,
    /// The data directory was last used in recovery: starting as primary is a promotion.
    in_recovery: bool,
    /// PostgreSQL was stopped by a shutdown, not killed: pg_control names the end of its
    /// WAL, so a real keeper can report LSN and timeline while it is down. After a crash
    /// it reports neither (0, unknown), and the core must not read that as "no writes".
    clean_stop: bool,
}

struct Keeper {
    name: String,
    id: NodeId,
    alive: bool,
    incarnation: u64,
    restart_at: Millis,
    state: NodeState,
    lease_until: Millis,
    /// The keeper's clock runs slow by this many parts per thousand: its lease lasts
    /// longer in real time than it thinks.
    drift_pm: u64,
    /// The host's monotonic clock, which stamps the reports (`sent_ms`): an offset of
    /// its own and a rate `1000 + clock_skew_pm` per thousand of the simulated clock's,
    /// within what `ReportOrder` allows (an eighth of the interval: up to 11 % slow).
    clock_offset: u64,
    clock_skew_pm: i64,
    /// This keeper process's stamp: a random instance per start, the host clock's
    /// reading at its start (`sent_ms` counts from it), and `seq`, the sequence of its
    /// last request (counted from the host clock at start, as the real keeper counts
    /// from the wall clock, so that a restarted keeper does not start below its past).
    instance: u64,
    started_clock: u64,
    next_beat: Millis,
    seq: u64,
    assignment: Option<Assignment>,
    /// The assignment last reached (the real keeper's `applied`): a keeper in its goal
    /// acts again only when the assignment changes.
    applied: Option<Assignment>,
    /// The node this standby last streamed from, as the keeper's state file records it.
    following: Option<String>,
    confirm_target: Option<usize>,
    partitioned_until: Millis,
    /// Send time of the beat whose answer was applied last: a keeper has one request
    /// in flight at a time, so it never acts on an older answer.
    last_answer_beat: Millis,
    by_choice: bool,
    /// PostgreSQL cannot start until then (a broken postmaster, a full disk).
    pg_broken_until: Millis,
    pg: Pg,
}

enum Msg {
    Beat {
        node: usize,
        incarnation: u64,
        /// When the keeper's heartbeat began (its lease counts from then; a retry keeps
        /// its beat's time, as the real keeper's loop does).
        sent_at: Millis,
        /// 0 for the beat, then each retry of a refused request.
        attempt: u32,
        /// Stuck in TCP retransmission: delivered once a partition heals, not dropped.
        held: bool,
        report: NodeReport,
        stamp: ReportStamp,
    },
    /// A stale report was refused (gRPC ABORTED): the keeper retries its newest request.
    Refused {
        node: usize,
        incarnation: u64,
        sent_at: Millis,
        attempt: u32,
        sequence: u64,
    },
    Answer {
        node: usize,
        incarnation: u64,
        beat_sent_at: Millis,
        assignment: Assignment,
        /// Oracle only: whether empty names in this answer are the operator's choice.
        by_choice: bool,
    },
}

pub struct Sim {
    rng: Rng,
    now: Millis,
    state: ClusterState,
    health: HealthTable,
    monitor_down_until: Millis,
    /// A leader cut off from the other members that still answers some keepers.
    deposed: Option<monitor::Deposed>,
    /// Test knob: the deposed leader grants leases without its leadership proof (the
    /// lease oracle must then fail).
    grant_without_proof: bool,
    /// Per keeper, its latest span of holding a lease in a writable state (oracle).
    lease_spans: Vec<Option<monitor::LeaseSpan>>,
    keepers: Vec<Keeper>,
    msgs: Vec<(Millis, u64, Msg)>,
    msg_seq: u64,
    next_record: u64,
    /// Highest acknowledged commit: (lsn, record id). Acknowledged commits form one chain.
    acked: Option<(usize, u64)>,
    pub acked_count: u64,
    pub async_acked: u64,
    pub operator_ok: u64,
    pub operator_refused: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub leader_changes: u64,
    pub depositions: u64,
    pub pg_crashes: u64,
    /// Heartbeats held back in flight for seconds (or until a partition heals).
    pub held_back: u64,
    /// Stale reports refused, by `StaleReport` kind: first of a process, superseded,
    /// from a replaced process, delayed.
    pub stale: [u64; 4],
    /// Retries of refused reports sent by keepers.
    pub retries: u64,
    /// Reports a leader applied after an earlier leader had applied a newer one of the
    /// same keeper process (see monitor.rs, `check_report_order`).
    pub applied_out_of_order: u64,
    /// ReportStates the state machine refused: not above the newest applied report of
    /// the node (what `applied_out_of_order` reports would otherwise have changed).
    pub stale_report_states: u64,
    /// The monitor members (see monitor.rs): each keeps its own `ReportOrder`.
    members: Vec<monitor::MemberSim>,
    /// The member that leads now (the one `state` and `health` belong to).
    leader: usize,
    /// Test knob: every report is admitted unjudged (`ReportOrder` not consulted): the
    /// report-order oracle must then fail.
    admit_unjudged: bool,
    /// Oracle: the newest report of each keeper process applied, per member and over
    /// the leaders that commit (see monitor.rs, `check_report_order`).
    applied_by_member: Vec<std::collections::BTreeMap<NodeId, (u64, u64)>>,
    applied_committed: std::collections::BTreeMap<(NodeId, u64), u64>,
    settings: FormationSettings,
    pub failovers: u64,
    max_timeline: u32,
    log: Vec<String>,
    verbose: bool,
}

pub struct Failure(pub String);

const DT: Millis = 50;

/// Per thousand heartbeats, how many the network holds back for 1-20 s (a request stuck
/// in TCP retransmission: 6-26 s were seen in the partition tests).
const HELD_PM: u64 = 15;
/// Per thousand heartbeats sent during a partition, how many are held back until it
/// heals instead of being lost.
const HELD_IN_PARTITION_PM: u64 = 300;
/// The real keeper's heartbeat: up to 3 attempts (one per member; a refused first report
/// of a process is retried at once) of 500 ms each; an answer after that is read by no one.
const KEEPER_ATTEMPTS: u32 = 3;
const KEEPER_WAIT: Millis = 1500;

impl Sim {
    pub fn new(seed: u64, verbose: bool) -> Self {
        let mut rng = Rng::new(seed);
        let n = rng.range(2, 4) as usize;
        let settings = FormationSettings {
            number_sync_standbys: if n >= 3 && rng.chance(300) { 2 } else { 1 },
            heartbeat_interval_ms: 200,
            lease_ms: rng.range(1000, 2000),
            lease_margin_ms: 300,
            // Mostly the default; sometimes the operator's explicit choice to keep writing
            // without a quorum standby (commits acknowledged then are not protected).
            on_quorum_loss: if rng.chance(200) {
                QuorumLossPolicy::Continue
            } else {
                QuorumLossPolicy::Block
            },
        };
        let keepers = (0..n)
            .map(|i| Keeper {
                name: format!("n{}", i + 1),
                id: 0,
                alive: true,
                incarnation: 0,
                restart_at: 0,
                state: NodeState::Init,
                lease_until: 0,
                drift_pm: rng.below(140),
                clock_offset: rng.below(1 << 40),
                clock_skew_pm: rng.range(0, 200) as i64 - 100,
                instance: rng.next().max(1),
                started_clock: 0,
                next_beat: rng.below(200),
                seq: 0,
                assignment: None,
                applied: None,
                following: None,
                confirm_target: None,
                partitioned_until: 0,
                last_answer_beat: 0,
                by_choice: false,
                pg_broken_until: 0,
                pg: Pg {
                    wal: None,
                    running: None,
                    following: None,
                    sync: (0, Vec::new()),
                    async_by_choice: false,
                    alone_allowed: false,
                    pending: Vec::new(),
                    timeline: 1,
                    in_recovery: false,
                    clean_stop: false,
                },
            })
            .collect();
        let members = (0..3)
            .map(|_| monitor::MemberSim::new(rng.below(1 << 40)))
            .collect();
        let mut sim = Sim {
            rng,
            now: 1_000_000,
            state: ClusterState::default(),
            health: HealthTable::new(1_000_000),
            monitor_down_until: 0,
            deposed: None,
            grant_without_proof: false,
            lease_spans: vec![None; n],
            keepers,
            msgs: Vec::new(),
            msg_seq: 0,
            next_record: 1,
            acked: None,
            acked_count: 0,
            async_acked: 0,
            operator_ok: 0,
            operator_refused: 0,
            crashes: 0,
            partitions: 0,
            leader_changes: 0,
            depositions: 0,
            pg_crashes: 0,
            held_back: 0,
            stale: [0; 4],
            retries: 0,
            applied_out_of_order: 0,
            stale_report_states: 0,
            members,
            leader: 0,
            admit_unjudged: false,
            applied_by_member: vec![Default::default(); 3],
            applied_committed: Default::default(),
            settings,
            failovers: 0,
            max_timeline: 1,
            log: Vec::new(),
            verbose,
        };
        for i in 0..n {
            sim.start_process(i);
        }
        sim
    }

    /// Reports are admitted unjudged (the monitor without `ReportOrder`): the
    /// report-order oracle must catch it.
    pub fn without_report_order(mut self) -> Self {
        self.admit_unjudged = true;
        self
    }

    /// Keeper `i`'s host clock now.
    fn host_clock(&self, i: usize) -> u64 {
        let k = &self.keepers[i];
        let rate = (1000 + k.clock_skew_pm) as u64;
        k.clock_offset + self.now * rate / 1000
    }

    /// A new keeper process on node `i`: a new random instance, its clock and sequence.
    fn start_process(&mut self, i: usize) {
        let clock = self.host_clock(i);
        let instance = self.rng.next().max(1);
        let k = &mut self.keepers[i];
        k.instance = instance;
        k.started_clock = clock;
        k.seq = clock;
    }

    /// The deposed leader grants leases without proof of leadership: the broken
    /// protocol the lease oracle must catch.
    pub fn without_lease_proof(mut self) -> Self {
        self.grant_without_proof = true;
        self
    }

    fn note(&mut self, s: String) {
        if self.verbose {
            println!("[{:>7}] {s}", self.now - 1_000_000);
        }
        if self.log.len() > 400 {
            self.log.drain(..200);
        }
        self.log.push(format!("[{:>7}] {s}", self.now - 1_000_000));
    }

    fn fail(&self, what: String) -> Failure {
        let mut s = String::new();
        for l in self.log.iter().rev().take(60).rev() {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(&format!(
            "state: {:#?}\n",
            self.state
                .nodes
                .values()
                .map(|n| (
                    n.name.clone(),
                    n.reported_state,
                    n.goal_state,
                    Lsn::raw(n.reported_lsn)
                ))
                .collect::<Vec<_>>()
        ));
        s.push_str(&format!(
            "group: {:?}\n",
            self.state
                .formations
                .values()
                .map(|f| f.groups.clone())
                .collect::<Vec<_>>()
        ));
        Failure(format!("{what}\n{s}"))
    }

    fn apply(&mut self, cmd: &Command) -> bool {
        match self.state.apply(cmd, self.now) {
            Ok(_) => {
                if let Command::AssignGoal {
                    node_id,
                    goal,
                    reason,
                    ..
                } = cmd
                {
                    let name = self
                        .state
                        .nodes
                        .get(node_id)
                        .map(|n| n.name.clone())
                        .unwrap_or_default();
                    if *goal == NodeState::WaitPrimary || *goal == NodeState::Demoted {
                        self.failovers += 1;
                    }
                    self.note(format!("assign {name} {goal}: {reason}"));
                }
                if let Command::ReportState {
                    node_id,
                    state,
                    lsn,
                    ..
                } = cmd
                {
                    let name = self
                        .state
                        .nodes
                        .get(node_id)
                        .map(|n| n.name.clone())
                        .unwrap_or_default();
                    self.note(format!(
                        "monitor records {name} in {state} at lsn {}",
                        Lsn::raw(*lsn)
                    ));
                }
                true
            }
            Err(e) => {
                if matches!(e, pgquorum_core::CoreError::StaleReport { .. }) {
                    self.stale_report_states += 1;
                }
                self.note(format!("refused {cmd:?}: {e}"));
                false
            }
        }
    }

    fn send(&mut self, at: Millis, msg: Msg) {
        self.msg_seq += 1;
        self.msgs.push((at, self.msg_seq, msg));
    }

    fn delay(&mut self) -> Millis {
        if self.rng.chance(20) {
            self.rng.range(200, 900)
        } else {
            self.rng.range(1, 30)
        }
    }

    fn register_all(&mut self) {
        for i in 0..self.keepers.len() {
            let cmd = Command::RegisterNode {
                formation: DEFAULT_FORMATION.into(),
                name: self.keepers[i].name.clone(),
                host: "127.0.0.1".parse().unwrap(),
                port: 5432 + i as u16,
                candidate_priority: 50,
                replication_quorum: true,
                system_identifier: 0,
                pg_major_version: 15,
                current_state: NodeState::Init,
            };
            match self.state.apply(&cmd, self.now) {
                Ok(Outcome::Registered { node_id, .. }) => self.keepers[i].id = node_id,
                other => panic!("registration failed: {other:?}"),
            }
        }
        let f = DEFAULT_FORMATION;
        for s in [
            FormationSetting::LeaseMarginMs(self.settings.lease_margin_ms),
            FormationSetting::LeaseMs(self.settings.lease_ms),
            FormationSetting::NumberSyncStandbys(self.settings.number_sync_standbys),
            FormationSetting::OnQuorumLoss(self.settings.on_quorum_loss),
        ] {
            let r = self.state.apply(
                &Command::SetFormationSetting {
                    formation: f.into(),
                    setting: s.clone(),
                },
                self.now,
            );
            assert!(r.is_ok(), "{s:?}: {r:?}");
        }
    }

    fn idx_of(&self, id: NodeId) -> Option<usize> {
        self.keepers.iter().position(|k| k.id == id)
    }

    fn writable(&self, i: usize) -> bool {
        let k = &self.keepers[i];
        k.alive && k.pg.running == Some(Role::Primary) && k.lease_until > self.now
    }

    fn report(&mut self, i: usize) -> NodeReport {
        let k = &self.keepers[i];
        let mut replication = Vec::new();
        if k.pg.running == Some(Role::Primary) {
            let my = k.pg.wal.as_deref().unwrap_or(&[]);
            for (j, o) in self.keepers.iter().enumerate() {
                if j != i && o.pg.running == Some(Role::Standby) && o.pg.following == Some(i) {
                    let ow = o.pg.wal.as_deref().unwrap_or(&[]);
                    if my.starts_with(ow) {
                        replication.push(ReplicationPeer {
                            application_name: o.name.clone(),
                            state: "streaming".into(),
                            sync_state: "quorum".into(),
                            write_lsn: Lsn::new(ow.len() as u64),
                            flush_lsn: Lsn::new(ow.len() as u64),
                            replay_lsn: Lsn::new(ow.len() as u64),
                            write_lag_ms: None,
                            flush_lag_ms: None,
                            replay_lag_ms: None,
                        });
                    }
                }
            }
        }
        let k = &mut self.keepers[i];
        k.seq += 1;
        // What a real keeper can know: a running server's position, a cleanly stopped
        // one's from pg_control, nothing (zeros) otherwise or before initdb.
        let known = k.pg.running.is_some() || k.pg.clean_stop;
        let (lsn, timeline) = match &k.pg.wal {
            Some(w) if known => (Lsn::new(w.len() as u64), k.pg.timeline),
            _ => (None, 0),
        };
        NodeReport {
            node_id: k.id,
            current_state: k.state,
            pg_running: k.pg.running.is_some(),
            pg_in_recovery: k.pg.running == Some(Role::Standby),
            current_lsn: lsn,
            received_lsn: lsn,
            replayed_lsn: lsn,
            timeline,
            system_identifier: 1,
            replication,
            sequence: k.seq,
            pg_restarts: 0,
            fences: 0,
        }
    }

    /// The stamp of keeper `i`'s current request (the one [`Sim::report`] just counted).
    fn stamp(&self, i: usize) -> ReportStamp {
        let k = &self.keepers[i];
        ReportStamp {
            instance: k.instance,
            sequence: k.seq,
            sent_ms: self.host_clock(i) - k.started_clock,
        }
    }

    /// Keeper `i` sends a report now: its heartbeat begun at `sent_at`, or a retry.
    /// The network loses some, delays most a little, and holds some back for seconds
    /// (a request stuck in TCP retransmission reaches the monitor long after the keeper
    /// gave up on it); during a partition a request is lost or held back until after it.
    fn send_beat(&mut self, i: usize, sent_at: Millis, attempt: u32) {
        let now = self.now;
        let report = self.report(i);
        let stamp = self.stamp(i);
        if self.rng.chance(20) {
            return;
        }
        let partitioned_until = self.keepers[i].partitioned_until;
        let (at, held) = if partitioned_until > now {
            if !self.rng.chance(HELD_IN_PARTITION_PM) {
                return;
            }
            (partitioned_until + self.rng.range(0, 3000), true)
        } else if self.rng.chance(HELD_PM) {
            (now + self.rng.range(1000, 20_000), true)
        } else {
            (now + self.delay(), false)
        };
        if held {
            self.held_back += 1;
        }
        let incarnation = self.keepers[i].incarnation;
        self.send(
            at,
            Msg::Beat {
                node: i,
                incarnation,
                sent_at,
                attempt,
                held,
                report,
                stamp,
            },
        );
    }

    fn crash(&mut self, i: usize, down_for: Millis) {
        let now = self.now;
        let k = &mut self.keepers[i];
        if !k.alive {
            return;
        }
        k.alive = false;
        k.incarnation += 1;
        self.crashes += 1;
        k.restart_at = now + down_for;
        k.pg.running = None;
        k.pg.clean_stop = false;
        k.pg.following = None;
        k.pg.pending.clear();
        k.lease_until = 0;
        k.assignment = None;
        k.applied = None;
        k.confirm_target = None;
        let name = k.name.clone();
        self.note(format!("crash {name} for {down_for} ms"));
    }

    /// Count the named standbys that hold `lsn` with record `id` and stream from `from`.
    fn holders(&self, from: usize, names: &[String], lsn: usize, id: u64) -> u32 {
        self.keepers
            .iter()
            .enumerate()
            .filter(|(j, k)| {
                *j != from
                    && names.contains(&k.name)
                    && k.pg
                        .wal
                        .as_ref()
                        .is_some_and(|w| w.len() >= lsn && (lsn == 0 || w[lsn - 1] == id))
            })
            .count() as u32
    }

    fn parse_names(s: &str) -> (u32, Vec<String>) {
        if s.is_empty() {
            return (0, Vec::new());
        }
        // ANY n ("a", "b")
        let rest = s.strip_prefix("ANY ").unwrap_or(s);
        let (n, list) = rest.split_once(' ').unwrap_or(("0", ""));
        let names = list
            .trim_matches(|c| c == '(' || c == ')')
            .split(", ")
            .map(|x| x.trim_matches('"').to_string())
            .filter(|x| !x.is_empty())
            .collect();
        (n.parse().unwrap_or(0), names)
    }

    /// Whether invariant 2 allows the primary running `a`'s names to acknowledge commits
    /// with no synchronous standby.
    fn alone_allowed(a: &Assignment, by_choice: bool) -> bool {
        by_choice || a.goal_state == NodeState::Single || a.on_quorum_loss != "block"
    }

    fn operator(&mut self) {
        let n = self.keepers.len();
        let name = self.keepers[self.rng.below(n as u64) as usize].name.clone();
        let f: String = DEFAULT_FORMATION.into();
        let cmd = match self.rng.below(8) {
            0 => Command::PerformSwitchover {
                formation: f,
                group_id: 0,
                candidate: None,
            },
            1 => Command::PerformSwitchover {
                formation: f,
                group_id: 0,
                candidate: Some(name),
            },
            2 => Command::PerformFailover {
                formation: f,
                group_id: 0,
            },
            3 | 4 => Command::SetMaintenance {
                formation: f,
                node: name,
                enable: self.rng.chance(500),
            },
            5 => Command::SetNodeSetting {
                formation: f,
                node: name,
                setting: NodeSetting::CandidatePriority(self.rng.below(101) as u8),
            },
            6 => Command::SetNodeSetting {
                formation: f,
                node: name,
                setting: NodeSetting::ReplicationQuorum(self.rng.chance(500)),
            },
            _ => Command::SetFormationSetting {
                formation: f,
                setting: FormationSetting::NumberSyncStandbys(self.rng.below(4) as u32),
            },
        };
        let before = self.state.clone();
        match self.state.apply(&cmd, self.now) {
            Ok(o) => {
                self.operator_ok += 1;
                self.note(format!("operator {cmd:?}: {o:?}"))
            }
            Err(e) => {
                assert!(
                    self.state == before,
                    "a refused command changed the state: {cmd:?}"
                );
                self.operator_refused += 1;
                self.note(format!("operator {cmd:?} refused: {e}"));
            }
        }
    }

    fn heal(&mut self) {
        self.heal_commands();
        for k in &mut self.keepers {
            k.partitioned_until = 0;
            k.pg_broken_until = 0;
            if !k.alive {
                k.restart_at = self.now;
            }
        }
        self.monitor_down_until = 0;
        self.deposed = None;
    }

    fn heal_commands(&mut self) {
        let f: String = DEFAULT_FORMATION.into();
        let names: Vec<String> = self.keepers.iter().map(|k| k.name.clone()).collect();
        for name in names {
            for cmd in [
                Command::SetMaintenance {
                    formation: f.clone(),
                    node: name.clone(),
                    enable: false,
                },
                Command::SetNodeSetting {
                    formation: f.clone(),
                    node: name.clone(),
                    setting: NodeSetting::CandidatePriority(50),
                },
                Command::SetNodeSetting {
                    formation: f.clone(),
                    node: name.clone(),
                    setting: NodeSetting::ReplicationQuorum(true),
                },
            ] {
                let _ = self.state.apply(&cmd, self.now);
            }
        }
    }

    fn step(&mut self, faults: bool) -> Result<(), Failure> {
        self.now += DT;
        let now = self.now;
        let n = self.keepers.len();
        // Faults.
        if faults {
            if self.rng.chance(8) {
                let i = self.rng.below(n as u64) as usize;
                let d = self.rng.range(300, 8000);
                self.crash(i, d);
            }
            if self.rng.chance(6) {
                let i = self.rng.below(n as u64) as usize;
                let d = self.rng.range(300, 6000);
                self.keepers[i].partitioned_until = now + d;
                self.partitions += 1;
                let name = self.keepers[i].name.clone();
                self.note(format!("partition {name} from the monitor for {d} ms"));
            }
            self.monitor_faults();
            if self.rng.chance(5) {
                self.operator();
            }
            if self.rng.chance(4) {
                // PostgreSQL alone dies; sometimes it cannot be restarted for a while.
                let i = self.rng.below(n as u64) as usize;
                if self.keepers[i].alive && self.keepers[i].pg.running.is_some() {
                    let broken = if self.rng.chance(500) {
                        self.rng.range(500, 6000)
                    } else {
                        0
                    };
                    let k = &mut self.keepers[i];
                    k.pg.running = None;
                    k.pg.clean_stop = false;
                    k.pg.pending.clear();
                    k.pg_broken_until = now + broken;
                    self.pg_crashes += 1;
                    let name = self.keepers[i].name.clone();
                    self.note(format!(
                        "PostgreSQL on {name} dies, cannot start for {broken} ms"
                    ));
                }
            }
        }
        // Restarts.
        for i in 0..n {
            let k = &mut self.keepers[i];
            if !k.alive && k.restart_at <= now {
                k.alive = true;
                k.next_beat = now;
                let name = k.name.clone();
                let st = k.state;
                self.start_process(i);
                self.note(format!("restart {name} in {st}"));
            }
        }
        // Deliver messages due.
        let mut due = Vec::new();
        let mut rest = Vec::new();
        for m in self.msgs.drain(..) {
            if m.0 <= now {
                due.push(m);
            } else {
                rest.push(m);
            }
        }
        self.msgs = rest;
        due.sort_by_key(|m| (m.0, m.1));
        for (_, _, m) in due {
            match m {
                Msg::Beat { node, held, .. } if self.keepers[node].partitioned_until > now => {
                    if held {
                        // Still retransmitted: it arrives after the partition.
                        let at = self.keepers[node].partitioned_until + self.rng.range(0, 1000);
                        self.send(at, m);
                    }
                }
                Msg::Beat {
                    node,
                    incarnation,
                    sent_at,
                    attempt,
                    report,
                    stamp,
                    ..
                } => {
                    self.hear_beat(node, incarnation, sent_at, attempt, report, stamp)?;
                }
                Msg::Refused {
                    node,
                    incarnation,
                    sent_at,
                    attempt,
                    sequence,
                } => {
                    let k = &self.keepers[node];
                    // The real keeper retries a refused request at once, while its
                    // heartbeat lasts, trying each member (3 attempts); a refusal of a
                    // request it already gave up on reaches nobody.
                    if k.alive
                        && k.incarnation == incarnation
                        && k.partitioned_until <= now
                        && k.seq == sequence
                        && attempt + 1 < KEEPER_ATTEMPTS
                        && now - sent_at <= KEEPER_WAIT
                    {
                        self.retries += 1;
                        self.send_beat(node, sent_at, attempt + 1);
                    }
                }
                Msg::Answer {
                    node,
                    incarnation,
                    beat_sent_at,
                    assignment,
                    by_choice,
                } => {
                    let k = &mut self.keepers[node];
                    if !k.alive
                        || k.incarnation != incarnation
                        || k.partitioned_until > now
                        || beat_sent_at < k.last_answer_beat
                        // The keeper gave up on that heartbeat: nobody reads the answer.
                        || now - beat_sent_at > KEEPER_WAIT
                    {
                        continue;
                    }
                    k.last_answer_beat = beat_sent_at;
                    let lease = assignment.lease_ms + assignment.lease_ms * k.drift_pm / 1000;
                    k.lease_until = k.lease_until.max(beat_sent_at + lease);
                    k.assignment = Some(assignment);
                    k.by_choice = by_choice;
                }
            }
        }
        // Periodic orchestration.
        self.monitor_tick();
        // Keepers.
        for i in 0..n {
            if !self.keepers[i].alive {
                continue;
            }
            // Self-fencing: no valid lease, no writes.
            if self.keepers[i].pg.running == Some(Role::Primary)
                && self.keepers[i].lease_until <= now
            {
                self.keepers[i].pg.running = None;
                self.keepers[i].pg.clean_stop = true;
                self.keepers[i].pg.pending.clear();
                let name = self.keepers[i].name.clone();
                self.note(format!("{name} lease expired: PostgreSQL stopped"));
            }
            self.keeper_tick(i);
            if self.keepers[i].next_beat <= now {
                self.keepers[i].next_beat = now + 200;
                self.send_beat(i, now, 0);
            }
        }
        // Streaming replication.
        for i in 0..n {
            let k = &self.keepers[i];
            let Some(src) = k.pg.following else { continue };
            if k.pg.running != Some(Role::Standby)
                || !self.keepers[src].alive
                || self.keepers[src].pg.running.is_none()
            {
                continue;
            }
            let sw = self.keepers[src].pg.wal.clone().unwrap_or_default();
            let take = self.rng.range(0, 4) as usize;
            if let Some(w) = self.keepers[i].pg.wal.as_mut() {
                if sw.starts_with(w) && sw.len() > w.len() {
                    let upto = (w.len() + take).min(sw.len());
                    let add: Vec<u64> = sw[w.len()..upto].to_vec();
                    w.extend(add);
                }
            }
        }
        self.check_writable_leases()?;
        // Clients and invariant 1.
        let writers: Vec<usize> = (0..n).filter(|i| self.writable(*i)).collect();
        if writers.len() > 1 {
            let names: Vec<String> = writers
                .iter()
                .map(|i| self.keepers[*i].name.clone())
                .collect();
            return Err(self.fail(format!("two nodes accept writes: {names:?}")));
        }
        if let Some(&w) = writers.first() {
            // Invariant 2: the node taking writes holds every acknowledged commit.
            if let Some((lsn, id)) = self.acked {
                let ok = self.keepers[w]
                    .pg
                    .wal
                    .as_ref()
                    .is_some_and(|wal| wal.len() >= lsn && wal[lsn - 1] == id);
                if !ok {
                    let name = self.keepers[w].name.clone();
                    return Err(self.fail(format!("acknowledged commit (lsn {lsn}, record {id}) lost: {name} accepts writes without it")));
                }
            }
            if self.rng.chance(700) {
                let id = self.next_record;
                self.next_record += 1;
                let k = &mut self.keepers[w];
                if let Some(wal) = k.pg.wal.as_mut() {
                    wal.push(id);
                    let lsn = wal.len();
                    k.pg.pending.push((lsn, id));
                }
            }
            let (need, names) = self.keepers[w].pg.sync.clone();
            let pending = std::mem::take(&mut self.keepers[w].pg.pending);
            let mut keep = Vec::new();
            for (lsn, id) in pending {
                if need == 0 || self.holders(w, &names, lsn, id) >= need {
                    if need == 0 && !self.keepers[w].pg.alone_allowed {
                        let name = self.keepers[w].name.clone();
                        return Err(self.fail(format!("commit (lsn {lsn}, record {id}) acknowledged by {name} with no synchronous standby under on_quorum_loss = block")));
                    }
                    if need == 0 && self.keepers[w].pg.async_by_choice {
                        self.async_acked += 1;
                        continue;
                    }
                    if self.acked.is_none_or(|(l, _)| lsn > l) {
                        self.acked = Some((lsn, id));
                    }
                    self.acked_count += 1;
                } else {
                    keep.push((lsn, id));
                }
            }
            self.keepers[w].pg.pending = keep;
        }
        Ok(())
    }

    fn converged(&self) -> bool {
        let mut primaries = 0;
        for n in self.state.nodes.values() {
            match (n.reported_state, n.goal_state) {
                (NodeState::Primary, NodeState::Primary) => primaries += 1,
                (NodeState::Secondary, NodeState::Secondary) => {}
                _ => return false,
            }
        }
        primaries == 1 && self.keepers.iter().all(|k| k.alive)
    }

    /// Milliseconds (simulated) from the death of a healthy primary's machine until
    /// another node accepts writes, with the default lease settings and no other fault.
    pub fn failover_time(mut self) -> Result<Millis, Failure> {
        let d = FormationSettings::default();
        self.settings.lease_ms = d.lease_ms;
        self.settings.lease_margin_ms = d.lease_margin_ms;
        self.register_all();
        for _ in 0..(20_000 / DT) {
            self.step(false)?;
            if self.converged() {
                break;
            }
        }
        if !self.converged() {
            return Err(self.fail("no stable cluster to start from".into()));
        }
        let Some(p) = (0..self.keepers.len()).find(|i| self.writable(*i)) else {
            return Err(self.fail("no writable primary".into()));
        };
        let start = self.now;
        self.crash(p, Millis::MAX / 4);
        for _ in 0..(60_000 / DT) {
            self.step(false)?;
            if (0..self.keepers.len()).any(|i| i != p && self.writable(i)) {
                return Ok(self.now - start);
            }
        }
        Err(self.fail("no failover within 60 s".into()))
    }

    /// Run one seeded scenario: faults for a while, then healing; Err on a violated
    /// invariant or when the cluster does not recover.
    pub fn run(mut self) -> Result<Sim, Failure> {
        self.register_all();
        let fault_steps = 30_000 / DT;
        let heal_steps = 60_000 / DT;
        for _ in 0..fault_steps {
            self.step(true)?;
        }
        self.note("faults stop".into());
        self.heal();
        for i in 0..heal_steps {
            if i % 20 == 0 {
                // The operator retries what was refused (e.g. ending maintenance on a
                // primary still handing over).
                self.heal_commands();
            }
            self.step(false)?;
            if self.converged() {
                return Ok(self);
            }
        }
        Err(self.fail("the cluster did not return to one primary with healthy secondaries within 60 s after faults stopped".into()))
    }
}
