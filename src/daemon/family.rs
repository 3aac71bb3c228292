//! Snapshots, clones and flattening: the operations that make images from images, and the
//! rules that keep a chain whole (a parent outlives its children; a snapshot holds exactly
//! what its image held at one instant). The file-level mechanics are in `store` and `chain`.
//!
//! These run on a single node (the embedded metadata). A cluster refuses them for now: a
//! clone's copies read through the parent's copies on the same node, and placing, moving and
//! fencing that pair across nodes is not built yet.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Daemon, DaemonError, Entry, Progress, Shape};
use crate::chain::ParentBlocks;
use crate::disk::{Disk, FreezeAll};
use crate::image::id::parse_dir_name;
use crate::image::meta::{self, Parent};
use crate::image::{ImageId, ImageMeta, ImageName, Placement, Tier};
use crate::qos::QosLimits;
use crate::store::{BlockFiles, TierDirs};

/// How long a snapshot waits for the writes already started to finish before it gives up
/// (and lets the held writes go): a guest's writes are held at most this long.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// Blocks between progress reports of a flatten.
const PROGRESS_EVERY: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum FamilyError {
    #[error("snapshots and clones are not available with --etcd yet: a clone reads through its parent's copies on the same node, and moving that pair between nodes is not built")]
    Cluster,
    #[error("'{0}' is a snapshot: snapshot the image itself, or clone the snapshot first")]
    SnapshotOfSnapshot(ImageName),
    #[error("a snapshot needs a name of its own (IMAGE@SNAP is made from it): {0}")]
    BadSnapshotName(#[from] crate::image::name::NameError),
    #[error("{0} is named twice")]
    Twice(ImageName),
    #[error("image '{0}' is writable: snapshot it (image snapshot {0} SNAP) and clone {0}@SNAP, or clone an image created --read-only")]
    WritableSource(ImageName),
    #[error("'{0}' is a snapshot's name (IMAGE@SNAP): only `image snapshot` makes those")]
    SnapshotName(ImageName),
    #[error("writes already started on image '{0}' did not finish within {BARRIER_TIMEOUT:?}; nothing was taken")]
    Barrier(ImageName),
    #[error("image '{0}' is not a clone: it has nothing to flatten")]
    NotAClone(ImageName),
    #[error(
        "image '{0}' is read-only (a snapshot keeps its parent): clone it, and flatten the clone"
    )]
    ReadOnly(ImageName),
    #[error("image '{name}' has {children}: remove them first (or `image flatten` the clones)", children = list(.children))]
    HasChildren {
        name: ImageName,
        children: Vec<ImageName>,
    },
    #[error("the parent {parent} of image '{name}' is not on this node")]
    NoParent { name: ImageName, parent: Parent },
}

fn list(children: &[ImageName]) -> String {
    let names: Vec<String> = children.iter().map(|c| c.to_string()).collect();
    let kind = if children.len() == 1 {
        "a child"
    } else {
        "children"
    };
    format!("{kind}: {}", names.join(", "))
}

impl Daemon {
    pub(super) fn family_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.family.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn local_only(&self) -> Result<(), FamilyError> {
        match self.shared {
            Some(_) => Err(FamilyError::Cluster),
            None => Ok(()),
        }
    }

