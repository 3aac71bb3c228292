//! In-guest cases: the same fio jobs inside a QEMU (TCG) guest whose disk is, in turn, virtio-blk
//! on a raw file, vhost-user-blk to qemu-storage-daemon (io_uring), and vhost-user-blk to
//! Cormorant, all over the same data on the same tier. One boot per system runs every job, so a
//! boot's cost is paid once. Also the daemons' CPU use under an idle guest.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::guest::{Disk, Guest, GuestImage, GuestOpts};
use crate::fio::{self, FioJob};
use crate::load::Pattern;
use crate::procs::{self, io_ctx, Cormorant, ProcError, Qsd, QsdAio};
use crate::report::{Figure, Measurement};
use crate::{Ctx, Suite, Tier};

/// Guest RAM: room for the fio archive unpacked in the initramfs (about 80 MiB) and fio's
/// buffers; the UKAI cases use a span of at least twice this, so the guest page cache cannot
/// hold their data.
const GUEST_MIB: u32 = 384;
/// Console markers around each job's JSON output.
const BEGIN: &str = "CORMORANT-FIO-BEGIN";
const END: &str = "CORMORANT-FIO-END";

/// One in-guest job with its name.
struct GuestJob {
    name: String,
    job: FioJob,
}

/// The in-guest jobs: name, pattern, block size, iodepth, O_DIRECT, engine. The first six are
/// O_DIRECT in the guest (every request reaches the device); the UKAI paper's cases go through
/// the guest page cache over a span twice the guest RAM.
const JOBS: [(&str, Pattern, u32, u16, bool, &str); 9] = [
    (
        "randread 4k qd1",
        Pattern::RandRead,
        4096,
        1,
        true,
        "libaio",
    ),
    (
        "randread 4k qd32",
        Pattern::RandRead,
        4096,
        32,
        true,
        "libaio",
    ),
    (
        "randwrite 4k qd1",
        Pattern::RandWrite,
        4096,
        1,
        true,
        "libaio",
    ),
    (
        "randwrite 4k qd32",
        Pattern::RandWrite,
        4096,
        32,
        true,
        "libaio",
    ),
    ("read 1m qd4", Pattern::Read, 1 << 20, 4, true, "libaio"),
    ("write 1m qd4", Pattern::Write, 1 << 20, 4, true, "libaio"),
    (
        "ukai seqwrite 1m",
        Pattern::Write,
        1 << 20,
        1,
        false,
        "psync",
    ),
    (
        "ukai randwrite 4k",
        Pattern::RandWrite,
        4096,
        1,
        false,
        "psync",
    ),
    (
        "ukai randread 4k",
        Pattern::RandRead,
        4096,
        1,
        false,
        "psync",
    ),
];

/// Jobs of the smoke suite: enough to prove every path works.
const SMOKE_JOBS: [&str; 2] = ["randread 4k qd1", "write 1m qd4"];

/// The jobs of this run, after the suite and `--only`.
fn jobs(ctx: &Ctx, group: &str, span: u64) -> Vec<GuestJob> {
    let p = &ctx.params;
    JOBS.iter()
        .filter(|j| p.suite != Suite::Smoke || SMOKE_JOBS.contains(&j.0))
        .filter(|j| ctx.selected(&format!("{group} {}", j.0)))
        .map(|&(name, pattern, bs, iodepth, direct, engine)| GuestJob {
            name: name.to_string(),
            job: FioJob {
                pattern,
                bs,
                iodepth,
                engine,
                direct,
                runtime_secs: p.guest_runtime.as_secs_f64(),
                ramp_secs: p.guest_ramp.as_secs_f64(),
                size: span,
            },
        })
        .collect()
}

/// The guest script: wait for the disk, then each job between markers.
fn script(jobs: &[GuestJob]) -> String {
    let mut s = String::from(
        "i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n",
    );
    for j in jobs {
        let mut args = j.job.args("/dev/vda");
        if !j.job.direct && matches!(j.job.pattern, Pattern::Write | Pattern::RandWrite) {
            // Buffered writes count only once they reach the device.
            args.push("--end_fsync=1".to_string());
        }
        s += &format!(
            "echo {BEGIN} {name}\nfio {}\necho {END} {name}\n",
            args.join(" "),
            name = j.name.replace(' ', "_")
        );
    }
    s
}

