//! Lease fencing (DESIGN.md invariant 1) through the real run loop, against a fake
//! monitor group: a primary whose keeper cannot renew its lease stops taking writes
//! within the lease; one whose keeper restarts without a lease does not take writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgquorum_api::pb::monitor as pb;
use pgquorum_api::pb::monitor::monitor_server::{Monitor, MonitorServer};
use tonic::{Request, Response, Status};

mod common;
use common::*;

const LEASE_MS: u64 = 1500;

/// A monitor member that answers every keeper with "be the primary" — or, while `down`,
/// answers nothing useful. A follower answers only with a leader hint.
struct FakeMonitor {
    down: AtomicBool,
    last_answer: Mutex<Option<Instant>>,
    leader_hint: Option<String>,
}

impl FakeMonitor {
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

    fn assignment(&self) -> pb::Assignment {
        *self.last_answer.lock().unwrap() = Some(Instant::now());
        pb::Assignment {
            goal_state: "single".into(),
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
        assert_eq!(r.get_ref().pg_major_version, 15);
        Ok(Response::new(pb::RegisterNodeReply {
            node_id: 7,
            group_id: 0,
            assignment: Some(self.0.assignment()),
        }))
    }
    async fn node_active(
        &self,
        r: Request<pb::NodeActiveRequest>,
    ) -> Result<Response<pb::NodeActiveReply>, Status> {
        self.0.check()?;
        assert_eq!(r.get_ref().node_id, 7);
        Ok(Response::new(pb::NodeActiveReply {
            assignment: Some(self.0.assignment()),
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
    args.extend(["--monitor".to_string(), monitor.to_string()]);
    Keeper::spawn("run", &args, &spec.keeper_log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_fences_itself_when_the_lease_runs_out() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let leader = Arc::new(FakeMonitor {
        down: AtomicBool::new(false),
        last_answer: Mutex::new(None),
        leader_hint: None,
    });
    let leader_addr = serve(leader.clone()).await;
    let follower = Arc::new(FakeMonitor {
        down: AtomicBool::new(false),
        last_answer: Mutex::new(None),
        leader_hint: Some(leader_addr),
    });
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
