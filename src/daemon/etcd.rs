//! The daemon in a cluster whose metadata lives in etcd: loading what this node owns or
//! holds, following every change through a watch, and the operations whose answer is the
//! cluster's (list, info, node list, remove). Nothing here is pushed to other nodes: each
//! node watches etcd and puts its own files in line with it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::{Daemon, DaemonError, Entry};
use crate::disk::Disk;
use crate::image::id::parse_dir_name;
use crate::image::{ImageId, ImageMeta, ImageName, NodeId, Tier};
use crate::meta::cluster::ClusterMeta;
use crate::meta::etcd::{EtcdError, EventKind};
use crate::meta::lease::Standing;
use crate::meta::records::{ChunkRecord, ImageRecord, Key, NodeRecord};
use crate::vhost_listener::socket_path;

/// How long to wait before watching again after the watch failed.
const REWATCH_PAUSE: Duration = Duration::from_millis(500);

impl Daemon {
    fn cluster(&self) -> Result<&Arc<ClusterMeta>, DaemonError> {
        self.shared.as_ref().ok_or(DaemonError::NoCluster)
    }

    /// Opens every image this node owns or holds copies of; removes block directories of
    /// images that no longer exist (deleted while this node was down). Returns the revision
    /// the state was read at, to watch from.
    pub(super) fn load_shared(&self) -> Result<i64, DaemonError> {
        let cluster = self.cluster()?;
        let (images, revision) = cluster.images()?;
        for node in cluster.nodes()? {
            self.peers.set(&node.id, node.addr);
        }
        self.remove_stale_sockets();
        let mut kept = BTreeSet::new();
        for meta in images {
            if !self.concerns_me(&meta) {
                continue;
            }
            kept.insert((meta.name.clone(), meta.id));
            let (name, id) = (meta.name.clone(), meta.id);
            // A copy whose loss is not recorded in etcd would be served as data: not
            // starting is the safe answer (the next start tries again).
            self.open_shared(meta).map_err(|e| DaemonError::Serve {
                name: name.clone(),
                source: Box::new(e),
            })?;
            // Losses this node reported before and the owner has not recorded yet.
            if let Some(disk) = self.find(&name) {
                for (node, record, _) in cluster.lost_reports(id)? {
                    if node == self.config.node {
                        for tier in record.tiers {
                            disk.mark_lost(tier);
                        }
                    }
                }
            }
        }
        self.remove_leftovers(&kept);
        *self.watch_from.lock().unwrap_or_else(|p| p.into_inner()) = revision + 1;
        Ok(revision)
    }

