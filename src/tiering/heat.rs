//! Per-block heat: how often each block was read or written lately.
//!
//! Bumped by every queue's thread for each block a read or write touches. A bump is a relaxed
//! load and store, not a locked read-modify-write: two queues bumping the same block at the
//! same instant may lose one count, which a heuristic can afford, while a locked instruction
//! on every request of every auto image could not. An image that is not auto pays one
//! relaxed load per request. The mover halves every count each decay interval, so heat is
//! a count of recent accesses with older ones weighing less.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};

pub struct Heat {
    on: AtomicBool,
    counts: Box<[AtomicU32]>,
}

impl Heat {
    pub fn new(blocks: u64, on: bool) -> Heat {
        Heat {
            on: AtomicBool::new(on),
            counts: (0..blocks).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Whether accesses are counted (the image is auto).
    pub fn is_on(&self) -> bool {
        self.on.load(Relaxed)
    }

    /// Starts or stops counting; stopping forgets the counts, so an image turned auto again
    /// starts cold rather than from stale heat.
    pub fn set_on(&self, on: bool) {
        if self.on.swap(on, Relaxed) && !on {
            self.counts.iter().for_each(|c| c.store(0, Relaxed));
        }
    }

    /// One access to `block` (a block past the end, after a resize, is not counted).
    #[inline]
    pub fn touch(&self, block: u64) {
        if let Some(c) = self.counts.get(block as usize) {
            c.store(c.load(Relaxed).saturating_add(1), Relaxed);
        }
    }

    pub fn get(&self, block: u64) -> u32 {
        self.counts
            .get(block as usize)
            .map_or(0, |c| c.load(Relaxed))
    }

    /// Halves every count (the mover's thread, once per decay interval).
    pub fn decay(&self) {
        for c in self.counts.iter() {
            let v = c.load(Relaxed);
            if v != 0 {
                c.store(v >> 1, Relaxed);
            }
        }
    }

    pub fn blocks(&self) -> u64 {
        self.counts.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_count_and_decay_halves() {
        let heat = Heat::new(4, true);
        for _ in 0..10 {
            heat.touch(1);
        }
        heat.touch(3);
        heat.touch(99); // past the end: ignored
        assert_eq!((heat.get(0), heat.get(1), heat.get(3)), (0, 10, 1));
        heat.decay();
        assert_eq!((heat.get(1), heat.get(3)), (5, 0));
        for _ in 0..3 {
            heat.decay();
        }
        assert_eq!(heat.get(1), 0, "untouched heat goes cold");
    }

    #[test]
    fn turning_off_forgets() {
        let heat = Heat::new(2, true);
        heat.touch(0);
        heat.set_on(false);
        assert!(!heat.is_on());
        assert_eq!(heat.get(0), 0);
    }

    proptest::proptest! {
        /// After k decays without touches, a count is the original shifted right by k.
        #[test]
        fn decay_is_a_shift(n in 0u32..5000, k in 0u32..16) {
            let heat = Heat::new(1, true);
            for _ in 0..n {
                heat.touch(0);
            }
            for _ in 0..k {
                heat.decay();
            }
            proptest::prop_assert_eq!(heat.get(0), n >> k);
        }
    }
}
