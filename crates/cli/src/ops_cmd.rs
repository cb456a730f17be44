//! The operator's commands over the Monitor API: `show`, `perform`, `enable`/`disable`,
//! `set`, `drop`. Each takes `--monitor HOST:PORT,...` (or `PGQUORUM_MONITOR`) and
//! `--json`; commands that change the cluster and then wait show progress and end
//! with the resulting state, or a timeout error naming what is still pending.

use std::time::{Duration, Instant};

use crate::trust_args::{TrustArgs, Who};
use anyhow::{bail, Context, Result};
use pgquorum_api::client::{ClientError, MonitorClient};
use pgquorum_api::pb::monitor as pb;
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
    /// Every node: reported and goal state, LSN, timeline, health, role.
    State,
    /// The event history: what changed and why.
    Events {
        /// How many of the latest events to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
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
    /// Remove a node from the cluster; its keeper stops its PostgreSQL.
    Node {
        /// The node's name.
        name: String,
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
    if n.health == "unhealthy" {
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

fn lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l & 0xffff_ffff)
}

pub(crate) fn node_json(n: &pb::NodeStatus) -> serde_json::Value {
    json!({
        "node_id": n.node_id, "formation": n.formation, "group": n.group_id, "name": n.name,
        "host": n.host, "port": n.port, "reported_state": n.reported_state,
        "goal_state": n.goal_state, "lsn": lsn(n.reported_lsn), "timeline": n.timeline,
        "health": n.health, "role": role(n), "candidate_priority": n.candidate_priority,
        "replication_quorum": n.replication_quorum, "pg_running": n.pg_running,
        "last_heartbeat_ms_ago": n.last_heartbeat_ms_ago,
    })
}

pub fn print_state(nodes: &[pb::NodeStatus]) {
    println!(
        "{:<12} {:>3} {:<22} {:<18} {:<18} {:<14} {:>3} {:<10} {:<10}",
        "Name", "Id", "Host:Port", "Reported", "Goal", "LSN", "TLI", "Health", "Role"
    );
    for n in nodes {
        println!(
            "{:<12} {:>3} {:<22} {:<18} {:<18} {:<14} {:>3} {:<10} {:<10}",
            n.name,
            n.node_id,
            format!("{}:{}", n.host, n.port),
            n.reported_state,
            n.goal_state,
            lsn(n.reported_lsn),
            n.timeline,
            n.health,
            role(n)
        );
    }
}

pub async fn show(target: Target, what: ShowWhat, trust: &TrustArgs) -> Result<()> {
    let client = connect(&target.monitor, trust)?;
    match what {
        ShowWhat::State => {
            let state = get_state(&client, &target.formation).await?;
            if target.json {
                let nodes: Vec<_> = state.nodes.iter().map(node_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "nodes": nodes }))?
                );
            } else {
                print_state(&state.nodes);
            }
        }
        ShowWhat::Events { limit } => {
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
                let v: Vec<_> = events
                    .iter()
                    .map(|e| {
                        json!({"id": e.id, "at_unix_ms": e.at_unix_ms, "formation": e.formation,
                               "group": e.group_id, "node_id": e.node_id, "node": e.node_name,
                               "description": e.description,
                               "by": (!e.by.is_empty()).then_some(&e.by)})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in events {
                    let by = if e.by.is_empty() {
                        String::new()
                    } else {
                        format!(" (by {})", e.by)
                    };
                    println!(
                        "{:>6} {} {:<10} {}{by}",
                        e.id,
                        fmt_time(e.at_unix_ms),
                        e.node_name,
                        e.description
                    );
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

fn fmt_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", unix_ms % 1000)
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
            let line: Vec<String> = nodes
                .iter()
                .map(|n| format!("{} {}→{}", n.name, n.reported_state, n.goal_state))
                .collect();
            let line = line.join(", ");
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

/// Runs `f` again while the monitor refuses only because the primary is between two
/// states (e.g. applying a new synchronous_standby_names right after a standby joined),
/// which passes by itself within a heartbeat or two; other refusals are returned at once.
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
                if s.code() == tonic::Code::FailedPrecondition
                    && s.message().contains("is still moving to")
                    && start.elapsed() < Duration::from_secs(timeout) =>
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
    let DropWhat::Node { name } = what;
    let client = connect(&target.monitor, trust)?;
    let reply = call!(
        client,
        drop_node,
        pb::DropNodeRequest {
            formation: target.formation.clone(),
            node: name,
        }
    )
    .map_err(|e| client_error("drop refused", e))?;
    print_result(&target, &reply, None).context("cannot print the result")
}
