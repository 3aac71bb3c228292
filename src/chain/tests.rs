//! Chain resolution as properties, at the file level (`store::Blocks` over real block files
//! in a temporary directory, 16 KiB blocks, the last one short).
//!
//! A family of images is built by random operations: writes, partial discards and
//! whole-block discards on any writable image (the newest clone or an older one), snapshots
//! (`link_into` and a fresh `Blocks` that keeps its source's parent), clones of read-only
//! images (`open_clone` and a backing over the parent's `Blocks`, what `ParentBlocks` gives
//! without a `Disk`), flattens (the daemon's loop: `copy_up` of every block that reads
//! through, then `clear_backing`) and restarts (every `Blocks` opened again, parents first,
//! so nothing rests on what a cache remembered). After every step:
//! - every image reads exactly what an in-memory model holds: a full logical copy of every
//!   image's bytes;
//! - a clone's block without data of its own reads exactly its parent's bytes (never zeros
//!   where the parent has data);
//! - no block file holds data in a page the model says was never written there (a copy-up
//!   keeps holes as holes; a punch frees whole pages);
//! - a snapshot's files are exactly as they were linked (the same names, the same bytes),
//!   whatever its source did since;
//! - no copy-up's temporary file is left behind.
//!
//! A second test races copy-ups against writes, reads and a flatten on threads.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::image::{ImageId, ImageName, Tier};
use crate::store::{Backing, Blocks, TierDirs};

const BLOCK: u64 = 16 << 10;
const PAGE: u64 = 4096;
const SECTOR: u64 = 512;
/// Four blocks, the last one 6 KiB: short, and ending inside a page.
const SIZE: u64 = 3 * BLOCK + 6 * 1024;
const BLOCKS: u64 = SIZE.div_ceil(BLOCK);
/// Images in a chain, the clone itself included.
const MAX_DEPTH: usize = 5;
const MAX_IMAGES: usize = 12;

/// A clone's parent at the file level: the parent's block on its tier, resolved down its own
/// chain (what `ParentBlocks` does through a `Disk`).
struct Parent {
    blocks: Arc<Blocks>,
    tier: Tier,
}

impl Backing for Parent {
    fn file_for_read(&self, block: u64) -> io::Result<Option<Arc<File>>> {
        self.blocks
            .file_for_read(self.tier, block)
            .map_err(io::Error::other)
    }
}

/// One image of the family and its model.
struct Image {
    name: ImageName,
    id: ImageId,
    tier: Tier,
    /// The image it reads through: a clone's parent (a clone's snapshot keeps it), until
    /// the clone is flattened.
    parent: Option<usize>,
    /// Images in its chain, itself included.
    depth: usize,
    writable: bool,
    blocks: Arc<Blocks>,
    /// What every byte of the image reads as.
    data: Vec<u8>,
    /// Per page of the image: whether its block file may hold data there (written, or
    /// copied from where it was written). A page never written must stay a hole.
    maybe: Vec<bool>,
    /// A snapshot's files as linked: (on the RAM tier, name) -> bytes.
    taken: Option<BTreeMap<(bool, String), Vec<u8>>>,
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        image: Index,
        block: Index,
        at: Index,
        len: Index,
    },
    Discard {
        image: Index,
        block: Index,
        at: Index,
        len: Index,
    },
    DiscardBlock {
        image: Index,
        block: Index,
    },
    Snapshot {
        image: Index,
    },
    Clone {
        image: Index,
        ram: bool,
    },
    /// A snapshot of the deepest writable image and a clone of it: chains get deep.
    Deepen {
        ram: bool,
    },
    Flatten {
        image: Index,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let span = || {
        (
            any::<Index>(),
            any::<Index>(),
            any::<Index>(),
            any::<Index>(),
        )
    };
    prop_oneof![
        8 => span().prop_map(|(image, block, at, len)| Op::Write { image, block, at, len }),
        3 => span().prop_map(|(image, block, at, len)| Op::Discard { image, block, at, len }),
        1 => (any::<Index>(), any::<Index>())
            .prop_map(|(image, block)| Op::DiscardBlock { image, block }),
        2 => any::<Index>().prop_map(|image| Op::Snapshot { image }),
        2 => (any::<Index>(), any::<bool>()).prop_map(|(image, ram)| Op::Clone { image, ram }),
        2 => any::<bool>().prop_map(|ram| Op::Deepen { ram }),
        1 => any::<Index>().prop_map(|image| Op::Flatten { image }),
        1 => Just(Op::Restart),
    ]
}

