//! In-flight request tracking shared with QEMU (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), so a
//! daemon that dies with requests in flight can replay them after a restart.
//!
//! QEMU asks for a region (GET_INFLIGHT_FD), keeps the file across reconnects and hands it to
//! every new connection (SET_INFLIGHT_FD). Each queue's part follows the split-ring layout of
//! the vhost-user specification ("Inflight I/O tracking"):
//!
//! ```text
//! queue header, 16 bytes: features u64, version u16, desc_num u16, last_batch_head u16,
//!                         used_idx u16
//! desc_num entries, 16 bytes each: inflight u8, padding [u8; 5], next u16, counter u64
//! ```
//!
//! A head is marked when it is taken off the avail ring and cleared after it went on the used
//! ring; `last_batch_head` and `used_idx` repair the one case a crash can leave wrong (the head
//! was put on the used ring but not yet cleared). Every request completes on its own (batches of
//! one), as in libvhost-user. QEMU never reads the region; it is still treated as foreign memory:
//! every index read from it is checked.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

const VERSION: u16 = 1;
const HEADER: usize = 16;
const ENTRY: usize = 16;
/// Queue parts start on cache-line boundaries.
const ALIGN: usize = 64;

// Header fields.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
// Entry fields.
const INFLIGHT_AT: usize = 0;
const COUNTER_AT: usize = 8;

/// More queues than any device of ours has (the backend offers 8): a bound on what a frontend
/// can make us allocate.
const MAX_QUEUES: u16 = 64;

/// Bytes one queue's part takes.
fn queue_bytes(queue_size: u16) -> usize {
    (HEADER + ENTRY * usize::from(queue_size)).next_multiple_of(ALIGN)
}

/// A zero-filled region for `num_queues` queues of `queue_size` entries (GET_INFLIGHT_FD).
pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(File, VhostUserInflight)> {
    if num_queues == 0 || num_queues > MAX_QUEUES || !queue_size.is_power_of_two() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no in-flight region for {num_queues} queues of {queue_size} entries"),
        ));
    }
    let size = queue_bytes(queue_size) * usize::from(num_queues);
    // SAFETY: the name is a NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"cormorant-inflight".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    Ok((
        file,
        VhostUserInflight::new(size as u64, 0, num_queues, queue_size),
    ))
}

/// QEMU's region, mapped (SET_INFLIGHT_FD).
pub struct Region {
    map: MmapRegion,
    queues: u16,
    queue_size: u16,
}

impl Region {
    /// Maps the file QEMU passed, after checking that it holds what the message says.
    pub fn map(file: File, info: &VhostUserInflight) -> io::Result<Arc<Region>> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        let (queues, queue_size) = (info.num_queues, info.queue_size);
        if queues == 0 || queues > MAX_QUEUES || !queue_size.is_power_of_two() {
            return Err(invalid(format!(
                "in-flight region for {queues} queues of {queue_size} entries"
            )));
        }
        let needed = queue_bytes(queue_size) * usize::from(queues);
        if info.mmap_size < needed as u64 {
            return Err(invalid(format!(
                "in-flight region of {} bytes, {needed} needed",
                info.mmap_size
            )));
        }
        if file.metadata()?.len() < info.mmap_offset.saturating_add(needed as u64) {
            return Err(invalid("in-flight file shorter than its region".into()));
        }
        let map = MmapRegion::from_file(FileOffset::new(file, info.mmap_offset), needed)
            .map_err(|e| io::Error::other(format!("cannot map the in-flight region: {e}")))?;
        Ok(Arc::new(Region {
            map,
            queues,
            queue_size,
        }))
    }

    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// Queue `index`'s part, or None past the queues QEMU set up.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<QueueInflight> {
        (index < self.queues).then(|| QueueInflight {
            region: self.clone(),
            base: queue_bytes(self.queue_size) * usize::from(index),
            size: self.queue_size,
            counter: 0,
            recovered: false,
        })
    }
}

/// One queue's part of the region, owned by that queue's worker.
pub struct QueueInflight {
    region: Arc<Region>,
    base: usize,
    size: u16,
    /// Orders the marks, so replay follows the order the guest submitted in.
    counter: u64,
    /// False until [`QueueInflight::recover`] ran for this connection.
    recovered: bool,
}

