//! The PostgreSQL configuration the keeper manages: one include file (`pgquorum.conf`)
//! rewritten whole before each start, a marked block at the top of pg_hba.conf, and
//! standby.signal. pg_basebackup and pg_rewind copy the source's files over ours, so
//! everything here is rewritten after them too.

use std::net::IpAddr;
use std::path::Path;

use pgquorum_core::PeerNode;

use crate::error::{KeeperError, Result};
use crate::settings::Settings;
use crate::state::write_atomic;

pub const INCLUDE_FILE: &str = "pgquorum.conf";
const HBA_BEGIN: &str = "# BEGIN pgquorum (managed by the keeper; edits here are overwritten)";
const HBA_END: &str = "# END pgquorum";

/// How this node's postgres must run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// A primary (or a standby whose promotion is pending): no primary_conninfo.
    None,
    /// Stream from this node (the primary), through this node's slot there; at the
    /// address its name last resolved to, when known ([`crate::addresses`]).
    Stream(PeerNode, Option<IpAddr>),
    /// Stream from another standby (fast_forward) without a slot: only primaries keep
    /// slots for their peers, and a slot that does not exist stops streaming.
    StreamNoSlot(PeerNode, Option<IpAddr>),
}

/// A postgresql.conf string literal.
pub fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// A libpq conninfo value.
fn conninfo_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The conninfo a standby uses to reach `primary`. With `hostaddr` libpq connects to
/// that address and never resolves `host` (which still names the server to libpq):
/// the WAL receiver cannot be interrupted inside a name lookup, and a dead host's name
/// can take the resolver's whole timeout to fail.
pub fn primary_conninfo(
    s: &Settings,
    primary: &PeerNode,
    hostaddr: Option<IpAddr>,
    with_password: bool,
) -> String {
    let mut c = format!("host={}", conninfo_quote(&primary.host));
    if let Some(ip) = hostaddr {
        c.push_str(&format!(" hostaddr={ip}"));
    }
    c.push_str(&format!(
        " port={} user={} application_name={} connect_timeout=2",
        primary.port,
        conninfo_quote(&s.replication_user),
        conninfo_quote(&s.name),
    ));
    if with_password {
        if let Some(pw) = &s.replication_password {
            c.push_str(&format!(" password={}", conninfo_quote(pw)));
        }
    }
    c
}

/// Renders pgquorum.conf.
pub fn render(s: &Settings, sync_names: &str, upstream: &Upstream) -> String {
    let mut out = String::from(
        "# Managed by pgquorum: rewritten by the keeper, do not edit.\n\
         # Add settings with the keeper's --pg-param NAME=VALUE.\n",
    );
    let mut set = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
    set("port", s.pg_port.to_string());
    set("listen_addresses", conf_quote(&s.listen_addresses));
    set(
        "unix_socket_directories",
        conf_quote(&s.socket_dir.to_string_lossy()),
    );
    set("wal_level", "replica".into());
    set("hot_standby", "on".into());
    // pg_rewind needs hint bits WAL-logged (or data checksums).
    set("wal_log_hints", "on".into());
    set("max_wal_senders", "16".into());
    set("max_replication_slots", "16".into());
    // PostgreSQL's default 5 s makes a standby wait that long to reconnect after a
    // primary restart, and commits on a synchronous primary wait with it.
    set("wal_retrieve_retry_interval", "'200ms'".into());
    set("hot_standby_feedback", "on".into());
    // Before crash recovery postgres fsyncs the data directory; file by file that took
    // 2+ s on a busy disk, one syncfs() call takes a fraction (Linux >= 5.8 reports its
    // errors). This is most of a crashed postmaster's restart time.
    set("recovery_init_sync_method", "syncfs".into());
    // pg_rewind reads the old primary's WAL back to the last common checkpoint; keep it.
    set("wal_keep_size", "'512MB'".into());
    set("recovery_target_timeline", "'latest'".into());
    set("synchronous_standby_names", conf_quote(sync_names));
    match upstream {
        Upstream::None => {
            set("primary_conninfo", "''".into());
            set("primary_slot_name", "''".into());
        }
        Upstream::Stream(p, addr) => {
            set(
                "primary_conninfo",
                conf_quote(&primary_conninfo(s, p, *addr, true)),
            );
            set("primary_slot_name", conf_quote(&s.slot_name()));
        }
        Upstream::StreamNoSlot(p, addr) => {
            set(
                "primary_conninfo",
                conf_quote(&primary_conninfo(s, p, *addr, true)),
            );
            set("primary_slot_name", "''".into());
        }
    }
    for (k, v) in &s.pg_params {
        set(k, conf_quote(v));
    }
    out
}

