//! Ownership moves with a live-migrated guest: the destination node takes the image over when
//! the migrated guest starts using the disk there (after the source QEMU has stopped it). The
//! new owner bumps the generation, saves, and tells every other node holding copies (the old
//! owner among them, which stops exporting: a stale owner is fenced).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::copies::DiskCopies;
use crate::disk::Disk;
use crate::image::Placement;
use crate::meta::store::StoreError;
use crate::peers::Peers;
use crate::placement;
use crate::replica::sync;

/// Whether the guest's requests may be served from this node: called when a frontend kicks
/// a queue. With etcd this makes sure this node owns the image (taking it over when a guest
/// moved here and no frontend runs it elsewhere) and holds it active under its lease; a node
/// that loses that race is fenced, and its guest gets I/O errors, never a second version of
/// the disk.
pub fn ensure_serving(disk: &Disk) -> bool {
    if disk.is_fenced() {
        return false;
    }
    if !disk.owned_here() {
        return match take_over_when_free(disk) {
            Ok(()) => !disk.is_fenced(),
            Err(e) => {
                log::error!("image {}: take-over refused: {e}", disk.name());
                if matches!(e, StoreError::Fenced { .. }) || !disk.store().is_shared() {
                    disk.fence();
                }
                false
            }
        };
    }
    if disk.is_active() {
        return true;
    }
    let _one = disk.take_over_lock();
    if disk.is_active() {
        return true;
    }
    let meta = disk.meta().clone();
    match disk.store().activate(&meta) {
        Ok(()) => {
            disk.set_active(true);
            true
        }
        Err(StoreError::Cluster(e)) => {
            log::error!("image {}: cannot mark the device active: {e}", disk.name());
            false
        }
        Err(e) => {
            log::error!("image {}: {e}", disk.name());
            disk.fence();
            false
        }
    }
}

