//! A [`Cluster`] in network namespaces: each monitor member (`m1`..`m3`) and each node
//! (`node1`..) on its own host of a [`Net`], the test's clients on the bridge. Fields
//! drop in order: the processes go before the namespaces they run in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pgquorum_testkit::free_port;
use pgquorum_testkit::netns::Net;
use pgquorum_testkit::postgres::{NodeSpec, PgDir};

use crate::cluster::{Cluster, Node};
use crate::monitor_group::MonitorGroup;

pub struct NetCluster {
    pub c: Cluster,
    pub net: Net,
}

impl NetCluster {
    /// 3 monitor members and `n` nodes, each in its own namespace; returns once there
    /// is a primary and `n - 1` streaming secondaries.
    pub async fn start(n: usize) -> NetCluster {
        let mut names: Vec<String> = (1..=3).map(|i| format!("m{i}")).collect();
        names.extend((1..=n).map(|i| format!("node{i}")));
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let net = Net::new(&refs).unwrap_or_else(|e| panic!("building the namespaces: {e}"));
        let members: Vec<(String, Vec<String>)> = (1..=3)
            .map(|i| {
                let h = format!("m{i}");
                (
                    format!("{}:{}", net.host(&h).addr, free_port()),
                    net.prefix(&h),
                )
            })
            .collect();
        let monitors = MonitorGroup::new_at(&members);
        let dir = PgDir::new();
        let nodes = (1..=n)
            .map(|i| {
                let h = format!("node{i}");
                Node {
                    spec: NodeSpec::at(&h, dir.path(), net.host(&h).addr.into()),
                    keeper: None,
                    extra_args: Vec::new(),
                    prefix: net.prefix_as_postgres(&h),
                    bin: None,
                }
            })
            .collect();
        let hba = format!("host all all {} trust", net.cidr());
        let c = Cluster::start_custom(monitors, dir, nodes, &hba).await;
        NetCluster { c, net }
    }

    /// The namespace host of monitor member `id`.
    pub fn member_host(id: u64) -> String {
        format!("m{id}")
    }

    /// (name, address, port) of every node, for a [`crate::oracle::Probe`].
    pub fn probe_targets(&self) -> Vec<(String, String, u16)> {
        self.c
            .nodes
            .iter()
            .map(|n| (n.spec.name.clone(), n.spec.host.to_string(), n.spec.pg_port))
            .collect()
    }
}
