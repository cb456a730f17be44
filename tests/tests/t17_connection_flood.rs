//! A flood of idle connections to the monitor leader (what once stopped its Raft core
//! with "Too many open files"): the group keeps its leader, keepers keep their leases,
//! the primary keeps taking writes, and the monitor answers as soon as the flood ends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use pgquorum_tests::cluster::{primary_of, Cluster};

/// At most 20,000, and what the machine's open-file limit leaves to this process.
const MAX_FLOOD: u64 = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_idle_connections_cost_no_lease() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let flood_size = MAX_FLOOD.min(hard.saturating_sub(1_500));
    if flood_size < 5_000 {
        eprintln!("SKIPPED t17: the open-file hard limit ({hard}) leaves no room for a flood");
        return;
    }
    let flood_size = usize::try_from(flood_size).unwrap();

    let c = Cluster::start(3).await;
    let primary = c.primary().await;
    let leader = c.monitors.wait_leader(Duration::from_secs(10)).await;
    let target = c.monitors.addr(leader);
    let w = c.writer();
    w.wait_progress(50, "before the flood").await;

    // Keep up to `flood_size` idle connections open for 15 s (longer, up to 60 s, until
    // that many were opened: a loaded machine connects slowly); reopen what the server
    // closes.
    let min_until = Instant::now() + Duration::from_secs(15);
    let stop_at = Instant::now() + Duration::from_secs(60);
    let flood = tokio::spawn(async move {
        let mut held = Vec::with_capacity(flood_size);
        let mut opened = 0usize;
        while Instant::now() < stop_at && (Instant::now() < min_until || opened < flood_size) {
            while held.len() < flood_size && Instant::now() < stop_at {
                match tokio::time::timeout(
                    Duration::from_millis(200),
                    tokio::net::TcpStream::connect(&target),
                )
                .await
                {
                    Ok(Ok(s)) => {
                        held.push(s);
                        opened += 1;
                    }
                    _ => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Drop what the server closed (a read of 0 bytes), so it is reopened.
            held.retain(|s| {
                let mut b = [0u8; 1];
                !matches!(s.try_read(&mut b), Ok(0))
            });
        }
        opened
    });
    w.wait_progress(100, "during the flood").await;
    let opened = flood.await.unwrap();
    assert!(
        opened >= flood_size,
        "the flood opened only {opened} connections"
    );

    w.wait_progress(50, "after the flood").await;
    let ns = c.wait_healthy(2).await;
    assert_eq!(
        primary_of(&ns).as_deref(),
        Some(primary.as_str()),
        "a lease was lost during the flood\n{}",
        c.logs()
    );
    let log = c.monitors.log(leader);
    assert!(
        !log.contains("Too many open files") || !log.contains("fatal"),
        "the leader ran out of file descriptors:\n{log}"
    );
    let (ok, out) = c.cli(&["monitor", "status"]);
    assert!(ok, "{out}");
    let acked = w.stop().await;
    c.assert_rows_on(&primary, &acked).await;
}
