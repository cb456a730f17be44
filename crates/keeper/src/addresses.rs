//! The addresses of the other nodes, learned while they are alive, so that nothing
//! in a failover waits on the name of a dead one.
//!
//! A standby's WAL receiver reconnects to its primary every
//! `wal_retrieve_retry_interval`, and libpq resolves the primary's name inside a
//! blocking `getaddrinfo()` that the receiver cannot be interrupted in. Once the
//! primary's host is gone its name stops resolving (Docker's embedded DNS and
//! Kubernetes' cluster DNS drop a dead container's or pod's name), and a resolver
//! whose upstream is slow or silent then blocks for its whole timeout, 5-10 s. A
//! promotion or a fast shutdown waits for the WAL receiver to exit, so it waited that
//! long too (measured: promotion 9.7 s instead of 0.3 s; docs/benchmarks.md).
//!
//! So the keeper looks the names up itself, in the background and with a deadline,
//! and writes the last address it found as `hostaddr` beside `host` in
//! `primary_conninfo`: libpq then never resolves a name. A name that stops resolving
//! keeps its last address (connecting to it fails within `connect_timeout`, without
//! blocking); a name that resolves to a new address (a container restarted elsewhere)
//! replaces it at the next refresh.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgquorum_core::Assignment;
use tokio::sync::watch;

use crate::shared::Shared;

/// How long one lookup may take: a live peer's name resolves in milliseconds.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the names of the assignment's peers are looked up again.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// The last address each peer host name resolved to.
#[derive(Debug, Default)]
pub struct Addresses {
    known: Mutex<HashMap<String, IpAddr>>,
}

impl Addresses {
    /// The last address `host` resolved to; None for a literal address (it needs no
    /// lookup) and for a name never resolved yet.
    pub fn get(&self, host: &str) -> Option<IpAddr> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .copied()
    }

    /// Looks `host` up (at most [`LOOKUP_TIMEOUT`]) and remembers what it found;
    /// returns the address to use: the new one, or the last one known when the
    /// lookup failed.
    pub async fn refresh(&self, host: &str, port: u16) -> Option<IpAddr> {
        if host.parse::<IpAddr>().is_ok() {
            return None;
        }
        match lookup(host, port, LOOKUP_TIMEOUT).await {
            Some(ip) => {
                let old = self
                    .known
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(host.to_string(), ip);
                if old.is_some_and(|o| o != ip) {
                    tracing::info!(host, address = %ip, "a peer's name resolves to a new address");
                }
                Some(ip)
            }
            None => self.get(host),
        }
    }

    /// The address for `host`: the one known, else a bounded lookup now.
    pub async fn get_or_lookup(&self, host: &str, port: u16) -> Option<IpAddr> {
        match self.get(host) {
            Some(ip) => Some(ip),
            None => self.refresh(host, port).await,
        }
    }
}

/// Keeps the addresses of the assigned peers (and the primary) current: looks their
/// names up every [`REFRESH_INTERVAL`] and whenever the assignment changes, while
/// they are alive, so that the address is known when they are not. Runs beside the
/// keeper's work, so a slow lookup never delays a transition.
pub async fn follow(shared: Arc<Shared>, mut rx: watch::Receiver<Option<Assignment>>, own: String) {
    loop {
        let hosts: BTreeSet<(String, u16)> = match rx.borrow_and_update().as_ref() {
            Some(a) => a
                .peers
                .iter()
                .chain(a.primary.iter())
                .filter(|p| p.name != own)
                .map(|p| (p.host.to_string(), p.port))
                .collect(),
            None => BTreeSet::new(),
        };
        for (host, port) in &hosts {
            shared.addresses.refresh(host, *port).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(REFRESH_INTERVAL) => {}
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// One lookup of `host`, given up after `timeout` (the blocking getaddrinfo() behind
/// it finishes on its own thread, away from the keeper's work).
pub async fn lookup(host: &str, port: u16, timeout: Duration) -> Option<IpAddr> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(mut addrs)) => addrs.next().map(|a| a.ip()),
        Ok(Err(e)) => {
            tracing::debug!(host, error = %e, "name lookup failed");
            None
        }
        Err(_) => {
            tracing::debug!(host, ?timeout, "name lookup timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn literal_addresses_need_no_lookup() {
        let a = Addresses::default();
        assert_eq!(a.refresh("10.0.0.7", 5432).await, None);
        assert_eq!(a.get("10.0.0.7"), None);
    }

    #[tokio::test]
    async fn a_name_that_stops_resolving_keeps_its_last_address() {
        let a = Addresses::default();
        assert_eq!(
            a.refresh("localhost", 5432)
                .await
                .map(|ip| ip.is_loopback()),
            Some(true)
        );
        let known = a.get("localhost");
        assert!(known.is_some());
        // ".invalid" never resolves (RFC 6761): nothing is learned, nothing lost.
        assert_eq!(a.refresh("pgquorum-test.invalid", 5432).await, None);
        a.known
            .lock()
            .unwrap()
            .insert("pgquorum-test.invalid".into(), "10.1.2.3".parse().unwrap());
        assert_eq!(
            a.refresh("pgquorum-test.invalid", 5432).await,
            Some("10.1.2.3".parse().unwrap())
        );
        assert_eq!(a.get("localhost"), known);
    }
}
