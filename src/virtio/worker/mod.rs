//! One queue's request loop: pop chains, parse them, hand each request to the block device
//! layer (`route`), and put it on the used ring once, when its completion comes back.
//!
//! A request's life: popped and parsed (a rejected one is answered at once), then in flight
//! in a slot until the block device layer completes it, then its status byte is written and
//! its head goes on the used ring. Errors from the guest or from storage become status bytes;
//! nothing here returns an error that would end the queue's thread.

mod complete;
mod execute;
mod throttle;

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use std::time::{Duration, Instant};

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::logs::Throttle;
use crate::route::{self, Completion, Device};
use crate::slots::Slots;
use crate::virtio::chain;
use crate::virtio::inflight::QueueInflight;
use crate::virtio::memory::{DirtyLog, HostMemory};
use crate::virtio::request::{self, Limits, Segments};
use crate::virtio::ring::{self, RingError, Rings};

/// Guest memory with a dirty-page bitmap that QEMU's log (VHOST_USER_SET_LOG_BASE) plugs
/// into during live migration; until then marking is a no-op.
pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;
pub type AtomicMem = GuestMemoryAtomic<Mem>;
pub type Vring = VringRwLock<AtomicMem>;

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

/// A request between its pop and its place on the used ring: what the virtio side needs to
/// answer it. The block device layer knows it by its slot index.
struct InFlight {
    head: u16,
    status: GuestAddress,
    /// Bytes written into device-writable buffers on success (data plus the status byte).
    used_len: u32,
    /// Keeps the guest memory mapped while the kernel or a peer may still write into it.
    mem: Arc<Mem>,
    /// Guest buffers this request fills (reads, GET_ID): marked dirty for live migration once
    /// the data is in them, not before, or a page sent meanwhile would miss it.
    fills: Segments,
}

