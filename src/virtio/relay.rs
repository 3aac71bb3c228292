//! Carries one vhost-user connection between QEMU and vhost-user-backend's request handler,
//! answering on the way the two messages that handler lacks: GET_INFLIGHT_FD and
//! SET_INFLIGHT_FD (see `inflight`), and keeping the backend request channel QEMU hands over
//! with SET_BACKEND_REQ_FD (see `config_change`). The handler is private to its crate, so it cannot be
//! extended; it serves a socket of its own instead, and every other message passes through
//! unchanged, file descriptors included. Only the control channel runs through here: guest
//! memory, kicks and calls are shared directly, so the data path pays nothing.
//!
//! Two threads per connection, one per direction. Either side closing ends both.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserInflight, VhostUserU64, MAX_ATTACHED_FD_ENTRIES,
    MAX_MSG_SIZE,
};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::backend::BlkBackend;
use super::inflight;

/// The message header of the vhost-user protocol (the `vhost` crate keeps its own private).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Header {
    request: u32,
    flags: u32,
    size: u32,
}

// SAFETY: three u32s, no padding; any bytes are a valid value.
unsafe impl ByteValued for Header {}

impl Header {
    fn is(&self, request: FrontendReq) -> bool {
        u32::from_le(self.request) == u32::from(request)
    }

    fn size(&self) -> usize {
        u32::from_le(self.size) as usize
    }

    fn needs_reply(&self) -> bool {
        u32::from_le(self.flags) & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }

    /// The header of the answer to this request, with a payload of `size` bytes.
    fn reply(&self, size: usize) -> Header {
        Header {
            request: self.request,
            flags: (1 | VhostUserHeaderFlag::REPLY.bits()).to_le(),
            size: (size as u32).to_le(),
        }
    }
}

/// A vhost-user message as it crossed the socket.
struct Message {
    header: Header,
    payload: Vec<u8>,
    files: Vec<OwnedFd>,
}

/// Reads one message; None when the other side closed the connection cleanly.
fn receive(socket: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = Header::default();
    let mut fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_slice().as_mut_ptr().cast(),
        iov_len: std::mem::size_of::<Header>(),
    }];
    // SAFETY: the iovec points at `header`, plain bytes that may take any value.
    let (read, nfds) = unsafe { socket.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: recvmsg handed these descriptors to this process; nothing else owns them.
    let files = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if read == 0 {
        return Ok(None);
    }
    if read < std::mem::size_of::<Header>() {
        let rest = &mut header.as_mut_slice()[read..];
        (&*socket).read_exact(rest)?;
    }
    let size = header.size();
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut payload = vec![0; size];
    (&*socket).read_exact(&mut payload)?;
    Ok(Some(Message {
        header,
        payload,
        files,
    }))
}

fn send(socket: &UnixStream, header: &Header, payload: &[u8], files: &[RawFd]) -> io::Result<()> {
    let mut message = Vec::with_capacity(std::mem::size_of::<Header>() + payload.len());
    message.extend_from_slice(header.as_slice());
    message.extend_from_slice(payload);
    let sent = socket
        .send_with_fds(&[message.as_slice()], files)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // The descriptors went with the first bytes; the rest, if any, follows plainly.
    (&*socket).write_all(&message[sent..])
}

fn forward(to: &UnixStream, message: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = message.files.iter().map(|f| f.as_raw_fd()).collect();
    send(to, &message.header, &message.payload, &fds)
}

/// The end of a connection: both directions stop.
fn close(a: &UnixStream, b: &UnixStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// Connects the library's daemon to a private socket next to the image's and returns our end.
/// `connect` makes the library connect to the path it is given; the connection accepted is
/// checked to come from this process, so nobody else can slip in between.
pub fn connect_library(
    path: &Path,
    connect: impl FnOnce(&str) -> io::Result<()>,
) -> io::Result<UnixStream> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let result = connect(&path.to_string_lossy()).and_then(|()| loop {
        let (stream, _) = listener.accept()?;
        if peer_pid(&stream)? == std::process::id() {
            break Ok(stream);
        }
        log::warn!(
            "{}: refused a connection from another process",
            path.display()
        );
    });
    let _ = std::fs::remove_file(path);
    result
}

