//! One queue's request loop: pop chains, parse them, cut them into block pieces, hand the
//! pieces to the tier's engine, and complete each request once, when its last piece is done.
//!
//! A request's life: popped and parsed (a rejected one is answered at once), then in flight
//! in a slot until every piece has completed, then its status byte is written and its head
//! goes on the used ring. Errors from the guest or from storage become status bytes; nothing
//! here returns an error that would end the queue's thread.

mod complete;
mod issue;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use smallvec::SmallVec;
use std::time::{Duration, Instant};

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::cluster::Peers;
use crate::disk::{Disk, FlushTicket};
use crate::engine::remote::RemoteEngine;
use crate::engine::{Done, Engine, InlineEngine, UringEngine};
use crate::replica::ack::CopyResult;
use crate::virtio::chain;
use crate::virtio::inflight::QueueInflight;
use crate::virtio::memory::{DirtyLog, HostMemory};
use crate::virtio::request::{self, Limits, Request, Segments};
use crate::virtio::ring::{self, RingError, Rings};

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
/// Empty polls of the ring between two clock reads: a clock read costs about as much as one
/// empty poll, and 16 polls are a few microseconds, well inside the poll window's precision.
const POLLS_PER_CLOCK_READ: u32 = 16;
/// Requests in one busy stretch from which the queue stops waiting out the poll window: a
/// driver that hands over this many at once pays its kick and our wake-up once for all of
/// them, while polling through its wake-up (tens of microseconds on these machines) would
/// cost more CPU per request than serving them.
const BURST_NO_POLL: usize = 8;
/// How long the ring is still polled after such a burst: long enough for a driver that is
/// still adding requests one by one, far shorter than its wake-up.
const POLL_AFTER_BURST: Duration = Duration::from_micros(3);

/// How often requests waiting for a frozen block are retried.
const DEFERRED_RETRY: Duration = Duration::from_micros(200);

/// Guest mistakes logged at warn level per queue before they are only counted, so a
/// misbehaving guest cannot flood the daemon's log.
const GUEST_ERRORS_LOGGED: u64 = 8;

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
    /// The stamp of the request being issued when it changes data (0 otherwise): every change
    /// it sends to another node's copy carries it (see `peer::ImageRef::stamp`).
    stamp: u64,
    /// Guest memory of the call in progress (kick, completions, drain), resolved to host
    /// pointers; `None` between calls, so no pointer outlives a SET_MEM_TABLE.
    host: Option<Arc<HostMemory<Mem>>>,
    /// Whether QEMU logs dirty pages (a live migration runs).
    log: DirtyLog,
    /// The used index when the worker last decided whether to interrupt the driver
    /// (EVENT_IDX: `vring_need_event`'s `old`); `None` after the queue stopped.
    signalled_used: Option<u16>,
}

