//! Connecting to a vhost-user-blk backend the way QEMU does, and disconnecting cleanly.
//!
//! Message order (QEMU 10's `vhost_user_backend_init`, `vhost_dev_init`, vhost-user-blk realize,
//! then `vhost_dev_start`): GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
//! GET_QUEUE_NUM, SET_OWNER, GET_CONFIG, SET_FEATURES, SET_MEM_TABLE, then per queue
//! SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, and last
//! SET_VRING_ENABLE(1) per queue. Stopping is SET_VRING_ENABLE(0) and GET_VRING_BASE per queue.
//!
//! Gotchas found on the way (vhost 0.18, qemu-storage-daemon 10.0):
//! - SET_VRING_ADDR carries addresses in the *frontend's* virtual address space, not guest
//!   physical ones; the backend maps them through each region's `userspace_addr`.
//! - vhost's `set_vring_enable` refuses unless VHOST_USER_F_PROTOCOL_FEATURES (bit 30) was in
//!   our SET_FEATURES, and with that bit the rings start disabled: without SET_VRING_ENABLE(1)
//!   the backend never looks at them.
//! - REPLY_ACK does nothing in vhost's `Frontend` until `set_hdr_flags(NEED_REPLY)`.
//! - vhost's `Endpoint` retries EAGAIN forever, so socket timeouts cannot bound a control
//!   message; a watchdog thread shuts the socket down instead (`Control`).
//! - GET_CONFIG: see [`CONFIG_READ_LEN`] for the sizes qemu-storage-daemon accepts.

use std::fs::File;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VringConfigData};

use super::blk::{feature, BlkConfig, BlkRequest, DiscardRange, CONFIG_READ_LEN, ID_BYTES};
use super::memory::{BumpAlloc, GuestMem};
use super::queue::{BlkQueue, Completion, QueueSetup, Token};
use super::raw::{RawChain, RawReply};
use super::vring::{RawDesc, UsedElem, MAX_QUEUE_SIZE};
use super::{Error, Result};

/// `VIRTIO_F_VERSION_1`: required, we only speak virtio 1.x (little-endian, no legacy layout).
const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
const F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
const F_EVENT_IDX: u64 = 1 << 29;

/// Most queues a client opens: virtio-blk's `num_queues` is 16 bits, but a test or benchmark
/// with more than 64 queues is a mistake, and every queue costs eventfds and guest memory.
pub const MAX_QUEUES: u16 = 64;

/// How a [`BlkClient`] connects. `Default` is one 256-entry queue in 64 MiB.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Queues to set up (at most what the backend offers and [`MAX_QUEUES`]).
    pub num_queues: u16,
    /// Entries per queue: a power of two, at most 32768 (qemu-storage-daemon: 1024).
    pub queue_size: u16,
    /// Guest memory in bytes (multiple of 4096): rings first, the rest split evenly into one
    /// data arena per queue.
    pub mem_size: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if offered (notification suppression as Linux does).
    pub event_idx: bool,
    /// Negotiate VIRTIO_RING_F_INDIRECT_DESC if offered and send each typed request as one
    /// indirect descriptor (as Linux does), so a queue holds `queue_size` requests, not a third.
    pub indirect: bool,
    /// How long to keep retrying `connect` while the socket is missing or refuses.
    pub connect_timeout: Duration,
    /// Deadline of each control message exchange; past it the connection is shut down.
    pub control_timeout: Duration,
    /// Timeout of the blocking calls (`read`, `write`, ...).
    pub io_timeout: Duration,
    /// Ask for an in-flight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) and hand it back,
    /// before the queues start, as QEMU does.
    pub inflight: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            queue_size: 256,
            mem_size: 64 << 20,
            event_idx: true,
            indirect: true,
            connect_timeout: Duration::from_secs(5),
            control_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            inflight: false,
        }
    }
}

/// What was negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Virtio features the backend offered.
    pub offered: u64,
    /// Virtio features we acked (SET_FEATURES).
    pub acked: u64,
    /// Protocol features the backend offered.
    pub protocol_offered: VhostUserProtocolFeatures,
    /// Protocol features we acked.
    pub protocol_acked: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM (1 without MQ).
    pub backend_queues: u64,
}

