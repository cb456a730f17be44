//! Report order: the leader never applies a keeper's report after a newer one from the
//! same keeper process, nor one that spent much longer in flight than its predecessors.
//!
//! A keeper stamps every report with its process instance (a random id chosen at
//! start), a sequence (increasing with every request it sends) and the time it sent it
//! on its own monotonic clock (`sent_ms`, milliseconds since the process started). No
//! clock of one host is ever compared with a clock of another: a report's lateness is
//! measured against the newest admitted report of the same process, `(now - received) -
//! (sent_ms - its sent_ms)`, which is how much longer this one took to arrive than that
//! one did. The only assumption is that the two clocks run at nearly the same rate: the
//! allowance grows by an eighth of the keeper-side interval, so even a keeper clock 12 %
//! slow never has its fresh reports refused, however long it was cut off.
//! A report is refused when it is
//! * not newer (by sequence) than the newest admitted from that process: reordered, or a
//!   retry of a request that already arrived;
//! * from a process instance that has been replaced by a newer one, or from another
//!   instance whose sequence is not above the newest admitted: an older process, whose
//!   report was stuck in flight until after its successor was heard (the keeper counts
//!   its sequence from the wall clock at start, so that a restarted keeper starts above
//!   its previous life). Taking such a report for a new process would retire the live
//!   one and refuse every report it sends from then on (found by the simulation);
//! * later than `max_delay_ms` (the formation's lease: a keeper counts its lease from
//!   when it sent the report, so an answer to an older report grants nothing) plus that
//!   allowance.
//!
//! * the first this member hears from a process (a newly elected leader, a restarted
//!   member, a restarted keeper): with no earlier report of that process there is nothing
//!   to measure its age against, and a report stuck in flight since before the election
//!   would be applied as if it were fresh (it moved a primary back to "secondary" once).
//!   So the first one is recorded, not applied ([`StaleReport::FirstOfProcess`]): the
//!   keeper retries at once (a new sequence, a new `sent_ms`), and that retry is judged
//!   against it. If the first was stale, the retry took far less keeper time to follow
//!   it than monitor time, and is admitted; if the retry is stale, its lateness shows.
//!   No lease is granted for the first one, so nothing needs to count it. The cost is
//!   one extra round trip per keeper process per leader, never a Raft write.

use std::collections::BTreeMap;

use crate::model::{Millis, NodeId};

/// How a keeper stamped one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportStamp {
    /// Random per keeper process, never 0 (0: a keeper that does not stamp, which is
    /// admitted unjudged).
    pub instance: u64,
    pub sequence: u64,
    /// The keeper's monotonic clock when it sent the report.
    pub sent_ms: u64,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaleReport {
    Superseded {
        sequence: u64,
        newest: u64,
    },
    OldProcess {
        instance: u64,
    },
    Delayed {
        late_ms: u64,
        allowed_ms: u64,
    },
    /// The first report heard from this keeper process: recorded to judge the next one
    /// by, not applied.
    FirstOfProcess {
        instance: u64,
    },
}

impl std::fmt::Display for StaleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StaleReport::Superseded { sequence, newest } => write!(
                f,
                "report {sequence} arrived after report {newest} of the same keeper process"
            ),
            StaleReport::OldProcess { instance } => write!(
                f,
                "report from keeper process {instance:x}, which a newer process of the node has replaced"
            ),
            StaleReport::Delayed {
                late_ms,
                allowed_ms,
            } => write!(
                f,
                "report arrived {late_ms} ms later than the keeper's previous ones (at most {allowed_ms} ms allowed)"
            ),
            StaleReport::FirstOfProcess { instance } => write!(
                f,
                "first report of keeper process {instance:x} at this monitor leader: its age cannot be judged, so it is only recorded; send the next one"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    stamp: ReportStamp,
    received: Millis,
}

/// How many replaced process instances are remembered per node.
const RETIRED_KEPT: usize = 8;

/// The newest admitted report of every keeper, as one monitor member saw them.
#[derive(Debug, Clone, Default)]
pub struct ReportOrder {
    newest: BTreeMap<NodeId, Mark>,
    retired: BTreeMap<NodeId, Vec<u64>>,
}

