//! Cache copies of remote blocks (issue 12): a node that serves an image keeps what it read
//! from other nodes' copies on one of its own tiers, so the next read of those bytes is a
//! local one.
//!
//! A cache copy is not a replica. It never appears in the image's locations, never counts
//! toward the acknowledgement rule and is never the source of a resync; it lives in
//! node-private files under `<tier dir>/.cache/<image>@<id>/`, wiped when the daemon starts.
//! It stays right because every write goes through the image's owner, which is the node that
//! caches:
//!
//! - a write or discard drops the cached block when it is issued, after its write counter
//!   started (`disk::WriteCounters`);
//! - a fill (the data of a remote read, on completion) is stored only if the block's write
//!   counter shows no write started since the read was issued and none in flight, checked
//!   under the same lock as the file write and the page bits (`shelf`), so a late fill never
//!   overwrites a newer one;
//! - contents are valid under one owner epoch only: a node that lost the image (fenced) or
//!   got it back later never serves what it cached before another owner could write.
//!
//! Only reads whose source would be another node's copy use the cache: an in-sync copy here
//! is always read directly. A read is a hit when every 4 KiB page it touches is valid; a
//! partial hit goes to the remote copy whole (and fills the rest).

pub mod pages;
pub mod prefetch;
pub mod shelf;
pub mod stream;

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::engine::IoVecs;
use crate::image::Tier;
use crate::store::TierDirs;
use shelf::{Fill, Shelf, Stake};

/// The node's RAM-tier cache budget when `serve` sets none: 256 MiB. The RAM tier is the
/// guests' memory, so the default is a modest slice; caching only happens for images an
/// operator asked it for (`image set NAME --cache ram`), so a default of 0 would make that
/// request silently do nothing.
pub const DEFAULT_BUDGET_RAM: u64 = 256 << 20;
/// The node's volume-tier cache budget when `serve` sets none: 1 GiB of disk, used only by
/// images that asked for a volume cache (wiped at every start).
pub const DEFAULT_BUDGET_VOLUME: u64 = 1 << 30;

/// An image's cache setting, stored with its limits (see `qos::QosLimits::cache`), so it
/// survives restarts and follows the image to a new owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachePolicy {
    /// The tier this node keeps cache copies on.
    pub tier: Tier,
    /// The image's cap in bytes; without one, only the node's budget for the tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// `--cache`: where to cache, or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    Off,
    Ram,
    Volume,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "off" => Ok(CacheMode::Off),
            "ram" => Ok(CacheMode::Ram),
            "volume" => Ok(CacheMode::Volume),
            other => Err(format!(
                "'{other}' is not a cache mode: use ram, volume or off"
            )),
        }
    }
}

impl CacheMode {
    pub fn tier(self) -> Option<Tier> {
        match self {
            CacheMode::Off => None,
            CacheMode::Ram => Some(Tier::Ram),
            CacheMode::Volume => Some(Tier::Volume),
        }
    }
}

/// The node-wide budgets per tier, in bytes (0: no caching on that tier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub ram: u64,
    pub volume: u64,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            ram: DEFAULT_BUDGET_RAM,
            volume: DEFAULT_BUDGET_VOLUME,
        }
    }
}

/// The cache's directory under each tier's dir. It starts with a dot because image names
/// cannot: a legacy image's block directory is its bare name, so `cache` could be an image
/// named `cache`, whose blocks the wipe at start would delete.
pub const CACHE_DIR: &str = ".cache";

/// This node's caches: one shelf per tier, shared by every image.
pub struct Caches {
    ram: Shelf,
    volume: Shelf,
}

impl Caches {
    /// Empties `<tier dir>/.cache` on both tiers and starts with nothing cached.
    pub fn new(dirs: &TierDirs, budgets: Budgets) -> io::Result<Arc<Caches>> {
        Ok(Arc::new(Caches {
            ram: Shelf::new(dirs.ram.join(CACHE_DIR), budgets.ram)?,
            volume: Shelf::new(dirs.volume.join(CACHE_DIR), budgets.volume)?,
        }))
    }

