//! Counters and latency histograms, per image and per peer, reported as JSON by `cormorant
//! stats` and in Prometheus' format (`control::prometheus`).
//!
//! The request path counts per queue: each queue's counters have one writer, its thread, so a
//! count is a plain load and store, with no locked instruction and no cache line shared
//! between queues; `stats` and a scrape sum the queues when they ask.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// Latency buckets: bucket i counts requests that took less than 2^i microseconds; the last
/// one everything slower (2^20 us is about a second).
const BUCKETS: usize = 21;

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn record(&self, took: Duration) {
        let us = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Relaxed)).collect()
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Relaxed)
    }

    /// The upper bound (us) of the bucket holding the `q` quantile.
    pub fn quantile_us(&self, q: f64) -> u64 {
        quantile_us(&self.counts(), q)
    }

    fn json(&self) -> Value {
        latency_json(&self.counts(), self.sum_us())
    }
}

/// A count with one writer: the thread of the queue it belongs to. Adding is a plain load
/// and store (no locked instruction); readers on other threads see a recent value.
#[derive(Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// What one queue's guest requests did. Only the queue's thread writes these.
#[derive(Default)]
pub struct QueueCounters {
    pub reads: Count,
    pub writes: Count,
    pub flushes: Count,
    pub discards: Count,
    pub read_bytes: Count,
    pub write_bytes: Count,
    pub errors: Count,
    pub guest_errors: Count,
    /// Requests taken and settled: the difference is what is in flight.
    pub started: Count,
    pub settled: Count,
    /// Sampled: see `route::Queue`.
    pub latency: Histogram,
}

/// An image's counts summed over its queues, at one moment.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct ImageTotals {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub guest_errors: u64,
    pub in_flight: u64,
    pub latency_counts: Vec<u64>,
    pub latency_sum_us: u64,
}

impl ImageTotals {
    fn add(&mut self, q: &QueueCounters) {
        self.reads += q.reads.get();
        self.writes += q.writes.get();
        self.flushes += q.flushes.get();
        self.discards += q.discards.get();
        self.read_bytes += q.read_bytes.get();
        self.write_bytes += q.write_bytes.get();
        self.errors += q.errors.get();
        self.guest_errors += q.guest_errors.get();
        self.in_flight += q.started.get().saturating_sub(q.settled.get());
        let counts = q.latency.counts();
        self.latency_counts.resize(counts.len(), 0);
        for (total, c) in self.latency_counts.iter_mut().zip(counts) {
            *total += c;
        }
        self.latency_sum_us += q.latency.sum_us.load(Relaxed);
    }
}

/// What one image's guest did: the counts of its live queues, plus those of queues gone
/// (a frontend reconnecting makes new ones), and its resync's progress.
#[derive(Default)]
pub struct ImageMetrics {
    queues: Mutex<Queues>,
    pub resync_done: AtomicU64,
    pub resync_total: AtomicU64,
}

#[derive(Default)]
struct Queues {
    live: Vec<Arc<QueueCounters>>,
    gone: ImageTotals,
}

impl ImageMetrics {
    /// Counters for a new queue of the image.
    pub fn queue(&self) -> Arc<QueueCounters> {
        let counters = Arc::new(QueueCounters::default());
        self.lock().live.push(counters.clone());
        counters
    }

    /// The queue is gone: its counts stay in the image's totals.
    pub fn retire(&self, counters: &Arc<QueueCounters>) {
        let mut queues = self.lock();
        queues.live.retain(|q| !Arc::ptr_eq(q, counters));
        queues.gone.add(counters);
        queues.gone.in_flight = 0;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn totals(&self) -> ImageTotals {
        let queues = self.lock();
        let mut totals = queues.gone.clone();
        for q in &queues.live {
            totals.add(q);
        }
        totals.latency_counts.resize(BUCKETS, 0);
        totals
    }

    pub fn json(&self, out_of_sync: u64) -> Value {
        let t = self.totals();
        json!({
            "reads": t.reads,
            "writes": t.writes,
            "flushes": t.flushes,
            "discards": t.discards,
            "read_bytes": t.read_bytes,
            "write_bytes": t.write_bytes,
            "errors": t.errors,
            "guest_errors": t.guest_errors,
            "in_flight": t.in_flight,
            "out_of_sync_copies": out_of_sync,
            "resync": {"done": self.resync_done.load(Relaxed), "total": self.resync_total.load(Relaxed)},
            "latency": latency_json(&t.latency_counts, t.latency_sum_us),
        })
    }
}

/// The upper bound (us) of the bucket holding the `q` quantile of `counts`.
pub fn quantile_us(counts: &[u64], q: f64) -> u64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0;
    }
    let want = (q * total as f64).ceil() as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= want {
            return 1 << i;
        }
    }
    1 << (BUCKETS - 1)
}

/// Prometheus buckets from power-of-two microsecond counts: (upper bound in seconds, count in
/// that bucket alone), the last one +Inf. The encoder makes them cumulative.
pub fn prometheus_buckets(counts: &[u64]) -> Vec<(f64, u64)> {
    counts
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let le = if i + 1 == counts.len() {
                f64::INFINITY
            } else {
                (1u64 << i) as f64 / 1e6
            };
            (le, c)
        })
        .collect()
}

fn latency_json(counts: &[u64], sum_us: u64) -> Value {
    json!({
        "count": counts.iter().sum::<u64>(),
        "sum_us": sum_us,
        "p50_us_below": quantile_us(counts, 0.5),
        "p99_us_below": quantile_us(counts, 0.99),
        "buckets_us_below_pow2": counts,
    })
}

/// What this node's calls to one peer did.
#[derive(Default)]
pub struct PeerMetrics {
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    pub in_flight: AtomicU64,
    pub latency: Histogram,
}

impl PeerMetrics {
    pub fn json(&self, failed: bool) -> Value {
        json!({
            "calls": self.calls.load(Relaxed),
            "errors": self.errors.load(Relaxed),
            "in_flight": self.in_flight.load(Relaxed),
            "on_failure_list": failed,
            "latency": self.latency.json(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_land_in_power_of_two_buckets() {
        let h = Histogram::default();
        for us in [3, 3, 3, 100, 5000] {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.quantile_us(0.5), 4);
        assert_eq!(h.quantile_us(0.99), 8192);
        let buckets = prometheus_buckets(&h.counts());
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 0)));
        assert_eq!(buckets[2], (4e-6, 3));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 5);
    }

    #[test]
    fn image_totals_sum_live_and_retired_queues() {
        let m = ImageMetrics::default();
        let (a, b) = (m.queue(), m.queue());
        a.reads.add(3);
        b.reads.add(4);
        a.started.add(2);
        a.settled.add(1);
        b.latency.record(Duration::from_micros(10));
        assert_eq!(m.totals().reads, 7);
        assert_eq!(m.totals().in_flight, 1);
        m.retire(&b);
        b.reads.add(100);
        let t = m.totals();
        assert_eq!((t.reads, t.in_flight), (7, 1));
        assert_eq!(t.latency_counts.iter().sum::<u64>(), 1);
    }
}
