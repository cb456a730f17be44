//! Faults that are not a clean death (issue 13): a paused keeper here; partitions in
//! network namespaces in `t71_partitions`. The oracle, checked in each: every
//! acknowledged row is on the final primary; no two nodes accepted a write
//! (`synchronous_commit = local` included) at overlapping times; the cluster heals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgquorum_tests::cluster::{primary_of, Cluster};
use pgquorum_tests::oracle::{describe, longest_overlap, Probe};

/// SIGCONT on drop: a failing test never leaves a stopped process behind.
struct Resume(Pid);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

fn is_stopped(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
        .unwrap_or(false)
}

/// The primary's keeper is SIGSTOPped while its postgres runs on. The monitor promotes
/// a standby once the lease is surely over; by then the fence guard (a separate
/// process) has stopped the old postgres, so the old primary takes no write, not even
/// `synchronous_commit = local` over a session opened before the pause. Resumed, the
/// old node rejoins as a standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_primary_keeper_is_fenced_and_a_standby_takes_over() {
    let c = Cluster::start(3).await;
    let old = c.primary().await;
    let w = c.writer();
    w.wait_progress(50, "before the pause").await;
    let probe = Probe::start(
        c.nodes
            .iter()
            .map(|n| (n.spec.name.clone(), "127.0.0.1".to_string(), n.spec.pg_port))
            .collect(),
    );
    pgquorum_testkit::wait_until_async(
        Duration::from_secs(20),
        "a probe write on the primary",
        || {
            let ok = probe.last_accepted(&old).is_some();
            async move { ok }
        },
    )
    .await
    .unwrap();

    let keeper =
        Pid::from_raw(i32::try_from(c.node(&old).keeper.as_ref().unwrap().pid().unwrap()).unwrap());
    kill(keeper, Signal::SIGSTOP).unwrap();
    let resume = Resume(keeper);
    let t0 = Instant::now();

    // A standby is promoted and takes writes while the old keeper is still stopped.
    let (new, first_new) = loop {
        let found = c.nodes.iter().filter(|n| n.spec.name != old).find_map(|n| {
            probe
                .first_accepted_after(&n.spec.name, t0)
                .map(|a| (n.spec.name.clone(), a))
        });
        if let Some(f) = found {
            break f;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no standby took writes within 60 s of the pause; probe: {}\n{}",
            describe(&probe.attempts(), t0),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    w.wait_progress(50, "after the failover").await;
    // Stay paused a while longer: the old primary must stay fenced.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(is_stopped(keeper), "the keeper was resumed early");
    let direct = c.node(&old).spec.connect().await;
    if let Ok(s) = direct {
        let r = s
            .batch_execute(
                "SET synchronous_commit = local; \
                 CREATE TABLE IF NOT EXISTS fenced (x int); INSERT INTO fenced VALUES (1)",
            )
            .await;
        assert!(
            r.is_err(),
            "the old primary took a write while its keeper was paused"
        );
    }
    let last_old = probe.last_accepted(&old).unwrap();
    eprintln!(
        "old primary's last accepted write acknowledged {} ms after the pause; {new}'s first \
         sent {} ms after it",
        last_old.acked.saturating_duration_since(t0).as_millis(),
        first_new.sent.saturating_duration_since(t0).as_millis()
    );
    assert!(
        last_old.sent < first_new.acked,
        "two writers: {}",
        describe(&probe.attempts(), t0)
    );

    drop(resume);
    let ns = c.wait_healthy(2).await;
    let primary = primary_of(&ns).unwrap();
    w.wait_progress(50, "after the heal").await;
    let acked = w.stop().await;
    let seen = probe.stop().await;
    let (overlap, why) = longest_overlap(&seen);
    assert_eq!(overlap, Duration::ZERO, "{why}; {}", describe(&seen, t0));
    c.assert_rows_on(&primary, &acked).await;
    let log = c.node(&old).keeper.as_ref().unwrap().log_text();
    assert!(log.contains("fence guard: the lease ran out"), "{log}");
}
