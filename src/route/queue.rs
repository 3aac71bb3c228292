//! One virtqueue's requests on their way to storage: cut into block pieces, each piece sent
//! to the right copy (reads) or every copy (writes, discards, flushes) through the engines,
//! and settled when its last operation completes (see `settle`).
//!
//! Writes start their blocks' write counters under the metadata lock, so a resync never
//! commits over them, and land under the epoch gate, so none checked under this node's epoch
//! lands after a newer owner's first request.

use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;
use vmm_sys_util::eventfd::EventFd;

use super::error::IoError;
use super::split::{self, BlockSpan, Piece};
use crate::cache::stream::Stream;
use crate::cache::CacheHit;
use crate::disk::Disk;
use crate::engine::remote::RemoteEngine;
use crate::engine::{
    Done, Engine, InlineEngine, IoVecs, Op, OpKind, PeerTarget, Target, UringEngine,
};
use crate::image::{Location, NodeId, Tier};
use crate::logs::Throttle;
use crate::metrics::QueueCounters;
use crate::peers::Transport;
use crate::replica::ack::CopyResult;
use crate::slots::Slots;
use crate::store::FlushTicket;

/// Operations in flight per queue before the caller should stop taking new requests and wait
/// for completions: the io_uring's size, so completions never pile up in the kernel.
pub const MAX_IN_FLIGHT_OPS: usize = crate::engine::RING_ENTRIES as usize;

/// One request in this many has its latency measured: the two clock reads it takes cost a
/// few percent of a RAM-tier read's CPU, and a sample describes the distribution as well.
const LATENCY_SAMPLE: u32 = 16;

/// A request for the block device, with host buffers the caller keeps mapped until it
/// completes.
pub enum BlockRequest {
    Read {
        offset: u64,
        bufs: IoVecs,
    },
    Write {
        offset: u64,
        bufs: IoVecs,
    },
    /// Discard and write-zeroes: `(offset, len)` byte ranges that read back as zeros after.
    Free(Vec<(u64, u64)>),
    Flush,
}

/// A finished request: the caller's tag and how it ended.
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: Result<(), IoError>,
}

/// A request cut to blocks, before it is issued (kept as is while its blocks are frozen).
pub(super) enum Work {
    Read(SmallVec<[Piece; 2]>),
    Write(SmallVec<[Piece; 2]>),
    /// Spans inside one block each (the store frees a whole block's file, a part's bytes).
    Free(Vec<BlockSpan>),
    Flush,
}

impl Work {
    fn of(request: BlockRequest, block_size: u64) -> Work {
        match request {
            BlockRequest::Read { offset, bufs } => {
                Work::Read(split::split(offset, &bufs, block_size))
            }
            BlockRequest::Write { offset, bufs } => {
                Work::Write(split::split(offset, &bufs, block_size))
            }
            BlockRequest::Free(ranges) => Work::Free(
                ranges
                    .iter()
                    .flat_map(|&(offset, len)| split::spans(offset, len, block_size))
                    .collect(),
            ),
            BlockRequest::Flush => Work::Flush,
        }
    }

    /// The blocks it changes (one per piece or span), for writes and discards.
    fn blocks(&self) -> Option<SmallVec<[u64; 4]>> {
        match self {
            Work::Write(pieces) => Some(pieces.iter().map(|p| p.block).collect()),
            Work::Free(spans) => Some(spans.iter().map(|s| s.block).collect()),
            _ => None,
        }
    }
}

/// A remote read, kept so that a failed copy can be replaced by the next in-sync one.
pub(super) struct RemoteRead {
    pub block: u64,
    pub offset: u64,
    pub bufs: IoVecs,
    pub tried: SmallVec<[NodeId; 2]>,
    /// When its data may fill the cache: the owner epoch and the block's write count when
    /// the read was issued with no write in flight (see `cache`).
    pub fill: Option<Fill>,
}

/// A read-ahead read: its own buffer (the remote engine writes into it), and where the data
/// goes in the cache.
pub(super) struct Ahead {
    pub buf: Vec<u8>,
    pub block: u64,
    pub offset: u64,
    pub fill: Fill,
    /// Guest read pieces that arrived while it was in flight and wait for its data instead
    /// of reading the same bytes again.
    pub waiters: Vec<Waiter>,
    /// Whether its data goes to the cache too (not for a scan larger than the cache).
    pub keep: bool,
}

/// A guest read piece served from a read-ahead's buffer once it arrives.
pub(super) struct Waiter {
    pub slot: usize,
    pub block: u64,
    pub offset: u64,
    pub bufs: IoVecs,
}

