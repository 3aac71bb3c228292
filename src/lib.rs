//! Cormorant: a vhost-user-blk backend that serves VM disk images from block files.
//!
//! See ARCHITECTURE.md for the request path; each module below is one layer of it.
//! The other side of the socket, a VM-less vhost-user-blk client used by the tests and the
//! benchmark harness, is the `cormorant-frontend` crate (src/frontend).

// Issue 11: no unwrap or expect outside tests (a panic on a queue thread loses a VM), and
// every unsafe block says why it is sound.
#![warn(
    clippy::undocumented_unsafe_blocks,
    clippy::unwrap_used,
    clippy::expect_used
)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cache;
pub mod chain;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod copies;
pub mod daemon;
pub mod disk;
pub mod engine;
pub mod holder;
pub mod image;
pub mod logs;
pub mod meta;
pub mod metrics;
pub mod ownership;
pub mod peer;
pub mod peers;
pub mod placement;
pub mod qos;
pub mod replica;
pub mod route;
pub mod serve;
pub mod size;
pub mod slots;
pub mod store;
pub mod stripe;
pub mod tiering;
pub mod vhost_listener;
pub mod virtio;
