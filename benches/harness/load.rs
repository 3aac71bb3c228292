//! The backend-only load generator: drives any vhost-user-blk socket through
//! `cormorant_frontend` with a chosen pattern, block size, queue depth, number of queues and run
//! time, one thread per queue, and reports IOPS, MB/s and latency percentiles.
//!
//! Each queue keeps exactly `qd` requests in flight: it submits `qd`, then waits on the call
//! eventfd and resubmits as many as completed, in one batch (one kick). Buffers are allocated once
//! per slot; nothing allocates per request. Latency is from the submit call to the reap that saw
//! the request used, recorded in an HDR histogram (microsecond resolution is too coarse for the
//! RAM tier, so nanoseconds, 3 significant digits).

use std::path::Path;
use std::time::{Duration, Instant};

use cormorant_frontend::blk::S_OK;
use cormorant_frontend::{BlkClient, BlkQueue, BlkRequest, ClientOptions, Completion, GuestBuf};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Sector size of virtio-blk addresses.
const SECTOR: u64 = 512;
/// Longest a single wait for completions may take before the run is declared stalled: far above
/// any latency we measure, short enough that a dead backend does not hang the suite.
const STALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Highest latency the histogram records (60 s): anything above is clamped, not dropped.
const HIST_MAX_NS: u64 = 60_000_000_000;
/// Guest memory beyond the data buffers: rings and request slots of up to 16 queues of 1024.
const MEM_OVERHEAD: u64 = 16 << 20;

/// Access pattern of a load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Sequential reads (each queue its own stripe of the span).
    Read,
    /// Sequential writes.
    Write,
    /// Uniformly random reads, aligned to the block size.
    RandRead,
    /// Uniformly random writes.
    RandWrite,
    /// Random, `read_pct` percent reads.
    Mixed {
        /// Share of reads in percent.
        read_pct: u8,
    },
}

impl Pattern {
    /// Short name, fio style.
    pub fn name(self) -> String {
        match self {
            Pattern::Read => "read".into(),
            Pattern::Write => "write".into(),
            Pattern::RandRead => "randread".into(),
            Pattern::RandWrite => "randwrite".into(),
            Pattern::Mixed { read_pct } => format!("randrw{read_pct}"),
        }
    }

    fn random(self) -> bool {
        !matches!(self, Pattern::Read | Pattern::Write)
    }
}

/// One load: what to send, how much in flight, for how long.
#[derive(Clone, Debug, Serialize)]
pub struct LoadSpec {
    pub pattern: Pattern,
    /// Request size in bytes (a multiple of 512).
    pub bs: u32,
    /// Requests in flight per queue.
    pub qd: u16,
    /// Queues, one thread each.
    pub queues: u16,
    /// Measured time, after the warm-up.
    #[serde(serialize_with = "ser_secs")]
    pub runtime: Duration,
    /// Time run before measuring (caches, ring state, CPU frequency).
    #[serde(serialize_with = "ser_secs")]
    pub warmup: Duration,
    /// Bytes of the device addressed, from offset 0 (reads: only over written data); 0 means
    /// the whole device.
    pub span: u64,
    /// Busy-poll the used ring instead of sleeping on the call eventfd: takes the client's own
    /// wake-up out of the latency, to show the backend's share (costs a core while it runs).
    pub client_poll: bool,
    /// Share an in-flight region with the backend (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), as
    /// QEMU does, to measure what its bookkeeping costs.
    pub inflight: bool,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl LoadSpec {
    /// Short label, e.g. `randread 4k qd32 x1`.
    pub fn label(&self) -> String {
        format!(
            "{} {} qd{} x{}{}{}",
            self.pattern.name(),
            human_size(u64::from(self.bs)),
            self.qd,
            self.queues,
            if self.client_poll { " poll" } else { "" },
            if self.inflight { " inflight" } else { "" }
        )
    }
}

/// `4096` -> `4k`, `1048576` -> `1m`.
pub fn human_size(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}m", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}k", n >> 10),
        n => n.to_string(),
    }
}

/// What a load measured.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct LoadResult {
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
    pub lat_mean_us: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    pub lat_p999_us: f64,
    pub lat_max_us: f64,
}

