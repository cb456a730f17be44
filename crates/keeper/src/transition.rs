//! The postgres-side work that reaches a goal state.
//!
//! What to do is decided in core ([`pgquorum_core::decide`], the same function the
//! simulation's keepers run): [`Instance::reach`] observes what is on disk and running,
//! asks for the one action that turns it into the goal's [`Target`], and executes it.
//! Each action is idempotent and restartable: run twice, or run again after the keeper
//! was killed in its middle, it ends in the same state. Each ends by checking the end
//! state (e.g. `pg_is_in_recovery()` after a promotion).

use std::time::{Duration, Instant};

use pgquorum_core::{
    decide, target, Action, Assignment, DataDir, Decision, NodeState, Observed, PeerNode, Target,
};

use crate::error::{KeeperError, Result};
use crate::instance::Instance;
use crate::pg::postmaster::StopMode;
use crate::pgconf::{self, Upstream};
use crate::settings::slot_name;
use crate::sql;

/// How long a transition to primary waits for a synchronous standby to acknowledge
/// its confirmation commit before failing (and being retried on the next beat).
const SYNC_CONFIRM_TIMEOUT: Duration = Duration::from_secs(3);

impl Instance {
    /// What the keeper observes of its postgres, and remembers of its work, for
    /// [`decide`].
    pub fn observed(&self) -> Observed {
        let data = if !self.has_data() {
            DataDir::Empty
        } else if self.pgdata().join("standby.signal").exists() {
            DataDir::Standby
        } else {
            DataDir::Primary
        };
        Observed {
            data,
            running: data != DataDir::Empty && self.is_running(),
            following: self.state.following.clone(),
            reinit_done: self.state.reinit_done,
        }
    }

    /// The decision for `a` from what is there now.
    pub fn decide(&self, a: &Assignment) -> Decision {
        decide(&self.observed(), self.state.current_state, a)
    }

    /// Drives postgres to `a.goal_state` by the action [`decide`] chooses; on success
    /// records the state it reached (the goal) as the current state.
    pub async fn reach(&mut self, a: &Assignment) -> Result<()> {
        let d = self.decide(a);
        let action = d.action;
        if action == Action::CloneStandby && self.has_data() {
            tracing::warn!(node = %self.settings.name, reinit = a.reinit, "rebuild asked for: replacing the data directory with a fresh base backup of the primary");
        }
        let from = self.state.current_state;
        let started = Instant::now();
        tracing::info!(node = %self.settings.name, %from, goal = %a.goal_state, ?action, "transition");
        self.shared.update_status(|s| {
            s.goal_state = Some(a.goal_state);
            s.in_transition = true;
        });
        self.serving = Some(a.clone());
        let result = self.act(&d, a).await;
        self.serving = None;
        self.shared
            .record_transition(a.goal_state, result.is_ok(), started.elapsed());
        self.shared.update_status(|s| s.in_transition = false);
        match &result {
            Ok(()) => {
                if action == Action::CloneStandby {
                    // A fresh clone is as good as any rebuild asked for so far.
                    self.state.reinit_done = self.state.reinit_done.max(a.reinit);
                }
                self.state.following = d.following_after(self.state.following.as_deref());
                self.state.current_state = d.reached;
                self.save_state()?;
                self.shared
                    .update_status(|s| s.current_state = Some(d.reached));
                tracing::info!(
                    node = %self.settings.name,
                    %from,
                    state = %d.reached,
                    ms = started.elapsed().as_millis() as u64,
                    "transition done"
                );
            }
            Err(e) => {
                tracing::warn!(node = %self.settings.name, %from, goal = %a.goal_state, error = %e, "transition failed");
                if matches!(e, KeeperError::Timeout(_)) {
                    // The wait for a stream ran out (see Decision::following_after_failure).
                    let after = d.following_after_failure(self.state.following.as_deref());
                    if after != self.state.following {
                        tracing::info!(node = %self.settings.name, "no stream from the recorded upstream: the next attempt rewinds");
                        self.state.following = after;
                        if let Err(se) = self.save_state() {
                            tracing::warn!(error = %se, "cannot record the forgotten upstream; it is forgotten in memory");
                        }
                    }
                }
            }
        }
        result
    }

