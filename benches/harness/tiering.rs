//! Issue 13 part 3: heat tiering. One daemon with `--ram-budget`, two 1 GiB images with
//! the same data: `hot`, on the volume tier and turned `--tier auto` when the load starts,
//! and `ramref`, wholly on the RAM tier. 4 KiB random reads at QD32 over the first 64 MiB
//! (the working set). Each second of the [`SECONDS`]-second series runs the load on `hot`
//! for half a second and on `ramref` for half a second, in turn first (one connection to
//! each, kept open): each second's ratio compares two measurements a moment apart, so the load other
//! work puts on a shared machine weighs on both alike. Before the series, `hot` (still all on
//! the volume tier, its data in the page cache) against `ramref` the same way shows what the
//! tiers differ by on this machine.
//!
//! The volume tier is the harness's `--volume-dir` (default `target/bench-work`, on the
//! root file system): its page cache is dropped for `hot`'s files before the series, so the
//! first reads come from the disk; once read they are in the page cache, so the gap between
//! the tiers is the gap between a page-cache read through io_uring and a tmpfs read inline.

use std::path::Path;
use std::time::{Duration, Instant};

use cormorant_frontend::{BlkClient, ClientOptions};

use crate::load::{self, LoadSpec, Pattern};
use crate::procs::{self, io_ctx, Cormorant, ProcError};
use crate::report::Figure;
use crate::resources::figure;
use crate::{Ctx, Tier};

/// The image: large enough that the working set is a small part of it.
const IMAGE: u64 = 1 << 30;
/// The working set the reads cover, from offset 0.
const WORKING_SET: u64 = 64 << 20;
/// The node's RAM budget for auto images: twice the working set, far below the image.
const BUDGET: u64 = 128 << 20;
/// Seconds of the series (the target: 0.9x within 30 s).
const SECONDS: u32 = 30;
/// Requests in flight, one queue: the backend cases' main random-read load.
const QD: u16 = 32;

fn spec(runtime: Duration, warmup: Duration) -> LoadSpec {
    LoadSpec {
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: QD,
        queues: 1,
        runtime,
        warmup,
        span: WORKING_SET,
        client_poll: false,
        inflight: false,
    }
}

fn load_err(what: &str) -> impl FnOnce(load::LoadError) -> ProcError + '_ {
    move |e| ProcError::Command {
        cmd: what.to_string(),
        stderr: e.to_string(),
    }
}

/// Drops the page cache of every file under `dir`, so its next reads come from the disk.
fn drop_dir_cache(dir: &Path) -> Result<(), ProcError> {
    for e in std::fs::read_dir(dir).map_err(io_ctx(format!("list {}", dir.display())))? {
        let e = e.map_err(io_ctx("list entry"))?;
        let ft = e.file_type().map_err(io_ctx("file type"))?;
        if ft.is_dir() {
            drop_dir_cache(&e.path())?;
        } else if ft.is_file() {
            procs::drop_cache(&e.path())?;
        }
    }
    Ok(())
}

/// Bytes allocated by the files under `dir` whose path contains `part` (the RAM tier's use).
fn allocated(dir: &Path, part: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated(&e.path(), part),
            Ok(m) if e.path().to_string_lossy().contains(part) => m.blocks() * 512,
            _ => 0,
        })
        .sum()
}

/// One second of the series.
struct Sample {
    /// Seconds since the image was turned auto, at the end of the sample.
    at: f64,
    iops: f64,
    /// The RAM-tier image's IOPS right after.
    reference: f64,
    /// What the daemon counts against the budget (stats: tiering.ram_used).
    ram_used: u64,
    /// What the image's RAM-tier files take on tmpfs.
    ram_files: u64,
}

fn ram_used(d: &Cormorant) -> u64 {
    let out = d.cli(&["stats"]).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["tiering"]["ram_used"].as_u64())
        .unwrap_or(0)
}

