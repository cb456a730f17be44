//! State shared between the keeper's tasks: the main loop (transitions, supervision),
//! the heartbeat, the fence and the HTTP server.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgquorum_core::{NodeId, NodeState};

use crate::sql::Observation;

#[derive(Debug, Clone, Default)]
pub struct Status {
    pub node_id: Option<NodeId>,
    pub current_state: Option<NodeState>,
    pub goal_state: Option<NodeState>,
    /// A transition is under way (current_state is the one before it).
    pub in_transition: bool,
    /// Last answer of the local postgres; None when it did not answer.
    pub observation: Option<Observation>,
}

#[derive(Debug, Clone, Default)]
pub struct TransitionStats {
    pub ok: u64,
    pub failed: u64,
    pub seconds_sum: f64,
}

#[derive(Debug, Default)]
pub struct Shared {
    postmaster_pid: AtomicU32,
    /// Set while postgres runs as a primary started or promoted by this keeper.
    writable: AtomicBool,
    /// Maintenance: the keeper neither starts nor stops postgres.
    pub hands_off: AtomicBool,
    lease_until: Mutex<Option<Instant>>,
    lease_forever: AtomicBool,
    status: Mutex<Status>,
    transitions: Mutex<BTreeMap<String, TransitionStats>>,
    pub postgres_restarts: AtomicU64,
    pub fences: AtomicU64,
    pub heartbeat_failures: AtomicU64,
    /// The other nodes' addresses, learned while they resolve.
    pub addresses: crate::addresses::Addresses,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn new() -> Shared {
        Shared::default()
    }

    /// Standalone use (tests, `keeper apply`): no monitor grants leases, so the lease
    /// never expires.
    pub fn hold_lease_forever(&self) {
        self.lease_forever.store(true, Ordering::SeqCst);
    }

    /// A heartbeat sent at `sent_at` was answered with a lease of `lease`.
    pub fn renew_lease(&self, sent_at: Instant, lease: Duration) {
        let until = sent_at + lease;
        let mut l = lock(&self.lease_until);
        if l.is_none_or(|cur| cur < until) {
            *l = Some(until);
        }
    }

    pub fn lease_left(&self, now: Instant) -> Duration {
        if self.lease_forever.load(Ordering::SeqCst) {
            return Duration::MAX;
        }
        lock(&self.lease_until)
            .map(|u| u.saturating_duration_since(now))
            .unwrap_or(Duration::ZERO)
    }

    pub fn lease_valid(&self, now: Instant) -> bool {
        !self.lease_left(now).is_zero()
    }

    pub fn set_postmaster(&self, pid: Option<u32>) {
        self.postmaster_pid
            .store(pid.unwrap_or(0), Ordering::SeqCst);
    }

    pub fn postmaster_pid(&self) -> Option<u32> {
        match self.postmaster_pid.load(Ordering::SeqCst) {
            0 => None,
            p => Some(p),
        }
    }

    pub fn set_writable(&self, on: bool) {
        self.writable.store(on, Ordering::SeqCst);
    }

    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    pub fn update_status(&self, f: impl FnOnce(&mut Status)) {
        f(&mut lock(&self.status));
    }

    pub fn record_transition(&self, to: NodeState, ok: bool, took: Duration) {
        let mut t = lock(&self.transitions);
        let e = t.entry(to.as_str().to_string()).or_default();
        if ok {
            e.ok += 1;
        } else {
            e.failed += 1;
        }
        e.seconds_sum += took.as_secs_f64();
    }

    pub fn transitions(&self) -> BTreeMap<String, TransitionStats> {
        lock(&self.transitions).clone()
    }
}
