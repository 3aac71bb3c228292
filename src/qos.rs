//! Per-image limits (QoS): an operator caps an image's requests per second and bytes per
//! second, so tenants sharing a node cannot starve each other.
//!
//! The limits are image metadata ([`QosLimits`], in the image's JSON file or its etcd
//! records), so they survive restarts and follow the image to another node. At run time each
//! open image has one [`Limiter`] shared by all its queues: a token bucket per limit, kept as
//! GCRA ("theoretical arrival time"), which needs one number per bucket and no refill loop.
//!
//! - Unlimited images pay one relaxed atomic load per request and take no lock.
//! - A request is admitted while its bucket is not in debt, then charged in full: a request
//!   larger than the burst still passes (the bucket goes into debt and later requests wait
//!   it out), and the long-run rate is exactly the limit.
//! - A request that must wait is held by its queue, which stops taking new requests and sets
//!   a timer for when the tokens are due (`virtio/worker/throttle.rs`): no spinning, and no
//!   other image's queues are involved.
//! - The burst is how long the image may run unthrottled after being idle, as a time: the
//!   bucket holds `burst` worth of each limit. [`DEFAULT_BURST_MS`] when not set.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cache::{CacheMode, CachePolicy};
use crate::size::Size;
use crate::tiering::TierMode;

/// Burst when the operator sets none: 100 ms of the limit (QEMU's throttling uses the same
/// tenth of a second), enough to absorb the jitter of a guest's I/O scheduler without letting
/// an image exceed its limit by more than a tenth of a second's worth.
pub const DEFAULT_BURST_MS: u64 = 100;
/// Longest burst: ten seconds at full speed after an idle spell is already more than a
/// neighbour should have to absorb; longer is a typo.
pub const MAX_BURST_MS: u64 = 10_000;
/// Highest IOPS limit: far above what one node serves (about 250k per queue here); anything
/// higher is a typo, not a limit.
pub const MAX_IOPS: u64 = 10_000_000;
/// Lowest bandwidth limit: one 4 KiB page per second. Below it a single page would wait more
/// than a second, which no guest's I/O timeouts are written for.
pub const MIN_BPS: u64 = 4 << 10;
/// Highest bandwidth limit: 1 TiB/s, beyond any node's memory bandwidth.
pub const MAX_BPS: u64 = 1 << 40;

/// An image's limits, as stored in its metadata. `None` is no limit (burst: the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosLimits {
    /// Requests per second (every request counts one: reads, writes, flushes, discards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    /// Bytes per second of read and write data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps: Option<u64>,
    /// The buckets' depth, in milliseconds of each limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_ms: Option<u64>,
    /// Cache copies of remote blocks (see `cache`): not a limit, but a per-image service
    /// setting stored the same way, so it follows the image. None: no caching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CachePolicy>,
    /// Heat tiering (see `tiering`): `auto` lets the owner move the image's copies between
    /// its RAM and volume tiers; None is manual. A placement policy, stored here like the
    /// cache so it follows the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiering: Option<TierMode>,
}

/// One setting in an update: remove it (`"none"`), or set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    None,
    Set(u64),
}

/// A change to an image's limits, as the control protocol carries it: a field left out keeps
/// its current value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<Limit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps: Option<Limit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_ms: Option<Limit>,
    /// Where to keep cache copies of remote blocks, or `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheMode>,
    /// The image's cache cap in bytes, or none (the node's budget only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<Limit>,
    /// `auto` or `manual` (see `tiering`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiering: Option<TierMode>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QosError {
    #[error("an IOPS limit of 0 would stop the image: use 'none' to remove the limit")]
    ZeroIops,
    #[error("IOPS limit {0} is above the maximum of {MAX_IOPS}")]
    IopsTooHigh(u64),
    #[error("a bandwidth limit of 0 would stop the image: use 'none' to remove the limit")]
    ZeroBps,
    #[error("bandwidth limit {0} B/s is outside {MIN_BPS} B/s (4K) .. {MAX_BPS} B/s (1T)")]
    BpsOutOfRange(u64),
    #[error("burst {0} ms is outside 1 .. {MAX_BURST_MS} ms")]
    BurstOutOfRange(u64),
    #[error("'{0}' is not an IOPS limit: give a number of requests per second, or 'none'")]
    BadIops(String),
    #[error("'{0}' is not a bandwidth limit: give bytes per second with an optional K, M, G or T suffix, or 'none'")]
    BadBps(String),
    #[error("'{0}' is not a burst: give a time such as 200ms or 2s, or 'default'")]
    BadBurst(String),
    #[error("a burst needs a limit: set --iops-limit or --bps-limit too")]
    BurstWithoutLimit,
    #[error("a cache size needs a cache: set --cache ram or --cache volume too")]
    CacheSizeWithoutCache,
    #[error("cache size {0} is below the minimum of {MIN_CACHE_SIZE} bytes (one 4K page)")]
    CacheSizeTooSmall(u64),
}

