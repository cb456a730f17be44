//! How `perform switchover|failover` ends: following the operation after the monitor
//! accepted it, showing the monitor's events as they come, and ending with the result —
//! the new primary, the old primary's state and the write pause measured here — or,
//! the moment the monitor gives up (the old primary is given a writable goal again
//! with no other node promoted), with the reason from its events.

use std::time::{Duration, Instant};

use anyhow::Result;
use pgquorum_api::client::MonitorClient;
use pgquorum_api::pb::monitor as pb;
use pgquorum_core::NodeState;
use serde_json::json;

use crate::exit::{fail, Kind};
use crate::ops_cmd::{client_error, get_state, node_json, print_state, Target};

/// How often the state is read while waiting: the resolution of the write pause.
const POLL: Duration = Duration::from_millis(100);
/// Events are read less often: they are progress for the reader, not the measurement.
const EVENTS_EVERY: Duration = Duration::from_millis(500);

fn state_of(s: &str) -> Option<NodeState> {
    NodeState::parse(s)
}

fn writable(s: &str) -> bool {
    state_of(s).is_some_and(NodeState::is_writable)
}

/// Takes writes that are acknowledged: `primary`, or `single` with no standby to wait
/// for. `wait_primary` is writable but, with synchronous replication, commits wait for
/// a standby, so the pause is not over yet.
fn taking_writes(s: &str) -> bool {
    matches!(state_of(s), Some(NodeState::Primary | NodeState::Single))
}

/// What the operation asked for.
/// One line of a wait's progress: every node's reported → goal state.
pub(crate) fn progress_line(nodes: &[pb::NodeStatus]) -> String {
    nodes
        .iter()
        .map(|n| format!("{} {}→{}", n.name, n.reported_state, n.goal_state))
        .collect::<Vec<_>>()
        .join(", ")
}

pub struct Operation {
    /// "switchover" or "failover".
    pub kind: &'static str,
    pub old_primary: Option<String>,
    pub candidate: Option<String>,
    pub timeout: u64,
}

async fn events(client: &MonitorClient, formation: &str, limit: u32) -> Result<Vec<pb::Event>> {
    let req = pb::GetEventsRequest {
        formation: formation.to_owned(),
        limit,
    };
    Ok(client
        .call(|mut raw| {
            let req = req.clone();
            async move { raw.get_events(req).await }
        })
        .await
        .map_err(|e| client_error("cannot read events", e))?
        .events)
}

