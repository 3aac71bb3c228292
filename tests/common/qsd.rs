//! qemu-storage-daemon exporting a raw image file as a vhost-user-blk socket: the reference
//! backend for benchmarks, and proof that the guest harness works independently of Cormorant.

use super::{kill_child, read_lossy, spawn_logged, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// Export settings. `QsdOpts::default()` is one queue, buffered I/O (`cache.direct=off`).
#[derive(Clone, Debug)]
pub struct QsdOpts {
    pub num_queues: u16,
    /// `cache.direct=on`: O_DIRECT on the image file, bypassing the host page cache.
    pub direct: bool,
    /// `aio=` of the file driver, e.g. `"io_uring"` or `"native"` (needs `direct`); None keeps
    /// qsd's default (threads).
    pub aio: Option<String>,
    /// `discard=unmap`: qsd always offers DISCARD but frees space only with this.
    pub discard_unmap: bool,
}

impl Default for QsdOpts {
    fn default() -> Self {
        QsdOpts {
            num_queues: 1,
            direct: false,
            aio: None,
            discard_unmap: false,
        }
    }
}

impl QsdOpts {
    pub fn queues(mut self, n: u16) -> QsdOpts {
        self.num_queues = n;
        self
    }
}

/// A running qemu-storage-daemon; killed on drop. It locks its image file, so give every
/// daemon its own file.
pub struct Qsd {
    child: Child,
    pub socket: PathBuf,
    /// stdout and stderr of the daemon.
    pub log: PathBuf,
}

impl Qsd {
    /// Exports `image` (raw) on the unix socket `socket` and waits until the socket exists.
    /// Panics with the daemon's log if it exits or no socket appears within 10 s.
    pub fn start(image: &Path, socket: &Path, opts: &QsdOpts) -> Qsd {
        let mut file = format!(
            "driver=file,node-name=f0,filename={},cache.direct={}",
            image.display(),
            if opts.direct { "on" } else { "off" }
        );
        if let Some(aio) = &opts.aio {
            file += &format!(",aio={aio}");
        }
        let mut raw = "driver=raw,node-name=r0,file=f0".to_string();
        if opts.discard_unmap {
            file += ",discard=unmap";
            raw += ",discard=unmap";
        }
        let export = format!(
            "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={},writable=on,num-queues={}",
            socket.display(),
            opts.num_queues
        );
        let _ = std::fs::remove_file(socket);
        let log = PathBuf::from(format!("{}.log", socket.display()));
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.args(["--blockdev", &file, "--blockdev", &raw, "--export", &export]);
        let child = spawn_logged(&mut cmd, &log, &log)
            .unwrap_or_else(|e| panic!("start qemu-storage-daemon: {e}"));
        let mut qsd = Qsd {
            child,
            socket: socket.to_path_buf(),
            log,
        };
        // The socket file appears at bind(), immediately followed by listen(); QEMU connects
        // far later than that gap.
        let child = &mut qsd.child;
        let up = wait_until(Duration::from_secs(10), || {
            socket.exists() || !matches!(child.try_wait(), Ok(None))
        });
        if !up || !matches!(qsd.child.try_wait(), Ok(None)) {
            kill_child(&mut qsd.child);
            panic!(
                "qemu-storage-daemon did not come up on {}:\n{}",
                socket.display(),
                read_lossy(&qsd.log)
            );
        }
        qsd
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the daemon (SIGKILL). Its writes are already in the host page cache (or on disk
    /// with `direct`), so the image file can be read right after.
    pub fn stop(mut self) {
        kill_child(&mut self.child);
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}
