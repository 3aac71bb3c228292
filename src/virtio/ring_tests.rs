//! The raw ring access against virtio-queue's driver-side mock: heads and chains popped,
//! wrapping indices, a driver index too far ahead, used elements, EVENT_IDX decisions, rings
//! outside guest memory.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::memory::DirtyLog;

const SIZE: u16 = 16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

type Mem = GuestMemoryMmap<()>;

fn memory() -> Arc<Mem> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// A request-like chain (header, data, status) at descriptor `first`.
fn request_chain(first: u16) -> [RawDescriptor; 3] {
    [
        raw(0x1_0000, 16, NEXT, first + 1),
        raw(0x2_0000, 4096, NEXT | WRITE, first + 2),
        raw(0x3_0000, 1, WRITE, 0),
    ]
}

fn set_avail_idx(mem: &Mem, mock: &MockSplitQueue<Mem>, idx: u16) {
    mem.write_obj(idx.to_le(), mock.avail_addr().unchecked_add(2))
        .unwrap();
}

#[test]
fn pops_heads_and_chains_the_driver_made_available() {
    let mem = memory();
    let mock = MockSplitQueue::new(&*mem, SIZE);
    let mut chains = request_chain(0).to_vec();
    chains.extend(request_chain(3));
    mock.add_desc_chains(&chains, 0).unwrap();
    let queue: Queue = mock.create_queue().unwrap();
    let host = HostMemory::new(mem.clone(), DirtyLog::default());
    let rings = Rings::of(&queue).unwrap();
    assert_eq!(rings.available(&host, 0), Ok(2));
    assert_eq!(rings.available(&host, 1), Ok(1));
    assert_eq!(rings.avail_head(&host, 0), Ok(0));
    assert_eq!(rings.avail_head(&host, 1), Ok(3));
    let chain = rings.chain(&host, 3);
    let addrs: Vec<u64> = chain.iter().map(|d| d.addr().0).collect();
    assert_eq!(addrs, [0x1_0000, 0x2_0000, 0x3_0000]);
    assert!(chain[1].is_write_only() && !chain[0].is_write_only());
}

#[test]
fn indices_wrap_around_u16() {
    let mem = memory();
    let mock = MockSplitQueue::new(&*mem, SIZE);
    let queue: Queue = mock.create_queue().unwrap();
    let host = HostMemory::new(mem.clone(), DirtyLog::default());
    let rings = Rings::of(&queue).unwrap();
    // The driver published two heads past 65535; the device is at 65535.
    set_avail_idx(&mem, &mock, 1);
    assert_eq!(rings.available(&host, u16::MAX), Ok(2));
    // Position 65535 is ring slot 15, position 0 slot 0.
    let slot = |i: u64| mock.avail_addr().unchecked_add(4 + 2 * i);
    mem.write_obj(7u16.to_le(), slot(15)).unwrap();
    mem.write_obj(9u16.to_le(), slot(0)).unwrap();
    assert_eq!(rings.avail_head(&host, u16::MAX), Ok(7));
    assert_eq!(rings.avail_head(&host, 0), Ok(9));
    // The used index wraps the same way.
    assert_eq!(rings.put_used(&host, u16::MAX, 7, 4097), Ok(0));
    let elem = mock.used().ring().ref_at(15).unwrap().load();
    assert_eq!((elem.id(), elem.len()), (7, 4097));
    assert_eq!(mock.used().idx().load(), 0);
}

#[test]
fn an_avail_index_more_than_a_ring_ahead_is_refused() {
    let mem = memory();
    let mock = MockSplitQueue::new(&*mem, SIZE);
    let queue: Queue = mock.create_queue().unwrap();
    let host = HostMemory::new(mem.clone(), DirtyLog::default());
    let rings = Rings::of(&queue).unwrap();
    set_avail_idx(&mem, &mock, SIZE);
    assert_eq!(rings.available(&host, 0), Ok(SIZE));
    set_avail_idx(&mem, &mock, SIZE + 1);
    assert_eq!(
        rings.available(&host, 0),
        Err(RingError::AvailTooFarAhead {
            avail: SIZE + 1,
            next: 0,
            size: SIZE
        })
    );
}

#[test]
fn used_elements_are_published_in_order() {
    let mem = memory();
    let mock = MockSplitQueue::new(&*mem, SIZE);
    let queue: Queue = mock.create_queue().unwrap();
    let host = HostMemory::new(mem.clone(), DirtyLog::default());
    let rings = Rings::of(&queue).unwrap();
    assert_eq!(rings.put_used(&host, 0, 3, 1), Ok(1));
    assert_eq!(rings.put_used(&host, 1, 0, 513), Ok(2));
    assert_eq!(mock.used().idx().load(), 2);
    let elem = mock.used().ring().ref_at(1).unwrap().load();
    assert_eq!((elem.id(), elem.len()), (0, 513));
    assert_eq!(
        rings.put_used(&host, 2, SIZE, 1),
        Err(RingError::BadHead {
            head: SIZE,
            size: SIZE
        })
    );
    assert_eq!(mock.used().idx().load(), 2, "a bad head publishes nothing");
}