fn tier(ram: bool) -> Tier {
    if ram {
        Tier::Ram
    } else {
        Tier::Volume
    }
}

/// The family on disk and in the model.
struct Family {
    _root: tempfile::TempDir,
    dirs: TierDirs,
    images: Vec<Image>,
    writes: u64,
}

impl Family {
    /// One writable image, empty.
    fn new(ram: bool) -> Family {
        let root = tempfile::Builder::new()
            .prefix("cormorant-chain-")
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
        let mut family = Family {
            _root: root,
            dirs,
            images: Vec::new(),
            writes: 0,
        };
        let name: ImageName = "i0".parse().unwrap();
        let id = ImageId::random();
        let blocks = family.open(&name, id, None);
        blocks.files(tier(ram)).create_dir().unwrap();
        family.images.push(Image {
            name,
            id,
            tier: tier(ram),
            parent: None,
            depth: 1,
            writable: true,
            blocks,
            data: vec![0; SIZE as usize],
            maybe: vec![false; SIZE.div_ceil(PAGE) as usize],
            taken: None,
        });
        family
    }

    /// An image's blocks, reading through `parent` when it has one.
    fn open(&self, name: &ImageName, id: ImageId, parent: Option<usize>) -> Arc<Blocks> {
        let Some(p) = parent else {
            return Arc::new(Blocks::open(&self.dirs, name, id, BLOCK, SIZE));
        };
        let blocks = Blocks::open_clone(&self.dirs, name, id, BLOCK, SIZE);
        let parent = &self.images[p];
        blocks.set_backing(Arc::new(Parent {
            blocks: parent.blocks.clone(),
            tier: parent.tier,
        }));
        Arc::new(blocks)
    }

    fn pick(&self, index: &Index, fits: impl Fn(&Image) -> bool) -> Option<usize> {
        let fit: Vec<usize> = (0..self.images.len())
            .filter(|&i| fits(&self.images[i]))
            .collect();
        (!fit.is_empty()).then(|| fit[index.index(fit.len())])
    }

    /// A sector-aligned span inside `block`: (offset in the block, length).
    fn span(&self, block: u64, at: &Index, len: &Index) -> (u64, u64) {
        let sectors = self.images[0].blocks.block_len(block) / SECTOR;
        let first = at.index(sectors as usize) as u64;
        let count = 1 + len.index((sectors - first) as usize) as u64;
        (first * SECTOR, count * SECTOR)
    }

