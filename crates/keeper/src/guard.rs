//! The fence guard: a separate process that stops a writable postgres at the lease
//! deadline even when the keeper itself is not scheduled (SIGSTOP, a debugger, CPU
//! starvation, a blocked runtime).
//!
//! The keeper starts one guard (`pgquorum keeper guard --pgdata DIR`, its own
//! executable) as a child that dies with it (`PR_SET_PDEATHSIG`), and writes one line to
//! the guard's stdin whenever the lease or the writability of its postgres changes:
//!
//! * `arm NS`: postgres is, or may become, writable; stop it once `CLOCK_MONOTONIC`
//!   reaches NS nanoseconds. The clock is one for every process of the host, so the
//!   deadline means the same instant to the keeper and to the guard.
//! * `disarm`: postgres takes no writes (a standby, stopped, or no lease to enforce).
//!
//! At the deadline the guard stops the postmaster named in `postmaster.pid` of its data
//! directory: SIGINT (fast shutdown: no new sessions, every session terminated), then
//! SIGQUIT after [`QUIT_AFTER`], then SIGKILL of the postmaster after [`KILL_AFTER`]
//! (its backends, each in its own session, exit when they see the postmaster gone). The pid is checked before each signal: the process must be alive (not
//! a zombie) and run in the data directory (`/proc/PID/cwd`), so a recycled pid is never
//! signalled. End of input means the keeper is gone (its postgres got the keeper's death
//! signal): the guard exits, so it can never stop a postgres that a later keeper started
//! under a new lease. See docs/ARCHITECTURE.md, "Fencing".

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::error::{KeeperError, Result};

/// After SIGINT, how long the postmaster has to exit before SIGQUIT.
pub const QUIT_AFTER: Duration = Duration::from_secs(2);
/// After SIGINT, how long before SIGKILL of the whole process group.
pub const KILL_AFTER: Duration = Duration::from_secs(4);
/// How often a stopping postmaster is checked on.
const CHECK_EVERY: Duration = Duration::from_millis(50);

/// Nanoseconds of `CLOCK_MONOTONIC`.
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let s = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let n = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            s.saturating_mul(1_000_000_000).saturating_add(n)
        }
        // CLOCK_MONOTONIC always exists on Linux; a 0 makes every deadline "past", which
        // fences early rather than late.
        Err(_) => 0,
    }
}

/// The `CLOCK_MONOTONIC` reading of `at`. The clock is read before `Instant::now()`, so
/// the result is never later than the true value: a guard deadline computed this way
/// fires at, or a few microseconds before, the keeper's own lease end.
pub fn instant_to_ns(at: Instant) -> u64 {
    let mono = monotonic_ns();
    let now = Instant::now();
    if at >= now {
        mono.saturating_add(u64::try_from((at - now).as_nanos()).unwrap_or(u64::MAX))
    } else {
        mono.saturating_sub(u64::try_from((now - at).as_nanos()).unwrap_or(u64::MAX))
    }
}

/// One message from the keeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    Arm(u64),
    Disarm,
}

impl Msg {
    pub fn line(&self) -> String {
        match self {
            Msg::Arm(ns) => format!("arm {ns}\n"),
            Msg::Disarm => "disarm\n".to_string(),
        }
    }

    pub fn parse(line: &str) -> Option<Msg> {
        let mut w = line.split_ascii_whitespace();
        let m = match (w.next()?, w.next()) {
            ("arm", Some(ns)) => Msg::Arm(ns.parse().ok()?),
            ("disarm", None) => Msg::Disarm,
            _ => return None,
        };
        w.next().is_none().then_some(m)
    }
}

