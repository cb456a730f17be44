//! The fault oracle's eyes: a [`Probe`] that writes directly to every node with
//! `synchronous_commit = local` (a write no synchronous standby has to confirm, so it
//! succeeds exactly when that postgres takes writes), and the checks the fault tests run
//! on what it saw (DESIGN.md invariant 1: at most one node accepts writes at any time).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// One accepted probe write: sent at `sent`, acknowledged at `acked`.
#[derive(Debug, Clone, Copy)]
pub struct Accepted {
    pub sent: Instant,
    pub acked: Instant,
}

/// One probe write, accepted or not (refused, failed, timed out, no connection).
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub sent: Instant,
    pub done: Instant,
    pub ok: bool,
}

type Seen = Arc<Mutex<BTreeMap<String, Vec<Attempt>>>>;

/// Writes to each node in turn, each over its own session (kept open across attempts,
/// so a session opened before a fault is tested too), and records every acknowledged
/// write per node.
pub struct Probe {
    seen: Seen,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// How long one probe write or connection attempt may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Pause between two probe writes to one node.
const PROBE_EVERY: Duration = Duration::from_millis(25);

impl Probe {
    /// `nodes`: (name, host, port) of each postgres.
    pub fn start(nodes: Vec<(String, String, u16)>) -> Probe {
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let tasks = nodes
            .into_iter()
            .map(|(name, host, port)| {
                let seen = seen.clone();
                let stopped = stopped.clone();
                tokio::spawn(probe_node(name, host, port, seen, stopped))
            })
            .collect();
        Probe { seen, stop, tasks }
    }

    /// Every attempt so far, per node.
    pub fn attempts(&self) -> BTreeMap<String, Vec<Attempt>> {
        self.seen.lock().unwrap().clone()
    }

    /// What was accepted so far, per node.
    pub fn accepted(&self) -> BTreeMap<String, Vec<Accepted>> {
        accepted(&self.attempts())
    }

    /// The last write `node` accepted, if any.
    pub fn last_accepted(&self, node: &str) -> Option<Accepted> {
        self.accepted().get(node).and_then(|v| v.last().copied())
    }

    /// The first write `node` accepted after `t`, if any.
    pub fn first_accepted_after(&self, node: &str, t: Instant) -> Option<Accepted> {
        self.accepted()
            .get(node)
            .and_then(|v| v.iter().find(|a| a.sent > t).copied())
    }

