//! Block files on this node: `<tier-dir>/<image>/<block index as %08d>`, the UKAI layout.
//!
//! A block that was never written has no file and reads as zeros, so images are thin. Files
//! are opened once and kept in a bounded cache, since an `open` per request would cost more
//! than the read itself on the RAM tier.
//!
//! Every caller that reads or changes blocks (the queue engine, the peer service, resync,
//! import and export, block drops) goes through one [`Blocks`] per image, which marks what
//! the next flush must sync, so that rule is written once.

mod blocks;
mod dirty;
mod error;
mod files;

use std::path::{Path, PathBuf};

use crate::image::{ImageId, ImageName, Tier};

pub use blocks::{Backing, Blocks, FlushPlan};
pub use dirty::{DirtyFiles, FlushTicket};
pub use error::BlockError;
use files::read_full_at;
pub use files::{BlockFiles, MAX_OPEN_BLOCKS};

/// The two tier directories of this node.
#[derive(Debug, Clone)]
pub struct TierDirs {
    pub ram: PathBuf,
    pub volume: PathBuf,
}

impl TierDirs {
    pub fn root(&self, tier: Tier) -> &Path {
        match tier {
            Tier::Ram => &self.ram,
            Tier::Volume => &self.volume,
        }
    }

    pub fn image_dir(&self, tier: Tier, name: &ImageName, id: ImageId) -> PathBuf {
        self.root(tier).join(id.dir_name(name))
    }
}
