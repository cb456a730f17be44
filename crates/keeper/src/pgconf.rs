//! The PostgreSQL configuration the keeper manages: one include file (`pgquorum.conf`)
//! rewritten whole before each start, a marked block at the top of pg_hba.conf, and
//! standby.signal. pg_basebackup and pg_rewind copy the source's files over ours, so
//! everything here is rewritten after them too.

use std::net::IpAddr;
use std::path::Path;

use pgquorum_core::{HostName, PeerNode};

use crate::error::{KeeperError, Result};
use crate::settings::{PgTls, Settings, TUNABLE_DEFAULTS};
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

/// A libpq conninfo value: single-quoted, with `\` and `'` backslash-escaped, so that
/// any value stays one value (libpq's conninfo grammar).
pub fn conninfo_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The conninfo a standby (or pg_rewind) uses to reach `host:port` as the replication
/// role. The password is never in it: libpq reads it from the keeper's password file.
/// With `hostaddr` libpq connects to that address and never resolves `host` (which
/// still names the server to libpq): the WAL receiver cannot be interrupted inside a
/// name lookup, and a dead host's name can take the resolver's whole timeout to fail.
pub fn replication_conninfo(
    s: &Settings,
    host: &HostName,
    hostaddr: Option<IpAddr>,
    port: u16,
    connect_timeout_s: u32,
    extra: &str,
) -> String {
    let mut c = format!("host={}", conninfo_quote(host.as_str()));
    if let Some(ip) = hostaddr {
        c.push_str(&format!(" hostaddr={ip}"));
    }
    c.push_str(&format!(
        " port={port} user={} connect_timeout={connect_timeout_s}",
        conninfo_quote(&s.replication_user),
    ));
    match &s.pg_tls {
        // verify-full: TLS or nothing, the server's certificate must come from our CA
        // and name `host` (not `hostaddr`); the client proves itself with the node's
        // certificate, so no password exists that a fake server could ask for.
        Some(t) => c.push_str(&tls_conninfo(t)),
        None if s.replication_password.is_some() => c.push_str(&format!(
            " passfile={}",
            conninfo_quote(&s.passfile.to_string_lossy())
        )),
        None => {}
    }
    if !extra.is_empty() {
        c.push(' ');
        c.push_str(extra);
    }
    c
}

/// The TLS part of a conninfo (leading blank included).
fn tls_conninfo(t: &PgTls) -> String {
    let mut c = format!(
        " sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        conninfo_quote(&t.ca_copy().to_string_lossy()),
        conninfo_quote(&t.cert_copy().to_string_lossy()),
        conninfo_quote(&t.key_copy().to_string_lossy()),
    );
    if t.has_crl() {
        c.push_str(&format!(
            " sslcrl={}",
            conninfo_quote(&t.crl_copy().to_string_lossy())
        ));
    }
    c
}

/// The same for libpq tools that take no conninfo (pg_basebackup's --host/--port):
/// the environment variables libpq reads. Paths only: nothing secret.
pub fn tls_env(s: &Settings) -> Vec<(&'static str, String)> {
    let Some(t) = &s.pg_tls else {
        return Vec::new();
    };
    let mut env = vec![
        ("PGSSLMODE", "verify-full".to_string()),
        ("PGSSLROOTCERT", t.ca_copy().to_string_lossy().into_owned()),
        ("PGSSLCERT", t.cert_copy().to_string_lossy().into_owned()),
        ("PGSSLKEY", t.key_copy().to_string_lossy().into_owned()),
    ];
    if t.has_crl() {
        env.push(("PGSSLCRL", t.crl_copy().to_string_lossy().into_owned()));
    }
    env
}

