//! One tier's cache on this node: every image's cached blocks on that tier, one sparse file
//! per block under `<tier dir>/.cache/<image>@<id>/`, kept within the node's budget for the
//! tier (and each image's own cap) by evicting the least recently used blocks.
//!
//! One lock covers the whole shelf: a lookup (a hit touches the LRU order), a fill (the check
//! that no write raced it, the file write and the page bits together, so an old fill can never
//! overwrite a newer one's bytes) and every eviction. Evicting unlinks the file, after the
//! lock is released (a file system's unlink can be slow, and every image's reads wait on this
//! lock): a reader that already holds the descriptor still reads the pages it was told were
//! valid. Each file's name carries a serial (`<block>.<serial>`), never reused, so a block
//! filled again before its old file is unlinked gets a new file, never the old one truncated.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::pages::{self, Pages, PAGE};
use crate::engine::IoVecs;

/// Which image's cache, and under which owner epoch its contents are valid.
#[derive(Debug, Clone, Copy)]
pub struct Stake {
    /// The image cache's id (unique in this process).
    pub id: u64,
    /// The owner epoch the caller acts under: contents filled under another epoch are never
    /// served (another owner may have written meanwhile).
    pub epoch: u64,
}

/// A fill: bytes `offset..offset + bufs.len()` of `block`, read from an in-sync copy.
pub struct Fill<'a> {
    pub block: u64,
    /// Pages in the block (its bitmap's size).
    pub block_pages: u64,
    pub offset: u64,
    pub bufs: &'a IoVecs,
    /// Filled by read-ahead, not by a guest read (counted when a guest read hits it).
    pub ahead: bool,
    /// The image's own cap in bytes (the node's budget applies too).
    pub cap: u64,
}

/// A block fully valid for a read.
pub struct Hit {
    pub file: Arc<File>,
    /// Pages of the read that read-ahead brought in and no read had used yet.
    pub ahead_pages: u64,
}

struct Entry {
    file: Arc<File>,
    pages: Pages,
    /// Pages read-ahead filled that no guest read has used yet.
    ahead: Pages,
    tick: u64,
    /// The file's serial, part of its name.
    serial: u64,
}

struct Stock {
    dir: PathBuf,
    epoch: u64,
    used: u64,
    blocks: HashMap<u64, Entry>,
}

struct State {
    limit: u64,
    used: u64,
    tick: u64,
    /// Least recently used first: tick -> (image cache id, block).
    lru: BTreeMap<u64, (u64, u64)>,
    stocks: HashMap<u64, Stock>,
    /// The last serial given to a file or a doomed directory.
    serial: u64,
    /// Files evicted under the lock, to unlink once it is released.
    doomed: Vec<PathBuf>,
}

pub struct Shelf {
    root: PathBuf,
    /// The budget, also outside the lock: the request path asks whether there is one.
    limit: u64,
    state: Mutex<State>,
}

