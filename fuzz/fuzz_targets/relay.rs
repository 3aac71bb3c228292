//! Fuzzes the vhost-user relay's message reader (`src/virtio/relay.rs`): the headers and
//! payloads QEMU (or whatever connects to an image's socket) sends, read from a real socket
//! pair, with the two messages the relay answers itself (GET_INFLIGHT_FD, which creates a
//! region of the size asked for, and SET_INFLIGHT_FD) parsed on the way.
//!
//! Input: the bytes on the socket.
//!
//! Checks: nothing panics; every message read was in the input (header and payload bytes add
//! up to at most the input's length), no payload is over the protocol's maximum, and at most
//! one region is created per message.
#![no_main]

use cormorant::virtio::relay::fuzzing::receive_all;
use libfuzzer_sys::fuzz_target;
use vhost::vhost_user::message::MAX_MSG_SIZE;

/// The vhost-user header: request, flags, size (u32 each).
const HEADER: usize = 12;

fuzz_target!(|data: &[u8]| {
    // Socket buffers hold a few hundred KiB; the reader never needs more than one message.
    let data = &data[..data.len().min(64 << 10)];
    let seen = receive_all(data).expect("a socket pair");
    let read: usize = seen.messages.iter().map(|&(_, len)| HEADER + len).sum();
    assert!(read <= data.len());
    assert!(seen.messages.iter().all(|&(_, len)| len <= MAX_MSG_SIZE));
    assert!(seen.regions <= seen.messages.len());
});
