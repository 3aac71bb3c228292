//! Which blocks of the auto images belong on the RAM tier: a pure function of their heat,
//! where they are now and the budget, so it can be tested on its own.
//!
//! Blocks are ranked by heat, a block already in RAM counting [`STICKY`] times its heat, and
//! taken in that order while they fit in the budget. A block in RAM that was not taken is
//! demoted (a block whose heat decayed to 0 is never taken: cold blocks leave RAM even when
//! there is room); a block on the volume that was taken is promoted, if it has at least
//! [`MIN_PROMOTE_HEAT`]. The stickiness means a newcomer must be clearly hotter than a
//! resident to displace it, so two blocks of about equal heat do not swap places every round.

use std::cmp::Reverse;
use std::collections::HashSet;

/// A block of an auto image with a copy on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Which image (an index into the mover's list).
    pub image: usize,
    pub block: u64,
    pub heat: u32,
    /// Whether its copy here is on the RAM tier (else the volume tier).
    pub on_ram: bool,
    /// Bytes it takes in RAM (the block's length).
    pub len: u64,
}

/// A ranked resident's heat counts this many times a newcomer's.
pub const STICKY: u64 = 2;
/// Accesses since the last decays a block needs before it is worth a copy: one read of a
/// block now and then does not earn it RAM.
pub const MIN_PROMOTE_HEAT: u32 = 4;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Hottest first.
    pub promote: Vec<Candidate>,
    /// Coldest first.
    pub demote: Vec<Candidate>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.promote.is_empty() && self.demote.is_empty()
    }
}

fn score(c: &Candidate) -> u64 {
    u64::from(c.heat) * if c.on_ram { STICKY } else { 1 }
}

fn eligible(c: &Candidate) -> bool {
    if c.on_ram {
        c.heat > 0
    } else {
        c.heat >= MIN_PROMOTE_HEAT
    }
}

/// The blocks to promote and demote so that RAM holds the hottest blocks that fit `budget`.
pub fn plan(candidates: &[Candidate], budget: u64) -> Plan {
    let mut ranked: Vec<&Candidate> = candidates.iter().filter(|c| eligible(c)).collect();
    // Highest score first; on a tie the resident first, then a fixed order.
    ranked.sort_by_key(|c| (Reverse(score(c)), Reverse(c.on_ram), c.image, c.block));
    let mut room = budget;
    let mut keep = HashSet::new();
    for c in ranked {
        if c.len <= room {
            room -= c.len;
            keep.insert((c.image, c.block));
        }
    }
    let kept = |c: &&Candidate| keep.contains(&(c.image, c.block));
    let mut promote: Vec<Candidate> = candidates
        .iter()
        .filter(|c| !c.on_ram && kept(c))
        .copied()
        .collect();
    let mut demote: Vec<Candidate> = candidates
        .iter()
        .filter(|c| c.on_ram && !kept(c))
        .copied()
        .collect();
    promote.sort_by_key(|c| (Reverse(c.heat), c.image, c.block));
    demote.sort_by_key(|c| (c.heat, c.image, c.block));
    Plan { promote, demote }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB4: u64 = 4 << 20;

    fn c(block: u64, heat: u32, on_ram: bool) -> Candidate {
        Candidate {
            image: 0,
            block,
            heat,
            on_ram,
            len: MB4,
        }
    }

    fn blocks(list: &[Candidate]) -> Vec<u64> {
        list.iter().map(|c| c.block).collect()
    }

    #[test]
    fn the_hottest_that_fit_are_promoted() {
        let all = [
            c(0, 100, false),
            c(1, 3, false),
            c(2, 50, false),
            c(3, 40, false),
        ];
        let plan = plan(&all, 2 * MB4);
        assert_eq!(blocks(&plan.promote), [0, 2]);
        assert!(plan.demote.is_empty());
        let lukewarm = plan_of(&[c(1, 3, false)], 10 * MB4);
        assert!(lukewarm.is_empty(), "below the promotion threshold");
    }

    fn plan_of(all: &[Candidate], budget: u64) -> Plan {
        plan(all, budget)
    }

    #[test]
    fn cold_residents_leave_and_residents_are_sticky() {
        // A cold block leaves RAM even with room to spare.
        let p = plan(&[c(0, 0, true), c(1, 9, true)], 10 * MB4);
        assert_eq!(blocks(&p.demote), [0]);
        // A newcomer a little hotter than a resident does not displace it...
        let p = plan(&[c(0, 10, true), c(1, 15, false)], MB4);
        assert!(p.is_empty(), "{p:?}");
        // ...one more than twice as hot does.
        let p = plan(&[c(0, 10, true), c(1, 25, false)], MB4);
        assert_eq!((blocks(&p.promote), blocks(&p.demote)), (vec![1], vec![0]));
    }

    #[test]
    fn a_zero_budget_empties_ram() {
        let p = plan(&[c(0, 1000, true), c(1, 1000, false)], 0);
        assert_eq!((blocks(&p.promote), blocks(&p.demote)), (vec![], vec![0]));
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        proptest::collection::vec((0u32..64, any::<bool>(), 1u64..6, 0usize..3), 0..40).prop_map(
            |list| {
                list.into_iter()
                    .enumerate()
                    .map(|(i, (heat, on_ram, len, image))| Candidate {
                        image,
                        block: i as u64,
                        heat,
                        on_ram,
                        len: len * 4096,
                    })
                    .collect()
            },
        )
    }

    fn apply(all: &[Candidate], plan: &Plan) -> Vec<Candidate> {
        let up: HashSet<u64> = plan.promote.iter().map(|c| c.block).collect();
        let down: HashSet<u64> = plan.demote.iter().map(|c| c.block).collect();
        all.iter()
            .map(|c| Candidate {
                on_ram: (c.on_ram || up.contains(&c.block)) && !down.contains(&c.block),
                ..*c
            })
            .collect()
    }

    proptest! {
        /// After the plan, RAM holds at most the budget; every promoted block was on the
        /// volume and hot enough, every demoted one in RAM; no block is in both lists; and
        /// planning again with the same heat moves nothing (no swapping back and forth).
        #[test]
        fn plans_fit_the_budget_and_are_stable(all in candidates(), budget in 0u64..(40 * 4096)) {
            let p = plan(&all, budget);
            let after = apply(&all, &p);
            let in_ram: u64 = after.iter().filter(|c| c.on_ram).map(|c| c.len).sum();
            prop_assert!(in_ram <= budget, "{} in RAM over a budget of {}", in_ram, budget);
            prop_assert!(p.promote.iter().all(|c| !c.on_ram && c.heat >= MIN_PROMOTE_HEAT));
            prop_assert!(p.demote.iter().all(|c| c.on_ram));
            let up: HashSet<u64> = p.promote.iter().map(|c| c.block).collect();
            prop_assert!(p.demote.iter().all(|c| !up.contains(&c.block)));
            let again = plan(&after, budget);
            prop_assert!(again.is_empty(), "replanned: {:?}", again);
        }

        /// With room for every block, exactly the eligible ones end in RAM: the hot ones
        /// promoted, the warm residents kept, the cold ones demoted.
        #[test]
        fn nothing_much_hotter_is_left_out(all in candidates()) {
            // Equal lengths and a generous budget: every eligible block gets in.
            let all: Vec<Candidate> = all.into_iter().map(|c| Candidate { len: 4096, ..c }).collect();
            let budget = all.len() as u64 * 4096;
            let after = apply(&all, &plan(&all, budget));
            for c in &after {
                prop_assert_eq!(c.on_ram, eligible(&all[c.block as usize]), "block {}", c.block);
            }
        }
    }
}