    async fn act(&mut self, d: &Decision, a: &Assignment) -> Result<()> {
        let (action, t) = (d.action, &d.target);
        self.shared.hands_off.store(
            matches!(t, Target::HandsOff),
            std::sync::atomic::Ordering::SeqCst,
        );
        // A busy port is found before anything is created or copied.
        if !self.is_running()
            && matches!(
                action,
                Action::InitPrimary
                    | Action::StartPrimary
                    | Action::Promote
                    | Action::CloneStandby
                    | Action::StartStandby
            )
        {
            crate::pg::postmaster::check_port_free(
                &self.settings.listen_addresses,
                self.settings.pg_port,
            )?;
        }
        match action {
            Action::Nothing => Ok(()),
            Action::InitPrimary => {
                if let Some(p) = &a.primary {
                    if p.name != self.settings.name {
                        return Err(KeeperError::Unreachable {
                            goal: a.goal_state.to_string(),
                            reason: format!(
                                "no data directory, and {} is the primary: this node must join as a standby",
                                p.name
                            ),
                        });
                    }
                }
                self.initdb().await?;
                self.make_primary(a, d.confirm_sync).await
            }
            Action::StartPrimary | Action::Promote | Action::ConfigurePrimary => {
                self.make_primary(a, d.confirm_sync).await
            }
            Action::CloneStandby => {
                let p = upstream_of(t)?;
                self.basebackup(&p.host, p.port).await?;
                self.make_standby(a, t).await
            }
            Action::RewindToStandby => {
                self.rewind_to_standby(a, t).await?;
                self.make_standby(a, t).await
            }
            Action::StartStandby | Action::ConfigureStandby => self.make_standby(a, t).await,
            Action::Stop | Action::Drop => {
                self.stop(StopMode::Fast).await;
                Ok(())
            }
        }
    }

    /// A running, writable primary: config, hba, promotion if in recovery, role, slots;
    /// with `confirm`, a commit acknowledged under the assigned names.
    async fn make_primary(&mut self, a: &Assignment, confirm: bool) -> Result<()> {
        if !self.shared.lease_valid(Instant::now()) {
            return Err(KeeperError::Unreachable {
                goal: a.goal_state.to_string(),
                reason: "the lease is not held: a primary without a lease must not take writes"
                    .into(),
            });
        }
        let cd = self.check_identity().await?;
        let mut changed = pgconf::write_conf(
            self.pgdata(),
            &self.settings,
            &a.synchronous_standby_names,
            &Upstream::None,
        )?;
        let standby = self.pgdata().join("standby.signal").exists();
        if !self.is_running() {
            // A primary's own data directory started as a primary (after a crash, a
            // fence, a keeper restart) may hold commits that no standby confirmed; a
            // promoted standby's WAL came from the old primary and is judged by the
            // failover rules instead.
            self.set_gated(!standby && needs_gate(a));
        }
        changed |= pgconf::write_hba(self.pgdata(), &self.settings, &a.peers, self.access())?;
        // Marked before postgres can take a write, so the fence covers the whole window.
        self.shared.set_writable(true);
        if !self.is_running() {
            // A standby's data directory starts as a standby and is promoted: starting
            // it without standby.signal would end recovery with no timeline switch.
            self.start().await?;
        } else if changed {
            self.reload();
        }
        let c = self.connect().await?;
        let in_recovery: bool = sql::in_recovery(&c).await?;
        if in_recovery || standby {
            tracing::info!(step = "promote", node = %self.settings.name, "promoting");
            sql::promote(&c).await?;
            // pg_promote removes standby.signal itself; make sure of it.
            pgconf::set_standby_signal(self.pgdata(), false)?;
        }
        if changed {
            sql::reload(&c).await?;
        }
        sql::checkpoint_if_timeline_lags(&c).await?;
        sql::ensure_replication_role(&c, &self.settings).await?;
        self.reconcile_slots(&c, a).await?;
        let still: bool = sql::in_recovery(&c).await?;
        if still {
            return Err(KeeperError::Unreachable {
                goal: a.goal_state.to_string(),
                reason: "postgres is still in recovery".into(),
            });
        }
        self.open_gate(a).await?;
        if confirm {
            let rx = self.assignments.clone();
            sql::confirm_synchronous(
                &self.settings,
                &a.synchronous_standby_names,
                SYNC_CONFIRM_TIMEOUT,
                || goal_check(rx.as_ref(), a),
            )
            .await?;
        }
        self.state.system_identifier = Some(cd.system_identifier);
        self.state.following = None;
        Ok(())
    }

