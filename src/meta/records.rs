//! The cluster's metadata as etcd keys and values: which key holds what, and how an image's
//! metadata is cut into records and put back together. Nothing here talks to etcd.
//!
//! Layout under `/cormorant/<cluster>/` (docs/SCALING.md counts keys and bytes):
//!
//! | key                         | value                        | lease     | written by        |
//! |-----------------------------|------------------------------|-----------|-------------------|
//! | `node/<node>`               | [`NodeRecord`]               | the node's| the node          |
//! | `incarnation/<node>`        | decimal counter              | none      | the node, at start|
//! | `image/<name>`              | [`ImageRecord`]              | none      | create, take-over |
//! | `extents/<id>/<chunk %08d>` | [`ChunkRecord`]              | none      | the image's owner |
//! | `active/<id>`               | [`ActiveRecord`]             | owner's   | the image's owner |
//! | `lost/<id>/<node>`          | [`LostRecord`]               | none      | a holder, at start|
//! | `qos/<id>`                  | [`QosLimits`]                | none      | the image's owner |
//! | `stripe/<id>`               | [`Stripe`](crate::stripe::Stripe) | none      | the image's owner |
//! | `size/<id>`                 | [`SizeRecord`]               | none      | the image's owner |
//!
//! An image's limits live in their own key, not its header: writing the header moves the
//! epoch, which must change only with the owner. An image without the key is unlimited (so
//! records from before limits existed read as they did). A striped image's layout lives in
//! its own key for the same reason (a location change may rename a member); an image
//! without one is not striped. An image's size, once `image resize` changed it, lives in its
//! own key too (the header keeps the size it was created with): an image without one has its
//! header's size.
//!
//! An image's **epoch** is the etcd revision at which its `image/<name>` key was last written:
//! only creation and ownership changes write it, so the epoch goes up exactly when the owner
//! changes, and it is unique across the cluster's whole history (a re-created image never
//! reuses an old epoch).

use serde::{Deserialize, Serialize};

use crate::image::meta::{MetaError, FORMAT_VERSION};
use crate::image::table::{BlockTable, Extent};
use crate::image::{BlockRange, ImageId, ImageMeta, ImageName, NodeId, Tier};
use crate::qos::QosLimits;

/// Blocks per extents record. A record holds at most this many extents; with four copies per
/// block an extent takes about 200 bytes of JSON, so a fully fragmented record stays near
/// 400 KiB, well under etcd's 1.5 MiB value limit. An unfragmented 20 GiB image of 4 MiB
/// blocks is three records.
pub const CHUNK_BLOCKS: u64 = 2048;

