//! Changing where an image's blocks live: adding and removing copies. Each change is saved
//! before it takes effect; removing a copy never leaves a block without an in-sync copy.

use crate::disk::Disk;
use crate::image::range::RangeError;
use crate::image::table::TableError;
use crate::image::{BlockRange, ImageMeta, Location, Placement};

/// Why a placement change was refused or not made.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error(transparent)]
    Range(#[from] RangeError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("refused: block {0} would have no in-sync copy left (sync another copy first)")]
    LastSyncedCopy(u64),
    /// Saving the changed metadata failed (the change was not made).
    #[error("{0}")]
    Save(String),
}

/// For callers whose errors are still text (daemon/cluster.rs).
impl From<PlacementError> for String {
    fn from(e: PlacementError) -> String {
        e.to_string()
    }
}

/// The range an operator named, or every block, checked against the image.
pub fn range_of(disk: &Disk, blocks: Option<BlockRange>) -> Result<BlockRange, PlacementError> {
    let count = disk.meta().blocks();
    Ok(match blocks {
        Some(range) => range.within(count)?,
        None => BlockRange::new(0, count)?,
    })
}

/// Adds an out-of-sync copy at `at` to every block of `range` that has none there; returns
/// how many blocks got one.
pub fn add(disk: &Disk, range: BlockRange, at: &Placement) -> Result<u64, PlacementError> {
    // `add_to` changes nothing when it fails, so its error rides inside a saved no-change.
    disk.update_meta(|meta| Ok(add_to(meta, range, at)))
        .map_err(PlacementError::Save)?
}

/// [`add`] on a metadata value (to preview a change before it is made). On an error, `meta`
/// is left as it was.
pub fn add_to(
    meta: &mut ImageMeta,
    range: BlockRange,
    at: &Placement,
) -> Result<u64, PlacementError> {
    let added = range
        .iter()
        .filter(|&b| {
            meta.table
                .locations(b)
                .is_some_and(|l| !l.iter().any(|x| x.at(at)))
        })
        .count() as u64;
    meta.table.update(range, |locations| {
        if !locations.iter().any(|l| l.at(at)) {
            locations.push(Location {
                node: at.node.clone(),
                tier: at.tier,
                synced: false,
            });
        }
    })?;
    Ok(added)
}

/// Removes the copy at `at` from every block of `range`; refused, with nothing changed, when a
/// block would be left without an in-sync copy. Returns the blocks that had a copy there.
pub fn remove(disk: &Disk, range: BlockRange, at: &Placement) -> Result<Vec<u64>, PlacementError> {
    // `remove_from` changes nothing when it fails, so its error rides inside a saved no-change.
    disk.update_meta(|meta| Ok(remove_from(meta, range, at)))
        .map_err(PlacementError::Save)?
}

/// [`remove`] on a metadata value; on an error, `meta` is left as it was.
fn remove_from(
    meta: &mut ImageMeta,
    range: BlockRange,
    at: &Placement,
) -> Result<Vec<u64>, PlacementError> {
    let mut had = Vec::new();
    for block in range.iter() {
        let locations = meta.table.locations(block).unwrap_or(&[]);
        if !locations.iter().any(|l| l.at(at)) {
            continue;
        }
        if !locations.iter().any(|l| l.synced && !l.at(at)) {
            return Err(PlacementError::LastSyncedCopy(block));
        }
        had.push(block);
    }
    // `update` changes nothing when it fails (a block left with no location).
    meta.table
        .update(range, |locations| locations.retain(|l| !l.at(at)))?;
    Ok(had)
}
