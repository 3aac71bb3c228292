//! The remote strategy: operations on copies held by other nodes. A read or write becomes one
//! or more peer calls of at most `MAX_CHUNK` bytes, pipelined on the peer's pooled
//! connections; a sync is the peer's flush of the image, a free its discard. Operations pushed
//! between two submits go out together (one system call per peer connection, like one
//! io_uring submit per kick). Each completes through the queue's eventfd like an io_uring
//! operation, with the peer's error kept typed; a run of answers wakes the queue once.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{Done, Engine, IoVecs, Op, OpError, OpKind, PeerTarget, Target};
use crate::image::NodeId;
use crate::peer::{client, PeerError, Request, Response, MAX_CHUNK};
use crate::peers::Transport;

/// Data bytes of remote operations a queue gathers before it sends them: the bytes one
/// image may have in flight to a peer (`peers::IMAGE_IN_FLIGHT_BYTES`).
pub const UNSENT_BYTES: usize = crate::peers::IMAGE_IN_FLIGHT_BYTES;

pub struct RemoteEngine {
    peers: Arc<dyn Transport>,
    shared: Arc<Shared>,
    /// Operations pushed since the last [`Engine::submit`]: their calls leave together.
    queued: Vec<Op>,
    /// Data bytes of the queued operations (see [`UNSENT_BYTES`]).
    queued_bytes: usize,
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
    error: Mutex<Option<OpError>>,
}

impl Pending {
    fn chunk_done(&self, result: Result<(), OpError>) {
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
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        shared.finish(Done {
            tag: self.tag,
            result,
        });
    }
}

impl Shared {
    /// Hands a finished operation to `reap`. Only the first of a run of completions wakes the
    /// queue: until it reaps, the list is not empty, and it takes the whole list when it does
    /// (the check and the take are under the same lock), so one eventfd write serves a whole
    /// batch of answers.
    fn finish(&self, done: Done) {
        let wake = {
            let mut list = self.done.lock().unwrap_or_else(|p| p.into_inner());
            list.push(done);
            list.len() == 1
        };
        if wake {
            let _ = self.notify.write(1);
        }
    }
}

/// The outcome of a call answered by a plain Ok (a write, a flush, a discard).
fn plain(node: &NodeId, result: Result<Response, PeerError>) -> Result<(), OpError> {
    match result {
        Ok(Response::Ok) => Ok(()),
        Ok(other) => Err(OpError::Answer {
            node: node.clone(),
            answer: format!("{other:?}"),
        }),
        Err(source) => Err(OpError::Peer {
            node: node.clone(),
            source,
        }),
    }
}

impl RemoteEngine {
    /// Completions are announced on `notify` (the worker's completion eventfd, duplicated).
    pub fn new(peers: Arc<dyn Transport>, notify: EventFd) -> Self {
        RemoteEngine {
            peers,
            shared: Arc::new(Shared {
                done: Mutex::new(Vec::new()),
                notify,
                in_flight: AtomicUsize::new(0),
            }),
            queued: Vec::new(),
            queued_bytes: 0,
        }
    }

    /// Sends the calls of one operation; its completion is reaped later.
    fn start(&self, op: Op) {
        let Target::Peer(target) = op.target else {
            // A local file reached the remote engine: a caller's bug, failed like any error.
            self.fail(
                op.tag,
                OpError::Io(io::Error::other(
                    "a local operation reached the remote engine",
                )),
            );
            return;
        };
        let total = op.iovecs.len();
        let chunk = MAX_CHUNK as usize;
        let chunks = match op.kind {
            OpKind::Read | OpKind::Write => total.div_ceil(chunk).max(1),
            OpKind::Sync | OpKind::Free { .. } => 1,
        };
        let pending = Arc::new(Pending {
            shared: self.shared.clone(),
            tag: op.tag,
            total,
            iovecs: op.iovecs,
            chunks_left: AtomicUsize::new(chunks),
            error: Mutex::new(None),
        });
        let PeerTarget {
            node,
            image,
            tier,
            block,
        } = target;
        let offset_of = |at: usize| u32::try_from(op.offset + at as u64).unwrap_or(u32::MAX);
        for i in 0..chunks {
            let at = i * chunk;
            let len = chunk.min(total - at);
            let request = match op.kind {
                OpKind::Read => Request::Read {
                    image: image.clone(),
                    tier,
                    block,
                    offset: offset_of(at),
                    len: len as u32,
                },
                OpKind::Write => Request::Write {
                    image: image.clone(),
                    tier,
                    block,
                    offset: offset_of(at),
                    data: pending.iovecs.copy_out(at, len),
                },
                OpKind::Sync => Request::Flush {
                    image: image.clone(),
                },
                OpKind::Free { len } => Request::Discard {
                    image: image.clone(),
                    tier,
                    block,
                    offset: offset_of(0),
                    len,
                },
            };
            let landing = (op.kind == OpKind::Read).then(|| pending.iovecs.landing(at, len));
            let (pending, kind, from) = (pending.clone(), op.kind, node.clone());
            let done = Box::new(move |result: Result<Response, PeerError>| {
                let outcome = match (kind, result) {
                    // The payload landed in the buffers (only a landed read is answered so).
                    (OpKind::Read, Ok(Response::Ok)) => Ok(()),
                    (OpKind::Read, Ok(Response::Data(data))) if data.len() == len => {
                        pending.iovecs.copy_in(at, &data);
                        Ok(())
                    }
                    (OpKind::Read, Ok(other)) => Err(OpError::Answer {
                        node: from,
                        answer: format!("{other:?}"),
                    }),
                    (_, result) => plain(&from, result),
                };
                pending.chunk_done(outcome);
            });
            match landing {
                Some(landing) => {
                    client::with_landing(landing, || self.peers.call(&node, request, done))
                }
                None => self.peers.call(&node, request, done),
            }
        }
    }

    /// Completes an operation that was never sent.
    fn fail(&self, tag: u64, error: OpError) {
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.shared.finish(Done {
            tag,
            result: Err(error),
        });
    }

    /// Sends the calls of every queued operation, in one batch per peer connection.
    fn send_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.queued);
        self.queued_bytes = 0;
        crate::peer::client::batch(|| {
            for op in ops {
                self.start(op);
            }
        });
    }
}

impl Engine for RemoteEngine {
    /// None once a kick's unsent calls carry [`UNSENT_BYTES`]: the queue then stops taking
    /// requests and sends these, so that what the peer's push-back holds waiting is one
    /// image's bound, not a whole ring of requests (a call that waits its whole timeout for
    /// room fails).
    fn room(&self) -> usize {
        if self.queued_bytes >= UNSENT_BYTES {
            0
        } else {
            usize::MAX
        }
    }

    /// Queues the operation (it counts as in flight from now on); its calls go out with the
    /// next [`Engine::submit`].
    fn push(&mut self, op: Op) {
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        self.queued_bytes += op.iovecs.len();
        self.queued.push(op);
    }

    /// Sends the calls of the operations pushed since the last submit together: the frames
    /// for one peer connection leave in one system call, from this thread (see
    /// `peer::client::batch`).
    fn submit(&mut self) -> io::Result<()> {
        self.send_queued();
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Done>) {
        out.append(&mut self.shared.done.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Calls not yet answered (answered ones wait in `reap`, which the caller polls).
    fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Peer calls end by answer or by their timeout; nothing to block on but time.
    fn wait(&mut self) -> io::Result<()> {
        self.send_queued();
        if self.shared.in_flight.load(Ordering::Acquire) > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }
}