/// What the guard does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Find the postmaster and send it SIGINT.
    Fence,
    /// Send SIGQUIT to the postmaster being stopped.
    Quit(i32),
    /// SIGKILL the postmaster being stopped (and its process group: helpers that
    /// stayed in it).
    KillGroup(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stopping {
    pid: i32,
    since: u64,
    quit_sent: bool,
    kill_sent: bool,
}

/// The guard's decisions, with time passed in (unit-tested without processes).
#[derive(Debug, Default, Clone)]
pub struct Guard {
    deadline: Option<u64>,
    stopping: Option<Stopping>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Guard {
    pub fn apply(&mut self, m: Msg) {
        self.deadline = match m {
            Msg::Arm(ns) => Some(ns),
            Msg::Disarm => None,
        };
    }

    /// The actions due at `now`; the deadline is consumed when it fires.
    pub fn due(&mut self, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(s) = &mut self.stopping {
            if !s.quit_sent && now >= s.since.saturating_add(ns(QUIT_AFTER)) {
                s.quit_sent = true;
                out.push(Action::Quit(s.pid));
            }
            if !s.kill_sent && now >= s.since.saturating_add(ns(KILL_AFTER)) {
                s.kill_sent = true;
                out.push(Action::KillGroup(s.pid));
            }
        }
        if self.deadline.is_some_and(|d| now >= d) {
            self.deadline = None;
            out.push(Action::Fence);
        }
        out
    }

    /// SIGINT was sent to `pid` at `now`.
    pub fn fenced(&mut self, pid: i32, now: u64) {
        if self.stopping.is_some_and(|s| s.pid == pid) {
            return;
        }
        self.stopping = Some(Stopping {
            pid,
            since: now,
            quit_sent: false,
            kill_sent: false,
        });
    }

    /// The postmaster being stopped is gone.
    pub fn stopped(&mut self) {
        self.stopping = None;
    }

    pub fn stopping_pid(&self) -> Option<i32> {
        self.stopping.map(|s| s.pid)
    }

    /// How long to wait for input before something is due.
    pub fn wait(&self, now: u64) -> Option<Duration> {
        let mut w: Option<Duration> = self
            .deadline
            .map(|d| Duration::from_nanos(d.saturating_sub(now)));
        if self.stopping.is_some() {
            w = Some(w.map_or(CHECK_EVERY, |x| x.min(CHECK_EVERY)));
        }
        w
    }
}

/// The postmaster of `pgdata` if it runs: the pid in `postmaster.pid`, alive, not a
/// zombie, and with `pgdata` as its working directory (postgres chdirs there).
pub fn find_postmaster(pgdata: &Path) -> Option<i32> {
    let pf = crate::pg::postmaster::PidFile::read(pgdata)?;
    is_postgres_of(pf.pid, pgdata).then_some(pf.pid)
}

/// `pid` is a live process working in `pgdata` (a zombie has no cwd to read).
pub fn is_postgres_of(pid: i32, pgdata: &Path) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) => cwd == pgdata,
        Err(_) => false,
    }
}

fn signal(pid: i32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// `pgquorum keeper guard`: runs until its input ends.
pub fn run(pgdata: &Path) -> Result<()> {
    // Executed as /proc/self/exe, the process would be listed as "exe".
    if let Ok(name) = std::ffi::CString::new("pgquorum-guard") {
        let _ = nix::sys::prctl::set_name(&name);
    }
    // The data directory may not exist yet (a standby being cloned, a first initdb):
    // it is resolved whenever it is needed, not once at the start, which would make
    // the guard exit (and the keeper start another) until it does.
    let given = pgdata;
    let resolve = || std::fs::canonicalize(given).unwrap_or_else(|_| given.to_path_buf());
    let stdin = std::io::stdin();
    let fd = stdin.as_fd();
    let mut guard = Guard::default();
    let mut pending = Vec::<u8>::new();
    tracing::info!(pgdata = %given.display(), "fence guard running");
    loop {
        let now = monotonic_ns();
        for a in guard.due(now) {
            act(&mut guard, a, &resolve(), now);
        }
        if let Some(pid) = guard.stopping_pid() {
            if !is_postgres_of(pid, &resolve()) {
                tracing::info!(pid, "fenced postgres has stopped");
                guard.stopped();
            }
        }
        let timeout = match guard.wait(monotonic_ns()) {
            None => nix::poll::PollTimeout::NONE,
            // Rounded up, so a wake-up is never a hair before the deadline.
            Some(d) => nix::poll::PollTimeout::try_from(
                d.saturating_add(Duration::from_micros(999))
                    .as_millis()
                    .min(60_000) as i32,
            )
            .unwrap_or(nix::poll::PollTimeout::MAX),
        };
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(KeeperError::io("waiting for the keeper", e.into())),
        }
        let mut buf = [0u8; 4096];
        let n = match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
            Err(e) => return Err(KeeperError::io("reading from the keeper", e.into())),
        };
        if n == 0 {
            // The keeper is gone; its postgres got the keeper's death signal. A guard
            // that outlived its keeper must not act on a lease a later keeper replaced.
            tracing::info!("the keeper is gone: fence guard exits");
            return Ok(());
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line);
            match Msg::parse(text.trim()) {
                Some(m) => guard.apply(m),
                None => {
                    tracing::warn!(line = %text.trim(), "fence guard: ignoring a malformed line")
                }
            }
        }
        if pending.len() > 1024 {
            pending.clear();
        }
    }
}