/// Copies the node's certificate, key, CA (and CRL, while there is one) into
/// [`PgTls::dir`] (0700, files 0600) where they differ. Returns whether anything
/// changed: postgres then reloads (it rereads its TLS files on SIGHUP), which is how
/// a renewed certificate reaches it.
pub fn sync_tls_files(t: &PgTls) -> Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(&t.dir)
        .map_err(|e| KeeperError::io(format!("creating {}", t.dir.display()), e))?;
    std::fs::set_permissions(&t.dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| KeeperError::io(format!("chmod {}", t.dir.display()), e))?;
    let mut changed = false;
    for (from, to, required) in [
        (&t.cert, t.cert_copy(), true),
        (&t.key, t.key_copy(), true),
        (&t.ca, t.ca_copy(), true),
        (&t.crl, t.crl_copy(), false),
    ] {
        let data = match std::fs::read(from) {
            Ok(d) => d,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::remove_file(&to) {
                    Ok(()) => changed = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(KeeperError::io(format!("removing {}", to.display()), e)),
                }
                continue;
            }
            Err(e) => return Err(KeeperError::io(format!("reading {}", from.display()), e)),
        };
        if std::fs::read(&to).ok().as_deref() != Some(data.as_slice()) {
            write_atomic(&to, &data, 0o600)?;
            changed = true;
        }
    }
    Ok(changed)
}

/// The conninfo a standby uses to reach `primary`.
pub fn primary_conninfo(s: &Settings, primary: &PeerNode, hostaddr: Option<IpAddr>) -> String {
    replication_conninfo(
        s,
        &primary.host,
        hostaddr,
        primary.port,
        2,
        // The WAL receiver ignores connect_timeout: it polls its connection attempt
        // without a deadline (PostgreSQL 15's libpqwalreceiver), so an attempt begun
        // during a network cut lasts as long as the kernel's SYN retries (a minute and
        // more), and the standby was seen to stream again 10 s after the cut healed.
        // TCP_USER_TIMEOUT also bounds the SYN retries: the attempt fails after 3 s and
        // the next one starts wal_retrieve_retry_interval later.
        &format!(
            "application_name={} tcp_user_timeout=3000",
            conninfo_quote(&s.name)
        ),
    )
}

/// One `.pgpass` field: `\` and `:` are backslash-escaped (libpq's rule).
fn pgpass_field(v: &str) -> String {
    v.replace('\\', "\\\\").replace(':', "\\:")
}

/// Writes the replication password into the keeper's password file (0600), or removes
/// the file when there is no password. Returns whether it changed.
pub fn write_passfile(s: &Settings) -> Result<bool> {
    let path = &s.passfile;
    match &s.replication_password {
        Some(pw) => {
            // Settings::validate refuses control characters: one line, one entry.
            let text = format!(
                "*:*:*:{}:{}\n",
                pgpass_field(&s.replication_user),
                pgpass_field(pw)
            );
            if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
                return Ok(false);
            }
            write_atomic(path, text.as_bytes(), 0o600)?;
            Ok(true)
        }
        None => match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(KeeperError::io(format!("removing {}", path.display()), e)),
        },
    }
}

