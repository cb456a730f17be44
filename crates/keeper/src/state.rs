//! The keeper's run-state: what it has reached, persisted so that a keeper restarted
//! after SIGKILL resumes where it was and re-runs its last transition idempotently.

use std::io::Write;
use std::path::Path;

use pgquorum_core::{NodeId, NodeState};
use serde::{Deserialize, Serialize};

use crate::error::{KeeperError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    /// Format version, read before anything else.
    pub version: u32,
    pub node_id: Option<NodeId>,
    /// The last goal state this keeper fully reached.
    pub current_state: NodeState,
    /// The cluster this node belongs to, once known.
    pub system_identifier: Option<u64>,
    /// The node this standby last streamed from; a change means a rewind check.
    pub following: Option<String>,
    /// The last rebuild request (`perform reinit`, [`pgquorum_core::Assignment::reinit`])
    /// this keeper completed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reinit_done: u64,
}

/// A file that never saw a rebuild is written as before `reinit_done` existed.
fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Default for RunState {
    fn default() -> Self {
        RunState {
            version: 1,
            node_id: None,
            current_state: NodeState::Init,
            system_identifier: None,
            following: None,
            reinit_done: 0,
        }
    }
}

impl RunState {
    pub fn load(path: &Path) -> Result<RunState> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let st: RunState = serde_json::from_slice(&bytes).map_err(|e| {
                    KeeperError::Config(format!(
                        "state file {} is not valid ({e}); move it away to start afresh",
                        path.display()
                    ))
                })?;
                if st.version != 1 {
                    return Err(KeeperError::Config(format!(
                        "state file {} has format version {}, this keeper reads version 1",
                        path.display(),
                        st.version
                    )));
                }
                Ok(st)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RunState::default()),
            Err(e) => Err(KeeperError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Written to a temporary file, flushed and renamed: a crash leaves the old or the
    /// new state, never a torn one.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| KeeperError::Config(format!("encoding state: {e}")))?;
        write_atomic(path, &bytes, 0o600)
    }
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = crate::settings::sibling(path, "tmp");
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| KeeperError::io(ctx("creating"), e))?;
    // `mode` applies only to a new file; a leftover temporary file keeps its own.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| KeeperError::io(ctx("restricting"), e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| KeeperError::io(ctx("writing"), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| KeeperError::io(format!("renaming to {}", path.display()), e))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_pinned_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        assert_eq!(RunState::load(&p).unwrap(), RunState::default());
        let st = RunState {
            version: 1,
            node_id: Some(3),
            current_state: NodeState::Secondary,
            system_identifier: Some(42),
            following: Some("a".into()),
            reinit_done: 2,
        };
        st.save(&p).unwrap();
        assert_eq!(RunState::load(&p).unwrap(), st);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"current_state\": \"secondary\""), "{text}");
        // A file written before `reinit_done` existed still reads.
        std::fs::write(
            &p,
            r#"{"version":1,"node_id":3,"current_state":"secondary","system_identifier":42,"following":null}"#,
        )
        .unwrap();
        assert_eq!(RunState::load(&p).unwrap().reinit_done, 0);
    }
}
