//! This node's view of the other nodes: one pooled client per peer and the failure list that
//! keeps a dead peer from costing a timeout per request.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
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

pub struct Peers {
    clients: BTreeMap<NodeId, (PeerClient, Arc<PeerMetrics>)>,
    failures: Arc<FailureList>,
}

impl Peers {
    /// Clients for every configured peer (none for a single-node daemon). Connections are
    /// made on first use.
    pub fn new(config: &Config, key: Option<&ClusterKey>) -> Peers {
        let mut clients = BTreeMap::new();
        if let (Some(cluster), Some(key)) = (&config.cluster, key) {
            for (id, addr) in &cluster.peers {
                let client =
                    PeerClient::new(config.node.clone(), id.clone(), *addr, key.clone(), POOL)
                        .with_request_timeout(REQUEST_TIMEOUT);
                clients.insert(id.clone(), (client, Arc::default()));
            }
        }
        Peers {
            clients,
            failures: Arc::new(FailureList::new(config.failure_timeout)),
        }
    }

    pub fn failures(&self) -> &Arc<FailureList> {
        &self.failures
    }

    /// Each peer's call metrics.
    pub fn metrics(&self) -> impl Iterator<Item = (&NodeId, &PeerMetrics)> {
        self.clients.iter().map(|(id, (_, m))| (id, m.as_ref()))
    }

    /// Calls `node` unless it is on the failure list; a peer that turns out unreachable goes
    /// on it.
    pub fn call(&self, node: &NodeId, request: Request, done: Callback) {
        self.call_within(node, request, REQUEST_TIMEOUT, done)
    }

    fn call_within(&self, node: &NodeId, request: Request, timeout: Duration, done: Callback) {
        let Some((client, metrics)) = self.clients.get(node) else {
            return done(Err(PeerError::Unavailable(format!("{node} is not a peer"))));
        };
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

    /// Like `call_wait`, expecting a plain `Ok`.
    pub fn call_ok(&self, node: &NodeId, request: Request) -> Result<(), String> {
        match self.call_wait(node, request) {
            Ok(Response::Ok) => Ok(()),
            Ok(other) => Err(format!("{node} answered {other:?}")),
            Err(e) => Err(format!("{node}: {e}")),
        }
    }
}
