//! A real etcd cluster for a test: `members` etcd processes on 127.0.0.1, each with its own data
//! dir and log under the test's directory, with short heartbeat and election timeouts so a lost
//! leader is replaced in about a second. Start and keep it on one thread (see `PR_SET_PDEATHSIG`
//! in the module docs); dropping it kills every member.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::{kill_child, spawn_logged, wait_until};

/// How long a member (or the whole cluster at start) may take to answer: etcd starts in well
/// under a second here, elections take ~0.5 s with the timeouts below.
const START_TIMEOUT: Duration = Duration::from_secs(20);

struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    child: Option<Child>,
    /// Counts starts, so a restarted member logs to a new file.
    starts: u32,
}

pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
}

impl EtcdCluster {
    /// Starts the cluster and waits until every member reports healthy.
    pub fn start(dir: &Path, members: usize) -> EtcdCluster {
        // Hold every listener until all ports are picked, so no two are the same.
        let listeners: Vec<TcpListener> = (0..2 * members)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
            .collect();
        let port = |i: usize| listeners[i].local_addr().unwrap().port();
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", port(2 * i)),
                peer_url: format!("http://127.0.0.1:{}", port(2 * i + 1)),
                data_dir: dir.join(format!("m{i}.etcd")),
                child: None,
                starts: 0,
            })
            .collect();
        drop(listeners);
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir: dir.to_path_buf(),
            members,
            initial_cluster,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i, "new");
        }
        for i in 0..cluster.members.len() {
            assert!(
                cluster.wait_healthy(i, START_TIMEOUT),
                "etcd member {i} not healthy; log in {}",
                cluster.dir.display()
            );
        }
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The endpoints as etcdctl's `--endpoints` and the daemon's flag take them.
    pub fn endpoint_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts killed member `i` again on its data dir, and waits until its client port
    /// accepts connections (not until it is healthy: that needs a quorum, see
    /// [`wait_healthy`](Self::wait_healthy)).
    pub fn restart(&mut self, i: usize) {
        assert!(!self.is_running(i), "etcd member {i} is running");
        self.spawn(i, "existing");
        let addr = self.members[i].client_url["http://".len()..].to_string();
        let up = wait_until(START_TIMEOUT, || {
            std::net::TcpStream::connect(addr.as_str()).is_ok()
        });
        assert!(up, "restarted etcd member {i} does not listen on {addr}");
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        match self.members[i].child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits until member `i` answers `etcdctl endpoint health` (it has a leader and commits).
    pub fn wait_healthy(&self, i: usize, timeout: Duration) -> bool {
        let url = &self.members[i].client_url;
        wait_until(timeout, || {
            Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args([
                    "--endpoints",
                    url,
                    "--command-timeout=1s",
                    "endpoint",
                    "health",
                ])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    /// Runs etcdctl against every member with `args`; panics when it fails. Returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint_arg()])
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let m = &mut self.members[i];
        m.starts += 1;
        let log = self.dir.join(format!("{}-{}.log", m.name, m.starts));
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "cormorant-test"])
            // Quick elections: a leader lost is replaced in about a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
        let child = spawn_logged(&mut cmd, &log, &log)
            .unwrap_or_else(|e| panic!("start etcd {}: {e}", m.name));
        m.child = Some(child);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
