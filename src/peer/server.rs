//! The peer server: accepts connections, authenticates them, and runs each request through a
//! [`PeerHandler`], answering out of order as handlers finish.
//!
//! Threads per connection: one that does the handshake and then reads frames,
//! [`WORKERS_PER_CONNECTION`] that call the handler, and one that writes answers in batches
//! (an answer to the only request in flight goes out from its worker, saving a hand-off).
//! Requests the handler finds cheap (a RAM-tier copy: [`PeerHandler::handle_inline`]) are
//! answered by the reader itself, and the answers to what one read brought in leave together
//! in one system call, so such a request crosses no thread on this side. The reader
//! stops reading while [`MAX_IN_FLIGHT`] requests or [`MAX_IN_FLIGHT_BYTES`] are in flight on
//! its connection (read but not yet answered on the wire), so a fast peer is slowed down by
//! TCP rather than by our memory.

use std::collections::HashMap;
use std::io::{self, BufReader};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::auth::{self, ClusterKey, HANDSHAKE_TIMEOUT};
use super::frame::{Decoder, Frame, FrameError, Outgoing, ReadError, MAX_PAYLOAD};
use super::lock;
use super::message::{code, MessageError, Request, Response};
use super::outbox::Outbox;
use super::seal::{Opener, Session};
use crate::image::NodeId;

/// Authenticated connections at once: 16 peers with a pool of 4 each.
pub const MAX_CONNECTIONS: usize = 64;

/// Connections still in their handshake at once. A handshake takes two round trips; this
/// many is plenty for peers reconnecting together, and a flood of strangers holding
/// connections open cannot take more slots than this (each for [`HANDSHAKE_TIMEOUT`] at most).
pub const MAX_HANDSHAKES: usize = 16;

/// Connections from one IP address still in their handshake at once. A node keeps one pooled
/// connection to each peer (`peers.rs`), and a client pool that lost every connection opens
/// at most a few again together; 4 covers that. It means a single address, the cheapest thing
/// to flood from, can hold at most a quarter of the [`MAX_HANDSHAKES`] slots, so peers at other
/// addresses still get in while it idles (each slot for [`HANDSHAKE_TIMEOUT`] at most).
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 4;

/// Handler calls running at once per connection. A client pool spreads its calls over
/// several connections, so a peer gets a few times this.
pub const WORKERS_PER_CONNECTION: usize = 4;

/// Requests read and not yet answered per connection. Enough to keep the workers busy and
/// the link full for a QD32 client over a pool, small enough to bound memory.
pub const MAX_IN_FLIGHT: usize = 64;

/// Request and answer bytes in flight per connection: 32 one-MiB chunks. One more frame may
/// be read past it (up to `MAX_PAYLOAD`), so a connection holds at most about 48 MiB.
pub const MAX_IN_FLIGHT_BYTES: usize = 32 << 20;

/// A peer that takes none of our answers for this long is dropped (it is hung, or gone
/// without a FIN).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Read buffer per connection: many small requests per system call.
const READ_BUFFER: usize = 64 << 10;

/// Handshake failures logged one by one; after that only every power of two, so strangers
/// cannot flood the log.
const AUTH_FAILURES_LOGGED: u64 = 8;

/// What the server does with requests. Called on worker threads, several at once.
pub trait PeerHandler: Send + Sync {
    /// Answers one request from the authenticated node `from`. A panic is answered with
    /// `code::INTERNAL`.
    fn handle(&self, from: &NodeId, request: Request) -> Response;

    /// Answers `request` at once on the thread that read it, when that is cheap (a memory
    /// copy: no disk, no lock that waits on I/O, no look-up elsewhere), saving the hand-off
    /// to a worker and back; otherwise hands it back for [`PeerHandler::handle`] on a worker.
    /// Requests after it on the connection wait meanwhile. A panic is answered with
    /// `code::INTERNAL`. The default answers nothing inline.
    fn handle_inline(&self, from: &NodeId, request: Request) -> Result<Response, Request> {
        let _ = from;
        Err(request)
    }
}