    fn apply(&mut self, op: &Op) {
        let blocks = BLOCKS as usize;
        match op {
            Op::Write {
                image,
                block,
                at,
                len,
            } => {
                let Some(i) = self.pick(image, |m| m.writable) else {
                    return;
                };
                let block = block.index(blocks) as u64;
                let (offset, len) = self.span(block, at, len);
                self.writes += 1;
                let seed = self.writes * 31;
                let bytes: Vec<u8> = (0..len).map(|k| 1 + ((seed + k) % 251) as u8).collect();
                let image = &mut self.images[i];
                image
                    .blocks
                    .write(image.tier, block, offset, &bytes)
                    .unwrap();
                let start = (block * BLOCK + offset) as usize;
                image.data[start..start + bytes.len()].copy_from_slice(&bytes);
                let pages = start as u64 / PAGE..(start as u64 + len).div_ceil(PAGE);
                for page in pages {
                    image.maybe[page as usize] = true;
                }
            }
            Op::Discard {
                image,
                block,
                at,
                len,
            } => {
                let Some(i) = self.pick(image, |m| m.writable) else {
                    return;
                };
                let block = block.index(blocks) as u64;
                let (offset, len) = self.span(block, at, len);
                let image = &mut self.images[i];
                image.blocks.free(image.tier, block, offset, len).unwrap();
                let start = block * BLOCK + offset;
                image.data[start as usize..(start + len) as usize].fill(0);
                // Only pages the punch covers whole are freed; the rest are zeroed in place.
                for page in start.div_ceil(PAGE)..(start + len) / PAGE {
                    image.maybe[page as usize] = false;
                }
                if offset == 0 && len == image.blocks.block_len(block) {
                    image.forget_block(block);
                }
            }
            Op::DiscardBlock { image, block } => {
                let Some(i) = self.pick(image, |m| m.writable) else {
                    return;
                };
                let block = block.index(blocks) as u64;
                let image = &mut self.images[i];
                image.blocks.free_block(image.tier, block).unwrap();
                image.forget_block(block);
            }
            Op::Snapshot { image } => {
                if let Some(i) = self.pick(image, |m| m.writable) {
                    self.snapshot(i);
                }
            }
            Op::Clone { image, ram } => {
                if let Some(i) = self.pick(image, |m| !m.writable && m.depth < MAX_DEPTH) {
                    self.clone_of(i, *ram);
                }
            }
            Op::Deepen { ram } => {
                let deepest = (0..self.images.len())
                    .filter(|&i| self.images[i].writable)
                    .max_by_key(|&i| self.images[i].depth);
                if let Some(i) = deepest.filter(|&i| self.images[i].depth < MAX_DEPTH) {
                    if let Some(snap) = self.snapshot(i) {
                        self.clone_of(snap, *ram);
                    }
                }
            }
            Op::Flatten { image } => {
                if let Some(i) = self.pick(image, |m| m.writable && m.parent.is_some()) {
                    self.flatten(i);
                }
            }
            Op::Restart => {
                for i in 0..self.images.len() {
                    let image = &self.images[i];
                    let blocks = self.open(&image.name, image.id, image.parent);
                    self.images[i].blocks = blocks;
                }
            }
        }
    }

    /// `image snapshot`: the source's files linked into a fresh image that keeps its parent.
    fn snapshot(&mut self, i: usize) -> Option<usize> {
        if self.images.len() >= MAX_IMAGES {
            return None;
        }
        let source = &self.images[i];
        let name: ImageName = format!("{}@s{}", source.name, self.images.len())
            .parse()
            .unwrap();
        let id = ImageId::random();
        let blocks = self.open(&name, id, source.parent);
        for tier in [Tier::Ram, Tier::Volume] {
            source
                .blocks
                .files(tier)
                .link_into(blocks.files(tier))
                .unwrap();
        }
        let taken = files_of(&blocks);
        let snapshot = Image {
            name,
            id,
            tier: source.tier,
            parent: source.parent,
            depth: source.depth,
            writable: false,
            blocks,
            data: source.data.clone(),
            maybe: source.maybe.clone(),
            taken: Some(taken),
        };
        self.images.push(snapshot);
        Some(self.images.len() - 1)
    }

    /// `image clone`: a writable image reading through the read-only image `p`.
    fn clone_of(&mut self, p: usize, ram: bool) {
        if self.images.len() >= MAX_IMAGES {
            return;
        }
        let name: ImageName = format!("i{}", self.images.len()).parse().unwrap();
        let id = ImageId::random();
        let blocks = self.open(&name, id, Some(p));
        blocks.files(tier(ram)).create_dir().unwrap();
        let parent = &self.images[p];
        let clone = Image {
            name,
            id,
            tier: tier(ram),
            parent: Some(p),
            depth: parent.depth + 1,
            writable: true,
            blocks,
            data: parent.data.clone(),
            maybe: parent.maybe.clone(),
            taken: None,
        };
        self.images.push(clone);
    }

    /// `image flatten`, as `Daemon::flatten` does it.
    fn flatten(&mut self, i: usize) {
        let image = &mut self.images[i];
        let (blocks, tier) = (&image.blocks, image.tier);
        for block in 0..BLOCKS {
            if !blocks.has_own(tier, block).unwrap()
                && blocks.file_for_read(tier, block).unwrap().is_some()
            {
                blocks.copy_up(tier, block).unwrap();
            }
        }
        blocks.flush().unwrap();
        blocks.clear_backing();
        image.parent = None;
    }

