//! The block table: for every block of an image, the list of its copies.
//!
//! Most blocks of an image share one placement (the operator moves ranges, not single
//! blocks), so the table keeps each distinct location list once and a small index per block.
//! A 1 TiB image of 4 MiB blocks costs 1 MiB of table and a lookup is two array reads.

use super::location::Location;
use super::range::BlockRange;

/// Upper bound on blocks per image: keeps the table (4 bytes a block) at 16 MiB at most and
/// `image info` printable. With the default 4 MiB blocks that is 16 TiB.
pub const MAX_BLOCKS: u64 = 1 << 22;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTable {
    placements: Vec<Vec<Location>>,
    per_block: Vec<u32>,
}

/// A run of consecutive blocks with the same locations: the persisted form of the table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    pub blocks: BlockRange,
    pub locations: Vec<Location>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("image has {0} blocks, more than the limit of {MAX_BLOCKS}")]
    TooManyBlocks(u64),
    #[error("extents do not cover blocks 0..{blocks} exactly once (problem at block {at})")]
    BadCoverage { blocks: u64, at: u64 },
    #[error("block {0} has no location")]
    NoLocation(u64),
    #[error("block {0} is past the end of the image")]
    PastEnd(u64),
    #[error("block {0} is named out of order")]
    Unordered(u64),
}

impl BlockTable {
    /// A table of `blocks` blocks, all with the same locations.
    pub fn uniform(blocks: u64, locations: Vec<Location>) -> Result<Self, TableError> {
        if blocks > MAX_BLOCKS {
            return Err(TableError::TooManyBlocks(blocks));
        }
        if locations.is_empty() {
            return Err(TableError::NoLocation(0));
        }
        Ok(BlockTable {
            placements: vec![locations],
            per_block: vec![0; blocks as usize],
        })
    }

    /// Rebuilds the table from persisted extents, which must cover every block exactly once.
    pub fn from_extents(blocks: u64, extents: &[Extent]) -> Result<Self, TableError> {
        if blocks > MAX_BLOCKS {
            return Err(TableError::TooManyBlocks(blocks));
        }
        let mut sorted: Vec<&Extent> = extents.iter().collect();
        sorted.sort_by_key(|e| e.blocks.start());
        let mut table = BlockTable {
            placements: Vec::new(),
            per_block: Vec::with_capacity(blocks as usize),
        };
        for extent in sorted {
            let at = table.per_block.len() as u64;
            if extent.blocks.start() != at || extent.blocks.end() > blocks {
                return Err(TableError::BadCoverage { blocks, at });
            }
            if extent.locations.is_empty() {
                return Err(TableError::NoLocation(at));
            }
            let id = table.intern(&extent.locations);
            table.per_block.resize(extent.blocks.end() as usize, id);
        }
        let covered = table.per_block.len() as u64;
        if covered != blocks {
            return Err(TableError::BadCoverage {
                blocks,
                at: covered,
            });
        }
        Ok(table)
    }

    fn intern(&mut self, locations: &[Location]) -> u32 {
        if let Some(id) = self.placements.iter().position(|p| p == locations) {
            return id as u32;
        }
        self.placements.push(locations.to_vec());
        (self.placements.len() - 1) as u32
    }

    pub fn blocks(&self) -> u64 {
        self.per_block.len() as u64
    }

    /// The copies of `block`; `None` past the end.
    pub fn locations(&self, block: u64) -> Option<&[Location]> {
        let id = *self.per_block.get(usize::try_from(block).ok()?)?;
        Some(&self.placements[id as usize])
    }