/// Renders pgquorum.conf.
pub fn render(s: &Settings, sync_names: &str, upstream: &Upstream) -> String {
    let mut out = String::from(
        "# Managed by pgquorum: rewritten by the keeper, do not edit.\n\
         # Add settings with the keeper's --pg-param NAME=VALUE.\n",
    );
    let overridden = |k: &str| {
        TUNABLE_DEFAULTS.contains(&k) && s.pg_params.iter().any(|(p, _)| p.eq_ignore_ascii_case(k))
    };
    let mut set = |k: &str, v: String| {
        // A tunable the operator set is written once, with the operator's value, below.
        if !overridden(k) {
            out.push_str(&format!("{k} = {v}\n"));
        }
    };
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
    // A replication connection across a network cut that has healed can stay dead for
    // tens of seconds: the primary's retransmissions back off (25.6 s apart after 30 s),
    // and both ends wait PostgreSQL's default 60 s before giving it up. Meanwhile its
    // pg_stat_replication row says streaming, the monitor counts the standby as a
    // secondary again, and a primary that needs this standby's flushes (the other one
    // cut off next) acknowledges nothing (t71 `standbys_isolated_one_after_the_other`).
    // With 5 s both ends drop a silent connection during the cut, the standby reconnects
    // every wal_retrieve_retry_interval, and streams within a moment of the heal.
    set("wal_sender_timeout", "'5s'".into());
    set("wal_receiver_timeout", "'5s'".into());
    set("hot_standby_feedback", "on".into());
    // Before crash recovery postgres fsyncs the data directory; file by file that took
    // 2+ s on a busy disk, one syncfs() call takes a fraction (Linux >= 5.8 reports its
    // errors). This is most of a crashed postmaster's restart time.
    set("recovery_init_sync_method", "syncfs".into());
    // A backend crash makes the postmaster reinitialise by itself, and its crash
    // recovery makes commits that were waiting for a synchronous standby visible to
    // every client (PostgreSQL ends the wait at the crash). With this off the
    // postmaster exits instead, and the keeper (its parent, which sees the exit at
    // once) restarts it behind the client gate (`ClientAccess::Gated`).
    set("restart_after_crash", "off".into());
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
                conf_quote(&primary_conninfo(s, p, *addr)),
            );
            set("primary_slot_name", conf_quote(&s.slot_name()));
        }
        Upstream::StreamNoSlot(p, addr) => {
            set(
                "primary_conninfo",
                conf_quote(&primary_conninfo(s, p, *addr)),
            );
            set("primary_slot_name", "''".into());
        }
    }
    if let Some(t) = &s.pg_tls {
        set("ssl", "on".into());
        set(
            "ssl_cert_file",
            conf_quote(&t.cert_copy().to_string_lossy()),
        );
        set("ssl_key_file", conf_quote(&t.key_copy().to_string_lossy()));
        // Client certificates (replication's `cert` authentication) must come from
        // our CA, and not be revoked.
        set("ssl_ca_file", conf_quote(&t.ca_copy().to_string_lossy()));
        if t.has_crl() {
            set("ssl_crl_file", conf_quote(&t.crl_copy().to_string_lossy()));
        }
        set("ssl_min_protocol_version", "'TLSv1.3'".into());
    }
    for (k, v) in &s.pg_params {
        out.push_str(&format!("{k} = {}\n", conf_quote(v)));
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

/// A peer's address field: an IP address as a single-host CIDR, a host name as it is
/// (a [`HostName`] is never a pg_hba.conf keyword and holds no blank, quote or '/').
fn hba_address(host: &HostName) -> String {
    match host.ip() {
        Some(std::net::IpAddr::V4(_)) => format!("{host}/32"),
        Some(std::net::IpAddr::V6(_)) => format!("{host}/128"),
        None => host.to_string(),
    }
}

/// The name of the user map in pg_ident.conf that lets the OS user running the keeper
/// (and postgres) in as the superuser when the two names differ.
const IDENT_MAP: &str = "pgquorum";

/// The user map from a peer keeper's certificate (its subject DN) to the replication
/// role.
const CERT_MAP: &str = "pgquorum_cert";

/// The subject of keeper `name`'s certificate as PostgreSQL prints it for
/// `clientname=DN` (RFC 2253: last component first). The whole DN, not the CN alone:
/// an operator's client certificate may carry the same CN as a node.
fn keeper_dn(name: &str) -> String {
    format!("CN={name},OU=keeper,O=pgquorum")
}

/// The lines that let the other nodes of the group in as the replication role
/// (streaming, pg_basebackup, and pg_rewind's database connection). With certificates:
/// TLS only, authenticated by the node's certificate, and the replication role refused
/// without TLS; without: scram-sha-256 with the replication password.
fn peer_lines(s: &Settings, peers: &[PeerNode]) -> String {
    let mut hosts: Vec<String> = peers.iter().map(|p| hba_address(&p.host)).collect();
    hosts.sort();
    hosts.dedup();
    let u = &s.replication_user;
    let mut out = String::new();
    if s.pg_tls.is_some() {
        // The certificate is the proof, from whatever address: a peer given by name
        // would otherwise need the reverse DNS that containers and pods rarely have,
        // and a peer that moved to a new address keeps streaming.
        out.push_str(&format!(
            "hostnossl all {u} all reject\n\
             hostssl replication {u} all cert clientname=DN map={CERT_MAP}\n\
             hostssl postgres {u} all cert clientname=DN map={CERT_MAP}\n"
        ));
        for h in &hosts {
            out.push_str(&format!("hostnossl replication all {h} reject\n"));
        }
    } else {
        for h in &hosts {
            out.push_str(&format!(
                "host replication {u} {h} scram-sha-256\nhost postgres {u} {h} scram-sha-256\n"
            ));
        }
    }
    out
}

/// Who may connect besides the peers' replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAccess {
    /// The operator's --pg-hba lines, then local `peer` connections.
    Open,
    /// A primary restarted in place, until a synchronous standby has confirmed its WAL
    /// up to the end of recovery: PostgreSQL makes a commit that was waiting for a
    /// synchronous standby at the crash (or at a fast shutdown) visible at once, and a
    /// client that read it could lose it to a failover a moment later. Only the
    /// peers' replication and pg_rewind lines and the keeper's own local connection
    /// (the superuser by `peer`) are let in; everything else is rejected (pg_hba.conf
    /// is first-match, so the operator's and initdb's lines below never apply).
    Gated,
}

