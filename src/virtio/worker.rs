//! One queue's request loop: pop chains, parse them, cut them into block pieces, hand the
//! pieces to the tier's engine, and complete each request once, when its last piece is done.
//!
//! A request's life: popped and parsed (a rejected one is answered at once), then in flight
//! in a slot until every piece has completed, then its status byte is written and its head
//! goes on the used ring. Errors from the guest or from storage become status bytes; nothing
//! here returns an error that would end the queue's thread.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use smallvec::SmallVec;
use std::time::{Duration, Instant};

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;

use crate::cluster::Peers;
use crate::disk::{Disk, FlushTicket};
use crate::engine::remote::{RemoteEngine, RemoteOp};
use crate::engine::{Done, Engine, InlineEngine, IoVecs, Op, OpKind, UringEngine};
use crate::image::{Location, Tier};
use crate::replica::ack::{self, CopyResult, Outcome};
use crate::route::{self, Piece};
use crate::virtio::chain;
use crate::virtio::inflight::QueueInflight;
use crate::virtio::request::{self, Kind, Limits, Request, Segment, Segments};

/// Guest memory with a dirty-page bitmap that QEMU's log (VHOST_USER_SET_LOG_BASE) plugs
/// into during live migration; until then marking is a no-op.
pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;
pub type AtomicMem = GuestMemoryAtomic<Mem>;
pub type Vring = VringRwLock<AtomicMem>;

/// Requests in flight per queue before the worker stops taking new ones from the ring and
/// waits for completions: the io_uring's size, so completions never pile up in the kernel.
const MAX_IN_FLIGHT_OPS: usize = crate::engine::RING_ENTRIES as usize;

/// Longest a queue polls for new requests before sleeping until the next kick. Waking a
/// sleeping thread costs tens of microseconds on these machines (more than a RAM-tier read),
/// so a guest issuing requests back to back is served faster by a short spin; the window
/// adapts (see `Worker::adapt_poll`) and shrinks to nothing for an idle or slow guest, so
/// polling costs CPU only while it pays.
const MAX_POLL: Duration = Duration::from_micros(50);
const POLL_STEP: Duration = Duration::from_micros(2);

/// How often requests waiting for a frozen block are retried.
const DEFERRED_RETRY: Duration = Duration::from_micros(200);

/// Guest mistakes logged at warn level per queue before they are only counted, so a
/// misbehaving guest cannot flood the daemon's log.
const GUEST_ERRORS_LOGGED: u64 = 8;

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

struct InFlight {
    head: u16,
    status: GuestAddress,
    status_byte: u8,
    /// Bytes written into device-writable buffers on success (data plus the status byte).
    used_len: u32,
    /// Pieces not yet completed, plus one while the request is still being issued.
    pending: usize,
    /// Keeps the guest memory mapped while the kernel may still write into it.
    mem: Arc<Mem>,
    flush: Option<FlushTicket>,
    /// For a write: every copy of every block it touches, with whether the copy stored it.
    /// The acknowledgement rule (`replica::ack`) decides the status from these.
    copies: Vec<CopyResult>,
    started: Instant,
    /// Guest buffers this request fills (reads, GET_ID): marked dirty for live migration once
    /// the data is in them, not before, or a page sent meanwhile would miss it.
    fills: Segments,
    /// Volume-tier files this request writes, with the copy each belongs to: marked dirty for
    /// the next flush once the write completed (marking at issue would let a flush that
    /// raced the write clear the mark before the data landed).
    volume_writes: SmallVec<[(usize, u64, Arc<std::fs::File>); 2]>,
    /// For a write: each block it touches (its write counter started, see
    /// `disk::WriteCounters`) and the index in `copies` where that block's copies begin.
    written: Vec<(u64, usize)>,
}

/// An operation's tag: the request's slot, and which of its copies (0 for none) it writes.
fn tag(slot: usize, copy: usize) -> u64 {
    (slot as u64) << 32 | copy as u64
}

fn untag(tag: u64) -> (usize, usize) {
    ((tag >> 32) as usize, (tag & 0xffff_ffff) as usize)
}

