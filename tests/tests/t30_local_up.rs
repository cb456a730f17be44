//! `pgquorum local up`, the first command README gives, run as a user runs it: it
//! prints a read-write URI that takes commits, the rows reach the standbys; it is a
//! supervisor, not a tripwire: a follower monitor member stopped with SIGTERM and then
//! the primary's node killed (`pgquorum local kill`, keeper and PostgreSQL SIGKILLed)
//! are reported while the cluster runs on, another node becomes primary and the printed
//! URI takes writes again; Ctrl-C (SIGINT) stops every process it started; started
//! again on the same directory it comes back with the data, the dead nodes included;
//! SIGKILLed, it leaves its cluster behind, and `pgquorum local down --dir` stops that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgquorum_testkit::postgres::port_free;
use pgquorum_testkit::{free_port, pgquorum_bin, temp_dir, wait_until, Proc};
use tokio_postgres::NoTls;

/// A base port whose 9 derived ports (monitors +1.., PostgreSQL +11.., HTTP +21..) are
/// all free now.
fn free_base() -> u16 {
    for _ in 0..200 {
        let b = free_port();
        if b > 60_000 {
            continue;
        }
        let all = [1, 2, 3, 11, 12, 13, 21, 22, 23, 31, 32, 33];
        if all.iter().all(|o| port_free(b + o)) {
            return b;
        }
    }
    panic!("no free block of ports found");
}

struct LocalUp {
    proc: Option<Proc>,
    dir: PathBuf,
    base: u16,
    log: PathBuf,
}