/// Smallest per-image cache cap: one page, the cache's unit.
pub const MIN_CACHE_SIZE: u64 = crate::cache::pages::PAGE;

impl QosLimits {
    pub fn is_unlimited(&self) -> bool {
        self.iops.is_none() && self.bps.is_none()
    }

    /// Nothing set at all (no limit, no cache, manual tiering): stored as if settings never
    /// existed.
    pub fn is_default(&self) -> bool {
        self.is_unlimited() && self.cache.is_none() && self.tiering.is_none()
    }

    /// The burst in effect.
    pub fn burst(&self) -> Duration {
        Duration::from_millis(self.burst_ms.unwrap_or(DEFAULT_BURST_MS))
    }

    /// Checks stored limits (a metadata file or an etcd record may have been edited by hand).
    pub fn validate(&self) -> Result<(), QosError> {
        match self.iops {
            Some(0) => return Err(QosError::ZeroIops),
            Some(n) if n > MAX_IOPS => return Err(QosError::IopsTooHigh(n)),
            _ => {}
        }
        match self.bps {
            Some(0) => return Err(QosError::ZeroBps),
            Some(n) if !(MIN_BPS..=MAX_BPS).contains(&n) => return Err(QosError::BpsOutOfRange(n)),
            _ => {}
        }
        match self.cache.and_then(|c| c.size) {
            Some(n) if n < MIN_CACHE_SIZE => return Err(QosError::CacheSizeTooSmall(n)),
            _ => {}
        }
        match self.burst_ms {
            Some(n) if !(1..=MAX_BURST_MS).contains(&n) => Err(QosError::BurstOutOfRange(n)),
            _ => Ok(()),
        }
    }

    /// These limits with `update` applied, checked. A burst alone on an unlimited image is
    /// refused: it would be stored but mean nothing, which an operator should hear about.
    pub fn updated(&self, update: &QosUpdate) -> Result<QosLimits, QosError> {
        let pick = |current: Option<u64>, change: Option<Limit>| match change {
            None => current,
            Some(Limit::None) => None,
            Some(Limit::Set(n)) => Some(n),
        };
        let cache = match update.cache.map(CacheMode::tier) {
            None => self.cache,
            Some(None) => None,
            Some(Some(tier)) => Some(CachePolicy {
                tier,
                size: self.cache.and_then(|c| c.size),
            }),
        };
        let cache = match (cache, update.cache_size) {
            (cache, None) => cache,
            (None, Some(_)) => return Err(QosError::CacheSizeWithoutCache),
            (Some(c), Some(size)) => Some(CachePolicy {
                tier: c.tier,
                size: pick(c.size, Some(size)),
            }),
        };
        let mut next = QosLimits {
            iops: pick(self.iops, update.iops),
            bps: pick(self.bps, update.bps),
            burst_ms: pick(self.burst_ms, update.burst_ms),
            cache,
            tiering: match update.tiering {
                None => self.tiering,
                Some(TierMode::Manual) => None,
                Some(TierMode::Auto) => Some(TierMode::Auto),
            },
        };
        next.validate()?;
        if next.is_unlimited() {
            if matches!(update.burst_ms, Some(Limit::Set(_))) {
                return Err(QosError::BurstWithoutLimit);
            }
            // With both limits gone the image is unlimited, and stored as it was before any.
            next.burst_ms = None;
        }
        Ok(next)
    }

