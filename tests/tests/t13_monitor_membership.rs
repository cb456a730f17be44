//! Membership: 3 -> 5 -> 3 with `monitor add-member` / `remove-member`; a member whose
//! data directory was wiped is removed, re-added, and catches up through a snapshot.
//! Needs the binary built first: `cargo build -p pgquorum`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use pgquorum_tests::monitor_group::{create_formation, MonitorGroup};

const WAIT: Duration = Duration::from_secs(30);

/// Waits until a just-started member accepts connections: add-member now asks the new
/// member to prove its identity, and refuses one that is not listening yet.
async fn listening(addr: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn voters(v: &serde_json::Value) -> BTreeSet<u64> {
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "voter")
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_to_five_shrink_to_three_and_reseed_a_wiped_member_from_a_snapshot() {
    let mut g = MonitorGroup::new(3);
    // Compact often so that a re-added member cannot catch up from the log alone.
    g.extra_args = vec!["--snapshot-threshold".into(), "20".into()];
    for id in [1, 2, 3] {
        g.start(id);
    }
    g.wait_leader(WAIT).await;
    let c = g.client();
    let mut names = BTreeSet::new();
    for i in 0..60 {
        let n = format!("f-{i}");
        create_formation(&c, &n).await.unwrap();
        names.insert(n);
    }

    // Grow: 4 and 5 start empty with --join; add-member goes to any member.
    g.add_slot(4);
    g.add_slot(5);
    g.start_joining(4);
    g.start_joining(5);
    for id in [4u64, 5] {
        listening(&g.addr(id)).await;
        let (ok, out) = g.cli(&[
            "monitor",
            "add-member",
            &format!("{id}={}", g.addr(id)),
            "--monitor",
            &g.addr(2),
        ]);
        assert!(ok, "add-member {id}: {out}\n{}", g.logs());
    }
    let (ok, out) = g.cli(&["monitor", "status", "--monitor", &g.addr(1), "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(voters(&v), BTreeSet::from([1, 2, 3, 4, 5]), "{out}");
    for id in [4, 5] {
        g.wait_applied(id, &names, WAIT).await;
    }
    create_formation(&c, "five").await.unwrap();
    names.insert("five".into());
    // Member 1 must hold the new membership before it is stopped (a majority of the
    // five is enough to commit, so it could lag).
    g.wait_applied(1, &names, WAIT).await;

    // A founding member restarted with the founding --peer list now contradicts the
    // stored membership and must say so.
    g.kill(1);
    let dir = g.members[&1].data_dir.display().to_string();
    let mut args: Vec<String> = vec![
        "monitor".into(),
        "run".into(),
        "--node-id".into(),
        "1".into(),
        "--listen".into(),
        g.addr(1),
        "--data-dir".into(),
        dir,
    ];
    for (id, a) in &g.peers {
        args.push("--peer".into());
        args.push(format!("{id}={a}"));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = g.cli(&argv);
    assert!(!ok);
    assert!(
        out.contains("contradicts") && out.contains("add-member"),
        "{out}"
    );
    // Restarted with the group's current membership it comes back.
    let all: Vec<(u64, String)> = (1..=5).map(|id| (id, g.addr(id))).collect();
    g.peers = all.into_iter().collect();
    g.start(1);
    g.wait_applied(1, &names, WAIT).await;

    // Shrink back to 3.
    for id in [4u64, 5] {
        let (ok, out) = g.cli(&[
            "monitor",
            "remove-member",
            &id.to_string(),
            "--monitor",
            &g.addr(3),
        ]);
        assert!(ok, "remove-member {id}: {out}\n{}", g.logs());
        g.kill(id);
    }
    let (ok, out) = g.cli(&["monitor", "status", "--monitor", &g.addr(2), "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(voters(&v), BTreeSet::from([1, 2, 3]), "{out}");
    create_formation(&g.client(), "three-again").await.unwrap();
    names.insert("three-again".into());

    // Member 3's disk is damaged: it refuses to start, exits non-zero, and says how to
    // bring it back (the drill below, as docs/operations.md gives it).
    g.kill(3);
    let data3 = g.members[&3].data_dir.clone();
    for e in std::fs::read_dir(&data3).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::write(e.path(), vec![0xA5u8; 4096]).unwrap();
        }
    }
    g.start(3);
    let deadline = std::time::Instant::now() + WAIT;
    let code = loop {
        let p = g.members.get_mut(&3).unwrap().proc.as_mut().unwrap();
        if let Some(c) = p.exit_code() {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "member 3 runs on a damaged data directory:\n{}",
            g.log(3)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(code, 0);
    let log = g.log(3);
    assert!(
        log.contains("remove-member") && log.contains("--join") && log.contains("add-member"),
        "{log}"
    );

    // Member 3 loses its disk: remove it, wipe, re-add it; it catches up by snapshot.
    g.kill(3);
    g.wipe(3);
    let (ok, out) = g.cli(&["monitor", "remove-member", "3", "--monitor", &g.addr(1)]);
    assert!(ok, "remove-member 3: {out}\n{}", g.logs());
    for i in 0..30 {
        let n = format!("while-away-{i}");
        create_formation(&g.client(), &n).await.unwrap();
        names.insert(n);
    }
    g.start_joining(3);
    listening(&g.addr(3)).await;
    let (ok, out) = g.cli(&[
        "monitor",
        "add-member",
        &format!("3={}", g.addr(3)),
        "--monitor",
        &g.addr(2),
    ]);
    assert!(ok, "re-add member 3: {out}\n{}", g.logs());
    g.wait_applied(3, &names, WAIT).await;
    let s3 = g.status(3).await.unwrap();
    assert!(
        s3.snapshot_index.is_some_and(|i| i > 0),
        "member 3 caught up without a snapshot: {s3:?}"
    );
    let (ok, out) = g.cli(&["monitor", "status", "--monitor", &g.addr(1), "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(voters(&v), BTreeSet::from([1, 2, 3]), "{out}");
}
