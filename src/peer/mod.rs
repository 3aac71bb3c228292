//! The peer protocol: how daemons talk to each other over TCP.
//!
//! Layers, each its own file: [`frame`] (length-prefixed, checksummed frames), [`seal`] (the
//! tag that authenticates, or with `--peer-encrypt` encrypts, each frame after the
//! handshake), [`message`] (typed requests and responses), [`auth`] (the handshake and the
//! cluster key), [`server`] (accepts peers, calls a [`PeerHandler`]) and [`client`] (a pool
//! of connections to one peer, pipelined calls completed by callback). The wire format is
//! written down in docs/PROTOCOL.md. Nothing here knows about block files or replicas.

pub mod auth;
pub mod client;
pub mod frame;
pub mod message;
mod outbox;
pub mod seal;
pub mod server;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use auth::{ClusterKey, KeyError};
pub use client::{Done, PeerClient};
pub use message::{code, BlockDigest, ImageRef, Request, Response, MAX_CHUNK};
pub use server::{PeerHandler, PeerServer};

use message::MessageError;

/// Why a call to a peer failed, grouped by what the caller does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The peer cannot be reached now: connecting failed, the connection was lost (the call
    /// may or may not have been carried out), the client is backing off after failures, or
    /// it was closed. Treat the copy as unreachable; retry later.
    #[error("peer unavailable: {0}")]
    Unavailable(String),
    /// No answer in time (the call may or may not have been carried out); like `Unavailable`.
    #[error("peer did not answer within {0:?}")]
    Timeout(Duration),
    /// The peer answered with an error: it is up, and said no.
    #[error("peer refused: {message} (code {code})")]
    Refused { code: u16, message: String },
    /// Wrong cluster key, wrong node id, another protocol version or another `--peer-encrypt`
    /// setting. Retrying soon will not help; the client waits the longest backoff between
    /// attempts.
    #[error("peer authentication failed: {0}")]
    Auth(String),
    /// The peer sent a bad frame or an answer that does not fit the request.
    #[error("peer protocol error: {0}")]
    Protocol(String),
    /// The request breaks a limit (a chunk over `MAX_CHUNK`, a range too long) and was not
    /// sent: a bug in the caller.
    #[error("request not sent: {0}")]
    BadRequest(MessageError),
}

impl PeerError {
    /// True for failures that say the peer is unreachable for now (not that it said no).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, PeerError::Unavailable(_) | PeerError::Timeout(_))
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section here is a few field updates).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
