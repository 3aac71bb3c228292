//! The split virtqueue's rings (virtio 1.x, 2.7), read and written through [`HostMemory`]
//! instead of virtio-queue's generic accessors. virtio-queue's `Queue` stays the keeper of the
//! queue's state (`next_avail`, `next_used`, addresses, EVENT_IDX): vhost-user-backend reads
//! it for GET_VRING_BASE and the in-flight region's replay relies on it, so the worker moves
//! those indices through `set_next_avail`/`set_next_used` as it goes.
//!
//! Layout: avail ring `flags u16, idx u16, ring[size] u16, used_event u16`; used ring
//! `flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16`. Indices are free-running
//! `u16`s: a ring position is the index modulo the size.

use std::sync::atomic::Ordering;

use virtio_queue::QueueT;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use super::chain::{self, Chain};
use super::memory::HostMemory;

const RING_HEADER: u64 = 4;
const AVAIL_ENTRY: u64 = 2;
const USED_ENTRY: u64 = 8;

/// Where one queue's rings are, as the frontend set them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rings {
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    size: u16,
}

/// Why popping stopped for good: the driver broke the ring, not a single request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("avail ring at {0:#x} is not in guest memory")]
    AvailUnreadable(u64),
    #[error("avail index {avail} is more than the queue size {size} ahead of {next}")]
    AvailTooFarAhead { avail: u16, next: u16, size: u16 },
    #[error("used ring at {0:#x} is not in guest memory")]
    UsedUnwritable(u64),
    #[error("head {head} is past the queue size {size}")]
    BadHead { head: u16, size: u16 },
}

impl Rings {
    /// The rings of a queue (`None` while it has no size). Readiness is the caller's to check
    /// before popping, not before completing: vhost-user-backend marks a queue not ready
    /// before it asks the backend to stop it (GET_VRING_BASE), and the requests still in
    /// flight then must reach the used ring.
    pub fn of(queue: &impl QueueT) -> Option<Rings> {
        (queue.size() > 0).then(|| Rings {
            desc_table: GuestAddress(queue.desc_table()),
            avail: GuestAddress(queue.avail_ring()),
            used: GuestAddress(queue.used_ring()),
            size: queue.size(),
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// How many heads the driver made available past `next` (acquire: the entries and their
    /// descriptors are read after the index).
    pub fn available<M: GuestMemoryBackend>(
        &self,
        mem: &HostMemory<M>,
        next: u16,
    ) -> Result<u16, RingError> {
        let idx = self.avail.unchecked_add(2);
        let avail = mem
            .load_u16(idx, Ordering::Acquire)
            .ok_or(RingError::AvailUnreadable(idx.0))?;
        let count = avail.wrapping_sub(next);
        if count > self.size {
            return Err(RingError::AvailTooFarAhead {
                avail,
                next,
                size: self.size,
            });
        }
        Ok(count)
    }

    /// The head the avail ring names at free-running index `pos`.
    pub fn avail_head<M: GuestMemoryBackend>(
        &self,
        mem: &HostMemory<M>,
        pos: u16,
    ) -> Result<u16, RingError> {
        let at = self
            .avail
            .unchecked_add(RING_HEADER + u64::from(pos % self.size) * AVAIL_ENTRY);
        mem.load_u16(at, Ordering::Relaxed)
            .ok_or(RingError::AvailUnreadable(at.0))
    }

    /// The descriptors of the chain at `head`, under virtio-queue's rules (see `chain`).
    pub fn chain<M: GuestMemoryBackend>(&self, mem: &HostMemory<M>, head: u16) -> Chain {
        chain::descriptors(mem, self.desc_table, self.size, head)
    }

    /// Puts `head` at free-running used index `pos` and publishes `pos + 1` (release: the
    /// element, the status byte and the data are visible before the index); returns it.
    pub fn put_used<M: GuestMemoryBackend>(
        &self,
        mem: &HostMemory<M>,
        pos: u16,
        head: u16,
        len: u32,
    ) -> Result<u16, RingError> {
        if head >= self.size {
            return Err(RingError::BadHead {
                head,
                size: self.size,
            });
        }
        let at = self
            .used
            .unchecked_add(RING_HEADER + u64::from(pos % self.size) * USED_ENTRY);
        // `struct virtq_used_elem { le32 id; le32 len; }` as one little-endian u64.
        let elem = (u64::from(head) | u64::from(len) << 32).to_le();
        if !mem.write_obj(elem, at) {
            return Err(RingError::UsedUnwritable(at.0));
        }
        let next = pos.wrapping_add(1);
        let idx = self.used.unchecked_add(2);
        if !mem.store_u16(idx, next, Ordering::Release) {
            return Err(RingError::UsedUnwritable(idx.0));
        }
        Ok(next)
    }

    /// The driver's `used_event` (EVENT_IDX): it wants an interrupt once the used index
    /// passes it.
    pub fn used_event<M: GuestMemoryBackend>(&self, mem: &HostMemory<M>) -> Option<u16> {
        let at = self
            .avail
            .unchecked_add(RING_HEADER + u64::from(self.size) * AVAIL_ENTRY);
        mem.load_u16(at, Ordering::Relaxed)
    }
}

/// Whether moving the used index from `old` to `new` crossed the driver's `event` (virtio
/// 2.7.10, `vring_need_event`), in wrapping arithmetic.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;
