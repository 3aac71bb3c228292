//! One image's block files on one tier: opened once and cached, created on first write,
//! dropped or punched when freed. Callers do block I/O through [`super::Blocks`], which keeps
//! the rule of what a flush must sync; this type only knows paths and descriptors.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::TierDirs;
use crate::image::{ImageId, ImageName, Tier};

/// Open block files kept per image and tier. Each costs one descriptor; the daemon raises
/// RLIMIT_NOFILE at start, and 1024 open blocks of 4 MiB cover a 4 GiB working set.
pub const MAX_OPEN_BLOCKS: usize = 1024;

/// What the cache knows of a block: no file yet, an open file, or an open file that is also
/// a snapshot's (hard-linked): it is read as it is but copied before the first write.
#[derive(Clone)]
enum Entry {
    Absent,
    Open(Arc<File>),
    Shared(Arc<File>),
}

/// The open files, and the blocks whose copy-up runs (outside the lock).
#[derive(Default)]
struct Cache {
    files: HashMap<u64, Entry>,
    copying: HashSet<u64>,
}

/// The block files of one image on one tier of this node.
pub struct BlockFiles {
    dir: PathBuf,
    tier: Tier,
    cache: Mutex<Cache>,
    /// Signalled when a copy-up ends: a writer of that block, a discard of it, or a snapshot
    /// waits for it; reads go on meanwhile (the block's old state is still right).
    copied: Condvar,
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
            cache: Mutex::new(Cache::default()),
            copied: Condvar::new(),
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

    fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock, once no copy-up of `block` (of any block, for `None`) runs.
    fn lock_quiet(&self, block: Option<u64>) -> MutexGuard<'_, Cache> {
        let cache = self.lock();
        let busy = |c: &mut Cache| match block {
            Some(block) => c.copying.contains(&block),
            None => !c.copying.is_empty(),
        };
        self.copied
            .wait_while(cache, busy)
            .unwrap_or_else(|p| p.into_inner())
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
        match cache.files.get(&block) {
            Some(Entry::Open(file) | Entry::Shared(file)) => return Ok(Some(file.clone())),
            Some(Entry::Absent) => return Ok(None),
            None => {}
        }
        match self.open_existing(block) {
            Ok(entry) => {
                let file = match &entry {
                    Entry::Open(f) | Entry::Shared(f) => f.clone(),
                    Entry::Absent => return Ok(None),
                };
                Self::remember(&mut cache.files, block, entry);
                Ok(Some(file))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Self::remember(&mut cache.files, block, Entry::Absent);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The file of `block` for writing, created on first use. A block without a file whose
    /// data is elsewhere (`base`: a clone's parent) is first copied up from there; a file
    /// shared with a snapshot is first copied, so the snapshot keeps its bytes. Copies are
    /// made in a temporary file and renamed into place, so a crash leaves the block either as
    /// it was or whole; they run outside the lock, so other blocks' I/O goes on, and the
    /// block's readers read its old state (still right: this write has not landed yet).
    pub(super) fn for_write(
        &self,
        block: u64,
        base: impl FnOnce() -> io::Result<Option<Arc<File>>>,
    ) -> io::Result<Arc<File>> {
        let mut cache = self.lock_quiet(Some(block));
        let known = match cache.files.get(&block) {
            Some(Entry::Open(file)) => return Ok(file.clone()),
            Some(entry) => entry.clone(),
            None => match self.open_existing(block) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Entry::Absent,
                other => other?,
            },
        };
        let shared = match known {
            Entry::Open(file) => {
                Self::remember(&mut cache.files, block, Entry::Open(file.clone()));
                return Ok(file);
            }
            Entry::Shared(file) => Some(file),
            Entry::Absent => None,
        };
        cache.copying.insert(block);
        drop(cache);
        let made = match shared {
            Some(file) => self.copy_up(block, Some(&file)),
            None => match base() {
                Ok(Some(parent)) => self.copy_up(block, Some(&parent)),
                Ok(None) => self.create_file(block),
                Err(e) => Err(e),
            },
        };
        let mut cache = self.lock();
        cache.copying.remove(&block);
        self.copied.notify_all();
        let file = made?;
        Self::remember(&mut cache.files, block, Entry::Open(file.clone()));
        Ok(file)
    }

    fn options() -> OpenOptions {
        let mut options = OpenOptions::new();
        // O_NOFOLLOW: a symlink planted in a block directory is refused (ELOOP), never
        // followed to a file outside the store.
        options
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW);
        options
    }

