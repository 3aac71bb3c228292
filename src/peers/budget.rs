//! Push-back on one peer: bounded bytes in flight to the peer, and per image to it. A call
//! that does not fit waits in its image's lane, not on the peer's connection, so one image
//! flooding a slow peer delays its own calls and not another image's: a small call of
//! another image waits behind at most [`IMAGE_IN_FLIGHT_BYTES`] of the flood's bytes (per
//! flooding image) instead of everything the connection has queued. Lanes take turns.
//!
//! Nothing here blocks: a call that does not fit is kept and handed back by a later
//! [`Budget::release`], on whichever thread completes the call that made room.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::image::ImageName;

/// Bytes in flight to one peer (calls sent and not yet answered or timed out), over every
/// image. A small call waits behind at most this much on the peer's connection: 13 ms of a
/// 10 Gb/s link, 130 ms of 1 Gb/s; and it keeps the peer's own bound (32 MiB per connection
/// in `peer::server`) from ever pushing back on us through TCP.
pub const PEER_IN_FLIGHT_BYTES: usize = 16 << 20;

/// Bytes in flight per image to one peer: four 1 MiB chunks. Far above a LAN's
/// bandwidth-delay product (a 25 Gb/s link with 100 us round trips holds 300 KiB), so one
/// image's stream is not slowed by it; a quarter of the peer's bound, so three images
/// flooding the same peer still leave room for a fourth's calls to go at once.
pub const IMAGE_IN_FLIGHT_BYTES: usize = 4 << 20;

/// What a call costs at least: its frame, the peer's work and its answer are not free even
/// when it carries no data. It also bounds the calls in flight: 64 per image and 256 per
/// peer, so a flood of small calls cannot queue thousands of operations on the peer ahead
/// of another image's call (the peer runs a few at a time per connection).
pub const MIN_CALL_BYTES: usize = 64 << 10;

/// One peer's budget; `T` is a call waiting to be sent.
pub struct Budget<T> {
    peer_limit: usize,
    image_limit: usize,
    state: Mutex<State<T>>,
    /// Calls waiting, over every budget sharing it (a daemon's peers): zero, the common
    /// case, answers [`Budget::has_backlog`] without a lock.
    waiting: Arc<AtomicUsize>,
}

struct State<T> {
    in_flight: usize,
    lanes: HashMap<ImageName, Lane<T>>,
    /// Images with calls waiting, in the order they get their next turn.
    turns: VecDeque<ImageName>,
}

struct Lane<T> {
    in_flight: usize,
    waiting: VecDeque<(usize, T)>,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Lane {
            in_flight: 0,
            waiting: VecDeque::new(),
        }
    }
}

/// A call of `cost` fits beside `in_flight` bytes under `limit`; a call alone always fits
/// (a call bigger than the limit must still go).
fn fits(in_flight: usize, cost: usize, limit: usize) -> bool {
    in_flight == 0 || in_flight.saturating_add(cost) <= limit
}

impl<T> Budget<T> {
    /// The daemon's budget for one peer; `waiting` is shared by all its peers' budgets.
    pub fn new(waiting: Arc<AtomicUsize>) -> Self {
        Budget::with_limits(PEER_IN_FLIGHT_BYTES, IMAGE_IN_FLIGHT_BYTES, waiting)
    }