/// Key names of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// What a key under the cluster's prefix is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Node(NodeId),
    Incarnation(NodeId),
    Image(ImageName),
    Chunk(ImageId, u64),
    Active(ImageId),
    Lost(ImageId, NodeId),
    Qos(ImageId),
    Stripe(ImageId),
    Size(ImageId),
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            prefix: format!("/cormorant/{cluster}/"),
        }
    }

    /// Every key of the cluster starts with this.
    pub fn prefix(&self) -> Vec<u8> {
        self.prefix.clone().into_bytes()
    }

    fn key(&self, rest: String) -> Vec<u8> {
        format!("{}{rest}", self.prefix).into_bytes()
    }

    pub fn node(&self, node: &NodeId) -> Vec<u8> {
        self.key(format!("node/{node}"))
    }

    pub fn nodes(&self) -> Vec<u8> {
        self.key("node/".into())
    }

    pub fn incarnation(&self, node: &NodeId) -> Vec<u8> {
        self.key(format!("incarnation/{node}"))
    }

    pub fn image(&self, name: &ImageName) -> Vec<u8> {
        self.key(format!("image/{name}"))
    }

    pub fn images(&self) -> Vec<u8> {
        self.key("image/".into())
    }

    pub fn chunk(&self, id: ImageId, chunk: u64) -> Vec<u8> {
        self.key(format!("extents/{id}/{chunk:08}"))
    }

    pub fn chunks(&self, id: ImageId) -> Vec<u8> {
        self.key(format!("extents/{id}/"))
    }

    pub fn active(&self, id: ImageId) -> Vec<u8> {
        self.key(format!("active/{id}"))
    }

    pub fn lost(&self, id: ImageId, node: &NodeId) -> Vec<u8> {
        self.key(format!("lost/{id}/{node}"))
    }

    pub fn qos(&self, id: ImageId) -> Vec<u8> {
        self.key(format!("qos/{id}"))
    }

    pub fn stripe(&self, id: ImageId) -> Vec<u8> {
        self.key(format!("stripe/{id}"))
    }

    pub fn size(&self, id: ImageId) -> Vec<u8> {
        self.key(format!("size/{id}"))
    }

    /// The key named by `key`.
    pub fn encode(&self, key: &Key) -> Vec<u8> {
        match key {
            Key::Node(node) => self.node(node),
            Key::Incarnation(node) => self.incarnation(node),
            Key::Image(name) => self.image(name),
            Key::Chunk(id, chunk) => self.chunk(*id, *chunk),
            Key::Active(id) => self.active(*id),
            Key::Lost(id, node) => self.lost(*id, node),
            Key::Qos(id) => self.qos(*id),
            Key::Stripe(id) => self.stripe(*id),
            Key::Size(id) => self.size(*id),
        }
    }

    /// What `key` is; `None` for keys this version does not know (they are ignored). Only
    /// keys exactly as the builders write them are known: an id in upper case or a chunk
    /// number with a sign names no key of ours, though the field parsers take them.
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        self.parse_fields(key)
            .filter(|parsed| self.encode(parsed) == key)
    }

    fn parse_fields(&self, key: &[u8]) -> Option<Key> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        let (kind, rest) = rest.split_once('/')?;
        match kind {
            "node" => rest.parse().ok().map(Key::Node),
            "incarnation" => rest.parse().ok().map(Key::Incarnation),
            "image" => rest.parse().ok().map(Key::Image),
            "active" => rest.parse().ok().map(Key::Active),
            "qos" => rest.parse().ok().map(Key::Qos),
            "stripe" => rest.parse().ok().map(Key::Stripe),
            "size" => rest.parse().ok().map(Key::Size),
            "lost" => {
                let (id, node) = rest.split_once('/')?;
                Some(Key::Lost(id.parse().ok()?, node.parse().ok()?))
            }
            "extents" => {
                let (id, chunk) = rest.split_once('/')?;
                let chunk = chunk.parse().ok().filter(|_| chunk.len() == 8)?;
                Some(Key::Chunk(id.parse().ok()?, chunk))
            }
            _ => None,
        }
    }
}

/// A node as the cluster sees it: where to reach it and what it offers. Lives under the
/// node's lease, so it disappears when the node stops renewing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// The peer protocol's address.
    pub addr: std::net::SocketAddr,
    /// Goes up at every start of the daemon: RAM-tier copies belong to one incarnation.
    pub incarnation: u64,
    /// The lease this record (and the node's `active` keys) live under.
    pub lease: i64,
    pub tiers: Vec<TierRecord>,
    /// Which process registered it: a restart on the same host can tell that a previous run
    /// is gone (and revoke its lease) instead of waiting for the lease to run out.
    pub host: String,
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierRecord {
    pub tier: Tier,
    /// Bytes of the file system the tier lives on, and bytes free there.
    pub capacity: u64,
    pub free: u64,
}

/// An image's fixed shape and its owner. The epoch is this key's mod revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    pub version: u32,
    pub id: ImageId,
    pub owner: NodeId,
    pub size: u64,
    pub block_size: u64,
    pub tier: Tier,
    pub read_only: bool,
    pub chunk_blocks: u64,
}

/// The extents of blocks `chunk * CHUNK_BLOCKS ..` (absolute block numbers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRecord {
    pub extents: Vec<Extent>,
}

/// An image's size after a resize (see the layout above): it overrides the header's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeRecord {
    pub size: u64,
}

