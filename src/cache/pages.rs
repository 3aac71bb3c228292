//! Which 4 KiB pages of a cached block hold valid data: a bitmap per block, so a 4 KiB random
//! miss fills 4 KiB of the cache file, not the whole block.

/// The cache's unit of validity: a guest page. Reads and fills are tracked at this size; a
/// fill's partial pages at either end are not marked (their bytes are not all known).
pub const PAGE: u64 = 4096;

/// One bit per page of a block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pages {
    words: Vec<u64>,
}

impl Pages {
    /// No page valid, room for `pages` pages.
    pub fn new(pages: u64) -> Pages {
        Pages {
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    fn bit(&self, page: u64) -> bool {
        self.words
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Whether every page in `first..end` is set (an empty range is covered).
    pub fn covers(&self, first: u64, end: u64) -> bool {
        (first..end).all(|p| self.bit(p))
    }

    /// Pages in `first..end` that are not set.
    pub fn missing(&self, first: u64, end: u64) -> u64 {
        (first..end).filter(|&p| !self.bit(p)).count() as u64
    }

    /// Sets `first..end` (pages past the bitmap are ignored); returns how many were newly set.
    pub fn set(&mut self, first: u64, end: u64) -> u64 {
        let mut added = 0;
        for p in first..end {
            if let Some(w) = self.words.get_mut((p / 64) as usize) {
                let mask = 1 << (p % 64);
                if *w & mask == 0 {
                    *w |= mask;
                    added += 1;
                }
            }
        }
        added
    }

    /// Clears `first..end`; returns how many were set before.
    pub fn clear(&mut self, first: u64, end: u64) -> u64 {
        let mut removed = 0;
        for p in first..end {
            if let Some(w) = self.words.get_mut((p / 64) as usize) {
                let mask = 1 << (p % 64);
                if *w & mask != 0 {
                    *w &= !mask;
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Pages set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// The pages lying wholly inside bytes `offset..offset + len` of a block (what a fill of
/// those bytes makes valid).
pub fn inner(offset: u64, len: u64) -> (u64, u64) {
    let first = offset.div_ceil(PAGE);
    let end = (offset + len) / PAGE;
    (first, end.max(first))
}

/// The pages touching bytes `offset..offset + len` (what a read of those bytes needs).
pub fn outer(offset: u64, len: u64) -> (u64, u64) {
    (offset / PAGE, (offset + len).div_ceil(PAGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_and_cover() {
        let mut p = Pages::new(1024);
        assert!(!p.covers(0, 1));
        assert!(p.covers(5, 5), "an empty range is covered");
        assert_eq!(p.set(60, 70), 10);
        assert_eq!(p.set(65, 72), 2, "only new pages count");
        assert!(p.covers(60, 72));
        assert!(!p.covers(59, 72));
        assert_eq!(p.missing(58, 74), 4);
        assert_eq!(p.count(), 12);
        assert_eq!(p.clear(0, 64), 4);
        assert!(!p.covers(60, 72));
        assert!(p.covers(64, 72));
        assert_eq!(p.set(1020, 2000), 4, "pages past the block are ignored");
    }

    #[test]
    fn partial_pages_are_never_valid_after_a_fill() {
        assert_eq!(inner(0, 4096), (0, 1));
        assert_eq!(inner(512, 4096), (1, 1), "no whole page inside");
        assert_eq!(inner(512, 8192), (1, 2));
        assert_eq!(inner(4096, 100), (1, 1));
        assert_eq!(outer(512, 4096), (0, 2));
        assert_eq!(outer(4096, 4096), (1, 2));
    }
}
