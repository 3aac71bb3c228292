//! Operations on copies held by other nodes: a piece becomes one or more peer calls of at most
//! `MAX_CHUNK` bytes, pipelined on the peer's pooled connections, and completes through the
//! queue worker's eventfd like an io_uring operation.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{Done, IoVecs, OpKind};
use crate::image::{NodeId, Tier};
use crate::peer::ImageRef;
use crate::peer::{PeerError, Request, Response, MAX_CHUNK};
use crate::peers::Peers;

pub struct RemoteOp {
    pub kind: OpKind,
    pub node: NodeId,
    pub image: ImageRef,
    pub tier: Tier,
    pub block: u64,
    /// Byte offset inside the block.
    pub offset: u64,
    pub iovecs: IoVecs,
    pub tag: u64,
}

pub struct RemoteEngine {
    peers: Arc<Peers>,
    shared: Arc<Shared>,
}

struct Shared {
    done: Mutex<Vec<Done>>,
    notify: EventFd,
    in_flight: AtomicUsize,
}

/// One operation's chunks in flight.
struct Pending {
    shared: Arc<Shared>,
    tag: u64,
    total: usize,
    iovecs: IoVecs,
    chunks_left: AtomicUsize,
    error: Mutex<Option<io::Error>>,
}

impl Pending {
    fn chunk_done(&self, result: io::Result<()>) {
        if let Err(e) = result {
            let mut error = self.error.lock().unwrap_or_else(|p| p.into_inner());
            error.get_or_insert(e);
        }
        if self.chunks_left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let error = self.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        let result = match error {
            Some(e) => Err(e),
            None => Ok(self.total),
        };
        let shared = &self.shared;
        shared
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Done {
                tag: self.tag,
                result,
            });
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        let _ = shared.notify.write(1);
    }
}

fn io_error(e: PeerError) -> io::Error {
    io::Error::other(e.to_string())
}

impl RemoteEngine {
    /// Completions are announced on `notify` (the worker's completion eventfd, duplicated).
    pub fn new(peers: Arc<Peers>, notify: EventFd) -> Self {
        RemoteEngine {
            peers,
            shared: Arc::new(Shared {
                done: Mutex::new(Vec::new()),
                notify,
                in_flight: AtomicUsize::new(0),
            }),
        }
    }

    pub fn start(&self, op: RemoteOp) {
        let total = op.iovecs.len();
        let chunk = MAX_CHUNK as usize;
        let chunks = total.div_ceil(chunk).max(1);
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        let pending = Arc::new(Pending {
            shared: self.shared.clone(),
            tag: op.tag,
            total,
            iovecs: op.iovecs,
            chunks_left: AtomicUsize::new(chunks),
            error: Mutex::new(None),
        });
        for i in 0..chunks {
            let at = i * chunk;
            let len = chunk.min(total - at);
            let offset = u32::try_from(op.offset + at as u64).unwrap_or(u32::MAX);
            let request = match op.kind {
                OpKind::Read => Request::Read {
                    image: op.image.clone(),
                    tier: op.tier,
                    block: op.block,
                    offset,
                    len: len as u32,
                },
                _ => Request::Write {
                    image: op.image.clone(),
                    tier: op.tier,
                    block: op.block,
                    offset,
                    data: pending.iovecs.copy_out(at, len),
                },
            };
            let (pending, kind) = (pending.clone(), op.kind);
            let done = Box::new(move |result: Result<Response, PeerError>| {
                let outcome = match (kind, result) {
                    (OpKind::Read, Ok(Response::Data(data))) if data.len() == len => {
                        pending.iovecs.copy_in(at, &data);
                        Ok(())
                    }
                    (OpKind::Write, Ok(Response::Ok)) => Ok(()),
                    (_, Ok(other)) => Err(io::Error::other(format!("unexpected answer {other:?}"))),
                    (_, Err(e)) => Err(io_error(e)),
                };
                pending.chunk_done(outcome);
            });
            self.peers.call(&op.node, request, done);
        }
    }

    /// Sends `node` one request answered by a plain Ok (a flush, a discard); the completion
    /// says whether it was.
    pub fn call(&self, node: &NodeId, request: Request, tag: u64) {
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        let pending = Arc::new(Pending {
            shared: self.shared.clone(),
            tag,
            total: 0,
            iovecs: IoVecs(smallvec::SmallVec::new()),
            chunks_left: AtomicUsize::new(1),
            error: Mutex::new(None),
        });
        let done = Box::new(move |result: Result<Response, PeerError>| {
            let outcome = match result {
                Ok(Response::Ok) => Ok(()),
                Ok(other) => Err(io::Error::other(format!("unexpected answer {other:?}"))),
                Err(e) => Err(io_error(e)),
            };
            pending.chunk_done(outcome);
        });
        self.peers.call(node, request, done);
    }

    pub fn reap(&self, out: &mut Vec<Done>) {
        out.append(&mut self.shared.done.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }
}
