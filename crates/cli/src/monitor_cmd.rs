//! `pgquorum monitor ...`: run a member of the monitor group, inspect it, change its
//! membership.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use pgquorum_api::client::{parse_endpoints, MonitorClient};
use pgquorum_api::pb::monitor as pb;
use pgquorum_monitor::{parse_peer, peer_map, MemberConfig, Timing};
use serde::Serialize;

use crate::trust_args::{TrustArgs, Who};

#[derive(clap::Args)]
pub struct MonitorArgs {
    #[command(subcommand)]
    command: MonitorCommand,
}

#[derive(clap::Subcommand)]
enum MonitorCommand {
    /// Run one member of the monitor group (in the foreground).
    Run(RunArgs),
    /// Show every member: leader, term, log indexes, lag.
    Status(StatusArgs),
    /// Add a member (started beforehand with `monitor run --join`) as a voter.
    AddMember(AddArgs),
    /// Remove a member from the group.
    RemoveMember(RemoveArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// This member's id (a positive integer, unique in the group).
    #[arg(long)]
    node_id: u64,
    /// Address to serve the Monitor API and the Raft transport on (gRPC, TLS with
    /// --certs-dir); /metrics is on --metrics-listen.
    #[arg(long)]
    listen: String,
    /// Directory of this member's Raft log and state (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// A member of the group as ID=HOST:PORT; repeat for every member, this one included.
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<(u64, String)>,
    /// Join an existing group (through `monitor add-member`) instead of forming one.
    #[arg(long)]
    join: bool,
    /// Snapshot the state and compact the log after this many entries.
    #[arg(long, default_value_t = 5000)]
    snapshot_threshold: u64,
    /// Refuse a write that found no quorum within this many milliseconds.
    #[arg(long, default_value_t = 3000)]
    write_timeout_ms: u64,
    /// Raft heartbeat interval (ms); an election starts after 3-6 silent intervals, so
    /// the default loses a dead leader in well under a second.
    #[arg(long, default_value_t = 75)]
    raft_heartbeat_ms: u64,
    /// Where to serve Prometheus /metrics (plain HTTP, read-only), e.g. 0.0.0.0:9187;
    /// not served when absent. The gRPC port serves only authenticated gRPC.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Connections the gRPC server holds at once (keepers, clients and members); more
    /// are closed at once. Bounded below the open-file limit, so that a flood of
    /// connections never leaves the Raft log without a file descriptor.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
}

#[derive(clap::Args)]
struct Endpoints {
    /// Monitor members to ask, HOST:PORT,HOST:PORT,... (no default: a member asked by
    /// mistake would answer for another group).
    #[arg(long, env = "PGQUORUM_MONITOR")]
    monitor: Option<String>,
}

#[derive(clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    endpoints: Endpoints,
}

#[derive(clap::Args)]
struct AddArgs {
    /// The new member as ID=HOST:PORT.
    #[arg(value_parser = parse_peer)]
    member: (u64, String),
    #[command(flatten)]
    endpoints: Endpoints,
}

#[derive(clap::Args)]
struct RemoveArgs {
    /// The member's id.
    id: u64,
    #[command(flatten)]
    endpoints: Endpoints,
}

pub fn run(args: MonitorArgs, trust: &TrustArgs, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        match args.command {
            MonitorCommand::Run(a) => run_member(a, trust).await,
            MonitorCommand::Status(a) => status(a, trust, json).await,
            MonitorCommand::AddMember(a) => add_member(a, trust, json).await,
            MonitorCommand::RemoveMember(a) => remove_member(a, trust, json).await,
        }
    })
}

