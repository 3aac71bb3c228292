//! Resource figures that are not loads: the daemons' CPU use with an idle connected client, and
//! Cormorant's RSS and open time with a 1 TiB thin image.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cormorant_frontend::{BlkClient, ClientOptions};

use crate::procs::{self, io_ctx, Cormorant, ProcError, Qsd, QsdAio};
use crate::report::Figure;
use crate::{Ctx, Tier};

/// Size of the thin image of the RSS and open-time figures.
const THIN_SIZE: u64 = 1 << 40;
/// Random 4 KiB reads spread over the thin image before its RSS is taken (never-written blocks:
/// zero-fill, so this touches the block table, not the disk).
const THIN_READS: u64 = 4096;
/// RSS target with a 1 TiB thin image open (issue 4).
const RSS_TARGET_MIB: f64 = 64.0;
/// Open-time target for a 1 TiB thin image (issue 4).
const OPEN_TARGET_MS: f64 = 100.0;

pub fn figure(
    name: &str,
    system: &str,
    value: f64,
    unit: &str,
    target: Option<(&str, bool)>,
) -> Figure {
    Figure {
        name: name.to_string(),
        system: system.to_string(),
        value,
        unit: unit.to_string(),
        target: target.map(|(t, _)| t.to_string()),
        met: target.map(|(_, m)| m),
    }
}

/// The backends the idle figures compare, each serving a 64 MiB RAM-backed image from `dir`;
/// they stop when this is dropped.
pub struct IdleBackends {
    cormorant: Cormorant,
    cormorant_socket: PathBuf,
    qsd: Qsd,
}

impl IdleBackends {
    pub fn start(ctx: &Ctx, dir: &Path) -> Result<IdleBackends, ProcError> {
        let mut cormorant = Cormorant::start(
            &ctx.cormorant_bin,
            &dir.join("c"),
            &dir.join("ram"),
            &dir.join("vol"),
            true,
        )?;
        let cormorant_socket = cormorant.create_image("idle", IDLE_IMAGE, "ram")?;
        let img = dir.join("qsd.raw");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(IDLE_IMAGE))
            .map_err(io_ctx("create qsd image"))?;
        let qsd = Qsd::start(&img, &dir.join("qsd.sock"), QsdAio::IoUring, 1)?;
        Ok(IdleBackends {
            cormorant,
            cormorant_socket,
            qsd,
        })
    }

    /// (system name, socket, pid) of each.
    pub fn systems(&self) -> [(&'static str, PathBuf, u32); 2] {
        [
            (
                "cormorant",
                self.cormorant_socket.clone(),
                self.cormorant.pid(),
            ),
            ("qsd-io_uring", self.qsd.socket.clone(), self.qsd.pid()),
        ]
    }
}

/// Size of the images the idle figures serve.
const IDLE_IMAGE: u64 = 64 << 20;

/// Percent of a core the live threads of `pid` used since `before`, taken at `since`.
pub fn cpu_percent(pid: u32, before: &procs::ProcSample, since: Instant) -> f64 {
    let after = procs::sample(pid);
    (after.live_threads_cpu_secs - before.live_threads_cpu_secs) / since.elapsed().as_secs_f64()
        * 100.0
}

/// CPU use of Cormorant and qsd while a VM-less client is connected (queues running) and idle.
pub fn idle_client_cpu(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<(), ProcError> {
    if !ctx.selected("idle client") {
        return Ok(());
    }
    eprintln!("== idle client");
    let dir = procs::work_dir(ctx.tier_dir(Tier::Ram), "idle")?;
    let backends = IdleBackends::start(ctx, dir.path())?;
    let secs = ctx.params.idle_secs as f64;
    for (system, socket, pid) in backends.systems() {
        let mut client = connect(&socket)?;
        // One request, so any polling the backend does after work has started and stopped.
        let _ = client.read(0, 0, 4096);
        std::thread::sleep(Duration::from_millis(200));
        let before = procs::sample(pid);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(secs));
        let pct = cpu_percent(pid, &before, t0);
        figures.push(figure(
            "CPU with an idle connected client",
            system,
            pct,
            "% of a core",
            Some(("< 1%", pct < 1.0)),
        ));
        let _ = client.close();
    }
    Ok(())
}

/// RSS and open time of a 1 TiB thin image: `image create` (creates and opens it), RSS after
/// scattered reads through a connected client, then a restart and the time until its socket
/// is back.
pub fn thin_image(ctx: &Ctx, figures: &mut Vec<Figure>) -> Result<(), ProcError> {
    if !ctx.selected("thin image") {
        return Ok(());
    }
    eprintln!("== 1 TiB thin image");
    let dir = procs::work_dir(ctx.tier_dir(Tier::Volume), "thin")?;
    let d = dir.path();
    let (work, ram, vol) = (d.join("c"), d.join("r"), d.join("v"));
    let mut c = Cormorant::start(&ctx.cormorant_bin, &work, &ram, &vol, true)?;
    let base_rss = procs::sample(c.pid()).rss_kib as f64 / 1024.0;
    let t0 = Instant::now();
    let sock = c.create_image("thin", THIN_SIZE, "volume")?;
    let create_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut client = connect(&sock)?;
    let blocks = THIN_SIZE / 4096;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..THIN_READS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let sector = (x % blocks) * 8;
        let _ = client.read(0, sector, 4096);
    }
    let rss = procs::sample(c.pid()).rss_kib as f64 / 1024.0;
    let _ = client.close();
    c.stop();
    let t1 = Instant::now();
    let mut c = Cormorant::start(&ctx.cormorant_bin, &work, &ram, &vol, true)?;
    c.wait_socket("thin")?;
    let restart_ms = t1.elapsed().as_secs_f64() * 1e3;
    let name = "1 TiB thin image";
    figures.extend([
        figure(
            &format!("{name}: RSS, idle daemon before"),
            "cormorant",
            base_rss,
            "MiB",
            None,
        ),
        figure(
            &format!("{name}: RSS after {THIN_READS} scattered reads"),
            "cormorant",
            rss,
            "MiB",
            Some(("< 64 MiB", rss < RSS_TARGET_MIB)),
        ),
        figure(
            &format!("{name}: `image create` wall time (creates and opens)"),
            "cormorant",
            create_ms,
            "ms",
            Some(("< 100 ms", create_ms < OPEN_TARGET_MS)),
        ),
        figure(
            &format!("{name}: daemon restart until its socket is back"),
            "cormorant",
            restart_ms,
            "ms",
            Some(("< 100 ms", restart_ms < OPEN_TARGET_MS)),
        ),
    ]);
    Ok(())
}

fn connect(socket: &Path) -> Result<BlkClient, ProcError> {
    BlkClient::connect(socket, &ClientOptions::default()).map_err(|e| ProcError::Command {
        cmd: format!("connect {}", socket.display()),
        stderr: format!("{e}{}", crate::backend::error_chain(&e)),
    })
}
