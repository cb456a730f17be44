//! The keeper's run loop: heartbeat, fence, supervision, transitions, HTTP.
//!
//! Tasks:
//! * heartbeat — observes the local postgres, reports to the monitor group, renews the
//!   lease from each answer, and publishes the latest assignment;
//! * fence — stops a writable postgres the moment the lease runs out;
//! * main loop — reaches the assigned goal (one transition at a time) and restarts a
//!   postgres that died;
//! * HTTP — health endpoints and metrics.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgquorum_api::pb::monitor as pb;
use pgquorum_core::{Assignment, Lsn, NodeState};
use tokio::sync::{watch, Notify};
use tokio_postgres::Client;

use crate::error::{KeeperError, Result};
use crate::instance::Instance;
use crate::monitor_client::{assignment_from_pb, Monitors};
use crate::pg::postmaster::StopMode;
use crate::settings::Settings;
use crate::shared::Shared;
use crate::sql;

/// Where goal states come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The monitor group, HOST:PORT of each member, dialled with this keeper's
    /// certificate (or none under `--insecure`).
    Monitor(Vec<String>, pgquorum_trust::Security),
    /// A fixed assignment and a lease that never expires: running one node without a
    /// monitor (`pgquorum keeper apply`, tests). Never for production primaries.
    Static(Assignment),
}

