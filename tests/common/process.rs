//! Child processes for tests and the benchmark harness (which includes this file too): find a
//! tool, spawn with logs and a parent-death signal, kill, poll.

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
