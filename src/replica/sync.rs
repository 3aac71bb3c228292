//! Resync: bring out-of-sync copies of blocks back in sync, copying only blocks that differ,
//! without ever committing a copy that a guest write overtook.
//!
//! For each block with out-of-sync copies: wait until no guest write is in flight on it, note
//! how many writes have started, compare checksums of an in-sync source and the copy, copy the
//! block when they differ, and commit (mark in sync) only if no write started meanwhile —
//! otherwise do it again. Guest writes reach out-of-sync copies too, so a block that is being
//! written converges. Commits are batched: one metadata save per batch of blocks.

use std::io;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use crate::disk::Disk;
use crate::image::{BlockRange, ImageName, Location, NodeId};

/// Blocks committed per metadata save: a save costs two fsyncs.
const COMMIT_BATCH: u64 = 64;
/// Optimistic attempts per block before the sync copies it frozen (guest writes to it wait
/// for the copy): a guest rewriting one block nonstop would otherwise never let it converge.
const OPTIMISTIC_ATTEMPTS: u32 = 3;
/// How long a sync waits for a block's in-flight writes to finish (a peer's timeout is 10 s).
const IDLE_WAIT: Duration = Duration::from_secs(15);

/// Reading and writing whole copies of blocks, wherever they live.
pub trait Copies: Sync {
    /// SHA-256 of the block's bytes at `at`, or None when it has no data there (reads zeros).
    fn checksum(
        &self,
        image: &ImageName,
        at: &Location,
        block: u64,
    ) -> io::Result<Option<[u8; 32]>>;
    /// The block's bytes at `at` (`len` of them at most), or None when it has no data there.
    fn read(
        &self,
        image: &ImageName,
        at: &Location,
        block: u64,
        len: u64,
    ) -> io::Result<Option<Vec<u8>>>;
    /// Replaces the block at `at` with `data`, or removes it when None.
    fn write(
        &self,
        image: &ImageName,
        at: &Location,
        block: u64,
        data: Option<&[u8]>,
    ) -> io::Result<()>;
    /// Whether `node` may be tried now (not on the failure list).
    fn reachable(&self, node: &NodeId) -> bool;
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SyncReport {
    /// Out-of-sync copies now in sync.
    pub synced: u64,
    /// Of those, copies whose data had to be copied (the others already matched).
    pub copied: u64,
    pub bytes: u64,
    /// Copies left out of sync (no reachable source or destination, or writes kept racing).
    pub left: u64,
    /// Which copies were left and why: the first [`MAX_LEFT_LISTED`] of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_copies: Vec<LeftCopy>,
}

/// How many copies left out of sync a report names (the count covers them all).
pub const MAX_LEFT_LISTED: usize = 32;

/// A copy a sync could not bring in sync, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeftCopy {
    pub block: u64,
    pub at: String,
    pub why: String,
}