/// Writes pgquorum.conf and makes postgresql.conf include it (last, so it wins over
/// postgresql.conf; ALTER SYSTEM still wins over both). Returns whether anything changed.
pub fn write_conf(
    pgdata: &Path,
    s: &Settings,
    sync_names: &str,
    upstream: &Upstream,
) -> Result<bool> {
    let path = pgdata.join(INCLUDE_FILE);
    let text = render(s, sync_names, upstream);
    let mut changed = false;
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        write_atomic(&path, text.as_bytes(), 0o600)?;
        changed = true;
    }
    let main = pgdata.join("postgresql.conf");
    let body = std::fs::read_to_string(&main)
        .map_err(|e| KeeperError::io(format!("reading {}", main.display()), e))?;
    let line = format!("include '{INCLUDE_FILE}'");
    if !body.lines().any(|l| l.trim() == line) {
        let mut nb = body;
        if !nb.ends_with('\n') {
            nb.push('\n');
        }
        nb.push_str(&format!("{line}\n"));
        write_atomic(&main, nb.as_bytes(), 0o600)?;
        changed = true;
    }
    Ok(changed)
}

fn hba_address(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => format!("{host}/32"),
        Ok(std::net::IpAddr::V6(_)) => format!("{host}/128"),
        Err(_) => host.to_string(),
    }
}

/// Puts the pgquorum block at the top of pg_hba.conf: replication (and pg_rewind's
/// database connection) for every other node of the group. Returns whether it changed.
pub fn write_hba(pgdata: &Path, s: &Settings, peers: &[PeerNode]) -> Result<bool> {
    let path = pgdata.join("pg_hba.conf");
    let body = std::fs::read_to_string(&path)
        .map_err(|e| KeeperError::io(format!("reading {}", path.display()), e))?;
    let mut block = format!("{HBA_BEGIN}\n");
    let mut hosts: Vec<String> = peers.iter().map(|p| hba_address(&p.host)).collect();
    hosts.sort();
    hosts.dedup();
    for h in &hosts {
        block.push_str(&format!(
            "host replication {u} {h} scram-sha-256\nhost postgres {u} {h} scram-sha-256\n",
            u = s.replication_user
        ));
    }
    for line in &s.hba_lines {
        block.push_str(line);
        block.push('\n');
    }
    block.push_str(HBA_END);
    block.push('\n');
    // Keep everything outside our block as the operator left it.
    let mut rest = String::new();
    let mut inside = false;
    for l in body.lines() {
        if l == HBA_BEGIN {
            inside = true;
            continue;
        }
        if inside {
            if l == HBA_END {
                inside = false;
            }
            continue;
        }
        rest.push_str(l);
        rest.push('\n');
    }
    let new = format!("{block}{rest}");
    if new == body {
        return Ok(false);
    }
    write_atomic(&path, new.as_bytes(), 0o600)?;
    Ok(true)
}