fn act(guard: &mut Guard, a: Action, pgdata: &Path, now: u64) {
    match a {
        Action::Fence => match find_postmaster(pgdata) {
            Some(pid) if u32::try_from(pid).is_ok_and(crate::pg::postmaster::is_frozen) => {
                // A frozen postmaster would act on the SIGINT only when continued, with
                // its backends free to commit until it does: SIGKILL is the only
                // signal it obeys now.
                tracing::error!(
                    pid,
                    "fence guard: the lease ran out and postgres is frozen: SIGKILL of every postgres process"
                );
                if let Ok(p) = u32::try_from(pid) {
                    crate::pg::postmaster::kill_tree(p);
                }
                guard.fenced(pid, now);
            }
            Some(pid) => {
                tracing::error!(
                    pid,
                    "fence guard: the lease ran out and the keeper did not stop postgres: fast shutdown"
                );
                signal(pid, Signal::SIGINT);
                guard.fenced(pid, now);
            }
            None => tracing::debug!("fence guard: lease ran out; postgres is not running"),
        },
        Action::Quit(pid) => {
            if is_postgres_of(pid, pgdata) {
                tracing::warn!(pid, "fence guard: postgres still up: immediate shutdown");
                signal(pid, Signal::SIGQUIT);
            }
        }
        Action::KillGroup(pid) => {
            if is_postgres_of(pid, pgdata) {
                tracing::warn!(
                    pid,
                    "fence guard: postgres still up: SIGKILL of its process group"
                );
                // The postmaster leads its own process group (see pg::postmaster).
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                signal(pid, Signal::SIGKILL);
            }
        }
    }
}

/// The keeper's end: the guard child and the write end of its input.
#[derive(Debug)]
pub struct Link {
    pub child: crate::pg::child::Child,
    input: std::fs::File,
}

impl Link {
    /// Starts `pgquorum keeper guard --pgdata DIR` from the keeper's own executable.
    pub async fn spawn(exe: &Path, pgdata: &Path) -> Result<Link> {
        let mut cmd = std::process::Command::new(exe);
        std::os::unix::process::CommandExt::arg0(&mut cmd, "pgquorum");
        cmd.arg("keeper")
            .arg("guard")
            .arg("--pgdata")
            .arg(pgdata)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        let (child, pipes) = crate::pg::child::spawn(cmd, Signal::SIGKILL, "fence-guard").await?;
        let stdin = pipes.stdin.ok_or_else(|| KeeperError::Spawn {
            tool: "fence-guard".into(),
            cause: std::io::Error::other("no stdin pipe"),
        })?;
        let fd: std::os::fd::OwnedFd = stdin.into();
        // A starved guard must never block the keeper: a message that does not fit is
        // dropped, and the guard then fences by an earlier deadline, never a later one.
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| KeeperError::io("reading the guard pipe's flags", e.into()))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| KeeperError::io("making the guard pipe non-blocking", e.into()))?;
        Ok(Link {
            child,
            input: std::fs::File::from(fd),
        })
    }

    /// Sends `m`; false when the guard is gone.
    pub fn send(&mut self, m: Msg) -> bool {
        match self.input.write_all(m.line().as_bytes()) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tracing::warn!("fence guard is not reading its input: message dropped");
                true
            }
            Err(_) => false,
        }
    }
}

