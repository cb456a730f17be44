//! A network of namespaces for fault tests: one Linux bridge on the test's side (the
//! host namespace, where the test's clients run, at `10.213.X.1`) and one network
//! namespace per simulated host, each with its own address `10.213.X.(10+i)` on a veth
//! into the bridge. Processes are started inside a namespace with `ip netns exec`, and
//! faults are injected inside the namespaces: cut chosen pairs of hosts (iptables DROP
//! in both namespaces: silence, as a real partition, not a refusal), isolate a host from
//! every other host while the test still reaches it, take a host's link down (a vanished
//! host), flap it, pause a process.
//!
//! Names carry the test's pid (`pqf-<pid>-<k>-<host>`, interfaces `pqf<pid><k>…`), so
//! parallel runs never collide; a /24 is taken under a lock file from the ones no
//! interface uses. Everything is removed on drop, also when the test panics; leftovers of
//! a run that was SIGKILLed (its pid gone) are removed by the next one. Needs root and
//! `ip netns`: check [`available`] and skip loudly otherwise.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A failed `ip`/`iptables` command, with its stderr.
#[derive(Debug)]
pub struct NetError(pub String);

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NetError {}

fn run(program: &str, args: &[&str]) -> Result<(), NetError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| NetError(format!("{program} {}: {e}", args.join(" "))))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether this process may create network namespaces (root, `ip` present). Tests that
/// need them print why they skip when this is false.
pub fn available() -> bool {
    let name = format!("pqf-{}-probe", std::process::id());
    let ok = run("ip", &["netns", "add", &name]).is_ok();
    if ok {
        let _ = run("ip", &["netns", "del", &name]);
    }
    ok
}

/// Prints a loud skip message and returns true when namespaces are not available.
pub fn skip_without_netns(test: &str) -> bool {
    if available() {
        return false;
    }
    eprintln!(
        "\n!!!! SKIPPED {test}: `ip netns add` is not permitted here (needs root and iproute2).\n\
         !!!! This partition test did NOT run.\n"
    );
    true
}

/// One simulated host: a namespace with one address.
#[derive(Debug, Clone)]
pub struct NetHost {
    pub name: String,
    pub ns: String,
    pub addr: Ipv4Addr,
    veth: String,
}