impl Shelf {
    /// The shelf under `root` (`<tier dir>/.cache`), emptied: the cache is disposable, and
    /// writes may have happened elsewhere while this node was down.
    pub fn new(root: PathBuf, limit: u64) -> io::Result<Shelf> {
        match fs::remove_dir_all(&root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if limit > 0 {
            if let Some(parent) = root.parent() {
                fs::create_dir_all(parent)?;
            }
            private_dir(&root)?;
        }
        Ok(Shelf {
            root,
            limit,
            state: Mutex::new(State {
                limit,
                used: 0,
                tick: 0,
                lru: BTreeMap::new(),
                stocks: HashMap::new(),
                serial: 0,
                doomed: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Releases the lock, then unlinks the files evicted under it.
    fn release(&self, mut state: MutexGuard<'_, State>) {
        let doomed = std::mem::take(&mut state.doomed);
        drop(state);
        for path in doomed {
            unlink(&path);
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes cached on this shelf, over all images.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Bytes one image has cached here.
    pub fn used_by(&self, id: u64) -> u64 {
        self.lock().stocks.get(&id).map_or(0, |s| s.used)
    }

    /// The cached file of `block` when pages `first..end` are all valid under `stake`.
    pub fn lookup(&self, stake: Stake, block: u64, first: u64, end: u64) -> Option<Hit> {
        let mut state = self.lock();
        let hit = Self::lookup_locked(&mut state, stake, block, first, end);
        self.release(state);
        hit
    }

    fn lookup_locked(
        state: &mut State,
        stake: Stake,
        block: u64,
        first: u64,
        end: u64,
    ) -> Option<Hit> {
        let stock = state.stocks.get_mut(&stake.id)?;
        if stock.epoch != stake.epoch {
            if stock.epoch < stake.epoch {
                state.used -= clear(stock, &mut state.lru, &mut state.doomed);
                stock.epoch = stake.epoch;
            }
            return None;
        }
        let entry = stock.blocks.get_mut(&block)?;
        if !entry.pages.covers(first, end) {
            return None;
        }
        let ahead_pages = entry.ahead.clear(first, end);
        state.lru.remove(&entry.tick);
        state.tick += 1;
        entry.tick = state.tick;
        state.lru.insert(entry.tick, (stake.id, block));
        Some(Hit {
            file: entry.file.clone(),
            ahead_pages,
        })
    }

    /// Whether pages `first..end` of `block` are all valid under `stake`, without counting
    /// as a use (read-ahead asks before it reads).
    pub fn holds(&self, stake: Stake, block: u64, first: u64, end: u64) -> bool {
        let state = self.lock();
        state.stocks.get(&stake.id).is_some_and(|stock| {
            stock.epoch == stake.epoch
                && stock
                    .blocks
                    .get(&block)
                    .is_some_and(|e| e.pages.covers(first, end))
        })
    }

    /// Writes a fill's whole pages to the cache and marks them valid, if `unchanged()` says
    /// no write to the block started since the read that brought the data was issued (and
    /// none is in flight). Evicts least recently used blocks to make room. Returns the bytes
    /// newly cached (0 when the fill was refused or did not fit).
    pub fn fill(
        &self,
        dir_name: &str,
        stake: Stake,
        fill: &Fill,
        unchanged: &dyn Fn() -> bool,
    ) -> io::Result<u64> {
        let (first, end) = pages::inner(fill.offset, fill.bufs.len() as u64);
        if first == end {
            return Ok(0);
        }
        let mut state = self.lock();
        let added = self.fill_locked(&mut state, dir_name, stake, fill, unchanged, first, end);
        self.release(state);
        added
    }

    #[allow(clippy::too_many_arguments)]
    fn fill_locked(
        &self,
        state: &mut State,
        dir_name: &str,
        stake: Stake,
        fill: &Fill,
        unchanged: &dyn Fn() -> bool,
        first: u64,
        end: u64,
    ) -> io::Result<u64> {
        let stock = state.stocks.entry(stake.id).or_insert_with(|| Stock {
            dir: self.root.join(dir_name),
            epoch: stake.epoch,
            used: 0,
            blocks: HashMap::new(),
        });
        if stake.epoch < stock.epoch || !unchanged() {
            return Ok(0);
        }
        if stake.epoch > stock.epoch {
            state.used -= clear(stock, &mut state.lru, &mut state.doomed);
            stock.epoch = stake.epoch;
        }
        let missing = match stock.blocks.get(&fill.block) {
            Some(entry) => entry.pages.missing(first, end),
            None => end - first,
        };
        let need = missing * PAGE;
        if need > state.limit || need > fill.cap {
            return Ok(0);
        }
        if !state.make_room(stake.id, fill.block, need, fill.cap) {
            return Ok(0);
        }
        let Some(stock) = state.stocks.get_mut(&stake.id) else {
            return Ok(0);
        };
        let entry = match stock.blocks.entry(fill.block) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                state.serial += 1;
                let file = create(&path(&stock.dir, fill.block, state.serial))?;
                v.insert(Entry {
                    file: Arc::new(file),
                    pages: Pages::new(fill.block_pages),
                    ahead: Pages::new(fill.block_pages),
                    tick: 0,
                    serial: state.serial,
                })
            }
        };
        let skip = (first * PAGE - fill.offset) as usize;
        let len = ((end - first) * PAGE) as usize;
        write_all_at(&entry.file, &window(fill.bufs, skip, len), first * PAGE)?;
        let added = entry.pages.set(first, end) * PAGE;
        if fill.ahead {
            entry.ahead.set(first, end);
        }
        state.lru.remove(&entry.tick);
        state.tick += 1;
        entry.tick = state.tick;
        state.lru.insert(entry.tick, (stake.id, fill.block));
        stock.used += added;
        state.used += added;
        Ok(added)
    }

    /// Drops `block` of image cache `id` (a write or discard changed it).
    pub fn drop_block(&self, id: u64, block: u64) {
        let mut state = self.lock();
        state.evict(id, block);
        self.release(state);
    }

    /// Drops every block of image cache `id` for which `which` is true.
    pub fn drop_where(&self, id: u64, which: &dyn Fn(u64) -> bool) {
        let mut state = self.lock();
        let blocks: Vec<u64> = state.stocks.get(&id).map_or_else(Vec::new, |stock| {
            stock.blocks.keys().copied().filter(|&b| which(b)).collect()
        });
        for block in blocks {
            state.evict(id, block);
        }
        self.release(state);
    }

    /// Drops everything image cache `id` holds here; contents filled under an epoch below
    /// `floor` are refused from now on.
    pub fn drop_all(&self, id: u64, floor: u64) {
        let mut guard = self.lock();
        let state = &mut *guard;
        if let Some(stock) = state.stocks.get_mut(&id) {
            state.used -= clear(stock, &mut state.lru, &mut state.doomed);
            stock.epoch = stock.epoch.max(floor);
        }
        self.release(guard);
    }

    /// Forgets image cache `id` (the image is closed): its files and directory go. The
    /// directory is renamed aside under the lock (a fill may create it again at once) and
    /// removed after.
    pub fn forget(&self, id: u64) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(mut stock) = state.stocks.remove(&id) else {
            return;
        };
        let mut files = Vec::new();
        state.used -= clear(&mut stock, &mut state.lru, &mut files);
        state.serial += 1;
        // Image names cannot start with a dot: no stock's directory is ever called this.
        let aside = self.root.join(format!(".gone-{}", state.serial));
        let moved = match fs::rename(&stock.dir, &aside) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => {
                log::warn!("cache: cannot move {} aside: {e}", stock.dir.display());
                state.doomed.append(&mut files);
                false
            }
        };
        self.release(guard);
        if moved {
            if let Err(e) = fs::remove_dir_all(&aside) {
                log::warn!("cache: cannot remove {}: {e}", aside.display());
            }
        }
    }
}

impl State {
    /// Evicts least recently used blocks (never `keep` of image `id`) until `need` more
    /// bytes fit both the shelf's limit and image `id`'s `cap`; false when they cannot.
    fn make_room(&mut self, id: u64, keep: u64, need: u64, cap: u64) -> bool {
        let used_by = |s: &State| s.stocks.get(&id).map_or(0, |s| s.used);
        while used_by(self) + need > cap {
            let victim = self
                .lru
                .values()
                .find(|&&(i, b)| i == id && b != keep)
                .copied();
            match victim {
                Some((i, b)) => self.evict(i, b),
                None => break,
            }
        }
        while self.used + need > self.limit {
            let victim = self
                .lru
                .values()
                .find(|&&(i, b)| !(i == id && b == keep))
                .copied();
            match victim {
                Some((i, b)) => self.evict(i, b),
                None => break,
            }
        }
        used_by(self) + need <= cap && self.used + need <= self.limit
    }

    fn evict(&mut self, id: u64, block: u64) {
        let Some(stock) = self.stocks.get_mut(&id) else {
            return;
        };
        if let Some(entry) = stock.blocks.remove(&block) {
            let bytes = entry.pages.count() * PAGE;
            stock.used -= bytes;
            self.used -= bytes;
            self.lru.remove(&entry.tick);
            self.doomed.push(path(&stock.dir, block, entry.serial));
        }
    }
}

/// Drops every block of `stock`, its files added to `doomed`; returns the bytes it held.
fn clear(stock: &mut Stock, lru: &mut BTreeMap<u64, (u64, u64)>, doomed: &mut Vec<PathBuf>) -> u64 {
    for (block, entry) in stock.blocks.drain() {
        lru.remove(&entry.tick);
        doomed.push(path(&stock.dir, block, entry.serial));
    }
    std::mem::take(&mut stock.used)
}

fn path(dir: &Path, block: u64, serial: u64) -> PathBuf {
    dir.join(format!("{block:08}.{serial}"))
}

/// Creates `dir` (and a missing cache root above it) readable by this user only: cached
/// blocks are guest data, as private as the block files they copy.
fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn create(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    // A new file (O_EXCL): the serial makes its name unique, and an existing one (a planted
    // symlink, say) is refused, never followed or truncated. 0600 and O_NOFOLLOW as for
    // block files (`store::files`).
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
}

fn unlink(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            log::warn!("cache: cannot remove {}: {e}", path.display());
        }
    }
}

/// `len` bytes of `bufs` from byte `skip`.
fn window(bufs: &IoVecs, skip: usize, len: usize) -> IoVecs {
    let mut rest = bufs.from(skip);
    let mut left = len;
    rest.0.retain_mut(|v| {
        let keep = left > 0;
        v.iov_len = v.iov_len.min(left);
        left -= v.iov_len;
        keep
    });
    rest
}

/// Writes all of `bufs` at `offset` (a buffered write: the cache is never synced, it is
/// wiped at start).
fn write_all_at(file: &File, bufs: &IoVecs, offset: u64) -> io::Result<()> {
    let mut done = 0;
    let want = bufs.len();
    while done < want {
        let rest = bufs.from(done);
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let count = rest.0.len().min(1024) as libc::c_int;
        // SAFETY: the descriptor is open for the call; the iovecs point into buffers the
        // caller keeps alive and unchanged until the fill returns (a finished read's guest
        // buffers, or read-ahead's own buffer), and are only read from.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), rest.0.as_ptr(), count, at) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "cache file full"));
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn bufs(data: &mut [u8]) -> IoVecs {
        IoVecs(smallvec::smallvec![libc::iovec {
            iov_base: data.as_mut_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }])
    }

    /// The names in `dir`, sorted.
    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn fill_page(shelf: &Shelf, stake: Stake, block: u64, page: u64, byte: u8) -> u64 {
        let mut data = vec![byte; PAGE as usize];
        let b = bufs(&mut data);
        let fill = Fill {
            block,
            block_pages: 16,
            offset: page * PAGE,
            bufs: &b,
            ahead: false,
            cap: u64::MAX,
        };
        let dir = format!("img@{}", stake.id);
        shelf.fill(&dir, stake, &fill, &|| true).unwrap()
    }

    #[test]
    fn a_fill_is_served_back_and_a_partial_page_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let shelf = Shelf::new(dir.path().join("cache"), 1 << 20).unwrap();
        let stake = Stake { id: 1, epoch: 3 };
        let mut data: Vec<u8> = (0..4 * PAGE as usize - 512)
            .map(|i| (i % 251) as u8)
            .collect();
        let b = bufs(&mut data);
        let fill = Fill {
            block: 2,
            block_pages: 16,
            offset: 512,
            bufs: &b,
            ahead: true,
            cap: u64::MAX,
        };
        // Bytes 512.. cover pages 1, 2 and 3 wholly; page 0 only partly.
        assert_eq!(
            shelf.fill("img@1", stake, &fill, &|| true).unwrap(),
            3 * PAGE
        );
        assert!(shelf.lookup(stake, 2, 0, 1).is_none(), "page 0 is partial");
        let hit = shelf.lookup(stake, 2, 1, 4).unwrap();
        assert_eq!(hit.ahead_pages, 3);
        let mut back = vec![0u8; PAGE as usize];
        hit.file.read_exact_at(&mut back, PAGE).unwrap();
        assert_eq!(
            &back[..],
            &data[PAGE as usize - 512..2 * PAGE as usize - 512]
        );
        assert_eq!(shelf.lookup(stake, 2, 1, 4).unwrap().ahead_pages, 0);
        assert_eq!(shelf.used(), 3 * PAGE);
    }

    #[test]
    fn a_fill_raced_by_a_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shelf = Shelf::new(dir.path().join("cache"), 1 << 20).unwrap();
        let stake = Stake { id: 1, epoch: 0 };
        let mut data = vec![7u8; PAGE as usize];
        let b = bufs(&mut data);
        let fill = Fill {
            block: 0,
            block_pages: 16,
            offset: 0,
            bufs: &b,
            ahead: false,
            cap: u64::MAX,
        };
        assert_eq!(shelf.fill("img@1", stake, &fill, &|| false).unwrap(), 0);
        assert!(shelf.lookup(stake, 0, 0, 1).is_none());
        assert_eq!(shelf.used(), 0);
    }

    #[test]
    fn another_epoch_never_sees_older_contents() {
        let dir = tempfile::tempdir().unwrap();
        let shelf = Shelf::new(dir.path().join("cache"), 1 << 20).unwrap();
        let old = Stake { id: 1, epoch: 5 };
        let new = Stake { id: 1, epoch: 6 };
        fill_page(&shelf, old, 0, 0, 1);
        assert!(shelf.lookup(new, 0, 0, 1).is_none());
        assert_eq!(shelf.used(), 0, "a newer epoch drops the older contents");
        assert_eq!(
            fill_page(&shelf, old, 0, 0, 1),
            0,
            "a late fill of the old epoch"
        );
        assert!(shelf.lookup(old, 0, 0, 1).is_none());
        // Fenced: nothing of epoch 6 is kept or taken any more.
        fill_page(&shelf, new, 0, 0, 1);
        shelf.drop_all(1, 7);
        assert_eq!(fill_page(&shelf, new, 0, 0, 1), 0);
        assert!(shelf.lookup(Stake { id: 1, epoch: 7 }, 0, 0, 1).is_none());
    }

    #[test]
    fn eviction_keeps_the_budget_and_drops_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let shelf = Shelf::new(dir.path().join("cache"), 3 * PAGE).unwrap();
        let a = Stake { id: 1, epoch: 0 };
        let b = Stake { id: 2, epoch: 0 };
        fill_page(&shelf, a, 0, 0, 1);
        fill_page(&shelf, a, 1, 0, 2);
        fill_page(&shelf, b, 0, 0, 3);
        assert!(
            shelf.lookup(a, 0, 0, 1).is_some(),
            "block 0 of a is now the newest"
        );
        fill_page(&shelf, b, 1, 0, 4);
        assert!(shelf.used() <= 3 * PAGE);
        assert!(
            shelf.lookup(a, 1, 0, 1).is_none(),
            "the least recently used went"
        );
        assert!(shelf.lookup(a, 0, 0, 1).is_some());
        assert!(shelf.lookup(b, 0, 0, 1).is_some());
        assert!(shelf.lookup(b, 1, 0, 1).is_some());
        assert_eq!(files(&dir.path().join("cache/img@1")), ["00000000.1"]);
        assert_eq!(
            files(&dir.path().join("cache/img@2")),
            ["00000000.3", "00000001.4"]
        );
    }

