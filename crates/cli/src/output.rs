//! The output edge: every line this binary prints goes through here (main.rs shadows
//! `println!`/`print!`/`eprintln!` with macros that call these functions).
//!
//! Rust ignores SIGPIPE, so a reader that goes away (`pgquorum show events | head -1`)
//! turns the next write into an EPIPE error, which std's `println!` turns into a panic
//! (exit 101). Here a closed stdout means the reader has what it wanted: the command
//! ends at once with exit 0, as `cat` and `grep` would. A long-running supervisor
//! (`local up`) sets [`keep_running_on_closed_stdout`] instead: its children must still
//! be stopped in order, so it goes on without printing.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static KEEP_RUNNING: AtomicBool = AtomicBool::new(false);

/// A closed stdout no longer ends the process (for `local up`, which must stop its
/// children itself).
pub fn keep_running_on_closed_stdout() {
    KEEP_RUNNING.store(true, Ordering::Relaxed);
}

fn closed(e: &std::io::Error) {
    if e.kind() == ErrorKind::BrokenPipe && !KEEP_RUNNING.load(Ordering::Relaxed) {
        std::process::exit(0);
    }
    // Any other write error (or a closed stdout under `local up`): nothing sensible can
    // be said about it on the stream that failed; the command goes on.
}

/// `println!`.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        closed(&e);
    }
}

/// `print!`, flushed (used for prompts and partial lines).
pub fn text(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        closed(&e);
    }
}

/// `eprintln!`: a closed stderr is ignored (there is nowhere left to say anything).
pub fn err_line(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}
