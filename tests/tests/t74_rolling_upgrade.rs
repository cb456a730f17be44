//! A rolling upgrade from the last release (tests/fixtures/upgrade-base, made by
//! `tests/fixtures/make-upgrade-base <commit>`) to this build, one process at a time,
//! with a client committing rows throughout: the order docs/operations.md ("Rolling
//! upgrades") gives. Each new process starts on the data the old one wrote (Raft log,
//! snapshot, the keeper's state file); a mixed monitor group works both ways round
//! (old leader with new followers here, new leader with old followers in the second
//! test). Skipped, loudly, only when the fixture is absent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgquorum_api::pb::monitor as pb;
use pgquorum_testkit::postgres::{NodeSpec, PgDir};
use pgquorum_tests::cluster::{describe, healthy, primary_of, Cluster, Node, Writer};
use pgquorum_tests::monitor_group::{create_formation, MonitorGroup};
use pgquorum_tests::upgrade::{base_fixture, Base, OtherBinary};

/// The flags the old binary gets: the testkit's (tests/src/monitor_group.rs `spawn`,
/// tests/src/cluster.rs `start_keeper_edited`), edited into the ones it understands.
/// Nothing to edit at a6a7f73. When the testkit gains a flag the base lacks, the test
/// stops naming it; drop or rewrite it here, per role.
fn base_args(role: &str, args: &mut Vec<String>) {
    match role {
        "monitor" => {}
        "keeper" => {}
        other => panic!("no argument list for role {other}"),
    }
    let _ = args;
}

/// Given to members of both versions: snapshots every 20 entries (keeping 4 of log),
/// so that each old member has written a snapshot before it is replaced, and a member
/// that was down while more entries were written catches up by installing a snapshot
/// the other version built.
const MEMBER_FLAGS: [&str; 2] = ["--snapshot-threshold", "20"];
/// Writes made while a member is down: two snapshot intervals, so that the leader's
/// latest snapshot is well past what the member has, and the log it keeps (4 entries)
/// no longer reaches back to it.
const WRITES_WHILE_DOWN: usize = 40;

const WAIT: Duration = Duration::from_secs(60);

/// The longest the writer may go without an acknowledgement, per kind of step. Measured
/// (debug build, 2 cores shared with other jobs, 6 runs): a follower member's restart
/// 0.07-0.2 s (PostgreSQL does not wait for the monitor group); the leader's 0.07-1.4 s
/// (until a new leader is elected and found, the primary's keeper cannot renew its
/// lease, 1.5 s, and the primary stops taking writes when it runs out); a standby
/// keeper's 0.04-0.1 s (the other standby is enough for `ANY 1`); the primary keeper's
/// 1.3-2.0 s (its postgres stops with it and starts again as the primary); the
/// switchover 1.6-2.9 s. The bounds leave a slow CI machine room, no more.
const MEMBER_PAUSE: Duration = Duration::from_secs(3);
const LEADER_PAUSE: Duration = Duration::from_secs(5);
const STANDBY_PAUSE: Duration = Duration::from_secs(3);
const PRIMARY_PAUSE: Duration = Duration::from_secs(10);

fn skip(test: &str) -> Option<Base> {
    let base = base_fixture();
    if base.is_none() {
        eprintln!(
            "SKIPPED {test}: no upgrade base in {} (make one with \
             tests/fixtures/make-upgrade-base <commit>)",
            pgquorum_tests::upgrade::fixture_dir().display()
        );
    }
    base
}

