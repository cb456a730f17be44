//! SQL the keeper runs: on its own postgres over the Unix socket, and on the primary
//! (as the replication role) to check that a data directory belongs to its cluster.

use std::time::Duration;

use pgquorum_core::{zero_is_none, Lsn};
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, Config, NoTls};

use crate::error::{KeeperError, Result};
use crate::settings::Settings;

/// A standby of the primary as pg_stat_replication shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplicationPeer {
    pub application_name: String,
    pub state: String,
    pub sync_state: String,
    /// None: NULL (the standby has not reported it yet).
    #[serde(serialize_with = "zero_is_none::serialize")]
    pub write_lsn: Option<Lsn>,
    #[serde(serialize_with = "zero_is_none::serialize")]
    pub flush_lsn: Option<Lsn>,
    #[serde(serialize_with = "zero_is_none::serialize")]
    pub replay_lsn: Option<Lsn>,
    /// write_lag / flush_lag / replay_lag in ms (NULL once the standby is idle and
    /// caught up).
    pub write_lag_ms: Option<u64>,
    pub flush_lag_ms: Option<u64>,
    pub replay_lag_ms: Option<u64>,
}

/// What the local postgres says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Observation {
    pub in_recovery: bool,
    /// Primary: pg_current_wal_lsn(); standby: the received (flushed) position. None:
    /// unknown (a standby that has neither received nor replayed anything yet).
    #[serde(serialize_with = "zero_is_none::serialize")]
    pub current_lsn: Option<Lsn>,
    #[serde(serialize_with = "zero_is_none::serialize")]
    pub received_lsn: Option<Lsn>,
    #[serde(serialize_with = "zero_is_none::serialize")]
    pub replayed_lsn: Option<Lsn>,
    pub timeline: u32,
    pub system_identifier: u64,
    /// Standby: the WAL receiver is streaming.
    pub streaming: bool,
    /// Standby: bytes between what the primary last reported and what is replayed.
    pub lag_bytes: u64,
    pub replication: Vec<ReplicationPeer>,
}

pub async fn connect_local(s: &Settings, timeout: Duration) -> Result<Client> {
    let mut c = Config::new();
    c.host_path(&s.socket_dir)
        .port(s.pg_port)
        .user(&s.superuser)
        .dbname("postgres")
        .application_name("pgquorum-keeper")
        // The keeper's own writes (role, slots) must never wait for a synchronous
        // standby: right after a promotion the standbys named in
        // synchronous_standby_names cannot connect until this very work is done.
        // confirm_synchronous() asks for synchronous_commit = on explicitly.
        .options("-c synchronous_commit=local")
        .connect_timeout(timeout);
    connect(c, timeout, "local postgres").await
}

/// The core's contract for primary, join_primary and apply_settings: a commit issued
/// after `names` took effect has been acknowledged by the synchronous standbys (which
/// proves every earlier commit is on them too). Checks in fresh sessions that the reload
/// applied `names`, then commits with synchronous_commit = on; gives up after `timeout`
/// (cancelling the wait) so that the caller retries on its next beat instead of
/// blocking, and at once (cancelling too) when `still_wanted` says the goal it serves
/// was replaced. The same commit opens a restarted primary's client gate: WAL is
/// flushed in order, so its acknowledgement means the standbys hold everything up to
/// the end of recovery.
pub async fn confirm_synchronous(
    s: &Settings,
    names: &str,
    timeout: Duration,
    still_wanted: impl Fn() -> Result<()>,
) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + timeout;
    // A reload is asynchronous: new sessions see the new value once the postmaster
    // has processed SIGHUP.
    let c = loop {
        let c = connect_local(s, timeout).await?;
        let shown: String = c
            .query_one("SHOW synchronous_standby_names", &[])
            .await
            .map_err(|e| KeeperError::sql("reading synchronous_standby_names", e))?
            .get(0);
        if shown == names {
            break c;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(KeeperError::Timeout(format!(
                "synchronous_standby_names is {shown:?}, not {names:?}, after a reload"
            )));
        }
        still_wanted()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cancel = c.cancel_token();
    // The transaction must write WAL before its commit: PostgreSQL commits a
    // transaction that only took an xid (`SELECT txid_current()`) asynchronously and
    // without waiting for any standby (RecordTransactionCommit), which made this check
    // pass with every standby gone. A transactional logical message is a WAL record
    // that changes no table (a no-op for physical standbys at wal_level = replica).
    let commit = c.batch_execute(
        "BEGIN; SET LOCAL synchronous_commit = on; \
         SELECT pg_logical_emit_message(true, 'pgquorum', 'confirm'); COMMIT",
    );
    tokio::pin!(commit);
    let mut check = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            r = &mut commit => {
                return r.map_err(|e| KeeperError::sql("confirming synchronous replication", e));
            }
            _ = tokio::time::sleep_until(deadline) => {
                let _ = cancel.cancel_query(NoTls).await;
                return Err(KeeperError::Timeout(format!(
                    "no synchronous standby of {names:?} acknowledged a commit"
                )));
            }
            _ = check.tick() => {
                if let Err(e) = still_wanted() {
                    let _ = cancel.cancel_query(NoTls).await;
                    return Err(e);
                }
            }
        }
    }
}