/// A connected vhost-user-blk frontend with its guest memory and queues.
///
/// Dropping it stops the rings and closes the connection (see [`BlkClient::close`]).
pub struct BlkClient {
    ctl: Control,
    sock: Arc<UnixStream>,
    mem: GuestMem,
    config: BlkConfig,
    negotiated: Negotiated,
    queues: Vec<BlkQueue>,
    closed: bool,
    /// The in-flight region the backend gave us, kept like QEMU keeps it.
    inflight: Option<(VhostUserInflight, File)>,
}

impl std::fmt::Debug for BlkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkClient")
            .field("config", &self.config)
            .field("negotiated", &self.negotiated)
            .field("queues", &self.queues.len())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

/// The vhost-user control channel, with a deadline on every exchange.
///
/// The socket's own timeouts do not help: vhost 0.18's `Endpoint` retries a receive that failed
/// with EAGAIN forever, so SO_RCVTIMEO only turns a hang into a slow loop. Instead a watchdog
/// thread shuts the socket down when an exchange overruns; the blocked receive then sees end of
/// file and the call fails. The connection is dead after that, which is what a backend that
/// stops answering control messages deserves.
struct Control {
    frontend: Frontend,
    sock: Arc<UnixStream>,
    timeout: Duration,
}

impl Control {
    /// Connects to the backend at `path`; also returns the socket, which the queues watch for
    /// hang-ups.
    fn connect(path: &Path, opts: &ClientOptions) -> Result<(Control, Arc<UnixStream>)> {
        let stream = connect_with_retry(path, opts.connect_timeout)?;
        let sock = Arc::new(
            stream
                .try_clone()
                .map_err(|source| Error::Socket { source })?,
        );
        let ctl = Control {
            frontend: Frontend::from_stream(stream, u64::from(opts.num_queues)),
            sock: Arc::clone(&sock),
            timeout: opts.control_timeout,
        };
        Ok((ctl, sock))
    }

    fn call<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T> {
        let (done, wait) = mpsc::channel::<()>();
        let fired = AtomicBool::new(false);
        let (sock, timeout, fired_ref) = (&*self.sock, self.timeout, &fired);
        let frontend = &mut self.frontend;
        let result = std::thread::scope(|s| {
            s.spawn(move || {
                if wait.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout) {
                    fired_ref.store(true, Ordering::SeqCst);
                    let _ = sock.shutdown(Shutdown::Both);
                }
            });
            let r = f(frontend);
            drop(done);
            r
        });
        if fired.load(Ordering::SeqCst) {
            return Err(Error::ControlTimeout {
                op,
                waited: timeout,
            });
        }
        result.map_err(|source| Error::Vhost { op, source })
    }
}

