//! Boot a small Linux guest under QEMU with vhost-user-blk disks and run a shell script in it.
//!
//! The guest is the host's Debian cloud kernel plus a busybox initramfs built by
//! `scripts/build-guest.sh`, cached under `target/guest/` (see [`GuestImage`]). Each run appends a
//! tiny cpio archive holding `/test.sh`; the guest's `/init` runs it with output on the serial
//! console, prints `CORMORANT-GUEST-EXIT <rc>` and powers off. Disks appear as `/dev/vda`,
//! `/dev/vdb`, ... in the order given.
//!
//! ```ignore
//! let out = Guest::run(&GuestOpts::new(dir.path(), "dd if=/dev/vda bs=4k count=1 iflag=direct")
//!     .disk(Disk::new(&sock).queues(2)));
//! out.expect_ok();
//! ```

use super::{kill_child, read_lossy, spawn_logged};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Marker line printed by the guest's `/init` after `/test.sh` finished.
const EXIT_MARKER: &str = "CORMORANT-GUEST-EXIT ";

/// Kernel and base initramfs, built once per kernel version and build script and shared by all
/// tests and test binaries.
#[derive(Debug)]
pub struct GuestImage {
    pub kver: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// fio, its libraries and nothing else, to append to the base: absent when the host has no
    /// fio. Kept out of the base because it doubles the boot time (about 2.5 s under TCG).
    pub fio: Option<PathBuf>,
}

impl GuestImage {
    /// Returns the cached image, building it first if needed. The cache directory is keyed by
    /// kernel version, a hash of the build script and whether fio is installed, so editing the
    /// script rebuilds it. A lock file serializes builds by parallel test binaries.
    pub fn get() -> &'static GuestImage {
        static IMAGE: OnceLock<GuestImage> = OnceLock::new();
        IMAGE.get_or_init(|| GuestImage::build().unwrap_or_else(|e| panic!("guest image: {e}")))
    }

    fn build() -> Result<GuestImage, String> {
        let script = repo_root().join("scripts/build-guest.sh");
        let out = Command::new(&script)
            .arg("--kver")
            .output()
            .map_err(|e| format!("run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let kver = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let text = std::fs::read(&script).map_err(|e| e.to_string())?;
        let has_fio = super::which("fio").is_some();
        let key = format!("{kver}-{:016x}-fio{}", fnv1a(&text), has_fio as u8);

        // CARGO_TARGET_TMPDIR is <target dir>/tmp, also with a custom target dir. Binaries (the
        // benchmark harness includes this file) do not get it: they use <repository>/target.
        let cache = match option_env!("CARGO_TARGET_TMPDIR").and_then(|t| Path::new(t).parent()) {
            Some(target) => target.join("guest"),
            None => repo_root().join("target/guest"),
        };
        std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
        let lock = File::create(cache.join(".lock")).map_err(|e| e.to_string())?;
        // SAFETY: plain syscall on an fd we own; the lock is released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!("flock: {}", std::io::Error::last_os_error()));
        }

        let dir = cache.join(&key);
        if !dir.join("initramfs.cpio.gz").exists() {
            // Build beside and rename, so an interrupted build never looks finished.
            let tmp = cache.join(format!("{key}.tmp"));
            let _ = std::fs::remove_dir_all(&tmp);
            let status = Command::new(&script)
                .arg(&tmp)
                .env("KVER", &kver)
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("{} failed: {status}", script.display()));
            }
            std::fs::rename(&tmp, &dir).map_err(|e| e.to_string())?;
            // Images of an older script or kernel (about 50 MiB each) are dead now.
            for entry in std::fs::read_dir(&cache)
                .map_err(|e| e.to_string())?
                .flatten()
            {
                if entry.file_name() != *key.as_str() && entry.file_name() != ".lock" {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        drop(lock);

        let fio = dir.join("fio.cpio.zst");
        Ok(GuestImage {
            kver,
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
            fio: fio.exists().then_some(fio),
        })
    }
}

/// 64-bit FNV-1a: a hash that is stable across Rust versions, for the cache key.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One vhost-user-blk disk of the guest.
#[derive(Clone, Debug)]
pub struct Disk {
    /// The backend's listening unix socket; QEMU connects to it as a client.
    pub socket: PathBuf,
    /// Virtqueues QEMU asks for. The guest uses at most one per vCPU: set `GuestOpts::cpus`.
    pub num_queues: u16,
    /// Lets QEMU reconnect to a restarted backend (`reconnect-ms` of the chardev), for tests that
    /// kill the daemon under a running guest. With it QEMU also waits at startup for the socket.
    pub reconnect_ms: Option<u32>,
    /// Extra `vhost-user-blk-pci` properties, e.g. `"queue-size=256,discard=off"`. The device has
    /// no `serial` property: the serial is whatever the backend answers to VIRTIO_BLK_T_GET_ID.
    pub device_props: Option<String>,
}

impl Disk {
    /// A single-queue disk served on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Disk {
        Disk {
            socket: socket.into(),
            num_queues: 1,
            reconnect_ms: None,
            device_props: None,
        }
    }

    pub fn queues(mut self, n: u16) -> Disk {
        self.num_queues = n;
        self
    }

    pub fn reconnect_ms(mut self, ms: u32) -> Disk {
        self.reconnect_ms = Some(ms);
        self
    }

    pub fn device_props(mut self, props: &str) -> Disk {
        self.device_props = Some(props.to_string());
        self
    }
}

