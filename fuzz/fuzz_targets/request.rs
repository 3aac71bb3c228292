//! Fuzzes the virtio-blk request parser with what a guest controls: the contents of guest
//! memory (header, range lists) and the descriptors (address, length, direction).
//!
//! Input layout: 256 bytes of guest memory at address 0, then 13-byte descriptors (addr u64 LE, len u32 LE,
//! flags u8). Addresses are folded into a window around the 64 KiB guest memory so that most
//! descriptors are valid and the interesting checks are reached.
#![no_main]

use cormorant::virtio::request::{parse, Kind, Limits};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM: u64 = 64 << 10;

fuzz_target!(|data: &[u8]| {
    if data.len() < 256 {
        return;
    }
    let (content, descs) = data.split_at(256);
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    mem.write_slice(content, GuestAddress(0)).unwrap();
    let chain: Vec<Descriptor> = descs
        .chunks_exact(13)
        .take(2000)
        .map(|d| {
            let raw = u64::from_le_bytes(d[0..8].try_into().unwrap());
            let addr = if raw >> 63 == 1 { raw } else { raw % 1024 };
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let len = if d[12] & 0x80 != 0 { len } else { len % 2048 };
            Descriptor::new(addr, len, u16::from(d[12] & 0x2), 0)
        })
        .collect();
    let limits = Limits {
        capacity: 1 << 30,
        read_only: data[0] & 1 == 1,
        max_discard_sectors: 1 << 21,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1 << 21,
        max_write_zeroes_seg: 4,
    };
    match parse(&mem, chain, &limits) {
        Ok(request) => {
            assert!(mem.check_range(request.status, 1));
            for s in &request.data {
                assert!(mem.check_range(s.addr, s.len as usize));
            }
            if let Kind::Read { offset } | Kind::Write { offset } = request.kind {
                assert!(offset + request.data_len <= limits.capacity);
            }
        }
        Err(rejected) => {
            if let Some(status) = rejected.status {
                assert!(mem.check_range(status, 1));
            }
        }
    }
});