impl ReportOrder {
    /// Admits (and records) the report `stamp` of `node` received at `now`, or says why
    /// it is stale; a refused report changes nothing, except the first of a process,
    /// which is recorded to judge the next one by.
    pub fn admit(
        &mut self,
        node: NodeId,
        stamp: ReportStamp,
        now: Millis,
        max_delay_ms: Millis,
    ) -> Result<(), StaleReport> {
        if stamp.instance == 0 {
            return Ok(());
        }
        if self
            .retired
            .get(&node)
            .is_some_and(|r| r.contains(&stamp.instance))
        {
            return Err(StaleReport::OldProcess {
                instance: stamp.instance,
            });
        }
        let first = match self.newest.get(&node) {
            None => true,
            Some(m) => m.stamp.instance != stamp.instance,
        };
        if let Some(m) = self.newest.get(&node) {
            if m.stamp.instance != stamp.instance && stamp.sequence <= m.stamp.sequence {
                return Err(StaleReport::OldProcess {
                    instance: stamp.instance,
                });
            }
            if m.stamp.instance == stamp.instance {
                if stamp.sequence <= m.stamp.sequence {
                    return Err(StaleReport::Superseded {
                        sequence: stamp.sequence,
                        newest: m.stamp.sequence,
                    });
                }
                let (late, allowed) = lateness(m, stamp, now, max_delay_ms);
                if late > allowed {
                    return Err(StaleReport::Delayed {
                        late_ms: late,
                        allowed_ms: allowed,
                    });
                }
            } else {
                // A new process of this keeper (restarted): the old one is done.
                let old = m.stamp.instance;
                let r = self.retired.entry(node).or_default();
                r.push(old);
                if r.len() > RETIRED_KEPT {
                    r.remove(0);
                }
            }
        }
        self.newest.insert(
            node,
            Mark {
                stamp,
                received: now,
            },
        );
        if first {
            return Err(StaleReport::FirstOfProcess {
                instance: stamp.instance,
            });
        }
        Ok(())
    }

    /// Forget a node (dropped).
    pub fn forget(&mut self, node: NodeId) {
        self.newest.remove(&node);
        self.retired.remove(&node);
    }
}

