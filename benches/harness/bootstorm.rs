//! Issue 13 part 2, the boot storm: one golden image filled with data on the RAM tier, a
//! snapshot of it, and 32 clones of the snapshot created and opened at once, then read by 32
//! VM-less clients together (sequential 1 MiB and random 4 KiB reads), against one client
//! reading the full golden image alone in the same run. Then the RAM the clones cost (the RAM
//! tier's allocated bytes and the daemon's own memory) after each wrote 1 MiB, against 32 full
//! copies; and as many TCG guests as the machine boots at once, each from a clone of its own.
//!
//! What the targets mean on one machine: the 32 clients and the daemon share its cores, so the
//! throughput ratio shows whether 32 images reading one set of shared block files cost more
//! than one image reading its own (lock contention, cache misses), not how a fleet of hosts
//! would do.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use cormorant_frontend::{BlkClient, ClientOptions};

use crate::common::guest::{Disk, Guest, GuestImage, GuestOpts, RunningGuest};
use crate::load::{self, LoadResult, LoadSpec, Pattern};
use crate::procs::{self, io_ctx, Cormorant, ProcError};
use crate::report::{Figure, Measurement};
use crate::resources::figure;
use crate::{Ctx, Suite, Tier};

/// Clones in the storm (the figure).
const CLONES: usize = 32;
/// Largest golden image: the "filled 1 GiB image" (the smoke suite's span is smaller).
const GOLDEN_MAX: u64 = 1 << 30;
/// What each clone writes after the reads, so the written blocks in the RAM figure are real:
/// 1 MiB, 1 MiB-aligned and so inside one block, which copies that whole block up.
const WRITE_BYTES: u32 = 1 << 20;
/// Target: all clones created and connected within this (issue 13).
const CREATE_TARGET_MS: f64 = 1000.0;
/// Target: the clients' aggregate throughput at least this share of one client on a full image.
const THROUGHPUT_TARGET: f64 = 0.9;
/// Target: RAM used at most this multiple of one copy plus the written blocks.
const RAM_TARGET: f64 = 1.1;
/// Most queues of the wide baseline client (one per core).
const MAX_WIDE_QUEUES: u16 = 16;
/// Guests boot from clones at once: at least this many (the minimum).
const MIN_GUESTS: usize = 4;
/// Guest RAM in MiB: the busybox initramfs needs little, and the host holds every guest's.
const GUEST_MIB: u32 = 256;
/// What each guest reads of its disk (from offset 0) before it prints its marker: a boot reads
/// its kernel, initramfs and the first files, tens of MiB.
const GUEST_READ_MIB: u64 = 64;
/// Printed by a guest once it has read its disk.
const GUEST_MARKER: &str = "CORMORANT-STORM-READ";
/// What a whole boot of all guests may take before it counts as failed (TCG on a few cores).
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// The loads each client runs, storm and baseline alike: sequential 1 MiB reads with a few in
/// flight (a booting guest's read-ahead), and random 4 KiB reads with several in flight.
fn specs(ctx: &Ctx, span: u64) -> [LoadSpec; 2] {
    let spec = |pattern, bs, qd| LoadSpec {
        pattern,
        bs,
        qd,
        queues: 1,
        runtime: ctx.params.runtime,
        warmup: ctx.params.warmup,
        span,
        client_poll: false,
        inflight: false,
    };
    [
        spec(Pattern::Read, 1 << 20, 4),
        spec(Pattern::RandRead, 4096, 8),
    ]
}

fn fail(what: impl Into<String>, e: impl std::fmt::Display) -> ProcError {
    ProcError::Command {
        cmd: what.into(),
        stderr: e.to_string(),
    }
}

