//! Backend-only cases: the VM-less client against Cormorant, qemu-storage-daemon (io_uring and
//! threads) and cloud-hypervisor's `vhost_user_block` over the same data on the same tier, and
//! fio psync on the host on a file of that tier as the ceiling. Systems take turns case by case, so slow drift of a noisy machine spreads over
//! all of them instead of favouring whichever ran first.

use std::path::PathBuf;

use crate::fio::{self, FioJob};
use crate::load::{self, LoadSpec};
use crate::procs::{self, io_ctx, Ch, Cormorant, ProcError, Qsd, QsdAio};
use crate::report::Measurement;
use crate::{Ctx, Tier};

/// A system under test with a socket, and the process to sample for CPU and memory.
struct Target {
    name: &'static str,
    socket: PathBuf,
    serve: Serve,
}

/// How a target's process lives.
enum Serve {
    /// Started once for the whole tier.
    Running { pid: u32 },
    /// cloud-hypervisor's backend exits after one connection: a fresh process per case.
    PerRun {
        bin: PathBuf,
        image: PathBuf,
        queues: u16,
    },
}

/// Systems of one tier, alive for all of its cases; all are stopped on drop.
pub struct Systems {
    _cormorant: Cormorant,
    _sync: Option<Cormorant>,
    _qsd: Vec<Qsd>,
    targets: Vec<Target>,
    /// The data file fio reads on the host (same tier, same content).
    pub data: PathBuf,
    _dir: tempfile::TempDir,
}

/// Name of the Cormorant target; ratios are taken against it.
pub const CORMORANT: &str = "cormorant";
/// The io_uring qemu-storage-daemon target.
pub const QSD_URING: &str = "qsd-io_uring";
/// The thread-pool qemu-storage-daemon target.
pub const QSD_THREADS: &str = "qsd-threads";
/// Cormorant with `--no-uring` (volume tier only: the RAM tier never uses io_uring).
pub const CORMORANT_SYNC: &str = "cormorant-no-uring";
/// cloud-hypervisor's `vhost_user_block`.
pub const CH: &str = "ch-vhost-user-block";

impl Systems {
    /// Writes `span` bytes of data on `tier`, imports it into Cormorant, copies it for each qsd
    /// and for cloud-hypervisor's backend (when its binary is there; a note says when not).
    pub fn start(
        ctx: &Ctx,
        tier: Tier,
        queues: u16,
        notes: &mut Vec<String>,
    ) -> Result<Systems, ProcError> {
        let dir = procs::work_dir(ctx.tier_dir(tier), "backend")?;
        let d = dir.path();
        let data = d.join("data.raw");
        procs::write_data_file(&data, ctx.params.span)?;
        let (ram, vol) = (d.join("ram"), d.join("vol"));
        let mut cormorant = Cormorant::start(&ctx.cormorant_bin, &d.join("c"), &ram, &vol, true)?;
        let sock = cormorant.import_image("bench", &data, tier.name())?;
        let mut targets = vec![Target {
            name: CORMORANT,
            socket: sock,
            serve: Serve::Running {
                pid: cormorant.pid(),
            },
        }];
        let mut qsds = Vec::new();
        for (name, aio) in [(QSD_URING, QsdAio::IoUring), (QSD_THREADS, QsdAio::Threads)] {
            let image = d.join(format!("{name}.raw"));
            std::fs::copy(&data, &image).map_err(io_ctx("copy data for qsd"))?;
            let qsd = Qsd::start(&image, &d.join(format!("{name}.sock")), aio, queues)?;
            targets.push(Target {
                name,
                socket: qsd.socket.clone(),
                serve: Serve::Running { pid: qsd.pid() },
            });
            qsds.push(qsd);
        }
        if ctx.ch_bin.is_file() {
            let image = d.join("ch.raw");
            std::fs::copy(&data, &image).map_err(io_ctx("copy data for ch"))?;
            targets.push(Target {
                name: CH,
                socket: d.join("ch.sock"),
                serve: Serve::PerRun {
                    bin: ctx.ch_bin.clone(),
                    image,
                    queues,
                },
            });
        } else {
            let note = format!(
                "backend {}: {CH} skipped: no binary at {} (see --ch-binary)",
                tier.name(),
                ctx.ch_bin.display()
            );
            eprintln!("  {note}");
            notes.push(note);
        }
        let sync = if tier == Tier::Volume && ctx.params.engine_compare {
            let (sram, svol) = (d.join("sram"), d.join("svol"));
            let mut c = Cormorant::start(&ctx.cormorant_bin, &d.join("s"), &sram, &svol, false)?;
            let sock = c.import_image("bench", &data, tier.name())?;
            targets.push(Target {
                name: CORMORANT_SYNC,
                socket: sock,
                serve: Serve::Running { pid: c.pid() },
            });
            Some(c)
        } else {
            None
        };
        procs::recache_dir(d)?;
        Ok(Systems {
            _cormorant: cormorant,
            _sync: sync,
            _qsd: qsds,
            targets,
            data,
            _dir: dir,
        })
    }
}