    /// Stop, and make the data directory a standby of the upstream: pg_rewind when it
    /// diverged, a fresh clone when rewind is impossible.
    async fn rewind_to_standby(&mut self, a: &Assignment, t: &Target) -> Result<()> {
        let Target::Standby { upstream, .. } = t else {
            return Ok(());
        };
        self.check_identity().await?;
        let Some(p) = upstream else {
            // report_lsn on a former primary: stop and come back in recovery, no upstream.
            self.stop(StopMode::Fast).await;
            return Ok(());
        };
        // A dead upstream makes this wait out its connect timeout: not when the goal
        // has moved on meanwhile.
        let remote = if self.settings.pg_tls.is_some() {
            self.abandonable(self.remote_system_identifier(&p.host, p.port))
                .await?
        } else {
            self.abandonable(sql::remote_system_identifier(
                &self.settings,
                p.host.as_str(),
                p.port,
                Duration::from_secs(5),
            ))
            .await?
        };
        let local = self.controldata().await?.system_identifier;
        if remote != local {
            return Err(KeeperError::SystemIdentifierMismatch {
                pgdata: self.pgdata().to_path_buf(),
                found: local,
                expected: remote,
            });
        }
        tracing::info!(step = "demote", node = %self.settings.name, goal = %a.goal_state, "stopping for rewind");
        self.stop(StopMode::Fast).await;
        // pg_rewind needs a cleanly shut down target; pg_rewind itself would run a
        // single-user recovery first otherwise.
        if let Err(e) = self.rewind(&p.host, p.port).await {
            tracing::warn!(error = %e, step = "rewind", "pg_rewind failed; cloning the primary afresh");
            self.basebackup(&p.host, p.port).await?;
        }
        Ok(())
    }

    async fn make_standby(&mut self, a: &Assignment, t: &Target) -> Result<()> {
        let Target::Standby { upstream, wait } = t else {
            return Ok(());
        };
        if !self.has_data() {
            return Ok(());
        }
        let cd = self.check_identity().await?;
        let addr = match upstream {
            Some(p) => {
                self.shared
                    .addresses
                    .get_or_lookup(p.host.as_str(), p.port)
                    .await
            }
            None => None,
        };
        let slot = self.uses_slot();
        let up = standby_upstream(a, upstream.as_ref(), addr, slot);
        let mut changed = pgconf::write_conf(self.pgdata(), &self.settings, "", &up)?;
        self.conf_upstream_addr = addr;
        self.conf_slot = slot;
        self.set_gated(false);
        changed |= pgconf::write_hba(
            self.pgdata(),
            &self.settings,
            &a.peers,
            pgconf::ClientAccess::Open,
        )?;
        pgconf::set_standby_signal(self.pgdata(), true)?;
        if !self.is_running() {
            self.start().await?;
        } else if changed {
            // primary_conninfo is reloadable since PostgreSQL 13: the WAL receiver
            // restarts with the new value.
            self.reload();
        }
        self.shared.set_writable(false);
        let c = self.connect().await?;
        let in_recovery: bool = sql::in_recovery(&c).await?;
        if !in_recovery {
            return Err(KeeperError::Unreachable {
                goal: a.goal_state.to_string(),
                reason: "postgres runs as a primary, not in recovery".into(),
            });
        }
        if let (Some(p), true) = (upstream, wait) {
            // A standby counts as reached once its WAL receiver streams.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let o = sql::observe(&c).await?;
                if o.streaming {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(KeeperError::Timeout(format!(
                        "standby {} does not stream from {} ({}:{})",
                        self.settings.name, p.name, p.host, p.port
                    )));
                }
                // The upstream may have died meanwhile and this node been given another
                // goal (prepare_promotion, say): sitting out the deadline would hold up
                // the failover.
                self.check_goal(a)?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.state.following = Some(p.name.clone());
        } else if upstream.is_none() {
            self.state.following = None;
        }
        self.state.system_identifier = Some(cd.system_identifier);
        Ok(())
    }

