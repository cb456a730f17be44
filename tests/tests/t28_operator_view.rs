//! What an operator does and sees, end to end with real processes (issue 14):
//! `drop node` completes and the name can be used again, `perform reinit` rebuilds a
//! standby, `show state` gives live LSNs, lag and synchronous roles and says when its
//! view is stale, events carry dates and record crashes and leader changes,
//! `show events --follow` streams, `show history` summarises handovers, and a keeper
//! restarted with another `--pg-host` updates its node's address.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::time::{Duration, Instant};

use pgquorum_tests::cluster::{describe, Cluster};

/// `pgquorum ARGS --monitor LIST`: (exit code, stdout, stderr).
fn cli_code(c: &Cluster, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(pgquorum_testkit::pgquorum_bin())
        .args(args)
        .args(["--monitor", &c.monitor_list()])
        .args(c.monitors.trust_args())
        .env_remove("PGQUORUM_CERTS_DIR")
        .output()
        .expect("run pgquorum");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(c: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out, err) = cli_code(c, &a);
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Waits until an event whose description contains `text` is in `show events`.
async fn wait_event(c: &Cluster, text: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = json(c, &["show", "events", "--limit", "1000"]);
        if let Some(e) = v
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["description"].as_str().unwrap_or("").contains(text))
        {
            return e.clone();
        }
        if Instant::now() > deadline {
            panic!("no event containing {text:?}: {v:#}\n{}", c.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_standby_is_removed_switchovers_go_on_and_its_name_comes_back() {
    let mut c = Cluster::start(3).await;
    let primary = c.primary().await;
    let victim = c
        .nodes
        .iter()
        .map(|n| n.spec.name.clone())
        .find(|n| *n != primary)
        .unwrap();

    // `drop node` waits until the monitor group has forgotten the node.
    let t = Instant::now();
    let (ok, out) = c.cli(&["drop", "node", &victim, "--timeout", "30"]);
    eprintln!("drop node {victim} completed in {:?}", t.elapsed());
    assert!(ok, "drop failed: {out}\n{}", c.logs());
    let ns = c.state().await.unwrap();
    assert!(ns.iter().all(|n| n.name != victim), "{}", describe(&ns));
    // Its keeper confirmed, stopped its PostgreSQL and exited cleanly.
    let spec = c.node(&victim).spec.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = c
            .nodes
            .iter_mut()
            .find(|n| n.spec.name == victim)
            .unwrap()
            .keeper
            .as_mut()
            .unwrap()
            .try_wait()
        {
            break s;
        }
        assert!(Instant::now() < deadline, "keeper of {victim} still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(spec.postmaster_pid().is_none());
    let log = std::fs::read_to_string(spec.keeper_log()).unwrap();
    assert!(
        log.contains("removed by the monitor group"),
        "the keeper did not see its removal confirmed:\n{log}"
    );

    // A switchover waits for no dropped node.
    let t = Instant::now();
    let (ok, out) = c.cli(&["perform", "switchover", "--timeout", "60"]);
    eprintln!("switchover after the drop took {:?}", t.elapsed());
    assert!(ok, "switchover after the drop failed: {out}\n{}", c.logs());
    let new_primary = c.primary().await;
    assert_ne!(new_primary, primary);

    // Restarted as it was, the keeper refuses: the node was dropped on purpose.
    c.start_keeper(&victim);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let k = c
            .nodes
            .iter_mut()
            .find(|n| n.spec.name == victim)
            .unwrap()
            .keeper
            .as_mut()
            .unwrap();
        if let Some(s) = k.try_wait() {
            break s;
        }
        assert!(Instant::now() < deadline, "a dropped keeper started again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(spec.keeper_log()).unwrap();
    assert!(log.contains("was dropped from the cluster"), "{log}");
    assert!(c.state().await.unwrap().iter().all(|n| n.name != victim));

    // docs/migrating.md's recipe: remove the state file and the data directory, start
    // the keeper: a fresh node of the same name joins as a secondary.
    let mut state_file = spec.pgdata().into_os_string();
    state_file.push(".pgquorum-state.json");
    std::fs::remove_file(&state_file).unwrap();
    std::fs::remove_dir_all(spec.pgdata()).unwrap();
    c.start_keeper(&victim);
    let ns = c.wait_healthy(2).await;
    assert!(
        ns.iter()
            .any(|n| n.name == victim && n.reported_state == "secondary"),
        "{}",
        describe(&ns)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinit_rebuilds_a_standby_from_the_primary() {
    let c = Cluster::start(3).await;
    let primary = c.primary().await;
    let standby = c
        .nodes
        .iter()
        .map(|n| n.spec.name.clone())
        .find(|n| *n != primary)
        .unwrap();
    let w = c.writer();
    w.wait_progress(50, "before the reinit").await;

    // Refused on the primary, nothing changed.
    let (ok, out) = c.cli(&["perform", "reinit", "--node", &primary]);
    assert!(!ok && out.contains("is the primary"), "{out}");

    // A file that only the old data directory holds.
    let marker = c.node(&standby).spec.pgdata().join("pgquorum-test-marker");
    std::fs::write(&marker, b"old").unwrap();
    let t = Instant::now();
    let (ok, out) = c.cli(&["perform", "reinit", "--node", &standby, "--timeout", "90"]);
    eprintln!("reinit of {standby} completed in {:?}", t.elapsed());
    assert!(ok, "reinit failed: {out}\n{}", c.logs());
    assert!(!marker.exists(), "the data directory was not replaced");
    let log = std::fs::read_to_string(c.node(&standby).spec.keeper_log()).unwrap();
    assert!(log.contains("rebuild asked for"), "{log}");

    // It streams again and holds every acknowledged row, old and new.
    w.wait_progress(50, "after the reinit").await;
    let ns = c.wait_healthy(2).await;
    assert!(ns
        .iter()
        .any(|n| n.name == standby && n.reported_state == "secondary"));
    let acked = w.stop().await;
    c.assert_rows_on(&standby, &acked).await;
    let v = json(&c, &["show", "state"]);
    let me = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == standby.as_str())
        .unwrap()
        .clone();
    assert_eq!(me["replication_state"], "streaming", "{me:#}");
    // The rebuild is in the history with who asked for it.
    let e = wait_event(&c, "operator asked for a rebuild").await;
    assert!(e["by"].as_str().is_some(), "{e:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_state_and_events_tell_the_truth() {
    let mut c = Cluster::start(3).await;
    let primary = c.primary().await;
    let w = c.writer();
    w.wait_progress(200, "before looking").await;

    // Live LSN, synchronous role, lag and data age, as the leader's latest reports say.
    let pspec = c.node(&primary).spec.clone();
    let pc = pspec.connect().await.unwrap();
    let before: tokio_postgres::types::PgLsn = pc
        .query_one("SELECT pg_current_wal_lsn()", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let v = json(&c, &["show", "state"]);
        let nodes = v["nodes"].as_array().unwrap();
        let p = nodes
            .iter()
            .find(|n| n["name"] == primary.as_str())
            .unwrap();
        let live = p["current_lsn"].as_str().map(parse_lsn).unwrap_or(0);
        let standbys_ok = nodes
            .iter()
            .filter(|n| n["name"] != primary.as_str())
            .all(|n| {
                matches!(n["sync_state"].as_str(), Some("quorum" | "sync"))
                    && n["replay_lag_bytes"].is_u64()
                    && n["replication_state"] == "streaming"
            });
        if live >= u64::from(before) && standbys_ok {
            break v;
        }
        assert!(Instant::now() < deadline, "no live view: {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(v["stale"], false, "{v:#}");
    for n in v["nodes"].as_array().unwrap() {
        assert!(n["data_age_ms"].as_u64().unwrap() < 5_000, "{n:#}");
        assert_eq!(n["lsn_live"], true, "{n:#}");
    }
    let p = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == primary.as_str())
        .unwrap();
    // The live LSN, not the one of the primary's last change of state.
    assert!(
        parse_lsn(p["lsn"].as_str().unwrap()) > parse_lsn(p["reported_lsn"].as_str().unwrap()),
        "{p:#}"
    );
    // --watch refreshes: one JSON document per refresh with --json.
    let mut watch = std::process::Command::new(pgquorum_testkit::pgquorum_bin())
        .args(["show", "state", "--watch", "0.3", "--json"])
        .args(["--monitor", &c.monitor_list()])
        .args(c.monitors.trust_args())
        .env_remove("PGQUORUM_CERTS_DIR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let l = lines.next().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["nodes"].as_array().unwrap().len(), 3, "{v:#}");
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let (code, table, _) = cli_code(&c, &["show", "state"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("Sync") && table.contains("Lag") && table.contains("quorum"),
        "{table}"
    );

    // `show events --follow` streams what happens next.
    let mut follow = std::process::Command::new(pgquorum_testkit::pgquorum_bin())
        .args(["show", "events", "--follow", "--limit", "1"])
        .args(["--monitor", &c.monitor_list()])
        .args(c.monitors.trust_args())
        .env_remove("PGQUORUM_CERTS_DIR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // A standby's postmaster crashes; its keeper restarts it in place.
    let standby = c
        .nodes
        .iter()
        .map(|n| n.spec.name.clone())
        .find(|n| *n != primary)
        .unwrap();
    c.kill_postmaster(&standby);
    let want = format!("PostgreSQL on node {standby} exited unexpectedly");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let line = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains(&want) => break l,
            Ok(l) => seen.push(l),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "--follow did not print {want:?}; it printed {seen:#?}\n{}",
            c.logs()
        );
    };
    let _ = follow.kill();
    let _ = follow.wait();
    // Events carry the date and time.
    let date = regex_like_date(&line);
    assert!(date, "no date in {line:?}");

    // A switchover is in `show history` with old and new primary and the write pause.
    c.wait_healthy(2).await;
    let (ok, out) = c.cli(&["perform", "switchover", "--timeout", "60"]);
    assert!(ok, "switchover failed: {out}\n{}", c.logs());
    let second = c.primary().await;
    let h = json(&c, &["show", "history"]);
    let last = h.as_array().unwrap().last().cloned().unwrap_or_default();
    assert_eq!(last["kind"], "switchover", "{h:#}");
    assert_eq!(last["old_primary"], primary.as_str(), "{h:#}");
    assert_eq!(last["new_primary"], second.as_str(), "{h:#}");
    let pause = last["write_pause_ms"].as_u64().unwrap();
    eprintln!("show history: switchover {primary} -> {second}, write pause {pause} ms");
    assert!(pause < 30_000, "{h:#}");
    assert!(last["by"].as_str().is_some(), "{h:#}");
    drop(w);

    // The monitor leader dies: the next one records that it took over.
    let leader = c.monitors.wait_leader(Duration::from_secs(10)).await;
    c.monitors.kill(leader);
    wait_event(&c, &format!("previous leader: member {leader}")).await;

    // No quorum: `show state` still answers, marks the view stale and exits 8 (docs/cli.md).
    let new_leader = c.monitors.wait_leader(Duration::from_secs(10)).await;
    c.monitors.kill(new_leader);
    let (code, out, err) = cli_code(&c, &["show", "state"]);
    assert_eq!(code, 8, "{out}{err}");
    assert!(out.contains("STALE VIEW"), "{out}");
    let (code, out, _) = cli_code(&c, &["show", "state", "--json"]);
    assert_eq!(code, 8, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["stale"], true, "{v:#}");
    assert!(v["stale_reason"]
        .as_str()
        .unwrap()
        .contains("answered by member"));
    // Nobody is shown read-write from a stale view of unknown health.
    assert!(v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["health"] == "unknown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_restarted_with_another_pg_host_updates_the_address() {
    let mut c = Cluster::start(3).await;
    let primary = c.primary().await;
    let standby = c
        .nodes
        .iter()
        .map(|n| n.spec.name.clone())
        .find(|n| *n != primary)
        .unwrap();
    let set_host = |host: &'static str| {
        move |args: &mut Vec<String>| {
            let i = args.iter().position(|a| a == "--pg-host").unwrap();
            args[i + 1] = host.to_string();
        }
    };
    for host in ["localhost", "127.0.0.1"] {
        if let Some(mut k) = c
            .nodes
            .iter_mut()
            .find(|n| n.spec.name == standby)
            .unwrap()
            .keeper
            .take()
        {
            k.terminate();
        }
        c.start_keeper_edited(&standby, set_host(host));
        let ns = c
            .wait_state(&format!("{standby} registered at {host}"), |ns| {
                ns.iter()
                    .any(|n| n.name == standby && n.host == host && n.reported_state == "secondary")
            })
            .await;
        let _ = ns;
        wait_event(&c, &format!("node {standby} registered again at {host}:")).await;
    }
    c.wait_healthy(2).await;
}

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// `YYYY-MM-DD HH:MM:SS` somewhere in the line.
fn regex_like_date(line: &str) -> bool {
    let b = line.as_bytes();
    (0..b.len().saturating_sub(18)).any(|i| {
        let w = &b[i..i + 19];
        w.iter().enumerate().all(|(j, c)| match j {
            4 | 7 => *c == b'-',
            10 => *c == b' ',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        })
    })
}