pub fn run(
    ctx: &Ctx,
    out: &mut Vec<Measurement>,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<(), ProcError> {
    if !ctx.selected("bootstorm") {
        return Ok(());
    }
    eprintln!("== bootstorm");
    let ram = procs::work_dir(ctx.tier_dir(Tier::Ram), "bootstorm")?;
    let vol = procs::work_dir(ctx.tier_dir(Tier::Volume), "bootstorm")?;
    let tier_dir = ram.path().join("tier");
    let mut c = Cormorant::start(
        &ctx.cormorant_bin,
        vol.path(),
        &tier_dir,
        &vol.path().join("vol"),
        true,
    )?;
    let span = ctx.params.span.min(GOLDEN_MAX);
    let gold = c.create_image("gold", span, "ram")?;
    fill(&gold, span)?;
    c.cli(&["image", "snapshot", "gold", "base"])?;
    let golden_bytes = tier_used(&tier_dir)?;
    let specs = specs(ctx, span);

    let (names, mut clients) =
        clone_and_connect(&mut c, &load::client_options(&specs[0]), figures)?;
    for spec in &specs {
        read_storm(ctx, &gold, &mut clients, spec, out, figures, notes)?;
    }
    control(&mut c, &mut clients, &specs, span / CLONES as u64, figures)?;

    let written = write_each(&mut clients)?;
    let copied = copied_up(&c, &names)?;
    // With the clients still connected: the daemon holds 32 open images and their queues.
    report_ram(&c, &tier_dir, golden_bytes, written, copied, figures)?;
    drop(clients);
    notes.push(format!(
        "bootstorm: each of the {CLONES} clients (threads of the harness, one queue each) reads \
         its own clone of a {} MiB golden image for the suite's run time; the storm row sums \
         their rates, its latencies are the median client's (max: the worst client's); the \
         baseline reads the golden image itself (a full, non-clone image of the same content)",
        span >> 20
    ));

    if ctx.params.suite == Suite::Smoke {
        notes.push("bootstorm: TCG guests run in the quick and full suites only".into());
    } else {
        guests(&mut c, ram.path(), span, figures, notes)?;
    }
    c.stop();
    Ok(())
}

/// Creates the clones one after another through the CLI, then connects a client to each:
/// both timed, together as the figure.
fn clone_and_connect(
    c: &mut Cormorant,
    opts: &ClientOptions,
    figures: &mut Vec<Figure>,
) -> Result<(Vec<String>, Vec<BlkClient>), ProcError> {
    let t0 = Instant::now();
    let mut names = Vec::new();
    for n in 0..CLONES {
        let name = format!("vm{n}");
        c.cli(&["image", "clone", "gold@base", &name, "--tier", "ram"])?;
        names.push(name);
    }
    let cloned_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut clients = Vec::new();
    for name in &names {
        let sock = c.wait_socket(name)?;
        clients
            .push(BlkClient::connect(&sock, opts).map_err(|e| fail(format!("connect {name}"), e))?);
    }
    let opened_ms = t0.elapsed().as_secs_f64() * 1e3;
    figures.extend([
        figure(
            &format!("boot storm: {CLONES} `image clone` commands, one after another"),
            "cormorant",
            cloned_ms,
            "ms",
            None,
        ),
        figure(
            &format!("boot storm: {CLONES} clones created and connected"),
            "cormorant",
            opened_ms,
            "ms",
            Some(("< 1000 ms", opened_ms < CREATE_TARGET_MS)),
        ),
    ]);
    Ok((names, clients))
}

/// One spec: on every clone at once, then the baselines on the golden image. The issue's
/// baseline is one client, whose one queue is served by one daemon thread; the same client
/// with a queue per core shows what the machine gives one image.
fn read_storm(
    ctx: &Ctx,
    gold: &Path,
    clients: &mut [BlkClient],
    spec: &LoadSpec,
    out: &mut Vec<Measurement>,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<(), ProcError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = u16::try_from(cores)
        .unwrap_or(u16::MAX)
        .min(MAX_WIDE_QUEUES);
    let storm = storm(clients, spec)?;
    let base = on_gold(gold, spec)?;
    let wide = LoadSpec {
        queues: cores,
        ..spec.clone()
    };
    let wide = (cores > 1).then(|| on_gold(gold, &wide)).transpose()?;
    let loads = Loads {
        storm: &storm,
        base: &base,
        wide: wide.as_ref().map(|w| (cores, w)),
    };
    report_loads(ctx, spec, &loads, out, figures, notes);
    Ok(())
}

/// Writes the golden image through a client, every 1 MiB chunk different and non-zero
/// (`procs::fill_chunk`), so every read of it reads real data.
fn fill(socket: &Path, span: u64) -> Result<(), ProcError> {
    let what = || format!("fill {}", socket.display());
    let mut client =
        BlkClient::connect(socket, &Default::default()).map_err(|e| fail(what(), e))?;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..span >> 20 {
        procs::fill_chunk(&mut chunk, i);
        let status = client
            .write(0, i << 11, &chunk)
            .map_err(|e| fail(what(), e))?;
        if status != 0 {
            return Err(fail(what(), format!("write status {status}")));
        }
    }
    match client.flush(0).map_err(|e| fail(what(), e))? {
        0 => Ok(()),
        status => Err(fail(what(), format!("flush status {status}"))),
    }
}

/// Bytes allocated under `dir`, each inode once: a snapshot's hard links to its image's block
/// files cost nothing. Counted per directory rather than by the tmpfs's statfs, which other
/// users of /dev/shm change under us.
fn tier_used(dir: &Path) -> Result<u64, ProcError> {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_ctx(format!("list {}", d.display())))? {
            let meta = entry
                .and_then(|e| e.metadata().map(|m| (e.path(), m)))
                .map_err(io_ctx("stat a tier file"))?;
            if meta.1.is_dir() {
                stack.push(meta.0);
            } else if seen.insert((meta.1.dev(), meta.1.ino())) {
                total += meta.1.blocks() * 512;
            }
        }
    }
    Ok(total)
}

