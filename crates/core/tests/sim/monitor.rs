//! The simulation's monitor side: the leader answering heartbeats through the core's
//! heartbeat protocol ([`Heartbeat`]), its periodic decisions ([`Rounds`]), and a
//! second, deposed leader.
//!
//! A leader can be deposed while it still answers (the partition of issue 13): cut
//! off from the other members, it can no longer commit, and it goes on hearing the
//! keepers on its side from its stale copy of the state. Its last quorum
//! acknowledgement is the moment it was cut off; it grants a lease only while that
//! proof is younger than the election timeout's minimum ([`may_grant_lease`]), and the
//! new leader (with a fresh, all-unknown health table) can be elected only after that.
//!
//! Three monitor members take turns leading. Each keeps its own [`ReportOrder`], as the
//! monitor's `Member::reports` does: in memory, kept across its terms (a member that
//! leads again judges by what it admitted before), lost when it crashes; a member that
//! never led starts empty. A leader answers `Step::Admit` with `ReportOrder::admit`,
//! the formation's lease as the delay bound, its own clock as `now`.
//!
//! The oracles here: no two nodes hold a lease in a writable state at overlapping times
//! (the lease as the keeper counts it, from the beat it sent, lengthened by its slow
//! clock); and reports are applied in order ([`Sim::check_report_order`]).

use pgquorum_core::*;

use super::{Failure, Msg, Sim};

/// One monitor member as the simulation keeps it: its clock and its report order.
pub struct MemberSim {
    /// Its clock reads the simulated time plus this.
    clock_offset: Millis,
    order: ReportOrder,
}

impl MemberSim {
    pub fn new(clock_offset: Millis) -> Self {
        MemberSim {
            clock_offset,
            order: ReportOrder::default(),
        }
    }
}

/// The election timeout's minimum: a voter that acknowledged the leader votes for no
/// one else for this long, so a new leader is elected only this long after the old
/// one's last quorum acknowledgement (`pgquorum monitor run`: elections 225-450 ms).
pub const ELECTION_MIN: Millis = 225;

/// A leader cut off from the other members that still answers some keepers.
pub struct Deposed {
    /// The replicated state as it was when it was cut off: it can commit nothing more.
    state: ClusterState,
    health: HealthTable,
    /// When a quorum last acknowledged it: its leadership proof.
    acked_at: Millis,
    /// It hears the keepers on its side until then (then it learns of the new term).
    until: Millis,
    /// The keepers on its side of the partition: their beats reach it, not the new leader.
    side: Vec<bool>,
    /// Which member it is.
    member: usize,
}

/// One keeper's latest span of holding a lease in a writable state: from when it held
/// one to when it stopped (or, while `open`, to when its lease runs out).
#[derive(Clone, Copy, Debug)]
pub struct LeaseSpan {
    from: Millis,
    until: Millis,
    open: bool,
}

impl Sim {
    /// The current leader hears a beat (the deposed one, for the keepers on its side
    /// while it still answers).
    pub(super) fn hear_beat(
        &mut self,
        node: usize,
        incarnation: u64,
        sent_at: Millis,
        attempt: u32,
        report: NodeReport,
        stamp: ReportStamp,
    ) -> Result<(), Failure> {
        let now = self.now;
        if self
            .deposed
            .as_ref()
            .is_some_and(|d| d.until > now && d.side[node])
        {
            return self.deposed_beat(node, incarnation, sent_at, attempt, report, stamp);
        }
        if self.monitor_down_until > now {
            return Ok(());
        }
        // The current leader: a quorum acknowledges it (the proof holds) and it commits.
        let mut hb = Heartbeat::new(report);
        loop {
            match hb.next(&self.state, &mut self.health, now) {
                Step::ProveLeadership => hb.proved(true),
                Step::Admit {
                    node: id,
                    max_delay_ms,
                    ..
                } => {
                    let r = self.admit(
                        self.leader,
                        true,
                        node,
                        id,
                        incarnation,
                        stamp,
                        max_delay_ms,
                    )?;
                    hb.admitted(r)
                }
                Step::Record(cmds) | Step::Decide(cmds) => {
                    let applied = cmds.iter().filter(|c| self.apply(c)).count();
                    hb.proposed(if applied > 0 {
                        Proposed::Applied
                    } else {
                        Proposed::NoneApplied
                    });
                }
                Step::Answer(a) => {
                    let by_choice = Self::by_choice(&self.state);
                    self.answer(node, incarnation, sent_at, a, by_choice);
                    return Ok(());
                }
                Step::Refuse(r) => {
                    self.refused(node, incarnation, sent_at, attempt, stamp, &r);
                    return Ok(());
                }
            }
        }
    }

