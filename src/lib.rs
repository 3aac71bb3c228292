//! Cormorant: a vhost-user-blk backend that serves VM disk images from block files.

pub mod frontend;
