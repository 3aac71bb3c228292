//! This node's view of the other nodes: one pooled client per peer and the failure list that
//! keeps a dead peer from costing a timeout per request.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::image::NodeId;
use crate::metrics::PeerMetrics;
use crate::peer::{ClusterKey, PeerClient, PeerError, Request, Response};
use crate::replica::failure::FailureList;

/// Connections per peer, shared (pipelined) by every queue and the resync. One beat four on
/// 2-core machines: 4K random reads at QD32 from blocks on a peer, 66k IOPS with one
/// connection against 43k with four (fewer threads to hand each request between).
const POOL: usize = 1;
/// How long a peer may take to answer before it counts as failed. A guest request waits
/// this long at most when a peer dies or is cut off (the guest's own block-layer timeout is
/// 30 s); after that the peer is on the failure list and requests skip it at once.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a control-path call (hold, release, checksums, a resync copy) may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

pub type Callback = Box<dyn FnOnce(Result<Response, PeerError>) + Send>;

type Client = (PeerClient, Arc<PeerMetrics>);

/// How the request path (`route::Queue` and its remote engine) reaches other nodes: the
/// pooled TCP clients of [`Peers`] in the daemon; an in-process network in the simulation
/// (`tests/owner_sim.rs`), which delivers, delays, loses or fails each call as its seed says.
/// One dynamic call per peer call, never on the local path.
pub trait Transport: Send + Sync {
    /// Calls `node`; `done` gets the answer, or why there is none (possibly on another
    /// thread, possibly before this returns).
    fn call(&self, node: &NodeId, request: Request, done: Callback);
    /// Whether `node` is on the failure list: writes skip its copies (the acknowledgement
    /// rule marks them out of sync) and reads another copy.
    fn is_failed(&self, node: &NodeId) -> bool;

    /// A blocking call, for the control path (resync, fills): the answer, or why none came
    /// within [`CONTROL_TIMEOUT`].
    fn call_wait(&self, node: &NodeId, request: Request) -> Result<Response, PeerError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.call(
            node,
            request,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.recv_timeout(CONTROL_TIMEOUT + Duration::from_secs(1))
            .unwrap_or(Err(PeerError::Timeout(CONTROL_TIMEOUT)))
    }
}

impl Transport for Peers {
    fn call(&self, node: &NodeId, request: Request, done: Callback) {
        Peers::call(self, node, request, done)
    }

    fn is_failed(&self, node: &NodeId) -> bool {
        self.failures.is_failed(node)
    }

    /// With the control path's own timeout on the call itself.
    fn call_wait(&self, node: &NodeId, request: Request) -> Result<Response, PeerError> {
        Peers::call_wait(self, node, request)
    }
}

/// The daemon hands its peers around as `Arc<Peers>`: those are transports too.
impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn call(&self, node: &NodeId, request: Request, done: Callback) {
        (**self).call(node, request, done)
    }

    fn is_failed(&self, node: &NodeId) -> bool {
        (**self).is_failed(node)
    }

    fn call_wait(&self, node: &NodeId, request: Request) -> Result<Response, PeerError> {
        (**self).call_wait(node, request)
    }
}

pub struct Peers {
    me: NodeId,
    key: Option<ClusterKey>,
    /// `--peer-encrypt`.
    encrypt: bool,
    /// With etcd, the registry changes as nodes come and go: clients are added (or replaced
    /// when a node's address changes) from the registry, and never removed (a node that left
    /// fails fast through the failure list).
    clients: RwLock<BTreeMap<NodeId, (std::net::SocketAddr, Arc<Client>)>>,
    failures: Arc<FailureList>,
}

impl Peers {
    /// No peers yet: they come from etcd's node registry (none for a single-node daemon).
    /// Connections are made on first use.
    pub fn new(config: &Config, key: Option<&ClusterKey>) -> Peers {
        Peers {
            me: config.node.clone(),
            key: key.cloned(),
            encrypt: config.cluster.as_ref().is_some_and(|c| c.encrypt),
            clients: RwLock::new(BTreeMap::new()),
            failures: Arc::new(FailureList::new(config.failure_timeout)),
        }
    }

    /// Reaches `node` at `addr` from now on (a new client when the address changed).
    pub fn set(&self, node: &NodeId, addr: std::net::SocketAddr) {
        let Some(key) = &self.key else { return };
        if node == &self.me {
            return;
        }
        let mut clients = self.clients.write().unwrap_or_else(|p| p.into_inner());
        if clients.get(node).is_some_and(|(a, _)| *a == addr) {
            return;
        }
        let client = PeerClient::new(self.me.clone(), node.clone(), addr, key.clone(), POOL)
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_encryption(self.encrypt);
        log::info!("peer {node} at {addr}");
        clients.insert(node.clone(), (addr, Arc::new((client, Arc::default()))));
    }

    /// Whether `node` is this node or a peer this node can call.
    pub fn knows(&self, node: &NodeId) -> bool {
        node == &self.me
            || self
                .clients
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(node)
    }

    fn client(&self, node: &NodeId) -> Option<Arc<Client>> {
        self.clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .map(|(_, c)| c.clone())
    }

    pub fn failures(&self) -> &Arc<FailureList> {
        &self.failures
    }

    /// Each peer's call metrics.
    pub fn metrics(&self) -> Vec<(NodeId, Arc<PeerMetrics>)> {
        self.clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, (_, c))| (id.clone(), c.1.clone()))
            .collect()
    }

    /// Calls `node` unless it is on the failure list; a peer that turns out unreachable goes
    /// on it.
    pub fn call(&self, node: &NodeId, request: Request, done: Callback) {
        self.call_within(node, request, REQUEST_TIMEOUT, done)
    }

    fn call_within(&self, node: &NodeId, request: Request, timeout: Duration, done: Callback) {
        let Some(entry) = self.client(node) else {
            return done(Err(PeerError::Unavailable(format!("{node} is not a peer"))));
        };
        let (client, metrics) = (&entry.0, &entry.1);
        if self.failures.is_failed(node) {
            return done(Err(PeerError::Unavailable(format!(
                "{node} is on the failure list"
            ))));
        }
        let (failures, node, metrics) = (self.failures.clone(), node.clone(), metrics.clone());
        metrics.calls.fetch_add(1, Relaxed);
        metrics.in_flight.fetch_add(1, Relaxed);
        let started = Instant::now();
        client.call_with_timeout(
            request,
            timeout,
            Box::new(move |result| {
                metrics.in_flight.fetch_sub(1, Relaxed);
                metrics.latency.record(started.elapsed());
                if let Err(e) = &result {
                    metrics.errors.fetch_add(1, Relaxed);
                    if e.is_unreachable() {
                        failures.fail(&node);
                    }
                }
                done(result)
            }),
        );
    }

    /// A blocking call, for the control path.
    pub fn call_wait(&self, node: &NodeId, request: Request) -> Result<Response, PeerError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.call_within(
            node,
            request,
            CONTROL_TIMEOUT,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.recv_timeout(CONTROL_TIMEOUT + Duration::from_secs(1))
            .unwrap_or(Err(PeerError::Timeout(CONTROL_TIMEOUT)))
    }
}
