//! `image prefetch`: copies every block of the image that this node reads from another node
//! into the cache, in the background, at a rate limit, while the guest keeps running.
//!
//! Each chunk read is a fill like any other (`cache::ImageCache::fill`): checked against the
//! block's write counter, so a guest write racing the prefetch wins. It runs on the owner
//! only, under the epoch it started with, and stops when the image is fenced, removed,
//! loses its cache setting, or the cache cannot hold more of it (prefetching past the cap
//! would only evict what it brought).
//!
//! No prefetch before a live migration's switch: until the adopter takes the image over, the
//! old owner's writes do not pass through it, so nothing it cached could be kept. After the
//! take-over the adopter moves every block here anyway (`ownership::localize`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::disk::Disk;
use crate::engine::IoVecs;
use crate::peer::{Request, Response, MAX_CHUNK};
use crate::peers::Transport;
use crate::route::local_copy;

/// A prefetch's progress, as `stats` shows it and the CLI's progress bar polls it.
#[derive(Debug, Default)]
pub struct PrefetchState {
    running: AtomicBool,
    /// Blocks looked at so far, and in all.
    done: AtomicU64,
    total: AtomicU64,
    /// Bytes read from other nodes into the cache.
    bytes: AtomicU64,
    /// Why the last prefetch ended early, if it did.
    stopped: Mutex<Option<String>>,
}

impl PrefetchState {
    /// Marks a prefetch started; false when one is running already.
    pub fn start(&self, blocks: u64) -> bool {
        if self.running.swap(true, Relaxed) {
            return false;
        }
        self.done.store(0, Relaxed);
        self.total.store(blocks, Relaxed);
        self.bytes.store(0, Relaxed);
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = None;
        true
    }

    /// A prefetch that could not start after all.
    pub fn abort(&self, why: &str) {
        self.finish(Some(why.to_string()));
    }

    fn finish(&self, stopped: Option<String>) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = stopped;
        self.running.store(false, Relaxed);
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Relaxed)
    }

    /// (blocks done, blocks in all, bytes)
    pub fn progress(&self) -> (u64, u64, u64) {
        (
            self.done.load(Relaxed),
            self.total.load(Relaxed),
            self.bytes.load(Relaxed),
        )
    }

    pub fn json(&self) -> Value {
        let (done, total, bytes) = self.progress();
        json!({
            "running": self.is_running(),
            "blocks_done": done,
            "blocks": total,
            "bytes": bytes,
            "stopped": *self.stopped.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }
}

/// Why a prefetch stops before the last block.
fn stop_reason(disk: &Disk, epoch: u64) -> Option<&'static str> {
    if disk.is_removed() {
        Some("the image was removed")
    } else if disk.is_fenced() || !disk.owned_here() || disk.meta().generation != epoch {
        Some("this node no longer owns the image")
    } else if disk.cache().tier().is_none() {
        Some("caching was turned off")
    } else {
        None
    }
}

/// Prefetches every block of `disk` whose copies are all on other nodes; `rate` in bytes
/// per second. Call after [`PrefetchState::start`] succeeded; runs until done or stopped.
pub fn run(disk: &Disk, peers: &dyn Transport, rate: Option<u64>) {
    let state = &disk.cache().prefetch;
    let (epoch, blocks) = {
        let meta = disk.meta();
        (meta.generation, meta.blocks())
    };
    let started = Instant::now();
    let mut stopped = None;
    for block in 0..blocks {
        if let Some(why) = stop_reason(disk, epoch) {
            stopped = Some(why.to_string());
            break;
        }
        match prefetch_block(disk, peers, epoch, block, state, rate, started) {
            Ok(()) => {}
            Err(why) => {
                stopped = Some(why);
                break;
            }
        }
        state.done.fetch_add(1, Relaxed);
    }
    match &stopped {
        Some(why) => log::warn!("image {}: prefetch stopped: {why}", disk.name()),
        None => log::info!("image {}: prefetch done", disk.name()),
    }
    state.finish(stopped);
}

/// One block: skipped when this node has an in-sync copy, the cache holds it, no copy is
/// reachable, or a write to it is in flight (its next read fills it).
fn prefetch_block(
    disk: &Disk,
    peers: &dyn Transport,
    epoch: u64,
    block: u64,
    state: &PrefetchState,
    rate: Option<u64>,
    started: Instant,
) -> Result<(), String> {
    let (location, len) = {
        let meta = disk.meta();
        let Some(locations) = meta.table.locations(block) else {
            return Ok(());
        };
        if local_copy(locations, disk.me()).is_some() {
            return Ok(());
        }
        let location = locations
            .iter()
            .find(|l| l.synced && !peers.is_failed(&l.node))
            .cloned();
        (location, meta.block_len(block))
    };
    let Some(location) = location else {
        return Ok(());
    };
    let cache = disk.cache();
    if cache.holds(epoch, block, 0, len) {
        return Ok(());
    }
    if cache.room() < len {
        return Err("the cache is full (raise --cache-size or the node's budget)".into());
    }
    let Some(writes) = disk.writes().idle(block) else {
        return Ok(());
    };
    let mut offset = 0;
    while offset < len {
        let chunk = (len - offset).min(u64::from(MAX_CHUNK));
        let request = Request::Read {
            image: disk.image_ref(),
            tier: location.tier,
            block,
            offset: offset as u32,
            len: chunk as u32,
        };
        let mut data = match peers.call_wait(&location.node, request) {
            Ok(Response::Data(bytes)) if bytes.len() as u64 == chunk => bytes,
            // A copy that cannot answer now: the block's next read goes elsewhere.
            Ok(_) | Err(_) => return Ok(()),
        };
        let bufs = IoVecs(smallvec::smallvec![libc::iovec {
            iov_base: data.as_mut_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }]);
        let unchanged = || disk.writes().idle(block) == Some(writes);
        cache.fill(epoch, block, offset, &bufs, false, &unchanged);
        offset += chunk;
        let total = state.bytes.fetch_add(chunk, Relaxed) + chunk;
        pace(rate, total, started);
    }
    Ok(())
}

/// Sleeps until `bytes` at `rate` bytes per second are due since `started`.
fn pace(rate: Option<u64>, bytes: u64, started: Instant) {
    let Some(rate) = rate.filter(|&r| r > 0) else {
        return;
    };
    let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }
}
