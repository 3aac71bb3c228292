//! Walks the descriptor chain of a head: heads popped off the avail ring (see `ring`) and
//! requests replayed after a restart (see `inflight`). It follows virtio-queue's rules
//! (`DescriptorChain`): the walk ends at the first descriptor that breaks them (index past the
//! table, a loop, a nested or misaligned indirect table, more than 4 GiB), and the request
//! parser then judges the chain it got. It also ends after one descriptor more than any
//! request may have, so the parser rejects such a chain without the walk reading a whole
//! 65535-entry indirect table first.

use std::mem::size_of;

use smallvec::SmallVec;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress};

use super::memory::GuestRam;
use super::request::MAX_SEGMENTS;

const DESC_SIZE: u32 = size_of::<Descriptor>() as u32;
/// Descriptors a valid request has at most: the data segments, a header and a status.
const MAX_CHAIN: usize = MAX_SEGMENTS + 2;

/// A chain's descriptors; Linux sends three or four per request (header, data, status).
pub type Chain = SmallVec<[Descriptor; 8]>;

/// The descriptors of the chain starting at `head` in the table at `table` of `queue_size`
/// entries.
pub fn descriptors<M: GuestRam>(mem: &M, table: GuestAddress, queue_size: u16, head: u16) -> Chain {
    let mut chain = Chain::new();
    let (mut table, mut size, mut next) = (table, queue_size, head);
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut bytes: u32 = 0;
    while ttl > 0 && next < size {
        let Some(desc) = table
            .checked_add(u64::from(next) * u64::from(DESC_SIZE))
            .and_then(|addr| mem.read_obj::<Descriptor>(addr))
        else {
            break;
        };
        if desc.refers_to_indirect_table() {
            let entries = desc.len() / DESC_SIZE;
            if indirect || desc.len() % DESC_SIZE != 0 || entries > u32::from(u16::MAX) {
                break;
            }
            (table, size, next) = (desc.addr(), entries as u16, 0);
            ttl = size;
            indirect = true;
            continue;
        }
        let Some(total) = bytes.checked_add(desc.len()) else {
            break;
        };
        bytes = total;
        chain.push(desc);
        if !desc.has_next() || chain.len() > MAX_CHAIN {
            break;
        }
        next = desc.next();
        ttl -= 1;
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::{Bytes, GuestMemoryMmap};

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap<()>, table: u64, index: u16, desc: Descriptor) {
        let addr = GuestAddress(table + u64::from(index) * 16);
        mem.write_obj(desc, addr).unwrap();
    }

    #[test]
    fn follows_next_links() {
        let mem = memory();
        put(&mem, 0, 3, Descriptor::new(0x1000, 16, NEXT, 7));
        put(&mem, 0, 7, Descriptor::new(0x2000, 512, NEXT, 1));
        put(
            &mem,
            0,
            1,
            Descriptor::new(0x3000, 1, VRING_DESC_F_WRITE as u16, 0),
        );
        let chain = descriptors(&mem, GuestAddress(0), 8, 3);
        let addrs: Vec<u64> = chain.iter().map(|d| d.addr().0).collect();
        assert_eq!(addrs, [0x1000, 0x2000, 0x3000]);
        assert!(chain[2].is_write_only());
    }

    #[test]
    fn stops_at_loops_and_bad_indices() {
        let mem = memory();
        put(&mem, 0, 0, Descriptor::new(0x1000, 16, NEXT, 1));
        put(&mem, 0, 1, Descriptor::new(0x1000, 16, NEXT, 0));
        assert_eq!(descriptors(&mem, GuestAddress(0), 4, 0).len(), 4);
        put(&mem, 0, 2, Descriptor::new(0x1000, 16, NEXT, 9));
        assert_eq!(descriptors(&mem, GuestAddress(0), 4, 2).len(), 1);
        assert!(descriptors(&mem, GuestAddress(0), 4, 4).is_empty());
    }

    #[test]
    fn enters_one_indirect_table() {
        let mem = memory();
        let indirect = VRING_DESC_F_INDIRECT as u16;
        put(&mem, 0, 0, Descriptor::new(0x800, 32, indirect, 0));
        put(&mem, 0x800, 0, Descriptor::new(0x1000, 16, NEXT, 1));
        put(&mem, 0x800, 1, Descriptor::new(0x2000, 1, 0, 0));
        assert_eq!(descriptors(&mem, GuestAddress(0), 4, 0).len(), 2);
        // Nested and misaligned tables end the walk.
        put(&mem, 0x800, 1, Descriptor::new(0x900, 16, indirect, 0));
        assert_eq!(descriptors(&mem, GuestAddress(0), 4, 0).len(), 1);
        put(&mem, 0, 1, Descriptor::new(0x800, 20, indirect, 0));
        assert!(descriptors(&mem, GuestAddress(0), 4, 1).is_empty());
    }
}
