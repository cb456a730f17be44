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

/// Writes to each node in turn, each over its own session (kept open across attempts,
/// so a session opened before a fault is tested too), and records every acknowledged
/// write per node.
pub struct Probe {
    seen: Arc<Mutex<BTreeMap<String, Vec<Accepted>>>>,
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

    /// What was accepted so far, per node.
    pub fn accepted(&self) -> BTreeMap<String, Vec<Accepted>> {
        self.seen.lock().unwrap().clone()
    }

    /// The last write `node` accepted, if any.
    pub fn last_accepted(&self, node: &str) -> Option<Accepted> {
        self.seen
            .lock()
            .unwrap()
            .get(node)
            .and_then(|v| v.last().copied())
    }

    /// The first write `node` accepted after `t`, if any.
    pub fn first_accepted_after(&self, node: &str, t: Instant) -> Option<Accepted> {
        self.seen
            .lock()
            .unwrap()
            .get(node)
            .and_then(|v| v.iter().find(|a| a.sent > t).copied())
    }

    pub async fn stop(mut self) -> BTreeMap<String, Vec<Accepted>> {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.accepted()
    }
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
    seen: Arc<Mutex<BTreeMap<String, Vec<Accepted>>>>,
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
        if let Some(c) = &client {
            n += 1;
            let sent = Instant::now();
            let r = tokio::time::timeout(
                PROBE_TIMEOUT,
                c.execute("INSERT INTO probe VALUES ($1, $2)", &[&name, &n]),
            )
            .await;
            match r {
                Ok(Ok(_)) => {
                    let acked = Instant::now();
                    seen.lock()
                        .unwrap()
                        .entry(name.clone())
                        .or_default()
                        .push(Accepted { sent, acked });
                }
                // A standby refuses (read-only); a fenced or cut-off one errs or times
                // out: a fresh session next time.
                Ok(Err(e)) => {
                    if !e.as_db_error().is_some_and(|d| {
                        d.code() == &tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION
                    }) {
                        client = None;
                    }
                }
                Err(_) => client = None,
            }
        }
        let _ = tokio::time::timeout(PROBE_EVERY, stopped.changed()).await;
    }
}

/// The longest time two nodes surely both accepted writes: for nodes A and B where A
/// took writes first, how long A's last accepted write was *sent* after B's first one
/// was *acknowledged* (so both writes surely happened at overlapping times). Assumes a
/// node is primary at most once during the observed window (no switchback).
pub fn longest_overlap(seen: &BTreeMap<String, Vec<Accepted>>) -> (Duration, String) {
    let mut worst = (Duration::ZERO, String::new());
    for (a, wa) in seen {
        for (b, wb) in seen {
            if a == b {
                continue;
            }
            let (Some(a_first), Some(b_first)) = (wa.first(), wb.first()) else {
                continue;
            };
            if a_first.sent > b_first.sent {
                continue;
            }
            let Some(a_last) = wa.last() else { continue };
            let o = a_last.sent.saturating_duration_since(b_first.acked);
            if o > worst.0 {
                worst = (
                    o,
                    format!(
                        "{a} accepted a write sent {} ms after {b} had acknowledged one",
                        o.as_millis()
                    ),
                );
            }
        }
    }
    worst
}

/// A one-line summary per node: how many writes, from when to when (ms after `t0`).
pub fn describe(seen: &BTreeMap<String, Vec<Accepted>>, t0: Instant) -> String {
    seen.iter()
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

    fn at(base: Instant, sent_ms: u64, acked_ms: u64) -> Accepted {
        Accepted {
            sent: base + Duration::from_millis(sent_ms),
            acked: base + Duration::from_millis(acked_ms),
        }
    }

    #[test]
    fn overlap_counts_only_writes_that_surely_overlapped() {
        let t = Instant::now();
        let mut s = BTreeMap::new();
        s.insert("a".to_string(), vec![at(t, 0, 5), at(t, 100, 105)]);
        s.insert("b".to_string(), vec![at(t, 100, 110), at(t, 200, 205)]);
        // a's last write was sent before b's first was acknowledged: not sure.
        assert_eq!(longest_overlap(&s).0, Duration::ZERO);
        s.get_mut("a").unwrap().push(at(t, 300, 305));
        assert_eq!(longest_overlap(&s).0, Duration::from_millis(190));
    }
}
