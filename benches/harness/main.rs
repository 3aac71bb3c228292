//! `cormorant-bench`: Cormorant side by side with qemu-storage-daemon, virtio-blk on a raw file
//! and fio on the host, in one run, on both tiers. See benches/README.md.
//!
//!     cargo run --release --bin cormorant-bench -- --suite quick
//!
//! Writes `results.json`, `results.md` and PNG plots to `--out` (default
//! `target/bench/<date>/`) and prints the markdown table.

mod backend;
mod bootstorm;
mod cluster;
mod fio;
mod load;
mod migration;
mod plot;
mod procs;
mod report;
mod resources;
mod stripe;
mod tiering;
mod vm;

/// The guest-boot code of the integration tests, included rather than copied (one copy), with
/// the helpers it expects from its parent module.
#[path = "../../tests/common"]
#[allow(dead_code)]
mod common {
    pub mod etcd;
    pub mod guest;
    pub mod process;
    pub use process::{kill_child, read_lossy, spawn_logged, wait_until, which};
}

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use load::{LoadSpec, Pattern};
use procs::ProcError;
use report::{HostInfo, Measurement, Report};

/// Command line.
#[derive(Debug, Parser)]
#[command(
    about = "Benchmark Cormorant against qemu-storage-daemon, cloud-hypervisor's vhost_user_block \
             and virtio-blk, side by side"
)]
struct Args {
    /// Without a subcommand: run a suite.
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Which cases and how long each runs.
    #[arg(long, value_enum, default_value = "quick")]
    suite: Suite,
    /// Output directory (default target/bench/<date>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only cases whose `group case` name contains one of these strings (e.g. `backend ram`,
    /// `randread 4k qd32`); repeatable.
    #[arg(long)]
    only: Vec<String>,
    /// The cormorant binary (default: built with cargo next to this one).
    #[arg(long)]
    cormorant: Option<PathBuf>,
    /// cloud-hypervisor's `vhost_user_block` binary, measured beside qemu-storage-daemon in the
    /// backend cases (skipped with a note when missing). Default:
    /// `../shared/peers/ch-vhost-user-block` relative to the repository.
    #[arg(long)]
    ch_binary: Option<PathBuf>,
    /// Directory for RAM-tier files (must be tmpfs).
    #[arg(long, default_value = "/dev/shm")]
    ram_dir: PathBuf,
    /// Directory for volume-tier files (a disk file system).
    #[arg(long, default_value = "target/bench-work")]
    volume_dir: PathBuf,
}

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Drive one vhost-user-blk socket with one load and print the result as JSON.
    Load(LoadArgs),
    /// Rewrite results.md and the plots of an output directory from its results.json.
    Report {
        /// The output directory of a run.
        dir: PathBuf,
    },
}

/// One load on one socket (reads only touch `--span` bytes from offset 0: write them first).
#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// The backend's vhost-user-blk socket.
    #[arg(long)]
    socket: PathBuf,
    /// read, write, randread, randwrite or randrw<read percent> (e.g. randrw70).
    #[arg(long, default_value = "randread", value_parser = parse_pattern)]
    rw: Pattern,
    /// Request size in bytes (K and M suffixes accepted).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    qd: u16,
    /// Queues, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Bytes addressed from offset 0 (default: the whole device).
    #[arg(long, value_parser = parse_size)]
    span: Option<u64>,
    /// Spin on the used ring instead of sleeping on the call eventfd.
    #[arg(long)]
    poll: bool,
    /// Share an in-flight region with the backend, as QEMU does.
    #[arg(long)]
    inflight: bool,
}

fn parse_pattern(s: &str) -> Result<Pattern, String> {
    Ok(match s {
        "read" => Pattern::Read,
        "write" => Pattern::Write,
        "randread" => Pattern::RandRead,
        "randwrite" => Pattern::RandWrite,
        _ => {
            let pct = s
                .strip_prefix("randrw")
                .and_then(|p| p.parse::<u8>().ok())
                .filter(|p| *p <= 100)
                .ok_or_else(|| format!("unknown pattern {s}"))?;
            Pattern::Mixed { read_pct: pct }
        }
    })
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s}"))
}

fn run_load(a: &LoadArgs) -> Result<(), String> {
    let spec = LoadSpec {
        pattern: a.rw,
        bs: u32::try_from(a.bs).map_err(|_| "bs too large".to_string())?,
        qd: a.qd,
        queues: a.queues,
        runtime: Duration::from_secs_f64(a.runtime),
        warmup: Duration::from_secs_f64(a.warmup),
        span: a.span.map_or(0, |s| s / a.bs * a.bs),
        client_poll: a.poll,
        inflight: a.inflight,
    };
    let r = load::run(&a.socket, &spec).map_err(|e| format!("{e}{}", backend::error_chain(&e)))?;
    let out = serde_json::json!({ "spec": spec, "result": r });
    println!(
        "{}",
        serde_json::to_string_pretty(&out).expect("serializes")
    );
    Ok(())
}

