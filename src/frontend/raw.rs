//! Hand-built descriptor chains, for tests that check a backend survives a hostile driver.
//!
//! [`ChainBuilder`] writes any layout; [`Malformed`] names the classic mistakes and
//! [`BlkQueue::malformed`] builds each one around an otherwise valid one-sector read, so the only
//! thing wrong with the chain is the thing the case is named after.

use std::time::Duration;

use super::blk::{encode_header, HEADER_SIZE, SECTOR_SIZE, S_NOT_WRITTEN, T_IN, T_OUT};
use super::queue::BlkQueue;
use super::vring::{
    RawDesc, UsedElem, DESC_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use super::Result;

/// A chain ready for [`BlkQueue::run_raw`]: descriptors for table indices `0..descs.len()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawChain {
    /// Descriptors, written at table indices 0, 1, ...
    pub descs: Vec<RawDesc>,
    /// Value put in the available ring (need not be a valid index).
    pub head: u16,
    /// Where the status byte is, if the chain has one; poisoned with `S_NOT_WRITTEN` first.
    pub status: Option<u64>,
}

/// What came back for a raw chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawReply {
    /// The used element, unchecked.
    pub used: UsedElem,
    /// The status byte after completion (`S_NOT_WRITTEN` if the backend did not write it).
    pub status: Option<u8>,
}

/// Builds a [`RawChain`]: `readable` and `writable` append a descriptor and link the previous
/// one to it; `desc` appends one verbatim and links nothing; `link` rewires any descriptor.
#[derive(Clone, Debug, Default)]
pub struct ChainBuilder {
    descs: Vec<RawDesc>,
    head: u16,
    status: Option<u64>,
}

impl ChainBuilder {
    /// An empty chain with head 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a device-readable buffer, linked from the previous descriptor.
    pub fn readable(self, addr: u64, len: u32) -> Self {
        self.linked(addr, len, 0)
    }

    /// Appends a device-writable buffer, linked from the previous descriptor.
    pub fn writable(self, addr: u64, len: u32) -> Self {
        self.linked(addr, len, VRING_DESC_F_WRITE)
    }

    fn linked(mut self, addr: u64, len: u32, flags: u16) -> Self {
        let i = self.descs.len() as u16;
        if let Some(prev) = self.descs.last_mut() {
            prev.flags |= VRING_DESC_F_NEXT;
            prev.next = i;
        }
        self.descs.push(RawDesc {
            addr,
            len,
            flags,
            next: 0,
        });
        self
    }

    /// Appends `d` exactly as given.
    pub fn desc(mut self, d: RawDesc) -> Self {
        self.descs.push(d);
        self
    }

    /// Makes descriptor `from` continue at `to` (which may be anything, even itself).
    pub fn link(mut self, from: u16, to: u16) -> Self {
        if let Some(d) = self.descs.get_mut(from as usize) {
            d.flags |= VRING_DESC_F_NEXT;
            d.next = to;
        }
        self
    }

    /// Sets the available ring entry (default 0).
    pub fn head(mut self, head: u16) -> Self {
        self.head = head;
        self
    }

    /// Records where the status byte is.
    pub fn status_at(mut self, addr: u64) -> Self {
        self.status = Some(addr);
        self
    }

    /// The finished chain.
    pub fn build(self) -> RawChain {
        RawChain {
            descs: self.descs,
            head: self.head,
            status: self.status,
        }
    }
}

/// A malformed (or merely unusual) request, each one a single defect in a one-sector read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// Only the header descriptor: no data, no status.
    HeaderOnly,
    /// The status descriptor is device-readable.
    StatusReadable,
    /// A writable descriptor (the data) comes before the readable header.
    WritableBeforeReadable,
    /// The header descriptor is 8 bytes instead of 16.
    ShortHeader,
    /// The data buffer starts 1 MiB past the end of guest memory.
    DataOutsideMemory,
    /// The data buffer is at guest address 0 (below guest memory).
    DataNullAddr,
    /// `addr + len` of the data buffer wraps past 2^64.
    DataAddrWraps,
    /// The data buffer starts inside guest memory but is almost 4 GiB long.
    DataLenHuge,
    /// Two data descriptors of 2 GiB each: the total overflows 32 bits.
    TotalLenOverflow,
    /// A zero-length data descriptor.
    ZeroLenData,
    /// Read length not a multiple of 512 (100 bytes).
    UnalignedLen,
    /// A well-formed read of the sector just past the end of the disk.
    SectorPastEnd,
    /// Sector `u64::MAX`: `sector * 512` overflows.
    SectorOverflow,
    /// Request type 0xff, which no spec defines.
    UnknownType,
    /// A write whose readable descriptors loop: header -> data -> header -> ... (no status).
    DescriptorLoop,
    /// The header descriptor links to itself.
    SelfLoop,
    /// The header links to a descriptor index past the end of the table.
    NextOutOfRange,
    /// The available ring names a head past the end of the table.
    HeadOutOfRange,
    /// An indirect table whose length (40) is not a multiple of 16.
    IndirectBadLen,
    /// An indirect table of length 0.
    IndirectZeroLen,
    /// An indirect table outside guest memory.
    IndirectOutsideMemory,
    /// An indirect table whose entry is itself indirect (forbidden by the spec).
    IndirectNested,
    /// A descriptor with both INDIRECT and NEXT set (forbidden by the spec).
    IndirectWithNext,
}