/// The managed block of pg_hba.conf: replication (and pg_rewind's database
/// connection) for every other node of the group, the operator's --pg-hba lines, and
/// local connections by `peer` (never `trust`: any local user could otherwise log in
/// as the superuser). `os_user` is the user postgres and the keeper run as.
pub fn hba_block(
    s: &Settings,
    peers: &[PeerNode],
    os_user: Option<&str>,
    access: ClientAccess,
) -> String {
    let mut block = format!("{HBA_BEGIN}\n");
    block.push_str(&peer_lines(s, peers));
    let map = match os_user {
        Some(u) if u != s.superuser => format!(" map={IDENT_MAP}"),
        _ => String::new(),
    };
    if access == ClientAccess::Gated {
        // The superuser is a checked role name (never a keyword), written as it is.
        block.push_str(&format!(
            "local all {} peer{map}\nlocal all all reject\nhost all all all reject\n",
            s.superuser
        ));
        block.push_str(HBA_END);
        block.push('\n');
        return block;
    }
    for line in &s.hba_lines {
        block.push_str(line);
        block.push('\n');
    }
    // After the operator's lines (first match wins, so theirs decide), before
    // whatever initdb wrote below (an older keeper initialized with local trust).
    block.push_str(&format!(
        "local all all peer{map}\nlocal replication all peer{map}\n"
    ));
    block.push_str(HBA_END);
    block.push('\n');
    block
}

