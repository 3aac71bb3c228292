//! Issuing a request: cut it into block pieces, choose each piece's copy, and hand the
//! pieces to the engines (inline, io_uring, peers). Writes start their blocks' write counters
//! under the metadata lock, so a resync never commits over them.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use smallvec::SmallVec;
use std::time::Instant;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use vm_memory::Bytes;

use super::{tag, untag, InFlight, Mem, Vring, Worker};
use crate::engine::remote::RemoteOp;
use crate::engine::{Engine, IoVecs, Op, OpKind, UringEngine};
use crate::image::{Location, Tier};
use crate::replica::ack::CopyResult;
use crate::route::{self, Piece};
use crate::virtio::request::{Kind, Request, Segment, Segments};

/// A request cut to blocks, before it is issued.
enum Work {
    Read(SmallVec<[Piece; 2]>),
    Write(SmallVec<[Piece; 2]>),
    /// Discard and write-zeroes: spans, and whether each covers its whole block.
    Free(Vec<(route::BlockSpan, bool)>),
    Flush,
    GetId,
}

impl Work {
    fn of(request: &Request, block_size: u64, size: u64) -> Work {
        match &request.kind {
            Kind::Read { offset } => Work::Read(route::split(*offset, &request.data, block_size)),
            Kind::Write { offset } => Work::Write(route::split(*offset, &request.data, block_size)),
            Kind::Discard(ranges) | Kind::WriteZeroes { ranges, .. } => Work::Free(
                ranges
                    .iter()
                    .flat_map(|r| route::spans(r.offset, r.len, block_size))
                    .map(|span| {
                        let block_len = block_size.min(size - span.block * block_size);
                        (span, span.offset == 0 && span.len == block_len)
                    })
                    .collect(),
            ),
            Kind::Flush => Work::Flush,
            Kind::GetId => Work::GetId,
        }
    }

    /// The blocks it changes (one per piece or span), for writes and discards.
    fn blocks(&self) -> Option<SmallVec<[u64; 4]>> {
        match self {
            Work::Write(pieces) => Some(pieces.iter().map(|p| p.block).collect()),
            Work::Free(spans) => Some(spans.iter().map(|(s, _)| s.block).collect()),
            _ => None,
        }
    }
}

enum Begin {
    Go(Vec<Vec<Location>>),
    Frozen,
    Refused(String),
}

/// Where a read is served from.
enum Source {
    Local(Tier),
    Remote(Location),
}

impl Worker {
    pub(super) fn execute(&mut self, vring: &Vring, head: u16, request: Request, mem: &Arc<Mem>) {
        let (block_size, size) = {
            let meta = self.disk.meta();
            (meta.block_size, meta.size)
        };
        let work = Work::of(&request, block_size, size);
        // Local writes land under the epoch gate: none checked under this node's epoch can
        // land after a newer owner's first request here (held only while issuing).
        let disk = self.disk.clone();
        let changes = matches!(work, Work::Write(_) | Work::Free(_));
        let gate =
            (changes && disk.store().is_shared()).then(|| disk.enter_epoch(disk.meta().generation));
        let targets = match work.blocks() {
            _ if !self.disk.may_serve() => Err("this node does not serve the image now".into()),
            _ if matches!(gate, Some(Err(_))) => Err("the image moved on to a newer epoch".into()),
            None => Ok(Vec::new()),
            Some(blocks) => match self.begin_writes(&blocks) {
                Begin::Frozen => {
                    // A resync is copying one of its blocks: try again shortly, without
                    // holding up this queue's other requests or completions.
                    self.deferred.push((head, request));
                    return;
                }
                Begin::Refused(e) => Err(e),
                Begin::Go(targets) => Ok(targets),
            },
        };
        let used_len = match request.kind {
            Kind::Read { .. } => request.data_len as u32 + 1,
            Kind::GetId => (request.data_len as u32).min(VIRTIO_BLK_ID_BYTES) + 1,
            _ => 1,
        };
        let slot = self.admit(InFlight {
            head,
            status: request.status,
            status_byte: VIRTIO_BLK_S_OK as u8,
            used_len,
            pending: 1,
            mem: mem.clone(),
            flush: None,
            started: Instant::now(),
            fills: match request.kind {
                Kind::Read { .. } | Kind::GetId => request.data.clone(),
                _ => Segments::new(),
            },
            copies: Vec::new(),
            volume_writes: SmallVec::new(),
            written: Vec::new(),
        });
        self.count(&request);
        self.stamp = if changes { disk.next_stamp() } else { 0 };
        match (work, targets) {
            (_, Err(e)) => self.fail(slot, &e),
            (Work::Read(pieces), _) => {
                for piece in pieces {
                    self.read_piece(slot, piece, mem);
                }
            }
            (Work::Write(pieces), Ok(targets)) => {
                for (piece, locations) in pieces.into_iter().zip(targets) {
                    self.write_piece(slot, piece, locations, mem);
                }
            }
            (Work::Free(spans), Ok(targets)) => {
                for ((span, whole), locations) in spans.into_iter().zip(targets) {
                    self.free_span(slot, span, whole, locations);
                }
            }
            (Work::Flush, _) => self.flush(slot),
            (Work::GetId, _) => self.get_id(slot, &request.data, mem),
        }
        drop(gate);
        if let Some(request) = self.piece_done(tag(slot, 0), true) {
            self.finish(vring, request);
        }
    }

