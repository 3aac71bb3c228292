//! A disk: an image opened for serving. It ties the image's metadata to its block files on
//! this node, tracks what a flush must sync, and admits at most one frontend at a time.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock, RwLockReadGuard, Weak};

use crate::cache::ImageCache;
use crate::image::{BlockRange, BlockTable, ImageMeta, ImageName, Location, NodeId, Tier};
use crate::meta::store::MetaStore;
use crate::metrics::ImageMetrics;
use crate::qos::Limiter;
use crate::store::{Blocks, TierDirs};

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
    /// The image's limits at run time, shared by its queues; follows the metadata's `qos`.
    qos: Limiter,
    take_over: Mutex<()>,
    /// Set when the image is removed: background work (a fill, a resync) must not save its
    /// metadata or recreate its files afterwards.
    removed: AtomicBool,
    /// Run once this node took the image over (moves the blocks here in the background).
    on_take_over: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// The image's block files on this node: every block read, write, free and flush.
    blocks: Blocks,
    /// Cache copies of blocks read from other nodes (see `cache`); follows the metadata's
    /// `qos.cache`.
    cache: ImageCache,
    claimed: AtomicBool,
    /// The newest owner epoch seen for this image, from the metadata or from a peer's
    /// request: requests carrying an older one are refused (see [`Disk::admit_epoch`]).
    newest_epoch: AtomicU64,
    /// Held (shared) across a check of a request's epoch and the block I/O it allows; a newer
    /// epoch is admitted only under it exclusively, so no write checked under an older epoch
    /// can land after the first request of a newer one.
    epoch_gate: RwLock<()>,
    /// Set when another node became the owner (or this node could not keep the image): no
    /// guest request is served from here any more.
    fenced: AtomicBool,
    /// With a shared store: the lease generation + 1 under which this node marked the device
    /// active; 0 when it is not. Writes are acknowledged only while it matches the lease.
    active_under: AtomicU64,
    /// Blocks of this node's copies that may have lost data (a RAM tier wiped by a reboot)
    /// and that the owner has not yet marked out of sync: never served as data.
    lost: Mutex<HashSet<(Tier, u64)>>,
    /// The epoch at which this node adopted the image (0: not adopted). A take-over compares
    /// against it, not against later epochs the watch brought: an adopter that another node
    /// beat to the image must not take it over from the winner.
    adopted_at: AtomicU64,
    /// The counter of this node's write stamps (see [`Disk::next_stamp`]).
    stamps: AtomicU64,
    /// As a holder: per block, the changes applied here lately (see [`Disk::admit_change`]).
    applied: Mutex<HashMap<(Tier, u64), Applied>>,
    /// Copies that missed a write whose out-of-sync mark could not be recorded (etcd
    /// unreachable): per block, the marks still to record. Until they are, those copies and
    /// the ones that took the write differ while all are "in sync" in etcd.
    unrecorded: Mutex<HashMap<u64, Vec<Location>>>,
    /// Told of every change of the image's size (the devices serving it: see
    /// [`Disk::watch_size`]); gone watchers are dropped.
    size_watchers: Mutex<Vec<Weak<dyn SizeWatcher>>>,
    /// Heat tiering: per-block heat and what the mover did (see `tiering`).
    tiering: crate::tiering::ImageTiering,
}

/// Something that follows an image's size: a device tells its guest the new capacity.
pub trait SizeWatcher: Send + Sync {
    /// The image is now `size` bytes. Called with no lock of the disk held, after the change
    /// is durable and live.
    fn size_changed(&self, size: u64);
}

/// Bits of a write stamp below the incarnation: 2^40 writes per image per run of the daemon.
const STAMP_COUNTER_BITS: u32 = 40;

/// Per block, how many guest writes were started and finished. A resync copies a block only
/// while no write is in flight on it, and commits the copy only if no write started since:
/// so it never puts an old value over a guest's write.
///
/// The counters live in fixed groups of [`COUNTER_GROUP`] blocks, allocated when the image
/// first reaches them and never freed or moved, so an online resize adds groups while the
/// queues count without any lock: a count is one bounds check, one load of the group's
/// pointer and the atomic add, as with one flat array. Room for groups up to the table's
/// limit (4096 pointers) costs 64 KiB per image, and each group 8 KiB.
pub struct WriteCounters {
    groups: Box<[OnceLock<Box<CounterGroup>>]>,
    /// Blocks the image has: counters past it answer as absent.
    blocks: AtomicU64,
}

/// Blocks per group of write counters: 8 KiB of counters, so a 4 MiB-block image of up to
/// 4 GiB has one group and a grown one adds them 4 GiB at a time.
const COUNTER_GROUP: u64 = 1024;

