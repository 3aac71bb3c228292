//! Replication: the acknowledgement rule, the failure list, and resync of out-of-sync copies.

pub mod ack;
pub mod failure;
pub mod sync;
