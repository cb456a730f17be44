//! Real PostgreSQL and keepers for tests: everything runs as the `postgres` user (we are
//! root; PostgreSQL refuses root), in temp dirs it owns, on ports the OS picked, and is
//! killed by the PID we started.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Uid, User};

/// The server binaries tests use.
pub const PG_BINDIR: &str = "/usr/lib/postgresql/15/bin";

/// uid/gid of the `postgres` user.
pub fn postgres_ids() -> (Uid, Gid) {
    let u = User::from_name("postgres")
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no `postgres` user on this machine"));
    (u.uid, u.gid)
}

/// A temp dir owned by `postgres`, removed on drop (kept when PGQ_KEEP_DIRS is set,
/// to read the logs of a failed test).
pub struct PgDir {
    dir: Option<tempfile::TempDir>,
}

impl Drop for PgDir {
    fn drop(&mut self) {
        if std::env::var_os("PGQ_KEEP_DIRS").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("kept {}", d.keep().display());
            }
        }
    }
}

impl PgDir {
    pub fn new() -> PgDir {
        let dir = tempfile::Builder::new()
            .prefix("pgq-")
            .tempdir_in("/tmp")
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        let (u, g) = postgres_ids();
        nix::unistd::chown(dir.path(), Some(u), Some(g)).unwrap_or_else(|e| panic!("chown: {e}"));
        PgDir { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        match &self.dir {
            Some(d) => d.path(),
            None => Path::new("/nonexistent"),
        }
    }
}

impl Default for PgDir {
    fn default() -> Self {
        PgDir::new()
    }
}

pub use crate::process::{free_port, kill9, pgquorum_bin, port_free, port_listening};

/// Polls `f` until it returns Some, or panics with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects as the `postgres` superuser over the node's Unix socket.
pub async fn connect(
    socket_dir: &Path,
    port: u16,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut c = tokio_postgres::Config::new();
    c.host_path(socket_dir).port(port);
    open(c, "postgres").await
}

/// Connects as `postgres` to database `dbname` on 127.0.0.1:`port` (a node, HAProxy,
/// PgBouncer, another system's monitor).
pub async fn connect_tcp(
    port: u16,
    dbname: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1").port(port);
    open(c, dbname).await
}

async fn open(
    mut c: tokio_postgres::Config,
    dbname: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    c.user("postgres")
        .dbname(dbname)
        .connect_timeout(Duration::from_secs(2));
    let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// One plain HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, None, Duration::from_secs(5))
}

/// One HTTP/1.0 request with an optional JSON body, waiting up to `read_timeout` for
/// the whole answer: (status code, body).
pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
    read_timeout: Duration,
) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(read_timeout)).ok()?;
    match json {
        Some(body) => write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        None => write!(s, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"),
    }
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// The replication password of every test cluster.
pub const REPLICATION_PASSWORD: &str = "test-secret";

/// One node's fixed facts: where its data, socket, ports and logs live.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    pub dir: PathBuf,
    pub pg_port: u16,
    pub http: std::net::SocketAddr,
    /// The address postgres listens on and peers use (loopback unless in a namespace).
    pub host: std::net::IpAddr,
}

impl NodeSpec {
    pub fn new(name: &str, dir: &Path) -> NodeSpec {
        NodeSpec::at(name, dir, std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// A node whose postgres and HTTP endpoint listen on `host` (a namespace's address).
    pub fn at(name: &str, dir: &Path, host: std::net::IpAddr) -> NodeSpec {
        let http_port = free_port();
        NodeSpec {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            pg_port: free_port(),
            http: std::net::SocketAddr::new(host, http_port),
            host,
        }
    }

    pub fn pgdata(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.clone()
    }

    /// NAME=HOST:PORT, as `--primary` / `--peer` take it.
    pub fn peer_arg(&self) -> String {
        format!("{}={}:{}", self.name, self.host, self.pg_port)
    }

    pub fn keeper_log(&self) -> PathBuf {
        self.dir.join(format!("{}.keeper.log", self.name))
    }

    /// The common arguments of `pgquorum keeper run|apply`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--name".into(),
            self.name.clone(),
            "--pgdata".into(),
            self.pgdata().display().to_string(),
            "--pg-port".into(),
            self.pg_port.to_string(),
            "--pg-host".into(),
            self.host.to_string(),
            "--listen-addresses".into(),
            self.host.to_string(),
            "--socket-dir".into(),
            self.socket_dir().display().to_string(),
            "--http".into(),
            self.http.to_string(),
            "--pg-bindir".into(),
            PG_BINDIR.into(),
            // The test process runs as root; local connections are `peer` for the
            // postgres user only, so the tests come in over loopback.
            "--pg-hba".into(),
            "host all all 127.0.0.1/32 trust".into(),
        ]
    }

    /// As `postgres` over loopback (see [`NodeSpec::args`]).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        if self.host.is_loopback() {
            return connect_tcp(self.pg_port, "postgres").await;
        }
        // A node in a network namespace listens on its own address only.
        let mut c = tokio_postgres::Config::new();
        c.host(self.host.to_string()).port(self.pg_port);
        open(c, "postgres").await
    }

    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http, path)
    }

    /// The pid in postmaster.pid, if postgres runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let t = std::fs::read_to_string(self.pgdata().join("postmaster.pid")).ok()?;
        let pid: i32 = t.lines().next()?.trim().parse().ok()?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).ok()?;
        Some(pid)
    }
}

/// A `pgquorum keeper ...` process running as `postgres`; SIGKILLed on drop (its
/// postgres then gets the keeper's death signal).
pub struct Keeper {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Keeper {
    /// Starts `pgquorum keeper <sub> <args>` with stderr appended to `log`.
    pub fn spawn(sub: &str, args: &[String], log: &Path) -> Keeper {
        Keeper::spawn_with(&pgquorum_bin(), sub, args, log)
    }

    /// Same with a given `pgquorum` binary (benchmarks use the release build).
    pub fn spawn_with(bin: &Path, sub: &str, args: &[String], log: &Path) -> Keeper {
        Keeper::spawn_in(&[], bin, sub, args, log)
    }

    /// Same, started through `prefix` (e.g. [`crate::netns::Net::prefix_as_postgres`]),
    /// which must exec the program as `postgres` without forking; an empty prefix
    /// switches to `postgres` itself.
    pub fn spawn_in(
        prefix: &[String],
        bin: &Path,
        sub: &str,
        args: &[String],
        log: &Path,
    ) -> Keeper {
        let (u, g) = postgres_ids();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("log {}: {e}", log.display()));
        let err = out.try_clone().unwrap_or_else(|e| panic!("dup: {e}"));
        let mut cmd = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => {
                let mut c = Command::new(bin);
                std::os::unix::process::CommandExt::uid(&mut c, u.as_raw());
                std::os::unix::process::CommandExt::gid(&mut c, g.as_raw());
                c
            }
        };
        cmd.arg("keeper").arg(sub).args(args);
        // With certificates the standbys authenticate by certificate: no password at
        // all, so that a test of a TLS cluster shows none is needed.
        if !args.iter().any(|a| a == "--certs-dir") {
            // In the environment, never in argv (which every local user can read).
            cmd.env("PGQUORUM_REPLICATION_PASSWORD", REPLICATION_PASSWORD);
        }
        cmd.env("PGQUORUM_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("PGQUORUM_MONITOR")
            .env_remove("PGQUORUM_CERTS_DIR")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning pgquorum: {e}"));
        Keeper {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (orderly stop), then reap.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = c.wait();
        }
    }

    /// Exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.kill();
    }
}