    /// Err when the monitor has since assigned something else than `a`: the
    /// transition towards `a` is abandoned (see [`goal_check`]).
    fn check_goal(&self, a: &Assignment) -> Result<()> {
        goal_check(self.assignments.as_ref(), a)
    }

    /// Err when the transition under way (if any) serves a goal the monitor has since
    /// replaced.
    pub(crate) fn check_serving(&self) -> Result<()> {
        match &self.serving {
            Some(a) => goal_check(self.assignments.as_ref(), a),
            None => Ok(()),
        }
    }

    /// Waits for `fut`, but gives up (dropping it) as soon as the goal the transition
    /// under way serves is replaced: a wait never holds up the next goal. Only for waits
    /// that leave nothing half done behind (a connection, a query), never for a tool.
    async fn abandonable<T>(&self, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        tokio::pin!(fut);
        let mut check = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                r = &mut fut => return r,
                _ = check.tick() => self.check_serving()?,
            }
        }
    }

    fn access(&self) -> pgconf::ClientAccess {
        if self.gated {
            pgconf::ClientAccess::Gated
        } else {
            pgconf::ClientAccess::Open
        }
    }

    fn set_gated(&mut self, on: bool) {
        self.gated = on;
        self.shared
            .clients_gated
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets clients into a primary that was started behind the gate, once a commit the
    /// keeper issued after the end of recovery is acknowledged by the synchronous
    /// standbys (WAL is flushed in order: they then hold every commit that was waiting
    /// for them at the crash), or at once when no standby is to be waited for. Waits at
    /// most [`SYNC_CONFIRM_TIMEOUT`] (the caller tries again) and not at all once the goal
    /// changed.
    async fn open_gate(&mut self, a: &Assignment) -> Result<()> {
        if !self.gated {
            return Ok(());
        }
        let started = Instant::now();
        if needs_gate(a) {
            let rx = self.assignments.clone();
            sql::confirm_synchronous(
                &self.settings,
                &a.synchronous_standby_names,
                SYNC_CONFIRM_TIMEOUT,
                || goal_check(rx.as_ref(), a),
            )
            .await
            .map_err(|e| match e {
                KeeperError::Timeout(m) => {
                    KeeperError::Timeout(format!("clients stay out of the restarted primary: {m}"))
                }
                e => e,
            })?;
        }
        pgconf::write_hba(
            self.pgdata(),
            &self.settings,
            &a.peers,
            pgconf::ClientAccess::Open,
        )?;
        self.reload();
        self.set_gated(false);
        tracing::info!(
            node = %self.settings.name,
            ms = started.elapsed().as_millis() as u64,
            names = %a.synchronous_standby_names,
            "clients let in: the synchronous standbys hold the WAL up to the end of recovery"
        );
        Ok(())
    }

    /// Supervision between transitions: restarts a postgres that died. A primary is
    /// restarted only while the lease is held.
    pub async fn supervise(&mut self, a: &Assignment) -> Result<bool> {
        if self
            .shared
            .hands_off
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(false);
        }
        let crashed = self.reap();
        let t = target(a);
        if self.is_running() && self.state.current_state == a.goal_state {
            self.follow_upstream_address(a).await?;
            // A slot whose walsender was still up when its node was dropped, or one
            // left by an earlier primary, goes within seconds even when no new
            // assignment comes.
            if a.goal_state.is_writable() && self.slots_checked.elapsed() > Duration::from_secs(5) {
                self.slots_checked = Instant::now();
                let r = match self.connect().await {
                    Ok(c) => self.reconcile_slots(&c, a).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    tracing::warn!(node = %self.settings.name, error = %e, "reconciling replication slots failed");
                }
            }
            if matches!(t, Target::Primary) {
                self.open_gate(a).await?;
            }
        }
        if self.is_running() || !self.has_data() {
            return Ok(false);
        }
        // In its goal, the keeper restarts the server the goal runs (core decides which).
        if self.decide(a).restart().is_none() {
            return Ok(false);
        }
        if matches!(t, Target::Primary) && !self.shared.lease_valid(Instant::now()) {
            return Ok(false);
        }
        if crashed {
            tracing::warn!(node = %self.settings.name, "postgres exited; restarting it in place");
        }
        if matches!(t, Target::Primary) {
            // The crash ended the waits of commits that no standby has confirmed, and
            // crash recovery makes them visible: clients stay out until a synchronous
            // standby holds them (see `open_gate`).
            self.set_gated(needs_gate(a));
            pgconf::write_conf(
                self.pgdata(),
                &self.settings,
                &a.synchronous_standby_names,
                &Upstream::None,
            )?;
            pgconf::write_hba(self.pgdata(), &self.settings, &a.peers, self.access())?;
            self.shared.set_writable(true);
        }
        self.start().await?;
        self.shared
            .postgres_restarts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if matches!(t, Target::Primary) {
            self.open_gate(a).await?;
        }
        Ok(true)
    }
}

