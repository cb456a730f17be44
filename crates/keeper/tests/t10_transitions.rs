//! Every transition against a real PostgreSQL 15, each run twice (the second run after
//! a SIGKILL of the keeper), and the answer of every probe endpoint in every role.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

//                      primary read-write replica read-only health liveness
const AS_PRIMARY: [u16; 6] = [200, 200, 503, 200, 200, 200];
const AS_REPLICA: [u16; 6] = [503, 503, 200, 200, 200, 200];
const AS_STOPPED: [u16; 6] = [503, 503, 503, 503, 503, 200];

#[tokio::test]
async fn primary_standby_promote_rewind_and_clone_fallback() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let b = NodeSpec::new("b", dir.path());

    // init -> single: initdb, replication role, slot for b.
    let mut ka = apply(&a, "single", &["--peer".into(), b.peer_arg()]);
    wait_state(&a, &mut ka, "single").await;
    write(&a, "a1").await.unwrap();
    assert!(!in_recovery(&a).await);
    expect_probes(&a, AS_PRIMARY);
    let sysid = system_identifier(&a).await;

    // A keeper that dies leaves no writable postgres behind.
    ka.kill();
    wait_postgres_gone(&a).await;
    assert!(write(&a, "lost").await.is_err());

    // single again: the existing data directory is adopted, nothing is re-initialised.
    let mut ka = apply(&a, "single", &["--peer".into(), b.peer_arg()]);
    wait_state(&a, &mut ka, "single").await;
    assert_eq!(system_identifier(&a).await, sysid);
    assert_eq!(rows(&a).await, vec!["a1"]);

    // init -> secondary: pg_basebackup, standby.signal, primary_conninfo, slot.
    let standby_of_a = [
        "--primary".to_string(),
        a.peer_arg(),
        "--peer".into(),
        a.peer_arg(),
    ];
    let mut kb = apply(&b, "secondary", &standby_of_a);
    wait_state(&b, &mut kb, "secondary").await;
    wait_rows(&b, &["a1"]).await;
    assert!(in_recovery(&b).await);
    assert!(
        write(&b, "no").await.is_err(),
        "a standby must not take writes"
    );
    expect_probes(&b, AS_REPLICA);
    let (code, _) = b.http_get("/replica?lag=1GB").unwrap();
    assert_eq!(code, 200);
    {
        let c = a.connect().await.unwrap();
        let r = c
            .query_one(
                "SELECT application_name, state FROM pg_stat_replication",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(r.get::<_, String>(0), "b");
        assert_eq!(r.get::<_, String>(1), "streaming");
        let slot: bool = c
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'pgquorum_b'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(slot, "b streams through its slot");
    }
    // The primary reports its standby.
    let m = a.http_get("/metrics").unwrap().1;
    assert!(
        m.contains("pgquorum_keeper_role{role=\"primary\"} 1"),
        "{m}"
    );

    // secondary again after SIGKILL: no new clone.
    kb.kill();
    let mut kb = apply(&b, "secondary", &standby_of_a);
    wait_state(&b, &mut kb, "secondary").await;
    assert_eq!(kb.log_text().matches("cloning the primary").count(), 1);
    write(&a, "a2").await.unwrap();
    wait_rows(&b, &["a1", "a2"]).await;

    // apply_settings: synchronous_standby_names as assigned; b becomes the sync standby.
    ka.kill();
    let mut ka = apply(
        &a,
        "apply_settings",
        &[
            "--peer".into(),
            b.peer_arg(),
            "--synchronous-standby-names".into(),
            "b".into(),
        ],
    );
    wait_state(&a, &mut ka, "apply_settings").await;
    wait_for(
        "b as synchronous standby",
        std::time::Duration::from_secs(30),
        || async {
            let c = a.connect().await.ok()?;
            let r = c
                .query_opt(
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'b'",
                    &[],
                )
                .await
                .ok()??;
            (r.get::<_, String>(0) == "sync").then_some(())
        },
    )
    .await;
    write(&a, "a3").await.unwrap();
    wait_rows(&b, &["a1", "a2", "a3"]).await;

    // secondary -> primary (promotion) while the old primary is gone.
    ka.kill();
    wait_postgres_gone(&a).await;
    kb.kill();
    let mut kb = apply(&b, "primary", &["--peer".into(), a.peer_arg()]);
    wait_state(&b, &mut kb, "primary").await;
    assert!(!in_recovery(&b).await);
    assert_eq!(timeline(&b).await, 2);
    write(&b, "b1").await.unwrap();
    expect_probes(&b, AS_PRIMARY);
    // ... twice: no second promotion.
    kb.kill();
    let mut kb = apply(&b, "primary", &["--peer".into(), a.peer_arg()]);
    wait_state(&b, &mut kb, "primary").await;
    assert_eq!(timeline(&b).await, 2);
    assert_eq!(rows(&b).await, vec!["a1", "a2", "a3", "b1"]);

    // The old primary comes back as a primary by itself and takes a write: diverged.
    let mut ka = apply(&a, "single", &[]);
    wait_state(&a, &mut ka, "single").await;
    write(&a, "diverged").await.unwrap();
    ka.terminate();

    // primary -> secondary of b: demote, pg_rewind, stream.
    let standby_of_b = [
        "--primary".to_string(),
        b.peer_arg(),
        "--peer".into(),
        b.peer_arg(),
    ];
    let mut ka = apply(&a, "secondary", &standby_of_b);
    wait_state(&a, &mut ka, "secondary").await;
    wait_rows(&a, &["a1", "a2", "a3", "b1"]).await;
    assert_eq!(timeline(&a).await, 2);
    assert!(
        ka.log_text().contains("pg_rewind done"),
        "{}",
        ka.log_text()
    );
    expect_probes(&a, AS_REPLICA);
    ka.kill();
    let mut ka = apply(&a, "secondary", &standby_of_b);
    wait_state(&a, &mut ka, "secondary").await;
    write(&b, "b2").await.unwrap();
    wait_rows(&a, &["a1", "a2", "a3", "b1", "b2"]).await;

    // Diverge again, then make rewind impossible (the WAL it needs is gone): the keeper
    // clones b afresh into a new directory that replaces the old one.
    ka.kill();
    let mut ka = apply(&a, "single", &[]);
    wait_state(&a, &mut ka, "single").await;
    write(&a, "diverged2").await.unwrap();
    ka.terminate();
    for e in std::fs::read_dir(a.pgdata().join("pg_wal")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::remove_file(p).unwrap();
        }
    }
    let mut ka = apply(&a, "secondary", &standby_of_b);
    wait_state(&a, &mut ka, "secondary").await;
    let log = ka.log_text();
    assert!(log.contains("pg_rewind failed"), "{log}");
    assert!(log.contains("replacing the data directory"), "{log}");
    wait_rows(&a, &["a1", "a2", "a3", "b1", "b2"]).await;
    assert!(!sibling_exists(&a, "pgquorum-new") && !sibling_exists(&a, "pgquorum-old"));
    assert_eq!(system_identifier(&a).await, sysid);

    // secondary -> report_lsn: still in recovery, streaming stopped, LSN reported.
    ka.kill();
    let mut ka = apply(&a, "report_lsn", &standby_of_b);
    wait_state(&a, &mut ka, "report_lsn").await;
    assert!(in_recovery(&a).await);
    expect_probes(&a, [503, 503, 503, 503, 200, 200]);
    let h = health(&a).unwrap();
    assert!(h["lsn_bytes"].as_u64().unwrap() > 0, "{h}");
    assert_eq!(h["streaming"], false);

    // secondary -> demoted: postgres stopped; probes say so.
    ka.kill();
    let mut ka = apply(&a, "demoted", &standby_of_b);
    wait_state(&a, &mut ka, "demoted").await;
    wait_postgres_gone(&a).await;
    expect_probes(&a, AS_STOPPED);

    // maintenance: hands off, the keeper leaves postgres as it is (stopped here).
    ka.kill();
    let mut ka = apply(&a, "maintenance", &standby_of_b);
    wait_state(&a, &mut ka, "maintenance").await;
    assert!(a.postmaster_pid().is_none());

    // dropped: postgres stopped and the keeper exits by itself.
    kb.kill();
    let mut kb = apply(&b, "dropped", &[]);
    let st = wait_for(
        "keeper b to exit",
        std::time::Duration::from_secs(30),
        || {
            let s = kb.try_wait();
            async move { s }
        },
    )
    .await;
    assert!(st.success(), "{}", kb.log_text());
    wait_postgres_gone(&b).await;
}

