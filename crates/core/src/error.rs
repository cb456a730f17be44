use thiserror::Error;

use crate::input::quote_prefix;

/// Broad class of an error, so the API layer can map it to a status code without
/// matching on every variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
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
    #[error("not allowed now: {0}")]
    NotAllowed(String),
}

impl CoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CoreError::UnknownFormation(_) | CoreError::UnknownNode(_) => ErrorKind::NotFound,
            CoreError::FormationExists(_) => ErrorKind::AlreadyExists,
            CoreError::InvalidFormationName(_) | CoreError::InvalidSetting(_) => {
                ErrorKind::InvalidArgument
            }
            CoreError::FormationNotEmpty(_) | CoreError::NotAllowed(_) => {
                ErrorKind::FailedPrecondition
            }
        }
    }
}
