//! A Monitor API client over several member endpoints.
//!
//! Any member answers any call, but a member that cannot reach the leader answers
//! UNAVAILABLE (naming the leader when it knows it). This client tries the member that
//! last answered first, follows leader hints, then the others in turn, with short
//! connect timeouts, until `retry_for` has passed. Errors other than UNAVAILABLE are
//! answers (e.g. "formation exists") and are returned at once.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use pgquorum_trust::{Dial, Security};
use thiserror::Error;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::pb::monitor::monitor_client::MonitorClient as RawClient;
use crate::status::leader_hint;

pub type Raw = RawClient<Channel>;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no monitor endpoint given (use --monitor HOST:PORT,... or PGQUORUM_MONITOR)")]
    NoEndpoints,
    #[error("invalid monitor endpoint {0:?}: use HOST:PORT")]
    BadEndpoint(String),
    /// The member answered and refused (or every member was unavailable: then this is
    /// the last UNAVAILABLE seen).
    #[error("{}", .0.message())]
    Status(Status),
}

impl ClientError {
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// Splits `HOST:PORT,HOST:PORT` (as in `--monitor` and PGQUORUM_MONITOR).
pub fn parse_endpoints(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

pub struct MonitorClient {
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    preferred: Mutex<Option<String>>,
    connect_timeout: Duration,
    request_timeout: Duration,
    retry_for: Duration,
    security: Security,
}

impl MonitorClient {
    /// `endpoints` are `HOST:PORT` of monitor members, dialled with `security` (this
    /// client's certificate, or none under `--insecure`). No connection is made yet.
    pub fn new<I, S>(endpoints: I, security: Security) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        for e in &endpoints {
            if pgquorum_trust::transport::split_host_port(e).is_none() {
                return Err(ClientError::BadEndpoint(e.clone()));
            }
        }
        Ok(MonitorClient {
            endpoints,
            channels: Mutex::new(HashMap::new()),
            preferred: Mutex::new(None),
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(3),
            security,
        })
    }

    /// How long to keep trying members that answer UNAVAILABLE (default 3 s).
    pub fn retry_for(mut self, d: Duration) -> Self {
        self.retry_for = d;
        self
    }

    /// Per-request timeout (default 10 s; members bound their own waits below it).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut map = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ch = pgquorum_trust::channel(
            addr,
            &self.security,
            &Dial {
                connect_timeout: self.connect_timeout,
                request_timeout: Some(self.request_timeout),
                keep_alive: None,
                expect: None,
            },
        )
        .map_err(|_| ClientError::BadEndpoint(addr.to_owned()))?;
        map.insert(addr.to_owned(), ch.clone());
        Ok(ch)
    }

    /// Adds what the bare transport error leaves out: the address tried, the cause
    /// under tonic's "transport error" (refused, timed out, TLS), and the likely
    /// mismatch when a plain client meets a TLS server.
    fn explain(&self, addr: &str, s: Status) -> Status {
        use std::error::Error as _;
        let transport = matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
        ) && !s.metadata().contains_key("content-type");
        if !transport {
            return s;
        }
        let mut msg = s.message().to_owned();
        let mut source = s.source();
        while let Some(e) = source {
            let text = e.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            source = e.source();
        }
        if !msg.contains(addr) {
            msg = format!("{addr}: {msg}");
        }
        if matches!(self.security, Security::Insecure) && msg.contains("h2 protocol error") {
            msg.push_str(
                " (the monitor seems to require TLS: give --certs-dir DIR or PGQUORUM_CERTS_DIR)",
            );
        }
        Status::new(s.code(), msg)
    }

    /// A raw client for one member (no failover), e.g. to ask each member its status.
    pub fn raw(&self, addr: &str) -> Result<Raw, ClientError> {
        Ok(RawClient::new(self.channel(addr)?))
    }

    /// Runs `f` against the members until one answers something other than
    /// UNAVAILABLE, or `retry_for` has passed.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut(Raw) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.retry_for;
        loop {
            let mut queue: VecDeque<String> = VecDeque::new();
            let preferred = self
                .preferred
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone();
            if let Some(p) = preferred {
                queue.push_back(p);
            }
            for e in &self.endpoints {
                if !queue.contains(e) {
                    queue.push_back(e.clone());
                }
            }
            let mut tried: Vec<String> = Vec::new();
            let mut last: Option<Status> = None;
            while let Some(addr) = queue.pop_front() {
                if tried.contains(&addr) {
                    continue;
                }
                tried.push(addr.clone());
                match f(self.raw(&addr)?).await {
                    Ok(resp) => {
                        *self
                            .preferred
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(addr);
                        return Ok(resp.into_inner());
                    }
                    Err(s) if s.code() == Code::Unavailable => {
                        tracing::debug!(member = %addr, error = %s.message(), "monitor member unavailable");
                        if let Some(hint) = leader_hint(&s) {
                            if !tried.contains(&hint) {
                                queue.push_front(hint);
                            }
                        }
                        last = Some(s);
                    }
                    Err(s) => return Err(ClientError::Status(self.explain(&addr, s))),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let tried = tried.join(", ");
                return Err(ClientError::Status(match last {
                    Some(s) => self.explain(&tried, s),
                    None => Status::unavailable(format!("no monitor member answered ({tried})")),
                }));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn endpoints_parse_from_a_list() {
        assert_eq!(
            parse_endpoints(" a:1, b:2,,c:3 "),
            vec!["a:1".to_string(), "b:2".into(), "c:3".into()]
        );
        assert!(matches!(
            MonitorClient::new(Vec::<String>::new(), Security::Insecure),
            Err(ClientError::NoEndpoints)
        ));
    }

    #[tokio::test]
    async fn unreachable_members_give_unavailable_within_the_retry_budget() {
        // Port 1 on loopback refuses connections at once.
        let c = MonitorClient::new(["127.0.0.1:1"], Security::Insecure)
            .unwrap()
            .retry_for(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let err = c
            .call(|mut raw| async move {
                raw.member_status(crate::pb::monitor::MemberStatusRequest {})
                    .await
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
