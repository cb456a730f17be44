//! A small client of the monitor group: tries the members in turn, follows the
//! `x-pgquorum-leader` hint a follower returns, and converts the wire assignment into
//! the core type (rejecting what does not parse).

use std::collections::HashMap;
use std::time::Duration;

use pgquorum_api::pb::monitor as pb;
use pgquorum_api::pb::monitor::monitor_client::MonitorClient;
use pgquorum_core::Assignment;
use pgquorum_trust::{Dial, Security};
use tonic::transport::Channel;

use crate::error::{KeeperError, Result};

pub struct Monitors {
    endpoints: Vec<String>,
    current: usize,
    channels: HashMap<String, Channel>,
    timeout: Duration,
    security: Security,
    /// This process's stamp on its reports (see `pgquorum_core::ReportStamp`): a random
    /// instance id, a sequence that grows with every request (a retry must not look like
    /// the request that may already have arrived), and the clock they are sent by.
    instance: u64,
    sequence: u64,
    started: std::time::Instant,
}

/// A random, non-zero id for this keeper process.
fn process_instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish().max(1)
}

impl Monitors {
    pub fn new(endpoints: Vec<String>, timeout: Duration, security: Security) -> Result<Monitors> {
        if endpoints.is_empty() {
            return Err(KeeperError::Config(
                "--monitor needs at least one HOST:PORT".into(),
            ));
        }
        Ok(Monitors {
            endpoints,
            current: 0,
            channels: HashMap::new(),
            timeout,
            security,
            instance: process_instance(),
            // The monitor's health table also drops a beat whose sequence goes backwards
            // by a little (reordered): a restarted keeper must not start just below its
            // previous life, so count from the wall clock.
            sequence: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            started: std::time::Instant::now(),
        })
    }

    fn client(&mut self) -> Result<(String, MonitorClient<Channel>)> {
        let ep = self.endpoints[self.current % self.endpoints.len()].clone();
        self.client_for(ep)
    }

    fn client_for(&mut self, ep: String) -> Result<(String, MonitorClient<Channel>)> {
        if !self.channels.contains_key(&ep) {
            let ch = pgquorum_trust::channel(
                &ep,
                &self.security,
                &Dial {
                    connect_timeout: self.timeout,
                    request_timeout: Some(self.timeout),
                    keep_alive: None,
                    expect: None,
                },
            )
            .map_err(|e| KeeperError::Config(format!("monitor address: {e}")))?;
            self.channels.insert(ep.clone(), ch);
        }
        let ch = self
            .channels
            .get(&ep)
            .cloned()
            .ok_or_else(|| KeeperError::Monitor("internal: channel vanished".into()))?;
        Ok((ep, MonitorClient::new(ch)))
    }

    /// After a failure: go to the hinted leader if there is one, else the next member.
    fn next(&mut self, status: Option<&tonic::Status>) {
        // A member that did not answer may sit behind a connection that died silently
        // (this host left the network and came back, perhaps at a new address): no reset
        // ever arrives, so the cached channel would time out forever. Dial it afresh.
        if let Some(ep) = self.endpoints.get(self.current % self.endpoints.len()) {
            self.channels.remove(ep);
        }
        match status.and_then(pgquorum_api::leader_hint) {
            Some(h) => self.prefer(h),
            None => self.current = (self.current + 1) % self.endpoints.len(),
        }
    }

    /// Talk to `leader` from now on (added to the endpoints if it was not listed).
    fn prefer(&mut self, leader: String) {
        self.current = match self.endpoints.iter().position(|e| *e == leader) {
            Some(i) => i,
            None => {
                self.endpoints.push(leader);
                self.endpoints.len() - 1
            }
        };
    }

