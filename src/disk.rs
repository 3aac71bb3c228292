//! A disk: an image opened for serving. It ties the image's metadata to its block files on
//! this node, tracks what a flush must sync, and admits at most one frontend at a time.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};

use crate::image::{BlockRange, ImageMeta, ImageName, Location, NodeId, Tier};
use crate::meta::store::MetaStore;
use crate::metrics::ImageMetrics;
use crate::store::{BlockFiles, TierDirs};

pub struct Disk {
    name: ImageName,
    me: NodeId,
    store: Arc<dyn MetaStore>,
    meta: RwLock<ImageMeta>,
    writes: WriteCounters,
    frozen: Frozen,
    /// One resync at a time per image (an operator's `sync` waits for a background fill).
    resync: Mutex<()>,
    metrics: ImageMetrics,
    take_over: Mutex<()>,
    /// Set when the image is removed: background work (a fill, a resync) must not save its
    /// metadata or recreate its files afterwards.
    removed: AtomicBool,
    /// Run once this node took the image over (moves the blocks here in the background).
    on_take_over: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    ram: BlockFiles,
    volume: BlockFiles,
    dirty: DirtyFiles,
    claimed: AtomicBool,
    /// The newest owner epoch seen for this image, from the metadata or from a peer's
    /// request: requests carrying an older one are refused (see [`Disk::admit_epoch`]).
    newest_epoch: AtomicU64,
}

/// Volume-tier block files written since their last sync. Entries carry the sequence number
/// of their last write, so a flush removes only what it synced: a flush that ends must not
/// forget a write that landed while it ran, and concurrent flushes each sync what they saw.
#[derive(Default)]
pub struct DirtyFiles {
    files: Mutex<HashMap<u64, (Arc<File>, u64)>>,
    seq: AtomicU64,
}

/// What one flush is syncing: (block, sequence) pairs to clear when it succeeds.
pub type FlushTicket = Vec<(u64, u64)>;

impl DirtyFiles {
    pub fn mark(&self, block: u64, file: &Arc<File>) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.insert(block, (file.clone(), seq));
    }

    /// The files to sync now, and the ticket to [`DirtyFiles::clear`] afterwards.
    pub fn snapshot(&self) -> (Vec<Arc<File>>, FlushTicket) {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let sync = files.values().map(|(f, _)| f.clone()).collect();
        let ticket = files.iter().map(|(&b, &(_, s))| (b, s)).collect();
        (sync, ticket)
    }

    pub fn clear(&self, ticket: &FlushTicket) {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        for (block, seq) in ticket {
            if files.get(block).is_some_and(|(_, s)| s == seq) {
                files.remove(block);
            }
        }
    }
}

/// Per block, how many guest writes were started and finished. A resync copies a block only
/// while no write is in flight on it, and commits the copy only if no write started since:
/// so it never puts an old value over a guest's write.
pub struct WriteCounters {
    started: Vec<AtomicU32>,
    finished: Vec<AtomicU32>,
}

impl WriteCounters {
    fn new(blocks: u64) -> Self {
        let zeros = || (0..blocks).map(|_| AtomicU32::new(0)).collect();
        WriteCounters {
            started: zeros(),
            finished: zeros(),
        }
    }

    pub fn start(&self, block: u64) {
        if let Some(c) = self.started.get(block as usize) {
            c.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn finish(&self, block: u64) {
        if let Some(c) = self.finished.get(block as usize) {
            c.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The number of writes started on `block`, when none is in flight.
    pub fn idle(&self, block: u64) -> Option<u32> {
        let started = self.started.get(block as usize)?.load(Ordering::Acquire);
        let finished = self.finished.get(block as usize)?.load(Ordering::Acquire);
        (started == finished).then_some(started)
    }
}

/// Blocks a resync is copying under lock: guest writes to them wait until the copy is
/// committed. Used only for blocks that guest writes keep rewriting faster than an optimistic
/// copy can finish, so it stays rare and short (one block's copy).
#[derive(Default)]
pub struct Frozen {
    blocks: Mutex<HashSet<u64>>,
    thawed: Condvar,
}

impl Frozen {
    /// Freezes `block`; call with the metadata write lock held, so no write is choosing its
    /// copies at that moment.
    fn freeze(&self, block: u64) {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(block);
    }

    pub fn thaw(&self, block: u64) {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&block);
        self.thawed.notify_all();
    }

    pub fn is_frozen(&self, block: u64) -> bool {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&block)
    }

    /// Waits until `block` thaws or `timeout` passes; true when it thawed.
    pub fn wait(&self, block: u64, timeout: std::time::Duration) -> bool {
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let (blocks, _) = self
            .thawed
            .wait_timeout_while(blocks, timeout, |b| b.contains(&block))
            .unwrap_or_else(|p| p.into_inner());
        !blocks.contains(&block)
    }
}

/// Held while a frontend is connected; dropping it lets the next one in.
pub struct Claim(Arc<Disk>);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.claimed.store(false, Ordering::Release);
    }
}