    /// Counts the writes to `blocks` as started and returns each block's copies — all under
    /// one hold of the metadata lock, so a resync sees every write that chose its copies, and
    /// a block a resync froze is never written until it thaws.
    fn begin_writes(&self, blocks: &[u64]) -> Begin {
        let meta = self.disk.meta();
        if &meta.owner != self.disk.me() {
            // Fenced: the image moved to another node; this guest must not write.
            return Begin::Refused(format!(
                "write refused: the image is owned by {} now",
                meta.owner
            ));
        }
        if blocks.iter().any(|&b| self.disk.frozen().is_frozen(b)) {
            return Begin::Frozen;
        }
        let mut targets = Vec::with_capacity(blocks.len());
        for &block in blocks {
            match meta.table.locations(block) {
                Some(locations) => targets.push(locations.to_vec()),
                None => return Begin::Refused(format!("block {block} is past the end")),
            }
        }
        for &block in blocks {
            self.disk.writes().start(block);
        }
        Begin::Go(targets)
    }

    /// Runs the requests that waited for a frozen block; returns how many are still waiting.
    pub(super) fn retry_deferred(&mut self, vring: &Vring, mem: &Arc<Mem>) -> usize {
        for (head, request) in std::mem::take(&mut self.deferred) {
            self.execute(vring, head, request, mem);
        }
        self.deferred.len()
    }

    fn count(&self, request: &Request) {
        let m = self.disk.metrics();
        m.in_flight.fetch_add(1, Relaxed);
        let (ops, bytes) = match request.kind {
            Kind::Read { .. } => (&m.reads, Some(&m.read_bytes)),
            Kind::Write { .. } => (&m.writes, Some(&m.write_bytes)),
            Kind::Flush => (&m.flushes, None),
            Kind::Discard(_) | Kind::WriteZeroes { .. } => (&m.discards, None),
            Kind::GetId => return,
        };
        ops.fetch_add(1, Relaxed);
        if let Some(bytes) = bytes {
            bytes.fetch_add(request.data_len, Relaxed);
        }
    }

    fn admit(&mut self, request: InFlight) -> usize {
        match self.free.pop() {
            Some(slot) => {
                self.requests[slot] = Some(request);
                slot
            }
            None => {
                self.requests.push(Some(request));
                self.requests.len() - 1
            }
        }
    }

    /// The copy a read of `block` goes to: an in-sync one here, else one on a peer that is
    /// not on the failure list.
    fn read_source(&self, block: u64) -> Result<Source, String> {
        let meta = self.disk.meta();
        let locations = meta
            .table
            .locations(block)
            .ok_or_else(|| format!("block {block} is past the end"))?;
        if let Some(tier) = route::local_copy(locations, self.disk.me()) {
            return Ok(Source::Local(tier));
        }
        locations
            .iter()
            .find(|l| l.synced && !self.peers.failures().is_failed(&l.node))
            .map(|l| Source::Remote(l.clone()))
            .ok_or_else(|| format!("block {block} has no reachable in-sync copy"))
    }

    fn issue_remote(
        &mut self,
        slot: usize,
        copy: usize,
        kind: OpKind,
        location: &Location,
        piece: &Piece,
        iovecs: IoVecs,
    ) {
        if let Some(request) = self.requests[slot].as_mut() {
            request.pending += 1;
        }
        self.remote.start(RemoteOp {
            kind,
            node: location.node.clone(),
            image: self.disk.image_ref().with_stamp(self.stamp),
            tier: location.tier,
            block: piece.block,
            offset: piece.offset,
            iovecs,
            tag: tag(slot, copy),
        });
    }

