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

    /// Sends one report (stamped here, each attempt anew) to the group.
    pub async fn node_active(
        &mut self,
        mut req: pb::NodeActiveRequest,
    ) -> Result<pb::NodeActiveReply> {
        let mut last = String::new();
        // At least two attempts: the first report a monitor leader hears from this
        // process is only recorded (ABORTED) and the next judged against it, also with a
        // single member.
        for _ in 0..self.endpoints.len().max(2) {
            let (ep, mut c) = self.client()?;
            self.sequence += 1;
            req.sequence = self.sequence;
            req.keeper_instance = self.instance;
            req.sent_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            match bounded(self.timeout, c.node_active(req.clone())).await {
                Ok(r) => {
                    // Answered through a follower: beat to the leader directly from
                    // now on instead of costing two members every beat.
                    if let Some(h) = pgquorum_api::leader_hint_in(r.metadata()) {
                        self.prefer(h);
                    }
                    return Ok(r.into_inner());
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(KeeperError::UnknownNode(req.node_id));
                }
                // The group refuses this node as it is (another cluster's data
                // directory): no lease, no assignment; the keeper stops.
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    return Err(KeeperError::Refused(format!("{ep}: {}", s.message())));
                }
                Err(s) => {
                    last = format!("{ep}: {} {}", s.code(), s.message());
                    self.next(Some(&s));
                }
            }
        }
        Err(KeeperError::Monitor(format!(
            "no member answered NodeActive; last: {last}"
        )))
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
