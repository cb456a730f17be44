//! Lease fencing (DESIGN.md invariant 1) through the real run loop, against a fake
//! monitor group: a primary whose keeper cannot renew its lease stops taking writes
//! within the lease; one whose keeper restarts without a lease does not take writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgquorum_api::pb::monitor as pb;
use pgquorum_api::pb::monitor::monitor_server::{Monitor, MonitorServer};
use tonic::{Request, Response, Status};

mod common;
use common::*;

const LEASE_MS: u64 = 1500;

/// A monitor member that assigns each node the goal the test sets for it (default
/// "single"), or — while `down` — answers nothing useful. A follower answers only with a
/// leader hint.
struct FakeMonitor {
    down: AtomicBool,
    last_answer: Mutex<Option<Instant>>,
    leader_hint: Option<String>,
    /// name -> (goal state, name of the primary to follow)
    plan: Mutex<HashMap<String, (String, Option<String>)>>,
    /// name -> registered node
    nodes: Mutex<HashMap<String, pb::PeerNode>>,
    /// name -> last reported state
    reported: Mutex<HashMap<String, String>>,
    /// Refuse every registration with this message.
    refuse: Mutex<Option<String>>,
}

impl FakeMonitor {
    fn new(leader_hint: Option<String>) -> Arc<FakeMonitor> {
        Arc::new(FakeMonitor {
            down: AtomicBool::new(false),
            last_answer: Mutex::new(None),
            leader_hint,
            plan: Mutex::new(HashMap::new()),
            nodes: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashMap::new()),
            refuse: Mutex::new(None),
        })
    }

    fn set(&self, name: &str, goal: &str, primary: Option<&str>) {
        self.plan
            .lock()
            .unwrap()
            .insert(name.into(), (goal.into(), primary.map(String::from)));
    }

    fn reported(&self, name: &str) -> Option<String> {
        self.reported.lock().unwrap().get(name).cloned()
    }

    fn check(&self) -> Result<(), Status> {
        if let Some(h) = &self.leader_hint {
            let mut s = Status::unavailable("not the leader");
            s.metadata_mut()
                .insert("x-pgquorum-leader", h.parse().unwrap());
            return Err(s);
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("no quorum"));
        }
        Ok(())
    }

    fn assignment(&self, name: &str) -> pb::Assignment {
        *self.last_answer.lock().unwrap() = Some(Instant::now());
        let (goal, primary) = self
            .plan
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or(("single".into(), None));
        let nodes = self.nodes.lock().unwrap();
        let reported = self.reported.lock().unwrap();
        pb::Assignment {
            goal_state: goal,
            primary: primary.and_then(|p| nodes.get(&p).cloned()),
            // As the monitor group: a peer that reports a state reached only by
            // streaming gets a slot on the primary.
            peers: nodes
                .values()
                .filter(|n| n.name != name)
                .cloned()
                .map(|mut n| {
                    n.streamed = reported
                        .get(&n.name)
                        .and_then(|s| pgquorum_core::NodeState::parse(s))
                        .is_some_and(|s| s.has_streamed());
                    n
                })
                .collect(),
            lease_ms: LEASE_MS,
            heartbeat_interval_ms: 100,
            on_quorum_loss: "block".into(),
            ..Default::default()
        }
    }
}

fn unimpl<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("fake"))
}

struct Handle(Arc<FakeMonitor>);

