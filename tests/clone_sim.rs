//! A seeded simulation of a clone under concurrent guests: copy-ups racing writes, reads,
//! a flatten and the resync of the clone's copies (issue 13).
//!
//! A read-only golden image `gold` (RAM tier, every sector holding its own value, one block a
//! hole, one half empty) and its clone `vm`, whose copies are this node's volume tier (a real
//! `Disk` opened with `meta.parent`, reading through `chain::ParentBlocks`) and two simulated
//! peers (`World`: their bytes, starting as the parent's, as their copies would read through
//! their own parents). Guests on several threads, each with its own `route::Queue` (the real
//! request path; io_uring when the kernel has it), write, discard and read while a resync
//! thread runs the real `replica::sync::sync` over `copies::DiskCopies` and turns peers off and
//! on; the peers lose writes and replies at random, so copies go out of sync and come back;
//! in half the seeds a flatten (the daemon's loop: `copy_up` of every block that reads
//! through, then the parent dropped) runs in the middle.
//!
//! Each thread owns some sectors (pairs of sectors, some straddling two blocks, so one
//! request writes pieces of two blocks at once), and every block holds sectors of every
//! thread: the threads' writes to one block race its copy-up and each other. Checked:
//! - a thread reads back, from its own sectors, the value of its last acknowledged write or
//!   discard (or one it issued since that failed): no acknowledged write is lost;
//! - a sector whose owner had a write acknowledged before a read began never reads as the
//!   parent's data again;
//! - a sector never reads zeros where the parent has data, unless its owner discarded it;
//!   and it never holds another thread's value;
//! - at the end, with every peer back and a full resync, every copy is in sync and
//!   byte-identical, and holds every sector's last acknowledged value.
//!
//! `CLONE_SIM_SEEDS=n` runs more seeds (64 by default); a failure names its seed, and
//! `CLONE_SIM_SEED=s` runs that one. Threads make the interleaving vary between runs of a
//! seed; the seed fixes each thread's choices and the peers' failures.

mod common;