    fn fail(&mut self, slot: usize, what: &str) {
        log::error!("image {}: {what}", self.disk.name());
        if let Some(request) = self.requests[slot].as_mut() {
            request.status_byte = VIRTIO_BLK_S_IOERR as u8;
        }
    }

    /// Reads one block's part from an in-sync copy on this node. A block that was never
    /// written fills zeros without any I/O.
    fn read_piece(&mut self, slot: usize, piece: Piece, mem: &Mem) {
        let Some(iovecs) = host_buffers(mem, &piece.segments) else {
            return self.fail(slot, "guest buffer moved out of memory");
        };
        let tier = match self.read_source(piece.block) {
            Ok(Source::Local(tier)) => tier,
            Ok(Source::Remote(location)) => {
                return self.issue_remote(slot, 0, OpKind::Read, &location, &piece, iovecs);
            }
            Err(e) => return self.fail(slot, &e),
        };
        match self.disk.files(tier).for_read(piece.block) {
            Ok(None) => iovecs.zero_from(0),
            Ok(Some(file)) => {
                self.issue(tag(slot, 0), tier, OpKind::Read, file, piece.offset, iovecs)
            }
            Err(e) => self.fail(slot, &format!("cannot open block {}: {e}", piece.block)),
        }
    }

    /// Writes one block's part to every copy of the block, in sync or not (an out-of-sync
    /// copy that takes writes converges under resync). The request's status comes from the
    /// acknowledgement rule once every copy has answered.
    fn write_piece(&mut self, slot: usize, piece: Piece, locations: Vec<Location>, mem: &Mem) {
        let Some(request) = self.requests[slot].as_mut() else {
            return;
        };
        request.written.push((piece.block, request.copies.len()));
        let Some(iovecs) = host_buffers(mem, &piece.segments) else {
            return self.fail(slot, "guest buffer moved out of memory");
        };
        for location in locations {
            let copy = {
                let request = self.requests[slot].as_mut().expect("admitted above");
                request.copies.push(CopyResult {
                    location: location.clone(),
                    stored: false,
                });
                request.copies.len()
            };
            if &location.node != self.disk.me() {
                // A copy on a failed peer misses the write; the acknowledgement rule marks
                // it out of sync.
                if !self.peers.failures().is_failed(&location.node) {
                    let iov = IoVecs(iovecs.0.clone());
                    self.issue_remote(slot, copy, OpKind::Write, &location, &piece, iov);
                }
                continue;
            }
            match self.disk.files(location.tier).for_write(piece.block) {
                Ok(file) => {
                    if location.tier == Tier::Volume {
                        if let Some(request) = self.requests[slot].as_mut() {
                            request
                                .volume_writes
                                .push((copy, piece.block, file.clone()));
                        }
                    }
                    let iov = IoVecs(iovecs.0.clone());
                    self.issue(
                        tag(slot, copy),
                        location.tier,
                        OpKind::Write,
                        file,
                        piece.offset,
                        iov,
                    );
                }
                Err(e) => log::error!(
                    "image {}: cannot open block {} on {}: {e}",
                    self.disk.name(),
                    piece.block,
                    location.tier
                ),
            }
        }
    }

    /// Syncs every volume-tier block file written since its last sync. RAM-tier data lives
    /// in tmpfs, which a daemon crash does not lose and nothing can make more durable.
    fn flush(&mut self, slot: usize) {
        if let Err(e) = self.disk.files(Tier::Volume).sync_dir_if_dirty() {
            return self.fail(slot, &format!("cannot sync block directory: {e}"));
        }
        let me = self.disk.me().clone();
        let tier = self.disk.meta().tier;
        for node in self.disk.meta().table.nodes() {
            if node != me {
                // Each peer's answer is recorded like a copy's: see `finish`.
                let copy = {
                    let Some(request) = self.requests[slot].as_mut() else {
                        return;
                    };
                    request.pending += 1;
                    request.copies.push(CopyResult {
                        location: Location {
                            node: node.clone(),
                            tier,
                            synced: true,
                        },
                        stored: false,
                    });
                    request.copies.len()
                };
                let flush = crate::peer::Request::Flush {
                    image: self.disk.image_ref(),
                };
                self.remote.call(&node, flush, tag(slot, copy));
            }
        }
        let (files, ticket) = self.disk.dirty().snapshot();
        for file in files {
            self.issue(
                tag(slot, 0),
                Tier::Volume,
                OpKind::Sync,
                file,
                0,
                IoVecs(smallvec::SmallVec::new()),
            );
        }
        if let Some(request) = self.requests[slot].as_mut() {
            request.flush = Some(ticket);
        }
    }