impl Ahead {
    pub fn iovecs(&mut self) -> IoVecs {
        IoVecs(smallvec::smallvec![libc::iovec {
            iov_base: self.buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: self.buf.len(),
        }])
    }
}

/// Read-ahead buffers kept for reuse per queue: as many as fit in flight at the largest
/// operation.
const AHEAD_POOL: usize = (crate::cache::stream::MAX_AHEAD_IN_FLIGHT / AHEAD_OP) as usize;

/// The request slot read-ahead's operations are tagged with: never a real slot's index (a
/// queue has at most a few thousand), so its completions are told apart at once.
pub(super) const AHEAD_SLOT: usize = u32::MAX as usize;

/// Largest read-ahead operation: one peer chunk, so each lands in the cache as soon as it
/// arrives instead of waiting for a whole block.
const AHEAD_OP: u64 = crate::peer::MAX_CHUNK as u64;

/// What a remote read needs to fill the cache on completion.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fill {
    pub epoch: u64,
    pub writes: u32,
}

/// A request in flight.
pub(super) struct Slot {
    pub tag: u64,
    pub error: Option<IoError>,
    /// Operations not yet completed, plus one while the request is still being issued.
    pub pending: usize,
    pub flush: Option<FlushTicket>,
    /// For a write, discard or flush: every copy it reaches, with whether the copy took it.
    /// The acknowledgement rule (`replica::ack`) decides the outcome from these.
    pub copies: Vec<CopyResult>,
    /// Volume-tier files this request writes, with the copy each belongs to: marked dirty for
    /// the next flush once the write completed (marking at issue would let a flush that raced
    /// the write clear the mark before the data landed).
    pub volume_writes: SmallVec<[(usize, u64, Arc<std::fs::File>); 2]>,
    /// For a write or discard: each block it touches (its write counter started, see
    /// `disk::WriteCounters`) and the index in `copies` where that block's copies begin.
    pub written: Vec<(u64, usize)>,
    /// For a read: its pieces that went to other nodes.
    pub reads: Vec<RemoteRead>,
    /// Set for the requests whose latency is sampled.
    pub started: Option<Instant>,
}

/// An operation's tag: the request's slot, and which of its parts (a copy of a write, a
/// remote piece of a read; 0 for none) it is.
pub(super) fn tag(slot: usize, part: usize) -> u64 {
    (slot as u64) << 32 | part as u64
}

pub(super) fn untag(tag: u64) -> (usize, usize) {
    ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize)
}

enum Begin {
    Go(Vec<Vec<Location>>),
    Frozen,
    Refused(IoError),
}

pub struct Queue {
    pub(super) disk: Arc<Disk>,
    pub(super) peers: Arc<dyn Transport>,
    notify: EventFd,
    use_uring: bool,
    inline: InlineEngine,
    uring: Option<UringEngine>,
    pub(super) remote: RemoteEngine,
    pub(super) slots: Slots<Slot>,
    pub(super) done: Vec<Done>,
    /// Requests settled and not yet collected by the caller.
    pub(super) finished: Vec<Completion>,
    /// Requests waiting for a block a resync froze (see `disk::Frozen`).
    deferred: Vec<(u64, Work)>,
    /// The stamp of the request being issued when it changes data (0 otherwise): every change
    /// it sends to another node's copy carries it (see `peer::ImageRef::stamp`).
    stamp: u64,
    sample: u32,
    /// The guest's reads as a stream, for read-ahead (see `cache::stream`).
    stream: Stream,
    /// Read-ahead reads in flight, each with its own buffer (tagged [`AHEAD_SLOT`]).
    pub(super) ahead: Slots<Ahead>,
    /// Bytes of `ahead`, bounded by `cache::stream::MAX_AHEAD_IN_FLIGHT`.
    pub(super) ahead_bytes: u64,
    /// Read-ahead buffers to use again: a fresh 1 MiB buffer is a fresh mapping, whose page
    /// faults cost more than the transfer saves.
    ahead_pool: Vec<Vec<u8>>,
    pub(super) logs: Throttle,
    /// This queue's counts (one writer: this queue's thread).
    pub(super) counters: Arc<QueueCounters>,
}

impl Queue {
    pub(super) fn new(
        disk: Arc<Disk>,
        peers: Arc<dyn Transport>,
        use_uring: bool,
    ) -> std::io::Result<Self> {
        let notify = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let remote = RemoteEngine::new(peers.clone(), notify.try_clone()?);
        let counters = disk.metrics().queue();
        Ok(Queue {
            disk,
            peers,
            notify,
            use_uring,
            inline: InlineEngine::new(),
            uring: None,
            remote,
            slots: Slots::default(),
            done: Vec::new(),
            finished: Vec::new(),
            deferred: Vec::new(),
            stamp: 0,
            sample: 0,
            stream: Stream::default(),
            ahead: Slots::default(),
            ahead_bytes: 0,
            ahead_pool: Vec::new(),
            logs: Throttle::default(),
            counters,
        })
    }

