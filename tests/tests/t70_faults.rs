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

/// A probe writing to every node, once it has seen a write accepted by `primary`.
async fn probe_every_node(c: &Cluster, primary: &str) -> Probe {
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
            let ok = probe.last_accepted(primary).is_some();
            async move { ok }
        },
    )
    .await
    .unwrap();
    probe
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
    let probe = probe_every_node(&c, &old).await;

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

/// The WAL receivers of a standby's postgres (children of its postmaster named
/// `postgres: walreceiver`), from /proc.
fn wal_receivers(postmaster: i32) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok());
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(postmaster) && cmd.starts_with("postgres: walreceiver")
        })
        .map(Pid::from_raw)
        .collect()
}

/// Issue 13 item 8. PostgreSQL ends a commit's wait for its synchronous standby when the
/// postmaster dies, and crash recovery makes that commit visible to everyone: with an
/// in-place restart, another client could read a row that no standby holds and that a
/// failover a moment later would lose. Here every standby's WAL receiver is stopped, a
/// client's INSERT waits for synchronous replication, and the primary's postmaster is
/// SIGKILLed. The keeper restarts it (postgres answers the keeper) but keeps clients
/// out; only once the WAL receivers run again and a standby has the row may a client
/// read it. (Without the gate a client reads the row about 0.3 s after the kill.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_no_standby_holds_stays_unreadable_after_a_postmaster_crash() {
    let c = Cluster::start(3).await;
    let p = c.primary().await;
    let spec = c.node(&p).spec.clone();
    let admin = spec.connect().await.unwrap();
    admin
        .batch_execute("CREATE TABLE gate_probe (v text)")
        .await
        .unwrap();
    let names: String = admin
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!names.is_empty(), "no synchronous standby configured");

    // Stop every standby's WAL receiver: nothing more is flushed or acknowledged there.
    let mut stopped = Vec::new();
    for n in c.nodes.iter().filter(|n| n.spec.name != p) {
        let pm = n.spec.postmaster_pid().unwrap();
        let rx = wal_receivers(pm);
        assert!(!rx.is_empty(), "{} has no WAL receiver", n.spec.name);
        for pid in rx {
            kill(pid, Signal::SIGSTOP).unwrap();
            stopped.push(Resume(pid));
        }
    }

    // A client's commit now waits for a synchronous standby.
    let client = spec.connect().await.unwrap();
    let insert = tokio::spawn(async move {
        client
            .batch_execute("INSERT INTO gate_probe VALUES ('unconfirmed')")
            .await
    });
    pgquorum_testkit::wait_until_async(
        Duration::from_secs(10),
        "the INSERT waiting for a synchronous standby",
        || {
            let admin = &admin;
            async move {
                admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                        &[],
                    )
                    .await
                    .map(|r| r.get::<_, i64>(0) == 1)
                    .unwrap_or(false)
            }
        },
    )
    .await
    .unwrap();
    drop(admin);

    let old_pm = c.kill_postmaster(&p);
    let t0 = Instant::now();
    assert!(
        insert.await.unwrap().is_err(),
        "the commit was acknowledged"
    );

    // For 4 s no client may read the row, while the restarted postgres answers.
    let mut restarted = false;
    let mut refused = 0;
    let mut gated_primary_probe = false;
    while t0.elapsed() < Duration::from_secs(4) {
        if spec.postmaster_pid().is_some_and(|pm| pm != old_pm)
            && spec
                .http_get("/health")
                .is_some_and(|(code, _)| code == 200)
        {
            restarted = true;
            if spec
                .http_get("/primary")
                .is_some_and(|(code, _)| code == 503)
            {
                gated_primary_probe = true;
            }
        }
        match spec.connect().await {
            Ok(reader) => {
                let n: i64 = reader
                    .query_one("SELECT count(*) FROM gate_probe", &[])
                    .await
                    .map(|r| r.get(0))
                    .unwrap_or(0);
                assert_eq!(
                    n,
                    0,
                    "a client read a commit that no standby holds, {} ms after the crash\n{}",
                    t0.elapsed().as_millis(),
                    c.logs()
                );
            }
            Err(_) => refused += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        restarted,
        "postgres was not restarted in place within 4 s\n{}",
        c.logs()
    );
    assert!(gated_primary_probe, "/primary answered 200 behind the gate");
    eprintln!("clients refused {refused} times behind the gate");

    // The standbys stream again: the gate opens, and the row is on a standby.
    let t1 = Instant::now();
    drop(stopped);
    pgquorum_testkit::wait_until_async(Duration::from_secs(20), "the row readable", || {
        let spec = spec.clone();
        async move {
            match spec.connect().await {
                Ok(r) => r
                    .query_one("SELECT count(*) FROM gate_probe", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, i64>(0) == 1),
                Err(_) => false,
            }
        }
    })
    .await
    .unwrap();
    eprintln!(
        "the gate opened {} ms after the WAL receivers resumed",
        t1.elapsed().as_millis()
    );
    let standbys: Vec<_> = c
        .nodes
        .iter()
        .filter(|n| n.spec.name != p)
        .map(|n| n.spec.clone())
        .collect();
    pgquorum_testkit::wait_until_async(Duration::from_secs(20), "the row on a standby", || {
        let standbys = standbys.clone();
        async move {
            for s in standbys {
                if let Ok(r) = s.connect().await {
                    if r.query_one("SELECT count(*) FROM gate_probe", &[])
                        .await
                        .is_ok_and(|r| r.get::<_, i64>(0) == 1)
                    {
                        return true;
                    }
                }
            }
            false
        }
    })
    .await
    .unwrap();
    c.wait_healthy(2).await;
    let log = c.node(&p).keeper.as_ref().unwrap().log_text();
    assert!(log.contains("clients let in"), "{log}");
}

