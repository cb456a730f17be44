//! Certificate rotation without downtime: every certificate (members, keepers,
//! operator) is renewed while a client commits rows, the replaced ones are revoked,
//! and the processes go on with the renewed files without a restart — proven by
//! forcing new connections everywhere (the monitor leader is killed and restarted, so
//! every keeper and member dials again) that only the renewed certificates can open.
//! No lease is lost: the primary stays the primary and no acknowledged row is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use pgquorum_tests::cluster::{primary_of, Cluster};
use pgquorum_trust::{Identity, Validity};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_every_certificate_under_load_costs_no_lease() {
    if pgquorum_testkit::insecure_requested() {
        eprintln!("SKIPPED t16_rotation: PGQUORUM_TEST_INSECURE=1 runs the cluster without TLS");
        return;
    }
    // node3 serves its health endpoints over HTTPS with its keeper certificate.
    let mut c = Cluster::start_with(3, |i| {
        if i == 2 {
            vec!["--http-tls".into()]
        } else {
            Vec::new()
        }
    })
    .await;
    let certs = c.monitors.certs.clone().expect("TLS cluster");
    let https = |c: &Cluster| -> (String, String) {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(certs.dir.ca_cert_path())
            .args(["-w", "\n%{http_code}"])
            .arg(format!("https://{}/health", c.node("node3").spec.http))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (before, err) = https(&c);
    assert!(before.contains("\n200"), "HTTPS /health: {before} {err}");
    let plain = c.node("node3").spec.http_get("/health");
    assert!(
        plain.as_ref().is_none_or(|(code, _)| *code != 200),
        "node3 still answers plain HTTP: {plain:?}"
    );
    let primary = c.primary().await;
    let w = c.writer();
    w.wait_progress(50, "before the renewal").await;

    let mut ids: Vec<Identity> = (1..=3).map(Identity::Member).collect();
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.spec.name.clone()).collect();
    ids.extend(nodes.iter().map(|n| Identity::Keeper(n.clone())));
    ids.push(Identity::Operator("admin".into()));
    let old: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| certs.dir.serial_of(id).unwrap())
        .collect();
    for id in &ids {
        certs.reissue(id, Validity::days(60));
    }
    // Keepers read their own directory (owned by the user they run as).
    for n in &nodes {
        certs.copy_keeper_files(
            &Identity::Keeper(n.clone()),
            &c.dir.path().join(format!("certs-{n}")),
        );
    }
    certs.dir.revoke_serials(&old).unwrap();
    for id in &ids {
        assert!(!old.contains(&certs.dir.serial_of(id).unwrap()));
    }
    // Watchers look every 5 s.
    tokio::time::sleep(Duration::from_secs(7)).await;
    w.wait_progress(50, "after the renewal").await;

    // Force new connections everywhere: every keeper and both other members must dial
    // the new leader, and the restarted member must accept them, with the renewed
    // certificates only (the old ones are revoked).
    let leader = c.monitors.wait_leader(Duration::from_secs(10)).await;
    let mut restarted = vec![leader];
    c.monitors.kill(leader);
    c.monitors.start(leader);
    let new_leader = c.monitors.wait_leader(Duration::from_secs(30)).await;
    if new_leader != leader {
        // And once more, so that the connections to the restarted member are new too.
        restarted.push(new_leader);
        c.monitors.kill(new_leader);
        c.monitors.start(new_leader);
        c.monitors.wait_leader(Duration::from_secs(30)).await;
    }
    w.wait_progress(100, "after new connections with the renewed certificates")
        .await;
    let ns = c.wait_healthy(2).await;
    assert_eq!(
        primary_of(&ns).as_deref(),
        Some(primary.as_str()),
        "the primary changed: a lease was lost during the rotation\n{}",
        c.logs()
    );
    // node3's HTTPS endpoint answers with its renewed certificate.
    let (after, err) = https(&c);
    assert!(
        after.contains("\n200"),
        "HTTPS /health after the renewal: {after} {err}"
    );
    // The operator's renewed certificate works from a new process.
    let (ok, out) = c.cli(&["show", "state"]);
    assert!(ok, "{out}");
    for id in 1..=3u64 {
        let log = c.monitors.log(id);
        assert!(
            log.contains("certificates reloaded") || restarted.contains(&id),
            "member {id} did not reload its certificates:\n{log}"
        );
    }
    for n in &nodes {
        let log = std::fs::read_to_string(c.node(n).spec.keeper_log()).unwrap_or_default();
        assert!(
            log.contains("certificates reloaded"),
            "keeper {n} did not reload its certificates"
        );
    }
    let acked = w.stop().await;
    c.assert_rows_on(&primary, &acked).await;
    let _ = &mut c;
}
