//! The virtio-blk device: request parsing, config space, and the vhost-user backend glue.

pub mod config;
pub mod request;
