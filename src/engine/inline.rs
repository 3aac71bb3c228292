//! The inline strategy: each operation runs synchronously on the queue's thread.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use super::{settle, Done, Engine, IoVecs, Op, OpError, OpKind};

#[derive(Default)]
pub struct InlineEngine {
    done: VecDeque<Done>,
}

impl InlineEngine {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Runs one operation now.
pub fn run(op: &Op) -> Result<usize, OpError> {
    let first = transfer(op.kind, op.file()?, op.offset, &op.iovecs);
    settle(op, first)
}

/// One `preadv`, `pwritev` or `fdatasync`; returns the bytes moved.
pub fn transfer(kind: OpKind, file: &File, offset: u64, iovecs: &IoVecs) -> io::Result<usize> {
    let fd = file.as_raw_fd();
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let iov = &iovecs.0;
    let count = iov.len().min(1024) as libc::c_int;
    // SAFETY: `fd` is open for the life of the call; the iovecs point into guest memory the
    // request keeps mapped, checked for the right direction when it was parsed.
    let rc = unsafe {
        match kind {
            OpKind::Read => libc::preadv(fd, iov.as_ptr(), count, offset),
            OpKind::Write => libc::pwritev(fd, iov.as_ptr(), count, offset),
            OpKind::Sync => libc::fdatasync(fd) as isize,
            OpKind::Free { .. } => return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

impl Engine for InlineEngine {
    fn room(&self) -> usize {
        usize::MAX
    }

    fn push(&mut self, op: Op) {
        let result = run(&op);
        self.done.push_back(Done {
            tag: op.tag,
            result,
        });
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, done: &mut Vec<Done>) {
        done.extend(self.done.drain(..));
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn wait(&mut self) -> io::Result<()> {
        Ok(())
    }
}