    /// Every node that holds a copy of some block, in order.
    pub fn nodes(&self) -> Vec<super::location::NodeId> {
        let mut nodes: Vec<_> = self
            .placements
            .iter()
            .flatten()
            .map(|l| l.node.clone())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Runs of blocks with equal locations, in block order.
    pub fn extents(&self) -> Vec<Extent> {
        let mut extents: Vec<Extent> = Vec::new();
        let mut start = 0usize;
        for i in 1..=self.per_block.len() {
            if i == self.per_block.len() || self.per_block[i] != self.per_block[start] {
                // INVARIANT: start < i (start is an earlier i), so the range is never empty.
                if let Ok(blocks) = BlockRange::new(start as u64, i as u64) {
                    let locations = self.placements[self.per_block[start] as usize].clone();
                    extents.push(Extent { blocks, locations });
                }
                start = i;
            }
        }
        extents
    }

    /// Applies `change` to the location list of every block in `range` (already checked
    /// against the table's size). Nothing changes when any resulting list would be empty.
    /// Placements no block uses any more are dropped.
    pub fn update(
        &mut self,
        range: BlockRange,
        change: impl FnMut(&mut Vec<Location>),
    ) -> Result<(), TableError> {
        self.update_blocks(range.iter(), change)
    }

    /// [`BlockTable::update`] on any blocks in increasing order (a stripe member's, say):
    /// `change` runs once per distinct location list among them. Nothing changes when a
    /// block is past the end or out of order, or any resulting list would be empty.
    pub fn update_blocks(
        &mut self,
        blocks: impl Iterator<Item = u64> + Clone,
        mut change: impl FnMut(&mut Vec<Location>),
    ) -> Result<(), TableError> {
        // Each block once: the remap below reads a block's old list id only before it is
        // rewritten.
        let mut next = 0;
        for block in blocks.clone() {
            if block < next {
                return Err(TableError::Unordered(block));
            }
            if block >= self.blocks() {
                return Err(TableError::PastEnd(block));
            }
            next = block + 1;
        }
        let blocks = blocks.map(|b| b as usize);
        let mut remap: Vec<Option<Vec<Location>>> = vec![None; self.placements.len()];
        for block in blocks.clone() {
            let old = self.per_block[block] as usize;
            if remap[old].is_none() {
                let mut locations = self.placements[old].clone();
                change(&mut locations);
                if locations.is_empty() {
                    return Err(TableError::NoLocation(block as u64));
                }
                remap[old] = Some(locations);
            }
        }
        let ids: Vec<Option<u32>> = remap
            .iter()
            .map(|l| l.as_ref().map(|l| self.intern(l)))
            .collect();
        for block in blocks {
            let old = self.per_block[block] as usize;
            // INVARIANT: the first loop mapped the placement of every block in the range.
            if let Some(id) = ids[old] {
                self.per_block[block] = id;
            }
        }
        self.compact();
        Ok(())
    }

    /// Changes the table to `blocks` blocks: blocks past the new end go; each new block gets
    /// the copies `new_block` gives it. Refused (nothing changes) past [`MAX_BLOCKS`], at 0
    /// blocks, or when a new block would have no copy.
    pub fn resize(
        &mut self,
        blocks: u64,
        mut new_block: impl FnMut(u64) -> Vec<Location>,
    ) -> Result<(), TableError> {
        if blocks > MAX_BLOCKS {
            return Err(TableError::TooManyBlocks(blocks));
        }
        if blocks == 0 {
            return Err(TableError::NoLocation(0));
        }
        let mut next = self.clone();
        next.per_block.truncate(blocks as usize);
        for block in next.blocks()..blocks {
            let locations = new_block(block);
            if locations.is_empty() {
                return Err(TableError::NoLocation(block));
            }
            let id = next.intern(&locations);
            next.per_block.push(id);
        }
        next.compact();
        *self = next;
        Ok(())
    }

    /// Drops placements no block uses. INVARIANT: a table's own extents cover it exactly, so
    /// rebuilding from them succeeds; were it refused, the table as it is stays (still right,
    /// only carrying unused placements).
    fn compact(&mut self) {
        let extents = self.extents();
        if let Ok(table) = BlockTable::from_extents(self.blocks(), &extents) {
            *self = table;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::location::Tier;

    fn loc(node: &str, tier: Tier, synced: bool) -> Location {
        Location {
            node: node.parse().unwrap(),
            tier,
            synced,
        }
    }

    #[test]
    fn uniform_table_answers_every_block() {
        let t = BlockTable::uniform(5120, vec![loc("a", Tier::Ram, true)]).unwrap();
        assert_eq!(t.blocks(), 5120);
        assert_eq!(t.locations(5119).unwrap()[0].node.as_str(), "a");
        assert!(t.locations(5120).is_none());
        assert_eq!(t.extents().len(), 1);
    }

    #[test]
    fn refuses_too_many_blocks() {
        let r = BlockTable::uniform(MAX_BLOCKS + 1, vec![loc("a", Tier::Ram, true)]);
        assert_eq!(r, Err(TableError::TooManyBlocks(MAX_BLOCKS + 1)));
    }

    #[test]
    fn update_splits_and_extents_round_trip() {
        let mut t = BlockTable::uniform(100, vec![loc("a", Tier::Ram, true)]).unwrap();
        let range = BlockRange::new(10, 20).unwrap();
        t.update(range, |l| l.push(loc("b", Tier::Volume, false)))
            .unwrap();
        assert_eq!(t.locations(9).unwrap().len(), 1);
        assert_eq!(t.locations(10).unwrap().len(), 2);
        assert_eq!(t.locations(19).unwrap().len(), 2);
        assert_eq!(t.locations(20).unwrap().len(), 1);
        let extents = t.extents();
        assert_eq!(extents.len(), 3);
        assert_eq!(BlockTable::from_extents(100, &extents).unwrap(), t);
    }

    #[test]
    fn update_back_merges_placements() {
        let mut t = BlockTable::uniform(100, vec![loc("a", Tier::Ram, true)]).unwrap();
        let range = BlockRange::new(10, 20).unwrap();
        t.update(range, |l| l.push(loc("b", Tier::Ram, true)))
            .unwrap();
        t.update(range, |l| l.retain(|x| x.node.as_str() != "b"))
            .unwrap();
        assert_eq!(t.extents().len(), 1);
        assert_eq!(t.placements.len(), 1);
    }

    #[test]
    fn update_blocks_changes_only_the_blocks_named() {
        let mut t = BlockTable::uniform(10, vec![loc("a", Tier::Ram, true)]).unwrap();
        t.update_blocks([1, 4, 5].into_iter(), |l| {
            l.push(loc("b", Tier::Ram, false))
        })
        .unwrap();
        let counts: Vec<usize> = (0..10).map(|b| t.locations(b).unwrap().len()).collect();
        assert_eq!(counts, [1, 2, 1, 1, 2, 2, 1, 1, 1, 1]);
        let before = t.clone();
        let push = |l: &mut Vec<Location>| l.push(loc("c", Tier::Ram, false));
        assert_eq!(
            t.update_blocks([3, 3].into_iter(), push),
            Err(TableError::Unordered(3))
        );
        assert_eq!(
            t.update_blocks([9, 10].into_iter(), push),
            Err(TableError::PastEnd(10))
        );
        assert_eq!(t, before);
    }

    /// Growing appends blocks with the copies asked for (runs of one list stay one
    /// placement); shrinking drops the tail and the placements only it used.
    #[test]
    fn resize_grows_and_shrinks_the_table() {
        let a = vec![loc("a", Tier::Ram, true)];
        let mut t = BlockTable::uniform(3, a.clone()).unwrap();
        t.resize(10, |_| a.clone()).unwrap();
        assert_eq!(t.blocks(), 10);
        assert_eq!(t.extents().len(), 1, "same copies: still one extent");
        let b = vec![loc("b", Tier::Volume, true)];
        t.resize(12, |_| b.clone()).unwrap();
        assert_eq!(t.locations(11).unwrap(), &b[..]);
        assert_eq!(t.extents().len(), 2);
        t.resize(4, |_| unreachable!()).unwrap();
        assert_eq!(t.blocks(), 4);
        assert!(t.locations(4).is_none());
        assert_eq!(
            t.placements.len(),
            1,
            "b's list is used by no block any more"
        );
        let before = t.clone();
        assert_eq!(
            t.resize(MAX_BLOCKS + 1, |_| a.clone()),
            Err(TableError::TooManyBlocks(MAX_BLOCKS + 1))
        );
        assert_eq!(t.resize(6, |_| Vec::new()), Err(TableError::NoLocation(4)));
        assert_eq!(t.resize(0, |_| a.clone()), Err(TableError::NoLocation(0)));
        assert_eq!(t, before, "a refused resize changes nothing");
    }

    #[test]
    fn refuses_empty_location_list() {
        let mut t = BlockTable::uniform(10, vec![loc("a", Tier::Ram, true)]).unwrap();
        let r = t.update(BlockRange::new(0, 1).unwrap(), |l| l.clear());
        assert_eq!(r, Err(TableError::NoLocation(0)));
    }

    #[test]
    fn from_extents_checks_coverage() {
        let l = vec![loc("a", Tier::Ram, true)];
        let e = |a, b| Extent {
            blocks: BlockRange::new(a, b).unwrap(),
            locations: l.clone(),
        };
        assert!(BlockTable::from_extents(10, &[e(0, 5), e(5, 10)]).is_ok());
        assert!(BlockTable::from_extents(10, &[e(5, 10), e(0, 5)]).is_ok());
        assert!(BlockTable::from_extents(10, &[e(0, 5)]).is_err());
        assert!(BlockTable::from_extents(10, &[e(0, 6), e(5, 10)]).is_err());
        assert!(BlockTable::from_extents(10, &[e(0, 11)]).is_err());
        assert!(BlockTable::from_extents(10, &[]).is_err());
    }
}
