//! Micro-benchmarks of the request path pieces that cost CPU per request: parsing a descriptor
//! chain, splitting a request at block boundaries, and finding a block's locations in a large,
//! fragmented block table; and what a clone's first write to a block costs (the copy-up of the
//! whole block) against a write to a block it already has.
//!
//!     cargo bench --bench request_path
//!
//! Each is measured on inputs shaped like real traffic: a 4 KiB read (header, one buffer,
//! status), a 1 MiB write in 256 page-sized segments (Linux's usual shape for large I/O), and
//! lookups at random blocks of a table at the block-count limit.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use cormorant::image::table::{Extent, MAX_BLOCKS};
use cormorant::image::{BlockRange, BlockTable, Location, NodeId, Tier};
use cormorant::route;
use cormorant::virtio::memory::{DirtyLog, HostMemory};
use cormorant::virtio::request::{self, Limits};

/// Guest memory for the parse inputs: headers at 0, data from 64 KiB, 4 MiB in all.
const MEM: u64 = 4 << 20;
const BLOCK: u64 = 4 << 20;

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory")
}

fn limits() -> Limits {
    Limits {
        capacity: 1 << 40,
        read_only: false,
        max_discard_sectors: 1 << 20,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1 << 20,
        max_write_zeroes_seg: 4,
    }
}

fn header(mem: &GuestMemoryMmap<()>, kind: u32, sector: u64) -> Descriptor {
    let mut bytes = [0u8; 16];
    bytes[0..4].copy_from_slice(&kind.to_le_bytes());
    bytes[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(0)).expect("header");
    Descriptor::new(0, 16, 0, 0)
}

