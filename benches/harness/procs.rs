//! The systems under test, each a child process killed when its handle is dropped (and, as a
//! backstop for a harness that is itself killed, by `PR_SET_PDEATHSIG`): a `cormorant serve`
//! daemon and qemu-storage-daemon exporting a raw file. Also per-process CPU time and RSS from
//! /proc, and small helpers for files and commands.

pub use crate::common::process::{kill_child, read_lossy, spawn_logged};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of starting and driving the systems under test.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("start {what}")]
    Spawn {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} did not come up within {START_TIMEOUT:?}; log:\n{log}")]
    NoSocket { what: String, log: String },
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Wraps an `io::Error` with what was being done.
pub fn io_ctx(what: impl Into<String>) -> impl FnOnce(io::Error) -> ProcError {
    let what = what.into();
    move |source| ProcError::Io { what, source }
}

/// A child process that is killed (SIGKILL) and reaped on drop.
pub struct Guarded {
    child: Child,
    pub log: PathBuf,
}

impl Guarded {
    /// Spawns `cmd` with stdin from /dev/null and stdout+stderr to `log`.
    pub fn spawn(cmd: &mut Command, log: &Path, what: &str) -> Result<Guarded, ProcError> {
        let child = spawn_logged(cmd, log, log).map_err(|source| ProcError::Spawn {
            what: what.to_string(),
            source,
        })?;
        Ok(Guarded {
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until `path` exists; fails with the log if the process exits or time runs out.
    pub fn wait_for_path(&mut self, path: &Path, what: &str) -> Result<(), ProcError> {
        let deadline = Instant::now() + START_TIMEOUT;
        while !path.exists() {
            if !self.running() || Instant::now() > deadline {
                return Err(ProcError::NoSocket {
                    what: what.to_string(),
                    log: read_lossy(&self.log),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit; returns whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// Runs a command to completion; its stdout on success, its stderr in the error otherwise.
pub fn run_cmd(cmd: &mut Command) -> Result<String, ProcError> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ProcError::Spawn {
            what: line.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ProcError::Command {
            cmd: line,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// CPU time (user + system, all threads) and memory of a process, from /proc.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ProcSample {
    /// User + system time of the process, exited threads included (10 ms ticks).
    pub cpu_secs: f64,
    /// On-CPU time of the threads alive now, in ns precision: for idle figures.
    pub live_threads_cpu_secs: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// Samples `pid`; zeros if it is gone.
pub fn sample(pid: u32) -> ProcSample {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_secs = (ticks(11) + ticks(12)) as f64 / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    ProcSample {
        cpu_secs,
        live_threads_cpu_secs: sched_cpu_secs(pid).unwrap_or(0.0),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    }
}

/// CPU time of all threads of `pid` in nanoseconds from each `/proc/PID/task/TID/schedstat`
/// (first field: time on CPU): finer than the 10 ms ticks of `/proc/PID/stat`, which matters
/// for idle figures. Threads that already exited are missed.
fn sched_cpu_secs(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// A `cormorant serve` daemon with its directories under one work directory.
pub struct Cormorant {
    bin: PathBuf,
    pub run_dir: PathBuf,
    proc: Guarded,
}

impl Cormorant {
    /// Starts the daemon; `ram_dir` should be on tmpfs, `volume_dir` on the disk under test.
    pub fn start(
        bin: &Path,
        work: &Path,
        ram_dir: &Path,
        volume_dir: &Path,
        uring: bool,
    ) -> Result<Cormorant, ProcError> {
        Self::start_with(bin, work, ram_dir, volume_dir, uring, &[])
    }

    /// [`Cormorant::start`] with more `serve` arguments (a node id, peers, ...).
    pub fn start_with(
        bin: &Path,
        work: &Path,
        ram_dir: &Path,
        volume_dir: &Path,
        uring: bool,
        extra: &[String],
    ) -> Result<Cormorant, ProcError> {
        let run_dir = work.join("run");
        std::fs::create_dir_all(&run_dir).map_err(io_ctx("create run dir"))?;
        let mut cmd = Command::new(bin);
        cmd.env("RUST_LOG", "warn")
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("serve")
            .arg("--ram-dir")
            .arg(ram_dir)
            .arg("--volume-dir")
            .arg(volume_dir);
        if !uring {
            cmd.arg("--no-uring");
        }
        cmd.args(extra);
        let mut proc = Guarded::spawn(&mut cmd, &work.join("cormorant.log"), "cormorant serve")?;
        proc.wait_for_path(&run_dir.join("control.sock"), "cormorant serve")?;
        Ok(Cormorant {
            bin: bin.to_path_buf(),
            run_dir,
            proc,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Runs `cormorant --run-dir RUN <args>` and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String, ProcError> {
        run_cmd(
            Command::new(&self.bin)
                .arg("--run-dir")
                .arg(&self.run_dir)
                .args(args),
        )
    }

    /// Creates an image and waits for its socket.
    pub fn create_image(
        &mut self,
        name: &str,
        size: u64,
        tier: &str,
    ) -> Result<PathBuf, ProcError> {
        let size = format!("{}M", size >> 20);
        self.cli(&["image", "create", name, "--size", &size, "--tier", tier])?;
        let sock = self.socket(name);
        self.proc.wait_for_path(&sock, "image socket")?;
        Ok(sock)
    }

    /// Imports a raw file as a new image (its size is the file's) and waits for its socket.
    pub fn import_image(
        &mut self,
        name: &str,
        file: &Path,
        tier: &str,
    ) -> Result<PathBuf, ProcError> {
        let file = file.to_string_lossy();
        self.cli(&["image", "import", name, &file, "--tier", tier])?;
        let sock = self.socket(name);
        self.proc.wait_for_path(&sock, "image socket")?;
        Ok(sock)
    }

    /// Waits for the socket of image `name` (exported at start and at creation).
    pub fn wait_socket(&mut self, name: &str) -> Result<PathBuf, ProcError> {
        let sock = self.socket(name);
        self.proc.wait_for_path(&sock, "image socket")?;
        Ok(sock)
    }

    /// The first `n` error lines of the daemon's log, for a note when a load saw errors.
    pub fn log_errors(&self, n: usize) -> Vec<String> {
        read_lossy(&self.proc.log)
            .lines()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
            .take(n)
            .map(str::to_string)
            .collect()
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.sock"))
    }

    /// SIGTERM, and a clean exit within 20 s (then SIGKILL by drop).
    pub fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.proc.pid() as i32, libc::SIGTERM) };
        self.proc.wait_exit(Duration::from_secs(20));
    }
}

/// qemu-storage-daemon's I/O engine for the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum QsdAio {
    /// `aio=io_uring`.
    IoUring,
    /// The default thread pool.
    Threads,
}

/// qemu-storage-daemon exporting one raw file (buffered: `cache.direct=off`, as Cormorant's tiers).
pub struct Qsd {
    proc: Guarded,
    pub socket: PathBuf,
}

impl Qsd {
    pub fn start(image: &Path, socket: &Path, aio: QsdAio, queues: u16) -> Result<Qsd, ProcError> {
        let mut file = format!(
            "driver=file,node-name=f0,filename={},cache.direct=off",
            image.display()
        );
        if aio == QsdAio::IoUring {
            file += ",aio=io_uring";
        }
        let export = format!(
            "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={},writable=on,\
             num-queues={queues}",
            socket.display()
        );
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.args(["--blockdev", &file])
            .args(["--blockdev", "driver=raw,node-name=r0,file=f0"])
            .args(["--export", &export]);
        let log = PathBuf::from(format!("{}.log", socket.display()));
        let mut proc = Guarded::spawn(&mut cmd, &log, "qemu-storage-daemon")?;
        proc.wait_for_path(socket, "qemu-storage-daemon")?;
        Ok(Qsd {
            proc,
            socket: socket.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// cloud-hypervisor's `vhost_user_block` exporting one raw file. It serves one frontend
/// connection, then removes its socket and exits, so each run starts its own process.
pub struct Ch {
    proc: Guarded,
}

impl Ch {
    pub fn start(bin: &Path, image: &Path, socket: &Path, queues: u16) -> Result<Ch, ProcError> {
        let backend = format!(
            "path={},socket={},num_queues={queues}",
            image.display(),
            socket.display()
        );
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(bin);
        cmd.env("RUST_LOG", "warn")
            .args(["--block-backend", &backend]);
        let log = PathBuf::from(format!("{}.log", socket.display()));
        let mut proc = Guarded::spawn(&mut cmd, &log, "ch-vhost-user-block")?;
        proc.wait_for_path(socket, "ch-vhost-user-block")?;
        Ok(Ch { proc })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// Writes `size` bytes of non-zero, non-repeating-per-block data to `path` (1 MiB at a time), so
/// reads hit real data and no file system can elide them as holes.
pub fn write_data_file(path: &Path, size: u64) -> Result<(), ProcError> {
    let mut f = File::create(path).map_err(io_ctx(format!("create {}", path.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    for chunk in 0..size.div_ceil(1 << 20) {
        fill_chunk(&mut buf, chunk);
        let n = (size - chunk * (1 << 20)).min(1 << 20) as usize;
        f.write_all(&buf[..n])
            .map_err(io_ctx(format!("write {}", path.display())))?;
    }
    f.sync_all().map_err(io_ctx("sync data file"))
}

/// Prefix of every work directory the harness makes (under the tier directories).
const WORK_PREFIX: &str = "cormorant-bench-";
/// File in a work directory naming the harness process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// A work directory under `parent`, removed on drop, with the owner's pid inside so that a later
/// run can remove it if this one is killed before its destructors run (a RAM-tier run leaves
/// gigabytes in /dev/shm otherwise).
/// A TCP port free on `ip` now (for a daemon's peer listener).
pub fn free_port(ip: &str) -> Result<u16, ProcError> {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_ctx("pick a port"))
}

pub fn work_dir(parent: &Path, what: &str) -> Result<tempfile::TempDir, ProcError> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{WORK_PREFIX}{what}-"))
        .tempdir_in(parent)
        .map_err(io_ctx(format!(
            "create {what} work dir in {}",
            parent.display()
        )))?;
    std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
        .map_err(io_ctx("write owner pid"))?;
    Ok(dir)
}

/// Removes work directories under `parent` whose owner process is gone.
pub fn remove_stale_work_dirs(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(WORK_PREFIX) {
            continue;
        }
        let owner = std::fs::read_to_string(e.path().join(OWNER_FILE)).unwrap_or_default();
        let alive = owner
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            eprintln!("removing stale {}", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Reads `path` once to bring it into the page cache.
pub fn read_whole_file(path: &Path) -> Result<(), ProcError> {
    let mut f = File::open(path).map_err(io_ctx(format!("open {}", path.display())))?;
    io::copy(&mut f, &mut io::sink()).map_err(io_ctx(format!("read {}", path.display())))?;
    Ok(())
}

/// Puts every regular file under `dir` in the same page-cache state: written back, dropped from
/// the cache, then read once sequentially. Without it the files of the systems differ in how
/// they came to be cached (large folios from `image import`'s big writes, small ones from a
/// copy), and on ext4 with large folios a 4 KiB buffered write into a large folio costs several
/// times more (`ext4_block_write_begin`), which would decide the volume-tier write cases.
/// On tmpfs dropping is a no-op and the read is cheap.
pub fn recache_dir(dir: &Path) -> Result<(), ProcError> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io_ctx(format!("list {}", d.display())))? {
            let e = e.map_err(io_ctx("list entry"))?;
            let ft = e.file_type().map_err(io_ctx("file type"))?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                drop_cache(&e.path())?;
                read_whole_file(&e.path())?;
            }
        }
    }
    Ok(())
}

pub fn drop_cache(path: &Path) -> Result<(), ProcError> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).map_err(io_ctx(format!("open {}", path.display())))?;
    f.sync_all()
        .map_err(io_ctx(format!("sync {}", path.display())))?;
    // SAFETY: posix_fadvise on a descriptor we own, plain integer arguments.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

/// Fills a 1 MiB chunk with bytes derived from its index (cheap, never all zero).
pub fn fill_chunk(buf: &mut [u8], chunk: u64) {
    let mut x = chunk.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for word in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
}