/// Where the guard's executable is: the keeper's own (`pgquorum`).
pub fn own_exe() -> PathBuf {
    // /proc/self/exe stays valid even when the file was replaced (an upgrade): the
    // guard is always the same build as its keeper.
    PathBuf::from("/proc/self/exe")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        for m in [Msg::Arm(0), Msg::Arm(u64::MAX), Msg::Disarm] {
            assert_eq!(Msg::parse(m.line().trim()), Some(m));
        }
        for bad in [
            "",
            "arm",
            "arm -1",
            "arm 1 2",
            "disarm now",
            "fence 3",
            "arm x",
        ] {
            assert_eq!(Msg::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fences_at_the_deadline_not_before_and_only_once() {
        let mut g = Guard::default();
        g.apply(Msg::Arm(10 * S));
        assert!(g.due(10 * S - 1).is_empty());
        assert_eq!(g.wait(9 * S), Some(Duration::from_secs(1)));
        assert_eq!(g.due(10 * S), vec![Action::Fence]);
        assert!(g.due(11 * S).is_empty(), "a deadline fires once");
        assert_eq!(g.wait(11 * S), None, "nothing to wait for");
    }

    #[test]
    fn a_renewed_lease_moves_the_deadline_and_disarm_cancels_it() {
        let mut g = Guard::default();
        g.apply(Msg::Arm(10 * S));
        g.apply(Msg::Arm(12 * S));
        assert!(g.due(11 * S).is_empty());
        assert_eq!(g.due(12 * S), vec![Action::Fence]);
        g.apply(Msg::Arm(20 * S));
        g.apply(Msg::Disarm);
        assert!(g.due(30 * S).is_empty());
        // A deadline already past when it arrives fires at once.
        g.apply(Msg::Arm(1));
        assert_eq!(g.due(30 * S), vec![Action::Fence]);
    }

    #[test]
    fn a_postmaster_that_does_not_stop_is_escalated() {
        let mut g = Guard::default();
        g.apply(Msg::Arm(S));
        assert_eq!(g.due(S), vec![Action::Fence]);
        g.fenced(42, S);
        assert_eq!(g.wait(S), Some(CHECK_EVERY));
        assert!(g.due(S + ns(QUIT_AFTER) - 1).is_empty());
        assert_eq!(g.due(S + ns(QUIT_AFTER)), vec![Action::Quit(42)]);
        assert_eq!(g.due(S + ns(KILL_AFTER)), vec![Action::KillGroup(42)]);
        assert!(g.due(S + 100 * S).is_empty());
        g.stopped();
        assert_eq!(g.wait(S + 100 * S), None);
    }

    #[test]
    fn only_a_live_process_in_the_data_directory_is_signalled() {
        let me = i32::try_from(std::process::id()).unwrap_or(0);
        let cwd = std::env::current_dir().unwrap_or_default();
        assert!(is_postgres_of(me, &cwd));
        assert!(!is_postgres_of(me, Path::new("/nonexistent")));
        assert!(!is_postgres_of(0, &cwd));
        assert!(!is_postgres_of(-1, &cwd));
    }

    #[test]
    fn instants_map_to_the_monotonic_clock() {
        let now = Instant::now();
        let a = instant_to_ns(now + Duration::from_secs(5));
        let b = monotonic_ns();
        let ahead = a.saturating_sub(b);
        assert!(ahead <= 5 * S && ahead > 4 * S, "{ahead}");
    }
}
