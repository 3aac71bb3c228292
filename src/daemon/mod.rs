//! The daemon's state: the images of this node, each opened as a disk and exported on its
//! socket. Control actions are applied here, one owner for every change to that state.

mod error;
mod etcd;
mod family;
mod relocate;
mod resize;
mod tiering;
mod transfer;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::chain::ParentBlocks;
pub use crate::config::Config;
use crate::control::protocol::Request;
use crate::disk::Disk;
use crate::image::meta::{self, Parent, SECTOR_SIZE};
use crate::image::{ImageMeta, ImageName, Location, Placement, Tier};
use crate::meta::cluster::ClusterMeta;
use crate::meta::store::{LocalStore, MetaStore};
use crate::peer::ClusterKey;
use crate::peers::Peers;
use crate::placement;
use crate::qos::{QosLimits, QosUpdate};
use crate::replica::sync;
use crate::stripe::{Stripe, StripeSpec};
use crate::vhost_listener::{socket_path, VhostListener};

pub use error::DaemonError;

struct Entry {
    disk: Arc<Disk>,
    /// None while an import fills the image: no frontend may see it half-written.
    export: Option<VhostListener>,
}

pub struct Daemon {
    config: Config,
    images: Mutex<BTreeMap<ImageName, Entry>>,
    peers: Arc<Peers>,
    /// Cache copies of remote blocks, one budget per tier for every image (see `cache`).
    caches: Arc<crate::cache::Caches>,
    /// Where this node's image metadata changes are made durable.
    store: Arc<dyn MetaStore>,
    /// The cluster's metadata in etcd; None for a single node.
    shared: Option<Arc<ClusterMeta>>,
    /// The etcd revision the watch goes on from.
    watch_from: Mutex<i64>,
    /// Tiers found wiped at this start (their marker file was gone): every in-sync copy this
    /// node held there is lost. Emptied once the start is done.
    wiped: Mutex<Vec<Tier>>,
    /// Tiers whose copies may be stale at this start (the host went down while the daemon
    /// ran: writes not yet flushed may be gone). Emptied once the start is done.
    suspect: Mutex<Vec<Tier>>,
    /// Held by snapshot, clone, rm and the end of flatten: a parent is never removed while a
    /// child is being made of it, nor two snapshots of one name made at once.
    family: Mutex<()>,
}

/// What a new image is: its shape, and its limits from the start.
struct Shape {
    size: u64,
    block_size: u64,
    tier: Tier,
    read_only: bool,
    qos: QosLimits,
    /// Stripe the blocks over these members instead of placing every block alike.
    stripe: Option<StripeSpec>,
    /// A clone's parent: its unwritten blocks read from there.
    parent: Option<Arc<Disk>>,
}

/// One image's `stats`: its counters, and its limits with what they held back.
fn image_stats(disk: &Disk) -> Value {
    let mut value = disk.metrics().json(disk.out_of_sync_copies());
    value["qos"] = disk.qos().json();
    value["cache"] = disk.cache().figures().json();
    value["tiering"] = tiering::image_json(disk);
    value
}

/// The tiers of `tiers` on which `disk` has in-sync copies on this node.
fn synced_on(disk: &Disk, tiers: &[Tier]) -> Vec<Tier> {
    disk.synced_tiers_here()
        .into_iter()
        .filter(|t| tiers.contains(t))
        .collect()
}

/// Where the daemon notes the boot it runs in and whether it stopped cleanly.
const RUN_STATE: &str = ".cormorant-run";

