//! From a request to per-block pieces, and from a block to the copy that serves it.
//!
//! Nothing here knows about virtio queues or files: a request arrives as a byte offset and a
//! list of host buffers, and leaves as pieces that each lie inside one block.

use crate::engine::IoVecs;
use crate::image::{Location, NodeId, Tier};
use smallvec::SmallVec;

/// The part of a request that falls inside one block.
pub struct Piece {
    pub block: u64,
    /// Byte offset inside the block.
    pub offset: u64,
    pub len: u64,
    /// The buffers carrying this piece's bytes, cut at the block boundary.
    pub bufs: IoVecs,
}

/// Splits `offset..offset + len(data)` at block boundaries, cutting the buffers to match.
/// The caller has checked the range against the image size. Only addresses are computed
/// here; no buffer is touched.
pub fn split(offset: u64, data: &IoVecs, block_size: u64) -> SmallVec<[Piece; 2]> {
    let mut pieces: SmallVec<[Piece; 2]> = SmallVec::new();
    let mut at = offset;
    for iov in &data.0 {
        let mut addr = iov.iov_base as usize;
        let mut left = iov.iov_len as u64;
        while left > 0 {
            let block = at / block_size;
            let in_block = at % block_size;
            let take = left.min(block_size - in_block);
            match pieces.last_mut() {
                Some(piece) if piece.block == block => piece.len += take,
                _ => pieces.push(Piece {
                    block,
                    offset: in_block,
                    len: take,
                    bufs: IoVecs(SmallVec::new()),
                }),
            }
            if let Some(piece) = pieces.last_mut() {
                piece.bufs.0.push(libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: take as usize,
                });
            }
            addr += take as usize;
            at += take;
            left -= take;
        }
    }
    pieces
}

/// A byte range inside one block, for discard and write-zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpan {
    pub block: u64,
    pub offset: u64,
    pub len: u64,
}

/// Splits a disk byte range at block boundaries.
pub fn spans(offset: u64, len: u64, block_size: u64) -> impl Iterator<Item = BlockSpan> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let block = at / block_size;
        let in_block = at % block_size;
        let take = (end - at).min(block_size - in_block);
        at += take;
        Some(BlockSpan {
            block,
            offset: in_block,
            len: take,
        })
    })
}

/// The local tier holding an in-sync copy, if this node has one. Reads go there first.
pub fn local_copy(locations: &[Location], me: &NodeId) -> Option<Tier> {
    let mut here = locations.iter().filter(|l| l.synced && &l.node == me);
    let first = here.next()?.tier;
    // Two in-sync copies here (a block the tiering mover is promoting, or the operator's
    // choice): the RAM one is the faster read.
    Some(if here.any(|l| l.tier == Tier::Ram) {
        Tier::Ram
    } else {
        first
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Buffers at made-up addresses: `split` only computes with them.
    fn bufs(list: &[(usize, usize)]) -> IoVecs {
        IoVecs(
            list.iter()
                .map(|&(addr, len)| libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: len,
                })
                .collect(),
        )
    }

    fn pairs(b: &IoVecs) -> Vec<(usize, usize)> {
        b.0.iter()
            .map(|v| (v.iov_base as usize, v.iov_len))
            .collect()
    }

    #[test]
    fn request_inside_one_block_is_one_piece() {
        let p = split(4096, &bufs(&[(0x1000, 4096)]), 1 << 20);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].block, p[0].offset, p[0].len), (0, 4096, 4096));
    }

    #[test]
    fn request_across_a_boundary_is_cut_in_the_buffer() {
        let bs = 64 << 10;
        let p = split(bs - 1024, &bufs(&[(0x1000, 4096)]), bs);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].block, p[0].offset, p[0].len), (0, bs - 1024, 1024));
        assert_eq!(pairs(&p[0].bufs), [(0x1000, 1024)]);
        assert_eq!((p[1].block, p[1].offset, p[1].len), (1, 0, 3072));
        assert_eq!(pairs(&p[1].bufs), [(0x1400, 3072)]);
    }

    #[test]
    fn spans_cover_a_range() {
        let s: Vec<_> = spans(1000, 10_000, 4096).collect();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0],
            BlockSpan {
                block: 0,
                offset: 1000,
                len: 3096
            }
        );
        assert_eq!(
            s[2],
            BlockSpan {
                block: 2,
                offset: 0,
                len: 2808
            }
        );
    }

    #[test]
    fn local_copy_skips_out_of_sync_and_remote() {
        let me = NodeId::local();
        let other: NodeId = "b".parse().unwrap();
        let l = |node: &NodeId, tier, synced| Location {
            node: node.clone(),
            tier,
            synced,
        };
        assert_eq!(local_copy(&[l(&me, Tier::Ram, true)], &me), Some(Tier::Ram));
        assert_eq!(local_copy(&[l(&me, Tier::Ram, false)], &me), None);
        assert_eq!(local_copy(&[l(&other, Tier::Ram, true)], &me), None);
        let both = [l(&other, Tier::Ram, true), l(&me, Tier::Volume, true)];
        assert_eq!(local_copy(&both, &me), Some(Tier::Volume));
        let two_here = [l(&me, Tier::Volume, true), l(&me, Tier::Ram, true)];
        assert_eq!(local_copy(&two_here, &me), Some(Tier::Ram), "RAM first");
        let filling = [l(&me, Tier::Volume, true), l(&me, Tier::Ram, false)];
        assert_eq!(local_copy(&filling, &me), Some(Tier::Volume));
    }

    proptest! {
        /// Pieces tile the request exactly: same bytes, same buffers, each inside one block.
        #[test]
        fn pieces_tile_the_request(
            start in 0u64..1 << 24,
            lens in proptest::collection::vec(1u32..200_000, 1..6),
            shift in 12u32..22,
        ) {
            let bs = 1u64 << shift;
            let list: Vec<(usize, usize)> = lens.iter().enumerate()
                .map(|(i, &len)| (i << 32, len as usize)).collect();
            let data = bufs(&list);
            let pieces = split(start, &data, bs);
            let mut at = start;
            for p in &pieces {
                prop_assert_eq!(p.block * bs + p.offset, at);
                prop_assert!(p.offset + p.len <= bs);
                let sum: u64 = p.bufs.0.iter().map(|v| v.iov_len as u64).sum();
                prop_assert_eq!(sum, p.len);
                at += p.len;
            }
            let total: u64 = lens.iter().map(|&l| u64::from(l)).sum();
            prop_assert_eq!(at, start + total);
        }
    }
}
