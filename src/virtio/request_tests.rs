use super::*;
use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

const MEM: u64 = 1 << 20;

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn limits() -> Limits {
    Limits {
        capacity: 64 << 20,
        read_only: false,
        max_discard_sectors: 1 << 20,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1 << 20,
        max_write_zeroes_seg: 4,
    }
}

fn header(mem: &GuestMemoryMmap<()>, at: u64, kind: u32, sector: u64) -> Descriptor {
    let mut bytes = [0u8; 16];
    bytes[0..4].copy_from_slice(&kind.to_le_bytes());
    bytes[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    Descriptor::new(at, 16, 0, 0)
}

fn readable(at: u64, len: u32) -> Descriptor {
    Descriptor::new(at, len, 0, 0)
}

fn writable(at: u64, len: u32) -> Descriptor {
    Descriptor::new(at, len, VRING_DESC_F_WRITE as u16, 0)
}

fn error_of(r: Result<Request, Rejected>) -> ParseError {
    r.expect_err("request should be rejected").error
}

#[test]
fn read_request() {
    let mem = memory();
    let chain = [
        header(&mem, 0, VIRTIO_BLK_T_IN, 8),
        writable(0x1000, 4096),
        writable(0x3000, 1),
    ];
    let r = parse(&mem, chain, &limits()).unwrap();
    assert_eq!(r.kind, Kind::Read { offset: 4096 });
    assert_eq!(r.data_len, 4096);
    assert_eq!(r.status, GuestAddress(0x3000));
}

#[test]
fn status_may_share_the_last_data_descriptor() {
    let mem = memory();
    let chain = [header(&mem, 0, VIRTIO_BLK_T_IN, 0), writable(0x1000, 513)];
    let r = parse(&mem, chain, &limits()).unwrap();
    assert_eq!(
        r.data.to_vec(),
        vec![Segment {
            addr: GuestAddress(0x1000),
            len: 512
        }]
    );
    assert_eq!(r.status, GuestAddress(0x1200));
}

#[test]
fn header_may_span_descriptors_and_carry_data() {
    let mem = memory();
    let _ = header(&mem, 0x100, VIRTIO_BLK_T_OUT, 2);
    let chain = [
        readable(0x100, 10),
        readable(0x10a, 6 + 512),
        writable(0x2000, 1),
    ];
    let r = parse(&mem, chain, &limits()).unwrap();
    assert_eq!(r.kind, Kind::Write { offset: 1024 });
    assert_eq!(
        r.data.to_vec(),
        vec![Segment {
            addr: GuestAddress(0x110),
            len: 512
        }]
    );
}

#[test]
fn write_to_read_only_image_is_refused() {
    let mem = memory();
    let chain = [
        header(&mem, 0, VIRTIO_BLK_T_OUT, 0),
        readable(0x1000, 512),
        writable(0x2000, 1),
    ];
    let ro = Limits {
        read_only: true,
        ..limits()
    };
    let rejected = parse(&mem, chain, &ro).unwrap_err();
    assert_eq!(rejected.error, ParseError::ReadOnly);
    assert_eq!(rejected.status, Some(GuestAddress(0x2000)));
    assert_eq!(rejected.error.status(), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn flush_and_get_id() {
    let mem = memory();
    let flush = [header(&mem, 0, VIRTIO_BLK_T_FLUSH, 0), writable(0x2000, 1)];
    assert_eq!(parse(&mem, flush, &limits()).unwrap().kind, Kind::Flush);
    let id = [
        header(&mem, 0, VIRTIO_BLK_T_GET_ID, 0),
        writable(0x1000, 20),
        writable(0x2000, 1),
    ];
    let r = parse(&mem, id, &limits()).unwrap();
    assert_eq!((r.kind, r.data_len), (Kind::GetId, 20));
}

#[test]
fn malformed_chains_are_rejected() {
    let mem = memory();
    let l = limits();
    let h = |kind, sector| header(&mem, 0, kind, sector);
    assert_eq!(error_of(parse(&mem, [], &l)), ParseError::Empty);
    assert_eq!(
        error_of(parse(&mem, [h(VIRTIO_BLK_T_IN, 0)], &l)),
        ParseError::NoStatus
    );
    assert_eq!(
        error_of(parse(&mem, [readable(0, 8), writable(0x2000, 1)], &l)),
        ParseError::ShortHeader(8)
    );
    assert_eq!(
        error_of(parse(
            &mem,
            [writable(0x2000, 1), h(VIRTIO_BLK_T_IN, 0)],
            &l
        )),
        ParseError::ReadableAfterWritable
    );
    assert_eq!(
        error_of(parse(
            &mem,
            [h(VIRTIO_BLK_T_IN, 0), writable(MEM - 100, 512)],
            &l
        )),
        ParseError::OutsideMemory {
            addr: MEM - 100,
            len: 512
        }
    );
    assert_eq!(
        error_of(parse(
            &mem,
            [h(VIRTIO_BLK_T_IN, 0), writable(u64::MAX - 10, 100)],
            &l
        )),
        ParseError::OutsideMemory {
            addr: u64::MAX - 10,
            len: 100
        }
    );
    let unknown = parse(&mem, [h(99, 0), writable(0x2000, 1)], &l).unwrap_err();
    assert_eq!(unknown.error, ParseError::Unsupported(99));
    assert_eq!(unknown.error.status(), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(
        error_of(parse(
            &mem,
            [
                h(VIRTIO_BLK_T_IN, 0),
                writable(0x1000, 100),
                writable(0x2000, 1)
            ],
            &l
        )),
        ParseError::Unaligned(100)
    );
    assert_eq!(
        error_of(parse(
            &mem,
            [
                h(VIRTIO_BLK_T_IN, 0),
                readable(0x1000, 512),
                writable(0x2000, 1)
            ],
            &l
        )),
        ParseError::WrongDirection("read")
    );
    assert_eq!(
        error_of(parse(
            &mem,
            [
                h(VIRTIO_BLK_T_OUT, 0),
                writable(0x1000, 512),
                writable(0x2000, 1)
            ],
            &l
        )),
        ParseError::WrongDirection("write")
    );
}

#[test]
fn sectors_past_the_end_are_rejected() {
    let mem = memory();
    let l = limits();
    let last = l.capacity / SECTOR_SIZE - 1;
    let ok = [
        header(&mem, 0, VIRTIO_BLK_T_IN, last),
        writable(0x1000, 512),
        writable(0x2000, 1),
    ];
    assert!(parse(&mem, ok, &l).is_ok());
    for sector in [last + 1, u64::MAX / 512, u64::MAX] {
        let chain = [
            header(&mem, 0, VIRTIO_BLK_T_IN, sector),
            writable(0x1000, 512),
            writable(0x2000, 1),
        ];
        assert!(matches!(
            error_of(parse(&mem, chain, &l)),
            ParseError::PastEnd { .. }
        ));
    }
}

fn range_entry(mem: &GuestMemoryMmap<()>, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut bytes = [0u8; 16];
    bytes[0..8].copy_from_slice(&sector.to_le_bytes());
    bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
    bytes[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes_ranges() {
    let mem = memory();
    let l = limits();
    range_entry(&mem, 0x1000, 8, 16, 0);
    range_entry(&mem, 0x1010, 100, 8, 0);
    let chain = [
        header(&mem, 0, VIRTIO_BLK_T_DISCARD, 0),
        readable(0x1000, 32),
        writable(0x2000, 1),
    ];
    let r = parse(&mem, chain, &l).unwrap();
    assert_eq!(
        r.kind,
        Kind::Discard(vec![
            ByteRange {
                offset: 4096,
                len: 8192
            },
            ByteRange {
                offset: 51200,
                len: 4096
            }
        ])
    );
    range_entry(&mem, 0x1000, 8, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let chain = [
        header(&mem, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0),
        readable(0x1000, 16),
        writable(0x2000, 1),
    ];
    assert!(matches!(
        parse(&mem, chain, &l).unwrap().kind,
        Kind::WriteZeroes { unmap: true, .. }
    ));
    let discard_with_unmap = [
        header(&mem, 0, VIRTIO_BLK_T_DISCARD, 0),
        readable(0x1000, 16),
        writable(0x2000, 1),
    ];
    let e = error_of(parse(&mem, discard_with_unmap, &l));
    assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn bad_range_lists_are_rejected() {
    let mem = memory();
    let l = limits();
    let chain = |len| {
        [
            header(&mem, 0, VIRTIO_BLK_T_DISCARD, 0),
            readable(0x1000, len),
            writable(0x2000, 1),
        ]
    };
    assert_eq!(
        error_of(parse(&mem, chain(15), &l)),
        ParseError::BadRangeList(15)
    );
    assert_eq!(
        error_of(parse(&mem, chain(16 * 5), &l)),
        ParseError::TooManyRanges { count: 5, max: 4 }
    );
    range_entry(&mem, 0x1000, 0, (1 << 20) + 1, 0);
    assert!(matches!(
        error_of(parse(&mem, chain(16), &l)),
        ParseError::RangeTooLong { .. }
    ));
    range_entry(&mem, 0x1000, u64::MAX, 1, 0);
    assert!(matches!(
        error_of(parse(&mem, chain(16), &l)),
        ParseError::PastEnd { .. }
    ));
    range_entry(&mem, 0x1000, 0, 1, 0x80);
    assert_eq!(
        error_of(parse(&mem, chain(16), &l)),
        ParseError::RangeFlags(0x80)
    );
}

fn any_descriptor() -> impl Strategy<Value = Descriptor> {
    let addr = prop_oneof![0u64..MEM + 4096, Just(u64::MAX - 8), any::<u64>()];
    let len = prop_oneof![0u32..8192, Just(u32::MAX), any::<u32>()];
    (addr, len, any::<bool>()).prop_map(|(addr, len, write)| {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        Descriptor::new(addr, len, flags, 0)
    })
}

proptest! {
    /// Whatever the guest sends, the parser answers without panicking, and what it accepts
    /// stays inside guest memory and inside the disk.
    #[test]
    fn accepted_requests_are_in_bounds(
        kind in prop_oneof![0u32..16, any::<u32>()],
        sector in prop_oneof![0u64..(64 << 11), any::<u64>()],
        body in proptest::collection::vec(any_descriptor(), 0..8),
        entries in proptest::collection::vec((any::<u64>(), any::<u32>(), 0u32..3), 0..4),
    ) {
        let mem = memory();
        for (i, (s, n, f)) in entries.iter().enumerate() {
            range_entry(&mem, 0x800 + 16 * i as u64, *s, *n, *f);
        }
        let mut chain = vec![header(&mem, 0, kind, sector)];
        chain.extend(body);
        let l = limits();
        match parse(&mem, chain, &l) {
            Ok(r) => {
                prop_assert!(GuestMemoryBackend::check_range(&mem, r.status, 1));
                for s in &r.data {
                    prop_assert!(GuestMemoryBackend::check_range(&mem, s.addr, s.len as usize));
                }
                match &r.kind {
                    Kind::Read { offset } | Kind::Write { offset } => {
                        prop_assert!(offset + r.data_len <= l.capacity);
                        prop_assert_eq!(r.data_len % SECTOR_SIZE, 0);
                    }
                    Kind::Discard(ranges) | Kind::WriteZeroes { ranges, .. } => {
                        for range in ranges {
                            prop_assert!(range.offset + range.len <= l.capacity);
                        }
                    }
                    Kind::Flush | Kind::GetId => {}
                }
            }
            Err(rejected) => {
                if let Some(status) = rejected.status {
                    prop_assert!(GuestMemoryBackend::check_range(&mem, status, 1));
                }
            }
        }
    }
}
