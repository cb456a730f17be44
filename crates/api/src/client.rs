//! A Monitor API client over several member endpoints.
//!
//! Any member answers any call, but a member that cannot reach the leader answers
//! UNAVAILABLE (naming the leader when it knows it). This client tries the member that
//! last answered first, follows leader hints, then the others in turn, with short
//! connect timeouts, until `retry_for` has passed. Errors other than UNAVAILABLE are
//! answers (e.g. "formation exists") and are returned at once.
//!
//! When no member serves the request, the error says why for each address tried
//! (connection refused, name not resolved, TLS, not a pgquorum monitor, or what the
//! member answered: "no quorum: only 1 of 3 ..." when that is why) and the last leader
//! a member named. When no member answers at all, the client stops
//! after `give_up_unreachable_after` instead of the whole retry budget.

use std::collections::{BTreeMap, HashMap, VecDeque};
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
    unreachable_for: Option<Duration>,
    security: Security,
}

/// The outcome of asking one member, for the error when none served the request.
enum Tried {
    /// A gRPC answer: the member is up but cannot serve (no leader, no quorum).
    Answered(String),
    /// No gRPC answer: refused, unresolved, TLS, timed out, or not a monitor.
    NoAnswer(String),
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
            unreachable_for: None,
            security,
        })
    }

    /// How long to keep trying members that answer UNAVAILABLE (default 3 s).
    pub fn retry_for(mut self, d: Duration) -> Self {
        self.retry_for = d;
        self
    }

    /// Stop after `d` when no member gives any gRPC answer (nothing listens, names do
    /// not resolve, TLS fails), rather than retrying for the whole `retry_for`: an
    /// operator's command says at once that it reaches nothing. Default: `retry_for`.
    pub fn give_up_unreachable_after(mut self, d: Duration) -> Self {
        self.unreachable_for = Some(d);
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
        if let Some(what) = not_a_monitor(&s) {
            return Status::unavailable(format!(
                "{addr}: not a pgquorum monitor ({what}); check the address and port (the monitor's gRPC --listen, not a keeper's --http or /metrics)"
            ));
        }
        if !is_transport(&s) {
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

    /// The innermost cause of a transport failure (the connector's own error names the
    /// address and says refused, unresolved, timed out or TLS), with the TLS hint.
    fn cause(&self, addr: &str, s: &Status) -> String {
        use std::error::Error as _;
        let mut deepest = s.message().to_owned();
        let mut source = s.source();
        while let Some(e) = source {
            deepest = e.to_string();
            source = e.source();
        }
        if !deepest.contains(addr) {
            deepest = format!("{addr}: {deepest}");
        }
        // Connected, but the conversation failed: the other end speaks another protocol
        // (a keeper's HTTP port, PostgreSQL) or TLS where we spoke plain, or the reverse.
        let mut io_kind = None;
        let mut source = s.source();
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                io_kind = Some(io.kind());
            }
            source = e.source();
        }
        let garbled = matches!(
            io_kind,
            Some(
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::InvalidData
            )
        ) || deepest.contains("h2 protocol error");
        if garbled {
            deepest.push_str(match self.security {
                Security::Insecure => " (it does not speak plain gRPC: not a pgquorum monitor (a keeper's --http port?), or a monitor that requires TLS: then give --certs-dir DIR or PGQUORUM_CERTS_DIR)",
                Security::Tls(_) => " (it does not speak TLS gRPC: not a pgquorum monitor (a keeper's --http port?), or a monitor run with --insecure)",
            });
        }
        deepest
    }

    /// Why no member served the request, address by address; the code is UNAVAILABLE.
    fn none_served(&self, tried: &BTreeMap<String, Tried>, leader: Option<&str>) -> Status {
        let answered = tried.values().any(|t| matches!(t, Tried::Answered(_)));
        // The members' own answers follow and say "no quorum" when that is the reason;
        // an election under way looks the same from here and is not called one.
        let head = if answered {
            match leader {
                Some(l) => format!("no monitor leader reachable (last known leader {l})"),
                None => "no monitor leader reachable (leader unknown)".to_owned(),
            }
        } else {
            "no monitor member reachable".to_owned()
        };
        let detail: Vec<String> = tried
            .iter()
            .map(|(addr, t)| match t {
                Tried::Answered(m) => format!("{addr} answered: {m}"),
                Tried::NoAnswer(m) if m.contains(addr.as_str()) => m.clone(),
                Tried::NoAnswer(m) => format!("{addr}: {m}"),
            })
            .collect();
        Status::unavailable(format!("{head}; {}", detail.join("; ")))
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
        let started = tokio::time::Instant::now();
        let deadline = started + self.retry_for;
        let unreachable_deadline = started + self.unreachable_for.unwrap_or(self.retry_for);
        let mut outcomes: BTreeMap<String, Tried> = BTreeMap::new();
        let mut last_leader: Option<String> = None;
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
            let mut answered = false;
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
                    // A member without a leader, nothing answering, or something that is
                    // not a monitor: try the others.
                    Err(s)
                        if s.code() == Code::Unavailable
                            || is_transport(&s)
                            || not_a_monitor(&s).is_some() =>
                    {
                        tracing::debug!(member = %addr, error = %s.message(), "monitor member unavailable");
                        if let Some(hint) = leader_hint(&s) {
                            last_leader = Some(hint.clone());
                            if !tried.contains(&hint) {
                                queue.push_front(hint);
                            }
                        }
                        let outcome = if not_a_monitor(&s).is_some() {
                            Tried::NoAnswer(self.explain(&addr, s).message().to_owned())
                        } else if is_transport(&s) {
                            Tried::NoAnswer(self.cause(&addr, &s))
                        } else {
                            answered = true;
                            Tried::Answered(s.message().to_owned())
                        };
                        outcomes.insert(addr, outcome);
                    }
                    Err(s) => return Err(ClientError::Status(self.explain(&addr, s))),
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline || (!answered && now >= unreachable_deadline) {
                return Err(ClientError::Status(
                    self.none_served(&outcomes, last_leader.as_deref()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A failure to get any gRPC answer (refused, unresolved, TLS, timed out): tonic's
/// transport errors carry no response headers, every gRPC answer carries its
/// content-type.
fn is_transport(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    ) && !s.metadata().contains_key("content-type")
}

/// Some(what was found) when the server that answered is not a pgquorum monitor: an
/// HTTP server that is not gRPC, or a gRPC server without the Monitor API. A gRPC
/// answer always carries its content-type; a status tonic inferred from a plain HTTP
/// answer (404 from a keeper's --http port, say) carries no headers and, unlike a
/// transport error, no underlying cause.
fn not_a_monitor(s: &Status) -> Option<String> {
    use std::error::Error as _;
    let content_type = s
        .metadata()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match content_type {
        Some(ct) if !ct.starts_with("application/grpc") => {
            Some(format!("it answered HTTP with content-type {ct}"))
        }
        Some(_) if s.code() == Code::Unimplemented => {
            Some("a gRPC server without the pgquorum Monitor API".to_owned())
        }
        Some(_) => None,
        None if s.metadata().is_empty() && s.source().is_none() && s.code() != Code::Ok => {
            Some(format!("it answered plain HTTP, not gRPC: {}", s.message()))
        }
        None => None,
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
        let msg = err.to_string();
        assert!(msg.contains("127.0.0.1:1"), "{msg}");
        assert!(msg.contains("no monitor member reachable"), "{msg}");
    }

    #[tokio::test]
    async fn nothing_listening_is_reported_without_waiting_out_the_retry_budget() {
        let c = MonitorClient::new(["127.0.0.1:1", "127.0.0.1:2"], Security::Insecure)
            .unwrap()
            .retry_for(Duration::from_secs(30))
            .give_up_unreachable_after(Duration::from_millis(200));
        let started = std::time::Instant::now();
        let err = c
            .call(|mut raw| async move {
                raw.member_status(crate::pb::monitor::MemberStatusRequest {})
                    .await
            })
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let msg = err.to_string();
        assert!(
            msg.contains("127.0.0.1:1") && msg.contains("127.0.0.1:2"),
            "{msg}"
        );
    }

    #[test]
    fn an_http_answer_is_not_a_monitor() {
        // What tonic makes of an HTTP 404: a code, a message, nothing else.
        let s =
            Status::unimplemented("grpc-status header missing, mapped from HTTP status code 404");
        assert!(not_a_monitor(&s).is_some());
        let mut s = Status::unimplemented("x");
        s.metadata_mut()
            .insert("content-type", "text/plain; charset=utf-8".parse().unwrap());
        assert!(not_a_monitor(&s).is_some());
        let mut grpc = Status::unavailable("no leader");
        grpc.metadata_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        assert!(not_a_monitor(&grpc).is_none());
        assert!(!is_transport(&grpc));
    }
}