    pub fn shelf(&self, tier: Tier) -> &Shelf {
        match tier {
            Tier::Ram => &self.ram,
            Tier::Volume => &self.volume,
        }
    }

    /// Budget and use per tier, as `stats` shows them.
    pub fn json(&self) -> Value {
        let tier = |s: &Shelf| json!({"budget": s.limit(), "used": s.used()});
        json!({"ram": tier(&self.ram), "volume": tier(&self.volume)})
    }
}

/// An image's cache counts (shared by its queues).
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub hit_bytes: AtomicU64,
    /// Bytes written into the cache by fills.
    pub filled_bytes: AtomicU64,
    /// Guest reads served (wholly or partly) by pages read-ahead brought in.
    pub ahead_hits: AtomicU64,
    /// Bytes read-ahead brought in.
    pub ahead_bytes: AtomicU64,
}

/// An image's figures at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheFigures {
    pub tier: Option<Tier>,
    pub cap: Option<u64>,
    pub used: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_bytes: u64,
    pub filled_bytes: u64,
    pub ahead_hits: u64,
    pub ahead_bytes: u64,
    /// `image prefetch`: blocks done, blocks in all, bytes brought in.
    pub prefetch_done: u64,
    pub prefetch_blocks: u64,
    pub prefetch_bytes: u64,
    pub prefetch_running: bool,
    /// Why the last prefetch ended early, if it did.
    pub prefetch_stopped: Option<String>,
}

impl CacheFigures {
    pub fn json(&self) -> Value {
        json!({
            "mode": self.tier.map_or("off", |t| match t { Tier::Ram => "ram", Tier::Volume => "volume" }),
            "size": self.cap,
            "used": self.used,
            "hits": self.hits,
            "misses": self.misses,
            "hit_bytes": self.hit_bytes,
            "filled_bytes": self.filled_bytes,
            "readahead_hits": self.ahead_hits,
            "readahead_bytes": self.ahead_bytes,
            "prefetch": {
                "running": self.prefetch_running,
                "blocks_done": self.prefetch_done,
                "blocks": self.prefetch_blocks,
                "bytes": self.prefetch_bytes,
                "stopped": self.prefetch_stopped,
            },
        })
    }
}

/// Ids of image caches, unique in this process (a reopened image starts a new one).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Tier codes in [`ImageCache::tier`]'s atomic.
const OFF: u8 = 0;
const RAM: u8 = 1;
const VOLUME: u8 = 2;

/// One image's view of the node's caches.
pub struct ImageCache {
    id: u64,
    /// `<image>@<id>.<cache id>`: the image cache's directory on the shelf.
    dir: String,
    block_size: u64,
    policy: Mutex<Option<CachePolicy>>,
    /// The policy's tier as one byte: what the read path loads first.
    tier: AtomicU8,
    /// Bumped by every policy change (after the new tier is stored, before the old tier's
    /// contents are forgotten). A fill loads it before the tier and the shelf checks it again
    /// under its lock, so a fill that chose its tier before a change is refused rather than
    /// stored into a shelf whose contents the change already forgot (where no write would
    /// invalidate it, and a later change back to that tier would serve it).
    generation: AtomicU64,
    cap: AtomicU64,
    caches: OnceLock<Arc<Caches>>,
    /// Epochs below this are refused (this node was fenced under an older one).
    floor: AtomicU64,
    pub counters: CacheCounters,
    /// `image prefetch`'s progress.
    pub prefetch: prefetch::PrefetchState,
}

/// A cached copy that serves a read.
pub struct CacheHit {
    pub tier: Tier,
    pub file: Arc<File>,
    /// Some of the bytes were brought by read-ahead (and not read before).
    pub ahead: bool,
}

impl ImageCache {
    pub fn new(dir: String, block_size: u64, policy: Option<CachePolicy>) -> ImageCache {
        let id = NEXT_ID.fetch_add(1, Relaxed);
        let cache = ImageCache {
            id,
            // One directory per image cache, not per image: a disk reopened while the old one
            // lingers must never open (and truncate) the old one's files.
            dir: format!("{dir}.{id}"),
            block_size,
            policy: Mutex::new(None),
            tier: AtomicU8::new(OFF),
            generation: AtomicU64::new(0),
            cap: AtomicU64::new(u64::MAX),
            caches: OnceLock::new(),
            floor: AtomicU64::new(0),
            counters: CacheCounters::default(),
            prefetch: prefetch::PrefetchState::default(),
        };
        cache.set_policy(policy);
        cache
    }

