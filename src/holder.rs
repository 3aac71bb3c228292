//! This node as a holder of copies: answers peers' requests for the copies held here (read,
//! write, flush, discard, checksums) through the image's block-I/O API. Every request is
//! checked against this node's metadata: a peer touches only blocks this node holds for that
//! image. (`serve.rs` starts the daemon; this file answers peers.)

use std::sync::Arc;

use crate::daemon::Daemon;
use crate::disk::Disk;
use crate::image::{ImageName, NodeId, Tier};
use crate::peer::{code, ImageRef, PeerHandler, Request, Response};
use crate::store::BlockError;

/// What the holder needs of its node: the images it knows and the cluster's word on them.
/// The daemon in production; the simulation (`tests/owner_sim.rs`) gives each simulated node
/// one, so peer calls there are answered by this code and not a copy of it.
pub trait Holdings: Send + Sync {
    /// Whether the node follows etcd (a single node has no epochs to check).
    fn is_shared(&self) -> bool;
    /// Any image this node knows, owned or held.
    fn find(&self, name: &ImageName) -> Option<Arc<Disk>>;
    /// Reads `name` from etcd and puts this node in line with it (see `Daemon::refresh`).
    fn refresh(&self, name: &ImageName);
}

impl Holdings for Daemon {
    fn is_shared(&self) -> bool {
        Daemon::is_shared(self)
    }

    fn find(&self, name: &ImageName) -> Option<Arc<Disk>> {
        Daemon::find(self, name)
    }

    fn refresh(&self, name: &ImageName) {
        Daemon::refresh(self, name)
    }
}

/// Largest read or write answered on the peer server's reader thread. A bigger copy (up to a
/// 1 MiB chunk, a few hundred microseconds with its allocation) would hold up the requests
/// behind it on the connection; on a worker, several run at once.
const INLINE_MAX: usize = 64 << 10;

pub struct HolderService<H: Holdings = Daemon> {
    daemon: Arc<H>,
}

impl<H: Holdings> HolderService<H> {
    pub fn new(daemon: Arc<H>) -> Self {
        HolderService { daemon }
    }

    /// Answers one request (what [`PeerHandler::handle`] does for the peer server).
    pub fn answer(&self, request: Request) -> Response {
        self.serve(request).unwrap_or_else(|refusal| refusal)
    }

    /// Answers `request` if it is a RAM-tier read or write of at most [`INLINE_MAX`] bytes
    /// that this node's view settles by
    /// itself (image known at an epoch not older than the request's, block held here on the
    /// RAM tier, copy not lost): a memory copy with no etcd look-up, cheap enough for the peer
    /// server's reader thread. Anything else (the volume tier, control calls, and whatever
    /// may ask etcd) is handed back for a worker. A metadata change between this check and
    /// the answer may still make the answer ask etcd; that is rare and only slower.
    pub fn answer_inline(&self, request: Request) -> Result<Response, Request> {
        let cheap = match &request {
            Request::Read {
                image,
                tier: Tier::Ram,
                block,
                len,
                ..
            } => *len as usize <= INLINE_MAX && self.settled_here(image, *block),
            Request::Write {
                image,
                tier: Tier::Ram,
                block,
                data,
                ..
            } => data.len() <= INLINE_MAX && self.settled_here(image, *block),
            _ => false,
        };
        if cheap {
            Ok(self.answer(request))
        } else {
            Err(request)
        }
    }