    /// As the control API shows them (`null`: no limit).
    pub fn json(&self) -> Value {
        json!({
            "iops_limit": self.iops,
            "bps_limit": self.bps,
            "burst_ms": self.burst().as_millis() as u64,
            "cache": self.cache.map_or("off", |c| match c.tier {
                crate::image::Tier::Ram => "ram",
                crate::image::Tier::Volume => "volume",
            }),
            "cache_size": self.cache.and_then(|c| c.size),
            "tiering": self.tiering.unwrap_or(TierMode::Manual),
        })
    }
}

impl QosUpdate {
    pub fn is_empty(&self) -> bool {
        self.iops.is_none()
            && self.bps.is_none()
            && self.burst_ms.is_none()
            && self.cache.is_none()
            && self.cache_size.is_none()
            && self.tiering.is_none()
    }
}

/// `--iops-limit`: a count of requests per second, or `none`.
pub fn parse_iops(text: &str) -> Result<Limit, QosError> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("none") {
        return Ok(Limit::None);
    }
    let n: u64 = text.parse().map_err(|_| QosError::BadIops(text.into()))?;
    match n {
        0 => Err(QosError::ZeroIops),
        n if n > MAX_IOPS => Err(QosError::IopsTooHigh(n)),
        n => Ok(Limit::Set(n)),
    }
}

/// `--bps-limit`: bytes per second with an optional K/M/G/T suffix (powers of 1024, as for
/// sizes), or `none`.
pub fn parse_bps(text: &str) -> Result<Limit, QosError> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("none") {
        return Ok(Limit::None);
    }
    let size: Size = text.parse().map_err(|_| QosError::BadBps(text.into()))?;
    match size.0 {
        0 => Err(QosError::ZeroBps),
        n if !(MIN_BPS..=MAX_BPS).contains(&n) => Err(QosError::BpsOutOfRange(n)),
        n => Ok(Limit::Set(n)),
    }
}

/// `--burst`: a time with a unit (`250ms`, `2s`), or `default`.
pub fn parse_burst(text: &str) -> Result<Limit, QosError> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("default") {
        return Ok(Limit::None);
    }
    let bad = || QosError::BadBurst(text.into());
    let (digits, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1000)
    } else {
        return Err(bad());
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let ms = n.checked_mul(scale).ok_or_else(bad)?;
    if !(1..=MAX_BURST_MS).contains(&ms) {
        return Err(QosError::BurstOutOfRange(ms));
    }
    Ok(Limit::Set(ms))
}

/// `--cache-size`: bytes with an optional K/M/G/T suffix, or `none` (the node's budget only).
pub fn parse_cache_size(text: &str) -> Result<Limit, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("none") {
        return Ok(Limit::None);
    }
    let size: Size = text.parse().map_err(|e| format!("{e}"))?;
    if size.0 < MIN_CACHE_SIZE {
        return Err(QosError::CacheSizeTooSmall(size.0).to_string());
    }
    Ok(Limit::Set(size.0))
}

/// Whether a request may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Go,
    /// Not before this much time has passed.
    Wait(Duration),
}

/// One limit as GCRA: `tat` is when the bucket would be empty (its theoretical arrival
/// time), in nanoseconds since the limiter's origin; a request may go once `tat - tau` has
/// passed, and pushes `tat` on by its cost.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    per_second: u64,
    tau_ns: u64,
    tat_ns: u64,
}

impl Bucket {
    fn new(per_second: u64, burst: Duration, now_ns: u64) -> Bucket {
        Bucket {
            per_second,
            tau_ns: burst.as_nanos() as u64,
            // Starts full: an image whose limits were just set may burst at once.
            tat_ns: now_ns,
        }
    }

    fn ready_at(&self) -> u64 {
        self.tat_ns.saturating_sub(self.tau_ns)
    }

    fn charge(&mut self, now_ns: u64, units: u64) {
        let cost = u128::from(units) * 1_000_000_000 / u128::from(self.per_second);
        let cost = u64::try_from(cost).unwrap_or(u64::MAX);
        self.tat_ns = self.tat_ns.max(now_ns).saturating_add(cost);
    }
}

