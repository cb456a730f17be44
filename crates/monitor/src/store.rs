//! Raft log, vote and state-machine snapshot in one sled database.
//!
//! One `sled::Db` holds everything so that one flush makes everything durable. A write
//! is acknowledged to openraft only after `flush_async` returned: openraft hands
//! `append` every entry that queued up while the previous flush ran, so under load one
//! flush covers many writes (this is the batching). sled's flush writes with
//! `sync_file_range`, not fsync: safe against a killed process, not strictly against
//! power loss (sled fsyncs in the background every 500 ms).
//!
//! The state machine itself (`ClusterState`) lives in memory; snapshots serialise it
//! into sled, and a restart loads the last snapshot then re-applies the committed log.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    EntryPayload, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot, StorageIOError, Vote,
};
use pgquorum_core::ClusterState;
use serde::{Deserialize, Serialize};

use crate::types::{
    Entry, LogId, NodeId, Response, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// Bumped whenever the on-disk layout changes; checked before anything else is read.
pub const FORMAT_VERSION: u32 = 1;

const META: &str = "meta";
const LOG: &str = "log";
const K_HEADER: &[u8] = b"header";
const K_VOTE: &[u8] = b"vote";
const K_COMMITTED: &[u8] = b"committed";
const K_PURGED: &[u8] = b"last_purged";
const K_SNAPSHOT_META: &[u8] = b"snapshot_meta";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the data directory {dir}: {source}; if it is damaged, {}",
        crate::node::REBUILD_HINT
    )]
    Open { dir: String, source: sled::Error },
    #[error("the data directory {dir} belongs to monitor group {found}, not to this group ({expected}); point --data-dir at this member's own directory, or at an empty one to join with --join")]
    OtherGroup {
        dir: String,
        found: String,
        expected: String,
    },
    #[error("the data directory {dir} has format version {found}; this pgquorum reads version {FORMAT_VERSION}")]
    Version { dir: String, found: u32 },
    #[error(
        "the data directory {dir} is damaged: {reason}; {}",
        crate::node::REBUILD_HINT
    )]
    Damaged { dir: String, reason: String },
    #[error("storage error in {dir}: {source}")]
    Io { dir: String, source: sled::Error },
}

/// Written once into an empty store; identifies the group the directory belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format_version: u32,
    pub group_id: String,
}

impl Header {
    /// Refuses a directory that belongs to another group. A member that joined
    /// through add-member stores `joined` and accepts any group id.
    pub fn check(&self, expected: &str, dir: &Path) -> Result<(), StoreError> {
        if self.group_id == expected || self.group_id == JOINED || expected == JOINED {
            return Ok(());
        }
        Err(StoreError::OtherGroup {
            dir: dir.display().to_string(),
            found: self.group_id.clone(),
            expected: expected.to_owned(),
        })
    }
}

