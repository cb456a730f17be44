//! The keeper's settings, as given on the command line or in its config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{KeeperError, Result};

#[derive(Debug, Clone)]
pub struct Settings {
    /// Node name: unique in the formation; also the standby's application_name.
    pub name: String,
    pub formation: String,
    pub pgdata: PathBuf,
    pub pg_port: u16,
    /// The address other nodes and clients use to reach this postgres.
    pub pg_host: String,
    /// postgresql.conf `listen_addresses`.
    pub listen_addresses: String,
    /// postgresql.conf `unix_socket_directories`; the keeper connects through it.
    pub socket_dir: PathBuf,
    /// Where initdb, postgres, pg_basebackup, ... live; None = `pg_config --bindir`, then PATH.
    pub bindir: Option<PathBuf>,
    /// The superuser the keeper connects as over the local socket.
    pub superuser: String,
    pub replication_user: String,
    pub replication_password: Option<String>,
    /// Extra postgresql.conf parameters, written into the managed include file.
    pub pg_params: Vec<(String, String)>,
    /// Extra pg_hba.conf lines for clients, kept in the managed block (so they reach
    /// every node, also one cloned by pg_basebackup).
    pub hba_lines: Vec<String>,
    pub candidate_priority: u8,
    pub replication_quorum: bool,
    /// Monitor group members, HOST:PORT.
    pub monitors: Vec<String>,
    pub http: Option<SocketAddr>,
    /// Serve the HTTP endpoints over HTTPS with this certificate (the keeper's own);
    /// None: plain HTTP, as HAProxy and probes expect by default.
    pub http_tls: Option<std::sync::Arc<pgquorum_trust::Tls>>,
    /// The keeper's own run-state (current state, node id), kept outside --pgdata so that
    /// replacing the data directory never loses it.
    pub state_file: PathBuf,
    /// postgres' stderr (created 0600: it may quote connection strings).
    pub log_file: PathBuf,
    /// libpq password file with the replication password (0600, outside --pgdata so
    /// that pg_basebackup never copies it); `primary_conninfo` names it with
    /// `passfile=`, so the password is in no configuration file, log or environment.
    pub passfile: PathBuf,
    /// How long postgres may take to accept connections after a start.
    pub start_timeout: Duration,
    /// PostgreSQL over TLS with this node's keeper certificate (`--certs-dir`): `ssl =
    /// on`, `hostssl` + client-certificate authentication for replication, standbys
    /// connecting with `sslmode=verify-full`. None (`--insecure`): replication
    /// authenticates with the password.
    pub pg_tls: Option<PgTls>,
}

/// Where the node's certificate comes from, and where the keeper keeps the copies that
/// postgres and libpq read (`<pgdata>.tls/`, 0700, files 0600, owned by the keeper's
/// OS user, which postgres runs as: PostgreSQL refuses a key others can read, and the
/// certificates directory may belong to another user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// `ca.crl`; used only while it exists.
    pub crl: PathBuf,
    /// The directory of the copies.
    pub dir: PathBuf,
}

impl PgTls {
    /// The certificate of keeper `name` in `certs_dir` (named as `pgquorum cert` names
    /// it), copied beside `pgdata`.
    pub fn from_certs_dir(certs_dir: &Path, name: &str, pgdata: &Path) -> PgTls {
        PgTls {
            cert: certs_dir.join(format!("keeper.{name}.crt")),
            key: certs_dir.join(format!("keeper.{name}.key")),
            ca: certs_dir.join("ca.crt"),
            crl: certs_dir.join("ca.crl"),
            dir: sibling(pgdata, "tls"),
        }
    }