fn parse(c: &mut Criterion) {
    let mem = memory();
    let limits = limits();
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    let read4k = [
        header(&mem, VIRTIO_BLK_T_IN, 4096),
        Descriptor::new(0x1_0000, 4096, VRING_DESC_F_WRITE as u16, 0),
        Descriptor::new(0x100, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    g.bench_function("read 4k", |b| {
        b.iter(|| request::parse(&mem, black_box(read4k.iter().copied()), &limits))
    });
    // The queue thread's way: through host pointers resolved once per memory snapshot.
    let host = HostMemory::new(Arc::new(mem.clone()), DirtyLog::default());
    g.bench_function("read 4k, host pointers", |b| {
        b.iter(|| request::parse(&host, black_box(read4k.iter().copied()), &limits))
    });
    let mut write1m = vec![header(&mem, VIRTIO_BLK_T_OUT, 8192)];
    write1m.extend((0..256u64).map(|i| Descriptor::new(0x1_0000 + i * 8192, 4096, 0, 0)));
    write1m.push(Descriptor::new(0x100, 1, VRING_DESC_F_WRITE as u16, 0));
    g.bench_function("write 1m in 256 segments", |b| {
        b.iter(|| request::parse(&mem, black_box(write1m.iter().copied()), &limits))
    });
    g.finish();
}

/// Buffers at made-up host addresses: `split` only computes with them.
fn host(n: usize, len: usize) -> cormorant::route::IoVecs {
    cormorant::route::IoVecs(
        (0..n)
            .map(|i| libc::iovec {
                iov_base: (0x1_0000 + i * 8192) as *mut libc::c_void,
                iov_len: len,
            })
            .collect(),
    )
}

fn split(c: &mut Criterion) {
    let mut g = c.benchmark_group("split");
    g.throughput(Throughput::Elements(1));
    let one = host(1, 4096);
    g.bench_function("4k inside a block", |b| {
        b.iter(|| route::split(black_box(123 * 4096), &one, BLOCK))
    });
    let many = host(256, 4096);
    g.bench_function("1m in 256 segments across a boundary", |b| {
        b.iter(|| route::split(black_box(BLOCK - 512 * 1024), &many, BLOCK))
    });
    g.finish();
}

/// A table at the block limit whose placements alternate every 1000 blocks (a resync or a
/// partial move in progress), so lookups cannot all hit one shared entry. Built from extents in
/// one pass (per-range updates would compact the whole table each time).
fn fragmented_table() -> BlockTable {
    let location = |synced| Location {
        node: NodeId::local(),
        tier: Tier::Ram,
        synced,
    };
    let extents: Vec<Extent> = (0..MAX_BLOCKS)
        .step_by(1000)
        .map(|start| Extent {
            blocks: BlockRange::new(start, (start + 1000).min(MAX_BLOCKS)).expect("range"),
            locations: vec![location(start % 2000 == 0)],
        })
        .collect();
    BlockTable::from_extents(MAX_BLOCKS, &extents).expect("table")
}

fn lookup(c: &mut Criterion) {
    let table = fragmented_table();
    let me = NodeId::local();
    let mut g = c.benchmark_group("block table");
    g.throughput(Throughput::Elements(1));
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    g.bench_function("locations + local copy, random block of 4M", |b| {
        b.iter_batched(
            || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % MAX_BLOCKS
            },
            |block| {
                let locs = table.locations(block).expect("in range");
                route::local_copy(locs, &me)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// The parent's blocks for a clone in these benches.
struct Parent(Arc<cormorant::store::Blocks>);

impl cormorant::store::Backing for Parent {
    fn file_for_read(&self, block: u64) -> std::io::Result<Option<Arc<std::fs::File>>> {
        self.0
            .file_for_read(Tier::Ram, block)
            .map_err(std::io::Error::other)
    }
}

/// A 4 KiB write to a clone: to a block it has (one pwrite) and to a block it reads through
/// (the first write: a copy of the whole 4 MiB block, then the pwrite), on the RAM tier
/// (/dev/shm when there is one, as in production).
fn copy_up(c: &mut Criterion) {
    use cormorant::image::ImageId;
    use cormorant::store::{Blocks, TierDirs};
    let base = ["/dev/shm", "/tmp"]
        .into_iter()
        .find(|d| std::path::Path::new(d).is_dir())
        .unwrap_or("/tmp");
    let root = tempfile::tempdir_in(base).expect("temp dir");
    let dirs = TierDirs {
        ram: root.path().join("ram"),
        volume: root.path().join("vol"),
    };
    const BLOCKS: u64 = 64;
    let size = BLOCKS * BLOCK;
    let name = |n: &str| n.parse().expect("name");
    let parent = Arc::new(Blocks::open(
        &dirs,
        &name("gold"),
        ImageId::random(),
        BLOCK,
        size,
    ));
    let data = vec![7u8; BLOCK as usize];
    for block in 0..BLOCKS {
        parent.write(Tier::Ram, block, 0, &data).expect("fill");
    }
    let page = [1u8; 4096];
    let mut group = c.benchmark_group("clone_write_4k");
    group.bench_function("own_block", |b| {
        let clone = Blocks::open_clone(&dirs, &name("own"), ImageId::random(), BLOCK, size);
        clone.set_backing(Arc::new(Parent(parent.clone())));
        clone.write(Tier::Ram, 0, 0, &page).expect("copy up once");
        b.iter(|| {
            clone
                .write(Tier::Ram, 0, 4096, black_box(&page))
                .expect("write")
        });
    });
    group.bench_function("first_write_copy_up", |b| {
        b.iter_batched(
            || {
                let clone =
                    Blocks::open_clone(&dirs, &name("fresh"), ImageId::random(), BLOCK, size);
                clone.set_backing(Arc::new(Parent(parent.clone())));
                clone
            },
            |clone| {
                for block in 0..BLOCKS {
                    clone
                        .write(Tier::Ram, block, 0, black_box(&page))
                        .expect("write");
                }
                for tier in [Tier::Ram, Tier::Volume] {
                    clone.files(tier).remove_all().expect("clean up");
                }
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

/// A disk of 5120 blocks of 4 MiB (20 GiB) in a temporary directory, on the local store.
fn disk(dir: &std::path::Path) -> Arc<cormorant::disk::Disk> {
    let here = Location {
        node: NodeId::local(),
        tier: Tier::Ram,
        synced: true,
    };
    let name = "bench".parse().expect("name");
    let meta =
        cormorant::image::ImageMeta::new(name, NodeId::local(), 20 << 30, BLOCK, false, vec![here])
            .expect("meta");
    let dirs = cormorant::store::TierDirs {
        ram: dir.join("ram"),
        volume: dir.join("volume"),
    };
    let store = Arc::new(cormorant::meta::store::LocalStore::new(dir.join("meta")));
    cormorant::disk::Disk::open(meta, &dirs, NodeId::local(), store)
}

/// What every guest write does to its block's write counters (start at issue, finish at
/// completion; resync and the cache read them): these grow with an online resize, so they
/// must cost no more than a flat array did.
fn counters(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("cormorant-bench-{}", std::process::id()));
    let disk = disk(&dir);
    let mut g = c.benchmark_group("write counters");
    g.throughput(Throughput::Elements(1));
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    g.bench_function("start + finish + idle, random block of 5120", |b| {
        b.iter_batched(
            || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % 5120
            },
            |block| {
                let writes = disk.writes();
                writes.start(block);
                writes.finish(block);
                writes.idle(block)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, parse, split, lookup, counters, copy_up);
criterion_main!(benches);