impl Disk {
    /// Opens a disk for serving. Local in-sync copies whose tier directory is gone (a RAM
    /// tier after a reboot) are marked out of sync, so they are never read as zeros; the
    /// caller persists the change when `changed` is true.
    pub fn open(
        meta: ImageMeta,
        dirs: &TierDirs,
        me: NodeId,
        store: Arc<dyn MetaStore>,
    ) -> (Arc<Disk>, bool) {
        let name = meta.name.clone();
        let ram = BlockFiles::open(dirs, Tier::Ram, &name, meta.id);
        let volume = BlockFiles::open(dirs, Tier::Volume, &name, meta.id);
        let mut meta = meta;
        let mut changed = false;
        for tier in [Tier::Ram, Tier::Volume] {
            let files = if tier == Tier::Ram { &ram } else { &volume };
            if files.dir_exists() {
                continue;
            }
            let range =
                crate::image::BlockRange::new(0, meta.blocks()).expect("images have blocks");
            let _ = meta.table.update(range, |locations| {
                for l in locations.iter_mut() {
                    if l.node == me && l.tier == tier && l.synced {
                        l.synced = false;
                        changed = true;
                    }
                }
            });
        }
        if changed {
            log::error!(
                "image {name}: its local block directory is gone (tier lost, e.g. RAM after a reboot); those copies are now out of sync"
            );
        }
        let meta_epoch = meta.generation;
        let disk = Disk {
            name,
            me,
            store,
            writes: WriteCounters::new(meta.blocks()),
            frozen: Frozen::default(),
            resync: Mutex::new(()),
            metrics: ImageMetrics::default(),
            take_over: Mutex::new(()),
            removed: AtomicBool::new(false),
            on_take_over: Mutex::new(None),
            meta: RwLock::new(meta),
            ram,
            volume,
            dirty: DirtyFiles::default(),
            claimed: AtomicBool::new(false),
            newest_epoch: AtomicU64::new(meta_epoch),
        };
        (Arc::new(disk), changed)
    }

    pub fn name(&self) -> &ImageName {
        &self.name
    }

    /// The image as peer requests name it: name and the owner epoch this node acts under.
    pub fn image_ref(&self) -> crate::peer::ImageRef {
        crate::peer::ImageRef::new(self.name.clone(), self.meta().generation)
    }

    /// Admits a peer request made under owner epoch `epoch`, unless a newer epoch was seen;
    /// `Err` carries that newer epoch. A newer `epoch` becomes the newest seen.
    pub fn admit_epoch(&self, epoch: u64) -> Result<(), u64> {
        let known = self.meta().generation;
        let newest = self
            .newest_epoch
            .fetch_max(epoch.max(known), Ordering::AcqRel)
            .max(known);
        if epoch < newest {
            return Err(newest);
        }
        Ok(())
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    pub fn meta(&self) -> RwLockReadGuard<'_, ImageMeta> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn writes(&self) -> &WriteCounters {
        &self.writes
    }

    pub fn frozen(&self) -> &Frozen {
        &self.frozen
    }

    pub fn metrics(&self) -> &ImageMetrics {
        &self.metrics
    }

    /// Copies marked out of sync, over all blocks.
    pub fn out_of_sync_copies(&self) -> u64 {
        self.meta()
            .table
            .extents()
            .iter()
            .map(|e| e.blocks.len() * e.locations.iter().filter(|l| !l.synced).count() as u64)
            .sum()
    }

    /// Marks the image removed (see `removed`); waits for a resync in progress to notice.
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
        drop(self.resync_lock());
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub fn take_over_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.take_over.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets what to do once this node takes the image over.
    pub fn on_take_over(&self, action: Box<dyn FnOnce() + Send>) {
        *self.on_take_over.lock().unwrap_or_else(|p| p.into_inner()) = Some(action);
    }

    /// Called by `ownership::take_over` when it is done.
    pub fn taken_over(&self) {
        let action = self
            .on_take_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(action) = action {
            action();
        }
    }

