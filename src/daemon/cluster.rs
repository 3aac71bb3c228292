//! The images this node holds for others and the ones it moves: location changes, hold and
//! release on behalf of an owner, adoption and fencing for live migration.

use std::sync::Arc;

use serde_json::{json, Value};

use super::Daemon;
use crate::copies::DiskCopies;
use crate::disk::Disk;
use crate::export::socket_path;
use crate::image::{BlockRange, ImageMeta, ImageName, Location, NodeId, Placement, Tier};
use crate::peer::Request as PeerRequest;
use crate::placement;
use crate::replica::sync;

impl Daemon {
    /// Stops exporting an image whose ownership moved to `to`.
    pub(super) fn fence(&self, name: &ImageName, to: &NodeId) {
        let export = self.lock().get_mut(name).and_then(|e| e.export.take());
        log::warn!("image {name}: ownership moved to {to}; no longer exported here");
        if let Some(export) = export {
            export.stop();
        }
    }

    /// Prepares this node to take over an image owned by `from` (live migration): fetches
    /// its metadata and exports its socket here, in standby. Ownership moves when a guest
    /// here starts using the disk (see `ownership::take_over`); until then `from` owns it.
    pub(super) fn adopt(&self, name: &ImageName, from: &NodeId) -> Result<Value, String> {
        if self
            .find(name)
            .is_some_and(|d| d.meta().owner == self.config.node)
        {
            return Err(format!("image {name} is already owned by this node"));
        }
        let json = match self.peers.call_wait(
            from,
            PeerRequest::Meta {
                image: crate::peer::ImageRef::new(name.clone(), 0),
            },
        ) {
            Ok(crate::peer::Response::MetaJson(json)) => json,
            Ok(other) => return Err(format!("{from} answered {other:?}")),
            Err(e) => return Err(format!("{from}: {e}")),
        };
        let file: crate::image::meta::MetaFile =
            serde_json::from_slice(&json).map_err(|e| format!("bad metadata from {from}: {e}"))?;
        let meta = ImageMeta::from_file(file).map_err(|e| e.to_string())?;
        if &meta.owner != from {
            return Err(format!(
                "{from} does not own image {name} ({} does)",
                meta.owner
            ));
        }
        let disk = match self.find(name) {
            Some(disk) => {
                disk.update_meta(|known| {
                    *known = meta;
                    Ok(())
                })?;
                disk
            }
            None => {
                meta.save(&self.config.meta_dir())
                    .map_err(|e| e.to_string())?;
                self.open_and_export(meta).map_err(|e| e.to_string())?;
                self.find(name).ok_or("image vanished")?
            }
        };
        self.localize_on_take_over(&disk);
        self.publish(&disk)?;
        log::info!("image {name}: adopted from {from}, exported here in standby");
        Ok(json!({"image": name, "from": from, "socket": socket_path(&self.config.run_dir, name)}))
    }

    /// Once this node takes the image over, its blocks move here in the background.
    pub(super) fn localize_on_take_over(&self, disk: &Arc<Disk>) {
        let (disk_bg, peers) = (disk.clone(), self.peers.clone());
        disk.on_take_over(Box::new(move || {
            let spawned = std::thread::Builder::new()
                .name("localize".into())
                .spawn(move || crate::ownership::localize(disk_bg, peers));
            if let Err(e) = spawned {
                log::error!("cannot start moving the blocks here: {e}");
            }
        }));
    }

    /// The owner of `meta.name` tells this node it holds copies: remember the image (durably)
    /// so its blocks are served, also after a restart.
    pub fn hold(&self, from: &NodeId, meta: ImageMeta) -> Result<(), String> {
        if self.shared.is_some() {
            return Err("this node follows etcd: copies are not pushed to it".into());
        }
        if &meta.owner != from {
            return Err(format!("{from} does not own image {}", meta.name));
        }
        if meta.owner == self.config.node {
            return Err(format!("image {} is owned by this node", meta.name));
        }
        if let Some(disk) = self.find(&meta.name) {
            let (owner, generation) = {
                let known = disk.meta();
                (known.owner.clone(), known.generation)
            };
            let handover = meta.generation > generation;
            if owner != *from && !handover {
                return Err(format!(
                    "image {} is owned by {owner} (generation {generation}), not {from}",
                    meta.name
                ));
            }
            if meta.generation < generation {
                return Err(format!("stale metadata for image {}", meta.name));
            }
            disk.update_meta(|held| {
                *held = meta;
                Ok(())
            })?;
            if handover && owner == self.config.node {
                // This node was the owner: fenced from here on. Its guest has stopped (the
                // new owner only takes over when its own guest starts the device).
                self.fence(disk.name(), from);
            }
            return Ok(());
        }
        for tier in [Tier::Ram, Tier::Volume] {
            crate::store::BlockFiles::open(&self.config.dirs, tier, &meta.name, meta.id)
                .create_dir()
                .map_err(|e| format!("cannot create the block directory: {e}"))?;
        }
        meta.save(&self.config.meta_dir())
            .map_err(|e| e.to_string())?;
        log::info!("image {}: holding copies for {from}", meta.name);
        self.open_and_export(meta).map_err(|e| e.to_string())
    }