    /// Whether this node's view alone answers a RAM-tier request for `block` of `image`:
    /// none of the checks in [`HolderService::serve`] would turn to etcd.
    fn settled_here(&self, image: &ImageRef, block: u64) -> bool {
        let Some(disk) = self.daemon.find(&image.name) else {
            return false;
        };
        let meta = disk.meta();
        if self.daemon.is_shared() && meta.generation < image.epoch {
            return false;
        }
        let held = meta.table.locations(block).is_some_and(|ls| {
            ls.iter()
                .any(|l| &l.node == disk.me() && l.tier == Tier::Ram)
        });
        drop(meta);
        held && !disk.is_lost(Tier::Ram, block)
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
    /// With etcd, a block this node's view does not place here, or that lies past its view's
    /// end, is looked up there first (the owner may have just placed it, or grown the image).
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
                if (c == code::NOT_HELD || c == code::INVALID) && self.daemon.is_shared() =>
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
        bytes: std::ops::Range<u64>,
    ) -> Result<(), Response> {
        if disk.admit_change(tier, block, image.epoch, image.stamp, bytes) {
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
                disk.blocks()
                    .read(tier, block, u64::from(offset), &mut data)
                    .map_err(io)?;
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
                let at = u64::from(offset);
                self.newest_change(&disk, &image, tier, block, at..at + data.len() as u64)?;
                disk.blocks()
                    .write(tier, block, u64::from(offset), &data)
                    .map_err(io)?;
                Ok(Response::Ok)
            }
            Request::Flush { image } => {
                self.disk(&image)?.blocks().flush().map_err(io)?;
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
                let at = u64::from(offset);
                self.newest_change(&disk, &image, tier, block, at..at + u64::from(len))?;
                disk.blocks()
                    .free(tier, block, u64::from(offset), u64::from(len))
                    .map_err(io)?;
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
                    sums.push(disk.blocks().digest(tier, block).map_err(io)?);
                }
                Ok(Response::Checksums(sums))
            }
            // Metadata is etcd's: an owner never pushes it (protocol version 1 did).
            Request::Hold { .. } | Request::Release { .. } => Err(refuse(
                code::INVALID,
                "this node follows etcd: copies are not pushed or released by peers".into(),
            )),
            // A heartbeat: answering proves this node's server reads, dispatches and answers.
            Request::Ping => Ok(Response::Ok),
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

impl<H: Holdings> PeerHandler for HolderService<H> {
    fn handle(&self, _from: &NodeId, request: Request) -> Response {
        self.answer(request)
    }

