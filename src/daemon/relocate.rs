//! Moving an image's copies: location changes on the owner, and moving the blocks here after
//! a take-over.

use std::sync::Arc;

use serde_json::{json, Value};

use super::Daemon;
use crate::copies::DiskCopies;
use crate::disk::Disk;
use crate::image::{BlockRange, ImageName, NodeId, Placement};
use crate::placement;
use crate::replica::sync;
use crate::tiering::mover::end_auto_for_operator;

/// Tells the operator that their location change turned the image's auto tiering off.
fn note_ended_auto(reply: &mut Value, ended: bool) {
    if ended {
        reply["tiering"] = json!(
            "manual (was auto: a location change pins the copies; \
                                  image set --tier auto hands them back to the node)"
        );
    }
}

/// Why a location change was refused or could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelocateError {
    #[error("node '{0}' is neither this node nor a peer")]
    UnknownNode(NodeId),
    /// The image is not owned here, or the range does not fit it.
    #[error(transparent)]
    Refused(Box<super::DaemonError>),
    /// The metadata change was refused.
    #[error(transparent)]
    Placement(#[from] crate::placement::PlacementError),
    #[error("cannot start the fill: {0}")]
    Spawn(#[source] std::io::Error),
}

impl Daemon {
    /// Once this node takes the image over, its blocks move here in the background.
    pub(super) fn localize_on_take_over(&self, disk: &Arc<Disk>) {
        let (disk_bg, peers) = (disk.clone(), self.peers.clone());
        disk.on_take_over(Box::new(move || {
            // A stripe is the operator's choice of where blocks live: gathering them on the
            // new owner would undo it (and fill one node with the whole image).
            if disk_bg.meta().stripe.is_some() {
                return log::info!(
                    "image {}: striped, so its blocks stay on the stripe's members",
                    disk_bg.name()
                );
            }
            let spawned = std::thread::Builder::new()
                .name("localize".into())
                .spawn(move || crate::ownership::localize(disk_bg, peers));
            if let Err(e) = spawned {
                log::error!("cannot start moving the blocks here: {e}");
            }
        }));
    }

    pub(super) fn copies<'a>(&'a self, disk: &'a Disk) -> DiskCopies<'a> {
        DiskCopies {
            disk,
            peers: &self.peers,
        }
    }

    pub(super) fn location_add(
        &self,
        name: &ImageName,
        blocks: Option<BlockRange>,
        at: &Placement,
        replace: Option<&Placement>,
    ) -> Result<Value, RelocateError> {
        let disk = self
            .owned_disk(name)
            .map_err(|e| RelocateError::Refused(Box::new(e)))?;
        if !self.knows(&at.node) {
            return Err(RelocateError::UnknownNode(at.node.clone()));
        }
        let range = placement::range_of(&disk, blocks)?;
        // The operator's placement wins: an auto image stops moving once this change is made
        // (see `tiering`), and no move is half-way meanwhile.
        let moves = disk.tiering().lock_moves();
        // The new holder learns of its copy from etcd (a request for a block its view does
        // not place there yet makes it look).
        let added = match replace {
            Some(from) => placement::replace(&disk, range, from, at)?,
            None => placement::add(&disk, range, at)?,
        };
        let ended_auto = end_auto_for_operator(&disk)?;
        drop(moves);
        match replace {
            Some(from) => log::info!(
                "image {name}: copy at {at} added to {added} blocks of {range} in place of \
                 {from}; filling"
            ),
            None => {
                log::info!("image {name}: copy at {at} added to {added} blocks of {range}; filling")
            }
        }
        let (disk_bg, peers) = (disk.clone(), self.peers.clone());
        std::thread::Builder::new()
            .name(format!("fill-{name}"))
            .spawn(move || {
                let copies = DiskCopies {
                    disk: &disk_bg,
                    peers: &peers,
                };
                match sync::sync(&disk_bg, &copies, range, None, &mut |_, _| {}) {
                    Ok(report) => log::info!(
                        "image {}: fill of {range}: {} in sync, {} copied, {} left",
                        disk_bg.name(),
                        report.synced,
                        report.copied,
                        report.left
                    ),
                    Err(e) => log::error!("image {}: fill of {range} failed: {e}", disk_bg.name()),
                }
            })
            .map_err(RelocateError::Spawn)?;
        let stripe = disk.meta().stripe.as_ref().map(crate::stripe::Stripe::json);
        let mut reply = json!({"image": name, "at": at, "blocks": range, "added": added,
                               "replaced": replace, "stripe": stripe});
        note_ended_auto(&mut reply, ended_auto);
        Ok(reply)
    }

    pub(super) fn location_rm(
        &self,
        name: &ImageName,
        blocks: Option<BlockRange>,
        at: &Placement,
    ) -> Result<Value, RelocateError> {
        let disk = self
            .owned_disk(name)
            .map_err(|e| RelocateError::Refused(Box::new(e)))?;
        let range = placement::range_of(&disk, blocks)?;
        let moves = disk.tiering().lock_moves();
        // Waits for a resync in progress: one that copied to this copy must not commit it
        // after it was removed (and perhaps added again).
        let removed = {
            let _no_resync = disk.resync_lock();
            placement::remove(&disk, range, at)?
        };
        let ended_auto = end_auto_for_operator(&disk)?;
        drop(moves);
        if at.node == self.config.node {
            for &block in &removed {
                if let Err(e) = disk.blocks().drop_copy(at.tier, block) {
                    log::warn!("image {name}: block {block}: cannot free the removed copy: {e}");
                }
            }
        }
        // Another node sees its copy go in etcd and frees the files itself, also when it comes
        // back after being down.
        log::info!(
            "image {name}: copy at {at} removed from {} blocks",
            removed.len()
        );
        let stripe = disk.meta().stripe.as_ref().map(crate::stripe::Stripe::json);
        let mut reply = json!({"image": name, "at": at, "blocks": range,
                               "removed": removed.len(), "stripe": stripe});
        note_ended_auto(&mut reply, ended_auto);
        Ok(reply)
    }
}
