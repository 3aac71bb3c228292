//! Counters and latency histograms, per image and per peer, cheap enough for the request path
//! (relaxed atomic adds), reported as JSON by `cormorant stats` and as Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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

    fn counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Relaxed)).collect()
    }

    /// The upper bound (us) of the bucket holding the `q` quantile.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let counts = self.counts();
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

    fn json(&self) -> Value {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        json!({
            "count": total,
            "sum_us": self.sum_us.load(Relaxed),
            "p50_us_below": self.quantile_us(0.5),
            "p99_us_below": self.quantile_us(0.99),
            "buckets_us_below_pow2": counts,
        })
    }

    fn prometheus(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, c) in self.counts().iter().enumerate() {
            cumulative += c;
            let le = if i == BUCKETS - 1 {
                "+Inf".to_string()
            } else {
                format!("{:.6}", (1u64 << i) as f64 / 1e6)
            };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// What one image's guest did.
#[derive(Default)]
pub struct ImageMetrics {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub guest_errors: AtomicU64,
    pub in_flight: AtomicU64,
    pub latency: Histogram,
    pub resync_done: AtomicU64,
    pub resync_total: AtomicU64,
}

impl ImageMetrics {
    pub fn json(&self, out_of_sync: u64) -> Value {
        json!({
            "reads": self.reads.load(Relaxed),
            "writes": self.writes.load(Relaxed),
            "flushes": self.flushes.load(Relaxed),
            "discards": self.discards.load(Relaxed),
            "read_bytes": self.read_bytes.load(Relaxed),
            "write_bytes": self.write_bytes.load(Relaxed),
            "errors": self.errors.load(Relaxed),
            "guest_errors": self.guest_errors.load(Relaxed),
            "in_flight": self.in_flight.load(Relaxed),
            "out_of_sync_copies": out_of_sync,
            "resync": {"done": self.resync_done.load(Relaxed), "total": self.resync_total.load(Relaxed)},
            "latency": self.latency.json(),
        })
    }

    pub fn prometheus(&self, out: &mut String, image: &str, out_of_sync: u64) {
        let l = format!("image=\"{image}\"");
        for (name, v) in [
            ("reads", &self.reads),
            ("writes", &self.writes),
            ("flushes", &self.flushes),
            ("discards", &self.discards),
            ("read_bytes", &self.read_bytes),
            ("write_bytes", &self.write_bytes),
            ("errors", &self.errors),
            ("guest_errors", &self.guest_errors),
        ] {
            let _ = writeln!(
                out,
                "cormorant_image_{name}_total{{{l}}} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "cormorant_image_in_flight{{{l}}} {}",
            self.in_flight.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "cormorant_image_out_of_sync_copies{{{l}}} {out_of_sync}"
        );
        self.latency
            .prometheus(out, "cormorant_image_request_seconds", &l);
    }
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

    pub fn prometheus(&self, out: &mut String, peer: &str, failed: bool) {
        let l = format!("peer=\"{peer}\"");
        let _ = writeln!(
            out,
            "cormorant_peer_calls_total{{{l}}} {}",
            self.calls.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "cormorant_peer_errors_total{{{l}}} {}",
            self.errors.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "cormorant_peer_in_flight{{{l}}} {}",
            self.in_flight.load(Relaxed)
        );
        let _ = writeln!(out, "cormorant_peer_failed{{{l}}} {}", u8::from(failed));
        self.latency
            .prometheus(out, "cormorant_peer_call_seconds", &l);
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
        let mut text = String::new();
        h.prometheus(&mut text, "x", "image=\"a\"");
        assert!(text.contains("x_count{image=\"a\"} 5"));
        assert!(text.contains("le=\"+Inf\"} 5"));
    }
}