/// Runs `spec` on every client at once (their warm-ups start together behind a barrier);
/// one result per client.
fn storm(clients: &mut [BlkClient], spec: &LoadSpec) -> Result<Vec<LoadResult>, ProcError> {
    let barrier = Barrier::new(clients.len());
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter_mut()
            .map(|client| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    load::run_on(client, spec)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(load::LoadError::Spec("client thread panicked".into())))
            })
            .collect()
    });
    results
        .into_iter()
        .enumerate()
        .map(|(n, r)| r.map_err(|e| fail(format!("{} on vm{n}", spec.label()), e)))
        .collect()
}

/// The median and the largest of `values`.
fn median_max(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let median = values.get(values.len() / 2).copied().unwrap_or(0.0);
    (median, values.last().copied().unwrap_or(0.0))
}

/// The storm as one measurement (summed rates; each latency the median client's, the max the
/// worst client's) beside the baseline, and the figures of the targets.
fn on_gold(gold: &Path, spec: &LoadSpec) -> Result<LoadResult, ProcError> {
    load::run(gold, spec).map_err(|e| fail(format!("{} on gold", spec.label()), e))
}

/// What one spec measured: each client of the storm, the baseline (one client, one
/// queue, on the full image) and the same client with `wide.0` queues.
struct Loads<'a> {
    storm: &'a [LoadResult],
    base: &'a LoadResult,
    wide: Option<(u16, &'a LoadResult)>,
}

