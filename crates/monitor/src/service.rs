//! The Monitor API as every member serves it. Writes (and reads that must be
//! current) go to the leader: handled here when this member leads, forwarded
//! otherwise, with a bounded number of hops.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use pgquorum_api::pb::monitor as pb;
use pgquorum_api::pb::monitor::monitor_server::Monitor;
use pgquorum_api::{
    check_formation_filter, node_status_live, refused, settings, status_from_core, NodeActive,
    HOPS_HEADER, LOCAL_READ_HEADER,
};
use pgquorum_core::{
    assignment, Command, CoreError, ErrorClass, Health, Heartbeat, Outcome, Proposed, Refusal,
    Step, DEFAULT_FORMATION,
};
use tonic::{Request, Response, Status};

use pgquorum_trust::{authorize, check_keeper_is, Caller, Dial, Identity, Need, CALLER_HEADER};

use crate::member::{now_ms, Member, Route};
use crate::types::NodeId;

/// How long AddMember waits for the new member to catch up before giving up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long AddMember waits for the new member to answer as that member.
const NEW_MEMBER_WAIT: Duration = Duration::from_secs(5);
/// How long a follower waits for the leader's answer to a read before answering itself.
const FORWARD_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a WatchEvents stream looks for newly applied events.
const WATCH_EVENTS_POLL: Duration = Duration::from_millis(200);
/// How many events a WatchEvents stream may have queued for a slow reader before the
/// member stops it (the reader can resume with `after_id`).
const WATCH_EVENTS_QUEUE: usize = 256;

/// The status for a heartbeat the core's protocol refused.
fn refusal_status(node: pgquorum_core::NodeId, r: &Refusal) -> Status {
    match r {
        Refusal::UnknownNode(_) => refused(
            ErrorClass::NotFound,
            format!("node {node} is not registered (was it dropped?); register it again"),
        ),
        Refusal::Rejected(e) => status_from_core(e),
        // The keeper's next report is judged against this one: retry.
        Refusal::Stale(e) => refused(
            ErrorClass::RetryLater,
            format!("stale heartbeat of node {node} refused, nothing changed: {e}"),
        ),
        Refusal::NoLeadershipProof => Status::unavailable(
            "this member cannot prove that it is the monitor leader; no lease granted",
        ),
        Refusal::CannotCommit => {
            Status::unavailable("the heartbeat's changes could not be committed; no lease granted")
        }
    }
}

/// Whether an event belongs in an answer filtered by `formation` ("" = every one).
/// Monitor-wide events (a new leader, a restart) have no formation and are in every
/// answer.
fn event_wanted(e: &pgquorum_core::Event, formation: &str) -> bool {
    formation.is_empty() || e.formation.is_empty() || e.formation == formation
}

pub struct MonitorService {
    pub m: Arc<Member>,
}

/// Forwards the request to the leader unless this member leads. The leader checks the
/// caller again: the original caller travels in `x-pgquorum-caller`, which the leader
/// believes only because this member's certificate says it is a member.
macro_rules! forward {
    ($self:ident, $req:ident, $method:ident, $caller:expr) => {
        match $self.m.route(&$req)? {
            Route::Local => {}
            Route::Forward(mut client, hops) => {
                let mut fwd = Request::new($req.into_inner());
                fwd.metadata_mut().insert(HOPS_HEADER, hops.into());
                insert_caller(&mut fwd, &$caller)?;
                // A forwarded answer names the leader, so that a client pinned to this
                // follower (a keeper beating every 200 ms) can go there directly and
                // stop costing two members per request.
                return client
                    .$method(fwd)
                    .await
                    .map(|r| $self.m.with_leader_hint(r))
                    .map_err(|s| $self.m.forward_failed(s));
            }
        }
    };
}

fn insert_caller<T>(req: &mut Request<T>, caller: &Caller) -> Result<(), Status> {
    if let Some(h) = caller.header() {
        let v = h
            .parse()
            .map_err(|_| Status::internal("caller identity is not valid metadata"))?;
        req.metadata_mut().insert(CALLER_HEADER, v);
    }
    Ok(())
}

fn description(o: &Outcome) -> String {
    match o {
        Outcome::Done { description } | Outcome::Registered { description, .. } => {
            description.clone()
        }
    }
}

