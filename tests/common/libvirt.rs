//! A libvirtd of its own for one test, driven with `virsh`.
//!
//! Debian's libvirtd runs as root (a privileged libvirtd, `qemu:///system`), but in private
//! mount and PID namespaces (`unshare`): the test's directories are bind-mounted over the paths
//! a privileged libvirtd always uses (`/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`,
//! `/var/cache/libvirt`, `/var/log/libvirt`). So the host's own libvirt, if any, is neither seen
//! nor touched, several tests can each run one side by side, and `virsh` reaches this one through
//! its socket in the test directory ([`Libvirtd::uri`]). On the host only the empty mount points
//! are created, where they are missing.
//!
//! The QEMU driver is set up for a host without systemd (see `QEMU_CONF`). libvirtd will not
//! start unless the `libvirt-qemu` user and group exist (even when qemu.conf names another user),
//! and only Debian's libvirt-daemon-system creates them: the namespace gets copies of
//! `/etc/passwd` and `/etc/group` with them added.
//!
//! Dropping the handle kills the namespace's PID 1, and with it libvirtd and every QEMU it
//! started: no domain outlives a test, even one that panicked halfway.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use super::{kill_child, read_lossy, spawn_logged, wait_until};

/// qemu.conf: QEMU runs as root, since the test daemon's vhost-user sockets are root's (a
/// packaged setup gives the sockets to the QEMU user instead, see libvirt/README.md). No
/// security driver, no cgroups and no per-domain mount namespace: nothing here manages them.
/// Serial logs and QEMU's stderr go straight to files (no virtlogd running).
const QEMU_CONF: &str = r#"# Written by tests/common/libvirt.rs for a test-private libvirtd.
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
"#;

/// libvirtd.conf: only root may use the sockets, and needs no authentication (no polkit here).
const LIBVIRTD_CONF: &str = r#"# Written by tests/common/libvirt.rs for a test-private libvirtd.
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
"#;

/// Runs inside the new namespaces with the test's libvirt directory as `$1`, then any extra
/// `HOST_DIR:PATH` bind mounts. As the namespace's PID 1 this shell also reaps the QEMU
/// processes libvirtd daemonizes (they are reparented to it); `wait` returns when libvirtd exits.
const START_SCRIPT: &str = r#"set -eu
d=$1
shift
for m in etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt \
         log:/var/log/libvirt passwd:/etc/passwd group:/etc/group; do
    mount --bind "$d/${m%%:*}" "${m#*:}"
done
for m in "$@"; do
    mount --bind "${m%%:*}" "${m#*:}"
done
libvirtd --config "$d/etc/libvirtd.conf" --pid-file "$d/libvirtd.pid" &
wait
"#;

/// The host paths the namespace mounts over: they must exist.
const MOUNT_POINTS: [&str; 5] = [
    "/etc/libvirt",
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/cache/libvirt",
    "/var/log/libvirt",
];

pub struct Libvirtd {
    dir: PathBuf,
    child: Option<Child>,
}

impl Libvirtd {
    /// Starts libvirtd with all its state under `dir` and waits until it answers (it probes
    /// QEMU's capabilities first: about a second).
    pub fn start(dir: &Path) -> Libvirtd {
        Self::start_node(dir, None, &[])
    }

