//! The vhost-user socket of one disk, `<run-dir>/<name>.sock`: accepts frontends (QEMU) one
//! after another, serves each on a fresh vhost-user daemon, and turns away a second frontend
//! while one is connected. (Not to be confused with `image export`, which writes a raw file.)

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::config::SocketAccess;
use crate::disk::Disk;
use crate::peers::Peers;
use crate::virtio::backend::{BlkBackend, COMPLETION_EVENT, THROTTLE_EVENT};
use crate::virtio::relay;

/// How long a new frontend waits for the previous connection to finish draining before it is
/// turned away: a QEMU that reconnects (guest reboot, restart) comes back within milliseconds
/// of closing, while its old connection may still be completing requests.
const RECONNECT_GRACE: Duration = Duration::from_secs(2);

fn claim_within(disk: &Arc<Disk>, grace: Duration) -> Option<crate::disk::Claim> {
    let deadline = Instant::now() + grace;
    loop {
        if let Some(claim) = disk.claim() {
            return Some(claim);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The connection being served, so shutdown can end it and wait for its drain.
struct Active {
    shutdown: ShutdownHandle,
    thread: JoinHandle<()>,
}

pub struct VhostListener {
    disk: Arc<Disk>,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    active: Arc<Mutex<Option<Active>>>,
    accept_thread: Option<JoinHandle<()>>,
}

impl VhostListener {
    /// Binds the socket (replacing a stale one) and starts accepting.
    pub fn start(
        disk: Arc<Disk>,
        socket: PathBuf,
        use_uring: bool,
        peers: Arc<Peers>,
        access: Option<SocketAccess>,
    ) -> std::io::Result<VhostListener> {
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = bind_socket(&socket, |path| match access {
            Some(access) => set_access(path, access),
            None => Ok(()),
        })?;
        let relay_path = relay_path(&socket);
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(Mutex::new(None));
        let accept_thread = {
            let (disk, stop, active) = (disk.clone(), stop.clone(), active.clone());
            thread::Builder::new()
                .name(format!("accept-{}", disk.name()))
                .spawn(move || {
                    accept_loop(disk, listener, relay_path, stop, active, use_uring, peers)
                })?
        };
        log::info!("image {}: exported on {}", disk.name(), socket.display());
        Ok(VhostListener {
            disk,
            socket,
            stop,
            active,
            accept_thread: Some(accept_thread),
        })
    }

    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// Stops accepting, ends the current connection after draining its requests, and
    /// removes the socket.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop, blocked in accept(), with a connection of our own.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(active) = active {
            active.shutdown.shutdown();
            let _ = active.thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn accept_loop(
    disk: Arc<Disk>,
    listener: UnixListener,
    relay_path: PathBuf,
    stop: Arc<AtomicBool>,
    active: Arc<Mutex<Option<Active>>>,
    use_uring: bool,
    peers: Arc<Peers>,
) {
    let name = disk.name().clone();
    while !stop.load(Ordering::Acquire) {
        let frontend = match listener.accept() {
            Ok((frontend, _)) => frontend,
            Err(e) => {
                log::error!("image {name}: accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if stop.load(Ordering::Acquire) {
            break;
        }
        let Some(claim) = claim_within(&disk, RECONNECT_GRACE) else {
            log::warn!("image {name}: refusing a second frontend while one is connected");
            continue;
        };
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = crate::route::Device::new(disk.clone(), peers.clone(), use_uring);
        let backend = match BlkBackend::new(device, mem.clone()) {
            Ok(backend) => Arc::new(backend),
            Err(e) => {
                log::error!("image {name}: cannot set up a backend: {e}; no longer accepting");
                return;
            }
        };
        let mut daemon = match new_daemon(&backend, mem, &name.to_string()) {
            Ok(daemon) => daemon,
            Err(e) => {
                log::error!("image {name}: cannot set up vhost-user: {e}; no longer accepting");
                return;
            }
        };
        let library = relay::connect_library(&relay_path, |path| {
            daemon
                .start_client(path)
                .map_err(|e| std::io::Error::other(e.to_string()))
        });
        let relay = library.and_then(|library| {
            relay::start(&name.to_string(), frontend, library, backend.clone())
        });
        let relay = match relay {
            Ok(relay) => relay,
            Err(e) => {
                log::error!("image {name}: cannot serve the frontend: {e}");
                daemon.request_shutdown();
                let _ = daemon.wait();
                continue;
            }
        };
        backend.admit();
        log::info!("image {name}: frontend connected");
        let Some(shutdown) = daemon.shutdown_handle() else {
            continue;
        };
        let thread_name = name.clone();
        let conn_disk = disk.clone();
        let spawned = thread::Builder::new()
            .name(format!("conn-{name}"))
            .spawn(move || {
                match daemon.wait() {
                    Ok(()) => log::info!("image {thread_name}: frontend disconnected"),
                    // The frontend going away (guest power-off, hot-unplug, QEMU exit) is the
                    // normal end of a connection, whatever error the socket reports.
                    Err(e) => log::info!("image {thread_name}: frontend disconnected ({e})"),
                }
                backend.drain();
                // A frontend that went away without stopping the device (QEMU killed) no
                // longer runs it either.
                crate::ownership::device_stopped(&conn_disk);
                for thread in relay {
                    let _ = thread.join();
                }
                // Nothing is in flight and the old rings are gone: the next frontend may come
                // in while this connection's threads wind down.
                drop(claim);
                drop(daemon);
            });
        match spawned {
            Ok(thread) => {
                let previous = active
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(Active { shutdown, thread });
                if let Some(previous) = previous {
                    let _ = previous.thread.join();
                }
            }
            Err(e) => log::error!("image {name}: cannot start connection thread: {e}"),
        }
    }
}

fn new_daemon(
    backend: &Arc<BlkBackend>,
    mem: crate::virtio::worker::AtomicMem,
    name: &str,
) -> Result<VhostUserDaemon<Arc<BlkBackend>>, String> {
    let daemon = VhostUserDaemon::new(format!("vhost-{name}"), backend.clone(), mem)
        .map_err(|e| e.to_string())?;
    for (index, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        handler
            .register_listener(
                backend.completion_fd(index),
                EventSet::IN,
                u64::from(COMPLETION_EVENT),
            )
            .map_err(|e| format!("cannot watch io_uring completions: {e}"))?;
        handler
            .register_listener(
                backend.throttle_fd(index),
                EventSet::IN,
                u64::from(THROTTLE_EVENT),
            )
            .map_err(|e| format!("cannot watch the QoS timer: {e}"))?;
    }
    Ok(daemon)
}

/// Gives the socket its group and mode, so QEMU running as that group can connect.
fn set_access(path: &Path, access: SocketAccess) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(gid) = access.gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode))
}

/// Where the image's vhost-user handler listens for the relay (see `virtio::relay`): next to
/// the image's socket, hidden, and only for the moment it takes to connect.
fn relay_path(socket: &Path) -> PathBuf {
    let name = socket.file_name().unwrap_or_default().to_string_lossy();
    socket.with_file_name(format!(".{name}.relay"))
}

/// The socket path of an image.
/// Binds a listening socket at `path` that appears there only once it listens and `prepare`
/// (ownership, mode) has been applied to it: bound under a temporary name, then renamed. A
/// client polling for the path never meets a socket that refuses it or has the wrong mode.
pub fn bind_socket(
    path: &Path,
    prepare: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<UnixListener> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary)?;
    prepare(&temporary)?;
    std::fs::rename(&temporary, path)?;
    Ok(listener)
}

pub fn socket_path(run_dir: &Path, name: &crate::image::ImageName) -> PathBuf {
    run_dir.join(format!("{name}.sock"))
}
