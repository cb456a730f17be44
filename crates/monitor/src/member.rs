//! What one running member shares between its API service, its Raft and its
//! leader-only tasks: proposing commands (with a bounded wait and a clear "no quorum"
//! error), routing to the leader, the leader's health table.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use pgquorum_api::pb::monitor::monitor_client::MonitorClient;
use pgquorum_api::{no_leader, status_from_core, HOPS_HEADER, MAX_FORWARD_HOPS};
use pgquorum_core::{
    joint_quorum_acked_at, may_grant_lease, Command, GroupId, HealthTable, Outcome, Proposed,
    ReportOrder, Rounds,
};
use tonic::transport::Channel;
use tonic::Status;

use crate::network::{channel, Reachability};
use crate::store::Applied;
use crate::types::{NodeId, Raft, Request};
use pgquorum_trust::Security;

/// A peer counts as reachable if it answered a Raft RPC this recently (the leader
/// sends heartbeats every 100 ms, a candidate votes every few hundred).
const REACHABLE_WITHIN: Duration = Duration::from_millis(1500);

pub struct Member {
    pub id: NodeId,
    pub addr: String,
    pub group_id: String,
    pub raft: Raft,
    pub applied: Arc<RwLock<Applied>>,
    pub reach: Reachability,
    /// How long a write may wait for a quorum before it is refused.
    pub write_timeout: Duration,
    /// Raft's minimum election timeout: how fresh a quorum's acknowledgement must be for
    /// this member to grant a lease (see [`Member::leadership_proof`]).
    pub election_min: Duration,
    /// Raft's heartbeat interval: how long a heartbeat may wait for a fresh proof.
    pub raft_heartbeat: Duration,
    /// The leader's view of keepers: (term it was created in, table). Never replicated.
    pub health: Mutex<Option<(u64, HealthTable)>>,
    /// The newest report admitted from every keeper process (kept across terms: it is
    /// about keepers, not about leadership).
    pub reports: Mutex<ReportOrder>,
    /// Taken while deciding and proposing decisions, so that the periodic tick and
    /// concurrent heartbeats do not each propose the same decision (apply would refuse
    /// the stale copy by its `expected` goal, but only after a wasted Raft write).
    orchestrating: tokio::sync::Mutex<()>,
    channels: Mutex<HashMap<String, Channel>>,
    /// How this member dials the others (its certificate, or --insecure).
    pub security: Security,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where a request must be handled.
pub enum Route {
    Local,
    /// Forward to the leader with this hop count.
    Forward(MonitorClient<Channel>, u32),
}

impl Member {
    // Each argument is a distinct piece the starting code already holds; a builder
    // would only restate them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: NodeId,
        addr: String,
        group_id: String,
        raft: Raft,
        applied: Arc<RwLock<Applied>>,
        reach: Reachability,
        write_timeout: Duration,
        security: Security,
    ) -> Self {
        Member {
            id,
            addr,
            group_id,
            raft,
            applied,
            reach,
            write_timeout,
            election_min: Duration::from_millis(crate::node::Timing::default().election_min_ms),
            raft_heartbeat: Duration::from_millis(crate::node::Timing::default().heartbeat_ms),
            health: Mutex::new(None),
            reports: Mutex::new(ReportOrder::default()),
            orchestrating: tokio::sync::Mutex::new(()),
            channels: Mutex::new(HashMap::new()),
            security,
        }
    }

    /// The Raft timing this member runs with, which its lease proof depends on.
    pub fn with_raft_timing(mut self, timing: &crate::node::Timing) -> Self {
        self.election_min = Duration::from_millis(timing.election_min_ms);
        self.raft_heartbeat = Duration::from_millis(timing.heartbeat_ms);
        self
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Voters and learners of the current membership, with their addresses.
    pub fn nodes(&self) -> BTreeMap<NodeId, String> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
    }