/// How to run a guest. Build with [`GuestOpts::new`] and the chained setters.
#[derive(Clone, Debug)]
pub struct GuestOpts {
    /// Where the per-run initrd, `console.log` and `qemu-stderr.log` go (the test's temp dir).
    pub dir: PathBuf,
    /// Text of `/test.sh`, run by busybox `sh`; its exit status is the guest's exit code.
    pub script: String,
    pub disks: Vec<Disk>,
    /// Guest RAM in MiB (default 256); memfd-backed and shared, as vhost-user requires.
    pub memory_mib: u32,
    /// vCPUs (default 1). A multi-queue disk needs as many vCPUs for the guest to use its queues.
    pub cpus: u32,
    /// Append fio and its libraries (adds about 2.5 s to the boot). Panics at run time if the
    /// host had no fio when the image was built.
    pub fio: bool,
    /// Wall-clock limit from QEMU's start; then QEMU is killed (default 120 s: a plain boot takes
    /// about 3 s under TCG, but CI machines can be slow and busy).
    pub timeout: Duration,
    /// More QEMU arguments, after the vhost-user disks: e.g. a plain virtio-blk `-drive` for
    /// comparison (it is not counted in `cormorant_disks`, so the script waits for it itself).
    pub qemu_args: Vec<String>,
}

impl GuestOpts {
    pub fn new(dir: impl Into<PathBuf>, script: &str) -> GuestOpts {
        GuestOpts {
            dir: dir.into(),
            script: script.to_string(),
            disks: Vec::new(),
            memory_mib: 256,
            cpus: 1,
            fio: false,
            timeout: Duration::from_secs(120),
            qemu_args: Vec::new(),
        }
    }

    pub fn disk(mut self, disk: Disk) -> GuestOpts {
        self.disks.push(disk);
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> GuestOpts {
        self.memory_mib = mib;
        self
    }

    pub fn cpus(mut self, n: u32) -> GuestOpts {
        self.cpus = n;
        self
    }

    pub fn fio(mut self, on: bool) -> GuestOpts {
        self.fio = on;
        self
    }

    pub fn timeout(mut self, t: Duration) -> GuestOpts {
        self.timeout = t;
        self
    }

    pub fn qemu_args(mut self, args: &[&str]) -> GuestOpts {
        self.qemu_args.extend(args.iter().map(|a| a.to_string()));
        self
    }
}

/// Entry points: [`Guest::run`] boots, waits and returns the output; [`Guest::spawn`] leaves the
/// guest running in the background.
pub struct Guest;

impl Guest {
    /// Boots the guest, runs the script and waits for power-off or the timeout.
    pub fn run(opts: &GuestOpts) -> GuestOutput {
        Guest::spawn(opts).wait()
    }

