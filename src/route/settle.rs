//! Settling a request: reap finished operations, replace a failed remote read by the next
//! in-sync copy, apply the acknowledgement rule to the copies a write reached, mark what
//! flushes must know, and hand the caller one completion per request.

use std::time::{Duration, Instant};

use super::error::IoError;
use super::queue::{next_remote, tag, untag, Completion, Queue, RemoteRead, Slot, AHEAD_SLOT};
use crate::engine::{OpError, OpKind};
use crate::replica::ack::{self, Outcome};

/// How long one wait for the lease lasts before the queue looks again.
const ACK_WAIT_STEP: Duration = Duration::from_millis(100);
/// How long an answer waits for etcd to confirm the lease before it fails: past the guest's
/// own block-layer timeout (30 s) the wait helps nobody.
const ACK_WAIT_LIMIT: Duration = Duration::from_secs(60);

impl Queue {
    /// Applies finished operations, and appends to `out` every request that is now settled.
    pub fn complete(&mut self, out: &mut Vec<Completion>) {
        // Peer calls still queued leave first: an answer that comes at once (an in-process
        // transport) is then reaped here.
        self.submit_queued();
        let mut done = self.reap();
        for d in done.drain(..) {
            self.part_done(d.tag, d.result);
        }
        // A failed remote read may have gone to the next copy: its calls leave now.
        self.submit_queued();
        self.done = done;
        out.append(&mut self.finished);
    }

    /// Counts one operation of a request as done; settles the request when it was the last.
    /// A write to a copy only records whether the copy took it: the acknowledgement rule
    /// judges the copies together when the request settles. A remote read that failed goes
    /// to the next in-sync copy, if there is one.
    pub(super) fn part_done(&mut self, op: u64, result: Result<usize, OpError>) {
        let (index, part) = untag(op);
        if index == AHEAD_SLOT {
            return self.ahead_done(part, result);
        }
        let Some(request) = self.slots.get_mut(index) else {
            return;
        };
        let copy = part.checked_sub(1);
        match result {
            Ok(_) => {
                if let Some(c) = copy.and_then(|c| request.copies.get_mut(c)) {
                    c.stored = true;
                }
                if let Some(read) = copy.and_then(|c| request.reads.get(c)) {
                    fill_cache(&self.disk, read);
                }
            }
            Err(error) => {
                if let Some(read) = copy.filter(|_| !request.reads.is_empty()) {
                    if self.read_elsewhere(index, read, &error) {
                        return;
                    }
                }
                let Some(request) = self.slots.get_mut(index) else {
                    return;
                };
                let block = copy
                    .and_then(|c| request.reads.get(c).map(|r| r.block))
                    .unwrap_or_default();
                match copy.and_then(|c| request.copies.get_mut(c)) {
                    // The acknowledgement rule decides what a failed copy means.
                    Some(c) => {
                        c.stored = false;
                        if let Some(n) = self.logs.allow() {
                            log::warn!(
                                "image {}: copy on {} failed: {error} ({n} errors)",
                                self.disk.name(),
                                c.location.node
                            );
                        }
                    }
                    None if request.flush.is_some() && copy.is_none() => {
                        self.fail(index, IoError::Flush(error));
                    }
                    None => self.fail(
                        index,
                        IoError::Op {
                            block,
                            source: error,
                        },
                    ),
                }
            }
        }
        let Some(request) = self.slots.get_mut(index) else {
            return;
        };
        request.pending -= 1;
        if request.pending == 0 {
            if let Some(request) = self.slots.remove(index) {
                self.settle(request);
            }
        }
    }

