//! Fuzzes the descriptor chain walker (`src/virtio/chain.rs`), which follows a chain the
//! avail ring no longer names (requests replayed after a restart): the descriptor table, any
//! indirect tables and the `next` links are all guest memory, so all of it comes from the
//! input: loops, indices past the table, nested and misaligned indirect tables, tables
//! outside guest memory or across its hole.
//!
//! Input: queue size u16 LE, head u16 LE, table address u32 LE, then guest memory contents
//! from address 0. Guest memory is two regions, 0..32 KiB and 36..64 KiB (a hole between);
//! the table address is folded to land near them.
//!
//! Checks: nothing panics; the walk ends (at most the queue size plus one indirect table's
//! 65535 entries); no descriptor returned is an indirect one; the lengths add up to at most
//! 4 GiB - 1.
#![no_main]

use cormorant::virtio::chain::descriptors;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const LOW: usize = 32 << 10;
const HIGH: u64 = 36 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((header, content)) = data.split_first_chunk::<8>() else {
        return;
    };
    let queue_size = u16::from_le_bytes([header[0], header[1]]);
    let head = u16::from_le_bytes([header[2], header[3]]);
    let raw_table = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    // Mostly inside guest memory, sometimes past its end or at the top of the address space.
    let table = if raw_table >> 31 == 1 {
        u64::MAX - u64::from(raw_table & 0xffff)
    } else {
        u64::from(raw_table) % (80 << 10)
    };
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), LOW), (GuestAddress(HIGH), LOW)])
            .expect("guest memory");
    for (i, chunk) in content.chunks(LOW).take(2).enumerate() {
        let at = if i == 0 { 0 } else { HIGH };
        mem.write_slice(chunk, GuestAddress(at)).expect("inside the region");
    }
    let chain = descriptors(&mem, GuestAddress(table), queue_size, head);
    assert!(chain.len() <= usize::from(queue_size) + usize::from(u16::MAX));
    assert!(chain.iter().all(|d| !d.refers_to_indirect_table()));
    let total: u64 = chain.iter().map(|d| u64::from(d.len())).sum();
    assert!(total <= u64::from(u32::MAX));
});
