//! pgquorum's fuzz targets, as plain functions: each `fuzz_targets/*.rs` hands its
//! input to one of them, and the tests below replay the committed corpus through them
//! without libFuzzer (and write the seeds).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod check;
pub mod convert;
pub mod raft;
pub mod script;
pub mod seeds;

/// Runs one input through the named target.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "convert" => convert::run(data),
        "raft_payload" => raft::run(data),
        "apply" => script::run(data),
        other => panic!("no fuzz target {other}"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    const TARGETS: [&str; 3] = ["convert", "raft_payload", "apply"];

    /// The seeds as this code writes them; `PGQUORUM_WRITE_SEEDS=1` (re)writes
    /// fuzz/corpus/<target>/seed-<name>.
    #[test]
    fn seeds_pass_and_can_be_written() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let write = std::env::var_os("PGQUORUM_WRITE_SEEDS").is_some();
        for (target, name, bytes) in super::seeds::all() {
            super::run(target, &bytes);
            if write {
                let dir = root.join(target);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("seed-{name}")), &bytes).unwrap();
            }
        }
    }

    /// Every committed input (seeds, and the crashes found so far) passes.
    #[test]
    fn corpus_replays() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for target in TARGETS {
            let Ok(dir) = std::fs::read_dir(root.join(target)) else {
                continue;
            };
            for e in dir {
                let p = e.unwrap().path();
                let data = std::fs::read(&p).unwrap();
                eprintln!("{}", p.display());
                super::run(target, &data);
            }
        }
    }

    /// The bootstrap scenario really bootstraps: the other targets apply to it.
    #[test]
    fn running_cluster_has_a_primary_and_two_secondaries() {
        let w = super::seeds::running_cluster();
        let goals: Vec<_> = w.state.nodes.values().map(|n| n.goal_state).collect();
        assert_eq!(
            goals,
            [
                pgquorum_core::NodeState::Primary,
                pgquorum_core::NodeState::Secondary,
                pgquorum_core::NodeState::Secondary
            ],
            "{:#?}",
            w.state.nodes
        );
    }
}
