//! The operator's commands over the Monitor API: `show`, `perform`, `enable`/`disable`,
//! `set`, `drop`. Each takes `--monitor HOST:PORT,...` (or `PGQUORUM_MONITOR`) and
//! `--json`; commands that change the cluster and then wait show progress and end
//! with the resulting state, or a timeout error naming what is still pending.

use std::time::{Duration, Instant};

use crate::trust_args::{TrustArgs, Who};
use anyhow::{bail, Context, Result};
use pgquorum_api::client::{ClientError, MonitorClient};
use pgquorum_api::pb::monitor as pb;
use pgquorum_core::{ErrorClass, Lsn};
use serde_json::json;

#[derive(clap::Args, Clone)]
pub struct Target {
    /// Monitor members to talk to (any member answers; writes are forwarded to the leader).
    #[arg(long, env = "PGQUORUM_MONITOR", value_delimiter = ',', global = true)]
    pub monitor: Vec<String>,
    /// Set from the global --json (main.rs).
    #[arg(skip)]
    pub json: bool,
    /// The formation (a cluster of nodes the monitor group manages).
    #[arg(long, default_value = "default", global = true)]
    pub formation: String,
}

#[derive(clap::Subcommand)]
pub enum ShowWhat {
    /// Every node: reported and goal state, live LSN, timeline, health, role, synchronous
    /// role and replication lag of each standby, and the age of the data. Exits with
    /// code 8 when the view is stale (no leader answered, or the leader has no quorum).
    ///
    /// Example: `pgquorum show state --watch 1`
    State {
        /// Refresh in place every SECS seconds (default 2) until interrupted; with
        /// --json, one JSON document per line per refresh.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
    /// The event history: what changed, when, why and who asked for it.
    ///
    /// Example: `pgquorum show events --limit 20 --follow`
    Events {
        /// How many of the latest events to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Keep running and print every new event as the monitor group records it
        /// (with --json, one JSON object per line).
        #[arg(long)]
        follow: bool,
    },
    /// Failovers and switchovers: when, old and new primary, why, and how long writes
    /// paused (from the old primary leaving writable to the new one taking writes).
    ///
    /// Example: `pgquorum show history --json`
    History,
    /// libpq multi-host connection URIs (read-write and read-only).
    Uri {
        /// Database name in the URIs.
        #[arg(long, default_value = "postgres")]
        dbname: String,
        /// User name in the URIs.
        #[arg(long, default_value = "postgres")]
        user: String,
        /// Print only this URI, bare (for `psql "$(pgquorum show uri --role rw)"`).
        #[arg(long)]
        role: Option<crate::cli::UriRole>,
    },
    /// Formation and node settings.
    Settings,
}

#[derive(clap::Subcommand)]
pub enum PerformWhat {
    /// Planned switchover: the primary hands over to a standby, losing nothing.
    Switchover {
        /// The node to promote (default: the monitor's choice).
        #[arg(long)]
        candidate: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Fail over now, as if the primary had died (it is demoted first when reachable).
    Failover {
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Rebuild a standby from the primary: its keeper replaces the data directory with
    /// a fresh base backup, then it catches up and is a secondary again. Refused on the
    /// primary, and on the only standby that synchronous commit can use under
    /// `on-quorum-loss block`.
    ///
    /// Example: `pgquorum perform reinit --node node3`
    Reinit {
        /// The standby to rebuild.
        #[arg(long, value_name = "NAME")]
        node: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(clap::Args, Clone, Copy)]
pub struct WaitArgs {
    /// The group of nodes in the formation (0 unless the formation is sharded).
    #[arg(long, default_value_t = 0)]
    pub group: u32,
    /// Seconds to wait for the cluster to settle.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Return as soon as the monitor accepted the operation.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(clap::Subcommand)]
pub enum ToggleWhat {
    /// Maintenance: failover decisions leave the node out and its keeper lets go of
    /// PostgreSQL (a standby keeps streaming until you stop it).
    Maintenance {
        /// The node's name (its keeper's --name).
        #[arg(long)]
        node: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(clap::Subcommand)]
pub enum SetWhat {
    /// `set node NAME candidate-priority N` or `set node NAME replication-quorum true|false`.
    Node {
        /// The node's name.
        name: String,
        /// candidate-priority or replication-quorum.
        setting: String,
        /// The new value.
        value: String,
    },
    /// `set formation number-sync-standbys N` (also lease-ms, lease-margin-ms,
    /// heartbeat-interval-ms, on-quorum-loss block|continue).
    Formation {
        /// number-sync-standbys, lease-ms, lease-margin-ms, heartbeat-interval-ms or
        /// on-quorum-loss.
        setting: String,
        /// The new value.
        value: String,
    },
}

#[derive(clap::Subcommand)]
pub enum DropWhat {
    /// Remove a node from the cluster: its keeper stops its PostgreSQL, confirms and
    /// exits, and the monitor group forgets the node (at once when its keeper is silent
    /// for a lease and its margin). The name can then be registered again.
    ///
    /// Example: `pgquorum drop node node3`
    Node {
        /// The node's name.
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// A client over every given member: follows leader hints and retries members that
/// answer UNAVAILABLE (an election, a member down) for a few seconds.
pub fn connect(endpoints: &[String], trust: &TrustArgs) -> Result<MonitorClient> {
    if endpoints.is_empty() {
        return Err(ClientError::NoEndpoints.into());
    }
    let security = trust.security(Who::Client)?;
    Ok(MonitorClient::new(endpoints.iter().cloned(), security)?
        .retry_for(Duration::from_secs(10))
        .give_up_unreachable_after(Duration::from_secs(1)))
}

/// One call through [`MonitorClient::call`]: `$req` is cloned for each attempt.
macro_rules! call {
    ($client:expr, $method:ident, $req:expr) => {{
        let req = $req;
        $client
            .call(|mut raw| {
                let req = req.clone();
                async move { raw.$method(req).await }
            })
            .await
    }};
}

/// Keeps the typed error (its gRPC code decides the exit code, crate::exit) under a
/// line that says what was being done; the client's message names the addresses tried
/// and the leader when known.
pub(crate) fn client_error(what: &str, e: ClientError) -> anyhow::Error {
    anyhow::Error::new(e).context(what.to_owned())
}

pub async fn get_state(client: &MonitorClient, formation: &str) -> Result<pb::GetStateReply> {
    call!(
        client,
        get_state,
        pb::GetStateRequest {
            formation: formation.to_string(),
            linearizable: false,
        }
    )
    .map_err(|e| client_error("cannot read the cluster state", e))
}

/// What a client can do on the node now, as far as the monitor knows. Never
/// read-write for a node whose keeper went silent, whose PostgreSQL is down, or that is
/// being demoted: those are exactly the moments an operator looks, and a dead old
/// primary shown beside the new one as read-write misleads.
fn role(n: &pb::NodeStatus) -> &'static str {
    const WRITABLE: [&str; 5] = [
        "single",
        "wait_primary",
        "primary",
        "join_primary",
        "apply_settings",
    ];
    if !n.pg_running {
        return "down";
    }
    // Unhealthy: the keeper went silent. Unknown: the answering member has no heartbeat
    // of it (a follower's stale view, a leader just elected): a primary it shows may
    // have been fenced since.
    if n.health != "healthy" {
        return "unknown";
    }
    let reported = n.reported_state.as_str();
    if WRITABLE.contains(&reported) {
        return if WRITABLE.contains(&n.goal_state.as_str()) {
            "read-write"
        } else {
            "demoting"
        };
    }
    match reported {
        "secondary" | "catchingup" | "wait_standby" | "report_lsn" | "fast_forward"
        | "join_secondary" | "prepare_promotion" => "read-only",
        _ => "none",
    }
}

/// A wire LSN as PostgreSQL writes it; 0 (unknown) as PostgreSQL writes no position,
/// `0/0`, which scripts reading `--json` have always seen.
fn lsn(l: u64) -> String {
    Lsn::new(l).map_or_else(|| "0/0".to_string(), |l| l.to_string())
}

/// The best LSN known for the node: the live one of its latest heartbeat when the
/// answering leader has it, else the one recorded at its last change of state.
fn best_lsn(n: &pb::NodeStatus) -> (u64, bool) {
    match n.current_lsn {
        Some(l) => (l, true),
        None => (n.reported_lsn, false),
    }
}

pub(crate) fn node_json(n: &pb::NodeStatus) -> serde_json::Value {
    let (best, live) = best_lsn(n);
    json!({
        "node_id": n.node_id, "formation": n.formation, "group": n.group_id, "name": n.name,
        "host": n.host, "port": n.port, "reported_state": n.reported_state,
        "goal_state": n.goal_state, "lsn": lsn(best), "lsn_live": live,
        "reported_lsn": lsn(n.reported_lsn), "current_lsn": n.current_lsn.map(lsn),
        "replayed_lsn": n.replayed_lsn.map(lsn), "timeline": n.timeline,
        "health": n.health, "role": role(n), "candidate_priority": n.candidate_priority,
        "replication_quorum": n.replication_quorum, "pg_running": n.pg_running,
        "last_heartbeat_ms_ago": n.last_heartbeat_ms_ago,
        "data_age_ms": n.last_heartbeat_ms_ago,
        "replication_state": (!n.replication_state.is_empty()).then_some(&n.replication_state),
        "sync_state": (!n.sync_state.is_empty()).then_some(&n.sync_state),
        "flush_lag_bytes": n.flush_lag_bytes, "replay_lag_bytes": n.replay_lag_bytes,
        "write_lag_ms": n.write_lag_ms, "flush_lag_ms": n.flush_lag_ms,
        "replay_lag_ms": n.replay_lag_ms,
    })
}

fn state_json(state: &pb::GetStateReply) -> serde_json::Value {
    let nodes: Vec<_> = state.nodes.iter().map(node_json).collect();
    json!({
        "nodes": nodes,
        "stale": state.stale,
        "stale_reason": (!state.stale_reason.is_empty()).then_some(&state.stale_reason),
        "answered_by": state.answered_by,
        "applied_index": state.applied_index,
    })
}

fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn fmt_age(ms: Option<u64>) -> String {
    match ms {
        Some(ms) if ms < 10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => format!("{}s", ms / 1000),
        None => "-".into(),
    }
}

/// The standby's synchronous role as its primary's pg_stat_replication says it, with
/// the replication state when it is not streaming.
fn sync_column(n: &pb::NodeStatus) -> String {
    match (n.sync_state.as_str(), n.replication_state.as_str()) {
        (_, "") => "-".into(),
        (s, "streaming") => s.to_string(),
        (s, st) => format!("{s} ({st})"),
    }
}

/// Replay lag in bytes behind the primary's current position, and in time as
/// pg_stat_replication measures it.
fn lag_column(n: &pb::NodeStatus) -> String {
    match (n.replay_lag_bytes, n.replay_lag_ms) {
        (None, _) => "-".into(),
        (Some(b), Some(ms)) => format!("{} / {ms}ms", fmt_bytes(b)),
        (Some(b), None) => format!("{} / 0ms", fmt_bytes(b)),
    }
}

pub fn print_state(nodes: &[pb::NodeStatus]) {
    print!("{}", state_table(nodes));
}

fn state_table(nodes: &[pb::NodeStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:>3} {:<22} {:<18} {:<18} {:<12} {:>3} {:<10} {:<10} {:<10} {:<18} {:>5}",
        "Name",
        "Id",
        "Host:Port",
        "Reported",
        "Goal",
        "LSN",
        "TLI",
        "Health",
        "Role",
        "Sync",
        "Lag",
        "Age"
    );
    for n in nodes {
        let (best, live) = best_lsn(n);
        let _ = writeln!(
            out,
            "{:<12} {:>3} {:<22} {:<18} {:<18} {:<12} {:>3} {:<10} {:<10} {:<10} {:<18} {:>5}",
            n.name,
            n.node_id,
            format!("{}:{}", n.host, n.port),
            n.reported_state,
            n.goal_state,
            // A starred LSN is the one of the last change of state, not a live one.
            format!("{}{}", lsn(best), if live { "" } else { "*" }),
            n.timeline,
            n.health,
            role(n),
            sync_column(n),
            lag_column(n),
            fmt_age(n.last_heartbeat_ms_ago),
        );
    }
    out
}

/// `show state`'s exit code when the view is stale (docs/cli.md).
pub const EXIT_STALE: i32 = crate::exit::Kind::StaleView.exit_code() as i32;

fn stale_line(state: &pb::GetStateReply) -> Option<String> {
    state.stale.then(|| {
        format!(
            "STALE VIEW: {}",
            if state.stale_reason.is_empty() {
                "not the leader's current view"
            } else {
                &state.stale_reason
            }
        )
    })
}

async fn show_state(client: &MonitorClient, target: &Target, watch: Option<f64>) -> Result<()> {
    let Some(every) = watch else {
        let state = get_state(client, &target.formation).await?;
        if target.json {
            println!("{}", serde_json::to_string_pretty(&state_json(&state))?);
        } else {
            print_state(&state.nodes);
            if let Some(l) = stale_line(&state) {
                println!("{l}");
            }
        }
        if state.stale {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::exit(EXIT_STALE);
        }
        return Ok(());
    };
    if !(every.is_finite() && (0.1..=3600.0).contains(&every)) {
        bail!("--watch takes a number of seconds between 0.1 and 3600, not {every}");
    }
    let every = Duration::from_secs_f64(every);
    loop {
        let now = fmt_time(crate::ops_cmd::unix_ms_now());
        match get_state(client, &target.formation).await {
            Ok(state) if target.json => {
                let mut v = state_json(&state);
                v["at"] = json!(now);
                println!("{}", serde_json::to_string(&v)?);
            }
            Ok(state) => {
                // Home and clear, then the whole table: refreshed in place.
                print!(
                    "\x1b[H\x1b[2JEvery {:.1}s: pgquorum show state    {now}\n\n{}{}",
                    every.as_secs_f64(),
                    state_table(&state.nodes),
                    stale_line(&state)
                        .map(|l| format!("{l}\n"))
                        .unwrap_or_default()
                );
            }
            Err(e) if target.json => {
                println!("{}", json!({"at": now, "error": format!("{e:#}")}));
            }
            Err(e) => print!("\x1b[H\x1b[2J{now}\n\n{e:#}\n"),
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::time::sleep(every).await;
    }
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn event_json(e: &pb::Event) -> serde_json::Value {
    json!({"id": e.id, "at_unix_ms": e.at_unix_ms, "at": fmt_time(e.at_unix_ms),
           "formation": e.formation, "group": e.group_id, "node_id": e.node_id,
           "node": e.node_name, "description": e.description,
           "by": (!e.by.is_empty()).then_some(&e.by),
           "assigned": (!e.assigned.is_empty()).then_some(&e.assigned),
           "reached": (!e.reached.is_empty()).then_some(&e.reached)})
}

fn event_line(e: &pb::Event) -> String {
    let by = if e.by.is_empty() {
        String::new()
    } else {
        format!(" (by {})", e.by)
    };
    format!(
        "{:>6} {} {:<10} {}{by}",
        e.id,
        fmt_time(e.at_unix_ms),
        e.node_name,
        e.description
    )
}

/// `show events --follow`: the last `limit` events, then each new one as the monitor
/// group applies it (a server-side stream). A member that goes away is replaced by
/// another, resuming after the last event printed.
async fn follow_events(client: &MonitorClient, target: &Target, limit: u32) -> Result<()> {
    let mut after = 0u64;
    let mut said = false;
    loop {
        let stream = call!(
            client,
            watch_events,
            pb::WatchEventsRequest {
                formation: target.formation.clone(),
                after_id: after,
                limit,
            }
        );
        let mut stream = match stream {
            Ok(s) => {
                said = false;
                s
            }
            Err(e) => {
                if !said {
                    eprintln!("({:#}; retrying)", client_error("cannot follow events", e));
                    said = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(e)) => {
                    after = e.id;
                    if target.json {
                        println!("{}", serde_json::to_string(&event_json(&e))?);
                    } else {
                        println!("{}", event_line(&e));
                    }
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                }
                Ok(None) => break,
                Err(s) => {
                    eprintln!("(event stream interrupted: {}; resuming)", s.message());
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One failover or switchover, as `show history` prints it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Handover {
    pub at_unix_ms: u64,
    pub at: String,
    /// "switchover", "failover" (decided by the monitor) or "operator failover", or
    /// "maintenance" (the operator put the primary in maintenance).
    pub kind: String,
    pub old_primary: String,
    /// None while no new primary took writes (still going on, or abandoned).
    pub new_primary: Option<String>,
    /// From the old primary leaving writable (it reached a stopped state, or, when it
    /// was lost, the monitor's decision that its lease had surely expired) to the new
    /// primary reaching a writable state.
    pub write_pause_ms: Option<u64>,
    pub reason: String,
    pub by: Option<String>,
}

fn writable(s: &str) -> bool {
    matches!(
        s,
        "single" | "wait_primary" | "primary" | "join_primary" | "apply_settings"
    )
}

/// Failovers and switchovers read from the events' structured fields (`assigned`,
/// `reached`), per group, in order.
pub fn history(events: &[pb::Event]) -> Vec<Handover> {
    use std::collections::BTreeMap;
    struct Open {
        h: Handover,
        left_at: u64,
        stopped: bool,
    }
    // Per (formation, group): the current primary and a handover under way.
    let mut primary: BTreeMap<(String, u32), String> = BTreeMap::new();
    let mut open: BTreeMap<(String, u32), Open> = BTreeMap::new();
    let mut done = Vec::new();
    for e in events {
        let key = (e.formation.clone(), e.group_id);
        if !e.assigned.is_empty() {
            let cur = primary.get(&key).cloned();
            if writable(&e.assigned) {
                if cur.as_deref() != Some(e.node_name.as_str()) {
                    primary.insert(key.clone(), e.node_name.clone());
                }
                if let Some(o) = open.get_mut(&key) {
                    o.h.new_primary = Some(e.node_name.clone());
                }
            } else if cur.as_deref() == Some(e.node_name.as_str()) && !open.contains_key(&key) {
                // The primary's goal left writable: a handover starts.
                let reason = e
                    .description
                    .split_once(": ")
                    .map(|(_, r)| r.to_string())
                    .unwrap_or_else(|| e.description.clone());
                let kind = if e.assigned == "prepare_maintenance" {
                    "maintenance"
                } else if e.by.is_empty() {
                    "failover"
                } else if reason.contains("switchover") {
                    "switchover"
                } else {
                    "operator failover"
                };
                open.insert(
                    key.clone(),
                    Open {
                        h: Handover {
                            at_unix_ms: e.at_unix_ms,
                            at: fmt_time(e.at_unix_ms),
                            kind: kind.into(),
                            old_primary: e.node_name.clone(),
                            new_primary: None,
                            write_pause_ms: None,
                            reason,
                            by: (!e.by.is_empty()).then(|| e.by.clone()),
                        },
                        left_at: e.at_unix_ms,
                        stopped: false,
                    },
                );
                primary.remove(&key);
            }
        }
        if !e.reached.is_empty() {
            if let Some(o) = open.get_mut(&key) {
                if e.node_name == o.h.old_primary && !writable(&e.reached) && !o.stopped {
                    // A reachable old primary stops taking writes when it has stopped.
                    o.stopped = true;
                    o.left_at = e.at_unix_ms;
                }
                if writable(&e.reached) && o.h.new_primary.as_deref() == Some(e.node_name.as_str())
                {
                    if let Some(mut o) = open.remove(&key) {
                        o.h.write_pause_ms = Some(e.at_unix_ms.saturating_sub(o.left_at));
                        primary.insert(key.clone(), e.node_name.clone());
                        done.push(o.h);
                    }
                }
            }
        }
    }
    done.extend(open.into_values().map(|o| o.h));
    done.sort_by_key(|h| h.at_unix_ms);
    done
}

pub async fn show(target: Target, what: ShowWhat, trust: &TrustArgs) -> Result<()> {
    let client = connect(&target.monitor, trust)?;
    match what {
        ShowWhat::State { watch } => show_state(&client, &target, watch).await?,
        ShowWhat::Events {
            limit,
            follow: true,
        } => follow_events(&client, &target, limit).await?,
        ShowWhat::History => {
            let events = call!(
                client,
                get_events,
                pb::GetEventsRequest {
                    formation: target.formation.clone(),
                    limit: pgquorum_core::MAX_EVENTS as u32,
                }
            )
            .map_err(|e| client_error("cannot read events", e))?
            .events;
            let h = history(&events);
            if target.json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                println!(
                    "{:<24} {:<18} {:<12} {:<12} {:>11}  Why",
                    "When", "Kind", "Old primary", "New primary", "Write pause"
                );
                for x in h {
                    let by = x.by.map(|b| format!(" (by {b})")).unwrap_or_default();
                    println!(
                        "{:<24} {:<18} {:<12} {:<12} {:>11}  {}{by}",
                        x.at,
                        x.kind,
                        x.old_primary,
                        x.new_primary.as_deref().unwrap_or("(none yet)"),
                        x.write_pause_ms
                            .map(|ms| format!("{ms} ms"))
                            .unwrap_or_else(|| "-".into()),
                        x.reason
                    );
                }
            }
        }
        ShowWhat::Events {
            limit,
            follow: false,
        } => {
            let events = call!(
                client,
                get_events,
                pb::GetEventsRequest {
                    formation: target.formation.clone(),
                    limit,
                }
            )
            .map_err(|e| client_error("cannot read events", e))?
            .events;
            if target.json {
                let v: Vec<_> = events.iter().map(event_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in events {
                    println!("{}", event_line(&e));
                }
            }
        }
        ShowWhat::Uri { dbname, user, role } => {
            let state = get_state(&client, &target.formation).await?;
            let hosts: Vec<String> = state
                .nodes
                .iter()
                .filter(|n| n.reported_state != "dropped")
                .map(|n| format!("{}:{}", n.host, n.port))
                .collect();
            if hosts.is_empty() {
                bail!("formation {:?} has no nodes yet", target.formation);
            }
            let base = format!("postgresql://{user}@{}/{dbname}", hosts.join(","));
            let rw = format!("{base}?target_session_attrs=read-write&connect_timeout=2");
            let ro = format!("{base}?target_session_attrs=prefer-standby&connect_timeout=2");
            if let Some(role) = role {
                println!("{}", role.pick(&rw, &ro));
            } else if target.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"read_write": rw, "read_only": ro}))?
                );
            } else {
                println!("read-write: {rw}");
                println!("read-only:  {ro}");
            }
        }
        ShowWhat::Settings => {
            let settings = call!(
                client,
                get_settings,
                pb::GetSettingsRequest {
                    formation: target.formation.clone(),
                }
            )
            .map_err(|e| client_error("cannot read settings", e))?
            .settings;
            if target.json {
                let v: Vec<_> = settings
                    .iter()
                    .map(|s| json!({"scope": s.scope, "target": s.target, "name": s.name, "value": s.value}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<10} {:<14} {:<24} Value", "Scope", "Target", "Setting");
                for s in settings {
                    println!(
                        "{:<10} {:<14} {:<24} {}",
                        s.scope, s.target, s.name, s.value
                    );
                }
            }
        }
    }
    Ok(())
}

/// `2026-11-30 09:22:16.123Z` (UTC).
fn fmt_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    format!(
        "{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}.{:03}Z",
        unix_ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn primary_of(nodes: &[pb::NodeStatus]) -> Option<&pb::NodeStatus> {
    let mut p = nodes
        .iter()
        .filter(|n| n.reported_state == "primary" && n.goal_state == "primary");
    match (p.next(), p.next()) {
        (Some(n), None) => Some(n),
        _ => None,
    }
}

/// Wait until `done` holds for the state, printing each change; on timeout, say what
/// is still pending.
async fn wait_for(
    client: &MonitorClient,
    target: &Target,
    timeout: u64,
    what: &str,
    done: impl Fn(&[pb::NodeStatus]) -> bool,
) -> Result<Vec<pb::NodeStatus>> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let nodes = match get_state(client, &target.formation).await {
            Ok(s) => s.nodes,
            Err(e) if start.elapsed() < Duration::from_secs(timeout) => {
                eprintln!("  ({e}; retrying)");
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        if !nodes.is_empty() {
            let line = crate::perform::progress_line(&nodes);
            if line != last && !target.json {
                eprintln!("[{:>5.1}s] {line}", start.elapsed().as_secs_f64());
                last = line;
            }
            if done(&nodes) {
                return Ok(nodes);
            }
        }
        if start.elapsed() > Duration::from_secs(timeout) {
            let pending: Vec<String> = nodes
                .iter()
                .filter(|n| n.reported_state != n.goal_state)
                .map(|n| format!("{} is {} (goal {})", n.name, n.reported_state, n.goal_state))
                .collect();
            return Err(crate::exit::fail(
                crate::exit::Kind::TimedOut,
                format!(
                    "timed out after {timeout} s waiting for {what}; still pending: {}",
                    if pending.is_empty() {
                        "no single primary yet".to_string()
                    } else {
                        pending.join(", ")
                    }
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_result(
    target: &Target,
    reply: &pb::OperationReply,
    nodes: Option<&[pb::NodeStatus]>,
) -> Result<()> {
    if target.json {
        let v = json!({
            "log_index": reply.log_index,
            "description": reply.description,
            "nodes": nodes.map(|ns| ns.iter().map(node_json).collect::<Vec<_>>()),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", reply.description);
        if let Some(ns) = nodes {
            print_state(ns);
        }
    }
    Ok(())
}

/// A refusal that passes by itself (class RetryLater, read from the status's metadata).
fn waits_out(s: &tonic::Status) -> bool {
    pgquorum_api::refusal_class(s) == Some(ErrorClass::RetryLater)
}

/// Runs `f` again while the monitor refuses with the class RetryLater (the primary is
/// between two states, e.g. applying a new synchronous_standby_names right after a
/// standby joined), which passes by itself within a heartbeat or two; other refusals
/// are returned at once. The class is read from the status, never from its text.
async fn while_in_transition<T, F, Fut>(
    target: &Target,
    timeout: u64,
    mut f: F,
) -> std::result::Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, ClientError>>,
{
    let start = Instant::now();
    let mut said = false;
    loop {
        match f().await {
            Err(ClientError::Status(s))
                if waits_out(&s) && start.elapsed() < Duration::from_secs(timeout) =>
            {
                if !said && !target.json {
                    eprintln!("  ({}; waiting)", s.message());
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

pub async fn perform(target: Target, what: PerformWhat, trust: &TrustArgs) -> Result<()> {
    let client = connect(&target.monitor, trust)?;
    let before = get_state(&client, &target.formation).await?;
    let old_primary = primary_of(&before.nodes).map(|n| n.name.clone());
    let (reply, wait, candidate, kind) = match what {
        PerformWhat::Switchover { candidate, wait } => {
            let r = while_in_transition(&target, wait.timeout, || async {
                call!(
                    client,
                    perform_switchover,
                    pb::PerformSwitchoverRequest {
                        formation: target.formation.clone(),
                        group_id: wait.group,
                        candidate: candidate.clone().unwrap_or_default(),
                    }
                )
            })
            .await
            .map_err(|e| client_error("switchover refused", e))?;
            (r, wait, candidate, "switchover")
        }
        PerformWhat::Reinit { node, wait } => return reinit(&client, &target, &node, wait).await,
        PerformWhat::Failover { wait } => {
            let r = while_in_transition(&target, wait.timeout, || async {
                call!(
                    client,
                    perform_failover,
                    pb::PerformFailoverRequest {
                        formation: target.formation.clone(),
                        group_id: wait.group,
                    }
                )
            })
            .await
            .map_err(|e| client_error("failover refused", e))?;
            (r, wait, None, "failover")
        }
    };
    if wait.no_wait {
        return print_result(&target, &reply, None);
    }
    let op = crate::perform::Operation {
        kind,
        old_primary,
        candidate,
        timeout: wait.timeout,
    };
    crate::perform::follow(&client, &target, &reply, op).await
}

pub async fn maintenance(
    target: Target,
    what: ToggleWhat,
    enable: bool,
    trust: &TrustArgs,
) -> Result<()> {
    let ToggleWhat::Maintenance { node, wait } = what;
    let client = connect(&target.monitor, trust)?;
    let reply = while_in_transition(&target, wait.timeout, || async {
        call!(
            client,
            set_maintenance,
            pb::SetMaintenanceRequest {
                formation: target.formation.clone(),
                node: node.clone(),
                enable,
            }
        )
    })
    .await
    .map_err(|e| client_error("maintenance change refused", e))?;
    if wait.no_wait {
        return print_result(&target, &reply, None);
    }
    let goal = if enable { "maintenance" } else { "secondary" };
    let nodes = wait_for(
        &client,
        &target,
        wait.timeout,
        &format!("{node} to reach {goal}"),
        |nodes| {
            nodes
                .iter()
                .any(|n| n.name == node && n.reported_state == goal && n.goal_state == goal)
                && primary_of(nodes).is_some()
        },
    )
    .await?;
    print_result(&target, &reply, Some(&nodes))
}

pub async fn set(target: Target, what: SetWhat, trust: &TrustArgs) -> Result<()> {
    let client = connect(&target.monitor, trust)?;
    let reply = match what {
        SetWhat::Node {
            name,
            setting,
            value,
        } => call!(
            client,
            set_node_setting,
            pb::SetNodeSettingRequest {
                formation: target.formation.clone(),
                node: name,
                name: setting,
                value,
            }
        )
        .map_err(|e| client_error("setting refused", e))?,
        SetWhat::Formation { setting, value } => call!(
            client,
            set_formation_setting,
            pb::SetFormationSettingRequest {
                formation: target.formation.clone(),
                name: setting,
                value,
            }
        )
        .map_err(|e| client_error("setting refused", e))?,
    };
    print_result(&target, &reply, None)
}

pub async fn drop_node(target: Target, what: DropWhat, trust: &TrustArgs) -> Result<()> {
    let DropWhat::Node { name, wait } = what;
    let client = connect(&target.monitor, trust)?;
    let reply = call!(
        client,
        drop_node,
        pb::DropNodeRequest {
            formation: target.formation.clone(),
            node: name.clone(),
        }
    )
    .map_err(|e| client_error("drop refused", e))?;
    if wait.no_wait {
        return print_result(&target, &reply, None).context("cannot print the result");
    }
    if !target.json {
        eprintln!("{}; waiting for it to be removed...", reply.description);
    }
    let nodes = wait_for(
        &client,
        &target,
        wait.timeout,
        &format!("{name} to be removed"),
        |nodes| nodes.iter().all(|n| n.name != name),
    )
    .await?;
    print_result(&target, &reply, Some(&nodes)).context("cannot print the result")
}

/// `perform reinit --node NAME`: asks for the rebuild, then waits until the node is a
/// secondary again (its goal is catching up until the rebuilt standby has caught up).
async fn reinit(client: &MonitorClient, target: &Target, node: &str, wait: WaitArgs) -> Result<()> {
    let reply = while_in_transition(target, wait.timeout, || async {
        call!(
            client,
            reinit_node,
            pb::ReinitNodeRequest {
                formation: target.formation.clone(),
                node: node.to_string(),
            }
        )
    })
    .await
    .map_err(|e| client_error("reinit refused", e))?;
    if wait.no_wait {
        return print_result(target, &reply, None);
    }
    if !target.json {
        eprintln!(
            "{}; waiting for it to be a secondary again...",
            reply.description
        );
    }
    let nodes = wait_for(
        client,
        target,
        wait.timeout,
        &format!("{node} to be rebuilt and a secondary again"),
        |nodes| {
            nodes.iter().any(|n| {
                n.name == node && n.reported_state == "secondary" && n.goal_state == "secondary"
            })
        },
    )
    .await?;
    print_result(target, &reply, Some(&nodes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The switchover wait decides on the refusal's class, never on its text.
    #[test]
    fn only_a_retry_later_refusal_is_waited_out() {
        use pgquorum_core::{CoreError, NodeState};
        let moving = pgquorum_api::status_from_core(&CoreError::StillMoving {
            node: "a".into(),
            goal: NodeState::Primary,
            reported: NodeState::ApplySettings,
        });
        assert!(waits_out(&moving));
        // The same words from a member that names no class (or any other refusal): no.
        assert!(!waits_out(&tonic::Status::failed_precondition(
            moving.message().to_owned()
        )));
        assert!(!waits_out(&pgquorum_api::status_from_core(
            &CoreError::FailoverInProgress { group: 0 }
        )));
        assert!(!waits_out(&tonic::Status::unavailable("no leader")));
    }

    fn ev(
        id: u64,
        at: u64,
        node: &str,
        assigned: &str,
        reached: &str,
        by: &str,
        d: &str,
    ) -> pb::Event {
        pb::Event {
            id,
            at_unix_ms: at,
            formation: "default".into(),
            group_id: 0,
            node_id: None,
            node_name: node.into(),
            description: d.into(),
            by: by.into(),
            assigned: assigned.into(),
            reached: reached.into(),
        }
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00.000Z");
        // 2026-11-30 09:22:16.123 UTC
        assert_eq!(fmt_time(1_796_030_536_123), "2026-11-30 09:22:16.123Z");
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn history_finds_a_switchover_and_a_failover_with_their_write_pauses() {
        let events = vec![
            ev(
                1,
                1_000,
                "a",
                "single",
                "",
                "",
                "node a registered, assigned single",
            ),
            ev(2, 1_100, "a", "", "single", "", "node a reached single"),
            ev(
                3,
                1_200,
                "a",
                "wait_primary",
                "",
                "",
                "node a assigned wait_primary: b joined",
            ),
            ev(
                4,
                1_300,
                "a",
                "primary",
                "",
                "",
                "node a assigned primary: in sync",
            ),
            // A switchover asked by an operator.
            ev(
                5,
                10_000,
                "a",
                "draining",
                "",
                "operator/alice",
                "node a assigned draining: operator asked for a switchover",
            ),
            ev(
                6,
                10_400,
                "a",
                "",
                "draining",
                "",
                "node a reached draining (lsn 0/1)",
            ),
            ev(
                7,
                10_500,
                "b",
                "prepare_promotion",
                "",
                "",
                "node b assigned prepare_promotion: chosen",
            ),
            ev(
                8,
                10_600,
                "b",
                "wait_primary",
                "",
                "",
                "node b assigned wait_primary: promoted",
            ),
            ev(
                9,
                10_900,
                "b",
                "",
                "wait_primary",
                "",
                "node b reached wait_primary (lsn 0/2)",
            ),
            // b dies: a failover decided by the monitor.
            ev(
                10,
                20_000,
                "b",
                "demoted",
                "",
                "",
                "node b assigned demoted: primary b failed, no heartbeat for 1900 ms",
            ),
            ev(
                11,
                21_000,
                "a",
                "wait_primary",
                "",
                "",
                "node a assigned wait_primary: promoted",
            ),
            ev(
                12,
                21_500,
                "a",
                "",
                "wait_primary",
                "",
                "node a reached wait_primary",
            ),
            // A standby's changes are no handover.
            ev(
                13,
                22_000,
                "b",
                "catchingup",
                "",
                "",
                "node b assigned catchingup: rejoin",
            ),
        ];
        let h = history(&events);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[0].kind, "switchover");
        assert_eq!(h[0].old_primary, "a");
        assert_eq!(h[0].new_primary.as_deref(), Some("b"));
        // From a having stopped (10 400) to b taking writes (10 900).
        assert_eq!(h[0].write_pause_ms, Some(500));
        assert_eq!(h[0].by.as_deref(), Some("operator/alice"));
        assert_eq!(h[0].reason, "operator asked for a switchover");
        assert_eq!(h[1].kind, "failover");
        assert_eq!(h[1].old_primary, "b");
        assert_eq!(h[1].new_primary.as_deref(), Some("a"));
        // b never reported stopping: from the monitor's decision (20 000) to 21 500.
        assert_eq!(h[1].write_pause_ms, Some(1_500));
        assert!(h[1].reason.starts_with("primary b failed"));
    }

    #[test]
    fn an_unfinished_handover_has_no_new_primary_yet() {
        let events = vec![
            ev(1, 1_000, "a", "single", "", "", "x"),
            ev(
                2,
                2_000,
                "a",
                "demoted",
                "",
                "",
                "node a assigned demoted: lease",
            ),
        ];
        let h = history(&events);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].new_primary, None);
        assert_eq!(h[0].write_pause_ms, None);
    }
}