/// The postmaster and every child of it, from /proc (backends and walsenders lead
/// their own sessions, so a process group does not cover them).
fn postgres_tree(postmaster: i32) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut all = vec![Pid::from_raw(postmaster)];
    all.extend(
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(") ")
                            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok())
                    })
                    == Some(postmaster)
            })
            .map(Pid::from_raw),
    );
    all
}

/// Issue 13 item 2, second half: the primary's postgres freezes (postmaster and every
/// backend SIGSTOPped) while its keeper runs on. Nothing but SIGKILL reaches a stopped
/// process: a fence or a demotion that asks for a fast shutdown and waits kept writes
/// stopped until the freeze ended (15-75 s). Here writes must resume while the old
/// processes would still be frozen, within a bound set by the lease, not by the freeze:
/// either the keeper kills the frozen postgres and restarts it in place (its lease ran
/// out while postgres did not answer; the restart keeps clients out until a standby has
/// the WAL), or the monitor group demotes it and promotes a standby. Either way every
/// frozen process is gone (a thawed backend could otherwise commit), no two nodes took
/// writes at once and no acknowledged row is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_primary_postgres_is_killed_and_writes_resume_within_the_lease() {
    const FREEZE: Duration = Duration::from_secs(20);
    let c = Cluster::start(3).await;
    let old = c.primary().await;
    let w = c.writer();
    w.wait_progress(50, "before the freeze").await;
    let probe = probe_every_node(&c, &old).await;

    let pm = c.node(&old).spec.postmaster_pid().unwrap();
    let tree = postgres_tree(pm);
    let frozen: Vec<Resume> = tree
        .iter()
        .filter(|p| kill(**p, Signal::SIGSTOP).is_ok())
        .map(|p| Resume(*p))
        .collect();
    let t0 = Instant::now();
    // A write sent after the freeze began, on any node, acknowledged: a new postmaster
    // on the old node or a promoted standby (a frozen one acknowledges nothing).
    let (node, first) = loop {
        let found = c.nodes.iter().find_map(|n| {
            probe
                .first_accepted_after(&n.spec.name, t0 + Duration::from_millis(100))
                .map(|a| (n.spec.name.clone(), a))
        });
        if let Some(f) = found {
            break f;
        }
        assert!(
            t0.elapsed() < FREEZE,
            "no write was acknowledged while the primary's postgres stayed frozen; probe: {}\n{}",
            describe(&probe.attempts(), t0),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = first.acked.saturating_duration_since(t0);
    eprintln!(
        "{node} took writes {} ms into the freeze ({})",
        took.as_millis(),
        if node == old {
            "restarted in place"
        } else {
            "promoted"
        }
    );
    assert!(
        took < Duration::from_secs(8),
        "writes came back {} ms into the freeze: they waited for the frozen postgres\n{}",
        took.as_millis(),
        c.logs()
    );
    let alive: Vec<Pid> = tree
        .iter()
        .copied()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        alive.is_empty(),
        "frozen postgres processes outlived the failover: {alive:?}"
    );
    w.wait_progress(50, "after the freeze was dealt with").await;
    drop(frozen);
    let ns = c.wait_healthy(2).await;
    let primary = primary_of(&ns).unwrap();
    w.wait_progress(50, "after the heal").await;
    let acked = w.stop().await;
    let seen = probe.stop().await;
    let (overlap, why) = longest_overlap(&seen);
    assert_eq!(overlap, Duration::ZERO, "{why}; {}", describe(&seen, t0));
    c.assert_rows_on(&primary, &acked).await;
}
