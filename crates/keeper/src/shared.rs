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
    /// The fence guard process (see [`crate::guard`]), told of every change of the
    /// lease and of writability before postgres can act on it.
    guard: Mutex<Option<crate::guard::Link>>,
    pub postgres_restarts: AtomicU64,
    /// A restarted primary keeps its clients out until a synchronous standby holds its
    /// WAL: `/primary` answers 503 meanwhile.
    pub clients_gated: AtomicBool,
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
        {
            let mut l = lock(&self.lease_until);
            if l.is_none_or(|cur| cur < until) {
                *l = Some(until);
            }
        }
        if self.writable() {
            self.feed_guard();
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
        self.feed_guard();
    }

    /// Clears writability; true if it was set (one caller counts a fence once).
    pub fn take_writable(&self) -> bool {
        let was = self.writable.swap(false, Ordering::SeqCst);
        self.feed_guard();
        was
    }

    /// Installs a (new) fence guard and tells it the current state.
    pub fn set_guard(&self, link: crate::guard::Link) {
        *lock(&self.guard) = Some(link);
        self.feed_guard();
    }

    /// The running guard, if any: None when it was never started or has exited.
    pub fn guard_running(&self) -> bool {
        lock(&self.guard)
            .as_ref()
            .is_some_and(|l| !l.child.has_exited())
    }

    /// What the guard must enforce now: the lease deadline while postgres may be
    /// writable, nothing otherwise (a lease held forever has no deadline).
    fn guard_msg(&self) -> crate::guard::Msg {
        use crate::guard::Msg;
        if !self.writable() || self.lease_forever.load(Ordering::SeqCst) {
            return Msg::Disarm;
        }
        match *lock(&self.lease_until) {
            Some(until) => Msg::Arm(crate::guard::instant_to_ns(until)),
            None => Msg::Arm(0),
        }
    }

    fn feed_guard(&self) {
        // The message is computed under the guard's lock: two feeds cannot reach the
        // guard in the opposite order of the states they describe.
        let mut g = lock(&self.guard);
        let m = self.guard_msg();
        if let Some(link) = g.as_mut() {
            if !link.send(m) {
                tracing::error!("the fence guard is gone; the keeper starts a new one");
                *g = None;
            }
        }
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
