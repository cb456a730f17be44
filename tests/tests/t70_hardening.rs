//! An attacker on the same machine (issue 12): a crafted registration must not reach
//! any pg_hba.conf, an oversized one must not wedge the cluster, out-of-range numbers
//! are refused rather than wrapped, and the files and sockets of a running cluster are
//! closed to other local users.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use pgquorum_api::client::MonitorClient;
use pgquorum_api::pb::monitor as pb;
use pgquorum_testkit::postgres::REPLICATION_PASSWORD;
use pgquorum_tests::cluster::Cluster;
use pgquorum_trust::Identity;
use tonic::Code;

fn register(name: &str, host: &str) -> pb::RegisterNodeRequest {
    pb::RegisterNodeRequest {
        formation: String::new(),
        name: name.into(),
        host: host.into(),
        port: 5432,
        candidate_priority: 50,
        replication_quorum: true,
        system_identifier: 0,
        pg_major_version: 15,
        current_state: String::new(),
    }
}

/// RegisterNode as the keeper of `req.name` (a keeper certificate of that name: the
/// attacker is an authenticated keeper on a compromised host): the refusal's code and
/// message.
async fn refused(c: &Cluster, req: pb::RegisterNodeRequest) -> (Code, String) {
    let id = Identity::keeper(&req.name).unwrap();
    let client = MonitorClient::new(
        c.monitors.members.values().map(|m| m.addr.clone()),
        c.monitors.security(id),
    )
    .unwrap();
    match client
        .call(|mut raw| {
            let req = req.clone();
            async move { raw.register_node(req).await }
        })
        .await
    {
        Ok(r) => panic!("registration accepted: node {}", r.node_id),
        Err(e) => (e.code().unwrap(), e.to_string()),
    }
}

