//! `image resize`: an image's size changes, through the same durable metadata path as any
//! other change (`Disk::update_meta`: the JSON file, or one etcd transaction). Every node
//! that holds the image follows it from there (its watch), and every device serving it tells
//! its guest (`route::Device`, the vhost-user config-change message).
//!
//! Growing is allowed at any time: the new blocks are unwritten and read as zeros. Shrinking
//! takes data away from under a guest, so it is refused while a frontend uses the image and
//! needs `--allow-shrink` even then. A read-only image (a golden image, a snapshot) keeps
//! the size it was made with: clones and guests rely on it staying what it is.

use serde_json::{json, Value};

use super::{Daemon, DaemonError};
use crate::image::table::MAX_BLOCKS;
use crate::image::{ImageMeta, ImageName, MetaError};

impl Daemon {
    /// Changes image `name`'s size to `size` bytes, on its owner.
    pub(super) fn resize(
        &self,
        name: &ImageName,
        size: u64,
        allow_shrink: bool,
    ) -> Result<Value, DaemonError> {
        let disk = self.owned_disk(name)?;
        let (old, read_only) = {
            let meta = disk.meta();
            (meta.size, meta.read_only)
        };
        if read_only {
            return Err(DaemonError::ResizeReadOnly(name.clone()));
        }
        check_size(&disk.meta(), size)?;
        let shrinking = size < old;
        // A shrink waits for a resync in progress and keeps the next one out until it is
        // done, so no copy is written past the new end meanwhile.
        let _resync = shrinking.then(|| disk.resync_lock());
        if shrinking {
            if !allow_shrink {
                return Err(DaemonError::ShrinkNeedsFlag {
                    name: name.clone(),
                    size,
                    old,
                });
            }
            if disk.in_use() || self.active_in_cluster(&disk)? {
                return Err(DaemonError::ShrinkInUse(name.clone()));
            }
            if disk.meta().parent.is_some() {
                // The cut block's tail would read its parent's bytes again after a grow.
                return Err(DaemonError::ShrinkClone(name.clone()));
            }
        }
        disk.update_meta(|meta| meta.resize(size).map_err(|e| e.to_string()))
            .map_err(DaemonError::Text)?;
        let meta = disk.meta();
        log::info!("image {name}: resized from {old} to {size} bytes");
        Ok(json!({
            "name": name,
            "size": meta.size,
            "old_size": old,
            "blocks": meta.blocks(),
            "in_use": disk.in_use(),
        }))
    }

    /// Whether etcd says a frontend runs the image's device (on any node).
    fn active_in_cluster(&self, disk: &crate::disk::Disk) -> Result<bool, DaemonError> {
        let Some(cluster) = &self.shared else {
            return Ok(false);
        };
        let key = cluster.keys().active(disk.meta().id);
        let active = cluster
            .etcd()
            .get(&key)
            .map_err(|e| DaemonError::Text(format!("cannot ask etcd whether it is in use: {e}")))?;
        Ok(active.is_some())
    }
}

/// Refuses a size the image cannot take, saying why in terms of a resize (its block size is
/// fixed, so the table's limit is a limit on its size).
fn check_size(meta: &ImageMeta, size: u64) -> Result<(), DaemonError> {
    match meta.clone().resize(size) {
        Ok(()) => Ok(()),
        Err(MetaError::TooManyBlocks { blocks, block_size }) => Err(DaemonError::Text(format!(
            "{size} bytes is {blocks} blocks of {block_size} bytes, more than the block table's \
             limit of {MAX_BLOCKS}: image '{}' can grow to at most {} bytes",
            meta.name,
            MAX_BLOCKS * block_size
        ))),
        Err(e) => Err(DaemonError::Meta(e)),
    }
}
