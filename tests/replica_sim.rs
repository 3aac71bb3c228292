//! A deterministic, seeded simulation of replication: three nodes hold copies of every block;
//! guest writes go through the real request path (`route::Queue`: write counters under the
//! metadata lock, a write to every copy, the acknowledgement rule, the stale copies marked
//! out of sync before the answer) and the real resync (`replica::sync::sync` over
//! `copies::DiskCopies`) runs against simulated peers that crash and restart, whose writes
//! land or not and whose replies get lost, and where guest writes interleave with the resync
//! at its most delicate points (a write that meets a block the resync froze waits for it).
//! The owner's copy is a real block file; the peers' copies are values held here, and their
//! calls (`peers::Transport`) are answered synchronously, a lost or refused call putting the
//! peer on the real failure list, as `peers::Peers` does.
//!
//! Checked after every step: an in-sync copy never holds a value older than the last
//! acknowledged write of its block (a read could return it). At the end, with every node back
//! and a full resync, all copies are in sync, byte-identical, and no acknowledged write is lost.
//!
//! `SIM_SEEDS=n` runs more seeds; a failure prints its seed, and `SIM_SEED=s` replays it.

mod common;

use common::sim::{Rng, SimClock};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cormorant::copies::DiskCopies;
use cormorant::disk::Disk;
use cormorant::image::{BlockRange, ImageMeta, Location, NodeId, Tier};
use cormorant::peer::{PeerError, Request, Response};
use cormorant::peers::{Callback, Transport};
use cormorant::replica::failure::FailureList;
use cormorant::replica::sync::sync;
use cormorant::route::{BlockRequest, Device, IoVecs, Queue};
use cormorant::store::TierDirs;

const BLOCKS: u64 = 6;
const BLOCK_SIZE: u64 = 4096;
const STEPS: usize = 300;

/// What a guest write writes (its value, then zeros).
const SECTOR: usize = 512;

/// The peers' copies: each block's value per node (a write id; absent = never written).
struct World {
    rng: Rng,
    values: HashMap<(NodeId, u64), u64>,
    up: HashMap<NodeId, bool>,
    /// Chance (percent) that a resync call lets a guest write in right then.
    interleave: u64,
}

/// The peers, as the owner reaches them: calls answered at once from the [`World`], and a
/// call that fails puts its peer on the failure list (what `peers::Peers` does).
struct Peers {
    world: Arc<Mutex<World>>,
    failures: Arc<FailureList<SimClock>>,
}

/// A block's bytes for a value: the value, then zeros to the block's end.
fn block_bytes(value: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_SIZE as usize];
    bytes[..8].copy_from_slice(&value.to_le_bytes());
    bytes
}

impl Peers {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }

    /// Delivers a call; a peer that turns out unreachable goes on the failure list.
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

    /// A peer's answer: a guest write is dropped on the way (10%) or its reply lost (10%); a
    /// resync call fails (5%).
    fn answer(&self, node: &NodeId, request: Request, guest: bool) -> Result<Response, PeerError> {
        let lost = || PeerError::Unavailable("simulated network failure".into());
        let mut w = self.world();
        if !w.up[node] {
            return Err(lost());
        }
        match request {
            Request::Write {
                block,
                offset,
                data,
                ..
            } => {
                if w.rng.chance(if guest { 10 } else { 5 }) {
                    return Err(lost());
                }
                assert_eq!(offset, 0, "writes here start at the block's start");
                let value = u64::from_le_bytes(data[..8].try_into().unwrap());
                w.values.insert((node.clone(), block), value);
                if guest && w.rng.chance(10) {
                    return Err(lost()); // the reply is lost after the write landed
                }
                Ok(Response::Ok)
            }
            Request::Discard {
                block, offset, len, ..
            } => {
                if w.rng.chance(5) {
                    return Err(lost());
                }
                if offset == 0 && u64::from(len) == BLOCK_SIZE {
                    w.values.remove(&(node.clone(), block));
                }
                Ok(Response::Ok)
            }
            Request::Checksums { blocks, .. } => {
                if w.rng.chance(5) {
                    return Err(lost());
                }
                let sums = blocks
                    .iter()
                    .map(|b| {
                        w.values.get(&(node.clone(), b)).map(|&v| {
                            use sha2::Digest;
                            sha2::Sha256::digest(block_bytes(v)).into()
                        })
                    })
                    .collect();
                Ok(Response::Checksums(sums))
            }
            Request::Read {
                block, offset, len, ..
            } => {
                if w.rng.chance(5) {
                    return Err(lost());
                }
                let value = w.values.get(&(node.clone(), block)).copied().unwrap_or(0);
                let bytes = block_bytes(value);
                let at = offset as usize;
                Ok(Response::Data(bytes[at..at + len as usize].to_vec()))
            }
            Request::Flush { .. } => Ok(Response::Ok),
            other => panic!("unexpected peer request {other:?}"),
        }
    }
}