/// Runs the keeper until `shutdown` resolves (then postgres is stopped) or the node is
/// dropped.
pub async fn run(
    settings: Settings,
    source: Source,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let shared = Arc::new(Shared::new());
    let mut inst = Instance::open(settings.clone(), shared.clone())?;
    if inst.state.current_state == NodeState::Dropped {
        // The operator dropped this node: it must not come back by itself (a service
        // manager restarting the keeper would otherwise re-register it).
        return Err(KeeperError::Config(format!(
            "node {} was dropped from the cluster; to register it again, remove {} (and the data directory {} to clone it afresh) and start the keeper again",
            settings.name,
            settings.state_file.display(),
            settings.pgdata.display()
        )));
    }
    tracing::info!(
        node = %settings.name,
        pgdata = %settings.pgdata.display(),
        state = %inst.state.current_state,
        pg_major = inst.bin.major,
        "keeper starting"
    );
    if settings.replication_password.is_none() && settings.pg_tls.is_none() {
        tracing::warn!(
            node = %settings.name,
            "no --replication-password: standbys can authenticate only through a ~/.pgpass file"
        );
    }
    if let Some(addr) = settings.http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| KeeperError::io(format!("binding --http {addr}"), e))?;
        let router = crate::http::router(shared.clone(), settings.name.clone());
        match settings.http_tls.clone() {
            None => {
                tokio::spawn(crate::http::serve(listener, router));
            }
            Some(tls) => {
                tracing::info!(%addr, "serving the HTTP endpoints over HTTPS");
                let conns =
                    pgquorum_trust::https_incoming(listener, tls, pgquorum_trust::Serve::default());
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(HttpsListener { conns, addr }, router).await {
                        tracing::error!(error = %e, "HTTPS server stopped");
                    }
                });
            }
        }
    }
    // The data directory's own system identifier goes into the registration, so that
    // the monitor group refuses another cluster's data directory before it records
    // the node (and before any primary makes a slot or an hba line for it). A
    // directory pg_controldata cannot read is refused here, unregistered, too.
    let system_identifier = match inst.state.system_identifier {
        Some(s) => Some(s),
        None if inst.has_data() => Some(inst.controldata().await?.system_identifier),
        None => None,
    };
    let (tx, mut rx) = watch::channel::<Option<Assignment>>(None);
    inst.assignments = Some(rx.clone());
    inst.slot_from_start = matches!(source, Source::Static(_));
    let (fatal_tx, mut fatal_rx) = watch::channel::<Option<String>>(None);
    let (dropped_tx, mut dropped_rx) = watch::channel(false);
    let beat_now = Arc::new(Notify::new());
    let hb = Heartbeat {
        beat_now: beat_now.clone(),
        settings: settings.clone(),
        shared: shared.clone(),
        tx,
        fatal: fatal_tx,
        pg_major: inst.bin.major,
        bin: inst.bin.clone(),
        system_identifier,
        dropped: dropped_tx,
    };
    // The guard is up before the main loop can make postgres writable.
    match crate::guard::Link::spawn(&crate::guard::own_exe(), &settings.pgdata).await {
        Ok(link) => shared.set_guard(link),
        Err(e) => {
            tracing::error!(node = %settings.name, error = %e, "cannot start the fence guard")
        }
    }
    let hb_task = tokio::spawn(hb.run(source));
    let fence_task = tokio::spawn(fence(
        shared.clone(),
        settings.name.clone(),
        settings.pgdata.clone(),
    ));
    let addresses_task = tokio::spawn(crate::addresses::follow(
        shared.clone(),
        rx.clone(),
        settings.name.clone(),
    ));

    tokio::pin!(shutdown);
    let mut applied: Option<Assignment> = None;
    let mut tick = Duration::from_millis(200);
    let result = loop {
        let exit = inst.exit_watch();
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = fatal_rx.changed() => {
                let msg = fatal_rx.borrow().clone().unwrap_or_default();
                break Err(KeeperError::Refused(msg));
            },
            r = rx.changed() => if r.is_err() {
                break Err(KeeperError::Monitor("the heartbeat task stopped".into()));
            },
            _ = postmaster_exit(exit) => {},
            _ = tokio::time::sleep(tick) => {},
        }
        let node_id = shared.status().node_id;
        if node_id.is_some() && node_id != inst.state.node_id {
            inst.state.node_id = node_id;
            inst.save_state()?;
        }
        let Some(a) = rx.borrow_and_update().clone() else {
            continue;
        };
        tick = Duration::from_millis(a.heartbeat_interval_ms.clamp(20, 1000));
        match inst.refresh_tls() {
            // The transition to the same goal rewrites the configuration.
            Ok(true) => applied = None,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(node = %settings.name, error = %e, "cannot copy the certificate files for postgres")
            }
        }
        if applied.as_ref() != Some(&a) || inst.state.current_state != a.goal_state {
            let before = inst.state.current_state;
            match inst.reach(&a).await {
                Ok(()) => {
                    applied = Some(a.clone());
                    // The monitor decides the next step of a failover only once it hears
                    // the reached state: tell it now rather than at the next interval.
                    if inst.state.current_state != before {
                        beat_now.notify_one();
                    }
                    if a.goal_state == NodeState::Dropped {
                        // The monitor removes the node once it hears `dropped` (the beat
                        // just triggered); without that it waits for this keeper to fall
                        // silent for a lease and its margin. Either way the name is free.
                        let acked = tokio::time::timeout(
                            DROP_ACK_WAIT,
                            dropped_rx.wait_for(|acked| *acked),
                        )
                        .await
                        .is_ok_and(|r| r.is_ok());
                        inst.state.node_id = None;
                        inst.save_state()?;
                        if acked {
                            tracing::info!(node = %settings.name, "node dropped and removed by the monitor group; keeper exits");
                        } else {
                            tracing::warn!(node = %settings.name, "node dropped; the monitor group did not confirm its removal in time (it removes a silent dropped node by itself); keeper exits");
                        }
                        break Ok(());
                    }
                }
                Err(e) => {
                    // Settings errors and foreign data directories need an operator.
                    if matches!(
                        e,
                        KeeperError::SystemIdentifierMismatch { .. }
                            | KeeperError::VersionMismatch { .. }
                            | KeeperError::RunAsRoot
                            | KeeperError::MissingBinaries(_)
                    ) {
                        break Err(e);
                    }
                    applied = None;
                    // A transition abandoned for a new goal starts the new one at once.
                    tick = if matches!(e, KeeperError::GoalChanged { .. }) {
                        Duration::from_millis(20)
                    } else {
                        Duration::from_millis(500)
                    };
                    // A postmaster that exited (fenced, crashed) and is not reaped keeps
                    // its exit watch ready: the loop would spin on it at full CPU until
                    // the transition succeeds (seen under partitions, starving the host).
                    inst.reap();
                    continue;
                }
            }
        }
        match inst.supervise(&a).await {
            Ok(true) => tracing::info!(node = %settings.name, "postgres restarted in place"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(node = %settings.name, error = %e, "restarting postgres failed");
                tick = Duration::from_millis(50);
            }
        }
    };
    hb_task.abort();
    fence_task.abort();
    addresses_task.abort();
    if !shared.hands_off.load(std::sync::atomic::Ordering::SeqCst) {
        inst.stop(StopMode::Fast).await;
    }
    result
}

/// How long a dropped keeper waits for the monitor group to confirm the node's removal.
const DROP_ACK_WAIT: Duration = Duration::from_secs(10);

async fn postmaster_exit(w: Option<watch::Receiver<Option<std::process::ExitStatus>>>) {
    match w {
        Some(mut w) => {
            while w.borrow_and_update().is_none() {
                if w.changed().await.is_err() {
                    return;
                }
            }
        }
        None => std::future::pending().await,
    }
}

