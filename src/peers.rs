//! This node's view of the other nodes: one pooled client per peer, the push-back on each
//! (`budget`), its heartbeat (`heartbeat`), and the failure list that keeps a dead peer from
//! costing a timeout per request.
//!
//! Liveness is not a request timeout. A call that times out fails that call only (a write's
//! copy is marked out of sync by the acknowledgement rule, a read goes to the next copy): a
//! peer that is slow because one guest floods it is pushed back on, not failed for every
//! image it holds. A peer goes on the failure list when it is plainly down (a connection
//! refused, reset or lost), when its heartbeat goes unanswered, or when its lease in etcd is
//! gone (`daemon/etcd.rs`).

mod budget;
mod heartbeat;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

pub use budget::{IMAGE_IN_FLIGHT_BYTES, PEER_IN_FLIGHT_BYTES};
pub use heartbeat::{HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT};

use crate::config::Config;
use crate::image::{ImageName, NodeId};
use crate::metrics::PeerMetrics;
use crate::peer::{ClusterKey, PeerClient, PeerError, Request, Response};
use crate::replica::failure::FailureList;
use budget::Budget;

/// Connections per peer, shared (pipelined) by every queue and the resync. One beat four on
/// 2-core machines: 4K random reads at QD32 from blocks on a peer, 66k IOPS with one
/// connection against 43k with four (fewer threads to hand each request between).
const POOL: usize = 1;
/// How long a peer may take to answer a call once it is sent. A guest request waits about
/// this long at most when a peer dies or is cut off (the guest's own block-layer timeout is
/// 30 s); by then the heartbeat has put the peer on the failure list and requests skip it
/// at once. A call that waited for room (see `budget`) first may wait that long again.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a control-path call (hold, release, checksums, a resync copy) may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls timed out in a row, with no answer on the data connection between them, that fail
/// a peer even while its heartbeat answers: its disk or data path is hung, and every call
/// to it would cost a whole timeout. A flood does not do this: its own calls keep being
/// answered.
pub const HUNG_AFTER: u32 = 3;

