//! The daemon's configuration, validated from the command line before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::ServeArgs;
use crate::image::NodeId;
use crate::store::TierDirs;

#[derive(Debug, Clone)]
pub struct Config {
    pub run_dir: PathBuf,
    pub dirs: TierDirs,
    pub node: NodeId,
    /// False when io_uring is unavailable here: the volume tier then uses synchronous I/O.
    pub use_uring: bool,
    /// None for a single-node daemon.
    pub cluster: Option<Cluster>,
    pub failure_timeout: Duration,
    pub metrics_listen: Option<SocketAddr>,
    /// Owner group and mode for the image sockets; None keeps the process's defaults.
    pub socket_access: Option<SocketAccess>,
    /// Node-wide cache budgets per tier (see `cache`).
    pub cache_budgets: crate::cache::Budgets,
    /// Heat tiering: the RAM budget of auto images and the mover's pace (see `tiering`).
    pub tiering: crate::tiering::TieringConfig,
}

/// Who may connect to the image sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    pub gid: Option<u32>,
    pub mode: u32,
}

/// How this node reaches the others.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub listen: SocketAddr,
    pub key_file: PathBuf,
    /// `--peer-encrypt`: frames after the handshake are encrypted, not only authenticated.
    pub encrypt: bool,
    /// Where the cluster's metadata lives.
    pub etcd: Etcd,
}

/// The etcd cluster holding the metadata.
#[derive(Debug, Clone)]
pub struct Etcd {
    pub endpoints: Vec<String>,
    pub cluster: String,
    pub lease_ttl: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--node needs --listen ADDR, --cluster-key-file FILE and --etcd URLS")]
    ClusterIncomplete,
    #[error("--listen and --cluster-key-file need --node ID")]
    NoNode,
    #[error("--peer-encrypt needs a cluster: --node, --listen, --cluster-key-file and --etcd")]
    EncryptWithoutCluster,
    #[error(
        "--peer is not needed any more: nodes register in etcd (--etcd) and find each other there"
    )]
    PeerLists,
    #[error("--etcd needs --node ID, --listen ADDR and --cluster-key-file FILE")]
    EtcdWithoutNode,
    #[error("--lease-ttl must be between 2 and 3600 seconds")]
    LeaseTtl,
    #[error("--cluster '{0}' must be 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    ClusterName(String),
    #[error("--failure-timeout must be at least 1 second")]
    FailureTimeout,
    #[error("no group named '{0}'")]
    NoSuchGroup(String),
    #[error("--socket-mode '{0}' is not an octal mode like 0660")]
    BadMode(String),
    #[error(
        "--tier-rate must be at least {} bytes per second",
        crate::tiering::MIN_RATE
    )]
    TierRate,
    #[error("--tier-interval-ms and --tier-decay-ms must be between 10 and 3600000")]
    TierTimes,
}

impl Config {
    pub fn from_args(run_dir: PathBuf, args: ServeArgs) -> Result<Config, ConfigError> {
        if args.failure_timeout == 0 {
            return Err(ConfigError::FailureTimeout);
        }
        if !args.peers.is_empty() {
            return Err(ConfigError::PeerLists);
        }
        let etcd = etcd(&args)?;
        let cluster = match (&args.node, args.listen, &args.cluster_key_file, etcd) {
            (None, None, None, None) => None,
            (Some(_), Some(listen), Some(key_file), Some(etcd)) => Some(Cluster {
                listen,
                key_file: key_file.clone(),
                encrypt: args.peer_encrypt,
                etcd,
            }),
            (_, _, _, Some(_)) => return Err(ConfigError::EtcdWithoutNode),
            (None, ..) => return Err(ConfigError::NoNode),
            (Some(_), ..) => return Err(ConfigError::ClusterIncomplete),
        };
        if args.peer_encrypt && cluster.is_none() {
            return Err(ConfigError::EncryptWithoutCluster);
        }
        let tiering = tiering(&args)?;
        Ok(Config {
            run_dir,
            dirs: TierDirs {
                ram: args.ram_dir,
                volume: args.volume_dir,
            },
            node: args.node.unwrap_or_else(NodeId::local),
            use_uring: !args.no_uring,
            cluster,
            failure_timeout: Duration::from_secs(args.failure_timeout),
            metrics_listen: args.metrics_listen,
            socket_access: socket_access(
                args.socket_group.as_deref(),
                args.socket_mode.as_deref(),
            )?,
            cache_budgets: crate::cache::Budgets {
                ram: args.cache_budget_ram.0,
                volume: args.cache_budget_volume.0,
            },
            tiering,
        })
    }

    /// Per-image metadata lives beside the volume tier's block directories, under a name no
    /// image can have (names never start with a dot).
    pub fn meta_dir(&self) -> PathBuf {
        self.dirs.volume.join(".meta")
    }
}

/// `--ram-budget`, `--tier-rate` and the mover's intervals, checked.
fn tiering(args: &ServeArgs) -> Result<crate::tiering::TieringConfig, ConfigError> {
    if args.tier_rate.0 < crate::tiering::MIN_RATE {
        return Err(ConfigError::TierRate);
    }
    let times = 10..=3_600_000;
    if !times.contains(&args.tier_interval_ms) || !times.contains(&args.tier_decay_ms) {
        return Err(ConfigError::TierTimes);
    }
    Ok(crate::tiering::TieringConfig {
        ram_budget: args.ram_budget.0,
        rate: args.tier_rate.0,
        interval: Duration::from_millis(args.tier_interval_ms),
        decay: Duration::from_millis(args.tier_decay_ms),
    })
}