/// The bridge and its namespaces; removed on drop.
pub struct Net {
    pub hosts: Vec<NetHost>,
    bridge: String,
    gateway: Ipv4Addr,
    prefix: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Namespaces and interfaces of earlier runs whose process is gone.
fn remove_stale() {
    let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
    for line in output("ip", &["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(rest) = name.strip_prefix("pqf-") {
            let pid = rest.split('-').next().unwrap_or("");
            if !pid.is_empty() && !alive(pid) {
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }
    for line in output("ip", &["-o", "link", "show"]).lines() {
        // "12: pqf1234b0: <...>" or "13: pqf12340h1@if2: <...>"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or("");
        if let Some(rest) = name.strip_prefix("pqf") {
            let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            // The pid is followed by one digit of sequence: drop it.
            let pid = &pid[..pid.len().saturating_sub(1)];
            if !pid.is_empty() && !alive(pid) {
                let _ = run("ip", &["link", "del", name]);
                if name.ends_with('b') {
                    let _ = forward_rule("-D", name);
                }
            }
        }
    }
}

fn forward_rule(op: &str, bridge: &str) -> Result<(), NetError> {
    run(
        "iptables",
        &[
            "-w", op, "FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT",
        ],
    )
}

/// A /24 of 10.213.0.0/16 that no interface here uses, as X.
fn free_subnet() -> Option<u8> {
    let used = output("ip", &["-o", "-4", "addr", "show"]);
    let start = (std::process::id() % 250) as u16;
    (0..250u16)
        .map(|i| ((start + i) % 250 + 1) as u8)
        .find(|x| !used.contains(&format!("10.213.{x}.")))
}

impl Net {
    /// A bridge and one namespace per name in `hosts`.
    pub fn new(hosts: &[&str]) -> Result<Net, NetError> {
        if hosts.len() > 200 {
            return Err(NetError("at most 200 hosts".into()));
        }
        let pid = std::process::id();
        let k = SEQ.fetch_add(1, Ordering::SeqCst) % 10;
        // Several runs choose subnets at once: one at a time, under a lock file.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/pqf-netns.lock")
            .map_err(|e| NetError(format!("lock file: {e}")))?;
        let _locked = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| NetError(format!("locking /tmp/pqf-netns.lock: {e}")))?;
        remove_stale();
        let x = free_subnet().ok_or_else(|| NetError("no free 10.213.X.0/24".into()))?;
        let gateway = Ipv4Addr::new(10, 213, x, 1);
        let mut net = Net {
            hosts: Vec::new(),
            bridge: format!("pqf{pid}{k}b"),
            gateway,
            prefix: format!("pqf-{pid}-{k}"),
        };
        // From here on, Drop removes whatever was made.
        run("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
        // Docker sets the FORWARD policy to DROP, and br_netfilter (on here) applies it
        // to frames between our namespaces: accept them, for this bridge only; the rule
        // goes with the bridge (Drop, or the next run's stale cleanup).
        run(
            "iptables",
            &[
                "-w",
                "-I",
                "FORWARD",
                "1",
                "-i",
                &net.bridge,
                "-o",
                &net.bridge,
                "-j",
                "ACCEPT",
            ],
        )?;
        run(
            "ip",
            &["addr", "add", &format!("{gateway}/24"), "dev", &net.bridge],
        )?;
        run("ip", &["link", "set", &net.bridge, "up"])?;
        for (i, name) in hosts.iter().enumerate() {
            let ns = format!("{}-{name}", net.prefix);
            let veth = format!("pqf{pid}{k}h{i}");
            let peer = format!("pqf{pid}{k}n{i}");
            let addr = Ipv4Addr::new(10, 213, x, 10 + i as u8);
            run("ip", &["netns", "add", &ns])?;
            net.hosts.push(NetHost {
                name: name.to_string(),
                ns: ns.clone(),
                addr,
                veth: veth.clone(),
            });
            run(
                "ip",
                &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            )?;
            run("ip", &["link", "set", &veth, "master", &net.bridge])?;
            run("ip", &["link", "set", &veth, "up"])?;
            run("ip", &["link", "set", &peer, "netns", &ns])?;
            let inside = |args: &[&str]| {
                let mut a = vec!["netns", "exec", ns.as_str(), "ip"];
                a.extend_from_slice(args);
                run("ip", &a)
            };
            inside(&["link", "set", &peer, "name", "eth0"])?;
            inside(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            inside(&["link", "set", "eth0", "up"])?;
            inside(&["link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// The test's own address on the bridge (clients run in the host namespace).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The subnet in CIDR form, for pg_hba entries.
    pub fn cidr(&self) -> String {
        let o = self.gateway.octets();
        format!("{}.{}.{}.0/24", o[0], o[1], o[2])
    }

    pub fn host(&self, name: &str) -> &NetHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in this network"))
    }

    /// The command prefix that runs a program inside `host`'s namespace, as root.
    pub fn prefix(&self, host: &str) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.host(host).ns.clone(),
        ]
    }

    /// The same, as the `postgres` user. `ip netns exec` and `setpriv` both exec
    /// without forking: the pid of the spawned command is the program's own.
    pub fn prefix_as_postgres(&self, host: &str) -> Vec<String> {
        let (u, g) = crate::postgres::postgres_ids();
        let mut p = self.prefix(host);
        p.extend([
            "setpriv".into(),
            format!("--reuid={}", u.as_raw()),
            format!("--regid={}", g.as_raw()),
            "--init-groups".into(),
            "--".into(),
        ]);
        p
    }

    fn iptables(&self, host: &str, args: &[&str]) -> Result<(), NetError> {
        let ns = self.host(host).ns.clone();
        let mut a = vec!["netns", "exec", ns.as_str(), "iptables", "-w"];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    fn drop_rules(&self, op: &str, host: &str, peer: Ipv4Addr) -> Result<(), NetError> {
        let p = peer.to_string();
        self.iptables(host, &[op, "INPUT", "-s", &p, "-j", "DROP"])?;
        self.iptables(host, &[op, "OUTPUT", "-d", &p, "-j", "DROP"])
    }

    /// Packets between `a` and `b` vanish, both ways.
    pub fn cut(&self, a: &str, b: &str) -> Result<(), NetError> {
        self.drop_rules("-A", a, self.host(b).addr)?;
        self.drop_rules("-A", b, self.host(a).addr)
    }

    /// Undoes [`Net::cut`].
    pub fn heal(&self, a: &str, b: &str) -> Result<(), NetError> {
        let _ = self.drop_rules("-D", a, self.host(b).addr);
        let _ = self.drop_rules("-D", b, self.host(a).addr);
        Ok(())
    }

    /// Every host of `side_a` cut from every host of `side_b`; the test's clients still
    /// reach both sides.
    pub fn partition(&self, side_a: &[&str], side_b: &[&str]) -> Result<(), NetError> {
        for a in side_a {
            for b in side_b {
                self.cut(a, b)?;
            }
        }
        Ok(())
    }

    /// `host` cut from every other host (the test still reaches it).
    pub fn isolate(&self, host: &str) -> Result<(), NetError> {
        let others: Vec<String> = self
            .hosts
            .iter()
            .filter(|h| h.name != host)
            .map(|h| h.name.clone())
            .collect();
        for o in &others {
            self.cut(host, o)?;
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal_all(&self) -> Result<(), NetError> {
        for h in &self.hosts {
            self.iptables(&h.name, &["-F", "INPUT"])?;
            self.iptables(&h.name, &["-F", "OUTPUT"])?;
        }
        Ok(())
    }

    /// The host's link goes down (it vanishes for everyone, the test included) or up.
    pub fn set_link(&self, host: &str, up: bool) -> Result<(), NetError> {
        let h = self.host(host);
        run(
            "ip",
            &["link", "set", &h.veth, if up { "up" } else { "down" }],
        )
    }

    /// The link goes down and up `times` times, `down` then `up` long each.
    pub async fn flap(
        &self,
        host: &str,
        times: u32,
        down: Duration,
        up: Duration,
    ) -> Result<(), NetError> {
        for _ in 0..times {
            self.set_link(host, false)?;
            tokio::time::sleep(down).await;
            self.set_link(host, true)?;
            tokio::time::sleep(up).await;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = run("ip", &["link", "del", &h.veth]);
            let _ = run("ip", &["netns", "del", &h.ns]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
        let _ = forward_rule("-D", &self.bridge);
    }
}

/// A process this test started (or its whole process group), SIGSTOPped until this
/// value is dropped (SIGCONT), so a failing test never leaves it stopped.
pub struct Paused {
    pid: Pid,
    group: bool,
}

impl Paused {
    pub fn new(pid: u32) -> Result<Paused, NetError> {
        Paused::start(pid, false)
    }

    /// Every process of the group `pgid` leads (e.g. a postmaster and its backends).
    pub fn group(pgid: u32) -> Result<Paused, NetError> {
        Paused::start(pgid, true)
    }

    fn start(pid: u32, group: bool) -> Result<Paused, NetError> {
        let pid =
            Pid::from_raw(i32::try_from(pid).map_err(|_| NetError(format!("bad pid {pid}")))?);
        let p = Paused { pid, group };
        p.signal(Signal::SIGSTOP)
            .map_err(|e| NetError(format!("SIGSTOP {pid}: {e}")))?;
        Ok(p)
    }

    fn signal(&self, sig: Signal) -> nix::Result<()> {
        if self.group {
            nix::sys::signal::killpg(self.pid, sig)
        } else {
            kill(self.pid, sig)
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = self.signal(Signal::SIGCONT);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A TCP connection from inside `from` to `to`:7 (no ping here: bash's /dev/tcp).
    fn ping(net: &Net, from: &str, to: Ipv4Addr) -> bool {
        let mut a = net.prefix(from);
        a.extend([
            "timeout".into(),
            "1".into(),
            "bash".into(),
            "-c".into(),
            format!("exec 3<>/dev/tcp/{to}/7"),
        ]);
        Command::new(&a[0])
            .args(&a[1..])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// A listener on port 7 in each namespace and on the gateway.
    fn listeners(net: &Net) -> (Vec<crate::Proc>, std::net::TcpListener, tempfile::TempDir) {
        let dir = crate::temp_dir("netns-test-");
        let procs = net
            .hosts
            .iter()
            .map(|h| {
                let mut a = net.prefix(&h.name);
                a.extend([
                    "python3".into(),
                    "-c".into(),
                    format!(
                        "import socket\ns=socket.create_server(('{}',7))\nwhile True: s.accept()[0].close()",
                        h.addr
                    ),
                ]);
                let log = dir.path().join(format!("{}.log", h.name));
                crate::Proc::spawn(&h.name, std::path::Path::new(&a[0]), &a[1..], &log).unwrap()
            })
            .collect();
        let gw = std::net::TcpListener::bind((net.gateway(), 7)).unwrap();
        gw.set_nonblocking(true).unwrap();
        // Until each listener is up.
        for h in &net.hosts {
            crate::wait_until(Duration::from_secs(10), "listener", || {
                ping(net, &h.name, h.addr)
            })
            .unwrap();
        }
        (procs, gw, dir)
    }

    #[test]
    fn cuts_isolate_and_everything_is_removed() {
        if skip_without_netns("testkit netns") {
            return;
        }
        let net = Net::new(&["a", "b", "c"]).unwrap();
        let _l = listeners(&net);
        let (a, b, c) = (net.host("a").addr, net.host("b").addr, net.host("c").addr);
        let gw = net.gateway();
        assert!(ping(&net, "a", b) && ping(&net, "b", c) && ping(&net, "c", gw));
        net.cut("a", "b").unwrap();
        assert!(!ping(&net, "a", b) && !ping(&net, "b", a));
        assert!(ping(&net, "a", c) && ping(&net, "a", gw) && ping(&net, "b", c));
        net.heal("a", "b").unwrap();
        assert!(ping(&net, "a", b));
        net.isolate("c").unwrap();
        assert!(!ping(&net, "c", a) && !ping(&net, "b", c) && ping(&net, "c", gw));
        net.heal_all().unwrap();
        assert!(ping(&net, "c", a));
        net.set_link("b", false).unwrap();
        assert!(!ping(&net, "a", b));
        net.set_link("b", true).unwrap();
        assert!(ping(&net, "a", b));
        let names: Vec<String> = net.hosts.iter().map(|h| h.ns.clone()).collect();
        let bridge = net.bridge.clone();
        drop(net);
        let left = output("ip", &["netns", "list"]);
        for n in names {
            assert!(!left.contains(&n), "{n} left behind");
        }
        assert!(!output("ip", &["-o", "link", "show"]).contains(&bridge));
    }
}