fn sibling_exists(spec: &NodeSpec, suffix: &str) -> bool {
    let mut s = spec.pgdata().into_os_string();
    s.push(".");
    s.push(suffix);
    std::path::PathBuf::from(s).exists()
}

/// join_secondary: a standby of the old primary follows the promoted one.
#[tokio::test]
async fn standby_follows_a_new_primary() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let b = NodeSpec::new("b", dir.path());
    let c = NodeSpec::new("c", dir.path());
    let peers_of = |me: &NodeSpec| -> Vec<String> {
        [&a, &b, &c]
            .into_iter()
            .filter(|n| n.name != me.name)
            .flat_map(|n| ["--peer".to_string(), n.peer_arg()])
            .collect()
    };
    let follow = |me: &NodeSpec, p: &NodeSpec| -> Vec<String> {
        let mut v = vec!["--primary".to_string(), p.peer_arg()];
        v.extend(peers_of(me));
        v
    };
    let mut ka = apply(&a, "single", &peers_of(&a));
    wait_state(&a, &mut ka, "single").await;
    write(&a, "a1").await.unwrap();
    let mut kb = apply(&b, "secondary", &follow(&b, &a));
    let mut kc = apply(&c, "secondary", &follow(&c, &a));
    wait_state(&b, &mut kb, "secondary").await;
    wait_state(&c, &mut kc, "secondary").await;
    wait_rows(&c, &["a1"]).await;

    // a dies; b is promoted; c is told to follow b.
    ka.kill();
    wait_postgres_gone(&a).await;
    kb.kill();
    let mut kb = apply(&b, "wait_primary", &peers_of(&b));
    wait_state(&b, &mut kb, "wait_primary").await;
    write(&b, "b1").await.unwrap();
    kc.kill();
    let mut kc = apply(&c, "join_secondary", &follow(&c, &b));
    wait_state(&c, &mut kc, "join_secondary").await;
    wait_rows(&c, &["a1", "b1"]).await;
    let cl = b.connect().await.unwrap();
    let r = cl
        .query_one(
            "SELECT state FROM pg_stat_replication WHERE application_name = 'c'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "streaming");
    assert_eq!(timeline(&c).await, 2);
}