    /// Connects to the node's caches (once; the daemon does it when it opens the image).
    pub fn attach(&self, caches: Arc<Caches>) {
        let _ = self.caches.set(caches);
    }

    /// Follows the image's setting; contents on a tier no longer used are dropped.
    pub fn set_policy(&self, policy: Option<CachePolicy>) {
        let mut current = self.policy.lock().unwrap_or_else(|p| p.into_inner());
        let old_tier = current.map(|p| p.tier);
        let new_tier = policy.map(|p| p.tier);
        let code = match new_tier {
            None => OFF,
            Some(Tier::Ram) => RAM,
            Some(Tier::Volume) => VOLUME,
        };
        self.cap
            .store(policy.and_then(|p| p.size).unwrap_or(u64::MAX), Relaxed);
        // In this order (see `generation`): a fill that saw the old generation is refused
        // under the shelf's lock, or got there before `forget` and is forgotten with the rest.
        self.tier.store(code, SeqCst);
        self.generation.fetch_add(1, SeqCst);
        if old_tier != new_tier {
            if let (Some(tier), Some(caches)) = (old_tier, self.caches.get()) {
                caches.shelf(tier).forget(self.id);
            }
        }
        *current = policy;
    }

    /// The tier to cache on, when caching is on for this image and the node has a budget
    /// there.
    pub fn tier(&self) -> Option<Tier> {
        let tier = match self.tier.load(SeqCst) {
            RAM => Tier::Ram,
            VOLUME => Tier::Volume,
            _ => return None,
        };
        let caches = self.caches.get()?;
        (caches.shelf(tier).limit() > 0).then_some(tier)
    }

    fn stake(&self, epoch: u64) -> Option<Stake> {
        (epoch >= self.floor.load(Relaxed)).then_some(Stake { id: self.id, epoch })
    }

