//! Completing a request: reap finished operations, apply the acknowledgement rule to the
//! copies a write reached, mark what migration and flushes must know, and put the head on the
//! used ring exactly once.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

use super::{untag, InFlight, Vring, Worker};
use crate::engine::{Done, Engine};
use crate::replica::ack::{self, Outcome};

/// How long one wait for the lease lasts before the worker looks again.
const ACK_WAIT_STEP: Duration = Duration::from_millis(100);
/// How long a write waits for etcd to confirm the lease before it fails: past the guest's own
/// block-layer timeout (30 s) the wait helps nobody.
const ACK_WAIT_LIMIT: Duration = Duration::from_secs(60);

impl Worker {
    pub(super) fn reap(&mut self) -> Vec<Done> {
        let mut done = std::mem::take(&mut self.done);
        self.inline.reap(&mut done);
        if let Some(uring) = self.uring.as_mut() {
            uring.reap(&mut done);
        }
        self.remote.reap(&mut done);
        done
    }

    /// Applies finished operations; requests whose last piece finished go on the used ring.
    pub(super) fn complete(&mut self, vring: &Vring) {
        let mut done = self.reap();
        for d in done.drain(..) {
            let ok = match d.result {
                Ok(_) => true,
                Err(e) => {
                    log::error!("image {}: block I/O failed: {e}", self.disk.name());
                    false
                }
            };
            if let Some(request) = self.piece_done(d.tag, ok) {
                self.finish(vring, request);
            }
        }
        self.done = done;
    }

    /// Counts one operation of a request as done; returns the request when it was the last.
    /// A write to a copy only records whether the copy stored it: the acknowledgement rule
    /// judges the copies together when the request finishes.
    pub(super) fn piece_done(&mut self, tag: u64, ok: bool) -> Option<InFlight> {
        let (slot, copy) = untag(tag);
        let request = self.requests.get_mut(slot)?.as_mut()?;
        match request.copies.get_mut(copy.wrapping_sub(1)) {
            Some(result) => result.stored = ok,
            None if !ok => request.status_byte = VIRTIO_BLK_S_IOERR as u8,
            None => {}
        }
        request.pending -= 1;
        if request.pending > 0 {
            return None;
        }
        self.free.push(slot);
        self.requests[slot].take()
    }

    /// Applies the acknowledgement rule to each block a write touched: copies that missed the
    /// write are marked out of sync (durably) before the guest hears of it.
    fn settle_copies(&self, request: &mut InFlight) {
        for (i, &(block, first)) in request.written.iter().enumerate() {
            let end = request
                .written
                .get(i + 1)
                .map_or(request.copies.len(), |w| w.1);
            let stale = match ack::decide(&request.copies[first..end]) {
                Outcome::Fail { stale } => {
                    log::error!(
                        "image {}: block {block}: no in-sync copy took the write or discard",
                        self.disk.name()
                    );
                    request.status_byte = VIRTIO_BLK_S_IOERR as u8;
                    stale
                }
                Outcome::Ack { stale } => stale,
            };
            if !stale.is_empty() {
                if let Err(e) = self.disk.mark_out_of_sync(block, &stale) {
                    log::error!(
                        "image {}: block {block}: cannot record a stale copy: {e}",
                        self.disk.name()
                    );
                    request.status_byte = VIRTIO_BLK_S_IOERR as u8;
                }
            }
            self.disk.writes().finish(block);
        }
    }

    /// Whether a write may be acknowledged: with etcd, only while this node's lease is surely
    /// valid and the device active under it. Otherwise the write waits here (its queue with
    /// it) until etcd answers again: it goes on if this node still owns the image, and fails
    /// if it was fenced meanwhile or nothing changed for [`ACK_WAIT_LIMIT`].
    fn may_ack(&self) -> bool {
        if self.disk.may_ack_now() {
            return true;
        }
        let started = Instant::now();
        let mut warned = false;
        while !self.disk.may_ack(ACK_WAIT_STEP) {
            if self.disk.is_fenced() || started.elapsed() > ACK_WAIT_LIMIT {
                return false;
            }
            if !warned {
                log::warn!(
                    "image {}: the node's lease is in doubt; writes wait",
                    self.disk.name()
                );
                warned = true;
            }
            let lease_ok = self.disk.store().lease().is_some_and(|l| l.is_valid());
            if lease_ok && !self.disk.is_active() {
                crate::ownership::ensure_serving(&self.disk);
            }
        }
        true
    }

    pub(super) fn finish(&mut self, vring: &Vring, mut request: InFlight) {
        for (copy, block, file) in &request.volume_writes {
            if request.copies.get(copy - 1).is_some_and(|c| c.stored) {
                self.disk.dirty().mark(*block, file);
            }
        }
        if !request.written.is_empty() {
            self.settle_copies(&mut request);
        }
        let ok = request.status_byte == VIRTIO_BLK_S_OK as u8;
        let m = self.disk.metrics();
        m.in_flight.fetch_sub(1, Relaxed);
        m.latency.record(request.started.elapsed());
        if !ok {
            m.errors.fetch_add(1, Relaxed);
        }
        crate::virtio::memory::mark_filled(&self.log, &*request.mem, &request.fills);
        if request.flush.is_some() {
            let failed: Vec<_> = request
                .copies
                .iter()
                .filter(|c| !c.stored)
                .map(|c| c.location.node.clone())
                .collect();
            if !failed.is_empty() {
                match self.disk.flush_failed(&failed) {
                    Ok(true) => {}
                    Ok(false) => request.status_byte = VIRTIO_BLK_S_IOERR as u8,
                    Err(e) => {
                        log::error!("image {}: {e}", self.disk.name());
                        request.status_byte = VIRTIO_BLK_S_IOERR as u8;
                    }
                }
            }
        }
        // Every answer, reads too, waits for a lease in doubt: a replaced owner cut off from
        // etcd must not serve its old view either.
        if self.disk.store().is_shared() && !self.may_ack() {
            request.status_byte = VIRTIO_BLK_S_IOERR as u8;
        }
        let ok = request.status_byte == VIRTIO_BLK_S_OK as u8;
        if let (true, Some(ticket)) = (ok, &request.flush) {
            self.disk.dirty().clear(ticket);
        }
        let (mem, status, byte) = (&*request.mem, request.status, request.status_byte);
        let used = match crate::virtio::memory::write_byte(&self.log, mem, status, byte) {
            true if ok => request.used_len,
            true => 1,
            false => 0,
        };
        self.put_used(vring, request.head, used);
    }
}