impl BlkClient {
    /// Connects to the backend at `path`, negotiates, and starts `opts.num_queues` queues.
    pub fn connect(path: impl AsRef<Path>, opts: &ClientOptions) -> Result<Self> {
        check_options(opts)?;
        let (mut ctl, sock) = Control::connect(path.as_ref(), opts)?;
        let negotiated = negotiate(&mut ctl, opts)?;
        let config = read_config(&mut ctl)?;
        check_queue_count(opts, &negotiated, &config)?;
        ctl.call("SET_FEATURES", |f| f.set_features(negotiated.acked))?;
        let mem = GuestMem::new(opts.mem_size)?;
        let region = mem.region_info()?;
        ctl.call("SET_MEM_TABLE", |f| f.set_mem_table(&[region]))?;
        let inflight = if negotiated
            .protocol_acked
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            let asked = VhostUserInflight::new(0, 0, opts.num_queues, opts.queue_size);
            let (info, file) = ctl.call("GET_INFLIGHT_FD", |f| f.get_inflight_fd(&asked))?;
            ctl.call("SET_INFLIGHT_FD", |f| {
                f.set_inflight_fd(&info, file.as_raw_fd())
            })?;
            Some((info, file))
        } else {
            None
        };
        let setup = QueueSetup {
            size: opts.queue_size,
            event_idx: negotiated.acked & F_EVENT_IDX != 0,
            indirect: negotiated.acked & F_INDIRECT_DESC != 0,
            io_timeout: opts.io_timeout,
        };
        let queues = build_queues(&mem, opts.num_queues, setup, &sock)?;
        for q in &queues {
            start_queue(&mut ctl, &mem, q, 0)?;
        }
        for q in &queues {
            let i = q.index() as usize;
            ctl.call("SET_VRING_ENABLE", |f| f.set_vring_enable(i, true))?;
        }
        Ok(BlkClient {
            ctl,
            sock,
            mem,
            config,
            negotiated,
            queues,
            closed: false,
            inflight,
        })
    }

    /// GET_INFLIGHT_FD, as a test of the backend: asks for a region for `num_queues` queues
    /// of `queue_size` entries.
    pub fn get_inflight(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(VhostUserInflight, File)> {
        let asked = VhostUserInflight::new(0, 0, num_queues, queue_size);
        self.ctl
            .call("GET_INFLIGHT_FD", |f| f.get_inflight_fd(&asked))
    }

    /// SET_INFLIGHT_FD, as a test of the backend: hands it `file` as described by `info`.
    pub fn set_inflight(&mut self, info: &VhostUserInflight, file: &File) -> Result<()> {
        self.ctl.call("SET_INFLIGHT_FD", |f| {
            f.set_inflight_fd(info, file.as_raw_fd())
        })
    }

    /// The in-flight region negotiated at connect time, if any.
    pub fn inflight_region(&self) -> Option<&File> {
        self.inflight.as_ref().map(|(_, file)| file)
    }

    /// Connects again to a backend that went away (killed, restarted) and resumes the same
    /// queues in the same guest memory, as QEMU does: each avail ring resumes at its used
    /// ring's index, and the in-flight region, if one was shared, goes back to the backend so
    /// that it can replay what it had taken. Requests in flight stay in flight.
    pub fn reconnect(&mut self, path: impl AsRef<Path>, opts: &ClientOptions) -> Result<()> {
        let (mut ctl, sock) = Control::connect(path.as_ref(), opts)?;
        let negotiated = negotiate(&mut ctl, opts)?;
        ctl.call("SET_FEATURES", |f| f.set_features(negotiated.acked))?;
        let region = self.mem.region_info()?;
        ctl.call("SET_MEM_TABLE", |f| f.set_mem_table(&[region]))?;
        if let Some((info, file)) = &self.inflight {
            ctl.call("SET_INFLIGHT_FD", |f| {
                f.set_inflight_fd(info, file.as_raw_fd())
            })?;
        }
        for q in &mut self.queues {
            q.set_socket(Arc::clone(&sock));
            let used = self
                .mem
                .load_u16(q.ring_addrs().used + 2, Ordering::Acquire)?;
            start_queue(&mut ctl, &self.mem, q, used)?;
        }
        for q in &self.queues {
            let i = q.index() as usize;
            ctl.call("SET_VRING_ENABLE", |f| f.set_vring_enable(i, true))?;
        }
        self.ctl = ctl;
        self.sock = sock;
        self.negotiated = negotiated;
        self.closed = false;
        Ok(())
    }

    /// The config space read at connect time.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Features and queue count negotiated at connect time.
    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// True when virtio-blk feature bit `bit` (see [`super::blk::feature`]) was acked.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.negotiated.acked & (1 << bit) != 0
    }

    /// Guest memory shared with the backend.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// Number of queues set up.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `index`.
    pub fn queue(&mut self, index: usize) -> Result<&mut BlkQueue> {
        self.queues.get_mut(index).ok_or(Error::NoSuchQueue(index))
    }

    /// All queues, as disjoint `&mut` (one per benchmark thread, with `std::thread::scope`).
    pub fn queues_mut(&mut self) -> &mut [BlkQueue] {
        &mut self.queues
    }

    /// Reads `len` bytes at `sector`; returns the status and the data.
    pub fn read(&mut self, queue: usize, sector: u64, len: u32) -> Result<(u8, Vec<u8>)> {
        self.queue(queue)?.read(sector, len)
    }

    /// Writes `data` at `sector`; returns the status.
    pub fn write(&mut self, queue: usize, sector: u64, data: &[u8]) -> Result<u8> {
        self.queue(queue)?.write(sector, data)
    }

    /// Flushes; returns the status.
    pub fn flush(&mut self, queue: usize) -> Result<u8> {
        self.queue(queue)?.flush()
    }

    /// Reads the 20-byte device id; returns the status and the bytes.
    pub fn get_id(&mut self, queue: usize) -> Result<(u8, [u8; ID_BYTES as usize])> {
        self.queue(queue)?.get_id()
    }

    /// Discards `ranges`; returns the status.
    pub fn discard(&mut self, queue: usize, ranges: &[DiscardRange]) -> Result<u8> {
        self.queue(queue)?.discard(ranges)
    }

    /// Writes zeroes over `ranges`; returns the status.
    pub fn write_zeroes(&mut self, queue: usize, ranges: &[DiscardRange]) -> Result<u8> {
        self.queue(queue)?.write_zeroes(ranges)
    }

    /// Makes `req` available on `queue` and kicks if needed; does not wait.
    pub fn submit(&mut self, queue: usize, req: &BlkRequest) -> Result<Token> {
        self.queue(queue)?.submit(req)
    }

    /// Makes all of `reqs` available with one kick; returns the first (consecutive) token.
    pub fn submit_batch(&mut self, queue: usize, reqs: &[BlkRequest]) -> Result<Token> {
        self.queue(queue)?.submit_batch(reqs)
    }

    /// Appends finished requests of `queue` to `out` without blocking.
    pub fn poll_completions(&mut self, queue: usize, out: &mut Vec<Completion>) -> Result<usize> {
        self.queue(queue)?.poll_completions(out)
    }

    /// Waits up to `timeout` for at least one finished request of `queue`.
    pub fn wait_completions(
        &mut self,
        queue: usize,
        out: &mut Vec<Completion>,
        timeout: Duration,
    ) -> Result<usize> {
        self.queue(queue)?.wait_completions(out, timeout)
    }

    /// Writes `descs` at table indices `0..n` of idle `queue` and makes `head` available.
    pub fn submit_raw(&mut self, queue: usize, descs: &[RawDesc], head: u16) -> Result<()> {
        self.queue(queue)?.submit_raw(descs, head)
    }

    /// Waits up to `timeout` for the used element of the raw chain in flight on `queue`.
    pub fn wait_raw(&mut self, queue: usize, timeout: Duration) -> Result<UsedElem> {
        self.queue(queue)?.wait_raw(timeout)
    }

    /// Submits a raw chain and waits for its used element and status.
    pub fn run_raw(
        &mut self,
        queue: usize,
        chain: &RawChain,
        timeout: Duration,
    ) -> Result<RawReply> {
        self.queue(queue)?.run_raw(chain, timeout)
    }

    /// Stops every ring (SET_VRING_ENABLE 0, GET_VRING_BASE) and closes the connection.
    ///
    /// Returns each queue's GET_VRING_BASE answer: for a backend that answered everything it
    /// was given, it equals [`BlkQueue::next_avail`]. Dropping the client does the same and
    /// ignores errors.
    pub fn close(mut self) -> Result<Vec<u32>> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<Vec<u32>> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(Vec::new());
        }
        let result = self.stop_rings();
        // Shutdown, not just close: the queues hold a dup of the socket for hang-up detection,
        // which would otherwise keep the connection open.
        let _ = self.sock.shutdown(Shutdown::Both);
        result
    }

    fn stop_rings(&mut self) -> Result<Vec<u32>> {
        let mut bases = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            let i = q.index() as usize;
            self.ctl
                .call("SET_VRING_ENABLE", |f| f.set_vring_enable(i, false))?;
        }
        for q in &self.queues {
            let i = q.index() as usize;
            bases.push(self.ctl.call("GET_VRING_BASE", |f| f.get_vring_base(i))?);
        }
        Ok(bases)
    }
}

