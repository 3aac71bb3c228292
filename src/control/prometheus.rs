//! The optional Prometheus endpoint: `GET /metrics` over plain HTTP/1.0, one short-lived
//! connection at a time (scrapes are seconds apart; nothing here needs more). The text is
//! written by `prometheus-client` (format 0.0.4, HELP and TYPE lines, histogram conventions)
//! from figures the daemon takes at each scrape: the request path keeps its own cheap
//! per-queue counts (`metrics`), summed only when asked.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::cache::CacheFigures;
use crate::daemon::Daemon;
use crate::metrics::{prometheus_buckets, ImageTotals};
use crate::qos::QosFigures;

/// Longest a scraper may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub fn start(daemon: Arc<Daemon>, addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    log::info!("metrics on http://{addr}/metrics");
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(&daemon, stream) {
                    log::debug!("metrics: {e}");
                }
            }
        })?;
    Ok(())
}

fn answer(daemon: &Daemon, mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut request_line = String::new();
    BufReader::new(std::io::Read::take(&stream, 8192)).read_line(&mut request_line)?;
    let (status, body) = if request_line.starts_with("GET /metrics") {
        ("200 OK", daemon.prometheus())
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One image's figures at a scrape.
#[derive(Debug)]
pub struct ImageFigures {
    pub image: String,
    pub totals: ImageTotals,
    pub out_of_sync: u64,
    pub qos: QosFigures,
    pub cache: CacheFigures,
    pub tiering: crate::tiering::TierFigures,
}

/// One peer's figures at a scrape.
#[derive(Debug)]
pub struct PeerFigures {
    pub peer: String,
    pub calls: u64,
    pub errors: u64,
    pub in_flight: u64,
    pub failed: bool,
    pub latency_counts: Vec<u64>,
    pub latency_sum_us: u64,
}

/// The figures of one scrape, encoded when the registry asks.
#[derive(Debug)]
struct Scrape {
    images: Vec<ImageFigures>,
    peers: Vec<PeerFigures>,
}

/// Prometheus text for these figures.
pub fn render(images: Vec<ImageFigures>, peers: Vec<PeerFigures>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { images, peers }));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        log::warn!("metrics: cannot encode: {e}");
    }
    out
}

