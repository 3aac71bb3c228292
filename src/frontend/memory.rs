//! Guest memory for a VM-less frontend: one memfd-backed region, shared with the backend through
//! SET_MEM_TABLE, and a bump allocator that carves rings and data buffers out of it.
//!
//! Guest physical addresses start at [`GUEST_MEM_BASE`], not 0, so that a null or small address in
//! a hostile descriptor is outside guest memory, as a wild pointer would be.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};

use super::{Error, Result};

/// Guest physical address of the first byte of guest memory (1 MiB): low addresses stay unmapped.
pub const GUEST_MEM_BASE: u64 = 1 << 20;

/// Smallest guest memory accepted (1 MiB): rings and request slots for a few queues need ~100 KiB.
pub const MIN_GUEST_MEM: u64 = 1 << 20;

/// Largest guest memory accepted (16 GiB): a bound so that a typo does not reserve a terabyte.
pub const MAX_GUEST_MEM: u64 = 16 << 30;

/// A buffer in guest memory: a guest physical address and a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBuf {
    /// Guest physical address of the first byte.
    pub addr: u64,
    /// Length in bytes (a descriptor length is 32 bits).
    pub len: u32,
}

impl GuestBuf {
    /// The buffer's first `len` bytes (for reusing a large buffer for a smaller request).
    pub fn prefix(self, len: u32) -> GuestBuf {
        GuestBuf {
            addr: self.addr,
            len: len.min(self.len),
        }
    }
}

/// The frontend's guest memory: a single shared, memfd-backed region mapped in this process.
///
/// Cloning is cheap (an `Arc`); every clone sees the same bytes, and so does the backend.
#[derive(Clone, Debug)]
pub struct GuestMem {
    mem: Arc<GuestMemoryMmap>,
    size: u64,
}

impl GuestMem {
    /// Creates `size` bytes of zeroed, shareable guest memory at [`GUEST_MEM_BASE`].
    pub fn new(size: u64) -> Result<Self> {
        if !(MIN_GUEST_MEM..=MAX_GUEST_MEM).contains(&size) || !size.is_multiple_of(4096) {
            return Err(Error::BadMemorySize(size));
        }
        let file = memfd(size).map_err(Error::Memfd)?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(GUEST_MEM_BASE),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )
        .map_err(|e| Error::Mmap(e.to_string()))?;
        let mem =
            GuestMemoryMmap::from_regions(vec![region]).map_err(|e| Error::Mmap(e.to_string()))?;
        Ok(GuestMem {
            mem: Arc::new(mem),
            size,
        })
    }

    /// The vm-memory view, for code that speaks vm-memory (tests use virtio-queue on it).
    pub fn inner(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Guest physical address of the first byte.
    pub fn base(&self) -> u64 {
        GUEST_MEM_BASE
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Guest physical address one past the last byte.
    pub fn end(&self) -> u64 {
        GUEST_MEM_BASE + self.size
    }

    /// The region as SET_MEM_TABLE describes it (the memfd is passed along with the message).
    pub fn region_info(&self) -> Result<VhostUserMemoryRegionInfo> {
        let region = self
            .mem
            .iter()
            .next()
            .ok_or(Error::Mmap("no region".into()))?;
        VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(|e| Error::Mmap(format!("region info: {e}")))
    }

    /// This process's virtual address for a guest address.
    ///
    /// SET_VRING_ADDR carries frontend virtual addresses (QEMU's), not guest physical ones; the
    /// backend translates them through the `userspace_addr` of the SET_MEM_TABLE regions.
    pub fn host_addr(&self, gpa: u64) -> Result<u64> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| Error::OutOfGuest { addr: gpa, len: 1 })
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| out_of_guest(addr, data.len()))
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| out_of_guest(addr, buf.len()))
    }

    /// Reads one byte (a status byte).
    pub fn read_u8(&self, addr: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }

    /// Stores a little-endian u16 with the given ordering (ring indices).
    pub(crate) fn store_u16(&self, addr: u64, val: u16, order: Ordering) -> Result<()> {
        self.mem
            .store(val.to_le(), GuestAddress(addr), order)
            .map_err(|_| out_of_guest(addr, 2))
    }

    /// Loads a little-endian u16 with the given ordering (ring indices).
    pub(crate) fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16> {
        self.mem
            .load::<u16>(GuestAddress(addr), order)
            .map(u16::from_le)
            .map_err(|_| out_of_guest(addr, 2))
    }

    /// Fills `len` bytes at `addr` with `byte`, without allocating (poisons status bytes).
    pub fn fill(&self, addr: u64, len: usize, byte: u8) -> Result<()> {
        let chunk = [byte; 256];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len());
            self.write(addr + done as u64, &chunk[..n])?;
            done += n;
        }
        Ok(())
    }
}

