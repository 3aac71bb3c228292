//! The acknowledgement rule for a replicated write, as one pure function so that the data
//! path and the simulation (tests/replica_sim.rs) apply exactly the same rule:
//!
//! A write to a block is acknowledged to the guest only when every in-sync copy that is
//! reachable has it and at least one has. A copy that failed, or was skipped because its node
//! is on the failure list, is marked out of sync before the acknowledgement. When no in-sync
//! copy took the write, the guest gets an I/O error and no copy changes state: they are all
//! equally uncertain, and marking them all out of sync would leave the block unreadable.
//! Out-of-sync copies receive writes too (so a resync converges) but never count.

use crate::image::Location;

/// What happened to one copy of a block: `location.synced` is its state when the write
/// was issued; `stored` is true when the copy confirmed the write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyResult {
    pub location: Location,
    pub stored: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledge the write once `stale` (in-sync copies that missed it) are marked out of
    /// sync, durably.
    Ack { stale: Vec<Location> },
    /// No in-sync copy confirmed the write: the guest gets an I/O error once `stale` (every
    /// in-sync copy but the first) are marked out of sync.
    Fail { stale: Vec<Location> },
}

pub fn decide(results: &[CopyResult]) -> Outcome {
    if !results.iter().any(|r| r.location.synced && r.stored) {
        let stale = results
            .iter()
            .filter(|r| r.location.synced)
            .skip(1)
            .map(|r| r.location.clone())
            .collect();
        return Outcome::Fail { stale };
    }
    let stale = results
        .iter()
        .filter(|r| r.location.synced && !r.stored)
        .map(|r| r.location.clone())
        .collect();
    Outcome::Ack { stale }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Tier;

    fn result(node: &str, synced: bool, stored: bool) -> CopyResult {
        CopyResult {
            location: Location {
                node: node.parse().unwrap(),
                tier: Tier::Ram,
                synced,
            },
            stored,
        }
    }

    #[test]
    fn all_stored_acks_clean() {
        let r = [result("a", true, true), result("b", true, true)];
        assert_eq!(decide(&r), Outcome::Ack { stale: vec![] });
    }

    #[test]
    fn a_failed_copy_goes_stale() {
        let r = [result("a", true, true), result("b", true, false)];
        assert_eq!(
            decide(&r),
            Outcome::Ack {
                stale: vec![r[1].location.clone()]
            }
        );
    }

    #[test]
    fn only_out_of_sync_copies_stored_is_a_failure() {
        let r = [result("a", true, false), result("b", false, true)];
        assert_eq!(decide(&r), Outcome::Fail { stale: vec![] });
        assert_eq!(decide(&[]), Outcome::Fail { stale: vec![] });
    }

    #[test]
    fn a_failure_keeps_one_in_sync_copy() {
        let r = [
            result("a", true, false),
            result("b", true, false),
            result("c", true, false),
        ];
        assert_eq!(
            decide(&r),
            Outcome::Fail {
                stale: vec![r[1].location.clone(), r[2].location.clone()]
            }
        );
    }
}
