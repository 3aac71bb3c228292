//! The cluster's metadata in etcd: joining (incarnation, lease, registration), reading images
//! and nodes, and every change as a transaction that compares the image's epoch, so that
//! exactly one node can change an image at a time and a replaced owner changes nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::etcd::{Cmp, Compare, Etcd, EtcdError, Kv, Op, Txn};
use super::lease::NodeLease;
use super::records::{
    self, ActiveRecord, ChunkRecord, ImageRecord, Key, Keys, NodeRecord, SizeRecord, TierRecord,
};
use super::store::{MetaStore, StoreError};
use crate::image::{ImageMeta, ImageName, NodeId};
use crate::qos::QosLimits;
use crate::stripe::Stripe;

/// Bounds every etcd call of the control and data paths: a majority that does not answer
/// within it counts as unreachable for that call.
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

impl From<EtcdError> for StoreError {
    fn from(e: EtcdError) -> Self {
        StoreError::Cluster(e.to_string())
    }
}

fn bad(key: &[u8], e: impl std::fmt::Display) -> StoreError {
    StoreError::Cluster(format!(
        "bad record at {}: {e}",
        String::from_utf8_lossy(key)
    ))
}

fn decode<T: serde::de::DeserializeOwned>(kv: &Kv) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|e| bad(&kv.key, e))
}

