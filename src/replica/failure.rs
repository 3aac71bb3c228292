//! The failure list: a peer that failed is not tried again until its entry expires, so a dead
//! node costs one timeout, not one per request. A peer whose lease in etcd is gone stays on it
//! until it registers again.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::image::NodeId;

/// Time as the failure list sees it, so tests and the simulation can drive it.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

pub struct FailureList<C: Clock = SystemClock> {
    clock: C,
    ttl: Duration,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    until: HashMap<NodeId, Instant>,
    /// Nodes whose lease is gone: failed without a time limit.
    departed: HashSet<NodeId>,
    /// Nodes failed because calls go unanswered while their heartbeat answers (a hung disk
    /// or data path): the heartbeat does not take them back, their time limit does.
    hung: HashSet<NodeId>,
}

impl FailureList<SystemClock> {
    pub fn new(ttl: Duration) -> Self {
        Self::with_clock(ttl, SystemClock)
    }
}

impl<C: Clock> FailureList<C> {
    pub fn with_clock(ttl: Duration, clock: C) -> Self {
        FailureList {
            clock,
            ttl,
            entries: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `node` on the list for the set time; returns true when it was not on it already.
    pub fn fail(&self, node: &NodeId) -> bool {
        let now = self.clock.now();
        let mut entries = self.lock();
        let fresh = entries.until.get(node).is_none_or(|&t| t <= now);
        entries.until.insert(node.clone(), now + self.ttl);
        entries.hung.remove(node);
        if fresh {
            log::warn!("peer {node}: failed; not tried again for {:?}", self.ttl);
        }
        fresh
    }

    /// Puts `node` on the list for the set time, and keeps it there even while it answers
    /// its heartbeat: its calls go unanswered though it is up. Returns true when it was not
    /// on the list already.
    pub fn fail_hung(&self, node: &NodeId) -> bool {
        let fresh = self.fail(node);
        self.lock().hung.insert(node.clone());
        fresh
    }

    pub fn is_failed(&self, node: &NodeId) -> bool {
        let entries = self.lock();
        entries
            .until
            .get(node)
            .is_some_and(|&t| t > self.clock.now())
            || (!entries.departed.is_empty() && entries.departed.contains(node))
    }

    /// Puts `node` on the list until [`FailureList::rejoin`] (its lease is gone); returns
    /// true when it was not there for that already.
    pub fn depart(&self, node: &NodeId) -> bool {
        self.lock().departed.insert(node.clone())
    }

    /// `node` has a lease again: only a timed entry keeps it on the list.
    pub fn rejoin(&self, node: &NodeId) {
        if self.lock().departed.remove(node) {
            log::info!("peer {node}: registered again");
        }
    }

    /// `node` answered its heartbeat: a timed entry is dropped (the node is tried again at
    /// once), unless it was failed as hung; a departed node stays until it registers again.
    pub fn answered(&self, node: &NodeId) {
        let now = self.clock.now();
        let mut entries = self.lock();
        let until = entries.until.get(node).copied();
        if entries.hung.contains(node) {
            if until.is_some_and(|t| t > now) {
                return;
            }
            entries.hung.remove(node);
        }
        let listed = entries.until.remove(node).is_some_and(|t| t > now);
        if listed && !entries.departed.contains(node) {
            log::info!("peer {node}: answers its heartbeat again; back");
        }
    }

    /// Takes `node` off the list (it answered again).
    pub fn recover(&self, node: &NodeId) {
        let mut entries = self.lock();
        let timed = entries.until.remove(node).is_some();
        entries.hung.remove(node);
        if entries.departed.remove(node) || timed {
            log::info!("peer {node}: back");
        }
    }

    /// Nodes on the list now, for `stats` and `image info`.
    pub fn failed(&self) -> Vec<NodeId> {
        let now = self.clock.now();
        let entries = self.lock();
        let timed = entries.until.iter().filter(|(_, &t)| t > now);
        let mut nodes: Vec<NodeId> = timed
            .map(|(n, _)| n)
            .chain(&entries.departed)
            .cloned()
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone)]
    struct FakeClock(Arc<Mutex<Instant>>);

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    #[test]
    fn entries_expire() {
        let clock = FakeClock(Arc::new(Mutex::new(Instant::now())));
        let list = FailureList::with_clock(Duration::from_secs(60), clock.clone());
        let b: NodeId = "b".parse().unwrap();
        assert!(!list.is_failed(&b));
        assert!(list.fail(&b));
        assert!(!list.fail(&b), "already listed");
        assert!(list.is_failed(&b));
        *clock.0.lock().unwrap() += Duration::from_secs(61);
        assert!(!list.is_failed(&b));
        assert!(list.failed().is_empty());
        list.fail(&b);
        list.recover(&b);
        assert!(!list.is_failed(&b));
    }

    #[test]
    fn a_departed_node_stays_until_it_rejoins() {
        let clock = FakeClock(Arc::new(Mutex::new(Instant::now())));
        let list = FailureList::with_clock(Duration::from_secs(60), clock.clone());
        let b: NodeId = "b".parse().unwrap();
        assert!(list.depart(&b));
        assert!(!list.depart(&b), "already departed");
        *clock.0.lock().unwrap() += Duration::from_secs(3600);
        assert!(list.is_failed(&b));
        assert_eq!(list.failed(), vec![b.clone()]);
        list.fail(&b);
        assert_eq!(list.failed(), vec![b.clone()], "listed once");
        list.answered(&b);
        assert!(
            list.is_failed(&b),
            "an answer does not bring back a departed node"
        );
        list.fail(&b);
        list.rejoin(&b);
        assert!(list.is_failed(&b), "the timed entry is still due");
        list.answered(&b);
        assert!(!list.is_failed(&b));
    }

    #[test]
    fn a_hung_node_stays_failed_while_it_answers_its_heartbeat() {
        let clock = FakeClock(Arc::new(Mutex::new(Instant::now())));
        let list = FailureList::with_clock(Duration::from_secs(60), clock.clone());
        let b: NodeId = "b".parse().unwrap();
        assert!(list.fail_hung(&b));
        list.answered(&b);
        assert!(list.is_failed(&b), "its calls still go unanswered");
        *clock.0.lock().unwrap() += Duration::from_secs(61);
        assert!(!list.is_failed(&b), "its time limit takes it back");
        // A later plain failure is cleared by an answer again.
        list.fail(&b);
        list.answered(&b);
        assert!(!list.is_failed(&b));
        list.fail_hung(&b);
        list.recover(&b);
        assert!(!list.is_failed(&b));
    }
}