impl QueueInflight {
    #[allow(
        clippy::expect_used,
        reason = "Region::map checked that every queue's part lies inside the mapping"
    )]
    fn part(&self) -> VolatileSlice<'_> {
        self.region
            .map
            .get_slice(self.base, queue_bytes(self.size))
            .expect("the queue's part lies in the mapping (checked in Region::map)")
    }

    fn entry(head: u16) -> usize {
        HEADER + ENTRY * usize::from(head)
    }

    fn store<T: vm_memory::AtomicAccess>(&self, at: usize, value: T) {
        // In bounds by construction: heads are below `size` (the queue's own checks).
        let _ = self.part().store(value, at, Release);
    }

    fn load<T: vm_memory::AtomicAccess + Default>(&self, at: usize) -> T {
        self.part().load(at, Acquire).unwrap_or_default()
    }

    /// Whether the connection's replay is still to do.
    pub fn needs_recovery(&self) -> bool {
        !self.recovered
    }

    /// Marks `head` taken off the avail ring.
    pub fn begin(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.store(Self::entry(head) + COUNTER_AT, self.counter);
        self.counter += 1;
        self.store(Self::entry(head) + INFLIGHT_AT, 1u8);
    }

    /// Call right before `head` goes on the used ring.
    pub fn before_used(&self, head: u16) {
        if head < self.size {
            self.store(LAST_BATCH_HEAD_AT, head);
        }
    }

    /// Call right after `head` went on the used ring, which now ends at `used_idx`.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        if head < self.size {
            self.store(Self::entry(head) + INFLIGHT_AT, 0u8);
        }
        self.store(USED_IDX_AT, used_idx);
    }

    /// Reads what a previous connection (or daemon) left in flight, given the used ring's index
    /// now; returns the heads to replay, oldest first. A region QEMU just created is initialised
    /// instead. Runs once per connection, before the queue is served.
    pub fn recover(&mut self, ring_used_idx: u16) -> Vec<u16> {
        self.recovered = true;
        if self.load::<u16>(VERSION_AT) != VERSION || self.load::<u16>(DESC_NUM_AT) != self.size {
            if self.load::<u16>(VERSION_AT) != 0 {
                log::warn!("in-flight region of an unknown layout: starting it afresh");
            }
            let _ = self.part().write_slice(&vec![0; queue_bytes(self.size)], 0);
            self.store(VERSION_AT, VERSION);
            self.store(DESC_NUM_AT, self.size);
            self.store(USED_IDX_AT, ring_used_idx);
            self.counter = 0;
            return Vec::new();
        }
        if self.load::<u16>(USED_IDX_AT) != ring_used_idx {
            // The last completion reached the used ring but its mark was not cleared.
            let head: u16 = self.load(LAST_BATCH_HEAD_AT);
            if head < self.size {
                self.store(Self::entry(head) + INFLIGHT_AT, 0u8);
            }
            self.store(USED_IDX_AT, ring_used_idx);
        }
        let mut marked: Vec<(u64, u16)> = (0..self.size)
            .filter(|&head| self.load::<u8>(Self::entry(head) + INFLIGHT_AT) == 1)
            .map(|head| (self.load::<u64>(Self::entry(head) + COUNTER_AT), head))
            .collect();
        marked.sort_unstable();
        self.counter = marked
            .last()
            .map_or(0, |&(counter, _)| counter.wrapping_add(1));
        marked.into_iter().map(|(_, head)| head).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> (File, Arc<Region>) {
        let (file, info) = create(queues, size).unwrap();
        let region = Region::map(file.try_clone().unwrap(), &info).unwrap();
        (file, region)
    }

    fn remap(file: &File, queues: u16, size: u16) -> Arc<Region> {
        let info = VhostUserInflight::new(
            (queue_bytes(size) * queues as usize) as u64,
            0,
            queues,
            size,
        );
        Region::map(file.try_clone().unwrap(), &info).unwrap()
    }

    #[test]
    fn a_fresh_region_replays_nothing() {
        let (_file, region) = region(2, 128);
        let mut q = region.queue(1).unwrap();
        assert!(q.needs_recovery());
        assert_eq!(q.recover(7), Vec::<u16>::new());
        assert!(!q.needs_recovery());
        assert!(region.queue(2).is_none());
    }

    #[test]
    fn unfinished_heads_replay_in_submission_order() {
        let (file, region) = region(1, 16);
        let mut q = region.queue(0).unwrap();
        q.recover(0);
        for head in [5, 2, 9, 3] {
            q.begin(head);
        }
        q.before_used(2);
        q.after_used(2, 1);
        drop(q);
        // The daemon dies; the next one maps the same file.
        let mut again = remap(&file, 1, 16).queue(0).unwrap();
        assert_eq!(again.recover(1), vec![5, 9, 3]);
        // New marks sort after the replayed ones.
        again.begin(2);
        let mut third = remap(&file, 1, 16).queue(0).unwrap();
        assert_eq!(third.recover(1), vec![5, 9, 3, 2]);
    }

    #[test]
    fn a_completion_cut_short_by_a_crash_is_not_replayed() {
        let (file, region) = region(1, 16);
        let mut q = region.queue(0).unwrap();
        q.recover(0);
        q.begin(4);
        q.begin(6);
        q.before_used(4);
        // Crash here: head 4 is on the used ring (index now 1) but still marked.
        let mut again = remap(&file, 1, 16).queue(0).unwrap();
        assert_eq!(again.recover(1), vec![6]);
    }

    #[test]
    fn foreign_contents_are_checked() {
        let (file, region) = region(1, 8);
        let mut q = region.queue(0).unwrap();
        q.recover(0);
        // Garbage in the last-batch head is ignored, out-of-range heads are never marked.
        q.store(LAST_BATCH_HEAD_AT, 999u16);
        q.begin(200);
        let mut again = remap(&file, 1, 8).queue(0).unwrap();
        assert_eq!(again.recover(3), Vec::<u16>::new());
        // A region for another queue size starts afresh.
        let mut other = remap(&file, 1, 4).queue(0).unwrap();
        assert_eq!(other.recover(0), Vec::<u16>::new());
    }

    #[test]
    fn bad_messages_are_refused() {
        assert!(create(0, 128).is_err());
        assert!(create(65, 128).is_err());
        assert!(create(1, 100).is_err());
        let (file, _) = create(1, 16).unwrap();
        let short = VhostUserInflight::new(16, 0, 1, 16);
        assert!(Region::map(file.try_clone().unwrap(), &short).is_err());
        let past_end = VhostUserInflight::new(queue_bytes(16) as u64, 4096, 1, 16);
        assert!(Region::map(file.try_clone().unwrap(), &past_end).is_err());
    }
}
