//! pgquorum itself for the side-by-side benchmark: the [`Cluster`] harness (3 monitor
//! members, 3 keepers each with its PostgreSQL) behind [`HaSystem`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use super::HaSystem;
use crate::cluster::Cluster;

pub struct Pgquorum {
    cluster: Cluster,
}

impl Pgquorum {
    /// pgquorum's defaults are already its fastest safe settings (`fast` changes
    /// nothing): keepers beat every 200 ms, a primary stops taking writes when it has
    /// not renewed its 1.5 s lease, and the monitor promotes only after lease + 300 ms
    /// margin; a shorter lease would only trade availability under load for nothing.
    pub async fn start(_fast: bool) -> Self {
        Pgquorum {
            cluster: Cluster::start(3).await,
        }
    }
}

impl HaSystem for Pgquorum {
    fn system(&self) -> String {
        "pgquorum".into()
    }

    fn settings(&self) -> String {
        "defaults, which are also its fastest safe settings: heartbeat 200 ms, primary \
         lease 1.5 s (the keeper stops taking writes when it cannot renew it), the monitor \
         promotes only after lease + 300 ms margin; synchronous replication ANY 1, \
         on_quorum_loss = block (never acknowledges without a synchronous standby)"
            .into()
    }

    fn hosts(&self) -> Vec<(String, u16)> {
        self.cluster.hosts()
    }

    async fn primary(&self, _within: Duration) -> String {
        // The harness waits up to its own SETTLE (60 s) and panics with the logs.
        self.cluster.primary().await
    }

    async fn kill_node(&mut self, node: &str) {
        self.cluster.kill_node(node).await;
    }

    async fn restart_node(&mut self, node: &str) {
        self.cluster.start_keeper(node);
    }

    fn kill_postmaster(&self, node: &str) {
        self.cluster.kill_postmaster(node);
    }

    async fn switchover(&self) {
        // wait_healthy leaves nothing pending, so this is accepted at once; should the
        // monitor still refuse ("not allowed now"), the retries count against pgquorum's
        // figure, not for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.cluster.request_switchover().await {
                Ok(_) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("pgquorum: switchover refused, retrying: {e:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("switchover refused: {e:?}"),
            }
        }
    }

    /// The monitor's view healthy (a primary and two secondaries, each at its goal),
    /// and the primary already applying the final synchronous_standby_names that names
    /// both standbys: right after a rejoin the monitor still has to move the primary
    /// through apply_settings, and a switchover asked before that is refused.
    async fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            self.cluster.wait_healthy(2).await;
            let p = self.cluster.primary().await;
            let others = self.cluster.others(&p);
            if let Ok(c) = self.cluster.node(&p).spec.connect().await {
                if let Ok(r) = c
                    .query_one(
                        "SELECT current_setting('synchronous_standby_names'), \
                                (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming')",
                        &[],
                    )
                    .await
                {
                    let names: String = r.get(0);
                    let streaming: i64 = r.get(1);
                    if streaming == 2
                        && others.iter().all(|o| names.contains(o.as_str()))
                        && crate::cluster::healthy(
                            &self.cluster.state().await.unwrap_or_default(),
                            2,
                        )
                    {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "pgquorum: the primary never named both standbys synchronous\n{}",
                self.cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn agent_pids(&self) -> Vec<u32> {
        self.cluster
            .nodes
            .iter()
            .filter_map(|n| n.keeper.as_ref().and_then(|k| k.pid()))
            .collect()
    }
}
