//! One image's block files on one tier: opened once and cached, created on first write,
//! dropped or punched when freed. Callers do block I/O through [`super::Blocks`], which keeps
//! the rule of what a flush must sync; this type only knows paths and descriptors.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::TierDirs;
use crate::image::{ImageId, ImageName, Tier};

/// Open block files kept per image and tier. Each costs one descriptor; the daemon raises
/// RLIMIT_NOFILE at start, and 1024 open blocks of 4 MiB cover a 4 GiB working set.
pub const MAX_OPEN_BLOCKS: usize = 1024;

/// What the cache knows of a block: no file yet, or an open file.
#[derive(Clone)]
enum Entry {
    Absent,
    Open(Arc<File>),
}

/// The block files of one image on one tier of this node.
pub struct BlockFiles {
    dir: PathBuf,
    tier: Tier,
    cache: Mutex<HashMap<u64, Entry>>,
    /// Set when a file was created or removed since the directory was last synced: the next
    /// flush must sync the directory too, or the new file may vanish in a power cut.
    dir_dirty: AtomicBool,
    /// Serialises directory syncs, so a flush that finds the flag already taken waits for
    /// the sync that took it instead of returning before it.
    dir_sync: Mutex<()>,
}

impl BlockFiles {
    /// The image's block files on `tier`. The directory is made by [`BlockFiles::create_dir`]
    /// when the image is created; a missing one later means the tier lost its contents (a
    /// RAM tier after a reboot) and is made again only by the first write.
    pub fn open(dirs: &TierDirs, tier: Tier, name: &ImageName, id: ImageId) -> Self {
        let dir = dirs.image_dir(tier, name, id);
        BlockFiles {
            dir,
            tier,
            cache: Mutex::new(HashMap::new()),
            dir_dirty: AtomicBool::new(false),
            dir_sync: Mutex::new(()),
        }
    }

