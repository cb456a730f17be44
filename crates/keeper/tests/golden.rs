//! Golden files of the keeper's state file (`<pgdata>.pgquorum-state.json` beside the
//! data directory, `RunState`): every file under tests/golden/<label>/ was written by
//! an older (or this) version, and this version's `RunState::load` must read it, with
//! nothing it says lost when saved again.
//!
//! A new generation: `PGQUORUM_BLESS=<label> cargo test -p pgquorum-keeper --test golden`
//! writes tests/golden/<label>/ and refuses a label that exists (docs/operations.md,
//! "Rolling upgrades").
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use pgquorum_core::NodeState;
use pgquorum_keeper::state::RunState;
use pgquorum_testkit::golden;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The state files a keeper writes in its life: before registration, as a standby
/// following a primary, as a primary.
fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let states = [
        ("run-state-new.json", RunState::default()),
        (
            "run-state-secondary.json",
            RunState {
                version: 1,
                node_id: Some(2),
                current_state: NodeState::Secondary,
                system_identifier: Some(7_300_000_000_000_000_001),
                following: Some("pg-1".into()),
                reinit_done: 0,
            },
        ),
        (
            "run-state-primary.json",
            RunState {
                version: 1,
                node_id: Some(1),
                current_state: NodeState::Primary,
                system_identifier: Some(7_300_000_000_000_000_001),
                following: None,
                reinit_done: 0,
            },
        ),
        (
            // A standby that was rebuilt by `perform reinit` (twice).
            "run-state-reinit.json",
            RunState {
                version: 1,
                node_id: Some(3),
                current_state: NodeState::Secondary,
                system_identifier: Some(7_300_000_000_000_000_001),
                following: Some("pg-1".into()),
                reinit_done: 2,
            },
        ),
    ];
    states
        .into_iter()
        .map(|(name, st)| {
            // Exactly the bytes the keeper writes.
            let p = dir.path().join(name);
            st.save(&p).unwrap();
            (name.to_owned(), std::fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn every_golden_state_file_loads_with_this_version() {
    if std::env::var_os(golden::BLESS_VAR).is_some() {
        return; // a writing run: the next plain run reads what it wrote
    }
    let gens = golden::generations(&root());
    assert!(!gens.is_empty(), "no goldens under {}", root().display());
    let tmp = tempfile::tempdir().unwrap();
    for (label, files) in gens {
        for p in files {
            let st = RunState::load(&p).unwrap_or_else(|e| {
                panic!("{label}: this version cannot read {}: {e}", p.display())
            });
            let again = tmp.path().join("again.json");
            st.save(&again).unwrap();
            assert_eq!(RunState::load(&again).unwrap(), st, "{}", p.display());
            let old: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            let new: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&again).unwrap()).unwrap();
            golden::keeps(&old, &new).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
}

#[test]
fn every_fixture_has_a_golden_and_bless() {
    let files = fixtures();
    let present: Vec<String> = golden::generations(&root())
        .into_iter()
        .flat_map(|(_, f)| f)
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    golden::bless(&root(), &files);
    if std::env::var_os(golden::BLESS_VAR).is_none() {
        for (name, _) in &files {
            assert!(
                present.contains(name),
                "no golden {name}: run `PGQUORUM_BLESS=<label> cargo test -p pgquorum-keeper \
                 --test golden` and commit tests/golden/<label>/ (see docs/operations.md)"
            );
        }
    }
}