fn etcd(args: &ServeArgs) -> Result<Option<Etcd>, ConfigError> {
    if args.etcd.is_empty() {
        return Ok(None);
    }
    if !(2..=3600).contains(&args.lease_ttl) {
        return Err(ConfigError::LeaseTtl);
    }
    if args.cluster.parse::<crate::image::ImageName>().is_err() {
        return Err(ConfigError::ClusterName(args.cluster.clone()));
    }
    Ok(Some(Etcd {
        endpoints: args.etcd.clone(),
        cluster: args.cluster.clone(),
        lease_ttl: Duration::from_secs(args.lease_ttl),
    }))
}

fn socket_access(
    group: Option<&str>,
    mode: Option<&str>,
) -> Result<Option<SocketAccess>, ConfigError> {
    if group.is_none() && mode.is_none() {
        return Ok(None);
    }
    let mode = match mode {
        Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| ConfigError::BadMode(text.to_string()))?,
        None => 0o660,
    };
    let gid = group.map(group_id).transpose()?;
    Ok(Some(SocketAccess { gid, mode }))
}

/// A group's id, by name or as a number.
fn group_id(name: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c_name =
        std::ffi::CString::new(name).map_err(|_| ConfigError::NoSuchGroup(name.to_string()))?;
    // SAFETY: getgrnam reads a NUL-terminated name; the result is copied out at once (this
    // runs once, at start, before any other thread could call it).
    let group = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if group.is_null() {
        return Err(ConfigError::NoSuchGroup(name.to_string()));
    }
    // SAFETY: non-null pointer to the static group entry getgrnam returned.
    Ok(unsafe { (*group).gr_gid })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["cormorant", "serve"];
        argv.extend_from_slice(args);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("clap accepts");
        match cli.command {
            crate::cli::Command::Serve(serve) => Config::from_args(cli.run_dir, serve),
            _ => unreachable!(),
        }
    }

    #[test]
    fn socket_access_is_parsed() {
        assert_eq!(parse(&[]).unwrap().socket_access, None);
        let c = parse(&["--socket-group", "0"]).unwrap();
        assert_eq!(
            c.socket_access,
            Some(SocketAccess {
                gid: Some(0),
                mode: 0o660
            })
        );
        let c = parse(&["--socket-mode", "0600"]).unwrap();
        assert_eq!(
            c.socket_access,
            Some(SocketAccess {
                gid: None,
                mode: 0o600
            })
        );
        assert!(parse(&["--socket-mode", "999"]).is_err());
        assert!(parse(&["--socket-group", "no-such-group-here"]).is_err());
    }

    #[test]
    fn single_node_by_default() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.node, NodeId::local());
        assert!(c.cluster.is_none());
    }

    #[test]
    fn cluster_needs_all_its_parts() {
        let full = [
            "--node",
            "a",
            "--listen",
            "127.0.0.1:7300",
            "--cluster-key-file",
            "/k",
            "--etcd",
            "http://127.0.0.1:2379",
        ];
        assert!(parse(&full).unwrap().cluster.is_some());
        assert!(!parse(&full).unwrap().cluster.unwrap().encrypt);
        let encrypted = [&full[..], &["--peer-encrypt"]].concat();
        assert!(parse(&encrypted).unwrap().cluster.unwrap().encrypt);
        assert_eq!(
            parse(&["--peer-encrypt"]).unwrap_err(),
            ConfigError::EncryptWithoutCluster
        );
        assert_eq!(
            parse(&full[..6]).unwrap_err(),
            ConfigError::ClusterIncomplete
        );
        assert_eq!(
            parse(&full[..4]).unwrap_err(),
            ConfigError::ClusterIncomplete
        );
        assert_eq!(parse(&full[2..]).unwrap_err(), ConfigError::EtcdWithoutNode);
        assert_eq!(
            parse(&["--listen", "127.0.0.1:1"]).unwrap_err(),
            ConfigError::NoNode
        );
    }

    #[test]
    fn etcd_replaces_peer_lists() {
        let base = [
            "--node",
            "a",
            "--listen",
            "127.0.0.1:7300",
            "--cluster-key-file",
            "/k",
            "--etcd",
            "http://127.0.0.1:2379,http://127.0.0.2:2379",
        ];
        let c = parse(&base).unwrap();
        let etcd = c.cluster.unwrap().etcd;
        assert_eq!(etcd.endpoints.len(), 2);
        assert_eq!(etcd.cluster, "default");
        let mut with_peer = base.to_vec();
        with_peer.extend_from_slice(&["--peer", "b=127.0.0.2:7300"]);
        assert_eq!(parse(&with_peer).unwrap_err(), ConfigError::PeerLists);
        assert_eq!(
            parse(&["--peer", "b=127.0.0.2:7300"]).unwrap_err(),
            ConfigError::PeerLists
        );
        assert_eq!(
            parse(&["--etcd", "http://127.0.0.1:2379"]).unwrap_err(),
            ConfigError::EtcdWithoutNode
        );
        let mut short = base.to_vec();
        short.extend_from_slice(&["--lease-ttl", "1"]);
        assert_eq!(parse(&short).unwrap_err(), ConfigError::LeaseTtl);
        let mut bad = base.to_vec();
        bad.extend_from_slice(&["--cluster", "a/b"]);
        assert!(matches!(parse(&bad), Err(ConfigError::ClusterName(_))));
    }
}
