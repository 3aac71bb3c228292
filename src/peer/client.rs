//! A client for one peer: a small pool of connections, each carrying many requests at once,
//! answered in any order and completed by callback.
//!
//! Threads per connection: one that connects, authenticates and then writes the frames
//! nobody else writes, and one that reads answers, completes calls and fails calls whose
//! deadline passed. A caller whose frame finds no one writing writes it itself (see
//! `outbox.rs`), so a lone call goes out without a hand-off between threads.
//! Connections open on demand (the first call to pick a slot opens it, and waits for it).
//! When a connection is lost every call pending on it fails with `Unavailable`, exactly once;
//! the next call opens a new one. Failing to connect backs off exponentially (from
//! [`FIRST_BACKOFF`] to [`MAX_BACKOFF`]; at once to the longest for authentication
//! failures), and while backing off calls fail at once.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub use super::auth::HANDSHAKE_TIMEOUT;
use super::auth::{self, ClusterKey};
use super::frame::{Decoder, Frame, Kind, Outgoing, ReadError, MAX_PAYLOAD};
use super::message::{Expect, Payload, Request, Response};
use super::outbox::Outbox;
use super::seal::{Opener, Session};
use super::{lock, PeerError};
use crate::image::NodeId;
use smallvec::SmallVec;

/// How long a call waits for its answer unless told otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The first wait after a failed connection attempt; it doubles with each failure.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// The longest wait between connection attempts, and the wait after an authentication
/// failure (a wrong key or version does not fix itself in milliseconds).
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Bytes queued on one connection before callers wait for the writer (32 one-MiB chunks):
/// a peer slower than we send slows the callers down instead of growing the queue.
pub const MAX_QUEUED_BYTES: usize = 32 << 20;

/// A write that makes no progress for this long means the peer is hung: the connection is
/// dropped and its calls fail.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a connection's reader looks for calls past their deadline.
const TICK: Duration = Duration::from_millis(50);

/// Read buffer per connection: many small answers per system call.
const READ_BUFFER: usize = 64 << 10;

/// Connection attempts that failed, logged one by one; after that only every power of two.
const CONNECT_FAILURES_LOGGED: u32 = 4;

/// A call's completion. It runs exactly once, on a connection's thread, or on the caller's
/// thread (before `call` returns) when the call fails at once. It must not block for long:
/// other answers on its connection wait meanwhile. It may call `call`, never `call_wait`.
pub type Done = Box<dyn FnOnce(Result<Response, PeerError>) + Send>;

thread_local! {
    /// Set while a completion runs: `call` then never waits for room, since the thread it
    /// would wait on may be this one.
    static IN_COMPLETION: Cell<bool> = const { Cell::new(false) };
}

thread_local! {
    /// Inside [`batch`]: the connections this thread staged frames on, flushed when it ends.
    static BATCH: RefCell<Option<Vec<Arc<Conn>>>> = const { RefCell::new(None) };
}

thread_local! {
    /// Set by [`with_landing`] for the one read call made inside it.
    static LANDING: RefCell<Option<Landing>> = const { RefCell::new(None) };
}

/// Caller buffers that a read's answer is decoded straight into (see [`with_landing`]), so
/// its payload is copied once, from the connection's read buffer, and never held in a `Vec`.
pub struct Landing {
    segments: SmallVec<[(*mut u8, usize); 4]>,
    len: usize,
}

// SAFETY: plain addresses of buffers that the creator keeps valid for writing until the call
// completes (see `Landing::new`); only the connection's reader writes through them.
unsafe impl Send for Landing {}