    /// Opens `block`'s file if it has one: `Shared` when a snapshot links it too.
    fn open_existing(&self, block: u64) -> io::Result<Entry> {
        let file = Arc::new(Self::options().open(self.path(block))?);
        if file.metadata()?.nlink() > 1 {
            return Ok(Entry::Shared(file));
        }
        Ok(Entry::Open(file))
    }

    fn create_file(&self, block: u64) -> io::Result<Arc<File>> {
        if !self.dir.exists() {
            fs::create_dir_all(&self.dir)?;
        }
        let file = Arc::new(
            Self::options()
                .create(true)
                .mode(0o600)
                .open(self.path(block))?,
        );
        // Only now is there a directory entry for a flush to make durable.
        self.dir_dirty.store(true, Ordering::Release);
        Ok(file)
    }

    /// Replaces `block`'s file by a new one holding exactly `data` (resync's whole-block
    /// copy): nothing is copied up first, and a file a snapshot shares keeps its bytes. Like
    /// a copy-up, made under a temporary name, synced on the volume tier and renamed into
    /// place, while the block's writers wait and its readers read the old file.
    pub(super) fn replace_with(&self, block: u64, data: &[u8]) -> io::Result<Arc<File>> {
        use std::os::unix::fs::FileExt;
        let mut cache = self.lock_quiet(Some(block));
        cache.copying.insert(block);
        drop(cache);
        let made = self.new_file(block, |file| {
            file.write_all_at(data, 0)?;
            file.set_len(data.len() as u64)
        });
        let mut cache = self.lock();
        cache.copying.remove(&block);
        self.copied.notify_all();
        let file = made?;
        Self::remember(&mut cache.files, block, Entry::Open(file.clone()));
        Ok(file)
    }

    /// Puts a new file in place of `block`'s: a copy of `from`'s data (holes stay holes), or
    /// empty.
    fn copy_up(&self, block: u64, from: Option<&File>) -> io::Result<Arc<File>> {
        self.new_file(block, |file| {
            from.map_or(Ok(()), |from| copy_data(from, file))
        })
    }

