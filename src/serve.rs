//! `cormorant serve`: start-up checks, then the daemon until SIGTERM or SIGINT.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::control;
use crate::daemon::{Config, Daemon};
use crate::engine::probe_uring;
use crate::holder::HolderService;
use crate::image::Tier;
use crate::meta::cluster::{ClusterMeta, Join};
use crate::meta::records::TierRecord;
use crate::peer::{ClusterKey, PeerServer};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("RAM directory {path}: {reason}")]
    RamDir { path: String, reason: String },
    #[error("cluster key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("another cormorant daemon is serving {0}")]
    AlreadyRunning(String),
    #[error("cannot join the cluster: {0}")]
    Join(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ServeError {
    move |source| ServeError::Io { what, source }
}

/// Runs the daemon until a termination signal; then drains, syncs, saves and cleans up.
pub fn run(mut config: Config) -> Result<(), ServeError> {
    for dir in [&config.run_dir, &config.dirs.volume] {
        fs::create_dir_all(dir).map_err(|source| ServeError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    private_dir(&config.dirs.ram)?;
    let _lock = lock_run_dir(&config.run_dir)?;
    raise_fd_limit();
    if config.use_uring {
        if let Err(e) = probe_uring() {
            log::warn!(
                "io_uring is not available here ({e}; see the kernel.io_uring_disabled sysctl or the container's seccomp policy): the volume tier uses synchronous I/O"
            );
            config.use_uring = false;
        }
    }
    let control_path = config.run_dir.join("control.sock");
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(io_err("cannot watch signals"))?;
    let key = match &config.cluster {
        Some(cluster) => {
            Some(
                ClusterKey::from_file(&cluster.key_file).map_err(|e| ServeError::Key {
                    path: cluster.key_file.display().to_string(),
                    reason: e.to_string(),
                })?,
            )
        }
        None => None,
    };
    let shared = join_cluster(&config)?;
    let daemon = Arc::new(
        Daemon::start(config.clone(), key.as_ref(), shared)
            .map_err(io_err("cannot load images"))?,
    );
    let _peer_server = match (&config.cluster, key) {
        (Some(cluster), Some(key)) => Some(
            PeerServer::start_with_encryption(
                cluster.listen,
                key,
                config.node.clone(),
                Arc::new(HolderService::new(daemon.clone())),
                cluster.encrypt,
            )
            .map_err(io_err("cannot listen for peers"))?,
        ),
        _ => None,
    };
    daemon.follow_cluster();
    daemon
        .start_tiering()
        .map_err(io_err("cannot start the tiering mover"))?;
    if let Some(addr) = config.metrics_listen {
        control::prometheus::start(daemon.clone(), addr).map_err(io_err("cannot serve metrics"))?;
    }
    control::server::start(daemon.clone(), &control_path)
        .map_err(io_err("cannot serve the control socket"))?;
    log::info!("serving; control socket {}", control_path.display());
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal}: draining and saving");
    }
    let _ = fs::remove_file(&control_path);
    daemon.shutdown();
    log::info!("stopped");
    Ok(())
}

/// Joins the etcd cluster when one is configured: registration, incarnation, lease.
fn join_cluster(config: &Config) -> Result<Option<Arc<ClusterMeta>>, ServeError> {
    let Some(cluster) = &config.cluster else {
        return Ok(None);
    };
    let etcd = &cluster.etcd;
    let tiers = [Tier::Ram, Tier::Volume]
        .into_iter()
        .map(|tier| tier_record(tier, config.dirs.root(tier)))
        .collect();
    let joined = ClusterMeta::join(Join {
        endpoints: &etcd.endpoints,
        cluster: &etcd.cluster,
        me: config.node.clone(),
        addr: cluster.listen,
        lease_ttl: etcd.lease_ttl,
        tiers,
    })
    .map_err(|e| ServeError::Join(e.to_string()))?;
    Ok(Some(Arc::new(joined)))
}

/// A tier's size and free space, from its file system.
fn tier_record(tier: Tier, dir: &std::path::Path) -> TierRecord {
    // SAFETY: statvfs is plain data; all zeros is a valid value of it.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: statvfs fills the struct we own from a NUL-terminated path.
    let ok = unsafe { libc::statvfs(path.as_ptr(), &mut stat) } == 0;
    let (capacity, free) = if ok {
        let unit = stat.f_frsize;
        (stat.f_blocks * unit, stat.f_bavail * unit)
    } else {
        (0, 0)
    };
    TierRecord {
        tier,
        capacity,
        free,
    }
}

/// One daemon per run directory: a second one would fight over the sockets and block files.
/// The lock (`flock` on Linux) dies with the process, so a `kill -9` leaves nothing to clean up.
fn lock_run_dir(run_dir: &Path) -> Result<File, ServeError> {
    let path = run_dir.join("cormorant.lock");
    let file = File::create(&path).map_err(io_err("cannot create the lock file"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => {
            Err(ServeError::AlreadyRunning(run_dir.display().to_string()))
        }
        Err(fs::TryLockError::Error(e)) => Err(io_err("cannot lock the lock file")(e)),
    }
}

/// Creates the RAM tier's directory with mode 0700, or checks the one there. Its default is
/// under /dev/shm, which every local user may write to: someone could create it first and
/// then read guests' blocks or plant files in it. So a directory that is not ours, not a
/// directory (a symlink), or open to group or others is refused rather than used.
fn private_dir(path: &Path) -> Result<(), ServeError> {
    let shown = path.display().to_string();
    let refuse = |reason: String| ServeError::RamDir {
        path: shown.clone(),
        reason,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|source| ServeError::Dir {
            path: parent.display().to_string(),
            source,
        })?;
    }
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(ServeError::Dir {
                path: shown,
                source: e,
            })
        }
        _ => {}
    }
    let meta = fs::symlink_metadata(path).map_err(|source| ServeError::Dir {
        path: shown.clone(),
        source,
    })?;
    if !meta.file_type().is_dir() {
        return Err(refuse(
            "not a directory (a symlink?): remove it and start again".into(),
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(refuse(format!(
            "owned by uid {}, not by this daemon's uid {me}: someone else created it; remove it (or `chown {me}` it if it is really ours) and start again",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(refuse(format!(
            "mode {mode:04o} lets group or others in to the block files: run `chmod 700 {shown}`"
        )));
    }
    Ok(())
}

/// Block files are kept open; let the process use as many descriptors as the hard limit allows.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_second_daemon_on_one_run_dir_is_refused_until_the_first_is_gone() {
        let root = tempfile::tempdir().unwrap();
        let first = lock_run_dir(root.path()).unwrap();
        let second = lock_run_dir(root.path()).unwrap_err();
        assert!(matches!(second, ServeError::AlreadyRunning(_)), "{second}");
        drop(first);
        lock_run_dir(root.path()).unwrap();
    }

    #[test]
    fn the_ram_dir_is_created_private() {
        let root = tempfile::tempdir().unwrap();
        let ram = root.path().join("shm").join("cormorant");
        private_dir(&ram).unwrap();
        assert_eq!(mode(&ram), 0o700);
        // Ours and private: used again at the next start.
        private_dir(&ram).unwrap();
    }

    #[test]
    fn an_open_or_foreign_ram_dir_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let ram = root.path().join("cormorant");
        fs::create_dir(&ram).unwrap();
        fs::set_permissions(&ram, fs::Permissions::from_mode(0o755)).unwrap();
        let text = private_dir(&ram).unwrap_err().to_string();
        assert!(text.contains(&ram.display().to_string()), "{text}");
        assert!(
            text.contains("0755") && text.contains("chmod 700"),
            "{text}"
        );
        assert_eq!(mode(&ram), 0o755, "refused, not silently changed");

        fs::set_permissions(&ram, fs::Permissions::from_mode(0o700)).unwrap();
        // Only root can give it away; as anyone else this part is skipped.
        if std::os::unix::fs::chown(&ram, Some(65534), Some(65534)).is_ok() {
            let text = private_dir(&ram).unwrap_err().to_string();
            assert!(text.contains("owned by uid 65534"), "{text}");
        }

        let link = root.path().join("link");
        let elsewhere = root.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let text = private_dir(&link).unwrap_err().to_string();
        assert!(text.contains("not a directory"), "{text}");
    }
}