impl Malformed {
    /// Every case, in declaration order.
    pub const ALL: [Malformed; 23] = [
        Malformed::HeaderOnly,
        Malformed::StatusReadable,
        Malformed::WritableBeforeReadable,
        Malformed::ShortHeader,
        Malformed::DataOutsideMemory,
        Malformed::DataNullAddr,
        Malformed::DataAddrWraps,
        Malformed::DataLenHuge,
        Malformed::TotalLenOverflow,
        Malformed::ZeroLenData,
        Malformed::UnalignedLen,
        Malformed::SectorPastEnd,
        Malformed::SectorOverflow,
        Malformed::UnknownType,
        Malformed::DescriptorLoop,
        Malformed::SelfLoop,
        Malformed::NextOutOfRange,
        Malformed::HeadOutOfRange,
        Malformed::IndirectBadLen,
        Malformed::IndirectZeroLen,
        Malformed::IndirectOutsideMemory,
        Malformed::IndirectNested,
        Malformed::IndirectWithNext,
    ];
}

/// Guest buffers for one malformed request.
struct Bufs {
    header: u64,
    data: u64,
    status: u64,
    table: u64,
    table2: u64,
}

const SECTOR: u32 = SECTOR_SIZE as u32;

impl BlkQueue {
    /// Builds the chain for `case` around a one-sector read; `capacity` is the disk size in
    /// sectors (for [`Malformed::SectorPastEnd`]). Buffers come from the queue's arena.
    pub fn malformed(&mut self, case: Malformed, capacity: u64) -> Result<RawChain> {
        use Malformed as M;
        let sector = match case {
            M::SectorPastEnd => capacity,
            M::SectorOverflow => u64::MAX,
            _ => 0,
        };
        let req_type = match case {
            M::UnknownType => 0xff,
            M::DescriptorLoop => T_OUT,
            _ => T_IN,
        };
        let b = self.malformed_bufs(req_type, sector)?;
        let mem_end = self.memory().end();
        let read = |data_addr: u64, data_len: u32| {
            ChainBuilder::new()
                .readable(b.header, HEADER_SIZE)
                .writable(data_addr, data_len)
                .writable(b.status, 1)
                .status_at(b.status)
        };
        let chain = match case {
            M::HeaderOnly => ChainBuilder::new().readable(b.header, HEADER_SIZE),
            M::StatusReadable => ChainBuilder::new()
                .readable(b.header, HEADER_SIZE)
                .writable(b.data, SECTOR)
                .readable(b.status, 1)
                .status_at(b.status),
            M::WritableBeforeReadable => ChainBuilder::new()
                .writable(b.data, SECTOR)
                .readable(b.header, HEADER_SIZE)
                .writable(b.status, 1)
                .status_at(b.status),
            M::ShortHeader => ChainBuilder::new()
                .readable(b.header, 8)
                .writable(b.data, SECTOR)
                .writable(b.status, 1)
                .status_at(b.status),
            M::DataOutsideMemory => read(mem_end + (1 << 20), SECTOR),
            M::DataNullAddr => read(0, SECTOR),
            M::DataAddrWraps => read(u64::MAX - 255, SECTOR),
            M::DataLenHuge => read(b.data, !(SECTOR - 1)),
            M::TotalLenOverflow => ChainBuilder::new()
                .readable(b.header, HEADER_SIZE)
                .writable(b.data, 0x8000_0000)
                .writable(b.data, 0x8000_0000)
                .writable(b.status, 1)
                .status_at(b.status),
            M::ZeroLenData => read(b.data, 0),
            M::UnalignedLen => read(b.data, 100),
            M::SectorPastEnd | M::SectorOverflow | M::UnknownType => read(b.data, SECTOR),
            M::DescriptorLoop => ChainBuilder::new()
                .readable(b.header, HEADER_SIZE)
                .readable(b.data, SECTOR)
                .link(1, 0),
            M::SelfLoop => ChainBuilder::new()
                .readable(b.header, HEADER_SIZE)
                .link(0, 0),
            M::NextOutOfRange => read(b.data, SECTOR).link(0, self.size().wrapping_add(7)),
            M::HeadOutOfRange => read(b.data, SECTOR).head(self.size().wrapping_add(3)),
            M::IndirectBadLen => self.indirect(&b, b.table, 40)?,
            M::IndirectZeroLen => self.indirect(&b, b.table, 0)?,
            M::IndirectOutsideMemory => self.indirect(&b, mem_end + 4096, 48)?,
            M::IndirectNested => {
                self.write_table(b.table2, &valid_table(&b))?;
                let nested = RawDesc {
                    addr: b.table2,
                    len: 48,
                    flags: VRING_DESC_F_INDIRECT,
                    next: 0,
                };
                self.write_table(b.table, &[nested])?;
                ChainBuilder::new()
                    .desc(RawDesc {
                        addr: b.table,
                        len: DESC_SIZE as u32,
                        flags: VRING_DESC_F_INDIRECT,
                        next: 0,
                    })
                    .status_at(b.status)
            }
            M::IndirectWithNext => self.indirect(&b, b.table, 48)?.writable(b.data, SECTOR),
        };
        Ok(chain.build())
    }

