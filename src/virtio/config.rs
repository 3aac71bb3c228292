//! The virtio-blk config space (`struct virtio_blk_config`), laid out by hand: the bindings'
//! struct is not `ByteValued`, and QEMU reads arbitrary windows of it.

use crate::image::SECTOR_SIZE;

/// Byte offsets of the fields we fill (virtio spec 5.2.4).
mod offset {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const NUM_QUEUES: usize = 34;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    /// Up to and including the secure-erase fields; zoned fields follow but we offer no ZONED.
    pub const END: usize = 72;
}

/// The values a device advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    pub capacity_bytes: u64,
    pub seg_max: u32,
    pub size_max: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_alignment_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

impl BlkConfig {
    fn bytes(&self) -> [u8; offset::END] {
        let mut b = [0u8; offset::END];
        let mut put = |at: usize, value: &[u8]| b[at..at + value.len()].copy_from_slice(value);
        put(
            offset::CAPACITY,
            &(self.capacity_bytes / SECTOR_SIZE).to_le_bytes(),
        );
        put(offset::SIZE_MAX, &self.size_max.to_le_bytes());
        put(offset::SEG_MAX, &self.seg_max.to_le_bytes());
        put(offset::BLK_SIZE, &(SECTOR_SIZE as u32).to_le_bytes());
        put(offset::NUM_QUEUES, &self.num_queues.to_le_bytes());
        put(
            offset::MAX_DISCARD_SECTORS,
            &self.max_discard_sectors.to_le_bytes(),
        );
        put(offset::MAX_DISCARD_SEG, &self.max_discard_seg.to_le_bytes());
        put(
            offset::DISCARD_SECTOR_ALIGNMENT,
            &self.discard_alignment_sectors.to_le_bytes(),
        );
        put(
            offset::MAX_WRITE_ZEROES_SECTORS,
            &self.max_write_zeroes_sectors.to_le_bytes(),
        );
        put(
            offset::MAX_WRITE_ZEROES_SEG,
            &self.max_write_zeroes_seg.to_le_bytes(),
        );
        put(offset::WRITE_ZEROES_MAY_UNMAP, &[1]);
        b
    }

    /// Exactly `size` bytes from `offset`, zero-padded past the end of what we define, as the
    /// vhost-user GET_CONFIG reply must be.
    pub fn window(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.bytes();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(bytes.len());
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BlkConfig {
        BlkConfig {
            capacity_bytes: 20 << 30,
            seg_max: 126,
            size_max: 1 << 20,
            num_queues: 4,
            max_discard_sectors: 8192,
            max_discard_seg: 1,
            discard_alignment_sectors: 8,
            max_write_zeroes_sectors: 8192,
            max_write_zeroes_seg: 1,
        }
    }

    #[test]
    fn fields_land_where_the_spec_says() {
        let w = config().window(0, 60);
        assert_eq!(w.len(), 60);
        assert_eq!(u64::from_le_bytes(w[0..8].try_into().unwrap()), 40 << 20);
        assert_eq!(u32::from_le_bytes(w[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(w[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(w[34..36].try_into().unwrap()), 4);
        assert_eq!(w[56], 1);
    }

    #[test]
    fn window_is_exactly_the_size_asked() {
        let c = config();
        assert_eq!(c.window(0, 200).len(), 200);
        assert_eq!(c.window(34, 2), 4u16.to_le_bytes().to_vec());
        assert_eq!(c.window(1000, 8), vec![0; 8]);
        assert_eq!(c.window(u32::MAX, 4), vec![0; 4]);
    }
}
