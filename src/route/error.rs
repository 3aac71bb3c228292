//! Why a block request failed. One type for the whole request path, so the virtio layer maps
//! every failure to a status byte in one place and the logs say which copy, block and cause.

use crate::engine::OpError;
use crate::image::NodeId;
use crate::store::BlockError;

type Source = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("this node does not serve the image now")]
    NotServing,
    #[error("the image moved on to a newer epoch")]
    NewerEpoch,
    #[error("write refused: the image is owned by {0} now")]
    NotOwner(NodeId),
    #[error("block {0} is past the end")]
    PastEnd(u64),
    #[error("block {0} has no reachable in-sync copy")]
    NoCopy(u64),
    #[error(transparent)]
    Store(#[from] BlockError),
    #[error("block {block}: {source}")]
    Op {
        block: u64,
        #[source]
        source: OpError,
    },
    #[error("flush: {0}")]
    Flush(#[source] OpError),
    #[error("block {0}: no in-sync copy took the write or discard")]
    NoCopyTookIt(u64),
    #[error("{what}")]
    Metadata {
        what: &'static str,
        #[source]
        source: Source,
    },
    #[error("a flush could not make every block durable")]
    NotDurable,
    #[error("the node's lease could not be confirmed; the answer is withheld")]
    LeaseInDoubt,
}

impl IoError {
    pub fn metadata(what: &'static str, source: impl Into<Source>) -> Self {
        IoError::Metadata {
            what,
            source: source.into(),
        }
    }
}