pub struct Worker {
    disk: Arc<Disk>,
    limits: Limits,
    mem: AtomicMem,
    use_uring: bool,
    eventfd: EventFd,
    inline: InlineEngine,
    uring: Option<UringEngine>,
    remote: RemoteEngine,
    peers: Arc<Peers>,
    requests: Vec<Option<InFlight>>,
    free: Vec<usize>,
    done: Vec<Done>,
    vring: Option<Vring>,
    /// Set when the worker stopped popping because too much was in flight.
    throttled: bool,
    /// Requests waiting for a block a resync froze (see `disk::Frozen`).
    deferred: Vec<(u16, Request)>,
    /// Set when the guest kicked before the connection was admitted (see [`Worker::park`]).
    parked: bool,
    poll_window: Duration,
    /// When the queue last went to sleep, to judge how soon the next kick came.
    slept_at: Option<Instant>,
    needs_signal: bool,
    guest_errors: u64,
    /// This queue's part of QEMU's in-flight region, when QEMU shares one.
    inflight: Option<QueueInflight>,
}

impl Worker {
    pub fn new(
        disk: Arc<Disk>,
        limits: Limits,
        mem: AtomicMem,
        use_uring: bool,
        peers: Arc<Peers>,
    ) -> std::io::Result<Self> {
        let eventfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let remote = RemoteEngine::new(peers.clone(), eventfd.try_clone()?);
        Ok(Worker {
            disk,
            limits,
            mem,
            use_uring,
            eventfd,
            inline: InlineEngine::new(),
            uring: None,
            remote,
            peers,
            requests: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            vring: None,
            throttled: false,
            deferred: Vec::new(),
            parked: false,
            poll_window: Duration::ZERO,
            slept_at: None,
            needs_signal: false,
            guest_errors: 0,
            inflight: None,
        })
    }

    /// The eventfd io_uring signals completions on; the queue thread's epoll watches it.
    pub fn completion_fd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Where to record requests in flight (set before the queue starts).
    pub fn set_inflight(&mut self, inflight: Option<QueueInflight>) {
        self.inflight = inflight;
    }

    /// The guest kicked the queue.
    pub fn on_kick(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        if !self.disk.owned_here() {
            // A guest migrated here and started the device: the image moves to this node.
            if let Err(e) = crate::ownership::take_over(&self.disk, &self.peers) {
                log::error!("image {}: take-over failed: {e}", self.disk.name());
            }
        }
        self.adapt_poll();
        self.process(vring);
    }

    /// The guest kicked, but the connection is not admitted yet: remember it for
    /// [`Worker::resume`] and touch nothing.
    pub fn park(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        self.parked = true;
    }

    /// The connection was admitted: serve what the guest queued meanwhile.
    pub fn resume(&mut self) {
        if std::mem::take(&mut self.parked) {
            if let Some(vring) = self.vring.clone() {
                self.process(&vring);
            }
        }
    }

    /// io_uring signalled completions.
    pub fn on_completions(&mut self) {
        let _ = self.eventfd.read();
        let Some(vring) = self.vring.clone() else {
            return;
        };
        self.complete(&vring);
        if self.throttled {
            self.throttled = false;
            self.process(&vring);
        } else {
            self.signal(&vring);
        }
    }

    /// Waits for everything in flight and completes it (the vring is being stopped).
    pub fn drain(&mut self) {
        if let Some(vring) = self.vring.clone() {
            let mem = self.mem.memory().into_inner();
            while self.retry_deferred(&vring, &mem) > 0 {
                std::thread::sleep(DEFERRED_RETRY);
            }
        }
        while self.in_flight() > 0 {
            if let Some(uring) = self.uring.as_mut().filter(|u| u.in_flight() > 0) {
                if let Err(e) = uring.wait() {
                    log::error!("image {}: waiting for io_uring: {e}", self.disk.name());
                    break;
                }
            } else if self.remote.in_flight() > 0 {
                // Peer calls end by answer or by their timeout.
                std::thread::sleep(Duration::from_millis(1));
            }
            match self.vring.clone() {
                Some(vring) => self.complete(&vring),
                None => drop(self.reap()),
            }
        }
        if let Some(vring) = self.vring.clone() {
            self.signal(&vring);
        }
    }

    fn in_flight(&self) -> usize {
        self.requests.len() - self.free.len()
    }

    fn ops_in_flight(&self) -> usize {
        self.uring.as_ref().map_or(0, |u| u.in_flight()) + self.remote.in_flight()
    }

