//! The heartbeat: every peer is pinged on a connection of its own, so a peer busy with one
//! guest's flood still answers at once, and a peer that is cut off or hung is found within
//! [`HEARTBEAT_TIMEOUT`] even when no request of ours would fail on it. An unanswered ping
//! puts the peer on the failure list; an answer of any kind, even a refusal, proves it up and
//! takes it off (unless its lease is gone): the failure list only saves requests a wait on a
//! dead peer, while the copies that missed writes are marked out of sync whatever it says.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Peer, Peers};
use crate::peer::{PeerError, Request};

/// How often each peer is pinged (one ping at a time per peer: none is sent while the last
/// is unanswered). Pings are a 30-byte frame each way: cheap at this rate.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// How long a ping may go unanswered before the peer is failed: as long as a request may
/// take (`peers::REQUEST_TIMEOUT`), so a cut-off peer is failed about when the first
/// request stuck on it times out, and the requests after it skip the peer.
pub const HEARTBEAT_TIMEOUT: Duration = super::REQUEST_TIMEOUT;

/// Starts the heartbeat thread; it ends once `peers` is dropped.
pub(super) fn start(peers: Weak<Peers>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("peer-heartbeat".into())
        .spawn(move || run(&peers))
        .map(drop)
}

fn run(peers: &Weak<Peers>) {
    loop {
        std::thread::sleep(HEARTBEAT_INTERVAL);
        let Some(peers) = peers.upgrade() else {
            return;
        };
        for peer in peers.all() {
            beat(&peer);
        }
    }
}

/// Pings `peer` unless its last ping is still unanswered.
pub(super) fn beat(peer: &Arc<Peer>) {
    if peer.beating.swap(true, Ordering::AcqRel) {
        return;
    }
    let target = peer.clone();
    peer.heartbeat.call_with_timeout(
        Request::Ping,
        HEARTBEAT_TIMEOUT,
        Box::new(move |result| {
            target.beating.store(false, Ordering::Release);
            match result {
                Err(e @ (PeerError::Unavailable(_) | PeerError::Timeout(_))) => {
                    if !target.failures.is_failed(&target.node) {
                        log::warn!("peer {}: heartbeat: {e}", target.node);
                    }
                    target.fail();
                }
                // A wrong key or protocol fails every call as well; those errors are not
                // liveness, and the calls report them.
                Err(PeerError::Auth(_) | PeerError::Protocol(_) | PeerError::BadRequest(_)) => {}
                // Any answer, even a refusal, proves the peer up: a peer failed for a lost
                // connection (it restarted) is tried again at once.
                Ok(_) | Err(PeerError::Refused { .. }) => target.failures.answered(&target.node),
            }
        }),
    );
}