    /// `image snapshot NAME... SNAP`: every image's writes held at one barrier (those
    /// started finish first; reads go on), each image's block files hard-linked as
    /// `NAME@SNAP`, then the writes let go. The snapshot of a clone keeps the clone's parent.
    pub(super) fn snapshot(
        &self,
        names: &[ImageName],
        snap: &ImageName,
    ) -> Result<Value, DaemonError> {
        self.local_only()?;
        let _family = self.family_lock();
        let mut sources = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(FamilyError::Twice(name.clone()).into());
            }
            if name.is_snapshot() {
                return Err(FamilyError::SnapshotOfSnapshot(name.clone()).into());
            }
            let snap_name = name.snapshot(snap).map_err(FamilyError::BadSnapshotName)?;
            if self.find(&snap_name).is_some() {
                return Err(DaemonError::Exists(snap_name));
            }
            sources.push((self.owned_disk(name)?, snap_name));
        }
        // Most dirty files are synced, and most links made, before the barrier, so little is
        // left to hold it up.
        let ids: Vec<ImageId> = sources.iter().map(|_| ImageId::random()).collect();
        for ((disk, snap_name), &id) in sources.iter().zip(&ids) {
            disk.blocks().flush()?;
            if let Err(e) = prelink(&self.config.dirs, disk, snap_name, id) {
                for ((_, snap_name), &id) in sources.iter().zip(&ids) {
                    remove_links(&self.config.dirs, snap_name, id);
                }
                return Err(e);
            }
        }
        let started = Instant::now();
        let mut barrier: Vec<FreezeAll<'_>> = Vec::new();
        for (disk, _) in &sources {
            match disk.freeze_all(BARRIER_TIMEOUT) {
                Some(frozen) => barrier.push(frozen),
                None => {
                    drop(barrier);
                    for ((_, snap_name), &id) in sources.iter().zip(&ids) {
                        remove_links(&self.config.dirs, snap_name, id);
                    }
                    return Err(FamilyError::Barrier(disk.name().clone()).into());
                }
            }
        }
        let drained = started.elapsed();
        let mut prepared: Vec<(Arc<Disk>, ImageMeta, Vec<Arc<std::fs::File>>)> = Vec::new();
        let mut linked = Ok(());
        for ((disk, snap_name), &id) in sources.iter().zip(&ids) {
            // The metadata read and the files linked under one read lock: a location change
            // cannot drop a copy's files between the two.
            let meta = disk.meta();
            let (snapshot, snap_meta) = self.prepare_snapshot(&meta, snap_name, id);
            linked = link(disk, &snapshot);
            // Written since the last flush: they now hold the snapshot's bytes too, and the
            // image's next flush syncs the image's copies of them, not these.
            let dirty = disk.blocks().dirty_files();
            drop(meta);
            prepared.push((snapshot, snap_meta, dirty));
            if linked.is_err() {
                break;
            }
        }
        drop(barrier);
        let held = started.elapsed();
        if let Err(e) = linked {
            for ((_, snap_name), &id) in sources.iter().zip(&ids) {
                remove_links(&self.config.dirs, snap_name, id);
            }
            return Err(e);
        }
        // The snapshots exist from here: their files are synced and their metadata saved
        // after the barrier (a crash before leaves only linked files nobody names, removed at
        // the next start, and the image copies a block it shares with them before writing it).
        let mut made = Vec::new();
        for (snapshot, meta, dirty) in prepared {
            for file in dirty {
                file.sync_data()?;
            }
            for tier in [Tier::Ram, Tier::Volume] {
                snapshot.blocks().files(tier).sync_tree()?;
            }
            meta.save(&self.config.meta_dir())?;
            self.attach_parent(&snapshot)?;
            snapshot.cache().attach(self.caches.clone());
            self.lock().insert(
                meta.name.clone(),
                Entry {
                    disk: snapshot.clone(),
                    export: None,
                },
            );
            self.publish(&snapshot)?;
            log::info!(
                "image {}: snapshot taken; writes held {held:?} ({drained:?} for those in flight to finish)",
                meta.name
            );
            made.push(meta.name);
        }
        Ok(json!({
            "snapshots": made,
            "writes_held_us": held.as_micros() as u64,
        }))
    }

    /// A snapshot of an image whose metadata is `meta`, opened (its files not yet linked).
    fn prepare_snapshot(
        &self,
        meta: &ImageMeta,
        snap_name: &ImageName,
        id: ImageId,
    ) -> (Arc<Disk>, ImageMeta) {
        let mut meta = meta.clone();
        meta.name = snap_name.clone();
        meta.id = id;
        meta.generation = 0;
        meta.read_only = true;
        meta.qos = QosLimits::default();
        let snapshot = Disk::open(
            meta.clone(),
            &self.config.dirs,
            self.config.node.clone(),
            self.store.clone(),
        );
        (snapshot, meta)
    }

    /// `image clone SOURCE NEW`: a writable image whose blocks read through to SOURCE (a
    /// snapshot or a read-only image) until written. Constant time: no block is copied.
    pub(super) fn clone_image(
        &self,
        source: &ImageName,
        name: ImageName,
        tier: Option<Tier>,
        at: &[Placement],
    ) -> Result<Value, DaemonError> {
        self.local_only()?;
        let _family = self.family_lock();
        let parent = self.disk(source)?;
        let (size, block_size, parent_tier, read_only) = {
            let meta = parent.meta();
            (meta.size, meta.block_size, meta.tier, meta.read_only)
        };
        if !read_only {
            return Err(FamilyError::WritableSource(source.clone()).into());
        }
        let shape = Shape {
            size,
            block_size,
            tier: tier.unwrap_or(parent_tier),
            read_only: false,
            qos: QosLimits::default(),
            stripe: None,
            parent: Some(parent),
        };
        let disk = self.create(name, shape, at)?;
        self.publish(&disk)?;
        Ok(self.summary(&disk))
    }

    /// Connects a clone (or a clone's snapshot) to its parent's blocks on this node; other
    /// images need nothing.
    pub(super) fn attach_parent(&self, disk: &Arc<Disk>) -> Result<(), DaemonError> {
        let Some(parent) = disk.meta().parent.clone() else {
            return Ok(());
        };
        let found = self.find(&parent.name).filter(|p| p.meta().id == parent.id);
        let Some(parent_disk) = found else {
            return Err(FamilyError::NoParent {
                name: disk.name().clone(),
                parent,
            }
            .into());
        };
        disk.blocks().set_backing(ParentBlocks::new(parent_disk));
        Ok(())
    }

    /// `image flatten NAME`: every block the clone reads through is copied into its own
    /// files (each under the same lock a guest write's copy-up takes, so the guest runs on),
    /// then the link to the parent is cut, durably. A crash part-way leaves a clone with some
    /// blocks copied: still whole, and a second flatten finishes it.
    pub(super) fn flatten(
        &self,
        name: &ImageName,
        progress: Progress,
    ) -> Result<Value, DaemonError> {
        self.local_only()?;
        let disk = self.owned_disk(name)?;
        if disk.meta().parent.is_none() {
            return Err(FamilyError::NotAClone(name.clone()).into());
        }
        if disk.meta().read_only {
            return Err(FamilyError::ReadOnly(name.clone()).into());
        }
        let blocks = disk.meta().blocks();
        let mut copied = 0u64;
        for block in 0..blocks {
            for tier in tiers_here(&disk, block) {
                let files = disk.blocks();
                if !files.has_own(tier, block)? && files.file_for_read(tier, block)?.is_some() {
                    files.copy_up(tier, block)?;
                    copied += 1;
                }
            }
            if block % PROGRESS_EVERY == 0 || block + 1 == blocks {
                progress(block + 1, blocks);
            }
        }
        disk.blocks().flush()?;
        let _family = self.family_lock();
        let parent = disk
            .update_meta(|meta| Ok(meta.parent.take()))
            .map_err(DaemonError::Text)?;
        disk.blocks().clear_backing();
        log::info!("image {name}: flattened, {copied} blocks copied from its parent");
        Ok(json!({"flattened": name, "blocks_copied": copied, "parent": parent.map(|p| p.name)}))
    }

    /// How many of a clone's blocks have data of their own on this node (the rest read
    /// through to its parent).
    pub(super) fn own_blocks(&self, disk: &Disk) -> Result<u64, DaemonError> {
        let mut own = 0;
        let blocks = disk.meta().blocks();
        for block in 0..blocks {
            for tier in tiers_here(disk, block) {
                if disk.blocks().has_own(tier, block)? {
                    own += 1;
                    break;
                }
            }
        }
        Ok(own)
    }

    /// The images that need `name` to stay: its snapshots, and the clones made from it. Read
    /// from the metadata files, so an image that could not be opened counts too.
    pub(super) fn children(&self, name: &ImageName) -> Vec<ImageName> {
        let Some(id) = self.find(name).map(|d| d.meta().id) else {
            return Vec::new();
        };
        let dir = self.config.meta_dir();
        let names = meta::list(&dir).unwrap_or_else(|e| {
            log::error!("cannot list the images' metadata: {e}");
            Vec::new()
        });
        names
            .into_iter()
            .filter(|other| {
                if other.snapshot_of().as_ref() == Some(name) {
                    return true;
                }
                match ImageMeta::load(&dir, other) {
                    Ok(meta) => meta.parent.is_some_and(|p| p.id == id),
                    Err(_) => false,
                }
            })
            .collect()
    }

    /// Refuses to remove an image something still reads through or was taken from.
    pub(super) fn check_no_children(&self, name: &ImageName) -> Result<(), DaemonError> {
        let children = self.children(name);
        if children.is_empty() {
            return Ok(());
        }
        Err(FamilyError::HasChildren {
            name: name.clone(),
            children,
        }
        .into())
    }

    /// Opens the images of the metadata directory parents first, so every clone finds its
    /// parent open; an image whose parent is missing is logged and not served.
    pub(super) fn open_in_order(&self, mut metas: Vec<ImageMeta>) {
        loop {
            let before = metas.len();
            let (ready, waiting): (Vec<ImageMeta>, Vec<ImageMeta>) =
                metas.into_iter().partition(|m| {
                    m.parent
                        .as_ref()
                        .is_none_or(|p| self.find(&p.name).is_some_and(|d| d.meta().id == p.id))
                });
            for meta in ready {
                let name = meta.name.clone();
                if let Err(e) = self.open_and_export(meta) {
                    log::error!("image {name}: cannot serve: {e}");
                }
            }
            metas = waiting;
            if metas.is_empty() || metas.len() == before {
                break;
            }
        }
        for meta in metas {
            let parent = meta.parent.map(|p| p.to_string()).unwrap_or_default();
            log::error!(
                "image {}: cannot serve: its parent {parent} is missing",
                meta.name
            );
        }
        self.remove_orphan_snapshots();
    }

    /// Whether image `name`'s metadata file may name `id`: it does, or it cannot be read
    /// (then nothing of that name is taken for leftovers).
    fn names_on_disk(&self, name: &ImageName, id: ImageId) -> bool {
        let dir = self.config.meta_dir();
        if !meta::meta_path(&dir, name).exists() {
            return false;
        }
        ImageMeta::load(&dir, name).map_or(true, |meta| meta.id == id)
    }

    /// Removes the linked files of snapshots whose metadata was never saved (the daemon
    /// stopped between the barrier and the save). Only snapshot directories: no other image
    /// can have an `@` in its name, so nothing else is ever taken for one.
    fn remove_orphan_snapshots(&self) {
        for tier in [Tier::Ram, Tier::Volume] {
            let Ok(entries) = std::fs::read_dir(self.config.dirs.root(tier)) else {
                continue;
            };
            for entry in entries.flatten() {
                let file_name = entry.file_name();
                let Some((name, id)) = file_name.to_str().and_then(parse_dir_name) else {
                    continue;
                };
                if name.is_snapshot() && !self.names_on_disk(&name, id) {
                    let path = entry.path();
                    log::warn!("removing {}: a snapshot never finished", path.display());
                    if let Err(e) = std::fs::remove_dir_all(&path) {
                        log::error!("cannot remove {}: {e}", path.display());
                    }
                }
            }
        }
    }
}

