//! Starting a member: open the store, check it belongs to this group, start Raft and
//! the servers, form the group the first time, and run the leader's orchestrator.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use pgquorum_api::pb::monitor::monitor_server::MonitorServer;
use pgquorum_api::pb::raft::raft_transport_server::RaftTransportServer;
use pgquorum_core::DEFAULT_FORMATION;
use pgquorum_trust::{Security, Serve};

use crate::member::Member;
use crate::network::{Network, Reachability, TransportService, MAX_MESSAGE_BYTES};
use crate::service::MonitorService;
use crate::store::{self, StoreError};
use crate::types::{NodeId, Raft};

/// Raft timing, chosen so that losing the leader costs under a second on a LAN. openraft
/// makes followers refuse votes for `election_max_ms` after the last heartbeat (the
/// leader lease), so a new leader commits roughly 1-1.5 x `election_max_ms` after the
/// old one died. `pgquorum monitor run` uses heartbeat 75 ms, elections 225-450 ms.
#[derive(Debug, Clone)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_ms: 100,
            election_min_ms: 300,
            election_max_ms: 600,
        }
    }
}

#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub node_id: NodeId,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Every member of the group, this one included (unless joining).
    pub peers: BTreeMap<NodeId, String>,
    /// Join an existing group through add-member instead of forming one.
    pub join: bool,
    /// Take a snapshot (and compact the log) after this many applied entries.
    pub snapshot_threshold: u64,
    pub timing: Timing,
    /// How long a write waits for a quorum before it is refused.
    pub write_timeout: Duration,
    /// This member's certificates (or `--insecure`): the Monitor API and the Raft
    /// transport are served, and peers dialled, with them.
    pub security: Security,
    /// Where to serve Prometheus `/metrics` (plain HTTP, read-only, nothing secret), so
    /// scrapers need no client certificate. None: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Connection cap and handshake timeout of the gRPC server.
    pub serve: Serve,
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("Raft failed: {0}")]
    Raft(String),
    #[error("server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A stable id for the group, derived from its founding members: every member started
