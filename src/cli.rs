//! The command line: clap structures only. Validation into a `Config` happens in main.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::cache::CacheMode;
use crate::image::{BlockRange, ImageName, LocationError, NodeId, Placement, Tier};
use crate::qos::{self, Limit, QosUpdate};
use crate::size::Size;
use crate::tiering::{TierChoice, TierMode};

#[derive(Debug, Parser)]
#[command(
    name = "cormorant",
    version,
    about = "Distributed, operator-controlled VM disk store served to QEMU over vhost-user-blk"
)]
pub struct Cli {
    /// Directory of the control socket and the images' vhost-user sockets.
    #[arg(long, global = true, default_value = "/run/cormorant")]
    pub run_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing would only obscure the clap struct
pub enum Command {
    /// Run the daemon: export every image and serve the control socket.
    Serve(ServeArgs),
    /// Create, inspect, remove, import and export images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Add or remove copies of an image's blocks.
    #[command(subcommand)]
    Location(LocationCommand),
    /// Counters and latency per image and per peer, as JSON.
    Stats { name: Option<ImageName> },
    /// Cluster nodes (with --etcd): liveness, incarnation, tiers and free space.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Bring out-of-sync copies of an image's blocks back in sync.
    Sync {
        name: ImageName,
        /// Blocks A..B (half-open); all blocks when left out.
        #[arg(long)]
        blocks: Option<BlockRange>,
        /// Copy at most this many bytes per second (K/M/G suffixes); unlimited when left out.
        #[arg(long)]
        rate: Option<Size>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Every node of the cluster (registered nodes are live; others are known by their images).
    List,
}

#[derive(Debug, Subcommand)]
pub enum LocationCommand {
    /// Add a copy of blocks A..B on NODE:TIER; it starts out of sync and is filled in the
    /// background (or by `cormorant sync`).
    Add {
        name: ImageName,
        #[arg(long)]
        blocks: Option<BlockRange>,
        #[arg(long)]
        at: Placement,
        /// Only the blocks with a copy on this NODE:TIER (or that a stripe places on it); for
        /// a stripe member and all blocks, the new copy takes the member's place in the stripe.
        /// Remove the old copies with `location rm` once `sync` says the new ones are in sync.
        #[arg(long, value_name = "NODE:TIER")]
        replace: Option<Placement>,
    },
    /// Remove the copy of blocks A..B on NODE:TIER; refused when it would remove the last
    /// in-sync copy of any block.
    Rm {
        name: ImageName,
        #[arg(long)]
        blocks: Option<BlockRange>,
        #[arg(long)]
        at: Placement,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// RAM tier directory (on tmpfs).
    #[arg(long, default_value = "/dev/shm/cormorant")]
    pub ram_dir: PathBuf,
    /// Volume tier directory (on a disk file system).
    #[arg(long, default_value = "/var/lib/cormorant")]
    pub volume_dir: PathBuf,
    /// Use synchronous I/O on the volume tier even where io_uring works (for comparison).
    #[arg(long)]
    pub no_uring: bool,
    /// This node's id; without it the daemon is the single node `local` and has no peers.
    #[arg(long)]
    pub node: Option<NodeId>,
    /// Address the peer protocol listens on (with --node), e.g. 127.0.0.2:7300.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Kept only to refuse it with a message: nodes find each other in etcd (--etcd).
    #[arg(long = "peer", value_parser = parse_peer, hide = true)]
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// etcd endpoints holding the cluster's metadata, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The cluster's name: the prefix of its keys in etcd (several clusters may share one etcd).
    #[arg(long, default_value = "default")]
    pub cluster: String,
    /// Seconds of the node's etcd lease. A node that cannot renew it stops acknowledging
    /// writes before it runs out; its images can be taken over by another node after it.
    #[arg(long, default_value_t = 10)]
    pub lease_ttl: u64,
    /// File holding the cluster's shared secret (64 hex characters or at least 32 bytes).
    #[arg(long)]
    pub cluster_key_file: Option<PathBuf>,
    /// Encrypt every peer frame after the handshake (ChaCha20-Poly1305 under the connection's
    /// session keys) instead of only authenticating it. Every node of the cluster must agree:
    /// a peer with the other setting is refused at the handshake.
    #[arg(long)]
    pub peer_encrypt: bool,
    /// Group that owns the image sockets, so QEMU running as that group (libvirt's
    /// libvirt-qemu) can connect; the sockets then get mode 0660 unless --socket-mode says.
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Mode of the image sockets, in octal (e.g. 0660).
    #[arg(long)]
    pub socket_mode: Option<String>,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9750).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds a failed peer stays on the failure list before it is tried again.
    #[arg(long, default_value_t = 60)]
    pub failure_timeout: u64,
    /// Node-wide budget for cache copies of remote blocks on the RAM tier, shared by every
    /// image with `--cache ram` (K/M/G/T suffixes; 0: no RAM caching).
    #[arg(long, default_value = "256M")]
    pub cache_budget_ram: Size,
    /// Node-wide budget for cache copies on the volume tier (images with `--cache volume`).
    #[arg(long, default_value = "1G")]
    pub cache_budget_volume: Size,
    /// Node-wide RAM budget for the blocks of `--tier auto` images (K/M/G/T suffixes): the
    /// hottest blocks that fit are moved to the RAM tier, the rest to the volume tier
    /// (0: every auto image's blocks stay on, or go back to, the volume tier).
    #[arg(long, default_value = "0")]
    pub ram_budget: Size,
    /// Bytes per second the tiering mover copies, promotions and demotions together.
    #[arg(long, default_value = "64M")]
    pub tier_rate: Size,
    /// Milliseconds between the tiering mover's plans (tests shorten it).
    #[arg(long, default_value_t = 1000)]
    pub tier_interval_ms: u64,
    /// Milliseconds between halvings of every block's heat (tests shorten it to see blocks
    /// go cold, and be demoted, quickly).
    #[arg(long, default_value_t = 30_000)]
    pub tier_decay_ms: u64,
}

/// Why a `--peer ID=ADDR` is refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerArgError {
    #[error("'{0}' is not ID=ADDR")]
    NotIdAddr(String),
    #[error("bad address '{addr}': {source}")]
    BadAddr {
        addr: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error(transparent)]
    BadId(#[from] LocationError),
}

fn parse_peer(text: &str) -> Result<(NodeId, SocketAddr), PeerArgError> {
    let (id, addr) = text
        .split_once('=')
        .ok_or_else(|| PeerArgError::NotIdAddr(text.to_string()))?;
    let addr = addr.parse().map_err(|source| PeerArgError::BadAddr {
        addr: addr.to_string(),
        source,
    })?;
    Ok((id.parse()?, addr))
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Create a thin image: it takes no space until written.
    Create {
        name: ImageName,
        /// Size, with an optional K, M, G or T suffix.
        #[arg(long)]
        size: Size,
        #[command(flatten)]
        layout: Layout,
        /// Where the blocks' copies go, as NODE:TIER (repeatable; default this node, --tier).
        #[arg(long = "at")]
        at: Vec<Placement>,
        /// Refuse guest writes.
        #[arg(long)]
        read_only: bool,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        stripe: StripeArgs,
    },
    /// Change an image's limits, live (a running guest is held to them at once). Run it on
    /// the image's owner; the limits are stored with the image and follow it to other nodes.
    Set {
        name: ImageName,
        #[command(flatten)]
        limits: LimitArgs,
        /// `auto`: this node moves the image's blocks between its RAM and volume tiers by
        /// heat, within `serve --ram-budget`; `manual`: they stay where they are.
        #[arg(long, value_name = "auto|manual")]
        tier: Option<TierMode>,
    },
    /// List the images.
    List,
    /// Print an image's metadata as JSON, with the locations of every block.
    Info { name: ImageName },
    /// Live migration, on the destination: take over an image from its owner node; its socket
    /// is exported here at once and ownership moves when the migrated guest starts here.
    Adopt {
        name: ImageName,
        #[arg(long)]
        from: Option<NodeId>,
    },
    /// Copy every block this node reads from other nodes into the image's cache, in the
    /// background while the guest runs (the image needs --cache ram|volume). Shows a
    /// progress bar until it is done, unless --no-wait.
    Prefetch {
        name: ImageName,
        /// Copy at most this many bytes per second (K/M/G suffixes); unlimited when left out.
        #[arg(long)]
        rate: Option<Size>,
        /// Return once the prefetch started.
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove an image and its block files (refused while a VM uses it).
    Rm { name: ImageName },
    /// Create an image from a file: raw, or any format `qemu-img` reads.
    Import {
        name: ImageName,
        file: PathBuf,
        #[command(flatten)]
        layout: Layout,
    },
    /// Take a read-only, point-in-time snapshot IMAGE@SNAP while the guest runs: `snapshot
    /// NAME SNAP`, or `snapshot --group NAME... SNAP` for several images at one instant.
    Snapshot {
        /// Snapshot several images at one instant (every image's writes held at one barrier).
        #[arg(long)]
        group: bool,
        /// The image (or, with --group, the images), then the snapshot's name.
        #[arg(required = true, num_args = 2.., value_name = "NAME... SNAP")]
        names: Vec<ImageName>,
    },
    /// Create a writable clone of a snapshot (IMAGE@SNAP) or a read-only image, in constant
    /// time: its blocks read through to the source until first written.
    Clone {
        source: ImageName,
        name: ImageName,
        /// Tier the clone's own blocks go on (default: the source's).
        #[arg(long)]
        tier: Option<Tier>,
        /// Where the clone's copies go, as NODE:TIER (repeatable; default this node, --tier).
        #[arg(long = "at")]
        at: Vec<Placement>,
    },
    /// Copy into a clone every block it still reads from its parent, then cut the link; the
    /// guest runs on meanwhile.
    Flatten { name: ImageName },
    /// Write an image to a file: raw, or another format through `qemu-img convert`.
    Export {
        name: ImageName,
        file: PathBuf,
        /// Output format (raw, qcow2, ...); anything but raw needs qemu-img.
        #[arg(long, default_value = "raw")]
        format: String,
    },
    /// Change an image's size, live: a running guest sees the new capacity at once (the new
    /// space reads as zeros). Run it on the image's owner. Shrinking is refused while a
    /// frontend uses the image and needs --allow-shrink (it frees the blocks past the end).
    Resize {
        name: ImageName,
        /// The new size in bytes, with an optional K, M, G or T suffix; a multiple of 512.
        size: Size,
        /// Allow a size below the current one (the data past it is dropped).
        #[arg(long)]
        allow_shrink: bool,
    },
}

/// Per-image limits (QoS), shared by all the image's queues.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Requests per second, or `none` to remove the limit.
    #[arg(long, value_parser = qos::parse_iops)]
    pub iops_limit: Option<Limit>,
    /// Bytes per second of reads and writes (K/M/G/T suffixes), or `none` to remove the limit.
    #[arg(long, value_parser = qos::parse_bps)]
    pub bps_limit: Option<Limit>,
    /// How long the image may run unthrottled after an idle spell, e.g. 250ms or 2s (the
    /// buckets hold that much of each limit); `default` for 100ms.
    #[arg(long, value_parser = qos::parse_burst)]
    pub burst: Option<Limit>,
    /// Keep cache copies of the blocks this node reads from other nodes, on `ram` or
    /// `volume`, or `off` (see README: caching).
    #[arg(long)]
    pub cache: Option<CacheMode>,
    /// The image's cache cap (K/M/G/T suffixes), or `none` for the node's budget only.
    #[arg(long, value_parser = qos::parse_cache_size)]
    pub cache_size: Option<Limit>,
}

impl LimitArgs {
    pub fn update(&self) -> QosUpdate {
        QosUpdate {
            iops: self.iops_limit,
            bps: self.bps_limit,
            burst_ms: self.burst,
            cache: self.cache,
            cache_size: self.cache_size,
            tiering: None,
        }
    }
}

/// Striping: blocks spread over members in stripe units (docs/CLUSTER.md).
#[derive(Debug, Args)]
pub struct StripeArgs {
    /// Stripe the blocks over these NODE:TIER members, in order: block i goes on member
    /// (i / width) mod M, and its further copies on the members after it.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "NODE:TIER,...",
        conflicts_with = "at"
    )]
    pub stripe: Vec<Placement>,
    /// Blocks per stripe unit (default 1).
    #[arg(long, value_name = "BLOCKS", requires = "stripe")]
    pub stripe_width: Option<u64>,
    /// Copies of each block, on consecutive members (default 1; at most the member count).
    #[arg(long, value_name = "K", requires = "stripe")]
    pub copies: Option<u32>,
}

impl StripeArgs {
    pub fn spec(self) -> Option<crate::stripe::StripeSpec> {
        (!self.stripe.is_empty()).then_some(crate::stripe::StripeSpec {
            members: self.stripe,
            width: self.stripe_width,
            copies: self.copies,
        })
    }
}

#[derive(Debug, Args)]
pub struct Layout {
    /// Block size: a power of two from 4K to 1G.
    #[arg(long, default_value = "4M")]
    pub block_size: Size,
    /// Tier the image's blocks are placed on; `auto` starts them on the volume tier and lets
    /// the node move them by heat (see `image set --tier`).
    #[arg(long, default_value = "ram", value_name = "ram|volume|auto")]
    pub tier: TierChoice,
}
