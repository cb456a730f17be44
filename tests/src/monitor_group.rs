//! A monitor group of real `pgquorum monitor run` processes on loopback, each with its
//! own port and data directory, killed with SIGKILL by PID.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use pgquorum_api::client::MonitorClient;
use pgquorum_api::pb::monitor as pb;
use pgquorum_testkit::{
    free_addr, insecure_requested, pgquorum_bin, temp_dir, wait_until_async, Proc, TestCerts,
};
use pgquorum_trust::{Identity, Security};

use crate::upgrade::OtherBinary;

pub struct Member {
    pub id: u64,
    pub addr: String,
    /// Where its /metrics is served (plain HTTP).
    pub metrics: String,
    pub data_dir: PathBuf,
    pub proc: Option<Proc>,
    /// Command prefix the member is started through (a network namespace), or empty.
    pub prefix: Vec<String>,
    /// Runs this binary instead of this build's (a rolling-upgrade test), from its next
    /// start on.
    pub bin: Option<OtherBinary>,
}

pub struct MonitorGroup {
    pub dir: tempfile::TempDir,
    pub members: BTreeMap<u64, Member>,
    /// The --peer list founding members are started with.
    pub peers: BTreeMap<u64, String>,
    pub extra_args: Vec<String>,
    /// The group's CA and certificates; None when the test runs `--insecure`
    /// (`PGQUORUM_TEST_INSECURE=1`).
    pub certs: Option<TestCerts>,
    bin: PathBuf,
}

impl MonitorGroup {
    /// `n` members with fresh ports and empty data directories; none started yet. With
    /// TLS unless `PGQUORUM_TEST_INSECURE=1`.
    pub fn new(n: u64) -> Self {
        Self::with_tls(n, !insecure_requested())
    }

    /// Same, with TLS or `--insecure` whatever the environment says.
    pub fn with_tls(n: u64, tls: bool) -> Self {
        let dir = temp_dir("pgquorum-monitor-");
        let certs = tls.then(|| TestCerts::new(&dir.path().join("certs")));
        let mut g = MonitorGroup {
            dir,
            members: BTreeMap::new(),
            peers: BTreeMap::new(),
            extra_args: Vec::new(),
            certs,
            bin: pgquorum_bin(),
        };
        for id in 1..=n {
            g.add_slot(id);
            let addr = g.members[&id].addr.clone();
            g.peers.insert(id, addr);
        }
        g
    }

    /// A member slot (address, data directory) that is not among the founders.
    pub fn add_slot(&mut self, id: u64) {
        let data_dir = self.dir.path().join(format!("m{id}"));
        self.members.insert(
            id,
            Member {
                id,
                addr: free_addr(),
                metrics: free_addr(),
                data_dir,
                proc: None,
                prefix: Vec::new(),
                bin: None,
            },
        );
    }

    /// `addrs.len()` members at the given HOST:PORT addresses, each started through its
    /// command prefix (e.g. `ip netns exec NS`); none started yet. `--insecure`: the
    /// test certificates name loopback only.
    pub fn new_at(addrs: &[(String, Vec<String>)]) -> Self {
        let mut g = MonitorGroup::with_tls(0, false);
        for (i, (addr, prefix)) in addrs.iter().enumerate() {
            let id = i as u64 + 1;
            g.add_slot(id);
            let m = g.members.get_mut(&id).expect("member slot");
            m.addr = addr.clone();
            m.prefix = prefix.clone();
            g.peers.insert(id, addr.clone());
        }
        g
    }