    fn deposed_beat(
        &mut self,
        node: usize,
        incarnation: u64,
        sent_at: Millis,
        attempt: u32,
        report: NodeReport,
        stamp: ReportStamp,
    ) -> Result<(), Failure> {
        let now = self.now;
        let proofless = self.grant_without_proof;
        let name = self.keepers[node].name.clone();
        let Some(mut d) = self.deposed.take() else {
            return Ok(());
        };
        let mut hb = Heartbeat::new(report);
        let outcome = loop {
            match hb.next(&d.state, &mut d.health, now) {
                Step::ProveLeadership => {
                    hb.proved(proofless || may_grant_lease(Some(d.acked_at), now, ELECTION_MIN))
                }
                Step::Admit {
                    node: id,
                    max_delay_ms,
                    ..
                } => {
                    match self.admit(d.member, false, node, id, incarnation, stamp, max_delay_ms) {
                        Ok(r) => hb.admitted(r),
                        Err(f) => {
                            self.deposed = Some(d);
                            return Err(f);
                        }
                    }
                }
                // Cut off from the others: nothing it proposes is committed.
                Step::Record(_) | Step::Decide(_) => hb.proposed(Proposed::CannotCommit),
                Step::Answer(a) => break Ok((a, Self::by_choice(&d.state))),
                Step::Refuse(r) => break Err(r),
            }
        };
        self.deposed = Some(d);
        match outcome {
            Ok((a, by_choice)) => {
                self.note(format!(
                    "deposed leader answers {name}: {} with a lease",
                    a.goal_state
                ));
                self.answer(node, incarnation, sent_at, a, by_choice);
            }
            Err(r) => {
                self.note(format!("deposed leader refuses {name}: {r:?}"));
                self.refused(node, incarnation, sent_at, attempt, stamp, &r);
            }
        }
        Ok(())
    }