/// The data directory and everything in it for the member's own user alone: 0700
/// directories, 0600 files (also those an older version left readable).
fn restrict(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ty = e.file_type()?;
            if ty.is_dir() {
                stack.push(e.path());
            } else if ty.is_file() {
                std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    Ok(())
}

/// Opens (or creates) the store in `dir`. An empty store gets a header with
/// `new_group_id`; an existing one keeps its own (check it with [`Header::check`]).
pub fn open(
    dir: &Path,
    new_group_id: &str,
) -> Result<(LogStore, StateMachine, Header), StoreError> {
    let d = dir.display().to_string();
    restrict(dir).map_err(|e| StoreError::Damaged {
        dir: d.clone(),
        reason: format!("cannot make it private (0700): {e}"),
    })?;
    let db = sled::Config::new()
        .path(dir)
        .flush_every_ms(Some(500))
        .open()
        .map_err(|source| StoreError::Open {
            dir: d.clone(),
            source,
        })?;
    let io = |source| StoreError::Io {
        dir: d.clone(),
        source,
    };
    let meta = db.open_tree(META).map_err(io)?;
    let log = db.open_tree(LOG).map_err(io)?;
    let header = match meta.get(K_HEADER).map_err(io)? {
        Some(raw) => {
            let h: Header = serde_json::from_slice(&raw).map_err(|e| StoreError::Damaged {
                dir: d.clone(),
                reason: format!("unreadable header: {e}"),
            })?;
            if h.format_version != FORMAT_VERSION {
                return Err(StoreError::Version {
                    dir: d,
                    found: h.format_version,
                });
            }
            h
        }
        None => {
            if !log.is_empty() || meta.get(K_VOTE).map_err(io)?.is_some() {
                return Err(StoreError::Damaged {
                    dir: d,
                    reason: "Raft data without a pgquorum header".into(),
                });
            }
            let h = Header {
                format_version: FORMAT_VERSION,
                group_id: new_group_id.to_owned(),
            };
            let raw = serde_json::to_vec(&h).map_err(|e| StoreError::Damaged {
                dir: d.clone(),
                reason: e.to_string(),
            })?;
            meta.insert(K_HEADER, raw).map_err(io)?;
            db.flush().map_err(io)?;
            h
        }
    };
    let store = LogStore {
        db: db.clone(),
        meta: meta.clone(),
        log,
    };
    // Kept apart from sled's own files (sled names its snapshots `snap.*`).
    let snap_dir = dir.join("state-snapshots");
    std::fs::create_dir_all(&snap_dir).map_err(|e| StoreError::Damaged {
        dir: d.clone(),
        reason: format!("cannot create {}: {e}", snap_dir.display()),
    })?;
    restrict(dir).map_err(|e| StoreError::Damaged {
        dir: d.clone(),
        reason: format!("cannot make its files private (0600): {e}"),
    })?;
    let sm = StateMachine::load(db, meta, snap_dir).map_err(|e| StoreError::Damaged {
        dir: d,
        reason: e.to_string(),
    })?;
    Ok((store, sm, header))
}

/// Group id written by a member that joined an existing group through add-member.
pub const JOINED: &str = "joined";

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read(&e).into()
}
fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write(&e).into()
}

fn get_json<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    key: &[u8],
) -> Result<Option<T>, StorageError> {
    match tree.get(key).map_err(read_err)? {
        None => Ok(None),
        Some(raw) => serde_json::from_slice(&raw).map(Some).map_err(read_err),
    }
}

fn put_json<T: Serialize>(tree: &sled::Tree, key: &[u8], v: &T) -> Result<(), StorageError> {
    let raw = serde_json::to_vec(v).map_err(write_err)?;
    tree.insert(key, raw).map_err(write_err)?;
    Ok(())
}

