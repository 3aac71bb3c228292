//! The control plane: the JSON protocol on the control socket, its server and its client.

pub mod client;
pub mod prometheus;
pub mod protocol;
pub mod server;