    /// Serves the queue until it is empty, then polls it a little longer (see
    /// [`MAX_POLL`]) before re-arming the kick and going back to sleep.
    fn process(&mut self, vring: &Vring) {
        let mem = self.mem.memory().into_inner();
        let _ = vring.disable_notification();
        self.replay(vring, &mem);
        let mut idle_since: Option<Instant> = None;
        loop {
            let waiting = self.retry_deferred(vring, &mem);
            let popped = self.pop_batch(vring, &mem);
            self.submit();
            self.complete(vring);
            self.signal(vring);
            if waiting > 0 {
                // Frozen blocks thaw after one block's copy: check back soon.
                std::thread::sleep(DEFERRED_RETRY);
                continue;
            }
            if self.ops_in_flight() >= MAX_IN_FLIGHT_OPS {
                // Resumed by completions; the kick stays off meanwhile.
                self.throttled = true;
                return;
            }
            if popped > 0 {
                idle_since = None;
                continue;
            }
            let idle = *idle_since.get_or_insert_with(Instant::now);
            if idle.elapsed() < self.poll_window {
                std::hint::spin_loop();
                continue;
            }
            match vring.enable_notification() {
                Ok(true) => {
                    let _ = vring.disable_notification();
                    idle_since = None;
                }
                _ => break,
            }
        }
        self.slept_at = Some(Instant::now());
    }

    /// Adapts the poll window to the guest: when a kick comes soon after the queue went to
    /// sleep, polling would have caught it (and saved the wake-up), so poll longer; when kicks
    /// come seldom, poll less, down to not at all for an idle guest.
    fn adapt_poll(&mut self) {
        let Some(slept_at) = self.slept_at.take() else {
            return;
        };
        let gap = slept_at.elapsed();
        self.poll_window = if gap <= MAX_POLL {
            (self.poll_window * 2).max(gap + POLL_STEP).min(MAX_POLL)
        } else {
            self.poll_window / 2
        };
    }

    /// Takes requests off the ring until it is empty or enough is in flight.
    fn pop_batch(&mut self, vring: &Vring, mem: &Arc<Mem>) -> usize {
        let mut popped = 0;
        while self.ops_in_flight() < MAX_IN_FLIGHT_OPS {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            popped += 1;
            let head = chain.head_index();
            if let Some(inflight) = self.inflight.as_mut() {
                inflight.begin(head);
            }
            self.take(vring, head, chain, mem);
        }
        popped
    }

    /// Parses a request and starts it, or answers it at once when the guest got it wrong.
    fn take(
        &mut self,
        vring: &Vring,
        head: u16,
        chain: impl IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
        mem: &Arc<Mem>,
    ) {
        match request::parse(&**mem, chain, &self.limits) {
            Ok(request) => self.execute(vring, head, request, mem),
            Err(rejected) => {
                self.guest_error(&rejected.error);
                let status = rejected.error.status();
                self.answer_now(vring, head, rejected.status, status, mem);
            }
        }
    }

