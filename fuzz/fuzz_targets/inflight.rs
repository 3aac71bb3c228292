//! Fuzzes the in-flight region QEMU hands a (restarted) daemon (`src/virtio/inflight.rs`):
//! the file's contents and the SET_INFLIGHT_FD message describing it (size, offset, queues,
//! queue size) are QEMU's, and a crashed daemon may have left the region in any state. Through
//! the public API: `Region::map`, then each queue's `recover`, then a run of marks and
//! completions, then `recover` again as the next daemon would.
//!
//! Input: mmap_size u32 LE, mmap_offset u16 LE, num_queues u8, queue_size log2 u8 (low 4 bits;
//! the high bit makes it not a power of two), extra file length u16 LE (in 64-byte units),
//! used index u16 LE, then operations (2 bytes each, see below) up to a 0xff byte, then the
//! file's contents.
//!
//! Checks: nothing panics; recovered heads are inside the queue and distinct; after the marks
//! and completions, the next recovery returns exactly the heads still marked: the ones left
//! from the region plus those begun and not completed, minus a head whose completion reached
//! the used ring when the daemon "crashed" (before its mark was cleared).
#![no_main]

use std::collections::BTreeSet;
use std::io::Write;

use cormorant::virtio::inflight::{create, Region};
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::VhostUserInflight;

fuzz_target!(|data: &[u8]| {
    let Some((header, rest)) = data.split_first_chunk::<14>() else {
        return;
    };
    let mmap_size = u64::from(u32::from_le_bytes([header[0], header[1], header[2], header[3]]));
    let mmap_offset = u64::from(u16::from_le_bytes([header[4], header[5]]));
    let num_queues = u16::from(header[6]);
    let queue_size = if header[7] & 0x80 != 0 {
        u16::from(header[7])
    } else {
        1u16 << (header[7] & 0x0f)
    };
    let extra = u64::from(u16::from_le_bytes([header[8], header[9]])) * 64;
    let used_idx = u16::from_le_bytes([header[10], header[11]]);
    let _ = header[12..14]; // Reserved: keeps old corpora meaningful if the layout grows.
    let split = rest.iter().position(|&b| b == 0xff).unwrap_or(rest.len());
    let (ops, contents) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());

    // A memfd from the module itself, then QEMU's contents in it.
    let Ok((mut file, _)) = create(1, 1) else {
        return;
    };
    file.write_all(contents).expect("write the region");
    file.set_len(contents.len() as u64 + extra).expect("size the region");
    let info = VhostUserInflight::new(mmap_size, mmap_offset, num_queues, queue_size);
    let Ok(region) = Region::map(file, &info) else {
        return;
    };
    assert!(region.queues() == num_queues && num_queues > 0);
    assert!(queue_size.is_power_of_two());

    for index in 0..region.queues() {
        let mut queue = region.queue(index).expect("a queue of the region");
        assert!(queue.needs_recovery());
        let heads = queue.recover(used_idx);
        assert!(!queue.needs_recovery());
        let mut marked: BTreeSet<u16> = BTreeSet::new();
        for &head in &heads {
            assert!(head < queue_size, "recovered head {head} of a {queue_size}-entry queue");
            assert!(marked.insert(head), "head {head} recovered twice");
        }
        // Operations: (kind, head). Kinds: 0 begin, 1 complete, 2 crash mid-completion (the
        // head reached the used ring, its mark not yet cleared: stop here).
        let mut used = used_idx;
        let mut crashed = None;
        for op in ops.chunks_exact(2) {
            let head = u16::from(op[1]) % queue_size;
            match op[0] % 3 {
                0 => {
                    queue.begin(head);
                    marked.insert(head);
                }
                1 => {
                    used = used.wrapping_add(1);
                    queue.before_used(head);
                    queue.after_used(head, used);
                    marked.remove(&head);
                }
                _ => {
                    queue.before_used(head);
                    used = used.wrapping_add(1);
                    crashed = Some(head);
                    break;
                }
            }
        }
        if let Some(head) = crashed {
            marked.remove(&head);
        }
        let mut next = region.queue(index).expect("a queue of the region");
        let again: BTreeSet<u16> = next.recover(used).into_iter().collect();
        assert_eq!(again, marked, "queue {index}: what the next daemon replays");
    }
    assert!(region.queue(region.queues()).is_none());
});
