//! How pieces reach storage. One interface, a strategy per tier: the RAM tier completes
//! inline with `preadv`/`pwritev` (a tmpfs read is a memory copy, and io_uring would punt it
//! to a worker thread: 51 us against 1.4 us at QD1 here), the volume tier goes through
//! io_uring with many requests in flight.
//!
//! Copies on other nodes are one more strategy (`remote`): the same [`Op`], aimed at a peer.
//!
//! Nothing here knows about virtio: an [`Op`] is a target (a block file here, or a block of a
//! copy on a peer), an offset and host buffers.

mod inline;
pub mod remote;
mod uring;

pub use inline::InlineEngine;
pub use uring::{probe_uring, UringEngine, RING_ENTRIES};

use std::fs::File;
use std::io;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::image::{NodeId, Tier};
use crate::peer::{ImageRef, PeerError};

/// Host buffers of one operation. They point into guest memory that the owner of the
/// operation keeps mapped (it holds the guest memory's `Arc`) until the operation completes.
pub struct IoVecs(pub SmallVec<[libc::iovec; 4]>);

// SAFETY: the pointers are plain addresses into a shared mapping whose lifetime the request
// that owns this value guarantees; nothing here is tied to the creating thread.
unsafe impl Send for IoVecs {}

// SAFETY: shared only by a remote operation's chunks, whose completions copy into disjoint
// byte ranges of the buffers; the iovec array itself is never changed after creation.
unsafe impl Sync for IoVecs {}

impl IoVecs {
    pub fn len(&self) -> usize {
        self.0.iter().map(|v| v.iov_len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `data` into the buffers at byte `at` (a remote read's answer).
    pub fn copy_in(&self, at: usize, data: &[u8]) {
        let mut skip = at;
        let mut src = data;
        for v in &self.0 {
            if src.is_empty() {
                break;
            }
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let n = (v.iov_len - skip).min(src.len());
            // SAFETY: the destination lies inside a device-writable guest buffer kept mapped
            // by the request (see the type's doc); `n` stays within it and within `src`.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), (v.iov_base as *mut u8).add(skip), n);
            }
            src = &src[n..];
            skip = 0;
        }
    }

    /// Bytes `at..at + len` of the buffers, for a remote read's answer to be decoded into
    /// (see `peer::client::with_landing`). The owner of these buffers keeps them mapped until
    /// the operation completes, which is after every call of it completed.
    pub fn landing(&self, at: usize, len: usize) -> crate::peer::client::Landing {
        let rest = self.from(at);
        let segments = rest.0.iter().map(|v| (v.iov_base.cast::<u8>(), v.iov_len));
        // SAFETY: the buffers are device-writable guest memory kept mapped by the request
        // until its operation completes (see the type's doc); the chunks of one operation land
        // in disjoint byte ranges, and nothing else touches them while a read is in flight.
        unsafe { crate::peer::client::Landing::new(segments, len) }
    }

    /// `len` bytes of the buffers from byte `at` (a remote write's payload).
    pub fn copy_out(&self, at: usize, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut skip = at;
        for v in &self.0 {
            if out.len() == len {
                break;
            }
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let n = (v.iov_len - skip).min(len - out.len());
            // SAFETY: the source lies inside a guest buffer kept mapped by the request; `n`
            // stays within it.
            let bytes =
                unsafe { std::slice::from_raw_parts((v.iov_base as *const u8).add(skip), n) };
            out.extend_from_slice(bytes);
            skip = 0;
        }
        out
    }

    /// The buffers from byte `from` on.
    pub fn from(&self, from: usize) -> IoVecs {
        let mut skip = from;
        let mut rest = SmallVec::new();
        for v in &self.0 {
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            rest.push(libc::iovec {
                // SAFETY: `skip < iov_len`, so the result stays inside the same buffer.
                iov_base: unsafe { (v.iov_base as *mut u8).add(skip) } as *mut libc::c_void,
                iov_len: v.iov_len - skip,
            });
            skip = 0;
        }
        IoVecs(rest)
    }

    /// Zeroes the buffers from byte `from` on: a read that met the end of a sparse block file
    /// returns fewer bytes, and the rest of the block reads as zeros.
    pub fn zero_from(&self, from: usize) {
        let mut skip = from;
        for v in &self.0 {
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            // SAFETY: the buffer lies inside guest memory kept mapped by the owner (see the
            // type's doc) and was checked to be device-writable when the request was parsed.
            unsafe {
                std::ptr::write_bytes((v.iov_base as *mut u8).add(skip), 0, v.iov_len - skip);
            }
            skip = 0;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    /// fdatasync of the file (a peer: flush the image); carries no buffers.
    Sync,
    /// Free `len` bytes at the offset (a peer's copy only: local spans are freed through the
    /// store, synchronously); carries no buffers.
    Free {
        len: u32,
    },
}

/// Where an operation goes.
pub enum Target {
    /// A block file on this node.
    File(Arc<File>),
    /// A block of a copy held by another node.
    Peer(PeerTarget),
}

/// A block of a copy on another node, and the image reference its requests carry.
#[derive(Debug, Clone)]
pub struct PeerTarget {
    pub node: NodeId,
    pub image: ImageRef,
    pub tier: Tier,
    pub block: u64,
}

/// One operation on one block.
pub struct Op {
    pub kind: OpKind,
    pub target: Target,
    /// Byte offset inside the file (a peer's block).
    pub offset: u64,
    pub iovecs: IoVecs,
    /// Returned with the completion; the caller's request slot.
    pub tag: u64,
}

impl Op {
    /// The block file a local engine works on; an error for a peer's copy.
    pub fn file(&self) -> Result<&Arc<File>, OpError> {
        match &self.target {
            Target::File(file) => Ok(file),
            Target::Peer(p) => Err(OpError::WrongEngine(p.node.clone())),
        }
    }
}

/// Why an operation failed, kept typed so the layer above can tell a copy that could not be
/// reached (try another) from a local storage error.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("block I/O: {0}")]
    Io(#[from] io::Error),
    #[error("node {node}: {source}")]
    Peer {
        node: NodeId,
        #[source]
        source: PeerError,
    },
    #[error("node {node} answered {answer}")]
    Answer { node: NodeId, answer: String },
    #[error("an operation for node {0} reached a local engine")]
    WrongEngine(NodeId),
    #[error("free is not a local engine operation")]
    LocalFree,
}

/// A finished operation: bytes transferred, or the error.
#[derive(Debug)]
pub struct Done {
    pub tag: u64,
    pub result: Result<usize, OpError>,
}

pub trait Engine: Send {
    /// How many more operations fit before the caller must wait for completions.
    fn room(&self) -> usize;
    /// Queues an operation. Its completion comes from [`Engine::reap`], possibly at once.
    fn push(&mut self, op: Op);
    /// Hands everything queued since the last call to the kernel, in one system call.
    fn submit(&mut self) -> io::Result<()>;
    /// Collects finished operations.
    fn reap(&mut self, done: &mut Vec<Done>);
    /// Operations pushed and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Blocks until at least one in-flight operation finishes (used when draining).
    fn wait(&mut self) -> io::Result<()>;
}

/// Turns a finished read or write into the caller's result. A short transfer is finished
/// here synchronously (rare: the kernel may stop early for its own reasons); a read that meets
/// the end of a sparse block file leaves the rest reading as zeros; a write that cannot make
/// progress is an error (the disk is full).
pub fn settle(op: &Op, result: io::Result<usize>) -> Result<usize, OpError> {
    let want = op.iovecs.len();
    let mut done = result?;
    if matches!(op.kind, OpKind::Sync | OpKind::Free { .. }) {
        return Ok(done);
    }
    let file = op.file()?;
    while done < want {
        let rest = op.iovecs.from(done);
        let offset = op.offset + done as u64;
        let n = inline::transfer(op.kind, file, offset, &rest)?;
        if n == 0 {
            if op.kind == OpKind::Write {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {done} of {want} bytes"),
                )
                .into());
            }
            op.iovecs.zero_from(done);
            break;
        }
        done += n;
    }
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }
    }