async fn flush(db: &sled::Db) -> Result<(), StorageError> {
    db.flush_async().await.map_err(write_err)?;
    Ok(())
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    meta: sled::Tree,
    log: sled::Tree,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(i.to_be_bytes()),
            Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(i.to_be_bytes()),
            Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for kv in self.log.range::<[u8; 8], _>((start, end)) {
            let (_, v) = kv.map_err(read_err)?;
            out.push(serde_json::from_slice(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = get_json(&self.meta, K_PURGED)?;
        let last = match self.log.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry = serde_json::from_slice(&v).map_err(read_err)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        put_json(&self.meta, K_VOTE, vote)?;
        flush(&self.db).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        get_json(&self.meta, K_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed on its own: losing it only means re-applying less at restart;
        // the next log flush carries it anyway.
        put_json(&self.meta, K_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(get_json::<Option<LogId>>(&self.meta, K_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            let raw = serde_json::to_vec(&e).map_err(write_err)?;
            batch.insert(&e.log_id.index.to_be_bytes(), raw);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        // Acknowledge only what is on disk.
        let res = self
            .db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(std::io::Error::other);
        callback.log_io_completed(res);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for kv in self.log.range(log_id.index.to_be_bytes()..) {
            let (k, _) = kv.map_err(write_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        flush(&self.db).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        put_json(&self.meta, K_PURGED, &log_id)?;
        let mut batch = sled::Batch::default();
        for kv in self.log.range(..=log_id.index.to_be_bytes()) {
            let (k, _) = kv.map_err(write_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        flush(&self.db).await
    }
}

/// The applied state: what every member agrees on up to `last_applied`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub state: ClusterState,
}

fn snapshot_path(dir: &Path, id: &str) -> PathBuf {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("snapshot-{safe}.json"))
}

/// Writes a snapshot's bytes to their own file (written, fsynced, renamed), then
/// records its metadata in sled and flushes. A multi-megabyte value inside sled would
/// stall the log flushes behind it; a file written beside it does not. A crash before
/// the metadata is flushed leaves an unreferenced file, removed at the next snapshot.
async fn save_snapshot(
    db: &sled::Db,
    meta_tree: &sled::Tree,
    dir: &Path,
    meta: &SnapshotMeta,
    data: Vec<u8>,
) -> Result<Vec<u8>, StorageError> {
    let path = snapshot_path(dir, &meta.snapshot_id);
    let dir_owned = dir.to_path_buf();
    let data = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            std::io::Write::write_all(&mut f, &data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&dir_owned)?.sync_all()?;
        Ok(data)
    })
    .await
    .map_err(write_err)?
    .map_err(write_err)?;
    put_json(meta_tree, K_SNAPSHOT_META, meta)?;
    flush(db).await?;
    // Older snapshots are no longer referenced.
    let keep = snapshot_path(dir, &meta.snapshot_id);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("snapshot-") && p != keep {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    Ok(data)
}

fn load_snapshot(
    meta_tree: &sled::Tree,
    dir: &Path,
) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
    let Some(meta) = get_json::<SnapshotMeta>(meta_tree, K_SNAPSHOT_META)? else {
        return Ok(None);
    };
    let data = std::fs::read(snapshot_path(dir, &meta.snapshot_id)).map_err(read_err)?;
    Ok(Some((meta, data)))
}

/// The state machine: in memory, shared read-only with the API service.
#[derive(Clone)]
pub struct StateMachine {
    db: sled::Db,
    meta: sled::Tree,
    dir: PathBuf,
    applied: Arc<RwLock<Applied>>,
}

impl StateMachine {
    fn load(db: sled::Db, meta: sled::Tree, dir: PathBuf) -> Result<Self, StorageError> {
        let applied = match load_snapshot(&meta, &dir)? {
            Some((_, data)) => serde_json::from_slice(&data).map_err(read_err)?,
            None => Applied::default(),
        };
        Ok(StateMachine {
            db,
            meta,
            dir,
            applied: Arc::new(RwLock::new(applied)),
        })
    }

    /// The applied state, for reads. Held briefly: apply waits while it is held.
    pub fn applied(&self) -> Arc<RwLock<Applied>> {
        self.applied.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Clone under the lock (short), serialise off the async workers (long).
        let applied = self.read().clone();
        let last = applied.last_applied;
        let membership = applied.last_membership.clone();
        let data = tokio::task::spawn_blocking(move || serde_json::to_vec(&applied))
            .await
            .map_err(write_err)?
            .map_err(write_err)?;
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, now_ms()),
            None => format!("empty-{}", now_ms()),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id,
        };
        let data = save_snapshot(&self.db, &self.meta, &self.dir, &meta, data).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let a = self.read();
        Ok((a.last_applied, a.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut a = self.write();
        let mut out = Vec::new();
        for e in entries {
            a.last_applied = Some(e.log_id);
            let result = match e.payload {
                EntryPayload::Blank => None,
                EntryPayload::Normal(req) => {
                    Some(a.state.apply_by(&req.cmd, req.at_ms, req.by.as_deref()))
                }
                EntryPayload::Membership(m) => {
                    a.last_membership = StoredMembership::new(Some(e.log_id), m);
                    None
                }
            };
            out.push(Response { result });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let mut applied: Applied = serde_json::from_slice(&data).map_err(read_err)?;
        applied.last_applied = meta.last_log_id;
        applied.last_membership = meta.last_membership.clone();
        save_snapshot(&self.db, &self.meta, &self.dir, meta, data).await?;
        *self.write() = applied;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(
            load_snapshot(&self.meta, &self.dir)?.map(|(meta, data)| Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct SledBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir().unwrap();
            let (log, sm, _) = open(dir.path(), "test").unwrap();
            Ok((dir, log, sm))
        }
    }

    /// openraft's storage conformance suite (it builds its own runtimes).
    #[test]
    fn openraft_storage_suite_passes_on_sled() {
        Suite::test_all(SledBuilder).unwrap();
    }

    #[test]
    fn another_groups_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path(), "g-1").unwrap());
        let (_, _, h) = open(dir.path(), "g-2").unwrap();
        assert_eq!(h.group_id, "g-1", "an existing header is never rewritten");
        let err = h.check("g-2", dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::OtherGroup { .. }), "{err}");
        assert!(err.to_string().contains("g-1"));
        h.check("g-1", dir.path()).unwrap();
    }
}