/// Links `disk`'s block files into the directories of its snapshot `name` (`id`), before the
/// barrier.
fn prelink(dirs: &TierDirs, disk: &Disk, name: &ImageName, id: ImageId) -> Result<(), DaemonError> {
    for tier in [Tier::Ram, Tier::Volume] {
        let into = BlockFiles::open(dirs, tier, name, id);
        if let Err(source) = disk.blocks().files(tier).prelink_into(&into) {
            return Err(DaemonError::CreateDir {
                path: into.dir().to_path_buf(),
                source,
            });
        }
    }
    Ok(())
}

/// Removes what a snapshot that was not taken linked.
fn remove_links(dirs: &TierDirs, name: &ImageName, id: ImageId) {
    for tier in [Tier::Ram, Tier::Volume] {
        let _ = BlockFiles::open(dirs, tier, name, id).remove_all();
    }
}

/// Makes the links of `disk`'s snapshot exact (inside the barrier).
fn link(disk: &Disk, snapshot: &Disk) -> Result<(), DaemonError> {
    for tier in [Tier::Ram, Tier::Volume] {
        let into = snapshot.blocks().files(tier);
        if let Err(source) = disk.blocks().files(tier).link_into(into) {
            return Err(DaemonError::CreateDir {
                path: into.dir().to_path_buf(),
                source,
            });
        }
    }
    Ok(())
}

/// The tiers of this node holding a copy of `block`.
fn tiers_here(disk: &Disk, block: u64) -> Vec<Tier> {
    let meta = disk.meta();
    meta.table
        .locations(block)
        .unwrap_or(&[])
        .iter()
        .filter(|l| &l.node == disk.me())
        .map(|l| l.tier)
        .collect()
}