/// A frontend runs the image's device on `node`: nobody else may take the image over until
/// this key is gone (the device stopped, or the node's lease ran out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveRecord {
    pub node: NodeId,
    pub epoch: u64,
}

/// A holder lost its copies on `tiers` (the tier's directory was gone at its start: a RAM
/// tier after a reboot). The owner marks them out of sync and deletes this record; until
/// then the holder refuses to serve them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRecord {
    pub tiers: Vec<Tier>,
    pub incarnation: u64,
    /// The copies may merely be stale (the host lost power with writes not yet flushed), not
    /// gone: the owner marks them out of sync only where another in-sync copy has the data.
    #[serde(default)]
    pub suspect: bool,
}

impl ImageRecord {
    pub fn of(meta: &ImageMeta) -> ImageRecord {
        ImageRecord {
            version: FORMAT_VERSION,
            id: meta.id,
            owner: meta.owner.clone(),
            size: meta.size,
            block_size: meta.block_size,
            tier: meta.tier,
            read_only: meta.read_only,
            chunk_blocks: CHUNK_BLOCKS,
        }
    }
}

/// The number of extents records of an image of `blocks` blocks.
pub fn chunk_count(blocks: u64) -> u64 {
    blocks.div_ceil(CHUNK_BLOCKS)
}

/// The table cut into records: `(chunk, record)` for every chunk, in order.
pub fn chunks_of(table: &BlockTable) -> Vec<(u64, ChunkRecord)> {
    let mut chunks: Vec<(u64, ChunkRecord)> = (0..chunk_count(table.blocks()))
        .map(|c| {
            (
                c,
                ChunkRecord {
                    extents: Vec::new(),
                },
            )
        })
        .collect();
    for extent in table.extents() {
        let mut start = extent.blocks.start();
        while start < extent.blocks.end() {
            let chunk = start / CHUNK_BLOCKS;
            let end = extent.blocks.end().min((chunk + 1) * CHUNK_BLOCKS);
            if let (Some((_, record)), Ok(blocks)) =
                (chunks.get_mut(chunk as usize), BlockRange::new(start, end))
            {
                record.extents.push(Extent {
                    blocks,
                    locations: extent.locations.clone(),
                });
            }
            start = end;
        }
    }
    chunks
}

/// The records of `next` that differ from `current`'s (both of the same image).
pub fn changed_chunks(current: &BlockTable, next: &BlockTable) -> Vec<(u64, ChunkRecord)> {
    let before = chunks_of(current);
    chunks_of(next)
        .into_iter()
        .filter(|(c, record)| before.get(*c as usize).map(|(_, r)| r) != Some(record))
        .collect()
}

