//! Where an image's metadata changes are made durable. The owner of an image is the only node
//! that changes it; each change goes through [`MetaStore::commit`], and only once that returns
//! does the change take effect (so no request ever acts on a change a crash could undo).

use std::path::PathBuf;

use crate::image::{ImageMeta, MetaError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The image's owner or epoch moved on: this node must not change it any more.
    #[error("image {image}: this node no longer owns it (epoch {epoch} is not current)")]
    Fenced { image: String, epoch: u64 },
    /// A frontend runs the image on `node` (under that node's lease).
    #[error("image {image} is in use by a frontend on node {node}")]
    InUse { image: String, node: String },
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("cluster metadata: {0}")]
    Cluster(String),
}

pub trait MetaStore: Send + Sync {
    /// Makes `next` the image's metadata in place of `current`, durably.
    fn commit(&self, current: &ImageMeta, next: &ImageMeta) -> Result<(), StoreError>;

    /// The store decides who owns an image (etcd), rather than each node's own file.
    fn is_shared(&self) -> bool {
        false
    }

    /// Makes this node the image's owner; returns the image's metadata under the new epoch.
    /// Only shared stores can.
    fn take_over(&self, meta: &ImageMeta) -> Result<ImageMeta, StoreError> {
        Err(StoreError::Cluster(format!(
            "image {}: ownership is not kept in a shared store",
            meta.name
        )))
    }

    /// A frontend started the image's device on this node.
    fn activate(&self, _meta: &ImageMeta) -> Result<(), StoreError> {
        Ok(())
    }

    /// The device stopped on this node.
    fn deactivate(&self, _meta: &ImageMeta) -> Result<(), StoreError> {
        Ok(())
    }

    /// This node's incarnation (it goes up at every start); 0 for a single node.
    fn incarnation(&self) -> u64 {
        0
    }

    /// The lease under which this node acts, where there is one.
    fn lease(&self) -> Option<&std::sync::Arc<super::lease::NodeLease>> {
        None
    }
}

/// A single node's store: one JSON file per image, replaced atomically.
pub struct LocalStore {
    dir: PathBuf,
}

impl LocalStore {
    pub fn new(dir: PathBuf) -> LocalStore {
        LocalStore { dir }
    }
}

impl MetaStore for LocalStore {
    fn commit(&self, _current: &ImageMeta, next: &ImageMeta) -> Result<(), StoreError> {
        Ok(next.save(&self.dir)?)
    }
}

/// For images this node only holds copies of: their metadata is the owner's to change.
pub struct NotOwner;

impl MetaStore for NotOwner {
    fn commit(&self, current: &ImageMeta, _next: &ImageMeta) -> Result<(), StoreError> {
        Err(StoreError::Fenced {
            image: current.name.to_string(),
            epoch: current.generation,
        })
    }
}
