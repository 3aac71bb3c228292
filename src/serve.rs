//! `cormorant serve`: start-up checks, then the daemon until SIGTERM or SIGINT.

use std::fs::{self, File};
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::control;
use crate::daemon::{Config, Daemon};
use crate::engine::probe_uring;
use crate::image::Tier;
use crate::meta::cluster::{ClusterMeta, Join};
use crate::meta::records::TierRecord;
use crate::peer::{ClusterKey, PeerServer};
use crate::service::PeerService;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: io::Error,
    },
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
    for dir in [&config.run_dir, &config.dirs.ram, &config.dirs.volume] {
        fs::create_dir_all(dir).map_err(|source| ServeError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let _lock = lock_run_dir(&config)?;
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
            PeerServer::start(
                cluster.listen,
                key,
                config.node.clone(),
                Arc::new(PeerService::new(daemon.clone())),
            )
            .map_err(io_err("cannot listen for peers"))?,
        ),
        _ => None,
    };
    daemon.follow_cluster();
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
    let Some((cluster, etcd)) = config
        .cluster
        .as_ref()
        .and_then(|c| c.etcd.as_ref().map(|e| (c, e)))
    else {
        return Ok(None);
    };
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
/// The lock dies with the process, so a `kill -9` leaves nothing to clean up.
fn lock_run_dir(config: &Config) -> Result<File, ServeError> {
    let path = config.run_dir.join("cormorant.lock");
    let file = File::create(&path).map_err(io_err("cannot create the lock file"))?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(ServeError::AlreadyRunning(
            config.run_dir.display().to_string(),
        ));
    }
    Ok(file)
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