fn report_loads(
    ctx: &Ctx,
    spec: &LoadSpec,
    loads: &Loads<'_>,
    out: &mut Vec<Measurement>,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) {
    let (storm, base) = (loads.storm, loads.base);
    let (p50, _) = median_max(storm.iter().map(|r| r.lat_p50_us).collect());
    let (p99, worst_p99) = median_max(storm.iter().map(|r| r.lat_p99_us).collect());
    let (p999, _) = median_max(storm.iter().map(|r| r.lat_p999_us).collect());
    let (mean, _) = median_max(storm.iter().map(|r| r.lat_mean_us).collect());
    let (_, max) = median_max(storm.iter().map(|r| r.lat_max_us).collect());
    let aggregate = LoadResult {
        ops: storm.iter().map(|r| r.ops).sum(),
        errors: storm.iter().map(|r| r.errors).sum(),
        seconds: base.seconds,
        iops: storm.iter().map(|r| r.iops).sum(),
        mbps: storm.iter().map(|r| r.mbps).sum(),
        lat_mean_us: mean,
        lat_p50_us: p50,
        lat_p99_us: p99,
        lat_p999_us: p999,
        lat_max_us: max,
    };
    let case = format!("{} per client", spec.label());
    let group = "bootstorm ram";
    let mut rows = vec![
        ("cormorant".to_string(), &aggregate),
        ("1 client, full image".to_string(), base),
    ];
    if let Some((queues, wide)) = loads.wide {
        rows.push((format!("1 client x{queues} queues, full image"), wide));
        let ratio = aggregate.mbps / wide.mbps.max(f64::MIN_POSITIVE);
        figures.push(figure(
            &format!(
                "boot storm {}: aggregate / 1 client with {queues} queues on the full image",
                spec.label()
            ),
            "cormorant",
            ratio,
            "x",
            None,
        ));
    }
    for (system, r) in rows {
        let m = Measurement::new(group, &case, &system, r.clone());
        ctx.progress(&m);
        out.push(m);
    }
    if aggregate.errors + base.errors > 0 {
        notes.push(format!(
            "bootstorm {case}: {} errors in the storm, {} in the baseline",
            aggregate.errors, base.errors
        ));
    }
    let ratio = aggregate.mbps / base.mbps.max(f64::MIN_POSITIVE);
    let name = |what: &str| format!("boot storm {}: {what}", spec.label());
    figures.extend([
        figure(
            &name(&format!("{CLONES} clients on clones, aggregate")),
            "cormorant",
            aggregate.mbps,
            "MB/s",
            None,
        ),
        figure(
            &name("1 client on the full image"),
            "cormorant",
            base.mbps,
            "MB/s",
            None,
        ),
        figure(
            &name("aggregate / 1 client on the full image"),
            "cormorant",
            ratio,
            "x",
            Some((">= 0.9x", ratio >= THROUGHPUT_TARGET)),
        ),
        figure(
            &name("per-client p50, median client"),
            "cormorant",
            p50,
            "us",
            None,
        ),
        figure(
            &name("per-client p99, median client"),
            "cormorant",
            p99,
            "us",
            None,
        ),
        figure(
            &name("per-client p99, worst client"),
            "cormorant",
            worst_p99,
            "us",
            None,
        ),
    ]);
}

/// Each client writes [`WRITE_BYTES`] at an aligned offset of its own (spread over the image,
/// inside one block) and flushes; returns the bytes written.
fn write_each(clients: &mut [BlkClient]) -> Result<u64, ProcError> {
    let data = vec![0xa5u8; WRITE_BYTES as usize];
    for (n, client) in clients.iter_mut().enumerate() {
        let blocks = client.config().capacity_bytes() / u64::from(WRITE_BYTES);
        let sector = (n as u64 * 7919 % blocks) * u64::from(WRITE_BYTES) / 512;
        let what = || format!("write to vm{n}");
        let status = client
            .write(0, sector, &data)
            .map_err(|e| fail(what(), e))?;
        let flushed = client.flush(0).map_err(|e| fail(what(), e))?;
        if status != 0 || flushed != 0 {
            return Err(fail(what(), format!("status {status}, flush {flushed}")));
        }
    }
    Ok(clients.len() as u64 * u64::from(WRITE_BYTES))
}