    pub fn cert_copy(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    pub fn key_copy(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn ca_copy(&self) -> PathBuf {
        self.dir.join("root.crt")
    }
    pub fn crl_copy(&self) -> PathBuf {
        self.dir.join("root.crl")
    }
    /// Whether a CRL was copied (postgres and libpq are given one only then).
    pub fn has_crl(&self) -> bool {
        self.crl_copy().is_file()
    }
}

impl Settings {
    /// Settings with defaults for everything but the three things that name a node.
    pub fn new(name: impl Into<String>, pgdata: impl Into<PathBuf>, pg_port: u16) -> Settings {
        let pgdata = pgdata.into();
        let state_file = sibling(&pgdata, "pgquorum-state.json");
        let log_file = sibling(&pgdata, "postgres.log");
        let passfile = sibling(&pgdata, "pgpass");
        Settings {
            name: name.into(),
            formation: pgquorum_core::DEFAULT_FORMATION.to_string(),
            pgdata,
            pg_port,
            pg_host: "localhost".to_string(),
            listen_addresses: "*".to_string(),
            socket_dir: PathBuf::from("/tmp"),
            bindir: None,
            superuser: "postgres".to_string(),
            replication_user: "pgquorum_replicator".to_string(),
            replication_password: None,
            pg_params: Vec::new(),
            hba_lines: Vec::new(),
            candidate_priority: 50,
            replication_quorum: true,
            monitors: Vec::new(),
            http: None,
            http_tls: None,
            state_file,
            log_file,
            passfile,
            start_timeout: Duration::from_secs(60),
            pg_tls: None,
        }
    }

    /// Checks what can be checked without touching anything.
    pub fn validate(&self) -> Result<()> {
        // The monitor group applies the same rules; refusing here says so before
        // anything is touched.
        pgquorum_core::check_node_name(&self.name)
            .map_err(|e| KeeperError::Config(format!("--name: {e}")))?;
        if self.formation != pgquorum_core::DEFAULT_FORMATION {
            pgquorum_core::check_formation_name(&self.formation)
                .map_err(|e| KeeperError::Config(format!("--formation: {e}")))?;
        }
        if self.pg_port == 0 {
            return Err(KeeperError::Config("--pg-port must not be 0".into()));
        }
        if !self.pgdata.is_absolute() {
            return Err(KeeperError::Config(format!(
                "--pgdata {} must be an absolute path",
                self.pgdata.display()
            )));
        }
        if self.candidate_priority > 100 {
            return Err(KeeperError::Config(
                "--candidate-priority must be between 0 and 100".into(),
            ));
        }
        pgquorum_core::HostName::parse(&self.pg_host)
            .map_err(|e| KeeperError::Config(format!("--pg-host: {e}")))?;
        for (what, v) in [
            ("--superuser", &self.superuser),
            ("--replication-user", &self.replication_user),
        ] {
            check_role_name(what, v)?;
        }
        if let Some(pw) = &self.replication_password {
            // A password file has one entry per line; control characters cannot be
            // written into it.
            if pw.is_empty() || pw.chars().any(|c| c.is_control()) {
                return Err(KeeperError::Config(
                    "--replication-password must be non-empty and contain no control characters"
                        .into(),
                ));
            }
        }
        let mut managed = Vec::new();
        for (k, _) in &self.pg_params {
            if k.is_empty()
                || k.len() > 63
                || !k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                return Err(KeeperError::Config(format!(
                    "PostgreSQL parameter name {} is not valid",
                    pgquorum_core::quote_prefix(k)
                )));
            }
            if is_managed_param(k) {
                managed.push(k.as_str());
            }
        }
        if self.pg_tls.is_some() {
            // With certificates the keeper runs postgres' TLS itself.
            managed.extend(
                self.pg_params
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .filter(|k| is_managed_tls_param(k)),
            );
        }
        if !managed.is_empty() {
            return Err(KeeperError::Config(format!(
                "--pg-param {}: managed by pgquorum, which sets {} itself; use the keeper's own options (--pg-port, --listen-addresses, --socket-dir, ...) or the monitor's settings instead",
                managed.join(", "),
                if managed.len() == 1 { "it" } else { "them" }
            )));
        }
        Ok(())
    }

    /// The physical replication slot that serves this node on the primary.
    pub fn slot_name(&self) -> String {
        slot_name(&self.name)
    }
}

/// Parameters the keeper sets itself and that an operator must not override: the
/// role of the node (replication source, synchronous standbys, recovery), where it
/// listens, and where its configuration and authentication come from. Tunables
/// that pgquorum only gives a default (max_wal_senders, wal_keep_size, ...) may be
/// set with --pg-param, which then replaces the default.
pub const MANAGED_PARAMS: [&str; 25] = [
    "port",
    "listen_addresses",
    "unix_socket_directories",
    "unix_socket_permissions",
    "wal_level",
    "hot_standby",
    "wal_log_hints",
    "synchronous_standby_names",
    "synchronous_commit",
    "primary_conninfo",
    "primary_slot_name",
    "recovery_target_timeline",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "promote_trigger_file",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "include",
    "include_if_exists",
    // The keeper restarts a crashed postmaster itself, behind the client gate.
    "restart_after_crash",
];

/// Defaults pgquorum writes that --pg-param may replace.
pub const TUNABLE_DEFAULTS: [&str; 8] = [
    "max_wal_senders",
    "max_replication_slots",
    "wal_retrieve_retry_interval",
    "wal_sender_timeout",
    "wal_receiver_timeout",
    "hot_standby_feedback",
    "recovery_init_sync_method",
    "wal_keep_size",
];

/// PostgreSQL parameter names are case-insensitive.
pub fn is_managed_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    MANAGED_PARAMS.contains(&n.as_str()) || n == "include_dir"
}