    /// Whether this node owns the image (only the owner's guest may write).
    pub fn owned_here(&self) -> bool {
        self.meta().owner == self.me
    }

    /// Held for the length of a resync.
    pub fn resync_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.resync.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Freezes `block` against guest writes (see [`Frozen`]); thaw it when done.
    pub fn freeze(&self, block: u64) {
        let _exclusive = self.meta.write().unwrap_or_else(|p| p.into_inner());
        self.frozen.freeze(block);
    }

    /// Changes the metadata durably: `change` edits a copy, which is saved (atomically) and
    /// only then replaces the live one, so no request ever acts on a change that a crash
    /// could undo. Requests wait while this runs.
    pub fn update_meta<T>(
        &self,
        change: impl FnOnce(&mut ImageMeta) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut live = self.meta.write().unwrap_or_else(|p| p.into_inner());
        if self.is_removed() {
            return Err(format!("image {} was removed", self.name));
        }
        let mut next = live.clone();
        let result = change(&mut next)?;
        if next != *live {
            self.store
                .commit(&live, &next)
                .map_err(|e| e.to_string())?;
            *live = next;
        }
        Ok(result)
    }

    /// Peers in `failed` could not make their copies durable: their copies go out of sync
    /// wherever another in-sync copy exists. Returns false when some block's only in-sync
    /// copies were on them (the flush must then fail).
    pub fn flush_failed(&self, failed: &[NodeId]) -> Result<bool, String> {
        for node in failed {
            log::warn!("image {}: flush failed on {node}", self.name);
        }
        self.update_meta(|meta| {
            let mut durable = true;
            let all = BlockRange::new(0, meta.blocks()).map_err(|e| e.to_string())?;
            meta.table
                .update(all, |locations| {
                    let elsewhere = locations
                        .iter()
                        .any(|l| l.synced && !failed.contains(&l.node));
                    if elsewhere {
                        for l in locations.iter_mut().filter(|l| failed.contains(&l.node)) {
                            l.synced = false;
                        }
                    } else if locations.iter().any(|l| l.synced) {
                        durable = false;
                    }
                })
                .map_err(|e| e.to_string())?;
            Ok(durable)
        })
    }

    /// Marks the copies in `stale` of `block` out of sync, durably.
    pub fn mark_out_of_sync(&self, block: u64, stale: &[Location]) -> Result<(), String> {
        let range = BlockRange::new(block, block + 1).map_err(|e| e.to_string())?;
        self.update_meta(|meta| {
            meta.table
                .update(range, |locations| {
                    for l in locations.iter_mut() {
                        if stale.iter().any(|s| s.node == l.node && s.tier == l.tier) {
                            l.synced = false;
                        }
                    }
                })
                .map_err(|e| e.to_string())
        })?;
        for l in stale {
            log::warn!(
                "image {}: block {block}: copy on {}:{} is now out of sync",
                self.name,
                l.node,
                l.tier
            );
        }
        Ok(())
    }

    pub fn files(&self, tier: Tier) -> &BlockFiles {
        match tier {
            Tier::Ram => &self.ram,
            Tier::Volume => &self.volume,
        }
    }

    pub fn dirty(&self) -> &DirtyFiles {
        &self.dirty
    }

    /// Admits one frontend; `None` while another is connected.
    pub fn claim(self: &Arc<Self>) -> Option<Claim> {
        self.claimed
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Claim(self.clone()))
    }

    pub fn in_use(&self) -> bool {
        self.claimed.load(Ordering::Acquire)
    }

    /// Bytes the image's block files take on this node.
    pub fn used_bytes(&self) -> io::Result<u64> {
        Ok(self.ram.used_bytes()? + self.volume.used_bytes()?)
    }

    /// Syncs every volume-tier file written so far, and the directories (for shutdown).
    pub fn sync_all(&self) -> io::Result<()> {
        let (files, ticket) = self.dirty.snapshot();
        for file in files {
            file.sync_data()?;
        }
        self.volume.sync_dir_if_dirty()?;
        self.dirty.clear(&ticket);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_ticket_keeps_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(File::create(dir.path().join("x")).unwrap());
        let d = DirtyFiles::default();
        d.mark(1, &f);
        d.mark(2, &f);
        let (files, ticket) = d.snapshot();
        assert_eq!(files.len(), 2);
        d.mark(2, &f);
        d.clear(&ticket);
        let (files, _) = d.snapshot();
        assert_eq!(files.len(), 1, "block 2 was written again during the flush");
    }
}