/// Bytes of the blocks the clones copied up (their own blocks, whole), from `image info`.
fn copied_up(c: &Cormorant, names: &[String]) -> Result<u64, ProcError> {
    let mut total = 0;
    for name in names {
        let text = c.cli(&["image", "info", name])?;
        let info: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fail(format!("image info {name}"), e))?;
        let own = info["own_blocks"].as_u64().unwrap_or(0);
        total += own * info["block_size"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

/// KiB of the daemon's own memory: anonymous and file-backed resident pages (heap, stacks,
/// binary), leaving out the shared pages of the clients' guest memory it maps (`RssShmem`),
/// which are the VMs' RAM, not storage.
fn own_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    kib("RssAnon:") + kib("RssFile:")
}

/// RAM used by the clones against one copy plus the written blocks, and against 32 copies.
fn report_ram(
    c: &Cormorant,
    tier_dir: &Path,
    golden: u64,
    written: u64,
    copied: u64,
    figures: &mut Vec<Figure>,
) -> Result<(), ProcError> {
    let tier = tier_used(tier_dir)?;
    let rss = own_rss_kib(c.pid()) * 1024;
    let used = tier + rss;
    let one_copy = golden + copied;
    let ratio = used as f64 / one_copy as f64;
    let full_copies = CLONES as u64 * golden + copied;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let name = |what: &str| format!("boot storm RAM: {what}");
    figures.extend([
        figure(
            &name("golden image on the RAM tier"),
            "cormorant",
            mib(golden),
            "MiB",
            None,
        ),
        figure(
            &name(&format!("written by the {CLONES} clones")),
            "cormorant",
            mib(written),
            "MiB",
            None,
        ),
        figure(
            &name("blocks they copied up (whole blocks)"),
            "cormorant",
            mib(copied),
            "MiB",
            None,
        ),
        figure(
            &name(&format!("RAM tier with the {CLONES} clones")),
            "cormorant",
            mib(tier),
            "MiB",
            None,
        ),
        figure(
            &name("daemon RSS (anon + file; clients' shared guest memory left out)"),
            "cormorant",
            mib(rss),
            "MiB",
            None,
        ),
        figure(
            &name("daemon RSS, all (with the clients' guest memory it touched)"),
            "cormorant",
            mib(procs::sample(c.pid()).rss_kib * 1024),
            "MiB",
            None,
        ),
        figure(
            &name(&format!(
                "{CLONES} full copies instead ({CLONES} x golden + copied)"
            )),
            "cormorant",
            mib(full_copies),
            "MiB",
            None,
        ),
        figure(
            &name("(RAM tier + RSS) / (one copy + copied-up blocks)"),
            "cormorant",
            ratio,
            "x",
            Some(("<= 1.1x", ratio <= RAM_TARGET)),
        ),
        figure(
            &name("(RAM tier + RSS) / (one copy + bytes written): copy-up is per whole block"),
            "cormorant",
            used as f64 / (golden + written) as f64,
            "x",
            None,
        ),
        figure(
            &name(&format!("(RAM tier + RSS) / {CLONES} full copies")),
            "cormorant",
            used as f64 / full_copies as f64,
            "x",
            None,
        ),
    ]);
    Ok(())
}

/// Guests booted at once: [`MIN_GUESTS`], or more on a machine with the cores and memory (one
/// TCG guest keeps about one core busy while it boots).
fn guest_count() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let avail_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024);
    // Guest RAM plus QEMU's own, and half the memory left for everything else.
    let by_mem = (avail_mib / 2 / (u64::from(GUEST_MIB) + 128)) as usize;
    cpus.min(by_mem).max(MIN_GUESTS)
}

/// The script of each guest: read and checksum the start of its disk, print the marker.
fn guest_script() -> String {
    format!(
        "sum=$(dd if=/dev/vda bs=1M count={GUEST_READ_MIB} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)\n\
         echo \"RESULT md5=$sum\"\n\
         echo {GUEST_MARKER}\n"
    )
}