#[tonic::async_trait]
impl Monitor for Handle {
    async fn member_status(
        &self,
        _: Request<pb::MemberStatusRequest>,
    ) -> Result<Response<pb::MemberStatusReply>, Status> {
        unimpl()
    }
    async fn add_member(
        &self,
        _: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        unimpl()
    }
    async fn remove_member(
        &self,
        _: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        unimpl()
    }
    async fn create_formation(
        &self,
        _: Request<pb::CreateFormationRequest>,
    ) -> Result<Response<pb::FormationReply>, Status> {
        unimpl()
    }
    async fn drop_formation(
        &self,
        _: Request<pb::DropFormationRequest>,
    ) -> Result<Response<pb::FormationReply>, Status> {
        unimpl()
    }
    async fn register_node(
        &self,
        r: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeReply>, Status> {
        self.0.check()?;
        if let Some(msg) = self.0.refuse.lock().unwrap().clone() {
            return Err(Status::invalid_argument(msg));
        }
        let r = r.into_inner();
        assert_eq!(r.pg_major_version, 15);
        let id = {
            let mut nodes = self.0.nodes.lock().unwrap();
            let id = nodes
                .get(&r.name)
                .map(|n| n.node_id)
                .unwrap_or(nodes.len() as u64 + 1);
            let node = pb::PeerNode {
                node_id: id,
                name: r.name.clone(),
                host: r.host.clone(),
                port: r.port,
                streamed: false,
            };
            nodes.insert(r.name.clone(), node);
            id
        };
        Ok(Response::new(pb::RegisterNodeReply {
            node_id: id,
            group_id: 0,
            assignment: Some(self.0.assignment(&r.name)),
        }))
    }
    async fn node_active(
        &self,
        r: Request<pb::NodeActiveRequest>,
    ) -> Result<Response<pb::NodeActiveReply>, Status> {
        self.0.check()?;
        let r = r.into_inner();
        if !self
            .0
            .nodes
            .lock()
            .unwrap()
            .values()
            .any(|n| n.node_id == r.node_id)
        {
            return Err(Status::not_found(format!("unknown node {}", r.node_id)));
        }
        self.0
            .reported
            .lock()
            .unwrap()
            .insert(r.name.clone(), r.current_state.clone());
        Ok(Response::new(pb::NodeActiveReply {
            assignment: Some(self.0.assignment(&r.name)),
        }))
    }
    async fn get_state(
        &self,
        _: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateReply>, Status> {
        unimpl()
    }
    async fn get_events(
        &self,
        _: Request<pb::GetEventsRequest>,
    ) -> Result<Response<pb::GetEventsReply>, Status> {
        unimpl()
    }
    type WatchEventsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::Event, Status>>;
    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        unimpl()
    }
    async fn reinit_node(
        &self,
        _: Request<pb::ReinitNodeRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        unimpl()
    }
    async fn get_settings(
        &self,
        _: Request<pb::GetSettingsRequest>,
    ) -> Result<Response<pb::GetSettingsReply>, Status> {
        unimpl()
    }
    async fn set_node_setting(
        &self,
        _: Request<pb::SetNodeSettingRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        unimpl()
    }
    async fn set_formation_setting(
        &self,
        _: Request<pb::SetFormationSettingRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        unimpl()
    }
    async fn perform_switchover(
        &self,
        _: Request<pb::PerformSwitchoverRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        unimpl()
    }
    async fn perform_failover(
        &self,
        _: Request<pb::PerformFailoverRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        unimpl()
    }
    async fn set_maintenance(
        &self,
        _: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        unimpl()
    }
    async fn drop_node(
        &self,
        _: Request<pb::DropNodeRequest>,
    ) -> Result<Response<pb::OperationReply>, Status> {
        unimpl()
    }
}

/// Serves `m` on a port the OS picked; returns HOST:PORT.
async fn serve(m: Arc<FakeMonitor>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(MonitorServer::new(Handle(m)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    addr
}

fn run_keeper(spec: &NodeSpec, monitor: &str) -> Keeper {
    let mut args = spec.args();
    // A stand-in monitor of this test, not a monitor group: plain gRPC.
    args.extend([
        "--monitor".to_string(),
        monitor.to_string(),
        "--insecure".to_string(),
    ]);
    Keeper::spawn("run", &args, &spec.keeper_log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_fences_itself_when_the_lease_runs_out() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let leader = FakeMonitor::new(None);
    let leader_addr = serve(leader.clone()).await;
    let follower = FakeMonitor::new(Some(leader_addr));
    let follower_addr = serve(follower).await;

    // Only the follower is named: the keeper must follow its leader hint.
    let mut k = run_keeper(&a, &follower_addr);
    wait_state(&a, &mut k, "single").await;
    write(&a, "before").await.unwrap();
    expect_probes(&a, [200, 200, 503, 200, 200, 200]);

    // The monitor group loses quorum: no more lease renewals.
    leader.down.store(true, Ordering::SeqCst);
    let last = leader.last_answer.lock().unwrap().unwrap();
    // The monitor may promote another node once lease + margin (300 ms) have passed
    // since its last answer. By then this primary must take no writes.
    let fenced_by = last + Duration::from_millis(LEASE_MS + 300);
    let mut last_ok_write = None;
    while Instant::now() < fenced_by {
        if write(&a, "during").await.is_ok() {
            last_ok_write = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        write(&a, "after").await.is_err(),
        "a primary without a lease took a write"
    );
    if let Some(t) = last_ok_write {
        eprintln!(
            "last write accepted {} ms after the last lease grant",
            (t - last).as_millis()
        );
        assert!(t < fenced_by);
    }
    expect_probes(&a, [503, 503, 503, 503, 503, 200]);
    let m = a.http_get("/metrics").unwrap().1;
    assert!(m.contains("pgquorum_keeper_fences_total 1"), "{m}");

    // Quorum is back: the lease is renewed and the primary takes writes again.
    leader.down.store(false, Ordering::SeqCst);
    wait_for(
        "writes after the lease is renewed",
        Duration::from_secs(20),
        || async { write(&a, "again").await.ok() },
    )
    .await;

    // A keeper restarted while the monitor group is unreachable starts no writable
    // postgres.
    k.kill();
    wait_postgres_gone(&a).await;
    leader.down.store(true, Ordering::SeqCst);
    let _k = run_keeper(&a, &follower_addr);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(
            write(&a, "no-lease").await.is_err(),
            "wrote without a lease"
        );
        assert_eq!(a.http_get("/primary").map(|r| r.0).unwrap_or(503), 503);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The postgres side of a failover and a rejoin, driven through the run loop by the
/// goal states a monitor would assign (pg_auto_failover's sequence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_sequence_through_the_run_loop() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let b = NodeSpec::new("b", dir.path());
    let m = FakeMonitor::new(None);
    let addr = serve(m.clone()).await;

    m.set("a", "single", None);
    let mut ka = run_keeper(&a, &addr);
    wait_state(&a, &mut ka, "single").await;
    write(&a, "a1").await.unwrap();

    m.set("b", "wait_standby", Some("a"));
    let mut kb = run_keeper(&b, &addr);
    wait_state(&b, &mut kb, "wait_standby").await;
    m.set("a", "wait_primary", None);
    m.set("b", "catchingup", Some("a"));
    wait_state(&b, &mut kb, "catchingup").await;
    m.set("b", "secondary", Some("a"));
    m.set("a", "primary", None);
    wait_state(&b, &mut kb, "secondary").await;
    wait_state(&a, &mut ka, "primary").await;
    wait_rows(&b, &["a1"]).await;
    wait_for(
        "b reported as secondary",
        Duration::from_secs(10),
        || async { (m.reported("b").as_deref() == Some("secondary")).then_some(()) },
    )
    .await;

    // Failover: the old primary drains and is demoted, the standby is promoted.
    m.set("a", "draining", None);
    m.set("b", "prepare_promotion", Some("a"));
    wait_state(&a, &mut ka, "draining").await;
    assert!(
        write(&a, "x").await.is_err(),
        "a draining primary takes no writes"
    );
    wait_state(&b, &mut kb, "prepare_promotion").await;
    assert!(
        in_recovery(&b).await,
        "no promotion before stop_replication"
    );
    m.set("a", "demoted", None);
    m.set("b", "stop_replication", None);
    wait_state(&b, &mut kb, "stop_replication").await;
    assert!(
        in_recovery(&b).await,
        "stop_replication is not writable: the promotion waits for wait_primary"
    );
    m.set("b", "wait_primary", None);
    wait_state(&b, &mut kb, "wait_primary").await;
    assert!(!in_recovery(&b).await);
    write(&b, "b1").await.unwrap();
    expect_probes(&b, [200, 200, 503, 200, 200, 200]);

    // The old primary rejoins as b's standby (rewind).
    m.set("a", "catchingup", Some("b"));
    wait_state(&a, &mut ka, "catchingup").await;
    m.set("a", "secondary", Some("b"));
    wait_state(&a, &mut ka, "secondary").await;
    wait_rows(&a, &["a1", "b1"]).await;
    expect_probes(&a, [503, 503, 200, 200, 200, 200]);
}

/// A keeper waiting for its standby to stream from an upstream that died meanwhile takes
/// the next goal the monitor assigns at once, instead of sitting out the 30 s deadline
/// of the abandoned transition (found by the fault harness: a 30 s write outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_transition_is_abandoned_when_the_goal_changes() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let b = NodeSpec::new("b", dir.path());
    let m = FakeMonitor::new(None);
    let addr = serve(m.clone()).await;
    m.set("a", "single", None);
    let mut ka = run_keeper(&a, &addr);
    wait_state(&a, &mut ka, "single").await;
    m.set("b", "wait_standby", Some("a"));
    let mut kb = run_keeper(&b, &addr);
    wait_state(&b, &mut kb, "wait_standby").await;
    m.set("a", "wait_primary", None);
    m.set("b", "catchingup", Some("a"));
    wait_state(&b, &mut kb, "catchingup").await;
    m.set("b", "secondary", Some("a"));
    wait_state(&b, &mut kb, "secondary").await;

    // a's node dies (its postgres dies with the keeper); b is told to catch up with it
    // again, which waits for a WAL receiver that cannot stream.
    ka.kill();
    wait_postgres_gone(&a).await;
    m.set("b", "catchingup", Some("a"));
    // Long enough for b to be inside its wait for streaming.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The failover goes on: b must report its LSN now.
    let asked = Instant::now();
    m.set("b", "report_lsn", None);
    wait_for(
        "b to reach report_lsn before the abandoned wait's deadline",
        Duration::from_secs(15),
        || async { (m.reported("b").as_deref() == Some("report_lsn")).then_some(()) },
    )
    .await;
    eprintln!(
        "report_lsn reached {} ms after it was assigned",
        asked.elapsed().as_millis()
    );
    let log = std::fs::read_to_string(b.keeper_log()).unwrap_or_default();
    assert!(log.contains("abandoned"), "{log}");
}

/// Stopping postgres is bounded even when postgres does not react at all (frozen with
/// SIGSTOP, as a postmaster stuck on a full disk or in a paused container would be): fast,
/// then immediate, then SIGKILL of every postgres process, so a demotion never hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_frozen_postgres_is_bounded() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let m = FakeMonitor::new(None);
    let addr = serve(m.clone()).await;
    m.set("a", "single", None);
    let mut ka = run_keeper(&a, &addr);
    wait_state(&a, &mut ka, "single").await;
    // The postmaster this test's keeper started.
    let pid: i32 = std::fs::read_to_string(a.pgdata().join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pm = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pm, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let asked = Instant::now();
    m.set("a", "demoted", None);
    // Fast (5 s) + immediate (2 s) + SIGKILL; without the bound this never ends.
    wait_for("a demoted", Duration::from_secs(30), || async {
        (m.reported("a").as_deref() == Some("demoted")).then_some(())
    })
    .await;
    eprintln!(
        "frozen postgres stopped, demoted reported {} ms after it was assigned",
        asked.elapsed().as_millis()
    );
    assert!(
        nix::sys::signal::kill(pm, None).is_err(),
        "the frozen postmaster still exists"
    );
    let log = std::fs::read_to_string(a.keeper_log()).unwrap_or_default();
    assert!(log.contains("SIGKILL"), "{log}");
}

/// A refused registration stops the keeper with the monitor's reason; a node id the
/// monitor no longer knows leads to a new registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_stops_the_keeper_and_unknown_ids_register_again() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let m = FakeMonitor::new(None);
    *m.refuse.lock().unwrap() = Some("system identifier 1 is not this group's 2".into());
    let addr = serve(m.clone()).await;
    let mut k = run_keeper(&a, &addr);
    let st = wait_for("the keeper to exit", Duration::from_secs(30), || {
        let s = k.try_wait();
        async move { s }
    })
    .await;
    assert!(!st.success());
    let log = k.log_text();
    assert!(
        log.contains("refused this node") && log.contains("is not this group's"),
        "{log}"
    );
    assert!(!a.pgdata().exists(), "nothing done for a refused node");

    // Registered with one monitor state, then the monitor forgets the node.
    *m.refuse.lock().unwrap() = None;
    let mut k = run_keeper(&a, &addr);
    wait_state(&a, &mut k, "single").await;
    m.nodes.lock().unwrap().clear();
    wait_for("a new registration", Duration::from_secs(10), || async {
        m.nodes.lock().unwrap().contains_key("a").then_some(())
    })
    .await;
    assert!(k.log_text().contains("registering again"));
    write(&a, "still-primary").await.unwrap();
}

/// A keeper that is not scheduled (SIGSTOP) cannot run its own fence: its guard process
/// stops postgres at the lease deadline all the same, sessions opened before the pause
/// included. Resumed, the keeper takes the lease again and postgres takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_keeper_is_fenced_by_its_guard() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let m = FakeMonitor::new(None);
    let addr = serve(m.clone()).await;
    let mut k = run_keeper(&a, &addr);
    wait_state(&a, &mut k, "single").await;
    // The data directory did not exist when the keeper started its guard (initdb came
    // later): one guard all the same, not one per 50 ms until it did.
    let log = k.log_text();
    assert!(
        log.matches("fence guard running").count() == 1 && !log.contains("resolving"),
        "the guard was restarted during the bootstrap: {log}"
    );
    write(&a, "before").await.unwrap();
    // A session opened while the lease is held: fencing must end it too, not only
    // refuse new ones.
    let old = a.connect().await.unwrap();
    old.batch_execute("SET synchronous_commit = local; INSERT INTO t VALUES ('old-1')")
        .await
        .unwrap();

    let keeper = Pid::from_raw(i32::try_from(k.pid().unwrap()).unwrap());
    // Whatever happens below, the keeper must not stay stopped.
    struct Resume(Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGCONT);
        }
    }
    // The monitor stops answering too, so that the lease cannot be renewed by a beat
    // already under way when the keeper stops.
    m.down.store(true, Ordering::SeqCst);
    kill(keeper, Signal::SIGSTOP).unwrap();
    let _resume = Resume(keeper);
    let last = m.last_answer.lock().unwrap().unwrap();
    let fenced_by = last + Duration::from_millis(LEASE_MS + 300);
    let mut last_ok = None;
    while Instant::now() < fenced_by {
        if write(&a, "during").await.is_ok() {
            last_ok = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(t) = last_ok {
        eprintln!(
            "last write accepted {} ms after the last lease grant",
            (t - last).as_millis()
        );
    }
    // The keeper is still stopped here: only the guard can have acted.
    let stat = std::fs::read_to_string(format!("/proc/{keeper}/stat")).unwrap();
    assert!(
        stat.split(") ").nth(1).is_some_and(|s| s.starts_with('T')),
        "the keeper should still be stopped: {stat}"
    );
    let r = old
        .batch_execute("SET synchronous_commit = local; INSERT INTO t VALUES ('old-2')")
        .await;
    assert!(r.is_err(), "a session opened before the pause kept writing");
    assert!(
        write(&a, "after").await.is_err(),
        "postgres took a write after the lease of its paused keeper ran out"
    );
    assert!(
        k.log_text().contains("fence guard: the lease ran out"),
        "{}",
        k.log_text()
    );

    // Resumed with the monitor back: the lease is renewed and writes come back.
    drop(_resume);
    m.down.store(false, Ordering::SeqCst);
    wait_for(
        "writes after the keeper resumed",
        Duration::from_secs(30),
        || async { write(&a, "again").await.ok() },
    )
    .await;
    let metrics = a.http_get("/metrics").unwrap().1;
    assert!(
        metrics.contains("pgquorum_keeper_fences_total 1"),
        "{metrics}"
    );
}