    /// Sends a failed remote read piece to the next in-sync copy not yet tried; false when
    /// there is none (the request then fails).
    fn read_elsewhere(&mut self, index: usize, read: usize, error: &OpError) -> bool {
        let Some(piece) = self
            .slots
            .get_mut(index)
            .and_then(|r| r.reads.get_mut(read))
        else {
            return false;
        };
        let next = {
            let meta = self.disk.meta();
            meta.table
                .locations(piece.block)
                .and_then(|locations| next_remote(locations, &piece.tried, &*self.peers))
        };
        let Some(location) = next else {
            return false;
        };
        if let Some(n) = self.logs.allow() {
            log::warn!(
                "image {}: block {}: {error}; reading from {} instead ({n} errors)",
                self.disk.name(),
                piece.block,
                location.node
            );
        }
        piece.tried.push(location.node.clone());
        let (block, offset) = (piece.block, piece.offset);
        let bufs = crate::engine::IoVecs(piece.bufs.0.clone());
        let target = self.peer_target(&location, block);
        // The failed operation's count carries over to this one.
        if let Some(request) = self.slots.get_mut(index) {
            request.pending -= 1;
        }
        let op = tag(index, read + 1);
        self.push(op, location.tier, OpKind::Read, target, offset, bufs);
        true
    }

    /// Applies the acknowledgement rule to each block a write or discard touched: copies that
    /// missed it are marked out of sync (durably) before the guest hears of it.
    fn settle_copies(&mut self, request: &mut Slot) {
        for (i, &(block, first)) in request.written.iter().enumerate() {
            let end = request
                .written
                .get(i + 1)
                .map_or(request.copies.len(), |w| w.1);
            let stale = match ack::decide(&request.copies[first..end]) {
                Outcome::Fail { stale } => {
                    request.error.get_or_insert(IoError::NoCopyTookIt(block));
                    stale
                }
                Outcome::Ack { stale } => stale,
            };
            if !stale.is_empty() {
                if let Err(e) = self.disk.mark_out_of_sync(block, &stale) {
                    request
                        .error
                        .get_or_insert(IoError::metadata("cannot record a stale copy", e));
                }
            }
            self.disk.writes().finish(block);
        }
    }

    /// Whether an answer may be given: with etcd, only while this node's lease is surely
    /// valid and the device active under it. Otherwise the answer waits here (its queue with
    /// it) until etcd answers again: it goes out if this node still owns the image, and fails
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
                    "image {}: the node's lease is in doubt; answers wait",
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

    /// The request's last operation is done: decide its outcome and queue its completion.
    fn settle(&mut self, mut request: Slot) {
        for (copy, block, file) in &request.volume_writes {
            if request.copies.get(copy - 1).is_some_and(|c| c.stored) {
                self.disk
                    .blocks()
                    .written(crate::image::Tier::Volume, *block, file);
            }
        }
        if !request.written.is_empty() {
            self.settle_copies(&mut request);
        }
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
                    Ok(false) => {
                        request.error.get_or_insert(IoError::NotDurable);
                    }
                    Err(e) => {
                        request.error.get_or_insert(IoError::metadata(
                            "cannot record the copies a flush missed",
                            e,
                        ));
                    }
                }
            }
        }
        // Every answer, reads too, waits for a lease in doubt: a replaced owner cut off from
        // etcd must not serve its old view either.
        if request.error.is_none() && self.disk.store().is_shared() && !self.may_ack() {
            request.error = Some(IoError::LeaseInDoubt);
        }
        if let (None, Some(ticket)) = (&request.error, &request.flush) {
            self.disk.blocks().flushed(ticket);
        }
        let m = &self.counters;
        m.settled.add(1);
        if let Some(started) = request.started {
            m.latency.record(started.elapsed());
        }
        let result = match request.error.take() {
            None => Ok(()),
            Some(error) => {
                // Counted once the outcome is final: a failed flush or an answer withheld
                // counts like any other failure.
                m.errors.add(1);
                if let Some(n) = self.logs.allow() {
                    log::error!(
                        "image {}: request failed: {error} ({n} errors)",
                        self.disk.name()
                    );
                }
                Err(error)
            }
        };
        self.finished.push(Completion {
            tag: request.tag,
            result,
        });
    }
}

/// Keeps what a remote read brought in the cache, unless a write to its block started
/// since it was issued (checked under the cache's lock, see `cache`).
fn fill_cache(disk: &crate::disk::Disk, read: &RemoteRead) {
    let Some(fill) = read.fill else {
        return;
    };
    let writes = disk.writes();
    let unchanged = || writes.idle(read.block) == Some(fill.writes);
    disk.cache().fill(
        fill.epoch,
        read.block,
        read.offset,
        &read.bufs,
        false,
        &unchanged,
    );
}