    /// Once per connection, before the queue is served: restarts the requests a previous
    /// daemon (or connection) took off the ring but never completed, oldest first, and
    /// resumes the avail ring after them.
    fn replay(&mut self, vring: &Vring, mem: &Arc<Mem>) {
        let Some(inflight) = self.inflight.as_mut().filter(|i| i.needs_recovery()) else {
            return;
        };
        let (table, size, used) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            let used = queue.used_idx(&**mem, std::sync::atomic::Ordering::Acquire);
            (queue.desc_table(), queue.size(), used)
        };
        let Ok(used) = used else {
            log::warn!(
                "image {}: used ring unreadable, nothing replayed",
                self.disk.name()
            );
            return;
        };
        let heads = inflight.recover(used.0);
        vring
            .get_mut()
            .get_queue_mut()
            .set_next_avail(used.0.wrapping_add(heads.len() as u16));
        if !heads.is_empty() {
            log::info!(
                "image {}: replaying {} requests left in flight",
                self.disk.name(),
                heads.len()
            );
        }
        for head in heads {
            let chain = chain::descriptors(&**mem, GuestAddress(table), size, head);
            self.take(vring, head, chain, mem);
        }
    }

    fn guest_error(&mut self, error: &request::ParseError) {
        self.guest_errors += 1;
        self.disk.metrics().guest_errors.fetch_add(1, Relaxed);
        let n = self.guest_errors;
        if n <= GUEST_ERRORS_LOGGED || n.is_power_of_two() {
            log::warn!(
                "image {}: bad request from guest: {error} ({n} so far on this queue)",
                self.disk.name()
            );
        }
    }

    /// Completes a request that never went in flight.
    fn answer_now(
        &mut self,
        vring: &Vring,
        head: u16,
        status: Option<GuestAddress>,
        byte: u8,
        mem: &Mem,
    ) {
        let used = match status {
            Some(addr) if mem.write_obj(byte, addr).is_ok() => 1,
            _ => 0,
        };
        self.put_used(vring, head, used);
    }

    /// Puts a request on the used ring, with the in-flight region's bookkeeping around it.
    fn put_used(&mut self, vring: &Vring, head: u16, len: u32) {
        if let Some(inflight) = &self.inflight {
            inflight.before_used(head);
        }
        if let Err(e) = vring.add_used(head, len) {
            log::warn!("image {}: cannot complete request: {e}", self.disk.name());
        }
        if let Some(inflight) = &self.inflight {
            inflight.after_used(head, vring.get_ref().get_queue().next_used());
        }
        self.needs_signal = true;
    }

    fn execute(&mut self, vring: &Vring, head: u16, request: Request, mem: &Arc<Mem>) {
        let (block_size, size) = {
            let meta = self.disk.meta();
            (meta.block_size, meta.size)
        };
        let work = Work::of(&request, block_size, size);
        let targets = match work.blocks() {
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
                    if let Err(e) = self.free_span(span, whole, locations) {
                        self.fail(slot, &e);
                    }
                }
            }
            (Work::Flush, _) => self.flush(slot),
            (Work::GetId, _) => self.get_id(slot, &request.data, mem),
        }
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
    fn retry_deferred(&mut self, vring: &Vring, mem: &Arc<Mem>) -> usize {
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
            image: self.disk.name().clone(),
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
                self.remote.flush(&node, self.disk.name(), tag(slot, copy));
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
    /// read back as zeros, which is what write-zeroes promises.
    /// Frees one block's span on every copy; like a write, it counts as one for resync and
    /// follows the acknowledgement rule.
    fn free_span(
        &self,
        span: route::BlockSpan,
        whole: bool,
        locations: Vec<Location>,
    ) -> Result<(), String> {
        let results: Vec<CopyResult> = locations
            .into_iter()
            .map(|location| {
                let stored = self.free_copy(&location, span, whole);
                CopyResult { location, stored }
            })
            .collect();
        let outcome = match ack::decide(&results) {
            Outcome::Fail { stale } => {
                self.disk
                    .mark_out_of_sync(span.block, &stale)
                    .and(Err(format!(
                        "block {}: no in-sync copy was freed",
                        span.block
                    )))
            }
            Outcome::Ack { stale } if !stale.is_empty() => {
                self.disk.mark_out_of_sync(span.block, &stale)
            }
            Outcome::Ack { .. } => Ok(()),
        };
        self.disk.writes().finish(span.block);
        outcome
    }

    /// Frees a span on one copy; true when it is done. A peer's copy is asked and waited for
    /// (discards are rare, and a failed peer is on the failure list after one timeout).
    fn free_copy(&self, location: &Location, span: route::BlockSpan, whole: bool) -> bool {
        let freed = if &location.node == self.disk.me() {
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
            freed.map_err(|e| e.to_string())
        } else if self.peers.failures().is_failed(&location.node) {
            Err("on the failure list".to_string())
        } else {
            let discard = crate::peer::Request::Discard {
                image: self.disk.name().clone(),
                tier: location.tier,
                block: span.block,
                offset: span.offset as u32,
                len: span.len as u32,
            };
            self.peers.call_ok(&location.node, discard)
        };
        freed
            .map_err(|e| {
                log::error!(
                    "image {}: cannot free block {} on {}:{}: {e}",
                    self.disk.name(),
                    span.block,
                    location.node,
                    location.tier
                )
            })
            .is_ok()
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

    fn submit(&mut self) {
        if let Some(uring) = self.uring.as_mut() {
            if let Err(e) = uring.submit() {
                log::error!("image {}: io_uring submit: {e}", self.disk.name());
            }
        }
    }

    fn reap(&mut self) -> Vec<Done> {
        let mut done = std::mem::take(&mut self.done);
        self.inline.reap(&mut done);
        if let Some(uring) = self.uring.as_mut() {
            uring.reap(&mut done);
        }
        self.remote.reap(&mut done);
        done
    }

    /// Applies finished operations; requests whose last piece finished go on the used ring.
    fn complete(&mut self, vring: &Vring) {
        let mut done = self.reap();
        for d in done.drain(..) {
            let ok = match d.result {
                Ok(_) => true,
                Err(e) => {
                    log::error!("image {}: block I/O failed: {e}", self.disk.name());
                    false
                }
            };
            if let Some(request) = self.piece_done(d.tag, ok) {
                self.finish(vring, request);
            }
        }
        self.done = done;
    }

    /// Counts one operation of a request as done; returns the request when it was the last.
    /// A write to a copy only records whether the copy stored it: the acknowledgement rule
    /// judges the copies together when the request finishes.
    fn piece_done(&mut self, tag: u64, ok: bool) -> Option<InFlight> {
        let (slot, copy) = untag(tag);
        let request = self.requests.get_mut(slot)?.as_mut()?;
        match request.copies.get_mut(copy.wrapping_sub(1)) {
            Some(result) => result.stored = ok,
            None if !ok => request.status_byte = VIRTIO_BLK_S_IOERR as u8,
            None => {}
        }
        request.pending -= 1;
        if request.pending > 0 {
            return None;
        }
        self.free.push(slot);
        self.requests[slot].take()
    }

    /// Applies the acknowledgement rule to each block a write touched: copies that missed the
    /// write are marked out of sync (durably) before the guest hears of it.
    fn settle_copies(&self, request: &mut InFlight) {
        for (i, &(block, first)) in request.written.iter().enumerate() {
            let end = request
                .written
                .get(i + 1)
                .map_or(request.copies.len(), |w| w.1);
            let stale = match ack::decide(&request.copies[first..end]) {
                Outcome::Fail { stale } => {
                    log::error!(
                        "image {}: block {block}: no in-sync copy took the write",
                        self.disk.name()
                    );
                    request.status_byte = VIRTIO_BLK_S_IOERR as u8;
                    stale
                }
                Outcome::Ack { stale } => stale,
            };
            if !stale.is_empty() {
                if let Err(e) = self.disk.mark_out_of_sync(block, &stale) {
                    log::error!(
                        "image {}: block {block}: cannot record a stale copy: {e}",
                        self.disk.name()
                    );
                    request.status_byte = VIRTIO_BLK_S_IOERR as u8;
                }
            }
            self.disk.writes().finish(block);
        }
    }

    fn finish(&mut self, vring: &Vring, mut request: InFlight) {
        for (copy, block, file) in &request.volume_writes {
            if request.copies.get(copy - 1).is_some_and(|c| c.stored) {
                self.disk.dirty().mark(*block, file);
            }
        }
        if !request.written.is_empty() {
            self.settle_copies(&mut request);
        }
        let ok = request.status_byte == VIRTIO_BLK_S_OK as u8;
        let m = self.disk.metrics();
        m.in_flight.fetch_sub(1, Relaxed);
        m.latency.record(request.started.elapsed());
        if !ok {
            m.errors.fetch_add(1, Relaxed);
        }
        for segment in &request.fills {
            for slice in request
                .mem
                .get_slices(segment.addr, segment.len as usize)
                .flatten()
            {
                slice.bitmap().mark_dirty(0, slice.len());
            }
        }
        if request.flush.is_some() {
            let failed: Vec<_> = request
                .copies
                .iter()
                .filter(|c| !c.stored)
                .map(|c| c.location.node.clone())
                .collect();
            if !failed.is_empty() {
                match self.disk.flush_failed(&failed) {
                    Ok(true) => {}
                    Ok(false) => request.status_byte = VIRTIO_BLK_S_IOERR as u8,
                    Err(e) => {
                        log::error!("image {}: {e}", self.disk.name());
                        request.status_byte = VIRTIO_BLK_S_IOERR as u8;
                    }
                }
            }
        }
        let ok = request.status_byte == VIRTIO_BLK_S_OK as u8;
        if let (true, Some(ticket)) = (ok, &request.flush) {
            self.disk.dirty().clear(ticket);
        }
        let used = match request.mem.write_obj(request.status_byte, request.status) {
            Ok(()) if ok => request.used_len,
            Ok(()) => 1,
            Err(_) => 0,
        };
        self.put_used(vring, request.head, used);
    }

    fn signal(&mut self, vring: &Vring) {
        if !std::mem::take(&mut self.needs_signal) {
            return;
        }
        if vring.needs_notification().unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                log::warn!("image {}: cannot signal the guest: {e}", self.disk.name());
            }
        }
    }
}

impl Drop for Worker {
    /// The kernel may still be writing into guest memory: wait for it before the mapping
    /// (held by the in-flight requests) is released.
    fn drop(&mut self) {
        // Peer reads copy into guest memory from their own threads; they end by answer or by
        // their timeout.
        while self.remote.in_flight() > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(uring) = self.uring.as_mut() {
            while uring.in_flight() > 0 && uring.wait().is_ok() {
                let mut done = Vec::new();
                uring.reap(&mut done);
            }
        }
    }
}

/// Host addresses of guest buffers. The parser checked that they lie in guest memory; a
/// memory table update between parsing and now could still make that untrue, hence Option.
fn host_buffers(mem: &Mem, segments: &[Segment]) -> Option<IoVecs> {
    let mut iovecs = smallvec::SmallVec::with_capacity(segments.len());
    for segment in segments {
        for slice in mem.get_slices(segment.addr, segment.len as usize) {
            let slice = slice.ok()?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            });
        }
    }
    Some(IoVecs(iovecs))
}