/// The text between the markers of job `name` on the console.
fn job_output<'a>(console: &'a str, name: &str) -> Option<&'a str> {
    let name = name.replace(' ', "_");
    let begin = format!("{BEGIN} {name}\n");
    let start = console.find(&begin)? + begin.len();
    let end = start + console[start..].find(&format!("{END} {name}"))?;
    Some(&console[start..end])
}

/// A system a guest can use: the QEMU arguments or vhost-user disk, and the serving process.
enum Backing {
    Raw {
        args: Vec<String>,
    },
    VhostUser {
        socket: std::path::PathBuf,
        pid: u32,
    },
}

/// Runs every in-guest case of `tier`.
pub fn run_tier(
    ctx: &Ctx,
    tier: Tier,
    out: &mut Vec<Measurement>,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<(), ProcError> {
    let group = format!("guest {}", tier.name());
    if ctx.params.suite == Suite::Smoke && tier == Tier::Volume {
        return Ok(());
    }
    let span = ctx.params.guest_span;
    let jobs = jobs(ctx, &group, span);
    if jobs.is_empty() {
        return Ok(());
    }
    if GuestImage::get().fio.is_none() {
        notes.push(
            "guest cases skipped: fio was not installed when the guest image was built".into(),
        );
        return Ok(());
    }
    eprintln!("== {group}");
    let dir = tempfile::Builder::new()
        .prefix("cormorant-bench-guest-")
        .tempdir_in(ctx.tier_dir(tier))
        .map_err(io_ctx("create guest work dir"))?;
    let d = dir.path();
    let data = d.join("data.raw");
    procs::write_data_file(&data, span)?;
    let script = script(&jobs);
    let (raw_note, raw_args) = raw_drive(&d.join("raw.raw"), tier);
    std::fs::copy(&data, d.join("raw.raw")).map_err(io_ctx("copy data for raw"))?;
    notes.push(format!("{group}: virtio-blk raw file uses {raw_note}"));

    let qimg = d.join("qsd.raw");
    std::fs::copy(&data, &qimg).map_err(io_ctx("copy data for qsd"))?;
    // Both daemons stay up (idle) for all three boots and are stopped when these drop.
    let qsd = Qsd::start(&qimg, &d.join("qsd.sock"), QsdAio::IoUring, 1)?;
    let mut c = Cormorant::start(
        &ctx.cormorant_bin,
        &d.join("c"),
        &d.join("ram"),
        &d.join("vol"),
        true,
    )?;
    let sock = c.import_image("guest", &data, tier.name())?;
    let runs = [
        ("virtio-blk-raw", Backing::Raw { args: raw_args }),
        (
            "qsd-io_uring",
            Backing::VhostUser {
                socket: qsd.socket.clone(),
                pid: qsd.pid(),
            },
        ),
        (
            "cormorant",
            Backing::VhostUser {
                socket: sock,
                pid: c.pid(),
            },
        ),
    ];
    procs::recache_dir(d)?;
    for (system, backing) in &runs {
        let (opts, pid) = guest_opts(&d.join(format!("guest-{system}")), &script, backing);
        let before = pid.map(procs::sample);
        let output = Guest::run(&opts);
        let after = pid.map(procs::sample);
        if output.exit_code != Some(0) {
            notes.push(format!(
                "{group} {system}: guest failed (exit {:?}, timed out {}); console {}",
                output.exit_code,
                output.timed_out,
                output.console_path.display()
            ));
        }
        let mut ops = 0;
        for j in &jobs {
            let parsed = job_output(&output.console, &j.name).and_then(|t| fio::parse(t, j.job.bs));
            let Some(r) = parsed else {
                notes.push(format!("{group} {system} {}: no fio result", j.name));
                continue;
            };
            ops += r.ops;
            let mut m = Measurement::new(&group, &j.name, system, r);
            m.rss_kib = after.map(|a| a.rss_kib);
            ctx.progress(&m);
            out.push(m);
        }
        if let (Some(b), Some(a)) = (before, after) {
            if ops > 0 {
                figures.push(Figure {
                    name: format!("{group}: CPU per M requests (whole boot, all jobs)"),
                    system: system.to_string(),
                    value: (a.cpu_secs - b.cpu_secs) / (ops as f64 / 1e6),
                    unit: "CPU s".into(),
                    target: None,
                    met: None,
                });
            }
        }
    }
    Ok(())
}

/// `-drive`/`-device` arguments for a plain virtio-blk disk on `file`, and what they mean.
/// O_DIRECT (`cache=none`) where the file system has it; tmpfs does not, so `cache=writeback`.
fn raw_drive(file: &Path, tier: Tier) -> (&'static str, Vec<String>) {
    let (cache, note) = match tier {
        Tier::Ram => (
            "writeback",
            "aio=io_uring,cache=writeback (tmpfs has no O_DIRECT)",
        ),
        Tier::Volume => ("none", "aio=io_uring,cache=none (O_DIRECT)"),
    };
    let drive = format!(
        "file={},if=none,id=rawd,format=raw,aio=io_uring,cache={cache}",
        file.display()
    );
    let args = vec![
        "-drive".to_string(),
        drive,
        "-device".to_string(),
        "virtio-blk-pci,drive=rawd,num-queues=1,addr=0x10".to_string(),
    ];
    (note, args)
}

fn guest_opts(dir: &Path, script: &str, backing: &Backing) -> (GuestOpts, Option<u32>) {
    let opts = GuestOpts::new(dir, script)
        .memory_mib(GUEST_MIB)
        .fio(true)
        .timeout(Duration::from_secs(900));
    match backing {
        Backing::Raw { args } => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            (opts.qemu_args(&args), None)
        }
        Backing::VhostUser { socket, pid } => (opts.disk(Disk::new(socket)), Some(*pid)),
    }
}