/// The queue's calls: guest writes.
impl Transport for Peers {
    fn call(&self, node: &NodeId, request: Request, done: Callback) {
        done(self.deliver(node, request, true))
    }

    fn is_failed(&self, node: &NodeId) -> bool {
        self.failures.is_failed(node)
    }
}

/// A guest write in the queue, with the buffer its iovec points into.
struct GuestWrite {
    block: u64,
    _buf: Vec<u8>,
}

struct Sim {
    disk: Arc<Disk>,
    peers: Arc<Peers>,
    clock: SimClock,
    queue: RefCell<Queue>,
    /// Guest writes in the queue (waiting for a frozen block), by tag (their value).
    writes: RefCell<BTreeMap<u64, GuestWrite>>,
    next_value: RefCell<u64>,
    /// The value of the last acknowledged write per block.
    acked: RefCell<HashMap<u64, u64>>,
    nodes: Vec<NodeId>,
}

// The simulation is single-threaded; `Copies` asks for Sync because the daemon shares it.
unsafe impl Sync for Sim {}

impl Sim {
    fn tick(&self) {
        *self.clock.0.lock().unwrap() += Duration::from_secs(1);
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.peers.world()
    }

    /// A guest write of one sector at the start of `block` through the queue; one write per
    /// block at a time (a guest that overlaps its writes cannot expect an order either).
    fn guest_write(&self, block: u64) {
        if self.writes.borrow().values().any(|w| w.block == block) {
            return;
        }
        let value = {
            let mut next = self.next_value.borrow_mut();
            *next += 1;
            *next
        };
        let mut buf = vec![0u8; SECTOR];
        buf[..8].copy_from_slice(&value.to_le_bytes());
        let bufs = IoVecs(smallvec::smallvec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }]);
        self.writes
            .borrow_mut()
            .insert(value, GuestWrite { block, _buf: buf });
        let request = BlockRequest::Write {
            offset: block * BLOCK_SIZE,
            bufs,
        };
        self.queue.borrow_mut().submit(value, request);
        self.complete();
    }

    /// Collects the queue's completions (after retrying writes that waited for a frozen
    /// block); an acknowledged write becomes its block's last.
    fn complete(&self) {
        let mut done = Vec::new();
        {
            let mut queue = self.queue.borrow_mut();
            queue.retry_deferred();
            queue.complete(&mut done);
        }
        for completion in done {
            let Some(write) = self.writes.borrow_mut().remove(&completion.tag) else {
                panic!("a completion for no request: {completion:?}");
            };
            if completion.result.is_ok() {
                // The tag is the write's value.
                self.acked.borrow_mut().insert(write.block, completion.tag);
            }
        }
    }

    /// Sometimes lets a guest write in, from inside a resync call.
    fn maybe_interleave(&self) {
        let block = {
            let mut w = self.world();
            let p = w.interleave;
            if !w.rng.chance(p) {
                return;
            }
            w.rng.below(BLOCKS)
        };
        self.guest_write(block);
    }

    /// A copy's value: the owner's from its block file, a peer's from the world.
    fn value(&self, node: &NodeId, block: u64) -> u64 {
        if node == self.disk.me() {
            let mut buf = [0u8; 8];
            self.disk
                .blocks()
                .read(Tier::Ram, block, 0, &mut buf)
                .unwrap();
            return u64::from_le_bytes(buf);
        }
        self.world()
            .values
            .get(&(node.clone(), block))
            .copied()
            .unwrap_or(0)
    }

    /// In-sync copies never hold a value older than the block's last acknowledged write.
    fn check(&self, seed: u64, step: usize) {
        let meta = self.disk.meta();
        for block in 0..BLOCKS {
            let acked = self.acked.borrow().get(&block).copied().unwrap_or(0);
            for l in meta.table.locations(block).unwrap() {
                let value = self.value(&l.node, block);
                assert!(
                    !l.synced || value >= acked,
                    "seed {seed} step {step}: block {block} copy on {} is in sync with value {value}, but write {acked} was acknowledged",
                    l.node
                );
            }
            assert!(
                meta.table
                    .locations(block)
                    .unwrap()
                    .iter()
                    .any(|l| l.synced),
                "seed {seed} step {step}: block {block} has no in-sync copy"
            );
        }
    }

    /// The real resync over `DiskCopies`, its peer calls going through [`Resync`].
    fn resync(&self, all: BlockRange) {
        let copies = DiskCopies {
            disk: &self.disk,
            peers: &Resync(self),
        };
        let _ = sync(&self.disk, &copies, all, None, &mut |_, _| {});
        self.complete();
    }
}