    fn check(&self) -> Result<(), TestCaseError> {
        for (i, image) in self.images.iter().enumerate() {
            let what = format!(
                "image {i} ({}, {:?}, depth {}, parent {:?})",
                image.name, image.tier, image.depth, image.parent
            );
            for block in 0..BLOCKS {
                let got = read(image, block);
                let start = (block * BLOCK) as usize;
                let want = &image.data[start..start + got.len()];
                if let Some(k) = (0..got.len()).find(|&k| got[k] != want[k]) {
                    let kind = match (got[k], want[k]) {
                        (0, _) => "zeros where it has data",
                        (_, 0) => "data where it has zeros",
                        _ => "other data",
                    };
                    return Err(TestCaseError::fail(format!(
                        "{what} block {block} byte {k}: reads {kind} ({} for {})",
                        got[k], want[k]
                    )));
                }
                if let Some(p) = image.parent {
                    if !image.blocks.has_own(image.tier, block).unwrap() {
                        prop_assert_eq!(
                            &got,
                            &read(&self.images[p], block),
                            "{} block {} has no data of its own and must read its parent's",
                            what,
                            block
                        );
                    }
                }
                let path = image
                    .blocks
                    .files(image.tier)
                    .dir()
                    .join(format!("{block:08}"));
                if let Ok(file) = File::open(&path) {
                    for page in data_pages(&file) {
                        let at = (start as u64 / PAGE + page) as usize;
                        prop_assert!(
                            image.maybe.get(at).copied().unwrap_or(false),
                            "{} block {} holds data in page {} that was never written there",
                            what,
                            block,
                            page
                        );
                    }
                }
            }
            if let Some(taken) = &image.taken {
                prop_assert!(
                    &files_of(&image.blocks) == taken,
                    "{} is a snapshot whose files changed after it was taken",
                    what
                );
            }
            for tier in [Tier::Ram, Tier::Volume] {
                let Ok(entries) = fs::read_dir(image.blocks.files(tier).dir()) else {
                    continue;
                };
                for entry in entries {
                    let name = entry.unwrap().file_name();
                    prop_assert!(
                        !name.to_string_lossy().starts_with('.'),
                        "{} has a copy-up's temporary file left: {:?}",
                        what,
                        name
                    );
                }
            }
        }
        Ok(())
    }
}

impl Image {
    /// A whole block freed: zeros and no data.
    fn forget_block(&mut self, block: u64) {
        let start = block * BLOCK;
        let end = (start + BLOCK).min(SIZE);
        self.data[start as usize..end as usize].fill(0);
        for page in start / PAGE..end.div_ceil(PAGE) {
            self.maybe[page as usize] = false;
        }
    }
}

fn read(image: &Image, block: u64) -> Vec<u8> {
    let mut buf = vec![0xa5; image.blocks.block_len(block) as usize];
    image.blocks.read(image.tier, block, 0, &mut buf).unwrap();
    buf
}

/// Every block file of an image, both tiers: (on the RAM tier, name) -> bytes.
fn files_of(blocks: &Blocks) -> BTreeMap<(bool, String), Vec<u8>> {
    let mut files = BTreeMap::new();
    for tier in [Tier::Ram, Tier::Volume] {
        let Ok(entries) = fs::read_dir(blocks.files(tier).dir()) else {
            continue;
        };
        for entry in entries {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            files.insert((tier == Tier::Ram, name), fs::read(entry.path()).unwrap());
        }
    }
    files
}

/// The pages of `file` that hold data (`SEEK_DATA`/`SEEK_HOLE`), by index.
fn data_pages(file: &File) -> Vec<u64> {
    let len = file.metadata().unwrap().len();
    let seek = |at: u64, whence| {
        // SAFETY: lseek on a descriptor this test owns; all other I/O here is positioned.
        let rc = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
        (rc >= 0).then_some(rc as u64)
    };
    let mut pages = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(data) = seek(at, libc::SEEK_DATA) else {
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE).unwrap_or(len);
        pages.extend(data / PAGE..hole.div_ceil(PAGE));
        at = hole;
    }
    pages
}

