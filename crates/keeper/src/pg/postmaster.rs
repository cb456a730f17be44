//! The postmaster as a direct child of the keeper.
//!
//! Not started through `pg_ctl`, which daemonizes: as our child, postgres gets the
//! keeper's death signal (see [`super::child`]) and its exit is seen at once, which is
//! all supervision needs. Readiness is judged the way `pg_ctl -w` does: postmaster.pid
//! names our child's pid (a stale pidfile of an earlier postmaster is rejected) and its
//! status line says `ready` or `standby`.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::child::{self, Child};
use super::PgBin;
use crate::error::{KeeperError, Result};

/// How long a fast stop may take before it becomes immediate: a clean shutdown checkpoint
/// of a busy primary fits; a walsender blocked on a vanished standby does not.
pub const FAST_STOP_PATIENCE: Duration = Duration::from_secs(5);
/// How long an immediate stop may take before every postgres process is SIGKILLed.
pub const IMMEDIATE_STOP_PATIENCE: Duration = Duration::from_secs(2);
/// How long the postmaster may take to be reaped after SIGKILL.
pub const KILL_PATIENCE: Duration = Duration::from_secs(5);

/// SIGKILL to the postmaster `pid` and to the process group of each of its children.
/// The postmaster is stopped first (SIGSTOP) so that it forks no child in between; its
/// children are found through /proc.
pub fn kill_tree(pid: u32) {
    let Ok(p) = i32::try_from(pid) else { return };
    let pm = nix::unistd::Pid::from_raw(p);
    let _ = nix::sys::signal::kill(pm, Signal::SIGSTOP);
    for c in children_of(pid) {
        if let Ok(c) = i32::try_from(c) {
            let c = nix::unistd::Pid::from_raw(c);
            // Postgres children call setsid(): the group is the child and whatever it
            // started (an archive_command, say). Fall back to the child alone.
            if nix::sys::signal::killpg(c, Signal::SIGKILL).is_err() {
                let _ = nix::sys::signal::kill(c, Signal::SIGKILL);
            }
        }
    }
    let _ = nix::sys::signal::kill(pm, Signal::SIGKILL);
}

/// The pids whose parent is `pid`, from /proc/*/stat.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|c| parent_of(*c) == Some(pid))
        .collect()
}

/// The parent pid in /proc/PID/stat (the field after the parenthesised command name,
/// which may itself contain spaces and parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` is stopped by a signal (SIGSTOP, SIGTSTP: state `T`) or a tracer
/// (`t`). Such a process acts on no signal but SIGKILL until it is continued: a fast or
/// immediate shutdown asked of it waits, pending, for as long as it stays stopped.
pub fn is_frozen(pid: u32) -> bool {
    matches!(process_state(pid).as_deref(), Some("T" | "t"))
}

/// The state letter in /proc/PID/stat (after the parenthesised command name); None
/// when there is no such process.
fn process_state(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.rfind(')')?;
    Some(stat[close + 1..].split_whitespace().next()?.to_string())
}

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
pub fn is_alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|s| s != "Z" && s != "X")
}

/// How the postmaster is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: abort sessions, checkpoint, exit (clean for pg_rewind).
    Fast,
    /// SIGQUIT: kill everything now; crash recovery at next start.
    Immediate,
}

#[derive(Debug, Clone)]
pub struct Postmaster {
    child: Child,
    pgdata: PathBuf,
}

/// The lines of postmaster.pid the keeper reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidFile {
    pub pid: i32,
    pub status: String,
}

impl PidFile {
    pub fn read(pgdata: &Path) -> Option<PidFile> {
        Self::read_file(&pgdata.join("postmaster.pid"))
    }

    /// A lock file of that format: postmaster.pid, or a socket's `.s.PGSQL.<port>.lock`.
    pub fn read_file(path: &Path) -> Option<PidFile> {
        let text = std::fs::read_to_string(path).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let pid = lines.first()?.trim().parse().ok()?;
        // Line 8 (PM_STATUS) appears only once the postmaster has reached a status.
        let status = lines
            .get(7)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Some(PidFile { pid, status })
    }
}