/// Puts an image's metadata back together from its records (and its limits: unlimited when
/// it has no `qos` key), checking every part.
pub fn meta_of(
    name: ImageName,
    epoch: u64,
    record: ImageRecord,
    chunks: &[ChunkRecord],
    qos: QosLimits,
) -> Result<ImageMeta, MetaError> {
    if record.version > FORMAT_VERSION {
        return Err(MetaError::FutureVersion(record.version));
    }
    if record.chunk_blocks != CHUNK_BLOCKS {
        // Written by a version that cut extents differently: its records cannot be read here.
        return Err(MetaError::FutureVersion(record.version));
    }
    let extents: Vec<Extent> = chunks.iter().flat_map(|c| c.extents.clone()).collect();
    let file = crate::image::meta::MetaFile {
        version: record.version,
        name,
        id: record.id,
        owner: record.owner,
        generation: epoch,
        size: record.size,
        block_size: record.block_size,
        tier: record.tier,
        read_only: record.read_only,
        qos,
        stripe: None,
        // Clones are not yet in clusters (daemon::chain refuses them there).
        parent: None,
        extents,
    };
    ImageMeta::from_file(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Location;

    fn at(node: &str, synced: bool) -> Location {
        Location {
            node: node.parse().unwrap(),
            tier: Tier::Ram,
            synced,
        }
    }

    fn meta(blocks: u64) -> ImageMeta {
        ImageMeta::new(
            "img".parse().unwrap(),
            "a".parse().unwrap(),
            blocks * 4096,
            4096,
            false,
            vec![at("a", true), at("b", true)],
        )
        .unwrap()
    }

    #[test]
    fn keys_round_trip() {
        let keys = Keys::new("c1");
        let id = ImageId::random();
        let node: NodeId = "n1".parse().unwrap();
        let name: ImageName = "disk".parse().unwrap();
        assert_eq!(keys.parse(&keys.node(&node)), Some(Key::Node(node.clone())));
        assert_eq!(
            keys.parse(&keys.incarnation(&node)),
            Some(Key::Incarnation(node))
        );
        assert_eq!(keys.parse(&keys.image(&name)), Some(Key::Image(name)));
        assert_eq!(keys.parse(&keys.chunk(id, 7)), Some(Key::Chunk(id, 7)));
        assert_eq!(keys.parse(&keys.active(id)), Some(Key::Active(id)));
        let n: NodeId = "n2".parse().unwrap();
        assert_eq!(keys.parse(&keys.lost(id, &n)), Some(Key::Lost(id, n)));
        assert_eq!(keys.parse(&keys.qos(id)), Some(Key::Qos(id)));
        assert_eq!(keys.parse(&keys.stripe(id)), Some(Key::Stripe(id)));
        assert_eq!(keys.parse(&keys.size(id)), Some(Key::Size(id)));
        assert_eq!(keys.parse(b"/cormorant/c2/image/disk"), None);
        assert_eq!(keys.parse(b"/cormorant/c1/image/../x"), None);
        assert_eq!(keys.parse(b"/cormorant/c1/extents/zz/00000001"), None);
        assert!(keys.chunk(id, 1).starts_with(&keys.chunks(id)));
    }

    /// Found by the `meta_records` fuzz target (`lost/000A0000000000ab/n1`): keys the builders
    /// never write parsed as if they had (an upper-case id, a chunk number with a '+'), so a
    /// stray key could pass for an image's chunk, active or lost record under another spelling.
    #[test]
    fn only_canonical_keys_parse() {
        let keys = Keys::new("c1");
        let id: ImageId = "00000000000000ab".parse().unwrap();
        assert_eq!(
            keys.parse(b"/cormorant/c1/active/00000000000000ab"),
            Some(Key::Active(id))
        );
        assert_eq!(keys.parse(b"/cormorant/c1/active/00000000000000AB"), None);
        assert_eq!(
            keys.parse(b"/cormorant/c1/extents/00000000000000ab/+0000001"),
            None
        );
        assert_eq!(keys.parse(b"/cormorant/c1/lost/00000000000000AB/n1"), None);
    }

    #[test]
    fn records_round_trip_through_chunks() {
        let mut m = meta(3 * CHUNK_BLOCKS + 5);
        let range = BlockRange::new(CHUNK_BLOCKS - 1, CHUNK_BLOCKS + 2).unwrap();
        m.table.update(range, |l| l[1].synced = false).unwrap();
        let chunks = chunks_of(&m.table);
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks[1].1.extents.len(), 2, "split at the chunk edge");
        let records: Vec<ChunkRecord> = chunks.into_iter().map(|(_, r)| r).collect();
        let back = meta_of(m.name.clone(), 0, ImageRecord::of(&m), &records, m.qos).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn only_changed_chunks_are_written() {
        let m = meta(2 * CHUNK_BLOCKS);
        let mut next = m.clone();
        let block = BlockRange::new(CHUNK_BLOCKS + 3, CHUNK_BLOCKS + 4).unwrap();
        next.table.update(block, |l| l[0].synced = false).unwrap();
        let changed = changed_chunks(&m.table, &next.table);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].0, 1);
    }

    #[test]
    fn a_missing_chunk_is_refused() {
        let m = meta(2 * CHUNK_BLOCKS);
        let records: Vec<ChunkRecord> = chunks_of(&m.table).into_iter().map(|(_, r)| r).collect();
        let qos = QosLimits::default();
        assert!(meta_of(m.name.clone(), 0, ImageRecord::of(&m), &records[..1], qos).is_err());
    }
}
