//! Thousands of idle connections to a keeper's HTTP port (issue 12): the health probes
//! must go on answering. The keeper's file-descriptor limit is lowered to 1024 so that
//! the flood exceeds it, as 21,000 connections exceeded the default one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::time::Duration;

mod common;
use common::*;

const IDLE_CONNECTIONS: usize = 3000;

#[tokio::test]
async fn idle_connections_do_not_stop_the_probes() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let mut k = apply(&a, "single", &[]);
    wait_state(&a, &mut k, "single").await;
    let pid = k.pid().unwrap();
    // As the keeper's own user: lowering one's own limit needs no capability.
    let lowered = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", "prlimit", "--pid"])
        .args([&pid.to_string(), "--nofile=1024:1024"])
        .output()
        .unwrap();
    assert!(
        lowered.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&lowered.stderr)
    );

    // Connect and send nothing; hold them all. A server that stops accepting shows as
    // connects timing out once its backlog is full: stop trying then.
    let addr = a.http;
    let held: Vec<TcpStream> = tokio::task::spawn_blocking(move || {
        let mut held = Vec::new();
        let mut failed_in_a_row = 0;
        while held.len() < IDLE_CONNECTIONS && failed_in_a_row < 20 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(50)) {
                Ok(s) => {
                    held.push(s);
                    failed_in_a_row = 0;
                }
                Err(_) => failed_in_a_row += 1,
            }
        }
        held
    })
    .await
    .unwrap();
    assert!(
        held.len() > 1024,
        "the flood did not exceed the keeper's descriptor limit: {} connections",
        held.len()
    );

    // Every probe answers while the idle connections are still open.
    for i in 0..20 {
        let answer = a.http_get("/health");
        assert!(
            matches!(answer, Some((200, _))),
            "probe {i} with {} idle connections open: {answer:?}",
            held.len()
        );
    }
    let (code, _) = a.http_get("/primary").unwrap();
    assert_eq!(code, 200);
    assert!(k.try_wait().is_none(), "the keeper keeps running");
    drop(held);
}