    /// The owner took this node's copy of `blocks` on `tier` away: free it, and forget the
    /// image when this node holds nothing of it any more.
    pub fn release(
        &self,
        from: &NodeId,
        name: &ImageName,
        tier: Tier,
        blocks: BlockRange,
    ) -> Result<(), String> {
        if self.shared.is_some() {
            return Err("this node follows etcd: copies are not released by push".into());
        }
        let disk = self.find(name).ok_or_else(|| format!("no image {name}"))?;
        if &disk.meta().owner != from {
            return Err(format!("{from} does not own image {name}"));
        }
        let me = Placement {
            node: self.config.node.clone(),
            tier,
        };
        let blocks = blocks
            .within(disk.meta().blocks())
            .map_err(|e| e.to_string())?;
        // A holder's copy of the metadata only answers "is this block held here"; it may lag
        // behind the owner's. A block left with no location gets the owner as a stand-in.
        disk.update_meta(|meta| {
            let stand_in = Location {
                node: meta.owner.clone(),
                tier: meta.tier,
                synced: true,
            };
            meta.table
                .update(blocks, |locations| {
                    locations.retain(|l| !l.at(&me));
                    if locations.is_empty() {
                        locations.push(stand_in.clone());
                    }
                })
                .map_err(|e| e.to_string())
        })?;
        for block in blocks.iter() {
            let _ = disk.files(tier).drop_block(block);
        }
        let holds_any = disk.meta().table.nodes().contains(&self.config.node);
        if !holds_any {
            self.lock().remove(name);
            ImageMeta::remove(&self.config.meta_dir(), name).map_err(|e| e.to_string())?;
            for tier in [Tier::Ram, Tier::Volume] {
                let _ = disk.files(tier).remove_all();
            }
            log::info!("image {name}: no copies held any more; forgotten");
        }
        Ok(())
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
    ) -> Result<Value, String> {
        let disk = self.owned_disk(name)?;
        if !self.knows(&at.node) {
            return Err(format!(
                "node '{}' is neither this node nor a peer",
                at.node
            ));
        }
        let range = placement::range_of(&disk, blocks)?;
        if at.node != self.config.node {
            // The new holder learns of the image first, so it serves the copy at once.
            let mut preview = disk.meta().clone();
            placement::add_to(&mut preview, range, at)?;
            self.tell_holders(&preview, std::slice::from_ref(&at.node))?;
        }
        let added = placement::add(&disk, range, at)?;
        log::info!("image {name}: copy at {at} added to {added} blocks of {range}; filling");
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
            .map_err(|e| format!("cannot start the fill: {e}"))?;
        Ok(json!({"image": name, "at": at, "blocks": range, "added": added}))
    }

    pub(super) fn location_rm(
        &self,
        name: &ImageName,
        blocks: Option<BlockRange>,
        at: &Placement,
    ) -> Result<Value, String> {
        let disk = self.owned_disk(name)?;
        let range = placement::range_of(&disk, blocks)?;
        // Waits for a resync in progress: one that copied to this copy must not commit it
        // after it was removed (and perhaps added again).
        let removed = {
            let _no_resync = disk.resync_lock();
            placement::remove(&disk, range, at)?
        };
        if at.node == self.config.node {
            let files = disk.files(at.tier);
            for &block in &removed {
                if let Err(e) = files.drop_block(block) {
                    log::warn!("image {name}: block {block}: cannot free the removed copy: {e}");
                }
            }
        } else if !removed.is_empty() && self.shared.is_none() {
            let release = PeerRequest::Release {
                image: disk.image_ref(),
                tier: at.tier,
                blocks: range,
            };
            if let Err(e) = self.peers.call_ok(&at.node, release) {
                log::warn!("image {name}: {at} keeps its removed copy's files: {e}");
            }
        }
        log::info!(
            "image {name}: copy at {at} removed from {} blocks",
            removed.len()
        );
        Ok(json!({"image": name, "at": at, "blocks": range, "removed": removed.len()}))
    }

    /// Sends the image's metadata to the other nodes in `nodes` (those that hold copies), so
    /// they serve its blocks.
    pub(super) fn tell_holders(&self, meta: &ImageMeta, nodes: &[NodeId]) -> Result<(), String> {
        if self.shared.is_some() {
            return Ok(()); // holders follow etcd
        }
        let json = serde_json::to_vec(&meta.to_file()).map_err(|e| e.to_string())?;
        for node in nodes.iter().filter(|n| **n != self.config.node) {
            let hold = PeerRequest::Hold {
                image: crate::peer::ImageRef::new(meta.name.clone(), meta.generation),
                meta_json: json.clone(),
            };
            self.peers
                .call_ok(node, hold)
                .map_err(|e| format!("cannot place copies on {node}: {e}"))?;
        }
        Ok(())
    }
}
