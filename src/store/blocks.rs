//! One image's blocks on this node: the block-I/O API every caller uses.
//!
//! The synchronous half (`read`, `write`, `free`, `flush`, whole-block copies and checksums)
//! serves the peer service, resync, import and export and block drops. The queue engine
//! issues its I/O asynchronously (inline or io_uring), so it takes the files
//! (`file_for_read`, `file_for_write`), reports a completed write with `written`, and syncs
//! what `flush_plan` lists before calling `flushed`. Both halves mark dirty files the same way:
//! a volume-tier file changed by a write or a partial free is synced by the next flush; a
//! created or removed file makes the flush sync the directory. RAM-tier data lives in tmpfs,
//! which survives a daemon crash and nothing can make more durable.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use super::error::io_at;
use super::{read_full_at, BlockError, BlockFiles, DirtyFiles, FlushTicket, TierDirs};
use crate::image::{ImageId, ImageName, Tier};

/// The block files of one image on both tiers, and what the next flush must sync.
pub struct Blocks {
    ram: BlockFiles,
    volume: BlockFiles,
    dirty: DirtyFiles,
    block_size: u64,
    /// The image's size: follows its metadata through [`Blocks::resize`].
    size: AtomicU64,
    /// A clone's: a block without a file of its own reads its parent's data.
    cloned: AtomicBool,
    /// Where that data is on this node; set once the parent is open. Until then a clone's
    /// unwritten blocks fail to read rather than read as zeros.
    backing: RwLock<Option<Arc<dyn Backing>>>,
}

/// A clone's parent chain on this node: the file holding a block's data, resolved down the
/// chain (`None`: no image of the chain has data there; it reads as zeros).
pub trait Backing: Send + Sync {
    fn file_for_read(&self, block: u64) -> io::Result<Option<Arc<File>>>;
}

/// What a flush must sync: the files, and the ticket to hand to [`Blocks::flushed`] once
/// every one of them is synced.
pub struct FlushPlan {
    pub files: Vec<Arc<File>>,
    pub ticket: FlushTicket,
}

impl Blocks {
    /// The blocks of image `name` (`id`) of `size` bytes in blocks of `block_size` bytes.
    /// Touches no file: directories are made by [`BlockFiles::create_dir`] or the first write.
    pub fn open(
        dirs: &TierDirs,
        name: &ImageName,
        id: ImageId,
        block_size: u64,
        size: u64,
    ) -> Self {
        Blocks {
            ram: BlockFiles::open(dirs, Tier::Ram, name, id),
            volume: BlockFiles::open(dirs, Tier::Volume, name, id),
            dirty: DirtyFiles::default(),
            block_size,
            size: AtomicU64::new(size),
            cloned: AtomicBool::new(false),
            backing: RwLock::new(None),
        }
    }

    /// The blocks of a clone: those without a file of their own read from `set_backing`'s
    /// chain, and are copied up before their first write.
    pub fn open_clone(
        dirs: &TierDirs,
        name: &ImageName,
        id: ImageId,
        block_size: u64,
        size: u64,
    ) -> Self {
        Blocks {
            cloned: AtomicBool::new(true),
            ..Blocks::open(dirs, name, id, block_size, size)
        }
    }

    /// Connects a clone to its parent's blocks on this node.
    pub fn set_backing(&self, backing: Arc<dyn Backing>) {
        *self.backing.write().unwrap_or_else(|p| p.into_inner()) = Some(backing);
    }

