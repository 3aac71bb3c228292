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
pub mod etcd;
pub mod guest;
pub mod libvirt;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod qsd;
pub mod sim;

pub use process::{kill_child, read_lossy, spawn_logged, wait_until, which};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

/// A 3-member etcd under `dir/etcd` and `n` nodes (a, b, ...) that keep their metadata in it,
/// with a 3 s lease. Keep the etcd handle alive as long as the nodes.
pub fn etcd_cluster(dir: &Path, n: usize) -> (etcd::EtcdCluster, daemon::Cluster) {
    let etcd = start_etcd(dir);
    let cluster = daemon::Cluster::start_etcd(dir, n, &etcd.endpoint_arg(), 3);
    (etcd, cluster)
}

/// Like [`etcd_cluster`], node `wrong` holding another cluster key than the others.
pub fn etcd_cluster_with_wrong_key(
    dir: &Path,
    n: usize,
    wrong: usize,
) -> (etcd::EtcdCluster, daemon::Cluster) {
    let etcd = start_etcd(dir);
    let endpoints = vec![etcd.endpoint_arg(); n];
    let cluster = daemon::Cluster::start_etcd_each_with(dir, &endpoints, 3, Some(wrong));
    (etcd, cluster)
}

/// A 3-member etcd under `dir/etcd`.
pub fn start_etcd(dir: &Path) -> etcd::EtcdCluster {
    assert!(
        tools_available(&["etcd", "etcdctl"]),
        "the cluster tests need etcd: run scripts/setup.sh"
    );
    let etcd_dir = dir.join("etcd");
    std::fs::create_dir_all(&etcd_dir).expect("etcd dir");
    etcd::EtcdCluster::start(&etcd_dir, 3)
}

/// Deterministic, never-zero bytes (xorshift64*), so a block read as zeros or as another
/// block's data cannot pass for the one written.
pub fn never_zero_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let word = x.wrapping_mul(0x2545_f491_4f6c_dd1d) | 0x0101_0101_0101_0101;
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.truncate(len);
    out
}
