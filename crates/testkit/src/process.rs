//! Real processes for tests: spawned with a log file, killed by their own PID (SIGKILL),
//! killed on drop.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Ports handed out by [`free_port`] come from here: below Linux's ephemeral range
/// (32768-60999 by default), so that no outgoing connection of a test's own processes
/// can take one as its source port between the test choosing it and a child binding
/// it (a port the OS hands out for port 0 is from that range, and was seen taken so).
const PORTS: std::ops::Range<u16> = 12000..32000;

/// A free TCP port on 127.0.0.1, never handed out twice by this process. The port is
/// free when this returns; a child process binds it right after.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORTS.end - PORTS.start);
    // Processes running side by side (test binaries, benches) start at different places.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let i = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = PORTS.start + i as u16;
        if port_free(port) {
            return port;
        }
    }
    panic!("no free loopback port in {PORTS:?}");
}

/// SIGKILL by PID, ignoring a process that is already gone.
pub fn kill9(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// Nothing listens on 127.0.0.1:`port` (a killed postmaster released it).
pub fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Something listens on 127.0.0.1:`port`: a connection is accepted. Unlike
/// [`port_free`] this never binds the port, so polling it cannot make the process
/// that is about to bind it fail with "Address already in use".
pub fn port_listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// `127.0.0.1:PORT` with a free port.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A temporary directory removed on drop (kept if PGQUORUM_KEEP_TMP is set, to read
/// the logs of a failed run).
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    if std::env::var_os("PGQUORUM_KEEP_TMP").is_some() {
        b.disable_cleanup(true);
    }
    match b.tempdir() {
        Ok(d) => d,
        Err(e) => panic!("cannot create a temporary directory: {e}"),
    }
}

/// The `pgquorum` binary built beforehand (`cargo build -p pgquorum`, or `--release`):
/// $PGQUORUM_BIN if set, else next to the running executable — tests run from
/// `target/<profile>/deps/`, bench binaries from `target/<profile>/` — else
/// `$CARGO_TARGET_DIR/debug/pgquorum`.
pub fn pgquorum_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PGQUORUM_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            if let Some(d) = dir {
                let candidate = d.join("pgquorum");
                if candidate.is_file() {
                    return candidate;
                }
                dir = d.parent().map(Path::to_path_buf);
            }
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let p = target.join("debug").join("pgquorum");
    if !p.is_file() {
        panic!(
            "the pgquorum binary was not found (looked next to the test executable and at {}); run `cargo build -p pgquorum` first or set PGQUORUM_BIN",
            p.display()
        );
    }
    p
}

/// A child process that this test started. Dropping it kills it (SIGKILL).
pub struct Proc {
    child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args...` with stdout and stderr appended to `log`.
    pub fn spawn<I, S>(name: &str, program: &Path, args: I, log: &Path) -> std::io::Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::spawn_with(name, Command::new(program).args(args), log)
    }

    /// Starts a prepared command (environment, user, ...) with its output in `log`.
    pub fn spawn_with(name: &str, cmd: &mut Command, log: &Path) -> std::io::Result<Proc> {
        let out = File::options().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()?;
        Ok(Proc {
            child,
            name: name.to_owned(),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL by this process's PID, then reap it. Idempotent.
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && self.is_running() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Exit status once it has exited (None while it runs).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }

    /// Everything the process wrote so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` until it returns true or `timeout` passes; the error names `what`.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Async `wait_until`: `check` is awaited each round.
pub async fn wait_until_async<F, Fut>(
    timeout: Duration,
    what: &str,
    mut check: F,
) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_killed_process_is_gone_and_drop_kills() {
        let dir = temp_dir("testkit-");
        let log = dir.path().join("sleep.log");
        let mut p = Proc::spawn("sleep", Path::new("sleep"), ["30"], &log).unwrap();
        assert!(p.is_running());
        p.kill();
        assert!(!p.is_running());
        let p2 = Proc::spawn("sleep", Path::new("sleep"), ["30"], &log).unwrap();
        let pid = p2.pid() as i32;
        drop(p2);
        // Reaped and gone: signalling the PID fails.
        assert!(kill(Pid::from_raw(pid), None).is_err());
    }

    #[test]
    fn wait_until_times_out_with_a_message() {
        let e = wait_until(Duration::from_millis(100), "never", || false).unwrap_err();
        assert!(e.contains("never"));
        wait_until(Duration::from_millis(100), "now", || true).unwrap();
    }

    #[test]
    fn free_ports_differ() {
        assert_ne!(free_port(), 0);
    }
}