/// Every image of random families reads what the model says after every step; the runs
/// reach chains of the full depth.
#[test]
fn every_image_of_a_chain_reads_what_the_model_says() {
    let deepest = AtomicUsize::new(0);
    // `CHAIN_CASES=n` runs more families.
    let cases = std::env::var("CHAIN_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(48);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&(any::<bool>(), vec(op(), 1..60)), |(ram, ops)| {
        let mut family = Family::new(ram);
        for (step, op) in ops.iter().enumerate() {
            family.apply(op);
            family
                .check()
                .map_err(|e| TestCaseError::fail(format!("step {step} ({op:?}): {e}")))?;
        }
        let depth = family.images.iter().map(|m| m.depth).max().unwrap_or(0);
        deepest.fetch_max(depth, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(deepest.load(Ordering::Relaxed), MAX_DEPTH);
}

/// Writers of different sectors of the same clone blocks race the blocks' copy-up, each
/// other, readers and a flatten: every write lands in the block's one copy (none in a copy
/// that another copy-up replaced), and no read sees zeros where the parent has data.
#[test]
fn copy_ups_racing_writes_readers_and_a_flatten_lose_nothing() {
    const THREADS: u64 = 4;
    for round in 0..40u64 {
        let ram = round % 2 == 0;
        let mut family = Family::new(ram);
        let parent_tier = tier(ram);
        // The parent: every sector holds its own pattern, except a hole in the last page of
        // block 0.
        for block in 0..BLOCKS {
            let len = family.images[0].blocks.block_len(block);
            let mut bytes: Vec<u8> = (0..len).map(|k| 0x80 | (k / SECTOR) as u8).collect();
            if block == 0 {
                bytes.truncate((BLOCK - PAGE) as usize);
            }
            family.images[0]
                .blocks
                .write(parent_tier, block, 0, &bytes)
                .unwrap();
        }
        let snap = family.snapshot(0).unwrap();
        family.clone_of(snap, !ram);
        let clone = family.images[2].blocks.clone();
        let clone_tier = family.images[2].tier;
        let parent = family.images[snap].blocks.clone();
        let sectors = BLOCK / SECTOR;
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let clone = &clone;
                s.spawn(move || {
                    // Thread t writes the sectors s with s % THREADS == t, in every block.
                    for block in 0..BLOCKS {
                        let len = clone.block_len(block);
                        for sector in (t..len / SECTOR).step_by(THREADS as usize) {
                            let byte = (round * 16 + t + 1) as u8;
                            clone
                                .write(clone_tier, block, sector * SECTOR, &[byte; 512])
                                .unwrap();
                        }
                    }
                });
            }
            for _ in 0..2 {
                let (clone, parent) = (&clone, &parent);
                s.spawn(move || {
                    for _ in 0..100 {
                        for block in 0..BLOCKS {
                            let len = clone.block_len(block) as usize;
                            let mut got = vec![0u8; len];
                            clone.read(clone_tier, block, 0, &mut got).unwrap();
                            let mut base = vec![0u8; len];
                            parent.read(parent_tier, block, 0, &mut base).unwrap();
                            for k in (0..len).step_by(SECTOR as usize) {
                                assert!(
                                    got[k] != 0 || base[k] == 0,
                                    "round {round}: block {block} byte {k} reads zeros over the parent's data"
                                );
                            }
                        }
                    }
                });
            }
            // `image flatten`, as the daemon does it: every block that reads through
            // copied in, then the parent cut.
            let clone = &clone;
            s.spawn(move || {
                std::thread::yield_now();
                for block in (0..BLOCKS).rev() {
                    if !clone.has_own(clone_tier, block).unwrap()
                        && clone.file_for_read(clone_tier, block).unwrap().is_some()
                    {
                        clone.copy_up(clone_tier, block).unwrap();
                    }
                }
                clone.clear_backing();
            });
        });
        for block in 0..BLOCKS {
            let len = clone.block_len(block) as usize;
            let mut got = vec![0u8; len];
            clone.read(clone_tier, block, 0, &mut got).unwrap();
            for sector in 0..(len as u64 / SECTOR).min(sectors) {
                let byte = (round * 16 + sector % THREADS + 1) as u8;
                let at = (sector * SECTOR) as usize;
                assert!(
                    got[at..at + SECTOR as usize].iter().all(|&b| b == byte),
                    "round {round}: block {block} sector {sector} lost its write"
                );
            }
        }
    }
}