/// An etcd revision as an epoch. etcd's revisions start at 1; anything else is a broken
/// answer, refused rather than turned into an epoch that would outrank every real one.
fn epoch_of(revision: i64) -> Result<u64, StoreError> {
    u64::try_from(revision)
        .ok()
        .filter(|&r| r > 0)
        .ok_or_else(|| StoreError::Cluster(format!("etcd sent revision {revision}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Records are plain data (strings, numbers, vectors): serialising cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// How this node joins the cluster.
pub struct Join<'a> {
    pub endpoints: &'a [String],
    pub cluster: &'a str,
    pub me: NodeId,
    pub addr: SocketAddr,
    pub lease_ttl: Duration,
    pub tiers: Vec<TierRecord>,
}

pub struct ClusterMeta {
    etcd: Etcd,
    keys: Keys,
    me: NodeId,
    addr: SocketAddr,
    incarnation: u64,
    tiers: Vec<TierRecord>,
    lease: Arc<NodeLease>,
}

impl ClusterMeta {
    /// Joins: waits out a previous run's lease, takes the next incarnation, registers under a
    /// new lease.
    pub fn join(join: Join) -> Result<ClusterMeta, StoreError> {
        let etcd = Etcd::new(join.endpoints, ETCD_TIMEOUT)?;
        let keys = Keys::new(join.cluster);
        wait_out_previous_run(&etcd, &keys, &join.me, join.lease_ttl)?;
        let incarnation = next_incarnation(&etcd, &keys, &join.me)?;
        let lease = Arc::new(NodeLease::grant(etcd.clone(), join.lease_ttl)?);
        let cluster = ClusterMeta {
            etcd,
            keys,
            me: join.me,
            addr: join.addr,
            incarnation,
            tiers: join.tiers,
            lease,
        };
        cluster.register()?;
        log::info!(
            "joined cluster {} as {} (incarnation {incarnation}, lease {:x})",
            join.cluster,
            cluster.me,
            cluster.lease.id()
        );
        Ok(cluster)
    }

    /// Puts this node's record under its current lease.
    pub fn register(&self) -> Result<(), StoreError> {
        let record = NodeRecord {
            id: self.me.clone(),
            addr: self.addr,
            incarnation: self.incarnation,
            lease: self.lease.id(),
            tiers: self.tiers.clone(),
            host: hostname(),
            pid: std::process::id(),
        };
        self.etcd
            .put(&self.keys.node(&self.me), &encode(&record), record.lease)?;
        Ok(())
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    pub fn lease(&self) -> &Arc<NodeLease> {
        &self.lease
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// A clean stop: the lease goes, and with it this node's registration and active keys, so
    /// other nodes may take its images over at once.
    pub fn leave(&self) {
        if let Err(e) = self.etcd.lease_revoke(self.lease.id()) {
            log::warn!("cannot revoke the node's lease: {e}");
        }
    }

    /// Every node registered now (the ones whose lease is alive).
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let (kvs, _) = self.etcd.get_prefix(&self.keys.nodes())?;
        kvs.iter().map(decode).collect()
    }

    /// Every image of the cluster, read at one revision, and that revision.
    pub fn images(&self) -> Result<(Vec<ImageMeta>, i64), StoreError> {
        let (kvs, revision) = self.etcd.get_prefix(&self.keys.prefix())?;
        let mut headers = Vec::new();
        let mut chunks: std::collections::HashMap<crate::image::ImageId, Vec<(u64, ChunkRecord)>> =
            Default::default();
        let mut limits: std::collections::HashMap<crate::image::ImageId, QosLimits> =
            Default::default();
        let mut stripes: std::collections::HashMap<crate::image::ImageId, Stripe> =
            Default::default();
        let mut sizes: std::collections::HashMap<crate::image::ImageId, u64> = Default::default();
        for kv in &kvs {
            match self.keys.parse(&kv.key) {
                Some(Key::Image(name)) => {
                    headers.push((name, epoch_of(kv.mod_revision)?, decode::<ImageRecord>(kv)?))
                }
                Some(Key::Chunk(id, chunk)) => {
                    chunks.entry(id).or_default().push((chunk, decode(kv)?))
                }
                Some(Key::Qos(id)) => {
                    limits.insert(id, decode(kv)?);
                }
                Some(Key::Stripe(id)) => {
                    if let Some(stripe) = stripe_of(kv) {
                        stripes.insert(id, stripe);
                    }
                }
                Some(Key::Size(id)) => {
                    sizes.insert(id, decode::<SizeRecord>(kv)?.size);
                }
                _ => {}
            }
        }
        let mut images = Vec::new();
        for (name, epoch, mut record) in headers {
            record.size = sizes.remove(&record.id).unwrap_or(record.size);
            let mut parts = chunks.remove(&record.id).unwrap_or_default();
            parts.sort_by_key(|(c, _)| *c);
            let parts: Vec<ChunkRecord> = parts.into_iter().map(|(_, r)| r).collect();
            let qos = limits.remove(&record.id).unwrap_or_default();
            let stripe = stripes.remove(&record.id);
            match records::meta_of(name.clone(), epoch, record, &parts, qos) {
                Ok(mut meta) => {
                    meta.stripe = stripe;
                    images.push(meta)
                }
                Err(e) => log::error!("image {name}: metadata in etcd is unusable: {e}"),
            }
        }
        Ok((images, revision))
    }

    /// One image, read atomically (its header and every extents record at one revision).
    pub fn image(&self, name: &ImageName) -> Result<Option<ImageMeta>, StoreError> {
        loop {
            let Some(head) = self.etcd.get(&self.keys.image(name))? else {
                return Ok(None);
            };
            let mut record: ImageRecord = decode(&head)?;
            let txn = Txn {
                compare: vec![Compare::ModRevision(
                    head.key.clone(),
                    Cmp::Equal,
                    head.mod_revision,
                )],
                success: vec![
                    Op::GetPrefix(self.keys.chunks(record.id)),
                    Op::Get(self.keys.qos(record.id)),
                    Op::Get(self.keys.stripe(record.id)),
                    Op::Get(self.keys.size(record.id)),
                ],
                failure: vec![],
            };
            let result = self.etcd.txn(&txn)?;
            if !result.succeeded {
                continue; // changed under us: read again
            }
            let mut parts = Vec::new();
            for kv in result.responses.first().map(Vec::as_slice).unwrap_or(&[]) {
                parts.push(decode::<ChunkRecord>(kv)?);
            }
            let qos = match result.responses.get(1).and_then(|kvs| kvs.first()) {
                Some(kv) => decode::<QosLimits>(kv)?,
                None => QosLimits::default(),
            };
            let epoch = epoch_of(head.mod_revision)?;
            let stripe = match result.responses.get(2).and_then(|kvs| kvs.first()) {
                Some(kv) => stripe_of(kv),
                None => None,
            };
            if let Some(kv) = result.responses.get(3).and_then(|kvs| kvs.first()) {
                record.size = decode::<SizeRecord>(kv)?.size;
            }
            let mut meta = records::meta_of(name.clone(), epoch, record, &parts, qos)?;
            meta.stripe = stripe;
            return Ok(Some(meta));
        }
    }

    fn chunk_puts(&self, meta: &ImageMeta, chunks: Vec<(u64, ChunkRecord)>) -> Vec<Op> {
        chunks
            .into_iter()
            .map(|(c, record)| Op::Put {
                key: self.keys.chunk(meta.id, c),
                value: encode(&record),
                lease: 0,
            })
            .collect()
    }

    /// The write that stores `meta`'s limits: its `qos` key, deleted when it has none.
    fn qos_write(&self, meta: &ImageMeta) -> Op {
        let key = self.keys.qos(meta.id);
        if meta.qos.is_default() {
            Op::Delete(key)
        } else {
            Op::Put {
                key,
                value: encode(&meta.qos),
                lease: 0,
            }
        }
    }

    /// The write that stores `meta`'s stripe layout: its `stripe` key, deleted when it is not
    /// striped.
    fn stripe_write(&self, meta: &ImageMeta) -> Op {
        let key = self.keys.stripe(meta.id);
        match &meta.stripe {
            None => Op::Delete(key),
            Some(stripe) => Op::Put {
                key,
                value: encode(stripe),
                lease: 0,
            },
        }
    }

    /// The writes that store a resize from `current` to `next`: the `size` key, and the
    /// deletion of the extents records past the new end (a shrink).
    fn size_writes(&self, current: &ImageMeta, next: &ImageMeta) -> Vec<Op> {
        let mut ops = vec![Op::Put {
            key: self.keys.size(next.id),
            value: encode(&SizeRecord { size: next.size }),
            lease: 0,
        }];
        let (kept, had) = (
            records::chunk_count(next.blocks()),
            records::chunk_count(current.blocks()),
        );
        ops.extend((kept..had).map(|c| Op::Delete(self.keys.chunk(next.id, c))));
        ops
    }

    /// Creates `meta` (owned by this node) unless an image of that name exists; sets its
    /// epoch.
    pub fn create(&self, meta: &mut ImageMeta) -> Result<(), StoreError> {
        let key = self.keys.image(&meta.name);
        let mut success = vec![Op::Put {
            key: key.clone(),
            value: encode(&ImageRecord::of(meta)),
            lease: 0,
        }];
        success.extend(self.chunk_puts(meta, records::chunks_of(&meta.table)));
        if !meta.qos.is_default() {
            success.push(self.qos_write(meta));
        }
        if meta.stripe.is_some() {
            success.push(self.stripe_write(meta));
        }
        let txn = Txn {
            compare: vec![Compare::Version(key, Cmp::Equal, 0)],
            success,
            failure: vec![],
        };
        let result = self.etcd.txn(&txn)?;
        if !result.succeeded {
            // A retried call may find its own first attempt: the id is ours alone.
            if let Some(head) = self.etcd.get(&self.keys.image(&meta.name))? {
                if decode::<ImageRecord>(&head)?.id == meta.id {
                    meta.generation = epoch_of(head.mod_revision)?;
                    return Ok(());
                }
            }
            return Err(StoreError::Cluster(format!(
                "image '{}' already exists in the cluster",
                meta.name
            )));
        }
        meta.generation = epoch_of(result.revision)?;
        Ok(())
    }

    /// Tells the image's owner that this node lost its copies on `tiers` (or, `suspect`,
    /// that they may be stale).
    pub fn report_lost(
        &self,
        meta: &ImageMeta,
        tiers: &[crate::image::Tier],
        suspect: bool,
    ) -> Result<(), StoreError> {
        let record = records::LostRecord {
            tiers: tiers.to_vec(),
            incarnation: self.incarnation,
            suspect,
        };
        self.etcd
            .put(&self.keys.lost(meta.id, &self.me), &encode(&record), 0)?;
        Ok(())
    }

    /// Lost-copy reports for image `id`: (node, record, revision of the report).
    pub fn lost_reports(
        &self,
        id: crate::image::ImageId,
    ) -> Result<Vec<(NodeId, records::LostRecord, i64)>, StoreError> {
        let prefix = format!("{}lost/{id}/", String::from_utf8_lossy(&self.keys.prefix()));
        let (kvs, _) = self.etcd.get_prefix(prefix.as_bytes())?;
        let mut reports = Vec::new();
        for kv in &kvs {
            if let Some(Key::Lost(_, node)) = self.keys.parse(&kv.key) {
                reports.push((node, decode(kv)?, kv.mod_revision));
            }
        }
        Ok(reports)
    }

    /// The owner recorded a lost-copy report: it goes, unless the node reported again since.
    pub fn clear_lost(
        &self,
        id: crate::image::ImageId,
        node: &NodeId,
        revision: i64,
    ) -> Result<(), StoreError> {
        let key = self.keys.lost(id, node);
        let txn = Txn {
            compare: vec![Compare::ModRevision(key.clone(), Cmp::Equal, revision)],
            success: vec![Op::Delete(key)],
            failure: vec![],
        };
        self.etcd.txn(&txn)?;
        Ok(())
    }

    /// Watches every key of the cluster from `revision` on.
    pub fn watch(&self, revision: i64) -> Result<super::etcd::Watch, StoreError> {
        Ok(self
            .etcd
            .watch(&self.keys.prefix(), revision, Some(Duration::from_secs(30)))?)
    }

    /// Removes the image everywhere: its header and extents go in one transaction, holders
    /// see it through their watch and delete their files. Refused while a frontend runs it.
    pub fn remove(&self, meta: &ImageMeta) -> Result<(), StoreError> {
        let key = self.keys.image(&meta.name);
        let txn = Txn {
            compare: vec![
                Compare::ModRevision(key.clone(), Cmp::Equal, meta.generation as i64),
                Compare::Version(self.keys.active(meta.id), Cmp::Equal, 0),
            ],
            success: vec![
                Op::Delete(key),
                Op::DeletePrefix(self.keys.chunks(meta.id)),
                Op::Delete(self.keys.qos(meta.id)),
                Op::Delete(self.keys.stripe(meta.id)),
                Op::Delete(self.keys.size(meta.id)),
            ],
            failure: self.refusal_reads(meta),
        };
        let result = self.etcd.txn(&txn)?;
        if result.succeeded {
            return Ok(());
        }
        Err(self.why_refused(meta, &result.responses))
    }

    /// What a refused transaction on the image reads to say why: its header, its active key.
    fn refusal_reads(&self, meta: &ImageMeta) -> Vec<Op> {
        vec![
            Op::Get(self.keys.image(&meta.name)),
            Op::Get(self.keys.active(meta.id)),
        ]
    }

    /// Why a transaction guarded by [`ClusterMeta::refusal_reads`] was refused: the epoch
    /// moved on (another node took the image over, or it was removed: final), or a frontend
    /// runs it on some node (it may stop, or that node's lease run out).
    fn why_refused(&self, meta: &ImageMeta, reads: &[Vec<Kv>]) -> StoreError {
        let fenced = StoreError::Fenced {
            image: meta.name.to_string(),
            epoch: meta.generation,
        };
        let head = reads.first().and_then(|kvs| kvs.first());
        if head.is_none_or(|kv| kv.mod_revision != meta.generation as i64) {
            return fenced;
        }
        match reads.get(1).and_then(|kvs| kvs.first()) {
            Some(kv) => match decode::<ActiveRecord>(kv) {
                Ok(a) => StoreError::InUse {
                    image: meta.name.to_string(),
                    node: a.node.to_string(),
                },
                Err(e) => e,
            },
            None => fenced,
        }
    }

    /// Makes this node the owner of `meta`'s image, if its epoch is still current and no
    /// frontend runs it anywhere; the device is marked active here in the same transaction.
    /// Of several nodes trying at once, exactly one wins. Returns the image's metadata as the
    /// new owner finds it: read in the same transaction, so every change the old owner made
    /// (copies it marked out of sync) is in it, whatever this node's watch had seen.
    pub fn take_over(&self, meta: &ImageMeta) -> Result<ImageMeta, StoreError> {
        let epoch = self.take_over_epoch(meta)?;
        let fresh = self.image(&meta.name)?.ok_or_else(|| StoreError::Fenced {
            image: meta.name.to_string(),
            epoch,
        })?;
        if fresh.generation != epoch || fresh.owner != self.me {
            return Err(StoreError::Fenced {
                image: meta.name.to_string(),
                epoch,
            });
        }
        Ok(fresh)
    }

    fn take_over_epoch(&self, meta: &ImageMeta) -> Result<u64, StoreError> {
        let key = self.keys.image(&meta.name);
        let mut record = ImageRecord::of(meta);
        record.owner = self.me.clone();
        let txn = Txn {
            compare: vec![
                Compare::ModRevision(key.clone(), Cmp::Equal, meta.generation as i64),
                Compare::Version(self.keys.active(meta.id), Cmp::Equal, 0),
            ],
            success: vec![
                Op::Put {
                    key,
                    value: encode(&record),
                    lease: 0,
                },
                Op::Put {
                    key: self.keys.active(meta.id),
                    value: encode(&ActiveRecord {
                        node: self.me.clone(),
                        epoch: 0,
                    }),
                    lease: self.lease.id(),
                },
            ],
            failure: self.refusal_reads(meta),
        };
        let result = self.etcd.txn(&txn)?;
        if result.succeeded {
            return epoch_of(result.revision);
        }
        // A retried call may find its own first attempt: this node owns it under its lease.
        let active_is_mine = result
            .responses
            .get(1)
            .and_then(|kvs| kvs.first())
            .is_some_and(|kv| kv.lease == self.lease.id());
        if active_is_mine {
            if let Some(head) = self.etcd.get(&self.keys.image(&meta.name))? {
                if decode::<ImageRecord>(&head)?.owner == self.me {
                    return epoch_of(head.mod_revision);
                }
            }
        }
        Err(self.why_refused(meta, &result.responses))
    }

    /// Marks the image's device active on this node (a frontend started it). Allowed only to
    /// the owner at the current epoch, and only when no other node has it active.
    pub fn activate(&self, meta: &ImageMeta) -> Result<(), StoreError> {
        let key = self.keys.image(&meta.name);
        let active = self.keys.active(meta.id);
        let txn = Txn {
            compare: vec![
                Compare::ModRevision(key, Cmp::Equal, meta.generation as i64),
                Compare::Version(active.clone(), Cmp::Equal, 0),
            ],
            success: vec![Op::Put {
                key: active.clone(),
                value: encode(&ActiveRecord {
                    node: self.me.clone(),
                    epoch: meta.generation,
                }),
                lease: self.lease.id(),
            }],
            failure: self.refusal_reads(meta),
        };
        let result = self.etcd.txn(&txn)?;
        if result.succeeded {
            return Ok(());
        }
        let mine = result
            .responses
            .get(1)
            .and_then(|kvs| kvs.first())
            .is_some_and(|kv| kv.lease == self.lease.id());
        if mine && self.epoch_is(meta)? {
            return Ok(());
        }
        Err(self.why_refused(meta, &result.responses))
    }

    fn epoch_is(&self, meta: &ImageMeta) -> Result<bool, StoreError> {
        let head = self.etcd.get(&self.keys.image(&meta.name))?;
        Ok(head.is_some_and(|kv| kv.mod_revision == meta.generation as i64))
    }

    /// The device stopped here (the frontend went away or stopped it for a migration):
    /// another node may take the image over now.
    pub fn deactivate(&self, meta: &ImageMeta) -> Result<(), StoreError> {
        let active = self.keys.active(meta.id);
        let txn = Txn {
            compare: vec![Compare::Lease(active.clone(), Cmp::Equal, self.lease.id())],
            success: vec![Op::Delete(active)],
            failure: vec![],
        };
        self.etcd.txn(&txn)?;
        Ok(())
    }
}

impl MetaStore for ClusterMeta {
    fn is_shared(&self) -> bool {
        true
    }

    fn take_over(&self, meta: &ImageMeta) -> Result<ImageMeta, StoreError> {
        ClusterMeta::take_over(self, meta)
    }

    fn activate(&self, meta: &ImageMeta) -> Result<(), StoreError> {
        ClusterMeta::activate(self, meta)
    }

    fn deactivate(&self, meta: &ImageMeta) -> Result<(), StoreError> {
        ClusterMeta::deactivate(self, meta)
    }

    fn lease(&self) -> Option<&Arc<NodeLease>> {
        Some(&self.lease)
    }

    fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The owner's change to its image's extents, as one transaction that holds only while
    /// the image's epoch is the one this node acts under.
    fn commit(&self, current: &ImageMeta, next: &ImageMeta) -> Result<(), StoreError> {
        let fenced = || StoreError::Fenced {
            image: current.name.to_string(),
            epoch: current.generation,
        };
        if current.owner != self.me || next.generation != current.generation {
            return Err(fenced());
        }
        let changed = records::changed_chunks(&current.table, &next.table);
        let mut success = self.chunk_puts(next, changed);
        if next.qos != current.qos {
            success.push(self.qos_write(next));
        }
        if next.stripe != current.stripe {
            success.push(self.stripe_write(next));
        }
        if next.size != current.size {
            success.extend(self.size_writes(current, next));
        }
        if success.is_empty() {
            return Ok(());
        }
        let txn = Txn {
            compare: vec![Compare::ModRevision(
                self.keys.image(&current.name),
                Cmp::Equal,
                current.generation as i64,
            )],
            success,
            failure: vec![],
        };
        if self.etcd.txn(&txn)?.succeeded {
            Ok(())
        } else {
            Err(fenced())
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// A node id registered by a run of this daemon that is still within its lease: when that
/// run was on this host and its process is gone (a crash, `kill -9`), its lease is revoked at
/// once; otherwise this start waits until the lease runs out (two live daemons with one id
/// would both act as that node).
fn wait_out_previous_run(
    etcd: &Etcd,
    keys: &Keys,
    me: &NodeId,
    ttl: Duration,
) -> Result<(), StoreError> {
    let Some(kv) = etcd.get(&keys.node(me))? else {
        return Ok(());
    };
    let previous: NodeRecord = decode(&kv)?;
    let here = previous.host == hostname();
    let gone = here && !std::path::Path::new(&format!("/proc/{}", previous.pid)).exists();
    if gone {
        log::info!(
            "node {me}: the previous run (pid {}) is gone; revoking its lease",
            previous.pid
        );
        match etcd.lease_revoke(kv.lease) {
            Ok(()) | Err(EtcdError::Status { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    log::warn!(
        "node {me} is registered by another live run (pid {} on {}); waiting for its lease",
        previous.pid,
        previous.host
    );
    let deadline = Instant::now() + ttl * 2 + Duration::from_secs(1);
    while Instant::now() < deadline {
        if etcd.get(&keys.node(me))?.is_none() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(StoreError::Cluster(format!(
        "node id {me} is in use by a live daemon (pid {} on {})",
        previous.pid, previous.host
    )))
}

/// Takes the next incarnation number for `me`, atomically.
fn next_incarnation(etcd: &Etcd, keys: &Keys, me: &NodeId) -> Result<u64, StoreError> {
    let key = keys.incarnation(me);
    loop {
        let current = etcd.get(&key)?;
        let (n, revision) = match &current {
            Some(kv) => (
                std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                    .ok_or_else(|| bad(&kv.key, "not a number"))?,
                kv.mod_revision,
            ),
            None => (0, 0),
        };
        let txn = Txn {
            compare: vec![Compare::ModRevision(key.clone(), Cmp::Equal, revision)],
            success: vec![Op::Put {
                key: key.clone(),
                value: (n + 1).to_string().into_bytes(),
                lease: 0,
            }],
            failure: vec![],
        };
        if etcd.txn(&txn)?.succeeded {
            return Ok(n + 1);
        }
    }
}

/// A stripe record read back. The stripe only describes the layout (the block table says
/// where every copy is), so one that does not decode is logged and left out rather than
/// making the image, or every image, unreadable.
fn stripe_of(kv: &Kv) -> Option<Stripe> {
    match decode::<Stripe>(kv) {
        Ok(stripe) => Some(stripe),
        Err(e) => {
            log::warn!("{e}; the image's stripe description is left out");
            None
        }
    }
}