    fn malformed_bufs(&mut self, req_type: u32, sector: u64) -> Result<Bufs> {
        let b = Bufs {
            header: self.alloc(HEADER_SIZE)?.addr,
            data: self.alloc(SECTOR)?.addr,
            status: self.alloc(1)?.addr,
            table: self.alloc(64)?.addr,
            table2: self.alloc(64)?.addr,
        };
        self.memory()
            .write(b.header, &encode_header(req_type, sector))?;
        Ok(b)
    }

    /// A chain of one indirect descriptor pointing at a valid read table at `table`.
    fn indirect(&self, b: &Bufs, table: u64, len: u32) -> Result<ChainBuilder> {
        if table == b.table {
            self.write_table(b.table, &valid_table(b))?;
        }
        Ok(ChainBuilder::new()
            .desc(RawDesc {
                addr: table,
                len,
                flags: VRING_DESC_F_INDIRECT,
                next: 0,
            })
            .status_at(b.status))
    }

    /// Writes descriptors into guest memory at `addr` (an indirect table).
    pub fn write_table(&self, addr: u64, descs: &[RawDesc]) -> Result<()> {
        for (i, d) in descs.iter().enumerate() {
            self.memory()
                .write(addr + DESC_SIZE * i as u64, &d.to_bytes())?;
        }
        Ok(())
    }

    /// Submits `chain`, waits up to `timeout` for its used element, and reads its status.
    pub fn run_raw(&mut self, chain: &RawChain, timeout: Duration) -> Result<RawReply> {
        if let Some(s) = chain.status {
            self.memory().write(s, &[S_NOT_WRITTEN])?;
        }
        self.submit_raw(&chain.descs, chain.head)?;
        let used = self.wait_raw(timeout)?;
        let status = chain.status.map(|s| self.memory().read_u8(s)).transpose()?;
        Ok(RawReply { used, status })
    }
}

/// header (readable) -> one-sector data (writable) -> status (writable), as an indirect table.
fn valid_table(b: &Bufs) -> [RawDesc; 3] {
    [
        RawDesc {
            addr: b.header,
            len: HEADER_SIZE,
            flags: VRING_DESC_F_NEXT,
            next: 1,
        },
        RawDesc {
            addr: b.data,
            len: SECTOR,
            flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            next: 2,
        },
        RawDesc {
            addr: b.status,
            len: 1,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_links_in_order() {
        let c = ChainBuilder::new()
            .readable(1, 16)
            .writable(2, 512)
            .writable(3, 1)
            .status_at(3)
            .build();
        assert_eq!(c.descs.len(), 3);
        assert_eq!(c.descs[0].flags, VRING_DESC_F_NEXT);
        assert_eq!(c.descs[0].next, 1);
        assert_eq!(c.descs[1].flags, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE);
        assert_eq!(c.descs[1].next, 2);
        assert_eq!(c.descs[2].flags, VRING_DESC_F_WRITE);
        assert_eq!(c.status, Some(3));
    }

    #[test]
    fn link_makes_loops() {
        let c = ChainBuilder::new()
            .readable(1, 16)
            .writable(2, 1)
            .link(1, 0)
            .head(1)
            .build();
        assert_eq!(c.descs[1].flags, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT);
        assert_eq!(c.descs[1].next, 0);
        assert_eq!(c.head, 1);
    }

    #[test]
    fn all_lists_every_case_once() {
        let set: std::collections::HashSet<_> = Malformed::ALL.iter().collect();
        assert_eq!(set.len(), Malformed::ALL.len());
    }
}
