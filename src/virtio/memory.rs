//! Guest memory on the request path: checked host pointers resolved once per memory snapshot,
//! instead of vm-memory's generic accessors (slice iterators, per-access region search and
//! bitmap plumbing), which cost about a fifth of a RAM-tier read's CPU.
//!
//! The guest is untrusted: every access is bounds-checked against the one region that holds
//! it; an access that no single region holds falls back to vm-memory, so behaviour at region
//! edges is vm-memory's. A [`HostMemory`] owns the `Arc` of the snapshot its pointers come
//! from, so they stay mapped while it lives; QEMU replaces the mapping with every
//! SET_MEM_TABLE, so the worker takes a fresh snapshot on every entry (see `Worker::enter`)
//! and never keeps one across a mapping change.
//!
//! Dirty pages for live migration: while QEMU logs (it acked VHOST_F_LOG_ALL), every write
//! here (used ring, status bytes) goes through vm-memory, which marks the page in the log, and
//! guest buffers the device filled are marked on completion; with logging off, no write looks
//! at the log at all.

use std::mem::size_of;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;

use smallvec::SmallVec;
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::route::IoVecs;
use crate::virtio::request::Segment;

/// What the request parser and the chain walker read from the guest: implemented by
/// [`HostMemory`] for the queues and by every vm-memory `GuestMemoryBackend` for tests and
/// tools.
pub trait GuestRam {
    /// Whether `len` bytes at `addr` are all guest memory.
    fn check_range(&self, addr: GuestAddress, len: usize) -> bool;
    /// Fills `buf` from `addr`; false when any of it is not guest memory.
    fn read_slice(&self, buf: &mut [u8], addr: GuestAddress) -> bool;
    /// Reads one plain-data object at `addr`.
    fn read_obj<T: ByteValued>(&self, addr: GuestAddress) -> Option<T>;
}

impl<M: GuestMemoryBackend> GuestRam for M {
    fn check_range(&self, addr: GuestAddress, len: usize) -> bool {
        GuestMemoryBackend::check_range(self, addr, len)
    }

    fn read_slice(&self, buf: &mut [u8], addr: GuestAddress) -> bool {
        Bytes::read_slice(self, buf, addr).is_ok()
    }

    fn read_obj<T: ByteValued>(&self, addr: GuestAddress) -> Option<T> {
        Bytes::read_obj(self, addr).ok()
    }
}

/// One mapped region: guest addresses `start..start + len` are at `host..host + len`.
#[derive(Clone, Copy, Debug)]
struct HostRegion {
    start: u64,
    len: u64,
    host: *mut u8,
}

/// Guest memory of one snapshot, its regions resolved to host pointers.
pub struct HostMemory<M> {
    regions: SmallVec<[HostRegion; 4]>,
    /// While it is on, writes go through vm-memory so the pages are marked dirty.
    log: DirtyLog,
    /// Keeps the regions mapped while the pointers above are in use; also the fallback for
    /// accesses no single region holds.
    mem: Arc<M>,
}

// SAFETY: the raw pointers point into mappings owned by `mem` (an `Arc` of a `Send + Sync`
// guest memory); every access through them is bounds-checked and volatile or atomic, the same
// access vm-memory itself makes from any thread.
unsafe impl<M: Send + Sync> Send for HostMemory<M> {}
// SAFETY: as for `Send`: shared use only reads the region table.
unsafe impl<M: Send + Sync> Sync for HostMemory<M> {}

impl<M: GuestMemoryBackend> HostMemory<M> {
    /// Resolves every region of `mem` once.
    pub fn new(mem: Arc<M>, log: DirtyLog) -> Self {
        let regions = mem
            .iter()
            .filter(|r| r.len() > 0)
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some(HostRegion {
                    start: r.start_addr().0,
                    len: r.len(),
                    host,
                })
            })
            .collect();
        HostMemory { regions, log, mem }
    }

    /// The snapshot these pointers belong to.
    pub fn snapshot(&self) -> &Arc<M> {
        &self.mem
    }

    /// The host address of `len` bytes at `addr`, when one region holds all of them.
    fn host(&self, addr: GuestAddress, len: usize) -> Option<*mut u8> {
        let (addr, len) = (addr.0, len as u64);
        self.regions.iter().find_map(|r| {
            let offset = addr.checked_sub(r.start)?;
            (offset <= r.len && len <= r.len - offset)
                // SAFETY: `offset + len <= r.len`: the result stays inside the mapping.
                .then(|| unsafe { r.host.add(offset as usize) })
        })
    }

    /// Reads a `u16` with the given ordering (ring indices); vm-memory's atomic load when the
    /// field is misaligned or crosses regions.
    pub fn load_u16(&self, addr: GuestAddress, order: Ordering) -> Option<u16> {
        match self.host(addr, 2) {
            Some(p) if p.cast::<u16>().is_aligned() => {
                // SAFETY: `p` is two bytes of mapped guest memory, aligned for u16; guest
                // memory is shared with the driver, so it is accessed atomically only.
                let v = unsafe { AtomicU16::from_ptr(p.cast()) }.load(order);
                Some(u16::from_le(v))
            }
            _ => self.mem.load(addr, order).ok().map(u16::from_le),
        }
    }

    /// Stores a `u16` with the given ordering (ring indices).
    pub fn store_u16(&self, addr: GuestAddress, value: u16, order: Ordering) -> bool {
        match self.host(addr, 2).filter(|_| !self.log.is_on()) {
            Some(p) if p.cast::<u16>().is_aligned() => {
                // SAFETY: as in `load_u16`.
                unsafe { AtomicU16::from_ptr(p.cast()) }.store(value.to_le(), order);
                true
            }
            _ => self.mem.store(value.to_le(), addr, order).is_ok(),
        }
    }

    /// Writes one plain-data object (a used-ring element, a status byte).
    pub fn write_obj<T: ByteValued>(&self, value: T, addr: GuestAddress) -> bool {
        match self
            .host(addr, size_of::<T>())
            .filter(|_| !self.log.is_on())
        {
            Some(p) => {
                let p = p.cast::<T>();
                // SAFETY: `size_of::<T>()` bytes at `p` are mapped guest memory; any bit
                // pattern is valid for a `ByteValued` type; volatile, as the driver shares it.
                unsafe {
                    if p.is_aligned() {
                        p.write_volatile(value)
                    } else {
                        p.write_unaligned(value)
                    }
                }
                true
            }
            None => self.mem.write_obj(value, addr).is_ok(),
        }
    }
}