/// with the same --peer list computes the same one (FNV-1a, fixed here forever).
pub fn group_id_of(peers: &BTreeMap<NodeId, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (id, addr) in peers {
        for b in format!("{id}={addr};").bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("g-{h:016x}")
}

fn describe(m: &BTreeMap<NodeId, String>) -> String {
    m.iter()
        .map(|(id, a)| format!("--peer {id}={a}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs one member until `shutdown` completes.
pub async fn run(
    cfg: MemberConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MonitorError> {
    if !cfg.join && !cfg.peers.contains_key(&cfg.node_id) {
        return Err(MonitorError::Config(format!(
            "--node-id {} is not among the --peer list ({}); list every member, this one included, or use --join to join an existing group",
            cfg.node_id,
            describe(&cfg.peers)
        )));
    }
    let addr = cfg
        .peers
        .get(&cfg.node_id)
        .cloned()
        .unwrap_or_else(|| cfg.listen.to_string());
    let group_id = if cfg.join {
        store::JOINED.to_owned()
    } else {
        group_id_of(&cfg.peers)
    };
    let (log_store, sm, header) = store::open(&cfg.data_dir, &group_id)?;
    let applied = sm.applied();

    let config = Config {
        cluster_name: "pgquorum-monitor".into(),
        heartbeat_interval: cfg.timing.heartbeat_ms,
        election_timeout_min: cfg.timing.election_min_ms,
        election_timeout_max: cfg.timing.election_max_ms,
        install_snapshot_timeout: 5_000,
        snapshot_max_chunk_size: 1024 * 1024,
        max_payload_entries: 1000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_threshold),
        // Keep a fifth of a snapshot interval of log for followers that lag briefly;
        // anything further behind catches up through a snapshot.
        max_in_snapshot_log_to_keep: cfg.snapshot_threshold / 5,
        ..Default::default()
    }
    .validate()
    .map_err(|e| MonitorError::Config(format!("Raft settings: {e}")))?;
    let reach = Reachability::default();
    let raft = Raft::new(
        cfg.node_id,
        Arc::new(config),
        Network {
            reach: reach.clone(),
            security: cfg.security.clone(),
        },
        log_store,
        sm,
    )
    .await
    .map_err(|e| {
        MonitorError::Raft(format!(
            "cannot start from {}: {e}. {REBUILD_HINT}",
            cfg.data_dir.display()
        ))
    })?;

    // A restart must agree with what the group itself recorded.
    // Read from Raft's own state, not from metrics: those may not be published yet.
    let stored: BTreeMap<NodeId, String> = raft
        .with_raft_state(|st| {
            let m = st.membership_state.effective().clone();
            m.voter_ids()
                .filter_map(|id| m.get_node(&id).map(|n| (id, n.addr.clone())))
                .collect()
        })
        .await
        .map_err(|e| MonitorError::Raft(e.to_string()))?;
    tracing::info!(node = cfg.node_id, stored = %describe(&stored), "membership read from the data directory");
    if !cfg.join && (stored.is_empty() || stored != cfg.peers) {
        // The founding list decides the group id; after add/remove-member the stored
        // membership is what a restart must name.
        let refusal = match header.check(&group_id, &cfg.data_dir) {
            Err(e) if stored.is_empty() => Some(MonitorError::Store(e)),
            Err(e) => Some(MonitorError::Config(format!(
                "{e}; its stored membership is {}",
                describe(&stored)
            ))),
            Ok(()) if !stored.is_empty() => Some(MonitorError::Config(format!(
                "the --peer list ({}) contradicts the group's membership stored in {} ({}); start this member with the stored list, and change the membership with `pgquorum monitor add-member` / `remove-member`",
                describe(&cfg.peers),
                cfg.data_dir.display(),
                describe(&stored)
            ))),
            Ok(()) => None,
        };
        if let Some(e) = refusal {
            let _ = raft.shutdown().await;
            return Err(e);
        }
    }

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| MonitorError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let member = Arc::new(
        Member::new(
            cfg.node_id,
            addr.clone(),
            header.group_id.clone(),
            raft.clone(),
            applied,
            reach,
            cfg.write_timeout,
            cfg.security.clone(),
        )
        .with_raft_timing(&cfg.timing),
    );
    tracing::info!(node = cfg.node_id, listen = %cfg.listen, group = %header.group_id, data_dir = %cfg.data_dir.display(), "monitor member starting");

    // Formation: every founding member on an empty store proposes the same
    // membership; openraft refuses a second initialize on any member that has already
    // voted or logged, and the identical membership means elections settle on one group.
    if stored.is_empty() && !cfg.join {
        let nodes: BTreeMap<NodeId, BasicNode> = cfg
            .peers
            .iter()
            .map(|(id, a)| (*id, BasicNode::new(a.clone())))
            .collect();
        match raft.initialize(nodes).await {
            Ok(()) => tracing::info!(
                node = cfg.node_id,
                "group initialized with {} members",
                cfg.peers.len()
            ),
            Err(e) => tracing::info!(node = cfg.node_id, "group already formed: {e}"),
        }
    }

    let metrics = match cfg.metrics_listen {
        Some(at) => {
            let metrics_listener = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|source| MonitorError::Bind { addr: at, source })?;
            let metrics_raft = raft.clone();
            let metrics_member = member.clone();
            let router = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let raft = metrics_raft.clone();
                    let member = metrics_member.clone();
                    async move { crate::metrics::render(&raft, &member).await }
                }),
            );
            tracing::info!(node = cfg.node_id, metrics = %at, "serving /metrics (plain HTTP, read-only)");
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(metrics_listener, router).await {
                    tracing::warn!(error = %e, "metrics server stopped");
                }
            }))
        }
        None => None,
    };
    let routes = tonic::service::Routes::default()
        .add_service(
            // Sized for the API, not for Raft: a request larger than any valid one is
            // refused before it is buffered and decoded.
            MonitorServer::new(MonitorService { m: member.clone() })
                .max_decoding_message_size(pgquorum_api::MAX_REQUEST_BYTES),
        )
        .add_service(
            RaftTransportServer::new(TransportService {
                raft: raft.clone(),
                reach: member.reach.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
    let orchestrator = tokio::spawn(orchestrator_loop(member.clone()));
    let leadership = tokio::spawn(leadership_events(member.clone()));
    // Every connection goes through the transport module: TLS 1.3 with a client
    // certificate (or plain TCP under --insecure), TCP_NODELAY (Nagle's algorithm and
    // delayed ACKs add 40 ms to some replies), a connection cap and a handshake timeout.
    let incoming = pgquorum_trust::incoming(listener, cfg.security.clone(), cfg.serve.clone());
    // A member whose Raft core stopped (a fatal storage error, a panic inside openraft)
    // must not look alive: it stops serving and exits non-zero, so that its supervisor
    // (systemd, Kubernetes) restarts it from its data directory.
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<String>();
    let watch_raft = raft.clone();
    let core_watch = tokio::spawn(async move {
        let reason = core_stopped(&watch_raft).await;
        let _ = stopped_tx.send(reason);
    });
    let mut stopped_rx = stopped_rx;
    let mut core_failure = None;
    let until = async {
        tokio::select! {
            _ = shutdown => {}
            r = &mut stopped_rx => {
                if let Ok(reason) = r {
                    core_failure = Some(reason);
                }
            }
        }
    };
    let served = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, until)
        .await;
    core_watch.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    orchestrator.abort();
    leadership.abort();
    let _ = raft.shutdown().await;
    tracing::info!(node = cfg.node_id, "monitor member stopped");
    served?;
    if let Some(reason) = core_failure {
        tracing::error!(node = cfg.node_id, %reason, "the Raft core stopped; exiting so that the member is restarted");
        return Err(MonitorError::Raft(format!(
            "the Raft core stopped ({reason}); the member exits to be restarted from its data directory. If it fails again at start: {REBUILD_HINT}"
        )));
    }
    Ok(())
}

/// What to do with a member whose data directory cannot be used.
pub const REBUILD_HINT: &str = "to bring the member back, from any machine run `pgquorum monitor remove-member ID`, move this data directory aside, start the member with an empty --data-dir and --join, then `pgquorum monitor add-member ID=HOST:PORT` (docs/operations.md, Monitor members); the group keeps working meanwhile";

/// Resolves when openraft's core has stopped by itself: its metrics report a fatal
/// error, or the core is gone (the metrics channel closed).
async fn core_stopped(raft: &openraft::Raft<crate::types::TypeConfig>) -> String {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            return fatal.to_string();
        }
        if metrics.changed().await.is_err() {
            return "the core task ended".to_string();
        }
    }
}