impl Worker {
    pub fn new(
        disk: Arc<Disk>,
        limits: Limits,
        mem: AtomicMem,
        use_uring: bool,
        peers: Arc<Peers>,
        log: DirtyLog,
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
            stamp: 0,
            host: None,
            log,
            signalled_used: None,
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

    /// Whether the queue is being served: started (kicked) and not stopped since. Its place
    /// in the ring is then its own, and a new in-flight region must not reset it.
    pub fn is_running(&self) -> bool {
        self.vring
            .as_ref()
            .is_some_and(|vring| vring.get_ref().get_queue().ready())
    }

    /// The guest kicked the queue.
    pub fn on_kick(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        if !self.disk.is_active() || !self.disk.owned_here() {
            // A guest started the device here (perhaps after migrating here): this node must
            // own the image and hold it active, or serve nothing.
            crate::ownership::ensure_serving(&self.disk);
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
        self.enter();
        self.complete(&vring);
        if self.throttled {
            self.throttled = false;
            self.leave();
            self.process(&vring);
        } else {
            self.signal(&vring);
            self.leave();
        }
    }

    /// Takes the current guest memory snapshot for the call starting now, with its host
    /// pointers (see [`Worker::leave`]).
    fn enter(&mut self) -> Arc<Mem> {
        let mem = self.mem.memory().into_inner();
        self.host = Some(Arc::new(HostMemory::new(mem.clone(), self.log.clone())));
        mem
    }

    /// Drops the snapshot's host pointers: the next call resolves them again, after whatever
    /// memory table the frontend sent meanwhile.
    fn leave(&mut self) {
        self.host = None;
    }

    /// Waits for everything in flight and completes it (the vring is being stopped).
    pub fn drain(&mut self) {
        let mem = self.enter();
        if let Some(vring) = self.vring.clone() {
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
        self.leave();
        // The queue stops: its used index may be set anew before it starts again.
        self.signalled_used = None;
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
        let mem = self.enter();
        self.serve(vring, &mem);
        self.leave();
        self.slept_at = Some(Instant::now());
    }

    fn serve(&mut self, vring: &Vring, mem: &Arc<Mem>) {
        let _ = vring.disable_notification();
        self.replay(vring, mem);
        let mut idle_since: Option<Instant> = None;
        let mut idle_polls: u32 = 0;
        let mut burst: usize = 0;
        loop {
            let retried = !self.deferred.is_empty();
            let waiting = self.retry_deferred(vring, mem);
            let popped = self.pop_batch(vring);
            self.submit();
            // An empty poll with nothing in flight has nothing to reap: skip the engines'
            // completion queues (one of them behind a mutex).
            if popped > 0 || retried || self.ops_in_flight() > 0 {
                self.complete(vring);
            }
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
                if idle_since.take().is_some() {
                    burst = 0;
                }
                burst += popped;
                idle_polls = 0;
                continue;
            }
            let window = if burst >= BURST_NO_POLL {
                self.poll_window.min(POLL_AFTER_BURST)
            } else {
                self.poll_window
            };
            if keep_polling(window, &mut idle_since, &mut idle_polls) {
                std::hint::spin_loop();
                continue;
            }
            match vring.enable_notification() {
                Ok(true) => {
                    let _ = vring.disable_notification();
                    idle_since = None;
                    idle_polls = 0;
                }
                _ => break,
            }
        }
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

    /// Takes requests off the ring until it is empty or enough is in flight. The avail index
    /// is read once per run of heads it announces, each head's descriptors straight from the
    /// snapshot's host pointers; the queue's `next_avail` moves with every head.
    fn pop_batch(&mut self, vring: &Vring) -> usize {
        let Some(host) = self.host.clone() else {
            return 0;
        };
        let mut popped = 0;
        let mut announced = 0u16;
        let mut last_rings = None;
        while self.ops_in_flight() < MAX_IN_FLIGHT_OPS {
            let (head, rings) = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                // Under the lock each time: the frontend may stop or move the queue meanwhile
                // (vhost-user-backend marks it not ready first, as virtio-queue's pop checks).
                let rings = match Rings::of(&*queue) {
                    Some(rings) if queue.ready() => rings,
                    _ => break,
                };
                if last_rings.replace(rings) != Some(rings) {
                    announced = 0;
                }
                let next = queue.next_avail();
                if announced == 0 {
                    announced = match rings.available(&host, next) {
                        Ok(n) => n,
                        Err(e) => {
                            drop(state);
                            self.ring_error(&e);
                            break;
                        }
                    };
                    if announced == 0 {
                        break;
                    }
                }
                match rings.avail_head(&host, next) {
                    Ok(head) => {
                        queue.set_next_avail(next.wrapping_add(1));
                        (head, rings)
                    }
                    Err(e) => {
                        drop(state);
                        self.ring_error(&e);
                        break;
                    }
                }
            };
            announced -= 1;
            popped += 1;
            if let Some(inflight) = self.inflight.as_mut() {
                inflight.begin(head);
            }
            let chain = rings.chain(&*host, head);
            self.take(vring, head, chain, &host);
        }
        popped
    }

    /// The driver broke the ring itself: nothing is popped until it mends it (or resets).
    fn ring_error(&mut self, error: &RingError) {
        self.guest_errors += 1;
        self.disk.metrics().guest_errors.fetch_add(1, Relaxed);
        let n = self.guest_errors;
        if n <= GUEST_ERRORS_LOGGED || n.is_power_of_two() {
            log::warn!(
                "image {}: broken virtqueue from guest: {error} ({n} so far on this queue)",
                self.disk.name()
            );
        }
    }

    /// Parses a request and starts it, or answers it at once when the guest got it wrong.
    fn take(&mut self, vring: &Vring, head: u16, chain: chain::Chain, host: &HostMemory<Mem>) {
        match request::parse(host, chain, &self.limits) {
            Ok(request) => self.execute(vring, head, request, host.snapshot()),
            Err(rejected) => {
                self.guest_error(&rejected.error);
                let status = rejected.error.status();
                self.answer_now(vring, head, rejected.status, status, host);
            }
        }
    }

    /// Once per connection, before the queue is served: restarts the requests a previous
    /// daemon (or connection) took off the ring but never completed, oldest first, and
    /// resumes the avail ring after them.
    fn replay(&mut self, vring: &Vring, mem: &Arc<Mem>) {
        if !self.inflight.as_ref().is_some_and(|i| i.needs_recovery()) {
            return;
        }
        // The replayed requests are served like a kick's: this node must own the image and
        // hold it active first (a restarted daemon has not been kicked yet).
        if !self.disk.is_active() || !self.disk.owned_here() {
            crate::ownership::ensure_serving(&self.disk);
        }
        let Some(inflight) = self.inflight.as_mut() else {
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
        let Some(host) = self.host.clone() else {
            return;
        };
        for head in heads {
            let chain = chain::descriptors(&*host, GuestAddress(table), size, head);
            self.take(vring, head, chain, &host);
        }
        // The guest may never have heard of the last completions before the restart: a
        // daemon killed between the used ring and the call eventfd, or one draining after
        // QEMU had already dropped its call eventfd. An interrupt with nothing new is harmless;
        // one missing leaves the guest waiting forever. So signal once, whatever the event
        // index says.
        if let Err(e) = vring.signal_used_queue() {
            log::warn!("image {}: cannot signal the guest: {e}", self.disk.name());
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
        host: &HostMemory<Mem>,
    ) {
        let used = match status {
            Some(addr) if host.write_obj(byte, addr) => 1,
            _ => 0,
        };
        self.put_used(vring, head, used);
    }

    /// Puts a request on the used ring, with the in-flight region's bookkeeping around it.
    fn put_used(&mut self, vring: &Vring, head: u16, len: u32) {
        if let Some(inflight) = &self.inflight {
            inflight.before_used(head);
        }
        match self.add_used(vring, head, len) {
            Ok(next_used) => {
                if let Some(inflight) = &self.inflight {
                    inflight.after_used(head, next_used);
                }
            }
            Err(e) => log::warn!("image {}: cannot complete request: {e}", self.disk.name()),
        }
        self.needs_signal = true;
    }

    /// Writes the used element and publishes the used index through the snapshot's host
    /// pointers, and moves the queue's `next_used` with it; returns the new used index.
    fn add_used(&self, vring: &Vring, head: u16, len: u32) -> Result<u16, String> {
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let Some(host) = self.host.as_deref() else {
            // Not reached: every entry point takes a snapshot first. Kept correct anyway.
            queue
                .add_used(&*self.mem.memory(), head, len)
                .map_err(|e| e.to_string())?;
            return Ok(queue.next_used());
        };
        let rings = Rings::of(&*queue).ok_or("the queue is not ready")?;
        let next = rings
            .put_used(host, queue.next_used(), head, len)
            .map_err(|e| e.to_string())?;
        queue.set_next_used(next);
        Ok(next)
    }

    /// Interrupts the driver once for everything completed since the last time, unless it
    /// asked not to be (EVENT_IDX: its `used_event` was not crossed).
    fn signal(&mut self, vring: &Vring) {
        if !std::mem::take(&mut self.needs_signal) {
            return;
        }
        if self.wants_interrupt(vring) {
            if let Err(e) = vring.signal_used_queue() {
                log::warn!("image {}: cannot signal the guest: {e}", self.disk.name());
            }
        }
    }

    /// virtio-queue's `needs_notification` over the host pointers: without EVENT_IDX always;
    /// with it, when the used index crossed `used_event` since the last decision. When unsure
    /// (no earlier decision, ring unreadable), it interrupts: a spurious interrupt is
    /// harmless, a missing one stalls the driver.
    fn wants_interrupt(&mut self, vring: &Vring) -> bool {
        let (rings, next_used, event_idx) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            (
                Rings::of(queue),
                queue.next_used(),
                queue.event_idx_enabled(),
            )
        };
        if !event_idx {
            return true;
        }
        let old = self.signalled_used.replace(next_used);
        // The used index must be visible before `used_event` is read, or driver and device
        // can both decide the other will act (virtio 2.7.10).
        fence(Ordering::SeqCst);
        let event = match (rings, self.host.as_deref()) {
            (Some(rings), Some(host)) => rings.used_event(host),
            _ => None,
        };
        match (event, old) {
            (Some(event), Some(old)) => ring::need_event(event, next_used, old),
            _ => true,
        }
    }
}

/// Whether an empty ring is polled again, within `window`; reads the clock at the first empty
/// poll and then every [`POLLS_PER_CLOCK_READ`], not on every poll.
fn keep_polling(window: Duration, idle_since: &mut Option<Instant>, idle_polls: &mut u32) -> bool {
    if window.is_zero() {
        return false;
    }
    *idle_polls += 1;
    let Some(since) = *idle_since else {
        *idle_since = Some(Instant::now());
        return true;
    };
    !(*idle_polls).is_multiple_of(POLLS_PER_CLOCK_READ) || since.elapsed() < window
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
