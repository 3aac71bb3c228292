//! The node's etcd lease, and for how long this node may still act on what it owns.
//!
//! The node's registration and its `active` keys live under one lease. A keeper thread renews
//! it every third of its TTL. Each renewal that etcd confirms makes the lease good until the
//! moment the renewal was *sent* plus the TTL, less a margin: etcd counts from when it received
//! the renewal, later than we sent it, so this node always stops acting on its lease before
//! etcd can expire it and let another node take its images over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::etcd::{Etcd, EtcdError, LeaseId};

/// What the node may do with its lease right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Renewed recently enough: act on it.
    Valid,
    /// Not renewed in time (etcd unreachable); it may yet be renewed.
    Doubtful,
    /// etcd said it is gone; a new lease replaced it (ownership must be won again).
    Lost,
}

struct State {
    id: LeaseId,
    good_until: Instant,
    /// Bumped each time the lease is replaced by a new one.
    generation: u64,
}

pub struct NodeLease {
    etcd: Etcd,
    ttl: Duration,
    state: Mutex<State>,
    changed: Condvar,
    /// `good_until` as nanoseconds after `base`, read without the lock on every request.
    base: Instant,
    good_until_ns: AtomicU64,
    /// `State::generation`, likewise.
    generation: AtomicU64,
}

impl NodeLease {
    /// Grants a new lease of `ttl`.
    pub fn grant(etcd: Etcd, ttl: Duration) -> Result<NodeLease, EtcdError> {
        let sent = Instant::now();
        let id = etcd.lease_grant(ttl.as_secs() as i64)?;
        let lease = NodeLease {
            etcd,
            ttl,
            state: Mutex::new(State {
                id,
                good_until: sent,
                generation: 0,
            }),
            changed: Condvar::new(),
            base: sent,
            good_until_ns: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        };
        lease.extend(sent, ttl.as_secs() as i64);
        Ok(lease)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> LeaseId {
        self.lock().id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The lease's generation: it changes when the lease is replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The margin kept before etcd could expire the lease: a fifth of the TTL, at least one
    /// second (a renewal's round trip plus clock rate differences fit well inside it).
    fn margin(&self) -> Duration {
        (self.ttl / 5).max(Duration::from_secs(1))
    }

    fn extend(&self, sent: Instant, ttl_secs: i64) {
        let ttl = Duration::from_secs(ttl_secs.max(0) as u64).min(self.ttl);
        let until = (sent + ttl).checked_sub(self.margin()).unwrap_or(sent);
        let mut state = self.lock();
        if until > state.good_until {
            state.good_until = until;
        }
        self.publish(&state);
        drop(state);
        self.changed.notify_all();
    }

    fn publish(&self, state: &State) {
        let ns = state
            .good_until
            .saturating_duration_since(self.base)
            .as_nanos() as u64;
        self.good_until_ns.store(ns, Ordering::Release);
    }

    /// Whether the lease is surely valid now: one atomic load and a clock read, cheap
    /// enough for every request.
    pub fn is_valid(&self) -> bool {
        let now = Instant::now()
            .saturating_duration_since(self.base)
            .as_nanos() as u64;
        now < self.good_until_ns.load(Ordering::Acquire)
    }

    /// Waits until the lease is valid again or `timeout` passes; true when valid.
    pub fn wait_valid(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            if now < state.good_until {
                return true;
            }
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Renews once. `Lost` means etcd no longer has the lease: the caller replaces it with
    /// [`NodeLease::replace`].
    pub fn renew(&self) -> Standing {
        let id = self.id();
        let sent = Instant::now();
        match self.etcd.lease_keepalive(id) {
            Ok(ttl) if ttl > 0 => {
                self.extend(sent, ttl);
                Standing::Valid
            }
            Ok(_) | Err(EtcdError::Status { .. }) => Standing::Lost,
            Err(e) => {
                log::warn!("cannot renew the node's etcd lease: {e}");
                if self.is_valid() {
                    Standing::Valid
                } else {
                    Standing::Doubtful
                }
            }
        }
    }

    /// Grants a new lease in place of a lost one.
    pub fn replace(&self) -> Result<LeaseId, EtcdError> {
        let sent = Instant::now();
        let id = self.etcd.lease_grant(self.ttl.as_secs() as i64)?;
        {
            let mut state = self.lock();
            state.id = id;
            state.generation += 1;
            state.good_until = sent;
            self.generation.store(state.generation, Ordering::Release);
            self.publish(&state);
        }
        self.extend(sent, self.ttl.as_secs() as i64);
        Ok(id)
    }

    /// How often the keeper renews.
    pub fn renew_every(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(300))
    }
}
