//! In-guest cases: the same fio jobs inside one QEMU (TCG) guest with three disks over copies of
//! the same data on the same tier: virtio-blk on a raw file, vhost-user-blk to
//! qemu-storage-daemon (io_uring), and vhost-user-blk to Cormorant. Each job runs on the three
//! disks one after the other, the order rotating from job to job, so the three share the
//! machine's noise. Also the daemons' CPU use under an idle guest.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::guest::{Disk, Guest, GuestImage, GuestOpts};
use crate::fio::{self, FioJob};
use crate::load::Pattern;
use crate::procs::{self, io_ctx, Cormorant, ProcError, Qsd, QsdAio};
use crate::report::{Figure, Measurement};
use crate::resources::{cpu_percent, IdleBackends};
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

/// The systems of a guest run, each a disk of the one guest, found by its serial.
const SYSTEMS: [(&str, &str); 3] = [
    ("virtio-blk-raw", RAW_SERIAL),
    ("qsd-io_uring", QSD_SERIAL),
    ("cormorant", IMAGE),
];
/// Serial of the plain virtio-blk disk (a `virtio-blk-pci` property).
const RAW_SERIAL: &str = "rawdisk";
/// qsd answers GET_ID with its export id... or nothing: the disk left over is qsd's.
const QSD_SERIAL: &str = "";
/// Cormorant's image name, which is its serial.
const IMAGE: &str = "guest";

/// The guest script: wait for the three disks, name them by serial, then run each job on each
/// disk between markers, rotating the order per job so no system always goes first.
fn script(jobs: &[GuestJob]) -> String {
    let mut s = String::from(
        "i=0; while [ $(ls /sys/block | grep -c '^vd') -lt 3 ] && [ $i -lt 100 ]; do \
         sleep 0.1; i=$((i+1)); done\n\
         for d in /sys/block/vd*; do\n\
           case \"$(cat $d/serial 2>/dev/null)\" in\n",
    );
    s += &format!(
        "    {RAW_SERIAL}) RAW=/dev/${{d##*/}} ;;\n    {IMAGE}) COR=/dev/${{d##*/}} ;;\n    \
         *) QSD=/dev/${{d##*/}} ;;\n  esac\ndone\necho disks raw=$RAW qsd=$QSD cormorant=$COR\n"
    );
    let vars = ["$RAW", "$QSD", "$COR"];
    for (n, j) in jobs.iter().enumerate() {
        for k in 0..SYSTEMS.len() {
            let which = (n + k) % SYSTEMS.len();
            let mut args = j.job.args(vars[which]);
            if !j.job.direct && matches!(j.job.pattern, Pattern::Write | Pattern::RandWrite) {
                // Buffered writes count only once they reach the device.
                args.push("--end_fsync=1".to_string());
            }
            let tag = marker(&j.name, SYSTEMS[which].0);
            s += &format!(
                "echo {BEGIN} {tag}\nfio {}\necho {END} {tag}\n",
                args.join(" ")
            );
        }
    }
    s
}

/// The marker tag of one job on one system (no spaces: it is a shell word).
fn marker(job: &str, system: &str) -> String {
    format!("{}@{system}", job.replace(' ', "_"))
}

/// The text between the markers `name` on the console.
fn job_output<'a>(console: &'a str, name: &str) -> Option<&'a str> {
    let begin = format!("{BEGIN} {name}\n");
    let start = console.find(&begin)? + begin.len();
    let end = start + console[start..].find(&format!("{END} {name}"))?;
    Some(&console[start..end])
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
    let dir = procs::work_dir(ctx.tier_dir(tier), "guest")?;
    let d = dir.path();
    let data = d.join("data.raw");
    procs::write_data_file(&data, span)?;
    let script = script(&jobs);
    let (raw_note, raw_args) = raw_drive(&d.join("raw.raw"), tier);
    std::fs::copy(&data, d.join("raw.raw")).map_err(io_ctx("copy data for raw"))?;
    notes.push(format!("{group}: virtio-blk raw file uses {raw_note}"));

    let qimg = d.join("qsd.raw");
    std::fs::copy(&data, &qimg).map_err(io_ctx("copy data for qsd"))?;
    let qsd = Qsd::start(&qimg, &d.join("qsd.sock"), QsdAio::IoUring, 1)?;
    let mut c = Cormorant::start(
        &ctx.cormorant_bin,
        &d.join("c"),
        &d.join("ram"),
        &d.join("vol"),
        true,
    )?;
    let sock = c.import_image(IMAGE, &data, tier.name())?;
    procs::recache_dir(d)?;
    let raw_args: Vec<&str> = raw_args.iter().map(String::as_str).collect();
    let opts = GuestOpts::new(d.join("guest"), &script)
        .memory_mib(GUEST_MIB)
        .fio(true)
        .timeout(Duration::from_secs(1800))
        .disk(Disk::new(&qsd.socket))
        .disk(Disk::new(&sock))
        .qemu_args(&raw_args);
    let pids = [None, Some(qsd.pid()), Some(c.pid())];
    let before = pids.map(|p| p.map(procs::sample));
    let output = Guest::run(&opts);
    let after = pids.map(|p| p.map(procs::sample));
    if output.exit_code != Some(0) {
        notes.push(format!(
            "{group}: guest failed (exit {:?}, timed out {}); console {}",
            output.exit_code,
            output.timed_out,
            output.console_path.display()
        ));
    }
    // The guest names the disk of each system by serial: record it, so a mix-up would show.
    if let Some(line) = output.console.lines().find(|l| l.starts_with("disks raw=")) {
        notes.push(format!("{group}: guest {line}"));
    }
    for j in &jobs {
        for (k, (system, _)) in SYSTEMS.iter().enumerate() {
            let text = job_output(&output.console, &marker(&j.name, system));
            let Some(r) = text.and_then(|t| fio::parse(t, j.job.bs)) else {
                notes.push(format!("{group} {system} {}: no fio result", j.name));
                continue;
            };
            let mut m = Measurement::new(&group, &j.name, system, r);
            m.rss_kib = after[k].map(|a| a.rss_kib);
            ctx.progress(&m);
            out.push(m);
        }
    }
    for (k, (system, _)) in SYSTEMS.iter().enumerate() {
        let ops: u64 = out
            .iter()
            .filter(|m| m.group == group && m.system == *system)
            .map(|m| m.result.ops)
            .sum();
        if let (Some(b), Some(a), true) = (before[k], after[k], ops > 0) {
            figures.push(Figure {
                name: format!("{group}: CPU s per M requests (whole boot, all jobs)"),
                system: system.to_string(),
                value: (a.cpu_secs - b.cpu_secs) / (ops as f64 / 1e6),
                unit: "CPU s".into(),
                target: None,
                met: None,
            });
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
        format!("virtio-blk-pci,drive=rawd,num-queues=1,serial={RAW_SERIAL},addr=0x18"),
    ];
    (note, args)
}

/// CPU used by the daemons while a guest that has them as its disk sits idle for `secs`.
pub fn idle_guest_cpu(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<(), ProcError> {
    if !ctx.selected("idle guest") {
        return Ok(());
    }
    eprintln!("== idle guest");
    let secs = ctx.params.idle_secs;
    let dir = procs::work_dir(ctx.tier_dir(Tier::Ram), "idle")?;
    let d = dir.path();
    let backends = IdleBackends::start(ctx, d)?;
    for (system, socket, pid) in backends.systems() {
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
        let pct = cpu_percent(pid, &before, t0);
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