#[derive(Debug, Default)]
struct State {
    limits: QosLimits,
    iops: Option<Bucket>,
    bps: Option<Bucket>,
}

/// An open image's limiter, shared by all its queues.
pub struct Limiter {
    /// False while the image is unlimited: the request path then reads only this.
    limited: AtomicBool,
    state: Mutex<State>,
    origin: Instant,
    /// Requests that had to wait for tokens, and how long they waited in all.
    throttled: AtomicU64,
    throttled_ns: AtomicU64,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            limited: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            origin: Instant::now(),
            throttled: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
        }
    }
}

impl Limiter {
    pub fn new(limits: &QosLimits) -> Limiter {
        let limiter = Limiter::default();
        limiter.set(limits);
        limiter
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies the image's limits (live: the queues see them at their next request). Limits
    /// that did not change keep their buckets, so an unrelated metadata change does not hand
    /// a throttled image a fresh burst.
    pub fn set(&self, limits: &QosLimits) {
        let mut state = self.state();
        if state.limits == *limits {
            return;
        }
        let now = self.now_ns();
        let burst = limits.burst();
        *state = State {
            limits: *limits,
            iops: limits.iops.map(|n| Bucket::new(n, burst, now)),
            bps: limits.bps.map(|n| Bucket::new(n, burst, now)),
        };
        self.limited.store(!limits.is_unlimited(), Relaxed);
    }

    pub fn limits(&self) -> QosLimits {
        self.state().limits
    }

    /// Whether a request of `bytes` data bytes may go now; if so it is charged.
    pub fn admit(&self, bytes: u64) -> Admission {
        if !self.limited.load(Relaxed) {
            return Admission::Go;
        }
        let now = self.now_ns();
        let mut state = self.state();
        let ready = [state.iops, state.bps]
            .iter()
            .flatten()
            .map(Bucket::ready_at)
            .max()
            .unwrap_or(0);
        if now < ready {
            return Admission::Wait(Duration::from_nanos(ready - now));
        }
        if let Some(bucket) = state.iops.as_mut() {
            bucket.charge(now, 1);
        }
        if let Some(bucket) = state.bps.as_mut() {
            bucket.charge(now, bytes);
        }
        Admission::Go
    }

    /// A request that waited for tokens went at last, after `waited`.
    pub fn record_wait(&self, waited: Duration) {
        self.throttled.fetch_add(1, Relaxed);
        self.throttled_ns
            .fetch_add(waited.as_nanos() as u64, Relaxed);
    }

    /// The limits and what they did, for `stats`.
    pub fn json(&self) -> Value {
        let mut value = self.limits().json();
        value["throttled"] = json!(self.throttled.load(Relaxed));
        value["throttled_us"] = json!(self.throttled_ns.load(Relaxed) / 1000);
        value
    }

    /// The figures a Prometheus scrape shows (0 for no limit, as the exposition has no null).
    pub fn figures(&self) -> QosFigures {
        let limits = self.limits();
        QosFigures {
            iops_limit: limits.iops.unwrap_or(0),
            bps_limit: limits.bps.unwrap_or(0),
            throttled: self.throttled.load(Relaxed),
            throttled_seconds: self.throttled_ns.load(Relaxed) as f64 / 1e9,
        }
    }
}

/// An image's limits and what they did, at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct QosFigures {
    pub iops_limit: u64,
    pub bps_limit: u64,
    pub throttled: u64,
    pub throttled_seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(iops: Option<u64>, bps: Option<u64>, burst_ms: Option<u64>) -> QosLimits {
        QosLimits {
            iops,
            bps,
            burst_ms,
            cache: None,
            tiering: None,
        }
    }

    /// Drives a limiter on a simulated clock (bucket arithmetic only): how many requests of
    /// `bytes` go in `seconds` when each waits exactly as long as it is told.
    fn simulate(limits: &QosLimits, bytes: u64, seconds: u64) -> u64 {
        let burst = limits.burst();
        let mut iops = limits.iops.map(|n| Bucket::new(n, burst, 0));
        let mut bps = limits.bps.map(|n| Bucket::new(n, burst, 0));
        let end = seconds * 1_000_000_000;
        let (mut now, mut sent) = (0u64, 0u64);
        while now < end {
            let ready = [iops, bps]
                .iter()
                .flatten()
                .map(Bucket::ready_at)
                .max()
                .unwrap_or(0);
            now = now.max(ready);
            if let Some(b) = iops.as_mut() {
                b.charge(now, 1);
            }
            if let Some(b) = bps.as_mut() {
                b.charge(now, bytes);
            }
            sent += 1;
        }
        sent
    }