    /// Written when operations complete (io_uring, peers) or a take-over this queue asked
    /// for is over: the queue's thread then calls [`Queue::complete`].
    pub fn completion_fd(&self) -> &EventFd {
        &self.notify
    }

    /// Requests taken and not yet collected (including those waiting for a frozen block).
    pub fn in_flight(&self) -> usize {
        self.slots.len() + self.deferred.len() + self.finished.len()
    }

    /// Whether the caller should stop taking requests until some complete: too many
    /// operations in flight, a peer bound's worth of remote calls gathered and not yet
    /// sent, or calls of this image waiting for room on a peer (they wait in the guest's
    /// ring, not in ours; see `peers::Transport::has_room`).
    pub fn is_full(&self) -> bool {
        self.ops_in_flight() >= MAX_IN_FLIGHT_OPS
            || self.remote.room() == 0
            || (self.remote.in_flight() > 0 && !self.peers.has_room(self.disk.name()))
    }

    fn ops_in_flight(&self) -> usize {
        self.uring.as_ref().map_or(0, |u| u.in_flight()) + self.remote.in_flight()
    }

    /// Starts a request; its completion comes from [`Queue::complete`] with `tag`.
    pub fn submit(&mut self, tag: u64, request: BlockRequest) {
        let block_size = self.disk.meta().block_size;
        let work = Work::of(request, block_size);
        self.count(&work);
        self.issue(tag, work);
    }

    fn issue(&mut self, caller: u64, work: Work) {
        let disk = self.disk.clone();
        let changes = matches!(work, Work::Write(_) | Work::Free(_));
        let gate =
            (changes && disk.store().is_shared()).then(|| disk.enter_epoch(disk.meta().generation));
        let targets = match work.blocks() {
            _ if !disk.may_serve() => Err(IoError::NotServing),
            _ if matches!(gate, Some(Err(_))) => Err(IoError::NewerEpoch),
            None => Ok(Vec::new()),
            Some(blocks) => match self.begin_writes(&blocks) {
                Begin::Frozen => {
                    // A resync is copying one of its blocks: try again shortly, without
                    // holding up this queue's other requests or completions.
                    self.deferred.push((caller, work));
                    return;
                }
                Begin::Refused(e) => Err(e),
                Begin::Go(targets) => Ok(targets),
            },
        };
        // The first request of every LATENCY_SAMPLE is timed.
        let timed = self.sample.is_multiple_of(LATENCY_SAMPLE);
        self.sample = self.sample.wrapping_add(1);
        let slot = self.slots.insert(Slot {
            tag: caller,
            error: None,
            pending: 1,
            flush: None,
            copies: Vec::new(),
            volume_writes: SmallVec::new(),
            written: Vec::new(),
            reads: Vec::new(),
            started: timed.then(Instant::now),
        });
        self.stamp = if changes { disk.next_stamp() } else { 0 };
        match (work, targets) {
            (_, Err(e)) => self.fail(slot, e),
            (Work::Read(pieces), _) => self.read(slot, pieces),
            (Work::Write(pieces), Ok(targets)) => {
                for (piece, locations) in pieces.into_iter().zip(targets) {
                    self.write_piece(slot, piece, locations);
                }
            }
            (Work::Free(spans), Ok(targets)) => {
                for (span, locations) in spans.into_iter().zip(targets) {
                    self.free_span(slot, span, locations);
                }
            }
            (Work::Flush, _) => self.flush(slot),
        }
        drop(gate);
        self.part_done(tag(slot, 0), Ok(0));
    }

    /// Counts the writes to `blocks` as started and returns each block's copies — all under
    /// one hold of the metadata lock, so a resync sees every write that chose its copies, and
    /// a block a resync froze is never written until it thaws.
    fn begin_writes(&self, blocks: &[u64]) -> Begin {
        let meta = self.disk.meta();
        if &meta.owner != self.disk.me() {
            // Fenced: the image moved to another node; this guest must not write.
            return Begin::Refused(IoError::NotOwner(meta.owner.clone()));
        }
        if blocks.iter().any(|&b| self.disk.frozen().is_frozen(b)) {
            return Begin::Frozen;
        }
        let mut targets = Vec::with_capacity(blocks.len());
        for &block in blocks {
            match meta.table.locations(block) {
                Some(locations) => targets.push(locations.to_vec()),
                None => return Begin::Refused(IoError::PastEnd(block)),
            }
        }
        for &block in blocks {
            self.disk.writes().start(block);
        }
        Begin::Go(targets)
    }