/// Records in the event history when this member takes the lead: after how long
/// without a leader (as this member saw it: from when it lost its leader to its own
/// election), and whether the group has just started. A group without quorum cannot
/// write anything, so the loss of quorum is recorded when it ends, by the next leader,
/// with its duration.
async fn leadership_events(m: Arc<Member>) {
    let started = std::time::Instant::now();
    let mut metrics = m.raft.metrics();
    let mut leaderless_since: Option<std::time::Instant> = Some(started);
    let mut previous: Option<NodeId> = None;
    let mut recorded_term = 0;
    loop {
        let (state, leader, term) = {
            let x = metrics.borrow_and_update();
            (x.state, x.current_leader, x.current_term)
        };
        let now = std::time::Instant::now();
        match leader {
            None => {
                leaderless_since.get_or_insert(now);
            }
            Some(l) if l == m.id && state == ServerState::Leader && term > recorded_term => {
                recorded_term = term;
                let gap = leaderless_since.map(|t| now.duration_since(t));
                let text = match (previous, gap) {
                    (None, _) => format!(
                        "monitor member {} leads the group (term {term}); it started {:.1} s ago and saw no leader before: the monitor group (re)started",
                        m.id,
                        started.elapsed().as_secs_f64()
                    ),
                    (Some(p), Some(g)) if g >= QUORUM_LOSS_REPORT => format!(
                        "monitor member {} leads the group (term {term}) after {:.1} s without a leader (previous leader: member {p}); no quorum meanwhile: nothing could be changed and no lease was granted",
                        m.id,
                        g.as_secs_f64()
                    ),
                    (Some(p), g) => format!(
                        "monitor member {} leads the group (term {term}); previous leader: member {p}{}",
                        m.id,
                        g.map(|g| format!(", {} ms without a leader", g.as_millis()))
                            .unwrap_or_default()
                    ),
                };
                let member = m.clone();
                tokio::spawn(async move {
                    let cmd = pgquorum_core::Command::RecordEvent {
                        formation: String::new(),
                        group_id: 0,
                        node_id: None,
                        description: text,
                    };
                    if let Err(s) = member.propose(cmd).await {
                        tracing::debug!(error = %s.message(), "leadership event not recorded");
                    }
                });
                leaderless_since = None;
                previous = Some(l);
            }
            Some(l) => {
                // A follower keeps naming its old leader until it starts an election;
                // a new name (or this member) after a gap ends the leaderless time.
                if Some(l) != previous || state == ServerState::Leader {
                    leaderless_since = None;
                }
                if state != ServerState::Leader || l != m.id {
                    previous = Some(l);
                }
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// A time without leader at least this long is reported as a loss of quorum (an
/// ordinary election takes well under a second).
const QUORUM_LOSS_REPORT: Duration = Duration::from_secs(2);

/// On the leader only: every heartbeat interval, let the core decide and propose
/// what it decided. Followers idle.
async fn orchestrator_loop(m: Arc<Member>) {
    loop {
        let interval = {
            let a = m.read();
            a.state
                .formations
                .get(DEFAULT_FORMATION)
                .map(|f| f.settings.heartbeat_interval_ms)
                .unwrap_or(200)
                .clamp(20, 10_000)
        };
        tokio::time::sleep(Duration::from_millis(interval)).await;
        if m.raft.metrics().borrow().state != ServerState::Leader {
            continue;
        }
        // Several rounds: one decision often enables the next (demoting a silent primary
        // fences it, which lets its standbys be asked for their LSN at once).
        if let Err(s) = m.orchestrate_rounds(None).await {
            tracing::warn!(error = %s.message(), "orchestrator proposal refused");
        }
    }
}

/// Parses `ID=HOST:PORT`.
pub fn parse_peer(s: &str) -> Result<(NodeId, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: use ID=HOST:PORT"))?;
    let id: NodeId = id
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: the id must be a positive integer"))?;
    if id == 0 {
        return Err(format!("{s:?}: the id must be a positive integer"));
    }
    let addr = addr.trim();
    if addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .is_none()
    {
        return Err(format!("{s:?}: the address must be HOST:PORT"));
    }
    Ok((id, addr.to_owned()))
}

/// Checks that a --peer list names each id and each address once.
pub fn peer_map(list: &[(NodeId, String)]) -> Result<BTreeMap<NodeId, String>, String> {
    let mut map = BTreeMap::new();
    let mut addrs = BTreeSet::new();
    for (id, a) in list {
        if map.insert(*id, a.clone()).is_some() {
            return Err(format!("member id {id} appears twice in --peer"));
        }
        if !addrs.insert(a.clone()) {
            return Err(format!("address {a} appears twice in --peer"));
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn group_id_depends_on_members_not_on_their_order() {
        let a = peer_map(&[(1, "h:1".into()), (2, "h:2".into())]).unwrap();
        let b = peer_map(&[(2, "h:2".into()), (1, "h:1".into())]).unwrap();
        assert_eq!(group_id_of(&a), group_id_of(&b));
        let c = peer_map(&[(1, "h:1".into()), (2, "h:3".into())]).unwrap();
        assert_ne!(group_id_of(&a), group_id_of(&c));
    }

    #[test]
    fn peers_are_validated() {
        assert_eq!(
            parse_peer("2=127.0.0.1:7000").unwrap(),
            (2, "127.0.0.1:7000".into())
        );
        assert!(parse_peer("0=h:1").is_err());
        assert!(parse_peer("x=h:1").is_err());
        assert!(parse_peer("1=h").is_err());
        assert!(peer_map(&[(1, "h:1".into()), (1, "h:2".into())]).is_err());
        assert!(peer_map(&[(1, "h:1".into()), (2, "h:1".into())]).is_err());
    }
}