    fn run_all(engine: &mut dyn Engine, ops: Vec<Op>) -> Vec<Done> {
        for op in ops {
            engine.push(op);
        }
        engine.submit().unwrap();
        let mut done = Vec::new();
        while engine.in_flight() > 0 {
            engine.wait().unwrap();
            engine.reap(&mut done);
        }
        engine.reap(&mut done);
        done.sort_by_key(|d| d.tag);
        done
    }

    fn exercise(engine: &mut dyn Engine) {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(File::create_new(dir.path().join("b")).unwrap());
        let mut a = vec![0xa5u8; 4096];
        let mut b = vec![0x5au8; 512];
        let write = Op {
            kind: OpKind::Write,
            target: Target::File(file.clone()),
            offset: 512,
            iovecs: IoVecs(smallvec::smallvec![iov(&mut a), iov(&mut b)]),
            tag: 1,
        };
        let sync = Op {
            kind: OpKind::Sync,
            target: Target::File(file.clone()),
            offset: 0,
            iovecs: IoVecs(SmallVec::new()),
            tag: 2,
        };
        let done = run_all(engine, vec![write, sync]);
        assert_eq!(done.len(), 2);
        assert_eq!(*done[0].result.as_ref().unwrap(), 4608);
        assert!(done[1].result.is_ok());
        let mut check = vec![0u8; 4608];
        file.read_exact_at(&mut check, 512).unwrap();
        assert!(check[..4096].iter().all(|&x| x == 0xa5));

        // A read running past the end of the file zero-fills the rest of the buffer.
        let mut out = vec![0xffu8; 8192];
        let read = Op {
            kind: OpKind::Read,
            target: Target::File(file),
            offset: 4096,
            iovecs: IoVecs(smallvec::smallvec![iov(&mut out)]),
            tag: 3,
        };
        let done = run_all(engine, vec![read]);
        assert_eq!(*done[0].result.as_ref().unwrap(), 8192);
        assert!(out[..512].iter().all(|&x| x == 0xa5));
        assert!(out[512..1024].iter().all(|&x| x == 0x5a));
        assert!(out[1024..].iter().all(|&x| x == 0));
    }

    #[test]
    fn inline_engine_reads_writes_and_zero_fills() {
        exercise(&mut InlineEngine::new());
    }

    #[test]
    fn uring_engine_reads_writes_and_zero_fills() {
        if probe_uring().is_err() {
            eprintln!("io_uring unavailable here; skipping");
            return;
        }
        let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        use std::os::unix::io::AsRawFd;
        exercise(&mut UringEngine::new(efd.as_raw_fd()).unwrap());
    }
}