    /// `Step::Admit` at `member` (leading now; `commits` unless deposed): the report
    /// `stamp` of keeper `node` (process `incarnation`, node id `id`) judged by the
    /// member's own `ReportOrder` at its own clock, as `Member::admit_report` does.
    /// An admitted report is applied: the oracle checks its order.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        member: usize,
        commits: bool,
        node: usize,
        id: NodeId,
        incarnation: u64,
        stamp: ReportStamp,
        max_delay_ms: Millis,
    ) -> Result<Result<(), StaleReport>, Failure> {
        let m = &mut self.members[member];
        let clock = self.now + m.clock_offset;
        let r = if self.admit_unjudged {
            Ok(())
        } else {
            m.order.admit(id, stamp, clock, max_delay_ms)
        };
        match &r {
            Ok(()) => {
                if self.verbose {
                    let name = self.keepers[node].name.clone();
                    self.note(format!(
                        "member {member} applies {name}'s report {} (process {incarnation})",
                        stamp.sequence
                    ));
                }
                self.check_report_order(member, commits, node, id, incarnation, stamp)?
            }
            Err(e) => {
                let kind = match e {
                    StaleReport::FirstOfProcess { .. } => 0,
                    StaleReport::Superseded { .. } => 1,
                    StaleReport::OldProcess { .. } => 2,
                    StaleReport::Delayed { .. } => 3,
                };
                self.stale[kind] += 1;
                let name = self.keepers[node].name.clone();
                self.note(format!(
                    "member {member} refuses {name}'s report {}: {e}",
                    stamp.sequence
                ));
            }
        }
        Ok(r)
    }

    /// Oracle, at every report applied (admitted, so recorded in the leader's health
    /// table and its changes proposed): each member, for as long as it keeps its memory
    /// (over all its terms, deposed or not; a crashed member starts afresh), applies the
    /// reports of a keeper in order: never one from an older keeper process than one it
    /// applied, nor one of the same process whose sequence is not above every one it
    /// applied.
    ///
    /// Not an oracle but a count (`applied_out_of_order`): over the leaders that commit
    /// (every leader but a deposed one, whichever member and term), a report applied
    /// after a newer one of the same process that an earlier leader applied. A member
    /// judges only against what it admitted itself, so this happens (see
    /// docs/ARCHITECTURE.md, "The simulation").
    fn check_report_order(
        &mut self,
        member: usize,
        commits: bool,
        node: usize,
        id: NodeId,
        incarnation: u64,
        stamp: ReportStamp,
    ) -> Result<(), Failure> {
        let name = self.keepers[node].name.clone();
        let now_inc = self.keepers[node].incarnation;
        let mine = (incarnation, stamp.sequence);
        if let Some(&(inc, seq)) = self.applied_by_member[member].get(&id) {
            if mine <= (inc, seq) {
                return Err(self.fail(format!(
                    "member {member} applied report {} of {name}'s keeper process {incarnation} (now {now_inc}) after report {seq} of its process {inc}",
                    stamp.sequence
                )));
            }
        }
        self.applied_by_member[member].insert(id, mine);
        if commits {
            let key = (id, incarnation);
            match self.applied_committed.get(&key) {
                Some(&seq) if stamp.sequence <= seq => {
                    self.applied_out_of_order += 1;
                    self.note(format!(
                        "member {member} applied report {} of {name}'s keeper process {incarnation} after an earlier leader applied its report {seq}",
                        stamp.sequence
                    ));
                }
                _ => {
                    self.applied_committed.insert(key, stamp.sequence);
                }
            }
        }
        Ok(())
    }

    /// A refused heartbeat: a stale report is answered ABORTED (the keeper retries).
    fn refused(
        &mut self,
        node: usize,
        incarnation: u64,
        sent_at: Millis,
        attempt: u32,
        stamp: ReportStamp,
        r: &Refusal,
    ) {
        if let Refusal::Stale(_) = r {
            let d = self.delay();
            self.send(
                self.now + d,
                Msg::Refused {
                    node,
                    incarnation,
                    sent_at,
                    attempt,
                    sequence: stamp.sequence,
                },
            );
        }
    }

    /// Oracle only: whether empty synchronous names in an answer are the operator's choice.
    fn by_choice(state: &ClusterState) -> bool {
        state
            .group(DEFAULT_FORMATION, 0)
            .and_then(|g| g.sync_history.last())
            .is_some_and(|c| c.async_by_choice)
    }

    fn answer(
        &mut self,
        node: usize,
        incarnation: u64,
        sent_at: Millis,
        assignment: Assignment,
        by_choice: bool,
    ) {
        let d = self.delay();
        self.send(
            self.now + d,
            Msg::Answer {
                node,
                incarnation,
                beat_sent_at: sent_at,
                assignment,
                by_choice,
            },
        );
    }

    /// The current leader's decisions over the whole state, in rounds.
    pub(super) fn run_orchestrator(&mut self) {
        let mut rounds = Rounds::new(None);
        while let Some(cmds) = rounds.next(&self.state, &self.health, self.now) {
            let applied = cmds.iter().filter(|c| self.apply(c)).count();
            rounds.proposed(if applied > 0 {
                Proposed::Applied
            } else {
                Proposed::NoneApplied
            });
        }
    }

    /// Monitor faults: the leader dies (and another is elected after a while), or it is
    /// deposed while it still answers the keepers on its side.
    pub(super) fn monitor_faults(&mut self) {
        let now = self.now;
        if self.rng.chance(3) {
            let d = self.rng.range(0, 1500);
            self.monitor_down_until = now + d;
            self.health = HealthTable::new(now + d);
            self.leader_changes += 1;
            // The old leader crashed (its report order, in memory, is lost) or lost an
            // election; another member leads (not one still deposed).
            let old = self.leader;
            let crashed = self.rng.chance(500);
            if crashed {
                self.forget_member(old);
            }
            self.leader = self.other_member(old);
            let new = self.leader;
            self.note(format!(
                "monitor leader change, {d} ms without leader: member {old} {}, member {new} leads",
                if crashed { "crashed" } else { "stepped down" }
            ));
        }
        if self.rng.chance(3) && self.deposed.is_none() && self.monitor_down_until <= now {
            let n = self.keepers.len();
            let side: Vec<bool> = (0..n).map(|_| self.rng.chance(500)).collect();
            let until = now + self.rng.range(300, 6000);
            // The voters that acknowledged it now refuse other candidates until then.
            let elected = now + ELECTION_MIN + self.rng.range(0, 1000);
            let old = std::mem::replace(&mut self.health, HealthTable::new(elected));
            let member = self.leader;
            self.leader = self.other_member(member);
            self.deposed = Some(Deposed {
                state: self.state.clone(),
                health: old,
                acked_at: now,
                until,
                side: side.clone(),
                member,
            });
            self.monitor_down_until = elected;
            self.depositions += 1;
            let names: Vec<&str> = (0..n)
                .filter(|i| side[*i])
                .map(|i| self.keepers[i].name.as_str())
                .collect();
            let s = format!(
                "monitor leader deposed; it answers {names:?} for {} ms, a new leader is elected after {} ms",
                until - now,
                elected - now
            );
            self.note(s);
        }
    }

    /// A member other than `old` and the deposed one, to lead next.
    fn other_member(&mut self, old: usize) -> usize {
        let deposed = self.deposed.as_ref().map(|d| d.member);
        let choices: Vec<usize> = (0..self.members.len())
            .filter(|m| *m != old && Some(*m) != deposed)
            .collect();
        choices[self.rng.below(choices.len() as u64) as usize]
    }

    /// Member `m` restarted: what it kept in memory is gone.
    fn forget_member(&mut self, m: usize) {
        self.members[m].order = ReportOrder::default();
        self.applied_by_member[m].clear();
    }

    /// The monitor's periodic work: the current leader's orchestrator pass, and the
    /// deposed leader giving up once it learns of the new term.
    pub(super) fn monitor_tick(&mut self) {
        let now = self.now;
        if self.deposed.as_ref().is_some_and(|d| d.until <= now) {
            self.deposed = None;
            self.note("the deposed leader learns of the new term and stops answering".into());
        }
        if self.monitor_down_until <= now && now.is_multiple_of(200) {
            self.run_orchestrator();
        }
    }

    /// Oracle: no two nodes hold a lease while their PostgreSQL runs as a primary at
    /// overlapping times. A keeper whose last reached state is writable but whose
    /// PostgreSQL was stopped (fenced) holds nothing writable: an answer that renews its
    /// lease while assigning it a standby goal lets it take no write (seed 15251: a
    /// fenced wait_primary told to rejoin as a standby).
    pub(super) fn check_writable_leases(&mut self) -> Result<(), Failure> {
        let now = self.now;
        for i in 0..self.keepers.len() {
            let holds = self.writable(i);
            let k = &self.keepers[i];
            let span = &mut self.lease_spans[i];
            match (holds, span.as_mut()) {
                (true, Some(s)) if s.open => s.until = s.until.max(k.lease_until),
                (true, _) => {
                    *span = Some(LeaseSpan {
                        from: now,
                        until: k.lease_until,
                        open: true,
                    })
                }
                (false, Some(s)) if s.open => {
                    s.until = s.until.min(now);
                    s.open = false;
                }
                (false, _) => {}
            }
        }
        // Any overlap shows when the later span starts (and stays while it is open).
        for (i, a) in self.lease_spans.iter().enumerate() {
            let Some(a) = a.filter(|a| a.open) else {
                continue;
            };
            for (j, b) in self.lease_spans.iter().enumerate() {
                let Some(b) = b else { continue };
                if i != j && a.from < b.until && b.from < a.until {
                    let (x, y) = (self.keepers[i].name.clone(), self.keepers[j].name.clone());
                    return Err(self.fail(format!(
                        "writable leases overlap: {x} holds one over [{}, {}], {y} over [{}, {}]",
                        a.from - 1_000_000,
                        a.until - 1_000_000,
                        b.from - 1_000_000,
                        b.until - 1_000_000
                    )));
                }
            }
        }
        Ok(())
    }
}