    fn spawn(&mut self, id: u64, join: bool) {
        let m = self.members.get(&id).expect("member slot");
        let mut args: Vec<String> = vec![
            "monitor".into(),
            "run".into(),
            "--node-id".into(),
            id.to_string(),
            "--listen".into(),
            m.addr.clone(),
            "--data-dir".into(),
            m.data_dir.display().to_string(),
            "--metrics-listen".into(),
            m.metrics.clone(),
        ];
        if join {
            args.push("--join".into());
        } else {
            for (pid, addr) in &self.peers {
                args.push("--peer".into());
                args.push(format!("{pid}={addr}"));
            }
        }
        match &self.certs {
            Some(c) => {
                c.issue(&Identity::Member(id));
                args.extend(c.args());
            }
            None => args.push("--insecure".into()),
        }
        args.extend(self.extra_args.iter().cloned());
        let bin = match &self.members[&id].bin {
            Some(other) => {
                other.edit("monitor", &mut args);
                other.path.clone()
            }
            None => self.bin.clone(),
        };
        let log = self.dir.path().join(format!("m{id}.log"));
        let prefix = self.members[&id].prefix.clone();
        let p = match prefix.split_first() {
            Some((program, rest)) => {
                let mut a: Vec<String> = rest.to_vec();
                a.push(bin.display().to_string());
                a.extend(args);
                Proc::spawn(
                    &format!("monitor-{id}"),
                    std::path::Path::new(program),
                    &a,
                    &log,
                )
            }
            None => Proc::spawn(&format!("monitor-{id}"), &bin, &args, &log),
        }
        .expect("spawn pgquorum");
        let mut p = p;
        if prefix.is_empty() {
            // On loopback its ports were only reserved by number: until the member binds
            // them, a port handed out for something else (a keeper's --http) may be the
            // same one. Return once both accept connections, or the member exited (tests
            // that expect a refusal). Checked by connecting, never by binding: a test bind
            // at the moment the member binds made the member fail with "Address already
            // in use".
            let m = &self.members[&id];
            let ports: Vec<u16> = [&m.addr, &m.metrics]
                .iter()
                .filter_map(|a| a.rsplit(':').next()?.parse().ok())
                .collect();
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while p.is_running()
                && std::time::Instant::now() < deadline
                && ports
                    .iter()
                    .any(|port| !pgquorum_testkit::postgres::port_listening(*port))
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.members.get_mut(&id).expect("member slot").proc = Some(p);
    }

    /// Starts (or restarts) a member with the group's --peer list.
    pub fn start(&mut self, id: u64) {
        self.spawn(id, false);
    }

    /// Starts a member that joins through add-member (`--join`).
    pub fn start_joining(&mut self, id: u64) {
        self.spawn(id, true);
    }

    /// SIGKILL by PID.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut p) = self.members.get_mut(&id).and_then(|m| m.proc.take()) {
            p.kill();
        }
    }

    /// SIGTERM by PID (an orderly stop, as `systemctl restart` sends), SIGKILL if it
    /// has not exited within 10 s.
    pub fn stop(&mut self, id: u64) {
        if let Some(mut p) = self.members.get_mut(&id).and_then(|m| m.proc.take()) {
            p.stop(Duration::from_secs(10));
        }
    }

    /// SIGSTOP by PID: the member keeps its sockets but answers nothing, as if cut off.
    pub fn pause(&self, id: u64) {
        self.signal(id, nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT by PID, after [`Self::pause`].
    pub fn resume(&self, id: u64) {
        self.signal(id, nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, id: u64, sig: nix::sys::signal::Signal) {
        if let Some(p) = self.members.get(&id).and_then(|m| m.proc.as_ref()) {
            let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
            nix::sys::signal::kill(pid, sig).expect("signal a member this test started");
        }
    }

    pub fn wipe(&mut self, id: u64) {
        let d = &self.members[&id].data_dir;
        let _ = std::fs::remove_dir_all(d);
    }

    pub fn addr(&self, id: u64) -> String {
        self.members[&id].addr.clone()
    }

    pub fn running(&self) -> Vec<u64> {
        self.members
            .values()
            .filter(|m| m.proc.is_some())
            .map(|m| m.id)
            .collect()
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("m{id}.log"))).unwrap_or_default()
    }

    /// How a test client acting as `id` talks to the group.
    pub fn security(&self, id: Identity) -> Security {
        match &self.certs {
            Some(c) => c.security(id),
            None => Security::Insecure,
        }
    }

    /// The operator's security (client certificate `admin`).
    pub fn admin(&self) -> Security {
        self.security(Identity::Operator("admin".into()))
    }

    /// A client over every member's address, as the operator `admin`.
    pub fn client(&self) -> MonitorClient {
        MonitorClient::new(self.members.values().map(|m| m.addr.clone()), self.admin()).unwrap()
    }

    /// A client that talks to one member only, as the operator `admin`.
    pub fn client_of(&self, id: u64) -> MonitorClient {
        MonitorClient::new([self.addr(id)], self.admin()).unwrap()
    }

    /// A client acting as the keeper of node `name` (registers and beats as that node).
    pub fn keeper_client(&self, name: &str) -> MonitorClient {
        MonitorClient::new(
            self.members.values().map(|m| m.addr.clone()),
            self.security(Identity::Keeper(name.to_owned())),
        )
        .unwrap()
    }

    /// Registers node `name` (formation "default", 127.0.0.1:5432, system identifier 7)
    /// through `client`, as its keeper would: its node id.
    pub async fn register_node(&self, client: &MonitorClient, name: &str) -> u64 {
        client
            .call(|mut raw| {
                let req = pb::RegisterNodeRequest {
                    formation: "default".into(),
                    name: name.to_owned(),
                    host: "127.0.0.1".into(),
                    port: 5432,
                    candidate_priority: 50,
                    replication_quorum: true,
                    system_identifier: 7,
                    pg_major_version: 15,
                    current_state: "init".into(),
                };
                async move { raw.register_node(req).await }
            })
            .await
            .unwrap_or_else(|e| panic!("register: {e}\n{}", self.logs()))
            .node_id
    }

    /// Same, talking to member `id` only.
    pub fn keeper_client_of(&self, id: u64, name: &str) -> MonitorClient {
        MonitorClient::new(
            [self.addr(id)],
            self.security(Identity::Keeper(name.to_owned())),
        )
        .unwrap()
    }

    /// The arguments that give a `pgquorum` command this group's certificates (or
    /// `--insecure`).
    pub fn trust_args(&self) -> Vec<String> {
        match &self.certs {
            Some(c) => c.args(),
            None => vec!["--insecure".into()],
        }
    }

    pub async fn status(&self, id: u64) -> Option<pb::MemberStatusReply> {
        let c = self.client_of(id);
        let mut raw = c.raw(&self.addr(id)).ok()?;
        let mut req = tonic::Request::new(pb::MemberStatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        raw.member_status(req).await.ok().map(|r| r.into_inner())
    }

    /// The leader that every running member agrees on, once there is one.
    pub async fn wait_leader(&self, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(l) = self.agreed_leader().await {
                return l;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "no leader every running member agrees on after {timeout:?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn agreed_leader(&self) -> Option<u64> {
        let running = self.running();
        let mut seen = BTreeSet::new();
        for id in &running {
            seen.insert(self.status(*id).await?.leader_id?);
        }
        let l = *seen.iter().next()?;
        (seen.len() == 1 && running.contains(&l)).then_some(l)
    }

    /// The formation names a member has applied (its own view: not forwarded to the leader).
    pub async fn formations_on(&self, id: u64) -> Option<BTreeSet<String>> {
        let c = self.client_of(id);
        let mut raw = c.raw(&self.addr(id)).ok()?;
        let mut req = tonic::Request::new(pb::GetStateRequest {
            formation: String::new(),
            linearizable: false,
        });
        req.metadata_mut().insert(
            pgquorum_api::LOCAL_READ_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let r = raw.get_state(req).await.ok()?.into_inner();
        Some(r.formations.into_iter().map(|f| f.name).collect())
    }

    /// Waits until member `id` has applied every formation in `names`.
    pub async fn wait_applied(&self, id: u64, names: &BTreeSet<String>, timeout: Duration) {
        wait_until_async(
            timeout,
            &format!("member {id} to apply {} formations", names.len()),
            || async {
                self.formations_on(id)
                    .await
                    .is_some_and(|have| names.is_subset(&have))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    /// Every member's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for id in self.members.keys() {
            let log = self.log(*id);
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            s.push_str(&format!("---- member {id} (last lines) ----\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Runs `pgquorum ARGS...` to completion: (success, stdout+stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new(&self.bin)
            .args(args)
            .args(self.trust_args())
            .env_remove("PGQUORUM_CERTS_DIR")
            .output()
            .expect("run pgquorum");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}

/// One write: creates formation `name` through `client`.
pub async fn create_formation(
    client: &MonitorClient,
    name: &str,
) -> Result<u64, pgquorum_api::client::ClientError> {
    client
        .call(|mut raw| {
            let req = pb::CreateFormationRequest {
                name: name.to_owned(),
                number_sync_standbys: None,
            };
            async move { raw.create_formation(req).await }
        })
        .await
        .map(|r| r.log_index)
}

/// One write: drops formation `name` through `client`.
pub async fn drop_formation(
    client: &MonitorClient,
    name: &str,
) -> Result<u64, pgquorum_api::client::ClientError> {
    client
        .call(|mut raw| {
            let req = pb::DropFormationRequest {
                name: name.to_owned(),
            };
            async move { raw.drop_formation(req).await }
        })
        .await
        .map(|r| r.log_index)
}

impl Drop for MonitorGroup {
    fn drop(&mut self) {
        for m in self.members.values_mut() {
            if let Some(mut p) = m.proc.take() {
                p.kill();
            }
        }
    }
}