#[test]
fn rings_outside_guest_memory_are_errors_not_panics() {
    let mem = memory();
    let mut queue = Queue::new(SIZE).unwrap();
    queue.set_size(SIZE);
    queue.set_desc_table_address(Some(0), Some(0));
    // Avail and used rings past the end of the 1 MiB of guest memory.
    queue.set_avail_ring_address(Some(0x10_0000 - 2), Some(0));
    queue.set_used_ring_address(Some(0xffff_fff0), Some(0xffff_ffff));
    queue.set_ready(true);
    let host = HostMemory::new(mem, DirtyLog::default());
    let rings = Rings::of(&queue).unwrap();
    assert!(matches!(
        rings.available(&host, 0),
        Err(RingError::AvailUnreadable(_))
    ));
    assert!(matches!(
        rings.avail_head(&host, 0),
        Err(RingError::AvailUnreadable(_))
    ));
    assert!(matches!(
        rings.put_used(&host, 0, 0, 1),
        Err(RingError::UsedUnwritable(_))
    ));
    assert_eq!(rings.used_event(&host), None);
}

#[test]
fn a_queue_being_stopped_still_takes_completions() {
    // vhost-user-backend marks a queue not ready before it asks the backend to stop it; the
    // requests in flight then must still reach the used ring.
    let mem = memory();
    let mock = MockSplitQueue::new(&*mem, SIZE);
    let mut queue: Queue = mock.create_queue().unwrap();
    queue.set_ready(false);
    let host = HostMemory::new(mem.clone(), DirtyLog::default());
    let rings = Rings::of(&queue).unwrap();
    assert_eq!(rings.put_used(&host, 0, 1, 1), Ok(1));
    assert_eq!(mock.used().idx().load(), 1);
}

#[test]
fn malformed_chains_end_the_walk() {
    let mem = memory();
    let mock = MockSplitQueue::new(&*mem, SIZE);
    let indirect = VRING_DESC_F_INDIRECT as u16;
    // 0 -> 1 -> 0: a loop, cut after the queue size; 2 -> 99: past the table; 3: an indirect
    // table whose length is not a whole number of descriptors.
    mock.add_desc_chains(
        &[
            raw(0x1000, 16, NEXT, 1),
            raw(0x1000, 16, NEXT, 0),
            raw(0x1000, 16, NEXT, 99),
            raw(0x8000, 24, indirect, 0),
        ],
        0,
    )
    .unwrap();
    let queue: Queue = mock.create_queue().unwrap();
    let host = HostMemory::new(mem.clone(), DirtyLog::default());
    let rings = Rings::of(&queue).unwrap();
    assert_eq!(rings.chain(&host, 0).len(), usize::from(SIZE));
    assert_eq!(rings.chain(&host, 2).len(), 1);
    assert!(rings.chain(&host, 3).is_empty());
    assert!(rings.chain(&host, SIZE).is_empty(), "head past the table");
}

#[test]
fn indirect_tables_are_followed() {
    let mem = memory();
    let mock = MockSplitQueue::new(&*mem, SIZE);
    let table = 0x8000;
    for (i, d) in request_chain(0).iter().enumerate() {
        mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let indirect = VRING_DESC_F_INDIRECT as u16;
    mock.add_desc_chains(&[raw(table, 48, indirect, 0)], 0)
        .unwrap();
    let queue: Queue = mock.create_queue().unwrap();
    let host = HostMemory::new(mem.clone(), DirtyLog::default());
    let rings = Rings::of(&queue).unwrap();
    let chain = rings.chain(&host, 0);
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[2].addr(), GuestAddress(0x3_0000));
}

#[test]
fn event_idx_asks_for_an_interrupt_only_when_used_event_is_crossed() {
    // The driver wants an interrupt when the used index passes its used_event.
    assert!(need_event(0, 1, 0));
    assert!(!need_event(5, 3, 0));
    assert!(need_event(5, 6, 3));
    assert!(!need_event(5, 8, 6), "crossed before the last decision");
    // Wrapping: from 65534 to 2 crosses 65535 and 0.
    assert!(need_event(u16::MAX, 2, u16::MAX - 1));
    assert!(need_event(0, 2, u16::MAX - 1));
    assert!(!need_event(5, 2, u16::MAX - 1));

    let mem = memory();
    let mock = MockSplitQueue::new(&*mem, SIZE);
    let queue: Queue = mock.create_queue().unwrap();
    let host = HostMemory::new(mem.clone(), DirtyLog::default());
    let rings = Rings::of(&queue).unwrap();
    let used_event = mock.avail_addr().unchecked_add(4 + 2 * u64::from(SIZE));
    mem.write_obj(41u16.to_le(), used_event).unwrap();
    assert_eq!(rings.used_event(&host), Some(41));
}
