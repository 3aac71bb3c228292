//! Host pointers against vm-memory itself: the same bytes through both, bounds at region
//! edges and past the end, the fallback for what no single region holds, and dirty marking
//! that depends on the migration log.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

/// Two adjacent regions of 64 KiB each, then a hole, then one more at 1 MiB.
fn memory() -> Arc<GuestMemoryMmap<()>> {
    Arc::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
            (GuestAddress(0x10_0000), 0x1_0000),
        ])
        .unwrap(),
    )
}

#[test]
fn reads_and_writes_the_bytes_vm_memory_sees() {
    let mem = memory();
    let host = HostMemory::new(mem.clone(), DirtyLog::default());
    mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x100))
        .unwrap();
    assert_eq!(
        host.read_obj::<u64>(GuestAddress(0x100)),
        Some(0x1122_3344_5566_7788)
    );
    assert!(host.write_obj(0xabu8, GuestAddress(0x10_0005)));
    assert_eq!(
        Bytes::read_obj::<u8>(&*mem, GuestAddress(0x10_0005)).unwrap(),
        0xab
    );
    assert!(host.store_u16(GuestAddress(0x202), 0xbeef, Ordering::Release));
    assert_eq!(
        Bytes::read_obj::<u16>(&*mem, GuestAddress(0x202)).unwrap(),
        0xbeef
    );
    assert_eq!(
        host.load_u16(GuestAddress(0x202), Ordering::Acquire),
        Some(0xbeef)
    );
    // Misaligned objects are read too (a guest may misplace them).
    mem.write_obj(0x0102_0304u32, GuestAddress(0x301)).unwrap();
    assert_eq!(host.read_obj::<u32>(GuestAddress(0x301)), Some(0x0102_0304));
}

#[test]
fn accesses_across_adjacent_regions_fall_back_to_vm_memory() {
    let mem = memory();
    let host = HostMemory::new(mem.clone(), DirtyLog::default());
    let edge = GuestAddress(0x1_0000 - 4);
    mem.write_obj(0x0a0b_0c0d_0e0f_1011u64, edge).unwrap();
    assert_eq!(host.read_obj::<u64>(edge), Some(0x0a0b_0c0d_0e0f_1011));
    let mut buf = [0u8; 8];
    assert!(host.read_slice(&mut buf, edge));
    assert_eq!(u64::from_le_bytes(buf), 0x0a0b_0c0d_0e0f_1011);
    assert!(host.check_range(edge, 8));
    assert!(host.check_range(GuestAddress(0), 0x2_0000));
}

#[test]
fn addresses_outside_guest_memory_are_refused() {
    let host = HostMemory::new(memory(), DirtyLog::default());
    // In the hole, straddling the end of the last region, past everything, near u64::MAX.
    for (addr, len) in [
        (0x2_0000u64, 1usize),
        (0x1_fffc, 8),
        (0x10_fff8, 16),
        (0x20_0000, 2),
        (u64::MAX - 1, 4),
    ] {
        let addr = GuestAddress(addr);
        assert!(!host.check_range(addr, len), "{addr:?}+{len}");
        let mut buf = vec![0u8; len];
        assert!(!host.read_slice(&mut buf, addr), "{addr:?}+{len}");
    }
    assert_eq!(host.read_obj::<u64>(GuestAddress(0x10_fffc)), None);
    assert_eq!(
        host.load_u16(GuestAddress(0x2_0000), Ordering::Acquire),
        None
    );
    assert!(!host.store_u16(GuestAddress(u64::MAX), 1, Ordering::Release));
    assert!(!host.write_obj(1u32, GuestAddress(0x10_fffe)));
}

#[test]
fn host_buffers_cover_exactly_the_segments() {
    let mem = memory();
    let segments = [
        Segment {
            addr: GuestAddress(0x1000),
            len: 4096,
        },
        // Spans the two adjacent regions: cut in two.
        Segment {
            addr: GuestAddress(0xf000),
            len: 0x2000,
        },
    ];
    let iovecs = host_buffers(&*mem, &segments).unwrap();
    let lens: Vec<usize> = iovecs.0.iter().map(|v| v.iov_len).collect();
    assert_eq!(lens, [4096, 0x1000, 0x1000]);
    let first = mem.get_host_address(GuestAddress(0x1000)).unwrap();
    assert_eq!(iovecs.0[0].iov_base.cast::<u8>(), first);
    let outside = [Segment {
        addr: GuestAddress(0x1_f000),
        len: 0x2000,
    }];
    assert!(host_buffers(&*mem, &outside).is_none());
}

#[test]
fn filled_buffers_are_marked_only_while_qemu_logs() {
    let mem: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
    let fills = [Segment {
        addr: GuestAddress(0x2000),
        len: 4096,
    }];
    let dirty = |addr: u64| {
        let region = mem.find_region(GuestAddress(addr)).unwrap();
        region.bitmap().dirty_at(addr as usize)
    };
    let log = DirtyLog::default();
    mark_filled(&log, &mem, &fills);
    assert!(!dirty(0x2000), "logging off: nothing marked");
    log.set(true);
    mark_filled(&log, &mem, &fills);
    assert!(dirty(0x2000));
    assert!(!dirty(0x4000));
}

#[test]
fn writes_go_through_the_dirty_log_only_while_qemu_logs() {
    let mem: Arc<GuestMemoryMmap<AtomicBitmap>> =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap());
    let dirty = |addr: u64| {
        let region = mem.find_region(GuestAddress(addr)).unwrap();
        region.bitmap().dirty_at(addr as usize)
    };
    let log = DirtyLog::default();
    let host = HostMemory::new(mem.clone(), log.clone());
    // Logging off: the fast path, which never touches the bitmap.
    assert!(host.write_obj(7u64, GuestAddress(0x1000)));
    assert!(host.store_u16(GuestAddress(0x2002), 1, Ordering::Release));
    assert!(write_byte(&log, &*mem, GuestAddress(0x3000), 1));
    assert!(!dirty(0x1000) && !dirty(0x2000) && !dirty(0x3000));
    // Logging on: the same writes mark their pages.
    log.set(true);
    assert!(host.write_obj(7u64, GuestAddress(0x1000)));
    assert!(host.store_u16(GuestAddress(0x2002), 2, Ordering::Release));
    assert!(write_byte(&log, &*mem, GuestAddress(0x3000), 1));
    assert!(dirty(0x1000) && dirty(0x2000) && dirty(0x3000));
    assert_eq!(
        host.load_u16(GuestAddress(0x2002), Ordering::Acquire),
        Some(2)
    );
    assert!(!write_byte(&log, &*mem, GuestAddress(0x4_0000), 1));
}
