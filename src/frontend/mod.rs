//! A VM-less vhost-user-blk frontend: talks to any vhost-user-blk backend (ours or
//! qemu-storage-daemon) over its unix socket the way QEMU would, without a VM.
//!
//! It exists for two jobs:
//! - tests that send well-formed and deliberately malformed descriptor chains to a backend and
//!   check that it answers and keeps serving ([`ChainBuilder`], [`Malformed`]);
//! - benchmarks with many requests in flight per queue on several queues ([`BlkQueue::submit_batch`],
//!   [`BlkQueue::wait_completions`]): buffers are allocated once, nothing allocates per request,
//!   and completions are waited for on the call eventfd, never by sleeping.
//!
//! Layers, each its own file: [`memory`] (memfd guest memory, bump allocator), [`vring`] (driver
//! side of a split ring), [`blk`] (virtio-blk config and request encoding), [`queue`] (one
//! virtqueue with typed, blocking and raw APIs), [`raw`] (hostile chains), [`client`] (vhost-user
//! negotiation and teardown).
//!
//! Limits: every wait has a timeout and watches the socket for hang-up; requests in flight are
//! bounded by the ring (submit says [`Error::QueueFull`] rather than queueing); guest memory and
//! queue counts are bounded at connect time.

pub mod blk;
pub mod client;
pub mod memory;
pub mod queue;
pub mod raw;
pub mod vring;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use blk::{BlkConfig, BlkRequest, DiscardRange};
pub use client::{BlkClient, ClientOptions, Negotiated};
pub use memory::{GuestBuf, GuestMem};
pub use queue::{BlkQueue, Completion, QueueStats, Token};
pub use raw::{ChainBuilder, Malformed, RawChain, RawReply};
pub use vring::{RawDesc, UsedElem};

/// Errors of the frontend. Backend misbehaviour (a bad used element, a hang-up, a timeout) has
/// its own variants so a test can tell it from its own mistakes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be connected.
    #[error("cannot connect to {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Setting socket options or duplicating the socket failed.
    #[error("vhost-user socket setup failed")]
    Socket {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A vhost-user message failed (refused, timed out, or the connection broke).
    #[error("vhost-user {op} failed")]
    Vhost {
        /// The request that failed.
        op: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// A control message got no (complete) answer in time; the connection was shut down.
    #[error("vhost-user {op}: no answer within {waited:?}")]
    ControlTimeout {
        /// The request that got no answer.
        op: &'static str,
        /// The timeout.
        waited: Duration,
    },
    /// The backend does not offer a feature we need.
    #[error("backend does not offer {0}")]
    MissingFeature(&'static str),
    /// The config space answer was too short to hold a capacity.
    #[error("config space of {0} bytes is too short")]
    ShortConfig(usize),
    /// More queues were asked for than the backend has.
    #[error("{wanted} queues wanted, backend has {backend}")]
    TooManyQueues {
        /// Requested.
        wanted: u16,
        /// Available.
        backend: u64,
    },
    /// Queue count out of range.
    #[error("queue count {0} out of range")]
    BadQueueCount(u16),
    /// Queue size not a power of two or too large.
    #[error("queue size {0} is not a power of two up to 32768")]
    BadQueueSize(u16),
    /// Guest memory size out of range or too small for the rings.
    #[error("guest memory size {0} is out of range or too small for the rings")]
    BadMemorySize(u64),
    /// memfd_create or ftruncate failed.
    #[error("cannot create guest memory file")]
    Memfd(#[source] io::Error),
    /// Mapping guest memory failed.
    #[error("cannot map guest memory: {0}")]
    Mmap(String),
    /// An eventfd operation failed.
    #[error("eventfd operation failed")]
    EventFd(#[source] io::Error),
    /// poll(2) failed.
    #[error("poll failed")]
    Poll(#[source] io::Error),
    /// An access outside guest memory (a bug in the caller's addresses).
    #[error("guest range {addr:#x}+{len} is outside guest memory")]
    OutOfGuest {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// A queue's data arena is exhausted.
    #[error("arena exhausted: {want} bytes wanted, {left} left")]
    OutOfArena {
        /// Requested bytes.
        want: u64,
        /// Bytes left.
        left: u64,
    },
    /// A buffer longer than a descriptor can describe.
    #[error("{0} bytes is too large for one descriptor")]
    TooLarge(u64),
    /// No queue with this index.
    #[error("no queue {0}")]
    NoSuchQueue(usize),
    /// Not enough free descriptors: back-pressure, wait for completions and retry.
    #[error("queue full: {need} descriptors needed, {free} free")]
    QueueFull {
        /// Needed.
        need: usize,
        /// Free.
        free: usize,
    },
    /// A raw chain needs an idle queue, or a raw chain is still in flight.
    #[error("queue busy: raw chains and typed requests do not mix")]
    QueueBusy,
    /// `wait_raw` with no raw chain in flight.
    #[error("no raw chain in flight")]
    NothingInFlight,
    /// `wait_for` a token that is neither in flight nor finished.
    #[error("token {0} is not in flight")]
    UnknownToken(u64),
    /// Nothing finished in time: the backend stalled (or dropped the request).
    #[error("queue {queue}: nothing completed within {waited:?}")]
    Timeout {
        /// Queue index.
        queue: u16,
        /// The timeout.
        waited: Duration,
    },
    /// The backend closed the connection.
    #[error("backend disconnected")]
    Disconnected,
    /// The backend returned a used element for a head that is not in flight.
    #[error("backend returned used id {id}, which is not in flight")]
    BadUsedId {
        /// The id it returned.
        id: u32,
    },
    /// The backend's used index ran ahead of what was made available.
    #[error("used index {used_idx} is ahead: last used {last_used}, {outstanding} outstanding")]
    BadUsedIdx {
        /// Used index read.
        used_idx: u16,
        /// Last used index we consumed.
        last_used: u16,
        /// Heads available and not used.
        outstanding: u16,
    },
}

/// Result of frontend operations.
pub type Result<T> = std::result::Result<T, Error>;
