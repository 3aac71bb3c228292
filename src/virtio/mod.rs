//! The virtio-blk device: request parsing, config space, the per-queue request loop and the
//! vhost-user backend glue.

pub mod backend;
pub mod chain;
pub mod config;
pub mod config_change;
pub mod inflight;
pub mod memory;
pub mod relay;
pub mod request;
pub mod ring;
pub mod worker;
