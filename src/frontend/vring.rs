//! The driver side of a split virtqueue (virtio 1.x, section 2.7) laid out in [`GuestMem`].
//!
//! The ring knows descriptors, the available and used rings, and event suppression; it knows
//! nothing about block requests. Two modes share it:
//! - managed chains: descriptors come from a free list and go back when the used element for
//!   their head arrives; a used element for a head that is not in flight is an error, because a
//!   backend under test that returns one is broken;
//! - raw chains: a test writes arbitrary descriptors at fixed table indices of an idle ring and
//!   gets the used element back unchecked, whatever its id.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use super::memory::{BumpAlloc, GuestMem};
use super::{Error, Result};

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (otherwise it reads it).
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Used ring flag: the device does not want kicks (without EVENT_IDX).
const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// Size of one descriptor in the table.
pub const DESC_SIZE: u64 = 16;

/// Largest queue size a split ring may have (virtio 1.x: 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// One descriptor exactly as it is written to the table: nothing is checked, on purpose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest physical address of the buffer (or of an indirect table).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VRING_DESC_F_*` bits.
    pub flags: u16,
    /// Table index of the next descriptor when `flags` has NEXT.
    pub next: u16,
}

impl RawDesc {
    /// The 16 little-endian bytes of the descriptor.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// An element of the used ring: the head the device finished and the bytes it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index, as the device reported it.
    pub id: u32,
    /// Bytes written into device-writable buffers, as the device reported it.
    pub len: u32,
}

/// Guest addresses of the three parts of a split ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table (16 bytes per entry).
    pub desc: u64,
    /// Available ring (driver area).
    pub avail: u64,
    /// Used ring (device area).
    pub used: u64,
}

/// True when a driver that moved an index from `old` to `new` must notify the other side, which
/// asked to be told once the index passes `event` (virtio 1.x, 2.7.10, `vring_need_event`).
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Driver-side split virtqueue state.
#[derive(Debug)]
pub struct SplitRing {
    mem: GuestMem,
    addrs: RingAddrs,
    size: u16,
    event_idx: bool,
    /// Free descriptor indices (a stack).
    free: Vec<u16>,
    /// Our own links between the descriptors of a managed chain; the table's `next` fields may
    /// say otherwise (indirect heads have one descriptor), so freeing never trusts guest memory.
    links: Vec<u16>,
    /// Descriptors held by each head in flight; 0 when the head is not in flight.
    chain_len: Vec<u16>,
    /// Next available index to fill.
    next_avail: Wrapping<u16>,
    /// Available index last made visible to the device.
    published: Wrapping<u16>,
    /// Next used index to read.
    last_used: Wrapping<u16>,
    /// Raw chains made available and not yet answered.
    raw_outstanding: u16,
    /// Descriptors of the raw chain in flight (it sits at table indices `0..raw_len`).
    raw_len: u16,
    /// Raw chains given up on (see [`SplitRing::abandon_raw`]); a late used element that names
    /// no managed head is taken as one of their answers and dropped.
    abandoned: u16,
    /// Table indices `0..leaked` are never handed out again: an abandoned raw chain used them,
    /// and the backend may still read them.
    leaked: u16,
}

impl SplitRing {
    /// Bytes a ring of `size` entries needs, including alignment padding.
    pub fn bytes_needed(size: u16) -> u64 {
        let n = u64::from(size);
        // Each part starts on its own page: simple, and generous to any alignment rule.
        let page = |b: u64| (b + 4095) & !4095;
        page(DESC_SIZE * n) + page(6 + 2 * n) + page(6 + 8 * n) + 4096
    }