fn out_of_guest(addr: u64, len: usize) -> Error {
    Error::OutOfGuest {
        addr,
        len: len as u64,
    }
}

/// Creates an anonymous memory file of `size` bytes.
fn memfd(size: u64) -> io::Result<File> {
    // SAFETY: the name is a NUL-terminated literal; memfd_create reads nothing else.
    let fd = unsafe { libc::memfd_create(c"cormorant-frontend".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor, and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// A bump allocator over a range of guest addresses.
///
/// Buffers are never freed one by one: a queue hands them out once for a benchmark's lifetime,
/// and the blocking calls roll back to a [`BumpAlloc::mark`] after their request completed.
#[derive(Clone, Debug)]
pub struct BumpAlloc {
    start: u64,
    next: u64,
    end: u64,
}

impl BumpAlloc {
    /// An allocator for guest addresses `start..end`.
    pub fn new(start: u64, end: u64) -> Self {
        BumpAlloc {
            start,
            next: start,
            end: end.max(start),
        }
    }

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64> {
        debug_assert!(align.is_power_of_two());
        let addr = self
            .next
            .checked_add(align - 1)
            .map(|a| a & !(align - 1))
            .filter(|a| a.checked_add(len).is_some_and(|e| e <= self.end))
            .ok_or(Error::OutOfArena {
                want: len,
                left: self.remaining(),
            })?;
        self.next = addr + len;
        Ok(addr)
    }

    /// Bytes left (ignoring alignment).
    pub fn remaining(&self) -> u64 {
        self.end - self.next
    }

    /// The current position, to roll back to with [`BumpAlloc::release_to`].
    pub fn mark(&self) -> u64 {
        self.next
    }

    /// Frees everything allocated since `mark`.
    pub fn release_to(&mut self, mark: u64) {
        if (self.start..=self.next).contains(&mark) {
            self.next = mark;
        }
    }

    /// Frees everything.
    pub fn reset(&mut self) {
        self.next = self.start;
    }

    /// Splits off the rest into `parts` equal, page-aligned allocators (one per queue).
    pub fn split(&mut self, parts: u64) -> Vec<BumpAlloc> {
        let parts = parts.max(1);
        let first = (self.next + 4095) & !4095;
        let each = (self.end.saturating_sub(first) / parts) & !4095;
        self.next = self.end;
        (0..parts)
            .map(|i| BumpAlloc::new(first + i * each, first + (i + 1) * each))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_aligns_and_bounds() {
        let mut a = BumpAlloc::new(0x1001, 0x3000);
        assert_eq!(a.alloc(10, 0x1000).unwrap(), 0x2000);
        assert_eq!(a.alloc(1, 1).unwrap(), 0x200a);
        assert!(a.alloc(0x1000, 1).is_err());
        let m = a.mark();
        a.alloc(0x10, 16).unwrap();
        a.release_to(m);
        assert_eq!(a.mark(), m);
    }

    #[test]
    fn bump_overflow_is_an_error() {
        let mut a = BumpAlloc::new(u64::MAX - 10, u64::MAX);
        assert!(a.alloc(100, 1).is_err());
        assert!(a.alloc(1, 1 << 63).is_err());
    }

    #[test]
    fn split_is_disjoint_and_aligned() {
        let mut a = BumpAlloc::new(0x10_0000, 0x50_0000);
        a.alloc(100, 1).unwrap();
        let parts = a.split(3);
        assert_eq!(parts.len(), 3);
        for w in parts.windows(2) {
            assert!(w[0].end <= w[1].start);
        }
        assert!(parts
            .iter()
            .all(|p| p.start % 4096 == 0 && p.end <= 0x50_0000));
        assert!(a.alloc(1, 1).is_err());
    }

    #[test]
    fn guest_mem_roundtrip() {
        let m = GuestMem::new(MIN_GUEST_MEM).unwrap();
        m.write(m.base() + 10, b"hello").unwrap();
        let mut b = [0u8; 5];
        m.read(m.base() + 10, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(m.write(m.end() - 2, b"abc").is_err());
        assert!(m.read_u8(0).is_err());
        assert!(m.region_info().unwrap().mmap_handle >= 0);
        m.fill(m.base(), 1000, 0xab).unwrap();
        assert_eq!(m.read_u8(m.base() + 999).unwrap(), 0xab);
    }
}