    /// Starts QEMU and returns at once. The guest is killed when the handle is dropped.
    pub fn spawn(opts: &GuestOpts) -> RunningGuest {
        let image = GuestImage::get();
        std::fs::create_dir_all(&opts.dir).expect("create guest dir");
        let initrd = opts.dir.join("initrd.img");
        write_initrd(&initrd, image, opts);

        let mem = opts.memory_mib;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", "max"])
            .args(["-smp", &opts.cpus.to_string()])
            .args(["-m", &format!("{mem}M")])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            ])
            .args(["-numa", "node,memdev=mem"])
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&initrd)
            // no_timer_check: under TCG on a busy host the kernel's early check of the
            // IO-APIC timer can miss its ticks and panic ("IO-APIC + timer doesn't work"),
            // seen with four guests booting at once on two shared cores.
            .args([
                "-append",
                &format!(
                    "console=ttyS0 panic=-1 quiet no_timer_check cormorant_disks={}",
                    opts.disks.len()
                ),
            ]);
        for (i, disk) in opts.disks.iter().enumerate() {
            let mut chardev = format!("socket,id=c{i},path={}", disk.socket.display());
            if let Some(ms) = disk.reconnect_ms {
                chardev += &format!(",reconnect-ms={ms}");
            }
            // Fixed PCI slots in list order, so the guest's vda, vdb, ... follow the list.
            let mut device = format!(
                "vhost-user-blk-pci,chardev=c{i},num-queues={},addr={:#x}",
                disk.num_queues,
                0x10 + i
            );
            if let Some(props) = &disk.device_props {
                device += &format!(",{props}");
            }
            cmd.args(["-chardev", &chardev, "-device", &device]);
        }
        cmd.args(&opts.qemu_args);

        let console = opts.dir.join("console.log");
        let stderr = opts.dir.join("qemu-stderr.log");
        let child = spawn_logged(&mut cmd, &console, &stderr)
            .unwrap_or_else(|e| panic!("start qemu-system-x86_64: {e}"));
        RunningGuest {
            child,
            console,
            stderr,
            deadline: Instant::now() + opts.timeout,
        }
    }
}

/// Writes base initramfs [+ fio archive] + a newc archive with `/test.sh` to `path`. Each part
/// starts 4-byte aligned: the kernel looks for the next archive only at such offsets.
fn write_initrd(path: &Path, image: &GuestImage, opts: &GuestOpts) {
    let mut parts = vec![std::fs::read(&image.initramfs).expect("read base initramfs")];
    if opts.fio {
        let fio = image
            .fio
            .as_ref()
            .expect("GuestOpts::fio: fio was not installed when the guest image was built");
        parts.push(std::fs::read(fio).expect("read fio archive"));
    }
    parts.push(newc_archive(&[("test.sh", 0o755, opts.script.as_bytes())]));
    write_concatenated(path, &parts);
}

/// Writes the initrd of a guest that something else boots (libvirt starts QEMU itself): the
/// base initramfs plus one archive with `/test.sh` and the `extra` files (path in the guest
/// without the leading `/`, permission bits, data). Their directories must exist in the base
/// (`lib/modules`, `tmp`, ...).
pub fn write_initrd_with(
    path: &Path,
    image: &GuestImage,
    script: &str,
    extra: &[(&str, u32, &[u8])],
) {
    let mut files = vec![("test.sh", 0o755, script.as_bytes())];
    files.extend_from_slice(extra);
    let base = std::fs::read(&image.initramfs).expect("read base initramfs");
    write_concatenated(path, &[base, newc_archive(&files)]);
}

