//! Routing and replication of block requests: the layer between the virtio queues (which know
//! rings, guest memory and the request format) and storage (block files here, copies on other
//! nodes through the peer protocol).
//!
//! A queue hands a [`Queue`] typed [`BlockRequest`]s carrying host buffers, and collects
//! [`Completion`]s. Everything about copies happens here: which copy a read goes to (this
//! node's first, then the next in-sync copy when one fails), the fan-out of writes, discards
//! and flushes to every copy, and the acknowledgement rule that settles them. Nothing here
//! knows about virtqueues, so the simulation and the unit tests drive this code directly.

mod device;
mod error;
mod queue;
mod settle;
pub mod split;

pub use device::{Device, Geometry, OnResize};
pub use error::IoError;
pub use queue::{BlockRequest, Completion, Queue};
pub use split::{local_copy, spans, split, BlockSpan, Piece};

/// Host buffers, re-exported so the layer above needs nothing from the engines.
pub use crate::engine::IoVecs;