/// (how much longer `stamp` took to arrive than the mark's report, what is allowed).
fn lateness(m: &Mark, stamp: ReportStamp, now: Millis, max_delay_ms: Millis) -> (u64, u64) {
    let since_mark = now.saturating_sub(m.received);
    let keeper_interval = stamp.sent_ms.saturating_sub(m.stamp.sent_ms);
    let late = since_mark.saturating_sub(keeper_interval);
    (late, max_delay_ms.saturating_add(keeper_interval / 8))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn st(instance: u64, sequence: u64, sent_ms: u64) -> ReportStamp {
        ReportStamp {
            instance,
            sequence,
            sent_ms,
        }
    }

    fn first(instance: u64) -> Result<(), StaleReport> {
        Err(StaleReport::FirstOfProcess { instance })
    }

    #[test]
    fn newer_reports_are_admitted_and_older_ones_refused() {
        let mut o = ReportOrder::default();
        assert_eq!(o.admit(1, st(7, 9, 800), 49_800, 1_500), first(7));
        assert_eq!(o.admit(1, st(7, 10, 1_000), 50_000, 1_500), Ok(()));
        assert_eq!(o.admit(1, st(7, 11, 1_200), 50_200, 1_500), Ok(()));
        // Reordered in flight, or a retry of one already admitted.
        assert_eq!(
            o.admit(1, st(7, 10, 1_000), 50_250, 1_500),
            Err(StaleReport::Superseded {
                sequence: 10,
                newest: 11
            })
        );
        assert!(o.admit(1, st(7, 11, 1_200), 50_250, 1_500).is_err());
        // Other nodes are judged on their own.
        assert_eq!(o.admit(2, st(9, 1, 5), 50_300, 1_500), first(9));
        assert_eq!(o.admit(2, st(9, 2, 205), 50_500, 1_500), Ok(()));
    }

    #[test]
    fn a_report_stuck_in_flight_is_refused_however_its_sequence_compares() {
        let mut o = ReportOrder::default();
        o.admit(1, st(7, 9, 800), 49_800, 1_500).unwrap_err();
        o.admit(1, st(7, 10, 1_000), 50_000, 1_500).unwrap();
        // Sent 200 ms after the last one, but it arrives 20 s later (TCP retransmission
        // towards a member that was cut off): nothing newer arrived in between.
        let r = o.admit(1, st(7, 11, 1_200), 70_200, 1_500);
        assert!(
            matches!(
                r,
                Err(StaleReport::Delayed {
                    late_ms: 20_000,
                    ..
                })
            ),
            "{r:?}"
        );
        // A refusal records nothing: the next report on time is admitted.
        assert_eq!(o.admit(1, st(7, 12, 21_000), 70_100, 1_500), Ok(()));
    }

    #[test]
    fn a_fresh_report_after_a_long_silence_is_admitted_even_with_a_slow_keeper_clock() {
        let mut o = ReportOrder::default();
        o.admit(1, st(7, 9, 800), 49_800, 1_500).unwrap_err();
        o.admit(1, st(7, 10, 1_000), 50_000, 1_500).unwrap();
        // The keeper was cut off for 100 s by its clock, 110 s by the monitor's (10 %
        // slow), and this report took 50 ms.
        assert_eq!(o.admit(1, st(7, 11, 101_000), 160_050, 1_500), Ok(()));
        // Up to the lease late on a steady beat is still fine; beyond, not.
        assert_eq!(o.admit(1, st(7, 12, 101_200), 161_700, 1_500), Ok(()));
        assert!(o.admit(1, st(7, 13, 101_400), 163_500, 1_500).is_err());
    }

    #[test]
    fn a_restarted_keeper_is_heard_and_its_old_process_is_not() {
        let mut o = ReportOrder::default();
        assert_eq!(o.admit(1, st(7, 500, 90_000), 50_000, 1_500), first(7));
        // A new process starts its clock afresh and its sequence from the wall clock,
        // above its previous life's; its first report retires the old process and is
        // judged by its second.
        assert_eq!(o.admit(1, st(8, 5_000, 10), 51_000, 1_500), first(8));
        assert_eq!(
            o.admit(1, st(7, 501, 90_200), 51_100, 1_500),
            Err(StaleReport::OldProcess { instance: 7 })
        );
        assert_eq!(o.admit(1, st(8, 5_001, 210), 51_200, 1_500), Ok(()));
        o.forget(1);
        assert_eq!(o.admit(1, st(7, 1, 0), 52_000, 1_500), first(7));
    }

    /// Found by the simulation (seed 9 once heartbeats could be held back): a report of
    /// a keeper's previous process, stuck in flight, reached a member that had only
    /// heard the new process. Taken for a newer process, it retired the live one, whose
    /// every report was then refused: its lease ran out and the node stayed out.
    #[test]
    fn a_stuck_report_of_an_older_process_does_not_retire_the_live_one() {
        let mut o = ReportOrder::default();
        assert_eq!(o.admit(1, st(8, 5_000, 10), 51_000, 1_500), first(8));
        assert_eq!(o.admit(1, st(8, 5_001, 210), 51_200, 1_500), Ok(()));
        // Process 7 ran before 8 (its sequence is below): refused, nothing changes.
        assert_eq!(
            o.admit(1, st(7, 4_000, 90_000), 51_300, 1_500),
            Err(StaleReport::OldProcess { instance: 7 })
        );
        assert_eq!(o.admit(1, st(8, 5_002, 410), 51_400, 1_500), Ok(()));
    }

    #[test]
    fn unstamped_reports_are_admitted_unjudged() {
        let mut o = ReportOrder::default();
        o.admit(1, st(7, 10, 1_000), 50_000, 1_500).unwrap_err();
        assert_eq!(o.admit(1, st(0, 0, 0), 90_000, 1_500), Ok(()));
    }

    /// Issue 13: a newly elected leader heard first a report stuck in flight since before
    /// its election, and applied it. Now the first report only sets the mark.
    #[test]
    fn a_new_leaders_first_report_is_judged_by_the_keepers_next_one() {
        // The keeper sent report 10 at its 1 s; it reaches the new leader 20 s later.
        let mut o = ReportOrder::default();
        assert_eq!(o.admit(1, st(7, 10, 1_000), 70_000, 1_500), first(7));
        // The keeper's retry of its current report, sent at its 21 s, 5 ms later: fresh.
        assert_eq!(o.admit(1, st(7, 41, 21_000), 70_005, 1_500), Ok(()));
        // Another stuck report of that time comes later still: superseded.
        assert!(o.admit(1, st(7, 11, 1_200), 70_100, 1_500).is_err());

        // The other order: the first is fresh, and the keeper's retry is the one that
        // gets stuck for 20 s.
        let mut o = ReportOrder::default();
        assert_eq!(o.admit(1, st(7, 40, 20_995), 70_000, 1_500), first(7));
        assert!(matches!(
            o.admit(1, st(7, 41, 21_000), 90_000, 1_500),
            Err(StaleReport::Delayed { .. })
        ));
    }
}
