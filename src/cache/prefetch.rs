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

    /// Why the last prefetch ended early (None while running, or when it went through).
    pub fn stopped(&self) -> Option<String> {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
            "stopped": self.stopped(),
        })
    }
}

/// The lowest `--rate`: below it one chunk (1 MiB) takes over 16 s, and a prefetch of a
/// large image would take days; 0 would never end.
pub const MIN_RATE: u64 = 64 << 10;

/// Refuses a rate a prefetch could not usefully run at.
pub fn check_rate(rate: Option<u64>) -> Result<(), String> {
    match rate {
        Some(rate) if rate < MIN_RATE => Err(format!(
            "--rate {rate} B/s is too low: use at least 64K (or leave it out for no limit)"
        )),
        _ => Ok(()),
    }
}

/// The longest a prefetch sleeps before it looks at its stop reason again.
const SLICE: Duration = Duration::from_millis(100);

/// A token bucket: `rate` bytes a second, at most `burst` saved up while idle, so a
/// prefetch that was slowed (a busy peer) never catches up in a burst afterwards.
struct Pacer {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Pacer {
    fn new(rate: u64, now: Instant) -> Pacer {
        let burst = f64::from(MAX_CHUNK);
        Pacer {
            rate: rate as f64,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Takes `bytes` (just read) from the bucket; returns how long to wait before the next
    /// read, while the bucket is in debt.
    fn spend(&mut self, bytes: u64, now: Instant) -> Duration {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst) - bytes as f64;
        self.at = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Sleeps `wait` in slices of at most [`SLICE`], asking `stop` before each: the prefetch's
/// reason to stop, when it has one.
fn sleep_unless(wait: Duration, stop: &dyn Fn() -> Option<&'static str>) -> Result<(), String> {
    let end = Instant::now() + wait;
    loop {
        if let Some(why) = stop() {
            return Err(why.to_string());
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(SLICE));
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
    let mut pacer = rate.map(|rate| Pacer::new(rate, Instant::now()));
    let mut stopped = None;
    for block in 0..blocks {
        if let Some(why) = stop_reason(disk, epoch) {
            stopped = Some(why.to_string());
            break;
        }
        match prefetch_block(disk, peers, epoch, block, state, pacer.as_mut()) {
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
    mut pacer: Option<&mut Pacer>,
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
    let stop = || stop_reason(disk, epoch);
    let mut offset = 0;
    while offset < len {
        if let Some(why) = stop() {
            return Err(why.to_string());
        }
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
        state.bytes.fetch_add(chunk, Relaxed);
        if let Some(pacer) = pacer.as_deref_mut() {
            sleep_unless(pacer.spend(chunk, Instant::now()), &stop)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_rate_of_zero_or_under_64k_is_refused() {
        assert!(check_rate(Some(0)).is_err());
        assert!(check_rate(Some(1024)).unwrap_err().contains("64K"));
        assert!(check_rate(Some(MIN_RATE)).is_ok());
        assert!(check_rate(None).is_ok());
    }

    #[test]
    fn an_idle_bucket_saves_one_chunk_and_never_catches_up() {
        let t0 = Instant::now();
        let rate = 1 << 20;
        let mut pacer = Pacer::new(rate, t0);
        let chunk = u64::from(MAX_CHUNK);
        // A minute without reading (a slow peer): one chunk goes at once, then the rate.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(pacer.spend(chunk, later), Duration::ZERO);
        let wait = pacer.spend(chunk, later);
        assert!(
            wait >= Duration::from_millis(990) && wait <= Duration::from_millis(1010),
            "{wait:?}"
        );
        let wait = pacer.spend(chunk, later);
        assert!(wait >= Duration::from_millis(1990), "{wait:?}");
    }

    #[test]
    fn a_long_wait_ends_soon_after_the_prefetch_must_stop() {
        let asked = Cell::new(0);
        let stop = || {
            asked.set(asked.get() + 1);
            (asked.get() > 2).then_some("caching was turned off")
        };
        let started = Instant::now();
        let result = sleep_unless(Duration::from_secs(1000), &stop);
        assert_eq!(result, Err("caching was turned off".to_string()));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(sleep_unless(Duration::from_millis(10), &|| None).is_ok());
    }
}