fn peer_pid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` describe a buffer of the size SO_PEERCRED writes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}

/// Relays between QEMU (`frontend`) and the library (`library`) until either closes.
pub fn start(
    name: &str,
    frontend: UnixStream,
    library: UnixStream,
    backend: Arc<BlkBackend>,
) -> io::Result<[JoinHandle<()>; 2]> {
    let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
    let (front, lib) = (frontend.try_clone()?, library.try_clone()?);
    let writer = to_frontend.clone();
    let image = name.to_string();
    let down = thread::Builder::new()
        .name(format!("relay-{name}"))
        .spawn(move || {
            let result = relay_requests(&image, &front, &lib, &writer, &backend);
            if let Err(e) = result {
                log::info!("image {image}: vhost-user connection ended: {e}");
            }
            close(&front, &lib);
        })?;
    let up = thread::Builder::new()
        .name(format!("relay-up-{name}"))
        .spawn(move || {
            loop {
                let message = match receive(&library) {
                    Ok(Some(message)) => message,
                    _ => break,
                };
                let writer = to_frontend.lock().unwrap_or_else(|p| p.into_inner());
                if forward(&writer, &message).is_err() {
                    break;
                }
            }
            close(&frontend, &library);
        })?;
    Ok([down, up])
}

/// QEMU's requests: the in-flight pair is answered here, the rest goes to the library.
fn relay_requests(
    image: &str,
    frontend: &UnixStream,
    library: &UnixStream,
    writer: &Mutex<UnixStream>,
    backend: &BlkBackend,
) -> io::Result<()> {
    let answer = |header: &Header, payload: &[u8], fds: &[RawFd]| {
        let writer = writer.lock().unwrap_or_else(|p| p.into_inner());
        send(&writer, &header.reply(payload.len()), payload, fds)
    };
    while let Some(message) = receive(frontend)? {
        let header = message.header;
        if header.is(FrontendReq::GET_INFLIGHT_FD) {
            let (info, file) = match body::<VhostUserInflight>(&message)
                .and_then(|asked| inflight::create(asked.num_queues, asked.queue_size))
            {
                Ok((file, info)) => (info, Some(file)),
                Err(e) => {
                    log::warn!("image {image}: GET_INFLIGHT_FD: {e}");
                    // A region of size 0 tells QEMU to go on without one.
                    (VhostUserInflight::default(), None)
                }
            };
            let fds: Vec<RawFd> = file.iter().map(File::as_raw_fd).collect();
            answer(&header, info.as_slice(), &fds)?;
        } else if header.is(FrontendReq::SET_INFLIGHT_FD) {
            let status = match set_inflight(message, backend) {
                Ok(()) => 0,
                Err(e) => {
                    log::warn!("image {image}: SET_INFLIGHT_FD: {e}");
                    1
                }
            };
            if header.needs_reply() {
                answer(&header, VhostUserU64::new(status).as_slice(), &[])?;
            }
        } else if header.is(FrontendReq::SET_BACKEND_REQ_FD) {
            // Kept here: the library's handle on this channel cannot send a config change
            // (see `config_change`). The library never needs it otherwise.
            let status = match message.files.into_iter().next() {
                Some(fd) => {
                    backend.config_channel().set(UnixStream::from(fd));
                    0
                }
                None => {
                    log::warn!("image {image}: SET_BACKEND_REQ_FD without a descriptor");
                    1
                }
            };
            if header.needs_reply() {
                answer(&header, VhostUserU64::new(status).as_slice(), &[])?;
            }
        } else if header.is(FrontendReq::SET_PROTOCOL_FEATURES) {
            // Noted on the way (whether the channel's messages get answers), then handled
            // by the library as usual.
            if let Ok(acked) = body::<VhostUserU64>(&message) {
                backend.config_channel().set_protocol_features(acked.value);
            }
            forward(library, &message)?;
        } else if header.is(FrontendReq::SET_VRING_KICK) {
            let kick = message.files.first().map(|f| f.try_clone()).transpose()?;
            forward(library, &message)?;
            // A restarted daemon has requests to replay that no kick announces (the guest
            // is waiting for them): kick the queue once ourselves.
            if let Some(kick) = kick {
                let _ = File::from(kick).write_all(&1u64.to_ne_bytes());
            }
        } else {
            forward(library, &message)?;
        }
    }
    Ok(())
}

fn set_inflight(message: Message, backend: &BlkBackend) -> io::Result<()> {
    let info = body::<VhostUserInflight>(&message)?;
    let file = message
        .files
        .into_iter()
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file descriptor"))?;
    backend.set_inflight(inflight::Region::map(File::from(file), &info)?)
}

/// The message's payload as a `T`, which must be exactly its size.
fn body<T: ByteValued + Default>(message: &Message) -> io::Result<T> {
    let mut value = T::default();
    if message.payload.len() != value.as_slice().len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("payload of {} bytes", message.payload.len()),
        ));
    }
    value.as_mut_slice().copy_from_slice(&message.payload);
    Ok(value)
}

/// Entry points for the fuzz target `relay` (fuzz/fuzz_targets/relay.rs). Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// What [`receive_all`] saw: per message read, its request code and payload length.
    pub struct Received {
        pub messages: Vec<(u32, usize)>,
        /// In-flight regions created for GET_INFLIGHT_FD messages.
        pub regions: usize,
        /// How the stream ended: None cleanly, else the error.
        pub error: Option<io::Error>,
    }

    /// Sends `bytes` down a socket pair and reads them back as the relay reads QEMU's side:
    /// message by message, answering GET_INFLIGHT_FD (creating the region asked for) and
    /// parsing SET_INFLIGHT_FD's body as `relay_requests` does, without a backend.
    /// `bytes` must fit the socket's buffer (a few hundred KiB).
    pub fn receive_all(bytes: &[u8]) -> io::Result<Received> {
        let (qemu, relay) = UnixStream::pair()?;
        (&qemu).write_all(bytes)?;
        qemu.shutdown(Shutdown::Write)?;
        let mut seen = Received {
            messages: Vec::new(),
            regions: 0,
            error: None,
        };
        loop {
            let message = match receive(&relay) {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(e) => {
                    seen.error = Some(e);
                    break;
                }
            };
            let header = message.header;
            seen.messages
                .push((u32::from_le(header.request), message.payload.len()));
            if header.is(FrontendReq::GET_INFLIGHT_FD) {
                if body::<VhostUserInflight>(&message)
                    .and_then(|asked| inflight::create(asked.num_queues, asked.queue_size))
                    .is_ok()
                {
                    seen.regions += 1;
                }
            } else if header.is(FrontendReq::SET_INFLIGHT_FD) {
                let _ = body::<VhostUserInflight>(&message);
            }
        }
        Ok(seen)
    }
}