    /// Stops probing; returns every attempt.
    pub async fn stop(mut self) -> BTreeMap<String, Vec<Attempt>> {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.attempts()
    }
}

/// The accepted attempts only.
pub fn accepted(attempts: &BTreeMap<String, Vec<Attempt>>) -> BTreeMap<String, Vec<Accepted>> {
    attempts
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.iter()
                    .filter(|a| a.ok)
                    .map(|a| Accepted {
                        sent: a.sent,
                        acked: a.done,
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

impl Drop for Probe {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn probe_node(
    name: String,
    host: String,
    port: u16,
    seen: Seen,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&host)
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .application_name("e2e-probe")
        .connect_timeout(PROBE_TIMEOUT);
    let mut client: Option<tokio_postgres::Client> = None;
    let mut n: i64 = 0;
    while !*stopped.borrow() {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = None;
            if let Ok(Ok((c, conn))) = tokio::time::timeout(PROBE_TIMEOUT, cfg.connect(NoTls)).await
            {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                // Session-wide: no write of this session waits for a standby.
                let setup = c
                    .batch_execute(
                        "SET synchronous_commit = local; \
                         CREATE TABLE IF NOT EXISTS probe (node text, n bigint)",
                    )
                    .await;
                if setup.is_ok()
                    || c.batch_execute("SET synchronous_commit = local")
                        .await
                        .is_ok()
                {
                    client = Some(c);
                }
            }
        }
        let record = |sent: Instant, ok: bool| {
            seen.lock()
                .unwrap()
                .entry(name.clone())
                .or_default()
                .push(Attempt {
                    sent,
                    done: Instant::now(),
                    ok,
                });
        };
        if client.is_none() {
            record(Instant::now(), false);
        }
        if let Some(c) = &client {
            n += 1;
            let sent = Instant::now();
            let r = tokio::time::timeout(
                PROBE_TIMEOUT,
                c.execute("INSERT INTO probe VALUES ($1, $2)", &[&name, &n]),
            )
            .await;
            match r {
                Ok(Ok(_)) => record(sent, true),
                // A standby refuses (read-only); a fenced or cut-off one errs or times
                // out: a fresh session next time.
                Ok(Err(e)) => {
                    record(sent, false);
                    if !e.as_db_error().is_some_and(|d| {
                        d.code() == &tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION
                    }) {
                        client = None;
                    }
                }
                Err(_) => {
                    record(sent, false);
                    client = None;
                }
            }
        }
        let _ = tokio::time::timeout(PROBE_EVERY, stopped.changed()).await;
    }
}

/// Each node's writable periods: runs of accepted probe writes with no failed attempt
/// on that node in between, as (first accepted, last accepted).
pub fn periods(attempts: &BTreeMap<String, Vec<Attempt>>) -> Vec<(String, Accepted, Accepted)> {
    let mut out = Vec::new();
    for (n, v) in attempts {
        let mut run: Option<(Accepted, Accepted)> = None;
        for a in v {
            let acc = Accepted {
                sent: a.sent,
                acked: a.done,
            };
            if a.ok {
                run = Some(match run {
                    Some((f, _)) => (f, acc),
                    None => (acc, acc),
                });
            } else if let Some((f, l)) = run.take() {
                out.push((n.clone(), f, l));
            }
        }
        if let Some((f, l)) = run {
            out.push((n.clone(), f, l));
        }
    }
    out
}

/// The longest time two nodes surely both took writes: over pairs of writable periods
/// of different nodes, how long both were surely open at once. A period is surely open
/// from its first write's acknowledgement to its last write's sending; a switchback
/// (A, then B, then A again) is not an overlap, since A failed writes in between.
pub fn longest_overlap(attempts: &BTreeMap<String, Vec<Attempt>>) -> (Duration, String) {
    let ps = periods(attempts);
    let mut worst = (Duration::ZERO, String::new());
    for (i, (a, af, al)) in ps.iter().enumerate() {
        for (b, bf, bl) in ps.iter().skip(i + 1) {
            if a == b {
                continue;
            }
            let start = af.acked.max(bf.acked);
            let end = al.sent.min(bl.sent);
            let o = end.saturating_duration_since(start);
            if o > worst.0 {
                worst = (
                    o,
                    format!(
                        "{a} and {b} both took writes for {} ms at once",
                        o.as_millis()
                    ),
                );
            }
        }
    }
    worst
}

/// A one-line summary per node: how many writes, from when to when (ms after `t0`).
pub fn describe(attempts: &BTreeMap<String, Vec<Attempt>>, t0: Instant) -> String {
    accepted(attempts)
        .iter()
        .map(|(n, v)| {
            let ms = |t: Instant| {
                if t >= t0 {
                    format!("+{}", (t - t0).as_millis())
                } else {
                    format!("-{}", (t0 - t).as_millis())
                }
            };
            match (v.first(), v.last()) {
                (Some(f), Some(l)) => {
                    format!("{n}: {} writes {}..{} ms", v.len(), ms(f.sent), ms(l.acked))
                }
                _ => format!("{n}: none"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, sent_ms: u64, done_ms: u64, ok: bool) -> Attempt {
        Attempt {
            sent: base + Duration::from_millis(sent_ms),
            done: base + Duration::from_millis(done_ms),
            ok,
        }
    }

    #[test]
    fn overlap_counts_only_writes_that_surely_overlapped() {
        let t = Instant::now();
        let mut s = BTreeMap::new();
        s.insert(
            "a".to_string(),
            vec![
                at(t, 0, 5, true),
                at(t, 100, 105, true),
                at(t, 150, 155, false),
            ],
        );
        s.insert(
            "b".to_string(),
            vec![at(t, 100, 110, true), at(t, 200, 205, true)],
        );
        // a's last write was sent before b's first was acknowledged: not sure.
        assert_eq!(longest_overlap(&s).0, Duration::ZERO);
        // A switchback: a failed in between, then took writes again after b failed.
        s.get_mut("b").unwrap().push(at(t, 250, 255, false));
        s.get_mut("a").unwrap().push(at(t, 300, 305, true));
        assert_eq!(longest_overlap(&s).0, Duration::ZERO);
        // a writable again while b still takes writes: both surely open 305..400.
        s.get_mut("b").unwrap().push(at(t, 280, 290, true));
        s.get_mut("b").unwrap().push(at(t, 400, 405, true));
        s.get_mut("a").unwrap().push(at(t, 450, 455, true));
        assert_eq!(longest_overlap(&s).0, Duration::from_millis(95));
    }
}