use common::sim::{Rng, SimClock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cormorant::chain::ParentBlocks;
use cormorant::copies::DiskCopies;
use cormorant::disk::Disk;
use cormorant::image::meta::Parent;
use cormorant::image::{BlockRange, ImageMeta, Location, NodeId, Tier};
use cormorant::peer::{PeerError, Request, Response};
use cormorant::peers::{Callback, Transport};
use cormorant::replica::failure::FailureList;
use cormorant::replica::sync::sync;
use cormorant::route::{BlockRequest, Device, IoVecs, Queue};
use cormorant::store::TierDirs;

const BLOCKS: u64 = 6;
const BLOCK_SIZE: u64 = 4096;
const SECTOR: u64 = 512;
const SECTORS: u64 = BLOCKS * BLOCK_SIZE / SECTOR;
const THREADS: u64 = 4;
/// Requests per guest thread.
const OPS: usize = 150;
/// The parent's block left a hole, and the one whose second half is.
const HOLE: u64 = 2;
const HALF: u64 = 4;

/// A parent sector's value: the top bit set, so it is told apart from any guest's.
const PARENT: u64 = 1 << 63;

/// What the parent holds in global sector `g` (0: nothing).
fn parent_value(g: u64) -> u64 {
    let (block, sector) = (g / (BLOCK_SIZE / SECTOR), g % (BLOCK_SIZE / SECTOR));
    if block == HOLE || (block == HALF && sector >= 4) {
        return 0;
    }
    PARENT | g
}

/// The unit (one or two adjacent sectors, maybe in two blocks) `g` belongs to, and its owner.
fn unit_of(g: u64) -> u64 {
    g.div_ceil(2)
}

fn owner_of(g: u64) -> u64 {
    unit_of(g) % THREADS
}

/// The global sectors of unit `u`.
fn unit_sectors(u: u64) -> std::ops::Range<u64> {
    u.saturating_mul(2).saturating_sub(1)..(u * 2 + 1).min(SECTORS)
}

/// The bytes of sectors holding `values`: each its value, then zeros.
fn sector_bytes(values: &[u64]) -> Vec<u8> {
    let mut bytes = vec![0u8; values.len() * SECTOR as usize];
    for (i, v) in values.iter().enumerate() {
        let at = i * SECTOR as usize;
        bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    bytes
}

fn value_at(bytes: &[u8], sector: usize) -> u64 {
    let at = sector * SECTOR as usize;
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// The peers' copies of the clone: each block's bytes per node (`None`: no data, zeros).
struct World {
    rng: Rng,
    blocks: HashMap<(NodeId, u64), Option<Vec<u8>>>,
    up: HashMap<NodeId, bool>,
}

struct Peers {
    world: Mutex<World>,
    failures: FailureList<SimClock>,
}

impl Peers {
    /// A peer's answer: guest writes are lost on the way (10%) or their reply lost (10%);
    /// the rest fails 5% of the time.
    fn answer(&self, node: &NodeId, request: Request, guest: bool) -> Result<Response, PeerError> {
        let lost = || PeerError::Unavailable("simulated network failure".into());
        let mut w = self.world.lock().unwrap();
        if !w.up[node] {
            return Err(lost());
        }
        if w.rng.chance(if guest { 10 } else { 5 }) {
            return Err(lost());
        }
        let response = match request {
            Request::Write {
                block,
                offset,
                data,
                ..
            } => {
                let copy = w.blocks.entry((node.clone(), block)).or_insert(None);
                let bytes = copy.get_or_insert_with(|| vec![0; BLOCK_SIZE as usize]);
                let at = offset as usize;
                bytes[at..at + data.len()].copy_from_slice(&data);
                Response::Ok
            }
            Request::Discard {
                block, offset, len, ..
            } => {
                let copy = w.blocks.entry((node.clone(), block)).or_insert(None);
                if offset == 0 && u64::from(len) == BLOCK_SIZE {
                    *copy = None;
                } else if let Some(bytes) = copy {
                    bytes[offset as usize..(offset + len) as usize].fill(0);
                }
                Response::Ok
            }
            Request::Checksums { blocks, .. } => {
                use sha2::Digest;
                let sums = blocks
                    .iter()
                    .map(|b| {
                        let copy = w.blocks.get(&(node.clone(), b)).cloned().flatten();
                        copy.map(|bytes| sha2::Sha256::digest(bytes).into())
                    })
                    .collect();
                Response::Checksums(sums)
            }
            Request::Read {
                block, offset, len, ..
            } => {
                let copy = w.blocks.get(&(node.clone(), block)).cloned().flatten();
                let bytes = copy.unwrap_or_else(|| vec![0; BLOCK_SIZE as usize]);
                Response::Data(bytes[offset as usize..(offset + len) as usize].to_vec())
            }
            Request::Flush { .. } => Response::Ok,
            other => panic!("unexpected peer request {other:?}"),
        };
        if guest && w.rng.chance(10) {
            return Err(lost()); // the reply is lost after the change landed
        }
        Ok(response)
    }

    fn deliver(&self, node: &NodeId, request: Request, guest: bool) -> Result<Response, PeerError> {
        if self.failures.is_failed(node) {
            return Err(PeerError::Unavailable("on the failure list".into()));
        }
        let answer = self.answer(node, request, guest);
        if answer.as_ref().is_err_and(|e| e.is_unreachable()) {
            self.failures.fail(node);
        }
        answer
    }

    fn bytes(&self, node: &NodeId, block: u64) -> Vec<u8> {
        let w = self.world.lock().unwrap();
        let copy = w.blocks.get(&(node.clone(), block)).cloned().flatten();
        copy.unwrap_or_else(|| vec![0; BLOCK_SIZE as usize])
    }
}

/// Guest calls (from the queues).
struct GuestNet(Arc<Peers>);

impl Transport for GuestNet {
    fn call(&self, node: &NodeId, request: Request, done: Callback) {
        done(self.0.deliver(node, request, true))
    }

    fn is_failed(&self, node: &NodeId) -> bool {
        self.0.failures.is_failed(node)
    }
}

/// Resync calls.
struct ResyncNet(Arc<Peers>);

impl Transport for ResyncNet {
    fn call(&self, node: &NodeId, request: Request, done: Callback) {
        done(self.0.deliver(node, request, false))
    }

    fn is_failed(&self, node: &NodeId) -> bool {
        self.0.failures.is_failed(node)
    }
}

/// What the threads share about each sector.
struct Shared {
    /// Changes (writes or discards) of the sector acknowledged so far.
    acked: Vec<AtomicU64>,
    /// Set before the sector's owner first sends a discard of it.
    discarded: Vec<AtomicBool>,
    stats: Stats,
    /// The clone, to say what its copies hold when a check fails.
    disk: Arc<Disk>,
}

impl Shared {
    /// Where sector `g`'s block stands now, for a failure's message.
    fn explain(&self, g: u64) -> String {
        let block = g / (BLOCK_SIZE / SECTOR);
        let blocks = self.disk.blocks();
        let mut now = vec![0u8; BLOCK_SIZE as usize];
        let read = blocks.read(Tier::Volume, block, 0, &mut now);
        let values: Vec<u64> = (0..(BLOCK_SIZE / SECTOR) as usize)
            .map(|i| value_at(&now, i))
            .collect();
        format!(
            "its block now: copies {:?}, own data {:?}, reads {read:?} {values:x?}, parent {:?}",
            self.disk.meta().table.locations(block),
            blocks.has_own(Tier::Volume, block),
            self.disk.meta().parent,
        )
    }
}

/// What a run exercised, so a run that stopped exercising it fails.
#[derive(Default, Debug)]
struct Stats {
    acked: AtomicU64,
    failed: AtomicU64,
    /// Sectors of other threads read as the parent's data (the read went through, or hit a
    /// copied-up block) and as a guest's.
    read_parent: AtomicU64,
    read_other: AtomicU64,
    /// Copies the resync brought back by copying data.
    resynced: AtomicU64,
}

/// Runs one request through `queue` and waits for its answer.
fn run_request(queue: &mut Queue, tag: u64, request: BlockRequest) -> bool {
    queue.submit(tag, request);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = Vec::new();
        queue.retry_deferred();
        queue.complete(&mut done);
        if let Some(c) = done.iter().find(|c| c.tag == tag) {
            return c.result.is_ok();
        }
        assert!(
            done.is_empty(),
            "a completion for another request: {done:?}"
        );
        assert!(Instant::now() < deadline, "request {tag} never finished");
        if queue.in_flight() > 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn iovecs(buf: &mut [u8]) -> IoVecs {
    IoVecs(smallvec::smallvec![libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }])
}

/// One guest thread: its choices come from `seed`; returns the values its sectors may hold.
fn guest(seed: u64, t: u64, device: &Device, shared: &Shared) -> HashMap<u64, Vec<u64>> {
    let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x1234_5678_9abc_def1));
    let mut queue = device.queue().unwrap();
    let units: Vec<u64> = (0..=SECTORS / 2).filter(|u| u % THREADS == t).collect();
    // What each own sector may read as: the last acknowledged value, and any issued after it
    // that failed (it may have landed).
    let mut expect: HashMap<u64, Vec<u64>> = (0..SECTORS)
        .filter(|&g| owner_of(g) == t)
        .map(|g| (g, vec![parent_value(g)]))
        .collect();
    let mut seq = 0u64;
    for op in 0..OPS {
        let tag = op as u64;
        // A short pause now and then, so the resync and the flatten come round mid-run.
        if rng.chance(50) {
            std::thread::sleep(Duration::from_micros(rng.below(400)));
        }
        let unit = units[rng.below(units.len() as u64) as usize];
        let mut sectors: Vec<u64> = unit_sectors(unit).collect();
        if sectors.len() == 2 && rng.chance(30) {
            sectors.remove(rng.below(2) as usize);
        }
        let offset = sectors[0] * SECTOR;
        let len = sectors.len() as u64 * SECTOR;
        match rng.below(100) {
            0..=49 => {
                let values: Vec<u64> = sectors
                    .iter()
                    .map(|_| {
                        seq += 1;
                        seq << 16 | t << 8 | 1
                    })
                    .collect();
                let mut buf = sector_bytes(&values);
                let ok = run_request(
                    &mut queue,
                    tag,
                    BlockRequest::Write {
                        offset,
                        bufs: iovecs(&mut buf),
                    },
                );
                for (g, v) in sectors.iter().zip(values) {
                    let may = expect.get_mut(g).unwrap();
                    if ok {
                        *may = vec![v];
                        shared.acked[*g as usize].fetch_add(1, Ordering::SeqCst);
                        shared.stats.acked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                        may.push(v);
                    }
                }
            }
            50..=59 => {
                for &g in &sectors {
                    shared.discarded[g as usize].store(true, Ordering::SeqCst);
                }
                let ok = run_request(&mut queue, tag, BlockRequest::Free(vec![(offset, len)]));
                for g in &sectors {
                    let may = expect.get_mut(g).unwrap();
                    if ok {
                        *may = vec![0];
                        shared.acked[*g as usize].fetch_add(1, Ordering::SeqCst);
                    } else {
                        may.push(0);
                    }
                }
            }
            _ => {
                // Its own unit, or one or two whole blocks (other threads' sectors too).
                let (first, count) = if rng.chance(40) {
                    (sectors[0], sectors.len() as u64)
                } else {
                    let per = BLOCK_SIZE / SECTOR;
                    let block = rng.below(BLOCKS);
                    let blocks = if block + 1 < BLOCKS && rng.chance(30) {
                        2
                    } else {
                        1
                    };
                    (block * per, blocks * per)
                };
                let before: Vec<u64> = (first..first + count)
                    .map(|g| shared.acked[g as usize].load(Ordering::SeqCst))
                    .collect();
                let mut buf = vec![0xa5u8; (count * SECTOR) as usize];
                let request = BlockRequest::Read {
                    offset: first * SECTOR,
                    bufs: iovecs(&mut buf),
                };
                if !run_request(&mut queue, tag, request) {
                    panic!("seed {seed} thread {t}: a read failed");
                }
                for (i, g) in (first..first + count).enumerate() {
                    let v = value_at(&buf, i);
                    let at = format!(
                        "seed {seed} thread {t} op {op}: sector {g} (block {}) reads {v:#x}",
                        g / (BLOCK_SIZE / SECTOR)
                    );
                    if owner_of(g) == t {
                        assert!(
                            expect[&g].contains(&v),
                            "{at}, expected one of {:x?}: a write was lost",
                            expect[&g]
                        );
                        continue;
                    }
                    if v & PARENT != 0 {
                        assert_eq!(v, parent_value(g), "{at}: someone else's parent data");
                        shared.stats.read_parent.fetch_add(1, Ordering::Relaxed);
                        assert_eq!(
                            before[i], 0,
                            "{at}: the parent's data after its owner's write was acknowledged"
                        );
                    } else if v == 0 {
                        assert!(
                            parent_value(g) == 0
                                || shared.discarded[g as usize].load(Ordering::SeqCst),
                            "{at}: zeros where the parent has data ({})",
                            shared.explain(g)
                        );
                    } else {
                        assert_eq!((v >> 8) & 0xff, owner_of(g), "{at}: another thread's value");
                        shared.stats.read_other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    expect
}

fn run(seed: u64) -> Stats {
    let root = tempfile::Builder::new()
        .prefix("cormorant-clone-sim-")
        .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap();
    let dirs = TierDirs {
        ram: root.path().join("ram"),
        volume: root.path().join("vol"),
    };
    let meta_dir = root.path().join("meta");
    std::fs::create_dir_all(&meta_dir).unwrap();
    let store = Arc::new(cormorant::meta::store::LocalStore::new(meta_dir.clone()));
    let nodes: Vec<NodeId> = ["a", "b", "c"].iter().map(|n| n.parse().unwrap()).collect();
    let me = nodes[0].clone();

    // The golden image: this node's RAM tier, read-only, every sector its own value.
    let here = |tier| Location {
        node: me.clone(),
        tier,
        synced: true,
    };
    let gold_meta = ImageMeta::new(
        "gold".parse().unwrap(),
        me.clone(),
        BLOCKS * BLOCK_SIZE,
        BLOCK_SIZE,
        true,
        vec![here(Tier::Ram)],
    )
    .unwrap();
    gold_meta.save(&meta_dir).unwrap();
    let gold = Disk::open(gold_meta.clone(), &dirs, me.clone(), store.clone());
    gold.blocks().files(Tier::Ram).create_dir().unwrap();
    let per = BLOCK_SIZE / SECTOR;
    let parent_block = |block: u64| -> Option<Vec<u8>> {
        let values: Vec<u64> = (block * per..(block + 1) * per).map(parent_value).collect();
        values
            .iter()
            .any(|&v| v != 0)
            .then(|| sector_bytes(&values))
    };
    for block in 0..BLOCKS {
        if let Some(bytes) = parent_block(block) {
            gold.blocks().write(Tier::Ram, block, 0, &bytes).unwrap();
        }
    }

    // The clone: this node's volume tier and two peers, whose copies read like the parent.
    let mut locations = vec![here(Tier::Volume)];
    locations.extend(nodes[1..].iter().map(|node| Location {
        node: node.clone(),
        tier: Tier::Ram,
        synced: true,
    }));
    let mut meta = ImageMeta::new(
        "vm".parse().unwrap(),
        me.clone(),
        BLOCKS * BLOCK_SIZE,
        BLOCK_SIZE,
        false,
        locations,
    )
    .unwrap();
    meta.parent = Some(Parent {
        name: gold_meta.name.clone(),
        id: gold_meta.id,
    });
    meta.save(&meta_dir).unwrap();
    let disk = Disk::open(meta, &dirs, me.clone(), store);
    disk.blocks().files(Tier::Volume).create_dir().unwrap();
    disk.blocks().set_backing(ParentBlocks::new(gold.clone()));
    assert!(disk.blocks().is_clone());

    let clock = SimClock(Arc::new(Mutex::new(Instant::now())));
    let mut blocks = HashMap::new();
    for node in &nodes[1..] {
        for block in 0..BLOCKS {
            blocks.insert((node.clone(), block), parent_block(block));
        }
    }
    let peers = Arc::new(Peers {
        world: Mutex::new(World {
            rng: Rng(seed),
            blocks,
            up: nodes.iter().map(|n| (n.clone(), true)).collect(),
        }),
        failures: FailureList::with_clock(Duration::from_secs(20), clock.clone()),
    });
    let device = Device::new(disk.clone(), Arc::new(GuestNet(peers.clone())), true);
    let shared = Shared {
        acked: (0..SECTORS).map(|_| AtomicU64::new(0)).collect(),
        discarded: (0..SECTORS).map(|_| AtomicBool::new(false)).collect(),
        stats: Stats::default(),
        disk: disk.clone(),
    };
    let all = BlockRange::new(0, BLOCKS).unwrap();
    let resync_net = ResyncNet(peers.clone());
    let copies = DiskCopies {
        disk: &disk,
        peers: &resync_net,
    };
    let flatten = seed % 2 == 1;
    let mut expect: HashMap<u64, Vec<u64>> = HashMap::new();
    std::thread::scope(|s| {
        let guests: Vec<_> = (0..THREADS)
            .map(|t| {
                let (device, shared) = (&device, &shared);
                s.spawn(move || guest(seed, t, device, shared))
            })
            .collect();
        // The resync thread: peers go down and up, the clock moves, copies are synced; in
        // half the seeds the clone is flattened on the way.
        let mut rng = Rng(seed.wrapping_mul(7) + 3);
        let mut rounds = 0;
        while !guests.iter().all(|g| g.is_finished()) {
            rounds += 1;
            if rng.chance(30) {
                let node = nodes[1 + rng.below(2) as usize].clone();
                let mut w = peers.world.lock().unwrap();
                let up = !w.up[&node];
                w.up.insert(node, up);
            }
            *clock.0.lock().unwrap() += Duration::from_secs(5);
            if let Ok(report) = sync(&disk, &copies, all, None, &mut |_, _| {}) {
                shared
                    .stats
                    .resynced
                    .fetch_add(report.copied, Ordering::Relaxed);
            }
            if flatten && rounds == 3 {
                flatten_clone(&disk);
            }
            std::thread::sleep(Duration::from_micros(rng.below(300)));
        }
        for guest in guests {
            expect.extend(guest.join().unwrap());
        }
    });
    if flatten {
        // A flatten that did not come round during the run happens now.
        flatten_clone(&disk);
    }

    // Everyone back, the failure list expired: a full resync leaves every copy in sync,
    // identical, and holding every sector's last acknowledged value.
    {
        let mut w = peers.world.lock().unwrap();
        for node in &nodes {
            w.up.insert(node.clone(), true);
        }
    }
    for _ in 0..30 {
        *clock.0.lock().unwrap() += Duration::from_secs(60);
        let _ = sync(&disk, &copies, all, None, &mut |_, _| {});
        let meta = disk.meta();
        if (0..BLOCKS).all(|b| meta.table.locations(b).unwrap().iter().all(|l| l.synced)) {
            break;
        }
    }
    let meta = disk.meta();
    for block in 0..BLOCKS {
        let locations = meta.table.locations(block).unwrap();
        assert!(
            locations.iter().all(|l| l.synced),
            "seed {seed}: block {block} still has an out-of-sync copy: {locations:?}"
        );
        let mut here = vec![0u8; BLOCK_SIZE as usize];
        disk.blocks()
            .read(Tier::Volume, block, 0, &mut here)
            .unwrap();
        for node in &nodes[1..] {
            assert!(
                peers.bytes(node, block) == here,
                "seed {seed}: block {block} differs between {me} and {node}"
            );
        }
        for i in 0..per as usize {
            let g = block * per + i as u64;
            let v = value_at(&here, i);
            assert!(
                expect[&g].contains(&v),
                "seed {seed}: sector {g} (block {block}) holds {v:#x}, expected one of {:x?}",
                expect[&g]
            );
        }
    }
    assert_eq!(
        meta.parent.is_none(),
        flatten,
        "seed {seed}: flattened or not as asked"
    );
    shared.stats
}

/// `image flatten` as `Daemon::flatten` does it: every block that reads through copied up
/// (under the lock a guest write's copy-up takes), then the parent dropped.
fn flatten_clone(disk: &Disk) {
    if disk.meta().parent.is_none() {
        return;
    }
    let blocks = disk.blocks();
    for block in 0..BLOCKS {
        if !blocks.has_own(Tier::Volume, block).unwrap()
            && blocks.file_for_read(Tier::Volume, block).unwrap().is_some()
        {
            blocks.copy_up(Tier::Volume, block).unwrap();
        }
    }
    blocks.flush().unwrap();
    disk.update_meta(|meta| Ok(meta.parent.take())).unwrap();
    blocks.clear_backing();
}

#[test]
fn a_clone_keeps_every_acknowledged_write_under_racing_copy_ups_and_resync() {
    if let Some(seed) = std::env::var("CLONE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("seed {seed}: {:?}", run(seed));
        return;
    }
    let seeds: u64 = std::env::var("CLONE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let mut total = [0u64; 5];
    for seed in 0..seeds {
        let stats = run(seed);
        eprintln!("seed {seed}: {stats:?}");
        let counts = [
            &stats.acked,
            &stats.failed,
            &stats.read_parent,
            &stats.read_other,
            &stats.resynced,
        ];
        for (sum, count) in total.iter_mut().zip(counts) {
            *sum += count.load(Ordering::Relaxed);
        }
    }
    // Acknowledged writes, reads of the parent's data and of other guests' writes, and
    // resyncs that copied data all happened.
    let [acked, _, read_parent, read_other, resynced] = total;
    assert!(
        acked > 0 && read_parent > 0 && read_other > 0 && resynced > 0,
        "the runs did not exercise the races: {total:?}"
    );
}