    /// Runs the requests that waited for a frozen block; returns how many still wait.
    pub fn retry_deferred(&mut self) -> usize {
        for (tag, work) in std::mem::take(&mut self.deferred) {
            self.issue(tag, work);
        }
        self.deferred.len()
    }

    fn count(&self, work: &Work) {
        let m = &self.counters;
        m.started.add(1);
        let (ops, bytes) = match work {
            Work::Read(pieces) => (&m.reads, Some((&m.read_bytes, pieces))),
            Work::Write(pieces) => (&m.writes, Some((&m.write_bytes, pieces))),
            Work::Flush => (&m.flushes, None),
            Work::Free(_) => (&m.discards, None),
        };
        ops.add(1);
        if let Some((bytes, pieces)) = bytes {
            bytes.add(pieces.iter().map(|p| p.len).sum());
            let heat = self.disk.tiering().heat();
            if heat.is_on() {
                pieces.iter().for_each(|p| heat.touch(p.block));
            }
        }
    }

    /// The guest sent a request it got wrong (counted, never an I/O).
    pub fn guest_error(&self) {
        self.counters.guest_errors.add(1);
    }

    /// Records the request's first error; the request fails (and is logged) when it settles.
    pub(super) fn fail(&mut self, slot: usize, error: IoError) {
        if let Some(request) = self.slots.get_mut(slot) {
            request.error.get_or_insert(error);
        }
    }

    /// Reads each piece from an in-sync copy: this node's when it has one (a block never
    /// written fills zeros without any I/O), else another node's.
    fn read(&mut self, slot: usize, pieces: SmallVec<[Piece; 2]>) {
        let scan = self.is_scan(&pieces);
        let (epoch, sources) = {
            let meta = self.disk.meta();
            let sources: Result<SmallVec<[Source; 2]>, IoError> = pieces
                .iter()
                .map(|piece| {
                    let locations = meta
                        .table
                        .locations(piece.block)
                        .ok_or(IoError::PastEnd(piece.block))?;
                    if let Some(tier) = split::local_copy(locations, self.disk.me()) {
                        return Ok(Source::Local(tier));
                    }
                    // A readable in-sync copy first, hit or not: the cache copies one, and
                    // must never be the last place a block's data is served from.
                    let remote = next_remote(locations, &[], &*self.peers)
                        .ok_or(IoError::NoCopy(piece.block))?;
                    Ok(match self.cached(meta.generation, piece) {
                        Ok(hit) => Source::Cached(hit),
                        Err(fill) => Source::Remote(remote, fill.filter(|_| !scan)),
                    })
                })
                .collect();
            (meta.generation, sources)
        };
        let sources = match sources {
            Ok(sources) => sources,
            Err(e) => return self.fail(slot, e),
        };
        let remote = sources.iter().any(|s| !matches!(s, Source::Local(_)));
        let mut ahead_hit = sources
            .iter()
            .any(|s| matches!(s, Source::Cached(hit) if hit.ahead));
        let span = pieces.first().map(|p| {
            let start = p.block * self.disk.meta().block_size + p.offset;
            (start, pieces.iter().map(|p| p.len).sum::<u64>())
        });
        for (piece, source) in pieces.into_iter().zip(sources) {
            match source {
                Source::Local(tier) => match self.disk.blocks().file_for_read(tier, piece.block) {
                    Ok(None) => piece.bufs.zero_from(0),
                    Ok(Some(file)) => self.push(
                        tag(slot, 0),
                        tier,
                        OpKind::Read,
                        Target::File(file),
                        piece.offset,
                        piece.bufs,
                    ),
                    Err(e) => self.fail(slot, e.into()),
                },
                Source::Cached(hit) => self.push(
                    tag(slot, 0),
                    hit.tier,
                    OpKind::Read,
                    Target::File(hit.file),
                    piece.offset,
                    piece.bufs,
                ),
                Source::Remote(location, fill) => {
                    if self.wait_for_ahead(slot, &piece) {
                        ahead_hit = true;
                        continue;
                    }
                    let Some(request) = self.slots.get_mut(slot) else {
                        return;
                    };
                    request.reads.push(RemoteRead {
                        block: piece.block,
                        offset: piece.offset,
                        bufs: IoVecs(piece.bufs.0.clone()),
                        tried: smallvec::smallvec![location.node.clone()],
                        fill,
                    });
                    let part = request.reads.len();
                    let target = self.peer_target(&location, piece.block);
                    self.push(
                        tag(slot, part),
                        location.tier,
                        OpKind::Read,
                        target,
                        piece.offset,
                        piece.bufs,
                    );
                }
            }
        }
        if let (true, Some((start, len))) = (remote, span) {
            self.read_ahead(epoch, start, len, ahead_hit);
        }
    }