    #[test]
    fn an_iops_bucket_holds_the_rate_after_its_burst() {
        let l = limits(Some(1000), None, None);
        // 10 s at 1000/s, plus the 100 ms burst (100 requests) and the one that starts it.
        let sent = simulate(&l, 4096, 10);
        assert!((10_100..=10_101).contains(&sent), "{sent}");
    }

    #[test]
    fn the_tighter_of_two_limits_wins() {
        // 1000 IOPS but 1 MiB/s of 64 KiB requests: 16 per second.
        let l = limits(Some(1000), Some(1 << 20), Some(1000));
        let sent = simulate(&l, 64 << 10, 10);
        assert!((160..=178).contains(&sent), "{sent}");
    }

    #[test]
    fn a_request_larger_than_the_burst_passes_and_is_paid_for() {
        // 4 KiB/s with a 1 ms burst (4 bytes): a 64 KiB request still goes, then the next
        // waits the 16 s it cost.
        let limiter = Limiter::new(&limits(None, Some(4096), Some(1)));
        assert_eq!(limiter.admit(64 << 10), Admission::Go);
        match limiter.admit(4096) {
            Admission::Wait(d) => assert!(d > Duration::from_secs(15), "{d:?}"),
            Admission::Go => panic!("the debt was not charged"),
        }
    }

    #[test]
    fn unlimited_images_always_go_and_a_change_applies_at_once() {
        let limiter = Limiter::default();
        for _ in 0..10_000 {
            assert_eq!(limiter.admit(1 << 20), Admission::Go);
        }
        limiter.set(&limits(Some(1), None, Some(1)));
        assert_eq!(limiter.admit(0), Admission::Go, "the burst's one request");
        assert!(matches!(limiter.admit(0), Admission::Wait(_)));
        limiter.set(&QosLimits::default());
        assert_eq!(limiter.admit(0), Admission::Go);
    }

    #[test]
    fn an_unchanged_setting_keeps_its_bucket() {
        let l = limits(Some(1), None, Some(1));
        let limiter = Limiter::new(&l);
        assert_eq!(limiter.admit(0), Admission::Go);
        limiter.set(&l);
        assert!(matches!(limiter.admit(0), Admission::Wait(_)));
    }

    #[test]
    fn cache_settings_update_and_store() {
        let none = QosLimits::default();
        let ram = QosUpdate {
            cache: Some(CacheMode::Ram),
            cache_size: Some(Limit::Set(64 << 20)),
            ..QosUpdate::default()
        };
        let with = none.updated(&ram).unwrap();
        assert_eq!(
            with.cache,
            Some(CachePolicy {
                tier: crate::image::Tier::Ram,
                size: Some(64 << 20)
            })
        );
        assert!(with.is_unlimited() && !with.is_default());
        let text = serde_json::to_string(&with).unwrap();
        assert_eq!(serde_json::from_str::<QosLimits>(&text).unwrap(), with);
        let volume = QosUpdate {
            cache: Some(CacheMode::Volume),
            ..QosUpdate::default()
        };
        let moved = with.updated(&volume).unwrap();
        assert_eq!(moved.cache.unwrap().size, Some(64 << 20), "the cap stays");
        let off = QosUpdate {
            cache: Some(CacheMode::Off),
            ..QosUpdate::default()
        };
        assert!(moved.updated(&off).unwrap().is_default());
        let size_only = QosUpdate {
            cache_size: Some(Limit::Set(1 << 20)),
            ..QosUpdate::default()
        };
        assert_eq!(
            none.updated(&size_only),
            Err(QosError::CacheSizeWithoutCache)
        );
        assert!(parse_cache_size("1").is_err());
        assert_eq!(parse_cache_size("none"), Ok(Limit::None));
        assert_eq!(parse_cache_size("8M"), Ok(Limit::Set(8 << 20)));
    }