    #[test]
    fn an_image_cap_evicts_only_its_own_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let shelf = Shelf::new(dir.path().join("cache"), 1 << 20).unwrap();
        let a = Stake { id: 1, epoch: 0 };
        let b = Stake { id: 2, epoch: 0 };
        fill_page(&shelf, b, 0, 0, 9);
        let mut data = vec![1u8; PAGE as usize];
        let bv = bufs(&mut data);
        for block in 0..4 {
            let fill = Fill {
                block,
                block_pages: 16,
                offset: 0,
                bufs: &bv,
                ahead: false,
                cap: 2 * PAGE,
            };
            shelf.fill("a@1", a, &fill, &|| true).unwrap();
            assert!(shelf.used_by(1) <= 2 * PAGE);
        }
        assert!(shelf.lookup(a, 3, 0, 1).is_some());
        assert!(shelf.lookup(a, 2, 0, 1).is_some());
        assert!(shelf.lookup(a, 0, 0, 1).is_none());
        assert!(
            shelf.lookup(b, 0, 0, 1).is_some(),
            "another image keeps its blocks"
        );
        assert_eq!(
            files(&dir.path().join("cache/a@1")),
            ["00000002.4", "00000003.5"],
            "evicted files are unlinked"
        );
    }

    #[test]
    fn cache_files_are_private_and_symlinks_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let shelf = Shelf::new(dir.path().join(".cache"), 1 << 20).unwrap();
        let a = Stake { id: 1, epoch: 0 };
        fill_page(&shelf, a, 0, 0, 1);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join(".cache")), 0o700);
        assert_eq!(mode(&dir.path().join(".cache/img@1")), 0o700);
        assert_eq!(mode(&dir.path().join(".cache/img@1/00000000.1")), 0o600);
        // A symlink where block 1's file will go: the fill fails, the target is untouched.
        let outside = dir.path().join("outside");
        fs::write(&outside, b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, dir.path().join(".cache/img@1/00000001.2")).unwrap();
        let mut data = vec![2u8; PAGE as usize];
        let b = bufs(&mut data);
        let fill = Fill {
            block: 1,
            block_pages: 16,
            offset: 0,
            bufs: &b,
            ahead: false,
            cap: u64::MAX,
        };
        assert!(shelf.fill("img@1", a, &fill, &|| true).is_err());
        assert_eq!(fs::read(&outside).unwrap(), b"keep");
        assert!(shelf.lookup(a, 1, 0, 1).is_none());
    }

    #[test]
    fn a_dropped_block_is_gone_and_its_bytes_returned() {
        let dir = tempfile::tempdir().unwrap();
        let shelf = Shelf::new(dir.path().join("cache"), 1 << 20).unwrap();
        let a = Stake { id: 1, epoch: 0 };
        fill_page(&shelf, a, 4, 1, 1);
        fill_page(&shelf, a, 4, 2, 1);
        assert_eq!(shelf.used(), 2 * PAGE);
        shelf.drop_block(1, 4);
        assert_eq!(shelf.used(), 0);
        assert!(shelf.lookup(a, 4, 1, 2).is_none());
        shelf.forget(1);
        assert!(!dir.path().join("cache/img@1").exists());
        assert!(
            files(&dir.path().join("cache")).is_empty(),
            "nothing set aside is left"
        );
    }

    #[test]
    fn a_block_filled_again_gets_a_new_file_and_the_old_reader_its_bytes() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let shelf = Shelf::new(dir.path().join("cache"), 1 << 20).unwrap();
        let a = Stake { id: 1, epoch: 0 };
        fill_page(&shelf, a, 0, 0, 1);
        let old = shelf.lookup(a, 0, 0, 1).unwrap();
        shelf.drop_block(1, 0);
        fill_page(&shelf, a, 0, 0, 2);
        let mut back = vec![0u8; PAGE as usize];
        old.file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 1), "the old file was reused");
        let new = shelf.lookup(a, 0, 0, 1).unwrap();
        new.file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 2));
        assert_eq!(files(&dir.path().join("cache/img@1")), ["00000000.2"]);
    }
}
