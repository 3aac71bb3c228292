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
use crate::image::meta::Parent;
use crate::image::{ImageId, ImageMeta, ImageName, Placement, Tier};
use crate::qos::QosLimits;

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
        // Most dirty files are synced before the barrier, so little is left to hold it up.
        for (disk, _) in &sources {
            disk.blocks().flush()?;
        }
        let started = Instant::now();
        let mut barrier: Vec<FreezeAll<'_>> = Vec::new();
        for (disk, _) in &sources {
            match disk.freeze_all(BARRIER_TIMEOUT) {
                Some(frozen) => barrier.push(frozen),
                None => return Err(FamilyError::Barrier(disk.name().clone()).into()),
            }
        }
        let drained = started.elapsed();
        let prepared: Vec<(Arc<Disk>, ImageMeta)> = sources
            .iter()
            .map(|(disk, snap_name)| self.prepare_snapshot(disk, snap_name))
            .collect();
        let linked: Result<(), DaemonError> = sources
            .iter()
            .zip(&prepared)
            .try_for_each(|((disk, _), (snapshot, _))| link(disk, snapshot));
        drop(barrier);
        let held = started.elapsed();
        if let Err(e) = linked {
            for (snapshot, _) in &prepared {
                let _ = snapshot.blocks().files(Tier::Ram).remove_all();
                let _ = snapshot.blocks().files(Tier::Volume).remove_all();
            }
            return Err(e);
        }
        // The snapshots exist from here: their links are made durable and their metadata
        // saved after the barrier (a crash before leaves only linked files nobody names, and
        // the image copies a block it shares with them before writing it).
        let mut made = Vec::new();
        for (snapshot, meta) in prepared {
            sync_links(&snapshot)?;
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

    /// A snapshot of `disk` as it is now, opened (its files not yet linked).
    fn prepare_snapshot(&self, disk: &Disk, snap_name: &ImageName) -> (Arc<Disk>, ImageMeta) {
        let mut meta = disk.meta().clone();
        meta.name = snap_name.clone();
        meta.id = ImageId::random();
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
        for block in 0..disk.meta().blocks() {
            for tier in tiers_here(disk, block) {
                if disk.blocks().has_own(tier, block)? {
                    own += 1;
                    break;
                }
            }
        }
        Ok(own)
    }

    /// The images that need `name` to stay: its snapshots, and the clones made from it.
    pub(super) fn children(&self, name: &ImageName) -> Vec<ImageName> {
        let images = self.lock();
        let Some(id) = images.get(name).map(|e| e.disk.meta().id) else {
            return Vec::new();
        };
        images
            .values()
            .filter(|e| {
                let meta = e.disk.meta();
                meta.name.snapshot_of().as_ref() == Some(name)
                    || meta.parent.as_ref().is_some_and(|p| p.id == id)
            })
            .map(|e| e.disk.name().clone())
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
    }
}

/// Links `disk`'s block files into `snapshot`'s directories (inside the barrier).
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

/// Makes a snapshot's links durable, before its metadata names them.
fn sync_links(snapshot: &Disk) -> Result<(), DaemonError> {
    for tier in [Tier::Ram, Tier::Volume] {
        let files = snapshot.blocks().files(tier);
        if let Err(source) = files.sync_links() {
            return Err(DaemonError::CreateDir {
                path: files.dir().to_path_buf(),
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