type Labels = [(&'static str, String); 1];

/// One figure of an image's totals.
type Figure = fn(&ImageTotals) -> u64;

/// One figure of an image's cache.
type CacheFigure = fn(&CacheFigures) -> u64;

/// One family: its descriptor, then one sample per labelled item.
fn family<T>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    items: &[T],
    sample: impl Fn(&T) -> (Labels, Sample),
) -> Result<(), std::fmt::Error> {
    let kind = match items.first().map(|i| sample(i).1) {
        None => return Ok(()),
        Some(Sample::Counter(_) | Sample::Seconds(_)) => MetricType::Counter,
        Some(Sample::Gauge(_)) => MetricType::Gauge,
        Some(Sample::Histogram { .. }) => MetricType::Histogram,
    };
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for item in items {
        let (labels, value) = sample(item);
        let mut encoder = metric.encode_family(&labels)?;
        match value {
            Sample::Counter(v) => ConstCounter::new(v).encode(encoder)?,
            Sample::Gauge(v) => ConstGauge::new(v).encode(encoder)?,
            Sample::Seconds(v) => ConstCounter::new(v).encode(encoder)?,
            Sample::Histogram { counts, sum_us } => {
                let buckets = prometheus_buckets(counts);
                let count = counts.iter().sum();
                let sum = sum_us as f64 / 1e6;
                encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )?
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Sample<'a> {
    Counter(u64),
    Gauge(i64),
    Seconds(f64),
    Histogram { counts: &'a [u64], sum_us: u64 },
}

impl Scrape {
    /// The cache families (see `cache`): one sample per image.
    fn encode_cache(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let img = |i: &ImageFigures| -> Labels { [("image", i.image.clone())] };
        let counters: [(&str, &str, CacheFigure); 6] = [
            (
                "cormorant_image_cache_hits",
                "Reads served from this node's cache copies",
                |c| c.hits,
            ),
            (
                "cormorant_image_cache_misses",
                "Reads of remote blocks the cache could not serve",
                |c| c.misses,
            ),
            (
                "cormorant_image_cache_hit_bytes",
                "Bytes read from cache copies",
                |c| c.hit_bytes,
            ),
            (
                "cormorant_image_cache_filled_bytes",
                "Bytes written into cache copies",
                |c| c.filled_bytes,
            ),
            (
                "cormorant_image_cache_readahead_hits",
                "Reads served by pages read-ahead brought in",
                |c| c.ahead_hits,
            ),
            (
                "cormorant_image_cache_readahead_bytes",
                "Bytes read-ahead brought into the cache",
                |c| c.ahead_bytes,
            ),
        ];
        for (name, help, figure) in counters {
            family(e, name, help, None, &self.images, |i| {
                (img(i), Sample::Counter(figure(&i.cache)))
            })?;
        }
        family(
            e,
            "cormorant_image_cache_prefetch_blocks_done",
            "Blocks the running or last image prefetch went through",
            None,
            &self.images,
            |i| (img(i), Sample::Gauge(i.cache.prefetch_done as i64)),
        )?;
        family(
            e,
            "cormorant_image_cache_prefetch_blocks",
            "Blocks of the running or last image prefetch",
            None,
            &self.images,
            |i| (img(i), Sample::Gauge(i.cache.prefetch_blocks as i64)),
        )?;
        family(
            e,
            "cormorant_image_cache_used_bytes",
            "Bytes of cache copies the image holds on this node",
            None,
            &self.images,
            |i| (img(i), Sample::Gauge(i.cache.used as i64)),
        )
    }
}

/// One figure of an image's tiering.
type TierFigure = fn(&crate::tiering::TierFigures) -> u64;

impl Scrape {
    /// The tiering families (see `tiering`): one sample per image.
    fn encode_tiering(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let img = |i: &ImageFigures| -> Labels { [("image", i.image.clone())] };
        let gauges: [(&str, &str, TierFigure); 4] = [
            (
                "cormorant_image_auto_tiered",
                "1 when the image's blocks move between tiers by heat",
                |t| u64::from(t.auto),
            ),
            (
                "cormorant_image_ram_blocks",
                "Blocks with an in-sync copy on this node's RAM tier",
                |t| t.counts.ram,
            ),
            (
                "cormorant_image_volume_blocks",
                "Blocks with an in-sync copy on this node's volume tier",
                |t| t.counts.volume,
            ),
            (
                "cormorant_image_ram_tier_bytes",
                "Bytes of the image's blocks with a copy on this node's RAM tier",
                |t| t.counts.ram_bytes,
            ),
        ];
        for (name, help, figure) in gauges {
            family(e, name, help, None, &self.images, |i| {
                (img(i), Sample::Gauge(figure(&i.tiering) as i64))
            })?;
        }
        let counters: [(&str, &str, TierFigure); 3] = [
            (
                "cormorant_image_promotions",
                "Blocks the tiering mover moved to the RAM tier",
                |t| t.promotions,
            ),
            (
                "cormorant_image_demotions",
                "Blocks the tiering mover moved to the volume tier",
                |t| t.demotions,
            ),
            (
                "cormorant_image_tier_moved_bytes",
                "Bytes the tiering mover copied",
                |t| t.bytes_moved,
            ),
        ];
        for (name, help, figure) in counters {
            family(e, name, help, None, &self.images, |i| {
                (img(i), Sample::Counter(figure(&i.tiering)))
            })?;
        }
        Ok(())
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let img = |i: &ImageFigures| -> Labels { [("image", i.image.clone())] };
        let counters: [(&str, &str, Figure); 8] = [
            ("cormorant_image_reads", "Read requests", |t| t.reads),
            ("cormorant_image_writes", "Write requests", |t| t.writes),
            ("cormorant_image_flushes", "Flush requests", |t| t.flushes),
            (
                "cormorant_image_discards",
                "Discard and write-zeroes requests",
                |t| t.discards,
            ),
            (
                "cormorant_image_read_bytes",
                "Bytes read by the guest",
                |t| t.read_bytes,
            ),
            (
                "cormorant_image_write_bytes",
                "Bytes written by the guest",
                |t| t.write_bytes,
            ),
            (
                "cormorant_image_errors",
                "Requests answered with an I/O error",
                |t| t.errors,
            ),
            (
                "cormorant_image_guest_errors",
                "Malformed requests from the guest",
                |t| t.guest_errors,
            ),
        ];
        for (name, help, value) in counters {
            family(e, name, help, None, &self.images, |i| {
                (img(i), Sample::Counter(value(&i.totals)))
            })?;
        }
        family(
            e,
            "cormorant_image_in_flight",
            "Requests in flight",
            None,
            &self.images,
            |i| (img(i), Sample::Gauge(i.totals.in_flight as i64)),
        )?;
        family(
            e,
            "cormorant_image_out_of_sync_copies",
            "Block copies out of sync",
            None,
            &self.images,
            |i| (img(i), Sample::Gauge(i.out_of_sync as i64)),
        )?;
        family(
            e,
            "cormorant_image_request",
            "Request latency, one request in 16 sampled per queue",
            Some(&Unit::Seconds),
            &self.images,
            |i| {
                let counts = &i.totals.latency_counts;
                let sum_us = i.totals.latency_sum_us;
                (img(i), Sample::Histogram { counts, sum_us })
            },
        )?;
        family(
            e,
            "cormorant_image_iops_limit",
            "IOPS limit, 0 for none",
            None,
            &self.images,
            |i| (img(i), Sample::Gauge(i.qos.iops_limit as i64)),
        )?;
        family(
            e,
            "cormorant_image_bps_limit",
            "Bandwidth limit in bytes per second, 0 for none",
            None,
            &self.images,
            |i| (img(i), Sample::Gauge(i.qos.bps_limit as i64)),
        )?;
        family(
            e,
            "cormorant_image_throttled",
            "Requests that waited for the image's limits",
            None,
            &self.images,
            |i| (img(i), Sample::Counter(i.qos.throttled)),
        )?;
        family(
            e,
            "cormorant_image_throttled",
            "Time requests waited for the image's limits",
            Some(&Unit::Seconds),
            &self.images,
            |i| (img(i), Sample::Seconds(i.qos.throttled_seconds)),
        )?;
        self.encode_cache(e)?;
        self.encode_tiering(e)?;
        let peer = |p: &PeerFigures| -> Labels { [("peer", p.peer.clone())] };
        family(
            e,
            "cormorant_peer_calls",
            "Calls to the peer",
            None,
            &self.peers,
            |p| (peer(p), Sample::Counter(p.calls)),
        )?;
        family(
            e,
            "cormorant_peer_errors",
            "Calls that failed",
            None,
            &self.peers,
            |p| (peer(p), Sample::Counter(p.errors)),
        )?;
        family(
            e,
            "cormorant_peer_in_flight",
            "Calls in flight",
            None,
            &self.peers,
            |p| (peer(p), Sample::Gauge(p.in_flight as i64)),
        )?;
        family(
            e,
            "cormorant_peer_failed",
            "1 while on the failure list",
            None,
            &self.peers,
            |p| (peer(p), Sample::Gauge(i64::from(p.failed))),
        )?;
        family(
            e,
            "cormorant_peer_call",
            "Call latency",
            Some(&Unit::Seconds),
            &self.peers,
            |p| {
                let (counts, sum_us) = (&p.latency_counts[..], p.latency_sum_us);
                (peer(p), Sample::Histogram { counts, sum_us })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_render_with_help_type_and_histogram_conventions() {
        let mut latency_counts = vec![0; 21];
        latency_counts[3] = 2;
        let totals = ImageTotals {
            writes: 10,
            in_flight: 1,
            latency_counts,
            latency_sum_us: 9,
            ..ImageTotals::default()
        };
        let images = vec![ImageFigures {
            image: "vm1".into(),
            totals,
            out_of_sync: 0,
            qos: QosFigures {
                iops_limit: 500,
                throttled_seconds: 1.5,
                ..QosFigures::default()
            },
            cache: CacheFigures {
                hits: 7,
                used: 4096,
                ..CacheFigures::default()
            },
            tiering: crate::tiering::TierFigures {
                auto: true,
                promotions: 3,
                counts: crate::tiering::TierCounts {
                    ram: 2,
                    volume: 5,
                    ram_bytes: 8192,
                },
                ..Default::default()
            },
        }];
        let text = render(images, Vec::new());
        for line in [
            "# HELP cormorant_image_writes_total Write requests",
            "# TYPE cormorant_image_writes_total counter",
            "cormorant_image_writes_total{image=\"vm1\"} 10",
            "# TYPE cormorant_image_in_flight gauge",
            "cormorant_image_in_flight{image=\"vm1\"} 1",
            "# TYPE cormorant_image_request_seconds histogram",
            "cormorant_image_request_seconds_bucket{image=\"vm1\",le=\"4e-06\"} 0",
            "cormorant_image_request_seconds_bucket{image=\"vm1\",le=\"8e-06\"} 2",
            "cormorant_image_request_seconds_bucket{image=\"vm1\",le=\"+Inf\"} 2",
            "cormorant_image_request_seconds_sum{image=\"vm1\"} 0.000009",
            "cormorant_image_request_seconds_count{image=\"vm1\"} 2",
            "cormorant_image_iops_limit{image=\"vm1\"} 500",
            "cormorant_image_throttled_seconds_total{image=\"vm1\"} 1.5",
            "cormorant_image_cache_hits_total{image=\"vm1\"} 7",
            "cormorant_image_cache_used_bytes{image=\"vm1\"} 4096",
            "cormorant_image_auto_tiered{image=\"vm1\"} 1",
            "cormorant_image_ram_blocks{image=\"vm1\"} 2",
            "cormorant_image_volume_blocks{image=\"vm1\"} 5",
            "cormorant_image_promotions_total{image=\"vm1\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        // No peers, no peer families.
        assert!(!text.contains("cormorant_peer"));
    }
}
