//! An image's metadata and its file: JSON, replaced atomically so a crash at any moment
//! leaves either the old or the new version on disk, never a torn one.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::id::ImageId;
use super::location::{Location, NodeId, Tier};
use super::name::ImageName;
use super::table::{BlockTable, Extent, TableError, MAX_BLOCKS};
use crate::qos::{QosError, QosLimits};
use crate::stripe::Stripe;

/// Bumped when the file format changes incompatibly; older daemons refuse newer files.
pub const FORMAT_VERSION: u32 = 1;

/// A sector: the unit of virtio-blk addressing. Image sizes are whole sectors.
pub const SECTOR_SIZE: u64 = 512;

/// Block sizes are powers of two in this range: below 4 KiB a block is smaller than a guest
/// page and the per-block costs dominate; above 1 GiB one block file is a whole small disk.
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;
pub const MAX_BLOCK_SIZE: u64 = 1 << 30;
pub const DEFAULT_BLOCK_SIZE: u64 = 4 << 20;

/// The persisted form of an image. `extents` is the block table, run-length encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaFile {
    pub version: u32,
    pub name: ImageName,
    /// Unique per creation; names the block directories. Absent in files from before ids
    /// (their directories are the bare name).
    #[serde(default = "legacy_id")]
    pub id: ImageId,
    /// The node that exports the image and decides where its blocks go.
    #[serde(default = "NodeId::local")]
    pub owner: NodeId,
    /// Bumped each time ownership moves (live migration); a node never takes orders about
    /// an image from an owner of an older generation.
    #[serde(default)]
    pub generation: u64,
    pub size: u64,
    pub block_size: u64,
    /// The tier new blocks are placed on.
    pub tier: Tier,
    pub read_only: bool,
    /// Per-image limits; left out when there are none, so files of unlimited images read
    /// the same as before limits existed.
    #[serde(default, skip_serializing_if = "QosLimits::is_default")]
    pub qos: QosLimits,
    /// The stripe layout of a striped image (docs/CLUSTER.md); left out for others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe: Option<Stripe>,
    /// The image a clone reads its unwritten blocks from; left out for others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
    pub extents: Vec<Extent>,
}

/// The image a clone (or a snapshot of a clone) reads through to: a block this image has no
/// data of its own for reads as the parent's block. Named by id as well as name, so an image
/// removed and re-created under the parent's name is never read through by mistake.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parent {
    pub name: ImageName,
    pub id: ImageId,
}

impl std::fmt::Display for Parent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.id)
    }
}

