//! The mover: one background thread per node that plans with [`policy`] and moves blocks of
//! the auto images this node owns between its own RAM and volume tiers.
//!
//! A move is `location add` + `sync` + `location rm`, with the same code, on a batch of one
//! image's blocks (so a round costs three metadata saves, not three per block):
//! 1. add a copy on the target tier to each block, out of sync (saved before it takes
//!    effect; guest writes reach it from then on);
//! 2. sync them (`replica::sync`: copies only if the checksums differ, and commits only if no
//!    guest write started since it looked, so an old value never lands over a guest write;
//!    a block that writes keep racing is copied with its writes held for that one block);
//! 3. remove the copy on the source tier of each block whose new copy is in sync (never the
//!    last in-sync copy) and free its file; a new copy that could not be filled goes instead.
//!
//! A crash between any two steps leaves a block with two copies here, one of them possibly
//! out of sync: every round finishes or undoes such a move ("tidy"). The RAM-tier copies of
//! auto images, filling or in sync, never take more than the budget: demotions run first,
//! and promotions start only for blocks that fit. A round copies at most rate x interval
//! bytes (at full speed, then it waits: the rate holds on average). Only the owner moves,
//! and only the copies on itself; copies on other nodes stay where they are.

use std::io;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::policy::{self, Candidate, MIN_PROMOTE_HEAT};
use super::{is_auto, TierMode, TieringConfig};
use crate::copies::DiskCopies;
use crate::disk::Disk;
use crate::image::range::RangeError;
use crate::image::{BlockRange, Placement, Tier};
use crate::peers::Transport;
use crate::placement::{self, PlacementError};
use crate::replica::sync::{self, SyncError};

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error(transparent)]
    Range(#[from] RangeError),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error("sync: {0}")]
    Sync(#[from] SyncError),
    #[error("cannot create the block directory: {0}")]
    Dir(#[source] io::Error),
    #[error("the new copy could not be brought in sync (the daemon's log says why); it was taken away again")]
    NotSynced,
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundReport {
    pub promoted: u64,
    pub demoted: u64,
    /// Half-done moves finished or undone (a copy on the other tier taken away).
    pub tidied: u64,
    /// Bytes copied.
    pub bytes: u64,
    pub failed: u64,
    /// Moves of the plan left for the next round: the round's allowance (rate x interval)
    /// was used up.
    pub deferred: u64,
    /// RAM-tier bytes of auto images on this node after the round.
    pub ram_used: u64,
}

impl RoundReport {
    pub fn moved(&self) -> bool {
        self.promoted + self.demoted + self.tidied + self.failed > 0
    }
}

pub struct Mover {
    config: TieringConfig,
    /// When the rate allows the next copy.
    paced_until: Instant,
    last_decay: Instant,
}

/// A block with a copy on both of this node's tiers: the copy on `extra` goes unless the
/// plan moves the block there.
struct Double {
    image: usize,
    block: u64,
    extra: Tier,
}

impl Mover {
    pub fn new(config: TieringConfig) -> Mover {
        let now = Instant::now();
        Mover {
            config,
            paced_until: now,
            last_decay: now,
        }
    }

    pub fn config(&self) -> &TieringConfig {
        &self.config
    }

    /// One round over `disks` (this node's images): heat follows each image's setting,
    /// decays when due, then the plan's moves run, for at most one interval.
    pub fn round(&mut self, disks: &[Arc<Disk>], peers: &dyn Transport) -> RoundReport {
        let started = Instant::now();
        for disk in disks {
            disk.tiering().heat().set_on(is_auto(&disk.meta()));
        }
        let auto: Vec<&Arc<Disk>> = disks.iter().filter(|d| movable(d)).collect();
        if started.duration_since(self.last_decay) >= self.config.decay {
            auto.iter().for_each(|d| d.tiering().heat().decay());
            self.last_decay = started;
        }
        let (candidates, doubles) = survey(&auto);
        let plan = policy::plan(&candidates, self.config.ram_budget);
        let mut report = RoundReport::default();
        let planned = |image: usize, block: u64| {
            plan.promote
                .iter()
                .chain(&plan.demote)
                .any(|c| c.image == image && c.block == block)
        };
        for double in doubles.iter().filter(|d| !planned(d.image, d.block)) {
            match drop_copy(auto[double.image], double.block, double.extra) {
                Ok(true) => report.tidied += 1,
                Ok(false) => {}
                Err(e) => {
                    report.failed += 1;
                    log::warn!(
                        "image {}: block {}: cannot take the copy on {} away: {e}",
                        auto[double.image].name(),
                        double.block,
                        double.extra
                    );
                }
            }
        }
        // Each round copies at most a round's worth of the rate: the rest waits for the next
        // plan, made with fresher heat.
        let mut allowance = self
            .config
            .rate
            .saturating_mul(self.config.interval.as_millis() as u64)
            / 1000;
        let demote = take_allowance(&plan.demote, &mut allowance, &mut report.deferred);
        for (image, blocks) in by_image(&demote) {
            self.move_batch(auto[image], peers, &blocks, Tier::Volume, &mut report);
        }
        // Recounted from the metadata, not trusted from the plan: the budget is a promise.
        let mut room = self.config.ram_budget.saturating_sub(ram_used(&auto));
        let fitting: Vec<Candidate> = plan
            .promote
            .iter()
            .filter(|c| {
                let fits = c.len <= room;
                if fits {
                    room -= c.len;
                }
                fits
            })
            .copied()
            .collect();
        let promote = take_allowance(&fitting, &mut allowance, &mut report.deferred);
        for (image, blocks) in by_image(&promote) {
            self.move_batch(auto[image], peers, &blocks, Tier::Ram, &mut report);
        }
        report.ram_used = ram_used(&auto);
        report
    }

    /// Moves a batch of one image's blocks, paced by the rate.
    fn move_batch(
        &mut self,
        disk: &Disk,
        peers: &dyn Transport,
        blocks: &[u64],
        to: Tier,
        report: &mut RoundReport,
    ) {
        if let Some(wait) = self.paced_until.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        match move_blocks(disk, peers, blocks, to) {
            Ok(moved) => {
                let t = disk.tiering();
                let (counter, mine) = match to {
                    Tier::Ram => (&t.promotions, &mut report.promoted),
                    Tier::Volume => (&t.demotions, &mut report.demoted),
                };
                let n = moved.blocks.len() as u64;
                counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                *mine += n;
                t.bytes_moved
                    .fetch_add(moved.bytes, std::sync::atomic::Ordering::Relaxed);
                report.bytes += moved.bytes;
                report.failed += moved.failed.len() as u64;
                if !moved.failed.is_empty() {
                    log::warn!(
                        "image {}: blocks {:?}: move to {to} failed: {}",
                        disk.name(),
                        moved.failed,
                        MoveError::NotSynced
                    );
                }
                let cost =
                    Duration::from_secs_f64(moved.bytes as f64 / self.config.rate.max(1) as f64);
                self.paced_until = self.paced_until.max(Instant::now()) + cost;
            }
            Err(e) => {
                report.failed += blocks.len() as u64;
                log::warn!(
                    "image {}: blocks {blocks:?}: move to {to} failed: {e}",
                    disk.name()
                );
            }
        }
    }
}

/// The head of `list` whose lengths fit in `allowance` (at least one block, so a rate below
/// a block per round still moves); the rest is counted as deferred.
fn take_allowance(list: &[Candidate], allowance: &mut u64, deferred: &mut u64) -> Vec<Candidate> {
    let mut taken = Vec::new();
    for c in list {
        if c.len <= *allowance || taken.is_empty() && *allowance > 0 {
            *allowance = allowance.saturating_sub(c.len);
            taken.push(*c);
        } else {
            *deferred += 1;
        }
    }
    taken
}

/// Candidates grouped by image, each image's blocks in order.
fn by_image(list: &[Candidate]) -> Vec<(usize, Vec<u64>)> {
    let mut groups: std::collections::BTreeMap<usize, Vec<u64>> = Default::default();
    for c in list {
        groups.entry(c.image).or_default().push(c.block);
    }
    groups.into_iter().collect()
}

/// Whether the mover may move this image's blocks now: auto, owned here and not fenced.
fn movable(disk: &Disk) -> bool {
    is_auto(&disk.meta()) && disk.owned_here() && !disk.is_fenced() && !disk.is_removed()
}

/// This node's copies of one block: per tier, whether there is one and whether it is in sync.
#[derive(Debug, Clone, Copy, Default)]
struct Here {
    ram: Option<bool>,
    volume: Option<bool>,
}

fn here(disk: &Disk, locations: &[crate::image::Location]) -> Here {
    let on = |tier: Tier| {
        locations
            .iter()
            .find(|l| &l.node == disk.me() && l.tier == tier)
            .map(|l| l.synced)
    };
    Here {
        ram: on(Tier::Ram),
        volume: on(Tier::Volume),
    }
}

/// The blocks of the auto images with an in-sync copy here, and those with a copy on both
/// tiers. A block whose local copies are all out of sync is left to resync.
fn survey(auto: &[&Arc<Disk>]) -> (Vec<Candidate>, Vec<Double>) {
    let (mut candidates, mut doubles) = (Vec::new(), Vec::new());
    for (image, disk) in auto.iter().enumerate() {
        let heat = disk.tiering().heat();
        let meta = disk.meta();
        for block in 0..meta.blocks() {
            let here = here(disk, meta.table.locations(block).unwrap_or(&[]));
            let (on_ram, extra) = match (here.ram, here.volume) {
                (Some(true), volume) => (true, volume.map(|_| Tier::Volume)),
                (ram, Some(true)) => (false, ram.map(|_| Tier::Ram)),
                _ => continue,
            };
            if let Some(extra) = extra {
                doubles.push(Double {
                    image,
                    block,
                    extra,
                });
            }
            let heat = heat.get(block);
            // A block never written reads as zeros without any I/O: RAM would not speed it.
            if !on_ram && heat >= MIN_PROMOTE_HEAT && !has_data(disk, Tier::Volume, block) {
                continue;
            }
            candidates.push(Candidate {
                image,
                block,
                heat,
                on_ram,
                len: meta.block_len(block),
            });
        }
    }
    (candidates, doubles)
}

fn has_data(disk: &Disk, tier: Tier, block: u64) -> bool {
    !matches!(disk.blocks().file_for_read(tier, block), Ok(None))
}

/// Bytes of the auto images' blocks with a copy (filling or in sync) on this node's RAM tier.
fn ram_used(auto: &[&Arc<Disk>]) -> u64 {
    auto.iter()
        .map(|d| super::TierCounts::of(&d.meta(), d.me()).ram_bytes)
        .sum()
}

/// What one batch moved.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Moved {
    pub blocks: Vec<u64>,
    /// Bytes copied (blocks whose copies already matched cost none).
    pub bytes: u64,
    /// Blocks whose new copy could not be brought in sync: it was taken away again.
    pub failed: Vec<u64>,
}

/// Moves this node's copies of `blocks` (of one image) to tier `to`, together (see the
/// module's doc): one metadata change adds the new copies, resync fills them (one commit per
/// 64 blocks of each run of consecutive blocks), one change removes the old copy of every
/// block whose new copy is in sync and takes back the new copies that are not. Blocks whose
/// copy here is no longer in sync on the other tier are left out, and so is everything when
/// the image is no longer auto or owned here.
pub fn move_blocks(
    disk: &Disk,
    peers: &dyn Transport,
    blocks: &[u64],
    to: Tier,
) -> Result<Moved, MoveError> {
    let from = other(to);
    let at = |tier| Placement {
        node: disk.me().clone(),
        tier,
    };
    let (at_from, at_to) = (at(from), at(to));
    let _moves = disk.tiering().lock_moves();
    if !movable(disk) {
        return Ok(Moved::default());
    }
    let mut todo: Vec<u64> = {
        let meta = disk.meta();
        blocks
            .iter()
            .copied()
            .filter(|&b| {
                let now = here(disk, meta.table.locations(b).unwrap_or(&[]));
                let source = match to {
                    Tier::Ram => now.volume,
                    Tier::Volume => now.ram,
                };
                source == Some(true)
            })
            .collect()
    };
    todo.sort_unstable();
    todo.dedup();
    if todo.is_empty() {
        return Ok(Moved::default());
    }
    disk.blocks()
        .files(to)
        .create_dir()
        .map_err(MoveError::Dir)?;
    disk.update_meta(|meta| {
        meta.table
            .update_blocks(todo.iter().copied(), |locations| {
                if !locations.iter().any(|l| l.at(&at_to)) {
                    locations.push(crate::image::Location {
                        node: at_to.node.clone(),
                        tier: to,
                        synced: false,
                    });
                }
            })
            .map_err(|e| e.to_string())
    })
    .map_err(PlacementError::Save)?;
    let copies = DiskCopies { disk, peers };
    let mut bytes = 0;
    for run in runs(&todo) {
        bytes += sync::sync(disk, &copies, run?, None, &mut |_, _| {})?.bytes;
    }
    let (moved, failed) = {
        // A resync that copied to a copy must not commit it after it was removed.
        let _no_resync = disk.resync_lock();
        disk.update_meta(|meta| {
            let synced_to = |b: u64| {
                meta.table
                    .locations(b)
                    .unwrap_or(&[])
                    .iter()
                    .any(|l| l.at(&at_to) && l.synced)
            };
            let (moved, failed): (Vec<u64>, Vec<u64>) =
                todo.iter().copied().partition(|&b| synced_to(b));
            meta.table
                .update_blocks(todo.iter().copied(), |locations| {
                    if locations.iter().any(|l| l.at(&at_to) && l.synced) {
                        // The new copy is in sync: the old one goes.
                        locations.retain(|l| !l.at(&at_from));
                    } else if locations.iter().any(|l| l.synced && !l.at(&at_to)) {
                        // It could not be filled: it goes, and the block stays where it was.
                        locations.retain(|l| !l.at(&at_to));
                    }
                })
                .map_err(|e| e.to_string())?;
            Ok((moved, failed))
        })
        .map_err(PlacementError::Save)?
    };
    for (tier, list) in [(from, &moved), (to, &failed)] {
        for &block in list {
            if let Err(e) = disk.blocks().free_block(tier, block) {
                log::warn!(
                    "image {}: block {block}: cannot free the copy on {tier}: {e}",
                    disk.name()
                );
            }
        }
    }
    Ok(Moved {
        blocks: moved,
        bytes,
        failed,
    })
}

/// Sorted blocks as ranges of consecutive ones.
fn runs(sorted: &[u64]) -> impl Iterator<Item = Result<BlockRange, RangeError>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let start = *sorted.get(i)?;
        let mut end = start + 1;
        i += 1;
        while sorted.get(i) == Some(&end) {
            end += 1;
            i += 1;
        }
        Some(BlockRange::new(start, end))
    })
}

