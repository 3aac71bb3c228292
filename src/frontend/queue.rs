//! One virtqueue of a connected client: typed virtio-blk requests on a [`SplitRing`], the kick
//! and call eventfds, per-head header/status slots, and a data arena.
//!
//! Three ways to use it, from fastest to most convenient:
//! - [`BlkQueue::submit_batch`] / [`BlkQueue::wait_completions`]: many requests in flight, buffers
//!   allocated once with [`BlkQueue::alloc`], no allocation per request;
//! - [`BlkQueue::read`], [`BlkQueue::write`], ...: one request, wait for it, copy the data;
//! - [`BlkQueue::submit_raw`] / [`BlkQueue::wait_raw`]: hand-built, possibly hostile chains.
//!
//! Every wait has a deadline and also watches the vhost-user socket, so a stalled or dead
//! backend turns into [`Error::Timeout`] or [`Error::Disconnected`], never a hang.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::blk::{
    encode_header, BlkRequest, DiscardRange, HEADER_SIZE, ID_BYTES, SEGMENT_SIZE, S_NOT_WRITTEN,
};
use super::memory::{BumpAlloc, GuestBuf, GuestMem};
use super::vring::{
    RawDesc, RingAddrs, SplitRing, UsedElem, DESC_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use super::{Error, Result};

/// Per-head slot: an indirect table of up to 3 descriptors (48 bytes), the 16-byte header at 48,
/// the status byte at 64; 80 bytes keeps every slot 16-byte aligned for the indirect table.
const SLOT_SIZE: u64 = 80;
const SLOT_HEADER: u64 = 48;
const SLOT_STATUS: u64 = 64;

/// Alignment of buffers from [`BlkQueue::alloc`]: a sector, which O_DIRECT backends need.
const BUF_ALIGN: u64 = 512;

/// Identifies a submitted request; tokens of one queue count up from 0, so the tokens of a
/// batch are consecutive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u64);

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The token [`BlkQueue::submit`] returned.
    pub token: Token,
    /// The status byte as the backend left it ([`super::blk::S_NOT_WRITTEN`] if it did not).
    pub status: u8,
    /// Bytes the backend says it wrote (used element `len`).
    pub used_len: u32,
    /// From the `submit` call (one clock read per batch) to the reap that saw it used: it
    /// includes time the caller spent before reaping, so reap promptly when measuring.
    pub latency: Duration,
}

/// Counters for one queue (cheap, always on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests made available.
    pub submitted: u64,
    /// Requests reaped.
    pub completed: u64,
    /// Kick eventfd writes.
    pub kicks: u64,
    /// Publishes that needed no kick (the backend suppressed notifications).
    pub kicks_suppressed: u64,
    /// Call eventfd wake-ups.
    pub calls: u64,
}

#[derive(Clone, Copy, Debug)]
struct HeadInfo {
    token: Token,
    submitted: Instant,
}

/// Queue settings decided at connect time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueSetup {
    pub size: u16,
    pub event_idx: bool,
    pub indirect: bool,
    pub io_timeout: Duration,
}

/// One virtqueue of a [`super::BlkClient`]. `Send`, so each queue can be driven by its own thread
/// (`client.queues_mut()` hands out disjoint `&mut`).
#[derive(Debug)]
pub struct BlkQueue {
    index: u16,
    mem: GuestMem,
    ring: SplitRing,
    kick: EventFd,
    call: EventFd,
    sock: Arc<UnixStream>,
    slots: u64,
    arena: BumpAlloc,
    setup: QueueSetup,
    next_token: u64,
    heads: Vec<HeadInfo>,
    /// Completions reaped while a blocking call waited for its own; bounded by the queue size
    /// because every entry is a request that was in flight.
    stash: Vec<Completion>,
    stats: QueueStats,
}

impl BlkQueue {
    /// Guest memory a queue of `size` needs for its ring and slots.
    pub(crate) fn bytes_needed(size: u16) -> u64 {
        SplitRing::bytes_needed(size) + SLOT_SIZE * u64::from(size) + 4096
    }