/// The write counters of [`COUNTER_GROUP`] consecutive blocks.
struct CounterGroup {
    started: Box<[AtomicU32]>,
    finished: Box<[AtomicU32]>,
}

impl CounterGroup {
    fn new() -> Self {
        let zeros = || (0..COUNTER_GROUP).map(|_| AtomicU32::new(0)).collect();
        CounterGroup {
            started: zeros(),
            finished: zeros(),
        }
    }
}

impl WriteCounters {
    fn new(blocks: u64) -> Self {
        let groups = crate::image::table::MAX_BLOCKS.div_ceil(COUNTER_GROUP);
        let counters = WriteCounters {
            groups: (0..groups).map(|_| OnceLock::new()).collect(),
            blocks: AtomicU64::new(0),
        };
        counters.resize(blocks);
        counters
    }

    /// The image now has `blocks` blocks. Growing allocates their groups before the new
    /// blocks count as present; shrinking keeps the counters (a block that comes back
    /// goes on counting from where it was, so no resync mistakes it for untouched).
    fn resize(&self, blocks: u64) {
        let blocks = blocks.min(crate::image::table::MAX_BLOCKS);
        for group in self
            .groups
            .iter()
            .take(blocks.div_ceil(COUNTER_GROUP) as usize)
        {
            group.get_or_init(|| Box::new(CounterGroup::new()));
        }
        self.blocks.store(blocks, Ordering::Release);
    }

    /// The counters of `block`: (started, finished); `None` past the image's end.
    fn of(&self, block: u64) -> Option<(&AtomicU32, &AtomicU32)> {
        if block >= self.blocks.load(Ordering::Acquire) {
            return None;
        }
        let group = self.groups.get((block / COUNTER_GROUP) as usize)?.get()?;
        let at = (block % COUNTER_GROUP) as usize;
        Some((group.started.get(at)?, group.finished.get(at)?))
    }

    pub fn start(&self, block: u64) {
        if let Some((started, _)) = self.of(block) {
            started.fetch_add(1, Ordering::AcqRel);
        }
    }