    /// Like [`Libvirtd::start`], as one node of several on this machine: libvirt refuses to
    /// migrate a guest to a daemon with its own host UUID, so each node gets `host_uuid`; and
    /// `binds` (host directory, path in the namespace) give each node its own view of paths
    /// such as `/run/cormorant`, so one domain XML serves on every node.
    pub fn start_node(dir: &Path, host_uuid: Option<&str>, binds: &[(&Path, &str)]) -> Libvirtd {
        // libvirtd creates the others; QEMU's logs go to log/qemu, which it does not.
        for sub in ["etc", "run", "lib", "cache", "log/qemu"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create libvirt dir");
        }
        std::fs::write(dir.join("etc/qemu.conf"), QEMU_CONF).expect("write qemu.conf");
        let mut conf = LIBVIRTD_CONF.to_string();
        if let Some(uuid) = host_uuid {
            conf += &format!("host_uuid = \"{uuid}\"\n");
        }
        std::fs::write(dir.join("etc/libvirtd.conf"), conf).expect("write libvirtd.conf");
        write_with_entry(
            Path::new("/etc/passwd"),
            &dir.join("passwd"),
            "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin",
        );
        write_with_entry(
            Path::new("/etc/group"),
            &dir.join("group"),
            "libvirt-qemu:x:64055:",
        );
        for point in MOUNT_POINTS.iter().chain(binds.iter().map(|(_, to)| to)) {
            std::fs::create_dir_all(point)
                .unwrap_or_else(|e| panic!("create mount point {point}: {e}"));
        }

        let log = dir.join("libvirtd.log");
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private"])
            // --kill-child: when unshare dies, its child (PID 1 here) gets SIGKILL, and the
            // kernel then kills everything else in the PID namespace.
            .args(["--pid", "--fork", "--kill-child", "--mount-proc"])
            .args(["sh", "-c", START_SCRIPT, "sh"])
            .arg(dir)
            .args(
                binds
                    .iter()
                    .map(|(from, to)| format!("{}:{to}", from.display())),
            );
        let child = spawn_logged(&mut cmd, &log, &log).expect("spawn unshare ... libvirtd");
        let mut libvirtd = Libvirtd {
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        libvirtd.wait_ready(&log);
        libvirtd
    }

    fn wait_ready(&mut self, log: &Path) {
        let socket = self.dir.join("run/libvirt-sock");
        let child = self.child.as_mut().unwrap();
        let up = wait_until(Duration::from_secs(30), || {
            socket.exists() || !matches!(child.try_wait(), Ok(None))
        });
        assert!(
            up && matches!(child.try_wait(), Ok(None)),
            "libvirtd did not start:\n{}",
            read_lossy(log)
        );
        // The socket is there before the drivers are initialized; calls wait for them.
        let answered = wait_until(Duration::from_secs(30), || {
            self.virsh(&["version"]).status.success()
        });
        assert!(answered, "libvirtd does not answer:\n{}", read_lossy(log));
    }

    /// The connection URI for `virsh -c`: the system QEMU driver through this daemon's socket.
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.join("run/libvirt-sock").display()
        )
    }

    /// Runs `virsh -c URI <args>` and returns its output, success or not.
    pub fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh")
            .env("LC_ALL", "C")
            .args(["-q", "-c", &self.uri()])
            .args(args)
            .output()
            .expect("run virsh")
    }

    /// Runs virsh and returns its stdout; panics with its stderr if it failed.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `virsh domstate --reason`, e.g. `running (booted)` or `shut off (shutdown)`.
    pub fn domstate(&self, domain: &str) -> String {
        self.virsh_ok(&["domstate", "--reason", domain])
            .trim()
            .to_string()
    }

    /// The host path of a file libvirt or QEMU writes under `/var/log/libvirt/<rel>` in the
    /// namespace (a serial `<log file=...>`, `qemu/<domain>.log`).
    pub fn log_path(&self, rel: &str) -> PathBuf {
        self.dir.join("log").join(rel)
    }

    /// QEMU's command line and stderr for `domain`, as libvirt logged them.
    pub fn qemu_log(&self, domain: &str) -> String {
        read_lossy(&self.log_path(&format!("qemu/{domain}.log")))
    }

    /// libvirtd's own messages (errors and warnings).
    pub fn log(&self) -> String {
        read_lossy(&self.dir.join("libvirtd.log"))
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("libvirtd log:\n{}", self.log());
        }
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }
}

/// Copies the account file `from` to `to`, adding `entry` unless `from` has its name already.
fn write_with_entry(from: &Path, to: &Path, entry: &str) {
    let mut text =
        std::fs::read_to_string(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    let name = &entry[..=entry.find(':').unwrap()];
    if !text.lines().any(|l| l.starts_with(name)) {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(entry);
        text.push('\n');
    }
    std::fs::write(to, text).unwrap_or_else(|e| panic!("write {}: {e}", to.display()));
}