/// The lines of a pg_hba.conf that are not comments or blank.
fn hba_lines(pgdata: &Path) -> Vec<String> {
    std::fs::read_to_string(pgdata.join("pg_hba.conf"))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// `nobody` tries to read `path`: true when it could.
fn nobody_reads(path: &Path) -> bool {
    Command::new("runuser")
        .args(["-u", "nobody", "--", "cat"])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_changes_nothing_and_secrets_stay_private() {
    let c = Cluster::start(2).await;
    let primary = c.primary().await;
    let standby = if primary == "node1" { "node2" } else { "node1" };
    let w = c.writer();
    w.wait_progress(50, "before the attack").await;
    let before: Vec<Vec<String>> = ["node1", "node2"]
        .iter()
        .map(|n| hba_lines(&c.node(n).spec.pgdata()))
        .collect();

    // 1. The registration that gave every node a `trust` line for 127.0.0.7.
    let (code, msg) = refused(
        &c,
        register(
            "evil",
            "127.0.0.7/32 trust\nhost all all 127.0.0.7/32 trust\n#",
        ),
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("host"), "{msg}");
    // A host name that pg_hba.conf would read as "every address of my subnets".
    let (code, msg) = refused(&c, register("evil", "samenet")).await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    // Refused means not in the state, so no keeper is ever told about it: a
    // linearizable read shows only the two real nodes.
    let ns = c.state().await.unwrap();
    assert_eq!(ns.len(), 2, "{ns:?}");

    // 2. Oversized input: refused before decoding (5 MiB) or with a short echo
    //    (100 KB fits the request limit and is refused by the name rules).
    let (code, msg) = refused(&c, register("big", &"x".repeat(5 << 20))).await;
    assert!(
        matches!(
            code,
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{code:?}: {msg}"
    );
    let long = "n".repeat(100_000);
    let e = c
        .monitors
        .client()
        .call(|mut raw| {
            let node = long.clone();
            async move {
                raw.drop_node(pb::DropNodeRequest {
                    formation: String::new(),
                    node,
                })
                .await
            }
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(
        e.to_string().len() < 400,
        "error echoes {} bytes",
        e.to_string().len()
    );

    // 3. An out-of-range number is refused, not wrapped (2^32 + 50 became 50).
    let (ok, out) = c.cli(&["set", "node", standby, "candidate-priority", "4294967346"]);
    assert!(!ok, "{out}");
    assert!(out.contains("out of range"), "{out}");
    let (ok, out) = c.cli(&["set", "node", standby, "candidate-priority", "7"]);
    assert!(ok, "{out}");
    let ns = c
        .wait_state("priority 7", |ns| {
            ns.iter()
                .any(|n| n.name == standby && n.candidate_priority == 7)
        })
        .await;
    assert_eq!(ns.len(), 2);

    // The cluster kept taking writes, and the operator's view works.
    w.wait_progress(50, "after the attack").await;
    let (ok, out) = c.cli(&["show", "state"]);
    assert!(ok && out.contains(&primary), "{out}");
    for (i, n) in ["node1", "node2"].iter().enumerate() {
        let now = hba_lines(&c.node(n).spec.pgdata());
        assert_eq!(now, before[i], "pg_hba.conf of {n} changed");
        assert!(
            !now.iter()
                .any(|l| l.contains("127.0.0.7") || l.contains("samenet")),
            "{now:?}"
        );
        // Local connections: peer only, never trust.
        for l in now.iter().filter(|l| l.starts_with("local")) {
            assert!(!l.contains("trust"), "{n}: {l}");
        }
        assert!(now.iter().any(|l| l == "local all all peer"), "{now:?}");
    }

    // 4. A malformed probe query is the caller's error, with a reason.
    let (code, body) = c.node(standby).spec.http_get("/replica?lag=abc").unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("lag"), "{body}");

    // 5. Secrets: the standby streams with a password file (or, with certificates,
    //    with its certificate and no password at all), and the password is in no
    //    configuration, log, or process environment.
    let tls = c.monitors.certs.is_some();
    let sb = c.node(standby).spec.clone();
    let s = sb.connect().await.unwrap();
    let conninfo: String = s
        .query_one("SHOW primary_conninfo", &[])
        .await
        .unwrap()
        .get(0);
    if tls {
        assert!(conninfo.contains("sslmode=verify-full"), "{conninfo}");
        assert!(!conninfo.contains("passfile="), "{conninfo}");
    } else {
        assert!(conninfo.contains("passfile="), "{conninfo}");
    }
    assert!(!conninfo.contains("password"), "{conninfo}");
    let streaming: i64 = c
        .node(&primary)
        .spec
        .connect()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(streaming, 1);
    let sibling = |spec: &pgquorum_testkit::postgres::NodeSpec, suffix: &str| {
        let mut p = spec.pgdata().into_os_string();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    for n in ["node1", "node2"] {
        let spec = &c.node(n).spec;
        for f in [
            spec.pgdata().join("postgresql.auto.conf"),
            spec.pgdata().join("pgquorum.conf"),
            sibling(spec, ".postgres.log"),
        ] {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            assert!(
                !text.contains(REPLICATION_PASSWORD) && !text.contains("password="),
                "{} holds the password",
                f.display()
            );
        }
        let pid = spec.postmaster_pid().unwrap();
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let env = String::from_utf8_lossy(&env);
        assert!(
            !env.contains(REPLICATION_PASSWORD) && !env.contains("PGQUORUM_REPLICATION_PASSWORD"),
            "postgres of {n} inherited the password"
        );
    }

    // 6. Other local users: with the directories opened up so that only the files'
    //    own modes protect them, `nobody` reads none of them and cannot log in
    //    through the Unix socket.
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for n in ["node1", "node2"] {
        let spec = &c.node(n).spec;
        let mut private = vec![
            sibling(spec, ".postgres.log"),
            sibling(spec, ".pgquorum-state.json"),
        ];
        if tls {
            // postgres' copy of the node's key, and no password file at all.
            assert!(!sibling(spec, ".pgpass").exists());
            private.push(sibling(spec, ".tls").join("server.key"));
            assert_eq!(mode(&sibling(spec, ".tls")), 0o700);
        } else {
            private.push(sibling(spec, ".pgpass"));
        }
        for f in private {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
            assert!(!nobody_reads(&f), "nobody read {}", f.display());
        }
        for f in ["pg_hba.conf", "pgquorum.conf", "postgresql.conf"] {
            let p = spec.pgdata().join(f);
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        assert_eq!(mode(&spec.pgdata()), 0o700);
        let psql = Command::new("runuser")
            .args([
                "-u",
                "nobody",
                "--",
                "/usr/lib/postgresql/15/bin/psql",
                "-h",
            ])
            .arg(spec.socket_dir())
            .args([
                "-p",
                &spec.pg_port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-w",
                "-c",
                "SELECT 1",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&psql.stderr);
        assert!(!psql.status.success(), "nobody logged in as postgres");
        assert!(err.contains("Peer authentication failed"), "{err}");
    }
    std::fs::set_permissions(
        c.monitors.dir.path(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    for m in c.monitors.members.values() {
        assert_eq!(mode(&m.data_dir), 0o700, "{}", m.data_dir.display());
        for e in std::fs::read_dir(&m.data_dir).unwrap().flatten() {
            if e.file_type().unwrap().is_file() {
                assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
            }
        }
        assert!(!nobody_reads(&m.data_dir.join("conf")));
    }
    let acked = w.stop().await;
    c.assert_rows_on(standby, &acked).await;
}