pub struct Worker {
    device: Arc<Device>,
    queue: route::Queue,
    limits: Limits,
    mem: AtomicMem,
    requests: Slots<InFlight>,
    completions: Vec<Completion>,
    vring: Option<Vring>,
    /// Set when the worker stopped popping because too much was in flight.
    throttled: bool,
    /// Set when the guest kicked before the connection was admitted (see [`Worker::park`]).
    parked: bool,
    /// Set while a take-over this queue asked for runs: the device's attempt count then.
    awaiting: Option<u64>,
    poll_window: Duration,
    /// When the queue last went to sleep, to judge how soon the next kick came.
    slept_at: Option<Instant>,
    needs_signal: bool,
    guest_errors: Throttle,
    /// This queue's part of QEMU's in-flight region, when QEMU shares one.
    inflight: Option<QueueInflight>,
    /// QoS: the request waiting for the image's tokens, and its timer (see `throttle.rs`).
    throttle: throttle::Throttle,
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
        device: &Arc<Device>,
        limits: Limits,
        mem: AtomicMem,
        log: DirtyLog,
    ) -> std::io::Result<Self> {
        Ok(Worker {
            device: device.clone(),
            queue: device.queue()?,
            limits,
            mem,
            requests: Slots::default(),
            completions: Vec::new(),
            vring: None,
            throttled: false,
            parked: false,
            awaiting: None,
            poll_window: Duration::ZERO,
            slept_at: None,
            needs_signal: false,
            guest_errors: Throttle::default(),
            inflight: None,
            throttle: throttle::Throttle::new()?,
            host: None,
            log,
            signalled_used: None,
        })
    }

    /// The eventfd completions (io_uring, peers, a take-over) are signalled on; the queue
    /// thread's epoll watches it.
    pub fn completion_fd(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.queue.completion_fd()
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
        self.adapt_poll();
        self.serve_when_ready(vring);
    }

    /// Serves the queue once this node may: a guest that started the device here (perhaps
    /// after migrating here) needs this node to own the image and hold it active first. That
    /// may wait seconds for the old owner, so it runs on the device's thread, and the queue
    /// comes back here when it is over (through the completion eventfd); whatever its outcome,
    /// the requests are then served, or refused if this node may not serve them.
    fn serve_when_ready(&mut self, vring: &Vring) {
        match self.awaiting {
            Some(asked) if self.device.attempts() == asked => return,
            Some(_) => {
                self.awaiting = None;
                log::debug!("image {}: serving after the take-over", self.device.name());
            }
            None if !self.device.is_ready() => {
                self.awaiting = Some(self.device.attempts());
                self.device.prepare(self.queue.completion_fd());
                return;
            }
            None => {}
        }
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
                self.serve_when_ready(&vring);
            }
        }
    }

    /// Operations completed, or a take-over this queue waited for is over.
    pub fn on_completions(&mut self) {
        let _ = self.queue.completion_fd().read();
        let Some(vring) = self.vring.clone() else {
            return;
        };
        if self.awaiting.is_some() {
            self.serve_when_ready(&vring);
        }
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
        self.enter();
        if let Some(vring) = self.vring.clone() {
            // QoS: a request held for its tokens goes now (see `throttle.rs`).
            self.release_held(&vring);
        }
        while self.queue.in_flight() > 0 {
            if self.queue.retry_deferred() > 0 {
                std::thread::sleep(DEFERRED_RETRY);
            } else {
                self.queue.wait();
            }
            match self.vring.clone() {
                Some(vring) => self.complete(&vring),
                None => {
                    let mut lost = Vec::new();
                    self.queue.complete(&mut lost);
                }
            }
        }
        if let Some(vring) = self.vring.clone() {
            self.signal(&vring);
        }
        self.leave();
        // The queue stops: its used index may be set anew before it starts again.
        self.signalled_used = None;
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
            let waiting = self.queue.retry_deferred();
            let popped = self.pop_batch(vring);
            self.queue.submit_queued();
            // An empty poll with nothing in flight has nothing to reap: skip the engines'
            // completion queues (one of them behind a mutex).
            if popped > 0 || self.queue.in_flight() > 0 {
                self.complete(vring);
            }
            self.signal(vring);
            if self.holding() {
                // QoS: a request waits for the image's tokens; the throttle timer serves the
                // queue on (see `throttle.rs`), and the kick stays off meanwhile.
                return;
            }
            if waiting > 0 {
                // Frozen blocks thaw after one block's copy: check back soon.
                std::thread::sleep(DEFERRED_RETRY);
                continue;
            }
            if self.queue.is_full() {
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
        // QoS: no new requests while one waits for the image's tokens (see `throttle.rs`).
        while !self.queue.is_full() && !self.holding() {
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
        self.queue.guest_error();
        if let Some(n) = self.guest_errors.allow() {
            log::warn!(
                "image {}: broken virtqueue from guest: {error} ({n} so far on this queue)",
                self.device.name()
            );
        }
    }

    /// Parses a request and starts it, or answers it at once when the guest got it wrong.
    fn take(&mut self, vring: &Vring, head: u16, chain: chain::Chain, host: &HostMemory<Mem>) {
        // The image may have been resized since the last request (see `image resize`).
        self.limits.capacity = self.device.capacity();
        match request::parse(host, chain, &self.limits) {
            // QoS: executes now or holds it for the image's tokens (see `throttle.rs`).
            Ok(request) => self.execute_within_limits(vring, head, request, host.snapshot()),
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
        // The replayed requests are served like a kick's: `serve_when_ready` made sure this
        // node owns the image and holds it active (a restarted daemon has not been kicked yet).
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
                self.device.name()
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
                self.device.name(),
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
            log::warn!("image {}: cannot signal the guest: {e}", self.device.name());
        }
    }

    fn guest_error(&mut self, error: &request::ParseError) {
        self.queue.guest_error();
        if let Some(n) = self.guest_errors.allow() {
            log::warn!(
                "image {}: bad request from guest: {error} ({n} so far on this queue)",
                self.device.name()
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
            Err(e) => log::warn!("image {}: cannot complete request: {e}", self.device.name()),
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
                log::warn!("image {}: cannot signal the guest: {e}", self.device.name());
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