    /// Puts a new file in place of `block`'s, filled by `fill`: written under a temporary
    /// name, synced on the volume tier, then renamed, so the block is never seen half
    /// written, and the bytes are durable before the name is.
    fn new_file(
        &self,
        block: u64,
        fill: impl FnOnce(&File) -> io::Result<()>,
    ) -> io::Result<Arc<File>> {
        if !self.dir.exists() {
            fs::create_dir_all(&self.dir)?;
        }
        let temp = self.dir.join(format!(".{block:08}.new"));
        match fs::remove_file(&temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = Self::options().create_new(true).mode(0o600).open(&temp)?;
        let synced = fill(&file).and_then(|()| match self.tier {
            Tier::Volume => file.sync_data(),
            Tier::Ram => Ok(()),
        });
        if let Err(e) = synced.and_then(|()| fs::rename(&temp, self.path(block))) {
            // A half copy must not hold RAM (tmpfs) or disk until the next try.
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        self.dir_dirty.store(true, Ordering::Release);
        Ok(Arc::new(file))
    }

    /// Frees a whole block: its file goes, and it reads as zeros again. `keep_empty` (a
    /// clone's block, which would otherwise read its parent's data again) leaves an empty
    /// file in its place instead, put there in one rename.
    pub(super) fn drop_block(&self, block: u64, keep_empty: bool) -> io::Result<()> {
        let mut cache = self.lock_quiet(Some(block));
        if keep_empty {
            let empty = self.copy_up(block, None)?;
            Self::remember(&mut cache.files, block, Entry::Open(empty));
            return Ok(());
        }
        Self::remember(&mut cache.files, block, Entry::Absent);
        match fs::remove_file(self.path(block)) {
            Ok(()) => {
                self.dir_dirty.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A snapshot's first step, before its barrier: hard-links every block file into
    /// `snapshot`'s directory (made here). Writes go on meanwhile; [`BlockFiles::link_into`]
    /// makes the links exact inside the barrier, where only what changed since costs time.
    pub fn prelink_into(&self, snapshot: &BlockFiles) -> io::Result<()> {
        fs::create_dir_all(&snapshot.dir)?;
        for (name, _) in block_entries(&self.dir)? {
            match fs::hard_link(self.dir.join(&name), snapshot.dir.join(&name)) {
                // Removed since the listing: the second step leaves it out.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Makes `snapshot`'s directory hold exactly this image's block files, as hard links:
    /// files created or replaced since [`BlockFiles::prelink_into`] are linked (again), files
    /// removed since are unlinked. Then forgets every open file, so the next write to any of
    /// them finds it shared and copies it first. Call only while no write to the image is in
    /// flight. Returns the files the snapshot holds. Nothing is synced (this runs while guest
    /// writes wait): call [`BlockFiles::sync_tree`] on `snapshot` before anything names it.
    pub fn link_into(&self, snapshot: &BlockFiles) -> io::Result<u64> {
        // A copy-up in progress (a flatten's) renames a new file in place and caches it as
        // unshared: it must not be linked between the two.
        let mut cache = self.lock_quiet(None);
        fs::create_dir_all(&snapshot.dir)?;
        let mine: HashMap<std::ffi::OsString, u64> = block_entries(&self.dir)?.collect();
        let linked: HashMap<std::ffi::OsString, u64> = block_entries(&snapshot.dir)?.collect();
        for (name, inode) in &mine {
            if linked.get(name) != Some(inode) {
                let to = snapshot.dir.join(name);
                if linked.contains_key(name) {
                    fs::remove_file(&to)?;
                }
                fs::hard_link(self.dir.join(name), to)?;
            }
        }
        for name in linked.keys().filter(|n| !mine.contains_key(*n)) {
            fs::remove_file(snapshot.dir.join(name))?;
        }
        cache.files.clear();
        Ok(mine.len() as u64)
    }

    /// Makes the directory and its entries durable (the directory itself, and its entry in
    /// the tier's root), when it exists.
    pub fn sync_tree(&self) -> io::Result<()> {
        if !self.dir_exists() {
            return Ok(());
        }
        File::open(&self.dir)?.sync_all()?;
        self.create_dir()
    }

    /// Frees `len` bytes at `offset` of a block's `file`; they read as zeros afterwards.
    pub(super) fn punch(file: &File, offset: u64, len: u64) -> io::Result<()> {
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
        let mut blocks: Vec<u64> = block_entries(&self.dir)?
            .filter_map(|(name, _)| name.to_str()?.parse::<u64>().ok())
            .filter(|&block| block >= first)
            .collect();
        blocks.sort_unstable();
        Ok(blocks)
    }

    /// Closes every cached file, so a removed image's space is freed at once.
    pub fn forget_all(&self) {
        self.lock().files.clear();
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

/// The block files of `dir` (names of 8 digits) and their inode numbers, from the directory
/// listing alone (no `stat` per file); none when it does not exist.
fn block_entries(dir: &Path) -> io::Result<impl Iterator<Item = (std::ffi::OsString, u64)>> {
    use std::os::unix::fs::DirEntryExt;
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        other => other?.collect::<io::Result<Vec<_>>>()?,
    };
    Ok(entries.into_iter().filter_map(|entry| {
        let name = entry.file_name();
        let is_block = name
            .to_str()
            .is_some_and(|n| n.len() == 8 && n.bytes().all(|b| b.is_ascii_digit()));
        is_block.then(|| (name, entry.ino()))
    }))
}

/// Copies `from`'s data into the empty `to`, the same length, leaving its holes as holes
/// (a copy-up of a sparse RAM-tier block must not fill tmpfs with zeros).
fn copy_data(from: &File, to: &File) -> io::Result<()> {
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let mut buf: Vec<u8> = Vec::new();
    let mut at = 0;
    while at < len {
        let Some((data, hole)) = next_data(from, at)? else {
            break;
        };
        copy_range(from, to, data, hole, &mut buf)?;
        at = hole;
    }
    Ok(())
}

/// Copies bytes `start..end` at the same offsets: in the kernel (`copy_file_range`, one copy
/// instead of two through a buffer), or through `buf` where the kernel cannot (across file
/// systems on older kernels).
fn copy_range(from: &File, to: &File, start: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut pos = start;
    while pos < end {
        let want = (end - pos).min(COPY_CHUNK as u64) as usize;
        let (mut off_in, mut off_out) = (to_off(pos)?, to_off(pos)?);
        // SAFETY: both descriptors are ours and open; the offsets are passed by pointer to
        // locals and the call moves at most `want` bytes between the two files.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        let n = match n {
            0 => return Ok(()), // the source ended early: the rest reads as zeros anyway
            n if n > 0 => n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                ) {
                    return Err(e);
                }
                buf.resize(want, 0);
                let n = from.read_at(&mut buf[..want], pos)?;
                if n == 0 {
                    return Ok(());
                }
                to.write_all_at(&buf[..n], pos)?;
                n
            }
        };
        pos += n as u64;
    }
    Ok(())
}

/// Bytes a copy-up moves per call.
const COPY_CHUNK: usize = 1 << 20;

/// The next run of data at or after `at`: `(start, end)`, or `None` when only holes follow.
fn next_data(file: &File, at: u64) -> io::Result<Option<(u64, u64)>> {
    let seek = |offset: u64, whence| -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; it moves only that descriptor's offset,
        // which nothing else here uses (all I/O is positioned).
        let rc = unsafe { libc::lseek(file.as_raw_fd(), to_off(offset)?, whence) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(rc as u64))
    };
    let Some(data) = seek(at, libc::SEEK_DATA)? else {
        return Ok(None);
    };
    // Past the data there is always a hole (at least the end of the file); none means the
    // file shrank under the copy.
    let hole = seek(data, libc::SEEK_HOLE)?.filter(|&hole| hole > data);
    let hole = hole.ok_or_else(|| io::Error::other("the block file shrank while copied"))?;
    Ok(Some((data, hole)))
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
            .for_write(7, || Ok(None))
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
            let write = files.for_write(block, || Ok(None)).map(|_| ());
            assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::ELOOP));
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
        assert!(!root.path().join("gone").exists());
    }

    #[test]
    fn dropped_block_reads_absent_and_frees_space() {
        let (_root, files) = setup();
        files
            .for_write(3, || Ok(None))
            .unwrap()
            .write_all_at(&[1; 8192], 0)
            .unwrap();
        files.drop_block(3, false).unwrap();
        assert!(files.for_read(3).unwrap().is_none());
        assert_eq!(files.used_bytes().unwrap(), 0);
        files.drop_block(3, false).unwrap();
    }

    #[test]
    fn punch_zeroes_a_range() {
        let (_root, files) = setup();
        let f = files.for_write(0, || Ok(None)).unwrap();
        f.write_all_at(&[7; 16384], 0).unwrap();
        BlockFiles::punch(&f, 4096, 8192).unwrap();
        let mut buf = [1u8; 16384];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[12288..].iter().all(|&b| b == 7));
    }

    #[test]
    fn copies_keep_holes_within_and_across_file_systems() {
        use std::os::unix::fs::FileExt;
        let shm = std::path::Path::new("/dev/shm");
        let roots = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let other = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        for to_dir in [roots[1].path(), other.path()] {
            let from = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(roots[0].path().join("from"))
                .unwrap();
            from.set_len(8 << 20).unwrap();
            from.write_all_at(&[3; 4096], 1 << 20).unwrap();
            from.write_all_at(&[4; 8192], (6 << 20) + 512).unwrap();
            let to = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(to_dir.join("to"))
                .unwrap();
            copy_data(&from, &to).unwrap();
            assert_eq!(to.metadata().unwrap().len(), 8 << 20);
            let mut got = vec![0u8; 8 << 20];
            to.read_exact_at(&mut got, 0).unwrap();
            let mut want = vec![0u8; 8 << 20];
            want[1 << 20..(1 << 20) + 4096].fill(3);
            want[(6 << 20) + 512..(6 << 20) + 512 + 8192].fill(4);
            assert!(got == want, "copy into {}", to_dir.display());
            assert!(
                to.metadata().unwrap().blocks() * 512 <= 64 << 10,
                "holes were filled"
            );
        }
    }

    #[test]
    fn cache_is_bounded() {
        let (_root, files) = setup();
        for b in 0..(MAX_OPEN_BLOCKS as u64 + 10) {
            files.for_write(b, || Ok(None)).unwrap();
        }
        assert!(files.cache.lock().unwrap().files.len() <= MAX_OPEN_BLOCKS);
        assert!(files.for_read(0).unwrap().is_some());
    }
}
