//! virtio-blk as a driver sees it (virtio 1.x, section 5.2): the config space, the request
//! header, discard/write-zeroes segments and status bytes. No rings, no sockets.

use super::memory::GuestBuf;
use super::{Error, Result};

/// Sector size of the virtio-blk request header and of `capacity`, whatever `blk_size` says.
pub const SECTOR_SIZE: u64 = 512;

/// Size of the request header (`type`, `ioprio`, `sector`).
pub const HEADER_SIZE: u32 = 16;

/// Size of one discard / write-zeroes segment.
pub const SEGMENT_SIZE: u32 = 16;

/// Size of the GET_ID answer.
pub const ID_BYTES: u32 = 20;

/// Bytes of config space read with GET_CONFIG: the fields up to and including
/// `write_zeroes_may_unmap` and its padding (offset 60).
///
/// QEMU's own frontend asks for the size its enabled features need. qemu-storage-daemon (QEMU
/// 10) answers up to 96 bytes (its `struct virtio_blk_config`); for more it replies with an
/// empty payload, which vhost 0.18's `get_config` does not expect: it keeps waiting for the
/// bytes (our control watchdog turns that into a timeout). We need nothing past offset 60.
pub const CONFIG_READ_LEN: u32 = 60;

/// Request type: read (`VIRTIO_BLK_T_IN`).
pub const T_IN: u32 = 0;
/// Request type: write (`VIRTIO_BLK_T_OUT`).
pub const T_OUT: u32 = 1;
/// Request type: flush (`VIRTIO_BLK_T_FLUSH`).
pub const T_FLUSH: u32 = 4;
/// Request type: device id string (`VIRTIO_BLK_T_GET_ID`).
pub const T_GET_ID: u32 = 8;
/// Request type: discard (`VIRTIO_BLK_T_DISCARD`).
pub const T_DISCARD: u32 = 11;
/// Request type: write zeroes (`VIRTIO_BLK_T_WRITE_ZEROES`).
pub const T_WRITE_ZEROES: u32 = 13;

/// Status: success.
pub const S_OK: u8 = 0;
/// Status: I/O error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = 2;
/// Written into every status byte before a request is made available: a completion that still
/// shows it means the backend used the chain without writing a status.
pub const S_NOT_WRITTEN: u8 = 0xff;

/// Feature bits a virtio-blk driver understands and acks when offered (bit numbers).
pub mod feature {
    /// Maximum segment size in `size_max`.
    pub const SIZE_MAX: u32 = 1;
    /// Maximum segment count in `seg_max`.
    pub const SEG_MAX: u32 = 2;
    /// Disk geometry.
    pub const GEOMETRY: u32 = 4;
    /// Read-only device.
    pub const RO: u32 = 5;
    /// Block size in `blk_size`.
    pub const BLK_SIZE: u32 = 6;
    /// Flush command.
    pub const FLUSH: u32 = 9;
    /// Topology fields.
    pub const TOPOLOGY: u32 = 10;
    /// Writeback toggle in `wce`.
    pub const CONFIG_WCE: u32 = 11;
    /// Several queues; count in `num_queues`.
    pub const MQ: u32 = 12;
    /// Discard command.
    pub const DISCARD: u32 = 13;
    /// Write-zeroes command.
    pub const WRITE_ZEROES: u32 = 14;
}

/// The virtio-blk config space, parsed by hand from little-endian bytes.
///
/// A field means something only if its feature was negotiated (`seg_max` with SEG_MAX, ...);
/// the values are kept raw so a test can check exactly what the backend put there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment (SIZE_MAX).
    pub size_max: u32,
    /// Most segments per request (SEG_MAX).
    pub seg_max: u32,
    /// Geometry: cylinders, heads, sectors (GEOMETRY).
    pub geometry: (u16, u8, u8),
    /// Logical block size (BLK_SIZE).
    pub blk_size: u32,
    /// log2 of logical blocks per physical block (TOPOLOGY).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block (TOPOLOGY).
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks (TOPOLOGY).
    pub min_io_size: u16,
    /// Optimal I/O size in blocks (TOPOLOGY).
    pub opt_io_size: u32,
    /// Writeback cache enabled (CONFIG_WCE).
    pub wce: u8,
    /// Number of queues (MQ).
    pub num_queues: u16,
    /// Largest discard in sectors (DISCARD).
    pub max_discard_sectors: u32,
    /// Most discard segments (DISCARD).
    pub max_discard_seg: u32,
    /// Discard alignment in sectors (DISCARD).
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in sectors (WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments (WRITE_ZEROES).
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes may unmap (WRITE_ZEROES).
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// Parses config space bytes starting at offset 0. Fields past the end of `b` read as 0;
    /// fewer than 8 bytes (no capacity) is an error.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < 8 {
            return Err(Error::ShortConfig(b.len()));
        }
        let u8_at = |o: usize| b.get(o).copied().unwrap_or(0);
        let le = |o: usize, n: usize| -> u64 {
            (0..n).fold(0u64, |acc, i| acc | u64::from(u8_at(o + i)) << (8 * i))
        };
        Ok(BlkConfig {
            capacity: le(0, 8),
            size_max: le(8, 4) as u32,
            seg_max: le(12, 4) as u32,
            geometry: (le(16, 2) as u16, u8_at(18), u8_at(19)),
            blk_size: le(20, 4) as u32,
            physical_block_exp: u8_at(24),
            alignment_offset: u8_at(25),
            min_io_size: le(26, 2) as u16,
            opt_io_size: le(28, 4) as u32,
            wce: u8_at(32),
            num_queues: le(34, 2) as u16,
            max_discard_sectors: le(36, 4) as u32,
            max_discard_seg: le(40, 4) as u32,
            discard_sector_alignment: le(44, 4) as u32,
            max_write_zeroes_sectors: le(48, 4) as u32,
            max_write_zeroes_seg: le(52, 4) as u32,
            write_zeroes_may_unmap: u8_at(56),
        })
    }

    /// Size in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR_SIZE)
    }
}