pub fn run(ctx: &Ctx, figures: &mut Vec<Figure>, notes: &mut Vec<String>) -> Result<(), ProcError> {
    if !ctx.selected("tiering") {
        return Ok(());
    }
    eprintln!("== tiering");
    let ram = procs::work_dir(ctx.tier_dir(Tier::Ram), "tiering")?;
    let vol = procs::work_dir(ctx.tier_dir(Tier::Volume), "tiering")?;
    let (ram_dir, vol_dir) = (ram.path().join("ram"), vol.path().join("vol"));
    let budget = format!("{}M", BUDGET >> 20);
    let extra = ["--ram-budget", &budget].map(String::from).to_vec();
    let mut d = Cormorant::start_with(
        &ctx.cormorant_bin,
        vol.path(),
        &ram_dir,
        &vol_dir,
        true,
        &extra,
    )?;
    let hot = d.create_image("hot", IMAGE, "volume")?;
    let reference = d.create_image("ramref", IMAGE, "ram")?;
    crate::stripe::fill(&hot, IMAGE)?;
    crate::stripe::fill(&reference, IMAGE)?;
    let half = spec(Duration::from_millis(500), Duration::ZERO);
    let connect = |socket: &Path| {
        BlkClient::connect(socket, &ClientOptions::default()).map_err(|e| ProcError::Command {
            cmd: format!("connect {}", socket.display()),
            stderr: e.to_string(),
        })
    };
    let mut hot_client = connect(&hot)?;
    let mut ref_client = connect(&reference)?;
    // Which image goes first alternates, so neither always follows the other's load.
    let mut turn = 0u32;
    let mut pair = |hot_client: &mut BlkClient| -> Result<(f64, f64, u64), ProcError> {
        turn += 1;
        let (h, r) = if turn % 2 == 1 {
            let h = load::run_on(hot_client, &half).map_err(load_err("hot"))?;
            (
                h,
                load::run_on(&mut ref_client, &half).map_err(load_err("ramref"))?,
            )
        } else {
            let r = load::run_on(&mut ref_client, &half).map_err(load_err("ramref"))?;
            (load::run_on(hot_client, &half).map_err(load_err("hot"))?, r)
        };
        Ok((h.iops, r.iops, h.errors + r.errors))
    };
    // The tiers' difference here: `hot` still all on the volume tier (in the page cache).
    let mut volume = Vec::new();
    for _ in 0..4 {
        volume.push(pair(&mut hot_client)?);
    }
    drop_dir_cache(&vol_dir)?;
    d.cli(&["image", "set", "hot", "--tier", "auto"])?;
    let start = Instant::now();
    let mut series = Vec::new();
    let mut errors = 0;
    for _ in 0..SECONDS {
        let (iops, reference, e) = pair(&mut hot_client)?;
        errors += e;
        series.push(Sample {
            at: start.elapsed().as_secs_f64(),
            iops,
            reference,
            ram_used: ram_used(&d),
            ram_files: allocated(&ram_dir, "hot@"),
        });
    }
    let _ = hot_client.close();
    let _ = ref_client.close();
    let ratio = |s: &Sample| s.iops / s.reference.max(f64::MIN_POSITIVE);
    let volume_ratio = median(
        volume
            .iter()
            .map(|v| v.0 / v.1.max(f64::MIN_POSITIVE))
            .collect(),
    );
    let settled_median = median(series.iter().rev().take(10).map(ratio).collect());
    let base = series.iter().map(|s| s.reference).sum::<f64>() / f64::from(SECONDS);
    let reached = series.iter().find(|s| ratio(s) >= 0.9).map(|s| s.at);
    let last: Vec<&Sample> = series.iter().rev().take(5).collect();
    let settled = last.iter().map(|s| s.iops).sum::<f64>()
        / last
            .iter()
            .map(|s| s.reference)
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
    let first = series.first().map_or(0.0, ratio);
    let peak_used = series.iter().map(|s| s.ram_used).max().unwrap_or(0);
    let peak_files = series.iter().map(|s| s.ram_files).max().unwrap_or(0);
    figures.push(figure(
        "tiering: 4K randread QD32, RAM-tier image (mean of the series' halves)",
        "cormorant",
        base,
        "IOPS",
        None,
    ));
    figures.push(figure(
        "tiering: the image all on the volume tier (page cache warm) vs RAM tier, before \
         (median of 4 half-second pairs)",
        "cormorant",
        volume_ratio,
        "x",
        None,
    ));
    figures.push(figure(
        "tiering: auto image, first second (volume tier, page cache dropped) vs RAM tier",
        "cormorant",
        first,
        "x",
        None,
    ));
    figures.push(figure(
        "tiering: auto image, last 5 s of 30 vs RAM tier",
        "cormorant",
        settled,
        "x",
        Some((">= 0.9x within 30 s", reached.is_some())),
    ));
    figures.push(figure(
        "tiering: auto image vs RAM tier, median of the last 10 per-second ratios",
        "cormorant",
        settled_median,
        "x",
        None,
    ));
    figures.push(figure(
        "tiering: seconds until a second at >= 0.9x the RAM tier (-1: none)",
        "cormorant",
        reached.unwrap_or(-1.0),
        "s",
        Some(("<= 30 s", reached.is_some_and(|t| t <= 30.0))),
    ));
    figures.push(figure(
        &format!(
            "tiering: RAM counted against the {} MiB budget, peak",
            BUDGET >> 20
        ),
        "cormorant",
        peak_used as f64 / f64::from(1 << 20),
        "MiB",
        Some(("within the budget", peak_used <= BUDGET)),
    ));
    figures.push(figure(
        "tiering: the auto image's RAM-tier files on tmpfs, peak",
        "cormorant",
        peak_files as f64 / f64::from(1 << 20),
        "MiB",
        Some(("within the budget", peak_files <= BUDGET)),
    ));
    let timeline: Vec<String> = series
        .iter()
        .map(|s| {
            format!(
                "{:.1}s {:.0}/{:.0} ({:.2}x)",
                s.at,
                s.iops,
                s.reference,
                ratio(s)
            )
        })
        .collect();
    notes.push(format!(
        "tiering: per second, the auto image's IOPS / the RAM-tier image's (ratio), half a \
         second each: {}",
        timeline.join(", ")
    ));
    if errors > 0 {
        notes.push(format!(
            "tiering: {errors} read errors; the daemon's log: {}",
            d.log_errors(4).join(" / ")
        ));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    notes.push(format!(
        "tiering: load average after the series {} (2 CPUs shared with other work: the \
         half-second pairs make each ratio compare like with like, but not every pair)",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let info = d.cli(&["stats", "hot"]).unwrap_or_default();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&info) {
        notes.push(format!("tiering: stats hot .tiering = {}", v["tiering"]));
    }
    d.stop();
    drop((ram, vol));
    Ok(())
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}