/// The resync's way to the peers: before a call is answered, a guest write may come in (the
/// classic race: between the resync's read of the source and its write of the copy).
struct Resync<'a>(&'a Sim);

impl Transport for Resync<'_> {
    fn call(&self, node: &NodeId, request: Request, done: Callback) {
        self.0.maybe_interleave();
        done(self.0.peers.deliver(node, request, false))
    }

    fn is_failed(&self, node: &NodeId) -> bool {
        self.0.peers.is_failed(node)
    }
}

fn run(seed: u64) {
    let root = tempfile::Builder::new()
        .prefix("cormorant-sim-")
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
    let nodes: Vec<NodeId> = ["a", "b", "c"].iter().map(|n| n.parse().unwrap()).collect();
    let locations = nodes
        .iter()
        .map(|node| Location {
            node: node.clone(),
            tier: Tier::Ram,
            synced: true,
        })
        .collect();
    let meta = ImageMeta::new(
        "sim".parse().unwrap(),
        nodes[0].clone(),
        BLOCKS * BLOCK_SIZE,
        BLOCK_SIZE,
        false,
        locations,
    )
    .unwrap();
    meta.save(&meta_dir).unwrap();
    let store = Arc::new(cormorant::meta::store::LocalStore::new(meta_dir));
    let disk = Disk::open(meta, &dirs, nodes[0].clone(), store);
    disk.blocks().files(Tier::Ram).create_dir().unwrap();
    let clock = SimClock(Arc::new(Mutex::new(Instant::now())));
    let failures = Arc::new(FailureList::with_clock(
        Duration::from_secs(20),
        clock.clone(),
    ));
    let mut rng = Rng(seed);
    let interleave = 10 + rng.below(40);
    let peers = Arc::new(Peers {
        world: Arc::new(Mutex::new(World {
            rng,
            values: HashMap::new(),
            up: nodes.iter().map(|n| (n.clone(), true)).collect(),
            interleave,
        })),
        failures,
    });
    let queue = Device::new(disk.clone(), peers.clone(), false)
        .queue()
        .unwrap();
    let sim = Sim {
        disk: disk.clone(),
        peers,
        clock: clock.clone(),
        queue: RefCell::new(queue),
        writes: RefCell::new(BTreeMap::new()),
        next_value: RefCell::new(0),
        acked: RefCell::new(HashMap::new()),
        nodes: nodes.clone(),
    };
    let all = BlockRange::new(0, BLOCKS).unwrap();
    for step in 0..STEPS {
        sim.tick();
        let event = sim.world().rng.below(100);
        match event {
            0..=59 => {
                let block = sim.world().rng.below(BLOCKS);
                sim.guest_write(block);
            }
            60..=69 => {
                // A peer (never the owner, whose crash ends the guest too) goes down or up.
                let i = 1 + sim.world().rng.below(2) as usize;
                let node = sim.nodes[i].clone();
                let mut w = sim.world();
                let up = !w.up[&node];
                w.up.insert(node, up);
            }
            _ => sim.resync(all),
        }
        sim.check(seed, step);
    }
    // Everyone back, the failure list expired, no more interference: a full resync must
    // leave every copy in sync and identical, with no acknowledged write lost.
    {
        let mut w = sim.world();
        for node in &nodes {
            w.up.insert(node.clone(), true);
        }
        w.interleave = 0;
    }
    for _ in 0..20 {
        *clock.0.lock().unwrap() += Duration::from_secs(60);
        sim.resync(all);
        let meta = disk.meta();
        if (0..BLOCKS).all(|b| meta.table.locations(b).unwrap().iter().all(|l| l.synced)) {
            break;
        }
    }
    sim.check(seed, STEPS);
    assert!(
        sim.writes.borrow().is_empty(),
        "seed {seed}: guest writes still wait: {:?}",
        sim.writes.borrow().keys().collect::<Vec<_>>()
    );
    let meta = disk.meta();
    for block in 0..BLOCKS {
        let values: Vec<u64> = nodes.iter().map(|n| sim.value(n, block)).collect();
        let locations = meta.table.locations(block).unwrap();
        assert!(
            locations.iter().all(|l| l.synced),
            "seed {seed}: block {block} still has an out-of-sync copy: {locations:?}"
        );
        assert!(
            values.windows(2).all(|p| p[0] == p[1]),
            "seed {seed}: block {block} copies differ: {values:?}"
        );
        let acked = sim.acked.borrow().get(&block).copied().unwrap_or(0);
        assert!(
            values[0] >= acked,
            "seed {seed}: block {block} lost write {acked}"
        );
    }
}

#[test]
fn replication_keeps_acknowledged_writes_for_many_seeds() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return run(seed);
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    for seed in 0..seeds {
        run(seed);
    }
}