/// Suites: how many cases and how long each runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Suite {
    /// About a second per case: for CI, proves the harness works, measures nothing useful.
    Smoke,
    /// Every case once, short runs: under 15 minutes on 2 cores.
    Quick,
    /// Longer runs and the long in-guest cases.
    Full,
}

/// Storage tier under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Ram,
    Volume,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Ram => "ram",
            Tier::Volume => "volume",
        }
    }
}

/// Sizes and times of a suite.
#[derive(Clone, Debug)]
pub struct Params {
    pub suite: Suite,
    pub runtime: Duration,
    pub warmup: Duration,
    /// Bytes of data written and then read by the backend cases.
    pub span: u64,
    /// Add `cormorant --no-uring` on the volume tier.
    pub engine_compare: bool,
    /// Measured and ramp time of each fio job in a guest.
    pub guest_runtime: Duration,
    pub guest_ramp: Duration,
    /// Size of the guest's disk (and the span of its jobs): at least twice the guest RAM.
    pub guest_span: u64,
    /// How long idle figures are measured.
    pub idle_secs: u64,
}

impl Params {
    fn new(suite: Suite) -> Params {
        let ms = Duration::from_millis;
        let (runtime, warmup, span) = match suite {
            Suite::Smoke => (ms(700), ms(200), 64 << 20),
            Suite::Quick => (ms(3000), ms(500), 1 << 30),
            Suite::Full => (ms(15_000), ms(2000), 2 << 30),
        };
        let (guest_runtime, guest_ramp, guest_span, idle_secs) = match suite {
            Suite::Smoke => (ms(1000), ms(0), 64 << 20, 2),
            Suite::Quick => (ms(3000), ms(1000), 1 << 30, 5),
            Suite::Full => (ms(20_000), ms(3000), 2 << 30, 20),
        };
        Params {
            suite,
            runtime,
            warmup,
            span,
            engine_compare: true,
            guest_runtime,
            guest_ramp,
            guest_span,
            idle_secs,
        }
    }

    /// The backend-only loads of a tier.
    pub fn backend_specs(&self, _tier: Tier) -> Vec<LoadSpec> {
        let spec = |pattern, bs: u32, qd, queues| LoadSpec {
            pattern,
            bs,
            qd,
            queues,
            runtime: self.runtime,
            warmup: self.warmup,
            span: self.span,
            client_poll: false,
            inflight: false,
        };
        let polled = LoadSpec {
            client_poll: true,
            ..spec(Pattern::RandRead, 4096, 1, 1)
        };
        let mut v = vec![
            spec(Pattern::RandRead, 4096, 1, 1),
            polled,
            spec(Pattern::RandRead, 4096, 32, 1),
            spec(Pattern::RandWrite, 4096, 1, 1),
            spec(Pattern::RandWrite, 4096, 32, 1),
        ];
        if self.suite != Suite::Smoke {
            v.extend([
                spec(Pattern::RandRead, 4096, 32, 2),
                spec(Pattern::RandWrite, 4096, 32, 2),
                spec(Pattern::Read, 1 << 20, 8, 1),
                spec(Pattern::Write, 1 << 20, 8, 1),
            ]);
        }
        if self.suite == Suite::Full {
            v.extend([
                spec(Pattern::Mixed { read_pct: 70 }, 4096, 32, 1),
                spec(Pattern::RandRead, 4096, 32, 4),
                spec(Pattern::RandRead, 64 << 10, 16, 1),
            ]);
        }
        v
    }
}

/// What every part of a run needs.
pub struct Ctx {
    pub params: Params,
    pub cormorant_bin: PathBuf,
    /// cloud-hypervisor's `vhost_user_block` (may not exist: then it is skipped).
    pub ch_bin: PathBuf,
    ram_dir: PathBuf,
    volume_dir: PathBuf,
    only: Vec<String>,
}

impl Ctx {
    pub fn tier_dir(&self, tier: Tier) -> &Path {
        match tier {
            Tier::Ram => &self.ram_dir,
            Tier::Volume => &self.volume_dir,
        }
    }