impl LoadResult {
    fn from_hist(h: &Histogram<u64>, ops: u64, errors: u64, secs: f64, bs: u32) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        LoadResult {
            ops,
            errors,
            seconds: secs,
            iops: ops as f64 / secs,
            mbps: ops as f64 * f64::from(bs) / secs / 1e6,
            lat_mean_us: h.mean() / 1000.0,
            lat_p50_us: us(h.value_at_quantile(0.5)),
            lat_p99_us: us(h.value_at_quantile(0.99)),
            lat_p999_us: us(h.value_at_quantile(0.999)),
            lat_max_us: us(h.max()),
        }
    }
}

/// Errors of a load run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("connect to {path}")]
    Connect {
        path: String,
        #[source]
        source: cormorant_frontend::Error,
    },
    #[error("queue {queue}")]
    Queue {
        queue: u16,
        #[source]
        source: cormorant_frontend::Error,
    },
    #[error("device of {capacity} bytes is smaller than the span {span}")]
    TooSmall { capacity: u64, span: u64 },
    #[error("bad load: {0}")]
    Spec(String),
}

/// Connect options for a spec: ring large enough for `qd`, memory for `qd` buffers per queue.
pub fn client_options(spec: &LoadSpec) -> ClientOptions {
    let data = u64::from(spec.queues) * u64::from(spec.qd) * u64::from(spec.bs);
    ClientOptions {
        num_queues: spec.queues,
        queue_size: u16::max(spec.qd, 128).next_power_of_two(),
        mem_size: (data + MEM_OVERHEAD).next_multiple_of(1 << 20),
        io_timeout: STALL_TIMEOUT,
        inflight: spec.inflight,
        ..ClientOptions::default()
    }
}

