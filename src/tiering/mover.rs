//! The mover: one background thread per node that plans with [`policy`] and moves blocks of
//! the auto images this node owns between its own RAM and volume tiers.
//!
//! A move is `location add` + `sync` + `location rm` on one block, with the same code:
//! 1. add a copy on the target tier, out of sync (saved before it takes effect; guest writes
//!    reach it from then on);
//! 2. sync it (`replica::sync`: copies only if the checksums differ, and commits only if no
//!    guest write started since it looked, so an old value never lands over a guest write;
//!    a block that writes keep racing is copied with its writes held for that one block);
//! 3. remove the copy on the source tier (refused if it were the last in-sync copy) and free
//!    its file.
//!
//! A crash between any two steps leaves a block with two copies here, one of them possibly
//! out of sync: every round finishes or undoes such a move ("tidy"). The RAM-tier copies of
//! auto images, filling or in sync, never take more than the budget: demotions run first,
//! and a promotion starts only if its block fits. Only the owner moves, and only the copies
//! on itself; copies on other nodes stay where they are.

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
    /// Moves of the plan left for the next round because the round's time was up.
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
        let deadline = started + self.config.interval;
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
        for c in &plan.demote {
            if Instant::now() >= deadline {
                report.deferred += 1;
                continue;
            }
            if self.move_one(auto[c.image], peers, c, Tier::Volume, &mut report) {
                report.demoted += 1;
            }
        }
        for c in &plan.promote {
            if Instant::now() >= deadline {
                report.deferred += 1;
                continue;
            }
            // Recounted from the metadata, not trusted from the plan: a guest may have
            // written a block since, and the budget is a promise.
            if ram_used(&auto) + c.len > self.config.ram_budget {
                continue;
            }
            if self.move_one(auto[c.image], peers, c, Tier::Ram, &mut report) {
                report.promoted += 1;
            }
        }
        report.ram_used = ram_used(&auto);
        report
    }

    /// Moves one block, paced by the rate; true when it moved.
    fn move_one(
        &mut self,
        disk: &Disk,
        peers: &dyn Transport,
        c: &Candidate,
        to: Tier,
        report: &mut RoundReport,
    ) -> bool {
        if let Some(wait) = self.paced_until.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        match move_block(disk, peers, c.block, to) {
            Ok(Some(bytes)) => {
                let t = disk.tiering();
                let counter = match to {
                    Tier::Ram => &t.promotions,
                    Tier::Volume => &t.demotions,
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                t.bytes_moved
                    .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                report.bytes += bytes;
                let cost = Duration::from_secs_f64(bytes as f64 / self.config.rate.max(1) as f64);
                self.paced_until = self.paced_until.max(Instant::now()) + cost;
                true
            }
            Ok(None) => false,
            Err(e) => {
                report.failed += 1;
                log::warn!(
                    "image {}: block {}: move to {to} failed: {e}",
                    disk.name(),
                    c.block
                );
                false
            }
        }
    }
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

/// Moves `block`'s copy on this node to tier `to` (see the module's doc). Returns the bytes
/// copied, or None when there was nothing to do (the image is no longer auto or owned here,
/// or the block changed meanwhile).
pub fn move_block(
    disk: &Disk,
    peers: &dyn Transport,
    block: u64,
    to: Tier,
) -> Result<Option<u64>, MoveError> {
    let from = other(to);
    let range = BlockRange::new(block, block + 1)?;
    let at = |tier| Placement {
        node: disk.me().clone(),
        tier,
    };
    let _moves = disk.tiering().lock_moves();
    if !movable(disk) {
        return Ok(None);
    }
    let now = {
        let meta = disk.meta();
        here(disk, meta.table.locations(block).unwrap_or(&[]))
    };
    let (present, source) = match to {
        Tier::Ram => (now.ram, now.volume),
        Tier::Volume => (now.volume, now.ram),
    };
    if source.is_none() {
        // Not here any more, or already where it was to go.
        return Ok(None);
    }
    disk.blocks()
        .files(to)
        .create_dir()
        .map_err(MoveError::Dir)?;
    if present.is_none() {
        placement::add(disk, range, &at(to))?;
    }
    let copies = DiskCopies { disk, peers };
    let report = sync::sync(disk, &copies, range, None, &mut |_, _| {})?;
    if !synced_here(disk, block, to) {
        // Leave nothing half-done that takes RAM or receives writes for no reason.
        drop_copy(disk, block, to)?;
        return Err(MoveError::NotSynced);
    }
    drop_copy(disk, block, from)?;
    Ok(Some(report.bytes))
}

fn other(tier: Tier) -> Tier {
    match tier {
        Tier::Ram => Tier::Volume,
        Tier::Volume => Tier::Ram,
    }
}

fn synced_here(disk: &Disk, block: u64, tier: Tier) -> bool {
    let meta = disk.meta();
    meta.table
        .locations(block)
        .unwrap_or(&[])
        .iter()
        .any(|l| &l.node == disk.me() && l.tier == tier && l.synced)
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
