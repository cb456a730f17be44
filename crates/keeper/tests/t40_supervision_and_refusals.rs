//! A crashed postmaster is restarted in place; bad situations get a clear error and
//! change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

mod common;
use common::*;

#[tokio::test]
async fn crashed_postmaster_is_restarted_in_place() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let mut k = apply(&a, "single", &[]);
    wait_state(&a, &mut k, "single").await;
    write(&a, "before").await.unwrap();
    for round in 1..=2 {
        let pid = a.postmaster_pid().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_for(
            "writes after the postmaster crash",
            Duration::from_secs(20),
            || async { write(&a, "after").await.ok() },
        )
        .await;
        assert_ne!(a.postmaster_pid().unwrap(), pid, "a new postmaster");
        assert!(k.try_wait().is_none(), "the keeper keeps running");
        assert!(!in_recovery(&a).await, "still the primary, no failover");
        let m = a.http_get("/metrics").unwrap().1;
        assert!(
            m.contains(&format!("pgquorum_keeper_postgres_restarts_total {round}")),
            "{m}"
        );
    }
    let rows = rows(&a).await;
    assert_eq!(rows.iter().filter(|r| *r == "before").count(), 1);
}

#[tokio::test]
async fn settings_come_from_a_config_file() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    // The file holds every option as `name = value`; the command line adds the goal.
    let mut text = String::from("# keeper settings\n");
    let args = a.args();
    for pair in args.chunks(2) {
        text.push_str(&format!(
            "{} = \"{}\"\n",
            pair[0].trim_start_matches("--"),
            pair[1]
        ));
    }
    text.push_str("pg-param = work_mem=7MB\n");
    let conf = dir.path().join("keeper.conf");
    std::fs::write(&conf, text).unwrap();
    let mut k = Keeper::spawn(
        "apply",
        &[
            "--config".into(),
            conf.display().to_string(),
            "--goal".into(),
            "single".into(),
        ],
        &a.keeper_log(),
    );
    wait_state(&a, &mut k, "single").await;
    let c = a.connect().await.unwrap();
    let wm: String = c.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(wm, "7MB");

    // An unknown setting is refused with its name.
    std::fs::write(&conf, "nmae = a\n").unwrap();
    let (ok, err) = run_once(
        true,
        &[
            "--config".into(),
            conf.display().to_string(),
            "--goal".into(),
            "single".into(),
        ],
    );
    assert!(!ok);
    assert!(err.contains("unknown setting \"nmae\""), "{err}");
}

/// Runs `pgquorum keeper apply` to completion (it fails fast on bad input): (ok, stderr).
fn run_once(as_postgres: bool, args: &[String]) -> (bool, String) {
    let mut cmd = Command::new(pgquorum_bin());
    cmd.arg("keeper")
        .arg("apply")
        .args(args)
        .env("NO_COLOR", "1");
    if as_postgres {
        let (u, g) = postgres_ids();
        std::os::unix::process::CommandExt::uid(&mut cmd, u.as_raw());
        std::os::unix::process::CommandExt::gid(&mut cmd, g.as_raw());
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn goal(spec: &NodeSpec, g: &str) -> Vec<String> {
    let mut a = spec.args();
    a.extend(["--goal".to_string(), g.to_string()]);
    a
}

#[tokio::test]
async fn bad_situations_are_refused_and_change_nothing() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());

    // As root.
    let (ok, err) = run_once(false, &goal(&a, "single"));
    assert!(!ok);
    assert!(err.contains("PostgreSQL refuses to run as root; run the keeper as the postgres user, e.g. runuser -u postgres -- pgquorum keeper run"), "{err}");
    assert!(!a.pgdata().exists(), "nothing created as root");

    // Missing binaries.
    let mut args = goal(&a, "single");
    let i = args.iter().position(|x| x == "--pg-bindir").unwrap();
    args[i + 1] = dir.path().join("nowhere").display().to_string();
    let (ok, err) = run_once(true, &args);
    assert!(!ok);
    assert!(err.contains("PostgreSQL binaries not found"), "{err}");
    assert!(!a.pgdata().exists());

    // Parameters pgquorum manages, on the command line or in a config file, and a
    // peer address that could not be written safely into pg_hba.conf.
    let mut args = goal(&a, "single");
    args.extend([
        "--pg-param".to_string(),
        "synchronous_standby_names=*".to_string(),
        "--pg-param".to_string(),
        "work_mem=8MB".to_string(),
    ]);
    let (ok, err) = run_once(true, &args);
    assert!(!ok);
    assert!(
        err.contains("synchronous_standby_names") && err.contains("managed by pgquorum"),
        "{err}"
    );
    let conf = dir.path().join("a.conf");
    std::fs::write(&conf, "pg-param = primary_conninfo=host=evil\n").unwrap();
    let mut args = goal(&a, "single");
    args.extend(["--config".to_string(), conf.display().to_string()]);
    let (ok, err) = run_once(true, &args);
    assert!(!ok);
    assert!(err.contains("primary_conninfo"), "{err}");
    let mut args = goal(&a, "single");
    args.extend(["--peer".to_string(), "b=0.0.0.0/0 trust:5432".to_string()]);
    let (ok, err) = run_once(true, &args);
    assert!(!ok);
    assert!(err.contains("host"), "{err}");
    assert!(!a.pgdata().exists(), "nothing created for refused settings");

    // The port in use: refused at start, before anything is registered or created.
    let busy = std::net::TcpListener::bind(("127.0.0.1", a.pg_port)).unwrap();
    let (ok, err) = run_once(true, &goal(&a, "single"));
    assert!(!ok);
    assert!(
        err.contains(&format!("port {} is already in use", a.pg_port)),
        "{err}"
    );
    assert!(a.postmaster_pid().is_none());
    assert!(
        !a.pgdata().exists(),
        "nothing initialised while the port is taken"
    );
    drop(busy);

    // A data directory of another cluster: make one, then point a keeper whose state
    // says "cluster X" at it.
    let mut k = apply(&a, "single", &[]);
    wait_state(&a, &mut k, "single").await;
    k.terminate();
    wait_postgres_gone(&a).await;
    let state_file = {
        let mut s = a.pgdata().into_os_string();
        s.push(".pgquorum-state.json");
        std::path::PathBuf::from(s)
    };
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    let real = st["system_identifier"].as_u64().unwrap();
    st["system_identifier"] = serde_json::json!(real + 1);
    std::fs::write(&state_file, st.to_string()).unwrap();
    let before = std::fs::read_to_string(a.pgdata().join("postgresql.conf")).unwrap();
    let (ok, err) = run_once(true, &goal(&a, "single"));
    assert!(!ok);
    assert!(err.contains("belongs to another cluster"), "{err}");
    assert!(a.postmaster_pid().is_none());
    assert_eq!(
        std::fs::read_to_string(a.pgdata().join("postgresql.conf")).unwrap(),
        before
    );

    // Another PostgreSQL major version.
    std::fs::write(a.pgdata().join("PG_VERSION"), "14\n").unwrap();
    let (ok, err) = run_once(true, &goal(&a, "single"));
    assert!(!ok);
    assert!(
        err.contains("major version mismatch") && err.contains("version 14"),
        "{err}"
    );
    assert!(a.postmaster_pid().is_none());
}
