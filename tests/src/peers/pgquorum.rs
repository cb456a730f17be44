//! pgquorum itself for the side-by-side benchmark: the [`Cluster`] harness (3 monitor
//! members, 3 keepers each with its PostgreSQL) behind [`HaSystem`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use pgquorum_api::pb::monitor as pb;

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
        let client = self.cluster.monitors.client();
        client
            .call(|mut raw| async move {
                raw.perform_switchover(pb::PerformSwitchoverRequest {
                    formation: "default".into(),
                    group_id: 0,
                    candidate: String::new(),
                })
                .await
            })
            .await
            .expect("switchover accepted");
    }

    async fn wait_healthy(&self, _within: Duration) {
        self.cluster.wait_healthy(2).await;
    }

    fn agent_pids(&self) -> Vec<u32> {
        self.cluster
            .nodes
            .iter()
            .filter_map(|n| n.keeper.as_ref().and_then(|k| k.pid()))
            .collect()
    }
}