    /// Places a ring of `size` entries (a power of two) in `alloc` and zeroes it.
    pub fn new(mem: GuestMem, alloc: &mut BumpAlloc, size: u16, event_idx: bool) -> Result<Self> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(Error::BadQueueSize(size));
        }
        let n = u64::from(size);
        let addrs = RingAddrs {
            desc: alloc.alloc(DESC_SIZE * n, 4096)?,
            avail: alloc.alloc(6 + 2 * n, 4096)?,
            used: alloc.alloc(6 + 8 * n, 4096)?,
        };
        mem.fill(addrs.desc, (DESC_SIZE * n) as usize, 0)?;
        mem.fill(addrs.avail, (6 + 2 * n) as usize, 0)?;
        mem.fill(addrs.used, (6 + 8 * n) as usize, 0)?;
        Ok(SplitRing {
            mem,
            addrs,
            size,
            event_idx,
            free: (0..size).rev().collect(),
            links: vec![0; size as usize],
            chain_len: vec![0; size as usize],
            next_avail: Wrapping(0),
            published: Wrapping(0),
            last_used: Wrapping(0),
            raw_outstanding: 0,
            raw_len: 0,
            abandoned: 0,
            leaked: 0,
        })
    }

    /// Where the ring lives.
    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    pub fn free_descs(&self) -> usize {
        self.free.len()
    }

    /// True when no managed or raw chain is waiting for the device.
    pub fn is_idle(&self) -> bool {
        self.free.len() + self.leaked as usize == self.size as usize && self.raw_outstanding == 0
    }

    /// Next available index (what GET_VRING_BASE should report once the device stopped).
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    /// Takes `n` free descriptors as a managed chain and returns its head.
    pub fn take_chain(&mut self, n: u16) -> Option<u16> {
        if n == 0 || self.free.len() < n as usize || self.raw_outstanding != 0 {
            return None;
        }
        let head = self.free.pop()?;
        let mut prev = head;
        for _ in 1..n {
            let d = self.free.pop()?;
            self.links[prev as usize] = d;
            prev = d;
        }
        self.chain_len[head as usize] = n;
        Some(head)
    }

    /// The descriptor indices of the managed chain at `head`, in order.
    pub fn chain(&self, head: u16) -> impl Iterator<Item = u16> + '_ {
        let len = self.chain_len.get(head as usize).copied().unwrap_or(0);
        let mut cur = head;
        (0..len).map(move |i| {
            if i > 0 {
                cur = self.links[cur as usize];
            }
            cur
        })
    }

    /// Writes descriptor `idx` of the table.
    pub fn write_desc(&self, idx: u16, desc: RawDesc) -> Result<()> {
        let addr = self.addrs.desc + DESC_SIZE * u64::from(idx % self.size);
        self.mem.write(addr, &desc.to_bytes())
    }

    /// Puts `head` in the next available slot; the device sees it after [`SplitRing::publish`].
    pub fn push_avail(&mut self, head: u16) -> Result<()> {
        let slot = u64::from(self.next_avail.0 % self.size);
        self.mem
            .store_u16(self.addrs.avail + 4 + 2 * slot, head, Ordering::Relaxed)?;
        self.next_avail += 1;
        Ok(())
    }

    /// Makes every pushed head visible and says whether the device wants a kick for them.
    pub fn publish(&mut self) -> Result<bool> {
        let old = self.published;
        let new = self.next_avail;
        if old == new {
            return Ok(false);
        }
        // Release: the descriptors and ring entries are written before the index moves.
        self.mem
            .store_u16(self.addrs.avail + 2, new.0, Ordering::Release)?;
        self.published = new;
        // The index store must be visible before we read the device's suppression state, or
        // both sides can decide not to notify (virtio 1.x, 2.7.13.4).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let avail_event = self
                .mem
                .load_u16(self.avail_event_addr(), Ordering::Acquire)?;
            Ok(need_event(avail_event, new.0, old.0))
        } else {
            let flags = self.mem.load_u16(self.addrs.used, Ordering::Acquire)?;
            Ok(flags & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Asks the device to signal the call eventfd for the next used element.
    ///
    /// Without EVENT_IDX the avail flags stay 0 (interrupts always wanted), so there is nothing
    /// to do; with it, `used_event` is set to the next used index we have not read.
    pub fn arm_notify(&self) -> Result<()> {
        if self.event_idx {
            let used_event = self.addrs.avail + 4 + 2 * u64::from(self.size);
            self.mem
                .store_u16(used_event, self.last_used.0, Ordering::Release)?;
            // The device must see `used_event` before we look at the used index again.
            fence(Ordering::SeqCst);
        }
        Ok(())
    }

    /// True when `head` starts a managed chain the device has not returned yet.
    pub fn is_in_flight(&self, head: u16) -> bool {
        self.chain_len.get(head as usize).is_some_and(|&n| n > 0)
    }

    /// Raw chains made available and not yet answered.
    pub fn raw_outstanding(&self) -> u16 {
        self.raw_outstanding
    }

    /// Heads made available and not yet used, abandoned ones included.
    pub fn outstanding(&self) -> u16 {
        (self.published - self.last_used).0
    }

    /// Heads made available whose answer we still wait for (abandoned ones excluded).
    pub fn in_flight(&self) -> u16 {
        self.outstanding().saturating_sub(self.abandoned)
    }

    /// Gives up on the raw chain in flight (the backend dropped it): its table indices are
    /// never reused, and typed requests may run again.
    pub fn abandon_raw(&mut self) -> Result<()> {
        if self.raw_outstanding == 0 {
            return Err(Error::NothingInFlight);
        }
        self.raw_outstanding -= 1;
        self.abandoned += 1;
        self.leaked = self.leaked.max(self.raw_len);
        let leaked = self.leaked;
        self.free.retain(|&d| d >= leaked);
        Ok(())
    }

    /// Takes the next used element, if the device has produced one.
    ///
    /// A managed element frees its chain; an element whose head is not in flight, or a used
    /// index that runs ahead of what was made available, is [`Error::BadUsedId`] /
    /// [`Error::BadUsedIdx`].
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>> {
        loop {
            let Some(elem) = self.pop_used_elem()? else {
                return Ok(None);
            };
            if self.raw_outstanding > 0 {
                self.raw_outstanding -= 1;
                return Ok(Some(elem));
            }
            let managed = usize::try_from(elem.id)
                .is_ok_and(|i| self.chain_len.get(i).is_some_and(|&n| n > 0));
            if !managed && self.abandoned > 0 {
                log::debug!("late used element {elem:?} for an abandoned raw chain");
                self.abandoned -= 1;
                continue;
            }
            self.free_chain(elem.id)?;
            return Ok(Some(elem));
        }
    }

    fn pop_used_elem(&mut self) -> Result<Option<UsedElem>> {
        let used_idx = Wrapping(self.mem.load_u16(self.addrs.used + 2, Ordering::Acquire)?);
        if used_idx == self.last_used {
            return Ok(None);
        }
        let ahead = (used_idx - self.last_used).0;
        if ahead > self.outstanding() {
            return Err(Error::BadUsedIdx {
                used_idx: used_idx.0,
                last_used: self.last_used.0,
                outstanding: self.outstanding(),
            });
        }
        let elem_addr = self.addrs.used + 4 + 8 * u64::from(self.last_used.0 % self.size);
        let mut b = [0u8; 8];
        self.mem.read(elem_addr, &mut b)?;
        let elem = UsedElem {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        };
        self.last_used += 1;
        Ok(Some(elem))
    }

    fn free_chain(&mut self, id: u32) -> Result<()> {
        let len = usize::try_from(id)
            .ok()
            .and_then(|i| self.chain_len.get(i).copied())
            .unwrap_or(0);
        if len == 0 {
            return Err(Error::BadUsedId { id });
        }
        let mut cur = id as u16;
        for i in 0..len {
            if i > 0 {
                cur = self.links[cur as usize];
            }
            self.free.push(cur);
        }
        self.chain_len[id as usize] = 0;
        Ok(())
    }

    /// Writes `descs` at table indices `0..descs.len()` and makes `head` available, unchecked.
    ///
    /// The ring must be idle so that no managed chain owns those indices.
    pub fn push_raw(&mut self, descs: &[RawDesc], head: u16) -> Result<()> {
        if !self.is_idle() {
            return Err(Error::QueueBusy);
        }
        if descs.len() > self.size as usize {
            return Err(Error::QueueFull {
                need: descs.len(),
                free: self.size as usize,
            });
        }
        for (i, d) in descs.iter().enumerate() {
            self.write_desc(i as u16, *d)?;
        }
        self.push_avail(head)?;
        self.raw_outstanding += 1;
        self.raw_len = descs.len() as u16;
        Ok(())
    }

    fn avail_event_addr(&self) -> u64 {
        self.addrs.used + 4 + 8 * u64::from(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MIN_GUEST_MEM;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    fn ring(size: u16, event_idx: bool) -> (GuestMem, SplitRing) {
        let mem = GuestMem::new(MIN_GUEST_MEM).unwrap();
        let mut alloc = BumpAlloc::new(mem.base(), mem.end());
        let ring = SplitRing::new(mem.clone(), &mut alloc, size, event_idx).unwrap();
        (mem, ring)
    }

    /// A device-side queue from virtio-queue on the same memory: the reference implementation.
    fn device(ring: &SplitRing, event_idx: bool) -> Queue {
        let mut q = Queue::new(ring.size()).unwrap();
        let a = ring.addrs();
        q.set_desc_table_address(Some(a.desc as u32), Some((a.desc >> 32) as u32));
        q.set_avail_ring_address(Some(a.avail as u32), Some((a.avail >> 32) as u32));
        q.set_used_ring_address(Some(a.used as u32), Some((a.used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    #[test]
    fn need_event_matches_spec_examples() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 3, 0));
        assert!(need_event(2, 3, 0));
        assert!(need_event(u16::MAX, 0, u16::MAX));
        assert!(!need_event(10, 3, 3));
    }

    #[test]
    fn bad_sizes_are_refused() {
        let mem = GuestMem::new(MIN_GUEST_MEM).unwrap();
        let mut alloc = BumpAlloc::new(mem.base(), mem.end());
        assert!(SplitRing::new(mem.clone(), &mut alloc, 100, false).is_err());
        assert!(SplitRing::new(mem, &mut alloc, 0, false).is_err());
    }

    #[test]
    fn chains_round_trip_through_a_reference_device() {
        for event_idx in [false, true] {
            let (mem, mut r) = ring(8, event_idx);
            let mut dev = device(&r, event_idx);
            let gm = mem_of(&mem);
            for round in 0..20u32 {
                let head = r.take_chain(3).unwrap();
                let idx: Vec<u16> = r.chain(head).collect();
                assert_eq!(idx.len(), 3);
                for (i, d) in idx.iter().enumerate() {
                    let last = i == idx.len() - 1;
                    r.write_desc(
                        *d,
                        RawDesc {
                            addr: mem.base() + 0x8_0000,
                            len: 16,
                            flags: if last {
                                VRING_DESC_F_WRITE
                            } else {
                                VRING_DESC_F_NEXT
                            },
                            next: if last { 0 } else { idx[i + 1] },
                        },
                    )
                    .unwrap();
                }
                r.push_avail(head).unwrap();
                assert!(r.publish().unwrap(), "round {round}: device wants a kick");
                let chain = dev.pop_descriptor_chain(gm).unwrap();
                assert_eq!(chain.head_index(), head);
                assert_eq!(chain.clone().count(), 3);
                // A device re-enables notifications once the ring is empty, as backends do.
                assert!(!dev.enable_notification(gm).unwrap());
                dev.add_used(gm, head, round).unwrap();
                r.arm_notify().unwrap();
                assert!(dev.needs_notification(gm).unwrap());
                let used = r.pop_used().unwrap().unwrap();
                assert_eq!(
                    used,
                    UsedElem {
                        id: head.into(),
                        len: round
                    }
                );
                assert!(r.pop_used().unwrap().is_none());
                assert!(r.is_idle());
            }
        }
    }

    #[test]
    fn event_idx_suppresses_kicks_the_device_did_not_ask_for() {
        let (_mem, mut r) = ring(8, true);
        for expect_kick in [true, false, false] {
            let head = r.take_chain(1).unwrap();
            r.write_desc(head, RawDesc::default()).unwrap();
            r.push_avail(head).unwrap();
            // avail_event stays 0: the device asked to hear about index 0 only.
            assert_eq!(r.publish().unwrap(), expect_kick);
        }
        assert!(!r.publish().unwrap(), "nothing new, no kick");
    }

    #[test]
    fn used_id_not_in_flight_is_an_error() {
        let (mem, mut r) = ring(4, false);
        let mut dev = device(&r, false);
        let gm = mem_of(&mem);
        let head = r.take_chain(1).unwrap();
        r.write_desc(head, RawDesc::default()).unwrap();
        r.push_avail(head).unwrap();
        r.publish().unwrap();
        dev.pop_descriptor_chain(gm).unwrap();
        dev.add_used(gm, (head + 1) % 4, 0).unwrap();
        assert!(matches!(r.pop_used(), Err(Error::BadUsedId { .. })));
    }

    #[test]
    fn used_index_ahead_of_avail_is_an_error() {
        let (mem, mut r) = ring(4, false);
        mem.store_u16(r.addrs().used + 2, 3, Ordering::Release)
            .unwrap();
        assert!(matches!(r.pop_used(), Err(Error::BadUsedIdx { .. })));
    }

    #[test]
    fn raw_chains_need_an_idle_ring_and_come_back_unchecked() {
        let (mem, mut r) = ring(4, false);
        let mut dev = device(&r, false);
        let gm = mem_of(&mem);
        let d = RawDesc {
            addr: mem.base(),
            len: 1,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        };
        r.push_raw(&[d], 0).unwrap();
        assert!(r.take_chain(1).is_none());
        assert!(matches!(r.push_raw(&[d], 0), Err(Error::QueueBusy)));
        r.publish().unwrap();
        dev.pop_descriptor_chain(gm).unwrap();
        dev.add_used(gm, 3, 7).unwrap();
        assert_eq!(r.pop_used().unwrap(), Some(UsedElem { id: 3, len: 7 }));
        assert!(r.is_idle());
    }

    #[test]
    fn abandoned_raw_chains_leak_their_descriptors_and_absorb_late_answers() {
        let (mem, mut r) = ring(4, false);
        let mut dev = device(&r, false);
        let gm = mem_of(&mem);
        r.push_raw(&[RawDesc::default(); 2], 0).unwrap();
        r.publish().unwrap();
        r.abandon_raw().unwrap();
        assert!(r.is_idle());
        assert_eq!(r.free_descs(), 2);
        assert_eq!(r.in_flight(), 0);
        let head = r.take_chain(1).unwrap();
        assert!(head >= 2, "leaked indices are not reused");
        r.write_desc(head, RawDesc::default()).unwrap();
        r.push_avail(head).unwrap();
        r.publish().unwrap();
        dev.pop_descriptor_chain(gm).unwrap();
        dev.pop_descriptor_chain(gm).unwrap();
        dev.add_used(gm, 0, 0).unwrap(); // the late answer
        dev.add_used(gm, head, 5).unwrap();
        assert_eq!(
            r.pop_used().unwrap(),
            Some(UsedElem {
                id: head.into(),
                len: 5
            })
        );
        assert!(r.pop_used().unwrap().is_none());
    }

    #[test]
    fn full_ring_refuses_more_chains() {
        let (_mem, mut r) = ring(4, false);
        assert!(r.take_chain(3).is_some());
        assert!(r.take_chain(2).is_none());
        assert!(r.take_chain(1).is_some());
        assert_eq!(r.free_descs(), 0);
    }

    fn mem_of(mem: &GuestMem) -> &vm_memory::GuestMemoryMmap {
        let m = mem.inner();
        assert!(m.address_in_range(GuestAddress(mem.base())));
        m
    }
}