    pub fn with_limits(peer_limit: usize, image_limit: usize, waiting: Arc<AtomicUsize>) -> Self {
        Budget {
            peer_limit,
            image_limit,
            state: Mutex::new(State {
                in_flight: 0,
                lanes: HashMap::new(),
                turns: VecDeque::new(),
            }),
            waiting,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A call of `cost` bytes for `image`: handed back to be sent now, or kept (`None`)
    /// until [`Budget::release`] makes room for it, behind the image's earlier calls.
    pub fn admit(&self, image: &ImageName, cost: usize, call: T) -> Option<T> {
        let cost = cost.max(MIN_CALL_BYTES);
        let mut state = self.lock();
        let (lane_in_flight, lane_waits) = state.lanes.get(image).map_or((0, false), |lane| {
            (lane.in_flight, !lane.waiting.is_empty())
        });
        if !lane_waits
            && !self.peer_wanted(&state)
            && fits(state.in_flight, cost, self.peer_limit)
            && fits(lane_in_flight, cost, self.image_limit)
        {
            state.in_flight += cost;
            match state.lanes.get_mut(image) {
                Some(lane) => lane.in_flight += cost,
                None => {
                    let lane = Lane {
                        in_flight: cost,
                        waiting: VecDeque::new(),
                    };
                    state.lanes.insert(image.clone(), lane);
                }
            }
            return Some(call);
        }
        let lane = state.lanes.entry(image.clone()).or_default();
        lane.waiting.push_back((cost, call));
        if lane.waiting.len() == 1 {
            state.turns.push_back(image.clone());
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Whether some image's next call waits for room on the peer (not for its own bound):
    /// a new call of another image then waits its turn too, so that a stream of small calls
    /// cannot keep taking the room a bigger waiting call needs.
    fn peer_wanted(&self, state: &State<T>) -> bool {
        state.turns.iter().any(|image| {
            state.lanes.get(image).is_some_and(|lane| {
                lane.waiting
                    .front()
                    .is_some_and(|&(cost, _)| fits(lane.in_flight, cost, self.image_limit))
            })
        })
    }

    /// A call of `cost` bytes for `image` that was sent has ended (answered, failed or timed
    /// out): the calls that fit now, to be sent by the caller.
    pub fn release(&self, image: &ImageName, cost: usize) -> Vec<T> {
        let cost = cost.max(MIN_CALL_BYTES);
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(cost);
        if let Some(lane) = state.lanes.get_mut(image) {
            lane.in_flight = lane.in_flight.saturating_sub(cost);
            if lane.in_flight == 0 && lane.waiting.is_empty() {
                state.lanes.remove(image);
            }
        }
        self.next_turns(&mut state)
    }

    /// Hands out waiting calls that fit, one per lane per turn, until none does.
    fn next_turns(&self, state: &mut State<T>) -> Vec<T> {
        let mut out = Vec::new();
        let mut passed = 0;
        while passed < state.turns.len() {
            let Some(image) = state.turns.pop_front() else {
                break;
            };
            let peer_in_flight = state.in_flight;
            let Some(lane) = state.lanes.get_mut(&image) else {
                continue;
            };
            let Some(&(cost, _)) = lane.waiting.front() else {
                continue;
            };
            let go = fits(peer_in_flight, cost, self.peer_limit)
                && fits(lane.in_flight, cost, self.image_limit);
            if !go {
                passed += 1;
            } else if let Some((cost, call)) = lane.waiting.pop_front() {
                lane.in_flight += cost;
                state.in_flight += cost;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                out.push(call);
                passed = 0;
            }
            if !lane.waiting.is_empty() {
                state.turns.push_back(image);
            }
        }
        out
    }

    /// Takes every waiting call (the peer failed: they are failed, not sent).
    pub fn drain(&self) -> Vec<T> {
        let mut state = self.lock();
        state.turns.clear();
        let mut out = Vec::new();
        for lane in state.lanes.values_mut() {
            out.extend(lane.waiting.drain(..).map(|(_, call)| call));
        }
        state.lanes.retain(|_, lane| lane.in_flight > 0);
        self.waiting.fetch_sub(out.len(), Ordering::Relaxed);
        out
    }

    /// Whether calls of `image` wait for room on this peer.
    pub fn has_backlog(&self, image: &ImageName) -> bool {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.lock()
            .lanes
            .get(image)
            .is_some_and(|lane| !lane.waiting.is_empty())
    }

    /// Bytes in flight to the peer now.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ImageName {
        s.parse().unwrap()
    }

    const MIB: usize = 1 << 20;

    fn budget() -> Budget<u32> {
        Budget::with_limits(4 * MIB, 2 * MIB, Arc::default())
    }

    #[test]
    fn a_flooding_image_waits_in_its_own_lane() {
        let b = budget();
        let (x, y) = (name("x"), name("y"));
        assert_eq!(b.admit(&x, MIB, 1), Some(1));
        assert_eq!(b.admit(&x, MIB, 2), Some(2));
        // x's third chunk is over its bound: it waits, and so do x's later calls.
        assert_eq!(b.admit(&x, MIB, 3), None);
        assert_eq!(b.admit(&x, 100, 4), None);
        assert!(b.has_backlog(&x));
        // y's small call goes at once.
        assert_eq!(b.admit(&y, 4096, 10), Some(10));
        assert!(!b.has_backlog(&y));
        // One of x's chunks ends: the next one goes, in order.
        assert_eq!(b.release(&x, MIB), vec![3]);
        assert_eq!(b.release(&x, MIB), vec![4]);
        assert!(!b.has_backlog(&x));
        assert_eq!(b.in_flight(), MIB + 2 * MIN_CALL_BYTES);
    }

    #[test]
    fn lanes_take_turns_for_the_peer_bound() {
        let b = Budget::with_limits(2 * MIB, 2 * MIB, Arc::default());
        let (x, y) = (name("x"), name("y"));
        assert_eq!(b.admit(&x, MIB, 1), Some(1));
        assert_eq!(b.admit(&x, MIB, 2), Some(2));
        assert_eq!(b.admit(&x, MIB, 3), None);
        assert_eq!(b.admit(&y, MIB, 10), None);
        assert_eq!(b.admit(&y, MIB, 11), None);
        // Room for one at a time: x waited first, then y's calls go in turn.
        assert_eq!(b.release(&x, MIB), vec![3]);
        assert_eq!(b.release(&x, MIB), vec![10]);
        assert_eq!(b.release(&x, MIB), vec![11]);
        assert!(b.release(&y, MIB).is_empty());
    }

    #[test]
    fn a_call_over_the_bound_goes_alone() {
        let b = budget();
        let x = name("x");
        assert_eq!(b.admit(&x, 16 * MIB, 1), Some(1));
        assert_eq!(b.admit(&x, 1, 2), None);
        assert_eq!(b.release(&x, 16 * MIB), vec![2]);
    }

    #[test]
    fn drain_takes_the_waiting_calls_and_clears_the_count() {
        let waiting = Arc::new(AtomicUsize::new(0));
        let b = Budget::with_limits(MIB, MIB, waiting.clone());
        let x = name("x");
        assert_eq!(b.admit(&x, MIB, 1), Some(1));
        assert_eq!(b.admit(&x, MIB, 2), None);
        assert_eq!(b.admit(&x, MIB, 3), None);
        assert_eq!(waiting.load(Ordering::Relaxed), 2);
        let mut drained = b.drain();
        drained.sort();
        assert_eq!(drained, vec![2, 3]);
        assert_eq!(waiting.load(Ordering::Relaxed), 0);
        assert!(!b.has_backlog(&x));
        assert!(b.release(&x, MIB).is_empty());
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn small_calls_do_not_overtake_a_call_waiting_for_the_peer() {
        let b = Budget::with_limits(2 * MIB, 2 * MIB, Arc::default());
        let (x, y) = (name("x"), name("y"));
        assert_eq!(b.admit(&y, MIB, 10), Some(10));
        assert_eq!(b.admit(&y, MIB - MIN_CALL_BYTES, 11), Some(11));
        // x's chunk needs room on the peer; y's small calls must not keep taking it.
        assert_eq!(b.admit(&x, MIB, 1), None);
        assert_eq!(b.admit(&y, MIN_CALL_BYTES, 12), None);
        assert_eq!(b.release(&y, MIB), vec![1, 12]);
    }
}
