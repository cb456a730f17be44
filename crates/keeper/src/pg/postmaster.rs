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
        let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
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
    let pid = nix::unistd::Pid::from_raw(pf.pid);
    if nix::sys::signal::kill(pid, None).is_err() {
        return None;
    }
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", pf.pid)).unwrap_or_default();
    (comm.trim() == "postgres" || comm.trim() == "postmaster").then_some(pf.pid)
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
    /// Starts `postgres -D pgdata` and waits until it accepts connections.
    pub async fn start(
        bin: &PgBin,
        pgdata: &Path,
        log_file: &Path,
        timeout: Duration,
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

    /// Stops postgres and waits for it to exit; a fast stop that takes longer than
    /// `patience` becomes immediate.
    pub async fn stop(mut self, mode: StopMode, patience: Duration) -> ExitStatus {
        let sig = match mode {
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        };
        tracing::info!(pid = self.child.pid, ?mode, pgdata = %self.pgdata.display(), "stopping postgres");
        self.child.signal(sig);
        match tokio::time::timeout(patience, self.child.wait()).await {
            Ok(st) => st,
            Err(_) => {
                tracing::warn!(pid = self.child.pid, "fast stop too slow; immediate stop");
                self.child.signal(Signal::SIGQUIT);
                self.child.wait().await
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