impl Instance {
    /// A standby whose upstream's name now resolves to another address than the one
    /// in primary_conninfo (its container or pod came back elsewhere) is pointed at the
    /// new one; no lookup here: [`crate::addresses::follow`] does them. A standby that
    /// has just streamed for the first time starts using its replication slot.
    async fn follow_upstream_address(&mut self, a: &Assignment) -> Result<()> {
        let Target::Standby {
            upstream: Some(p), ..
        } = target(a)
        else {
            return Ok(());
        };
        let resolved = self.shared.addresses.get(p.host.as_str());
        let moved = resolved.is_some() && resolved != self.conf_upstream_addr;
        let slot = self.uses_slot();
        if !moved && slot == self.conf_slot {
            return Ok(());
        }
        // A slot switch alone waits for a moment the standby streams (see
        // `restart_standby`); until then it streams, or retries, without the slot.
        if !moved && !self.streams_now().await {
            return Ok(());
        }
        let addr = if moved {
            resolved
        } else {
            self.conf_upstream_addr
        };
        let up = standby_upstream(a, Some(&p), addr, slot);
        if pgconf::write_conf(self.pgdata(), &self.settings, "", &up)? {
            tracing::info!(node = %self.settings.name, upstream = %p.name, address = ?addr, slot, "following the upstream at its new address, or through its slot");
            self.conf_upstream_addr = addr;
            self.conf_slot = slot;
            if moved {
                self.reload();
            } else {
                self.restart_standby(a).await?;
            }
            return Ok(());
        }
        self.conf_upstream_addr = addr;
        self.conf_slot = slot;
        Ok(())
    }

    /// Whether this standby's WAL receiver streams at this moment.
    async fn streams_now(&self) -> bool {
        match self.connect().await {
            Ok(c) => sql::observe(&c).await.is_ok_and(|o| o.streaming),
            Err(_) => false,
        }
    }