async fn run_member(a: RunArgs, trust: &TrustArgs) -> anyhow::Result<()> {
    if a.node_id == 0 {
        bail!("--node-id must be a positive integer");
    }
    let security = trust.security_watched(Who::Member(a.node_id))?;
    let max_connections = connection_cap(a.max_connections);
    let listen = a
        .listen
        .to_socket_addrs()
        .with_context(|| format!("--listen {}: not HOST:PORT", a.listen))?
        .next()
        .with_context(|| format!("--listen {}: resolves to no address", a.listen))?;
    let peers = peer_map(&a.peers).map_err(anyhow::Error::msg)?;
    if peers.is_empty() && !a.join {
        bail!("give every member of the group with --peer ID=HOST:PORT (this one included), or --join to join an existing group");
    }
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("cannot create --data-dir {}", a.data_dir.display()))?;
    let hb = a.raft_heartbeat_ms.max(10);
    let cfg = MemberConfig {
        node_id: a.node_id,
        listen,
        data_dir: a.data_dir,
        peers,
        join: a.join,
        snapshot_threshold: a.snapshot_threshold.max(10),
        timing: Timing {
            heartbeat_ms: hb,
            election_min_ms: hb * 3,
            election_max_ms: hb * 6,
        },
        write_timeout: Duration::from_millis(a.write_timeout_ms.max(100)),
        security,
        metrics_listen: a.metrics_listen,
        serve: pgquorum_trust::Serve {
            max_connections,
            ..Default::default()
        },
    };
    pgquorum_monitor::run(cfg, shutdown_signal()).await?;
    Ok(())
}

/// Raises the soft open-file limit to the hard one and keeps `wanted` connections
/// 512 descriptors under it (the store, the log, snapshots, outgoing connections).
fn connection_cap(wanted: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let soft = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    };
    let room = usize::try_from(soft.saturating_sub(512))
        .unwrap_or(usize::MAX)
        .max(16);
    if wanted > room {
        tracing::warn!(
            wanted,
            open_file_limit = soft,
            cap = room,
            "--max-connections lowered to stay under the open-file limit"
        );
    }
    wanted.clamp(16, room)
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn client(e: &Endpoints, trust: &TrustArgs) -> anyhow::Result<MonitorClient> {
    let Some(list) = &e.monitor else {
        return Err(crate::exit::fail(
            crate::exit::Kind::Usage,
            "no monitor given: use --monitor HOST:PORT,HOST:PORT,... or set PGQUORUM_MONITOR",
        ));
    };
    Ok(
        MonitorClient::new(parse_endpoints(list), trust.security(Who::Client)?)?
            .give_up_unreachable_after(Duration::from_secs(1)),
    )
}

#[derive(Serialize)]
struct MemberRow {
    id: u64,
    address: String,
    reachable: bool,
    role: String,
    state: Option<String>,
    term: Option<u64>,
    last_log_index: Option<u64>,
    committed_index: Option<u64>,
    applied_index: Option<u64>,
    /// Entries behind the leader's log, as the leader sees it.
    lag: Option<u64>,
    error: Option<String>,
}

#[derive(Serialize)]
struct StatusJson {
    /// A majority of the voters answered: the group can elect and write.
    quorum: bool,
    reachable: usize,
    leader: Option<u64>,
    leader_address: Option<String>,
    term: Option<u64>,
    group_id: Option<String>,
    members: Vec<MemberRow>,
}

