//! Images made from images. A clone reads every block it has no data of its own for from its
//! parent, and so on down the chain; a snapshot is an image's block files hard-linked at one
//! instant. Both happen at the file level on each node (`store::Blocks`): a clone's block is
//! read straight from the parent's block file, so N clones of one golden image share its
//! tmpfs pages and page cache, and the request path does not know clones exist.
//!
//! This module connects a clone's blocks to its parent's on this node; `daemon/family.rs`
//! has the operations (snapshot, clone, flatten) and their rules.

use std::fs::File;
use std::io;
use std::sync::Arc;

use crate::disk::Disk;
use crate::image::Tier;
use crate::store::Backing;

/// A clone's parent on this node.
pub struct ParentBlocks {
    parent: Arc<Disk>,
}

impl ParentBlocks {
    pub fn new(parent: Arc<Disk>) -> Arc<Self> {
        Arc::new(ParentBlocks { parent })
    }
}

impl Backing for ParentBlocks {
    /// The parent's block from an in-sync copy on this node (RAM first): a copy that is out
    /// of sync, or lost with a wiped tier, must not be read as the clone's data.
    fn file_for_read(&self, block: u64) -> io::Result<Option<Arc<File>>> {
        // The metadata stays read-locked until the file is open: a copy removed from this
        // node (`location rm`) loses its file only after the metadata says so, so the file
        // is never found missing here and taken for zeros.
        let meta = self.parent.meta();
        if self.parent.is_removed() {
            return Err(io::Error::other(format!(
                "parent image {} was removed",
                meta.name
            )));
        }
        if block >= meta.blocks() {
            return Ok(None); // the clone grew past its parent: zeros
        }
        let here = meta
            .table
            .locations(block)
            .unwrap_or(&[])
            .iter()
            .filter(|l| {
                &l.node == self.parent.me() && l.synced && !self.parent.is_lost(l.tier, block)
            });
        let tier = here.map(|l| l.tier).min_by_key(|&t| t != Tier::Ram);
        let tier = tier.ok_or_else(|| {
            io::Error::other(format!(
                "parent image {}: no in-sync copy of block {block} on this node",
                meta.name
            ))
        })?;
        self.parent
            .blocks()
            .file_for_read(tier, block)
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests;
