//! The simulated keeper: the production decision ([`decide`], the function the real
//! keeper calls) executed on simulated PostgreSQL. The loop is the real keeper's
//! (crates/keeper/src/keeper.rs): a new assignment, or a goal not yet reached, runs the
//! decided action (`reach`); a keeper in its goal only restarts a PostgreSQL that died
//! under it (`supervise`). Each action here does to the simulated server what
//! crates/keeper/src/transition.rs does to a real one, and fails (to be tried again next
//! tick) where the real one would wait or fail.

use pgquorum_core::*;

use super::{Role, Sim};

impl Sim {
    /// What the keeper observes of its simulated PostgreSQL (and remembers).
    fn observed(&self, i: usize) -> Observed {
        let k = &self.keepers[i];
        let data = match &k.pg.wal {
            None => DataDir::Empty,
            // standby.signal: the data directory was last used in recovery.
            Some(_) if k.pg.in_recovery => DataDir::Standby,
            Some(_) => DataDir::Primary,
        };
        Observed {
            data,
            running: k.pg.running.is_some(),
            following: k.following.clone(),
            reinit_done: 0,
        }
    }

    /// One tick of keeper `i`'s main loop.
    pub(super) fn keeper_tick(&mut self, i: usize) {
        let Some(a) = self.keepers[i].assignment.clone() else {
            return;
        };
        let cur = self.keepers[i].state;
        let d = decide(&self.observed(i), cur, &a);
        if self.keepers[i].applied.as_ref() != Some(&a) || cur != a.goal_state {
            if self.act(i, &d, &a) {
                let k = &mut self.keepers[i];
                k.following = d.following_after(k.following.as_deref());
                k.state = d.reached;
                self.keepers[i].applied = Some(a);
                if cur != d.reached {
                    let name = self.keepers[i].name.clone();
                    let action = d.action;
                    self.note(format!("{name} reached {} by {action:?}", d.reached));
                }
            } else {
                // The real keeper's wait for a stream timed out with its upstream up
                // (`KeeperError::Timeout` in crates/keeper/src/transition.rs).
                let up = match &d.target {
                    Target::Standby {
                        upstream: Some(p), ..
                    } => self.idx_of(p.node_id),
                    _ => None,
                };
                if up.is_some_and(|p| self.serves(p)) {
                    let k = &mut self.keepers[i];
                    k.following = d.following_after_failure(k.following.as_deref());
                }
                self.keepers[i].applied = None;
            }
            return;
        }
        if let Some(r) = d.restart() {
            // The real keeper's `supervise`: start the server again, without waiting for
            // a stream or a synchronous confirmation.
            let ok = match (r, &d.target) {
                (Action::StartPrimary, _) => self.make_primary(i, &a, false),
                (_, Target::Standby { upstream, .. }) => {
                    let t = Target::Standby {
                        upstream: upstream.clone(),
                        wait: false,
                    };
                    self.make_standby(i, &t)
                }
                _ => false,
            };
            if ok {
                let name = self.keepers[i].name.clone();
                self.note(format!("{name} restarted PostgreSQL in {cur}"));
            }
        }
    }

    /// Executes `d.action` for assignment `a`; true when it succeeded.
    fn act(&mut self, i: usize, d: &Decision, a: &Assignment) -> bool {
        let now = self.now;
        if d.action.starts_postgres()
            && self.keepers[i].pg.running.is_none()
            && now < self.keepers[i].pg_broken_until
        {
            return false;
        }
        let upstream = match &d.target {
            Target::Standby { upstream, .. } => upstream.clone(),
            _ => None,
        };
        let up = upstream.as_ref().and_then(|p| self.idx_of(p.node_id));
        match d.action {
            Action::Nothing => true,
            Action::InitPrimary => {
                // Refused: another node is the primary, this one must join as a standby.
                if a.primary
                    .as_ref()
                    .is_some_and(|p| p.name != self.keepers[i].name)
                {
                    return false;
                }
                // initdb, then the lease is checked (as the real keeper does).
                let k = &mut self.keepers[i];
                k.pg.wal = Some(Vec::new());
                k.pg.in_recovery = false;
                self.make_primary(i, a, d.confirm_sync)
            }
            Action::StartPrimary | Action::Promote | Action::ConfigurePrimary => {
                self.make_primary(i, a, d.confirm_sync)
            }
            Action::CloneStandby => {
                // pg_basebackup from a running upstream.
                let Some(p) = up.filter(|p| self.serves(*p)) else {
                    return false;
                };
                let pw = self.keepers[p].pg.wal.clone().unwrap_or_default();
                let ptl = self.keepers[p].pg.timeline;
                self.stop_pg(i);
                let k = &mut self.keepers[i];
                k.pg.wal = Some(pw);
                k.pg.timeline = ptl;
                k.pg.in_recovery = true;
                self.make_standby(i, &d.target)
            }
            Action::RewindToStandby => {
                if upstream.is_some() {
                    // The upstream's system identifier is read over a connection first.
                    let Some(p) = up.filter(|x| self.serves(*x)) else {
                        return false;
                    };
                    self.stop_pg(i);
                    // pg_rewind: back to the common prefix, then stream the rest.
                    let pw = self.keepers[p].pg.wal.clone().unwrap_or_default();
                    let ptl = self.keepers[p].pg.timeline;
                    let k = &mut self.keepers[i];
                    if let Some(w) = k.pg.wal.as_mut() {
                        let common = w.iter().zip(pw.iter()).take_while(|(a, b)| a == b).count();
                        w.truncate(common);
                    }
                    k.pg.timeline = ptl;
                } else {
                    self.stop_pg(i);
                }
                self.keepers[i].pg.in_recovery = true;
                self.make_standby(i, &d.target)
            }
            Action::StartStandby | Action::ConfigureStandby => self.make_standby(i, &d.target),
            Action::Stop | Action::Drop => {
                self.stop_pg(i);
                true
            }
        }
    }

