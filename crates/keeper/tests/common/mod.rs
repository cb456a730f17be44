#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::time::Duration;

pub use pgquorum_testkit::postgres::*;

/// Starts `pgquorum keeper apply --goal GOAL` for `spec` with extra arguments.
pub fn apply(spec: &NodeSpec, goal: &str, extra: &[String]) -> Keeper {
    let mut args = spec.args();
    args.push("--goal".into());
    args.push(goal.into());
    args.extend(extra.iter().cloned());
    Keeper::spawn("apply", &args, &spec.keeper_log())
}

/// The JSON of `GET /health`.
pub fn health(spec: &NodeSpec) -> Option<serde_json::Value> {
    let (_, body) = spec.http_get("/health")?;
    serde_json::from_str(&body).ok()
}

/// Waits until the keeper reports `state` as reached; panics with its log if it exits.
pub async fn wait_state(spec: &NodeSpec, k: &mut Keeper, state: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(st) = k.try_wait() {
            panic!("keeper {} exited ({st}):\n{}", spec.name, k.log_text());
        }
        if let Some(h) = health(spec) {
            // A restarted keeper reports the state of its state file before it has
            // started postgres again: where postgres must run, wait for it too.
            let pg_down_state = matches!(
                state,
                "init"
                    | "wait_standby"
                    | "demoted"
                    | "draining"
                    | "demote_timeout"
                    | "prepare_maintenance"
                    | "wait_maintenance"
                    | "maintenance"
                    | "dropped"
            );
            if h["state"] == state
                && h["goal_state"] == state
                && h["in_transition"] == false
                && (pg_down_state || h["pg_up"] == true)
            {
                return;
            }
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "keeper {} did not reach {state}:\n{}",
                spec.name,
                k.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn write(spec: &NodeSpec, v: &str) -> Result<(), tokio_postgres::Error> {
    let c = spec.connect().await?;
    c.batch_execute("CREATE TABLE IF NOT EXISTS t (v text)")
        .await?;
    c.execute("INSERT INTO t VALUES ($1)", &[&v]).await?;
    Ok(())
}

pub async fn rows(spec: &NodeSpec) -> Vec<String> {
    let c = spec.connect().await.unwrap();
    c.query("SELECT v FROM t ORDER BY v", &[])
        .await
        .map(|r| r.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default()
}

pub async fn wait_rows(spec: &NodeSpec, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(
        &format!("rows {want:?} on {}", spec.name),
        Duration::from_secs(30),
        || {
            let want = want.clone();
            async move { (rows(spec).await == want).then_some(()) }
        },
    )
    .await;
}

pub async fn in_recovery(spec: &NodeSpec) -> bool {
    let c = spec.connect().await.unwrap();
    c.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0)
}

pub async fn timeline(spec: &NodeSpec) -> u32 {
    wait_for(
        "the keeper's observation",
        Duration::from_secs(5),
        || async { health(spec).and_then(|h| h["timeline"].as_u64()) },
    )
    .await as u32
}

pub async fn system_identifier(spec: &NodeSpec) -> i64 {
    let c = spec.connect().await.unwrap();
    c.query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until nothing runs on the node's data directory any more.
pub async fn wait_postgres_gone(spec: &NodeSpec) {
    wait_for(
        &format!("postgres of {} to stop", spec.name),
        Duration::from_secs(15),
        || async { spec.postmaster_pid().is_none().then_some(()) },
    )
    .await;
}

/// HTTP status codes of the probe endpoints, in a fixed order.
pub fn probes(spec: &NodeSpec) -> Vec<(&'static str, u16)> {
    [
        "/primary",
        "/read-write",
        "/replica",
        "/read-only",
        "/health",
        "/liveness",
    ]
    .into_iter()
    .map(|p| (p, spec.http_get(p).map(|(c, _)| c).unwrap_or(0)))
    .collect()
}

/// The probes answer within a few heartbeats of a change: wait for `want`, with a deadline.
pub fn expect_probes(spec: &NodeSpec, want: [u16; 6]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = probes(spec);
        let codes: Vec<u16> = got.iter().map(|(_, c)| *c).collect();
        if codes == want.to_vec() {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!("probes of {}: got {got:?}, want {want:?}", spec.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
