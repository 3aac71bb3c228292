//! Support code shared by the integration tests: include it with `mod common;`.
//!
//! - [`guest`]: boot a throwaway Linux guest under QEMU (TCG) with vhost-user-blk disks and run a
//!   shell script in it.
//! - [`qsd`]: qemu-storage-daemon as a reference vhost-user-blk backend.
//! - [`libvirt`]: a private libvirtd (own config, sockets and state) for one test.
//!
//! Every process started here is killed when its handle is dropped, and, as a backstop for a
//! test binary that is itself killed, when the thread that started it exits
//! (`PR_SET_PDEATHSIG`): so start and keep a process on the same thread.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

pub mod daemon;
pub mod guest;
pub mod libvirt;
pub mod qsd;

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Finds `name` on PATH, like `command -v`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether a test that needs `tools` should run. Outside CI a missing tool skips the test with a
/// note (developers may not have QEMU); under CI (env `CI` set) it fails the test, so that a
/// broken setup cannot turn into silently skipped tests.
pub fn tools_available(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("missing {missing:?} under CI: run scripts/setup.sh");
    }
    eprintln!("note: skipping test, {missing:?} not installed (run scripts/setup.sh)");
    false
}

/// A temporary directory for one test (under the system temp dir, to keep unix socket paths
/// short). It is removed when dropped, except while the thread is panicking: then it is kept and
/// its path printed, so console and daemon logs of a failed test can be read.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("cormorant-test-")
            .tempdir()
            .expect("create test dir");
        TestDir { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dir = self.dir.take().unwrap();
            eprintln!("test failed: keeping {}", dir.path().display());
            // Forgetting a TempDir leaves the directory in place.
            std::mem::forget(dir);
        }
    }
}

/// Spawns `cmd` with stdin from /dev/null, stdout to `stdout` and stderr to `stderr` (the same
/// file may be given for both), and `PR_SET_PDEATHSIG` = SIGKILL so it cannot outlive a test
/// binary that is killed before `Drop` handlers run.
pub fn spawn_logged(cmd: &mut Command, stdout: &Path, stderr: &Path) -> io::Result<Child> {
    let out = File::create(stdout)?;
    let err = if stderr == stdout {
        out.try_clone()?
    } else {
        File::create(stderr)?
    };
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Kills (SIGKILL) and reaps `child` if it is still running.
pub fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Polls `cond` every 20 ms until it is true (returns true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a log file for a failure message, tolerating invalid UTF-8 and a missing file.
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// md5 (hex) of the first `len` bytes of `path`, via the host's `md5sum`: compared with what a
/// guest's busybox `md5sum` printed.
pub fn md5_prefix(path: &Path, len: usize) -> String {
    use std::io::{Read, Write};
    let mut data = vec![0u8; len];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut data))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run md5sum");
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let out = child.wait_with_output().expect("md5sum");
    assert!(out.status.success(), "md5sum failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
