//! What can go wrong doing block I/O on this node, with the block and the cause.

use std::io;

use crate::image::Tier;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// A span that does not fit in its block (or a block past the image's end): a caller's
    /// mistake or a bad peer request, refused before any I/O.
    #[error("block {block}: {len} bytes at {offset} run past its {block_len} bytes")]
    OutOfBlock {
        block: u64,
        offset: u64,
        len: u64,
        block_len: u64,
    },
    #[error("block {block} on {tier}: cannot {action}: {source}")]
    Io {
        tier: Tier,
        block: u64,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot sync the block directory on {tier}: {source}")]
    SyncDir {
        tier: Tier,
        #[source]
        source: io::Error,
    },
    #[error("cannot sync a block file on {tier}: {source}")]
    Sync {
        tier: Tier,
        #[source]
        source: io::Error,
    },
}

impl BlockError {
    /// The OS error behind this one, if any (ELOOP for a planted symlink, ENOSPC, ...).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            BlockError::OutOfBlock { .. } => None,
            BlockError::Io { source, .. }
            | BlockError::SyncDir { source, .. }
            | BlockError::Sync { source, .. } => source.raw_os_error(),
        }
    }
}

/// Builds the `map_err` for an I/O step on `block`.
pub(super) fn io_at(
    tier: Tier,
    block: u64,
    action: &'static str,
) -> impl FnOnce(io::Error) -> BlockError {
    move |source| BlockError::Io {
        tier,
        block,
        action,
        source,
    }
}