/// CPU used by the daemons while a guest that has them as its disk sits idle for `secs`.
pub fn idle_guest_cpu(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<(), ProcError> {
    if !ctx.selected("idle guest") {
        return Ok(());
    }
    eprintln!("== idle guest");
    let secs = ctx.params.idle_secs;
    let dir = tempfile::Builder::new()
        .prefix("cormorant-bench-idle-")
        .tempdir_in(ctx.tier_dir(Tier::Ram))
        .map_err(io_ctx("create idle work dir"))?;
    let d = dir.path();
    let mut c = Cormorant::start(
        &ctx.cormorant_bin,
        &d.join("c"),
        &d.join("ram"),
        &d.join("vol"),
        true,
    )?;
    let sock = c.create_image("idle", 64 << 20, "ram")?;
    let img = d.join("qsd.raw");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 << 20))
        .map_err(io_ctx("create qsd image"))?;
    let qsd = Qsd::start(&img, &d.join("qsd.sock"), QsdAio::IoUring, 1)?;
    for (system, socket, pid) in [
        ("cormorant", sock, c.pid()),
        ("qsd-io_uring", qsd.socket.clone(), qsd.pid()),
    ] {
        let script = format!(
            "dd if=/dev/vda of=/dev/null bs=4k count=16 iflag=direct 2>/dev/null\n\
             echo IDLE-BEGIN\nsleep {secs}\necho IDLE-END\n"
        );
        let opts = GuestOpts::new(d.join(format!("idle-{system}")), &script)
            .disk(Disk::new(&socket))
            .timeout(Duration::from_secs(120 + secs));
        let mut g = Guest::spawn(&opts);
        if !g.wait_for_console("IDLE-BEGIN", Duration::from_secs(120)) {
            return Err(ProcError::Command {
                cmd: format!("idle guest on {system}"),
                stderr: g.console(),
            });
        }
        let before = procs::sample(pid);
        let t0 = Instant::now();
        g.wait_for_console("IDLE-END", Duration::from_secs(secs + 60));
        let after = procs::sample(pid);
        let pct = (after.live_threads_cpu_secs - before.live_threads_cpu_secs)
            / t0.elapsed().as_secs_f64()
            * 100.0;
        figures.push(Figure {
            name: "CPU with an idle guest".into(),
            system: system.into(),
            value: pct,
            unit: "% of a core".into(),
            target: Some("near 0 (polling must stop when idle)".into()),
            met: Some(pct < 1.0),
        });
        let _ = g.wait();
    }
    Ok(())
}
