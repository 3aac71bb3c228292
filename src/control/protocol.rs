//! The control protocol: one JSON request per connection on `<run-dir>/control.sock`,
//! answered by JSON lines: any number of `progress` lines, then one `ok` or `error` line.

use serde::{Deserialize, Serialize};

use crate::image::{BlockRange, ImageName, NodeId, Placement, Tier};
use crate::qos::QosUpdate;
use crate::stripe::StripeSpec;

/// Longest request line the daemon reads; requests are small, so anything longer is junk.
pub const MAX_REQUEST_LEN: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Allowed when no image of that name exists. `at` lists where each block's copies go
    /// (empty: this node, on `tier`); every node named must be this one or a known peer.
    ImageCreate {
        name: ImageName,
        size: u64,
        block_size: u64,
        tier: Tier,
        read_only: bool,
        #[serde(default)]
        at: Vec<Placement>,
        /// Limits from the start (see `ImageSet`); none when left out.
        #[serde(default)]
        qos: QosUpdate,
        /// Stripe the blocks over these members (see `stripe`); refused with `at`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stripe: Option<StripeSpec>,
    },
    /// Changes an image's limits (IOPS, bytes per second, burst), live: a running guest is
    /// held to them from its next request. Only the owner changes them; they are stored with
    /// the image's metadata.
    ImageSet {
        name: ImageName,
        qos: QosUpdate,
    },
    ImageList,
    /// The cluster's nodes (a single node lists itself).
    NodeList,
    ImageInfo {
        name: ImageName,
    },
    /// Allowed when no frontend is connected to the image.
    ImageRm {
        name: ImageName,
    },
    /// Creates `name` from a raw file; allowed when no image of that name exists.
    ImageImport {
        name: ImageName,
        path: String,
        block_size: u64,
        tier: Tier,
    },
    /// Adds a copy of `blocks` (all when None) at `at`; blocks that already have a copy there
    /// keep it. New copies start out of sync and are filled in the background.
    ///
    /// With `replace`, only blocks with a copy at `replace` (or that the image's stripe
    /// places on member `replace`) get one; for all blocks of a stripe member, `at` takes its
    /// place in the stripe.
    LocationAdd {
        name: ImageName,
        blocks: Option<BlockRange>,
        at: Placement,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replace: Option<Placement>,
    },
    /// Removes the copy at `at` of `blocks`; refused when any block would be left without an
    /// in-sync copy.
    LocationRm {
        name: ImageName,
        blocks: Option<BlockRange>,
        at: Placement,
    },
    /// Brings the out-of-sync copies of `blocks` in sync, copying only blocks that differ, at
    /// most `rate` bytes per second. Allowed while a guest runs.
    Sync {
        name: ImageName,
        blocks: Option<BlockRange>,
        rate: Option<u64>,
    },
    /// Live migration or a restart elsewhere, on the node that is to serve the image: export
    /// it here in standby; ownership moves when a guest here starts the device (and only if
    /// no frontend runs it elsewhere then). With etcd the metadata comes from there and
    /// `from` may be left out; without, it is fetched from the owner `from`.
    ImageAdopt {
        name: ImageName,
        #[serde(default)]
        from: Option<NodeId>,
    },
    /// Starts copying every block this node reads from other nodes into the image's cache,
    /// in the background, at most `rate` bytes per second; progress shows in `Stats`. Only
    /// on the owner, with the image's cache on; refused while one runs.
    ImagePrefetch {
        name: ImageName,
        #[serde(default)]
        rate: Option<u64>,
    },
    /// Counters and latency for one image, or for every image and peer.
    Stats {
        name: Option<ImageName>,
    },
    /// Writes the image to a raw file (sparse); allowed at any time, consistent when no
    /// frontend is writing.
    ImageExport {
        name: ImageName,
        path: String,
    },
    /// Takes snapshot `snapshot` of every image in `names` at one instant (their writes held
    /// at one barrier): read-only images named `NAME@SNAPSHOT`. Allowed while guests run.
    ImageSnapshot {
        names: Vec<ImageName>,
        snapshot: ImageName,
    },
    /// Creates `name`, a writable clone of `source` (a snapshot or a read-only image): its
    /// blocks read through to `source` until written. `tier` defaults to the source's.
    ImageClone {
        source: ImageName,
        name: ImageName,
        #[serde(default)]
        tier: Option<Tier>,
        #[serde(default)]
        at: Vec<Placement>,
    },
    /// Copies into a clone every block it reads through to its parent, then cuts the link.
    /// Allowed while a guest runs.
    ImageFlatten {
        name: ImageName,
    },
    /// Changes an image's size to `size` bytes (a multiple of 512), on its owner; a running
    /// guest is told the new capacity at once. Growing is allowed at any time; shrinking
    /// needs `allow_shrink` and no frontend using the image. Refused for read-only images.
    ImageResize {
        name: ImageName,
        size: u64,
        #[serde(default)]
        allow_shrink: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Progress { done: u64, total: u64 },
    Ok(serde_json::Value),
    Error(String),
}
