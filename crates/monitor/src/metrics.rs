//! `/metrics` in Prometheus text format, served on the member's gRPC port.

use std::fmt::Write;

use openraft::ServerState;

use crate::member::Member;
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
    out
}
