//! Heat tiering (`--tier auto`): the node places an image's blocks by how often they are
//! read and written, the hot ones on the RAM tier within a node-wide budget
//! (`serve --ram-budget`), the rest on the volume tier.
//!
//! - [`heat`]: per-block access counts, bumped on the request path without a locked
//!   instruction and halved by the mover every decay interval.
//! - [`policy`]: which blocks belong in RAM (a pure function, property-tested).
//! - [`mover`]: the background thread's work, moving a block with the same copy-then-switch
//!   steps as `location add` / `sync` / `location rm`, so no write is lost mid-move and the
//!   guest never pauses.
//!
//! The setting is image metadata, stored with the limits and the cache (`qos/<id>` in etcd,
//! the image's JSON file on a single node), so it follows the image. `Tier` still names where
//! a copy is: auto is how copies are chosen, not a place.

pub mod heat;
pub mod mover;
pub mod policy;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::image::{ImageMeta, NodeId, Tier};
use heat::Heat;

/// How an image's copies on its owner are placed between tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierMode {
    /// The node moves the image's local copies between RAM and volume by heat.
    Auto,
    /// Copies stay where the operator put them (`location add/rm`); the default.
    Manual,
}

impl FromStr for TierMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(TierMode::Auto),
            "manual" => Ok(TierMode::Manual),
            other => Err(format!(
                "'{other}' is not a tiering mode: use auto (blocks move by heat) or manual \
                 (copies stay where `location add/rm` put them)"
            )),
        }
    }
}

/// `image create --tier`: a tier, or `auto` (blocks start on the volume tier and move by heat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierChoice {
    Fixed(Tier),
    Auto,
}

impl FromStr for TierChoice {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(TierChoice::Auto),
            other => other
                .parse()
                .map(TierChoice::Fixed)
                .map_err(|_| format!("'{other}' is not a tier: use ram, volume or auto")),
        }
    }
}

impl TierChoice {
    /// The tier the image's blocks are created on: an auto image starts cold, on volume.
    pub fn tier(self) -> Tier {
        match self {
            TierChoice::Fixed(tier) => tier,
            TierChoice::Auto => Tier::Volume,
        }
    }

    pub fn is_auto(self) -> bool {
        self == TierChoice::Auto
    }
}

/// The node's tiering settings (`serve --ram-budget`, `--tier-rate` and the test knobs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TieringConfig {
    /// Bytes of RAM-tier blocks that auto images may hold on this node, all together.
    pub ram_budget: u64,
    /// Bytes per second the mover copies (promotions and demotions together).
    pub rate: u64,
    /// How often the mover plans (and how long a plan's moves may take before it plans again).
    pub interval: Duration,
    /// How often every block's heat is halved: a block untouched for about log2(heat) of
    /// these is cold again.
    pub decay: Duration,
}

/// Default mover rate: a 4 MiB block every 60 ms, small beside a volume's bandwidth and a
/// guest's own I/O, and enough to fill a 1 GiB budget in about 16 s.
pub const DEFAULT_RATE: u64 = 64 << 20;
/// Default planning interval: heat a second old is recent enough to act on.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Default decay: halving every 30 s keeps a block hot for a few minutes after its working
/// set moved on, so a pause in a guest's I/O does not send its blocks back to the volume.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(30);
/// Lowest mover rate: one 4 KiB page per second; below it nothing would ever move.
pub const MIN_RATE: u64 = 4 << 10;

impl Default for TieringConfig {
    fn default() -> Self {
        TieringConfig {
            ram_budget: 0,
            rate: DEFAULT_RATE,
            interval: DEFAULT_INTERVAL,
            decay: DEFAULT_DECAY,
        }
    }
}

/// One image's tiering state on this node: heat, the lock a move holds, and what moved.
pub struct ImageTiering {
    heat: Heat,
    /// Held for one block's move, and by an operator's `location add/rm` while it turns
    /// auto off, so the mover never finishes a move after the operator took over.
    moves: Mutex<()>,
    pub promotions: AtomicU64,
    pub demotions: AtomicU64,
    pub bytes_moved: AtomicU64,
}