    /// Restarts a streaming standby so that its new primary_slot_name takes effect.
    /// PostgreSQL 15 applies a reloaded primary_slot_name by ending the WAL receiver,
    /// and its startup process was seen to start the next one only 15 s later (a
    /// vanished host then healed in 18 s instead of 3 s; docs/benchmarks.md); a standby
    /// started afresh streams within a few hundred ms. Only a standby that streams is
    /// restarted: it is consistent, so the start is quick, and it is not yet in the
    /// synchronous set (the switch comes with its first streaming state). The start
    /// gives up as soon as the goal changes.
    async fn restart_standby(&mut self, a: &Assignment) -> Result<()> {
        tracing::info!(node = %self.settings.name, "restarting the standby to stream through its replication slot");
        self.serving = Some(a.clone());
        self.stop(StopMode::Fast).await;
        let r = self.start().await;
        self.serving = None;
        r
    }

    /// The replication slots of a primary (see [`sql::ensure_slots`]): made for the
    /// peers that have streamed, kept for every peer, dropped for the rest.
    pub(crate) async fn reconcile_slots(
        &mut self,
        c: &tokio_postgres::Client,
        a: &Assignment,
    ) -> Result<()> {
        let peers = a.peers.iter().filter(|p| p.name != self.settings.name);
        let create: Vec<String> = peers
            .clone()
            .filter(|p| p.streamed)
            .map(|p| slot_name(&p.name))
            .collect();
        let keep: Vec<String> = peers.map(|p| slot_name(&p.name)).collect();
        sql::ensure_slots(c, &create, &keep).await?;
        self.slots_checked = Instant::now();
        Ok(())
    }

    /// Whether this standby streams through a replication slot on its primary: once it
    /// has streamed ([`NodeState::has_streamed`]; the primary creates the slot for a
    /// peer that reports such a state), or always when the assignment is given by hand.
    fn uses_slot(&self) -> bool {
        self.slot_from_start || self.state.current_state.has_streamed()
    }
}

/// Whether a primary started from its own data directory must keep clients out until
/// the synchronous standbys confirm its WAL: not when there is no standby to wait for
/// (names empty: a lone node, `number_sync_standbys = 0`) nor under `on_quorum_loss =
/// continue`, where the operator chose availability over that guarantee.
pub(crate) fn needs_gate(a: &Assignment) -> bool {
    !a.synchronous_standby_names.is_empty() && a.on_quorum_loss != "continue"
}

/// Err when the latest assignment replaces `a` for a transition under way: another
/// goal or another primary to follow, or, for a primary, other synchronous standby
/// names (a wait for the old ones would be in vain).
pub(crate) fn goal_check(
    rx: Option<&tokio::sync::watch::Receiver<Option<Assignment>>>,
    a: &Assignment,
) -> Result<()> {
    let Some(rx) = rx else {
        return Ok(());
    };
    let latest = rx.borrow();
    match latest.as_ref() {
        Some(l) if replaces(l, a) => Err(KeeperError::GoalChanged {
            goal: a.goal_state.to_string(),
            now: l.goal_state.to_string(),
        }),
        _ => Ok(()),
    }
}

fn replaces(latest: &Assignment, a: &Assignment) -> bool {
    latest.goal_state != a.goal_state
        || latest.primary.as_ref().map(|p| &p.name) != a.primary.as_ref().map(|p| &p.name)
        || (target(a) == Target::Primary
            && latest.synchronous_standby_names != a.synchronous_standby_names)
}

/// How a standby streams from `upstream`, reached at `addr` when known.
fn standby_upstream(
    a: &Assignment,
    upstream: Option<&PeerNode>,
    addr: Option<std::net::IpAddr>,
    slot: bool,
) -> Upstream {
    match upstream {
        // The fast-forward source is a standby, which keeps no slot for us; and a
        // node's first stream is without one (the primary creates it only then).
        Some(p) if a.goal_state == NodeState::FastForward || !slot => {
            Upstream::StreamNoSlot(p.clone(), addr)
        }
        Some(p) => Upstream::Stream(p.clone(), addr),
        None => Upstream::None,
    }
}

fn upstream_of(t: &Target) -> Result<&PeerNode> {
    match t {
        Target::Standby {
            upstream: Some(p), ..
        } => Ok(p),
        _ => Err(KeeperError::Unreachable {
            goal: "standby".into(),
            reason: "no primary assigned to clone from".into(),
        }),
    }
}