    /// Whether a read continues a scan larger than the image's cache (see
    /// `cache::stream::Stream::is_scan`): its data, and what is read ahead for it, is handed
    /// over but not kept.
    fn is_scan(&self, pieces: &[Piece]) -> bool {
        let Some(first) = pieces.first() else {
            return false;
        };
        let start = first.block * self.disk.meta().block_size + first.offset;
        self.stream.is_scan(start, self.disk.cache().room_total())
    }

    /// Feeds a guest read of remote blocks to the stream detector, and reads ahead what it
    /// asks for.
    fn read_ahead(&mut self, epoch: u64, start: u64, len: u64, ahead_hit: bool) {
        if self.disk.cache().tier().is_none() {
            return;
        }
        let Some((from, to)) = self.stream.on_read(start, len, ahead_hit) else {
            return;
        };
        let (block_size, size) = {
            let meta = self.disk.meta();
            (meta.block_size, meta.size)
        };
        let to = to.min(size);
        let mut at = from;
        while at < to {
            let (block, in_block) = (at / block_size, at % block_size);
            let take = (to - at)
                .min(block_size - in_block)
                .min(AHEAD_OP - in_block % AHEAD_OP);
            if self.ahead_bytes + take > crate::cache::stream::MAX_AHEAD_IN_FLIGHT {
                self.stream.asked_to(at);
                break;
            }
            self.ahead_piece(epoch, block, in_block, take);
            at += take;
        }
    }

    /// Reads bytes `offset..offset + len` of `block` into the cache, unless this node has
    /// an in-sync copy, the cache holds them already, or a write to the block is in flight.
    fn ahead_piece(&mut self, epoch: u64, block: u64, offset: u64, len: u64) {
        let location = {
            let meta = self.disk.meta();
            let Some(locations) = meta.table.locations(block) else {
                return;
            };
            if split::local_copy(locations, self.disk.me()).is_some() {
                return;
            }
            next_remote(locations, &[], &*self.peers)
        };
        let Some(location) = location else {
            return;
        };
        if self.disk.cache().holds(epoch, block, offset, len)
            || self.guest_reading(block, offset, len)
        {
            return;
        }
        let Some(writes) = self.disk.writes().idle(block) else {
            return;
        };
        let mut buf = self.ahead_pool.pop().unwrap_or_default();
        buf.resize(len as usize, 0);
        let mut ahead = Ahead {
            buf,
            block,
            offset,
            fill: Fill { epoch, writes },
            waiters: Vec::new(),
            keep: !self
                .stream
                .is_scan(self.stream.next(), self.disk.cache().room_total()),
        };
        let iovecs = ahead.iovecs();
        let index = self.ahead.insert(ahead);
        self.ahead_bytes += len;
        let target = self.peer_target(&location, block);
        let tag = tag(AHEAD_SLOT, index);
        self.push(tag, location.tier, OpKind::Read, target, offset, iovecs);
    }

    /// Whether a guest read in flight on this queue already fetches some of bytes
    /// `offset..offset + len` of `block` from another node: a deep queue's own reads run
    /// ahead of the stream, and reading their bytes twice would halve the link.
    fn guest_reading(&self, block: u64, offset: u64, len: u64) -> bool {
        self.slots.iter().any(|slot| {
            slot.reads.iter().any(|r| {
                r.block == block
                    && r.offset < offset + len
                    && offset < r.offset + r.bufs.len() as u64
            })
        })
    }

