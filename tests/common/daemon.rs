//! A `cormorant serve` process for one test, in the test's own directories, driven through
//! the real CLI (the same binary, as a client of the control socket).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::{kill_child, read_lossy, spawn_logged, wait_until};

pub const BIN: &str = env!("CARGO_BIN_EXE_cormorant");

pub struct Daemon {
    pub run_dir: PathBuf,
    pub ram_dir: PathBuf,
    pub volume_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
    extra: Vec<String>,
    /// Run the daemon inside this network namespace (`ip netns exec NS ...`).
    pub netns: Option<String>,
    /// Extra environment for the next starts.
    pub env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts a daemon whose directories all live under `dir`.
    pub fn start(dir: &Path) -> Daemon {
        Self::start_with(dir, Vec::new())
    }

    /// Starts a daemon with extra `serve` arguments (node id, peers, ...).
    pub fn start_with(dir: &Path, extra: Vec<String>) -> Daemon {
        Self::start_in(dir, extra, None)
    }

    /// Starts a daemon in network namespace `netns` (None: this one).
    pub fn start_in(dir: &Path, extra: Vec<String>, netns: Option<String>) -> Daemon {
        let mut daemon = Daemon {
            run_dir: dir.join("run"),
            ram_dir: dir.join("ram"),
            volume_dir: dir.join("vol"),
            log: dir.join("daemon.log"),
            child: None,
            starts: 0,
            extra,
            netns,
            env: Vec::new(),
        };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = self.log.with_extension(format!("{}.log", self.starts));
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "debug")
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("serve")
            .arg("--ram-dir")
            .arg(&self.ram_dir)
            .arg("--volume-dir")
            .arg(&self.volume_dir)
            .args(&self.extra);
        let _ = std::fs::remove_file(self.run_dir.join("control.sock"));
        let child = spawn_logged(&mut cmd, &log, &log).expect("spawn cormorant serve");
        self.child = Some(child);
        let control = self.run_dir.join("control.sock");
        let up = wait_until(Duration::from_secs(10), || control.exists());
        assert!(up, "daemon did not start:\n{}", read_lossy(&log));
    }

    /// Runs `cormorant --run-dir RUN <args>`; returns its stdout parsed as JSON, or panics.
    pub fn cli(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli_raw(args);
        assert!(
            out.status.success(),
            "cormorant {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("CLI prints JSON")
    }

    /// `image create NAME --size SIZE --block-size BLOCK` with a copy at each `node:tier`.
    pub fn create_image(
        &self,
        name: &str,
        size: &str,
        block: &str,
        at: &[&str],
    ) -> serde_json::Value {
        let mut args = vec![
            "image",
            "create",
            name,
            "--size",
            size,
            "--block-size",
            block,
        ];
        for place in at {
            args.extend(["--at", place]);
        }
        self.cli(&args)
    }

    /// `image import IMAGE FILE ARGS...` of a file holding `data` (removed afterwards).
    pub fn import(&self, image: &str, data: &[u8], args: &[&str]) -> serde_json::Value {
        let path = self.run_dir.join(format!("{image}.import"));
        std::fs::write(&path, data).unwrap();
        let mut cli = vec!["image", "import", image, path.to_str().unwrap()];
        cli.extend_from_slice(args);
        let made = self.cli(&cli);
        let _ = std::fs::remove_file(&path);
        made
    }

    /// The whole image, `size` bytes, through `image export` (export leaves holes past the
    /// last data: a short file reads as zeros there).
    pub fn exported(&self, image: &str, size: usize) -> Vec<u8> {
        let path = self.run_dir.join(format!("{image}.export"));
        self.cli(&["image", "export", image, path.to_str().unwrap()]);
        let mut raw = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        raw.resize(size, 0);
        raw
    }

    /// Runs the CLI and returns its whole output, success or not.
    pub fn cli_raw(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .args(args)
            .output()
            .expect("run cormorant")
    }

    pub fn socket(&self, image: &str) -> PathBuf {
        self.run_dir.join(format!("{image}.sock"))
    }

    /// (in-sync, out-of-sync) copies of `image` on node `on` over all blocks, as this node's
    /// `image info` reports them.
    pub fn copies_on(&self, image: &str, on: &str) -> (usize, usize) {
        let info = self.cli(&["image", "info", image]);
        let mut counts = (0, 0);
        for block in info["blocks"].as_array().expect("blocks") {
            for l in block["locations"].as_array().expect("locations") {
                if l["node"] == on {
                    if l["synced"].as_bool().expect("synced") {
                        counts.0 += 1;
                    } else {
                        counts.1 += 1;
                    }
                }
            }
        }
        counts
    }

    /// Where block `block` of `image` lives on `tier` of this node. Block directories are
    /// `<name>@<id>`; with no directory yet (nothing written) the path is under `<name>@`,
    /// which does not exist either. Panics when several incarnations of the name are left.
    pub fn block_file(&self, tier: &str, image: &str, block: u64) -> PathBuf {
        self.image_dir(tier, image).join(format!("{block:08}"))
    }

    /// The block directory of `image` on `tier` (see [`Daemon::block_file`]).
    pub fn image_dir(&self, tier: &str, image: &str) -> PathBuf {
        let root = if tier == "ram" {
            &self.ram_dir
        } else {
            &self.volume_dir
        };
        let prefix = format!("{image}@");
        let found: Vec<PathBuf> = std::fs::read_dir(root)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            found.len() <= 1,
            "several directories for {image}: {found:?}"
        );
        found
            .into_iter()
            .next()
            .unwrap_or_else(|| root.join(prefix))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGSTOP, and waits until every thread has stopped: from then on nothing sent to it is
    /// answered, as with a hung node.
    pub fn pause(&self) {
        let pid = self.pid();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let stopped = wait_until(Duration::from_secs(10), || {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return false;
            };
            tasks.flatten().all(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // The state follows the command name, which is in parentheses.
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
            })
        });
        assert!(stopped, "daemon {pid} did not stop");
    }

    /// SIGCONT after [`Daemon::pause`].
    pub fn resume(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, libc::SIGCONT) };
    }

    /// SIGKILL: no drain, no save, sockets left behind.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited with success.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let exited = wait_until(Duration::from_secs(20), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            kill_child(&mut child);
            return false;
        }
        child.wait().map(|s| s.success()).unwrap_or(false)
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts the daemon again after `kill9` or `terminate`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| read_lossy(&self.log.with_extension(format!("{i}.log"))))
            .collect::<Vec<_>>()
            .join("\n---- restart ----\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("daemon log:\n{}", self.log());
        }
        self.kill9();
    }
}

