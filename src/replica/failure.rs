//! The failure list: a peer that failed is not tried again until its entry expires, so a dead
//! node costs one timeout, not one per request.

use std::collections::HashMap;
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
    until: Mutex<HashMap<NodeId, Instant>>,
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
            until: Mutex::new(HashMap::new()),
        }
    }

    /// Puts `node` on the list for the set time; returns true when it was not on it already.
    pub fn fail(&self, node: &NodeId) -> bool {
        let until = self.clock.now() + self.ttl;
        let mut map = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = map.get(node).is_none_or(|&t| t <= self.clock.now());
        map.insert(node.clone(), until);
        if fresh {
            log::warn!("peer {node}: failed; not tried again for {:?}", self.ttl);
        }
        fresh
    }

    pub fn is_failed(&self, node: &NodeId) -> bool {
        let map = self.until.lock().unwrap_or_else(|p| p.into_inner());
        map.get(node).is_some_and(|&t| t > self.clock.now())
    }

    /// Takes `node` off the list (it answered again).
    pub fn recover(&self, node: &NodeId) {
        let mut map = self.until.lock().unwrap_or_else(|p| p.into_inner());
        if map.remove(node).is_some() {
            log::info!("peer {node}: back");
        }
    }

    /// Nodes on the list now, for `stats` and `image info`.
    pub fn failed(&self) -> Vec<NodeId> {
        let now = self.clock.now();
        let map = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let mut nodes: Vec<NodeId> = map
            .iter()
            .filter(|(_, &t)| t > now)
            .map(|(n, _)| n.clone())
            .collect();
        nodes.sort();
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
}
