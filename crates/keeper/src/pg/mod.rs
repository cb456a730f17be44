//! Thin, checked wrappers around the PostgreSQL programs: every exit status is checked
//! and stderr is kept in the error.

pub mod child;
pub mod postmaster;

use std::ffi::OsString;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::signal::Signal;
use pgquorum_core::{Lsn, LsnParseError};

use crate::error::{KeeperError, Result};

/// The PostgreSQL binaries in use and their major version.
#[derive(Debug, Clone)]
pub struct PgBin {
    pub dir: PathBuf,
    pub major: u32,
}

const NEEDED: [&str; 5] = [
    "postgres",
    "initdb",
    "pg_basebackup",
    "pg_rewind",
    "pg_controldata",
];

impl PgBin {
    /// `--pg-bindir`, else `pg_config --bindir`, else the directory of `postgres` on PATH.
    pub fn locate(explicit: Option<&Path>) -> Result<PgBin> {
        let dir = match explicit {
            Some(d) => d.to_path_buf(),
            None => from_pg_config().or_else(from_path).ok_or_else(|| {
                KeeperError::MissingBinaries(
                    "neither `pg_config --bindir` nor PATH gives a directory with `postgres`"
                        .into(),
                )
            })?,
        };
        let missing: Vec<&str> = NEEDED
            .iter()
            .copied()
            .filter(|b| !dir.join(b).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(KeeperError::MissingBinaries(format!(
                "{} missing in {}",
                missing.join(", "),
                dir.display()
            )));
        }
        let out = Command::new(dir.join("postgres"))
            .arg("--version")
            .output()
            .map_err(|e| KeeperError::Spawn {
                tool: "postgres --version".into(),
                cause: e,
            })?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let major = parse_version(&text).ok_or_else(|| {
            KeeperError::MissingBinaries(format!("cannot read the version from {text:?}"))
        })?;
        Ok(PgBin { dir, major })
    }

    pub fn path(&self, tool: &str) -> PathBuf {
        self.dir.join(tool)
    }

    /// Runs a tool to completion; returns its stdout, or its stderr in the error.
    /// Each stderr line goes to the log as it comes (pg_basebackup's progress).
    pub async fn run(&self, tool: &str, args: &[OsString], env: &[(&str, &str)]) -> Result<String> {
        let mut cmd = Command::new(self.path(tool));
        cmd.args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        tracing::debug!(tool, ?args, "running");
        let (mut child, pipes) = child::spawn(cmd, Signal::SIGKILL, tool).await?;
        let tool_name = tool.to_string();
        let stderr_task = tokio::task::spawn_blocking(move || {
            let mut kept = String::new();
            if let Some(err) = pipes.stderr {
                // pg_basebackup --progress ends its lines with '\r'.
                let mut reader = std::io::BufReader::new(err);
                let mut buf = Vec::new();
                let mut last_log = std::time::Instant::now();
                loop {
                    buf.clear();
                    match read_until_cr_or_lf(&mut reader, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf).trim().to_string();
                            if line.is_empty() {
                                continue;
                            }
                            let progress = line.contains("kB (");
                            if !progress || last_log.elapsed().as_millis() >= 1000 {
                                tracing::info!(tool = %tool_name, "{line}");
                                last_log = std::time::Instant::now();
                            }
                            if !progress {
                                kept.push_str(&line);
                                kept.push('\n');
                            }
                        }
                    }
                }
            }
            kept
        });
        let stdout_task = tokio::task::spawn_blocking(move || {
            let mut out = String::new();
            if let Some(mut o) = pipes.stdout {
                let _ = o.read_to_string(&mut out);
            }
            out
        });
        let status = child.wait().await;
        let stderr = stderr_task.await.unwrap_or_default();
        let stdout = stdout_task.await.unwrap_or_default();
        if status.success() {
            Ok(stdout)
        } else {
            Err(KeeperError::Tool {
                tool: tool.to_string(),
                status: status.to_string(),
                stderr: tail(&stderr, 20),
            })
        }
    }

    /// What pg_controldata says about a data directory.
    pub async fn controldata(&self, pgdata: &Path) -> Result<ControlData> {
        let out = self
            .run("pg_controldata", &["-D".into(), pgdata.into()], &[])
            .await?;
        ControlData::parse(&out).ok_or_else(|| KeeperError::Tool {
            tool: "pg_controldata".into(),
            status: "unreadable output".into(),
            stderr: tail(&out, 10),
        })
    }
}