/// Several daemons on loopback addresses 127.0.0.2, .3, ..., sharing a cluster key.
/// How the nodes of a test cluster find each other and keep their metadata.
pub enum Membership {
    /// etcd: node i's endpoints (comma-separated) are `endpoints[i]`.
    Etcd {
        endpoints: Vec<String>,
        lease_ttl: u64,
        /// More `serve` arguments for every node.
        extra: Vec<String>,
    },
}

pub struct Cluster {
    pub nodes: Vec<Daemon>,
    pub names: Vec<String>,
}

impl Cluster {
    /// Starts `n` nodes a, b, c, ... on 127.0.0.2, .3, ... that keep their metadata in the
    /// etcd cluster at `etcd` (comma-separated endpoints), with a `lease_ttl` seconds lease.
    pub fn start_etcd(dir: &Path, n: usize, etcd: &str, lease_ttl: u64) -> Cluster {
        Self::start_etcd_each(dir, &vec![etcd.to_string(); n], lease_ttl)
    }

    /// Like [`Cluster::start_etcd`], node i reaching etcd at `etcd[i]` (e.g. through a
    /// [`super::proxy::Proxy`] the test can cut).
    pub fn start_etcd_each(dir: &Path, etcd: &[String], lease_ttl: u64) -> Cluster {
        Self::start_etcd_each_with(dir, etcd, lease_ttl, None)
    }

    /// Like [`Cluster::start_etcd_each`]; node `wrong_key` (if any) gets another cluster key.
    pub fn start_etcd_each_with(
        dir: &Path,
        etcd: &[String],
        lease_ttl: u64,
        wrong_key: Option<usize>,
    ) -> Cluster {
        let n = etcd.len();
        let ips: Vec<String> = (0..n).map(|i| format!("127.0.0.{}", i + 2)).collect();
        Self::start_etcd_at(dir, &ips, &vec![None; n], etcd, lease_ttl, wrong_key)
    }

    /// Node i listening on `ips[i]` inside `netns[i]`, reaching etcd at `etcd[i]`.
    pub fn start_etcd_at(
        dir: &Path,
        ips: &[String],
        netns: &[Option<String>],
        etcd: &[String],
        lease_ttl: u64,
        wrong_key: Option<usize>,
    ) -> Cluster {
        let membership = Membership::Etcd {
            endpoints: etcd.to_vec(),
            lease_ttl,
            extra: Vec::new(),
        };
        Self::start_with(dir, ips, netns, wrong_key, &membership)
    }

    /// [`Cluster::start_etcd`] with more `serve` arguments for every node.
    pub fn start_etcd_with(dir: &Path, n: usize, etcd: &str, extra: &[&str]) -> Cluster {
        let ips: Vec<String> = (0..n).map(|i| format!("127.0.0.{}", i + 2)).collect();
        let membership = Membership::Etcd {
            endpoints: vec![etcd.to_string(); n],
            lease_ttl: 3,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        Self::start_with(dir, &ips, &vec![None; n], None, &membership)
    }

    fn start_with(
        dir: &Path,
        ips: &[String],
        netns: &[Option<String>],
        wrong_key: Option<usize>,
        membership: &Membership,
    ) -> Cluster {
        let n = ips.len();
        let names: Vec<String> = (0..n)
            .map(|i| ((b'a' + i as u8) as char).to_string())
            .collect();
        // A port free here is free in a fresh namespace too.
        let addrs: Vec<String> = ips
            .iter()
            .map(|ip| {
                let port = std::net::TcpListener::bind(("127.0.0.1", 0))
                    .and_then(|l| l.local_addr())
                    .expect("free port")
                    .port();
                format!("{ip}:{port}")
            })
            .collect();
        let nodes = (0..n)
            .map(|i| {
                let node_dir = dir.join(&names[i]);
                std::fs::create_dir_all(&node_dir).unwrap();
                let key = node_dir.join("cluster.key");
                let secret = if wrong_key == Some(i) { "b7" } else { "a5" }.repeat(32);
                std::fs::write(&key, secret).unwrap();
                // A key file group or others can read is refused.
                let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
                std::fs::set_permissions(&key, private).unwrap();
                let mut args = vec![
                    "--node".to_string(),
                    names[i].clone(),
                    "--listen".to_string(),
                    addrs[i].clone(),
                    "--cluster-key-file".to_string(),
                    key.display().to_string(),
                    "--failure-timeout".to_string(),
                    "3".to_string(),
                ];
                let Membership::Etcd {
                    endpoints,
                    lease_ttl,
                    extra,
                } = membership;
                args.extend(extra.iter().cloned());
                args.extend(["--etcd".to_string(), endpoints[i].clone()]);
                args.extend(["--lease-ttl".to_string(), lease_ttl.to_string()]);
                Daemon::start_in(&node_dir, args, netns[i].clone())
            })
            .collect();
        Cluster { nodes, names }
    }
}
