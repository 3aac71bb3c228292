//! The daemon's state: the images of this node, each opened as a disk and exported on its
//! socket. Control actions are applied here, one owner for every change to that state.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::cluster::Peers;
pub use crate::config::Config;
use crate::control::protocol::Request;
use crate::copies::DiskCopies;
use crate::disk::Disk;
use crate::export::{socket_path, Export};
use crate::image::meta::{self, SECTOR_SIZE};
use crate::image::{BlockRange, ImageMeta, ImageName, Location, NodeId, Placement, Tier};
use crate::peer::{ClusterKey, Request as PeerRequest};
use crate::placement;
use crate::replica::sync;
use crate::route;

struct Entry {
    disk: Arc<Disk>,
    /// None while an import fills the image: no frontend may see it half-written.
    export: Option<Export>,
}

pub struct Daemon {
    config: Config,
    images: Mutex<BTreeMap<ImageName, Entry>>,
    peers: Arc<Peers>,
}

/// How often an import or export reports progress, in blocks.
const PROGRESS_EVERY: u64 = 16;

pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

impl Daemon {
    /// Loads and exports every image found in the metadata directory. An image whose
    /// metadata cannot be read is logged and left alone; the others are served.
    pub fn start(config: Config, key: Option<&ClusterKey>) -> io::Result<Daemon> {
        let meta_dir = config.meta_dir();
        fs::create_dir_all(&meta_dir)?;
        let daemon = Daemon {
            peers: Arc::new(Peers::new(&config, key)),
            config,
            images: Mutex::new(BTreeMap::new()),
        };
        let names = meta::list(&meta_dir).map_err(io::Error::other)?;
        for name in names {
            match ImageMeta::load(&meta_dir, &name) {
                Ok(meta) => {
                    if let Err(e) = daemon.open_and_export(meta) {
                        log::error!("image {name}: cannot serve: {e}");
                    }
                }
                Err(e) => log::error!("image {name}: skipped: {e}"),
            }
        }
        Ok(daemon)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ImageName, Entry>> {
        self.images.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_and_export(&self, meta: ImageMeta) -> io::Result<()> {
        let name = meta.name.clone();
        let (disk, changed) = Disk::open(
            meta,
            &self.config.dirs,
            self.config.node.clone(),
            self.config.meta_dir(),
        );
        if changed {
            disk.meta()
                .save(&self.config.meta_dir())
                .map_err(io::Error::other)?;
        }
        // Only the owner exports an image; other nodes hold copies of its blocks for it.
        let export = if disk.meta().owner == self.config.node {
            Some(self.export(&disk)?)
        } else {
            None
        };
        self.lock().insert(name, Entry { disk, export });
        Ok(())
    }

    /// Stops exporting an image whose ownership moved to `to`.
    fn fence(&self, name: &ImageName, to: &NodeId) {
        let export = self.lock().get_mut(name).and_then(|e| e.export.take());
        log::warn!("image {name}: ownership moved to {to}; no longer exported here");
        if let Some(export) = export {
            export.stop();
        }
    }

    /// Prepares this node to take over an image owned by `from` (live migration): fetches
    /// its metadata and exports its socket here, in standby. Ownership moves when a guest
    /// here starts using the disk (see `ownership::take_over`); until then `from` owns it.
    fn adopt(&self, name: &ImageName, from: &NodeId) -> Result<Value, String> {
        if self
            .find(name)
            .is_some_and(|d| d.meta().owner == self.config.node)
        {
            return Err(format!("image {name} is already owned by this node"));
        }
        let json = match self.peers.call_wait(
            from,
            PeerRequest::Meta {
                image: name.clone(),
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
        let (disk_bg, peers) = (disk.clone(), self.peers.clone());
        disk.on_take_over(Box::new(move || {
            let spawned = std::thread::Builder::new()
                .name("localize".into())
                .spawn(move || crate::ownership::localize(disk_bg, peers));
            if let Err(e) = spawned {
                log::error!("cannot start moving the blocks here: {e}");
            }
        }));
        self.publish(&disk)?;
        log::info!("image {name}: adopted from {from}, exported here in standby");
        Ok(json!({"image": name, "from": from, "socket": socket_path(&self.config.run_dir, name)}))
    }

    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Any image this node knows, owned or held.
    pub fn find(&self, name: &ImageName) -> Option<Arc<Disk>> {
        self.lock().get(name).map(|e| e.disk.clone())
    }

    /// The owner of `meta.name` tells this node it holds copies: remember the image (durably)
    /// so its blocks are served, also after a restart.
    pub fn hold(&self, from: &NodeId, meta: ImageMeta) -> Result<(), String> {
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
            crate::store::BlockFiles::open(&self.config.dirs, tier, &meta.name)
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

    fn export(&self, disk: &Arc<Disk>) -> io::Result<Export> {
        let socket = socket_path(&self.config.run_dir, disk.name());
        Export::start(
            disk.clone(),
            socket,
            self.config.use_uring,
            self.peers.clone(),
        )
    }

    /// Applies one control request.
    pub fn apply(&self, request: Request, progress: Progress) -> Result<Value, String> {
        match request {
            Request::ImageCreate {
                name,
                size,
                block_size,
                tier,
                read_only,
                at,
            } => {
                let disk = self.create(name, size, block_size, tier, read_only, &at)?;
                self.publish(&disk)?;
                Ok(self.summary(&disk))
            }
            Request::ImageList => Ok(Value::Array(
                self.lock()
                    .values()
                    .map(|e| self.summary(&e.disk))
                    .collect(),
            )),
            Request::ImageInfo { name } => self.info(&name),
            Request::ImageRm { name } => self.remove(&name).map(|()| json!({"removed": name})),
            Request::ImageImport {
                name,
                path,
                block_size,
                tier,
            } => self.import(name, Path::new(&path), block_size, tier, progress),
            Request::LocationAdd { name, blocks, at } => self.location_add(&name, blocks, &at),
            Request::LocationRm { name, blocks, at } => self.location_rm(&name, blocks, &at),
            Request::Sync { name, blocks, rate } => {
                let disk = self.disk(&name)?;
                let range = placement::range_of(&disk, blocks)?;
                let copies = self.copies(&disk);
                let report =
                    sync::sync(&disk, &copies, range, rate, progress).map_err(|e| e.to_string())?;
                Ok(json!(report))
            }
            Request::Stats { name } => self.stats(name.as_ref()),
            Request::ImageAdopt { name, from } => self.adopt(&name, &from),
            Request::ImageExport { name, path } => {
                let disk = self.disk(&name)?;
                export_raw(&disk, Path::new(&path), progress)
                    .map_err(|e| format!("cannot export to {path}: {e}"))?;
                Ok(json!({"exported": name, "path": path}))
            }
        }
    }

    /// Per-image and per-peer metrics as JSON.
    fn stats(&self, name: Option<&ImageName>) -> Result<Value, String> {
        if let Some(name) = name {
            let disk = self.disk(name)?;
            return Ok(disk.metrics().json(disk.out_of_sync_copies()));
        }
        let images: serde_json::Map<String, Value> = self
            .lock()
            .iter()
            .map(|(n, e)| {
                let m = e.disk.metrics().json(e.disk.out_of_sync_copies());
                (n.to_string(), m)
            })
            .collect();
        let failures = self.peers.failures();
        let peers: serde_json::Map<String, Value> = self
            .peers
            .metrics()
            .map(|(id, m)| (id.to_string(), m.json(failures.is_failed(id))))
            .collect();
        Ok(json!({"node": self.config.node, "images": images, "peers": peers}))
    }

    /// The same metrics in the Prometheus text format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for (name, entry) in self.lock().iter() {
            let disk = &entry.disk;
            disk.metrics()
                .prometheus(&mut out, name.as_str(), disk.out_of_sync_copies());
        }
        let failures = self.peers.failures();
        for (id, m) in self.peers.metrics() {
            m.prometheus(&mut out, id.as_str(), failures.is_failed(id));
        }
        out
    }

    fn copies<'a>(&'a self, disk: &'a Disk) -> DiskCopies<'a> {
        DiskCopies {
            disk,
            peers: &self.peers,
        }
    }

    fn location_add(
        &self,
        name: &ImageName,
        blocks: Option<BlockRange>,
        at: &Placement,
    ) -> Result<Value, String> {
        let disk = self.disk(name)?;
        if !self.config.knows(&at.node) {
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

    fn location_rm(
        &self,
        name: &ImageName,
        blocks: Option<BlockRange>,
        at: &Placement,
    ) -> Result<Value, String> {
        let disk = self.disk(name)?;
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
        } else if !removed.is_empty() {
            let release = PeerRequest::Release {
                image: name.clone(),
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

    fn disk(&self, name: &ImageName) -> Result<Arc<Disk>, String> {
        self.lock()
            .get(name)
            .map(|e| e.disk.clone())
            .ok_or_else(|| format!("no image named '{name}'"))
    }

    /// Creates an image, unexported: the caller publishes it once it is ready.
    fn create(
        &self,
        name: ImageName,
        size: u64,
        block_size: u64,
        tier: Tier,
        read_only: bool,
        at: &[Placement],
    ) -> Result<Arc<Disk>, String> {
        let mut images = self.lock();
        if images.contains_key(&name) {
            return Err(format!("image '{name}' already exists"));
        }
        let locations = self.placements(tier, at)?;
        let meta = ImageMeta::new(
            name.clone(),
            self.config.node.clone(),
            size,
            block_size,
            read_only,
            locations,
        )
        .map_err(|e| e.to_string())?;
        let (disk, _) = {
            let files = crate::store::BlockFiles::open(&self.config.dirs, tier, &name);
            files
                .create_dir()
                .map_err(|e| format!("cannot create {}: {e}", files.dir().display()))?;
            self.tell_holders(&meta, &meta.table.nodes())?;
            meta.save(&self.config.meta_dir())
                .map_err(|e| e.to_string())?;
            Disk::open(
                meta,
                &self.config.dirs,
                self.config.node.clone(),
                self.config.meta_dir(),
            )
        };
        images.insert(
            name.clone(),
            Entry {
                disk: disk.clone(),
                export: None,
            },
        );
        log::info!("image {name}: created, {size} bytes in blocks of {block_size} on {tier}");
        Ok(disk)
    }

    /// Sends the image's metadata to the other nodes in `nodes` (those that hold copies), so
    /// they serve its blocks.
    fn tell_holders(&self, meta: &ImageMeta, nodes: &[NodeId]) -> Result<(), String> {
        let json = serde_json::to_vec(&meta.to_file()).map_err(|e| e.to_string())?;
        for node in nodes.iter().filter(|n| **n != self.config.node) {
            let hold = PeerRequest::Hold {
                image: meta.name.clone(),
                meta_json: json.clone(),
            };
            self.peers
                .call_ok(node, hold)
                .map_err(|e| format!("cannot place copies on {node}: {e}"))?;
        }
        Ok(())
    }

    /// The copies a new image's blocks get: `at`, or this node on `tier`. Every copy starts in
    /// sync: an unwritten block reads as zeros everywhere.
    fn placements(&self, tier: Tier, at: &[Placement]) -> Result<Vec<Location>, String> {
        let me = Placement {
            node: self.config.node.clone(),
            tier,
        };
        let at = if at.is_empty() {
            std::slice::from_ref(&me)
        } else {
            at
        };
        let mut locations: Vec<Location> = Vec::new();
        for placement in at {
            if !self.config.knows(&placement.node) {
                return Err(format!(
                    "node '{}' is neither this node nor a peer",
                    placement.node
                ));
            }
            if locations.iter().any(|l| l.at(placement)) {
                return Err(format!("{placement} is given twice"));
            }
            locations.push(Location {
                node: placement.node.clone(),
                tier: placement.tier,
                synced: true,
            });
        }
        Ok(locations)
    }

    /// Exports a created image on its socket.
    fn publish(&self, disk: &Arc<Disk>) -> Result<(), String> {
        let export = self
            .export(disk)
            .map_err(|e| format!("cannot export image '{}': {e}", disk.name()))?;
        if let Some(entry) = self.lock().get_mut(disk.name()) {
            entry.export = Some(export);
        }
        Ok(())
    }

    fn summary(&self, disk: &Disk) -> Value {
        let meta = disk.meta();
        json!({
            "name": meta.name,
            "size": meta.size,
            "block_size": meta.block_size,
            "tier": meta.tier,
            "read_only": meta.read_only,
            "in_use": disk.in_use(),
            "socket": socket_path(&self.config.run_dir, &meta.name),
        })
    }

    /// The UKAI metadata shape, extended: one entry per block with its locations.
    fn info(&self, name: &ImageName) -> Result<Value, String> {
        let disk = self.disk(name)?;
        let used = disk.used_bytes().map_err(|e| e.to_string())?;
        let mut value = self.summary(&disk);
        let meta = disk.meta();
        let blocks: Vec<Value> = (0..meta.blocks())
            .map(|index| {
                json!({"index": index, "locations": meta.table.locations(index).unwrap_or(&[])})
            })
            .collect();
        value["used_size"] = json!(used);
        value["blocks"] = Value::Array(blocks);
        Ok(value)
    }

    fn remove(&self, name: &ImageName) -> Result<(), String> {
        let entry = {
            let mut images = self.lock();
            let entry = images
                .get(name)
                .ok_or_else(|| format!("no image named '{name}'"))?;
            if entry.disk.in_use() {
                return Err(format!(
                    "image '{name}' is in use by a frontend; stop the VM first"
                ));
            }
            images.remove(name).expect("checked above")
        };
        if let Some(export) = entry.export {
            export.stop();
        }
        entry.disk.mark_removed();
        ImageMeta::remove(&self.config.meta_dir(), name).map_err(|e| e.to_string())?;
        for tier in [Tier::Ram, Tier::Volume] {
            entry
                .disk
                .files(tier)
                .remove_all()
                .map_err(|e| format!("cannot remove block files: {e}"))?;
        }
        log::info!("image {name}: removed");
        Ok(())
    }

    fn import(
        &self,
        name: ImageName,
        path: &Path,
        block_size: u64,
        tier: Tier,
        progress: Progress,
    ) -> Result<Value, String> {
        let mut source =
            File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let len = source.metadata().map_err(|e| e.to_string())?.len();
        let size = len.div_ceil(SECTOR_SIZE).max(1) * SECTOR_SIZE;
        let disk = self.create(name.clone(), size, block_size, tier, false, &[])?;
        let claim = disk.claim().ok_or("image is busy")?;
        let copied = import_raw(&disk, &mut source, progress);
        drop(claim);
        if let Err(e) = copied {
            let _ = self.remove(&name);
            return Err(format!("cannot import {}: {e}", path.display()));
        }
        disk.sync_all().map_err(|e| e.to_string())?;
        self.publish(&disk)?;
        Ok(self.summary(&disk))
    }

    /// Stops every export (draining its requests), syncs and saves every image. Called on
    /// SIGTERM; the process exits afterwards.
    pub fn shutdown(&self) {
        let entries: Vec<Entry> = std::mem::take(&mut *self.lock()).into_values().collect();
        for entry in entries {
            if let Some(export) = entry.export {
                export.stop();
            }
            let name = entry.disk.name().clone();
            if let Err(e) = entry.disk.sync_all() {
                log::error!("image {name}: sync at shutdown failed: {e}");
            }
            if let Err(e) = entry.disk.meta().save(&self.config.meta_dir()) {
                log::error!("image {name}: saving metadata at shutdown failed: {e}");
            }
        }
    }
}

/// Copies a raw file into the image's blocks, skipping all-zero blocks so the image stays thin.
fn import_raw(disk: &Disk, source: &mut File, progress: Progress) -> io::Result<()> {
    let (blocks, block_size) = {
        let meta = disk.meta();
        (meta.blocks(), meta.block_size)
    };
    let mut buf = vec![0u8; block_size as usize];
    for block in 0..blocks {
        let n = read_full(source, &mut buf)?;
        if buf[..n].iter().any(|&b| b != 0) {
            let tier = local_tier(disk, block)?;
            disk.files(tier)
                .for_write(block)?
                .write_all_at(&buf[..n], 0)?;
        }
        if block % PROGRESS_EVERY == 0 || block + 1 == blocks {
            progress(block + 1, blocks);
        }
    }
    Ok(())
}

/// Writes the image to a raw file, leaving holes where the image has none of its data.
fn export_raw(disk: &Disk, path: &Path, progress: Progress) -> io::Result<()> {
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let (blocks, block_size, size) = {
        let meta = disk.meta();
        (meta.blocks(), meta.block_size, meta.size)
    };
    out.set_len(size)?;
    let mut buf = vec![0u8; block_size as usize];
    for block in 0..blocks {
        let tier = local_tier(disk, block)?;
        if let Some(file) = disk.files(tier).for_read(block)? {
            let len = block_size.min(size - block * block_size) as usize;
            let n = read_full_at(&file, &mut buf[..len])?;
            buf[n..len].fill(0);
            if buf[..len].iter().any(|&b| b != 0) {
                out.write_all_at(&buf[..len], block * block_size)?;
            }
        }
        if block % PROGRESS_EVERY == 0 || block + 1 == blocks {
            progress(block + 1, blocks);
        }
    }
    out.sync_all()
}

fn local_tier(disk: &Disk, block: u64) -> io::Result<Tier> {
    let meta = disk.meta();
    meta.table
        .locations(block)
        .and_then(|l| route::local_copy(l, disk.me()))
        .ok_or_else(|| io::Error::other(format!("block {block} has no in-sync copy here")))
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(source: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    buf[n..].fill(0);
    Ok(n)
}

fn read_full_at(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