    /// Whether a case (`group case`, e.g. `backend ram randread 4k qd1 x1`) is selected by
    /// `--only`.
    pub fn selected(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| name.contains(o.as_str()))
    }

    /// One line per measurement while the suite runs.
    pub fn progress(&self, m: &Measurement) {
        let r = &m.result;
        eprintln!(
            "  {:<14} {:<24} {:<18} {:>9.0} IOPS {:>8.1} MB/s  p50 {:>7.1} us  p99 {:>7.1} us",
            m.group, m.case, m.system, r.iops, r.mbps, r.lat_p50_us, r.lat_p99_us
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let sub = match &args.cmd {
        Some(Cmd::Load(a)) => Some(run_load(a)),
        Some(Cmd::Report { dir }) => Some(rewrite_report(dir)),
        None => None,
    };
    if let Some(result) = sub {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cormorant-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cormorant-bench: {e}{}", backend::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), ProcError> {
    let date = today();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench").join(&date));
    std::fs::create_dir_all(&out).map_err(procs::io_ctx("create output dir"))?;
    std::fs::create_dir_all(&args.volume_dir).map_err(procs::io_ctx("create volume dir"))?;
    let ctx = Ctx {
        params: Params::new(args.suite),
        cormorant_bin: cormorant_bin(args.cormorant.as_deref())?,
        ch_bin: args.ch_binary.clone().unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/peers/ch-vhost-user-block")
        }),
        ram_dir: args.ram_dir.clone(),
        volume_dir: std::fs::canonicalize(&args.volume_dir).map_err(procs::io_ctx("volume dir"))?,
        only: args.only.clone(),
    };
    procs::remove_stale_work_dirs(&ctx.ram_dir);
    procs::remove_stale_work_dirs(&ctx.volume_dir);
    let mut report = Report {
        date,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        suite: format!("{:?}", args.suite).to_lowercase(),
        host: HostInfo::probe(),
        measurements: Vec::new(),
        figures: Vec::new(),
        notes: Vec::new(),
    };
    for tier in [Tier::Ram, Tier::Volume] {
        backend::run_tier(&ctx, tier, &mut report.measurements, &mut report.notes)?;
    }
    for tier in [Tier::Ram, Tier::Volume] {
        vm::run_tier(
            &ctx,
            tier,
            &mut report.measurements,
            &mut report.figures,
            &mut report.notes,
        )?;
    }
    cluster::run(
        &ctx,
        &mut report.measurements,
        &mut report.figures,
        &mut report.notes,
    )?;
    stripe::run(&ctx, &mut report.figures, &mut report.notes)?;
    bootstorm::run(
        &ctx,
        &mut report.measurements,
        &mut report.figures,
        &mut report.notes,
    )?;
    tiering::run(&ctx, &mut report.figures, &mut report.notes)?;
    migration::run(&ctx, &mut report.figures, &mut report.notes)?;
    vm::idle_guest_cpu(&ctx, &mut report.figures)?;
    resources::idle_client_cpu(&ctx, &mut report.figures)?;
    resources::thin_image(&ctx, &mut report.figures)?;
    let json = serde_json::to_string_pretty(&report).expect("report serializes");
    std::fs::write(out.join("results.json"), json).map_err(procs::io_ctx("write results.json"))?;
    write_outputs(&out, &report)
}

/// Writes results.md and the plots, and prints the table.
fn write_outputs(out: &Path, report: &Report) -> Result<(), ProcError> {
    let md = report::markdown(report);
    std::fs::write(out.join("results.md"), &md).map_err(procs::io_ctx("write results.md"))?;
    for p in plot::write_all(out, &report.measurements) {
        eprintln!("plot {}", p.display());
    }
    println!("{md}");
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn rewrite_report(dir: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(dir.join("results.json")).map_err(|e| e.to_string())?;
    let report: Report = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    write_outputs(dir, &report).map_err(|e| e.to_string())
}

/// The daemon binary: `--cormorant`, else the `cormorant` beside this binary, built first with
/// the same cargo and profile when we were started by `cargo run` (so it is never stale).
fn cormorant_bin(explicit: Option<&Path>) -> Result<PathBuf, ProcError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe().map_err(procs::io_ctx("current_exe"))?;
    let bin = me.with_file_name("cormorant");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = std::process::Command::new(cargo);
        // The workspace manifest (the repository root), two levels above this crate's.
        cmd.args(["build", "--bin", "cormorant", "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml"));
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        procs::run_cmd(&mut cmd)?;
    }
    if !bin.exists() {
        return Err(ProcError::Io {
            what: format!("{} (build it, or pass --cormorant)", bin.display()),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    Ok(bin)
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock (civil-from-days, no time crate).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
