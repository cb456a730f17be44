use std::path::PathBuf;

/// Everything that can go wrong while driving PostgreSQL. Messages say what to do.
/// Causes are part of the message (not `#[source]`) so that a log line carries them.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error(
        "PostgreSQL refuses to run as root; run the keeper as the postgres user, \
         e.g. runuser -u postgres -- pgquorum keeper run ..."
    )]
    RunAsRoot,

    #[error("PostgreSQL binaries not found: {0}; install PostgreSQL or pass --pg-bindir")]
    MissingBinaries(String),

    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },

    #[error("could not run {tool}: {cause}")]
    Spawn { tool: String, cause: std::io::Error },

    #[error(
        "data directory {pgdata} belongs to another cluster: its system identifier is \
         {found}, the group's is {expected}; point --pgdata at this group's data directory \
         or remove it so the keeper can clone the primary"
    )]
    SystemIdentifierMismatch {
        pgdata: PathBuf,
        found: u64,
        expected: u64,
    },

    #[error(
        "PostgreSQL major version mismatch: {what} is version {found}, the binaries in use \
         are version {expected}; use --pg-bindir with the matching version"
    )]
    VersionMismatch {
        what: String,
        found: u32,
        expected: u32,
    },

    #[error("transition to {goal} abandoned: the monitor now assigns {now}")]
    GoalChanged { goal: String, now: String },

    #[error("port {port} is already in use on {addr}; choose another --pg-port or stop what listens there")]
    PortInUse { addr: String, port: u16 },

    #[error(
        "postgres (pid {pid}) is already running on {pgdata} and was not started by this \
         keeper; stop it first"
    )]
    AlreadyRunning { pid: i32, pgdata: PathBuf },

    #[error("postgres did not start: {reason}; last lines of {log}:\n{tail}")]
    StartFailed {
        reason: String,
        log: PathBuf,
        tail: String,
    },

    #[error("timed out: {0}")]
    Timeout(String),

    #[error("SQL on {what}: {cause}")]
    Sql {
        what: String,
        cause: tokio_postgres::Error,
    },

    #[error("{context}: {cause}")]
    Io {
        context: String,
        cause: std::io::Error,
    },

    #[error("invalid setting: {0}")]
    Config(String),

    #[error("monitor group: {0}")]
    Monitor(String),

    /// The monitor group refused this node (e.g. another cluster's system identifier,
    /// another PostgreSQL major version): an operator must act.
    #[error("the monitor group refused this node: {0}")]
    Refused(String),

    /// The monitor group does not know this node id (any more): register again.
    #[error("the monitor group does not know node id {0}")]
    UnknownNode(u64),

    /// The assignment cannot be carried out as given (e.g. a standby goal with no primary).
    #[error("cannot reach {goal}: {reason}")]
    Unreachable { goal: String, reason: String },
}

impl KeeperError {
    pub(crate) fn io(context: impl Into<String>, cause: std::io::Error) -> Self {
        KeeperError::Io {
            context: context.into(),
            cause,
        }
    }

    pub(crate) fn sql(what: impl Into<String>, cause: tokio_postgres::Error) -> Self {
        KeeperError::Sql {
            what: what.into(),
            cause,
        }
    }
}

pub type Result<T, E = KeeperError> = std::result::Result<T, E>;