async fn status(a: StatusArgs, trust: &TrustArgs, json: bool) -> anyhow::Result<()> {
    let c = client(&a.endpoints, trust)?.retry_for(Duration::from_secs(1));
    // Learn the membership from whichever member answers, then ask each member.
    let first = c
        .call(|mut raw| async move { raw.member_status(pb::MemberStatusRequest {}).await })
        .await
        .context("no monitor member answered")?;
    let mut members: Vec<(u64, String, String)> = first
        .members
        .iter()
        .map(|m| (m.id, m.address.clone(), m.role.clone()))
        .collect();
    if members.is_empty() {
        members.push((first.id, first.address.clone(), "unknown".into()));
    }
    let leader_view = if first.server_state == "leader" {
        Some(first.clone())
    } else {
        None
    };
    let mut rows = Vec::new();
    let mut replies = Vec::new();
    for (id, addr, role) in &members {
        let mut raw = c.raw(addr)?;
        let mut req = tonic::Request::new(pb::MemberStatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        match raw.member_status(req).await {
            Ok(r) => {
                let r = r.into_inner();
                replies.push(r.clone());
                rows.push(MemberRow {
                    id: *id,
                    address: addr.clone(),
                    reachable: true,
                    role: role.clone(),
                    state: Some(r.server_state.clone()),
                    term: Some(r.term),
                    last_log_index: r.last_log_index,
                    committed_index: r.committed_index,
                    applied_index: r.applied_index,
                    lag: None,
                    error: None,
                });
            }
            Err(e) => rows.push(MemberRow {
                id: *id,
                address: addr.clone(),
                reachable: false,
                role: role.clone(),
                state: None,
                term: None,
                last_log_index: None,
                committed_index: None,
                applied_index: None,
                lag: None,
                error: Some(e.message().to_owned()),
            }),
        }
    }
    let leader_reply = replies
        .iter()
        .find(|r| r.server_state == "leader")
        .cloned()
        .or(leader_view);
    if let Some(l) = &leader_reply {
        for row in &mut rows {
            row.lag = l
                .members
                .iter()
                .find(|m| m.id == row.id)
                .and_then(|m| m.lag);
        }
    }
    // A leader cut off from the others still calls itself leader (openraft does not step
    // down by itself): what the operator needs to know is whether a majority answers.
    let voters = rows.iter().filter(|r| r.role == "voter").count();
    let voters_up = rows
        .iter()
        .filter(|r| r.role == "voter" && r.reachable)
        .count();
    let quorum = voters == 0 || voters_up * 2 > voters;
    let reachable = rows.iter().filter(|r| r.reachable).count();
    let out = StatusJson {
        quorum,
        reachable,
        leader: leader_reply.as_ref().map(|l| l.id),
        leader_address: leader_reply.as_ref().map(|l| l.address.clone()),
        term: leader_reply.as_ref().map(|l| l.term),
        group_id: Some(first.group_id.clone()),
        members: rows,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    match (&out.leader, &out.term) {
        (Some(l), Some(t)) if !quorum => println!(
            "group {}: NO QUORUM: only {voters_up} of {} voting members reachable (member {l} last led, term {t}); writes and failovers wait until a majority is back",
            first.group_id,
            voters
        ),
        (Some(l), Some(t)) => println!("group {}: leader is member {l}, term {t}", first.group_id),
        _ => println!(
            "group {}: NO LEADER (fewer than a majority of members reachable?)",
            first.group_id
        ),
    }
    println!(
        "{:>4}  {:<22} {:<8} {:<10} {:>6} {:>10} {:>10} {:>10} {:>6}",
        "ID", "ADDRESS", "ROLE", "STATE", "TERM", "LAST LOG", "COMMITTED", "APPLIED", "LAG"
    );
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    for r in &out.members {
        println!(
            "{:>4}  {:<22} {:<8} {:<10} {:>6} {:>10} {:>10} {:>10} {:>6}",
            r.id,
            r.address,
            r.role,
            r.state.as_deref().unwrap_or("UNREACHABLE"),
            opt(r.term),
            opt(r.last_log_index),
            opt(r.committed_index),
            opt(r.applied_index),
            opt(r.lag)
        );
    }
    Ok(())
}

fn print_members(reply: &pb::MembershipReply, json: bool, done: &str) -> anyhow::Result<()> {
    if json {
        let members: Vec<_> = reply
            .members
            .iter()
            .map(|m| serde_json::json!({"id": m.id, "address": m.address, "role": m.role}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"result": done, "members": members}))?
        );
        return Ok(());
    }
    println!("{done}; the group is now:");
    for m in &reply.members {
        println!("  member {} at {} ({})", m.id, m.address, m.role);
    }
    Ok(())
}

async fn add_member(a: AddArgs, trust: &TrustArgs, json: bool) -> anyhow::Result<()> {
    let (id, address) = a.member;
    let c = client(&a.endpoints, trust)?.request_timeout(Duration::from_secs(90));
    let reply = c
        .call(|mut raw| {
            let req = pb::AddMemberRequest {
                id,
                address: address.clone(),
            };
            async move { raw.add_member(req).await }
        })
        .await
        .with_context(|| format!("cannot add member {id}"))?;
    print_members(&reply, json, &format!("member {id} added"))
}

async fn remove_member(a: RemoveArgs, trust: &TrustArgs, json: bool) -> anyhow::Result<()> {
    let id = a.id;
    let c = client(&a.endpoints, trust)?;
    let reply = c
        .call(|mut raw| async move { raw.remove_member(pb::RemoveMemberRequest { id }).await })
        .await
        .with_context(|| format!("cannot remove member {id}"))?;
    print_members(&reply, json, &format!("member {id} removed"))
}
