//! A keeper SIGKILLed in the middle of a transition, started again, ends in the same
//! state as one that was never interrupted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

mod common;
use common::*;

/// Starts the keeper, SIGKILLs it as soon as its log shows `marker`, then runs it again
/// to `goal`.
async fn kill_at_then_finish(
    spec: &NodeSpec,
    goal: &str,
    extra: &[String],
    marker: &str,
) -> Keeper {
    let mut k = apply(spec, goal, extra);
    wait_for(
        &format!("{marker:?} in the log of {}", spec.name),
        Duration::from_secs(60),
        || {
            let seen = k.log_text().contains(marker);
            async move { seen.then_some(()) }
        },
    )
    .await;
    k.kill();
    wait_postgres_gone(spec).await;
    let mut k = apply(spec, goal, extra);
    wait_state(spec, &mut k, goal).await;
    k
}

fn sibling(spec: &NodeSpec, suffix: &str) -> std::path::PathBuf {
    let mut s = spec.pgdata().into_os_string();
    s.push(".");
    s.push(suffix);
    s.into()
}

#[tokio::test]
async fn every_transition_survives_a_sigkill_in_its_middle() {
    let dir = PgDir::new();
    let a = NodeSpec::new("a", dir.path());
    let b = NodeSpec::new("b", dir.path());

    // initdb interrupted: the half-made directory is discarded and made again.
    let ka = kill_at_then_finish(
        &a,
        "single",
        &["--peer".into(), b.peer_arg()],
        "step=\"initdb\"",
    )
    .await;
    write(&a, "a1").await.unwrap();
    assert!(!sibling(&a, "pgquorum-new").exists());

    // Make the clone take long enough to be caught in its middle.
    {
        let c = a.connect().await.unwrap();
        c.batch_execute("CREATE TABLE big AS SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 200000) g")
            .await
            .unwrap();
    }

    // pg_basebackup interrupted: the partial copy never becomes --pgdata.
    let standby_of_a = [
        "--primary".to_string(),
        a.peer_arg(),
        "--peer".into(),
        a.peer_arg(),
    ];
    let kb = kill_at_then_finish(&b, "secondary", &standby_of_a, "step=\"basebackup\"").await;
    wait_rows(&b, &["a1"]).await;
    assert!(!sibling(&b, "pgquorum-new").exists());
    assert!(!sibling(&b, "pgquorum-old").exists());
    drop(kb);
    wait_postgres_gone(&b).await;

    // The old primary is gone (its keeper died: its postgres with it).
    drop(ka);
    wait_postgres_gone(&a).await;

    // Promotion interrupted: promoted exactly once (one new timeline).
    let _kb = kill_at_then_finish(
        &b,
        "primary",
        &["--peer".into(), a.peer_arg()],
        "step=\"promote\"",
    )
    .await;
    assert!(!in_recovery(&b).await);
    let tl = timeline(&b).await;
    assert!(tl == 2, "one promotion, one new timeline; got {tl}");
    write(&b, "b1").await.unwrap();

    // Demotion + rewind interrupted: a ends as b's standby with b's history.
    let standby_of_b = [
        "--primary".to_string(),
        b.peer_arg(),
        "--peer".into(),
        b.peer_arg(),
    ];
    let _ka = kill_at_then_finish(&a, "secondary", &standby_of_b, "step=\"rewind\"").await;
    wait_rows(&a, &["a1", "b1"]).await;
    assert_eq!(timeline(&a).await, 2);
}