/// A running server; [`PeerServer::stop`] (or dropping it) ends it.
pub struct PeerServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// A handle on the listening socket, to wake the accept loop.
    listener: TcpListener,
    accept: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    key: ClusterKey,
    /// `--peer-encrypt`: clients must ask for the same.
    encrypt: bool,
    node: NodeId,
    handler: Arc<dyn PeerHandler>,
    stopping: AtomicBool,
    registry: Mutex<Registry>,
    auth_failures: AtomicU64,
}

#[derive(Default)]
struct Registry {
    next: u64,
    handshaking: usize,
    /// Connections in their handshake per source address; an address leaves at zero.
    handshaking_from: HashMap<IpAddr, usize>,
    live: usize,
    /// Every connection thread still running, with its socket (to shut it down on stop).
    threads: HashMap<u64, (TcpStream, Option<JoinHandle<()>>)>,
}

impl Registry {
    fn start_handshake(&mut self, from: IpAddr) {
        self.handshaking += 1;
        *self.handshaking_from.entry(from).or_default() += 1;
    }

    fn end_handshake(&mut self, from: IpAddr) {
        self.handshaking -= 1;
        if let Some(count) = self.handshaking_from.get_mut(&from) {
            *count -= 1;
            if *count == 0 {
                self.handshaking_from.remove(&from);
            }
        }
    }
}

impl PeerServer {
    /// Listens on `listen` (port 0 picks one: see [`PeerServer::local_addr`]) as node `node`.
    pub fn start(
        listen: SocketAddr,
        key: ClusterKey,
        node: NodeId,
        handler: Arc<dyn PeerHandler>,
    ) -> io::Result<PeerServer> {
        PeerServer::start_with_encryption(listen, key, node, handler, false)
    }