/// An image's shape and block table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    pub name: ImageName,
    pub id: ImageId,
    pub owner: NodeId,
    pub generation: u64,
    pub size: u64,
    pub block_size: u64,
    pub tier: Tier,
    pub read_only: bool,
    /// Per-image limits (see `qos`): metadata, so they survive restarts and move with it.
    pub qos: QosLimits,
    /// The rule a striped image's blocks were placed by (see `stripe`); kept consistent with
    /// `table` by every location change.
    pub stripe: Option<Stripe>,
    /// Where unwritten blocks read from (a clone); `None` for an image of its own.
    pub parent: Option<Parent>,
    pub table: BlockTable,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("size {0} is not a positive multiple of {SECTOR_SIZE} bytes")]
    BadSize(u64),
    #[error("block size {0} is not a power of two between 4K and 1G")]
    BadBlockSize(u64),
    #[error("{blocks} blocks of {block_size} bytes is more than the limit of {MAX_BLOCKS} blocks: use a larger --block-size")]
    TooManyBlocks { blocks: u64, block_size: u64 },
    #[error("metadata format version {0} is newer than this daemon's ({FORMAT_VERSION})")]
    FutureVersion(u32),
    #[error("metadata names image '{found}' but the file is for '{expected}'")]
    NameMismatch {
        expected: ImageName,
        found: ImageName,
    },
    #[error("limits: {0}")]
    Qos(#[from] QosError),
    #[error("block table: {0}")]
    Table(#[from] TableError),
    #[error("cannot parse {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the metadata: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MetaError + 'a {
    move |source| MetaError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

impl ImageMeta {
    /// A new image owned by `owner` whose blocks all have the copies in `locations` (the
    /// first one's tier is the image's tier).
    pub fn new(
        name: ImageName,
        owner: NodeId,
        size: u64,
        block_size: u64,
        read_only: bool,
        locations: Vec<Location>,
    ) -> Result<Self, MetaError> {
        let blocks = check_shape(size, block_size)?;
        let tier = locations.first().map_or(Tier::Ram, |l| l.tier);
        let table = BlockTable::uniform(blocks, locations)?;
        Ok(ImageMeta::fresh(
            name, owner, size, block_size, tier, read_only, table, None,
        ))
    }

    /// A new striped image owned by `owner`: its blocks placed by `stripe` (the first
    /// member's tier is the image's tier).
    pub fn striped(
        name: ImageName,
        owner: NodeId,
        size: u64,
        block_size: u64,
        read_only: bool,
        stripe: Stripe,
    ) -> Result<Self, MetaError> {
        let blocks = check_shape(size, block_size)?;
        let tier = stripe.members().first().map_or(Tier::Ram, |m| m.at.tier);
        let table = stripe.table(blocks)?;
        let stripe = Some(stripe);
        Ok(ImageMeta::fresh(
            name, owner, size, block_size, tier, read_only, table, stripe,
        ))
    }

    /// A new image of a fresh id at epoch 0, without limits.
    #[allow(clippy::too_many_arguments)]
    fn fresh(
        name: ImageName,
        owner: NodeId,
        size: u64,
        block_size: u64,
        tier: Tier,
        read_only: bool,
        table: BlockTable,
        stripe: Option<Stripe>,
    ) -> Self {
        ImageMeta {
            name,
            id: ImageId::random(),
            owner,
            generation: 0,
            size,
            block_size,
            tier,
            read_only,
            qos: QosLimits::default(),
            stripe,
            parent: None,
            table,
        }
    }

    pub fn blocks(&self) -> u64 {
        self.table.blocks()
    }

    /// Bytes of block `index` that lie inside the image (the last block may be short).
    pub fn block_len(&self, index: u64) -> u64 {
        let start = index * self.block_size;
        self.block_size.min(self.size.saturating_sub(start))
    }

    pub fn to_file(&self) -> MetaFile {
        MetaFile {
            version: FORMAT_VERSION,
            name: self.name.clone(),
            id: self.id,
            owner: self.owner.clone(),
            generation: self.generation,
            size: self.size,
            block_size: self.block_size,
            tier: self.tier,
            read_only: self.read_only,
            qos: self.qos,
            stripe: self.stripe.clone(),
            parent: self.parent.clone(),
            extents: self.table.extents(),
        }
    }

    pub fn from_file(file: MetaFile) -> Result<Self, MetaError> {
        if file.version > FORMAT_VERSION {
            return Err(MetaError::FutureVersion(file.version));
        }
        let blocks = check_shape(file.size, file.block_size)?;
        file.qos.validate()?;
        Ok(ImageMeta {
            table: BlockTable::from_extents(blocks, &file.extents)?,
            name: file.name,
            id: file.id,
            owner: file.owner,
            generation: file.generation,
            size: file.size,
            block_size: file.block_size,
            tier: file.tier,
            read_only: file.read_only,
            qos: file.qos,
            stripe: file.stripe,
            parent: file.parent,
        })
    }

    /// Changes the image's size to `size` bytes (see `image resize`). Blocks past the new end
    /// leave the table; each new block gets the copies of the image's last block (a striped
    /// image: the ones its stripe places it on), all in sync: a block never written reads as
    /// zeros on every copy. The same nodes and tiers keep the image's copy count and its
    /// spread over nodes, where the owner's tier alone would leave the new blocks with one
    /// copy. Refused, with nothing changed, for a size that is not a positive multiple of
    /// [`SECTOR_SIZE`] or needs more than [`MAX_BLOCKS`] blocks.
    pub fn resize(&mut self, size: u64) -> Result<(), MetaError> {
        let blocks = check_shape(size, self.block_size)?;
        let last = self
            .table
            .locations(self.blocks().saturating_sub(1))
            .map(<[Location]>::to_vec)
            .unwrap_or_default();
        let stripe = self.stripe.clone();
        self.table.resize(blocks, |block| match &stripe {
            Some(stripe) => stripe.locations(block),
            None => last
                .iter()
                .map(|l| Location {
                    synced: true,
                    ..l.clone()
                })
                .collect(),
        })?;
        if let Some(stripe) = self.stripe.as_mut() {
            stripe.reconcile(&self.table);
        }
        self.size = size;
        Ok(())
    }

    /// Reads and validates `<dir>/<name>.json`.
    pub fn load(dir: &Path, name: &ImageName) -> Result<Self, MetaError> {
        let path = meta_path(dir, name);
        let text = fs::read(&path).map_err(io_err("cannot read", &path))?;
        let file: MetaFile = serde_json::from_slice(&text).map_err(|source| MetaError::Parse {
            path: path.clone(),
            source,
        })?;
        if &file.name != name {
            return Err(MetaError::NameMismatch {
                expected: name.clone(),
                found: file.name,
            });
        }
        ImageMeta::from_file(file)
    }

    /// Replaces `<dir>/<name>.json` atomically: temp file, fsync, rename, fsync of the
    /// directory. Returns only once the new version is durable.
    pub fn save(&self, dir: &Path) -> Result<(), MetaError> {
        let path = meta_path(dir, &self.name);
        let tmp = dir.join(format!("{}.json.tmp", self.name));
        let text = serde_json::to_vec_pretty(&self.to_file()).map_err(MetaError::Encode)?;
        let mut file = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
        file.write_all(&text)
            .map_err(io_err("cannot write", &tmp))?;
        file.sync_all().map_err(io_err("cannot sync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("cannot rename to", &path))?;
        sync_dir(dir)
    }

    /// Removes the metadata file durably.
    pub fn remove(dir: &Path, name: &ImageName) -> Result<(), MetaError> {
        let path = meta_path(dir, name);
        fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
        sync_dir(dir)
    }
}

/// Names of the images whose metadata lives in `dir`, skipping stray files (logged).
pub fn list(dir: &Path) -> Result<Vec<ImageName>, MetaError> {
    let entries = fs::read_dir(dir).map_err(io_err("cannot list", dir))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("cannot list", dir))?;
        let file_name = entry.file_name();
        let Some(stem) = file_name.to_str().and_then(|f| f.strip_suffix(".json")) else {
            continue;
        };
        match stem.parse::<ImageName>() {
            Ok(name) => names.push(name),
            Err(e) => log::warn!("ignoring {}: {e}", entry.path().display()),
        }
    }
    names.sort();
    Ok(names)
}

pub fn meta_path(dir: &Path, name: &ImageName) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// fsync of a directory, so a rename or a new file in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), MetaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync directory", dir))
}

fn legacy_id() -> ImageId {
    ImageId::LEGACY
}

fn check_shape(size: u64, block_size: u64) -> Result<u64, MetaError> {
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
        return Err(MetaError::BadSize(size));
    }
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(MetaError::BadBlockSize(block_size));
    }
    let blocks = size.div_ceil(block_size);
    if blocks > MAX_BLOCKS {
        return Err(MetaError::TooManyBlocks { blocks, block_size });
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::BlockRange;

    fn sample() -> ImageMeta {
        let location = Location {
            node: NodeId::local(),
            tier: Tier::Ram,
            synced: true,
        };
        ImageMeta::new(
            "disk0".parse().unwrap(),
            NodeId::local(),
            10 << 20,
            4 << 20,
            false,
            vec![location],
        )
        .unwrap()
    }

    /// Limits are stored in the file when set and left out when not, so files written before
    /// limits existed load as unlimited; a hand-edited limit that makes no sense is refused.
    #[test]
    fn limits_are_stored_only_when_set_and_checked_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut meta = sample();
        meta.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("disk0.json")).unwrap();
        assert!(!text.contains("qos"), "{text}");
        meta.qos.iops = Some(500);
        meta.save(dir.path()).unwrap();
        assert_eq!(ImageMeta::load(dir.path(), &meta.name).unwrap(), meta);
        let text = std::fs::read_to_string(dir.path().join("disk0.json")).unwrap();
        std::fs::write(
            dir.path().join("disk0.json"),
            text.replace("\"iops\": 500", "\"iops\": 0"),
        )
        .unwrap();
        let err = ImageMeta::load(dir.path(), &meta.name).unwrap_err();
        assert!(err.to_string().contains("none"), "{err}");
    }

    /// A striped image keeps its stripe in its file; an unstriped one's file has none.
    #[test]
    fn stripes_are_stored_with_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let plain = sample();
        plain.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("disk0.json")).unwrap();
        assert!(!text.contains("stripe"), "{text}");
        let at = |n: &str| format!("{n}:volume").parse().unwrap();
        let spec = crate::stripe::StripeSpec {
            members: vec![at("a"), at("b"), at("c")],
            width: Some(2),
            copies: Some(2),
        };
        let stripe = Stripe::new(&spec).unwrap();
        let name: ImageName = "s".parse().unwrap();
        let m = ImageMeta::striped(name, NodeId::local(), 40 << 20, 4 << 20, false, stripe);
        let m = m.unwrap();
        assert_eq!(m.tier, Tier::Volume);
        m.save(dir.path()).unwrap();
        assert_eq!(ImageMeta::load(dir.path(), &m.name).unwrap(), m);
    }

    #[test]
    fn shape_is_checked() {
        let l = sample().table.locations(0).unwrap()[0].clone();
        let n: ImageName = "x".parse().unwrap();
        assert!(ImageMeta::new(
            n.clone(),
            NodeId::local(),
            0,
            4 << 20,
            false,
            vec![l.clone()]
        )
        .is_err());
        assert!(ImageMeta::new(
            n.clone(),
            NodeId::local(),
            1000,
            4 << 20,
            false,
            vec![l.clone()]
        )
        .is_err());
        assert!(ImageMeta::new(
            n.clone(),
            NodeId::local(),
            1 << 20,
            3 << 20,
            false,
            vec![l.clone()]
        )
        .is_err());
        assert!(ImageMeta::new(
            n.clone(),
            NodeId::local(),
            1 << 20,
            1024,
            false,
            vec![l.clone()]
        )
        .is_err());
        assert!(ImageMeta::new(
            n.clone(),
            NodeId::local(),
            1 << 50,
            4096,
            false,
            vec![l.clone()]
        )
        .is_err());
        assert!(ImageMeta::new(n, NodeId::local(), 1 << 40, 4 << 20, false, vec![l]).is_ok());
    }

    /// A resize keeps the old blocks' copies, gives new blocks the last block's copies in
    /// sync, and refuses sizes that are not whole sectors or too many blocks.
    #[test]
    fn resize_follows_the_last_block_and_checks_the_size() {
        let mut m = sample();
        let b = Location {
            node: "b".parse().unwrap(),
            tier: Tier::Volume,
            synced: false,
        };
        let last = BlockRange::new(2, 3).unwrap();
        m.table.update(last, |ls| ls.push(b.clone())).unwrap();
        m.resize(20 << 20).unwrap();
        assert_eq!((m.size, m.blocks()), (20 << 20, 5));
        assert_eq!(m.block_len(2), 4 << 20, "the old short block is whole now");
        let new = m.table.locations(4).unwrap();
        assert_eq!(new.len(), 2);
        assert!(
            new.iter().all(|l| l.synced),
            "nothing to be out of sync with"
        );
        assert!(
            !m.table.locations(2).unwrap()[1].synced,
            "old blocks keep theirs"
        );
        assert_eq!(m.table.locations(0).unwrap().len(), 1);
        let before = m.clone();
        assert!(matches!(m.resize(1000), Err(MetaError::BadSize(1000))));
        assert!(matches!(m.resize(0), Err(MetaError::BadSize(0))));
        assert!(matches!(
            m.resize(1 << 50),
            Err(MetaError::TooManyBlocks { .. })
        ));
        assert_eq!(m, before);
        m.resize(5 << 20).unwrap();
        assert_eq!((m.blocks(), m.block_len(1)), (2, 1 << 20));
    }

    /// A striped image's new blocks go where its stripe places them.
    #[test]
    fn a_striped_image_grows_along_its_stripe() {
        let at = |n: &str| format!("{n}:volume").parse().unwrap();
        let spec = crate::stripe::StripeSpec {
            members: vec![at("a"), at("b"), at("c")],
            width: Some(1),
            copies: Some(1),
        };
        let stripe = Stripe::new(&spec).unwrap();
        let name: ImageName = "s".parse().unwrap();
        let mut m =
            ImageMeta::striped(name, NodeId::local(), 8 << 20, 4 << 20, false, stripe).unwrap();
        m.resize(24 << 20).unwrap();
        let nodes: Vec<String> = (0..6)
            .map(|b| m.table.locations(b).unwrap()[0].node.to_string())
            .collect();
        assert_eq!(nodes, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn last_block_may_be_short() {
        let m = sample();
        assert_eq!(m.blocks(), 3);
        assert_eq!(m.block_len(0), 4 << 20);
        assert_eq!(m.block_len(2), 2 << 20);
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.save(dir.path()).unwrap();
        assert_eq!(ImageMeta::load(dir.path(), &m.name).unwrap(), m);
        assert_eq!(list(dir.path()).unwrap(), vec![m.name.clone()]);
        ImageMeta::remove(dir.path(), &m.name).unwrap();
        assert!(list(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn load_rejects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.save(dir.path()).unwrap();
        let path = meta_path(dir.path(), &m.name);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("\"0..3\"", "\"0..2\"")).unwrap();
        assert!(matches!(
            ImageMeta::load(dir.path(), &m.name),
            Err(MetaError::Table(_))
        ));
        fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            ImageMeta::load(dir.path(), &m.name),
            Err(MetaError::Parse { .. })
        ));
        fs::write(dir.path().join("other.json"), text).unwrap();
        let other: ImageName = "other".parse().unwrap();
        assert!(matches!(
            ImageMeta::load(dir.path(), &other),
            Err(MetaError::NameMismatch { .. })
        ));
    }
}