    fn handle_inline(&self, _from: &NodeId, request: Request) -> Result<Response, Request> {
        self.answer_inline(request)
    }
}

fn refuse(code: u16, message: String) -> Response {
    Response::Error { code, message }
}

/// A refusal for a failed block operation: a span outside its block is the sender's
/// mistake, anything else this node's storage failing.
fn io(e: BlockError) -> Response {
    let code = match e {
        BlockError::OutOfBlock { .. } => code::INVALID,
        _ => code::IO,
    };
    refuse(code, e.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Config;
    use crate::control::protocol::Request as Control;
    use crate::store::TierDirs;

    pub(crate) const BLOCK: u64 = 1 << 20;

    /// A single-node daemon with one 2-block image on the volume tier, and its service
    /// (which holds the daemon). Resync's tests use it too.
    pub(crate) fn setup() -> (tempfile::TempDir, HolderService, Arc<Disk>) {
        let root = tempfile::tempdir().unwrap();
        let config = Config {
            run_dir: root.path().join("run"),
            dirs: TierDirs {
                ram: root.path().join("ram"),
                volume: root.path().join("vol"),
            },
            node: "a".parse().unwrap(),
            use_uring: false,
            cluster: None,
            failure_timeout: std::time::Duration::from_secs(5),
            metrics_listen: None,
            socket_access: None,
            cache_budgets: Default::default(),
            tiering: Default::default(),
        };
        std::fs::create_dir_all(&config.run_dir).unwrap();
        let daemon = Arc::new(Daemon::start(config, None, None).unwrap());
        let create = Control::ImageCreate {
            name: "img".parse().unwrap(),
            size: 2 * BLOCK,
            block_size: BLOCK,
            tier: Tier::Volume,
            read_only: false,
            at: vec![],
            qos: Default::default(),
            stripe: None,
        };
        daemon.apply(create, &mut |_, _| {}).unwrap();
        let disk = daemon.find(&"img".parse().unwrap()).unwrap();
        (root, HolderService::new(daemon), disk)
    }

    pub(crate) fn daemon(service: &HolderService) -> &Daemon {
        &service.daemon
    }

    fn ok(service: &HolderService, request: Request) {
        match service.serve(request) {
            Ok(Response::Ok) => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }

    #[test]
    fn a_peer_write_and_a_partial_discard_are_synced_by_the_next_flush() {
        let (_root, service, disk) = setup();
        let image = disk.image_ref();
        let write = Request::Write {
            image: image.clone(),
            tier: Tier::Volume,
            block: 1,
            offset: 0,
            data: vec![5; 8192],
        };
        ok(&service, write);
        assert!(disk.blocks().is_dirty(1));
        ok(
            &service,
            Request::Flush {
                image: image.clone(),
            },
        );
        assert!(!disk.blocks().is_dirty(1));
        let discard = Request::Discard {
            image: image.clone(),
            tier: Tier::Volume,
            block: 1,
            offset: 4096,
            len: 4096,
        };
        ok(&service, discard);
        assert!(
            disk.blocks().is_dirty(1),
            "a peer's partial discard must be flushed"
        );
        let read = Request::Read {
            image,
            tier: Tier::Volume,
            block: 1,
            offset: 0,
            len: 8192,
        };
        let Ok(Response::Data(data)) = service.serve(read) else {
            panic!("the read failed");
        };
        assert!(data[..4096].iter().all(|&b| b == 5));
        assert!(data[4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_whole_block_discard_drops_the_file() {
        let (_root, service, disk) = setup();
        let image = disk.image_ref();
        let write = Request::Write {
            image: image.clone(),
            tier: Tier::Volume,
            block: 0,
            offset: 0,
            data: vec![1; 4096],
        };
        ok(&service, write);
        let discard = Request::Discard {
            image,
            tier: Tier::Volume,
            block: 0,
            offset: 0,
            len: BLOCK as u32,
        };
        ok(&service, discard);
        let blocks = disk.blocks();
        assert!(blocks.file_for_read(Tier::Volume, 0).unwrap().is_none());
        assert!(!blocks.is_dirty(0));
    }

    #[test]
    fn only_ram_tier_reads_and_writes_held_here_are_answered_inline() {
        let (_root, service, disk) = setup();
        let create = Control::ImageCreate {
            name: "fast".parse().unwrap(),
            size: 2 * BLOCK,
            block_size: BLOCK,
            tier: Tier::Ram,
            read_only: false,
            at: vec![],
            stripe: None,
            qos: Default::default(),
        };
        daemon(&service).apply(create, &mut |_, _| {}).unwrap();
        let fast = daemon(&service).find(&"fast".parse().unwrap()).unwrap();
        let write = |image: ImageRef, tier| Request::Write {
            image,
            tier,
            block: 1,
            offset: 0,
            data: vec![7; 4096],
        };
        let read = |image: ImageRef, tier| Request::Read {
            image,
            tier,
            block: 1,
            offset: 0,
            len: 4096,
        };
        assert!(matches!(
            service.answer_inline(write(fast.image_ref(), Tier::Ram)),
            Ok(Response::Ok)
        ));
        match service.answer_inline(read(fast.image_ref(), Tier::Ram)) {
            Ok(Response::Data(data)) => assert_eq!(data, vec![7; 4096]),
            other => panic!("unexpected answer {other:?}"),
        }
        // The volume tier, a tier not held, another image, a flush, a large read: handed
        // back as they came.
        let large = Request::Read {
            image: fast.image_ref(),
            tier: Tier::Ram,
            block: 0,
            offset: 0,
            len: INLINE_MAX as u32 + 1,
        };
        for request in [
            large,
            read(disk.image_ref(), Tier::Volume),
            read(disk.image_ref(), Tier::Ram),
            read(fast.image_ref(), Tier::Volume),
            write(ImageRef::new("gone".parse().unwrap(), 1), Tier::Ram),
            Request::Flush {
                image: fast.image_ref(),
            },
        ] {
            match service.answer_inline(request.clone()) {
                Err(back) => assert_eq!(back, request),
                Ok(answer) => panic!("{request:?} answered inline: {answer:?}"),
            }
        }
    }

    #[test]
    fn a_span_past_the_block_is_refused_as_invalid() {
        let (_root, service, disk) = setup();
        let write = Request::Write {
            image: disk.image_ref(),
            tier: Tier::Volume,
            block: 1,
            offset: (BLOCK - 2) as u32,
            data: vec![1; 4],
        };
        match service.serve(write) {
            Err(Response::Error { code: c, .. }) => assert_eq!(c, code::INVALID),
            other => panic!("unexpected answer {other:?}"),
        }
        assert!(!disk.blocks().is_dirty(1));
    }
}
