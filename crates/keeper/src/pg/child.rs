//! Child processes that die with the keeper.
//!
//! Every PostgreSQL process the keeper starts (the postmaster, initdb, pg_basebackup,
//! pg_rewind) gets `PR_SET_PDEATHSIG`: if the keeper dies, even by SIGKILL, the kernel
//! signals the child. For the postmaster that signal is SIGQUIT (immediate shutdown), so
//! a keeper that dies never leaves a writable primary behind (DESIGN.md invariant 1).
//!
//! The death signal fires when the *thread* that forked the child exits, not the
//! process; so each child is forked by a dedicated thread that then waits for it and
//! exits only after the child has.

use std::process::{Command, ExitStatus};

use nix::sys::signal::Signal;
use tokio::sync::{oneshot, watch};

use crate::error::{KeeperError, Result};

/// Environment variables that hold secrets and that no child inherits.
pub const SECRET_ENV: [&str; 2] = ["PGQUORUM_REPLICATION_PASSWORD", "PGPASSWORD"];

/// A running child: its pid, and a channel that yields its exit status once.
#[derive(Debug, Clone)]
pub struct Child {
    pub pid: u32,
    pub exited: watch::Receiver<Option<ExitStatus>>,
}

impl Child {
    pub fn has_exited(&self) -> bool {
        self.exited.borrow().is_some()
    }

    pub async fn wait(&mut self) -> ExitStatus {
        loop {
            if let Some(st) = *self.exited.borrow_and_update() {
                return st;
            }
            if self.exited.changed().await.is_err() {
                // The waiting thread is gone without a status: treat as killed.
                return std::os::unix::process::ExitStatusExt::from_raw(9);
            }
        }
    }

    pub fn signal(&self, sig: Signal) {
        if self.has_exited() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }
}

/// The pipes of a child started with piped stdin/stdout/stderr.
pub struct Pipes {
    pub stdin: Option<std::process::ChildStdin>,
    pub stdout: Option<std::process::ChildStdout>,
    pub stderr: Option<std::process::ChildStderr>,
}

/// Spawns `cmd` so that it receives `death_signal` when the keeper dies.
pub async fn spawn(mut cmd: Command, death_signal: Signal, what: &str) -> Result<(Child, Pipes)> {
    set_death_signal(&mut cmd, death_signal);
    // The keeper may have been given the replication password in its environment;
    // no child needs it there (libpq tools read the password file), and postgres
    // would pass it on to every backend and archive command.
    for var in SECRET_ENV {
        cmd.env_remove(var);
    }
    let (pid_tx, pid_rx) = oneshot::channel();
    let (exit_tx, exit_rx) = watch::channel(None);
    let name = format!("child-{what}");
    std::thread::Builder::new()
        .name(name)
        .spawn(move || match cmd.spawn() {
            Err(e) => {
                let _ = pid_tx.send(Err(e));
            }
            Ok(mut child) => {
                let pipes = Pipes {
                    stdin: child.stdin.take(),
                    stdout: child.stdout.take(),
                    stderr: child.stderr.take(),
                };
                let _ = pid_tx.send(Ok((child.id(), pipes)));
                let status = child
                    .wait()
                    .unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(9));
                let _ = exit_tx.send(Some(status));
            }
        })
        .map_err(|e| KeeperError::Spawn {
            tool: what.to_string(),
            cause: e,
        })?;
    let (pid, pipes) = pid_rx
        .await
        .map_err(|_| KeeperError::Spawn {
            tool: what.to_string(),
            cause: std::io::Error::other("spawning thread vanished"),
        })?
        .map_err(|e| KeeperError::Spawn {
            tool: what.to_string(),
            cause: e,
        })?;
    Ok((
        Child {
            pid,
            exited: exit_rx,
        },
        pipes,
    ))
}

// The one place with unsafe code in pgquorum: `pre_exec` runs between fork and exec,
// where only async-signal-safe calls are allowed; prctl, getppid and kill are plain
// syscalls that allocate nothing and take no lock.
#[allow(unsafe_code)]
fn set_death_signal(cmd: &mut Command, sig: Signal) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid();
    // SAFETY: the closure only makes async-signal-safe syscalls (see above).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(sig).map_err(std::io::Error::from)?;
            // The keeper may have died between fork and prctl: then nobody will signal us.
            if nix::unistd::getppid() != parent {
                let _ = nix::sys::signal::raise(sig);
            }
            Ok(())
        });
    }
}
