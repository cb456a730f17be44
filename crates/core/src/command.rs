use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::model::{ClusterState, Formation, FormationSettings, Millis};

/// A change to the cluster state. Replicated through Raft; applied on every member by
/// [`ClusterState::apply`] with the time the leader proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateFormation { name: String, number_sync_standbys: Option<u32> },
    DropFormation { name: String },
}

/// What an applied command produced, returned to the client that proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done { description: String },
}

fn valid_formation_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl ClusterState {
    /// Apply one command. Deterministic; on error the state is unchanged.
    pub fn apply(&mut self, cmd: &Command, _now: Millis) -> Result<Outcome, CoreError> {
        match cmd {
            Command::CreateFormation { name, number_sync_standbys } => {
                if !valid_formation_name(name) {
                    return Err(CoreError::InvalidFormationName(name.clone()));
                }
                if self.formations.contains_key(name) {
                    return Err(CoreError::FormationExists(name.clone()));
                }
                let mut settings = FormationSettings::default();
                if let Some(n) = number_sync_standbys {
                    settings.number_sync_standbys = *n;
                }
                self.formations
                    .insert(name.clone(), Formation { name: name.clone(), settings });
                Ok(Outcome::Done { description: format!("formation {name} created") })
            }
            Command::DropFormation { name } => {
                if self.formations.remove(name).is_none() {
                    return Err(CoreError::UnknownFormation(name.clone()));
                }
                Ok(Outcome::Done { description: format!("formation {name} dropped") })
            }
        }
    }
}