/// Whether a postgres process named in postmaster.pid is alive (not a stale file).
pub fn running_pid(pgdata: &Path) -> Option<i32> {
    let pf = PidFile::read(pgdata)?;
    is_postgres(pf.pid).then_some(pf.pid)
}

/// Whether `pid` is a live postgres process. A lock file's PID alone proves nothing:
/// after a container restart (or a reboot with a persistent socket directory) the
/// number can belong to any process, or to a thread of the keeper itself.
fn is_postgres(pid: i32) -> bool {
    if pid <= 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    comm.trim() == "postgres" || comm.trim() == "postmaster"
}

/// Removes the lock files a killed postmaster left behind (postmaster.pid in the data
/// directory; `.s.PGSQL.<port>.lock` and its socket in `socket_dir`) when the PID they
/// name is no live postgres, and returns that PID. PostgreSQL takes over such a lock
/// only when its PID is dead. Seen in the compose test: a container killed and started
/// again kept /var/run/postgresql, the old lock named PID 30, and in the new container
/// PID 30 was another process; PostgreSQL refused to start ("lock file ... already
/// exists") and the node stayed out of the cluster for minutes. A lock held by a live
/// postgres is left alone: PostgreSQL reports that conflict itself.
pub fn clear_stale_locks(pgdata: &Path, socket_dir: &Path, port: u16) -> Vec<i32> {
    let socket = socket_dir.join(format!(".s.PGSQL.{port}"));
    let mut removed = Vec::new();
    for (lock, with) in [
        (pgdata.join("postmaster.pid"), None),
        (
            socket_dir.join(format!(".s.PGSQL.{port}.lock")),
            Some(&socket),
        ),
    ] {
        let Some(PidFile { pid, .. }) = PidFile::read_file(&lock) else {
            continue;
        };
        if is_postgres(pid) {
            continue;
        }
        if let Some(socket) = with {
            let _ = std::fs::remove_file(socket);
        }
        if std::fs::remove_file(&lock).is_ok() {
            removed.push(pid);
        }
    }
    removed
}