    /// [`PeerServer::start`], with frames after the handshake encrypted if `encrypt`: a
    /// client with the other setting is refused, with a reason naming both.
    pub fn start_with_encryption(
        listen: SocketAddr,
        key: ClusterKey,
        node: NodeId,
        handler: Arc<dyn PeerHandler>,
        encrypt: bool,
    ) -> io::Result<PeerServer> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            key,
            encrypt,
            node,
            handler,
            stopping: AtomicBool::new(false),
            registry: Mutex::new(Registry::default()),
            auth_failures: AtomicU64::new(0),
        });
        let handle = listener.try_clone()?;
        let accept = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("peer-accept".into())
                .spawn(move || accept_loop(&shared, listener))?
        };
        log::info!("peer server for node {} listening on {addr}", shared.node);
        Ok(PeerServer {
            shared,
            addr,
            listener: handle,
            accept: Mutex::new(Some(accept)),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every connection and waits for their threads (and so for
    /// handler calls in progress) to end. Calls in flight fail on the clients' side.
    pub fn stop(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: shutdown(2) on a descriptor owned by `self.listener`, open for the call;
        // on a listening socket it wakes a blocked accept(2) with EINVAL.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(accept) = lock(&self.accept).take() {
            let _ = accept.join();
        }
        let threads: Vec<_> = lock(&self.shared.registry).threads.drain().collect();
        for (_, (stream, _)) in &threads {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, (_, handle)) in threads {
            if let Some(handle) = handle {
                let _ = handle.join();
            }
        }
        log::info!("peer server on {} stopped", self.addr);
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, from)) => admit(shared, stream, from),
            Err(e) => {
                log::warn!("peer server: accept failed: {e}");
                // EMFILE and friends: do not spin while descriptors are short.
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Starts a connection's thread, or closes the connection when the server is full.
fn admit(shared: &Arc<Shared>, stream: TcpStream, from: SocketAddr) {
    let mut registry = lock(&shared.registry);
    let refusal = if registry.handshaking >= MAX_HANDSHAKES
        || registry.handshaking + registry.live >= MAX_CONNECTIONS
    {
        Some("server full: connection closed")
    } else if registry
        .handshaking_from
        .get(&from.ip())
        .copied()
        .unwrap_or(0)
        >= MAX_HANDSHAKES_PER_ADDRESS
    {
        Some("too many handshakes in progress from this address: connection closed")
    } else {
        None
    };
    if let Some(refusal) = refusal {
        drop(registry);
        note_auth_failure(shared, from, &refusal);
        return;
    }
    let Ok(handle_stream) = stream.try_clone() else {
        return;
    };
    registry.start_handshake(from.ip());
    registry.next += 1;
    let id = registry.next;
    registry.threads.insert(id, (handle_stream, None));
    let spawned = {
        let shared = shared.clone();
        thread::Builder::new()
            .name("peer-conn".into())
            .spawn(move || connection(&shared, id, stream, from))
    };
    match spawned {
        Ok(handle) => {
            if let Some(entry) = registry.threads.get_mut(&id) {
                entry.1 = Some(handle);
            }
        }
        Err(e) => {
            registry.end_handshake(from.ip());
            registry.threads.remove(&id);
            log::warn!("peer server: cannot start a connection thread: {e}");
        }
    }
}

fn note_auth_failure(shared: &Shared, from: SocketAddr, error: &dyn std::fmt::Display) {
    let n = shared.auth_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= AUTH_FAILURES_LOGGED || n.is_power_of_two() {
        log::warn!("peer handshake from {from} refused: {error} ({n} so far)");
    }
}

/// One connection's life: handshake, serve, clean up.
fn connection(shared: &Arc<Shared>, id: u64, stream: TcpStream, from: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let peer = auth::server_handshake(
        &stream,
        &shared.node,
        &shared.key,
        shared.encrypt,
        HANDSHAKE_TIMEOUT,
    );
    let authenticated = {
        let mut registry = lock(&shared.registry);
        registry.end_handshake(from.ip());
        registry.live += usize::from(peer.is_ok());
        peer.is_ok()
    };
    match peer {
        Ok((peer, session)) => {
            log::info!("peer {peer} connected from {from}");
            match serve(shared, &stream, &peer, session) {
                Ok(()) => log::info!("peer {peer} at {from} disconnected"),
                Err(e) => log::warn!("peer {peer} at {from}: connection closed: {e}"),
            }
        }
        Err(e) => note_auth_failure(shared, from, &e),
    }
    let _ = stream.shutdown(Shutdown::Both);
    let mut registry = lock(&shared.registry);
    registry.live -= usize::from(authenticated);
    registry.threads.remove(&id);
}

/// Requests read and answers not yet written, on one connection.
#[derive(Default)]
struct Flight {
    count: usize,
    bytes: usize,
}

/// The in-flight budget of one connection: the reader charges it, written answers release it.
#[derive(Default)]
struct Gauge {
    flight: Mutex<Flight>,
    room: Condvar,
}

impl Gauge {
    fn charge(&self, count: usize, bytes: usize) {
        let mut flight = lock(&self.flight);
        flight.count += count;
        flight.bytes += bytes;
    }

    fn release(&self, count: usize, bytes: usize) {
        let mut flight = lock(&self.flight);
        flight.count -= count;
        flight.bytes -= bytes;
        self.room.notify_all();
    }

    fn in_flight(&self) -> usize {
        lock(&self.flight).count
    }

    fn is_full(&self) -> bool {
        let flight = lock(&self.flight);
        flight.count >= MAX_IN_FLIGHT || flight.bytes >= MAX_IN_FLIGHT_BYTES
    }

    /// Blocks while the connection is full. False once `closed` says so.
    fn wait_for_room(&self, closed: impl Fn() -> bool) -> bool {
        let mut flight = lock(&self.flight);
        while flight.count >= MAX_IN_FLIGHT || flight.bytes >= MAX_IN_FLIGHT_BYTES {
            if closed() {
                return false;
            }
            // Closing does not signal this condvar: look again now and then.
            flight = match self.room.wait_timeout(flight, Duration::from_millis(100)) {
                Ok((flight, _)) => flight,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        !closed()
    }
}

struct Connection {
    peer: NodeId,
    /// Answers go out from the thread that produced them when no one else is writing.
    outbox: Outbox,
    gauge: Arc<Gauge>,
    stream: TcpStream,
    /// Per-request errors a peer causes are logged at this rate, so one misbehaving peer
    /// cannot flood the log.
    logs: crate::logs::SharedThrottle,
}

struct Job {
    id: u64,
    request: Request,
    charge: usize,
}

/// Serves an authenticated connection until it closes; an `Err` says why it was cut (a frame
/// whose tag fails is one).
fn serve(
    shared: &Arc<Shared>,
    stream: &TcpStream,
    peer: &NodeId,
    session: Session,
) -> Result<(), ReadError> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(Some(SEND_TIMEOUT))?;
    let gauge = Arc::new(Gauge::default());
    let outbox = Outbox::new({
        let gauge = gauge.clone();
        move |frames, charges| gauge.release(frames, charges)
    });
    outbox.attach(stream.try_clone()?, Some(session.sealer));
    let conn = Arc::new(Connection {
        peer: peer.clone(),
        outbox,
        gauge,
        stream: stream.try_clone()?,
        logs: crate::logs::SharedThrottle::default(),
    });
    let (jobs, queue) = mpsc::channel();
    let queue = Arc::new(Mutex::new(queue));
    let mut threads = Vec::with_capacity(WORKERS_PER_CONNECTION + 1);
    for _ in 0..WORKERS_PER_CONNECTION {
        let (conn, queue, handler) = (conn.clone(), queue.clone(), shared.handler.clone());
        threads.push(
            thread::Builder::new()
                .name("peer-worker".into())
                .spawn(move || work(&conn, &queue, handler.as_ref()))?,
        );
    }
    let writer = {
        let conn = conn.clone();
        thread::Builder::new()
            .name("peer-writer".into())
            .spawn(move || write_answers(&conn))?
    };
    threads.push(writer);
    let result = read_requests(
        &conn,
        stream,
        &jobs,
        session.opener,
        shared.handler.as_ref(),
    );
    conn.outbox.close();
    let _ = stream.shutdown(Shutdown::Both);
    drop(jobs);
    for thread in threads {
        let _ = thread.join();
    }
    result
}

/// The writer thread: sends the answers no worker sent itself.
fn write_answers(conn: &Connection) {
    if let Err(e) = conn.outbox.run() {
        log::warn!("peer {}: cannot send answers: {e}", conn.peer);
    }
    conn.outbox.close();
    let _ = conn.stream.shutdown(Shutdown::Both);
}

fn read_requests(
    conn: &Connection,
    stream: &TcpStream,
    jobs: &Sender<Job>,
    opener: Opener,
    handler: &dyn PeerHandler,
) -> Result<(), ReadError> {
    let mut reader = BufReader::with_capacity(READ_BUFFER, stream);
    let mut decoder = Decoder::sealed(MAX_PAYLOAD, opener);
    loop {
        // Answers given inline are staged; they leave together, in one system call, once no
        // further request can be had without waiting (or the connection is full: they are
        // what frees it).
        if !decoder.holds_frame(reader.buffer()) || conn.gauge.is_full() {
            conn.flush_staged();
        }
        if !conn.gauge.wait_for_room(|| conn.outbox.is_closed()) {
            return Ok(());
        }
        let Some(frame) = decoder.read_from(&mut reader)? else {
            return Ok(());
        };
        if !frame.kind.is_request() {
            let what = format!("a {:?} frame where requests go", frame.kind);
            return Err(ReadError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                what,
            )));
        }
        dispatch(conn, frame, jobs, handler);
    }
}

/// Answers a request inline when the handler finds that cheap, else hands it to the
/// workers; answers at once when its payload does not decode (the frame itself was sound,
/// so the connection stays up).
fn dispatch(conn: &Connection, frame: Frame, jobs: &Sender<Job>, handler: &dyn PeerHandler) {
    let charge = frame.payload.len();
    conn.gauge.charge(1, charge);
    let request = match Request::decode(frame.kind, frame.payload) {
        Ok(request) => request,
        Err(e) => {
            if let Some(n) = conn.logs.allow() {
                log::warn!(
                    "peer {}: bad {:?} request: {e} ({n} errors on this connection)",
                    conn.peer,
                    frame.kind
                );
            }
            let answer = Response::error(code::BAD_REQUEST, e.to_string());
            return conn.answer(frame.id, answer, charge, Delivery::Stage);
        }
    };
    let inline = catch_unwind(AssertUnwindSafe(|| {
        handler.handle_inline(&conn.peer, request)
    }));
    let request = match inline {
        Ok(Ok(answer)) => return conn.answer(frame.id, answer, charge, Delivery::Stage),
        Ok(Err(request)) => request,
        Err(_) => {
            log::error!("peer {}: the request handler panicked", conn.peer);
            let answer = Response::error(code::INTERNAL, "the request handler panicked");
            return conn.answer(frame.id, answer, charge, Delivery::Stage);
        }
    };
    let job = Job {
        id: frame.id,
        request,
        charge,
    };
    if jobs.send(job).is_err() {
        conn.gauge.release(1, charge);
    }
}

fn work(conn: &Connection, queue: &Mutex<Receiver<Job>>, handler: &dyn PeerHandler) {
    loop {
        let job = lock(queue).recv();
        let Ok(job) = job else { return };
        if conn.outbox.is_closed() {
            conn.gauge.release(1, job.charge);
            continue;
        }
        let answer = catch_unwind(AssertUnwindSafe(|| handler.handle(&conn.peer, job.request)));
        let answer = answer.unwrap_or_else(|_| {
            log::error!("peer {}: the request handler panicked", conn.peer);
            Response::error(code::INTERNAL, "the request handler panicked")
        });
        conn.answer(job.id, answer, job.charge, Delivery::Now);
    }
}

/// Why an answer could not be put in a frame.
#[derive(Debug, thiserror::Error)]
enum EncodeError {
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

fn encode_answer(id: u64, response: Response) -> Result<Outgoing, EncodeError> {
    Ok(response.encode()?.into_frame(id)?)
}

/// How an answer leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// From this thread if it is the only request in flight (for latency), else with the
    /// others, by the writer thread, in one system call.
    Now,
    /// Staged, to leave with the next [`Connection::flush_staged`] (the reader's answers).
    Stage,
}

impl Connection {
    /// Sends the answer to request `id`; `charge` is what the request holds of the budget.
    fn answer(&self, id: u64, response: Response, charge: usize, how: Delivery) {
        let frame = encode_answer(id, response).or_else(|e| {
            if let Some(n) = self.logs.allow() {
                log::error!(
                    "peer {}: cannot encode an answer: {e} ({n} errors on this connection)",
                    self.peer
                );
            }
            let fallback = format!("the answer could not be encoded: {e}");
            encode_answer(id, Response::error(code::INTERNAL, fallback))
        });
        let Ok(frame) = frame else {
            return self.gauge.release(1, charge);
        };
        let charge = charge + frame.len();
        self.gauge.charge(0, frame.len());
        let sent = match (how, self.gauge.in_flight()) {
            (Delivery::Stage, _) => Ok(self.outbox.stage(frame, charge)),
            (Delivery::Now, 1) => self.outbox.send(frame, charge),
            (Delivery::Now, _) => Ok(self.outbox.push(frame, charge)),
        };
        self.sent(sent, charge);
    }

    /// Writes the staged answers from this thread (unless another is writing: it takes them).
    fn flush_staged(&self) {
        match self.outbox.flush() {
            Ok(_) => {}
            Err(e) => self.sent(Err(e), 0),
        }
    }

    fn sent(&self, sent: io::Result<bool>, charge: usize) {
        match sent {
            Ok(true) => {}
            Ok(false) => self.gauge.release(1, charge),
            Err(e) => {
                log::warn!("peer {}: cannot send answers: {e}", self.peer);
                self.outbox.close();
                let _ = self.stream.shutdown(Shutdown::Both);
            }
        }
    }
}