fn other(tier: Tier) -> Tier {
    match tier {
        Tier::Ram => Tier::Volume,
        Tier::Volume => Tier::Ram,
    }
}

/// Removes this node's copy of `block` on `tier` and frees its file, as `location rm` does
/// (refused, with nothing changed, when it is the block's last in-sync copy). True when
/// there was one.
fn drop_copy(disk: &Disk, block: u64, tier: Tier) -> Result<bool, MoveError> {
    let range = BlockRange::new(block, block + 1)?;
    let at = Placement {
        node: disk.me().clone(),
        tier,
    };
    let removed = {
        // A resync that copied to this copy must not commit it after it was removed.
        let _no_resync = disk.resync_lock();
        placement::remove(disk, range, &at)?
    };
    if removed.is_empty() {
        return Ok(false);
    }
    if let Err(e) = disk.blocks().free_block(tier, block) {
        log::warn!(
            "image {}: block {block}: cannot free the copy on {tier}: {e}",
            disk.name()
        );
    }
    Ok(true)
}

/// An operator's `location add` or `location rm` on an auto image turns auto off: from then
/// on the image's copies stay where the operator puts them (`image set --tier auto` hands
/// them back to the mover). Call with the image's move lock held, so no move is half-way.
/// Returns whether it was auto.
pub fn end_auto_for_operator(disk: &Disk) -> Result<bool, PlacementError> {
    let was = disk
        .update_meta(|meta| {
            let was = meta.qos.tiering == Some(TierMode::Auto);
            meta.qos.tiering = None;
            Ok(was)
        })
        .map_err(PlacementError::Save)?;
    if was {
        disk.tiering().heat().set_on(false);
        log::info!(
            "image {}: a location change by the operator turned auto tiering off",
            disk.name()
        );
    }
    Ok(was)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_consecutive_blocks() {
        let got: Vec<(u64, u64)> = runs(&[0, 1, 2, 5, 7, 8])
            .map(|r| r.map(|r| (r.start(), r.end())).unwrap())
            .collect();
        assert_eq!(got, [(0, 3), (5, 6), (7, 9)]);
        assert_eq!(runs(&[]).count(), 0);
    }

    #[test]
    fn the_allowance_takes_at_least_one_block() {
        let c = |block| Candidate {
            image: 0,
            block,
            heat: 9,
            on_ram: false,
            len: 4 << 20,
        };
        let (mut allowance, mut deferred) = (1 << 20, 0);
        let taken = take_allowance(&[c(0), c(1)], &mut allowance, &mut deferred);
        assert_eq!((taken.len(), deferred, allowance), (1, 1, 0));
        let (mut allowance, mut deferred) = (9 << 20, 0);
        let taken = take_allowance(&[c(0), c(1), c(2)], &mut allowance, &mut deferred);
        assert_eq!((taken.len(), deferred), (2, 1));
    }
}