fn write_concatenated(path: &Path, parts: &[Vec<u8>]) {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(part);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    std::fs::write(path, out).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// An uncompressed cpio archive in the "newc" format the kernel unpacks: per file a 110-byte
/// ASCII header (magic and 13 hex fields), the NUL-terminated name and the data, each padded to
/// 4 bytes; then a `TRAILER!!!` entry.
fn newc_archive(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: usize, mode: u32, name: &str, data: &[u8]) {
        let fields = [
            ino,
            mode as usize,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // dev major
            0, // dev minor
            0, // rdev major
            0, // rdev minor
            name.len() + 1,
            0, // check
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut out = Vec::new();
    for (i, (name, perm, data)) in files.iter().enumerate() {
        entry(&mut out, i + 1, 0o100000 | perm, name, data);
    }
    entry(&mut out, 0, 0, "TRAILER!!!", &[]);
    out
}

/// A guest running in the background. Dropping it kills QEMU.
pub struct RunningGuest {
    child: Child,
    console: PathBuf,
    stderr: PathBuf,
    deadline: Instant,
}

impl RunningGuest {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.console)
    }

    /// Waits until the console contains `needle` (true), or QEMU exits or `timeout` passes
    /// (false). For scripts that announce a point, e.g. `echo READY`, before the test acts on
    /// the host side.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> bool {
        let (path, child) = (&self.console, &mut self.child);
        super::wait_until(timeout, || {
            read_lossy(path).contains(needle) || !matches!(child.try_wait(), Ok(None))
        }) && self.console().contains(needle)
    }

    /// Waits for QEMU to exit, killing it at the deadline set by `GuestOpts::timeout`.
    pub fn wait(mut self) -> GuestOutput {
        let exited = super::wait_until(
            self.deadline.saturating_duration_since(Instant::now()),
            || !matches!(self.child.try_wait(), Ok(None)),
        );
        if !exited {
            kill_child(&mut self.child);
        }
        self.output(!exited)
    }

    /// Kills QEMU now (SIGKILL) and returns what the guest printed so far.
    pub fn kill(mut self) -> GuestOutput {
        kill_child(&mut self.child);
        self.output(false)
    }

    fn output(&mut self, timed_out: bool) -> GuestOutput {
        let status = self.child.wait().ok();
        let mut out = GuestOutput::from_console(&self.console, read_lossy(&self.stderr));
        out.timed_out = timed_out;
        out.qemu_status = status;
        out
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// What a guest run produced.
#[derive(Debug)]
pub struct GuestOutput {
    /// The serial console (kernel errors, the script's stdout and stderr), `\r` removed.
    pub console: String,
    /// The exit status of `/test.sh` (127 if the guest found none); `None` if the guest never
    /// printed it (timeout, kernel panic, QEMU failed or was killed).
    pub exit_code: Option<i32>,
    /// QEMU was killed at the timeout.
    pub timed_out: bool,
    pub qemu_status: Option<ExitStatus>,
    /// QEMU's own messages, e.g. vhost-user errors.
    pub qemu_stderr: String,
    pub console_path: PathBuf,
}

impl GuestOutput {
    /// What a guest printed on its serial console, logged to `console_path`, for a guest that
    /// was started some other way (libvirt); `qemu_stderr` for the failure message.
    pub fn from_console(console_path: &Path, qemu_stderr: String) -> GuestOutput {
        // \r\n from the serial line discipline; strip \r so lines compare cleanly.
        let console = read_lossy(console_path).replace('\r', "");
        let exit_code = console.lines().rev().find_map(|l| {
            let pos = l.find(EXIT_MARKER)?;
            l[pos + EXIT_MARKER.len()..].trim().parse().ok()
        });
        GuestOutput {
            console,
            exit_code,
            timed_out: false,
            qemu_status: None,
            qemu_stderr,
            console_path: console_path.to_path_buf(),
        }
    }

    /// Panics, with the whole console and QEMU's stderr, unless the script exited with 0.
    pub fn expect_ok(&self) -> &GuestOutput {
        if self.exit_code != Some(0) {
            panic!(
                "guest script failed: exit code {:?}{} (QEMU {:?})\n\
                 ---- console ({}) ----\n{}\n---- qemu stderr ----\n{}",
                self.exit_code,
                if self.timed_out { ", timed out" } else { "" },
                self.qemu_status,
                self.console_path.display(),
                self.console,
                self.qemu_stderr
            );
        }
        self
    }

    /// The value of the last `RESULT key=value` line the guest printed for `key` (the line may
    /// start with other text: firmware escape sequences, a kernel message).
    pub fn value(&self, key: &str) -> Option<&str> {
        self.console.lines().rev().find_map(|l| {
            let rest = &l[l.find("RESULT ")? + "RESULT ".len()..];
            let (k, v) = rest.trim().split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// Like [`GuestOutput::value`], but panics with the console if the key is missing.
    pub fn expect_value(&self, key: &str) -> &str {
        self.value(key).unwrap_or_else(|| {
            panic!(
                "guest printed no `RESULT {key}=`\n---- console ----\n{}",
                self.console
            )
        })
    }
}

/// A guest script of `rounds` rounds on vda: each writes a fresh 256 KiB chunk (the round
/// number, repeated), flushes it, and verifies every chunk written so far, then prints
/// `ROUND i`; `RESULT write_error=i` or `RESULT mismatch=i/j` on a failure, `RESULT done=yes`
/// at the end. For guests that move between nodes while they write: what was written before
/// is checked after.
pub fn rounds_script(rounds: u32) -> String {
    format!(
        r#"
for i in $(seq 1 {rounds}); do
  printf "%0262144d" $i > /tmp/c
  dd if=/tmp/c of=/dev/vda bs=64k seek=$((i*4)) oflag=direct conv=fsync 2>/dev/null || echo "RESULT write_error=$i"
  md5sum < /tmp/c | cut -d' ' -f1 > /tmp/sum.$i
  for j in $(seq 1 $i); do
    b=$(dd if=/dev/vda bs=64k skip=$((j*4)) count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$b" = "$(cat /tmp/sum.$j)" ] || echo "RESULT mismatch=$i/$j"
  done
  echo "ROUND $i"
done
echo "RESULT done=yes"
"#
    )
}

/// The repository root: the manifest directory of the crate this file is compiled into (the
/// daemon's, for tests), or the nearest directory above it that holds scripts/ (the benchmark
/// harness, benches/harness, includes this file too).
fn repo_root() -> &'static Path {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|d| d.join("scripts/build-guest.sh").is_file())
        .unwrap_or(manifest)
}
