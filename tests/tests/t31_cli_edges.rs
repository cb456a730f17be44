//! The CLI at its edges, run as a script runs it: a reader that closed the pipe is no
//! panic (exit 0); errors carry a documented exit code and, with `--json` anywhere on
//! the line, come as one JSON object; an unreachable monitor is named with its cause
//! within about a second; completion scripts and man pages are generated.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgquorum_testkit::{free_port, pgquorum_bin, temp_dir};

/// Runs pgquorum with stdout a pipe whose reader is already gone: every write fails
/// with EPIPE, as in `pgquorum show events | head -1` once head has exited.
fn run_with_closed_stdout(args: &[&str]) -> std::process::ExitStatus {
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = Command::new(pgquorum_bin())
        .args(args)
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{args:?} panicked: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.status
}

#[test]
fn a_closed_pipe_ends_the_command_with_exit_0() {
    for args in [
        &["completions", "bash"][..],
        &["completions", "zsh"],
        &["--json", "completions", "fish"],
    ] {
        let status = run_with_closed_stdout(args);
        assert_eq!(status.code(), Some(0), "{args:?}: {status}");
    }
    // A command that writes after doing its work (a CA made, then said so).
    let tmp = temp_dir("pgquorum-t31-pipe-");
    let dir = tmp.path().join("certs");
    let status =
        run_with_closed_stdout(&["cert", "create-ca", "--certs-dir", dir.to_str().unwrap()]);
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(dir.join("ca.crt").exists());
}

fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(pgquorum_bin())
        .args(args)
        .env_remove("PGQUORUM_MONITOR")
        .env_remove("PGQUORUM_CERTS_DIR")
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn errors_have_distinct_exit_codes_and_json_anywhere_on_the_line() {
    // Nothing listens: "unreachable" (6), naming every address and the cause, well
    // within the 10 s a member that answers "no leader" would be retried for.
    let a = format!("127.0.0.1:{}", free_port());
    let b = format!("127.0.0.1:{}", free_port());
    let list = format!("{a},{b}");
    let started = Instant::now();
    let (code, out, err) = cli(&["show", "state", "--insecure", "--monitor", &list]);
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    assert_eq!(code, Some(6), "{out}{err}");
    assert!(err.contains(&a) && err.contains(&b), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");

    // The same with --json, before the command and after it: one object on stdout.
    for args in [
        vec!["--json", "show", "state", "--insecure", "--monitor", &list],
        vec!["show", "state", "--insecure", "--monitor", &list, "--json"],
        vec![
            "perform",
            "switchover",
            "--insecure",
            "--monitor",
            &list,
            "--json",
        ],
        vec![
            "monitor",
            "status",
            "--insecure",
            "--monitor",
            &list,
            "--json",
        ],
    ] {
        let (code, out, err) = cli(&args);
        assert_eq!(code, Some(6), "{args:?}: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}{err}"));
        assert_eq!(v["error"]["kind"], "unreachable", "{v}");
        assert_eq!(v["error"]["exit_code"], 6, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(&a), "{v}");
    }

    // A usage error is 2, as JSON too; no monitor given is a usage error, not a guess.
    let (code, out, _) = cli(&["--json", "show", "state", "--no-such-flag"]);
    assert_eq!(code, Some(2));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["error"]["kind"], "usage", "{v}");
    let (code, _, err) = cli(&["monitor", "status", "--insecure"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("PGQUORUM_MONITOR"), "{err}");
    let (code, _, err) = cli(&["show", "state", "--insecure"]);
    assert_eq!(code, Some(2), "{err}");

    // A command that exists only locally: `local down` with nothing running.
    let tmp = temp_dir("pgquorum-t31-");
    let dir = tmp.path().display().to_string();
    let (code, out, _) = cli(&["local", "down", "--dir", &dir, "--json"]);
    assert_eq!(code, Some(3), "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["error"]["kind"], "invalid", "{v}");
}

#[test]
fn completions_and_man_pages_are_generated_from_the_command_line() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = cli(&["completions", shell]);
        assert_eq!(code, Some(0), "{err}");
        for word in ["switchover", "maintenance", "json", "local"] {
            assert!(out.contains(word), "{shell} completion lacks {word}");
        }
    }
    let tmp = temp_dir("pgquorum-t31-man-");
    let out_dir = tmp.path().join("man1");
    let (code, _, err) = cli(&["man", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    for page in [
        "pgquorum.1",
        "pgquorum-show-state.1",
        "pgquorum-perform-switchover.1",
        "pgquorum-local-kill.1",
    ] {
        let text =
            std::fs::read_to_string(out_dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    // `show uri --role` exists with its two values.
    let (code, out, err) = cli(&["show", "uri", "--help"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("--role") && out.contains("rw") && out.contains("ro"),
        "{out}"
    );
}