pub fn set_standby_signal(pgdata: &Path, on: bool) -> Result<()> {
    let p = pgdata.join("standby.signal");
    if on {
        if !p.exists() {
            write_atomic(&p, b"", 0o600)?;
        }
    } else if p.exists() {
        std::fs::remove_file(&p)
            .map_err(|e| KeeperError::io(format!("removing {}", p.display()), e))?;
    }
    // A leftover recovery.signal would start targeted archive recovery instead.
    let r = pgdata.join("recovery.signal");
    if r.exists() {
        std::fs::remove_file(&r)
            .map_err(|e| KeeperError::io(format!("removing {}", r.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn peer(name: &str, host: &str) -> PeerNode {
        PeerNode {
            node_id: 2,
            name: name.into(),
            host: host.into(),
            port: 5433,
        }
    }

    #[test]
    fn quoting_keeps_values_intact() {
        assert_eq!(conf_quote("a'b\\c"), "'a''b\\\\c'");
        let mut s = Settings::new("n1", "/d", 5432);
        s.replication_password = Some("p'w".into());
        let c = primary_conninfo(&s, &peer("a", "10.0.0.1"), None, true);
        assert!(c.contains("password='p\\'w'"), "{c}");
        assert!(c.contains("application_name='n1'"), "{c}");
    }

    #[test]
    fn managed_conf_for_a_standby() {
        let mut s = Settings::new("n1", "/d", 5433);
        s.socket_dir = "/run/pg".into();
        s.pg_params.push(("work_mem".into(), "7MB".into()));
        let t = render(&s, "", &Upstream::StreamNoSlot(peer("a", "10.0.0.1"), None));
        assert!(t.contains("primary_slot_name = ''"), "{t}");
        assert!(t.contains("host=10.0.0.1") || t.contains("10.0.0.1"), "{t}");
        let t = render(&s, "", &Upstream::Stream(peer("a", "10.0.0.1"), None));
        for line in [
            "port = 5433",
            "unix_socket_directories = '/run/pg'",
            "wal_log_hints = on",
            "recovery_target_timeline = 'latest'",
            "synchronous_standby_names = ''",
            "primary_slot_name = 'pgquorum_n1'",
            "work_mem = '7MB'",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in\n{t}");
        }
        assert!(
            t.contains("primary_conninfo = 'host=''10.0.0.1'' port=5433"),
            "{t}"
        );
        let p = render(&s, "ANY 1 (b)", &Upstream::None);
        assert!(p.lines().any(|l| l == "primary_conninfo = ''"));
        assert!(p
            .lines()
            .any(|l| l == "synchronous_standby_names = 'ANY 1 (b)'"));
    }

    #[test]
    fn a_resolved_upstream_is_reached_by_address() {
        let s = Settings::new("n1", "/d", 5432);
        let ip: IpAddr = "172.18.0.4".parse().unwrap();
        let c = primary_conninfo(&s, &peer("a", "node1"), Some(ip), false);
        assert!(
            c.starts_with("host='node1' hostaddr=172.18.0.4 port=5433 "),
            "{c}"
        );
        let t = render(&s, "", &Upstream::Stream(peer("a", "node1"), Some(ip)));
        assert!(t.contains("hostaddr=172.18.0.4"), "{t}");
        let t = render(&s, "", &Upstream::Stream(peer("a", "node1"), None));
        assert!(!t.contains("hostaddr"), "{t}");
    }

    #[test]
    fn hba_block_is_replaced_not_duplicated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pg_hba.conf"), "local all all trust\n").unwrap();
        let s = Settings::new("n1", "/d", 5432);
        assert!(write_hba(dir.path(), &s, &[peer("a", "10.0.0.1")]).unwrap());
        assert!(!write_hba(dir.path(), &s, &[peer("a", "10.0.0.1")]).unwrap());
        assert!(write_hba(dir.path(), &s, &[peer("b", "db2.example")]).unwrap());
        let t = std::fs::read_to_string(dir.path().join("pg_hba.conf")).unwrap();
        assert!(t.starts_with(HBA_BEGIN));
        assert!(!t.contains("10.0.0.1"));
        assert!(t.contains("host replication pgquorum_replicator db2.example scram-sha-256"));
        assert_eq!(t.matches(HBA_BEGIN).count(), 1);
        assert!(t.ends_with("local all all trust\n"));
    }

    #[test]
    fn client_hba_lines_live_in_the_managed_block() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pg_hba.conf"),
            "host all all 0.0.0.0/0 reject\n",
        )
        .unwrap();
        let mut s = Settings::new("n1", "/d", 5432);
        s.hba_lines.push("host all all 127.0.0.1/32 trust".into());
        assert!(write_hba(dir.path(), &s, &[peer("a", "10.0.0.1")]).unwrap());
        let t = std::fs::read_to_string(dir.path().join("pg_hba.conf")).unwrap();
        let client = t.find("host all all 127.0.0.1/32 trust").unwrap();
        // pg_hba.conf is first-match: the line must come before the operator's lines.
        assert!(client < t.find(HBA_END).unwrap());
        assert!(client < t.find("reject").unwrap());
    }
}