impl<M: GuestMemoryBackend> GuestRam for HostMemory<M> {
    fn check_range(&self, addr: GuestAddress, len: usize) -> bool {
        self.host(addr, len).is_some() || GuestMemoryBackend::check_range(&*self.mem, addr, len)
    }

    fn read_slice(&self, buf: &mut [u8], addr: GuestAddress) -> bool {
        match self.host(addr, buf.len()) {
            Some(p) => {
                // SAFETY: `buf.len()` bytes at `p` are mapped guest memory, and `buf` is ours.
                unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
                true
            }
            None => Bytes::read_slice(&*self.mem, buf, addr).is_ok(),
        }
    }

    fn read_obj<T: ByteValued>(&self, addr: GuestAddress) -> Option<T> {
        match self.host(addr, size_of::<T>()) {
            Some(p) => {
                let p = p.cast::<T>();
                // SAFETY: `size_of::<T>()` bytes at `p` are mapped guest memory; any bit
                // pattern is a valid `ByteValued`.
                Some(unsafe {
                    if p.is_aligned() {
                        p.read_volatile()
                    } else {
                        p.read_unaligned()
                    }
                })
            }
            None => Bytes::read_obj(&*self.mem, addr).ok(),
        }
    }
}

/// Host buffers for guest segments, for the engines' `preadv`/`pwritev`. The parser checked
/// that the segments lie in guest memory; a memory table update since could make that untrue,
/// hence `None`. A segment inside one region (always, for Linux guests) costs one region
/// lookup; one that spans regions is cut where vm-memory cuts it.
pub fn host_buffers<M: GuestMemoryBackend>(mem: &M, segments: &[Segment]) -> Option<IoVecs> {
    let mut iovecs = SmallVec::with_capacity(segments.len());
    for segment in segments {
        let len = segment.len as usize;
        let region = mem.find_region(segment.addr)?;
        let offset = segment.addr.0 - region.start_addr().0;
        if offset + u64::from(segment.len) <= region.len() {
            let host = region.get_host_address(MemoryRegionAddress(offset)).ok()?;
            iovecs.push(libc::iovec {
                iov_base: host.cast(),
                iov_len: len,
            });
            continue;
        }
        for slice in mem.get_slices(segment.addr, len) {
            let slice = slice.ok()?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(IoVecs(iovecs))
}

/// Writes one byte (a request's status) with one region lookup; false when `addr` is not
/// guest memory (any more: the memory table may have changed since the request was parsed).
/// Through vm-memory, which marks the page, while QEMU logs.
pub fn write_byte<M: GuestMemoryBackend>(
    log: &DirtyLog,
    mem: &M,
    addr: GuestAddress,
    byte: u8,
) -> bool {
    if log.is_on() {
        return mem.write_obj(byte, addr).is_ok();
    }
    let Some(region) = mem.find_region(addr) else {
        return false;
    };
    let offset = MemoryRegionAddress(addr.0 - region.start_addr().0);
    match region.get_host_address(offset) {
        Ok(host) => {
            // SAFETY: `find_region` put `addr` inside this region, so `host` is one mapped byte
            // of guest memory; volatile, as the driver shares it.
            unsafe { host.write_volatile(byte) };
            true
        }
        Err(_) => false,
    }
}

/// Whether QEMU logs dirty guest pages (it acked VHOST_F_LOG_ALL: a live migration runs),
/// shared by a connection's backend and its queue workers.
#[derive(Clone, Debug, Default)]
pub struct DirtyLog(Arc<AtomicBool>);

impl DirtyLog {
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Release);
    }

    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Marks guest buffers the device filled (reads, GET_ID) dirty for the migration log, after
/// the data is in them. Checked at completion, so a request that finishes after logging
/// started is marked even when it was issued before.
pub fn mark_filled<M: GuestMemoryBackend>(log: &DirtyLog, mem: &M, fills: &[Segment]) {
    if !log.is_on() {
        return;
    }
    for segment in fills {
        for slice in mem.get_slices(segment.addr, segment.len as usize).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

#[cfg(test)]
#[path = "memory_tests.rs"]
mod tests;
