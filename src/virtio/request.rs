//! Parsing a guest's virtio-blk request into a checked [`Request`] before any I/O.
//!
//! The guest is untrusted: every descriptor's direction, address and length is checked here,
//! every violation is its own [`ParseError`], and nothing here panics. The layout rules follow
//! the virtio spec (5.2.6): device-readable descriptors first (the 16-byte header, then write
//! data), then device-writable ones (read data, then the status byte last). Framing is not
//! assumed: the header and the status may share descriptors with data.

use smallvec::SmallVec;
use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress};

use super::memory::GuestRam;

use crate::image::SECTOR_SIZE;

/// Size of `struct virtio_blk_outhdr`: type, reserved, sector.
pub const HEADER_LEN: u64 = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes` entry.
pub const RANGE_ENTRY_LEN: u64 = 16;
/// Data segments per request. `preadv`/`pwritev` take at most IOV_MAX (1024) buffers, and the
/// queue size caps a chain at 1024 descriptors anyway.
pub const MAX_SEGMENTS: usize = 1024;

/// A request's guest buffers. Linux sends one to a few per request; inline storage keeps the
/// request path free of allocations.
pub type Segments = SmallVec<[Segment; 4]>;
type Chain = SmallVec<[Descriptor; 8]>;

/// One guest buffer, already checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A byte range of the disk named by a DISCARD or WRITE_ZEROES entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Read { offset: u64 },
    Write { offset: u64 },
    Flush,
    GetId,
    Discard(Vec<ByteRange>),
    WriteZeroes { ranges: Vec<ByteRange>, unmap: bool },
}

/// A request that passed every check: its data segments are in guest memory, its disk range
/// inside the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    /// Read data goes into these (device-writable) buffers; write data comes from these
    /// (device-readable) ones. Empty for flush, discard and write-zeroes.
    pub data: Segments,
    pub data_len: u64,
    pub status: GuestAddress,
}

/// What the parser needs to know of the device.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub capacity: u64,
    pub read_only: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("descriptor chain is empty")]
    Empty,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor at {addr:#x} len {len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("request header is {0} bytes, needs {HEADER_LEN}")]
    ShortHeader(u64),
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("more than {MAX_SEGMENTS} data segments")]
    TooManySegments,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("{0} request carries data in the wrong direction")]
    WrongDirection(&'static str),
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    Unaligned(u64),
    #[error("sectors {sector}+{sectors} reach past the end ({capacity} bytes)")]
    PastEnd {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("write to a read-only image")]
    ReadOnly,
    #[error("GET_ID buffer is empty")]
    EmptyIdBuffer,
    #[error("range list of {0} bytes is not a whole number of entries")]
    BadRangeList(u64),
    #[error("{count} ranges exceed the limit of {max}")]
    TooManyRanges { count: u64, max: u32 },
    #[error("range of {sectors} sectors exceeds the limit of {max}")]
    RangeTooLong { sectors: u32, max: u32 },
    #[error("range flags {0:#x} not supported")]
    RangeFlags(u32),
    #[error("cannot read guest memory at {0:#x}")]
    MemoryRead(u64),
}

impl ParseError {
    /// The status byte the guest gets for this error.
    pub fn status(&self) -> u8 {
        match self {
            ParseError::Unsupported(_) | ParseError::RangeFlags(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A request the parser refused, with the status address when one was found, so the guest
/// still gets an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: ParseError,
    pub status: Option<GuestAddress>,
}

/// The chain split by direction, with the header and status bytes carved off.
struct Layout {
    readable: Segments,
    writable: Segments,
}

/// Parses one descriptor chain (as yielded by virtio-queue's `DescriptorChain`).
pub fn parse<M: GuestRam>(
    mem: &M,
    descriptors: impl IntoIterator<Item = Descriptor>,
    limits: &Limits,
) -> Result<Request, Rejected> {
    let chain = collect(descriptors).map_err(|error| Rejected {
        error,
        status: None,
    })?;
    // Find where the answer goes before judging the rest, so that even a chain with a bad
    // buffer elsewhere gets its IOERR.
    let status = status_byte(mem, &chain);
    let reject = |error| Rejected { error, status };
    let layout = split(mem, &chain).map_err(reject)?;
    let (writable, status) = take_status(layout.writable).map_err(reject)?;
    let reject = |error| Rejected {
        error,
        status: Some(status),
    };
    let (header, readable) = take_header(mem, layout.readable).map_err(reject)?;
    let kind = parse_kind(mem, &header, &readable, &writable, limits).map_err(reject)?;
    let data = match kind {
        Kind::Read { .. } | Kind::GetId => writable,
        Kind::Write { .. } => readable,
        _ => Segments::new(),
    };
    if data.len() > MAX_SEGMENTS {
        return Err(reject(ParseError::TooManySegments));
    }
    let data_len = total(&data);
    Ok(Request {
        kind,
        data,
        data_len,
        status,
    })
}

/// Reads the chain, bounded: the queue library caps chains at the queue size, this at the
/// largest request we would accept.
fn collect(descriptors: impl IntoIterator<Item = Descriptor>) -> Result<Chain, ParseError> {
    let mut chain = Chain::new();
    for desc in descriptors {
        if chain.len() == MAX_SEGMENTS + 2 {
            return Err(ParseError::TooManySegments);
        }
        chain.push(desc);
    }
    if chain.is_empty() {
        return Err(ParseError::Empty);
    }
    Ok(chain)
}

/// The status byte's address: the last byte of the last descriptor, when that descriptor is
/// device-writable and inside guest memory.
fn status_byte<M: GuestRam>(mem: &M, chain: &[Descriptor]) -> Option<GuestAddress> {
    let last = chain.iter().rev().find(|d| d.len() > 0)?;
    let addr = last.addr().checked_add(u64::from(last.len()) - 1)?;
    (last.is_write_only() && mem.check_range(addr, 1)).then_some(addr)
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

fn split<M: GuestRam>(mem: &M, chain: &[Descriptor]) -> Result<Layout, ParseError> {
    let mut layout = Layout {
        readable: Segments::new(),
        writable: Segments::new(),
    };
    for desc in chain {
        let segment = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if segment.len == 0 {
            continue;
        }
        if !mem.check_range(segment.addr, segment.len as usize) {
            return Err(ParseError::OutsideMemory {
                addr: segment.addr.raw_value(),
                len: segment.len,
            });
        }
        if desc.is_write_only() {
            layout.writable.push(segment);
        } else if layout.writable.is_empty() {
            layout.readable.push(segment);
        } else {
            return Err(ParseError::ReadableAfterWritable);
        }
    }
    Ok(layout)
}

/// Takes the last writable byte as the status; returns the writable data before it.
fn take_status(mut writable: Segments) -> Result<(Segments, GuestAddress), ParseError> {
    let last = writable.last_mut().ok_or(ParseError::NoStatus)?;
    let status = last.addr.unchecked_add(u64::from(last.len) - 1);
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    Ok((writable, status))
}

/// Reads the 16-byte header from the front of the readable segments, wherever it falls.
fn take_header<M: GuestRam>(
    mem: &M,
    mut readable: Segments,
) -> Result<([u8; HEADER_LEN as usize], Segments), ParseError> {
    let available = total(&readable);
    if available < HEADER_LEN {
        return Err(ParseError::ShortHeader(available));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    let mut filled = 0usize;
    let mut consumed = 0usize;
    for segment in readable.iter_mut() {
        let take = (header.len() - filled).min(segment.len as usize);
        if !mem.read_slice(&mut header[filled..filled + take], segment.addr) {
            return Err(ParseError::MemoryRead(segment.addr.raw_value()));
        }
        filled += take;
        segment.addr = segment.addr.unchecked_add(take as u64);
        segment.len -= take as u32;
        if segment.len == 0 {
            consumed += 1;
        }
        if filled == header.len() {
            break;
        }
    }
    readable.drain(..consumed);
    Ok((header, readable))
}

fn parse_kind<M: GuestRam>(
    mem: &M,
    header: &[u8; HEADER_LEN as usize],
    readable: &[Segment],
    writable: &[Segment],
    limits: &Limits,
) -> Result<Kind, ParseError> {
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = *header;
    let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes(s);
    let (in_len, out_len) = (total(writable), total(readable));
    match request_type {
        VIRTIO_BLK_T_IN => {
            no_data(out_len, "read")?;
            let offset = check_io(sector, in_len, limits)?;
            Ok(Kind::Read { offset })
        }
        VIRTIO_BLK_T_OUT => {
            no_data(in_len, "write")?;
            if limits.read_only {
                return Err(ParseError::ReadOnly);
            }
            let offset = check_io(sector, out_len, limits)?;
            Ok(Kind::Write { offset })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Kind::Flush),
        VIRTIO_BLK_T_GET_ID => {
            no_data(out_len, "get-id")?;
            if in_len == 0 {
                return Err(ParseError::EmptyIdBuffer);
            }
            Ok(Kind::GetId)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            no_data(in_len, if discard { "discard" } else { "write-zeroes" })?;
            if limits.read_only {
                return Err(ParseError::ReadOnly);
            }
            let (max_count, max_sectors) = if discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            let (ranges, unmap) = parse_ranges(mem, readable, limits, max_count, max_sectors)?;
            match (discard, unmap) {
                // The spec reserves the unmap flag for WRITE_ZEROES.
                (true, true) => Err(ParseError::RangeFlags(VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)),
                (true, false) => Ok(Kind::Discard(ranges)),
                (false, _) => Ok(Kind::WriteZeroes { ranges, unmap }),
            }
        }
        other => Err(ParseError::Unsupported(other)),
    }
}

fn no_data(len: u64, what: &'static str) -> Result<(), ParseError> {
    if len == 0 {
        Ok(())
    } else {
        Err(ParseError::WrongDirection(what))
    }
}

/// Checks a read or write of `len` bytes at `sector`; returns the byte offset.
fn check_io(sector: u64, len: u64, limits: &Limits) -> Result<u64, ParseError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(ParseError::Unaligned(len));
    }
    check_range(sector, len / SECTOR_SIZE, limits.capacity)
}

fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<u64, ParseError> {
    let past_end = || ParseError::PastEnd {
        sector,
        sectors,
        capacity,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(past_end)?;
    let end = sectors
        .checked_mul(SECTOR_SIZE)
        .and_then(|len| offset.checked_add(len))
        .ok_or_else(past_end)?;
    if end > capacity {
        return Err(past_end());
    }
    Ok(offset)
}

/// Reads the `virtio_blk_discard_write_zeroes` entries; returns them and whether every entry
/// asked to unmap.
fn parse_ranges<M: GuestRam>(
    mem: &M,
    readable: &[Segment],
    limits: &Limits,
    max_count: u32,
    max_sectors: u32,
) -> Result<(Vec<ByteRange>, bool), ParseError> {
    let len = total(readable);
    if len == 0 || !len.is_multiple_of(RANGE_ENTRY_LEN) {
        return Err(ParseError::BadRangeList(len));
    }
    let count = len / RANGE_ENTRY_LEN;
    if count > u64::from(max_count) {
        return Err(ParseError::TooManyRanges {
            count,
            max: max_count,
        });
    }
    let mut bytes = vec![0u8; len as usize];
    let mut at = 0usize;
    for segment in readable {
        let end = at + segment.len as usize;
        if !mem.read_slice(&mut bytes[at..end], segment.addr) {
            return Err(ParseError::MemoryRead(segment.addr.raw_value()));
        }
        at = end;
    }
    let mut ranges = Vec::with_capacity(count as usize);
    let mut unmap = true;
    for entry in bytes.chunks_exact(RANGE_ENTRY_LEN as usize) {
        let Ok(&[s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3]) =
            <&[u8; RANGE_ENTRY_LEN as usize]>::try_from(entry)
        else {
            // `chunks_exact` yields only whole entries.
            continue;
        };
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err(ParseError::RangeFlags(flags));
        }
        unmap &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if sectors > max_sectors {
            return Err(ParseError::RangeTooLong {
                sectors,
                max: max_sectors,
            });
        }
        let offset = check_range(sector, u64::from(sectors), limits.capacity)?;
        ranges.push(ByteRange {
            offset,
            len: u64::from(sectors) * SECTOR_SIZE,
        });
    }
    Ok((ranges, unmap))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
