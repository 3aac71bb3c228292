//! What this node does for its peers: serve the copies it holds (read, write, flush, discard,
//! checksums), and learn which copies it holds (hold, release). Every request is checked
//! against this node's metadata: a peer touches only blocks this node holds for that image.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::copies::block_digest;
use crate::daemon::Daemon;
use crate::disk::Disk;
use crate::image::{NodeId, Tier};
use crate::peer::{code, ImageRef, PeerHandler, Request, Response};
use crate::store::read_full_at;

pub struct PeerService {
    daemon: Arc<Daemon>,
}

impl PeerService {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        PeerService { daemon }
    }

    /// The disk of `image`, once the request's epoch is found current: a request from an
    /// owner that has since been replaced is refused, whatever it asks.
    fn disk(&self, image: &ImageRef) -> Result<Arc<Disk>, Response> {
        let shared = self.daemon.is_shared();
        let behind = |d: &Arc<Disk>| d.meta().generation < image.epoch;
        if shared && self.daemon.find(&image.name).is_none_or(|d| behind(&d)) {
            // The sender acts under an epoch this node has not seen yet: etcd decides.
            self.daemon.refresh(&image.name);
        }
        let disk = self
            .daemon
            .find(&image.name)
            .ok_or_else(|| refuse(code::NOT_FOUND, format!("no image {} here", image.name)))?;
        if shared && behind(&disk) {
            return Err(refuse(
                code::STALE_EPOCH,
                format!("{image} is newer than the image's epoch in etcd"),
            ));
        }
        disk.admit_epoch(image.epoch).map_err(|newest| {
            refuse(
                code::STALE_EPOCH,
                format!("{image} is older than epoch {newest}: the sender no longer owns it"),
            )
        })?;
        Ok(disk)
    }

    /// The disk, after checking this node holds every block of `blocks` on `tier`.
    fn held_range(
        &self,
        image: &ImageRef,
        tier: Tier,
        blocks: crate::image::BlockRange,
    ) -> Result<(Arc<Disk>, crate::image::BlockRange), Response> {
        let disk = self.disk(image)?;
        let blocks = blocks
            .within(disk.meta().blocks())
            .map_err(|e| refuse(code::INVALID, e.to_string()))?;
        {
            let meta = disk.meta();
            for extent in meta.table.extents() {
                if extent.blocks.end() <= blocks.start() || extent.blocks.start() >= blocks.end() {
                    continue;
                }
                if !extent
                    .locations
                    .iter()
                    .any(|l| &l.node == disk.me() && l.tier == tier)
                {
                    return Err(refuse(
                        code::NOT_HELD,
                        format!("blocks {} are not held here on {tier}", extent.blocks),
                    ));
                }
            }
        }
        Ok((disk, blocks))
    }

    /// The disk, after checking this node holds `block` on `tier` and the span fits in it.
    /// With etcd, a block this node's view does not place here is looked up there first (the
    /// owner may have just placed it).
    fn held(
        &self,
        image: &ImageRef,
        tier: Tier,
        block: u64,
        offset: u32,
        len: u64,
    ) -> Result<Arc<Disk>, Response> {
        match self.held_in_view(image, tier, block, offset, len) {
            Err(Response::Error { code: c, .. })
                if c == code::NOT_HELD && self.daemon.is_shared() =>
            {
                self.daemon.refresh(&image.name);
                self.held_in_view(image, tier, block, offset, len)
            }
            other => other,
        }
    }

    fn held_in_view(
        &self,
        image: &ImageRef,
        tier: Tier,
        block: u64,
        offset: u32,
        len: u64,
    ) -> Result<Arc<Disk>, Response> {
        let disk = self.disk(image)?;
        {
            let meta = disk.meta();
            let Some(locations) = meta.table.locations(block) else {
                return Err(refuse(
                    code::INVALID,
                    format!("block {block} is past the end"),
                ));
            };
            if !locations
                .iter()
                .any(|l| &l.node == disk.me() && l.tier == tier)
            {
                return Err(refuse(
                    code::NOT_HELD,
                    format!("block {block} is not held here on {tier}"),
                ));
            }
            if u64::from(offset) + len > meta.block_len(block) {
                return Err(refuse(code::INVALID, "span runs past the block".into()));
            }
        }
        Ok(disk)
    }

    /// Whether any of `blocks` is a lost copy the owner has not marked out of sync yet; asks
    /// etcd before saying so (the owner may have just marked it).
    fn still_lost(&self, disk: &Disk, tier: Tier, blocks: &[u64]) -> bool {
        let lost = |d: &Disk| blocks.iter().any(|&b| d.is_lost(tier, b));
        if !lost(disk) {
            return false;
        }
        self.daemon.refresh(disk.name());
        lost(disk)
    }

    /// Refuses a change older than one already applied to the block (see `ImageRef::stamp`).
    fn newest_change(
        &self,
        disk: &Disk,
        image: &ImageRef,
        tier: Tier,
        block: u64,
    ) -> Result<(), Response> {
        if disk.admit_change(tier, block, image.epoch, image.stamp) {
            return Ok(());
        }
        Err(refuse(
            code::SUPERSEDED,
            format!("block {block}: a newer change was applied here already"),
        ))
    }

    /// Holds the image's epoch gate for a write: refused if a newer epoch came meanwhile.
    fn gate<'d>(
        &self,
        disk: &'d Disk,
        image: &ImageRef,
    ) -> Result<std::sync::RwLockReadGuard<'d, ()>, Response> {
        disk.enter_epoch(image.epoch).map_err(|newest| {
            refuse(
                code::STALE_EPOCH,
                format!("{image} is older than epoch {newest}: the sender no longer owns it"),
            )
        })
    }

    fn serve(&self, request: Request) -> Result<Response, Response> {
        match request {
            Request::Read {
                image,
                tier,
                block,
                offset,
                len,
            } => {
                let disk = self.held(&image, tier, block, offset, u64::from(len))?;
                if self.still_lost(&disk, tier, &[block]) {
                    return Err(refuse(
                        code::LOST,
                        format!("block {block}: this node's copy on {tier} was lost (restart after a reboot); its owner has not marked it out of sync yet"),
                    ));
                }
                let mut data = vec![0u8; len as usize];
                if let Some(file) = disk.files(tier).for_read(block).map_err(io)? {
                    read_full_at(&file, &mut data, u64::from(offset)).map_err(io)?;
                }
                Ok(Response::Data(data))
            }
            Request::Write {
                image,
                tier,
                block,
                offset,
                data,
            } => {
                let disk = self.held(&image, tier, block, offset, data.len() as u64)?;
                let _gate = self.gate(&disk, &image)?;
                self.newest_change(&disk, &image, tier, block)?;
                let file = disk.files(tier).for_write(block).map_err(io)?;
                file.write_all_at(&data, u64::from(offset)).map_err(io)?;
                if tier == Tier::Volume {
                    disk.dirty().mark(block, &file);
                }
                Ok(Response::Ok)
            }
            Request::Flush { image } => {
                self.disk(&image)?.sync_all().map_err(io)?;
                Ok(Response::Ok)
            }
            Request::Discard {
                image,
                tier,
                block,
                offset,
                len,
            } => {
                let disk = self.held(&image, tier, block, offset, u64::from(len))?;
                let _gate = self.gate(&disk, &image)?;
                self.newest_change(&disk, &image, tier, block)?;
                let files = disk.files(tier);
                let whole = offset == 0 && u64::from(len) == disk.meta().block_len(block);
                if whole {
                    files.drop_block(block).map_err(io)?;
                } else {
                    files
                        .punch(block, u64::from(offset), u64::from(len))
                        .map_err(io)?;
                    // A hole is a change like a write: the next flush makes it durable.
                    if tier == Tier::Volume {
                        if let Some(file) = files.for_read(block).map_err(io)? {
                            disk.dirty().mark(block, &file);
                        }
                    }
                }
                Ok(Response::Ok)
            }
            Request::Checksums {
                image,
                tier,
                blocks,
            } => {
                let (disk, blocks) = self.held_range(&image, tier, blocks)?;
                let all: Vec<u64> = blocks.iter().collect();
                if self.still_lost(&disk, tier, &all) {
                    return Err(refuse(
                        code::LOST,
                        format!("blocks {blocks}: this node's copy on {tier} was lost"),
                    ));
                }
                let mut sums = Vec::with_capacity(blocks.len() as usize);
                for block in blocks.iter() {
                    sums.push(block_digest(&disk, tier, block).map_err(io)?);
                }
                Ok(Response::Checksums(sums))
            }
            // Metadata is etcd's: an owner never pushes it (protocol version 1 did).
            Request::Hold { .. } | Request::Release { .. } => Err(refuse(
                code::INVALID,
                "this node follows etcd: copies are not pushed or released by peers".into(),
            )),
            Request::Meta { image } => {
                // Reading metadata changes nothing: no epoch check.
                let disk = self.daemon.find(&image.name).ok_or_else(|| {
                    refuse(code::NOT_FOUND, format!("no image {} here", image.name))
                })?;
                let json = serde_json::to_vec(&disk.meta().to_file())
                    .map_err(|e| refuse(code::INTERNAL, e.to_string()))?;
                Ok(Response::MetaJson(json))
            }
        }
    }
}

impl PeerHandler for PeerService {
    fn handle(&self, _from: &NodeId, request: Request) -> Response {
        self.serve(request).unwrap_or_else(|refusal| refusal)
    }
}

fn refuse(code: u16, message: String) -> Response {
    Response::Error { code, message }
}

fn io(e: std::io::Error) -> Response {
    refuse(code::IO, e.to_string())
}
