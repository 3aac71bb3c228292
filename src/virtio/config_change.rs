//! The backend's channel to QEMU (VHOST_USER_PROTOCOL_F_BACKEND_REQ): the socket QEMU hands
//! over with SET_BACKEND_REQ_FD, on which we send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG when
//! the disk's capacity changed. QEMU then reads the config space again (GET_CONFIG on the
//! main channel) and, the capacity being new, raises the virtio config interrupt; the
//! guest's virtio-blk driver re-reads the capacity and resizes the disk.
//!
//! vhost 0.18's `Backend` (what the library hands a backend for this channel) has no way to
//! send this message, so the relay keeps the socket itself (`relay.rs`) and the message is
//! written here: a 12-byte header and no payload.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use vhost::vhost_user::message::{BackendReq, VhostUserHeaderFlag};

/// How long QEMU may take to answer a config-change (it asks us for the config space on the
/// main channel first, which takes well under a millisecond): past it the channel is given
/// up, since a late answer would be read as the next message's.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The vhost-user protocol version in every header's flags.
const VERSION: u32 = 0x1;

/// What a config-change came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Notified {
    /// QEMU handled it (it answered, REPLY_ACK), or it was sent (no REPLY_ACK).
    Yes,
    /// The frontend gave no channel (it did not take BACKEND_REQ, or not yet).
    NoChannel,
}

/// The backend request channel of one connection.
#[derive(Default)]
pub struct ConfigChannel {
    socket: Mutex<Option<UnixStream>>,
    /// REPLY_ACK was negotiated: QEMU answers each message, and we wait for the answer.
    reply_ack: AtomicBool,
}

impl ConfigChannel {
    /// The socket from SET_BACKEND_REQ_FD; replaces any earlier one.
    pub fn set(&self, socket: UnixStream) {
        *self.socket.lock().unwrap_or_else(|p| p.into_inner()) = Some(socket);
    }

    /// The protocol features QEMU acked (SET_PROTOCOL_FEATURES).
    pub fn set_protocol_features(&self, acked: u64) {
        let reply_ack = vhost::vhost_user::message::VhostUserProtocolFeatures::REPLY_ACK.bits();
        self.reply_ack
            .store(acked & reply_ack != 0, Ordering::Release);
    }

    /// Tells QEMU the config space changed; with REPLY_ACK, waits for it to be handled. A
    /// channel that fails is dropped (its state is unknown): later changes go unannounced
    /// on this connection, and the error says so.
    pub fn notify(&self) -> io::Result<Notified> {
        let mut socket = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        let Some(stream) = socket.as_mut() else {
            return Ok(Notified::NoChannel);
        };
        let reply_ack = self.reply_ack.load(Ordering::Acquire);
        let sent = send_config_change(stream, reply_ack);
        if sent.is_err() {
            *socket = None;
        }
        sent.map(|()| Notified::Yes)
    }
}

/// Sends CONFIG_CHANGE_MSG on `stream` and, with `reply_ack`, reads QEMU's answer.
fn send_config_change(stream: &mut UnixStream, reply_ack: bool) -> io::Result<()> {
    let request = u32::from(BackendReq::CONFIG_CHANGE_MSG);
    let mut flags = VERSION;
    if reply_ack {
        flags |= VhostUserHeaderFlag::NEED_REPLY.bits();
    }
    let mut header = [0u8; 12];
    header[0..4].copy_from_slice(&request.to_le_bytes());
    header[4..8].copy_from_slice(&flags.to_le_bytes());
    // header[8..12]: no payload.
    stream.write_all(&header)?;
    if !reply_ack {
        return Ok(());
    }
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply)?;
    check_reply(&reply, request)
}

/// Checks QEMU's answer to a config-change: a reply to it carrying a u64 status of 0.
fn check_reply(reply: &[u8; 20], request: u32) -> io::Result<()> {
    let word =
        |at: usize| u32::from_le_bytes([reply[at], reply[at + 1], reply[at + 2], reply[at + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8));
    let is_reply = flags & VhostUserHeaderFlag::REPLY.bits() != 0;
    if code != request || !is_reply || size != 8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer to a config change (request {code}, flags {flags:#x}, size {size})"),
        ));
    }
    let mut status = [0u8; 8];
    status.copy_from_slice(&reply[12..20]);
    match u64::from_le_bytes(status) {
        0 => Ok(()),
        status => Err(io::Error::other(format!(
            "the frontend failed the config change (status {status})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message is the 12-byte header QEMU expects; with REPLY_ACK the answer is read and
    /// checked, and a channel whose answer is wrong is dropped.
    #[test]
    fn a_config_change_is_sent_and_its_answer_checked() {
        let channel = ConfigChannel::default();
        assert_eq!(channel.notify().unwrap(), Notified::NoChannel);
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        channel.set(ours);
        channel.notify().unwrap();
        let mut header = [0u8; 12];
        qemu.read_exact(&mut header).unwrap();
        assert_eq!(&header[0..4], &2u32.to_le_bytes(), "CONFIG_CHANGE_MSG");
        assert_eq!(
            &header[4..8],
            &1u32.to_le_bytes(),
            "version 1, no reply asked"
        );
        assert_eq!(&header[8..12], &0u32.to_le_bytes());

        channel.set_protocol_features(
            vhost::vhost_user::message::VhostUserProtocolFeatures::REPLY_ACK.bits(),
        );
        let answer = |status: u64, code: u32| {
            let mut reply = Vec::new();
            reply.extend_from_slice(&code.to_le_bytes());
            reply.extend_from_slice(&(1u32 | 0x4).to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&status.to_le_bytes());
            reply
        };
        qemu.write_all(&answer(0, 2)).unwrap();
        assert_eq!(channel.notify().unwrap(), Notified::Yes);
        qemu.read_exact(&mut header).unwrap();
        assert_eq!(&header[4..8], &(1u32 | 0x8).to_le_bytes(), "NEED_REPLY");

        qemu.write_all(&answer(1, 2)).unwrap();
        assert!(channel.notify().is_err(), "a failed change is an error");
        assert_eq!(
            channel.notify().unwrap(),
            Notified::NoChannel,
            "and the channel is given up"
        );
    }
}