/// pg_ident.conf's managed block: `os_user` may log in as the superuser; everybody
/// else only as themselves (plain peer); with certificates, each peer keeper's
/// certificate as the replication role. Empty when there is nothing to map.
pub fn ident_block(s: &Settings, peers: &[PeerNode], os_user: Option<&str>) -> String {
    let mut lines = String::new();
    if let Some(u) = os_user.filter(|u| *u != s.superuser) {
        lines.push_str(&format!(
            "{IDENT_MAP} \"{}\" {}\n{IDENT_MAP} /^(.*)$ \\1\n",
            u.replace('"', ""),
            s.superuser
        ));
    }
    if s.pg_tls.is_some() {
        let mut names: Vec<&str> = peers
            .iter()
            .map(|p| p.name.as_str())
            // The monitor and the api crate check names already; a name that could
            // break out of the quotes never reaches the file.
            .filter(|n| pgquorum_core::check_node_name(n).is_ok())
            .collect();
        names.sort();
        names.dedup();
        for n in names {
            lines.push_str(&format!(
                "{CERT_MAP} \"{}\" {}\n",
                keeper_dn(n),
                s.replication_user
            ));
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    format!("{HBA_BEGIN}\n{lines}{HBA_END}\n")
}

/// The OS user this process runs as (postgres runs as the same one).
pub fn os_user() -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// Replaces the managed block of `file` (or puts `block` at its top). Returns whether
/// the file changed.
fn write_block(path: &Path, block: &str) -> Result<bool> {
    let body = match std::fs::read_to_string(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if block.is_empty() {
                return Ok(false);
            }
            String::new()
        }
        Err(e) => return Err(KeeperError::io(format!("reading {}", path.display()), e)),
    };
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
    write_atomic(path, new.as_bytes(), 0o600)?;
    Ok(true)
}

/// Puts the pgquorum blocks at the top of pg_hba.conf and pg_ident.conf. Returns
/// whether either changed.
pub fn write_hba(
    pgdata: &Path,
    s: &Settings,
    peers: &[PeerNode],
    access: ClientAccess,
) -> Result<bool> {
    let user = os_user();
    let hba = write_block(
        &pgdata.join("pg_hba.conf"),
        &hba_block(s, peers, user.as_deref(), access),
    )?;
    let ident = write_block(
        &pgdata.join("pg_ident.conf"),
        &ident_block(s, peers, user.as_deref()),
    )?;
    Ok(hba || ident)
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
            host: host.parse().unwrap(),
            port: 5433,
            streamed: true,
        }
    }

    #[test]
    fn quoting_keeps_values_intact() {
        assert_eq!(conf_quote("a'b\\c"), "'a''b\\\\c'");
        assert_eq!(conninfo_quote("a'b\\c d"), "'a\\'b\\\\c d'");
        let mut s = Settings::new("n1", "/d", 5432);
        s.replication_password = Some("p'w".into());
        let c = primary_conninfo(&s, &peer("a", "10.0.0.1"), None);
        assert!(!c.contains("password"), "{c}");
        assert!(!c.contains("p'w"), "{c}");
        assert!(c.contains("passfile='/d.pgpass'"), "{c}");
        assert!(c.contains("application_name='n1'"), "{c}");
        s.replication_password = None;
        assert!(!primary_conninfo(&s, &peer("a", "10.0.0.1"), None).contains("passfile"));
    }

    #[test]
    fn passfile_holds_the_password_escaped_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings::new("n1", dir.path().join("pg"), 5432);
        s.replication_password = Some("a:b\\c".into());
        assert!(write_passfile(&s).unwrap());
        assert!(!write_passfile(&s).unwrap());
        let text = std::fs::read_to_string(&s.passfile).unwrap();
        assert_eq!(text, "*:*:*:pgquorum_replicator:a\\:b\\\\c\n");
        let mode = std::fs::metadata(&s.passfile).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        s.replication_password = None;
        assert!(write_passfile(&s).unwrap());
        assert!(!s.passfile.exists());
    }

    #[test]
    fn operator_tunables_replace_the_defaults() {
        let mut s = Settings::new("n1", "/d", 5433);
        s.pg_params.push(("max_wal_senders".into(), "32".into()));
        s.pg_params
            .push(("wal_sender_timeout".into(), "30s".into()));
        let t = render(&s, "", &Upstream::None);
        for (name, line) in [
            ("max_wal_senders", "max_wal_senders = '32'"),
            ("wal_sender_timeout", "wal_sender_timeout = '30s'"),
        ] {
            let lines: Vec<&str> = t.lines().filter(|l| l.starts_with(name)).collect();
            assert_eq!(lines, vec![line]);
        }
    }

    #[test]
    fn local_connections_are_peer_never_trust() {
        let s = Settings::new("n1", "/d", 5432);
        let same = hba_block(
            &s,
            &[peer("a", "10.0.0.1")],
            Some("postgres"),
            ClientAccess::Open,
        );
        assert!(
            same.contains("\nlocal all all peer\nlocal replication all peer\n"),
            "{same}"
        );
        assert!(!same.contains("trust"), "{same}");
        assert_eq!(ident_block(&s, &[], Some("postgres")), "");
        let other = hba_block(&s, &[], Some("alice"), ClientAccess::Open);
        assert!(
            other.contains("local all all peer map=pgquorum\n"),
            "{other}"
        );
        let ident = ident_block(&s, &[], Some("alice"));
        assert!(ident.contains("pgquorum \"alice\" postgres\n"), "{ident}");
        // One replication and one pg_rewind line per distinct peer address.
        let b = hba_block(
            &s,
            &[
                peer("a", "10.0.0.1"),
                peer("b", "10.0.0.1"),
                peer("c", "db3"),
            ],
            Some("postgres"),
            ClientAccess::Open,
        );
        assert_eq!(
            b.lines().filter(|l| l.starts_with("host ")).count(),
            4,
            "{b}"
        );
        for l in b.lines().filter(|l| l.starts_with("host ")) {
            assert_eq!(l.split_whitespace().count(), 5, "{l}");
        }
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
            // A cut that healed must not leave a silent replication connection behind.
            "wal_sender_timeout = '5s'",
            "wal_receiver_timeout = '5s'",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in\n{t}");
        }
        assert!(
            t.contains("primary_conninfo = 'host=''10.0.0.1'' port=5433"),
            "{t}"
        );
        // The WAL receiver's connection attempt is bounded by the kernel, not libpq.
        assert!(t.contains(" tcp_user_timeout=3000"), "{t}");
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
        let c = primary_conninfo(&s, &peer("a", "node1"), Some(ip));
        assert!(
            c.starts_with("host='node1' hostaddr=172.18.0.4 port=5433 "),
            "{c}"
        );
        let t = render(&s, "", &Upstream::Stream(peer("a", "node1"), Some(ip)));
        assert!(t.contains("hostaddr=172.18.0.4"), "{t}");
        let t = render(&s, "", &Upstream::Stream(peer("a", "node1"), None));
        assert!(!t.contains("hostaddr"), "{t}");
    }

    fn tls_settings() -> Settings {
        let mut s = Settings::new("n1", "/d/pg", 5432);
        s.pg_tls = Some(PgTls::from_certs_dir(
            Path::new("/certs"),
            "n1",
            Path::new("/d/pg"),
        ));
        s
    }

    #[test]
    fn with_certificates_replication_is_tls_and_certificate_only() {
        let s = tls_settings();
        let c = primary_conninfo(&s, &peer("a", "db1"), "10.0.0.1".parse().ok());
        assert!(
            c.starts_with("host='db1' hostaddr=10.0.0.1 port=5433 "),
            "{c}"
        );
        for part in [
            "sslmode=verify-full",
            "sslrootcert='/d/pg.tls/root.crt'",
            "sslcert='/d/pg.tls/server.crt'",
            "sslkey='/d/pg.tls/server.key'",
        ] {
            assert!(c.contains(part), "{part} missing in {c}");
        }
        assert!(!c.contains("passfile") && !c.contains("sslcrl"), "{c}");
        let t = render(&s, "", &Upstream::None);
        for line in [
            "ssl = on",
            "ssl_cert_file = '/d/pg.tls/server.crt'",
            "ssl_key_file = '/d/pg.tls/server.key'",
            "ssl_ca_file = '/d/pg.tls/root.crt'",
            "ssl_min_protocol_version = 'TLSv1.3'",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in\n{t}");
        }
        let peers = [peer("a", "10.0.0.1"), peer("b", "db2")];
        let b = hba_block(&s, &peers, Some("postgres"), ClientAccess::Open);
        assert!(!b.lines().any(|l| l.starts_with("host ")), "{b}");
        for line in [
            "hostnossl all pgquorum_replicator all reject",
            "hostnossl replication all 10.0.0.1/32 reject",
            "hostnossl replication all db2 reject",
            "hostssl replication pgquorum_replicator all cert clientname=DN map=pgquorum_cert",
            "hostssl postgres pgquorum_replicator all cert clientname=DN map=pgquorum_cert",
        ] {
            assert!(b.lines().any(|l| l == line), "missing {line:?} in\n{b}");
        }
        let i = ident_block(&s, &peers, Some("postgres"));
        assert!(
            i.contains("pgquorum_cert \"CN=a,OU=keeper,O=pgquorum\" pgquorum_replicator\n"),
            "{i}"
        );
        assert!(i.contains("\"CN=b,OU=keeper,O=pgquorum\""), "{i}");
        // Without certificates: the password file and scram, as before.
        let plain = hba_block(
            &Settings::new("n1", "/d", 5432),
            &peers,
            Some("postgres"),
            ClientAccess::Open,
        );
        assert!(!plain.contains("hostssl") && plain.contains("scram-sha-256"));
    }

    #[test]
    fn certificate_files_are_copied_private_and_refreshed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        for f in ["keeper.n1.crt", "keeper.n1.key", "ca.crt"] {
            std::fs::write(certs.join(f), f).unwrap();
        }
        let t = PgTls::from_certs_dir(&certs, "n1", &dir.path().join("pg"));
        assert!(sync_tls_files(&t).unwrap());
        assert!(!sync_tls_files(&t).unwrap());
        assert_eq!(
            std::fs::read_to_string(t.key_copy()).unwrap(),
            "keeper.n1.key"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&t.dir), 0o700);
        assert_eq!(mode(&t.key_copy()), 0o600);
        assert!(!t.has_crl());
        // A renewal and a new CRL are copied; a CRL that goes is removed.
        std::fs::write(certs.join("keeper.n1.crt"), "renewed").unwrap();
        std::fs::write(certs.join("ca.crl"), "crl").unwrap();
        assert!(sync_tls_files(&t).unwrap());
        assert_eq!(std::fs::read_to_string(t.cert_copy()).unwrap(), "renewed");
        assert!(t.has_crl());
        std::fs::remove_file(certs.join("ca.crl")).unwrap();
        assert!(sync_tls_files(&t).unwrap());
        assert!(!t.has_crl());
        // A missing certificate is an error, not a silent plain-text postgres.
        std::fs::remove_file(certs.join("keeper.n1.key")).unwrap();
        assert!(sync_tls_files(&t).is_err());
    }

    #[test]
    fn hba_block_is_replaced_not_duplicated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pg_hba.conf"), "local all all trust\n").unwrap();
        let s = Settings::new("n1", "/d", 5432);
        assert!(write_hba(dir.path(), &s, &[peer("a", "10.0.0.1")], ClientAccess::Open).unwrap());
        assert!(!write_hba(dir.path(), &s, &[peer("a", "10.0.0.1")], ClientAccess::Open).unwrap());
        assert!(write_hba(
            dir.path(),
            &s,
            &[peer("b", "db2.example")],
            ClientAccess::Open
        )
        .unwrap());
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
        assert!(write_hba(dir.path(), &s, &[peer("a", "10.0.0.1")], ClientAccess::Open).unwrap());
        let t = std::fs::read_to_string(dir.path().join("pg_hba.conf")).unwrap();
        let client = t.find("host all all 127.0.0.1/32 trust").unwrap();
        // pg_hba.conf is first-match: the line must come before the operator's lines.
        assert!(client < t.find(HBA_END).unwrap());
        assert!(client < t.find("reject").unwrap());
    }

    #[test]
    fn a_gated_primary_lets_in_only_its_peers_and_the_keeper() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pg_hba.conf"),
            "host all all 0.0.0.0/0 trust\n",
        )
        .unwrap();
        let mut s = Settings::new("n1", "/d", 5432);
        s.hba_lines.push("host all all 127.0.0.1/32 trust".into());
        let peers = [peer("a", "10.0.0.1")];
        assert!(write_hba(dir.path(), &s, &peers, ClientAccess::Gated).unwrap());
        let t = std::fs::read_to_string(dir.path().join("pg_hba.conf")).unwrap();
        // The superuser by peer, through the ident map when the test runs as another
        // OS user.
        let block: Vec<&str> = t
            .lines()
            .skip(1)
            .take_while(|l| *l != HBA_END)
            .map(|l| l.trim_end_matches(" map=pgquorum"))
            .collect();
        assert_eq!(
            block,
            vec![
                "host replication pgquorum_replicator 10.0.0.1/32 scram-sha-256",
                "host postgres pgquorum_replicator 10.0.0.1/32 scram-sha-256",
                "local all postgres peer",
                "local all all reject",
                "host all all all reject",
            ]
        );
        // The operator's and initdb's lines stay below, unreachable until the gate opens.
        assert!(t.ends_with("host all all 0.0.0.0/0 trust\n"), "{t}");
        assert!(write_hba(dir.path(), &s, &peers, ClientAccess::Open).unwrap());
        let t = std::fs::read_to_string(dir.path().join("pg_hba.conf")).unwrap();
        assert!(!t.contains("reject"), "{t}");
        assert!(t.contains("host all all 127.0.0.1/32 trust\n"), "{t}");
        let render = render(&s, "", &Upstream::None);
        assert!(
            render.lines().any(|l| l == "restart_after_crash = off"),
            "{render}"
        );
    }
}