    pub async fn register(
        &mut self,
        req: pb::RegisterNodeRequest,
    ) -> Result<pb::RegisterNodeReply> {
        let mut last = String::new();
        for _ in 0..self.endpoints.len() * 2 {
            let (ep, mut c) = self.client()?;
            match bounded(self.timeout, c.register_node(req.clone())).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => {
                    if s.code() == tonic::Code::InvalidArgument
                        || s.code() == tonic::Code::FailedPrecondition
                        || s.code() == tonic::Code::AlreadyExists
                    {
                        return Err(KeeperError::Refused(format!("{ep}: {}", s.message())));
                    }
                    last = format!("{ep}: {} {}", s.code(), s.message());
                    self.next(Some(&s));
                }
            }
        }
        Err(KeeperError::Monitor(format!(
            "no member answered RegisterNode; last: {last}"
        )))
    }

    /// Sends one report to the group: to the member beaten to lately (the leader, in
    /// steady state), and to every other member as well when that one has not answered
    /// within [`HEDGE_AFTER`] or refused.
    ///
    /// Why: right after the leader is cut off, it gives no answer, the followers still
    /// forward to it or name it until they elect another (openraft 0.9 grants no vote
    /// while a follower heard a leader within election_timeout_max, so an election
    /// took 0.6-1.6 s), and a newly elected leader only records the first report of
    /// this process. Tried one member after the other, each with a 500 ms timeout, the
    /// 1.5 s lease ran out in half the `fault-bench --kind leader-isolated` runs and the
    /// primary was fenced for about 2 s, where losing a minority of members, the leader
    /// included, must change nothing for PostgreSQL (DESIGN.md).
    pub async fn node_active(
        &mut self,
        mut req: pb::NodeActiveRequest,
    ) -> Result<pb::NodeActiveReply> {
        let mut calls: tokio::task::JoinSet<Attempt> = tokio::task::JoinSet::new();
        let first = self.endpoints[self.current % self.endpoints.len()].clone();
        self.attempt(&mut calls, first.clone(), &mut req)?;
        let mut everywhere = false;
        // A member that answers "first report of this process" (a new leader) or
        // "superseded" (another of these attempts came first) is asked once more.
        let mut again: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut last = String::new();
        let hedge = tokio::time::sleep(HEDGE_AFTER);
        tokio::pin!(hedge);
        loop {
            tokio::select! {
                joined = calls.join_next() => {
                    let Some(joined) = joined else {
                        if everywhere {
                            break;
                        }
                        everywhere = true;
                        self.attempt_others(&mut calls, &first, &mut req)?;
                        continue;
                    };
                    let Ok((ep, result)) = joined else { continue };
                    match result {
                        Ok(r) => {
                            calls.abort_all();
                            return Ok(self.answered(&ep, r));
                        }
                        Err(s) => {
                            final_refusal(&ep, &s, req.node_id)?;
                            last = format!("{ep}: {} {}", s.code(), s.message());
                            if ep == first {
                                self.next(Some(&s));
                            }
                            if s.code() == tonic::Code::Aborted && again.insert(ep.clone()) {
                                self.attempt(&mut calls, ep, &mut req)?;
                            } else if matches!(
                                s.code(),
                                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                            ) {
                                // Perhaps behind a connection that died silently (this
                                // host left the network and came back): no reset ever
                                // arrives, so dial afresh next time.
                                self.channels.remove(&ep);
                            }
                            if !everywhere {
                                everywhere = true;
                                self.attempt_others(&mut calls, &first, &mut req)?;
                            }
                        }
                    }
                }
                _ = &mut hedge, if !everywhere => {
                    everywhere = true;
                    self.attempt_others(&mut calls, &first, &mut req)?;
                }
            }
        }
        Err(KeeperError::Monitor(format!(
            "no member answered NodeActive; last: {last}"
        )))
    }

    /// Starts one attempt at `ep`, stamped anew: a retry must not look like the request
    /// that may already have arrived.
    fn attempt(
        &mut self,
        calls: &mut tokio::task::JoinSet<Attempt>,
        ep: String,
        req: &mut pb::NodeActiveRequest,
    ) -> Result<()> {
        let (ep, mut c) = self.client_for(ep)?;
        self.sequence += 1;
        req.sequence = self.sequence;
        req.keeper_instance = self.instance;
        req.sent_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let r = req.clone();
        let timeout = self.timeout;
        calls.spawn(async move { (ep, bounded(timeout, c.node_active(r)).await) });
        Ok(())
    }

    fn attempt_others(
        &mut self,
        calls: &mut tokio::task::JoinSet<Attempt>,
        first: &str,
        req: &mut pb::NodeActiveRequest,
    ) -> Result<()> {
        let others: Vec<String> = self
            .endpoints
            .iter()
            .filter(|e| e.as_str() != first)
            .cloned()
            .collect();
        for ep in others {
            self.attempt(calls, ep, req)?;
        }
        Ok(())
    }

    /// An answer from `ep`: beat to the leader it names (a follower forwarded the
    /// report), or to `ep` itself, from now on.
    fn answered(
        &mut self,
        ep: &str,
        r: tonic::Response<pb::NodeActiveReply>,
    ) -> pb::NodeActiveReply {
        match pgquorum_api::leader_hint_in(r.metadata()) {
            Some(h) => self.prefer(h),
            None => self.prefer(ep.to_owned()),
        }
        r.into_inner()
    }
}