    fn get_id(&mut self, slot: usize, data: &[Segment], mem: &Mem) {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = self.disk.name().as_str().as_bytes();
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name[..n]);
        let mut at = 0;
        for segment in data {
            let take = (segment.len as usize).min(id.len() - at);
            if mem.write_slice(&id[at..at + take], segment.addr).is_err() {
                return self.fail(slot, "cannot write GET_ID reply");
            }
            at += take;
        }
    }

    /// Discard and write-zeroes: whole blocks lose their file, partial ones get a hole. Both
    /// read back as zeros, which is what write-zeroes promises. Frees a span on every copy of
    /// its block; like a write, it counts as one for resync, and its copies are settled by the
    /// acknowledgement rule (see `finish`): this node's at once, a peer's by a call that
    /// completes later, so a slow or dead peer holds up this request only, not the queue.
    fn free_span(
        &mut self,
        slot: usize,
        span: route::BlockSpan,
        whole: bool,
        locations: Vec<Location>,
    ) {
        if let Some(request) = self.requests[slot].as_mut() {
            request.written.push((span.block, request.copies.len()));
        }
        for location in locations {
            let local = &location.node == self.disk.me();
            let stored = local && self.free_here(&location, span, whole);
            // A copy on a failed peer misses the discard; the acknowledgement rule marks it
            // out of sync.
            let ask = !local && !self.peers.failures().is_failed(&location.node);
            let Some(request) = self.requests[slot].as_mut() else {
                return;
            };
            request.copies.push(CopyResult {
                location: location.clone(),
                stored,
            });
            if ask {
                request.pending += 1;
                let discard = crate::peer::Request::Discard {
                    image: self.disk.image_ref().with_stamp(self.stamp),
                    tier: location.tier,
                    block: span.block,
                    offset: span.offset as u32,
                    len: span.len as u32,
                };
                let copy = request.copies.len();
                self.remote.call(&location.node, discard, tag(slot, copy));
            }
        }
    }

    /// Frees a span of this node's copy; true when it is done.
    fn free_here(&self, location: &Location, span: route::BlockSpan, whole: bool) -> bool {
        let files = self.disk.files(location.tier);
        let freed = if whole {
            files.drop_block(span.block)
        } else {
            files.punch(span.block, span.offset, span.len)
        };
        if freed.is_ok() && !whole && location.tier == Tier::Volume {
            // The hole must survive a power cut like data would: the next flush syncs it.
            if let Ok(Some(file)) = files.for_read(span.block) {
                self.disk.dirty().mark(span.block, &file);
            }
        }
        if let Err(e) = &freed {
            log::error!(
                "image {}: cannot free block {} on {}: {e}",
                self.disk.name(),
                span.block,
                location.tier
            );
        }
        freed.is_ok()
    }

    fn engine(&mut self, tier: Tier) -> &mut dyn Engine {
        if tier == Tier::Volume && self.use_uring && self.uring.is_none() {
            match UringEngine::new(std::os::unix::io::AsRawFd::as_raw_fd(&self.eventfd)) {
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

    fn issue(
        &mut self,
        tag: u64,
        tier: Tier,
        kind: OpKind,
        file: Arc<std::fs::File>,
        offset: u64,
        iovecs: IoVecs,
    ) {
        if let Some(request) = self.requests[untag(tag).0].as_mut() {
            request.pending += 1;
        }
        let op = Op {
            kind,
            file,
            offset,
            iovecs,
            tag,
        };
        // Buffered writes go inline even on the volume tier: io_uring hands buffered ext4
        // writes to its worker threads, and the benchmark measured 4K random writes 1.3-2.7x
        // faster with plain pwritev (benches/README.md). Reads and syncs keep io_uring.
        let tier = if op.kind == OpKind::Write {
            Tier::Ram
        } else {
            tier
        };
        self.engine(tier).push(op);
    }

    pub(super) fn submit(&mut self) {
        if let Some(uring) = self.uring.as_mut() {
            if let Err(e) = uring.submit() {
                log::error!("image {}: io_uring submit: {e}", self.disk.name());
            }
        }
    }
}

/// Host addresses of guest buffers. The parser checked that they lie in guest memory; a
/// memory table update between parsing and now could still make that untrue, hence Option.
fn host_buffers(mem: &Mem, segments: &[Segment]) -> Option<IoVecs> {
    crate::virtio::memory::host_buffers(mem, segments)
}