    /// Makes the image's directory on this tier, durably.
    pub fn create_dir(&self) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        if let Some(parent) = self.dir.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    }

    pub fn dir_exists(&self) -> bool {
        self.dir.is_dir()
    }

    /// Removes the image's block files on this tier.
    pub fn remove_all(&self) -> io::Result<()> {
        self.forget_all();
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, block: u64) -> PathBuf {
        self.dir.join(format!("{block:08}"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(cache: &mut HashMap<u64, Entry>, block: u64, entry: Entry) {
        if cache.len() >= MAX_OPEN_BLOCKS && !cache.contains_key(&block) {
            // Evict an arbitrary entry: in-flight I/O holds its own Arc, so closing is safe.
            if let Some(&victim) = cache.keys().next() {
                cache.remove(&victim);
            }
        }
        cache.insert(block, entry);
    }

    /// The file of `block` for reading, or `None` when the block was never written.
    ///
    /// Opening, creating and removing a block's file and recording the result happen under
    /// the cache lock, so a reader can never record "absent" after a writer created the file
    /// (reads would then return zeros for acknowledged data), nor a writer cache a file that
    /// a discard just unlinked. Opens are rare (the result is cached), so the lock is cheap.
    pub(super) fn for_read(&self, block: u64) -> io::Result<Option<Arc<File>>> {
        let mut cache = self.lock();
        match cache.get(&block) {
            Some(Entry::Open(file)) => return Ok(Some(file.clone())),
            Some(Entry::Absent) => return Ok(None),
            None => {}
        }
        match self.open_file(block, false) {
            Ok(file) => {
                Self::remember(&mut cache, block, Entry::Open(file.clone()));
                Ok(Some(file))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Self::remember(&mut cache, block, Entry::Absent);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The file of `block` for writing, created on first use.
    pub(super) fn for_write(&self, block: u64) -> io::Result<Arc<File>> {
        let mut cache = self.lock();
        if let Some(Entry::Open(file)) = cache.get(&block) {
            return Ok(file.clone());
        }
        let file = self.open_file(block, true)?;
        Self::remember(&mut cache, block, Entry::Open(file.clone()));
        Ok(file)
    }

    fn open_file(&self, block: u64, create: bool) -> io::Result<Arc<File>> {
        let path = self.path(block);
        let mut options = OpenOptions::new();
        // O_NOFOLLOW: a symlink planted in a block directory is refused (ELOOP), never
        // followed to a file outside the store.
        options
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW);
        let creating = create && !path.exists();
        if creating {
            options.create(true).mode(0o600);
            if !self.dir.exists() {
                fs::create_dir_all(&self.dir)?;
            }
        }
        let file = Arc::new(options.open(&path)?);
        if creating {
            // Only now is there a directory entry for a flush to make durable.
            self.dir_dirty.store(true, Ordering::Release);
        }
        Ok(file)
    }

    /// Frees a whole block: its file goes, and it reads as zeros again.
    pub(super) fn drop_block(&self, block: u64) -> io::Result<()> {
        let mut cache = self.lock();
        Self::remember(&mut cache, block, Entry::Absent);
        match fs::remove_file(self.path(block)) {
            Ok(()) => {
                self.dir_dirty.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Frees `len` bytes at `offset` inside `block`; they read as zeros afterwards.
    pub(super) fn punch(&self, block: u64, offset: u64, len: u64) -> io::Result<()> {
        let Some(file) = self.for_read(block)? else {
            return Ok(());
        };
        let (offset, len) = (to_off(offset)?, to_off(len)?);
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a descriptor we own, with plain integer arguments.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Syncs the directory when files were created or removed since the last call.
    pub fn sync_dir_if_dirty(&self) -> io::Result<()> {
        let _one = self.dir_sync.lock().unwrap_or_else(|p| p.into_inner());
        if self.dir_dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
                self.dir_dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Bytes the image's block files take on this tier (allocated, not apparent, size).
    pub fn used_bytes(&self) -> io::Result<u64> {
        let mut used = 0;
        let entries = match fs::read_dir(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            other => other?,
        };
        for entry in entries {
            let meta = entry?.metadata()?;
            if meta.is_file() {
                used += meta.blocks() * 512;
            }
        }
        Ok(used)
    }

    /// The blocks from `first` on that have a file on this tier (a resize clears them: they
    /// lie past the image's end). Names that are not block files are skipped.
    pub fn blocks_from(&self, first: u64) -> io::Result<Vec<u64>> {
        let entries = match fs::read_dir(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            other => other?,
        };
        let mut blocks = Vec::new();
        for entry in entries {
            let name = entry?.file_name();
            let block = name
                .to_str()
                .filter(|n| n.len() == 8 && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(block) = block.filter(|&b| b >= first) {
                blocks.push(block);
            }
        }
        blocks.sort_unstable();
        Ok(blocks)
    }

    /// Closes every cached file, so a removed image's space is freed at once.
    pub fn forget_all(&self) {
        self.lock().clear();
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends; returns the bytes read
/// (block files are sparse and may end early: the rest of a block reads as zeros).
pub(super) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn to_off(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn setup() -> (tempfile::TempDir, BlockFiles) {
        let root = tempfile::tempdir().unwrap();
        let dirs = TierDirs {
            ram: root.path().join("ram"),
            volume: root.path().join("vol"),
        };
        let files = BlockFiles::open(
            &dirs,
            Tier::Volume,
            &"img".parse().unwrap(),
            ImageId::LEGACY,
        );
        files.create_dir().unwrap();
        (root, files)
    }

    #[test]
    fn unwritten_blocks_have_no_file() {
        let (_root, files) = setup();
        assert!(files.for_read(7).unwrap().is_none());
        assert_eq!(files.used_bytes().unwrap(), 0);
    }

    #[test]
    fn write_creates_a_file_named_by_index() {
        let (_root, files) = setup();
        files
            .for_write(7)
            .unwrap()
            .write_all_at(b"hello", 0)
            .unwrap();
        assert!(files.dir().join("00000007").exists());
        assert!(files.for_read(7).unwrap().is_some());
        assert!(files.used_bytes().unwrap() > 0);
        files.sync_dir_if_dirty().unwrap();
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let (root, files) = setup();
        let outside = root.path().join("outside");
        std::fs::write(&outside, b"secret").unwrap();
        std::os::unix::fs::symlink(&outside, files.dir().join("00000004")).unwrap();
        std::os::unix::fs::symlink(root.path().join("gone"), files.dir().join("00000005")).unwrap();
        for block in [4, 5] {
            let read = files.for_read(block).map(|f| f.is_some());
            assert_eq!(read.unwrap_err().raw_os_error(), Some(libc::ELOOP));
            let write = files.for_write(block).map(|_| ());
            assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::ELOOP));
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
        assert!(!root.path().join("gone").exists());
    }

    #[test]
    fn dropped_block_reads_absent_and_frees_space() {
        let (_root, files) = setup();
        files
            .for_write(3)
            .unwrap()
            .write_all_at(&[1; 8192], 0)
            .unwrap();
        files.drop_block(3).unwrap();
        assert!(files.for_read(3).unwrap().is_none());
        assert_eq!(files.used_bytes().unwrap(), 0);
        files.drop_block(3).unwrap();
    }

    #[test]
    fn punch_zeroes_a_range() {
        let (_root, files) = setup();
        let f = files.for_write(0).unwrap();
        f.write_all_at(&[7; 16384], 0).unwrap();
        files.punch(0, 4096, 8192).unwrap();
        let mut buf = [1u8; 16384];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[12288..].iter().all(|&b| b == 7));
        files.punch(99, 0, 4096).unwrap();
    }

    #[test]
    fn cache_is_bounded() {
        let (_root, files) = setup();
        for b in 0..(MAX_OPEN_BLOCKS as u64 + 10) {
            files.for_write(b).unwrap();
        }
        assert!(files.cache.lock().unwrap().len() <= MAX_OPEN_BLOCKS);
        assert!(files.for_read(0).unwrap().is_some());
    }
}