/// Parameters the keeper sets when postgres runs with the node's certificate.
pub const MANAGED_TLS_PARAMS: [&str; 6] = [
    "ssl",
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_ca_file",
    "ssl_crl_file",
    "ssl_min_protocol_version",
];

pub fn is_managed_tls_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    MANAGED_TLS_PARAMS.contains(&n.as_str())
}

/// Role names the keeper writes into pg_hba.conf and SQL: a plain lower-case
/// identifier, and none of pg_hba.conf's keywords.
fn check_role_name(what: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !["all", "sameuser", "samerole", "samegroup", "replication"].contains(&v);
    if ok {
        Ok(())
    } else {
        Err(KeeperError::Config(format!(
            "{what} {}: use 1-63 characters among a-z, 0-9 and '_', not starting with a digit",
            pgquorum_core::quote_prefix(v)
        )))
    }
}

/// `<pgdata>.<suffix>` next to the data directory.
pub(crate) fn sibling(pgdata: &Path, suffix: &str) -> PathBuf {
    let mut s = pgdata.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// Slot names allow only [a-z0-9_].
pub fn slot_name(node_name: &str) -> String {
    let clean: String = node_name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("pgquorum_{clean}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn with_param(k: &str) -> Settings {
        let mut s = Settings::new("n1", "/d", 5432);
        s.pg_params.push((k.into(), "x".into()));
        s
    }

    #[test]
    fn managed_parameters_are_refused_by_name() {
        for k in [
            "synchronous_standby_names",
            "primary_conninfo",
            "port",
            "PORT",
            "hba_file",
            "synchronous_commit",
            "include_dir",
        ] {
            let e = with_param(k).validate().unwrap_err().to_string();
            assert!(e.contains(k), "{e}");
            assert!(e.contains("managed by pgquorum"), "{e}");
        }
        assert!(with_param("work_mem").validate().is_ok());
        assert!(with_param("max_wal_senders").validate().is_ok());
        let mut s = with_param("port");
        s.pg_params.push(("primary_conninfo".into(), "x".into()));
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("port, primary_conninfo"), "{e}");
    }

    #[test]
    fn hosts_roles_and_passwords_are_checked() {
        let mut s = Settings::new("n1", "/d", 5432);
        s.pg_host = "db1 trust".into();
        assert!(s.validate().is_err());
        let mut s = Settings::new("n1", "/d", 5432);
        s.replication_user = "all".into();
        assert!(s.validate().is_err());
        let mut s = Settings::new("n1", "/d", 5432);
        s.superuser = "a b".into();
        assert!(s.validate().is_err());
        let mut s = Settings::new("n1", "/d", 5432);
        s.replication_password = Some("a\nb".into());
        assert!(s.validate().is_err());
        s.replication_password = Some("p:w\\'x".into());
        assert!(s.validate().is_ok());
    }
}
