//! Frames waiting to be written to one connection, and the loop that writes them. Callers
//! queue without touching the socket; one writer thread drains the queue in batches and
//! flushes once per batch, so many small pipelined frames share a system call.

use std::collections::VecDeque;
use std::io::{self, BufWriter, Write};
use std::mem;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use super::frame::Outgoing;
use super::lock;

/// Write buffer per connection: many small frames per system call; bulk data goes past it.
const WRITE_BUFFER: usize = 64 << 10;

pub(crate) struct Outbox {
    state: Mutex<State>,
    /// The writer waits here for frames.
    queued: Condvar,
    /// Callers wait here for room.
    drained: Condvar,
}

#[derive(Default)]
struct State {
    queue: VecDeque<(Outgoing, usize)>,
    /// Bytes queued or being written.
    bytes: usize,
    closed: bool,
}

impl Outbox {
    pub(crate) fn new() -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            queued: Condvar::new(),
            drained: Condvar::new(),
        }
    }

    /// Queues a frame; `charge` is handed back to the writer's callback once it is written.
    /// False when the outbox is closed (the frame is dropped).
    pub(crate) fn push(&self, frame: Outgoing, charge: usize) -> bool {
        let mut state = lock(&self.state);
        if state.closed {
            return false;
        }
        state.bytes += frame.len();
        state.queue.push_back((frame, charge));
        self.queued.notify_one();
        true
    }

    /// Waits while `limit` bytes or more are queued. False if `deadline` passed first.
    pub(crate) fn wait_room(&self, limit: usize, deadline: Instant) -> bool {
        let mut state = lock(&self.state);
        while state.bytes >= limit && !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = match self.drained.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// Stops the writer (frames still queued are dropped) and refuses new frames.
    pub(crate) fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.queue.clear();
        self.queued.notify_all();
        self.drained.notify_all();
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Writes queued frames until the outbox is closed (`Ok`) or a write fails. After each
    /// batch is flushed, `written(frames, charges)` is told what went out.
    pub(crate) fn run<W: Write>(
        &self,
        writer: W,
        mut written: impl FnMut(usize, usize),
    ) -> io::Result<()> {
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, writer);
        loop {
            let batch = match self.next_batch() {
                Some(batch) => batch,
                None => return Ok(()),
            };
            let (mut bytes, mut charges) = (0, 0);
            for (frame, charge) in &batch {
                frame.write_to(&mut out)?;
                bytes += frame.len();
                charges += charge;
            }
            out.flush()?;
            {
                let mut state = lock(&self.state);
                state.bytes -= bytes;
                self.drained.notify_all();
            }
            written(batch.len(), charges);
        }
    }

    /// Everything queued, once there is something; `None` once closed.
    fn next_batch(&self) -> Option<VecDeque<(Outgoing, usize)>> {
        let mut state = lock(&self.state);
        loop {
            if state.closed {
                return None;
            }
            if !state.queue.is_empty() {
                return Some(mem::take(&mut state.queue));
            }
            state = self
                .queued
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::frame::Kind;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn writes_in_order_and_reports_charges() {
        let outbox = Arc::new(Outbox::new());
        for id in 0..5 {
            assert!(outbox.push(Outgoing::new(Kind::Ok, id, vec![], vec![]).unwrap(), 10));
        }
        let writer = {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let mut total = 0;
                outbox
                    .run(&mut sink, |frames, charges| {
                        total += charges;
                        assert_eq!(frames * 10, charges);
                        if total == 50 {
                            outbox.close();
                        }
                    })
                    .unwrap();
                sink
            })
        };
        let sink = writer.join().unwrap();
        assert_eq!(sink.len(), 5 * 24);
        assert_eq!(sink[8], 0);
        assert_eq!(sink[4 * 24 + 8], 4);
        assert!(!outbox.push(Outgoing::new(Kind::Ok, 9, vec![], vec![]).unwrap(), 0));
    }

    #[test]
    fn room_waits_until_the_deadline() {
        let outbox = Outbox::new();
        outbox.push(
            Outgoing::new(Kind::Data, 1, vec![0; 100], vec![]).unwrap(),
            0,
        );
        assert!(outbox.wait_room(1000, Instant::now()));
        let started = Instant::now();
        assert!(!outbox.wait_room(100, started + Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        outbox.close();
        assert!(outbox.wait_room(100, Instant::now() + Duration::from_secs(10)));
    }
}