impl Drop for BlkClient {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::debug!("frontend disconnect: {e}");
        }
    }
}

fn check_options(opts: &ClientOptions) -> Result<()> {
    if opts.num_queues == 0 || opts.num_queues > MAX_QUEUES {
        return Err(Error::BadQueueCount(opts.num_queues));
    }
    if !opts.queue_size.is_power_of_two() || opts.queue_size > MAX_QUEUE_SIZE {
        return Err(Error::BadQueueSize(opts.queue_size));
    }
    let rings = u64::from(opts.num_queues) * BlkQueue::bytes_needed(opts.queue_size);
    if rings >= opts.mem_size / 2 {
        // Rings may take at most half: the rest is for data buffers.
        return Err(Error::BadMemorySize(opts.mem_size));
    }
    Ok(())
}

/// Connects, retrying while the socket does not exist yet or refuses (a backend starting up).
fn connect_with_retry(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                // Not the data path: a 10 ms step while a daemon starts is fine.
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(Error::Connect {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

fn negotiate(ctl: &mut Control, opts: &ClientOptions) -> Result<Negotiated> {
    let offered = ctl.call("GET_FEATURES", |f| f.get_features())?;
    let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if offered & F_VERSION_1 == 0 {
        return Err(Error::MissingFeature("VIRTIO_F_VERSION_1"));
    }
    if offered & proto_bit == 0 {
        return Err(Error::MissingFeature("VHOST_USER_F_PROTOCOL_FEATURES"));
    }
    let protocol_offered = ctl.call("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
    if !protocol_offered.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(Error::MissingFeature("VHOST_USER_PROTOCOL_F_CONFIG"));
    }
    let mut wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    if opts.inflight {
        wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    let protocol_acked = protocol_offered & wanted;
    ctl.call("SET_PROTOCOL_FEATURES", |f| {
        f.set_protocol_features(protocol_acked)
    })?;
    if protocol_acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        // Every later message without a reply of its own is acked, so a refused SET_MEM_TABLE
        // or SET_VRING_* fails here instead of as a silent stall later. The vhost crate waits
        // for acks only when this header flag is set.
        ctl.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let backend_queues = if protocol_acked.contains(VhostUserProtocolFeatures::MQ) {
        ctl.call("GET_QUEUE_NUM", |f| f.get_queue_num())?
    } else {
        1
    };
    ctl.call("SET_OWNER", |f| f.set_owner())?;
    let mut want = F_VERSION_1 | proto_bit | blk_features();
    if opts.event_idx {
        want |= F_EVENT_IDX;
    }
    if opts.indirect {
        want |= F_INDIRECT_DESC;
    }
    Ok(Negotiated {
        offered,
        acked: offered & want,
        protocol_offered,
        protocol_acked,
        backend_queues,
    })
}

/// virtio-blk features we understand. Not SIZE_MAX: typed requests use one data descriptor of
/// any size, and a driver that acks SIZE_MAX promises to split at `size_max`.
fn blk_features() -> u64 {
    [
        feature::SEG_MAX,
        feature::GEOMETRY,
        feature::RO,
        feature::BLK_SIZE,
        feature::FLUSH,
        feature::TOPOLOGY,
        feature::CONFIG_WCE,
        feature::MQ,
        feature::DISCARD,
        feature::WRITE_ZEROES,
    ]
    .iter()
    .fold(0, |acc, b| acc | 1u64 << b)
}

fn read_config(ctl: &mut Control) -> Result<BlkConfig> {
    let zeroes = [0u8; CONFIG_READ_LEN as usize];
    let (_, bytes) = ctl.call("GET_CONFIG", |f| {
        f.get_config(0, CONFIG_READ_LEN, VhostUserConfigFlags::empty(), &zeroes)
    })?;
    BlkConfig::parse(&bytes)
}

fn check_queue_count(opts: &ClientOptions, n: &Negotiated, config: &BlkConfig) -> Result<()> {
    let wanted = u64::from(opts.num_queues);
    let blk_mq = n.offered & (1 << feature::MQ) != 0;
    let device_queues = if blk_mq {
        u64::from(config.num_queues)
    } else {
        1
    };
    if wanted > n.backend_queues || wanted > device_queues {
        return Err(Error::TooManyQueues {
            wanted: opts.num_queues,
            backend: n.backend_queues.min(device_queues),
        });
    }
    Ok(())
}

fn build_queues(
    mem: &GuestMem,
    count: u16,
    setup: QueueSetup,
    sock: &Arc<UnixStream>,
) -> Result<Vec<BlkQueue>> {
    let mut layout = BumpAlloc::new(mem.base(), mem.end());
    let mut queues = (0..count)
        .map(|i| BlkQueue::new(i, mem.clone(), &mut layout, setup, Arc::clone(sock)))
        .collect::<Result<Vec<_>>>()?;
    for (q, arena) in queues.iter_mut().zip(layout.split(u64::from(count))) {
        q.set_arena(arena);
    }
    Ok(queues)
}

/// Starts queue `q`, its avail ring resuming at index `base`.
fn start_queue(ctl: &mut Control, mem: &GuestMem, q: &BlkQueue, base: u16) -> Result<()> {
    let i = q.index() as usize;
    let a = q.ring_addrs();
    let config = VringConfigData {
        queue_max_size: q.size(),
        queue_size: q.size(),
        flags: 0,
        desc_table_addr: mem.host_addr(a.desc)?,
        used_ring_addr: mem.host_addr(a.used)?,
        avail_ring_addr: mem.host_addr(a.avail)?,
        log_addr: None,
    };
    ctl.call("SET_VRING_NUM", |f| f.set_vring_num(i, q.size()))?;
    ctl.call("SET_VRING_BASE", |f| f.set_vring_base(i, base))?;
    ctl.call("SET_VRING_ADDR", |f| f.set_vring_addr(i, &config))?;
    ctl.call("SET_VRING_KICK", |f| f.set_vring_kick(i, q.kick_fd()))?;
    ctl.call("SET_VRING_CALL", |f| f.set_vring_call(i, q.call_fd()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn opts(timeout_ms: u64) -> ClientOptions {
        ClientOptions {
            mem_size: 4 << 20,
            queue_size: 16,
            connect_timeout: Duration::from_millis(timeout_ms),
            control_timeout: Duration::from_millis(timeout_ms),
            ..ClientOptions::default()
        }
    }

    #[test]
    fn silent_backend_is_a_control_timeout_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (release, hold) = mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let _ = hold.recv_timeout(Duration::from_secs(5));
            drop(conn);
        });
        let start = Instant::now();
        let err = BlkClient::connect(&path, &opts(200)).unwrap_err();
        drop(release);
        assert!(
            matches!(
                err,
                Error::ControlTimeout {
                    op: "GET_FEATURES",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(1));
        holder.join().unwrap();
    }

    #[test]
    fn backend_that_hangs_up_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || drop(listener.accept().unwrap()));
        let err = BlkClient::connect(&path, &opts(2000)).unwrap_err();
        assert!(matches!(err, Error::Vhost { .. }), "{err:?}");
        t.join().unwrap();
    }

    #[test]
    fn missing_socket_times_out_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let err = BlkClient::connect(dir.path().join("none"), &opts(50)).unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    }

    #[test]
    fn options_are_checked_before_connecting() {
        let bad = [
            ClientOptions {
                num_queues: 0,
                ..opts(10)
            },
            ClientOptions {
                queue_size: 100,
                ..opts(10)
            },
            ClientOptions {
                mem_size: 1 << 20,
                num_queues: 64,
                ..opts(10)
            },
        ];
        for o in bad {
            assert!(check_options(&o).is_err(), "{o:?}");
        }
        assert!(check_options(&opts(10)).is_ok());
    }

    #[test]
    fn queues_are_send() {
        fn send<T: Send>() {}
        send::<BlkQueue>();
    }
}