fn old_binary(base: &Base, dir: &std::path::Path) -> OtherBinary {
    OtherBinary {
        path: base.unpack(dir),
        label: base.commit.clone(),
        args: base_args,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_cluster_upgrades_one_process_at_a_time_with_writes_running() {
    let Some(base) = skip("t74 rolling upgrade") else {
        return;
    };
    eprintln!("upgrade base: {} built with {}", base.commit, base.rustc);
    let dir = PgDir::new();
    let old = old_binary(&base, dir.path());

    // Everything old, with mutual TLS whatever PGQUORUM_TEST_INSECURE says.
    let mut monitors = MonitorGroup::with_tls(3, true);
    monitors.extra_args = MEMBER_FLAGS.iter().map(|s| s.to_string()).collect();
    for m in monitors.members.values_mut() {
        m.bin = Some(old.clone());
    }
    let nodes = (1..=3)
        .map(|i| Node {
            spec: NodeSpec::new(&format!("node{i}"), dir.path()),
            keeper: None,
            extra_args: Vec::new(),
            prefix: Vec::new(),
            bin: Some(old.clone()),
        })
        .collect();
    let mut c =
        Cluster::start_custom(monitors, dir, nodes, "host all all 127.0.0.1/32 trust").await;
    wait_cluster(&c, "the old cluster").await;
    let ids_before = node_ids(&c).await;
    assert_binaries(&c, &old.path);

    let w = c.writer();
    w.wait_progress(100, "before the upgrade").await;
    // Entries enough for every old member to have written a snapshot and purged log.
    let mut pad = 0;
    write_formations(&c.monitors, "pad", &mut pad, WRITES_WHILE_DOWN).await;
    for id in [1, 2, 3] {
        wait_member(
            &c.monitors,
            id,
            |s| s.snapshot_index.is_some(),
            "a snapshot",
        )
        .await;
    }

    let mut pauses: Vec<(String, Duration, Duration)> = Vec::new();

    // 1. Monitor members: the followers one at a time, then the leader.
    let leader = c.monitors.wait_leader(WAIT).await;
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    for (i, id) in followers.iter().copied().chain([leader]).enumerate() {
        let t0 = Instant::now();
        upgrade_member(&mut c, id, &mut pad).await;
        wait_cluster(&c, &format!("member {id} upgraded")).await;
        w.wait_progress(50, &format!("after member {id}")).await;
        let (what, bound) = if id == leader {
            (format!("member {id} (leader)"), LEADER_PAUSE)
        } else {
            (format!("member {id} (follower)"), MEMBER_PAUSE)
        };
        pauses.push((what, w.longest_pause(t0), bound));
        if i < 2 {
            // Mixed: the old leader and one or two new followers replicate one log.
            let l = c.monitors.wait_leader(WAIT).await;
            assert_eq!(
                l, leader,
                "the old leader lost office to a follower's upgrade"
            );
            replicated_everywhere(&c.monitors, &format!("mixed-{i}")).await;
        }
    }

    // 2. Keepers: the standbys one at a time, then the primary's.
    let primary = c.primary().await;
    let standbys: Vec<String> = ["node1", "node2", "node3"]
        .into_iter()
        .filter(|n| *n != primary)
        .map(String::from)
        .collect();
    for name in standbys.iter().chain([&primary]) {
        let t0 = Instant::now();
        upgrade_keeper(&mut c, name).await;
        wait_cluster(&c, &format!("keeper {name} upgraded")).await;
        w.wait_progress(50, &format!("after keeper {name}")).await;
        let (what, bound) = if *name == primary {
            (format!("keeper {name} (primary)"), PRIMARY_PAUSE)
        } else {
            (format!("keeper {name} (standby)"), STANDBY_PAUSE)
        };
        pauses.push((what, w.longest_pause(t0), bound));
    }
    // The new keepers read the old state files: same node ids, no node added.
    assert_eq!(
        node_ids(&c).await,
        ids_before,
        "node ids changed in the upgrade"
    );

    // 3. A switchover with every process new.
    let before = c.primary().await;
    let t0 = Instant::now();
    c.request_switchover()
        .await
        .unwrap_or_else(|e| panic!("switchover refused: {e}\n{}", c.logs()));
    c.wait_state("a switchover to another node", |ns| {
        primary_of(ns).is_some_and(|p| p != before) && healthy(ns, 2)
    })
    .await;
    wait_cluster(&c, "after the switchover").await;
    w.wait_progress(50, "after the switchover").await;
    pauses.push(("switchover".into(), w.longest_pause(t0), PRIMARY_PAUSE));

    assert_binaries(&c, &pgquorum_testkit::pgquorum_bin());
    let final_primary = c.primary().await;
    let acked = stop_writer(w).await;
    c.assert_rows_on(&final_primary, &acked).await;

    eprintln!(
        "rolling upgrade {} -> this build, {} rows acknowledged; longest write pause per step:",
        base.commit,
        acked.len()
    );
    for (what, pause, _) in &pauses {
        eprintln!("  {what:<24} {:>6} ms", pause.as_millis());
    }
    for (what, pause, bound) in &pauses {
        assert!(
            pause <= bound,
            "writes stopped for {pause:?} at step {what} (bound {bound:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_with_old_followers_replicates_and_sends_snapshots() {
    let Some(base) = skip("t74 new leader, old followers") else {
        return;
    };
    let dir = PgDir::new();
    let old = old_binary(&base, dir.path());
    let mut g = MonitorGroup::with_tls(3, true);
    g.extra_args = MEMBER_FLAGS.iter().map(|s| s.to_string()).collect();
    for id in [2, 3] {
        g.members.get_mut(&id).unwrap().bin = Some(old.clone());
    }
    for id in [1, 2, 3] {
        g.start(id);
    }
    // Make the new member 1 the leader: restarting the leader is the only transfer there
    // is (docs/operations.md), so restart whichever old member leads until 1 wins.
    let mut tries = 0;
    loop {
        let l = g.wait_leader(WAIT).await;
        if l == 1 {
            break;
        }
        tries += 1;
        assert!(tries <= 20, "member 1 never won an election");
        g.stop(l);
        let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != l).collect();
        wait_leader_among(&g, &others).await;
        g.start(l);
    }

    // New leader, old followers: they apply its entries, and the old member that was
    // down installs the new leader's snapshot.
    let mut n = 0;
    write_formations(&g, "new-leader", &mut n, WRITES_WHILE_DOWN).await;
    let all: BTreeSet<String> = (0..n).map(|i| format!("new-leader-{i}")).collect();
    for id in [1, 2, 3] {
        g.wait_applied(id, &all, WAIT).await;
    }
    g.stop(3);
    write_formations(&g, "new-leader", &mut n, WRITES_WHILE_DOWN).await;
    let purged = g.status(1).await.expect("leader answers");
    g.start(3);
    let all: BTreeSet<String> = (0..n).map(|i| format!("new-leader-{i}")).collect();
    for id in [1, 2, 3] {
        g.wait_applied(id, &all, WAIT).await;
    }
    let s3 = g.status(3).await.expect("member 3 answers");
    assert!(
        s3.snapshot_index >= purged.snapshot_index && s3.snapshot_index.is_some(),
        "old member 3 did not take the new leader's snapshot: {s3:?} (leader {purged:?})"
    );
    assert_eq!(g.wait_leader(WAIT).await, 1, "{}", g.logs());
}

/// Replaces monitor member `id` by this build's binary: SIGTERM, entries written while
/// it is down, a start on the same data directory with the same flags. Checks that it
/// came back with the snapshot the old version wrote.
async fn upgrade_member(c: &mut Cluster, id: u64, pad: &mut usize) {
    let before = c.monitors.status(id).await.expect("member answers");
    assert!(
        before.snapshot_index.is_some(),
        "member {id} has no snapshot to read: {before:?}"
    );
    c.monitors.stop(id);
    c.monitors.members.get_mut(&id).unwrap().bin = None;
    let running: Vec<u64> = c.monitors.running();
    wait_leader_among(&c.monitors, &running).await;
    write_formations(&c.monitors, "pad", pad, WRITES_WHILE_DOWN).await;
    // The leader has snapshotted past what the stopped member has and purged its log:
    // the member can only catch up by installing that snapshot (built by the old
    // version unless the leader is already new).
    let leader = c.monitors.wait_leader(WAIT).await;
    let had = before.applied_index.unwrap_or(0);
    let leader_snapshot = wait_member(
        &c.monitors,
        leader,
        |s| s.snapshot_index.unwrap_or(0) >= had + 10,
        &format!("to snapshot past member {id}"),
    )
    .await
    .snapshot_index
    .unwrap_or(0);
    c.monitors.start(id);
    // It starts from the snapshot and log the old version wrote in its data directory
    // (it refuses to start on anything it cannot read), then installs the leader's.
    let after = wait_member(
        &c.monitors,
        id,
        |s| s.snapshot_index.unwrap_or(0) >= leader_snapshot,
        "to install the leader's snapshot",
    )
    .await;
    assert!(after.applied_index >= before.applied_index, "{after:?}");
}

/// Replaces node `name`'s keeper by this build's binary: SIGTERM (the keeper stops its
/// postgres), a start with the same data directory, state file and flags.
async fn upgrade_keeper(c: &mut Cluster, name: &str) {
    let ns = c.state().await.expect("state");
    let was = ns
        .iter()
        .find(|n| n.name == name)
        .map(|n| n.reported_state.clone())
        .unwrap();
    let node = c.nodes.iter_mut().find(|n| n.spec.name == name).unwrap();
    let mut state_file = node.spec.pgdata().into_os_string();
    state_file.push(".pgquorum-state.json");
    assert!(
        std::path::Path::new(&state_file).exists(),
        "{name} has no state file for the new keeper to read"
    );
    if let Some(mut k) = node.keeper.take() {
        k.terminate();
    }
    node.bin = None;
    let log = node.spec.keeper_log();
    let logged_before = std::fs::read_to_string(&log).unwrap_or_default().len();
    c.start_keeper(name);
    // It starts in the state the old keeper wrote to the file, not from `init`.
    let expect = format!("keeper starting node={name} ");
    let text = pgquorum_testkit::postgres::wait_for("the new keeper to start", WAIT, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let new = text.get(logged_before..).unwrap_or_default().to_string();
        let found = new.lines().find(|l| l.contains(&expect)).map(String::from);
        async move { found }
    })
    .await;
    assert!(
        text.contains(&format!(" state={was} ")),
        "the new keeper of {name} did not start from the state file's {was}: {text}"
    );
}

/// Every member and keeper runs `bin`.
fn assert_binaries(c: &Cluster, bin: &std::path::Path) {
    let want = std::fs::canonicalize(bin).unwrap();
    let mut pids: Vec<(String, u32)> = Vec::new();
    for m in c.monitors.members.values() {
        pids.push((format!("member {}", m.id), m.proc.as_ref().unwrap().pid()));
    }
    for n in &c.nodes {
        let pid = n.keeper.as_ref().and_then(|k| k.pid()).unwrap();
        pids.push((format!("keeper {}", n.spec.name), pid));
    }
    for (what, pid) in pids {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(exe, want, "{what} runs {}", exe.display());
    }
}

/// The monitor group has a leader every member agrees on, every member answers with
/// all three members and has applied what the leader had committed; a primary and two
/// standbys streaming from it, every node at its goal.
async fn wait_cluster(c: &Cluster, what: &str) {
    let leader = c.monitors.wait_leader(WAIT).await;
    let committed = c
        .monitors
        .status(leader)
        .await
        .and_then(|s| s.committed_index)
        .unwrap_or(0);
    for id in [1, 2, 3] {
        wait_member(
            &c.monitors,
            id,
            |s| s.members.len() == 3 && s.applied_index.unwrap_or(0) >= committed,
            &format!("to catch up ({what})"),
        )
        .await;
    }
    c.wait_state(
        &format!("a primary with 2 streaming standbys ({what})"),
        |ns| {
            healthy(ns, 2)
                && ns
                    .iter()
                    .filter(|n| n.goal_state == "secondary" && n.replication_state == "streaming")
                    .count()
                    == 2
        },
    )
    .await;
}

async fn wait_member(
    g: &MonitorGroup,
    id: u64,
    ok: impl Fn(&pb::MemberStatusReply) -> bool,
    what: &str,
) -> pb::MemberStatusReply {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = g.status(id).await;
        if let Some(s) = s.filter(|s| ok(s)) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "member {id} never came {what}\n{}",
            g.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until one of `ids` is the leader they all agree on.
async fn wait_leader_among(g: &MonitorGroup, ids: &[u64]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut seen = BTreeSet::new();
        for id in ids {
            seen.insert(g.status(*id).await.and_then(|s| s.leader_id));
        }
        // One leader, and one of `ids`: right after the old leader stopped, the others
        // still name it until their election timeout runs out.
        if seen.len() == 1
            && seen
                .iter()
                .next()
                .is_some_and(|l| l.is_some_and(|l| ids.contains(&l)))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no leader among {ids:?}\n{}",
            g.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `count` new formations `prefix-N`, N counting on from `*next`.
async fn write_formations(g: &MonitorGroup, prefix: &str, next: &mut usize, count: usize) {
    let client = g.client();
    for _ in 0..count {
        let name = format!("{prefix}-{next}");
        create_formation(&client, &name)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}\n{}", g.logs()));
        *next += 1;
    }
}

/// A write through the group is applied by every member.
async fn replicated_everywhere(g: &MonitorGroup, name: &str) {
    create_formation(&g.client(), name)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}\n{}", g.logs()));
    let names = BTreeSet::from([name.to_string()]);
    for id in [1, 2, 3] {
        g.wait_applied(id, &names, WAIT).await;
    }
}

/// Each node's id as the monitor group has it.
async fn node_ids(c: &Cluster) -> Vec<(String, u64)> {
    let ns = c.state().await.expect("state");
    let mut ids: Vec<(String, u64)> = ns.iter().map(|n| (n.name.clone(), n.node_id)).collect();
    ids.sort();
    assert_eq!(ids.len(), 3, "{}", describe(&ns));
    ids
}

async fn stop_writer(w: Writer) -> BTreeSet<i64> {
    w.stop().await
}
