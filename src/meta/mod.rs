//! Cluster metadata: where the shared state of a cluster (nodes, images, block locations,
//! owners, epochs) lives. A single node keeps it in local JSON files; a cluster keeps it in
//! etcd, the one source of truth every node checks against.

pub mod cluster;
pub mod etcd;
pub mod lease;
pub mod records;
pub mod store;