    /// Attaches a guest read piece to a read-ahead in flight that covers it, if one does
    /// and no write to the block started since the read-ahead was issued (none is in
    /// flight either: the piece then reads what a read of its own would).
    fn wait_for_ahead(&mut self, slot: usize, piece: &Piece) -> bool {
        let now = self.disk.writes().idle(piece.block);
        let Some(ahead) = self.ahead.iter_mut().find(|a| {
            a.block == piece.block
                && a.offset <= piece.offset
                && piece.offset + piece.len <= a.offset + a.buf.len() as u64
                && now == Some(a.fill.writes)
        }) else {
            return false;
        };
        ahead.waiters.push(Waiter {
            slot,
            block: piece.block,
            offset: piece.offset,
            bufs: IoVecs(piece.bufs.0.clone()),
        });
        if let Some(request) = self.slots.get_mut(slot) {
            request.pending += 1;
        }
        let counters = &self.disk.cache().counters;
        counters
            .ahead_hits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// A read-ahead read is done: its data goes to the cache (checked against writes that
    /// started since, like any fill) and to the guest reads waiting for it; a failure only
    /// means no read-ahead (those reads then go to a copy themselves).
    pub(super) fn ahead_done(
        &mut self,
        index: usize,
        result: Result<usize, crate::engine::OpError>,
    ) {
        let Some(mut ahead) = self.ahead.remove(index) else {
            return;
        };
        self.ahead_bytes -= ahead.buf.len() as u64;
        let waiters = std::mem::take(&mut ahead.waiters);
        if let Err(e) = result {
            log::debug!(
                "image {}: read-ahead of block {}: {e}",
                self.disk.name(),
                ahead.block
            );
            for waiter in waiters {
                self.read_waiter_elsewhere(waiter);
            }
            return;
        }
        for waiter in waiters {
            let at = (waiter.offset - ahead.offset) as usize;
            let len = waiter.bufs.len();
            if let Some(bytes) = ahead.buf.get(at..at + len) {
                waiter.bufs.copy_in(0, bytes);
            }
            self.part_done(tag(waiter.slot, 0), Ok(len));
        }
        if ahead.keep {
            self.keep_ahead(&mut ahead);
        }
        if self.ahead_pool.len() < AHEAD_POOL {
            self.ahead_pool.push(ahead.buf);
        }
    }

    /// Stores a read-ahead's data in the cache, if no write to its block started since.
    fn keep_ahead(&self, ahead: &mut Ahead) {
        let iovecs = ahead.iovecs();
        let writes = self.disk.writes();
        let unchanged = || writes.idle(ahead.block) == Some(ahead.fill.writes);
        self.disk.cache().fill(
            ahead.fill.epoch,
            ahead.block,
            ahead.offset,
            &iovecs,
            true,
            &unchanged,
        );
    }

    /// A waiting guest read whose read-ahead failed: read from the next in-sync copy like
    /// any remote piece (its count in the request carries over).
    fn read_waiter_elsewhere(&mut self, waiter: Waiter) {
        let location = {
            let meta = self.disk.meta();
            meta.table
                .locations(waiter.block)
                .and_then(|locations| next_remote(locations, &[], &*self.peers))
        };
        let Some(location) = location else {
            let error = crate::engine::OpError::Io(std::io::Error::other("no in-sync copy left"));
            return self.part_done(tag(waiter.slot, 0), Err(error));
        };
        let Some(request) = self.slots.get_mut(waiter.slot) else {
            return;
        };
        request.reads.push(RemoteRead {
            block: waiter.block,
            offset: waiter.offset,
            bufs: IoVecs(waiter.bufs.0.clone()),
            tried: smallvec::smallvec![location.node.clone()],
            fill: None,
        });
        // The waiter's count carries over to the read.
        request.pending -= 1;
        let part = request.reads.len();
        let target = self.peer_target(&location, waiter.block);
        let (offset, bufs) = (waiter.offset, waiter.bufs);
        self.push(
            tag(waiter.slot, part),
            location.tier,
            OpKind::Read,
            target,
            offset,
            bufs,
        );
    }

    /// A read piece's cache copy when it holds every page the piece needs; otherwise what
    /// the remote read must remember to fill the cache (None when caching is off, or a write
    /// to the block is in flight: its data might be either side of the write).
    fn cached(&self, epoch: u64, piece: &Piece) -> Result<CacheHit, Option<Fill>> {
        let cache = self.disk.cache();
        if cache.tier().is_none() {
            return Err(None);
        }
        // The write count first: a write that starts after this drops what the lookup saw
        // only once issued, and a fill after it is refused.
        let writes = self.disk.writes().idle(piece.block);
        if let Some(hit) = cache.lookup(epoch, piece.block, piece.offset, piece.len) {
            return Ok(hit);
        }
        Err(writes.map(|writes| Fill { epoch, writes }))
    }

    pub(super) fn peer_target(&self, location: &Location, block: u64) -> Target {
        Target::Peer(PeerTarget {
            node: location.node.clone(),
            image: self.disk.image_ref().with_stamp(self.stamp),
            tier: location.tier,
            block,
        })
    }

    /// Records one more copy of the request's current block; returns its part number.
    fn add_copy(&mut self, slot: usize, location: &Location, stored: bool) -> Option<usize> {
        let request = self.slots.get_mut(slot)?;
        request.copies.push(CopyResult {
            location: location.clone(),
            stored,
        });
        Some(request.copies.len())
    }

    /// Writes one block's part to every copy of the block, in sync or not (an out-of-sync
    /// copy that takes writes converges under resync). The request's outcome comes from the
    /// acknowledgement rule once every copy has answered.
    fn write_piece(&mut self, slot: usize, piece: Piece, locations: Vec<Location>) {
        let Some(request) = self.slots.get_mut(slot) else {
            return;
        };
        request.written.push((piece.block, request.copies.len()));
        // Its write count started (`begin_writes`): no fill racing it is kept from here on.
        self.disk.cache().invalidate(piece.block);
        for location in locations {
            let Some(copy) = self.add_copy(slot, &location, false) else {
                return;
            };
            let bufs = IoVecs(piece.bufs.0.clone());
            if &location.node != self.disk.me() {
                // A copy on a failed peer misses the write; the acknowledgement rule marks
                // it out of sync.
                if !self.peers.is_failed(&location.node) {
                    let target = self.peer_target(&location, piece.block);
                    let tag = tag(slot, copy);
                    self.push(
                        tag,
                        location.tier,
                        OpKind::Write,
                        target,
                        piece.offset,
                        bufs,
                    );
                }
                continue;
            }
            match self
                .disk
                .blocks()
                .file_for_write(location.tier, piece.block)
            {
                Ok(file) => {
                    if location.tier == Tier::Volume {
                        if let Some(request) = self.slots.get_mut(slot) {
                            request
                                .volume_writes
                                .push((copy, piece.block, file.clone()));
                        }
                    }
                    // Buffered writes go inline even on the volume tier: io_uring hands
                    // buffered ext4 writes to its worker threads, and the benchmark measured
                    // 4K random writes 1.3-2.7x faster with plain pwritev (benches/README.md).
                    let tag = tag(slot, copy);
                    let target = Target::File(file);
                    self.push(tag, Tier::Ram, OpKind::Write, target, piece.offset, bufs);
                }
                Err(error) => {
                    // The copy misses the write; the acknowledgement rule decides.
                    if let Some(n) = self.logs.allow() {
                        log::error!("image {}: {error} ({n} errors)", self.disk.name());
                    }
                }
            }
        }
    }

    /// Syncs every volume-tier block file written since its last sync, and asks every other
    /// node holding copies to do the same. RAM-tier data lives in tmpfs, which a daemon crash
    /// does not lose and nothing can make more durable.
    fn flush(&mut self, slot: usize) {
        let plan = match self.disk.blocks().flush_plan() {
            Ok(plan) => plan,
            Err(e) => return self.fail(slot, e.into()),
        };
        let me = self.disk.me().clone();
        let (tier, nodes) = {
            let meta = self.disk.meta();
            (meta.tier, meta.table.nodes())
        };
        for node in nodes.into_iter().filter(|n| *n != me) {
            // Each peer's answer is recorded like a copy's: see `settle`.
            let location = Location {
                node,
                tier,
                synced: true,
            };
            let Some(copy) = self.add_copy(slot, &location, false) else {
                return;
            };
            let target = self.peer_target(&location, 0);
            let empty = IoVecs(SmallVec::new());
            self.push(tag(slot, copy), tier, OpKind::Sync, target, 0, empty);
        }
        for file in plan.files {
            let empty = IoVecs(SmallVec::new());
            let target = Target::File(file);
            self.push(tag(slot, 0), Tier::Volume, OpKind::Sync, target, 0, empty);
        }
        if let Some(request) = self.slots.get_mut(slot) {
            request.flush = Some(plan.ticket);
        }
    }

    /// Discard and write-zeroes: whole blocks lose their file, partial ones get a hole. Both
    /// read back as zeros, which is what write-zeroes promises. Frees a span on every copy of
    /// its block; like a write, it counts as one for resync, and its copies are settled by the
    /// acknowledgement rule: this node's at once, a peer's by a call that completes later, so
    /// a slow or dead peer holds up this request only, not the queue.
    fn free_span(&mut self, slot: usize, span: BlockSpan, locations: Vec<Location>) {
        if let Some(request) = self.slots.get_mut(slot) {
            request.written.push((span.block, request.copies.len()));
        }
        self.disk.cache().invalidate(span.block);
        for location in locations {
            let local = &location.node == self.disk.me();
            let stored = local && self.free_here(&location, span);
            let Some(copy) = self.add_copy(slot, &location, stored) else {
                return;
            };
            // A copy on a failed peer misses the discard; the acknowledgement rule marks it
            // out of sync.
            if !local && !self.peers.is_failed(&location.node) {
                let target = self.peer_target(&location, span.block);
                let kind = OpKind::Free {
                    len: span.len as u32,
                };
                let empty = IoVecs(SmallVec::new());
                self.push(
                    tag(slot, copy),
                    location.tier,
                    kind,
                    target,
                    span.offset,
                    empty,
                );
            }
        }
    }

    /// Frees a span of this node's copy (the store drops a whole block's file, punches a
    /// hole in a part and marks it for the next flush); true when it is done.
    fn free_here(&mut self, location: &Location, span: BlockSpan) -> bool {
        let freed = self
            .disk
            .blocks()
            .free(location.tier, span.block, span.offset, span.len);
        if let Err(e) = &freed {
            if let Some(n) = self.logs.allow() {
                log::error!("image {}: cannot free: {e} ({n} errors)", self.disk.name());
            }
        }
        freed.is_ok()
    }

    fn engine(&mut self, tier: Tier) -> &mut dyn Engine {
        if tier == Tier::Volume && self.use_uring && self.uring.is_none() {
            match UringEngine::new(std::os::unix::io::AsRawFd::as_raw_fd(&self.notify)) {
                Ok(uring) => self.uring = Some(uring),
                Err(e) => {
                    log::error!("io_uring setup failed ({e}); this queue uses synchronous I/O");
                    self.use_uring = false;
                }
            }
        }
        match (tier, self.uring.as_mut()) {
            (Tier::Volume, Some(uring)) => uring,
            _ => &mut self.inline,
        }
    }

    /// Hands one operation to the engine for its target: a peer's copy to the remote
    /// engine, a volume-tier file to io_uring, a RAM-tier file (a memory copy) inline.
    pub(super) fn push(
        &mut self,
        tag: u64,
        tier: Tier,
        kind: OpKind,
        target: Target,
        offset: u64,
        iovecs: IoVecs,
    ) {
        if let Some(request) = self.slots.get_mut(untag(tag).0) {
            request.pending += 1;
        }
        let remote = matches!(target, Target::Peer(_));
        let op = Op {
            kind,
            target,
            offset,
            iovecs,
            tag,
        };
        if remote {
            self.remote.push(op);
        } else {
            self.engine(tier).push(op);
        }
    }

    /// Hands queued io_uring operations to the kernel, in one system call, and sends queued
    /// peer calls, in one system call per peer connection.
    pub fn submit_queued(&mut self) {
        if let Some(uring) = self.uring.as_mut() {
            if let Err(e) = uring.submit() {
                log::error!("image {}: io_uring submit: {e}", self.disk.name());
            }
        }
        let _ = self.remote.submit();
    }

    /// Collects finished operations from every engine.
    pub(super) fn reap(&mut self) -> Vec<Done> {
        let mut done = std::mem::take(&mut self.done);
        self.inline.reap(&mut done);
        if let Some(uring) = self.uring.as_mut() {
            uring.reap(&mut done);
        }
        self.remote.reap(&mut done);
        done
    }

    /// Blocks until some operation may have finished (used when draining).
    pub fn wait(&mut self) {
        if let Some(uring) = self.uring.as_mut().filter(|u| u.in_flight() > 0) {
            if let Err(e) = uring.wait() {
                log::error!("image {}: waiting for io_uring: {e}", self.disk.name());
                // Do not spin on a broken ring.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        } else if self.remote.in_flight() > 0 || !self.deferred.is_empty() {
            let _ = self.remote.wait();
        }
    }
}

impl Drop for Queue {
    /// The kernel and peer answers may still write into the caller's buffers: wait for them
    /// before the caller releases the memory they point into. The queue's counts stay in the
    /// image's.
    fn drop(&mut self) {
        self.disk.metrics().retire(&self.counters);
        while self.remote.in_flight() > 0 {
            let _ = self.remote.wait();
        }
        if let Some(uring) = self.uring.as_mut() {
            while uring.in_flight() > 0 && uring.wait().is_ok() {
                let mut done = Vec::new();
                uring.reap(&mut done);
            }
        }
    }
}

/// Where a read piece is served from.
enum Source {
    Local(Tier),
    /// This node's cache copy (of a block whose copies are all on other nodes).
    Cached(CacheHit),
    Remote(Location, Option<Fill>),
}

/// The next in-sync copy on another node, not yet tried, whose node is not on the failure
/// list.
pub(super) fn next_remote(
    locations: &[Location],
    tried: &[NodeId],
    peers: &dyn Transport,
) -> Option<Location> {
    locations
        .iter()
        .find(|l| l.synced && !tried.contains(&l.node) && !peers.is_failed(&l.node))
        .cloned()
}