impl SyncReport {
    fn leave(&mut self, block: u64, dest: &Location, copies: &dyn Copies) {
        self.left += 1;
        if self.left_copies.len() < MAX_LEFT_LISTED {
            let why = if copies.reachable(&dest.node) {
                "the copy failed (the daemon's log says how)"
            } else {
                "the node is unreachable (down, or on the failure list)"
            };
            self.left_copies.push(LeftCopy {
                block,
                at: format!("{}:{}", dest.node, dest.tier),
                why: why.to_string(),
            });
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("block range: {0}")]
    Range(String),
    #[error("saving metadata: {0}")]
    Meta(String),
}

/// Syncs `range` of `disk`; `progress(done, total)` is called per block, `rate` caps bytes
/// copied per second.
pub fn sync(
    disk: &Disk,
    copies: &dyn Copies,
    range: BlockRange,
    rate: Option<u64>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SyncReport, SyncError> {
    let _one_at_a_time = disk.resync_lock();
    let metrics = disk.metrics();
    metrics.resync_total.store(range.len(), Ordering::Relaxed);
    metrics.resync_done.store(0, Ordering::Relaxed);
    let mut report = SyncReport::default();
    let started = Instant::now();
    let mut batch: Batch = Vec::new();
    for block in range.iter() {
        if disk.is_removed() {
            return Err(SyncError::Meta(format!(
                "image {} was removed",
                disk.name()
            )));
        }
        let (stale, len) = {
            let meta = disk.meta();
            let locations = meta.table.locations(block).unwrap_or(&[]);
            let stale: Vec<Location> = locations.iter().filter(|l| !l.synced).cloned().collect();
            (stale, meta.block_len(block))
        };
        for dest in stale {
            match copy_block(disk, copies, block, len, &dest) {
                Some((copied, writes)) => {
                    if copied {
                        report.copied += 1;
                        report.bytes += len;
                        throttle(rate, report.bytes, started);
                    }
                    batch.push((block, dest, writes));
                }
                None => report.leave(block, &dest, copies),
            }
        }
        if batch.len() as u64 >= COMMIT_BATCH || block + 1 == range.end() {
            let (synced, raced) = commit(disk, &mut batch)?;
            report.synced += synced;
            // A write came between the copy and the commit: copy those again with writes held
            // back, or a guest that keeps writing would leave them out of sync every time.
            for (block, dest, _) in raced {
                let len = disk.meta().block_len(block);
                match copy_frozen(disk, copies, block, len, &dest) {
                    Some((copied, _)) => {
                        report.synced += 1;
                        if copied {
                            report.copied += 1;
                            report.bytes += len;
                        }
                    }
                    None => report.leave(block, &dest, copies),
                }
            }
        }
        metrics
            .resync_done
            .store(block - range.start() + 1, Ordering::Relaxed);
        progress(block - range.start() + 1, range.len());
    }
    Ok(report)
}

/// Copies one block to `dest` if it differs from an in-sync source. Returns whether bytes
/// were copied and the block's write count the copy is valid for; None when it cannot be done
/// now.
fn copy_block(
    disk: &Disk,
    copies: &dyn Copies,
    block: u64,
    len: u64,
    dest: &Location,
) -> Option<(bool, u32)> {
    if !copies.reachable(&dest.node) {
        return None;
    }
    for _ in 0..OPTIMISTIC_ATTEMPTS {
        let writes = wait_idle(disk, block)?;
        match copy_once(disk, copies, block, len, dest) {
            Ok(copied) if disk.writes().idle(block) == Some(writes) => {
                return Some((copied, writes));
            }
            Ok(_) => continue,
            Err(e) => {
                log::warn!(
                    "image {}: block {block}: sync to {}:{} failed: {e}",
                    disk.name(),
                    dest.node,
                    dest.tier
                );
                return None;
            }
        }
    }
    copy_frozen(disk, copies, block, len, dest)
}

/// Compares the source's and the copy's checksums and copies the block when they differ.
fn copy_once(
    disk: &Disk,
    copies: &dyn Copies,
    block: u64,
    len: u64,
    dest: &Location,
) -> io::Result<bool> {
    let name = disk.name();
    let source = source_of(disk, copies, block)
        .ok_or_else(|| io::Error::other("no reachable in-sync copy to copy from"))?;
    let want = copies.checksum(name, &source, block)?;
    if copies.checksum(name, dest, block)? == want {
        return Ok(false);
    }
    let data = copies.read(name, &source, block, len)?;
    copies.write(name, dest, block, data.as_deref())?;
    Ok(true)
}

/// Copies a block that guest writes keep racing: writes to it wait while it is copied and
/// committed (one block, so the wait is short). The commit happens here, before the thaw; the
/// caller's batch commit then finds the copy already in sync.
fn copy_frozen(
    disk: &Disk,
    copies: &dyn Copies,
    block: u64,
    len: u64,
    dest: &Location,
) -> Option<(bool, u32)> {
    struct Thaw<'a>(&'a Disk, u64);
    impl Drop for Thaw<'_> {
        fn drop(&mut self) {
            self.0.frozen().thaw(self.1);
        }
    }
    disk.freeze(block);
    let _thaw = Thaw(disk, block);
    let writes = wait_idle(disk, block)?;
    let copied = match copy_once(disk, copies, block, len, dest) {
        Ok(copied) => copied,
        Err(e) => {
            log::warn!(
                "image {}: block {block}: frozen sync to {}:{} failed: {e}",
                disk.name(),
                dest.node,
                dest.tier
            );
            return None;
        }
    };
    let mut one = vec![(block, dest.clone(), writes)];
    match commit(disk, &mut one) {
        Ok((1, _)) => Some((copied, writes)),
        _ => None,
    }
}

fn wait_idle(disk: &Disk, block: u64) -> Option<u32> {
    let deadline = Instant::now() + IDLE_WAIT;
    loop {
        if let Some(writes) = disk.writes().idle(block) {
            return Some(writes);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// An in-sync copy to read from: this node's first, then a reachable peer's.
fn source_of(disk: &Disk, copies: &dyn Copies, block: u64) -> Option<Location> {
    let meta = disk.meta();
    let locations = meta.table.locations(block)?;
    let mut in_sync = locations.iter().filter(|l| l.synced);
    let local = in_sync.clone().find(|l| &l.node == disk.me());
    local
        .or_else(|| in_sync.find(|l| copies.reachable(&l.node)))
        .cloned()
}

/// Copies waiting for their commit: block, destination, and the block's write count the copy
/// is valid for.
type Batch = Vec<(u64, Location, u32)>;

/// Marks the batch's copies in sync where no write started since they were copied; returns
/// (committed, the items that raced a write). The check runs under the metadata write lock,
/// which every write takes (shared) while it chooses its targets and counts itself started.
fn commit(disk: &Disk, batch: &mut Batch) -> Result<(u64, Batch), SyncError> {
    if batch.is_empty() {
        return Ok((0, Vec::new()));
    }
    let items = std::mem::take(batch);
    disk.update_meta(|meta| {
        let (mut committed, mut raced) = (0, Vec::new());
        for (block, dest, writes) in &items {
            if disk.writes().idle(*block) != Some(*writes) {
                raced.push((*block, dest.clone(), *writes));
                continue;
            }
            let range = BlockRange::new(*block, block + 1).map_err(|e| e.to_string())?;
            meta.table
                .update(range, |locations| {
                    for l in locations.iter_mut() {
                        if l.node == dest.node && l.tier == dest.tier {
                            l.synced = true;
                        }
                    }
                })
                .map_err(|e| e.to_string())?;
            committed += 1;
        }
        Ok((committed, raced))
    })
    .map_err(SyncError::Meta)
}

fn throttle(rate: Option<u64>, bytes: u64, started: Instant) {
    let Some(rate) = rate.filter(|&r| r > 0) else {
        return;
    };
    let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        thread::sleep(wait);
    }
}