/// Runs every backend case of `tier`.
/// A case that fails (a backend that stalls, fio that errors) becomes a note and the run goes
/// on; failing to set the systems up ends the run.
pub fn run_tier(
    ctx: &Ctx,
    tier: Tier,
    out: &mut Vec<Measurement>,
    notes: &mut Vec<String>,
) -> Result<(), ProcError> {
    let group = format!("backend {}", tier.name());
    let specs: Vec<LoadSpec> = ctx
        .params
        .backend_specs(tier)
        .into_iter()
        .filter(|s| ctx.selected(&format!("{group} {}", s.label())))
        .collect();
    if specs.is_empty() {
        return Ok(());
    }
    eprintln!("== {group}");
    let queues = specs.iter().map(|s| s.queues).max().unwrap_or(1);
    let systems = Systems::start(ctx, tier, queues, notes)?;
    for spec in &specs {
        let mut record = |m: Result<Measurement, ProcError>, system: &str| match m {
            Ok(m) => {
                ctx.progress(&m);
                out.push(m);
            }
            Err(e) => {
                let note = format!(
                    "{group} {} {system}: failed: {e}{}",
                    spec.label(),
                    error_chain(&e)
                );
                eprintln!("  {note}");
                notes.push(note);
            }
        };
        for t in &systems.targets {
            record(measure(&group, spec, t), t.name);
        }
        if let Some(job) = ceiling_job(spec) {
            // The daemons' files are in the page cache (just written, or read by the previous
            // cases); the ceiling's file must be too, or the volume tier measures the disk.
            let m = procs::read_whole_file(&systems.data)
                .and_then(|()| fio::run_host(&job, &systems.data))
                .map(|r| Measurement::new(&group, &spec.label(), "host-fio-psync", r));
            record(m, "host-fio-psync");
        }
    }
    Ok(())
}

/// The host ceiling for a spec: one fio psync thread per queue on the same file (psync has no
/// queue depth; it is what a plain `pread` costs with the data in the page cache or tmpfs).
fn ceiling_job(spec: &LoadSpec) -> Option<FioJob> {
    (spec.queues == 1).then_some(FioJob {
        pattern: spec.pattern,
        bs: spec.bs,
        iodepth: 1,
        engine: "psync",
        direct: false,
        runtime_secs: spec.runtime.as_secs_f64(),
        ramp_secs: spec.warmup.as_secs_f64(),
        size: spec.span,
    })
}

fn measure(group: &str, spec: &LoadSpec, t: &Target) -> Result<Measurement, ProcError> {
    // A per-run process lives until the end of this function (sampled before it is reaped).
    let (pid, _per_run) = match &t.serve {
        Serve::Running { pid } => (*pid, None),
        Serve::PerRun { bin, image, queues } => {
            let ch = Ch::start(bin, image, &t.socket, *queues)?;
            (ch.pid(), Some(ch))
        }
    };
    let before = procs::sample(pid);
    let t0 = std::time::Instant::now();
    let r = load::run(&t.socket, spec).map_err(|e| ProcError::Command {
        cmd: format!("{} on {}", spec.label(), t.name),
        stderr: format!("{e}: {}", error_chain(&e)),
    })?;
    let after = procs::sample(pid);
    let mut m = Measurement::new(group, &spec.label(), t.name, r);
    m.set_resources(&before, &after, t0.elapsed().as_secs_f64());
    Ok(m)
}

/// The causes of an error, joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = String::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}
