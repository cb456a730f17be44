//! `/metrics` in Prometheus text format, served on the member's `--metrics-listen` address (plain HTTP).

use std::collections::BTreeMap;
use std::fmt::Write;

use openraft::ServerState;

use crate::member::{now_ms, Member};
use crate::types::Raft;

pub async fn render(raft: &Raft, member: &Member) -> String {
    let m = raft.metrics().borrow().clone();
    let committed = raft
        .with_raft_state(|st| st.committed.map(|l| l.index))
        .await
        .ok()
        .flatten();
    let mut out = String::new();
    let id = member.id;
    let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{member=\"{id}\"}} {value}"
        );
    };
    gauge(
        &mut out,
        "pgquorum_monitor_term",
        "Current Raft term.",
        m.current_term,
    );
    gauge(
        &mut out,
        "pgquorum_monitor_is_leader",
        "1 when this member leads the group.",
        u64::from(m.state == ServerState::Leader),
    );
    gauge(
        &mut out,
        "pgquorum_monitor_leader",
        "Id of the leader this member knows (0 = none).",
        m.current_leader.unwrap_or(0),
    );
    gauge(
        &mut out,
        "pgquorum_monitor_last_log_index",
        "Last Raft log index.",
        m.last_log_index.unwrap_or(0),
    );
    gauge(
        &mut out,
        "pgquorum_monitor_committed_index",
        "Committed Raft log index.",
        committed.unwrap_or(0),
    );
    gauge(
        &mut out,
        "pgquorum_monitor_applied_index",
        "Raft log index applied to the cluster state.",
        m.last_applied.map(|l| l.index).unwrap_or(0),
    );
    if let Some(rep) = &m.replication {
        let last = m.last_log_index.unwrap_or(0);
        let _ = writeln!(out, "# HELP pgquorum_monitor_member_lag Entries a member is behind the leader's log.\n# TYPE pgquorum_monitor_member_lag gauge");
        for (peer, matched) in rep {
            let lag = last.saturating_sub(matched.map(|l| l.index).unwrap_or(0));
            let _ = writeln!(
                out,
                "pgquorum_monitor_member_lag{{member=\"{id}\",peer=\"{peer}\"}} {lag}"
            );
        }
    }
    cluster_metrics(&mut out, member, m.current_term);
    out
}

/// Escapes a label value (node and formation names are validated, but a metrics page
/// must stay parseable whatever they hold).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What the cluster state says (every member: the applied state), and on the leader
/// the age of each keeper's last heartbeat.
fn cluster_metrics(out: &mut String, member: &Member, term: u64) {
    let id = member.id;
    let mut by_state: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    let mut timelines = Vec::new();
    let mut names = BTreeMap::new();
    {
        let applied = member.read();
        for n in applied.state.nodes.values() {
            *by_state
                .entry((n.formation.clone(), n.reported_state.as_str()))
                .or_default() += 1;
            timelines.push((n.formation.clone(), n.name.clone(), n.timeline));
            names.insert(n.id, (n.formation.clone(), n.name.clone()));
        }
    }
    let _ = writeln!(out, "# HELP pgquorum_monitor_nodes Nodes by reported state.\n# TYPE pgquorum_monitor_nodes gauge");
    for ((formation, state), count) in &by_state {
        let _ = writeln!(
            out,
            "pgquorum_monitor_nodes{{member=\"{id}\",formation=\"{}\",state=\"{state}\"}} {count}",
            label(formation)
        );
    }
    // Every promotion starts a new timeline: a change of the highest timeline of a
    // formation is a failover or switchover.
    let _ = writeln!(out, "# HELP pgquorum_monitor_node_timeline PostgreSQL timeline each node last reported; it grows by one per promotion.\n# TYPE pgquorum_monitor_node_timeline gauge");
    for (formation, node, tli) in &timelines {
        let _ = writeln!(
            out,
            "pgquorum_monitor_node_timeline{{member=\"{id}\",formation=\"{}\",node=\"{}\"}} {tli}",
            label(formation),
            label(node)
        );
    }
    // Only the leader hears heartbeats; a table from an earlier term is stale.
    let now = now_ms();
    let h = member.health.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, table)) = h.as_ref().filter(|(t, _)| *t == term) {
        let _ = writeln!(out, "# HELP pgquorum_monitor_node_heartbeat_age_seconds Seconds since the leader last heard each keeper (leader only; absent = not heard since it took office).\n# TYPE pgquorum_monitor_node_heartbeat_age_seconds gauge");
        for (node, (formation, name)) in &names {
            if let Some(ago) = table.last_seen_ago(*node, now) {
                let _ = writeln!(
                    out,
                    "pgquorum_monitor_node_heartbeat_age_seconds{{member=\"{id}\",formation=\"{}\",node=\"{}\"}} {:.3}",
                    label(formation),
                    label(name),
                    ago as f64 / 1000.0
                );
            }
        }
    }
}