/// Follows the operation the monitor accepted (`reply`) until it is done, abandoned or
/// `op.timeout` has passed, and prints the outcome.
pub async fn follow(
    client: &MonitorClient,
    target: &Target,
    reply: &pb::OperationReply,
    op: Operation,
) -> Result<()> {
    let start = Instant::now();
    if !target.json {
        eprintln!("{}; waiting for a new primary...", reply.description);
    }
    // The events already there (the operation's own first steps included, which the
    // reply's description sums up) are the baseline; later ones are shown as they come.
    let mut last_event = events(client, &target.formation, 20)
        .await
        .ok()
        .and_then(|e| e.iter().map(|e| e.id).max())
        .unwrap_or(0);
    let mut since_start: Vec<pb::Event> = Vec::new();
    let mut events_read = Instant::now();
    let mut last_line = String::new();
    let mut old_left_writable = false;
    let mut pause_end: Option<(String, Duration)> = None;
    let mut promoted_at: Option<Duration> = None;
    let mut said_error = false;
    let deadline = Duration::from_secs(op.timeout);
    loop {
        let nodes = match get_state(client, &target.formation).await {
            Ok(s) => s.nodes,
            Err(e) if start.elapsed() < deadline => {
                if !said_error && !target.json {
                    eprintln!("  ({e:#}; retrying)");
                    said_error = true;
                }
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let at = start.elapsed();
        if events_read.elapsed() >= EVENTS_EVERY {
            events_read = Instant::now();
            if let Ok(evs) = events(client, &target.formation, 50).await {
                let seen = last_event;
                for e in evs.into_iter().filter(|e| e.id > seen) {
                    last_event = last_event.max(e.id);
                    if !target.json {
                        eprintln!(
                            "  [{:>5.1}s] event: {}{}",
                            at.as_secs_f64(),
                            if e.node_name.is_empty() {
                                String::new()
                            } else {
                                format!("{}: ", e.node_name)
                            },
                            e.description
                        );
                    }
                    since_start.push(e);
                }
            }
        }
        if !nodes.is_empty() {
            let line = progress_line(&nodes);
            if line != last_line && !target.json {
                eprintln!("[{:>5.1}s] {line}", at.as_secs_f64());
                last_line = line;
            }
            let old = op
                .old_primary
                .as_ref()
                .and_then(|o| nodes.iter().find(|n| &n.name == o));
            let promoted = nodes.iter().find(|n| {
                Some(&n.name) != op.old_primary.as_ref()
                    && writable(&n.goal_state)
                    && op.candidate.as_ref().is_none_or(|c| &n.name == c)
            });
            if let Some(o) = old {
                if !writable(&o.goal_state) {
                    old_left_writable = true;
                } else if old_left_writable && promoted.is_none() {
                    // The monitor put the old primary back: the operation is over. Its
                    // reason is in the events that did it: read them now, not at the
                    // next half second.
                    if let Ok(evs) = events(client, &target.formation, 50).await {
                        let seen = last_event;
                        since_start.extend(evs.into_iter().filter(|e| e.id > seen));
                    }
                    // The old primary's own last assignment says why; else the last few.
                    let why: Vec<String> =
                        match since_start.iter().rev().find(|e| e.node_name == o.name) {
                            Some(e) => vec![e.description.clone()],
                            None => since_start
                                .iter()
                                .rev()
                                .take(3)
                                .rev()
                                .map(|e| {
                                    format!("{} {}", e.node_name, e.description)
                                        .trim()
                                        .to_owned()
                                })
                                .collect(),
                        };
                    return Err(fail(
                        Kind::NotAllowed,
                        format!(
                            "the monitor abandoned the {} after {:.1} s: {} is the primary again{}",
                            op.kind,
                            at.as_secs_f64(),
                            o.name,
                            if why.is_empty() {
                                " (see `pgquorum show events`)".to_owned()
                            } else {
                                format!("; the monitor said: {}", why.join("; "))
                            }
                        ),
                    ));
                }
            }
            if let Some(p) = promoted {
                if promoted_at.is_none() && writable(&p.reported_state) {
                    promoted_at = Some(at);
                }
                if pause_end.is_none() && taking_writes(&p.reported_state) {
                    pause_end = Some((p.name.clone(), at));
                }
            }
            if let (Some(p), Some(_)) = (promoted, &pause_end) {
                // Done when the new primary is settled and every node whose keeper is
                // heard from has reached its goal (the old primary rejoined as a
                // standby); a node whose keeper is silent (dead, after a failover) does
                // not hold the result back: its state is part of the result.
                let alive_settled = nodes
                    .iter()
                    .filter(|n| n.health == "healthy")
                    .all(|n| n.reported_state == n.goal_state);
                if p.reported_state == "primary" && p.goal_state == "primary" && alive_settled {
                    let times = Times {
                        promoted: promoted_at,
                        primary: pause_end.as_ref().map(|(_, d)| *d),
                    };
                    return print_done(target, reply, &op, p, old, times, &nodes);
                }
            }
        }
        if start.elapsed() > deadline {
            let pending: Vec<String> = nodes
                .iter()
                .filter(|n| n.reported_state != n.goal_state)
                .map(|n| format!("{} is {} (goal {})", n.name, n.reported_state, n.goal_state))
                .collect();
            return Err(fail(
                Kind::TimedOut,
                format!(
                    "timed out after {} s waiting for the {} to finish; still pending: {}",
                    op.timeout,
                    op.kind,
                    if pending.is_empty() {
                        "no single primary yet".to_string()
                    } else {
                        pending.join(", ")
                    }
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// When, counted from the monitor's acceptance, the new primary was first seen
/// promoted (a writable state) and first seen as `primary`. With synchronous
/// replication, commits resume once a standby is in sync, between the two: the second
/// is an upper bound of the write pause (give or take a poll).
struct Times {
    promoted: Option<Duration>,
    primary: Option<Duration>,
}

fn print_done(
    target: &Target,
    reply: &pb::OperationReply,
    op: &Operation,
    new: &pb::NodeStatus,
    old: Option<&pb::NodeStatus>,
    times: Times,
    nodes: &[pb::NodeStatus],
) -> Result<()> {
    let pause_ms = times.primary.map(|d| d.as_millis() as u64);
    let promoted_ms = times.promoted.map(|d| d.as_millis() as u64);
    if target.json {
        let v = json!({
            "result": "done",
            "operation": op.kind,
            "new_primary": new.name,
            "old_primary": old.map(|o| json!({
                "name": o.name, "reported_state": o.reported_state, "goal_state": o.goal_state,
                "pg_running": o.pg_running, "health": o.health,
            })),
            "write_pause_ms": pause_ms,
            "promoted_after_ms": promoted_ms,
            "log_index": reply.log_index,
            "description": reply.description,
            "nodes": nodes.iter().map(node_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match &op.old_primary {
        Some(o) => println!(
            "{} done: {} is the primary now (was {o})",
            op.kind, new.name
        ),
        None => println!("{} done: {} is the primary now", op.kind, new.name),
    }
    if let Some(o) = old {
        let alive = if !o.pg_running {
            ", PostgreSQL not running"
        } else if o.health != "healthy" {
            ", keeper not heard from"
        } else {
            ""
        };
        println!(
            "  old primary {}: {} (goal {}){alive}",
            o.name, o.reported_state, o.goal_state
        );
    }
    if let Some(ms) = pause_ms {
        let promoted = promoted_ms
            .map(|p| format!("promoted after {:.1} s, ", p as f64 / 1000.0))
            .unwrap_or_default();
        println!(
            "  write pause: at most {:.1} s ({} {promoted}taking writes as primary after {:.1} s, counted from the monitor's acceptance of the {}; polled every {} ms)",
            ms as f64 / 1000.0,
            new.name,
            ms as f64 / 1000.0,
            op.kind,
            POLL.as_millis()
        );
    }
    print_state(nodes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_taken_only_as_primary_or_single() {
        assert!(taking_writes("primary") && taking_writes("single"));
        assert!(!taking_writes("wait_primary") && !taking_writes("draining"));
        assert!(writable("wait_primary") && !writable("demoted") && !writable("nonsense"));
    }
}