/// Refuses to start when the port is already taken, with an error that says so.
pub fn check_port_free(listen_addresses: &str, port: u16) -> Result<()> {
    let addrs: Vec<String> = listen_addresses
        .split(',')
        .map(|a| a.trim())
        .filter(|a| !a.is_empty())
        .map(|a| {
            if a == "*" {
                "0.0.0.0".to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    for a in addrs {
        let spec = if a.contains(':') {
            format!("[{a}]:{port}")
        } else {
            format!("{a}:{port}")
        };
        if let Err(e) = std::net::TcpListener::bind(&spec) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                return Err(KeeperError::PortInUse { addr: a, port });
            }
        }
    }
    Ok(())
}

impl Postmaster {
    /// Starts `postgres -D pgdata` and waits until it accepts connections, or until
    /// `give_up` returns an error (checked every few milliseconds): then postgres is
    /// stopped (immediate; it took no writes yet) and that error returned. A standby
    /// accepts connections only once consistent, which needs WAL from its upstream: if
    /// that upstream is gone, the wait would otherwise last the whole `timeout` while
    /// the monitor has already assigned something else.
    pub async fn start(
        bin: &PgBin,
        pgdata: &Path,
        log_file: &Path,
        timeout: Duration,
        give_up: impl Fn() -> Result<()>,
    ) -> Result<Postmaster> {
        // 0600, also when an older keeper created it readable: the server log can
        // quote connection strings and statements.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log_file)
            .map_err(|e| KeeperError::io(format!("opening {}", log_file.display()), e))?;
        log.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| KeeperError::io(format!("restricting {}", log_file.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| KeeperError::io("duplicating the log file handle", e))?;
        let mut cmd = Command::new(bin.path("postgres"));
        cmd.arg("-D")
            .arg(pgdata)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Own process group: a Ctrl-C meant for the keeper does not reach postgres; the
        // keeper stops it in order.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let started = Instant::now();
        let (child, _) = child::spawn(cmd, Signal::SIGQUIT, "postgres").await?;
        let pm = Postmaster {
            child,
            pgdata: pgdata.to_path_buf(),
        };
        tracing::info!(pid = pm.child.pid, pgdata = %pgdata.display(), "postgres started");
        loop {
            if let Some(st) = *pm.child.exited.borrow() {
                return Err(start_failed(format!("postgres exited ({st})"), log_file));
            }
            if let Some(pf) = PidFile::read(pgdata) {
                if i64::from(pf.pid) == i64::from(pm.child.pid)
                    && (pf.status == "ready" || pf.status == "standby")
                {
                    tracing::info!(
                        pid = pm.child.pid,
                        status = %pf.status,
                        ms = started.elapsed().as_millis() as u64,
                        "postgres accepts connections"
                    );
                    return Ok(pm);
                }
            }
            if let Err(e) = give_up() {
                tracing::info!(pid = pm.child.pid, reason = %e, "start abandoned before postgres was ready");
                pm.stop(StopMode::Immediate).await;
                return Err(e);
            }
            if started.elapsed() > timeout {
                pm.child.signal(Signal::SIGQUIT);
                return Err(start_failed(
                    format!("not ready within {} s", timeout.as_secs()),
                    log_file,
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid
    }

    pub fn is_running(&self) -> bool {
        !self.child.has_exited()
    }

    /// A receiver that changes when the postmaster exits.
    pub fn exit_watch(&self) -> tokio::sync::watch::Receiver<Option<ExitStatus>> {
        self.child.exited.clone()
    }

    /// Stops postgres, bounded: `mode` first; a fast stop still running after
    /// [`FAST_STOP_PATIENCE`] becomes immediate; an immediate stop still running after
    /// [`IMMEDIATE_STOP_PATIENCE`] ends with SIGKILL to the postmaster and to every one
    /// of its children's process groups (each child of the postmaster leads its own
    /// group). A backend waiting for a half-open client's startup packet, or a walsender
    /// blocked on a standby that vanished, can otherwise hold a stop for a minute, and
    /// with it a failover's demotion or a heal's rewind. None only when even SIGKILL did
    /// not end the postmaster within [`KILL_PATIENCE`] (a process stuck in the kernel).
    pub async fn stop(mut self, mode: StopMode) -> Option<ExitStatus> {
        let sig = match mode {
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        };
        tracing::info!(pid = self.child.pid, ?mode, pgdata = %self.pgdata.display(), "stopping postgres");
        self.child.signal(sig);
        if is_frozen(self.child.pid) {
            // Waiting out the patience below would only delay a failover's demotion
            // (or a heal's rewind) by seconds: nothing but SIGKILL reaches it. A primary
            // killed this way is a crash, which PostgreSQL recovers from.
            tracing::warn!(
                pid = self.child.pid,
                "postgres is frozen (stopped by a signal): killing every postgres process (SIGKILL)"
            );
            kill_tree(self.child.pid);
            return tokio::time::timeout(KILL_PATIENCE, self.child.wait())
                .await
                .ok();
        }
        if mode == StopMode::Fast {
            if let Ok(st) = tokio::time::timeout(FAST_STOP_PATIENCE, self.child.wait()).await {
                return Some(st);
            }
            tracing::warn!(
                pid = self.child.pid,
                secs = FAST_STOP_PATIENCE.as_secs(),
                "fast stop too slow; immediate stop"
            );
            self.child.signal(Signal::SIGQUIT);
        }
        if let Ok(st) = tokio::time::timeout(IMMEDIATE_STOP_PATIENCE, self.child.wait()).await {
            return Some(st);
        }
        tracing::warn!(
            pid = self.child.pid,
            "immediate stop too slow; killing every postgres process (SIGKILL)"
        );
        kill_tree(self.child.pid);
        match tokio::time::timeout(KILL_PATIENCE, self.child.wait()).await {
            Ok(st) => Some(st),
            Err(_) => {
                tracing::error!(
                    pid = self.child.pid,
                    "postgres survived SIGKILL (stuck in the kernel?); going on without it"
                );
                None
            }
        }
    }

    /// Reloads the configuration files.
    pub fn reload(&self) {
        self.child.signal(Signal::SIGHUP);
    }
}

fn start_failed(reason: String, log_file: &Path) -> KeeperError {
    let text = std::fs::read_to_string(log_file).unwrap_or_default();
    KeeperError::StartFailed {
        reason,
        log: log_file.to_path_buf(),
        tail: super::tail(&text, 15),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_process_stopped_by_sigstop_is_frozen_and_sigkill_ends_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let p = nix::unistd::Pid::from_raw(pid as i32);
        assert!(!is_frozen(pid));
        nix::sys::signal::kill(p, Signal::SIGSTOP).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_frozen(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(is_frozen(pid), "SIGSTOPped sleep not seen as frozen");
        // SIGINT stays pending on a stopped process; SIGKILL does not.
        nix::sys::signal::kill(p, Signal::SIGINT).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            child.try_wait().unwrap().is_none(),
            "a frozen process acted on SIGINT"
        );
        kill_tree(pid);
        let st = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(Signal::SIGKILL as i32)
        );
        assert!(!is_frozen(pid));
    }

    #[test]
    fn lock_files_naming_a_live_process_that_is_no_postgres_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let pgdata = dir.path().join("data");
        std::fs::create_dir(&pgdata).unwrap();
        let lock = dir.path().join(".s.PGSQL.5999.lock");
        let socket = dir.path().join(".s.PGSQL.5999");
        let pid_file = pgdata.join("postmaster.pid");
        // This test process: alive, and not postgres (what a reused PID looks like).
        let me = std::process::id();
        let text = format!("{me}\n{}\n1700000000\n5999\n", pgdata.display());
        std::fs::write(&lock, &text).unwrap();
        std::fs::write(&socket, b"").unwrap();
        std::fs::write(&pid_file, &text).unwrap();
        let other = dir.path().join(".s.PGSQL.6000.lock");
        std::fs::write(&other, &text).unwrap();
        let removed = clear_stale_locks(&pgdata, dir.path(), 5999);
        assert_eq!(removed, vec![me as i32, me as i32]);
        assert!(!lock.exists() && !socket.exists() && !pid_file.exists());
        assert!(other.exists(), "another port's lock was touched");
        // Nothing left: nothing to do.
        assert!(clear_stale_locks(&pgdata, dir.path(), 5999).is_empty());
    }

    #[test]
    fn a_lock_file_of_a_live_postgres_is_kept() {
        // A process named postgres: sleep run through a symlink of that name (the
        // kernel names a process after the path it was started by). Not a copy: a
        // parallel test's fork can inherit the copy's open write descriptor, and
        // executing it then fails with "Text file busy" (seen once in CI).
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("postgres");
        std::os::unix::fs::symlink("/bin/sleep", &fake).unwrap();
        let mut child = std::process::Command::new(&fake).arg("30").spawn().unwrap();
        // Until its exec, the child is a copy of this test (another name).
        let comm = format!("/proc/{}/comm", child.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "postgres"
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let pgdata = dir.path().join("data");
        std::fs::create_dir(&pgdata).unwrap();
        let lock = dir.path().join(".s.PGSQL.5998.lock");
        std::fs::write(&lock, format!("{}\n", child.id())).unwrap();
        std::fs::write(pgdata.join("postmaster.pid"), format!("{}\n", child.id())).unwrap();
        let removed = clear_stale_locks(&pgdata, dir.path(), 5998);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(removed.is_empty(), "{removed:?}");
        assert!(lock.exists() && pgdata.join("postmaster.pid").exists());
    }

    #[test]
    fn the_parent_and_children_of_a_process_are_found_in_proc() {
        let me = std::process::id();
        let parent = nix::unistd::getppid().as_raw() as u32;
        assert_eq!(parent_of(me), Some(parent));
        assert!(children_of(parent).contains(&me));
        assert!(!children_of(me).contains(&me));
    }

    #[tokio::test]
    async fn kill_tree_ends_a_process_and_its_children_that_ignore_polite_signals() {
        // A shell that ignores SIGINT and SIGQUIT, with a child in its own session.
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "trap '' INT QUIT; setsid sleep 600 & echo $!; wait"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(sh.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        let alive = |pid: i32| {
            // A zombie counts as gone.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        };
        assert!(alive(grandchild));
        kill_tree(sh.id());
        let status = sh.wait().unwrap();
        assert!(!status.success());
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(grandchild) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(grandchild), "the child in its own session survived");
    }
}