/// md5 (hex) of the golden image's first [`GUEST_READ_MIB`] MiB, via the host's `md5sum`.
fn golden_md5(span: u64) -> Result<String, ProcError> {
    use std::io::Write;
    let mut child = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(io_ctx("run md5sum"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..GUEST_READ_MIB.min(span >> 20) {
            procs::fill_chunk(&mut chunk, i);
            stdin.write_all(&chunk).map_err(io_ctx("feed md5sum"))?;
        }
    }
    let out = child.wait_with_output().map_err(io_ctx("md5sum"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Boots [`guest_count`] guests at once, each from a fresh clone, and times them until every
/// one has read and checksummed its disk.
fn guests(
    c: &mut Cormorant,
    work: &Path,
    span: u64,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<(), ProcError> {
    let n = guest_count();
    let _ = GuestImage::get(); // built before the clock starts
    let mut sockets: Vec<PathBuf> = Vec::new();
    for i in 0..n {
        let name = format!("guest{i}");
        c.cli(&["image", "clone", "gold@base", &name, "--tier", "ram"])?;
        sockets.push(c.wait_socket(&name)?);
    }
    let script = guest_script();
    let t0 = Instant::now();
    let mut running: Vec<RunningGuest> = sockets
        .iter()
        .enumerate()
        .map(|(i, sock)| {
            let opts = GuestOpts::new(work.join(format!("guest{i}")), &script)
                .memory_mib(GUEST_MIB)
                .timeout(GUEST_TIMEOUT)
                .disk(Disk::new(sock));
            Guest::spawn(&opts)
        })
        .collect();
    let all_read = running
        .iter_mut()
        .all(|g| g.wait_for_console(GUEST_MARKER, GUEST_TIMEOUT.saturating_sub(t0.elapsed())));
    let secs = t0.elapsed().as_secs_f64();
    let want = golden_md5(span)?;
    let mut wrong = Vec::new();
    for (i, g) in running.into_iter().enumerate() {
        let output = g.wait();
        if output.value("md5") != Some(want.as_str()) || output.exit_code != Some(0) {
            // The work directory goes with the run: keep the end of what the guest printed.
            let tail: Vec<&str> = output.console.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            wrong.push(format!(
                "guest{i}: exit {:?}, timed out {}, md5 {:?}, QEMU {:?}: {}; console ends: {}",
                output.exit_code,
                output.timed_out,
                output.value("md5"),
                output.qemu_status,
                output.qemu_stderr.trim(),
                tail.join(" | ")
            ));
        }
    }
    if !all_read || !wrong.is_empty() {
        notes.push(format!(
            "bootstorm guests: {} of {n} did not read the golden content, no timing: {}",
            wrong.len(),
            wrong.join("; ")
        ));
        return Ok(());
    }
    figures.push(figure(
        &format!(
            "boot storm: {n} TCG guests booted at once from clones, each read {GUEST_READ_MIB} MiB"
        ),
        "cormorant",
        secs,
        "s",
        None,
    ));
    Ok(())
}

/// The cost of sharing, with everything else equal: the same 32 clients on their clones
/// against 32 clients on 32 full images, every client reading the same `span` bytes (1/32 of
/// the golden, so the full images together take one golden's RAM), each side run twice. The full images are
/// removed afterwards, before the RAM is measured.
fn control(
    c: &mut Cormorant,
    clones: &mut [BlkClient],
    specs: &[LoadSpec],
    span: u64,
    figures: &mut Vec<Figure>,
) -> Result<(), ProcError> {
    let span = span.max(1 << 20) >> 20 << 20;
    let mut fulls = Vec::new();
    for n in 0..clones.len() {
        let name = format!("full{n}");
        let sock = c.create_image(&name, span, "ram")?;
        fill(&sock, span)?;
        let opts = load::client_options(&specs[0]);
        fulls.push(
            BlkClient::connect(&sock, &opts).map_err(|e| fail(format!("connect {name}"), e))?,
        );
    }
    for spec in specs {
        let spec = LoadSpec {
            span,
            ..spec.clone()
        };
        let sum = |rs: Vec<LoadResult>| rs.iter().map(|r| r.mbps).sum::<f64>();
        // Clones, full images, full images, clones: a machine that gets busier or quieter
        // during the four runs (other users) weighs on both sides alike.
        let mut on_clones = sum(storm(clones, &spec)?);
        let mut on_fulls = sum(storm(&mut fulls, &spec)?);
        on_fulls += sum(storm(&mut fulls, &spec)?);
        on_clones += sum(storm(clones, &spec)?);
        let ratio = on_clones / on_fulls.max(f64::MIN_POSITIVE);
        figures.push(figure(
            &format!(
                "boot storm {}, each client over {} MiB: {CLONES} clones / {CLONES} full images",
                spec.label(),
                span >> 20
            ),
            "cormorant",
            ratio,
            "x",
            None,
        ));
    }
    for client in fulls {
        let _ = client.close();
    }
    // The daemon sees a frontend go asynchronously: rm is refused until it has.
    for n in 0..clones.len() {
        let name = format!("full{n}");
        let removed = || c.cli(&["image", "rm", &name]).is_ok();
        if !crate::common::wait_until(Duration::from_secs(10), removed) {
            c.cli(&["image", "rm", &name])?;
        }
    }
    Ok(())
}
