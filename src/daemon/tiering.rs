//! The node's tiering mover thread (see `tiering::mover`), and what `stats`, `image info`
//! and a scrape show of it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::{json, Value};

use super::Daemon;
use crate::disk::Disk;
use crate::tiering::mover::Mover;
use crate::tiering::{is_auto, TierCounts};

/// How long the mover waits before it plans again after a round that had nothing left to do.
fn pause(mover: &Mover, cut_short: bool) -> Duration {
    if cut_short {
        // The plan was not done when its time ran out: go on at once (the rate paces it).
        Duration::ZERO
    } else {
        mover.config().interval
    }
}

impl Daemon {
    /// Starts the mover: one thread for the node, ending with the daemon.
    pub fn start_tiering(self: &Arc<Self>) -> std::io::Result<()> {
        let daemon = Arc::downgrade(self);
        let mut mover = Mover::new(self.config.tiering);
        std::thread::Builder::new()
            .name("tiering".into())
            .spawn(move || loop {
                let Some((disks, peers)) = this_nodes(&daemon) else {
                    return;
                };
                let report = mover.round(&disks, &*peers);
                if report.moved() {
                    log::info!(
                        "tiering: {} promoted, {} demoted, {} tidied, {} failed, {} bytes \
                         copied; RAM of auto images {} of {} bytes",
                        report.promoted,
                        report.demoted,
                        report.tidied,
                        report.failed,
                        report.bytes,
                        report.ram_used,
                        mover.config().ram_budget
                    );
                }
                std::thread::sleep(pause(&mover, report.deferred > 0));
            })?;
        Ok(())
    }

    /// The node's tiering figures for `stats`: the budget and what auto images use of it.
    pub(super) fn tiering_json(&self) -> Value {
        let used: u64 = self
            .lock()
            .values()
            .filter(|e| is_auto(&e.disk.meta()) && e.disk.owned_here())
            .map(|e| TierCounts::of(&e.disk.meta(), e.disk.me()).ram_bytes)
            .sum();
        json!({"ram_budget": self.config.tiering.ram_budget, "ram_used": used})
    }
}

/// The images this node has, and its peers; None once the daemon is gone.
fn this_nodes(daemon: &Weak<Daemon>) -> Option<(Vec<Arc<Disk>>, Arc<crate::peers::Peers>)> {
    let daemon = daemon.upgrade()?;
    let disks = daemon.lock().values().map(|e| e.disk.clone()).collect();
    Some((disks, daemon.peers.clone()))
}

/// `stats`' per-image tiering figures.
pub(super) fn image_json(disk: &Disk) -> Value {
    disk.tiering().json(&disk.meta(), disk.me())
}
