use thiserror::Error;

use crate::input::quote_prefix;
use crate::model::{GroupId, NodeState};

/// What a caller can do about a refusal, so that the API layer maps it to a status code
/// (crates/api/src/status.rs, the one place) and a client acts on it without reading
/// the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The same request will be allowed by itself shortly (a node between two states
    /// for a heartbeat or two): retry it.
    RetryLater,
    /// Not allowed in the cluster's current state; it may be allowed after the operator
    /// or the cluster changes something. Retrying the same request at once won't help.
    NotAllowedNow,
    /// The request itself is wrong (a bad value); it will never be allowed as it is.
    Invalid,
    /// It names a formation or node that does not exist.
    NotFound,
    /// It creates something that already exists.
    AlreadyExists,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::RetryLater,
        ErrorClass::NotAllowedNow,
        ErrorClass::Invalid,
        ErrorClass::NotFound,
        ErrorClass::AlreadyExists,
    ];

    /// The class's name on the wire (the `x-pgquorum-refusal` metadata value).
    pub const fn name(self) -> &'static str {
        match self {
            ErrorClass::RetryLater => "retry_later",
            ErrorClass::NotAllowedNow => "not_allowed_now",
            ErrorClass::Invalid => "invalid",
            ErrorClass::NotFound => "not_found",
            ErrorClass::AlreadyExists => "already_exists",
        }
    }

    pub fn from_name(s: &str) -> Option<ErrorClass> {
        ErrorClass::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// Why a command was refused. A refused command changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoreError {
    #[error("formation {} does not exist", quote_prefix(.0))]
    UnknownFormation(String),
    #[error("formation {} already exists", quote_prefix(.0))]
    FormationExists(String),
    #[error("invalid formation name {}: use 1-63 characters among a-z, 0-9, '-' and '_'", quote_prefix(.0))]
    InvalidFormationName(String),
    #[error("formation {} still has nodes; drop them first", quote_prefix(.0))]
    FormationNotEmpty(String),
    #[error("node {} does not exist", quote_prefix(.0))]
    UnknownNode(String),
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// The primary has not reached its goal yet (e.g. it applies a new
    /// synchronous_standby_names right after a standby joined): passes by itself.
    #[error("primary {node} is still moving to {goal} (it reports {reported})")]
    StillMoving {
        node: String,
        goal: NodeState,
        reported: NodeState,
    },
    #[error("a failover is in progress in group {group}; try again when it is over")]
    FailoverInProgress { group: GroupId },
    #[error("node {node} is being dropped")]
    BeingDropped { node: String },
    /// A decision made against an older state of the node (its goal changed since).
    #[error("stale decision for node {node}: its goal changed from {expected} to {goal} since")]
    StaleDecision {
        node: String,
        expected: NodeState,
        goal: NodeState,
    },
    /// A keeper report older than one already applied for the node (reordered in
    /// flight, or admitted by a leader that never saw the newer one).
    #[error("stale report for node {node}: sequence {sequence}, the newest applied is {newest}")]
    StaleReport {
        node: String,
        sequence: u64,
        newest: u64,
    },
    #[error("node {node}: its data directory belongs to another cluster (system identifier {system_identifier}, the group's is {group_system_identifier}); remove the data directory so that the node is cloned afresh")]
    OtherCluster {
        node: String,
        system_identifier: u64,
        group_system_identifier: u64,
    },
    #[error("node {node}: the group already has {size} nodes, the most it may have (each standby holds a replication slot and a WAL sender on the primary); drop a node first")]
    GroupFull { node: String, size: usize },
    /// Any other refusal because of the cluster's current state.
    #[error("not allowed now: {0}")]
    NotAllowed(String),
}

impl CoreError {
    /// What the caller can do about it. An exhaustive match: a new variant must be
    /// classified before it compiles.
    pub const fn class(&self) -> ErrorClass {
        match self {
            CoreError::UnknownFormation(_) | CoreError::UnknownNode(_) => ErrorClass::NotFound,
            CoreError::FormationExists(_) => ErrorClass::AlreadyExists,
            CoreError::InvalidFormationName(_) | CoreError::InvalidSetting(_) => {
                ErrorClass::Invalid
            }
            CoreError::StillMoving { .. } => ErrorClass::RetryLater,
            CoreError::FormationNotEmpty(_)
            | CoreError::FailoverInProgress { .. }
            | CoreError::BeingDropped { .. }
            | CoreError::StaleDecision { .. }
            | CoreError::StaleReport { .. }
            | CoreError::OtherCluster { .. }
            | CoreError::GroupFull { .. }
            | CoreError::NotAllowed(_) => ErrorClass::NotAllowedNow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_round_trip_and_are_distinct() {
        for c in ErrorClass::ALL {
            assert_eq!(ErrorClass::from_name(c.name()), Some(c));
        }
        assert_eq!(ErrorClass::from_name("retry"), None);
    }

    #[test]
    fn a_primary_between_two_states_is_retried_later_and_says_so() {
        let e = CoreError::StillMoving {
            node: "a".into(),
            goal: NodeState::Primary,
            reported: NodeState::ApplySettings,
        };
        assert_eq!(e.class(), ErrorClass::RetryLater);
        assert_eq!(
            e.to_string(),
            "primary a is still moving to primary (it reports apply_settings)"
        );
    }

    #[test]
    fn refusals_of_the_current_state_are_not_retried_blindly() {
        assert_eq!(
            CoreError::FailoverInProgress { group: 0 }.class(),
            ErrorClass::NotAllowedNow
        );
        assert_eq!(
            CoreError::NotAllowed("x".into()).class(),
            ErrorClass::NotAllowedNow
        );
        assert_eq!(
            CoreError::InvalidSetting("x".into()).class(),
            ErrorClass::Invalid
        );
        assert_eq!(
            CoreError::UnknownNode("n".into()).class(),
            ErrorClass::NotFound
        );
        assert_eq!(
            CoreError::FormationExists("f".into()).class(),
            ErrorClass::AlreadyExists
        );
    }
}
