//! Why a control request failed. Each reaches the operator as the request's `error` line, so
//! every variant says what was refused and what to do, and keeps its cause as a source.

use std::io;
use std::path::PathBuf;

use crate::image::{ImageName, MetaError, NodeId, Placement};
use crate::meta::store::StoreError;
use crate::placement::PlacementError;
use crate::replica::sync::SyncError;

/// Why a control request failed ([`super::Daemon::apply`]).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no image named '{0}'")]
    NoImage(ImageName),
    #[error("image '{0}' already exists")]
    Exists(ImageName),
    #[error("image '{name}' is owned by node {owner}: run this there")]
    OwnedElsewhere { name: ImageName, owner: NodeId },
    #[error("image {name} is owned by {owner}, not {from}")]
    NotOwnedBy {
        name: ImageName,
        owner: NodeId,
        from: NodeId,
    },
    #[error("image {0} is already owned by this node")]
    AlreadyOwned(ImageName),
    #[error("image '{0}' is in use by a frontend; stop the VM first")]
    InUse(ImageName),
    #[error("image '{0}' is busy")]
    Busy(ImageName),
    #[error("image '{0}' has no cache: set one first (image set NAME --cache ram|volume)")]
    NoCache(ImageName),
    #[error("image '{0}' is being prefetched already")]
    Prefetching(ImageName),
    #[error("image '{0}' vanished")]
    Vanished(ImageName),
    #[error("node '{0}' is neither this node nor a peer")]
    UnknownNode(NodeId),
    #[error("{0} is given twice")]
    PlacedTwice(Placement),
    #[error(
        "--stripe places the blocks itself: leave out --at (the stripe's members are its copies)"
    )]
    StripeWithAt,
    #[error("stripe: {0}")]
    Stripe(#[from] crate::stripe::StripeError),
    #[error("this node is not in an etcd cluster")]
    NoCluster,
    #[error("image adopt moves an image between nodes of a cluster (--etcd)")]
    AdoptNeedsCluster,
    #[error("cannot open {path}: {source}", path = path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {path}: {source}", path = path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot import {path}: {source}", path = path.display())]
    Import {
        path: PathBuf,
        #[source]
        source: super::transfer::TransferError,
    },
    #[error("cannot export to {path}: {source}")]
    Export {
        path: String,
        #[source]
        source: super::transfer::TransferError,
    },
    #[error("cannot export image '{name}': {source}")]
    Publish {
        name: ImageName,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Relocate(#[from] super::relocate::RelocateError),
    #[error(transparent)]
    Blocks(#[from] crate::store::BlockError),
    #[error(transparent)]
    Qos(#[from] crate::qos::QosError),
    #[error("cannot remove block files: {0}")]
    RemoveBlocks(#[source] io::Error),
    #[error("image {name}: cannot serve: {source}")]
    Serve {
        name: ImageName,
        #[source]
        source: Box<DaemonError>,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Family(#[from] super::family::FamilyError),
    #[error("image '{0}' is read-only: its size stays the one it was made with")]
    ResizeReadOnly(ImageName),
    #[error("image '{name}' is {old} bytes: shrinking it to {size} drops its end; add --allow-shrink to do so")]
    ShrinkNeedsFlag {
        name: ImageName,
        size: u64,
        old: u64,
    },
    #[error("image '{0}' is in use by a frontend: it is not shrunk under a running guest (stop the VM first; growing is allowed)")]
    ShrinkInUse(ImageName),
    #[error("image '{0}' is a clone: flatten it (image flatten {0}) before shrinking it")]
    ShrinkClone(ImageName),
    /// From layers whose errors are still text (disk.rs, daemon/cluster.rs): their message.
    #[error("{0}")]
    Text(String),
}

/// For callers whose errors are still text (daemon/cluster.rs).
impl From<DaemonError> for String {
    fn from(e: DaemonError) -> String {
        e.to_string()
    }
}