    /// Places the ring and slots in `layout`; the data arena is attached later.
    pub(crate) fn new(
        index: u16,
        mem: GuestMem,
        layout: &mut BumpAlloc,
        setup: QueueSetup,
        sock: Arc<UnixStream>,
    ) -> Result<Self> {
        let ring = SplitRing::new(mem.clone(), layout, setup.size, setup.event_idx)?;
        let slots = layout.alloc(SLOT_SIZE * u64::from(setup.size), 4096)?;
        let eventfd = || EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd);
        let now = Instant::now();
        Ok(BlkQueue {
            index,
            mem,
            ring,
            kick: eventfd()?,
            call: eventfd()?,
            sock,
            slots,
            arena: BumpAlloc::new(0, 0),
            setup,
            next_token: 0,
            heads: vec![
                HeadInfo {
                    token: Token(u64::MAX),
                    submitted: now,
                };
                setup.size as usize
            ],
            stash: Vec::with_capacity(setup.size as usize),
            stats: QueueStats::default(),
        })
    }

    /// The control socket to watch for hang-ups (a new one after a reconnect).
    pub(crate) fn set_socket(&mut self, sock: Arc<UnixStream>) {
        self.sock = sock;
    }

    pub(crate) fn set_arena(&mut self, arena: BumpAlloc) {
        self.arena = arena;
    }

    pub(crate) fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    pub(crate) fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Queue index (vring number).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        self.setup.size
    }

    /// Guest addresses of the ring.
    pub fn ring_addrs(&self) -> RingAddrs {
        self.ring.addrs()
    }

    /// True when requests use one indirect descriptor each (INDIRECT_DESC negotiated and wanted).
    pub fn uses_indirect(&self) -> bool {
        self.setup.indirect
    }

    /// Most typed requests that fit in flight: the ring size with indirect descriptors, a third
    /// of it with direct chains (header, data, status).
    pub fn max_in_flight(&self) -> usize {
        if self.setup.indirect {
            self.size() as usize
        } else {
            self.size() as usize / 3
        }
    }

    /// Requests made available and not yet reaped (managed or raw; abandoned raw chains not
    /// counted).
    pub fn in_flight(&self) -> usize {
        self.ring.in_flight() as usize
    }

    /// Next available index; after a clean stop the backend's GET_VRING_BASE should equal it.
    pub fn next_avail(&self) -> u16 {
        self.ring.next_avail()
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The guest memory this queue's buffers live in.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// Allocates a sector-aligned data buffer from this queue's arena; it lives until
    /// [`BlkQueue::reset_arena`].
    pub fn alloc(&mut self, len: u32) -> Result<GuestBuf> {
        let addr = self.arena.alloc(u64::from(len), BUF_ALIGN)?;
        Ok(GuestBuf { addr, len })
    }

    /// Bytes left in the arena.
    pub fn arena_remaining(&self) -> u64 {
        self.arena.remaining()
    }

    /// Frees every buffer of the arena. Refused while requests are in flight, since the backend
    /// may still read or write them.
    pub fn reset_arena(&mut self) -> Result<()> {
        if !self.ring.is_idle() {
            return Err(Error::QueueBusy);
        }
        self.arena.reset();
        Ok(())
    }

    /// Makes one request available and kicks if the backend wants it.
    pub fn submit(&mut self, req: &BlkRequest) -> Result<Token> {
        self.submit_batch(std::slice::from_ref(req))
    }

    /// Makes all of `reqs` available with one index update and at most one kick.
    ///
    /// All or nothing: if the ring lacks descriptors for the whole batch, nothing is submitted
    /// and [`Error::QueueFull`] says how many are free. Returns the first token; the others
    /// follow in order.
    pub fn submit_batch(&mut self, reqs: &[BlkRequest]) -> Result<Token> {
        let first = Token(self.next_token);
        let need: usize = reqs.iter().map(|r| self.ring_descs(r) as usize).sum();
        if self.ring.raw_outstanding() > 0 {
            return Err(Error::QueueBusy);
        }
        if need > self.ring.free_descs() {
            return Err(Error::QueueFull {
                need,
                free: self.ring.free_descs(),
            });
        }
        let now = Instant::now();
        for req in reqs {
            self.place(req, now)?;
        }
        self.publish_and_kick(false)?;
        Ok(first)
    }

    fn ring_descs(&self, req: &BlkRequest) -> u16 {
        if self.setup.indirect {
            1
        } else {
            req.descriptors()
        }
    }

    fn place(&mut self, req: &BlkRequest, now: Instant) -> Result<()> {
        let n = req.descriptors() as usize;
        let ring_n = self.ring_descs(req);
        let head = self.ring.take_chain(ring_n).ok_or(Error::QueueFull {
            need: ring_n as usize,
            free: self.ring.free_descs(),
        })?;
        let slot = self.slots + SLOT_SIZE * u64::from(head);
        self.mem
            .write(slot + SLOT_HEADER, &encode_header(req.req_type, req.sector))?;
        self.mem.write(slot + SLOT_STATUS, &[S_NOT_WRITTEN])?;
        let mut descs = [RawDesc::default(); 3];
        descs[0] = RawDesc {
            addr: slot + SLOT_HEADER,
            len: HEADER_SIZE,
            ..RawDesc::default()
        };
        if let Some(buf) = req.data {
            descs[1] = RawDesc {
                addr: buf.addr,
                len: buf.len,
                flags: if req.data_writable {
                    VRING_DESC_F_WRITE
                } else {
                    0
                },
                next: 0,
            };
        }
        descs[n - 1] = RawDesc {
            addr: slot + SLOT_STATUS,
            len: 1,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        };
        if self.setup.indirect {
            self.write_indirect(head, slot, &mut descs[..n])?;
        } else {
            self.write_direct(head, &mut descs[..n])?;
        }
        self.ring.push_avail(head)?;
        self.heads[head as usize] = HeadInfo {
            token: Token(self.next_token),
            submitted: now,
        };
        self.next_token += 1;
        Ok(())
    }

    fn write_indirect(&self, head: u16, table: u64, descs: &mut [RawDesc]) -> Result<()> {
        let n = descs.len();
        for (i, d) in descs.iter_mut().enumerate() {
            if i + 1 < n {
                d.flags |= VRING_DESC_F_NEXT;
                d.next = (i + 1) as u16;
            }
            self.mem
                .write(table + DESC_SIZE * i as u64, &d.to_bytes())?;
        }
        self.ring.write_desc(
            head,
            RawDesc {
                addr: table,
                len: (DESC_SIZE * n as u64) as u32,
                flags: VRING_DESC_F_INDIRECT,
                next: 0,
            },
        )
    }

    fn write_direct(&self, head: u16, descs: &mut [RawDesc]) -> Result<()> {
        let mut idx = [0u16; 3];
        for (i, d) in self.ring.chain(head).enumerate().take(3) {
            idx[i] = d;
        }
        let n = descs.len();
        for (i, d) in descs.iter_mut().enumerate() {
            if i + 1 < n {
                d.flags |= VRING_DESC_F_NEXT;
                d.next = idx[i + 1];
            }
            self.ring.write_desc(idx[i], *d)?;
        }
        Ok(())
    }

    fn publish_and_kick(&mut self, force: bool) -> Result<()> {
        let before = self.ring.outstanding();
        let wants_kick = self.ring.publish()?;
        let added = self.ring.outstanding().wrapping_sub(before);
        if added == 0 {
            return Ok(());
        }
        self.stats.submitted += u64::from(added);
        if wants_kick || force {
            self.kick.write(1).map_err(Error::EventFd)?;
            self.stats.kicks += 1;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        Ok(())
    }

    /// Appends every finished request to `out` without blocking; returns how many.
    ///
    /// Give `out` a capacity of [`BlkQueue::size`] once and reuse it: then nothing allocates.
    pub fn poll_completions(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        let stashed = self.stash.len();
        out.append(&mut self.stash);
        Ok(stashed + self.reap(out)?)
    }

    /// Like [`BlkQueue::poll_completions`], but waits on the call eventfd until at least one
    /// request finished. Returns `Ok(0)` at once when nothing is in flight; [`Error::Timeout`]
    /// when nothing finished within `timeout`.
    pub fn wait_completions(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Duration,
    ) -> Result<usize> {
        let n = self.poll_completions(out)?;
        if n > 0 || self.ring.in_flight() == 0 {
            return Ok(n);
        }
        let deadline = Instant::now() + timeout;
        loop {
            self.ring.arm_notify()?;
            let n = self.reap(out)?;
            if n > 0 {
                return Ok(n);
            }
            self.wait_call(deadline, timeout)?;
        }
    }

    /// Waits for the request `token` and returns its completion; completions of other requests
    /// seen meanwhile are kept for the next [`BlkQueue::poll_completions`].
    pub fn wait_for(&mut self, token: Token, timeout: Duration) -> Result<Completion> {
        let deadline = Instant::now() + timeout;
        let in_flight = self
            .heads
            .iter()
            .enumerate()
            .any(|(h, i)| i.token == token && self.ring.is_in_flight(h as u16));
        if !in_flight && !self.stash.iter().any(|c| c.token == token) {
            return Err(Error::UnknownToken(token.0));
        }
        loop {
            if let Some(i) = self.stash.iter().position(|c| c.token == token) {
                return Ok(self.stash.remove(i));
            }
            if self.reap_into_stash()? > 0 {
                continue;
            }
            self.ring.arm_notify()?;
            if self.reap_into_stash()? > 0 {
                continue;
            }
            self.wait_call(deadline, timeout)?;
        }
    }

    fn reap_into_stash(&mut self) -> Result<usize> {
        let mut stash = std::mem::take(&mut self.stash);
        let r = self.reap(&mut stash);
        self.stash = stash;
        r
    }

    fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        if self.ring.raw_outstanding() > 0 {
            return Err(Error::QueueBusy);
        }
        let mut now = None;
        let mut n = 0;
        while let Some(elem) = self.ring.pop_used()? {
            let now = *now.get_or_insert_with(Instant::now);
            let head = elem.id as u16;
            let info = self.heads[head as usize];
            let slot = self.slots + SLOT_SIZE * u64::from(head);
            out.push(Completion {
                token: info.token,
                status: self.mem.read_u8(slot + SLOT_STATUS)?,
                used_len: elem.len,
                latency: now.saturating_duration_since(info.submitted),
            });
            n += 1;
        }
        self.stats.completed += n as u64;
        Ok(n)
    }

    /// Blocks until the call eventfd fires, the socket hangs up, or `deadline` passes.
    fn wait_call(&mut self, deadline: Instant, timeout: Duration) -> Result<()> {
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout {
                queue: self.index,
                waited: timeout,
            });
        }
        let left = deadline - now;
        // Round up so that a sub-millisecond remainder does not spin with a 0 ms poll.
        let ms = left.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
        let mut fds = [
            libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(Error::Poll(e))
            };
        }
        if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(Error::Disconnected);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // Non-blocking: EAGAIN only means another reader got there first.
            let _ = self.call.read();
            self.stats.calls += 1;
        }
        Ok(())
    }

    /// Submits `req` and waits for it (the queue's I/O timeout).
    pub fn run(&mut self, req: &BlkRequest) -> Result<Completion> {
        let token = self.submit(req)?;
        self.wait_for(token, self.setup.io_timeout)
    }

    /// Reads `len` bytes at `sector`; returns the status and the data.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<(u8, Vec<u8>)> {
        self.with_scratch(len, |q, buf| {
            let c = q.run(&BlkRequest::read(sector, buf))?;
            let mut data = vec![0u8; len as usize];
            q.mem.read(buf.addr, &mut data)?;
            Ok((c.status, data))
        })
    }

    /// Writes `data` at `sector`; returns the status.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<u8> {
        let len = u32::try_from(data.len()).map_err(|_| Error::TooLarge(data.len() as u64))?;
        self.with_scratch(len, |q, buf| {
            q.mem.write(buf.addr, data)?;
            Ok(q.run(&BlkRequest::write(sector, buf))?.status)
        })
    }

    /// Flushes; returns the status.
    pub fn flush(&mut self) -> Result<u8> {
        Ok(self.run(&BlkRequest::flush())?.status)
    }

    /// Reads the device id; returns the status and the 20 id bytes (NUL-padded).
    pub fn get_id(&mut self) -> Result<(u8, [u8; ID_BYTES as usize])> {
        self.with_scratch(ID_BYTES, |q, buf| {
            q.mem.fill(buf.addr, ID_BYTES as usize, 0)?;
            let c = q.run(&BlkRequest::get_id(buf))?;
            let mut id = [0u8; ID_BYTES as usize];
            q.mem.read(buf.addr, &mut id)?;
            Ok((c.status, id))
        })
    }

    /// Discards `ranges`; returns the status.
    pub fn discard(&mut self, ranges: &[DiscardRange]) -> Result<u8> {
        self.segments(ranges, BlkRequest::discard)
    }

    /// Writes zeroes over `ranges`; returns the status.
    pub fn write_zeroes(&mut self, ranges: &[DiscardRange]) -> Result<u8> {
        self.segments(ranges, BlkRequest::write_zeroes)
    }

    fn segments(&mut self, ranges: &[DiscardRange], mk: fn(GuestBuf) -> BlkRequest) -> Result<u8> {
        let bytes = ranges.len() as u64 * u64::from(SEGMENT_SIZE);
        let len = u32::try_from(bytes).map_err(|_| Error::TooLarge(bytes))?;
        self.with_scratch(len, |q, buf| {
            for (i, r) in ranges.iter().enumerate() {
                let at = buf.addr + i as u64 * u64::from(SEGMENT_SIZE);
                q.mem.write(at, &r.to_bytes())?;
            }
            Ok(q.run(&mk(buf))?.status)
        })
    }

    /// Runs `f` with a scratch buffer that is freed only if `f` succeeded: after a timeout the
    /// backend may still write into it, so it must not be handed out again.
    fn with_scratch<T>(
        &mut self,
        len: u32,
        f: impl FnOnce(&mut Self, GuestBuf) -> Result<T>,
    ) -> Result<T> {
        let mark = self.arena.mark();
        let buf = self.alloc(len)?;
        let r = f(self, buf);
        if r.is_ok() {
            self.arena.release_to(mark);
        }
        r
    }

    /// Writes `descs` at descriptor table indices `0..descs.len()` exactly as given, puts `head`
    /// (any value, even out of range) in the available ring and kicks.
    ///
    /// The queue must be idle; until [`BlkQueue::wait_raw`] returns the used element, typed
    /// requests are refused with [`Error::QueueBusy`].
    pub fn submit_raw(&mut self, descs: &[RawDesc], head: u16) -> Result<()> {
        self.ring.push_raw(descs, head)?;
        self.publish_and_kick(true)
    }

    /// Waits for the used element of the raw chain in flight and returns it unchecked.
    pub fn wait_raw(&mut self, timeout: Duration) -> Result<UsedElem> {
        if self.ring.raw_outstanding() == 0 {
            return Err(Error::NothingInFlight);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.ring.pop_used()? {
                self.stats.completed += 1;
                return Ok(e);
            }
            self.ring.arm_notify()?;
            if let Some(e) = self.ring.pop_used()? {
                self.stats.completed += 1;
                return Ok(e);
            }
            self.wait_call(deadline, timeout)?;
        }
    }

    /// Gives up on the raw chain in flight after [`BlkQueue::wait_raw`] timed out, so the
    /// queue can be used again (to check whether the backend still serves after dropping a
    /// request). Its descriptor table indices are never reused; a late answer is discarded.
    pub fn abandon_raw(&mut self) -> Result<()> {
        self.ring.abandon_raw()
    }

    /// The I/O timeout the blocking calls use.
    pub fn io_timeout(&self) -> Duration {
        self.setup.io_timeout
    }
}