/// Fencing (DESIGN.md invariant 1): once the lease has run out, a postgres that may be
/// writable is stopped (fast shutdown: new connections are refused and every session is
/// terminated at once). The monitor waits the lease plus a margin before promoting
/// another node, counting from when it answered; the keeper counts from before it sent.
///
/// This task is the first line; the fence guard (a separate process, see
/// [`crate::guard`]) is the one that holds when the keeper is not scheduled. This task
/// also restarts a guard that exited.
async fn fence(shared: Arc<Shared>, name: String, pgdata: std::path::PathBuf) {
    let mut guard_retry = Instant::now();
    // The escalation of the stop this task began, decided as the guard decides it
    // (`guard::Guard`: immediate after QUIT_AFTER, SIGKILL after KILL_AFTER). A fast
    // shutdown refuses writes at once, but the postmaster then waits for its WAL senders
    // to hand the shutdown checkpoint to standbys that may be cut off with it: it
    // lingered until the partition healed (8-10 s), and the heal then began by waiting
    // for that stop. The fence disarms the guard process (postgres takes no writes any
    // more), so this task escalates itself.
    let mut escalation = crate::guard::Guard::default();
    loop {
        if !shared.guard_running() && Instant::now() >= guard_retry {
            match crate::guard::Link::spawn(&crate::guard::own_exe(), &pgdata).await {
                Ok(link) => {
                    tracing::info!(node = %name, pid = link.child.pid, "fence guard started");
                    shared.set_guard(link);
                    // A guard that exits at once (it cannot run here) is not restarted
                    // every few milliseconds.
                    guard_retry = Instant::now() + Duration::from_secs(1);
                }
                Err(e) => {
                    tracing::error!(node = %name, error = %e, "cannot start the fence guard");
                    guard_retry = Instant::now() + Duration::from_secs(1);
                }
            }
        }
        let left = shared.lease_left(Instant::now());
        if left.is_zero() && shared.take_writable() {
            if let Some(pid) = shared.postmaster_pid() {
                tracing::error!(node = %name, pid, "lease expired: stopping postgres so it takes no writes");
                if crate::pg::postmaster::is_frozen(pid) {
                    // It would obey the SIGINT only once continued (see the guard).
                    crate::pg::postmaster::kill_tree(pid);
                } else if let Ok(p) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGINT,
                    );
                    escalation.fenced(p, crate::guard::monotonic_ns());
                }
                shared
                    .fences
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if let Some(p) = escalation.stopping_pid() {
            // The keeper may have stopped it meanwhile, or started another postmaster
            // (whose pid this one is not).
            let pid = p.unsigned_abs();
            if shared.postmaster_pid() != Some(pid) || !crate::pg::postmaster::is_alive(pid) {
                escalation.stopped();
            }
            for a in escalation.due(crate::guard::monotonic_ns()) {
                match a {
                    crate::guard::Action::Quit(_) => {
                        tracing::warn!(node = %name, pid, "fenced postgres still running after a fast shutdown request: immediate shutdown");
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(p),
                            nix::sys::signal::Signal::SIGQUIT,
                        );
                    }
                    crate::guard::Action::KillGroup(_) => {
                        tracing::warn!(node = %name, pid, "fenced postgres still running: SIGKILL");
                        crate::pg::postmaster::kill_tree(pid);
                        escalation.stopped();
                    }
                    // No deadline is armed here: the lease is this task's own.
                    crate::guard::Action::Fence => {}
                }
            }
        }
        // Wake exactly at the lease's end, and at least every 50 ms in case postgres
        // became writable meanwhile (it never does without a lease, but this is the
        // last line of defence).
        let nap = if left.is_zero() {
            Duration::from_millis(50)
        } else {
            left.min(Duration::from_millis(50))
        };
        tokio::time::sleep(nap).await;
    }
}

struct Heartbeat {
    settings: Settings,
    shared: Arc<Shared>,
    tx: watch::Sender<Option<Assignment>>,
    /// Set when the monitor group refuses this node: the keeper stops.
    fatal: watch::Sender<Option<String>>,
    /// Signalled when a transition completed: beat at once instead of at the interval.
    beat_now: Arc<Notify>,
    pg_major: u32,
    bin: crate::pg::PgBin,
    system_identifier: Option<u64>,
    /// Set once the monitor group removed this node after it reported `dropped`.
    dropped: watch::Sender<bool>,
}

