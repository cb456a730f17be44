//! Keeper benchmark: time from SIGKILL of the postmaster to postgres committing again
//! under the keeper, and the keeper's steady-state RSS.
//!
//! Run as root (processes run as `postgres`), after building the binary:
//!   cargo build --release -p pgquorum
//!   cargo bench -p pgquorum-keeper --bench keeper_restart
//! PGQUORUM_BIN overrides the binary (default: target/release/pgquorum, else debug).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pgquorum_testkit::postgres::*;

const RUNS: usize = 9;

fn binary() -> PathBuf {
    if let Some(b) = std::env::var_os("PGQUORUM_BIN") {
        return b.into();
    }
    let release = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/pgquorum");
    if release.is_file() {
        release
    } else {
        pgquorum_bin()
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

async fn commit(spec: &NodeSpec) -> bool {
    let Ok(c) = spec.connect().await else {
        return false;
    };
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS bench (t timestamptz); INSERT INTO bench VALUES (now())",
    )
    .await
    .is_ok()
}

fn spawn(bin: &std::path::Path, sub: &str, args: &[String], log: &std::path::Path) -> Keeper {
    Keeper::spawn_with(bin, sub, args, log)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let bin = binary();
    println!("binary: {}", bin.display());
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let mut args = a.args();
    args.extend(["--goal".to_string(), "single".to_string()]);
    let k = spawn(&bin, "apply", &args, &a.keeper_log());
    // The transition must be over (not just postgres up) before the first kill.
    wait_for("the primary", Duration::from_secs(60), || async {
        let (_, body) = a.http_get("/primary")?;
        let h: serde_json::Value = serde_json::from_str(&body).ok()?;
        (h["state"] == "single" && h["in_transition"] == false && commit(&a).await).then_some(())
    })
    .await;

    let mut times = Vec::new();
    for _ in 0..RUNS {
        let pid = a.postmaster_pid().unwrap();
        let t0 = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        loop {
            if commit(&a).await {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no recovery:\n{}",
                k.log_text()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(t0.elapsed());
        // Let the new postmaster settle (checkpointer, autovacuum launcher) before the next kill.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "restart after postmaster SIGKILL: runs={RUNS} median={:.0} ms min={:.0} ms max={:.0} ms",
        ms(times[RUNS / 2]),
        ms(times[0]),
        ms(times[RUNS - 1])
    );

    // Steady state: probes and metrics scraped meanwhile, as a load balancer would.
    let kpid = k.pid().unwrap();
    let mut samples = Vec::new();
    for _ in 0..20 {
        let _ = a.http_get("/primary");
        let _ = a.http_get("/metrics");
        samples.push(rss_kib(kpid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let max = samples.iter().max().unwrap();
    println!(
        "keeper RSS (apply mode, postgres primary, probes scraped): max {:.1} MiB over 2 s",
        *max as f64 / 1024.0
    );
    drop(k);
    wait_for("postgres to stop", Duration::from_secs(15), || async {
        a.postmaster_pid().is_none().then_some(())
    })
    .await;

    // run mode: the gRPC client is active (the monitor group is unreachable here).
    let b = NodeSpec::new("b", dir.path());
    let closed = free_port();
    let mut args = b.args();
    args.extend(["--monitor".to_string(), format!("127.0.0.1:{closed}")]);
    let k = spawn(&bin, "run", &args, &b.keeper_log());
    wait_for("keeper b's HTTP", Duration::from_secs(20), || async {
        b.http_get("/liveness").map(|_| ())
    })
    .await;
    let mut samples = Vec::new();
    for _ in 0..20 {
        let _ = b.http_get("/metrics");
        samples.push(rss_kib(k.pid().unwrap()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let max = samples.iter().max().unwrap();
    println!(
        "keeper RSS (run mode, gRPC heartbeats retrying): max {:.1} MiB over 2 s",
        *max as f64 / 1024.0
    );
}