fn membership_error<E: std::fmt::Display>(
    e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
    what: E,
) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => pgquorum_api::no_leader(
            "this member is no longer the leader",
            f.leader_id
                .zip(f.leader_node.as_ref().map(|n| n.addr.as_str())),
        ),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            refused(ErrorClass::NotAllowedNow, format!("{what}: {c}"))
        }
        RaftError::Fatal(f) => Status::unavailable(format!("{what}: {f}")),
    }
}

impl MonitorService {
    async fn op(
        &self,
        cmd: Command,
        caller: &Caller,
    ) -> Result<Response<pb::OperationReply>, Status> {
        tracing::info!(caller = %caller.label(), command = ?cmd, "operator command");
        let (outcome, log_index) = self.m.propose_as(cmd, Some(caller.label())).await?;
        Ok(Response::new(pb::OperationReply {
            log_index,
            description: description(&outcome),
        }))
    }

    fn members(&self) -> Vec<pb::Member> {
        let metrics = self.m.raft.metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = metrics.membership_config.voter_ids().collect();
        let last = metrics.last_log_index.unwrap_or(0);
        metrics
            .membership_config
            .nodes()
            .map(|(id, n)| {
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id))
                    .map(|l| l.map(|l| l.index).unwrap_or(0));
                let matched = if *id == metrics.id && metrics.state == ServerState::Leader {
                    metrics.last_log_index
                } else {
                    matched
                };
                pb::Member {
                    id: *id,
                    address: n.addr.clone(),
                    role: if voters.contains(id) {
                        "voter"
                    } else {
                        "learner"
                    }
                    .into(),
                    matched_index: matched,
                    lag: matched.map(|m| last.saturating_sub(m)),
                }
            })
            .collect()
    }

    /// With certificates, a new member must present member `id`'s certificate at
    /// `address` before it gets a vote: an operator cannot add a voter our CA did not
    /// make a member (a rogue voter would hold part of every quorum).
    async fn check_new_member(&self, id: NodeId, address: &str) -> Result<(), Status> {
        if !self.m.security.is_tls() {
            return Ok(());
        }
        let ch = pgquorum_trust::channel(
            address,
            &self.m.security,
            &Dial {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Some(Duration::from_secs(5)),
                keep_alive: None,
                expect: Some(Identity::Member(id)),
            },
        )
        .map_err(|e| refused(ErrorClass::Invalid, e.to_string()))?;
        let mut client = pb::monitor_client::MonitorClient::new(ch);
        // The new member may still be starting: give it a few seconds to listen.
        let deadline = tokio::time::Instant::now() + NEW_MEMBER_WAIT;
        loop {
            match client.member_status(pb::MemberStatusRequest {}).await {
                Ok(_) => return Ok(()),
                Err(s) if tokio::time::Instant::now() >= deadline => {
                    return Err(refused(ErrorClass::NotAllowedNow, format!(
                        "refusing to add member {id}: {address} did not answer as member {id} with a certificate from this group's CA ({}); start it with `pgquorum monitor run --join --node-id {id} --certs-dir DIR` holding member.{id}.crt",
                        s.message()
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn membership_reply(&self, log_index: u64) -> Response<pb::MembershipReply> {
        Response::new(pb::MembershipReply {
            members: self.members(),
            log_index,
        })
    }
}

#[tonic::async_trait]
impl Monitor for MonitorService {
    async fn member_status(
        &self,
        request: Request<pb::MemberStatusRequest>,
    ) -> Result<Response<pb::MemberStatusReply>, Status> {
        authorize(&request, Need::Read, "read the member status")?;
        let metrics = self.m.raft.metrics().borrow().clone();
        let committed = self
            .m
            .raft
            .with_raft_state(|st| st.committed.map(|l| l.index))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let leader_address = metrics
            .current_leader
            .and_then(|l| {
                metrics
                    .membership_config
                    .nodes()
                    .find(|(id, _)| **id == l)
                    .map(|(_, n)| n.addr.clone())
            })
            .unwrap_or_default();
        let server_state = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        Ok(Response::new(pb::MemberStatusReply {
            id: self.m.id,
            address: self.m.addr.clone(),
            leader_id: metrics.current_leader,
            leader_address,
            term: metrics.current_term,
            server_state: server_state.into(),
            last_log_index: metrics.last_log_index,
            committed_index: committed,
            applied_index: metrics.last_applied.map(|l| l.index),
            snapshot_index: metrics.snapshot.map(|l| l.index),
            members: self.members(),
            group_id: self.m.group_id.clone(),
        }))
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let caller = authorize(&request, Need::Operate, "add a monitor member")?;
        forward!(self, request, add_member, caller);
        let r = request.into_inner();
        if r.id == 0 {
            return Err(refused(
                ErrorClass::Invalid,
                "add-member needs ID=HOST:PORT with a non-zero id",
            ));
        }
        pgquorum_api::member_address(&r.address)?;
        self.check_new_member(r.id, &r.address).await?;
        tracing::info!(caller = %caller.label(), member = r.id, address = %r.address, "adding a monitor member");
        if let Some(addr) = self.m.nodes().get(&r.id) {
            if self.m.voters().contains(&r.id) {
                if addr == &r.address {
                    return Ok(self.membership_reply(0).await);
                }
                return Err(refused(ErrorClass::AlreadyExists, format!(
                    "member {} is already in the group at {addr}; remove it first to change its address",
                    r.id
                )));
            }
        }
        let raft = &self.m.raft;
        tokio::time::timeout(
            self.m.write_timeout,
            raft.add_learner(r.id, BasicNode::new(r.address.clone()), false),
        )
        .await
        .map_err(|_| Status::unavailable("no quorum to add a learner"))?
        .map_err(|e| membership_error(e, "cannot add the member"))?;
        // openraft's "blocking" add_learner returns while the learner may still be
        // thousands of entries behind: wait for it to match what is applied now.
        let target = raft
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0);
        let mut metrics = raft.metrics();
        let caught_up = tokio::time::timeout(CATCH_UP_TIMEOUT, async {
            loop {
                let m = metrics
                    .borrow()
                    .replication
                    .as_ref()
                    .and_then(|rep| rep.get(&r.id).copied().flatten())
                    .map(|l| l.index);
                if m.is_some_and(|m| m >= target) {
                    return true;
                }
                if metrics.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        if !matches!(caught_up, Ok(true)) {
            return Err(Status::deadline_exceeded(format!(
                "member {} at {} was added as a learner but has not caught up within {}s; is it running (`pgquorum monitor run --join ...`) and reachable?",
                r.id,
                r.address,
                CATCH_UP_TIMEOUT.as_secs()
            )));
        }
        let resp = tokio::time::timeout(
            self.m.write_timeout,
            raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([r.id])), false),
        )
        .await
        .map_err(|_| Status::unavailable("no quorum to change the membership"))?
        .map_err(|e| membership_error(e, "cannot make the member a voter"))?;
        tracing::info!(member = r.id, address = %r.address, "member added to the group");
        Ok(self.membership_reply(resp.log_id.index).await)
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        let caller = authorize(&request, Need::Operate, "remove a monitor member")?;
        forward!(self, request, remove_member, caller);
        let id = request.into_inner().id;
        tracing::info!(caller = %caller.label(), member = id, "removing a monitor member");
        let voters = self.m.voters();
        if !voters.contains(&id) {
            if self.m.nodes().contains_key(&id) {
                // A learner that never became a voter (an interrupted add-member).
                let resp = tokio::time::timeout(
                    self.m.write_timeout,
                    self.m
                        .raft
                        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false),
                )
                .await
                .map_err(|_| Status::unavailable("no quorum to change the membership"))?
                .map_err(|e| membership_error(e, "cannot remove the learner"))?;
                return Ok(self.membership_reply(resp.log_id.index).await);
            }
            return Err(refused(
                ErrorClass::NotFound,
                format!("member {id} is not in the group (members: {voters:?})"),
            ));
        }
        if voters.len() == 1 {
            return Err(refused(
                ErrorClass::NotAllowedNow,
                "cannot remove the last member of the group",
            ));
        }
        let resp = tokio::time::timeout(
            self.m.write_timeout,
            self.m
                .raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false),
        )
        .await
        .map_err(|_| Status::unavailable("no quorum to change the membership"))?
        .map_err(|e| membership_error(e, "cannot remove the member"))?;
        tracing::info!(member = id, "member removed from the group");
        Ok(self.membership_reply(resp.log_id.index).await)
    }

    async fn create_formation(
        &self,
        request: Request<pb::CreateFormationRequest>,
    ) -> Result<Response<pb::FormationReply>, Status> {
        let caller = authorize(&request, Need::Operate, "create a formation")?;
        forward!(self, request, create_formation, caller);
        let r = request.into_inner();
        let name = r.name.clone();
        let (_, log_index) = self
            .m
            .propose_as(Command::try_from(r)?, Some(caller.label()))
            .await?;
        Ok(Response::new(pb::FormationReply { name, log_index }))
    }

    async fn drop_formation(
        &self,
        request: Request<pb::DropFormationRequest>,
    ) -> Result<Response<pb::FormationReply>, Status> {
        let caller = authorize(&request, Need::Operate, "drop a formation")?;
        forward!(self, request, drop_formation, caller);
        let r = request.into_inner();
        let name = r.name.clone();
        let (_, log_index) = self
            .m
            .propose_as(Command::try_from(r)?, Some(caller.label()))
            .await?;
        Ok(Response::new(pb::FormationReply { name, log_index }))
    }

    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeReply>, Status> {
        let caller = authorize(&request, Need::Keeper, "register a node")?;
        // The node's identity is the certificate, not a name in the request: a keeper
        // registers only the node its certificate names, so nobody can re-register an
        // existing node at another address.
        check_keeper_is(&caller, &request.get_ref().name)?;
        forward!(self, request, register_node, caller);
        let cmd = Command::try_from(request.into_inner())?;
        let (outcome, _) = self.m.propose_as(cmd, Some(caller.label())).await?;
        match outcome {
            Outcome::Registered {
                node_id, group_id, ..
            } => {
                // An assignment grants a lease: only with proof of leadership (else the
                // keeper learns its goal from its next heartbeat).
                let a = match self.m.await_leadership_proof().await {
                    Ok(()) => assignment(&self.m.read().state, node_id, now_ms()).ok(),
                    Err(_) => None,
                };
                Ok(Response::new(pb::RegisterNodeReply {
                    node_id,
                    group_id,
                    assignment: a.map(Into::into),
                }))
            }
            Outcome::Done { description } => Err(Status::internal(format!(
                "registration produced no node id: {description}"
            ))),
        }
    }

    async fn node_active(
        &self,
        request: Request<pb::NodeActiveRequest>,
    ) -> Result<Response<pb::NodeActiveReply>, Status> {
        let caller = authorize(&request, Need::Keeper, "report a node's state")?;
        check_keeper_is(&caller, &request.get_ref().name)?;
        forward!(self, request, node_active, caller);
        let active = NodeActive::try_from(request.into_inner())?;
        let (node_id, stamp) = (active.report.node_id, active.stamp);
        // The core's heartbeat protocol (pgquorum_core::Heartbeat) says what to do next;
        // this loop does it with real Raft writes and the real leadership proof.
        let mut hb = Heartbeat::new(active.report);
        let mut turn = None;
        loop {
            let step = {
                let applied = self.m.read();
                self.m.with_health(|h| hb.next(&applied.state, h, now_ms()))
            };
            match step {
                Step::ProveLeadership => {
                    // Asked first (a member cut off from the others cannot commit: refuse
                    // rather than wait for writes) and again as the lease is granted.
                    turn = None;
                    self.m.await_leadership_proof().await?;
                    hb.proved(true);
                }
                Step::Admit {
                    node,
                    name,
                    max_delay_ms,
                } => {
                    // The id in the request must be the certificate's node: a keeper
                    // cannot keep another (dead) node "healthy" by beating with its id.
                    check_keeper_is(&caller, &name)?;
                    hb.admitted(self.m.admit_report(node, stamp, max_delay_ms));
                }
                Step::Record(cmds) => {
                    // Only changes cost a Raft write; a steady heartbeat proposes nothing.
                    let outcome = self.m.propose_all(cmds, "heartbeat change refused").await?;
                    hb.proposed(outcome);
                }
                Step::Decide(cmds) => {
                    // Deciding at once on what this report changed lets the keeper learn
                    // its next goal in this reply. One decider at a time; decided again
                    // once this one has the turn.
                    if turn.is_none() {
                        turn = Some(self.m.decision_turn().await);
                        continue;
                    }
                    match self
                        .m
                        .propose_all(cmds, "orchestrator proposal refused")
                        .await
                    {
                        Ok(outcome) => hb.proposed(outcome),
                        Err(s) => {
                            tracing::debug!(node = node_id, error = %s.message(), "decision after heartbeat not proposed");
                            hb.proposed(Proposed::CannotCommit);
                        }
                    }
                }
                Step::Answer(a) => {
                    return Ok(Response::new(pb::NodeActiveReply {
                        assignment: Some(a.into()),
                    }))
                }
                Step::Refuse(r) => return Err(refusal_status(node_id, &r)),
            }
        }
    }

    async fn get_state(
        &self,
        request: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateReply>, Status> {
        let caller = authorize(&request, Need::Read, "read the cluster state")?;
        check_formation_filter(&request.get_ref().formation)?;
        if request.get_ref().linearizable {
            forward!(self, request, get_state, caller);
            self.m.ensure_linearizable().await?;
        } else if request.metadata().get(LOCAL_READ_HEADER).is_some() {
            // Asked for this member's own view.
        } else if let Ok(Route::Forward(mut client, hops)) = self.m.route(&request) {
            // Only the leader hears heartbeats, so only its answer carries node health:
            // ask it, and fall back to this member's view (health unknown) when it does
            // not answer.
            let mut fwd = Request::new(request.get_ref().clone());
            fwd.metadata_mut().insert(HOPS_HEADER, hops.into());
            insert_caller(&mut fwd, &caller)?;
            match tokio::time::timeout(FORWARD_READ_TIMEOUT, client.get_state(fwd)).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(s)) => {
                    tracing::debug!(error = %s, "leader did not answer GetState; local view")
                }
                Err(_) => tracing::debug!("leader did not answer GetState in time; local view"),
            }
        }
        let formation = request.into_inner().formation;
        let is_leader = self.m.raft.metrics().borrow().state == ServerState::Leader;
        // Only the leader's answer is current, and only while it can prove it leads: a
        // leader cut off from the others goes on believing it leads (openraft 0.9).
        let stale_reason = if !is_leader {
            let leader = self
                .m
                .raft
                .metrics()
                .borrow()
                .current_leader
                .map(|l| format!("the last known leader is member {l}"))
                .unwrap_or_else(|| "no leader is known".into());
            Some(format!(
                "answered by member {} from its own applied state: no leader answered ({leader}); health and live figures unknown, states may be out of date",
                self.m.id
            ))
        } else {
            self.m.leadership_proof().err().map(|s| {
                format!(
                    "answered by member {}, which leads but has no quorum ({}); states may be out of date",
                    self.m.id,
                    s.message()
                )
            })
        };
        let now = now_ms();
        let applied = self.m.read();
        let st = &applied.state;
        if !formation.is_empty() && !st.formations.contains_key(&formation) {
            return Err(status_from_core(&CoreError::UnknownFormation(formation)));
        }
        let wanted = |f: &str| formation.is_empty() || f == formation;
        let formations = st
            .formations
            .values()
            .filter(|f| wanted(&f.name))
            .map(Into::into)
            .collect();
        let nodes = st
            .nodes
            .values()
            .filter(|n| wanted(&n.formation))
            .map(|n| {
                let unhealthy_after = st
                    .formations
                    .get(&n.formation)
                    .map(|f| f.settings.lease_ms)
                    .unwrap_or(1500);
                if !is_leader {
                    return node_status_live(n, Health::Unknown, None, None, None);
                }
                let primary = st.primary_of(&n.formation, n.group_id).map(|p| p.id);
                self.m.with_health(|h| {
                    node_status_live(
                        n,
                        h.health(n.id, now, unhealthy_after),
                        h.last_seen_ago(n.id, now),
                        h.report(n.id),
                        primary.and_then(|p| h.report(p)),
                    )
                })
            })
            .collect();
        Ok(Response::new(pb::GetStateReply {
            formations,
            nodes,
            applied_index: applied.last_applied.map(|l| l.index).unwrap_or(0),
            stale: stale_reason.is_some(),
            stale_reason: stale_reason.unwrap_or_default(),
            answered_by: self.m.id,
        }))
    }

    async fn get_events(
        &self,
        request: Request<pb::GetEventsRequest>,
    ) -> Result<Response<pb::GetEventsReply>, Status> {
        authorize(&request, Need::Read, "read the events")?;
        let r = request.into_inner();
        check_formation_filter(&r.formation)?;
        let limit = event_limit(r.limit);
        let applied = self.m.read();
        let mut events: Vec<pb::Event> = applied
            .state
            .events
            .iter()
            .rev()
            .filter(|e| event_wanted(e, &r.formation))
            .take(limit)
            .map(Into::into)
            .collect();
        events.reverse();
        Ok(Response::new(pb::GetEventsReply { events }))
    }

    type WatchEventsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::Event, Status>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        authorize(&request, Need::Read, "read the events")?;
        let r = request.into_inner();
        check_formation_filter(&r.formation)?;
        let limit = event_limit(r.limit);
        // Where to start: after the given id, or so that the last `limit` come first.
        let mut after = if r.after_id != 0 {
            r.after_id
        } else {
            let applied = self.m.read();
            applied
                .state
                .events
                .iter()
                .rev()
                .filter(|e| event_wanted(e, &r.formation))
                .nth(limit)
                .map(|e| e.id)
                .unwrap_or(0)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_EVENTS_QUEUE);
        let m = self.m.clone();
        tokio::spawn(async move {
            loop {
                let batch: Vec<pb::Event> = {
                    let applied = m.read();
                    applied
                        .state
                        .events
                        .iter()
                        .filter(|e| e.id > after && event_wanted(e, &r.formation))
                        .map(Into::into)
                        .collect()
                };
                for e in batch {
                    after = e.id;
                    // A reader that does not keep up (a full queue) is cut off rather
                    // than held in this member's memory; it resumes with after_id.
                    if tx.try_send(Ok(e)).is_err() {
                        if !tx.is_closed() {
                            let _ = tx.try_send(Err(Status::resource_exhausted(format!(
                                "the reader fell {WATCH_EVENTS_QUEUE} events behind; resume with after_id {after}"
                            ))));
                        }
                        return;
                    }
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(WATCH_EVENTS_POLL) => {}
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn get_settings(
        &self,
        request: Request<pb::GetSettingsRequest>,
    ) -> Result<Response<pb::GetSettingsReply>, Status> {
        authorize(&request, Need::Read, "read the settings")?;
        let mut formation = request.into_inner().formation;
        check_formation_filter(&formation)?;
        if formation.is_empty() {
            formation = DEFAULT_FORMATION.into();
        }
        let applied = self.m.read();
        let f = applied
            .state
            .formations
            .get(&formation)
            .ok_or_else(|| status_from_core(&CoreError::UnknownFormation(formation.clone())))?;
        let nodes: Vec<_> = applied
            .state
            .nodes
            .values()
            .filter(|n| n.formation == formation)
            .collect();
        Ok(Response::new(pb::GetSettingsReply {
            settings: settings(f, &nodes),
        }))
    }

    async fn set_node_setting(
        &self,
        request: Request<pb::SetNodeSettingRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let caller = authorize(&request, Need::Operate, "change a node setting")?;
        forward!(self, request, set_node_setting, caller);
        self.op(Command::try_from(request.into_inner())?, &caller)
            .await
    }

    async fn set_formation_setting(
        &self,
        request: Request<pb::SetFormationSettingRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let caller = authorize(&request, Need::Operate, "change a formation setting")?;
        forward!(self, request, set_formation_setting, caller);
        self.op(Command::try_from(request.into_inner())?, &caller)
            .await
    }

    async fn perform_switchover(
        &self,
        request: Request<pb::PerformSwitchoverRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let caller = authorize(&request, Need::Operate, "perform a switchover")?;
        forward!(self, request, perform_switchover, caller);
        self.op(Command::try_from(request.into_inner())?, &caller)
            .await
    }

    async fn perform_failover(
        &self,
        request: Request<pb::PerformFailoverRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let caller = authorize(&request, Need::Operate, "perform a failover")?;
        forward!(self, request, perform_failover, caller);
        self.op(Command::try_from(request.into_inner())?, &caller)
            .await
    }

    async fn set_maintenance(
        &self,
        request: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let caller = authorize(&request, Need::Operate, "change maintenance")?;
        forward!(self, request, set_maintenance, caller);
        self.op(Command::try_from(request.into_inner())?, &caller)
            .await
    }

    async fn drop_node(
        &self,
        request: Request<pb::DropNodeRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let caller = authorize(&request, Need::Operate, "drop a node")?;
        forward!(self, request, drop_node, caller);
        self.op(Command::try_from(request.into_inner())?, &caller)
            .await
    }

    async fn reinit_node(
        &self,
        request: Request<pb::ReinitNodeRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        let caller = authorize(&request, Need::Operate, "rebuild a node")?;
        forward!(self, request, reinit_node, caller);
        self.op(Command::try_from(request.into_inner())?, &caller)
            .await
    }
}

/// How many events a read asks for: 0 means the default (50). The history is bounded
/// anyway; a huge limit is no error, just everything.
fn event_limit(limit: u32) -> usize {
    if limit == 0 {
        50
    } else {
        usize::try_from(limit).unwrap_or(usize::MAX)
    }
}