    /// `auto` is stored and shown; `manual` is stored as nothing (the default), and other
    /// settings leave it alone.
    #[test]
    fn tiering_updates_and_stores() {
        let auto = QosUpdate {
            tiering: Some(TierMode::Auto),
            ..QosUpdate::default()
        };
        let with = QosLimits::default().updated(&auto).unwrap();
        assert_eq!(with.tiering, Some(TierMode::Auto));
        assert!(!with.is_default());
        assert_eq!(with.json()["tiering"], "auto");
        let text = serde_json::to_string(&with).unwrap();
        assert!(text.contains(r#""tiering":"auto""#), "{text}");
        assert_eq!(serde_json::from_str::<QosLimits>(&text).unwrap(), with);
        let limited = with.updated(&QosUpdate {
            iops: Some(Limit::Set(100)),
            ..QosUpdate::default()
        });
        assert_eq!(limited.unwrap().tiering, Some(TierMode::Auto));
        let manual = QosUpdate {
            tiering: Some(TierMode::Manual),
            ..QosUpdate::default()
        };
        let back = with.updated(&manual).unwrap();
        assert!(back.is_default());
        assert_eq!(back.json()["tiering"], "manual");
        assert!(!manual.is_empty());
    }

    #[test]
    fn updates_are_checked() {
        let none = QosLimits::default();
        let set = |iops, bps, burst| QosUpdate {
            iops,
            bps,
            burst_ms: burst,
            ..QosUpdate::default()
        };
        assert_eq!(
            none.updated(&set(Some(Limit::Set(0)), None, None)),
            Err(QosError::ZeroIops)
        );
        assert_eq!(
            none.updated(&set(None, Some(Limit::Set(100)), None)),
            Err(QosError::BpsOutOfRange(100))
        );
        assert_eq!(
            none.updated(&set(None, None, Some(Limit::Set(50)))),
            Err(QosError::BurstWithoutLimit)
        );
        let a = none
            .updated(&set(Some(Limit::Set(500)), Some(Limit::Set(1 << 20)), None))
            .unwrap();
        assert_eq!(a, limits(Some(500), Some(1 << 20), None));
        let b = a.updated(&set(Some(Limit::None), None, None)).unwrap();
        assert_eq!(b, limits(None, Some(1 << 20), None));
    }

    #[test]
    fn command_line_values_parse_with_clear_errors() {
        assert_eq!(parse_iops("500"), Ok(Limit::Set(500)));
        assert_eq!(parse_iops("none"), Ok(Limit::None));
        assert_eq!(parse_iops("0"), Err(QosError::ZeroIops));
        assert!(matches!(parse_iops("5k"), Err(QosError::BadIops(_))));
        assert_eq!(
            parse_iops("99999999999"),
            Err(QosError::IopsTooHigh(99_999_999_999))
        );
        assert_eq!(parse_bps("8M"), Ok(Limit::Set(8 << 20)));
        assert!(matches!(parse_bps("8X"), Err(QosError::BadBps(_))));
        assert_eq!(parse_bps("0"), Err(QosError::ZeroBps));
        assert_eq!(parse_burst("250ms"), Ok(Limit::Set(250)));
        assert_eq!(parse_burst("2s"), Ok(Limit::Set(2000)));
        assert_eq!(parse_burst("default"), Ok(Limit::None));
        assert!(matches!(parse_burst("250"), Err(QosError::BadBurst(_))));
        assert_eq!(parse_burst("0ms"), Err(QosError::BurstOutOfRange(0)));
    }

    #[test]
    fn stored_limits_round_trip_and_old_records_read_as_unlimited() {
        let l = limits(Some(500), None, Some(200));
        let text = serde_json::to_string(&l).unwrap();
        assert_eq!(text, r#"{"iops":500,"burst_ms":200}"#);
        assert_eq!(serde_json::from_str::<QosLimits>(&text).unwrap(), l);
        assert_eq!(
            serde_json::from_str::<QosLimits>("{}").unwrap(),
            QosLimits::default()
        );
    }
}