/// Connects to `socket` and runs `spec` on it.
pub fn run(socket: &Path, spec: &LoadSpec) -> Result<LoadResult, LoadError> {
    let mut client =
        BlkClient::connect(socket, &client_options(spec)).map_err(|source| LoadError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let capacity = client.config().capacity_bytes();
    if capacity < spec.span {
        return Err(LoadError::TooSmall {
            capacity,
            span: spec.span,
        });
    }
    let mut spec = spec.clone();
    if spec.span == 0 {
        spec.span = capacity / u64::from(spec.bs) * u64::from(spec.bs);
    }
    check(&spec)?;
    let result = run_on(&mut client, &spec);
    let _ = client.close();
    result
}

fn check(spec: &LoadSpec) -> Result<(), LoadError> {
    let bs = u64::from(spec.bs);
    if bs == 0 || bs % SECTOR != 0 || spec.qd == 0 || spec.queues == 0 {
        return Err(LoadError::Spec(format!("{spec:?}")));
    }
    if spec.span < bs * u64::from(spec.queues) {
        return Err(LoadError::Spec(format!("span {} too small", spec.span)));
    }
    Ok(())
}

/// Runs `spec` on an already connected client (all of its queues).
pub fn run_on(client: &mut BlkClient, spec: &LoadSpec) -> Result<LoadResult, LoadError> {
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.runtime;
    let per_queue: Vec<Result<QueueOutcome, LoadError>> = std::thread::scope(|s| {
        let handles: Vec<_> = client
            .queues_mut()
            .iter_mut()
            .enumerate()
            .map(|(i, q)| s.spawn(move || drive_queue(q, spec, i as u64, measure_from, end)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("queue thread panicked"))
            .collect()
    });
    let mut hist = new_hist();
    let (mut ops, mut errors) = (0, 0);
    for outcome in per_queue {
        let o = outcome?;
        hist.add(&o.hist).expect("same histogram bounds");
        ops += o.ops;
        errors += o.errors;
    }
    let secs = spec.runtime.as_secs_f64();
    Ok(LoadResult::from_hist(&hist, ops, errors, secs, spec.bs))
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds")
}

struct QueueOutcome {
    hist: Histogram<u64>,
    ops: u64,
    errors: u64,
}

/// Where the next requests of one queue go: xorshift for random patterns, a cursor through the
/// queue's own stripe for sequential ones.
struct Offsets {
    state: u64,
    blocks: u64,
    cursor: u64,
    stripe: (u64, u64),
    random: bool,
    read_pct: u8,
}

impl Offsets {
    fn new(spec: &LoadSpec, queue: u64) -> Offsets {
        let blocks = spec.span / u64::from(spec.bs);
        let per = blocks / u64::from(spec.queues);
        let read_pct = match spec.pattern {
            Pattern::Read | Pattern::RandRead => 100,
            Pattern::Write | Pattern::RandWrite => 0,
            Pattern::Mixed { read_pct } => read_pct,
        };
        Offsets {
            state: 0x9e37_79b9_7f4a_7c15 ^ (queue + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
            blocks,
            cursor: 0,
            stripe: (queue * per, per.max(1)),
            random: spec.pattern.random(),
            read_pct,
        }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*: plenty for spreading offsets, and free of allocation and locks.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Next block index and whether it is a read.
    fn next(&mut self) -> (u64, bool) {
        let block = if self.random {
            self.next_u64() % self.blocks
        } else {
            let b = self.stripe.0 + self.cursor;
            self.cursor = (self.cursor + 1) % self.stripe.1;
            b
        };
        let read = match self.read_pct {
            100 => true,
            0 => false,
            p => self.next_u64() % 100 < u64::from(p),
        };
        (block, read)
    }
}

fn drive_queue(
    q: &mut BlkQueue,
    spec: &LoadSpec,
    queue: u64,
    measure_from: Instant,
    end: Instant,
) -> Result<QueueOutcome, LoadError> {
    let qerr = |source| LoadError::Queue {
        queue: queue as u16,
        source,
    };
    let qd = usize::from(spec.qd).min(q.max_in_flight());
    let bufs: Vec<GuestBuf> = (0..qd)
        .map(|_| q.alloc(spec.bs))
        .collect::<Result<_, _>>()
        .map_err(qerr)?;
    for (i, b) in bufs.iter().enumerate() {
        q.memory()
            .fill(b.addr, b.len as usize, 0x5a ^ i as u8)
            .map_err(qerr)?;
    }
    let mut offsets = Offsets::new(spec, queue);
    let sectors_per_block = u64::from(spec.bs) / SECTOR;
    // Which buffer each in-flight token uses: (token, slot), at most `qd` entries.
    let mut inflight: Vec<(u64, usize)> = Vec::with_capacity(qd);
    let mut batch: Vec<BlkRequest> = Vec::with_capacity(qd);
    let mut batch_slots: Vec<usize> = Vec::with_capacity(qd);
    let mut done: Vec<Completion> = Vec::with_capacity(usize::from(q.size()));
    let mut out = QueueOutcome {
        hist: new_hist(),
        ops: 0,
        errors: 0,
    };
    let mut free: Vec<usize> = (0..qd).collect();
    loop {
        let now = Instant::now();
        let running = now < end;
        if running {
            batch.clear();
            batch_slots.clear();
            while let Some(slot) = free.pop() {
                let (block, read) = offsets.next();
                let sector = block * sectors_per_block;
                batch.push(if read {
                    BlkRequest::read(sector, bufs[slot])
                } else {
                    BlkRequest::write(sector, bufs[slot])
                });
                batch_slots.push(slot);
            }
            if !batch.is_empty() {
                let first = q.submit_batch(&batch).map_err(qerr)?;
                inflight.extend(
                    batch_slots
                        .iter()
                        .enumerate()
                        .map(|(i, &s)| (first.0 + i as u64, s)),
                );
            }
        }
        if inflight.is_empty() {
            break;
        }
        done.clear();
        if spec.client_poll {
            spin_for_completions(q, &mut done).map_err(qerr)?;
        } else {
            q.wait_completions(&mut done, STALL_TIMEOUT).map_err(qerr)?;
        }
        let reaped = Instant::now();
        for c in &done {
            let pos = inflight
                .iter()
                .position(|&(t, _)| t == c.token.0)
                .expect("completion of a token we submitted");
            free.push(inflight.swap_remove(pos).1);
            // Count only requests submitted and finished inside the measured window.
            let submitted = reaped.checked_sub(c.latency).unwrap_or(reaped);
            if submitted >= measure_from && reaped <= end {
                out.ops += 1;
                if c.status != S_OK {
                    out.errors += 1;
                }
                let ns = (c.latency.as_nanos() as u64).clamp(1, HIST_MAX_NS);
                out.hist.record(ns).expect("clamped into bounds");
            }
        }
    }
    Ok(out)
}

/// Polls the used ring until something completes; a stall past [`STALL_TIMEOUT`] falls back to
/// the blocking wait, which reports it.
fn spin_for_completions(
    q: &mut BlkQueue,
    done: &mut Vec<Completion>,
) -> Result<(), cormorant_frontend::Error> {
    let start = Instant::now();
    while q.poll_completions(done)? == 0 {
        if start.elapsed() > STALL_TIMEOUT {
            q.wait_completions(done, STALL_TIMEOUT)?;
            break;
        }
        std::hint::spin_loop();
    }
    Ok(())
}