pub type Callback = Box<dyn FnOnce(Result<Response, PeerError>) + Send>;

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

    /// Whether requests of `image` may go on: false while some of its calls wait for room
    /// on a peer (see `budget`), so that its queues stop taking requests (they stay in the
    /// guest's ring) until some of its calls complete. Never blocks.
    fn has_room(&self, _image: &ImageName) -> bool {
        true
    }

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

    fn has_room(&self, image: &ImageName) -> bool {
        Peers::has_room(self, image)
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

    fn has_room(&self, image: &ImageName) -> bool {
        (**self).has_room(image)
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
    /// With etcd, the registry changes as nodes come and go: peers are added (or replaced
    /// when a node's address changes) from the registry, and never removed (a node that left
    /// fails fast through the failure list).
    clients: RwLock<BTreeMap<NodeId, (std::net::SocketAddr, Arc<Peer>)>>,
    failures: Arc<FailureList>,
    /// Calls waiting for room, over every peer (see `budget`).
    waiting: Arc<AtomicUsize>,
}

/// One peer: the clients that reach it, its figures and its push-back.
struct Peer {
    node: NodeId,
    client: PeerClient,
    /// A connection of its own for the heartbeat, which guest traffic cannot queue behind.
    heartbeat: PeerClient,
    /// Set while a heartbeat is unanswered.
    beating: AtomicBool,
    /// Calls that timed out since the last answer on the data connection.
    timeouts: AtomicU32,
    /// Set once `Peers::set` replaced this peer (the node moved): what its calls report
    /// about the node no longer counts.
    replaced: AtomicBool,
    metrics: Arc<PeerMetrics>,
    budget: Budget<Queued>,
    failures: Arc<FailureList>,
}

/// A call on its way: it may wait for room first (see `budget`).
struct Queued {
    request: Request,
    /// The lane it waits in and the bytes it counts there (`None`: a call about no image,
    /// which is not counted).
    lane: Option<(ImageName, usize)>,
    timeout: Duration,
    since: Instant,
    done: Callback,
}

/// The bytes a call moves: its data out, or the data of its answer.
fn cost(request: &Request) -> usize {
    match request {
        Request::Read { len, .. } => *len as usize,
        Request::Write { data, .. } => data.len(),
        Request::Hold { meta_json, .. } => meta_json.len(),
        _ => 0,
    }
}

impl Peers {
    /// No peers yet: they come from etcd's node registry (none for a single-node daemon).
    /// Connections are made on first use. [`Peers::start_heartbeat`] starts watching them.
    pub fn new(config: &Config, key: Option<&ClusterKey>) -> Peers {
        Peers {
            me: config.node.clone(),
            key: key.cloned(),
            encrypt: config.cluster.as_ref().is_some_and(|c| c.encrypt),
            clients: RwLock::new(BTreeMap::new()),
            failures: Arc::new(FailureList::new(config.failure_timeout)),
            waiting: Arc::default(),
        }
    }

    /// Pings every peer from now on, every [`HEARTBEAT_INTERVAL`], on a thread that ends
    /// with the last handle on `self`.
    pub fn start_heartbeat(self: &Arc<Self>) -> std::io::Result<()> {
        heartbeat::start(Arc::downgrade(self))
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
        let client = |pool, timeout| {
            PeerClient::new(self.me.clone(), node.clone(), addr, key.clone(), pool)
                .with_request_timeout(timeout)
                .with_encryption(self.encrypt)
        };
        let peer = Peer {
            node: node.clone(),
            client: client(POOL, REQUEST_TIMEOUT),
            heartbeat: client(1, HEARTBEAT_TIMEOUT),
            beating: AtomicBool::new(false),
            timeouts: AtomicU32::new(0),
            replaced: AtomicBool::new(false),
            metrics: Arc::default(),
            budget: Budget::new(self.waiting.clone()),
            failures: self.failures.clone(),
        };
        log::info!("peer {node} at {addr}");
        if let Some((_, old)) = clients.insert(node.clone(), (addr, Arc::new(peer))) {
            old.replaced.store(true, Relaxed);
        }
    }

    /// `node`'s lease in etcd is gone: it is failed at once, until it registers again.
    pub fn left(&self, node: &NodeId) {
        if node == &self.me {
            return;
        }
        if self.failures.depart(node) {
            log::warn!("peer {node}: its lease in etcd is gone");
        }
        if let Some(peer) = self.peer(node) {
            peer.fail_waiting();
        }
    }

    /// `node` registered (again) in etcd: a lease's absence no longer fails it.
    pub fn joined(&self, node: &NodeId) {
        self.failures.rejoin(node);
    }

    /// The whole node registry, read again after the watch missed events: every node in it
    /// is reachable at its address and registered; every peer not in it has left.
    pub fn registry(&self, nodes: &[crate::meta::records::NodeRecord]) {
        for record in nodes {
            self.set(&record.id, record.addr);
            self.joined(&record.id);
        }
        let known: Vec<NodeId> = self.all().iter().map(|p| p.node.clone()).collect();
        for node in known {
            if !nodes.iter().any(|r| r.id == node) {
                self.left(&node);
            }
        }
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

    fn peer(&self, node: &NodeId) -> Option<Arc<Peer>> {
        self.clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .map(|(_, c)| c.clone())
    }

    fn all(&self) -> Vec<Arc<Peer>> {
        let clients = self.clients.read().unwrap_or_else(|p| p.into_inner());
        clients.values().map(|(_, peer)| peer.clone()).collect()
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
            .map(|(id, (_, c))| (id.clone(), c.metrics.clone()))
            .collect()
    }

    /// See [`Transport::has_room`]: one relaxed load while nothing waits anywhere.
    pub fn has_room(&self, image: &ImageName) -> bool {
        if self.waiting.load(Relaxed) == 0 {
            return true;
        }
        !self.all().iter().any(|peer| peer.budget.has_backlog(image))
    }

    /// Calls `node` unless it is on the failure list. The call may wait for room (see
    /// `budget`) before it is sent; it then has [`REQUEST_TIMEOUT`] for its answer. A peer
    /// that turns out unreachable goes on the failure list; one that does not answer in time
    /// fails that call only (the heartbeat decides whether it is dead).
    pub fn call(&self, node: &NodeId, request: Request, done: Callback) {
        self.call_within(node, request, REQUEST_TIMEOUT, done)
    }

    fn call_within(&self, node: &NodeId, request: Request, timeout: Duration, done: Callback) {
        let Some(peer) = self.peer(node) else {
            return done(Err(PeerError::Unavailable(format!("{node} is not a peer"))));
        };
        if self.failures.is_failed(node) {
            return done(Err(PeerError::Unavailable(format!(
                "{node} is on the failure list"
            ))));
        }
        let lane = request.image().map(|i| (i.name.clone(), cost(&request)));
        let call = Queued {
            request,
            lane,
            timeout,
            since: Instant::now(),
            done,
        };
        let admitted = match call.lane.clone() {
            Some((image, cost)) => peer.budget.admit(&image, cost, call),
            // A call about no image (a ping) is not counted.
            None => Some(call),
        };
        if let Some(call) = admitted {
            peer.send(call);
        }
    }

    /// A blocking call, for the control path: the call may wait for room as long as it may
    /// wait for its answer.
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
        rx.recv_timeout(2 * CONTROL_TIMEOUT + Duration::from_secs(1))
            .unwrap_or(Err(PeerError::Timeout(CONTROL_TIMEOUT)))
    }
}

impl Peer {
    /// Sends a call that has room; one that waited its whole timeout for room fails with
    /// `Timeout` instead (its caller has given up by now), and its room goes to the next.
    fn send(self: &Arc<Self>, call: Queued) {
        let mut calls = VecDeque::from([call]);
        while let Some(call) = calls.pop_front() {
            let Queued {
                request,
                lane,
                timeout,
                since,
                done,
            } = call;
            if since.elapsed() > timeout {
                if let Some((image, cost)) = lane {
                    calls.extend(self.budget.release(&image, cost));
                }
                done(Err(PeerError::Timeout(timeout)));
                continue;
            }
            let (peer, metrics) = (self.clone(), self.metrics.clone());
            metrics.calls.fetch_add(1, Relaxed);
            metrics.in_flight.fetch_add(1, Relaxed);
            let started = Instant::now();
            self.client.call_with_timeout(
                request,
                timeout,
                Box::new(move |result| {
                    metrics.in_flight.fetch_sub(1, Relaxed);
                    metrics.latency.record(started.elapsed());
                    match &result {
                        // Refused, reset or lost: the peer is plainly down.
                        Err(PeerError::Unavailable(_)) => {
                            metrics.errors.fetch_add(1, Relaxed);
                            peer.fail();
                        }
                        // This call only, unless nothing is answered any more.
                        Err(PeerError::Timeout(_)) => {
                            metrics.errors.fetch_add(1, Relaxed);
                            peer.timed_out();
                        }
                        Err(_) => {
                            metrics.errors.fetch_add(1, Relaxed);
                            peer.timeouts.store(0, Relaxed);
                        }
                        Ok(_) => peer.timeouts.store(0, Relaxed),
                    }
                    // Room first, and the calls it lets go sent before the completion runs:
                    // a completion that panics must not keep this call's bytes counted or
                    // strand the calls behind it.
                    if let Some((image, cost)) = lane {
                        for next in peer.budget.release(&image, cost) {
                            peer.send(next);
                        }
                    }
                    done(result);
                }),
            );
        }
    }

    /// Puts the peer on the failure list, and fails the calls waiting for room on it.
    fn fail(&self) {
        if self.replaced.load(Relaxed) {
            return;
        }
        self.failures.fail(&self.node);
        self.fail_waiting();
    }

    /// A call timed out: after [`HUNG_AFTER`] in a row with no answer between, the peer's
    /// data path is hung, and it is failed until its time on the list is up (its heartbeat
    /// does not take it back).
    fn timed_out(&self) {
        let row = self.timeouts.fetch_add(1, Relaxed) + 1;
        if row < HUNG_AFTER || self.replaced.load(Relaxed) {
            return;
        }
        if self.failures.fail_hung(&self.node) {
            log::warn!(
                "peer {}: {row} calls in a row timed out with none answered; failed though \
                 its heartbeat answers",
                self.node
            );
        }
        self.fail_waiting();
    }

    fn fail_waiting(&self) {
        for call in self.budget.drain() {
            let error = format!("{} is on the failure list", self.node);
            (call.done)(Err(PeerError::Unavailable(error)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Tier;
    use crate::peer::{ImageRef, PeerHandler, PeerServer};
    use crate::store::TierDirs;
    use std::sync::mpsc;
    use std::sync::Mutex;

    const KEY: &[u8] = b"f00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeed\n";

    /// A peer whose reads and pings take as long as the test says.
    #[derive(Default)]
    struct Slow {
        read: Mutex<Duration>,
        ping: Mutex<Duration>,
        /// While set, reads wait (up to [`WAIT`]) until it is cleared.
        held: Mutex<bool>,
        release: std::sync::Condvar,
    }

    impl Slow {
        fn hold(&self, held: bool) {
            *self.held.lock().unwrap() = held;
            self.release.notify_all();
        }
    }

    impl PeerHandler for Slow {
        fn handle(&self, _: &NodeId, request: Request) -> Response {
            match request {
                Request::Read { len, .. } => {
                    let held = self.held.lock().unwrap();
                    drop(self.release.wait_timeout_while(held, WAIT, |h| *h).unwrap());
                    std::thread::sleep(*self.read.lock().unwrap());
                    Response::Data(vec![0; len as usize])
                }
                Request::Ping => {
                    std::thread::sleep(*self.ping.lock().unwrap());
                    Response::Ok
                }
                _ => Response::Ok,
            }
        }
    }

    fn node(id: &str) -> NodeId {
        id.parse().unwrap()
    }

    /// Node a's peers, with b served by `slow` on loopback.
    fn setup(slow: &Arc<Slow>) -> (Arc<Peers>, PeerServer) {
        let key = ClusterKey::from_bytes(KEY).unwrap();
        let handler: Arc<dyn PeerHandler> = slow.clone();
        let server = PeerServer::start(
            "127.0.0.1:0".parse().unwrap(),
            key.clone(),
            node("b"),
            handler,
        )
        .unwrap();
        let config = Config {
            run_dir: "/nonexistent".into(),
            dirs: TierDirs {
                ram: "/nonexistent".into(),
                volume: "/nonexistent".into(),
            },
            node: node("a"),
            use_uring: false,
            cluster: None,
            failure_timeout: Duration::from_secs(60),
            metrics_listen: None,
            socket_access: None,
            cache_budgets: Default::default(),
            tiering: Default::default(),
        };
        let peers = Arc::new(Peers::new(&config, Some(&key)));
        peers.set(&node("b"), server.local_addr());
        (peers, server)
    }

    fn read(image: &str, len: u32) -> Request {
        Request::Read {
            image: ImageRef::new(image.parse().unwrap(), 1),
            tier: Tier::Ram,
            block: 0,
            offset: 0,
            len,
        }
    }

    fn call(
        peers: &Peers,
        request: Request,
        timeout: Duration,
    ) -> mpsc::Receiver<Result<Response, PeerError>> {
        let (tx, rx) = mpsc::channel();
        let done = Box::new(move |result| {
            let _ = tx.send(result);
        });
        peers.call_within(&node("b"), request, timeout, done);
        rx
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn a_timeout_fails_the_call_not_the_peer_and_a_refusal_fails_the_peer() {
        let slow = Arc::new(Slow::default());
        *slow.read.lock().unwrap() = Duration::from_millis(500);
        let (peers, server) = setup(&slow);
        let late = call(&peers, read("x", 4096), Duration::from_millis(100));
        assert!(matches!(
            late.recv_timeout(WAIT).unwrap(),
            Err(PeerError::Timeout(_))
        ));
        assert!(
            !peers.is_failed(&node("b")),
            "a slow answer is not a dead peer"
        );
        *slow.read.lock().unwrap() = Duration::ZERO;
        let fine = call(&peers, read("x", 4096), REQUEST_TIMEOUT);
        assert!(matches!(
            fine.recv_timeout(WAIT).unwrap(),
            Ok(Response::Data(_))
        ));

        server.stop();
        let refused = call(&peers, read("x", 4096), REQUEST_TIMEOUT);
        let error = refused.recv_timeout(WAIT).unwrap().unwrap_err();
        assert!(matches!(error, PeerError::Unavailable(_)), "{error}");
        assert!(
            peers.is_failed(&node("b")),
            "a peer that is plainly down is failed"
        );
    }

    #[test]
    fn calls_that_all_time_out_fail_the_peer_though_its_heartbeat_answers() {
        let slow = Arc::new(Slow::default());
        *slow.read.lock().unwrap() = Duration::from_millis(1500);
        let (peers, _server) = setup(&slow);
        let late: Vec<_> = (0..HUNG_AFTER)
            .map(|_| call(&peers, read("x", 4096), Duration::from_millis(100)))
            .collect();
        for answer in late {
            assert!(matches!(
                answer.recv_timeout(WAIT).unwrap(),
                Err(PeerError::Timeout(_))
            ));
        }
        assert!(
            peers.is_failed(&node("b")),
            "a hung data path fails the peer"
        );
        peers.failures().answered(&node("b"));
        assert!(
            peers.is_failed(&node("b")),
            "an answered heartbeat does not take a hung peer back"
        );
    }

    #[test]
    fn the_heartbeat_fails_a_peer_that_does_not_answer_and_takes_it_back_when_it_does() {
        let slow = Arc::new(Slow::default());
        *slow.ping.lock().unwrap() = HEARTBEAT_TIMEOUT + Duration::from_secs(1);
        let (peers, _server) = setup(&slow);
        let b = peers.peer(&node("b")).unwrap();
        heartbeat::beat(&b);
        let deadline = Instant::now() + HEARTBEAT_TIMEOUT + Duration::from_secs(2);
        while !peers.is_failed(&node("b")) {
            assert!(
                Instant::now() < deadline,
                "an unanswered heartbeat fails the peer"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        *slow.ping.lock().unwrap() = Duration::ZERO;
        // The late ping's answer is on its way; the next one is sent once it is in.
        let deadline = Instant::now() + WAIT;
        while peers.is_failed(&node("b")) {
            assert!(
                Instant::now() < deadline,
                "an answered heartbeat takes the peer back"
            );
            heartbeat::beat(&b);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_flood_waits_in_its_own_lane_and_a_lost_lease_fails_it_at_once() {
        let slow = Arc::new(Slow::default());
        // Nothing x sent is answered before b's lease is gone.
        slow.hold(true);
        let (peers, _server) = setup(&slow);
        let chunk = crate::peer::MAX_CHUNK;
        let (x, y): (ImageName, ImageName) = ("x".parse().unwrap(), "y".parse().unwrap());
        let flood: Vec<_> = (0..IMAGE_IN_FLIGHT_BYTES / chunk as usize + 2)
            .map(|_| call(&peers, read("x", chunk), REQUEST_TIMEOUT))
            .collect();
        assert!(!peers.has_room(&x), "x's calls past its bound wait");
        assert!(peers.has_room(&y));
        let other = call(&peers, read("y", 4096), REQUEST_TIMEOUT);
        peers.left(&node("b"));
        assert!(peers.is_failed(&node("b")));
        assert!(
            peers.has_room(&x),
            "the calls that waited are failed at once"
        );
        slow.hold(false);
        let outcomes: Vec<_> = flood
            .iter()
            .map(|rx| rx.recv_timeout(WAIT).unwrap())
            .collect();
        let sent = outcomes.iter().filter(|r| r.is_ok()).count();
        assert_eq!(
            sent,
            IMAGE_IN_FLIGHT_BYTES / chunk as usize,
            "those in flight are answered"
        );
        assert!(outcomes
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, PeerError::Unavailable(_))));
        let answer = other.recv_timeout(WAIT).unwrap();
        assert!(
            matches!(answer, Ok(Response::Data(_))),
            "y's call was sent, not held behind x's"
        );
        let refused = call(&peers, read("y", 4096), REQUEST_TIMEOUT);
        assert!(
            refused.recv_timeout(WAIT).unwrap().is_err(),
            "a departed peer is not called"
        );
        peers.joined(&node("b"));
        assert!(!peers.is_failed(&node("b")), "registered again");
    }
}
