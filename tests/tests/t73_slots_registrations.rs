//! Replication slots and registrations (issue 12, item 5): the primary keeps a slot
//! only for a node that has streamed, drops it with the node, and a keeper that refuses
//! to start (busy --http port, another cluster's data directory) leaves no node, no
//! slot and no pg_hba / pg_ident entry behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use pgquorum_api::pb::monitor as pb;
use pgquorum_testkit::postgres::NodeSpec;
use pgquorum_tests::cluster::{Cluster, Node};

async fn slots(c: &Cluster, primary: &str) -> BTreeSet<String> {
    c.node(primary)
        .spec
        .connect()
        .await
        .unwrap()
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'pgquorum%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// What the primary's pg_hba.conf and pg_ident.conf say about `name` (with
/// certificates, each peer keeper's subject is in pg_ident.conf).
fn auth_mentions(pgdata: &Path, name: &str) -> bool {
    ["pg_hba.conf", "pg_ident.conf"].iter().any(|f| {
        std::fs::read_to_string(pgdata.join(f))
            .unwrap_or_default()
            .contains(&format!("CN={name},"))
    })
}

async fn wait_slots(c: &Cluster, primary: &str, want: &[String], what: &str) {
    let want: BTreeSet<String> = want.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let have = slots(c, primary).await;
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: slots {have:?}, want {want:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A keeper started with `prepare` done first must exit non-zero and leave nothing.
async fn refused_keeper_leaves_nothing(
    c: &mut Cluster,
    primary: &str,
    name: &str,
    expect_in_log: &str,
) {
    let ts = Instant::now();
    let deadline = ts + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = c
            .nodes
            .iter_mut()
            .find(|n| n.spec.name == name)
            .and_then(|n| n.keeper.as_mut())
            .and_then(|k| k.try_wait())
        {
            break s;
        }
        assert!(Instant::now() < deadline, "keeper {name} still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = c.node(name).keeper.as_ref().unwrap().log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains(expect_in_log), "{log}");
    let ns = c.state().await.unwrap();
    assert!(!ns.iter().any(|n| n.name == name), "{ns:?}");
    let (ok, out) = c.cli(&["show", "state"]);
    assert!(ok && !out.contains(name), "{out}");
    assert!(!slots(c, primary).await.iter().any(|s| s.contains(name)));
    assert!(!auth_mentions(&c.node(primary).spec.pgdata(), name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_follow_streaming_nodes_and_refused_keepers_leave_nothing() {
    let mut c = Cluster::start(2).await;
    let primary = c.primary().await;
    let standby = if primary == "node1" { "node2" } else { "node1" }.to_string();
    let tls = c.monitors.certs.is_some();
    wait_slots(
        &c,
        &primary,
        &[format!("pgquorum_{standby}")],
        "the streaming standby's slot",
    )
    .await;

    // A registered node that never streams holds no slot.
    let ghost = c.monitors.keeper_client("ghost");
    ghost
        .call(|mut raw| async move {
            raw.register_node(pb::RegisterNodeRequest {
                formation: "default".into(),
                name: "ghost".into(),
                host: "127.0.0.1".into(),
                port: pgquorum_testkit::free_port().into(),
                candidate_priority: 50,
                replication_quorum: true,
                system_identifier: 0,
                pg_major_version: 15,
                current_state: "init".into(),
            })
            .await
        })
        .await
        .unwrap();
    if tls {
        // The primary has taken the ghost in as a peer (its certificate is mapped).
        let pgdata = c.node(&primary).spec.pgdata();
        pgquorum_testkit::wait_until(Duration::from_secs(30), "ghost known", || {
            auth_mentions(&pgdata, "ghost")
        })
        .unwrap();
    }
    // Absence: watched for a while (the primary reconciles its slots every 5 s).
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let have = slots(&c, &primary).await;
        assert!(!have.contains("pgquorum_ghost"), "{have:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Dropping a node drops its slot (its walsender was streaming until then).
    let (ok, out) = c.cli(&["drop", "node", &standby]);
    assert!(ok, "{out}");
    let (ok, out) = c.cli(&["drop", "node", "ghost"]);
    assert!(ok, "{out}");
    wait_slots(&c, &primary, &[], "the dropped node's slot").await;
    let pgdata = c.node(&primary).spec.pgdata();
    pgquorum_testkit::wait_until(Duration::from_secs(30), "ghost forgotten", || {
        !auth_mentions(&pgdata, "ghost")
    })
    .unwrap();

    // A keeper whose --http port is taken refuses to start, unregistered.
    let spec = NodeSpec::new("busyhttp", c.dir.path());
    let _hold = std::net::TcpListener::bind(spec.http).unwrap();
    c.nodes.push(Node {
        spec,
        keeper: None,
        extra_args: Vec::new(),
        prefix: Vec::new(),
        bin: None,
    });
    c.start_keeper("busyhttp");
    refused_keeper_leaves_nothing(&mut c, &primary, "busyhttp", "binding --http").await;

    // A keeper given another cluster's data directory: refused by the monitor group at
    // registration (its system identifier is not the group's), so never recorded.
    let spec = NodeSpec::new("foreign", c.dir.path());
    let out = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(format!("{}/initdb", pgquorum_testkit::postgres::PG_BINDIR))
        .arg("-D")
        .arg(spec.pgdata())
        .args(["--auth-local=peer", "-U", "postgres"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    c.nodes.push(Node {
        spec,
        keeper: None,
        extra_args: Vec::new(),
        prefix: Vec::new(),
        bin: None,
    });
    c.start_keeper("foreign");
    refused_keeper_leaves_nothing(&mut c, &primary, "foreign", "another cluster").await;
}