    /// The cached copy of bytes `offset..offset + len` of `block`, if all are valid under
    /// owner `epoch`. Counts the hit or miss.
    pub fn lookup(&self, epoch: u64, block: u64, offset: u64, len: u64) -> Option<CacheHit> {
        let tier = self.tier()?;
        let shelf = self.caches.get()?.shelf(tier);
        let (first, end) = pages::outer(offset, len);
        let hit = self
            .stake(epoch)
            .and_then(|stake| shelf.lookup(stake, block, first, end));
        let c = &self.counters;
        match hit {
            Some(hit) => {
                c.hits.fetch_add(1, Relaxed);
                c.hit_bytes.fetch_add(len, Relaxed);
                if hit.ahead_pages > 0 {
                    c.ahead_hits.fetch_add(1, Relaxed);
                }
                Some(CacheHit {
                    tier,
                    file: hit.file,
                    ahead: hit.ahead_pages > 0,
                })
            }
            None => {
                c.misses.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Whether bytes `offset..offset + len` of `block` are all cached under `epoch` (not
    /// counted as a hit or a miss).
    pub fn holds(&self, epoch: u64, block: u64, offset: u64, len: u64) -> bool {
        let (Some(tier), Some(stake), Some(caches)) =
            (self.tier(), self.stake(epoch), self.caches.get())
        else {
            return false;
        };
        let (first, end) = pages::outer(offset, len);
        caches.shelf(tier).holds(stake, block, first, end)
    }

    /// Bytes this image may still cache before evicting its own blocks: its cap and the
    /// node's budget, less what it holds (0 when caching is off).
    pub fn room(&self) -> u64 {
        let (Some(tier), Some(caches)) = (self.tier(), self.caches.get()) else {
            return 0;
        };
        let shelf = caches.shelf(tier);
        let cap = self.cap.load(Relaxed).min(shelf.limit());
        cap.saturating_sub(shelf.used_by(self.id))
    }

    /// Bytes this image may cache at most: its cap and the node's budget for its tier.
    pub fn room_total(&self) -> u64 {
        let (Some(tier), Some(caches)) = (self.tier(), self.caches.get()) else {
            return 0;
        };
        self.cap.load(Relaxed).min(caches.shelf(tier).limit())
    }

    /// Stores the data a read of `block` at `offset` brought into `bufs`, if `unchanged()`
    /// (checked under the cache's lock) says no write raced it. `ahead`: read-ahead's own.
    pub fn fill(
        &self,
        epoch: u64,
        block: u64,
        offset: u64,
        bufs: &IoVecs,
        ahead: bool,
        unchanged: &dyn Fn() -> bool,
    ) {
        let generation = self.generation.load(SeqCst);
        let Some(tier) = self.tier() else {
            return;
        };
        self.fill_on(
            tier, generation, epoch, block, offset, bufs, ahead, unchanged,
        );
    }

    /// [`ImageCache::fill`] on `tier`, chosen under policy `generation`: refused when the
    /// policy changed since.
    #[allow(clippy::too_many_arguments)]
    fn fill_on(
        &self,
        tier: Tier,
        generation: u64,
        epoch: u64,
        block: u64,
        offset: u64,
        bufs: &IoVecs,
        ahead: bool,
        unchanged: &dyn Fn() -> bool,
    ) {
        let (Some(stake), Some(caches)) = (self.stake(epoch), self.caches.get()) else {
            return;
        };
        let unchanged = || self.generation.load(SeqCst) == generation && unchanged();
        let fill = Fill {
            block,
            block_pages: self.block_size.div_ceil(pages::PAGE),
            offset,
            bufs,
            ahead,
            cap: self.cap.load(Relaxed),
        };
        match caches.shelf(tier).fill(&self.dir, stake, &fill, &unchanged) {
            Ok(bytes) => {
                self.counters.filled_bytes.fetch_add(bytes, Relaxed);
                if ahead {
                    self.counters.ahead_bytes.fetch_add(bytes, Relaxed);
                }
            }
            Err(e) => log::warn!("image cache {}: cannot fill block {block}: {e}", self.dir),
        }
    }

    /// Drops `block` from the cache (a write or discard is changing it) on both tiers,
    /// whatever the setting says now: a fill racing a policy change may have chosen the
    /// other one.
    pub fn invalidate(&self, block: u64) {
        if let Some(caches) = self.caches.get() {
            for tier in [Tier::Ram, Tier::Volume] {
                caches.shelf(tier).drop_block(self.id, block);
            }
        }
    }

    /// Drops, on both tiers, every cached block for which `which` is true (their copies
    /// changed: the cache must never outlive the in-sync copies it was filled from).
    pub fn invalidate_where(&self, which: &dyn Fn(u64) -> bool) {
        if let Some(caches) = self.caches.get() {
            for tier in [Tier::Ram, Tier::Volume] {
                caches.shelf(tier).drop_where(self.id, which);
            }
        }
    }

    /// This node no longer owns the image as of `epoch`: drops everything, and refuses
    /// fills and reads under `epoch` or older from now on.
    pub fn fence(&self, epoch: u64) {
        let floor = epoch.saturating_add(1);
        self.floor.fetch_max(floor, Relaxed);
        if let Some(caches) = self.caches.get() {
            for tier in [Tier::Ram, Tier::Volume] {
                caches.shelf(tier).drop_all(self.id, floor);
            }
        }
    }

    pub fn figures(&self) -> CacheFigures {
        let policy = *self.policy.lock().unwrap_or_else(|p| p.into_inner());
        let used = match (policy, self.caches.get()) {
            (Some(p), Some(caches)) => caches.shelf(p.tier).used_by(self.id),
            _ => 0,
        };
        let c = &self.counters;
        let (prefetch_done, prefetch_blocks, prefetch_bytes) = self.prefetch.progress();
        CacheFigures {
            prefetch_done,
            prefetch_blocks,
            prefetch_bytes,
            prefetch_running: self.prefetch.is_running(),
            prefetch_stopped: self.prefetch.stopped(),
            tier: policy.map(|p| p.tier),
            cap: policy.and_then(|p| p.size),
            used,
            hits: c.hits.load(Relaxed),
            misses: c.misses.load(Relaxed),
            hit_bytes: c.hit_bytes.load(Relaxed),
            filled_bytes: c.filled_bytes.load(Relaxed),
            ahead_hits: c.ahead_hits.load(Relaxed),
            ahead_bytes: c.ahead_bytes.load(Relaxed),
        }
    }
}

impl Drop for ImageCache {
    /// The image was closed (removed, or no longer on this node): its cache files go.
    fn drop(&mut self) {
        if let Some(caches) = self.caches.get() {
            caches.ram.forget(self.id);
            caches.volume.forget(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(budget: u64, policy: Option<CachePolicy>) -> (tempfile::TempDir, ImageCache) {
        let dir = tempfile::tempdir().unwrap();
        let dirs = TierDirs {
            ram: dir.path().join("ram"),
            volume: dir.path().join("vol"),
        };
        let caches = Caches::new(
            &dirs,
            Budgets {
                ram: budget,
                volume: budget,
            },
        )
        .unwrap();
        let cache = ImageCache::new("img@1".into(), 1 << 20, policy);
        cache.attach(caches);
        (dir, cache)
    }

    fn page(data: &mut [u8]) -> IoVecs {
        IoVecs(smallvec::smallvec![libc::iovec {
            iov_base: data.as_mut_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }])
    }

    const RAM_CACHE: Option<CachePolicy> = Some(CachePolicy {
        tier: Tier::Ram,
        size: None,
    });

    #[test]
    fn off_or_without_budget_caches_nothing() {
        let (_d, cache) = setup(1 << 20, None);
        assert_eq!(cache.tier(), None);
        let (_d, cache) = setup(0, RAM_CACHE);
        assert_eq!(cache.tier(), None);
        let mut data = vec![1u8; 4096];
        cache.fill(0, 0, 0, &page(&mut data), false, &|| true);
        assert!(cache.lookup(0, 0, 0, 4096).is_none());
    }

    #[test]
    fn hits_misses_and_a_write_in_between() {
        let (_d, cache) = setup(1 << 20, RAM_CACHE);
        assert!(cache.lookup(4, 1, 0, 4096).is_none());
        let mut data = vec![1u8; 8192];
        cache.fill(4, 1, 0, &page(&mut data), false, &|| true);
        assert!(cache.lookup(4, 1, 4096, 4096).is_some());
        assert!(
            cache.lookup(4, 1, 4096, 8192).is_none(),
            "a partial hit is a miss"
        );
        cache.invalidate(1);
        assert!(cache.lookup(4, 1, 0, 4096).is_none());
        let f = cache.figures();
        assert_eq!((f.hits, f.misses, f.used), (1, 3, 0));
        assert_eq!(f.filled_bytes, 8192);
    }

    #[test]
    fn fenced_contents_are_never_served_again() {
        let (_d, cache) = setup(1 << 20, RAM_CACHE);
        let mut data = vec![1u8; 4096];
        cache.fill(4, 0, 0, &page(&mut data), false, &|| true);
        cache.fence(4);
        assert!(cache.lookup(4, 0, 0, 4096).is_none());
        cache.fill(4, 0, 0, &page(&mut data), false, &|| true);
        assert!(
            cache.lookup(4, 0, 0, 4096).is_none(),
            "a late fill of the old epoch"
        );
        // Taken back at a newer epoch: caching starts over.
        cache.fill(9, 0, 0, &page(&mut data), false, &|| true);
        assert!(cache.lookup(9, 0, 0, 4096).is_some());
    }

    #[test]
    fn changing_the_tier_drops_the_old_one() {
        let (_d, cache) = setup(1 << 20, RAM_CACHE);
        let mut data = vec![1u8; 4096];
        cache.fill(0, 0, 0, &page(&mut data), false, &|| true);
        assert_eq!(cache.figures().used, 4096);
        cache.set_policy(Some(CachePolicy {
            tier: Tier::Volume,
            size: Some(1 << 20),
        }));
        assert!(cache.lookup(0, 0, 0, 4096).is_none());
        assert_eq!(cache.caches.get().unwrap().shelf(Tier::Ram).used(), 0);
        assert_eq!(cache.figures().cap, Some(1 << 20));
    }

    #[test]
    fn a_fill_that_chose_its_tier_before_a_policy_change_is_refused() {
        let (_d, cache) = setup(1 << 20, RAM_CACHE);
        let mut data = vec![1u8; 4096];
        // The fill loads its tier (ram) ...
        let generation = cache.generation.load(SeqCst);
        let tier = cache.tier().unwrap();
        // ... `image set --cache off` forgets ram ...
        cache.set_policy(None);
        // ... the fill stores; a guest write invalidates (caching is off) ...
        cache.fill_on(tier, generation, 0, 0, 0, &page(&mut data), false, &|| true);
        cache.invalidate(0);
        // ... `--cache ram` again: the read must not see the bytes from before the write.
        cache.set_policy(RAM_CACHE);
        assert!(cache.lookup(0, 0, 0, 4096).is_none());
        assert_eq!(cache.caches.get().unwrap().shelf(Tier::Ram).used(), 0);
    }

    #[test]
    fn a_write_drops_the_block_from_a_tier_no_longer_set() {
        let (_d, cache) = setup(1 << 20, RAM_CACHE);
        let mut data = vec![1u8; 4096];
        let generation = cache.generation.load(SeqCst);
        // A fill on ram under the current generation, stored just before a change to off
        // would forget it; the write that follows must drop it wherever it is.
        cache.fill_on(
            Tier::Ram,
            generation,
            0,
            0,
            0,
            &page(&mut data),
            false,
            &|| true,
        );
        cache.tier.store(OFF, SeqCst);
        cache.invalidate(0);
        cache.tier.store(RAM, SeqCst);
        assert!(cache.lookup(0, 0, 0, 4096).is_none());
    }

    #[test]
    fn two_caches_of_one_image_never_share_files() {
        use std::os::unix::fs::FileExt;
        let (_d, first) = setup(1 << 20, RAM_CACHE);
        let second = ImageCache::new("img@1".into(), 1 << 20, RAM_CACHE);
        second.attach(first.caches.get().unwrap().clone());
        let mut ones = vec![1u8; 4096];
        let mut twos = vec![2u8; 4096];
        first.fill(0, 0, 0, &page(&mut ones), false, &|| true);
        second.fill(0, 0, 0, &page(&mut twos), false, &|| true);
        let mut back = vec![0u8; 4096];
        let hit = first.lookup(0, 0, 0, 4096).unwrap();
        hit.file.read_exact_at(&mut back, 0).unwrap();
        assert!(
            back.iter().all(|&b| b == 1),
            "the second cache clobbered the first"
        );
        drop(second);
        let hit = first.lookup(0, 0, 0, 4096).unwrap();
        hit.file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 1));
    }

    #[test]
    fn the_wipe_at_start_spares_a_legacy_image_named_cache() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = TierDirs {
            ram: dir.path().join("ram"),
            volume: dir.path().join("vol"),
        };
        // A legacy image's block directory is its bare name.
        for root in [&dirs.ram, &dirs.volume] {
            std::fs::create_dir_all(root.join("cache")).unwrap();
            std::fs::write(root.join("cache/00000000"), b"guest data").unwrap();
        }
        let _caches = Caches::new(&dirs, Budgets::default()).unwrap();
        for root in [&dirs.ram, &dirs.volume] {
            assert_eq!(
                std::fs::read(root.join("cache/00000000")).unwrap(),
                b"guest data"
            );
            assert!(root.join(CACHE_DIR).is_dir());
        }
    }

    #[test]
    fn cache_modes_parse() {
        assert_eq!("ram".parse::<CacheMode>(), Ok(CacheMode::Ram));
        assert_eq!("off".parse::<CacheMode>().unwrap().tier(), None);
        assert!("disk".parse::<CacheMode>().is_err());
    }
}