/// Pauses between take-over attempts while the image is in use elsewhere: short at first,
/// because a live migration's source deletes its active key a few milliseconds after it
/// stopped the device (see [`device_stopped_soon`]), and the destination's guest waits for
/// every one of them; longer later, for a node whose lease must run out.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(5);
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Takes the image over; while a frontend still runs it on another node, waits for that to
/// end, at most as long as that node's lease can keep it (a node that died holds it until its
/// lease runs out; a live migration's source stops it before the destination starts).
fn take_over_when_free(disk: &Disk) -> Result<(), StoreError> {
    let wait = disk
        .store()
        .lease()
        .map_or(Duration::ZERO, |l| l.ttl() + Duration::from_secs(2));
    let started = Instant::now();
    let deadline = started + wait;
    let mut logged = false;
    let mut pause = FIRST_RETRY_PAUSE;
    loop {
        match take_over(disk) {
            Err(StoreError::InUse { node, .. }) if Instant::now() < deadline => {
                if !logged {
                    log::warn!(
                        "image {}: in use on node {node}; waiting up to {wait:?} for it to stop or its lease to run out",
                        disk.name()
                    );
                    logged = true;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
            other => {
                if logged {
                    log::info!(
                        "image {}: waited {:?} for the other node",
                        disk.name(),
                        started.elapsed()
                    );
                }
                return other;
            }
        }
    }
}

/// The frontend stopped the device here (all queues stopped: a migration's end, a reboot, a
/// disconnect): another node may take the image over from now on. Waits for etcd.
pub fn device_stopped(disk: &Disk) {
    if !disk.store().is_shared() || !disk.is_active() {
        return;
    }
    let _one = disk.take_over_lock();
    disk.set_active(false);
    deactivate(disk);
}

/// [`device_stopped`] for a frontend that waits for it: QEMU stops the device inside a live
/// migration's downtime (GET_VRING_BASE, which answers only once this returns), and the etcd
/// transaction took 16-48 ms of it (benches/README.md, "Live-migration downtime"). So the device stops serving here at once, and the active
/// key is deleted on a thread of its own a few milliseconds later; a destination that kicks
/// meanwhile finds the key still there and retries (see [`take_over_when_free`]), which only
/// delays its take-over, never lets two nodes serve.
pub fn device_stopped_soon(disk: &Arc<Disk>) {
    if !disk.store().is_shared() || !disk.is_active() {
        return;
    }
    // From here on a kick goes through `ensure_serving`, which takes the same lock.
    {
        let _one = disk.take_over_lock();
        disk.set_active(false);
    }
    let later = disk.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("stopped {}", disk.name()))
        .spawn(move || {
            let _one = later.take_over_lock();
            // The device started here again meanwhile (a failed migration resumes the
            // source): the key is its own again, keep it.
            if !later.is_active() {
                deactivate(&later);
            }
        });
    if let Err(e) = spawned {
        log::warn!("image {}: cannot start a thread: {e}", disk.name());
        let _one = disk.take_over_lock();
        if !disk.is_active() {
            deactivate(disk);
        }
    }
}

/// Deletes this node's active key of the image (under `take_over_lock`).
fn deactivate(disk: &Disk) {
    log::debug!("image {}: device stopped; deactivating", disk.name());
    let meta = disk.meta().clone();
    match disk.store().deactivate(&meta) {
        Ok(()) => log::info!(
            "image {}: device stopped; no longer active here",
            disk.name()
        ),
        Err(e) => log::warn!("image {}: cannot mark the device stopped: {e}", disk.name()),
    }
}

/// Makes this node the owner of `disk`'s image, if it is not already. Called by a queue
/// worker before it serves the first request of a guest that migrated here.
pub fn take_over(disk: &Disk) -> Result<(), StoreError> {
    let _one = disk.take_over_lock();
    let (old, me) = (disk.meta().owner.clone(), disk.me().clone());
    if old == me {
        return Ok(());
    }
    let mut current = disk.meta().clone();
    if let Some(epoch) = disk.adopted_at() {
        current.generation = epoch;
    }
    // A single node's store refuses: it owns every image it has.
    let next = disk.store().take_over(&current)?;
    let epoch = next.generation;
    disk.set_meta(next);
    if let Err(e) = disk.settle_own_lost() {
        // Serving would read a lost copy as data: give the image up instead.
        disk.fence();
        return Err(StoreError::Cluster(e));
    }
    disk.set_active(true);
    log::info!(
        "image {}: taken over from {old} (epoch {epoch})",
        disk.name()
    );
    disk.taken_over();
    Ok(())
}

/// After a take-over: copies every block to this node (on the image's tier), then drops the
/// copies on other nodes, so the guest's reads become local and the old nodes hold nothing.
/// Runs in the background; the guest keeps running meanwhile.
pub fn localize(disk: Arc<Disk>, peers: Arc<Peers>) {
    let name = disk.name().clone();
    let here = Placement {
        node: disk.me().clone(),
        tier: disk.meta().tier,
    };
    let all = match placement::range_of(&disk, None) {
        Ok(range) => range,
        Err(e) => return log::error!("image {name}: cannot localize: {e}"),
    };
    if let Err(e) = placement::add(&disk, all, &here) {
        return log::error!("image {name}: cannot add a copy here: {e}");
    }
    let copies = DiskCopies {
        disk: &disk,
        peers: &peers,
    };
    for attempt in 1..=10 {
        match sync::sync(&disk, &copies, all, None, &mut |_, _| {}) {
            Ok(report) if report.left == 0 => break,
            Ok(report) => log::info!(
                "image {name}: localizing, {} blocks left (attempt {attempt})",
                report.left
            ),
            Err(e) => log::warn!("image {name}: localizing: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    let others: Vec<Placement> = {
        let meta = disk.meta();
        let mut others: Vec<Placement> = meta
            .table
            .extents()
            .iter()
            .flat_map(|e| e.locations.iter())
            .filter(|l| !l.at(&here))
            .map(|l| Placement {
                node: l.node.clone(),
                tier: l.tier,
            })
            .collect();
        others.sort_by(|a, b| (&a.node, a.tier as u8).cmp(&(&b.node, b.tier as u8)));
        others.dedup();
        others
    };
    for other in others {
        match placement::remove(&disk, all, &other) {
            Ok(_) if other.node == *disk.me() => {
                for block in all.iter() {
                    if let Err(e) = disk.blocks().drop_copy(other.tier, block) {
                        log::warn!("image {name}: cannot free the moved copy: {e}");
                    }
                }
            }
            // Another node sees its copy go in etcd and frees the files itself.
            Ok(_) => {}
            Err(e) => log::warn!("image {name}: keeping the copy on {other}: {e}"),
        }
    }
    log::info!("image {name}: all blocks are local now");
}
