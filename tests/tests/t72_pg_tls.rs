//! PostgreSQL over TLS (issue 12, item 8): with certificates, standbys stream over TLS
//! 1.3 and authenticate with their node's certificate (no replication password exists),
//! a replication connection without TLS from a peer's address is refused, and a standby
//! that meets a fake server asking for a cleartext password gives it nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgquorum_testkit::certs::TestCerts;
use pgquorum_testkit::postgres::{Keeper, NodeSpec, PgDir, REPLICATION_PASSWORD};
use pgquorum_tests::cluster::Cluster;
use pgquorum_trust::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

/// psql (as root, which can read every test key) with `conninfo`: (success, stderr).
fn psql(conninfo: &str, sql: &str) -> (bool, String) {
    let out = Command::new(PSQL)
        .args(["-X", "-A", "-t", "-w", "-c", sql, "-d", conninfo])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standbys_stream_over_tls_authenticated_by_certificate() {
    let c = Cluster::start_tls(2, true).await;
    let primary = c.primary().await;
    let standby = if primary == "node1" { "node2" } else { "node1" };
    let w = c.writer();
    w.wait_progress(20, "writes").await;
    let p = c.node(&primary).spec.connect().await.unwrap();

    // The walsender's connection is TLS 1.3 with the standby's certificate.
    let row = p
        .query_one(
            "SELECT count(*), bool_and(s.ssl), min(s.version), min(s.client_dn) \
             FROM pg_stat_replication r JOIN pg_stat_ssl s ON s.pid = r.pid \
             WHERE r.state = 'streaming'",
            &[],
        )
        .await
        .unwrap();
    let (n, ssl, version, dn): (i64, Option<bool>, Option<String>, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(n, 1, "one streaming standby");
    assert_eq!(ssl, Some(true));
    assert_eq!(version.as_deref(), Some("TLSv1.3"));
    let dn = dn.unwrap_or_default();
    assert!(dn.contains(standby) && dn.contains("keeper"), "{dn}");
    // No password anywhere: none was given, the role has none.
    let no_password: bool = p
        .query_one(
            "SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = 'pgquorum_replicator'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(no_password);
    let conninfo: String = c
        .node(standby)
        .spec
        .connect()
        .await
        .unwrap()
        .query_one("SHOW primary_conninfo", &[])
        .await
        .unwrap()
        .get(0);
    assert!(conninfo.contains("sslmode=verify-full"), "{conninfo}");
    assert!(!conninfo.contains("passfile"), "{conninfo}");

    // From a peer's address (loopback here), without TLS: refused by pg_hba.conf, for
    // replication and for the replication role's database connection alike.
    let port = c.node(&primary).spec.pg_port;
    let plain = format!("host=127.0.0.1 port={port} user=pgquorum_replicator sslmode=disable");
    let (ok, out) = psql(
        &format!("{plain} dbname=postgres replication=true"),
        "IDENTIFY_SYSTEM",
    );
    assert!(!ok && out.contains("pg_hba.conf rejects"), "{out}");
    let (ok, out) = psql(&format!("{plain} dbname=postgres"), "SELECT 1");
    assert!(!ok && out.contains("pg_hba.conf rejects"), "{out}");

    // With TLS: a node's keeper certificate is let in, an operator's is not (its
    // subject is not a keeper's), nor that of a keeper outside the group.
    let certs = c.monitors.certs.as_ref().unwrap();
    let tls = |id: &Identity| {
        certs.issue(id);
        format!(
            "host=127.0.0.1 port={port} user=pgquorum_replicator dbname=postgres replication=true \
             sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            certs.dir.ca_cert_path().display(),
            certs.dir.cert_path(id).display(),
            certs.dir.key_path(id).display()
        )
    };
    let (ok, out) = psql(&tls(&Identity::keeper(standby).unwrap()), "IDENTIFY_SYSTEM");
    assert!(ok, "{out}");
    let (ok, out) = psql(&tls(&Identity::Operator("admin".into())), "IDENTIFY_SYSTEM");
    assert!(
        !ok && out.contains("certificate authentication failed"),
        "{out}"
    );
    let (ok, out) = psql(&tls(&Identity::keeper("node9").unwrap()), "IDENTIFY_SYSTEM");
    assert!(
        !ok && out.contains("certificate authentication failed"),
        "{out}"
    );

    // A renewed certificate reaches postgres without a restart: the keeper copies it
    // and postgres reloads, so a new connection is served the new one, and the
    // standby keeps streaming.
    let id = Identity::keeper(&primary).unwrap();
    certs.reissue(&id, pgquorum_trust::Validity::days(30));
    certs.copy_keeper_files(&id, &c.dir.path().join(format!("certs-{primary}")));
    let renewed = std::fs::read_to_string(certs.dir.cert_path(&id)).unwrap();
    let fingerprint = |pem: &str| {
        let mut child = Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(pem.as_bytes())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    let want = fingerprint(&renewed);
    pgquorum_testkit::wait_until(
        Duration::from_secs(30),
        "the renewed certificate served",
        || {
            let out = Command::new("openssl")
                .args(["s_client", "-starttls", "postgres", "-connect"])
                .arg(format!("127.0.0.1:{port}"))
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            fingerprint(&String::from_utf8_lossy(&out.stdout)) == want
        },
    )
    .unwrap();
    w.wait_progress(20, "writes after the renewal").await;

    let acked = w.stop().await;
    c.assert_rows_on(standby, &acked).await;
}

/// What a fake server saw: connections (those it finished with), the ones whose first
/// message was not a request for TLS, and passwords sent.
#[derive(Default, Debug)]
struct Seen {
    connections: usize,
    finished: usize,
    ssl_requests: usize,
    plain_first: usize,
    passwords: Vec<String>,
}

/// A server that refuses TLS ('N') and answers every startup message with
/// AuthenticationCleartextPassword, recording what comes back.
async fn fake_server() -> (u16, Arc<Mutex<Seen>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = l.accept().await {
            let seen = s.clone();
            tokio::spawn(async move {
                seen.lock().unwrap().connections += 1;
                let r = tokio::time::timeout(Duration::from_secs(5), async {
                    let mut first = true;
                    loop {
                        let len = conn.read_u32().await? as usize;
                        let mut body = vec![0u8; len.saturating_sub(4).min(10_000)];
                        conn.read_exact(&mut body).await?;
                        if body.get(..4) == Some(&80877103u32.to_be_bytes()[..]) {
                            seen.lock().unwrap().ssl_requests += 1;
                            first = false;
                            conn.write_all(b"N").await?;
                            continue;
                        }
                        if first {
                            seen.lock().unwrap().plain_first += 1;
                        }
                        // A startup message: ask for the password in clear.
                        conn.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).await?;
                        let mut tag = [0u8; 1];
                        conn.read_exact(&mut tag).await?;
                        let len = conn.read_u32().await? as usize;
                        let mut pw = vec![0u8; len.saturating_sub(4).min(10_000)];
                        conn.read_exact(&mut pw).await?;
                        if tag[0] == b'p' {
                            seen.lock()
                                .unwrap()
                                .passwords
                                .push(String::from_utf8_lossy(&pw).into_owned());
                        }
                        return Ok::<(), std::io::Error>(());
                    }
                })
                .await;
                drop(r);
                seen.lock().unwrap().finished += 1;
            });
        }
    });
    (port, seen)
}

/// `keeper apply` of a new standby whose upstream is the fake server: it clones
/// (pg_basebackup) from it, again and again; returns what the server saw.
async fn standby_meets_fake(tls: bool) -> Seen {
    let (port, seen) = fake_server().await;
    let dir = PgDir::new();
    let spec = NodeSpec::new("node1", dir.path());
    let mut args = spec.args();
    args.extend([
        "--goal".into(),
        "secondary".into(),
        "--primary".into(),
        format!("upstream=127.0.0.1:{port}"),
    ]);
    if tls {
        let certs = TestCerts::new(&dir.path().join("ca"));
        let own = certs.keeper_dir("node1", dir.path());
        args.extend(["--certs-dir".into(), own.display().to_string()]);
    }
    let mut keeper = Keeper::spawn("apply", &args, &spec.keeper_log());
    pgquorum_testkit::wait_until_async(Duration::from_secs(30), "attempts at the fake", || {
        let seen = seen.clone();
        async move { seen.lock().unwrap().finished >= 3 }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", keeper.log_text()));
    keeper.kill();
    let s = seen.lock().unwrap();
    Seen {
        connections: s.connections,
        finished: s.finished,
        ssl_requests: s.ssl_requests,
        plain_first: s.plain_first,
        passwords: s.passwords.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_gives_no_password_to_a_server_that_asks_for_it() {
    // With certificates: every attempt asks for TLS, stops at the refusal, and no
    // password exists to send.
    let seen = standby_meets_fake(true).await;
    assert!(seen.passwords.is_empty(), "{seen:?}");
    // (Counted per finished connection: one still being accepted when the count was
    // taken has not sent its first message yet.)
    assert_eq!(seen.plain_first, 0, "{seen:?}");
    assert!(seen.ssl_requests >= seen.finished, "{seen:?}");
    // The same fake catches a password where one is used (--insecure, the password
    // file): what the first check would have seen before TLS.
    let seen = standby_meets_fake(false).await;
    assert!(
        seen.passwords
            .iter()
            .any(|p| p.contains(REPLICATION_PASSWORD)),
        "{seen:?}"
    );
}