    /// Image sockets an earlier run left behind (killed before it could remove them): the
    /// images this node owns get theirs again; the others must not look like a way in.
    fn remove_stale_sockets(&self) {
        let Ok(entries) = std::fs::read_dir(&self.config.run_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".sock") && name != "control.sock" {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn concerns_me(&self, meta: &ImageMeta) -> bool {
        meta.owner == self.config.node || meta.table.nodes().contains(&self.config.node)
    }

    /// Opens an image of the cluster here: exported when this node owns it, else held. The
    /// block directories of the tiers it has copies on are made here (lost copies are told by
    /// the tier markers, see `wiped_tiers`).
    fn open_shared(&self, meta: ImageMeta) -> Result<(), DaemonError> {
        for tier in [Tier::Ram, Tier::Volume] {
            let here = meta.table.extents().iter().any(|e| {
                e.locations
                    .iter()
                    .any(|l| l.node == self.config.node && l.tier == tier)
            });
            if here {
                let files =
                    crate::store::BlockFiles::open(&self.config.dirs, tier, &meta.name, meta.id);
                files
                    .create_dir()
                    .map_err(|source| DaemonError::CreateDir {
                        path: files.dir().to_path_buf(),
                        source,
                    })?;
            }
        }
        Ok(self.open_and_export(meta)?)
    }

    /// Block directories under both tiers whose image (name and id) is not one this node
    /// keeps: the image was removed or moved away while this node was down.
    fn remove_leftovers(&self, kept: &BTreeSet<(ImageName, ImageId)>) {
        for tier in [Tier::Ram, Tier::Volume] {
            let root = self.config.dirs.root(tier);
            let Ok(entries) = std::fs::read_dir(root) else {
                continue;
            };
            for entry in entries.flatten() {
                let file_name = entry.file_name();
                let Some((name, id)) = file_name.to_str().and_then(parse_dir_name) else {
                    continue;
                };
                if id.is_legacy() || kept.contains(&(name.clone(), id)) {
                    continue;
                }
                log::info!(
                    "image {name}: removing leftover block files {} (the image is gone)",
                    entry.path().display()
                );
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    log::warn!("cannot remove {}: {e}", entry.path().display());
                }
            }
        }
    }

    /// Follows the cluster's changes from where [`Daemon::load_shared`] left off, for as long
    /// as the process lives; and keeps the node's lease.
    pub fn follow_cluster(self: &Arc<Self>) {
        let Some(cluster) = self.shared.clone() else {
            return;
        };
        let daemon = self.clone();
        let watcher = std::thread::Builder::new()
            .name("etcd-watch".into())
            .spawn(move || daemon.watch_loop(&cluster));
        if let Err(e) = watcher {
            log::error!("cannot start the etcd watch: {e}");
        }
        let daemon = self.clone();
        let keeper = std::thread::Builder::new()
            .name("etcd-lease".into())
            .spawn(move || daemon.lease_loop());
        if let Err(e) = keeper {
            log::error!("cannot start the lease keeper: {e}");
        }
        // Reports of lost copies made while this node was away.
        let names: Vec<ImageName> = self.lock().keys().cloned().collect();
        for name in names {
            self.settle_lost(&name);
        }
    }

    fn watch_loop(&self, cluster: &ClusterMeta) {
        let mut ids: HashMap<ImageId, ImageName> = HashMap::new();
        loop {
            let from = *self.watch_from.lock().unwrap_or_else(|p| p.into_inner());
            let mut watch = match cluster.watch(from) {
                Ok(watch) => watch,
                Err(e) => {
                    log::warn!("etcd watch: {e}");
                    std::thread::sleep(REWATCH_PAUSE);
                    continue;
                }
            };
            loop {
                match watch.next() {
                    Ok((events, revision)) => {
                        self.apply_events(cluster, &mut ids, events);
                        *self.watch_from.lock().unwrap_or_else(|p| p.into_inner()) = revision + 1;
                    }
                    Err(EtcdError::Compacted { .. }) => {
                        log::warn!("etcd watch fell behind compaction; reloading");
                        self.reload_all();
                        break;
                    }
                    Err(EtcdError::WatchIdle(_)) => break,
                    Err(e) => {
                        log::debug!("etcd watch ended: {e}");
                        std::thread::sleep(REWATCH_PAUSE);
                        break;
                    }
                }
            }
        }
    }

    /// Re-reads everything (after the watch missed changes) and puts this node in line.
    fn reload_all(&self) {
        let Ok(cluster) = self.cluster() else { return };
        // Node events the watch missed too: a peer whose lease went and came back meanwhile
        // would otherwise stay departed, and one that left would stay up.
        match cluster.nodes() {
            Ok(nodes) => self.peers.registry(&nodes),
            Err(e) => log::warn!("cannot reload the cluster's nodes: {e}"),
        }
        match cluster.images() {
            Ok((images, revision)) => {
                let mut seen: BTreeSet<ImageName> = BTreeSet::new();
                for meta in images {
                    seen.insert(meta.name.clone());
                    let name = meta.name.clone();
                    self.reconcile(&name, Some(meta));
                }
                let known: Vec<ImageName> = self.lock().keys().cloned().collect();
                for name in known.into_iter().filter(|n| !seen.contains(n)) {
                    self.reconcile(&name, None);
                }
                *self.watch_from.lock().unwrap_or_else(|p| p.into_inner()) = revision + 1;
            }
            Err(e) => log::warn!("cannot reload the cluster's images: {e}"),
        }
    }

    fn apply_events(
        &self,
        cluster: &ClusterMeta,
        ids: &mut HashMap<ImageId, ImageName>,
        events: Vec<crate::meta::etcd::Event>,
    ) {
        let mut touched: BTreeSet<ImageName> = BTreeSet::new();
        let mut lost: BTreeSet<ImageName> = BTreeSet::new();
        for event in events {
            let Some(key) = cluster.keys().parse(&event.kv.key) else {
                continue;
            };
            match (key, event.kind) {
                (Key::Node(id), EventKind::Put) => {
                    match serde_json::from_slice::<NodeRecord>(&event.kv.value) {
                        Ok(record) => {
                            self.peers.set(&id, record.addr);
                            self.peers.joined(&id);
                        }
                        Err(e) => log::warn!("node {id}: bad record in etcd: {e}"),
                    }
                }
                // The node's lease expired (or it stopped): it is failed at once.
                (Key::Node(id), EventKind::Delete) => self.peers.left(&id),
                // Only changes to images this node serves, holds or is given copies of are read
                // back from etcd: the others cost nothing but the event.
                (Key::Image(name), kind) => {
                    let record = (kind == EventKind::Put)
                        .then(|| serde_json::from_slice::<ImageRecord>(&event.kv.value).ok())
                        .flatten();
                    if let Some(record) = &record {
                        ids.insert(record.id, name.clone());
                    }
                    let mine = record.is_some_and(|r| r.owner == self.config.node);
                    if mine || self.find(&name).is_some() {
                        touched.insert(name);
                    }
                }
                (Key::Chunk(id, _), kind) => {
                    let known = self.name_of(id);
                    let names_me = kind == EventKind::Put
                        && serde_json::from_slice::<ChunkRecord>(&event.kv.value).is_ok_and(|c| {
                            c.extents
                                .iter()
                                .any(|e| e.locations.iter().any(|l| l.node == self.config.node))
                        });
                    if known.is_none() && !names_me {
                        continue;
                    }
                    match known.or_else(|| ids.get(&id).cloned()) {
                        Some(name) => {
                            touched.insert(name);
                        }
                        None => {
                            // An image this watch has not named yet: find it by its header.
                            if let Ok((images, _)) = cluster.images() {
                                for meta in images {
                                    ids.insert(meta.id, meta.name.clone());
                                    if meta.id == id {
                                        touched.insert(meta.name);
                                    }
                                }
                            }
                        }
                    }
                }
                // An image's limits, stripe or size changed: the nodes holding it read it
                // again.
                (Key::Qos(id) | Key::Stripe(id) | Key::Size(id), _) => {
                    if let Some(name) = self.name_of(id) {
                        touched.insert(name);
                    }
                }
                (Key::Lost(id, _), EventKind::Put) => {
                    if let Some(name) = self.name_of(id) {
                        lost.insert(name);
                    }
                }
                // The owner settled this node's report: what it kept in sync is served again.
                (Key::Lost(id, node), EventKind::Delete) if node == self.config.node => {
                    if let Some(disk) = self.name_of(id).and_then(|n| self.find(&n)) {
                        disk.clear_lost();
                    }
                }
                _ => {}
            }
        }
        let mut touched_owned = Vec::new();
        for name in touched {
            if self.find(&name).is_some_and(|d| d.owned_here()) {
                touched_owned.push(name.clone());
            }
            match cluster.image(&name) {
                Ok(meta) => {
                    if let Some(meta) = &meta {
                        ids.insert(meta.id, name.clone());
                    }
                    self.reconcile(&name, meta);
                }
                Err(e) => log::warn!("image {name}: cannot read it from etcd: {e}"),
            }
        }
        // Reports made while another node owned an image this node has just taken over
        // are settled too.
        let owned: Vec<ImageName> = touched_owned;
        for name in lost.into_iter().chain(owned) {
            self.settle_lost(&name);
        }
    }

    /// Reads image `name` from etcd and puts this node in line with it (a peer's request
    /// named a newer epoch, or a block this node's view does not place here yet).
    pub fn refresh(&self, name: &ImageName) {
        let Ok(cluster) = self.cluster() else { return };
        match cluster.image(name) {
            Ok(meta) => self.reconcile(name, meta),
            Err(e) => log::warn!("image {name}: cannot read it from etcd: {e}"),
        }
    }

    /// Whether `node` is this node or a peer; with etcd, a node this node's watch has not
    /// reported yet is looked up there (it may have just registered).
    pub(super) fn knows(&self, node: &NodeId) -> bool {
        if self.peers.knows(node) {
            return true;
        }
        let Ok(cluster) = self.cluster() else {
            return false;
        };
        if let Ok(nodes) = cluster.nodes() {
            for record in nodes {
                self.peers.set(&record.id, record.addr);
            }
        }
        self.peers.knows(node)
    }

    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    fn name_of(&self, id: ImageId) -> Option<ImageName> {
        self.lock()
            .iter()
            .find(|(_, e)| e.disk.meta().id == id)
            .map(|(n, _)| n.clone())
    }

    /// Puts this node in line with the cluster's metadata of image `name` (`None`: it is
    /// gone): opens what it newly holds, frees what it no longer holds, fences itself when
    /// another node became the owner, deletes a removed image's files.
    pub(super) fn reconcile(&self, name: &ImageName, meta: Option<ImageMeta>) {
        let me = self.config.node.clone();
        let known = self.find(name);
        match (known, meta) {
            (None, None) => {}
            (None, Some(meta)) => {
                if self.concerns_me(&meta) {
                    if let Err(e) = self.open_shared(meta) {
                        log::error!("image {name}: cannot hold it: {e}");
                    }
                }
            }
            (Some(disk), None) => {
                log::info!("image {name}: removed from the cluster");
                self.forget(name, disk.meta().id);
            }
            (Some(disk), Some(meta)) if disk.meta().id != meta.id => {
                log::info!("image {name}: removed and created again; dropping the old one");
                self.forget(name, disk.meta().id);
                self.reconcile(name, Some(meta));
            }
            (Some(disk), Some(meta)) => {
                if disk.owned_here() {
                    if meta.owner == me {
                        return; // this node's own change: its view is exact
                    }
                    log::warn!(
                        "image {name}: {} took it over (epoch {})",
                        meta.owner,
                        meta.generation
                    );
                    // Its frontend, if any, stays connected and gets I/O errors from now on;
                    // the export goes with the image once this node holds nothing of it.
                    disk.fence();
                    self.report_unrecorded(&disk);
                } else if meta.generation < disk.meta().generation {
                    return; // an older read than what this node has seen
                }
                let before = disk.meta().clone();
                disk.set_meta(meta);
                self.free_released(&disk, &before);
                if self.forgettable(&disk) {
                    log::info!("image {name}: no copies held here any more; forgotten");
                    let id = disk.meta().id;
                    self.forget(name, id);
                }
            }
        }
    }

    /// Whether this node is done with `disk`: it holds no copy, does not own it, and is not
    /// waiting for a guest (adopted), or was fenced and its frontend has gone (a fenced
    /// node's frontend stays connected and gets I/O errors until it leaves).
    fn forgettable(&self, disk: &Disk) -> bool {
        let standby = disk.adopted_at().is_some() && !disk.is_fenced();
        !self.concerns_me(&disk.meta()) && !standby && !disk.in_use()
    }

    /// Forgets the images [`Daemon::forgettable`] says this node is done with.
    fn sweep(&self) {
        let done: Vec<(ImageName, ImageId)> = self
            .lock()
            .iter()
            .filter(|(_, e)| self.forgettable(&e.disk))
            .map(|(n, e)| (n.clone(), e.disk.meta().id))
            .collect();
        for (name, id) in done {
            log::info!("image {name}: nothing of it is kept here any more; forgotten");
            self.forget(&name, id);
        }
    }

    /// A former owner that could not record which copies missed its last writes: its own
    /// copies took them and the others did not, so its own are reported lost; the new owner
    /// marks them out of sync, and every copy it reads agrees.
    fn report_unrecorded(&self, disk: &Disk) {
        if !disk.has_unrecorded_marks() {
            return;
        }
        let Ok(cluster) = self.cluster() else { return };
        let tiers = disk.synced_tiers_here();
        for &tier in &tiers {
            disk.mark_lost(tier);
        }
        let meta = disk.meta().clone();
        match cluster.report_lost(&meta, &tiers, true) {
            Ok(()) => log::warn!(
                "image {}: writes whose marks were never recorded took this node's copies: reported them lost",
                disk.name()
            ),
            Err(e) => log::error!("image {}: cannot report diverged copies: {e}", disk.name()),
        }
    }

    /// Records the out-of-sync marks that could not be recorded while etcd was unreachable
    /// (see `Disk::mark_out_of_sync`), on the images this node still owns.
    fn record_pending_marks(&self) {
        let disks: Vec<Arc<Disk>> = self.lock().values().map(|e| e.disk.clone()).collect();
        for disk in disks.iter().filter(|d| d.has_unrecorded_marks()) {
            if disk.owned_here() && !disk.is_fenced() {
                let left = disk.record_pending_marks();
                log::warn!(
                    "image {}: recorded the out-of-sync marks etcd missed ({left} blocks left)",
                    disk.name()
                );
            }
        }
    }

    /// Frees the files of blocks whose copy on this node was removed between `before` and the
    /// disk's current metadata.
    fn free_released(&self, disk: &Disk, before: &ImageMeta) {
        let me = &self.config.node;
        let after = disk.meta().clone();
        for tier in [Tier::Ram, Tier::Volume] {
            for block in 0..after.blocks() {
                let had = before
                    .table
                    .locations(block)
                    .is_some_and(|ls| ls.iter().any(|l| &l.node == me && l.tier == tier));
                let has = after
                    .table
                    .locations(block)
                    .is_some_and(|ls| ls.iter().any(|l| &l.node == me && l.tier == tier));
                if had && !has {
                    if let Err(e) = disk.blocks().drop_copy(tier, block) {
                        log::warn!("image {}: block {block}: cannot free it: {e}", disk.name());
                    }
                }
            }
        }
    }

    /// Opens image `name` again as a new instance (a fenced one is never served again):
    /// its export and entry are replaced; its block files stay.
    fn reopen(&self, name: &ImageName, meta: ImageMeta) -> Result<Arc<Disk>, DaemonError> {
        let entry = self.lock().remove(name);
        if let Some(Entry { disk, export }) = entry {
            if let Some(export) = export {
                export.stop();
            }
            disk.fence();
        }
        log::info!("image {name}: opened again here as a new instance");
        self.open_shared(meta)?;
        self.find(name)
            .ok_or_else(|| DaemonError::Vanished(name.clone()))
    }

    /// Drops image `name` (of id `id`) from this node: export, files, entry.
    fn forget(&self, name: &ImageName, id: ImageId) {
        let entry = {
            let mut images = self.lock();
            if images.get(name).is_none_or(|e| e.disk.meta().id != id) {
                return;
            }
            images.remove(name)
        };
        let Some(Entry { disk, export }) = entry else {
            return;
        };
        if let Some(export) = export {
            export.stop();
        }
        disk.fence();
        disk.mark_removed();
        for tier in [Tier::Ram, Tier::Volume] {
            if let Err(e) = disk.blocks().files(tier).remove_all() {
                log::warn!("image {name}: cannot remove its block files on {tier}: {e}");
            }
        }
    }

    /// As the owner: marks copies that holders reported lost out of sync, then clears the
    /// reports. A holder never serves a lost copy in the meantime.
    fn settle_lost(&self, name: &ImageName) {
        let (Ok(cluster), Some(disk)) = (self.cluster(), self.find(name)) else {
            return;
        };
        if !disk.owned_here() {
            return;
        }
        let id = disk.meta().id;
        let reports = match cluster.lost_reports(id) {
            Ok(reports) => reports,
            Err(e) => return log::warn!("image {name}: cannot read lost-copy reports: {e}"),
        };
        for (node, record, revision) in reports {
            let marked = disk.update_meta(|meta| {
                let all =
                    crate::image::BlockRange::new(0, meta.blocks()).map_err(|e| e.to_string())?;
                meta.table
                    .update(all, |locations| {
                        let reported = |l: &crate::image::Location| {
                            l.node == node && record.tiers.contains(&l.tier)
                        };
                        // A suspect copy (possibly stale, not gone) that is the block's only
                        // in-sync copy stays: it is the best there is.
                        let elsewhere = locations.iter().any(|l| l.synced && !reported(l));
                        if record.suspect && !elsewhere {
                            return;
                        }
                        for l in locations.iter_mut().filter(|l| reported(l)) {
                            l.synced = false;
                        }
                    })
                    .map_err(|e| e.to_string())
            });
            match marked {
                Ok(()) => {
                    log::warn!(
                        "image {name}: {node} lost its copies on {:?}; marked out of sync",
                        record.tiers
                    );
                    if let Err(e) = cluster.clear_lost(id, &node, revision) {
                        log::warn!("image {name}: cannot clear the report of {node}: {e}");
                    }
                }
                Err(e) => log::error!("image {name}: cannot mark {node}'s lost copies: {e}"),
            }
        }
    }

    /// Renews the node's lease; when etcd let it expire, takes a new one and claims again the
    /// devices this node runs (each only if no other node took its image over meanwhile).
    fn lease_loop(&self) {
        let Ok(cluster) = self.cluster() else { return };
        let lease = cluster.lease().clone();
        loop {
            std::thread::sleep(lease.renew_every());
            self.sweep();
            match lease.renew() {
                Standing::Lost => {}
                Standing::Valid => {
                    self.record_pending_marks();
                    continue;
                }
                Standing::Doubtful => continue,
            }
            log::error!("the node's etcd lease expired; taking a new one");
            if let Err(e) = lease
                .replace()
                .map_err(|e| e.to_string())
                .and_then(|_| cluster.register().map_err(|e| e.to_string()))
            {
                log::error!("cannot renew the node's registration: {e}");
                continue;
            }
            let disks: Vec<Arc<Disk>> = self.lock().values().map(|e| e.disk.clone()).collect();
            for disk in disks.into_iter().filter(|d| d.owned_here() && d.in_use()) {
                let meta = disk.meta().clone();
                match cluster.activate(&meta) {
                    Ok(()) => {
                        disk.set_active(true);
                        log::info!("image {}: still owned here; writes go on", disk.name());
                    }
                    Err(e) => {
                        log::error!("image {}: {e}", disk.name());
                        disk.fence();
                    }
                }
            }
        }
    }

    /// Image `name` as etcd has it now.
    fn shared_image(&self, name: &ImageName) -> Result<ImageMeta, DaemonError> {
        self.cluster()?
            .image(name)?
            .ok_or_else(|| DaemonError::NoImage(name.clone()))
    }

    pub(super) fn remove_shared(&self, name: &ImageName) -> Result<(), DaemonError> {
        let cluster = self.cluster()?;
        let meta = self.shared_image(name)?;
        if meta.owner != self.config.node {
            return Err(DaemonError::OwnedElsewhere {
                name: name.clone(),
                owner: meta.owner,
            });
        }
        if self.find(name).is_some_and(|d| d.in_use()) {
            return Err(DaemonError::InUse(name.clone()));
        }
        cluster.remove(&meta)?;
        self.forget(name, meta.id);
        log::info!("image {name}: removed from the cluster");
        Ok(())
    }

    pub(super) fn list_shared(&self) -> Result<Value, DaemonError> {
        let (images, _) = self.cluster()?.images()?;
        Ok(Value::Array(
            images
                .iter()
                .map(|meta| match self.find(&meta.name) {
                    Some(disk) if disk.meta().id == meta.id && disk.owned_here() => {
                        self.summary(&disk)
                    }
                    _ => shared_summary(meta),
                })
                .collect(),
        ))
    }

    pub(super) fn info_shared(&self, name: &ImageName) -> Result<Value, DaemonError> {
        let meta = self.shared_image(name)?;
        let mut value = shared_summary(&meta);
        let blocks: Vec<Value> = (0..meta.blocks())
            .map(|index| {
                json!({"index": index, "locations": meta.table.locations(index).unwrap_or(&[])})
            })
            .collect();
        value["blocks"] = Value::Array(blocks);
        Ok(value)
    }

    pub(super) fn node_list(&self) -> Result<Value, DaemonError> {
        let Some(cluster) = &self.shared else {
            return Ok(json!([{"id": self.config.node, "live": true}]));
        };
        let nodes = cluster.nodes()?;
        let (images, _) = cluster.images()?;
        let mut known: BTreeSet<NodeId> = images.iter().flat_map(|m| m.table.nodes()).collect();
        let mut out: Vec<Value> = Vec::new();
        for node in &nodes {
            known.remove(&node.id);
            out.push(json!({
                "id": node.id, "live": true, "addr": node.addr,
                "incarnation": node.incarnation, "tiers": node.tiers,
                "owns": images.iter().filter(|m| m.owner == node.id).count(),
            }));
        }
        for id in known {
            out.push(json!({"id": id, "live": false,
                "owns": images.iter().filter(|m| m.owner == id).count()}));
        }
        Ok(Value::Array(out))
    }

    /// On the node that is to serve the image (live migration, or a restart elsewhere after
    /// its node died): export it here in standby. The take-over happens when a guest here
    /// starts the device, and only if no frontend runs it elsewhere then.
    pub(super) fn adopt_shared(
        &self,
        name: &ImageName,
        from: Option<&NodeId>,
    ) -> Result<Value, DaemonError> {
        let meta = self.shared_image(name)?;
        if let Some(from) = from.filter(|&f| f != &meta.owner) {
            return Err(DaemonError::NotOwnedBy {
                name: name.clone(),
                owner: meta.owner,
                from: from.clone(),
            });
        }
        if meta.owner == self.config.node {
            return Err(DaemonError::AlreadyOwned(name.clone()));
        }
        let from = meta.owner.clone();
        let disk = match self.find(name) {
            // Fenced when the image moved away while this node kept a copy: that instance
            // stays fenced for good (a stale frontend must never be served again), so the
            // image comes back here as a new one, once the old frontend has gone.
            Some(disk) if disk.is_fenced() => {
                if disk.in_use() {
                    return Err(DaemonError::InUse(name.clone()));
                }
                self.reopen(name, meta)?
            }
            Some(disk) => disk,
            None => {
                self.open_shared(meta)?;
                self.find(name)
                    .ok_or_else(|| DaemonError::Vanished(name.clone()))?
            }
        };
        disk.adopt();
        self.localize_on_take_over(&disk);
        self.publish(&disk)?;
        log::info!("image {name}: adopted (owner {from}), exported here in standby");
        Ok(json!({"image": name, "from": from, "socket": socket_path(&self.config.run_dir, name)}))
    }
}

fn shared_summary(meta: &ImageMeta) -> Value {
    json!({
        "name": meta.name,
        "id": meta.id,
        "owner": meta.owner,
        "epoch": meta.generation,
        "size": meta.size,
        "block_size": meta.block_size,
        "tier": meta.tier,
        "read_only": meta.read_only,
        "qos": meta.qos.json(),
        "stripe": meta.stripe.as_ref().map(crate::stripe::Stripe::json),
    })
}