impl Landing {
    /// The first `len` bytes of `segments` (address, length), in order.
    ///
    /// # Safety
    /// Each segment must stay valid for writes, and not be read or written by this process
    /// otherwise, until the call it is given to completes (the answer is written before the
    /// completion runs, and never after).
    pub unsafe fn new(segments: impl IntoIterator<Item = (*mut u8, usize)>, len: usize) -> Self {
        let mut left = len;
        let mut kept = SmallVec::new();
        for (at, n) in segments {
            if left == 0 {
                break;
            }
            let n = n.min(left);
            kept.push((at, n));
            left -= n;
        }
        Landing {
            segments: kept,
            len: len - left,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `bytes` into the buffers at byte `at`; what would fall past them is dropped.
    fn put(&self, at: usize, bytes: &[u8]) {
        let mut skip = at;
        let mut src = bytes;
        for &(base, n) in &self.segments {
            if src.is_empty() {
                break;
            }
            if skip >= n {
                skip -= n;
                continue;
            }
            let count = (n - skip).min(src.len());
            // SAFETY: `base..base + n` is writable and ours until the call completes (see
            // `Landing::new`); `skip + count <= n` and `count <= src.len()`.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), base.add(skip), count) };
            src = &src[count..];
            skip = 0;
        }
    }
}

/// Runs `f` (which makes one read call on this thread, e.g. through `peers::Transport`)
/// with `landing` offered to it: a [`PeerClient`] read call whose length is the landing's
/// takes it, and then answers `Response::Ok` once the payload is in the buffers and its tag
/// checked, instead of `Response::Data`. A call that did not take it (another transport, a
/// call that failed before it was sent) answers as usual. The landing goes with the thread
/// to the call rather than through the `Transport` interface, which knows nothing of
/// buffers.
pub fn with_landing<R>(landing: Landing, f: impl FnOnce() -> R) -> R {
    LANDING.set(Some(landing));
    let result = f();
    LANDING.set(None);
    result
}

/// Bytes a batch stages on one connection before it writes them anyway: large writes leave
/// as they come, small frames share system calls.
const BATCH_BYTES: usize = 256 << 10;

/// Runs `f`, and sends the calls it makes on this thread together: the frames are staged on
/// their connections and leave in one system call per connection when `f` returns (or
/// earlier, once [`BATCH_BYTES`] are staged on one), written by this thread unless another
/// is writing on that connection. A queue sends the calls of one kick so, instead of one
/// system call each or a hand-off to the writer thread. Batches nest (the outer one sends).
pub fn batch<R>(f: impl FnOnce() -> R) -> R {
    if BATCH.with_borrow(Option::is_some) {
        return f();
    }
    BATCH.set(Some(Vec::new()));
    // Sends the batch even if `f` panics: staged frames must not wait for a later call.
    struct Flush;
    impl Drop for Flush {
        fn drop(&mut self) {
            for conn in BATCH.take().unwrap_or_default() {
                conn.flush();
            }
        }
    }
    let _flush = Flush;
    f()
}

fn complete(done: Done, result: Result<Response, PeerError>) {
    let outer = IN_COMPLETION.replace(true);
    if catch_unwind(AssertUnwindSafe(|| done(result))).is_err() {
        log::error!("a peer call's completion panicked");
    }
    IN_COMPLETION.set(outer);
}

/// Connections to one peer. Share it (`Arc<PeerClient>`) between threads; dropping the
/// last handle closes the connections and fails whatever is pending.
pub struct PeerClient {
    ctx: Arc<Context>,
    slots: Vec<Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
    timeout: Duration,
}

/// What every connection of a client needs.
struct Context {
    me: NodeId,
    peer: NodeId,
    addr: SocketAddr,
    key: ClusterKey,
    /// `--peer-encrypt`: asked for in the handshake; the server must agree.
    encrypt: bool,
    health: Mutex<Health>,
}

/// The peer's reachability as the last connection attempts found it.
#[derive(Default)]
struct Health {
    failures: u32,
    retry_at: Option<Instant>,
    last: Option<PeerError>,
    closed: bool,
}

impl Health {
    /// Ok when a new connection may be tried now.
    fn gate(&self, now: Instant) -> Result<(), PeerError> {
        if self.closed {
            return Err(PeerError::Unavailable("client closed".into()));
        }
        match (self.retry_at, &self.last) {
            (Some(at), Some(last)) if at > now => Err(last.clone()),
            _ => Ok(()),
        }
    }

    fn failed(&mut self, error: &PeerError) {
        self.failures = self.failures.saturating_add(1);
        let wait = match error {
            PeerError::Auth(_) => MAX_BACKOFF,
            _ => FIRST_BACKOFF
                .saturating_mul(1 << (self.failures - 1).min(16))
                .min(MAX_BACKOFF),
        };
        self.retry_at = Some(Instant::now() + wait);
        self.last = Some(error.clone());
    }

    fn succeeded(&mut self) {
        *self = Health {
            closed: self.closed,
            ..Health::default()
        };
    }
}

impl PeerClient {
    /// A client as node `me` for node `peer` at `addr`, with up to `pool` connections (at
    /// least one). Nothing connects until the first call.
    pub fn new(me: NodeId, peer: NodeId, addr: SocketAddr, key: ClusterKey, pool: usize) -> Self {
        PeerClient {
            ctx: Arc::new(Context {
                me,
                peer,
                addr,
                key,
                encrypt: false,
                health: Mutex::new(Health::default()),
            }),
            slots: (0..pool.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Encrypts (or not) the frames of every connection made from now on; the server must
    /// have the same setting, or it refuses the handshake.
    pub fn with_encryption(mut self, encrypt: bool) -> Self {
        let ctx = &self.ctx;
        self.ctx = Arc::new(Context {
            me: ctx.me.clone(),
            peer: ctx.peer.clone(),
            addr: ctx.addr,
            key: ctx.key.clone(),
            encrypt,
            health: Mutex::new(Health::default()),
        });
        self
    }

    /// Sets how long each call waits for its answer.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn peer(&self) -> &NodeId {
        &self.ctx.peer
    }

    /// Sends `request` without waiting for its answer; `done` gets the answer, an error or a
    /// timeout, exactly once. The calling thread writes the frame itself when no one else is
    /// writing on that connection, so it may block while the socket is full (for at most
    /// [`SEND_TIMEOUT`], after which the connection is dropped), and it waits while
    /// [`MAX_QUEUED_BYTES`] are queued (at most until the call's deadline). From inside a
    /// completion it never blocks. Deadlines are checked once the connection is up, so a call
    /// made while it is being opened can fail late by up to [`HANDSHAKE_TIMEOUT`].
    pub fn call(&self, request: Request, done: Done) {
        self.call_with_timeout(request, self.timeout, done);
    }

    /// Sends `request` and waits for the answer for at most `timeout`. Never call it from a
    /// completion: it would wait on the thread that delivers its answer.
    pub fn call_wait(&self, request: Request, timeout: Duration) -> Result<Response, PeerError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let done: Done = Box::new(move |result| {
            let _ = tx.send(result);
        });
        self.call_with_timeout(request, timeout, done);
        // The connection's reader times the call out; the slack covers its tick and a
        // connection still being opened.
        match rx.recv_timeout(timeout + HANDSHAKE_TIMEOUT) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(PeerError::Timeout(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(PeerError::Unavailable("call dropped".into()))
            }
        }
    }

    /// [`PeerClient::call`] with its own timeout instead of the client's (e.g. a longer one
    /// for control-path calls such as checksums of many blocks).
    pub fn call_with_timeout(&self, request: Request, timeout: Duration, done: Done) {
        let deadline = Instant::now() + timeout;
        let expects = request.expects();
        let payload = match request.encode() {
            Ok(payload) => payload,
            Err(e) => return complete(done, Err(PeerError::BadRequest(e))),
        };
        let conn = match self.pick() {
            Ok(conn) => conn,
            Err(e) => return complete(done, Err(e)),
        };
        if !IN_COMPLETION.get() && !conn.outbox.wait_room(MAX_QUEUED_BYTES, deadline) {
            return complete(done, Err(PeerError::Timeout(timeout)));
        }
        let landing = match expects {
            Expect::Data(len) => LANDING
                .take()
                .filter(|landing| landing.len() == len && len > 0),
            _ => None,
        };
        let pending = Pending {
            expects,
            deadline,
            timeout,
            done,
            landing,
        };
        conn.submit(payload, pending);
    }

    /// The next slot round-robin: its connection if alive, else a new one there unless the
    /// client is backing off, in which case any live connection; else the backoff's error.
    fn pick(&self) -> Result<Arc<Conn>, PeerError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut refusal = None;
        for i in 0..self.slots.len() {
            let mut slot = lock(&self.slots[(start + i) % self.slots.len()]);
            if let Some(conn) = slot.as_ref().filter(|c| !c.is_dead()) {
                return Ok(conn.clone());
            }
            match lock(&self.ctx.health).gate(Instant::now()) {
                Ok(()) => {
                    let conn = Conn::open(self.ctx.clone());
                    *slot = Some(conn.clone());
                    return Ok(conn);
                }
                Err(e) => refusal = Some(e),
            }
        }
        Err(refusal.unwrap_or_else(|| PeerError::Unavailable("no connection".into())))
    }

    /// Calls waiting for an answer, over all connections.
    pub fn pending(&self) -> usize {
        let conns = self.slots.iter().filter_map(|slot| lock(slot).clone());
        conns.map(|conn| lock(&conn.state).pending.len()).sum()
    }
}

impl Drop for PeerClient {
    fn drop(&mut self) {
        lock(&self.ctx.health).closed = true;
        for slot in &self.slots {
            let conn = lock(slot).take();
            if let Some(conn) = conn {
                conn.kill(PeerError::Unavailable("client closed".into()), false);
            }
        }
    }
}

struct Pending {
    expects: Expect,
    deadline: Instant,
    timeout: Duration,
    done: Done,
    /// Where a read's payload goes, answered `Ok` (see [`with_landing`]).
    landing: Option<Landing>,
}

/// One connection and the calls waiting on it.
struct Conn {
    ctx: Arc<Context>,
    next_id: AtomicU64,
    state: Mutex<ConnState>,
    outbox: Outbox,
    /// The socket once connected, to shut it down from any thread.
    stream: Mutex<Option<TcpStream>>,
}

#[derive(Default)]
struct ConnState {
    pending: HashMap<u64, Pending>,
    /// Set once, when the connection fails; every call after that fails with it.
    dead: Option<PeerError>,
    established: bool,
}

impl Conn {
    /// A connection that is being opened in the background; calls queue on it meanwhile.
    fn open(ctx: Arc<Context>) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            ctx,
            next_id: AtomicU64::new(1),
            state: Mutex::new(ConnState::default()),
            outbox: Outbox::new(|_, _| {}),
            stream: Mutex::new(None),
        });
        let name = format!("peer-{}", conn.ctx.peer);
        let runner = conn.clone();
        if let Err(e) = thread::Builder::new()
            .name(name)
            .spawn(move || runner.run())
        {
            conn.kill(
                PeerError::Unavailable(format!("cannot start a thread: {e}")),
                true,
            );
        }
        conn
    }

    fn is_dead(&self) -> bool {
        lock(&self.state).dead.is_some()
    }

    fn submit(self: &Arc<Self>, payload: Payload, pending: Pending) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = match payload.into_frame(id) {
            Ok(frame) => frame,
            Err(e) => return complete(pending.done, Err(PeerError::Protocol(e.to_string()))),
        };
        let alone = {
            let mut state = lock(&self.state);
            if let Some(error) = &state.dead {
                let error = error.clone();
                drop(state);
                return complete(pending.done, Err(error));
            }
            state.pending.insert(id, pending);
            state.pending.len() == 1
        };
        // If the outbox closed meanwhile, `kill` has failed (or will fail) the call. Inside a
        // `batch` the frame is staged and leaves with the batch. Otherwise a call alone on
        // its connection goes out from this thread, for latency; with others in flight the
        // writer thread sends it with theirs, in one system call. In a completion the writer
        // thread always sends it: this thread may be the connection's reader.
        if IN_COMPLETION.get() {
            self.outbox.push(frame, 0);
            return;
        }
        let frame = match self.stage_in_batch(frame) {
            Ok(()) => return,
            Err(frame) => frame,
        };
        if !alone {
            self.outbox.push(frame, 0);
        } else if let Err(e) = self.outbox.send(frame, 0) {
            self.failed_to_send(&e);
        }
    }

    /// Stages `frame` when this thread is inside [`batch`] (false, and `frame` untouched,
    /// when it is not); writes what is staged once it reaches [`BATCH_BYTES`].
    fn stage_in_batch(self: &Arc<Self>, frame: Outgoing) -> Result<(), Outgoing> {
        BATCH.with_borrow_mut(|batch| {
            let Some(conns) = batch else {
                return Err(frame);
            };
            self.outbox.stage(frame, 0);
            if !conns.iter().any(|c| Arc::ptr_eq(c, self)) {
                conns.push(self.clone());
            }
            Ok(())
        })?;
        if self.outbox.queued_bytes() >= BATCH_BYTES {
            self.flush();
        }
        Ok(())
    }

    /// Writes what is staged, from this thread unless another is writing.
    /// Writes what is staged, from this thread unless another is writing, or unless the
    /// socket has no room for it: then the writer thread sends it, and a peer that stopped
    /// reading holds up that thread rather than the caller (a queue serving a guest).
    fn flush(&self) {
        if !self.has_room(self.outbox.queued_bytes()) {
            return self.outbox.wake_writer();
        }
        if let Err(e) = self.outbox.flush() {
            self.failed_to_send(&e);
        }
    }

    /// Whether the socket's send buffer has room for `bytes` more, as far as the kernel
    /// says (SIOCOUTQ against SO_SNDBUF); true when it cannot tell.
    fn has_room(&self, bytes: usize) -> bool {
        let stream = lock(&self.stream);
        let Some(stream) = stream.as_ref() else {
            return true;
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (for a socket: SIOCOUTQ, the same number; unsent and unacknowledged
        // bytes) writes one int into `queued`, which lives across the call.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) } != 0 {
            return true;
        }
        let mut size: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) writes at most `len` bytes into `size`, which lives across
        // the call.
        let got = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&raw mut size).cast(),
                &raw mut len,
            )
        };
        if got != 0 {
            return true;
        }
        let free = usize::try_from(size.saturating_sub(queued)).unwrap_or(0);
        bytes <= free
    }

    fn failed_to_send(&self, e: &io::Error) {
        let error = format!("sending to {} failed: {e}", self.ctx.addr);
        self.kill(PeerError::Unavailable(error), true);
    }

    /// Fails the connection: every pending call gets `error`, once; so do later calls. With
    /// `report`, the loss of an established connection is logged.
    fn kill(&self, error: PeerError, report: bool) {
        let (pending, established) = {
            let mut state = lock(&self.state);
            if state.dead.is_some() {
                return;
            }
            state.dead = Some(error.clone());
            (std::mem::take(&mut state.pending), state.established)
        };
        self.outbox.close();
        if let Some(stream) = lock(&self.stream).as_ref() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if established && report {
            log::warn!("peer {}: connection lost: {error}", self.ctx.peer);
        }
        for (_, call) in pending {
            complete(call.done, Err(error.clone()));
        }
    }

    /// The connection's life: connect, authenticate, start the reader, write until done.
    fn run(self: Arc<Self>) {
        let (stream, session) = match self.connect() {
            Ok(connected) => connected,
            Err(e) => {
                self.note_connect_failure(&e);
                return self.kill(e, false);
            }
        };
        let reader = match stream.try_clone() {
            Ok(reader) => reader,
            Err(e) => return self.kill(PeerError::Unavailable(e.to_string()), true),
        };
        *lock(&self.stream) = stream.try_clone().ok();
        lock(&self.ctx.health).succeeded();
        {
            let mut state = lock(&self.state);
            if state.dead.is_some() {
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            state.established = true;
        }
        log::debug!("peer {}: connected to {}", self.ctx.peer, self.ctx.addr);
        let conn = self.clone();
        let name = format!("peer-{}-rd", self.ctx.peer);
        if let Err(e) = thread::Builder::new()
            .name(name)
            .spawn(move || conn.read(reader, session.opener))
        {
            return self.kill(
                PeerError::Unavailable(format!("cannot start a thread: {e}")),
                true,
            );
        }
        match stream.try_clone() {
            Ok(writer) => self.outbox.attach(writer, Some(session.sealer)),
            Err(e) => return self.kill(PeerError::Unavailable(e.to_string()), true),
        }
        let error = match self.outbox.run() {
            Ok(()) => PeerError::Unavailable("connection closed".into()),
            Err(e) => PeerError::Unavailable(format!("sending to {} failed: {e}", self.ctx.addr)),
        };
        self.kill(error, true);
    }

    fn connect(&self) -> Result<(TcpStream, Session), PeerError> {
        let ctx = &self.ctx;
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            PeerError::Unavailable(format!("{what} {} at {}: {e}", ctx.peer, ctx.addr))
        };
        let stream = TcpStream::connect_timeout(&ctx.addr, HANDSHAKE_TIMEOUT)
            .map_err(|e| unavailable("cannot connect to", &e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| unavailable("cannot set up", &e))?;
        let session = auth::client_handshake(
            &stream,
            &ctx.me,
            &ctx.peer,
            &ctx.key,
            ctx.encrypt,
            HANDSHAKE_TIMEOUT,
        )
        .map_err(|e| match e.is_io() {
            true => unavailable("handshake with", &e),
            false => PeerError::Auth(format!("{} at {}: {e}", ctx.peer, ctx.addr)),
        })?;
        // Reads wake up every tick to time calls out.
        let setup = |s: &TcpStream| -> io::Result<()> {
            s.set_read_timeout(Some(TICK))?;
            s.set_write_timeout(Some(SEND_TIMEOUT))
        };
        setup(&stream).map_err(|e| unavailable("cannot set up", &e))?;
        Ok((stream, session))
    }

    fn note_connect_failure(&self, error: &PeerError) {
        let mut health = lock(&self.ctx.health);
        health.failed(error);
        let n = health.failures;
        drop(health);
        if n <= CONNECT_FAILURES_LOGGED || n.is_power_of_two() {
            log::warn!("peer {}: {error} ({n} failures in a row)", self.ctx.peer);
        }
    }

    /// Reads answers until the connection ends, then fails whatever is left. An answer
    /// whose tag fails ends the connection.
    fn read(self: Arc<Self>, stream: TcpStream, opener: Opener) {
        let mut reader = BufReader::with_capacity(READ_BUFFER, &stream);
        let mut decoder = Decoder::sealed(MAX_PAYLOAD, opener);
        let mut next_scan = Instant::now() + TICK;
        let error = loop {
            match self.land(&mut decoder, &mut reader) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => break e,
            }
            match decoder.read_from(&mut reader) {
                Ok(Some(frame)) => {
                    if let Err(e) = self.answer(frame) {
                        break e;
                    }
                }
                Ok(None) => break PeerError::Unavailable("the peer closed the connection".into()),
                Err(ReadError::Io(e)) if is_timeout(&e) => {}
                Err(ReadError::Io(e)) => {
                    break PeerError::Unavailable(format!("connection lost: {e}"))
                }
                Err(ReadError::Frame(e)) => break PeerError::Protocol(format!("bad frame: {e}")),
            }
            if self.is_dead() {
                return;
            }
            let now = Instant::now();
            if now >= next_scan {
                self.expire(now);
                next_scan = now + TICK;
            }
        };
        self.kill(error, true);
    }

    /// When the next frame (whole header buffered) answers a call with a landing, decodes
    /// its payload into the landing and completes the call: `Ok(true)`. The call is out of
    /// the pending map meanwhile, so neither `kill` nor `expire` completes it; it fails here
    /// if the frame does (the connection is then done for: `Err`), or if its deadline passes
    /// mid-frame. `Ok(false)`: nothing to land, read the frame as usual.
    fn land(
        &self,
        decoder: &mut Decoder,
        reader: &mut BufReader<&TcpStream>,
    ) -> Result<bool, PeerError> {
        if !decoder.is_idle() {
            return Ok(false);
        }
        if reader.buffer().is_empty() {
            match reader.fill_buf() {
                Ok(_) => {}
                // Let the usual path see (and report) it.
                Err(_) => return Ok(false),
            }
        }
        let Some(peeked) = decoder.peek(reader.buffer()) else {
            return Ok(false);
        };
        if peeked.kind != Kind::Data {
            return Ok(false);
        }
        let call = {
            let mut state = lock(&self.state);
            let lands = state.pending.get(&peeked.id).is_some_and(|call| {
                call.landing
                    .as_ref()
                    .is_some_and(|landing| landing.len() == peeked.len)
            });
            match lands {
                true => state.pending.remove(&peeked.id),
                false => None,
            }
        };
        let Some(mut call) = call else {
            return Ok(false);
        };
        let Some(landing) = call.landing.take() else {
            return Ok(false);
        };
        let deadline = call.deadline;
        let landed = decoder.land(reader, &mut |at, bytes| landing.put(at, bytes), &mut || {
            !self.is_dead() && Instant::now() < deadline
        });
        drop(landing);
        match landed {
            Ok(()) => {
                complete(call.done, Ok(Response::Ok));
                Ok(true)
            }
            Err(e) => {
                let error = match e {
                    ReadError::Io(e) if is_timeout(&e) => PeerError::Timeout(call.timeout),
                    ReadError::Io(e) => PeerError::Unavailable(format!("connection lost: {e}")),
                    ReadError::Frame(e) => PeerError::Protocol(format!("bad frame: {e}")),
                };
                complete(call.done, Err(error.clone()));
                Err(error)
            }
        }
    }

    /// Completes the call `frame` answers. An `Err` is a protocol violation that ends the
    /// connection. An answer for no pending call (it timed out) is dropped.
    fn answer(&self, frame: Frame) -> Result<(), PeerError> {
        if !frame.kind.is_response() {
            return Err(PeerError::Protocol(format!(
                "the peer sent a {:?} frame",
                frame.kind
            )));
        }
        let Some(call) = lock(&self.state).pending.remove(&frame.id) else {
            log::debug!(
                "peer {}: late answer to request {}",
                self.ctx.peer,
                frame.id
            );
            return Ok(());
        };
        let result = match Response::decode(frame.kind, frame.payload) {
            Ok(Response::Error { code, message }) => Err(PeerError::Refused { code, message }),
            Ok(response) if call.expects.accepts(&response) => Ok(response),
            Ok(response) => Err(PeerError::Protocol(format!(
                "a {:?} answer does not fit the request",
                response.kind()
            ))),
            Err(e) => Err(PeerError::Protocol(e.to_string())),
        };
        complete(call.done, result);
        Ok(())
    }

    /// Fails the calls whose deadline has passed.
    fn expire(&self, now: Instant) {
        let expired: Vec<Pending> = {
            let mut state = lock(&self.state);
            let ids: Vec<u64> = state
                .pending
                .iter()
                .filter(|(_, call)| call.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.iter()
                .filter_map(|id| state.pending.remove(id))
                .collect()
        };
        for call in expired {
            complete(call.done, Err(PeerError::Timeout(call.timeout)));
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
