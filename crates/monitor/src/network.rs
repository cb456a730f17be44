//! The Raft transport: openraft's RPCs between members over tonic.
//!
//! Vote and AppendEntries travel as JSON inside a proto `bytes` field (they are small);
//! snapshot chunks carry the snapshot's bytes as a proto `bytes` field, never as JSON.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use pgquorum_api::pb::raft as pb;
use pgquorum_api::pb::raft::raft_transport_client::RaftTransportClient;
use pgquorum_api::pb::raft::raft_transport_server::RaftTransport;
use pgquorum_trust::{authorize, Caller, Dial, Identity, Need, Security};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::types::{NodeId, Raft, TypeConfig};

/// Largest gRPC message between members (snapshot chunks are 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// When each peer last answered a Raft RPC: how the leader knows, without waiting,
/// whether a majority is reachable. Also, for the lease: when each peer last accepted an
/// AppendEntries this member sent as leader, by the send time (see [`Self::leader_acked`]).
#[derive(Clone)]
pub struct Reachability {
    last_ok: Arc<Mutex<HashMap<NodeId, Instant>>>,
    /// Per peer: (term, send time of the newest AppendEntries it accepted in that term).
    acks: Arc<Mutex<HashMap<NodeId, (u64, Instant)>>>,
    /// Woken on every such acknowledgement, for a heartbeat waiting for a fresh proof.
    acked: Arc<tokio::sync::Notify>,
    /// The origin of the monotonic milliseconds handed to the core's lease arithmetic.
    epoch: Instant,
}

impl Default for Reachability {
    fn default() -> Self {
        Reachability {
            last_ok: Arc::default(),
            acks: Arc::default(),
            acked: Arc::default(),
            epoch: Instant::now(),
        }
    }
}

impl Reachability {
    /// Records that `id` was heard from (an answer, or a request it sent us).
    pub fn ok(&self, id: NodeId) {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Instant::now());
    }

    /// Whether `id` answered within `within`.
    pub fn reachable(&self, id: NodeId, within: Duration) -> bool {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .is_some_and(|t| t.elapsed() <= within)
    }

    /// Records that `id` accepted an AppendEntries this member sent at `sent` as the
    /// leader of `term`. The send time, not the answer's arrival, is what the lease may
    /// count from: `id` heard from this leader no earlier than that.
    pub fn leader_acked(&self, id: NodeId, term: u64, sent: Instant) {
        {
            let mut acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
            let e = acks.entry(id).or_insert((term, sent));
            if term > e.0 || (term == e.0 && sent > e.1) {
                *e = (term, sent);
            }
        }
        self.acked.notify_waiters();
    }

    /// The send time of the newest AppendEntries `id` accepted from this member as leader
    /// of `term`, in milliseconds of [`Self::now_ms`].
    pub fn acked_ms(&self, id: NodeId, term: u64) -> Option<u64> {
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        acks.get(&id)
            .filter(|(t, _)| *t == term)
            .map(|(_, at)| self.ms(*at))
    }

    /// This process's monotonic clock in milliseconds (immune to wall-clock steps).
    pub fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Resolves at the next acknowledgement of any peer after this call (create it
    /// before checking, so that an acknowledgement in between is not missed).
    pub fn next_ack(&self) -> tokio::sync::futures::Notified<'_> {
        self.acked.notified()
    }
}

/// A channel to another member at `addr`. With certificates, the server must present
/// member `expect`'s certificate (None: any member, when the id is not known, as when a
/// follower forwards to an address it was given).
pub fn channel(
    addr: &str,
    security: &Security,
    expect: Option<NodeId>,
) -> Result<Channel, pgquorum_trust::DialError> {
    pgquorum_trust::channel(
        addr,
        security,
        &Dial {
            connect_timeout: Duration::from_millis(300),
            request_timeout: None,
            keep_alive: Some(Duration::from_secs(5)),
            expect: expect.map(Identity::Member),
        },
    )
}

#[derive(Clone)]
pub struct Network {
    pub reach: Reachability,
    pub security: Security,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            client: channel(&node.addr, &self.security, Some(target))
                .ok()
                .map(|c| {
                    RaftTransportClient::new(c)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES)
                }),
            addr: node.addr.clone(),
            reach: self.reach.clone(),
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    addr: String,
    client: Option<RaftTransportClient<Channel>>,
    reach: Reachability,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(v).map_err(|e| Status::internal(format!("encode: {e}")))
}

/// A request that cannot be encoded is reported to openraft as a network error.
fn encode_rpc<T: Serialize, E: std::error::Error>(v: &T) -> Result<Vec<u8>, RpcErr<E>> {
    encode(v).map_err(|s| RPCError::Network(NetworkError::new(&Msg(s.message().into()))))
}

/// An AppendEntries or Vote request as it travels: openraft's JSON in `data`.
fn payload<T: Serialize>(rpc: &T, option: &RPCOption) -> Result<Request<pb::RaftPayload>, RpcErr> {
    let data = encode_rpc(rpc)?;
    Ok(with_timeout(
        pb::RaftPayload {
            data,
            error: vec![],
        },
        option,
    ))
}

/// How a member reads every JSON part of a Raft RPC it receives (public for the fuzz
/// target that feeds it arbitrary bytes: fuzz/src/raft.rs).
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(b).map_err(|e| Status::invalid_argument(format!("decode: {e}")))
}