/// This boot's id. `CORMORANT_BOOT_ID` stands in for it in tests, which cannot reboot.
fn boot_id() -> String {
    std::env::var("CORMORANT_BOOT_ID").unwrap_or_else(|_| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// Whether the host went down while the daemon ran (the last run never stopped cleanly, and
/// this is another boot): then unflushed volume-tier writes may be lost. Notes this run.
fn volume_suspect(dirs: &crate::store::TierDirs) -> io::Result<Vec<Tier>> {
    let path = dirs.volume.join(RUN_STATE);
    let previous = fs::read_to_string(&path).unwrap_or_default();
    let now = boot_id();
    let suspect = previous
        .split_once(' ')
        .is_some_and(|(boot, state)| state.trim() == "running" && boot != now);
    note_run_state(dirs, "running")?;
    Ok(if suspect {
        vec![Tier::Volume]
    } else {
        Vec::new()
    })
}

fn note_run_state(dirs: &crate::store::TierDirs, state: &str) -> io::Result<()> {
    fs::create_dir_all(&dirs.volume)?;
    let path = dirs.volume.join(RUN_STATE);
    let tmp = dirs.volume.join(format!("{RUN_STATE}.tmp"));
    let mut file = File::create(&tmp)?;
    std::io::Write::write_all(&mut file, format!("{} {state}\n", boot_id()).as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, &path)?;
    File::open(&dirs.volume)?.sync_all()
}

/// A file each tier's root keeps while its contents are this node's: a tier found without it
/// lost everything (a RAM tier after a reboot, a replaced volume).
const TIER_MARKER: &str = ".cormorant-tier";

/// The tiers whose marker is missing.
fn wiped_tiers(dirs: &crate::store::TierDirs) -> Vec<Tier> {
    [Tier::Ram, Tier::Volume]
        .into_iter()
        .filter(|&tier| !dirs.root(tier).join(TIER_MARKER).exists())
        .collect()
}

/// Gives `tiers` their marker, durably. Only once the loss of their copies is recorded in
/// etcd: a start that fails before that finds the tiers still wiped the next time.
fn mark_tiers(dirs: &crate::store::TierDirs, tiers: &[Tier]) -> io::Result<()> {
    for &tier in tiers {
        fs::create_dir_all(dirs.root(tier))?;
        File::create(dirs.root(tier).join(TIER_MARKER))?.sync_all()?;
        File::open(dirs.root(tier))?.sync_all()?;
    }
    Ok(())
}

pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

impl Daemon {
    /// Loads and exports every image found in the metadata directory (or, with etcd, every
    /// image of the cluster this node owns or holds copies of). An image whose metadata
    /// cannot be read is logged and left alone; the others are served.
    pub fn start(
        config: Config,
        key: Option<&ClusterKey>,
        shared: Option<Arc<ClusterMeta>>,
    ) -> io::Result<Daemon> {
        let meta_dir = config.meta_dir();
        fs::create_dir_all(&meta_dir)?;
        let store: Arc<dyn MetaStore> = match &shared {
            Some(cluster) => cluster.clone(),
            None => Arc::new(LocalStore::new(meta_dir.clone())),
        };
        let daemon = Daemon {
            peers: Arc::new(Peers::new(&config, key)),
            caches: crate::cache::Caches::new(&config.dirs, config.cache_budgets)?,
            store,
            shared,
            config,
            images: Mutex::new(BTreeMap::new()),
            watch_from: Mutex::new(0),
            wiped: Mutex::new(Vec::new()),
            suspect: Mutex::new(Vec::new()),
            family: Mutex::new(()),
        };
        if daemon.shared.is_some() {
            daemon.peers.start_heartbeat()?;
            let wiped = wiped_tiers(&daemon.config.dirs);
            *daemon.wiped.lock().unwrap_or_else(|p| p.into_inner()) = wiped.clone();
            let previous = fs::read_to_string(daemon.config.dirs.volume.join(RUN_STATE)).ok();
            *daemon.suspect.lock().unwrap_or_else(|p| p.into_inner()) =
                volume_suspect(&daemon.config.dirs)?;
            if let Err(e) = daemon.load_shared() {
                // The next start must find the same: this one recorded nothing.
                if let Some(previous) = previous {
                    let _ = fs::write(daemon.config.dirs.volume.join(RUN_STATE), previous);
                }
                return Err(io::Error::other(e));
            }
            mark_tiers(&daemon.config.dirs, &wiped)?;
            daemon
                .suspect
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            daemon
                .wiped
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            return Ok(daemon);
        }
        let names = meta::list(&meta_dir).map_err(io::Error::other)?;
        let mut metas = Vec::new();
        for name in names {
            match ImageMeta::load(&meta_dir, &name) {
                Ok(meta) => metas.push(meta),
                Err(e) => log::error!("image {name}: skipped: {e}"),
            }
        }
        daemon.open_in_order(metas);
        Ok(daemon)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ImageName, Entry>> {
        self.images.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_and_export(&self, meta: ImageMeta) -> io::Result<()> {
        let name = meta.name.clone();
        let disk = Disk::open(
            meta,
            &self.config.dirs,
            self.config.node.clone(),
            self.store.clone(),
        );
        disk.cache().attach(self.caches.clone());
        self.attach_parent(&disk).map_err(io::Error::other)?;
        self.check_lost_tiers(&disk).map_err(io::Error::other)?;
        // Only the owner exports an image; other nodes hold copies of its blocks for it.
        let export = if disk.meta().owner == self.config.node {
            Some(self.export(&disk)?)
        } else {
            // A socket left by an earlier run that exported it (killed before it could
            // remove it) must not look like a way in.
            let _ = fs::remove_file(socket_path(&self.config.run_dir, &name));
            None
        };
        self.lock().insert(name, Entry { disk, export });
        Ok(())
    }

    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Any image this node knows, owned or held.
    pub fn find(&self, name: &ImageName) -> Option<Arc<Disk>> {
        self.lock().get(name).map(|e| e.disk.clone())
    }

    fn export(&self, disk: &Arc<Disk>) -> io::Result<VhostListener> {
        let socket = socket_path(&self.config.run_dir, disk.name());
        VhostListener::start(
            disk.clone(),
            socket,
            self.config.use_uring,
            self.peers.clone(),
            self.config.socket_access,
        )
    }

    /// Applies one control request.
    pub fn apply(&self, request: Request, progress: Progress) -> Result<Value, DaemonError> {
        match request {
            Request::ImageCreate {
                name,
                size,
                block_size,
                tier,
                read_only,
                at,
                qos,
                stripe,
            } => {
                let qos = QosLimits::default().updated(&qos)?;
                let shape = Shape {
                    size,
                    block_size,
                    tier,
                    read_only,
                    qos,
                    stripe,
                    parent: None,
                };
                let disk = self.create(name, shape, &at)?;
                self.publish(&disk)?;
                Ok(self.summary(&disk))
            }
            Request::ImageSet { name, qos } => self.set_limits(&name, &qos),
            Request::ImageList => self.list(),
            Request::NodeList => self.node_list(),
            Request::ImageInfo { name } => self.info(&name),
            Request::ImageRm { name } => self.remove(&name).map(|()| json!({"removed": name})),
            Request::ImageImport {
                name,
                path,
                block_size,
                tier,
            } => self.import(name, Path::new(&path), block_size, tier, progress),
            Request::LocationAdd {
                name,
                blocks,
                at,
                replace,
            } => self
                .location_add(&name, blocks, &at, replace.as_ref())
                .map_err(DaemonError::from),
            Request::LocationRm { name, blocks, at } => self
                .location_rm(&name, blocks, &at)
                .map_err(DaemonError::from),
            Request::Sync { name, blocks, rate } => {
                let disk = self.owned_disk(&name)?;
                let range = placement::range_of(&disk, blocks)?;
                let copies = self.copies(&disk);
                let report = sync::sync(&disk, &copies, range, rate, progress)?;
                Ok(json!(report))
            }
            Request::Stats { name } => self.stats(name.as_ref()),
            Request::ImagePrefetch { name, rate } => self.prefetch(&name, rate),
            Request::ImageAdopt { name, from } => match &self.shared {
                Some(_) => self.adopt_shared(&name, from.as_ref()),
                None => Err(DaemonError::AdoptNeedsCluster),
            },
            Request::ImageSnapshot { names, snapshot } => self.snapshot(&names, &snapshot),
            Request::ImageClone {
                source,
                name,
                tier,
                at,
            } => self.clone_image(&source, name, tier, &at),
            Request::ImageFlatten { name } => self.flatten(&name, progress),
            Request::ImageResize {
                name,
                size,
                allow_shrink,
            } => self.resize(&name, size, allow_shrink),
            Request::ImageExport { name, path } => {
                let disk = self.owned_disk(&name)?;
                if let Err(source) = transfer::export_raw(&disk, Path::new(&path), progress) {
                    return Err(DaemonError::Export { path, source });
                }
                Ok(json!({"exported": name, "path": path}))
            }
        }
    }

    /// Per-image and per-peer metrics as JSON.
    fn stats(&self, name: Option<&ImageName>) -> Result<Value, DaemonError> {
        if let Some(name) = name {
            return Ok(image_stats(&*self.disk(name)?));
        }
        let images: serde_json::Map<String, Value> = self
            .lock()
            .iter()
            .map(|(n, e)| (n.to_string(), image_stats(&e.disk)))
            .collect();
        let failures = self.peers.failures();
        let peers: serde_json::Map<String, Value> = self
            .peers
            .metrics()
            .into_iter()
            .map(|(id, m)| (id.to_string(), m.json(failures.is_failed(&id))))
            .collect();
        Ok(
            json!({"node": self.config.node, "images": images, "peers": peers,
                  "tiering": self.tiering_json()}),
        )
    }

    /// What a scrape shows: every image's and every peer's figures, taken now.
    pub fn prometheus(&self) -> String {
        let images = self
            .lock()
            .iter()
            .map(|(name, entry)| crate::control::prometheus::ImageFigures {
                image: name.to_string(),
                totals: entry.disk.metrics().totals(),
                out_of_sync: entry.disk.out_of_sync_copies(),
                qos: entry.disk.qos().figures(),
                cache: entry.disk.cache().figures(),
                tiering: entry
                    .disk
                    .tiering()
                    .figures(&entry.disk.meta(), entry.disk.me()),
            })
            .collect();
        let failures = self.peers.failures();
        let peers = self
            .peers
            .metrics()
            .into_iter()
            .map(|(id, m)| crate::control::prometheus::PeerFigures {
                failed: failures.is_failed(&id),
                peer: id.to_string(),
                calls: m.calls.load(std::sync::atomic::Ordering::Relaxed),
                errors: m.errors.load(std::sync::atomic::Ordering::Relaxed),
                in_flight: m.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                latency_counts: m.latency.counts(),
                latency_sum_us: m.latency.sum_us(),
            })
            .collect();
        crate::control::prometheus::render(images, peers)
    }

    fn disk(&self, name: &ImageName) -> Result<Arc<Disk>, DaemonError> {
        self.lock()
            .get(name)
            .map(|e| e.disk.clone())
            .ok_or_else(|| DaemonError::NoImage(name.clone()))
    }

    /// The image, for a command that changes it or reads all of it: only its owner runs
    /// those. In a cluster, another node refuses and names the owner.
    fn owned_disk(&self, name: &ImageName) -> Result<Arc<Disk>, DaemonError> {
        let Some(cluster) = &self.shared else {
            return self.disk(name);
        };
        if let Some(disk) = self.find(name).filter(|d| d.owned_here() && !d.is_fenced()) {
            return Ok(disk);
        }
        match cluster.image(name)? {
            Some(meta) => Err(DaemonError::OwnedElsewhere {
                name: name.clone(),
                owner: meta.owner,
            }),
            None => Err(DaemonError::NoImage(name.clone())),
        }
    }

    /// Starts `image prefetch` on a thread of its own (see `cache::prefetch`).
    fn prefetch(&self, name: &ImageName, rate: Option<u64>) -> Result<Value, DaemonError> {
        crate::cache::prefetch::check_rate(rate).map_err(DaemonError::Text)?;
        let disk = self.owned_disk(name)?;
        if disk.cache().tier().is_none() {
            return Err(DaemonError::NoCache(name.clone()));
        }
        let blocks = disk.meta().blocks();
        if !disk.cache().prefetch.start(blocks) {
            return Err(DaemonError::Prefetching(name.clone()));
        }
        let peers: Arc<dyn crate::peers::Transport> = self.peers.clone();
        let worker = disk.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("prefetch {name}"))
            .spawn(move || crate::cache::prefetch::run(&worker, &*peers, rate));
        if let Err(e) = spawned {
            disk.cache().prefetch.abort(&e.to_string());
            return Err(DaemonError::Text(format!("cannot start the prefetch: {e}")));
        }
        log::info!("image {name}: prefetch started ({blocks} blocks, rate {rate:?} B/s)");
        Ok(json!({"name": name, "blocks": blocks, "rate": rate}))
    }

    /// Changes an image's limits on its owner; the queues apply them at their next request.
    fn set_limits(&self, name: &ImageName, update: &QosUpdate) -> Result<Value, DaemonError> {
        if update.is_empty() {
            return Err(DaemonError::Text(
                "nothing to set: image set changes --iops-limit, --bps-limit and --burst".into(),
            ));
        }
        let disk = self.owned_disk(name)?;
        let limits = disk
            .update_meta(|meta| {
                meta.qos = meta.qos.updated(update).map_err(|e| e.to_string())?;
                refuse_auto_stripe(meta).map_err(|e| e.to_string())?;
                Ok(meta.qos)
            })
            .map_err(DaemonError::Text)?;
        disk.tiering()
            .heat()
            .set_on(crate::tiering::is_auto(&disk.meta()));
        log::info!("image {name}: limits now {}", limits.json());
        Ok(json!({"name": name, "qos": limits.json()}))
    }

    /// Creates an image, unexported: the caller publishes it once it is ready.
    fn create(
        &self,
        name: ImageName,
        shape: Shape,
        at: &[Placement],
    ) -> Result<Arc<Disk>, DaemonError> {
        let Shape {
            size,
            block_size,
            tier,
            read_only,
            qos,
            stripe,
            parent,
        } = shape;
        if name.is_snapshot() {
            return Err(family::FamilyError::SnapshotName(name).into());
        }
        let mut images = self.lock();
        if images.contains_key(&name) {
            return Err(DaemonError::Exists(name));
        }
        let mut meta = match stripe {
            Some(spec) => {
                let stripe = self.stripe(&spec, at)?;
                let owner = self.config.node.clone();
                ImageMeta::striped(name.clone(), owner, size, block_size, read_only, stripe)?
            }
            None => {
                let locations = self.placements(tier, at)?;
                let owner = self.config.node.clone();
                ImageMeta::new(name.clone(), owner, size, block_size, read_only, locations)?
            }
        };
        let tier = meta.tier;
        meta.qos = qos;
        meta.parent = parent.as_ref().map(|p| {
            let parent = p.meta();
            Parent {
                name: parent.name.clone(),
                id: parent.id,
            }
        });
        refuse_auto_stripe(&meta)?;
        let disk = {
            let files = crate::store::BlockFiles::open(&self.config.dirs, tier, &name, meta.id);
            files
                .create_dir()
                .map_err(|source| DaemonError::CreateDir {
                    path: files.dir().to_path_buf(),
                    source,
                })?;
            match &self.shared {
                Some(cluster) => cluster.create(&mut meta)?,
                None => meta.save(&self.config.meta_dir())?,
            }
            let disk = Disk::open(
                meta,
                &self.config.dirs,
                self.config.node.clone(),
                self.store.clone(),
            );
            disk.cache().attach(self.caches.clone());
            if let Some(parent) = parent {
                disk.blocks().set_backing(ParentBlocks::new(parent));
            }
            disk
        };
        images.insert(
            name.clone(),
            Entry {
                disk: disk.clone(),
                export: None,
            },
        );
        log::info!("image {name}: created, {size} bytes in blocks of {block_size} on {tier}");
        Ok(disk)
    }

    /// The copies a new image's blocks get: `at`, or this node on `tier`. Every copy starts in
    /// sync: an unwritten block reads as zeros everywhere.
    fn placements(&self, tier: Tier, at: &[Placement]) -> Result<Vec<Location>, DaemonError> {
        let me = Placement {
            node: self.config.node.clone(),
            tier,
        };
        let at = if at.is_empty() {
            std::slice::from_ref(&me)
        } else {
            at
        };
        let mut locations: Vec<Location> = Vec::new();
        for placement in at {
            if !self.knows(&placement.node) {
                return Err(DaemonError::UnknownNode(placement.node.clone()));
            }
            if locations.iter().any(|l| l.at(placement)) {
                return Err(DaemonError::PlacedTwice(placement.clone()));
            }
            locations.push(Location {
                node: placement.node.clone(),
                tier: placement.tier,
                synced: true,
            });
        }
        Ok(locations)
    }

    /// A new image's stripe, checked: no `--at` beside it, every member this node or a known
    /// peer (then the layout's own rules: see `stripe`).
    fn stripe(&self, spec: &StripeSpec, at: &[Placement]) -> Result<Stripe, DaemonError> {
        if !at.is_empty() {
            return Err(DaemonError::StripeWithAt);
        }
        let stripe = Stripe::new(spec)?;
        for member in &spec.members {
            if !self.knows(&member.node) {
                return Err(DaemonError::UnknownNode(member.node.clone()));
            }
        }
        Ok(stripe)
    }

    /// Exports a created image on its socket.
    fn publish(&self, disk: &Arc<Disk>) -> Result<(), DaemonError> {
        let export = self.export(disk).map_err(|source| DaemonError::Publish {
            name: disk.name().clone(),
            source,
        })?;
        if let Some(entry) = self.lock().get_mut(disk.name()) {
            entry.export = Some(export);
        }
        Ok(())
    }

    fn summary(&self, disk: &Disk) -> Value {
        let meta = disk.meta();
        json!({
            "name": meta.name,
            "id": meta.id,
            "owner": meta.owner,
            "size": meta.size,
            "block_size": meta.block_size,
            "tier": meta.tier,
            "read_only": meta.read_only,
            "qos": meta.qos.json(),
            "stripe": meta.stripe.as_ref().map(Stripe::json),
            "parent": meta.parent.as_ref().map(|p| &p.name),
            "in_use": disk.in_use(),
            "socket": socket_path(&self.config.run_dir, &meta.name),
        })
    }

    /// Every image: this node's, or with etcd the whole cluster's.
    fn list(&self) -> Result<Value, DaemonError> {
        if self.shared.is_some() {
            return self.list_shared();
        }
        Ok(Value::Array(
            self.lock()
                .values()
                .map(|e| self.summary(&e.disk))
                .collect(),
        ))
    }

    /// Local in-sync copies whose tier directory is gone (a RAM tier after a reboot) are
    /// never read as zeros: the owner (or a single node) marks them out of sync at once; a
    /// holder in a cluster refuses to serve them and reports them to the owner, who marks them.
    /// Copies on a tier that may merely be stale (an unclean reboot) are handled alike, but
    /// kept where they are the only in-sync copy.
    fn check_lost_tiers(&self, disk: &Disk) -> Result<(), DaemonError> {
        let gone = if self.shared.is_some() {
            let wiped = self.wiped.lock().unwrap_or_else(|p| p.into_inner()).clone();
            synced_on(disk, &wiped)
        } else {
            disk.lost_tiers()
        };
        if !gone.is_empty() {
            log::error!(
                "image {}: its block directory on {gone:?} is gone (tier lost, e.g. RAM after a reboot); those copies are out of sync",
                disk.name()
            );
            self.record_loss(disk, &gone, false)?;
        }
        let suspect = synced_on(
            disk,
            &self.suspect.lock().unwrap_or_else(|p| p.into_inner()),
        );
        if !suspect.is_empty() {
            log::warn!(
                "image {}: the host went down without this daemon stopping: its copies on {suspect:?} may have lost writes that were not flushed",
                disk.name()
            );
            self.record_loss(disk, &suspect, true)?;
        }
        Ok(())
    }

    /// A holder in a cluster refuses the copies and reports them to the owner; the owner (or
    /// a single node) marks them out of sync itself (`suspect`: only where another in-sync
    /// copy has the data).
    fn record_loss(&self, disk: &Disk, tiers: &[Tier], suspect: bool) -> Result<(), DaemonError> {
        match &self.shared {
            Some(cluster) if !disk.owned_here() => {
                for &tier in tiers {
                    disk.mark_lost(tier);
                }
                let meta = disk.meta().clone();
                Ok(cluster.report_lost(&meta, tiers, suspect)?)
            }
            _ if suspect => disk
                .mark_suspect_out_of_sync(tiers)
                .map_err(DaemonError::Text),
            _ => disk
                .mark_tiers_out_of_sync(tiers)
                .map_err(DaemonError::Text),
        }
    }

    /// The UKAI metadata shape, extended: one entry per block with its locations.
    fn info(&self, name: &ImageName) -> Result<Value, DaemonError> {
        if self.shared.is_some() && self.find(name).is_none_or(|d| !d.owned_here()) {
            return self.info_shared(name);
        }
        let disk = self.disk(name)?;
        let used = disk.used_bytes()?;
        let mut value = self.summary(&disk);
        let meta = disk.meta();
        let me = disk.me();
        let blocks: Vec<Value> = (0..meta.blocks())
            .map(|index| {
                json!({"index": index, "locations": meta.table.locations(index).unwrap_or(&[]),
                       "tier": crate::tiering::block_tier(&meta, me, index)})
            })
            .collect();
        let counts = crate::tiering::TierCounts::of(&meta, me);
        value["tiers"] = json!({"ram": counts.ram, "volume": counts.volume,
                                "tiering": crate::tiering::mode_of(&meta)});
        value["used_size"] = json!(used);
        value["blocks"] = Value::Array(blocks);
        drop(meta);
        value["children"] = json!(self.children(name));
        if disk.blocks().is_clone() {
            value["own_blocks"] = json!(self.own_blocks(&disk)?);
        }
        Ok(value)
    }

    fn remove(&self, name: &ImageName) -> Result<(), DaemonError> {
        if self.shared.is_some() {
            return self.remove_shared(name);
        }
        let _family = self.family_lock();
        self.check_no_children(name)?;
        let entry = {
            let mut images = self.lock();
            let in_use = images
                .get(name)
                .ok_or_else(|| DaemonError::NoImage(name.clone()))?
                .disk
                .in_use();
            if in_use {
                return Err(DaemonError::InUse(name.clone()));
            }
            images
                .remove(name)
                .ok_or_else(|| DaemonError::NoImage(name.clone()))?
        };
        if let Some(export) = entry.export {
            export.stop();
        }
        // A tiering move half-way would recreate a block directory after it went.
        let moves = entry.disk.tiering().lock_moves();
        entry.disk.mark_removed();
        drop(moves);
        ImageMeta::remove(&self.config.meta_dir(), name)?;
        for tier in [Tier::Ram, Tier::Volume] {
            entry
                .disk
                .blocks()
                .files(tier)
                .remove_all()
                .map_err(DaemonError::RemoveBlocks)?;
        }
        log::info!("image {name}: removed");
        Ok(())
    }

    fn import(
        &self,
        name: ImageName,
        path: &Path,
        block_size: u64,
        tier: Tier,
        progress: Progress,
    ) -> Result<Value, DaemonError> {
        let open = |source| DaemonError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut source = File::open(path).map_err(open)?;
        let len = source.metadata().map_err(open)?.len();
        let size = len.div_ceil(SECTOR_SIZE).max(1) * SECTOR_SIZE;
        let shape = Shape {
            size,
            block_size,
            tier,
            read_only: false,
            qos: QosLimits::default(),
            stripe: None,
            parent: None,
        };
        let disk = self.create(name.clone(), shape, &[])?;
        let claim = disk
            .claim()
            .ok_or_else(|| DaemonError::Busy(name.clone()))?;
        let copied = transfer::import_raw(&disk, &mut source, progress);
        drop(claim);
        if let Err(source) = copied {
            let _ = self.remove(&name);
            return Err(DaemonError::Import {
                path: path.to_path_buf(),
                source,
            });
        }
        disk.blocks().flush()?;
        self.publish(&disk)?;
        Ok(self.summary(&disk))
    }

    /// Stops every export (draining its requests), syncs and saves every image. Called on
    /// SIGTERM; the process exits afterwards.
    pub fn shutdown(&self) {
        let entries: Vec<Entry> = std::mem::take(&mut *self.lock()).into_values().collect();
        for entry in entries {
            if let Some(export) = entry.export {
                export.stop();
            }
            let name = entry.disk.name().clone();
            if let Err(e) = entry.disk.blocks().flush() {
                log::error!("image {name}: sync at shutdown failed: {e}");
            }
            if self.shared.is_some() {
                crate::ownership::device_stopped(&entry.disk);
            } else if let Err(e) = entry.disk.meta().save(&self.config.meta_dir()) {
                log::error!("image {name}: saving metadata at shutdown failed: {e}");
            }
        }
        if let Some(cluster) = &self.shared {
            cluster.leave();
        }
        if let Err(e) = note_run_state(&self.config.dirs, "clean") {
            log::error!("cannot note the clean stop: {e}");
        }
    }
}

/// Auto tiering moves copies between tiers, which would break a stripe's members (the
/// operator's placement): refused together.
fn refuse_auto_stripe(meta: &ImageMeta) -> Result<(), DaemonError> {
    if meta.stripe.is_some() && meta.qos.tiering == Some(crate::tiering::TierMode::Auto) {
        return Err(DaemonError::Text(
            "a striped image cannot be auto-tiered: its stripe places its copies".into(),
        ));
    }
    Ok(())
}
