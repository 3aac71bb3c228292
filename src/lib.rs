//! Cormorant: a vhost-user-blk backend that serves VM disk images from block files.
//!
//! See ARCHITECTURE.md for the request path; each module below is one layer of it.

pub mod cli;
pub mod commands;
pub mod control;
pub mod daemon;
pub mod disk;
pub mod engine;
pub mod export;
pub mod image;
pub mod route;
pub mod serve;
pub mod size;
pub mod store;
pub mod virtio;