impl PeerClient {
    fn client<E: std::error::Error>(&self) -> Result<RaftTransportClient<Channel>, RpcErr<E>> {
        self.client.clone().ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&Msg(format!(
                "bad address {:?} for member {}",
                self.addr, self.target
            ))))
        })
    }

    fn transport_error<E: std::error::Error>(&self, s: Status) -> RpcErr<E> {
        let m = Msg(format!(
            "member {} at {}: {}",
            self.target,
            self.addr,
            s.message()
        ));
        if s.code() == tonic::Code::Unavailable {
            RPCError::Unreachable(Unreachable::new(&m))
        } else {
            RPCError::Network(NetworkError::new(&m))
        }
    }

    fn answer<T, E>(&self, reply: pb::RaftPayload) -> Result<T, RpcErr<E>>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        self.reach.ok(self.target);
        if !reply.error.is_empty() {
            let e: RaftError<NodeId, E> = serde_json::from_slice(&reply.error)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            return Err(RPCError::RemoteError(RemoteError::new(self.target, e)));
        }
        serde_json::from_slice(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

fn with_timeout<T>(msg: T, option: &RPCOption) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(option.hard_ttl());
    r
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let sent = Instant::now();
        let term = rpc.vote.leader_id().get_term();
        let as_leader = rpc.vote.is_committed();
        let req = payload(&rpc, &option)?;
        let reply = self
            .client()?
            .append_entries(req)
            .await
            .map_err(|s| self.transport_error(s))?;
        let resp = self.answer(reply.into_inner())?;
        // Any answer but a higher vote means the peer accepted this leader's term, and
        // refuses other candidates for a while after: the leader's proof for the lease.
        if as_leader && !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
            self.reach.leader_acked(self.target, term, sent);
        }
        Ok(resp)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let chunk = pb::SnapshotChunk {
            vote: encode_rpc(&rpc.vote)?,
            meta: encode_rpc(&rpc.meta)?,
            offset: rpc.offset,
            data: rpc.data,
            done: rpc.done,
        };
        let reply = self
            .client()?
            .install_snapshot(with_timeout(chunk, &option))
            .await
            .map_err(|s| self.transport_error(s))?;
        self.answer(reply.into_inner())
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let req = payload(&rpc, &option)?;
        let reply = self
            .client()?
            .vote(req)
            .await
            .map_err(|s| self.transport_error(s))?;
        self.answer(reply.into_inner())
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // A dead member is retried every 200 ms, so that a restarted one rejoins fast.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

/// The server side: hands RPCs from other members to the local Raft.
pub struct TransportService {
    pub raft: Raft,
    pub reach: Reachability,
}

/// Only members speak Raft, and a member only in its own name: the node id a request
/// claims to come from (the leader of an AppendEntries, the candidate of a Vote) must
/// be the one in its certificate, so one compromised member cannot impersonate others.
fn check_sender<T>(request: &Request<T>, what: &str) -> Result<Option<NodeId>, Status> {
    match authorize(request, Need::Raft, what)? {
        Caller::Anonymous => Ok(None),
        Caller::Id(Identity::Member(id)) => Ok(Some(id)),
        Caller::Id(other) => Err(Status::permission_denied(format!(
            "{other} may not {what}: only monitor members speak Raft"
        ))),
    }
}

fn check_claim(cert: Option<NodeId>, claimed: Option<NodeId>, what: &str) -> Result<(), Status> {
    match (cert, claimed) {
        (Some(c), Some(claimed)) if c != claimed => Err(Status::permission_denied(format!(
            "member {c} sent {what} in the name of member {claimed}"
        ))),
        _ => Ok(()),
    }
}

fn reply<T: Serialize, E: Serialize>(r: Result<T, E>) -> Result<Response<pb::RaftPayload>, Status> {
    Ok(Response::new(match r {
        Ok(v) => pb::RaftPayload {
            data: encode(&v)?,
            error: vec![],
        },
        Err(e) => pb::RaftPayload {
            data: vec![],
            error: encode(&e)?,
        },
    }))
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn append_entries(
        &self,
        request: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let sender = check_sender(&request, "send Raft AppendEntries")?;
        let req: AppendEntriesRequest<TypeConfig> = decode(&request.into_inner().data)?;
        check_claim(sender, req.vote.leader_id().voted_for(), "AppendEntries")?;
        // A follower sends nothing itself: hearing from the leader is how it knows
        // a majority may be reachable.
        if let Some(id) = req.vote.leader_id().voted_for() {
            self.reach.ok(id);
        }
        reply(self.raft.append_entries(req).await)
    }

    async fn vote(
        &self,
        request: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let sender = check_sender(&request, "send a Raft Vote")?;
        let req: VoteRequest<NodeId> = decode(&request.into_inner().data)?;
        check_claim(sender, req.vote.leader_id().voted_for(), "a Vote")?;
        if let Some(id) = req.vote.leader_id().voted_for() {
            self.reach.ok(id);
        }
        reply(self.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::SnapshotChunk>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let sender = check_sender(&request, "send a Raft snapshot")?;
        let c = request.into_inner();
        let vote: openraft::Vote<NodeId> = decode(&c.vote)?;
        check_claim(sender, vote.leader_id().voted_for(), "a snapshot")?;
        let req = InstallSnapshotRequest::<TypeConfig> {
            vote,
            meta: decode(&c.meta)?,
            offset: c.offset,
            data: c.data,
            done: c.done,
        };
        reply(self.raft.install_snapshot(req).await)
    }
}
