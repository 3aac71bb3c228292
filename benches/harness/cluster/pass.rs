//! One pass over a span: every block of `[0, span)` read exactly once, in order, `qd` requests in
//! flight on one queue, timed from the first submit to the last completion.
//!
//! The time-based loads of `load.rs` cannot stand in: a sequential load wraps around its span
//! and reads it again, so a read-ahead case would measure the cache's hits after the first lap
//! instead of the cold stream, and a warm-up that must touch every byte of a working set has
//! no run time that guarantees it.

use std::path::Path;
use std::time::{Duration, Instant};

use cormorant_frontend::blk::S_OK;
use cormorant_frontend::{BlkClient, BlkRequest, Completion, GuestBuf};
use hdrhistogram::Histogram;

use crate::load::{self, LoadError, LoadResult, LoadSpec, Pattern};

/// Sector size of virtio-blk addresses.
const SECTOR: u64 = 512;
/// Longest wait for one completion before the pass is declared stalled (as the loads do).
const STALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Highest latency the histogram records (60 s); anything above is clamped.
const HIST_MAX_NS: u64 = 60_000_000_000;

/// A sequential read pass: request size, requests in flight, bytes from offset 0.
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    pub bs: u32,
    pub qd: u16,
    pub span: u64,
}

impl Pass {
    /// The load spec with the same shape (for the connection's ring and memory sizes).
    fn spec(self) -> LoadSpec {
        LoadSpec {
            pattern: Pattern::Read,
            bs: self.bs,
            qd: self.qd,
            queues: 1,
            runtime: Duration::ZERO,
            warmup: Duration::ZERO,
            span: self.span,
            client_poll: false,
            inflight: false,
        }
    }

    /// Short label, e.g. `read 1m qd4 pass`.
    pub fn label(self) -> String {
        format!(
            "read {} qd{} pass",
            load::human_size(u64::from(self.bs)),
            self.qd
        )
    }

    fn check(self, capacity: u64) -> Result<(), LoadError> {
        let bs = u64::from(self.bs);
        if bs == 0
            || !bs.is_multiple_of(SECTOR)
            || self.qd == 0
            || self.span < bs
            || !self.span.is_multiple_of(bs)
        {
            return Err(LoadError::Spec(format!("{self:?}")));
        }
        if capacity < self.span {
            return Err(LoadError::TooSmall {
                capacity,
                span: self.span,
            });
        }
        Ok(())
    }
}

/// Connects to `socket` and reads `pass.span` bytes once.
pub fn run(socket: &Path, pass: Pass) -> Result<LoadResult, LoadError> {
    let mut client =
        BlkClient::connect(socket, &load::client_options(&pass.spec())).map_err(|source| {
            LoadError::Connect {
                path: socket.display().to_string(),
                source,
            }
        })?;
    let result = pass
        .check(client.config().capacity_bytes())
        .and_then(|()| drive(&mut client, pass));
    let _ = client.close();
    result
}

fn drive(client: &mut BlkClient, pass: Pass) -> Result<LoadResult, LoadError> {
    let qerr = |source| LoadError::Queue { queue: 0, source };
    let q = client.queue(0).map_err(qerr)?;
    let qd = usize::from(pass.qd).min(q.max_in_flight());
    let bufs: Vec<GuestBuf> = (0..qd)
        .map(|_| q.alloc(pass.bs))
        .collect::<Result<_, _>>()
        .map_err(qerr)?;
    let blocks = pass.span / u64::from(pass.bs);
    let sectors_per_block = u64::from(pass.bs) / SECTOR;
    let mut hist = Histogram::<u64>::new_with_bounds(1, HIST_MAX_NS, 3)
        .map_err(|e| LoadError::Spec(format!("histogram: {e}")))?;
    let mut free: Vec<usize> = (0..qd).collect();
    // (token, buffer slot) of each request in flight.
    let mut inflight: Vec<(u64, usize)> = Vec::with_capacity(qd);
    let mut batch: Vec<BlkRequest> = Vec::with_capacity(qd);
    let mut batch_slots: Vec<usize> = Vec::with_capacity(qd);
    let mut done: Vec<Completion> = Vec::with_capacity(usize::from(q.size()));
    let (mut next, mut ops, mut errors) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    loop {
        batch.clear();
        batch_slots.clear();
        while next < blocks {
            let Some(slot) = free.pop() else { break };
            batch.push(BlkRequest::read(next * sectors_per_block, bufs[slot]));
            batch_slots.push(slot);
            next += 1;
        }
        if !batch.is_empty() {
            let first = q.submit_batch(&batch).map_err(qerr)?;
            inflight.extend(
                batch_slots
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| (first.0 + i as u64, s)),
            );
        }
        if inflight.is_empty() {
            break;
        }
        done.clear();
        q.wait_completions(&mut done, STALL_TIMEOUT).map_err(qerr)?;
        for c in &done {
            let Some(pos) = inflight.iter().position(|&(t, _)| t == c.token.0) else {
                return Err(LoadError::Spec(format!(
                    "completion of token {} never submitted",
                    c.token.0
                )));
            };
            free.push(inflight.swap_remove(pos).1);
            ops += 1;
            if c.status != S_OK {
                errors += 1;
            }
            let ns = (c.latency.as_nanos() as u64).clamp(1, HIST_MAX_NS);
            // In bounds after the clamp: recording cannot fail.
            let _ = hist.record(ns);
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(LoadResult {
        ops,
        errors,
        seconds: secs,
        iops: ops as f64 / secs,
        mbps: ops as f64 * f64::from(pass.bs) / secs / 1e6,
        lat_mean_us: hist.mean() / 1000.0,
        lat_p50_us: us(hist.value_at_quantile(0.5)),
        lat_p99_us: us(hist.value_at_quantile(0.99)),
        lat_p999_us: us(hist.value_at_quantile(0.999)),
        lat_max_us: us(hist.max()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_spans_that_are_not_whole_blocks() {
        let p = |bs, qd, span| Pass { bs, qd, span };
        assert!(p(1 << 20, 4, 256 << 20).check(256 << 20).is_ok());
        assert!(p(1 << 20, 4, (256 << 20) + 4096).check(1 << 30).is_err());
        assert!(p(1000, 4, 256 << 20).check(1 << 30).is_err());
        assert!(p(1 << 20, 0, 256 << 20).check(1 << 30).is_err());
        assert!(matches!(
            p(1 << 20, 4, 256 << 20).check(128 << 20),
            Err(LoadError::TooSmall { .. })
        ));
    }

    #[test]
    fn label_names_the_shape() {
        let pass = Pass {
            bs: 1 << 20,
            qd: 4,
            span: 1 << 30,
        };
        assert_eq!(pass.label(), "read 1m qd4 pass");
    }
}