/// The 16 bytes of a request header.
pub fn encode_header(req_type: u32, sector: u64) -> [u8; HEADER_SIZE as usize] {
    let mut b = [0u8; HEADER_SIZE as usize];
    b[0..4].copy_from_slice(&req_type.to_le_bytes());
    // b[4..8]: ioprio, reserved (0).
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    b
}

/// One discard or write-zeroes segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Bit 0: unmap (write-zeroes only); other bits are reserved.
    pub flags: u32,
}

impl DiscardRange {
    /// Unmap flag of a write-zeroes segment.
    pub const FLAG_UNMAP: u32 = 1;

    /// The 16 little-endian bytes of the segment.
    pub fn to_bytes(self) -> [u8; SEGMENT_SIZE as usize] {
        let mut b = [0u8; SEGMENT_SIZE as usize];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// One well-formed request: header, an optional data buffer, status.
///
/// `Copy` and allocation-free, so a benchmark can keep an array of them and resubmit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkRequest {
    /// `T_*` request type (any value: unknown types are a test case).
    pub req_type: u32,
    /// First sector (512 bytes each).
    pub sector: u64,
    /// Data buffer in guest memory, if the request has one.
    pub data: Option<GuestBuf>,
    /// True when the device writes the data buffer (reads, GET_ID).
    pub data_writable: bool,
}

impl BlkRequest {
    /// Read `buf.len` bytes from `sector` into `buf`.
    pub fn read(sector: u64, buf: GuestBuf) -> Self {
        Self::with_data(T_IN, sector, buf, true)
    }

    /// Write `buf` at `sector`.
    pub fn write(sector: u64, buf: GuestBuf) -> Self {
        Self::with_data(T_OUT, sector, buf, false)
    }

    /// Flush the backend's cache.
    pub fn flush() -> Self {
        BlkRequest {
            req_type: T_FLUSH,
            sector: 0,
            data: None,
            data_writable: false,
        }
    }

    /// Read the device id into `buf` (20 bytes).
    pub fn get_id(buf: GuestBuf) -> Self {
        Self::with_data(T_GET_ID, 0, buf, true)
    }

    /// Discard the segments in `segments` (16 bytes each, see [`DiscardRange`]).
    pub fn discard(segments: GuestBuf) -> Self {
        Self::with_data(T_DISCARD, 0, segments, false)
    }

    /// Write zeroes over the segments in `segments`.
    pub fn write_zeroes(segments: GuestBuf) -> Self {
        Self::with_data(T_WRITE_ZEROES, 0, segments, false)
    }

    /// Any request type with a data buffer in the given direction.
    pub fn with_data(req_type: u32, sector: u64, buf: GuestBuf, data_writable: bool) -> Self {
        BlkRequest {
            req_type,
            sector,
            data: Some(buf),
            data_writable,
        }
    }

    /// Descriptors the request needs in a direct chain: header, data (if any), status.
    pub fn descriptors(&self) -> u16 {
        if self.data.is_some() {
            3
        } else {
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_little_endian_fields() {
        let mut b = vec![0u8; CONFIG_READ_LEN as usize];
        b[0..8].copy_from_slice(&0x1_0000_0001u64.to_le_bytes());
        b[12..16].copy_from_slice(&126u32.to_le_bytes());
        b[20..24].copy_from_slice(&4096u32.to_le_bytes());
        b[34..36].copy_from_slice(&2u16.to_le_bytes());
        b[36..40].copy_from_slice(&0x3fff_ffffu32.to_le_bytes());
        b[52..56].copy_from_slice(&1u32.to_le_bytes());
        b[56] = 1;
        let c = BlkConfig::parse(&b).unwrap();
        assert_eq!(c.capacity, 0x1_0000_0001);
        assert_eq!(c.seg_max, 126);
        assert_eq!(c.blk_size, 4096);
        assert_eq!(c.num_queues, 2);
        assert_eq!(c.max_discard_sectors, 0x3fff_ffff);
        assert_eq!(c.max_write_zeroes_seg, 1);
        assert_eq!(c.write_zeroes_may_unmap, 1);
    }

    #[test]
    fn short_config_reads_missing_fields_as_zero() {
        let c = BlkConfig::parse(&[1, 0, 0, 0, 0, 0, 0, 0, 9]).unwrap();
        assert_eq!(c.capacity, 1);
        assert_eq!(c.size_max, 9);
        assert_eq!(c.num_queues, 0);
        assert!(BlkConfig::parse(&[0; 7]).is_err());
    }

    #[test]
    fn header_and_segment_layouts() {
        let h = encode_header(T_OUT, 0x0102_0304_0506_0708);
        assert_eq!(&h[0..4], &[1, 0, 0, 0]);
        assert_eq!(&h[4..8], &[0; 4]);
        assert_eq!(&h[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        let s = DiscardRange {
            sector: 2,
            num_sectors: 3,
            flags: DiscardRange::FLAG_UNMAP,
        }
        .to_bytes();
        assert_eq!(s, [2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0]);
    }
}