impl LocalUp {
    fn start(dir: &Path, base: u16, log: &Path) -> LocalUp {
        let args: Vec<String> = vec![
            "local".into(),
            "up".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--base-port".into(),
            base.to_string(),
        ];
        let proc = Proc::spawn("local up", &pgquorum_bin(), &args, log).unwrap();
        LocalUp {
            proc: Some(proc),
            dir: dir.to_path_buf(),
            base,
            log: log.to_path_buf(),
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The read-write URI, once the command announced the cluster up.
    fn wait_up(&self, seen: usize) -> String {
        let r = wait_until(
            Duration::from_secs(240),
            "local up to announce the cluster",
            || self.output().matches("The cluster is up").count() > seen,
        );
        if let Err(e) = r {
            panic!("{e}\n{}\n{}", self.output(), self.logs());
        }
        let out = self.output();
        out.lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("read-write: "))
            .expect("a read-write URI")
            .to_string()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.join("logs")) {
            for e in rd.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                s.push_str(&format!("---- {} ----\n", e.path().display()));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    fn ports(&self) -> Vec<u16> {
        [1, 2, 3, 11, 12, 13, 21, 22, 23, 31, 32, 33]
            .iter()
            .map(|o| self.base + o)
            .collect()
    }

    fn signal(&self, sig: Signal) {
        if let Some(p) = &self.proc {
            let _ = kill(Pid::from_raw(p.pid() as i32), sig);
        }
    }

    fn down(&self) -> (bool, String) {
        let out = std::process::Command::new(pgquorum_bin())
            .args(["local", "down", "--dir"])
            .arg(&self.dir)
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
}

impl Drop for LocalUp {
    fn drop(&mut self) {
        // Whatever happened, nothing it started may outlive the test.
        self.signal(Signal::SIGINT);
        if let Some(mut p) = self.proc.take() {
            let _ = wait_until(Duration::from_secs(60), "local up to stop", || {
                !p.is_running()
            });
            p.kill();
        }
        if self.dir.join("local.json").exists() {
            let _ = self.down();
        }
    }
}

async fn connect(uri: &str) -> tokio_postgres::Client {
    let (c, conn) = uri
        .parse::<tokio_postgres::Config>()
        .unwrap()
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {uri}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// Waits until PostgreSQL on `port` (a standby) shows `n` rows in `t30`.
async fn wait_rows_on(port: u16, n: i64) {
    let uri = format!("postgresql://postgres@127.0.0.1:{port}/postgres?connect_timeout=2");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((c, conn)) = uri
            .parse::<tokio_postgres::Config>()
            .unwrap()
            .connect(NoTls)
            .await
        {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            if let Ok(row) = c.query_one("SELECT count(*) FROM t30", &[]).await {
                if row.get::<_, i64>(0) == n {
                    return;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node on port {port} never showed {n} rows"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_up_serves_writes_stops_on_ctrl_c_restarts_and_local_down_cleans_up() {
    let tmp = temp_dir("pgquorum-t30-");
    // The keepers run as `postgres`: it must be able to reach the cluster directory.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("cluster");
    let base = free_base();
    let log = tmp.path().join("local-up.out");
    let mut up = LocalUp::start(&dir, base, &log);
    let uri = up.wait_up(0);
    assert!(uri.contains("target_session_attrs=read-write"), "{uri}");

    // The commands it prints work as printed: the exports name the monitors and the
    // certificates (TLS is on); without them the CLI refuses; the viewer only reads.
    let out = up.output();
    let export = |var: &str| -> String {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("export {var}=")))
            .map(|v| v.split_whitespace().next().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("no `export {var}=` line printed:\n{out}"))
    };
    let (monitors, certs) = (export("PGQUORUM_MONITOR"), export("PGQUORUM_CERTS_DIR"));
    let cli = |args: &[&str], with_certs: bool| {
        let mut cmd = std::process::Command::new(pgquorum_bin());
        cmd.args(args)
            .env("PGQUORUM_MONITOR", &monitors)
            .env_remove("PGQUORUM_CERTS_DIR");
        if with_certs {
            cmd.env("PGQUORUM_CERTS_DIR", &certs);
        }
        let o = cmd.output().unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let (ok, text) = cli(&["show", "state", "--json"], true);
    assert!(ok, "show state with the printed exports: {text}");
    for node in ["node1", "node2", "node3"] {
        assert!(
            text.contains(&format!("\"{node}\"")),
            "{node} missing: {text}"
        );
    }
    // `pgquorum show events | head -1`: the reader gone, the command ends with 0.
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let o = std::process::Command::new(pgquorum_bin())
        .args(["show", "events", "--limit", "200"])
        .env("PGQUORUM_MONITOR", &monitors)
        .env("PGQUORUM_CERTS_DIR", &certs)
        .stdout(std::process::Stdio::from(write))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "show events into a closed pipe: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (ok, text) = cli(&["show", "state"], false);
    assert!(!ok && text.contains("--certs-dir"), "{text}");
    let (ok, text) = cli(&["perform", "switchover", "--client", "viewer"], true);
    assert!(!ok && text.contains("operator role"), "{text}");

    // The printed URI takes commits, and they reach both standbys.
    let c = connect(&uri).await;
    c.batch_execute("CREATE TABLE t30 (n int PRIMARY KEY)")
        .await
        .unwrap();
    for n in 1..=20 {
        c.execute("INSERT INTO t30 VALUES ($1)", &[&n])
            .await
            .unwrap();
    }
    let primary_port = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get::<_, i32>(0);
    drop(c);
    for port in [base + 11, base + 12, base + 13] {
        if i32::from(port) != primary_port {
            wait_rows_on(port, 20).await;
        }
    }

    // A switchover ends with its result: the new primary, the old one's state, the
    // write pause. One that the monitor abandons (a standby's keeper paused, so it
    // cannot report its LSN) ends with the monitor's reason as soon as it gives up, not
    // after the timeout, with exit code 4.
    let local = |args: &[&str]| {
        let o = std::process::Command::new(pgquorum_bin())
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let node_of = |port: i32| format!("node{}", port - i32::from(base) - 10);
    let standby = (1..=3)
        .map(|j| node_of(i32::from(base) + 10 + j))
        .find(|n| *n != node_of(primary_port))
        .unwrap();
    local(&[
        "local", "kill", &standby, "--only", "keeper", "--signal", "STOP",
    ]);
    // None while the view is not current: `show state` exits 8 ("stale") when the
    // member that answered could not prove its leadership at that moment (a loaded
    // machine delays the Raft heartbeats that prove it); such a view is asked again.
    let state_of = |name: &str| -> Option<serde_json::Value> {
        let (ok, text) = cli(&["--json", "show", "state"], true);
        if !ok {
            assert!(text.contains("stale"), "show state failed: {text}");
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
    };
    wait_until(
        Duration::from_secs(30),
        "the paused keeper to be seen silent",
        || state_of(&standby).is_some_and(|n| n["health"] != "healthy"),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let (ok, text) = cli(
        &["--json", "perform", "switchover", "--timeout", "60"],
        true,
    );
    local(&[
        "local", "kill", &standby, "--only", "keeper", "--signal", "CONT",
    ]);
    assert!(
        !ok,
        "a switchover with a paused standby keeper succeeded: {text}"
    );
    let err: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(err["error"]["exit_code"], 4, "{text}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("abandoned"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the abandonment took {:?}",
        started.elapsed()
    );
    wait_until(Duration::from_secs(60), "every node settled again", || {
        (1..=3).all(|j| {
            state_of(&format!("node{j}"))
                .is_some_and(|n| n["health"] == "healthy" && n["reported_state"] == n["goal_state"])
        })
    })
    .unwrap();
    let (ok, text) = cli(&["--json", "perform", "switchover"], true);
    assert!(ok, "switchover: {text}");
    let done: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_ne!(
        done["new_primary"],
        node_of(primary_port).as_str(),
        "{done}"
    );
    assert_eq!(
        done["old_primary"]["name"],
        node_of(primary_port).as_str(),
        "{done}"
    );
    assert!(done["write_pause_ms"].as_u64().is_some(), "{done}");
    let c = connect(&uri).await;
    let primary_port = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get::<_, i32>(0);
    drop(c);
    assert_eq!(node_of(primary_port), done["new_primary"].as_str().unwrap());

    // A follower member of the monitor group stops (SIGTERM): reported, and nothing else
    // stops with it.
    let (ok, text) = cli(&["--json", "monitor", "status"], true);
    assert!(ok, "monitor status: {text}");
    let status: serde_json::Value = serde_json::from_str(&text).expect("monitor status JSON");
    let leader = status["leader"].as_u64();
    let follower = (1..=3u64).find(|i| Some(*i) != leader).unwrap();
    let pid_of = |name: &str| -> i32 {
        let pids: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("local.json")).unwrap())
                .unwrap();
        pids["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["pid"].as_i64())
            .unwrap_or_else(|| panic!("{name} not in local.json: {pids}")) as i32
    };
    let member = format!("monitor{follower}");
    kill(Pid::from_raw(pid_of(&member)), Signal::SIGTERM).unwrap();
    wait_until(
        Duration::from_secs(30),
        "local up to report the member's exit",
        || up.output().contains(&format!("{member} (monitor, pid")),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", up.output()));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        up.proc.as_mut().unwrap().is_running(),
        "local up stopped after one follower member exited:\n{}",
        up.output()
    );

    // The primary's node dies: keeper and PostgreSQL SIGKILLed by `pgquorum local kill`.
    let old = node_of(primary_port);
    let out = std::process::Command::new(pgquorum_bin())
        .args(["local", "kill", &old, "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "local kill {old}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        Duration::from_secs(30),
        "local up to report the keeper's death",
        || {
            let o = up.output();
            o.contains(&format!("{old} (keeper, pid")) && o.contains("was killed by SIGKILL")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", up.output()));
    // Another node takes writes through the same printed URI, while `local up` runs on.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let new_port = loop {
        let attempt = async {
            let (c, conn) = uri
                .parse::<tokio_postgres::Config>()
                .ok()?
                .connect(NoTls)
                .await
                .ok()?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let write = c.execute("INSERT INTO t30 VALUES (21) ON CONFLICT DO NOTHING", &[]);
            tokio::time::timeout(Duration::from_secs(5), write)
                .await
                .ok()?
                .ok()?;
            let row = c.query_one("SELECT inet_server_port()", &[]).await.ok()?;
            Some(row.get::<_, i32>(0))
        };
        if let Some(port) = attempt.await {
            break port;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no node took writes after {old} died:\n{}\n{}",
            up.output(),
            up.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_ne!(
        new_port, primary_port,
        "the dead node cannot have taken the write"
    );
    assert!(
        up.proc.as_mut().unwrap().is_running(),
        "local up stopped after the primary's node died:\n{}",
        up.output()
    );
    wait_until(
        Duration::from_secs(30),
        "local up to show the new primary",
        || up.output().contains("the primary is now"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", up.output()));
    // `local status` shows which processes are dead.
    let out = std::process::Command::new(pgquorum_bin())
        .args(["--json", "local", "status", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let alive = |name: &str| {
        st["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["alive"] == true)
            .unwrap()
    };
    assert!(!alive(&old) && !alive(&member), "{st}");
    assert!(alive("monitor1") || alive("monitor2"), "{st}");

    // Ctrl-C: a clean stop of everything, exit status 0, every port released.
    up.signal(Signal::SIGINT);
    let mut p = up.proc.take().unwrap();
    wait_until(
        Duration::from_secs(90),
        "local up to exit after SIGINT",
        || !p.is_running(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", up.output()));
    assert_eq!(p.exit_code(), Some(0), "{}", up.output());
    assert!(up.output().contains("Stopped."), "{}", up.output());
    wait_until(Duration::from_secs(30), "every port to be released", || {
        up.ports().iter().all(|p| port_free(*p))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", up.output()));
    assert!(!dir.join("local.json").exists());

    // Started again on the same directory: same data, nothing initialised anew.
    let log2 = tmp.path().join("local-up-2.out");
    up = LocalUp::start(&dir, base, &log2);
    let uri = up.wait_up(0);
    let c = connect(&uri).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM t30", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 21, "rows committed before the restart");
    drop(c);

    // SIGKILLed, it cannot stop its cluster: `local down` does.
    let mut p = up.proc.take().unwrap();
    p.kill();
    assert!(
        up.ports().iter().any(|p| !port_free(*p)),
        "the cluster is expected to outlive a SIGKILLed local up"
    );
    let (ok, out) = up.down();
    assert!(ok, "local down failed: {out}");
    wait_until(Duration::from_secs(30), "every port to be released", || {
        up.ports().iter().all(|p| port_free(*p))
    })
    .unwrap_or_else(|e| panic!("{e}\nlocal down said: {out}"));
    assert!(!dir.join("local.json").exists());

    // Nothing is left to stop: `local down` says so instead of pretending.
    let (ok, out) = up.down();
    assert!(!ok, "local down on a stopped cluster should fail: {out}");
    assert!(out.contains("nothing to stop"), "{out}");
}
