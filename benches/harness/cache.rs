//! Issue 12 part 2's cases, on the cluster group's nodes: the "remote" image (every block on
//! node b only) with cache copies on node a, against the "local" one (every block on a).
//!
//! - Warm remote reads: one sequential pass fills a's cache with the whole image (it fits
//!   the RAM budget the cluster group gives a), then 4K random reads at QD32 measured against
//!   the same reads of the local image (target >= 0.9x).
//! - Sequential 1 MiB reads at QD8 with read-ahead: the image's cache cap is an eighth of the
//!   image, so the looping sequential load never finds a warm cache (least recently used
//!   goes first) and only read-ahead can keep up; against the same reads of the local image
//!   (target >= 0.9x), and the same remote reads with the cache off. Also at QD1.

use crate::load::{self, LoadSpec, Pattern};
use crate::procs::{Cormorant, ProcError};
use crate::report::Figure;
use crate::resources::figure;

/// The RAM-tier cache budget the cluster group's nodes get: room for the whole 256 MiB image.
pub const BUDGET_RAM: &str = "512M";

/// Runs the cases; `spec(pattern, bs, qd)` is the cluster group's load of the image's span.
pub fn run(
    a: &Cormorant,
    spec: &dyn Fn(Pattern, u32, u16) -> LoadSpec,
    figures: &mut Vec<Figure>,
) -> Result<(), ProcError> {
    let system = "cormorant";
    let measure = |name: &str, s: &LoadSpec| {
        load::run(&a.socket(name), s).map_err(|e| ProcError::Command {
            cmd: format!("{} on {name}", s.label()),
            stderr: e.to_string(),
        })
    };
    // Warm: fill the cache with one sequential pass, then random reads.
    a.cli(&[
        "image",
        "set",
        "remote",
        "--cache",
        "ram",
        "--cache-size",
        "none",
    ])?;
    measure("remote", &spec(Pattern::Read, 1 << 20, 8))?;
    let read = spec(Pattern::RandRead, 4096, 32);
    let (local, warm) = (measure("local", &read)?, measure("remote", &read)?);
    figures.push(ratio(
        "warm remote (cached) 4K randread QD32 vs local: IOPS",
        Some(0.9),
        warm.iops,
        local.iops,
    ));
    figures.push(figure(
        "warm remote (cached) 4K randread QD32: IOPS",
        system,
        warm.iops,
        "IOPS",
        None,
    ));

    // Sequential with read-ahead: a cap far below the span keeps the cache cold.
    a.cli(&["image", "set", "remote", "--cache", "off"])?;
    let seq = spec(Pattern::Read, 1 << 20, 8);
    let (local, off) = (measure("local", &seq)?, measure("remote", &seq)?);
    a.cli(&[
        "image",
        "set",
        "remote",
        "--cache",
        "ram",
        "--cache-size",
        "32M",
    ])?;
    let ahead = measure("remote", &seq)?;
    figures.push(ratio(
        "remote 1M seqread QD8 with read-ahead vs local: MB/s",
        Some(0.9),
        ahead.mbps,
        local.mbps,
    ));
    figures.push(ratio(
        "remote 1M seqread QD8 without cache vs local: MB/s",
        None,
        off.mbps,
        local.mbps,
    ));
    for (case, r) in [
        ("local", &local),
        ("remote, cache off", &off),
        ("remote, read-ahead", &ahead),
    ] {
        let name = format!("{case} 1M seqread QD8: MB/s");
        figures.push(figure(&name, system, r.mbps, "MB/s", None));
    }
    // The same at QD1, where read-ahead has the guest's latency to hide.
    a.cli(&["image", "set", "remote", "--cache", "off"])?;
    let seq1 = spec(Pattern::Read, 1 << 20, 1);
    let (local1, off1) = (measure("local", &seq1)?, measure("remote", &seq1)?);
    a.cli(&[
        "image",
        "set",
        "remote",
        "--cache",
        "ram",
        "--cache-size",
        "32M",
    ])?;
    let ahead1 = measure("remote", &seq1)?;
    figures.push(ratio(
        "remote 1M seqread QD1 with read-ahead vs local: MB/s",
        Some(0.9),
        ahead1.mbps,
        local1.mbps,
    ));
    for (case, r) in [
        ("local", &local1),
        ("remote, cache off", &off1),
        ("remote, read-ahead", &ahead1),
    ] {
        let name = format!("{case} 1M seqread QD1: MB/s");
        figures.push(figure(&name, system, r.mbps, "MB/s", None));
    }
    a.cli(&["image", "set", "remote", "--cache", "off"])?;
    Ok(())
}

/// A ratio figure, against `target` when it has one.
fn ratio(label: &str, target: Option<f64>, remote: f64, local: f64) -> Figure {
    let r = remote / local.max(1.0);
    let judged = target.map(|t| (">= 0.9x", r >= t));
    figure(label, "cormorant", r, "x", judged)
}
