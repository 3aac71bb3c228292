//! Cormorant: a vhost-user-blk backend that serves VM disk images from block files.
//!
//! See ARCHITECTURE.md for the request path; each module below is one layer of it.

pub mod engine;
pub mod image;
pub mod route;
pub mod size;
pub mod store;
pub mod virtio;
