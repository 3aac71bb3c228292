//! Changing where an image's blocks live: adding and removing copies. Each change is saved
//! before it takes effect; removing a copy never leaves a block without an in-sync copy.

use crate::disk::Disk;
use crate::image::{BlockRange, ImageMeta, Location, Placement};

/// The range an operator named, or every block, checked against the image.
pub fn range_of(disk: &Disk, blocks: Option<BlockRange>) -> Result<BlockRange, String> {
    let count = disk.meta().blocks();
    match blocks {
        Some(range) => range.within(count).map_err(|e| e.to_string()),
        None => BlockRange::new(0, count).map_err(|e| e.to_string()),
    }
}

/// Adds an out-of-sync copy at `at` to every block of `range` that has none there; returns
/// how many blocks got one.
pub fn add(disk: &Disk, range: BlockRange, at: &Placement) -> Result<u64, String> {
    disk.update_meta(|meta| add_to(meta, range, at))
}

/// [`add`] on a metadata value (to preview a change before it is made).
pub fn add_to(meta: &mut ImageMeta, range: BlockRange, at: &Placement) -> Result<u64, String> {
    {
        let added = range
            .iter()
            .filter(|&b| {
                meta.table
                    .locations(b)
                    .is_some_and(|l| !l.iter().any(|x| x.at(at)))
            })
            .count() as u64;
        meta.table
            .update(range, |locations| {
                if !locations.iter().any(|l| l.at(at)) {
                    locations.push(Location {
                        node: at.node.clone(),
                        tier: at.tier,
                        synced: false,
                    });
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(added)
    }
}

/// Removes the copy at `at` from every block of `range`; refused, with nothing changed, when a
/// block would be left without an in-sync copy. Returns the blocks that had a copy there.
pub fn remove(disk: &Disk, range: BlockRange, at: &Placement) -> Result<Vec<u64>, String> {
    disk.update_meta(|meta| {
        let mut had = Vec::new();
        for block in range.iter() {
            let locations = meta.table.locations(block).unwrap_or(&[]);
            if !locations.iter().any(|l| l.at(at)) {
                continue;
            }
            if !locations.iter().any(|l| l.synced && !l.at(at)) {
                return Err(format!(
                    "refused: block {block} would have no in-sync copy left (sync another copy first)"
                ));
            }
            had.push(block);
        }
        meta.table
            .update(range, |locations| locations.retain(|l| !l.at(at)))
            .map_err(|e| e.to_string())?;
        Ok(had)
    })
}
