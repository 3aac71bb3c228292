//! The io_uring strategy: operations from one kick are queued, handed to the kernel in one
//! `io_uring_enter`, and complete in any order through an eventfd the queue's epoll watches.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};

use super::{settle, Done, Engine, Op, OpError, OpKind};

/// Ring entries per queue. QEMU's vhost-user-blk queues hold 128 or 256 requests and a
/// request rarely spans more than two blocks; 512 keeps a full queue in flight. The
/// completion ring is twice this (the kernel's default), and in-flight operations never
/// exceed this, so completions cannot overflow.
pub const RING_ENTRIES: u32 = 512;

/// Checks once, at start, that io_uring can be used here (it may be disabled by the
/// `kernel.io_uring_disabled` sysctl or a container's seccomp policy).
pub fn probe_uring() -> io::Result<()> {
    IoUring::new(4).map(drop)
}

pub struct UringEngine {
    ring: IoUring,
    /// Operations in flight, indexed by their slot (the SQE's user data): they own the
    /// buffers, the iovec array and the file the kernel is using. Never resized.
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Operations finished (or failed) without the kernel's ring; reported by the next `reap`.
    failed: Vec<Done>,
}

impl UringEngine {
    /// A ring that signals completions on `eventfd`.
    pub fn new(eventfd: RawFd) -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        ring.submitter().register_eventfd(eventfd)?;
        Ok(UringEngine {
            ring,
            slots: (0..RING_ENTRIES).map(|_| None).collect(),
            free: (0..RING_ENTRIES as usize).rev().collect(),
            failed: Vec::new(),
        })
    }

    fn entry(op: &Op, slot: usize) -> Result<io_uring::squeue::Entry, OpError> {
        let fd = types::Fd(op.file()?.as_raw_fd());
        let iov = &op.iovecs.0;
        let entry = match op.kind {
            OpKind::Read => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(op.offset)
                .build(),
            OpKind::Write => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(op.offset)
                .build(),
            OpKind::Sync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            OpKind::Free { .. } => return Err(OpError::LocalFree),
        };
        Ok(entry.user_data(slot as u64))
    }

    fn try_push(&mut self, entry: &io_uring::squeue::Entry) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: the entry's buffers and descriptor belong to the `Op` stored in
            // `self.slots` until its completion is reaped, so they outlive the kernel's use.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
        Err(io::Error::other("io_uring submission queue full"))
    }
}

impl Engine for UringEngine {
    fn room(&self) -> usize {
        self.free.len()
    }

    fn push(&mut self, op: Op) {
        let Some(slot) = self.free.pop() else {
            // More in flight than the ring holds (a flush of many files, or a request of many
            // pieces): run this one synchronously rather than fail it.
            let result = super::inline::run(&op);
            self.failed.push(Done {
                tag: op.tag,
                result,
            });
            return;
        };
        let tag = op.tag;
        // The entry points at the iovecs where they now live, inside the slot: they may be
        // stored inline in the `Op`, so they must not move again until the completion (the
        // slot table is allocated once and never grows).
        let op = self.slots[slot].insert(op);
        let pushed = Self::entry(op, slot).and_then(|entry| Ok(self.try_push(&entry)?));
        if let Err(error) = pushed {
            self.slots[slot] = None;
            self.free.push(slot);
            self.failed.push(Done {
                tag,
                result: Err(error),
            });
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.ring.submit().map(drop)
    }

    fn reap(&mut self, done: &mut Vec<Done>) {
        done.append(&mut self.failed);
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(op) = self.slots.get_mut(slot).and_then(Option::take) else {
                log::error!("io_uring completion for unknown slot {slot}");
                continue;
            };
            self.free.push(slot);
            let raw = cqe.result();
            let result = if raw < 0 {
                Err(io::Error::from_raw_os_error(-raw))
            } else {
                Ok(raw as usize)
            };
            done.push(Done {
                tag: op.tag,
                result: settle(&op, result),
            });
        }
    }

    fn in_flight(&self) -> usize {
        RING_ENTRIES as usize - self.free.len() + self.failed.len()
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.free.len() < RING_ENTRIES as usize {
            self.ring.submit_and_wait(1)?;
        }
        Ok(())
    }
}