/// pg_control's modification time and what it said: pg_controldata runs again only when
/// the file changed.
type ControlCache = Option<(std::time::SystemTime, Option<(Lsn, u32)>)>;

impl Heartbeat {
    async fn run(self, source: Source) {
        let mut client: Option<Client> = None;
        match source {
            Source::Static(a) => {
                self.shared.hold_lease_forever();
                self.tx.send_replace(Some(a));
                loop {
                    self.observe(&mut client).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Source::Monitor(endpoints, security) => {
                if let pgquorum_trust::Security::Tls(tls) = &security {
                    // Renewed certificate files are picked up without a restart.
                    tls.spawn_watcher(Duration::from_secs(5));
                }
                let mut m = match Monitors::new(endpoints, Duration::from_millis(500), security) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot reach the monitor group");
                        return;
                    }
                };
                // Registered afresh at every start, even with a node id in the state
                // file: a corrected --pg-host or --pg-port reaches the monitor group this
                // way (the certificate decides which node a keeper may register).
                let mut node_id: Option<u64> = None;
                let mut interval = Duration::from_millis(200);
                let mut failures = 0u64;
                let mut control: ControlCache = None;
                loop {
                    let sent_at = Instant::now();
                    let status = self.shared.status();
                    let current = status.current_state.unwrap_or(NodeState::Init);
                    let obs = self.observe(&mut client).await;
                    if current == NodeState::Dropped && *self.dropped.borrow() {
                        // Removed: nothing to report, and no registration either.
                        return;
                    }
                    let mut registered = false;
                    let answer = match node_id {
                        None if current == NodeState::Dropped => {
                            // Dropped before this keeper knew its node id (restarted in
                            // the middle): the name is not registered again.
                            self.dropped.send_replace(true);
                            return;
                        }
                        None => {
                            let req = pb::RegisterNodeRequest {
                                formation: self.settings.formation.clone(),
                                name: self.settings.name.clone(),
                                host: self.settings.pg_host.clone(),
                                port: u32::from(self.settings.pg_port),
                                candidate_priority: u32::from(self.settings.candidate_priority),
                                replication_quorum: self.settings.replication_quorum,
                                system_identifier: obs
                                    .as_ref()
                                    .map(|o| o.system_identifier)
                                    .or(self.system_identifier)
                                    .unwrap_or(0),
                                pg_major_version: self.pg_major,
                                current_state: current.to_string(),
                            };
                            m.register(req).await.map(|r| {
                                node_id = Some(r.node_id);
                                self.shared.update_status(|s| s.node_id = Some(r.node_id));
                                tracing::info!(node = %self.settings.name, node_id = r.node_id, group = r.group_id, "registered");
                                registered = true;
                                // No lease from a registration: the leader records no
                                // heartbeat for it, so the lease it would grant is not
                                // one the monitor counts. The first NodeActive, sent at
                                // once, brings the assignment with a lease.
                                None
                            })
                        }
                        Some(id) => {
                            let mut o = obs.clone().unwrap_or_default();
                            if obs.is_none() {
                                // PostgreSQL is down: after a clean shutdown pg_control
                                // says where its WAL ends; otherwise it is unknown (0 on
                                // the wire).
                                if let Some((lsn, tl)) = self.stopped_position(&mut control).await {
                                    o.current_lsn = Some(lsn);
                                    o.timeline = tl;
                                }
                            }
                            let req = pb::NodeActiveRequest {
                                node_id: id,
                                formation: self.settings.formation.clone(),
                                name: self.settings.name.clone(),
                                current_state: current.to_string(),
                                pg_running: obs.is_some(),
                                pg_in_recovery: o.in_recovery,
                                current_lsn: Lsn::raw(o.current_lsn),
                                received_lsn: Lsn::raw(o.received_lsn),
                                replayed_lsn: Lsn::raw(o.replayed_lsn),
                                timeline: o.timeline,
                                system_identifier: o.system_identifier,
                                replication: o
                                    .replication
                                    .iter()
                                    .map(|r| pb::ReplicationPeer {
                                        application_name: r.application_name.clone(),
                                        state: r.state.clone(),
                                        sync_state: r.sync_state.clone(),
                                        write_lsn: Lsn::raw(r.write_lsn),
                                        flush_lsn: Lsn::raw(r.flush_lsn),
                                        replay_lsn: Lsn::raw(r.replay_lsn),
                                        write_lag_ms: r.write_lag_ms,
                                        flush_lag_ms: r.flush_lag_ms,
                                        replay_lag_ms: r.replay_lag_ms,
                                    })
                                    .collect(),
                                pg_restarts: self
                                    .shared
                                    .postgres_restarts
                                    .load(std::sync::atomic::Ordering::Relaxed),
                                fences: self
                                    .shared
                                    .fences
                                    .load(std::sync::atomic::Ordering::Relaxed),
                                // Stamped by `Monitors::node_active`, per attempt.
                                ..Default::default()
                            };
                            m.node_active(req).await.map(|r| r.assignment)
                        }
                    };
                    match answer {
                        Ok(None) if registered => {
                            failures = 0;
                            continue;
                        }
                        Ok(Some(pa)) => match assignment_from_pb(&pa) {
                            Ok(a) => {
                                failures = 0;
                                self.shared
                                    .renew_lease(sent_at, Duration::from_millis(a.lease_ms));
                                interval = Duration::from_millis(a.heartbeat_interval_ms);
                                self.tx.send_if_modified(|cur| {
                                    if cur.as_ref() != Some(&a) {
                                        *cur = Some(a);
                                        true
                                    } else {
                                        false
                                    }
                                });
                            }
                            Err(e) => tracing::error!(error = %e, "ignoring an invalid assignment"),
                        },
                        Ok(None) => tracing::warn!("the monitor answered without an assignment"),
                        Err(KeeperError::Refused(msg)) => {
                            tracing::error!(node = %self.settings.name, error = %msg, "the monitor group refused this node");
                            self.fatal.send_replace(Some(msg));
                            return;
                        }
                        Err(KeeperError::UnknownNode(_)) if current == NodeState::Dropped => {
                            // The acknowledgement: the monitor group removed the node.
                            self.dropped.send_replace(true);
                            return;
                        }
                        Err(KeeperError::UnknownNode(id)) => {
                            tracing::warn!(node = %self.settings.name, node_id = id, "unknown to the monitor group; registering again");
                            node_id = None;
                        }
                        Err(e) => {
                            failures += 1;
                            self.shared
                                .heartbeat_failures
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if failures == 1 || failures.is_multiple_of(50) {
                                tracing::warn!(node = %self.settings.name, failures, error = %e, "heartbeat failed");
                            }
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until((sent_at + interval).into()) => {}
                        _ = self.beat_now.notified() => {}
                    }
                }
            }
        }
    }

    /// Asks the local postgres about itself; None when it does not answer.
    /// The position a stopped data directory is known to end at (see
    /// [`crate::pg::ControlData::final_position`]), or None.
    async fn stopped_position(&self, cache: &mut ControlCache) -> Option<(Lsn, u32)> {
        let pgdata = &self.settings.pgdata;
        let mtime = std::fs::metadata(pgdata.join("global").join("pg_control"))
            .and_then(|m| m.modified())
            .ok()?;
        if let Some((at, pos)) = cache {
            if *at == mtime {
                return *pos;
            }
        }
        let pos = match self.bin.controldata(pgdata).await {
            Ok(cd) => cd.final_position(),
            Err(e) => {
                tracing::debug!(error = %e, "pg_controldata failed: position unknown");
                None
            }
        };
        *cache = Some((mtime, pos));
        pos
    }

    async fn observe(&self, client: &mut Option<Client>) -> Option<sql::Observation> {
        let hands_off = self
            .shared
            .hands_off
            .load(std::sync::atomic::Ordering::SeqCst);
        if self.shared.postmaster_pid().is_none() && !hands_off {
            *client = None;
            self.shared.update_status(|s| s.observation = None);
            return None;
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            *client = sql::connect_local(&self.settings, Duration::from_millis(500))
                .await
                .ok();
        }
        let obs = match client.as_ref() {
            Some(c) => tokio::time::timeout(Duration::from_millis(1000), sql::observe(c))
                .await
                .ok()
                .and_then(|r| r.ok()),
            None => None,
        };
        if obs.is_none() {
            *client = None;
        }
        self.shared.update_status(|s| s.observation = obs.clone());
        obs
    }
}

/// The HTTPS connections of `trust::https_incoming`, as axum's listener.
struct HttpsListener {
    conns: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<pgquorum_trust::transport::ServerConn>,
    >,
    addr: std::net::SocketAddr,
}

impl axum::serve::Listener for HttpsListener {
    type Io = pgquorum_trust::transport::ServerConn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.conns.next().await {
                Some(Ok(c)) => {
                    let from = c.remote().unwrap_or(self.addr);
                    return (c, from);
                }
                Some(Err(_)) => continue,
                // The acceptor stopped (the process is ending): never accept again.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