    pub fn finish(&self, block: u64) {
        if let Some((_, finished)) = self.of(block) {
            finished.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The number of writes started on `block`, when none is in flight.
    pub fn idle(&self, block: u64) -> Option<u32> {
        let (started, finished) = self.of(block)?;
        let started = started.load(Ordering::Acquire);
        let finished = finished.load(Ordering::Acquire);
        (started == finished).then_some(started)
    }
}

/// Blocks a resync is copying under lock: guest writes to them wait until the copy is
/// committed. Used only for blocks that guest writes keep rewriting faster than an optimistic
/// copy can finish, so it stays rare and short (one block's copy).
#[derive(Default)]
pub struct Frozen {
    blocks: Mutex<FrozenSet>,
    thawed: Condvar,
}

/// The frozen blocks, or every block (snapshots' barriers: a count, as two may overlap).
#[derive(Default)]
struct FrozenSet {
    blocks: HashSet<u64>,
    all: u32,
}

impl FrozenSet {
    fn contains(&self, block: &u64) -> bool {
        self.all > 0 || self.blocks.contains(block)
    }
}

impl Frozen {
    /// Freezes `block`; call with the metadata write lock held, so no write is choosing its
    /// copies at that moment.
    fn freeze(&self, block: u64) {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .blocks
            .insert(block);
    }

    pub fn thaw(&self, block: u64) {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .blocks
            .remove(&block);
        self.thawed.notify_all();
    }

    fn freeze_all(&self) {
        self.blocks.lock().unwrap_or_else(|p| p.into_inner()).all += 1;
    }

    fn thaw_all(&self) {
        let mut set = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        set.all = set.all.saturating_sub(1);
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

/// Every block of a disk frozen against guest writes, none in flight; thawed on drop.
pub struct FreezeAll<'a>(&'a Disk);

impl Drop for FreezeAll<'_> {
    fn drop(&mut self) {
        self.0.frozen.thaw_all();
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
    /// Opens a disk for serving. See [`Disk::lost_tiers`] for copies a reboot took away.
    pub fn open(
        meta: ImageMeta,
        dirs: &TierDirs,
        me: NodeId,
        store: Arc<dyn MetaStore>,
    ) -> Arc<Disk> {
        let name = meta.name.clone();
        let blocks = match meta.parent {
            Some(_) => Blocks::open_clone(dirs, &name, meta.id, meta.block_size, meta.size),
            None => Blocks::open(dirs, &name, meta.id, meta.block_size, meta.size),
        };
        let cache = ImageCache::new(meta.id.dir_name(&name), meta.block_size, meta.qos.cache);
        let meta_epoch = meta.generation;
        let tiering =
            crate::tiering::ImageTiering::new(meta.blocks(), crate::tiering::is_auto(&meta));
        let disk = Disk {
            name,
            me,
            store,
            writes: WriteCounters::new(meta.blocks()),
            frozen: Frozen::default(),
            resync: Mutex::new(()),
            metrics: ImageMetrics::default(),
            qos: Limiter::new(&meta.qos),
            take_over: Mutex::new(()),
            removed: AtomicBool::new(false),
            on_take_over: Mutex::new(None),
            meta: RwLock::new(meta),
            blocks,
            cache,
            claimed: AtomicBool::new(false),
            newest_epoch: AtomicU64::new(meta_epoch),
            epoch_gate: RwLock::new(()),
            fenced: AtomicBool::new(false),
            active_under: AtomicU64::new(0),
            lost: Mutex::new(HashSet::new()),
            adopted_at: AtomicU64::new(0),
            stamps: AtomicU64::new(0),
            applied: Mutex::new(HashMap::new()),
            unrecorded: Mutex::new(HashMap::new()),
            size_watchers: Mutex::new(Vec::new()),
            tiering,
        };
        Arc::new(disk)
    }

    /// Tiers on which this node has in-sync copies but no block directory: the tier lost its
    /// contents (a RAM tier after a reboot). Those copies must never be read as zeros.
    pub fn lost_tiers(&self) -> Vec<Tier> {
        self.synced_tiers_here()
            .into_iter()
            .filter(|&tier| !self.blocks.files(tier).dir_exists())
            .collect()
    }

    /// Tiers on which this node has in-sync copies of some block.
    pub fn synced_tiers_here(&self) -> Vec<Tier> {
        let meta = self.meta();
        [Tier::Ram, Tier::Volume]
            .into_iter()
            .filter(|&tier| {
                meta.table.extents().iter().any(|e| {
                    e.locations
                        .iter()
                        .any(|l| l.node == self.me && l.tier == tier && l.synced)
                })
            })
            .collect()
    }

    /// Marks this node's copies on `tiers` out of sync, durably (the owner's way to record a
    /// lost tier; a holder in a cluster reports it to the owner instead).
    pub fn mark_tiers_out_of_sync(&self, tiers: &[Tier]) -> Result<(), String> {
        let me = self.me.clone();
        self.update_meta(|meta| {
            let all = BlockRange::new(0, meta.blocks()).map_err(|e| e.to_string())?;
            meta.table
                .update(all, |locations| {
                    for l in locations.iter_mut() {
                        if l.node == me && tiers.contains(&l.tier) {
                            l.synced = false;
                        }
                    }
                })
                .map_err(|e| e.to_string())
        })?;
        for tier in [Tier::Ram, Tier::Volume] {
            if tiers.contains(&tier) {
                self.blocks
                    .files(tier)
                    .create_dir()
                    .map_err(|e| format!("cannot create the block directory: {e}"))?;
            }
        }
        Ok(())
    }

    pub fn name(&self) -> &ImageName {
        &self.name
    }

    /// The image as peer requests name it: name and the owner epoch this node acts under.
    /// A node that does not own the image (a holder, a fenced former owner) acts under no
    /// epoch: epoch 0, which every holder refuses.
    pub fn image_ref(&self) -> crate::peer::ImageRef {
        let meta = self.meta();
        let epoch = if meta.owner == self.me && !self.is_fenced() {
            meta.generation
        } else {
            0
        };
        crate::peer::ImageRef::new(self.name.clone(), epoch)
    }

    pub fn store(&self) -> &Arc<dyn MetaStore> {
        &self.store
    }

    /// A stamp for the next change this node sends to a copy on another node: its
    /// incarnation above a counter, so stamps keep growing across restarts of the daemon.
    pub fn next_stamp(&self) -> u64 {
        let counter = self.stamps.fetch_add(1, Ordering::Relaxed) + 1;
        (self.store.incarnation() << STAMP_COUNTER_BITS)
            | (counter & ((1 << STAMP_COUNTER_BITS) - 1))
    }

    /// As a holder: whether a change to `bytes` of `block` on `tier` made under (`epoch`,
    /// `stamp`) may be applied, i.e. no newer change to any of those bytes was; records it.
    /// Call under the epoch gate.
    ///
    /// Changes the owner sent together to different bytes of one block may be applied here
    /// in any order (the peer server runs several at once), so only an overlap makes a
    /// change late. Past [`CHANGES_KEPT`] per block the oldest is forgotten into a floor,
    /// and anything older than the floor is refused whatever bytes it touches: a change
    /// overtaken by that many others is one its owner gave up on.
    pub fn admit_change(
        &self,
        tier: Tier,
        block: u64,
        epoch: u64,
        stamp: u64,
        bytes: std::ops::Range<u64>,
    ) -> bool {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        applied
            .entry((tier, block))
            .or_default()
            .admit((epoch, stamp), bytes)
    }

    /// Records that this node adopted the image at its current epoch.
    pub fn adopt(&self) {
        self.adopted_at
            .store(self.meta().generation, Ordering::Release);
    }

    /// The epoch this node adopted the image at, if it did.
    pub fn adopted_at(&self) -> Option<u64> {
        Some(self.adopted_at.load(Ordering::Acquire)).filter(|&e| e != 0)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// From now on no guest request is served from this node.
    pub fn fence(&self) {
        if !self.fenced.swap(true, Ordering::AcqRel) {
            log::warn!("image {}: fenced: this node no longer serves it", self.name);
        }
        // Another owner may write from now on: nothing cached under this epoch is served.
        self.cache.fence(self.newest_epoch.load(Ordering::Acquire));
        self.active_under.store(0, Ordering::Release);
    }

    /// Whether the device is active here under the lease's current generation.
    pub fn is_active(&self) -> bool {
        match self.store.lease() {
            Some(lease) => self.active_under.load(Ordering::Acquire) == lease.generation() + 1,
            None => true,
        }
    }

    /// Records that the device was marked active under the current lease.
    pub fn set_active(&self, active: bool) {
        let value = match (active, self.store.lease()) {
            (true, Some(lease)) => lease.generation() + 1,
            _ => 0,
        };
        self.active_under.store(value, Ordering::Release);
    }

    /// Whether this node may serve the guest's requests at all: with a shared store only as
    /// the image's owner, with the device active here, not fenced. A node whose take-over
    /// failed or was never tried serves nothing, not even reads of a view that may be stale.
    pub fn may_serve(&self) -> bool {
        if self.is_fenced() {
            return false;
        }
        if !self.store.is_shared() {
            return true;
        }
        self.owned_here() && self.is_active()
    }

    /// Whether a write may be acknowledged now: always for a single node; with etcd, while
    /// the node's lease is surely valid and the device active under it. When not, waits up to
    /// `timeout` for that to come back; false if it did not (or the image was fenced).
    pub fn may_ack(&self, timeout: std::time::Duration) -> bool {
        if self.may_ack_now() {
            return true;
        }
        let Some(lease) = self.store.lease() else {
            return true;
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.is_fenced() {
                return false;
            }
            if lease.is_valid() && self.is_active() {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            lease.wait_valid((deadline - now).min(std::time::Duration::from_millis(100)));
        }
    }

    /// [`Disk::may_ack`] without waiting: the check every answer makes (one clock read).
    pub fn may_ack_now(&self) -> bool {
        match self.store.lease() {
            None => true,
            Some(lease) => !self.is_fenced() && lease.is_valid() && self.is_active(),
        }
    }

    /// Replaces the metadata with the cluster's (a holder's view, or after a take-over that
    /// was committed elsewhere). Blocks of `lost` copies that the owner now has out of sync
    /// are no longer lost: the owner knows.
    pub fn set_meta(&self, meta: ImageMeta) {
        // A newer epoch waits for block I/O admitted under older ones (see `epoch_gate`).
        let exclusive = (meta.generation > self.newest_epoch.load(Ordering::Acquire))
            .then(|| self.epoch_gate.write().unwrap_or_else(|p| p.into_inner()));
        let mut live = self.meta.write().unwrap_or_else(|p| p.into_inner());
        self.newest_epoch
            .fetch_max(meta.generation, Ordering::AcqRel);
        let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        lost.retain(|&(tier, block)| {
            meta.table.locations(block).is_some_and(|ls| {
                ls.iter()
                    .any(|l| l.node == self.me && l.tier == tier && l.synced)
            })
        });
        self.qos.set(&meta.qos);
        self.cache.set_policy(meta.qos.cache);
        self.drop_moved_from_cache(&live.table, &meta.table);
        if meta.owner != self.me {
            // The image is someone else's now (moved away): its writes no longer pass here.
            self.cache.fence(meta.generation);
        }
        let resized = self.follow_size(&live, &meta);
        *live = meta;
        drop(live);
        drop(lost);
        drop(exclusive);
        if let Some(size) = resized {
            self.size_changed(size);
        }
    }

    /// Drops the cache copies of blocks whose locations or in-sync flags differ between
    /// `old` and `new` (called under the metadata's write lock, before `new` is live): the
    /// copy a block was cached from may have gone out of sync or away.
    fn drop_moved_from_cache(&self, old: &BlockTable, new: &BlockTable) {
        let changed = changed_runs(old, new);
        if changed.is_empty() {
            return;
        }
        self.cache.invalidate_where(&|block| {
            let at = changed.partition_point(|&(_, end)| end <= block);
            changed.get(at).is_some_and(|&(start, _)| start <= block)
        });
    }

    /// Marks this node's in-sync copies on `tier` as lost (see `lost`); returns how many.
    pub fn mark_lost(&self, tier: Tier) -> usize {
        let meta = self.meta();
        let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        for block in 0..meta.blocks() {
            let held = meta.table.locations(block).is_some_and(|ls| {
                ls.iter()
                    .any(|l| l.node == self.me && l.tier == tier && l.synced)
            });
            if held {
                lost.insert((tier, block));
            }
        }
        lost.len()
    }

    /// As the new owner: marks this node's own lost copies out of sync, durably, before it
    /// serves anything (it reads its own copies first, and a lost one reads as zeros).
    pub fn settle_own_lost(&self) -> Result<(), String> {
        let lost: Vec<(Tier, u64)> = self
            .lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        if lost.is_empty() {
            return Ok(());
        }
        let me = self.me.clone();
        self.update_meta(|meta| {
            for &(tier, block) in &lost {
                let one = BlockRange::new(block, block + 1).map_err(|e| e.to_string())?;
                meta.table
                    .update(one, |locations| {
                        for l in locations
                            .iter_mut()
                            .filter(|l| l.node == me && l.tier == tier)
                        {
                            l.synced = false;
                        }
                    })
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })?;
        let mut set = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        for entry in &lost {
            set.remove(entry);
        }
        log::warn!(
            "image {}: {} of this node's lost copies marked out of sync",
            self.name,
            lost.len()
        );
        Ok(())
    }

    /// The owner settled this node's report: nothing here is held back any more.
    pub fn clear_lost(&self) {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Marks this node's copies on `tiers` out of sync where another in-sync copy has the
    /// data (copies that may be stale, not gone: where they are all there is, they stay).
    pub fn mark_suspect_out_of_sync(&self, tiers: &[Tier]) -> Result<(), String> {
        let me = self.me.clone();
        self.update_meta(|meta| {
            let all = BlockRange::new(0, meta.blocks()).map_err(|e| e.to_string())?;
            meta.table
                .update(all, |locations| {
                    let mine = |l: &Location| l.node == me && tiers.contains(&l.tier);
                    if locations.iter().any(|l| l.synced && !mine(l)) {
                        for l in locations.iter_mut().filter(|l| mine(l)) {
                            l.synced = false;
                        }
                    }
                })
                .map_err(|e| e.to_string())
        })
    }

    pub fn is_lost(&self, tier: Tier, block: u64) -> bool {
        let lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        !lost.is_empty() && lost.contains(&(tier, block))
    }

    pub fn lost_count(&self) -> usize {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Admits block I/O under owner `epoch` and holds the gate until the returned guard is
    /// dropped (see `epoch_gate`); `Err` carries the newer epoch seen. Take it right around
    /// the I/O, with no other lock held.
    pub fn enter_epoch(&self, epoch: u64) -> Result<RwLockReadGuard<'_, ()>, u64> {
        loop {
            let gate = self.epoch_gate.read().unwrap_or_else(|p| p.into_inner());
            let newest = self
                .newest_epoch
                .load(Ordering::Acquire)
                .max(self.meta().generation);
            if epoch < newest {
                return Err(newest);
            }
            if epoch == newest {
                return Ok(gate);
            }
            drop(gate);
            let _exclusive = self.epoch_gate.write().unwrap_or_else(|p| p.into_inner());
            self.newest_epoch.fetch_max(epoch, Ordering::AcqRel);
        }
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

    /// The image's limiter (see `qos`).
    pub fn qos(&self) -> &Limiter {
        &self.qos
    }

    /// Cache copies of remote blocks (see `cache`).
    /// Heat and the mover's figures for this image (see `tiering`).
    pub fn tiering(&self) -> &crate::tiering::ImageTiering {
        &self.tiering
    }

    pub fn cache(&self) -> &ImageCache {
        &self.cache
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

    /// A snapshot's barrier: no guest write or discard starts (they wait in their queues,
    /// reads go on), and this returns once every one already started has finished — or
    /// `None` after `timeout`, thawed again. Dropping the guard thaws.
    pub fn freeze_all(&self, timeout: std::time::Duration) -> Option<FreezeAll<'_>> {
        {
            let _exclusive = self.meta.write().unwrap_or_else(|p| p.into_inner());
            self.frozen.freeze_all();
        }
        let guard = FreezeAll(self);
        let deadline = std::time::Instant::now() + timeout;
        let blocks = self.meta().blocks();
        while (0..blocks).any(|b| self.writes.idle(b).is_none()) {
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Some(guard)
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
        let mut resized = None;
        if next != *live {
            self.store.commit(&live, &next).map_err(|e| e.to_string())?;
            self.qos.set(&next.qos);
            self.cache.set_policy(next.qos.cache);
            self.drop_moved_from_cache(&live.table, &next.table);
            resized = self.follow_size(&live, &next);
            *live = next;
        }
        drop(live);
        if let Some(size) = resized {
            self.size_changed(size);
        }
        Ok(result)
    }

    /// Brings the per-block state sized by the image's length in line with `next` when its
    /// size differs from `live`'s (under the metadata's write lock, before `next` is live):
    /// the write counters, the block files (see `Blocks::resize`), the cache copy of the old
    /// last block (its pages may stop short of the new end). Returns the new size if it
    /// changed.
    fn follow_size(&self, live: &ImageMeta, next: &ImageMeta) -> Option<u64> {
        if live.size == next.size {
            return None;
        }
        self.writes.resize(next.blocks());
        if let Err(e) = self.blocks.resize(next.size) {
            // The size is changed all the same; what could not be cleared past the old end
            // is cleared by the next resize that crosses it.
            log::error!("image {}: resize: {e}", self.name);
        }
        self.cache.invalidate(live.blocks().saturating_sub(1));
        log::info!(
            "image {}: size {} -> {} bytes ({} blocks)",
            self.name,
            live.size,
            next.size,
            next.blocks()
        );
        Some(next.size)
    }

    /// Registers `watcher` to be told of every change of the image's size, until it is
    /// dropped.
    pub fn watch_size(&self, watcher: Weak<dyn SizeWatcher>) {
        let mut watchers = self.size_watchers.lock().unwrap_or_else(|p| p.into_inner());
        watchers.retain(|w| w.strong_count() > 0);
        watchers.push(watcher);
    }

    fn size_changed(&self, size: u64) {
        let watchers: Vec<Arc<dyn SizeWatcher>> = self
            .size_watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for watcher in watchers {
            watcher.size_changed(size);
        }
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
        let marked = self.record_marks(block, stale);
        if marked.is_err() {
            let mut unrecorded = self.unrecorded.lock().unwrap_or_else(|p| p.into_inner());
            let pending = unrecorded.entry(block).or_default();
            for l in stale {
                if !pending.iter().any(|p| p.node == l.node && p.tier == l.tier) {
                    pending.push(l.clone());
                }
            }
        }
        marked
    }

    /// Records the marks [`Disk::mark_out_of_sync`] could not; returns how many blocks are
    /// still pending (0 once all are recorded).
    pub fn record_pending_marks(&self) -> usize {
        let pending: Vec<(u64, Vec<Location>)> = self
            .unrecorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(b, l)| (*b, l.clone()))
            .collect();
        for (block, stale) in pending {
            if self.record_marks(block, &stale).is_ok() {
                self.unrecorded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&block);
            }
        }
        self.unrecorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether some write's out-of-sync marks are still to be recorded.
    pub fn has_unrecorded_marks(&self) -> bool {
        !self
            .unrecorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn record_marks(&self, block: u64, stale: &[Location]) -> Result<(), String> {
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

    /// The image's blocks on this node: the one way to read, write, free and flush them.
    pub fn blocks(&self) -> &Blocks {
        &self.blocks
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
        self.blocks.used_bytes()
    }
}

/// A location list by address and length: the same list of a table is the same slice.
type ListKey = (*const Location, usize);

/// Runs `start..end` of blocks of `old` whose locations differ in `new` (or that `new` no
/// longer has), in order.
fn changed_runs(old: &BlockTable, new: &BlockTable) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    // Most blocks share a few placements: compare each pair of lists once.
    let mut last: Option<(ListKey, ListKey, bool)> = None;
    for block in 0..old.blocks() {
        let differs = match (old.locations(block), new.locations(block)) {
            (Some(a), Some(b)) => {
                let key = ((a.as_ptr(), a.len()), (b.as_ptr(), b.len()));
                match last {
                    Some((ka, kb, d)) if (ka, kb) == key => d,
                    _ => {
                        let d = a != b;
                        last = Some((key.0, key.1, d));
                        d
                    }
                }
            }
            _ => true,
        };
        if differs {
            match runs.last_mut() {
                Some(run) if run.1 == block => run.1 = block + 1,
                _ => runs.push((block, block + 1)),
            }
        }
    }
    runs
}

/// Changes kept per block by [`Applied`]: more than the calls one image may have in flight
/// to a peer (`peers::budget`, 64), so changes sent together are never refused for their
/// order alone.
const CHANGES_KEPT: usize = 96;

/// The changes applied lately to one block on a holder: (epoch, stamp) and the bytes each
/// touched, newest last, and a floor below which every change is late.
#[derive(Default)]
struct Applied {
    floor: (u64, u64),
    recent: std::collections::VecDeque<((u64, u64), std::ops::Range<u64>)>,
}

impl Applied {
    fn admit(&mut self, change: (u64, u64), bytes: std::ops::Range<u64>) -> bool {
        if change < self.floor {
            return false;
        }
        let overlaps = |b: &std::ops::Range<u64>| b.start < bytes.end && bytes.start < b.end;
        if self
            .recent
            .iter()
            .any(|(newer, b)| *newer > change && overlaps(b))
        {
            return false;
        }
        // Once a change from a newer owner (epoch) arrives, nothing older can be admitted:
        // the floor says so and the older changes are forgotten.
        if change.0 > self.floor.0 {
            self.floor = (change.0, 0);
            self.recent.retain(|(c, _)| c.0 >= change.0);
        }
        self.recent.push_back((change, bytes));
        if self.recent.len() > CHANGES_KEPT {
            if let Some((oldest, _)) = self.recent.pop_front() {
                self.floor = self.floor.max(oldest);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_older_than_one_applied_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = TierDirs {
            ram: dir.path().join("ram"),
            volume: dir.path().join("vol"),
        };
        let meta = ImageMeta::new(
            "img".parse().unwrap(),
            "a".parse().unwrap(),
            8 << 20,
            4 << 20,
            false,
            vec![Location {
                node: "b".parse().unwrap(),
                tier: Tier::Ram,
                synced: true,
            }],
        )
        .unwrap();
        let store = Arc::new(crate::meta::store::LocalStore::new(dir.path().join("meta")));
        let disk = Disk::open(meta, &dirs, "b".parse().unwrap(), store);
        let all = 0..4096;
        assert!(disk.admit_change(Tier::Ram, 0, 5, 10, all.clone()));
        assert!(
            disk.admit_change(Tier::Ram, 0, 5, 10, all.clone()),
            "pieces of one change"
        );
        assert!(
            !disk.admit_change(Tier::Ram, 0, 5, 9, 1024..2048),
            "a late, older write over the same bytes"
        );
        assert!(
            disk.admit_change(Tier::Ram, 0, 5, 8, 4096..8192),
            "an older write to other bytes, applied in another order"
        );
        assert!(
            disk.admit_change(Tier::Ram, 1, 5, 9, all.clone()),
            "another block"
        );
        assert!(
            disk.admit_change(Tier::Volume, 0, 5, 1, all.clone()),
            "another tier"
        );
        assert!(
            !disk.admit_change(Tier::Ram, 0, 4, 99, 8192..9000),
            "an older epoch"
        );
        assert!(
            disk.admit_change(Tier::Ram, 0, 6, 1, all.clone()),
            "a newer owner starts over"
        );
        assert!(
            !disk.admit_change(Tier::Ram, 0, 5, 11, 9000..9100),
            "nothing of an older owner after it"
        );
        // A change overtaken by more than CHANGES_KEPT others is late, whatever it touches.
        for stamp in 10..(10 + CHANGES_KEPT as u64 + 1) {
            let at = stamp * 4096;
            assert!(disk.admit_change(Tier::Ram, 2, 7, stamp, at..at + 4096));
        }
        assert!(!disk.admit_change(Tier::Ram, 2, 7, 5, 0..1));
        let (a, b) = (disk.next_stamp(), disk.next_stamp());
        assert!(b > a);
    }

    /// Records the sizes it is told of.
    #[derive(Default)]
    struct Sizes(Mutex<Vec<u64>>);

    impl SizeWatcher for Sizes {
        fn size_changed(&self, size: u64) {
            self.0.lock().unwrap().push(size);
        }
    }

    /// A resize through `update_meta` is saved, grows the write counters and the block files'
    /// bounds with it, and tells the watchers once it is live; a shrink clears what lay past
    /// the end.
    #[test]
    fn a_resize_reaches_every_per_block_state() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = TierDirs {
            ram: dir.path().join("ram"),
            volume: dir.path().join("vol"),
        };
        let here = Location {
            node: "a".parse().unwrap(),
            tier: Tier::Ram,
            synced: true,
        };
        let meta = ImageMeta::new(
            "img".parse().unwrap(),
            "a".parse().unwrap(),
            6 << 20,
            4 << 20,
            false,
            vec![here],
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("meta")).unwrap();
        let store = Arc::new(crate::meta::store::LocalStore::new(dir.path().join("meta")));
        let disk = Disk::open(meta, &dirs, "a".parse().unwrap(), store);
        let sizes = Arc::new(Sizes::default());
        let weak: Weak<dyn SizeWatcher> = Arc::downgrade(&(sizes.clone() as Arc<dyn SizeWatcher>));
        disk.watch_size(weak);
        assert_eq!(disk.writes().idle(2), None, "past the end");
        disk.blocks().write(Tier::Ram, 1, 0, &[5; 2 << 20]).unwrap();
        let grown = (8u64 << 30) + 512;
        disk.update_meta(|m| m.resize(grown).map_err(|e| e.to_string()))
            .unwrap();
        assert_eq!(*sizes.0.lock().unwrap(), [grown]);
        let last = grown / (4 << 20);
        assert_eq!(disk.meta().blocks(), last + 1);
        assert_eq!(disk.writes().idle(last), Some(0));
        disk.writes().start(last);
        assert_eq!(disk.writes().idle(last), None, "in flight");
        disk.writes().finish(last);
        assert_eq!(disk.writes().idle(last), Some(1));
        assert_eq!(disk.blocks().block_len(last), 512);
        disk.blocks().write(Tier::Ram, last, 0, &[7; 512]).unwrap();
        let saved = ImageMeta::load(&dir.path().join("meta"), disk.name()).unwrap();
        assert_eq!(saved.size, grown, "durable before it is live");
        disk.update_meta(|m| m.resize(5 << 20).map_err(|e| e.to_string()))
            .unwrap();
        assert_eq!(*sizes.0.lock().unwrap(), [grown, 5 << 20]);
        assert_eq!(disk.writes().idle(last), None);
        let one = disk.blocks().read_block(Tier::Ram, 1).unwrap().unwrap();
        assert_eq!(one.len(), 1 << 20, "cut at the new end");
        disk.update_meta(|m| m.resize(grown).map_err(|e| e.to_string()))
            .unwrap();
        assert!(disk.blocks().read_block(Tier::Ram, last).unwrap().is_none());
        assert_eq!(
            disk.writes().idle(last),
            Some(1),
            "counts go on where they were"
        );
        drop(sizes);
        disk.update_meta(|m| m.resize(grown + 512).map_err(|e| e.to_string()))
            .unwrap();
    }

    #[test]
    fn a_block_whose_copies_change_leaves_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = TierDirs {
            ram: dir.path().join("ram"),
            volume: dir.path().join("vol"),
        };
        let b_ram = Location {
            node: "b".parse().unwrap(),
            tier: Tier::Ram,
            synced: true,
        };
        let mut meta = ImageMeta::new(
            "img".parse().unwrap(),
            "a".parse().unwrap(),
            12 << 20,
            4 << 20,
            false,
            vec![b_ram.clone()],
        )
        .unwrap();
        meta.qos.cache = Some(crate::cache::CachePolicy {
            tier: Tier::Ram,
            size: None,
        });
        std::fs::create_dir_all(dir.path().join("meta")).unwrap();
        let store = Arc::new(crate::meta::store::LocalStore::new(dir.path().join("meta")));
        let disk = Disk::open(meta, &dirs, "a".parse().unwrap(), store);
        let caches = crate::cache::Caches::new(&dirs, crate::cache::Budgets::default()).unwrap();
        disk.cache().attach(caches);
        let epoch = disk.meta().generation;
        let mut data = vec![1u8; 4096];
        let bufs = crate::engine::IoVecs(smallvec::smallvec![libc::iovec {
            iov_base: data.as_mut_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }]);
        let fill_all = || {
            for block in 0..3 {
                disk.cache().fill(epoch, block, 0, &bufs, false, &|| true);
            }
        };
        let cached = |block| disk.cache().holds(epoch, block, 0, 4096);
        fill_all();
        assert!((0..3).all(cached));
        // b's copy of block 1 goes out of sync (a write it missed): block 1 leaves the cache.
        disk.update_meta(|meta| {
            let one = BlockRange::new(1, 2).map_err(|e| e.to_string())?;
            meta.table
                .update(one, |ls| ls.iter_mut().for_each(|l| l.synced = false))
                .map_err(|e| e.to_string())
        })
        .unwrap();
        assert!(cached(0) && !cached(1) && cached(2));
        // The cluster's view moves block 2 elsewhere.
        let mut next = disk.meta().clone();
        let two = BlockRange::new(2, 3).unwrap();
        next.table
            .update(two, |ls| {
                *ls = vec![Location {
                    node: "c".parse().unwrap(),
                    tier: Tier::Volume,
                    synced: true,
                }]
            })
            .unwrap();
        disk.set_meta(next);
        assert!(cached(0) && !cached(2), "set_meta drops it too");
    }
}
