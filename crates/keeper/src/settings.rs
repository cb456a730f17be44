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
    /// postgres' stderr.
    pub log_file: PathBuf,
    /// How long postgres may take to accept connections after a start.
    pub start_timeout: Duration,
}

impl Settings {
    /// Settings with defaults for everything but the three things that name a node.
    pub fn new(name: impl Into<String>, pgdata: impl Into<PathBuf>, pg_port: u16) -> Settings {
        let pgdata = pgdata.into();
        let state_file = sibling(&pgdata, "pgquorum-state.json");
        let log_file = sibling(&pgdata, "postgres.log");
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
            start_timeout: Duration::from_secs(60),
        }
    }

    /// Checks what can be checked without touching anything.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(KeeperError::Config(format!(
                "node name {:?} must be non-empty and use only letters, digits, '_', '-', '.'",
                self.name
            )));
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
        for (k, _) in &self.pg_params {
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                return Err(KeeperError::Config(format!(
                    "PostgreSQL parameter name {k:?} is not valid"
                )));
            }
        }
        Ok(())
    }

    /// The physical replication slot that serves this node on the primary.
    pub fn slot_name(&self) -> String {
        slot_name(&self.name)
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