    /// Whether node `p` is alive with PostgreSQL running: it answers a connection, a base
    /// backup, a stream.
    fn serves(&self, p: usize) -> bool {
        self.keepers[p].alive && self.keepers[p].pg.running.is_some()
    }

    /// A fast shutdown: a primary's walsenders first send every WAL record to the
    /// standbys streaming from it.
    fn stop_pg(&mut self, i: usize) {
        if self.keepers[i].pg.running == Some(Role::Primary) {
            let my = self.keepers[i].pg.wal.clone().unwrap_or_default();
            for j in 0..self.keepers.len() {
                let o = &mut self.keepers[j];
                if j != i
                    && o.alive
                    && o.pg.running == Some(Role::Standby)
                    && o.pg.following == Some(i)
                {
                    if let Some(w) = o.pg.wal.as_mut() {
                        if my.starts_with(w) {
                            *w = my.clone();
                        }
                    }
                }
            }
        }
        let k = &mut self.keepers[i];
        if k.pg.running.is_some() {
            k.pg.clean_stop = true;
        }
        k.pg.running = None;
        k.pg.pending.clear();
        k.pg.following = None;
    }

    /// The real keeper's `make_primary`: a running primary with the assignment's names
    /// (promoted if in recovery); with `confirm`, a commit issued after applying the
    /// names must be acknowledged under them.
    fn make_primary(&mut self, i: usize, a: &Assignment, confirm: bool) -> bool {
        let now = self.now;
        let by_choice = self.keepers[i].by_choice;
        let k = &self.keepers[i];
        // A primary without a lease must not take writes.
        if k.lease_until <= now || k.pg.wal.is_none() {
            return false;
        }
        if k.pg.running.is_none() && now < k.pg_broken_until {
            return false;
        }
        if k.pg.in_recovery {
            // pg_promote: a new timeline.
            self.max_timeline += 1;
        }
        let tl = self.max_timeline;
        let k = &mut self.keepers[i];
        if k.pg.in_recovery {
            k.pg.timeline = tl;
            k.pg.in_recovery = false;
        }
        k.pg.running = Some(Role::Primary);
        k.pg.following = None;
        let names = Self::parse_names(&a.synchronous_standby_names);
        if names != k.pg.sync {
            // A confirmation counts only for a commit issued after these names were
            // applied.
            k.confirm_target = None;
        }
        k.pg.sync = names;
        k.pg.async_by_choice = by_choice;
        k.pg.alone_allowed = Self::alone_allowed(a, by_choice);
        if confirm && k.pg.sync.0 > 0 {
            if k.confirm_target.is_none() {
                // The keeper's own synchronous commit, after applying the names.
                let id = self.next_record;
                self.next_record += 1;
                let k = &mut self.keepers[i];
                if let Some(w) = k.pg.wal.as_mut() {
                    w.push(id);
                    k.confirm_target = Some(w.len());
                }
            }
            let k = &self.keepers[i];
            let target = k.confirm_target.unwrap_or(0);
            let id = if target == 0 {
                0
            } else {
                k.pg.wal.as_ref().map_or(0, |w| w[target - 1])
            };
            let (n, names) = k.pg.sync.clone();
            if self.holders(i, &names, target, id) < n {
                return false;
            }
        }
        self.keepers[i].confirm_target = None;
        true
    }

    /// The real keeper's `make_standby`: a running standby with the target's upstream in
    /// its configuration; with `wait`, reached only once it streams from the upstream
    /// (which needs the upstream running and this node's WAL a prefix of the upstream's).
    fn make_standby(&mut self, i: usize, t: &Target) -> bool {
        let Target::Standby { upstream, wait } = t else {
            return true;
        };
        if self.keepers[i].pg.wal.is_none() {
            return true;
        }
        if self.keepers[i].pg.running.is_none() && self.now < self.keepers[i].pg_broken_until {
            return false;
        }
        let up = upstream.as_ref().and_then(|p| self.idx_of(p.node_id));
        let streams = up.filter(|p| *p != i && self.serves(*p)).filter(|p| {
            let pw = self.keepers[*p].pg.wal.as_deref().unwrap_or(&[]);
            let w = self.keepers[i].pg.wal.as_deref().unwrap_or(&[]);
            pw.starts_with(w)
        });
        let ptl = streams.map(|p| self.keepers[p].pg.timeline);
        let k = &mut self.keepers[i];
        if k.pg.running != Some(Role::Standby) {
            k.pg.pending.clear();
        }
        k.pg.running = Some(Role::Standby);
        k.pg.in_recovery = true;
        k.pg.following = up.filter(|p| *p != i);
        if let Some(tl) = ptl {
            k.pg.timeline = tl;
        }
        // Reached once it streams, when it must (what it then follows is recorded by
        // the caller: `Decision::following_after`).
        !(upstream.is_some() && *wait && streams.is_none())
    }
}