fn read_until_cr_or_lf(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut n = 0;
    loop {
        let (done, used) = {
            let avail = r.fill_buf()?;
            if avail.is_empty() {
                return Ok(n);
            }
            match avail.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    buf.extend_from_slice(&avail[..i]);
                    (true, i + 1)
                }
                None => {
                    buf.extend_from_slice(avail);
                    (false, avail.len())
                }
            }
        };
        r.consume(used);
        n += used;
        if done {
            return Ok(n);
        }
    }
}

fn from_pg_config() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    dir.join("postgres").is_file().then_some(dir)
}

fn from_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| d.join("postgres").is_file())
}

/// "postgres (PostgreSQL) 15.18 (Debian ...)" -> 15
pub fn parse_version(text: &str) -> Option<u32> {
    let rest = text.split(')').nth(1)?.trim();
    let num = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    num.parse().ok()
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The facts pg_controldata gives that the keeper uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    pub system_identifier: u64,
    pub timeline: u32,
    /// e.g. "in production", "shut down", "shut down in recovery", "in archive recovery".
    pub cluster_state: String,
    /// Where the latest checkpoint record starts. After a clean shutdown of a primary
    /// ("shut down") that record is the last one written: every commit lies below it.
    /// None: 0/0, no position.
    pub checkpoint_lsn: Option<Lsn>,
}

impl ControlData {
    /// The WAL position and timeline a stopped data directory is known to end at, or
    /// None when pg_control cannot tell: after a crash the WAL goes on past the last
    /// checkpoint, and a standby's restartpoint lags what it received.
    pub fn final_position(&self) -> Option<(Lsn, u32)> {
        if self.cluster_state != "shut down" {
            return None;
        }
        Some((self.checkpoint_lsn?, self.timeline))
    }
}

impl ControlData {
    pub fn parse(out: &str) -> Option<ControlData> {
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim_start_matches(':').trim().to_string())
        };
        Some(ControlData {
            system_identifier: field("Database system identifier")?.parse().ok()?,
            timeline: field("Latest checkpoint's TimeLineID")?.parse().ok()?,
            cluster_state: field("Database cluster state")?,
            checkpoint_lsn: match field("Latest checkpoint location")?.parse::<Lsn>() {
                Ok(l) => Some(l),
                Err(LsnParseError::Zero) => None,
                Err(LsnParseError::Malformed(_)) => return None,
            },
        })
    }
}

/// PG_VERSION of a data directory, if it has one.
pub fn data_dir_version(pgdata: &Path) -> Option<u32> {
    std::fs::read_to_string(pgdata.join("PG_VERSION"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn version_and_controldata_parse() {
        assert_eq!(
            parse_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_version("garbage"), None);
        let out = "pg_control version number:            1300\n\
                   Database system identifier:           7311234567890123456\n\
                   Database cluster state:               shut down in recovery\n\
                   Latest checkpoint location:           0/3000060\n\
                   Latest checkpoint's TimeLineID:       3\n";
        let cd = ControlData::parse(out).unwrap();
        assert_eq!(cd.system_identifier, 7311234567890123456);
        assert_eq!(cd.timeline, 3);
        assert_eq!(cd.cluster_state, "shut down in recovery");
        assert_eq!(cd.checkpoint_lsn, Lsn::new(0x300_0060));
        assert_eq!(
            cd.final_position(),
            None,
            "a standby's restartpoint is no end"
        );
        let primary = ControlData {
            cluster_state: "shut down".into(),
            ..cd.clone()
        };
        assert_eq!(
            primary.final_position(),
            Some((Lsn::new(0x300_0060).unwrap(), 3))
        );
        let crashed = ControlData {
            cluster_state: "in production".into(),
            ..cd
        };
        assert_eq!(crashed.final_position(), None);
        let odd = |lsn: &str| {
            ControlData::parse(&out.replace("0/3000060", lsn)).map(|cd| cd.checkpoint_lsn)
        };
        assert_eq!(odd("16/B374D848"), Some(Lsn::new(0x16_B374_D848)));
        assert_eq!(odd("0/0"), Some(None));
        assert_eq!(odd("x/1"), None);
        assert_eq!(odd("1/100000000"), None);
    }
}