    pub fn voters(&self) -> Vec<NodeId> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.voter_ids().collect()
    }

    fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .nodes()
            .find(|(n, _)| **n == id)
            .map(|(_, n)| n.addr.clone())
            .unwrap_or_default();
        Some((id, addr))
    }

    /// Adds the leader's address to an answer this follower forwarded from it.
    pub fn with_leader_hint<T>(&self, mut r: tonic::Response<T>) -> tonic::Response<T> {
        if let Some((_, addr)) = self.leader() {
            if let Ok(v) = addr.parse() {
                r.metadata_mut().insert(pgquorum_api::LEADER_HEADER, v);
            }
        }
        r
    }

    /// "only 1 of 3 monitor members reachable": what this member can see of a quorum.
    fn reachable_summary(&self) -> (usize, usize) {
        let voters = self.voters();
        let n = voters.len();
        let up = voters
            .iter()
            .filter(|v| **v == self.id || self.reach.reachable(**v, REACHABLE_WITHIN))
            .count();
        (up, n)
    }

    fn no_quorum(&self) -> Status {
        let (up, n) = self.reachable_summary();
        Status::unavailable(format!(
            "no quorum: only {up} of {n} monitor members reachable; writes are refused until a majority is back"
        ))
    }

    /// Local if this member leads; otherwise the leader to forward to, or an error that
    /// names the leader (or says there is none).
    pub fn route<T>(&self, req: &tonic::Request<T>) -> Result<Route, Status> {
        let hops: u32 = req
            .metadata()
            .get(HOPS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match self.leader() {
            Some((id, _)) if id == self.id => Ok(Route::Local),
            Some((id, addr)) => {
                if hops >= MAX_FORWARD_HOPS {
                    return Err(no_leader(
                        format!("request forwarded {hops} times without reaching the leader"),
                        Some((id, &addr)),
                    ));
                }
                Ok(Route::Forward(
                    MonitorClient::new(self.channel(id, &addr)?),
                    hops + 1,
                ))
            }
            None => {
                let (up, n) = self.reachable_summary();
                if up * 2 <= n {
                    Err(self.no_quorum())
                } else {
                    Err(Status::unavailable(
                        "no monitor leader elected yet (an election is under way); retry shortly",
                    ))
                }
            }
        }
    }

    fn channel(&self, id: NodeId, addr: &str) -> Result<Channel, Status> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = format!("{id}@{addr}");
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let c = channel(addr, &self.security, Some(id))
            .map_err(|e| Status::unavailable(format!("bad leader address {addr:?}: {e}")))?;
        map.insert(key, c.clone());
        Ok(c)
    }

    /// Turns a failed forward into an error naming the leader.
    pub fn forward_failed(&self, s: Status) -> Status {
        if s.code() != tonic::Code::Unavailable || pgquorum_api::leader_hint(&s).is_some() {
            return s;
        }
        match self.leader() {
            Some((id, addr)) => no_leader(
                format!(
                    "the leader did not answer a forwarded request: {}",
                    s.message()
                ),
                Some((id, &addr)),
            ),
            None => s,
        }
    }

    fn forward_to_leader_error(
        &self,
        leader_id: Option<NodeId>,
        node: Option<BasicNode>,
    ) -> Status {
        match (leader_id, node) {
            (Some(id), Some(n)) => no_leader("this member is not the leader", Some((id, &n.addr))),
            _ => Status::unavailable("this member is not the leader and knows no leader; retry"),
        }
    }

    /// Proposes `cmd` through Raft (this member must lead) and returns what applying it
    /// produced and its log index. Waits at most `write_timeout`.
    pub async fn propose(&self, cmd: Command) -> Result<(Outcome, u64), Status> {
        self.propose_as(cmd, None).await
    }

    /// [`Member::propose`] on behalf of `by` (`ROLE/NAME`), which the command's events
    /// record.
    pub async fn propose_as(
        &self,
        cmd: Command,
        by: Option<String>,
    ) -> Result<(Outcome, u64), Status> {
        let (up, n) = self.reachable_summary();
        let is_leader = self.raft.metrics().borrow().state == ServerState::Leader;
        // A leader that has heard from no majority recently would only time out.
        if is_leader && up * 2 <= n && n > 1 {
            return Err(self.no_quorum());
        }
        let req = Request {
            at_ms: now_ms(),
            cmd,
            by,
        };
        match tokio::time::timeout(self.write_timeout, self.raft.client_write(req)).await {
            Err(_) => {
                let (up, n) = self.reachable_summary();
                Err(Status::unavailable(format!(
                    "no quorum: only {up} of {n} monitor members reachable; this write was not confirmed within {:?} (it takes effect only if a majority comes back); writes are refused until a majority is back",
                    self.write_timeout
                )))
            }
            Ok(Ok(resp)) => match resp.data.result {
                Some(Ok(outcome)) => Ok((outcome, resp.log_id.index)),
                Some(Err(e)) => Err(status_from_core(&e)),
                None => Err(Status::internal("a command entry produced no result")),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(self.forward_to_leader_error(f.leader_id, f.leader_node))
            }
            Ok(Err(e)) => Err(Status::unavailable(format!("write failed: {e}"))),
        }
    }

    /// Waits until this member, as leader, has confirmed it still leads, so that a
    /// read after it is current.
    pub async fn ensure_linearizable(&self) -> Result<(), Status> {
        match tokio::time::timeout(self.write_timeout, self.raft.ensure_linearizable()).await {
            Err(_) => Err(self.no_quorum()),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(
                f,
            )))) => Err(self.forward_to_leader_error(f.leader_id, f.leader_node)),
            Ok(Err(e)) => Err(Status::unavailable(format!("read failed: {e}"))),
        }
    }

    /// Whether this member may grant a lease now (DESIGN.md invariants 1 and 3): it leads,
    /// and a quorum of every voter configuration, itself included, accepted an
    /// AppendEntries it sent as leader of its current term less than `election_min` ago.
    /// Raft's metrics saying "leader" is not enough: openraft 0.9 does not step down a
    /// leader cut off from the others, and such a leader must stop renewing leases before
    /// the majority can elect another one. The refusal names no leader, so that a keeper
    /// tries the other members.
    pub fn leadership_proof(&self) -> Result<(), Status> {
        let (term, configs) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let leads = m.state == ServerState::Leader
                && m.vote.is_committed()
                && m.vote.leader_id().voted_for() == Some(self.id);
            if !leads {
                return Err(Status::unavailable(
                    "this member is no longer the monitor leader; no lease granted",
                ));
            }
            (
                m.vote.leader_id().get_term(),
                m.membership_config.membership().get_joint_config().clone(),
            )
        };
        let now = self.reach.now_ms();
        let acks: Vec<Vec<Option<u64>>> = configs
            .iter()
            .map(|voters| {
                voters
                    .iter()
                    .map(|v| {
                        if *v == self.id {
                            Some(now)
                        } else {
                            self.reach.acked_ms(*v, term)
                        }
                    })
                    .collect()
            })
            .collect();
        let window = self.election_min.as_millis() as u64;
        if may_grant_lease(joint_quorum_acked_at(&acks), now, window) {
            return Ok(());
        }
        let fresh = acks
            .iter()
            .flatten()
            .filter(|a| a.is_some_and(|t| now.saturating_sub(t) < window))
            .count();
        let total: usize = acks.iter().map(Vec::len).sum();
        Err(Status::unavailable(format!(
            "this member cannot prove it still leads the monitor group: {fresh} of {total} members acknowledged it within the last {window} ms; no lease granted (ask another member)"
        )))
    }

    /// [`Self::leadership_proof`], waiting up to two Raft heartbeats for a fresh
    /// acknowledgement when the last one is too old (a follower's answer was slow), and
    /// asking Raft to send heartbeats at once meanwhile.
    pub async fn await_leadership_proof(&self) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + self.raft_heartbeat * 2;
        let mut nudged = false;
        loop {
            let next = self.reach.next_ack();
            let err = match self.leadership_proof() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline
                || self.raft.metrics().borrow().state != ServerState::Leader
            {
                return Err(err);
            }
            if !nudged {
                nudged = true;
                let _ = self.raft.trigger().heartbeat().await;
            }
            let _ = tokio::time::timeout_at(deadline, next).await;
        }
    }

    /// Admits a keeper's report unless it is stale (DESIGN.md: a report is never applied
    /// after a newer one from the same keeper, nor long after it was sent); a stale one
    /// changes nothing (the heartbeat protocol refuses it).
    pub fn admit_report(
        &self,
        node: pgquorum_core::NodeId,
        stamp: pgquorum_core::ReportStamp,
        max_delay_ms: u64,
    ) -> Result<(), pgquorum_core::StaleReport> {
        let now = self.reach.now_ms();
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(node, stamp, now, max_delay_ms)
            .inspect_err(|e| tracing::info!(node, error = %e, "stale heartbeat refused"))
    }

    /// The leader's health table for the current term, created empty (all "unknown")
    /// when this member took office.
    pub fn with_health<R>(&self, f: impl FnOnce(&mut HealthTable) -> R) -> R {
        let term = self.raft.metrics().borrow().current_term;
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.as_ref().map(|(t, _)| *t) != Some(term) {
            *h = Some((term, HealthTable::new(now_ms())));
        }
        match h.as_mut() {
            Some((_, table)) => f(table),
            None => f(&mut HealthTable::new(now_ms())),
        }
    }

    /// The turn to propose decisions: one decider at a time, so that two do not
    /// propose the same decision (the second would be refused, or worse, decided on a
    /// state the first is changing).
    pub async fn decision_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.orchestrating.lock().await
    }

    /// Proposes `cmds` in order. A command the state machine refuses changed nothing:
    /// it is logged (as `what`) and the rest go on. Err (UNAVAILABLE) when the member
    /// cannot write at all (no quorum, not the leader); the rest are not proposed.
    pub async fn propose_all(&self, cmds: Vec<Command>, what: &str) -> Result<Proposed, Status> {
        let mut outcome = Proposed::NoneApplied;
        for cmd in cmds {
            match self.propose(cmd).await {
                Ok(_) => outcome = Proposed::Applied,
                Err(s) if s.code() == tonic::Code::Unavailable => return Err(s),
                Err(s) => tracing::warn!(error = %s.message(), "{what}"),
            }
        }
        Ok(outcome)
    }

    /// The periodic tick's decisions (for one group, or for all with `scope` None),
    /// proposed in up to [`pgquorum_core::DECIDE_ROUNDS`] rounds ([`Rounds`]). In steady
    /// state the core decides nothing, so nothing is proposed and no turn is waited for.
    /// Err only when the member cannot write at all (no quorum, not the leader).
    pub async fn orchestrate_rounds(&self, scope: Option<(String, GroupId)>) -> Result<(), Status> {
        let mut rounds = Rounds::new(scope);
        let decide = |r: &Rounds| {
            let a = self.read();
            self.with_health(|h| r.next(&a.state, h, now_ms()))
        };
        if decide(&rounds).is_none() {
            return Ok(());
        }
        let _turn = self.decision_turn().await;
        // Decided again under the turn: the previous holder may have changed things.
        while let Some(cmds) = decide(&rounds) {
            let outcome = self
                .propose_all(cmds, "orchestrator proposal refused")
                .await?;
            rounds.proposed(outcome);
        }
        Ok(())
    }
}