async fn connect(c: Config, timeout: Duration, what: &str) -> Result<Client> {
    let fut = c.connect(NoTls);
    let (client, conn) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| KeeperError::Timeout(format!("connecting to {what}")))?
        .map_err(|e| KeeperError::sql(what, e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A pg_lsn column: NULL and 0/0 are no position.
fn lsn(v: Option<PgLsn>) -> Option<Lsn> {
    v.and_then(|l| Lsn::new(u64::from(l)))
}

pub async fn observe(c: &Client) -> Result<Observation> {
    let e = |err| KeeperError::sql("observing local postgres", err);
    let row = c
        .query_one(
            "SELECT pg_is_in_recovery(), \
                    (SELECT system_identifier FROM pg_control_system()), \
                    (SELECT timeline_id FROM pg_control_checkpoint())",
            &[],
        )
        .await
        .map_err(e)?;
    let in_recovery: bool = row.get(0);
    let sysid: i64 = row.get(1);
    let ckpt_tli: i32 = row.get(2);
    let mut o = Observation {
        in_recovery,
        system_identifier: sysid as u64,
        timeline: ckpt_tli as u32,
        ..Default::default()
    };
    if in_recovery {
        let row = c
            .query_one(
                "SELECT pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn(), \
                        r.status, r.latest_end_lsn, r.received_tli \
                 FROM (SELECT 1) one LEFT JOIN pg_stat_wal_receiver r ON true",
                &[],
            )
            .await
            .map_err(e)?;
        o.received_lsn = lsn(row.get(0));
        o.replayed_lsn = lsn(row.get(1));
        o.current_lsn = Lsn::max_known(o.received_lsn, o.replayed_lsn);
        let status: Option<String> = row.get(2);
        o.streaming = status.as_deref() == Some("streaming");
        // Nothing reported by the primary: no lag known, 0; nothing replayed yet: all
        // of it.
        o.lag_bytes = match (lsn(row.get(3)), o.replayed_lsn) {
            (None, _) => 0,
            (Some(end), None) => end.get(),
            (Some(end), Some(replayed)) => end.bytes_since(replayed),
        };
        if let Some(tli) = row.get::<_, Option<i32>>(4) {
            o.timeline = tli as u32;
        } else {
            // No WAL receiver (report_lsn, or between connections): pg_control names the
            // timeline of the last restartpoint, which can predate the switch to the
            // primary's timeline, and a candidate reported on the old timeline was never
            // promoted (found by the failover benchmark: a second node loss stalled).
            // The newest history file is the timeline this standby follows.
            let row = c
                .query_one(
                    "SELECT max(('x' || substr(name, 1, 8))::bit(32)::int) \
                     FROM pg_ls_waldir() WHERE name LIKE '%.history'",
                    &[],
                )
                .await
                .map_err(e)?;
            if let Some(tli) = row.get::<_, Option<i32>>(0) {
                o.timeline = o.timeline.max(tli as u32);
            }
        }
    } else {
        let row = c
            .query_one(
                "SELECT pg_current_wal_lsn(), \
                        ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
                &[],
            )
            .await
            .map_err(e)?;
        o.current_lsn = lsn(row.get(0));
        o.received_lsn = o.current_lsn;
        o.replayed_lsn = o.current_lsn;
        o.timeline = row.get::<_, i32>(1) as u32;
        let rows = c
            .query(
                "SELECT coalesce(application_name, ''), coalesce(state, ''), \
                        coalesce(sync_state, ''), write_lsn, flush_lsn, replay_lsn, \
                        (extract(epoch FROM write_lag) * 1000)::int8, \
                        (extract(epoch FROM flush_lag) * 1000)::int8, \
                        (extract(epoch FROM replay_lag) * 1000)::int8 \
                 FROM pg_stat_replication ORDER BY application_name",
                &[],
            )
            .await
            .map_err(e)?;
        o.replication = rows
            .iter()
            .map(|r| ReplicationPeer {
                application_name: r.get(0),
                state: r.get(1),
                sync_state: r.get(2),
                write_lsn: lsn(r.get(3)),
                flush_lsn: lsn(r.get(4)),
                replay_lsn: lsn(r.get(5)),
                write_lag_ms: ms(r.get(6)),
                flush_lag_ms: ms(r.get(7)),
                replay_lag_ms: ms(r.get(8)),
            })
            .collect();
    }
    Ok(o)
}

fn ms(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The replication role, with a SCRAM verifier computed here so that the password
/// itself never reaches the server (nor its logs), and the grants pg_rewind needs.
pub async fn ensure_replication_role(c: &Client, s: &Settings) -> Result<()> {
    let e = |err| KeeperError::sql("setting up the replication role", err);
    let role = ident(&s.replication_user);
    let exists = c
        .query_opt(
            "SELECT 1 FROM pg_roles WHERE rolname = $1",
            &[&s.replication_user],
        )
        .await
        .map_err(e)?
        .is_some();
    if !exists {
        c.batch_execute(&format!("CREATE ROLE {role} LOGIN REPLICATION"))
            .await
            .map_err(e)?;
    }
    if s.pg_tls.is_some() {
        // Certificates only: a password left from an earlier setup would still work on
        // the initdb host lines below the managed block.
        c.batch_execute(&format!("ALTER ROLE {role} WITH PASSWORD NULL"))
            .await
            .map_err(e)?;
    } else if let Some(pw) = &s.replication_password {
        // Set on every primary transition (not every beat): the verifier is salted, so
        // it cannot be compared with the stored one without the salt's hashing.
        let verifier = postgres_protocol::password::scram_sha_256(pw.as_bytes());
        c.batch_execute(&format!(
            "ALTER ROLE {role} WITH LOGIN REPLICATION PASSWORD '{}'",
            verifier.replace('\'', "''")
        ))
        .await
        .map_err(e)?;
    }
    for f in [
        "pg_catalog.pg_ls_dir(text, boolean, boolean)",
        "pg_catalog.pg_stat_file(text, boolean)",
        "pg_catalog.pg_read_binary_file(text)",
        "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
        "pg_catalog.pg_control_system()",
    ] {
        c.batch_execute(&format!("GRANT EXECUTE ON FUNCTION {f} TO {role}"))
            .await
            .map_err(e)?;
    }
    Ok(())
}

/// The primary's pgquorum slots: one for each name in `create` (peers that have
/// streamed) is made if missing; one for a name in `keep` (every peer of the group) is
/// left as it is; any other pgquorum slot (a dropped node's) is dropped, after its
/// walsender, if one still serves it, is terminated.
pub async fn ensure_slots(c: &Client, create: &[String], keep: &[String]) -> Result<()> {
    let e = |err| KeeperError::sql("managing replication slots", err);
    let rows = c
        .query(
            "SELECT slot_name::text, active_pid FROM pg_replication_slots \
             WHERE slot_type = 'physical' AND slot_name LIKE 'pgquorum\\_%'",
            &[],
        )
        .await
        .map_err(e)?;
    let have: Vec<(String, Option<i32>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for w in create {
        if !have.iter().any(|(n, _)| n == w) {
            c.execute("SELECT pg_create_physical_replication_slot($1, true)", &[w])
                .await
                .map_err(e)?;
            tracing::info!(slot = %w, "replication slot created");
        }
    }
    for (n, pid) in &have {
        if create.contains(n) || keep.contains(n) {
            continue;
        }
        if let Some(pid) = pid {
            c.execute("SELECT pg_terminate_backend($1)", &[pid])
                .await
                .map_err(e)?;
        }
        // The terminated walsender releases the slot as it exits: a moment.
        let mut left = 50;
        loop {
            match c
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND active_pid IS NULL",
                    &[n],
                )
                .await
                .map_err(e)?
            {
                1 => {
                    tracing::info!(slot = %n, "replication slot dropped");
                    break;
                }
                _ if left == 0 => {
                    tracing::warn!(slot = %n, "replication slot still in use; dropped later");
                    break;
                }
                _ => {
                    left -= 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        }
    }
    Ok(())
}

/// pg_is_in_recovery(): the server is a standby (or still ending recovery).
pub async fn in_recovery(c: &Client) -> Result<bool> {
    Ok(c.query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(|e| KeeperError::sql("checking recovery", e))?
        .get(0))
}

/// Promotes and waits for the end of recovery; then checks pg_is_in_recovery().
pub async fn promote(c: &Client) -> Result<()> {
    let done: bool = c
        .query_one("SELECT pg_promote(true, 60)", &[])
        .await
        .map_err(|err| KeeperError::sql("promoting", err))?
        .get(0);
    if !done || in_recovery(c).await? {
        return Err(KeeperError::Unreachable {
            goal: "primary".into(),
            reason: "pg_promote() returned but postgres is still in recovery".into(),
        });
    }
    Ok(())
}

/// After a promotion the end-of-recovery checkpoint runs in the background, and until
/// it completes pg_control still names the old timeline. pg_rewind reads the source's
/// timeline from pg_control: a former primary rewound against us before that checkpoint
/// is told "no rewind required" and then cannot follow us (found by the node-loss
/// end-to-end test). Checkpoints when pg_control lags the timeline being written.
pub async fn checkpoint_if_timeline_lags(c: &Client) -> Result<()> {
    let e = |err| KeeperError::sql("checkpointing after promotion", err);
    let row = c
        .query_one(
            "SELECT (SELECT timeline_id FROM pg_control_checkpoint()), \
                    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
            &[],
        )
        .await
        .map_err(e)?;
    let (control, current): (i32, i32) = (row.get(0), row.get(1));
    if control != current {
        tracing::info!(
            control,
            current,
            "checkpoint so that pg_control names the new timeline"
        );
        c.batch_execute("CHECKPOINT").await.map_err(e)?;
    }
    Ok(())
}

pub async fn reload(c: &Client) -> Result<()> {
    c.batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(|e| KeeperError::sql("reloading the configuration", e))
}

/// The primary's system identifier, asked as the replication role.
pub async fn remote_system_identifier(
    s: &Settings,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<u64> {
    let mut c = Config::new();
    c.host(host)
        .port(port)
        .user(&s.replication_user)
        .dbname("postgres")
        .application_name("pgquorum-keeper")
        .connect_timeout(timeout);
    if let Some(pw) = &s.replication_password {
        c.password(pw.as_bytes());
    }
    let what = format!("primary {host}:{port}");
    let client = connect(c, timeout, &what).await?;
    let sysid: i64 = client
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .map_err(|e| KeeperError::sql(what, e))?
        .get(0);
    Ok(sysid as u64)
}