impl ImageTiering {
    pub fn new(blocks: u64, auto: bool) -> Self {
        ImageTiering {
            heat: Heat::new(blocks, auto),
            moves: Mutex::new(()),
            promotions: AtomicU64::new(0),
            demotions: AtomicU64::new(0),
            bytes_moved: AtomicU64::new(0),
        }
    }

    pub fn heat(&self) -> &Heat {
        &self.heat
    }

    pub fn lock_moves(&self) -> MutexGuard<'_, ()> {
        self.moves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `stats`' figures: the mode, blocks per tier on this node, and what the mover did.
    pub fn json(&self, meta: &ImageMeta, me: &NodeId) -> Value {
        let counts = TierCounts::of(meta, me);
        json!({
            "mode": mode_of(meta),
            "blocks": {"ram": counts.ram, "volume": counts.volume},
            "ram_bytes": counts.ram_bytes,
            "promotions": self.promotions.load(Relaxed),
            "demotions": self.demotions.load(Relaxed),
            "bytes_moved": self.bytes_moved.load(Relaxed),
        })
    }

    pub fn figures(&self, meta: &ImageMeta, me: &NodeId) -> TierFigures {
        TierFigures {
            auto: is_auto(meta),
            counts: TierCounts::of(meta, me),
            promotions: self.promotions.load(Relaxed),
            demotions: self.demotions.load(Relaxed),
            bytes_moved: self.bytes_moved.load(Relaxed),
        }
    }
}

/// Whether the node moves this image's blocks: auto, and not striped (a stripe is the
/// operator's placement: moving copies between tiers would break its members).
pub fn is_auto(meta: &ImageMeta) -> bool {
    meta.qos.tiering == Some(TierMode::Auto) && meta.stripe.is_none()
}

pub fn mode_of(meta: &ImageMeta) -> &'static str {
    if meta.qos.tiering == Some(TierMode::Auto) {
        "auto"
    } else {
        "manual"
    }
}

/// Blocks with an in-sync copy on this node, per tier (a block with both counts on both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierCounts {
    pub ram: u64,
    pub volume: u64,
    /// Bytes of blocks with any copy (in sync or filling) on this node's RAM tier: what
    /// they take of the budget.
    pub ram_bytes: u64,
}

impl TierCounts {
    pub fn of(meta: &ImageMeta, me: &NodeId) -> TierCounts {
        let mut counts = TierCounts::default();
        for block in 0..meta.blocks() {
            let locations = meta.table.locations(block).unwrap_or(&[]);
            let here = |tier: Tier| {
                locations
                    .iter()
                    .filter(|l| &l.node == me && l.tier == tier)
                    .map(|l| l.synced)
                    .next()
            };
            if here(Tier::Ram) == Some(true) {
                counts.ram += 1;
            }
            if here(Tier::Volume) == Some(true) {
                counts.volume += 1;
            }
            if here(Tier::Ram).is_some() {
                counts.ram_bytes += meta.block_len(block);
            }
        }
        counts
    }
}

/// One image's tiering figures for a Prometheus scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct TierFigures {
    pub auto: bool,
    pub counts: TierCounts,
    pub promotions: u64,
    pub demotions: u64,
    pub bytes_moved: u64,
}

/// Each block's tier on this node, for `image info`: `ram`, `volume`, `both` (mid-move, or
/// the operator's two copies) or null (no in-sync copy here).
pub fn block_tier(meta: &ImageMeta, me: &NodeId, block: u64) -> Option<&'static str> {
    let locations = meta.table.locations(block)?;
    let synced = |tier: Tier| {
        locations
            .iter()
            .any(|l| &l.node == me && l.tier == tier && l.synced)
    };
    match (synced(Tier::Ram), synced(Tier::Volume)) {
        (true, true) => Some("both"),
        (true, false) => Some("ram"),
        (false, true) => Some("volume"),
        (false, false) => None,
    }
}

#[cfg(test)]
mod tests;