/// How long the member beaten to has to answer before every other member is asked
/// too: one heartbeat interval (a beat slower than that is late anyway).
const HEDGE_AFTER: Duration = Duration::from_millis(200);

/// One attempt's member and outcome.
type Attempt = (
    String,
    std::result::Result<tonic::Response<pb::NodeActiveReply>, tonic::Status>,
);

/// Err for the refusals no other member would answer differently: the node is unknown
/// (dropped), or the group refuses it as it is (another cluster's data directory: no
/// lease, no assignment; the keeper stops).
fn final_refusal(ep: &str, s: &tonic::Status, node_id: u64) -> Result<()> {
    match s.code() {
        tonic::Code::NotFound => Err(KeeperError::UnknownNode(node_id)),
        tonic::Code::FailedPrecondition => {
            Err(KeeperError::Refused(format!("{ep}: {}", s.message())))
        }
        _ => Ok(()),
    }
}

/// One call, given up after `timeout` whatever it waits on. The endpoint's own timeouts
/// bound the TCP connect and the request, not the name lookup before the connect: a
/// dead member's name behind a silent DNS server would hold the heartbeat, and the
/// lease with it, for the resolver's whole timeout.
async fn bounded<T>(
    timeout: std::time::Duration,
    call: impl std::future::Future<Output = std::result::Result<T, tonic::Status>>,
) -> std::result::Result<T, tonic::Status> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")))
}

/// The wire assignment as the core type, through the api crate's validation: an
/// unknown goal state, a host that is not an address or host name, a name outside the
/// node-name rules or an ill-formed synchronous_standby_names is an error, not a guess.
/// Zero lease and heartbeat values (an older monitor) take the defaults.
pub fn assignment_from_pb(a: &pb::Assignment) -> Result<Assignment> {
    let mut a = a.clone();
    if a.lease_ms == 0 {
        a.lease_ms = 1500;
    }
    if a.heartbeat_interval_ms == 0 {
        a.heartbeat_interval_ms = 200;
    }
    if a.on_quorum_loss.is_empty() {
        a.on_quorum_loss = "block".into();
    }
    Assignment::try_from(a).map_err(|e| KeeperError::Monitor(format!("refused assignment: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pgquorum_core::NodeState;

    #[test]
    fn assignment_conversion_validates() {
        let mut a = pb::Assignment {
            goal_state: "secondary".into(),
            primary: Some(pb::PeerNode {
                node_id: 1,
                name: "a".into(),
                host: "10.0.0.1".into(),
                port: 5432,
                streamed: false,
            }),
            ..Default::default()
        };
        let c = assignment_from_pb(&a).unwrap();
        assert_eq!(c.goal_state, NodeState::Secondary);
        assert_eq!(c.primary.unwrap().port, 5432);
        assert_eq!(c.lease_ms, 1500);
        a.goal_state = "bogus".into();
        assert!(assignment_from_pb(&a).is_err());
        a.goal_state = "primary".into();
        a.primary.as_mut().unwrap().port = 70000;
        assert!(assignment_from_pb(&a).is_err());
        a.primary.as_mut().unwrap().port = 5432;
        a.primary.as_mut().unwrap().host = "10.0.0.1 password=x".into();
        assert!(assignment_from_pb(&a).is_err());
    }
}