    /// Cuts a clone loose from its parent: call only once every block has data of its own
    /// or reads as zeros in the whole chain (`image flatten`).
    pub fn clear_backing(&self) {
        self.cloned.store(false, Ordering::Release);
        *self.backing.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn is_clone(&self) -> bool {
        self.cloned.load(Ordering::Acquire)
    }

    /// Whether `block` has data of its own on `tier` (a file, possibly empty), rather than
    /// reading through to a parent or as zeros.
    pub fn has_own(&self, tier: Tier, block: u64) -> Result<bool, BlockError> {
        let own = self.files(tier).for_read(block);
        Ok(own.map_err(io_at(tier, block, "open"))?.is_some())
    }

    /// Gives `block` data of its own on `tier` (copied from its parent) if it reads through:
    /// a step of `image flatten`. Guest writes copy up the same way, under the same lock.
    pub fn copy_up(&self, tier: Tier, block: u64) -> Result<(), BlockError> {
        self.file_for_write(tier, block).map(drop)
    }

    fn backing_now(&self) -> Option<Arc<dyn Backing>> {
        self.backing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Where `block` reads from when it has no file of its own.
    fn base(&self, block: u64) -> io::Result<Option<Arc<File>>> {
        if !self.is_clone() {
            return Ok(None);
        }
        match self.backing_now() {
            Some(backing) => backing.file_for_read(block),
            // Flattened since the look above (`clear_backing` cuts the flag first): the block
            // has data of its own, or none in the whole chain.
            None if !self.is_clone() => Ok(None),
            None => Err(io::Error::other(
                "the clone's parent is not open on this node",
            )),
        }
    }

    /// The files of one tier, for the directory's life (create, remove, measure). Block I/O
    /// goes through the methods of `Blocks`, never straight to these.
    pub fn files(&self, tier: Tier) -> &BlockFiles {
        match tier {
            Tier::Ram => &self.ram,
            Tier::Volume => &self.volume,
        }
    }

    /// Bytes of `block` inside the image (the last block may be short; 0 past the end).
    pub fn block_len(&self, block: u64) -> u64 {
        let start = block.saturating_mul(self.block_size);
        let size = self.size.load(Ordering::Acquire);
        self.block_size.min(size.saturating_sub(start))
    }

    /// Refuses a span that does not lie inside its block.
    fn check_span(&self, block: u64, offset: u64, len: u64) -> Result<(), BlockError> {
        let block_len = self.block_len(block);
        let end = offset.checked_add(len);
        if block_len == 0 || end.is_none_or(|end| end > block_len) {
            return Err(BlockError::OutOfBlock {
                block,
                offset,
                len,
                block_len,
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of `block`; what the block never had reads as
    /// zeros. Returns whether the block has a file on `tier`.
    pub fn read(
        &self,
        tier: Tier,
        block: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<bool, BlockError> {
        self.check_span(block, offset, buf.len() as u64)?;
        let Some(file) = self.file_for_read(tier, block)? else {
            buf.fill(0);
            return Ok(false);
        };
        let n = read_full_at(&file, buf, offset).map_err(io_at(tier, block, "read"))?;
        buf[n..].fill(0);
        Ok(true)
    }

    /// Writes `data` at `offset` of `block`, creating its file on first use; the next flush
    /// makes it durable.
    pub fn write(
        &self,
        tier: Tier,
        block: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), BlockError> {
        self.check_span(block, offset, data.len() as u64)?;
        let file = self.file_for_write(tier, block)?;
        file.write_all_at(data, offset)
            .map_err(io_at(tier, block, "write"))?;
        self.written(tier, block, &file);
        Ok(())
    }

    /// Frees `len` bytes at `offset` of `block`: they read as zeros afterwards. The whole
    /// block loses its file; part of one gets a hole, which the next flush makes durable
    /// like a write.
    pub fn free(&self, tier: Tier, block: u64, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_span(block, offset, len)?;
        if offset == 0 && len == self.block_len(block) {
            return self.free_block(tier, block);
        }
        if len == 0 {
            return Ok(());
        }
        if self.file_for_read(tier, block)?.is_none() {
            return Ok(()); // zeros already
        }
        // A clone's block read through, or a file a snapshot shares, is copied first.
        let file = self.file_for_write(tier, block)?;
        BlockFiles::punch(&file, offset, len).map_err(io_at(tier, block, "punch a hole in"))?;
        self.written(tier, block, &file);
        Ok(())
    }

    /// Frees a whole block: its file goes (the next flush syncs the directory), and it reads
    /// as zeros again. A block without a file is already free. A clone's block keeps an empty
    /// file instead, or it would read its parent's data again.
    pub fn free_block(&self, tier: Tier, block: u64) -> Result<(), BlockError> {
        self.files(tier)
            .drop_block(block, self.is_clone())
            .map_err(io_at(tier, block, "remove"))?;
        if tier == Tier::Volume {
            self.dirty.forget(block);
        }
        Ok(())
    }

    /// Removes this node's copy of `block` on `tier` (the copy moved or was removed): its
    /// file goes, also a clone's, whose parent is then no business of this copy's.
    pub fn drop_copy(&self, tier: Tier, block: u64) -> Result<(), BlockError> {
        self.files(tier)
            .drop_block(block, false)
            .map_err(io_at(tier, block, "remove"))?;
        if tier == Tier::Volume {
            self.dirty.forget(block);
        }
        Ok(())
    }

    /// Makes every change so far durable: the directory when files were created or removed,
    /// then every dirty file. Forgets only what it synced (see [`DirtyFiles`]).
    pub fn flush(&self) -> Result<(), BlockError> {
        let plan = self.flush_plan()?;
        for file in &plan.files {
            file.sync_data().map_err(|source| BlockError::Sync {
                tier: Tier::Volume,
                source,
            })?;
        }
        self.flushed(&plan.ticket);
        Ok(())
    }

    /// The bytes of `block` its file holds, up to the block's length (a sparse file may end
    /// early: the rest reads as zeros); `None` when it has no file.
    pub fn read_block(&self, tier: Tier, block: u64) -> Result<Option<Vec<u8>>, BlockError> {
        self.check_span(block, 0, 0)?;
        let Some(file) = self.file_for_read(tier, block)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; self.block_len(block) as usize];
        let n = read_full_at(&file, &mut buf, 0).map_err(io_at(tier, block, "read"))?;
        buf.truncate(n);
        Ok(Some(buf))
    }

    /// Replaces the whole of `block` with `data` (`None`: no file), durably on the volume
    /// tier: resync marks the copy in sync right after, and its bytes must be as durable as
    /// the metadata that says so.
    pub fn replace_block(
        &self,
        tier: Tier,
        block: u64,
        data: Option<&[u8]>,
    ) -> Result<(), BlockError> {
        let Some(data) = data else {
            self.free_block(tier, block)?;
            return self.sync_dir(tier);
        };
        self.check_span(block, 0, data.len() as u64)?;
        // A new file: a clone's block needs nothing from its parent (all of it is written),
        // and a file a snapshot shares keeps the snapshot's bytes.
        self.files(tier)
            .replace_with(block, data)
            .map_err(io_at(tier, block, "replace"))?;
        if tier == Tier::Volume {
            self.dirty.forget(block); // the new file is synced; the old one is not this block's
        }
        self.sync_dir(tier)
    }

    /// SHA-256 of `block`'s bytes zero-filled to its length, or `None` when it has no file.
    pub fn digest(&self, tier: Tier, block: u64) -> Result<Option<[u8; 32]>, BlockError> {
        let Some(mut bytes) = self.read_block(tier, block)? else {
            return Ok(None);
        };
        bytes.resize(self.block_len(block) as usize, 0);
        Ok(Some(Sha256::digest(&bytes).into()))
    }

    /// The file of `block` for an asynchronous read, or `None` when the block was never
    /// written (it reads as zeros without any I/O).
    /// A clone's block without a file of its own gives its parent chain's file.
    pub fn file_for_read(&self, tier: Tier, block: u64) -> Result<Option<Arc<File>>, BlockError> {
        let clone = self.is_clone();
        let own = self
            .files(tier)
            .for_read(block)
            .map_err(io_at(tier, block, "open"))?;
        if own.is_some() {
            return Ok(own);
        }
        let base = self
            .base(block)
            .map_err(io_at(tier, block, "read the parent's data of"))?;
        if base.is_none() && clone {
            // A flatten may have copied the block in and cut the parent between the two
            // looks: its copy, made before the cut, is the block's data now (without this
            // look the block would read as zeros, and a discard of it would do nothing).
            return self
                .files(tier)
                .for_read(block)
                .map_err(io_at(tier, block, "open"));
        }
        Ok(base)
    }

    /// The file of `block` for an asynchronous write, created on first use. Call
    /// [`Blocks::written`] once the write completed.
    pub fn file_for_write(&self, tier: Tier, block: u64) -> Result<Arc<File>, BlockError> {
        self.files(tier)
            .for_write(block, || self.base(block))
            .map_err(io_at(tier, block, "open for writing"))
    }

    /// Records that a write to `block`'s `file` landed: on the volume tier, the next flush
    /// syncs it. Call only after the data is in the file, so a flush that sees the mark
    /// syncs the data.
    pub fn written(&self, tier: Tier, block: u64, file: &Arc<File>) {
        if tier == Tier::Volume {
            self.dirty.mark(block, file);
        }
    }

    /// For an asynchronous flush: syncs the directory when files were created or removed,
    /// and lists the files to sync. Hand the plan's ticket to [`Blocks::flushed`] once all
    /// of them are synced.
    pub fn flush_plan(&self) -> Result<FlushPlan, BlockError> {
        self.sync_dir(Tier::Volume)?;
        let (files, ticket) = self.dirty.snapshot();
        Ok(FlushPlan { files, ticket })
    }

    /// Forgets the files a flush synced, except those written again since its plan.
    pub fn flushed(&self, ticket: &FlushTicket) {
        self.dirty.clear(ticket);
    }

    /// Bytes the image's block files take on this node (allocated, not apparent, size).
    pub fn used_bytes(&self) -> std::io::Result<u64> {
        Ok(self.ram.used_bytes()? + self.volume.used_bytes()?)
    }

    /// The volume-tier files written since they were last synced (a snapshot syncs those it
    /// shares).
    pub fn dirty_files(&self) -> Vec<Arc<File>> {
        self.dirty.snapshot().0
    }

    /// The image's size in bytes, as spans are checked against it.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The image's size becomes `size` (see `image resize`). First, on both tiers, whatever
    /// this node holds past the smaller of the two ends goes: files of blocks wholly past it
    /// and the bytes of the block it cuts, so space a shrink gave up, or that a copy kept by
    /// mistake, reads as zeros when the image grows again. Call with no I/O in flight past
    /// that end (the metadata's write lock held, the image not in use for a shrink).
    pub fn resize(&self, size: u64) -> Result<(), BlockError> {
        let cleared = self.clear_past(size.min(self.size()));
        self.size.store(size, Ordering::Release);
        cleared
    }

    /// Frees what this node holds of the image past byte `end` (see [`Blocks::resize`]).
    fn clear_past(&self, end: u64) -> Result<(), BlockError> {
        let first = end.div_ceil(self.block_size);
        for tier in [Tier::Ram, Tier::Volume] {
            let files = self.files(tier);
            let past =
                files
                    .blocks_from(first)
                    .map_err(io_at(tier, first, "list the files from"))?;
            for block in past {
                self.drop_copy(tier, block)?;
            }
            let cut = end % self.block_size;
            if cut != 0 {
                self.cut_tail(tier, end / self.block_size, cut)?;
            }
            self.sync_dir(tier)?;
        }
        Ok(())
    }

    /// Drops the bytes of `block` from `len` on (the end of the image falls inside it),
    /// durably on the volume tier.
    fn cut_tail(&self, tier: Tier, block: u64, len: u64) -> Result<(), BlockError> {
        // Only a file of this image's own: never its parent's (a clone reads through it),
        // and one a snapshot shares is copied first.
        if !self.has_own(tier, block)? {
            return Ok(());
        }
        let file = self.file_for_write(tier, block)?;
        let apparent = file
            .metadata()
            .map_err(io_at(tier, block, "measure"))?
            .len();
        if apparent <= len {
            return Ok(());
        }
        file.set_len(len).map_err(io_at(tier, block, "truncate"))?;
        if tier == Tier::Volume {
            file.sync_data().map_err(io_at(tier, block, "sync"))?;
        }
        Ok(())
    }

    /// Whether the next flush syncs `block`'s volume-tier file.
    pub fn is_dirty(&self, block: u64) -> bool {
        self.dirty.contains(block)
    }

    fn sync_dir(&self, tier: Tier) -> Result<(), BlockError> {
        if tier != Tier::Volume {
            return Ok(());
        }
        self.volume
            .sync_dir_if_dirty()
            .map_err(|source| BlockError::SyncDir { tier, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three blocks of 16 KiB, the last one 8 KiB short.
    const BLOCK: u64 = 16384;
    const SIZE: u64 = 2 * BLOCK + 8192;

    fn setup() -> (tempfile::TempDir, Blocks) {
        let root = tempfile::tempdir().unwrap();
        let dirs = TierDirs {
            ram: root.path().join("ram"),
            volume: root.path().join("vol"),
        };
        let name = "img".parse().unwrap();
        let blocks = Blocks::open(&dirs, &name, ImageId::LEGACY, BLOCK, SIZE);
        for tier in [Tier::Ram, Tier::Volume] {
            blocks.files(tier).create_dir().unwrap();
        }
        (root, blocks)
    }

    #[test]
    fn unwritten_blocks_read_as_zeros_without_a_file() {
        let (_root, blocks) = setup();
        let mut buf = [7u8; 512];
        assert!(!blocks.read(Tier::Volume, 1, 4096, &mut buf).unwrap());
        assert!(buf.iter().all(|&b| b == 0));
        assert!(blocks.read_block(Tier::Ram, 1).unwrap().is_none());
        assert!(blocks.digest(Tier::Ram, 1).unwrap().is_none());
    }

    #[test]
    fn a_volume_write_is_dirty_until_a_flush() {
        let (_root, blocks) = setup();
        blocks.write(Tier::Volume, 1, 512, b"data").unwrap();
        assert!(blocks.is_dirty(1));
        let mut buf = [0u8; 4];
        assert!(blocks.read(Tier::Volume, 1, 512, &mut buf).unwrap());
        assert_eq!(&buf, b"data");
        blocks.flush().unwrap();
        assert!(!blocks.is_dirty(1));
    }

    #[test]
    fn ram_writes_are_never_dirty() {
        let (_root, blocks) = setup();
        blocks.write(Tier::Ram, 0, 0, b"data").unwrap();
        blocks.free(Tier::Ram, 0, 0, 4096).unwrap();
        assert!(!blocks.is_dirty(0));
        assert!(blocks.flush_plan().unwrap().files.is_empty());
    }

    #[test]
    fn a_partial_free_punches_a_hole_and_marks_the_file_dirty() {
        let (_root, blocks) = setup();
        blocks
            .write(Tier::Volume, 0, 0, &[7; BLOCK as usize])
            .unwrap();
        blocks.flush().unwrap();
        blocks.free(Tier::Volume, 0, 4096, 8192).unwrap();
        assert!(
            blocks.is_dirty(0),
            "the hole must be synced by the next flush"
        );
        let data = blocks.read_block(Tier::Volume, 0).unwrap().unwrap();
        assert!(data[..4096].iter().all(|&b| b == 7));
        assert!(data[4096..12288].iter().all(|&b| b == 0));
        assert!(data[12288..].iter().all(|&b| b == 7));
    }

    #[test]
    fn freeing_a_whole_block_drops_its_file_and_its_mark() {
        let (_root, blocks) = setup();
        // The last block is short: its whole is its 8 KiB inside the image.
        blocks.write(Tier::Volume, 2, 0, b"tail").unwrap();
        assert!(blocks.used_bytes().unwrap() > 0);
        blocks.free(Tier::Volume, 2, 0, 8192).unwrap();
        assert_eq!(blocks.used_bytes().unwrap(), 0);
        assert!(blocks.file_for_read(Tier::Volume, 2).unwrap().is_none());
        assert!(!blocks.is_dirty(2));
        blocks.free_block(Tier::Volume, 2).unwrap();
    }

    #[test]
    fn spans_outside_their_block_are_refused() {
        let (_root, blocks) = setup();
        let out = |r: Result<(), BlockError>| matches!(r, Err(BlockError::OutOfBlock { .. }));
        assert!(out(blocks.write(Tier::Ram, 2, 8190, b"abc")));
        assert!(out(blocks.write(Tier::Ram, 3, 0, b"a")));
        assert!(out(blocks.free(Tier::Ram, 0, u64::MAX, 2)));
        let mut buf = [0u8; 2];
        assert!(matches!(
            blocks.read(Tier::Ram, 0, BLOCK - 1, &mut buf),
            Err(BlockError::OutOfBlock { .. })
        ));
        assert!(out(blocks.replace_block(Tier::Ram, 2, Some(&[1; 8193]))));
        assert!(blocks.file_for_read(Tier::Ram, 2).unwrap().is_none());
    }

    #[test]
    fn a_write_during_a_flush_stays_dirty() {
        let (_root, blocks) = setup();
        blocks.write(Tier::Volume, 0, 0, b"one").unwrap();
        blocks.write(Tier::Volume, 1, 0, b"one").unwrap();
        let plan = blocks.flush_plan().unwrap();
        assert_eq!(plan.files.len(), 2);
        // The asynchronous half: the engine wrote the file itself and reports it.
        let file = blocks.file_for_write(Tier::Volume, 1).unwrap();
        file.write_all_at(b"two", 0).unwrap();
        blocks.written(Tier::Volume, 1, &file);
        blocks.flushed(&plan.ticket);
        assert!(!blocks.is_dirty(0));
        assert!(
            blocks.is_dirty(1),
            "written after the plan: the next flush syncs it"
        );
    }

    #[test]
    fn replace_block_writes_the_whole_block_and_digests_match() {
        let (_root, blocks) = setup();
        blocks
            .write(Tier::Volume, 0, 0, &[9; BLOCK as usize])
            .unwrap();
        blocks
            .replace_block(Tier::Volume, 0, Some(b"short"))
            .unwrap();
        assert_eq!(
            blocks.read_block(Tier::Volume, 0).unwrap().unwrap(),
            b"short"
        );
        blocks.write(Tier::Ram, 0, 0, b"short").unwrap();
        let ram = blocks.digest(Tier::Ram, 0).unwrap();
        assert!(ram.is_some());
        assert_eq!(blocks.digest(Tier::Volume, 0).unwrap(), ram);
        blocks.replace_block(Tier::Volume, 0, None).unwrap();
        assert!(blocks.read_block(Tier::Volume, 0).unwrap().is_none());
    }

    /// A shrink drops the files past the new end and the tail of the block it cuts; growing
    /// again, that space reads as zeros and takes writes, while data before the end stays.
    #[test]
    fn a_resize_clears_what_lies_past_the_end() {
        let (_root, blocks) = setup();
        for tier in [Tier::Ram, Tier::Volume] {
            blocks.write(tier, 0, 0, &[1; BLOCK as usize]).unwrap();
            blocks.write(tier, 1, 0, &[2; BLOCK as usize]).unwrap();
            blocks.write(tier, 2, 0, &[3; 8192]).unwrap();
        }
        blocks.resize(BLOCK + 4096).unwrap();
        assert_eq!(blocks.size(), BLOCK + 4096);
        assert_eq!(blocks.block_len(1), 4096);
        assert_eq!(blocks.block_len(2), 0);
        let mut buf = [0u8; 1];
        assert!(blocks.read(Tier::Ram, 1, 4096, &mut buf).is_err());
        blocks.resize(4 * BLOCK).unwrap();
        for tier in [Tier::Ram, Tier::Volume] {
            let one = blocks.read_block(tier, 1).unwrap().unwrap();
            assert_eq!(one.len(), 4096, "{tier}: the cut tail is gone");
            assert!(one.iter().all(|&b| b == 2));
            assert!(blocks.read_block(tier, 2).unwrap().is_none(), "{tier}");
            assert_eq!(
                blocks.read_block(tier, 0).unwrap().unwrap(),
                [1; BLOCK as usize]
            );
            let mut tail = vec![9u8; BLOCK as usize - 4096];
            blocks.read(tier, 1, 4096, &mut tail).unwrap();
            assert!(
                tail.iter().all(|&b| b == 0),
                "{tier}: new space reads zeros"
            );
            blocks.write(tier, 3, BLOCK - 4, b"last").unwrap();
            let mut last = [0u8; 4];
            blocks.read(tier, 3, BLOCK - 4, &mut last).unwrap();
            assert_eq!(&last, b"last");
        }
        assert!(
            blocks.write(Tier::Ram, 4, 0, b"x").is_err(),
            "still bounded"
        );
    }

    #[test]
    fn a_planted_symlink_is_an_error_with_its_os_code() {
        let (root, blocks) = setup();
        let outside = root.path().join("outside");
        std::fs::write(&outside, b"secret").unwrap();
        let link = blocks.files(Tier::Volume).dir().join("00000001");
        std::os::unix::fs::symlink(&outside, link).unwrap();
        let err = blocks.write(Tier::Volume, 1, 0, b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        assert!(err.to_string().contains("block 1"), "{err}");
        assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
    }
}

/// Clones and snapshots at the file level: read-through, copy-up, links.
#[cfg(test)]
mod chain_tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const BLOCK: u64 = 64 << 10;
    const SIZE: u64 = 4 * BLOCK;

    struct Parent(Arc<Blocks>, Tier);

    impl Backing for Parent {
        fn file_for_read(&self, block: u64) -> io::Result<Option<Arc<File>>> {
            self.0
                .file_for_read(self.1, block)
                .map_err(io::Error::other)
        }
    }

    fn dirs(root: &tempfile::TempDir) -> TierDirs {
        TierDirs {
            ram: root.path().join("ram"),
            volume: root.path().join("vol"),
        }
    }

    /// A new image `name` (a clone when `clone`), under `dirs`.
    fn new_image(dirs: &TierDirs, name: &str, clone: bool) -> Blocks {
        let open = if clone {
            Blocks::open_clone
        } else {
            Blocks::open
        };
        open(dirs, &name.parse().unwrap(), ImageId::random(), BLOCK, SIZE)
    }

    /// A parent with data in blocks 0 and 1 (block 1 sparse), and its clone.
    fn family() -> (tempfile::TempDir, Arc<Blocks>, Blocks) {
        let root = tempfile::tempdir().unwrap();
        let dirs = dirs(&root);
        let parent = Arc::new(new_image(&dirs, "gold", false));
        parent.write(Tier::Ram, 0, 0, &[1; BLOCK as usize]).unwrap();
        parent.write(Tier::Ram, 1, 4096, &[2; 4096]).unwrap();
        let clone = new_image(&dirs, "vm", true);
        clone.set_backing(Arc::new(Parent(parent.clone(), Tier::Ram)));
        (root, parent, clone)
    }

    fn read(blocks: &Blocks, tier: Tier, block: u64) -> Vec<u8> {
        let mut buf = vec![9u8; BLOCK as usize];
        blocks.read(tier, block, 0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn a_clone_reads_its_parent_until_written() {
        let (_root, parent, clone) = family();
        assert_eq!(read(&clone, Tier::Volume, 0), read(&parent, Tier::Ram, 0));
        assert_eq!(read(&clone, Tier::Volume, 3), vec![0; BLOCK as usize]);
        assert!(!clone.has_own(Tier::Volume, 0).unwrap());
    }

    #[test]
    fn a_write_copies_the_block_up_and_leaves_the_parent_alone() {
        let (_root, parent, clone) = family();
        clone.write(Tier::Volume, 1, 0, &[7; 100]).unwrap();
        let mut want = vec![0u8; BLOCK as usize];
        want[..100].fill(7);
        want[4096..8192].fill(2);
        assert_eq!(read(&clone, Tier::Volume, 1), want);
        let mut before = vec![0u8; BLOCK as usize];
        before[4096..8192].fill(2);
        assert_eq!(read(&parent, Tier::Ram, 1), before);
        assert!(clone.has_own(Tier::Volume, 1).unwrap());
        // Holes stay holes: one 4 KiB page of data and the written page.
        let used = clone.files(Tier::Volume).used_bytes().unwrap();
        assert!(used <= 3 * 4096, "copy-up filled holes: {used} bytes");
    }

    #[test]
    fn a_discarded_clone_block_reads_zeros_not_its_parent() {
        let (_root, _parent, clone) = family();
        clone.free(Tier::Volume, 0, 0, BLOCK).unwrap();
        assert_eq!(read(&clone, Tier::Volume, 0), vec![0; BLOCK as usize]);
        clone.free(Tier::Volume, 1, 4096, 2048).unwrap();
        let mut want = vec![0u8; BLOCK as usize];
        want[6144..8192].fill(2);
        assert_eq!(read(&clone, Tier::Volume, 1), want);
    }

    #[test]
    fn a_clone_without_its_parent_fails_rather_than_reading_zeros() {
        let root = tempfile::tempdir().unwrap();
        let clone = new_image(&dirs(&root), "vm", true);
        let mut buf = vec![0u8; 512];
        assert!(clone.read(Tier::Ram, 0, 0, &mut buf).is_err());
        assert!(clone.write(Tier::Ram, 0, 0, &buf).is_err());
    }

    #[test]
    fn writers_racing_the_copy_up_of_one_block_all_land() {
        let (_root, parent, clone) = family();
        let clone = Arc::new(clone);
        for block in [0u64, 1] {
            let threads: Vec<_> = (0..8u8)
                .map(|i| {
                    let clone = clone.clone();
                    std::thread::spawn(move || {
                        let page = [0x80 | i; 4096];
                        clone
                            .write(Tier::Ram, block, u64::from(i) * 8192, &page)
                            .unwrap();
                        // A read while others copy reads either state, never a torn one.
                        let mut buf = vec![0u8; 4096];
                        clone
                            .read(Tier::Ram, block, u64::from(i) * 8192, &mut buf)
                            .unwrap();
                        assert_eq!(buf, page);
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let mut want = read(&parent, Tier::Ram, block);
            for i in 0..8usize {
                want[i * 8192..i * 8192 + 4096].fill(0x80 | i as u8);
            }
            assert_eq!(read(&clone, Tier::Ram, block), want, "block {block}");
        }
    }

    #[test]
    fn links_made_before_the_barrier_are_made_exact_inside_it() {
        let root = tempfile::tempdir().unwrap();
        let dirs = dirs(&root);
        let image = new_image(&dirs, "vm", false);
        image.write(Tier::Ram, 0, 0, &[1; 4096]).unwrap();
        image.write(Tier::Ram, 1, 0, &[2; 4096]).unwrap();
        image.write(Tier::Ram, 2, 0, &[3; 4096]).unwrap();
        let snap = new_image(&dirs, "vm@s", false);
        let (from, to) = (image.files(Tier::Ram), snap.files(Tier::Ram));
        from.prelink_into(to).unwrap();
        // Before the barrier: a write in place (open file), a new block, a removed block.
        image.write(Tier::Ram, 0, 0, &[4; 4096]).unwrap();
        image.write(Tier::Ram, 3, 0, &[5; 4096]).unwrap();
        image.free(Tier::Ram, 2, 0, BLOCK).unwrap();
        // A file opened after the first step is shared: its write copies it first.
        from.forget_all();
        image.write(Tier::Ram, 1, 0, &[6; 4096]).unwrap();
        assert_eq!(from.link_into(to).unwrap(), 3);
        image.write(Tier::Ram, 0, 0, &[7; 4096]).unwrap();
        image.write(Tier::Ram, 3, 0, &[7; 4096]).unwrap();
        let first = |blocks: &Blocks, block| read(blocks, Tier::Ram, block)[0];
        assert_eq!(
            [0, 1, 2, 3].map(|b| first(&snap, b)),
            [4, 6, 0, 5],
            "the snapshot holds the image as it was at the second step"
        );
        assert_eq!([0, 1, 2, 3].map(|b| first(&image, b)), [7, 6, 0, 7]);
    }

    #[test]
    fn a_whole_block_replace_needs_no_parent_and_spares_a_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let dirs = dirs(&root);
        // A clone whose parent is not here (a wiped tier): resync still fills a block.
        let clone = new_image(&dirs, "vm", true);
        clone
            .replace_block(Tier::Volume, 1, Some(&[9; BLOCK as usize]))
            .unwrap();
        assert_eq!(read(&clone, Tier::Volume, 1), vec![9; BLOCK as usize]);
        let snap = new_image(&dirs, "vm@s", false);
        clone
            .files(Tier::Volume)
            .link_into(snap.files(Tier::Volume))
            .unwrap();
        clone
            .replace_block(Tier::Volume, 1, Some(&[8; 100]))
            .unwrap();
        assert_eq!(read(&snap, Tier::Volume, 1), vec![9; BLOCK as usize]);
        let mut want = vec![0u8; BLOCK as usize];
        want[..100].fill(8);
        assert_eq!(read(&clone, Tier::Volume, 1), want);
    }

    #[test]
    fn a_snapshot_keeps_its_bytes_when_the_image_is_written() {
        let root = tempfile::tempdir().unwrap();
        let dirs = dirs(&root);
        let image = new_image(&dirs, "vm", false);
        image.write(Tier::Ram, 0, 0, &[1; 4096]).unwrap();
        image.write(Tier::Ram, 2, 0, &[3; 4096]).unwrap();
        let snap = new_image(&dirs, "vm@s", false);
        let linked = image
            .files(Tier::Ram)
            .link_into(snap.files(Tier::Ram))
            .unwrap();
        assert_eq!(linked, 2);
        let frozen = read(&snap, Tier::Ram, 0);
        image.write(Tier::Ram, 0, 0, &[5; 4096]).unwrap();
        image.free(Tier::Ram, 2, 0, 4096).unwrap();
        image.free(Tier::Ram, 2, 0, BLOCK).unwrap();
        assert_eq!(read(&snap, Tier::Ram, 0), frozen);
        assert_eq!(&read(&snap, Tier::Ram, 2)[..4096], &[3; 4096]);
        assert_eq!(&read(&image, Tier::Ram, 0)[..4096], &[5; 4096]);
        let snap_file = snap.files(Tier::Ram).dir().join("00000000");
        assert_eq!(std::fs::metadata(snap_file).unwrap().nlink(), 1);
    }
}
