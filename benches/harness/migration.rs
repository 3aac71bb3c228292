//! The `migration` group (issue 11): live-migration downtime, QEMU's own figure (`downtime` of
//! `query-migrate`, the same number HMP `info migrate` prints), of one guest workload migrated
//! between two Cormorant daemons on one etcd and between two qemu-storage-daemons sharing one
//! image file, run after run in the same sitting, the order alternating.
//!
//! Each run boots a fresh guest on the source (the write-and-verify rounds of the migration
//! test), migrates it once it is writing, and lets it finish on the destination, which must see
//! every round's data: a migration that lost data would make its downtime meaningless.
//!
//! - Cormorant: nodes a and b on one etcd; a fresh image per run on a's RAM tier, `image adopt`
//!   on b before the destination QEMU starts, as `tests/migration.rs` does. The daemons log at
//!   debug level with millisecond timestamps, and each run's switch-over timeline (source stop,
//!   `device_stopped`, the destination's first kick, the take-over, serving again) is read from
//!   their logs (see [`timeline`]).
//! - qemu-storage-daemon: a source and a destination qsd on one file. The destination QEMU's
//!   vhost-user-blk device connects to its backend when it starts (it reads the config space at
//!   realize), long before the source stops, so the destination qsd must have the file open
//!   while the source still writes it: it cannot wait for the source to release it. That needs
//!   no `locking=off`: a qsd export takes the write permission but shares every permission
//!   (`blk_exp_add` passes `BLK_PERM_ALL` as shared), so its OFD locks (bytes 100-101 here)
//!   never conflict with a second qsd's. Both use `cache.direct=off`, so they share the page
//!   cache and the destination reads what the source wrote.

mod qemu_trace;
mod timeline;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::etcd::EtcdCluster;
use crate::common::guest::{rounds_script, Disk, Guest, GuestOpts, RunningGuest};
use crate::common::{wait_until, which};
use crate::procs::{self, io_ctx, Guarded, ProcError, Qsd, QsdAio};
use crate::report::{Figure, Report};
use crate::resources::figure;
use crate::{Ctx, Suite, Tier};

/// The group's name, as `--only` selects it and results.json records it.
pub const GROUP: &str = "migration";
/// Figure names: one per run and system, the median per system, and the ratio.
const RUN_FIGURE: &str = "live-migration downtime, run";
const STOP_FIGURE: &str = "live-migration downtime: vhost-user device stop, run";
const MEDIAN_FIGURE: &str = "live-migration downtime: median";
const RATIO_FIGURE: &str = "live-migration downtime: median cormorant / median qsd";
/// The system names of the two sides.
const CORMORANT: &str = "cormorant";
const QSD: &str = "qsd-io_uring";
/// The guest's disk: room for every round of the workload (256 KiB each, from offset 256 KiB).
const DISK_MIB: u64 = 16;
/// Rounds of the guest workload, and the round after which the migration starts: the guest
/// keeps writing and verifying through the switch-over and after it.
const ROUNDS: u32 = 16;
const MIGRATE_AFTER: &str = "ROUND 3";
/// Lease of the nodes (as the tests use): what a take-over waits at most for a source that
/// never stops.
const LEASE_TTL_SECS: &str = "3";

/// Migrations per system in a suite. The smoke suite does one per system, so CI stays short.
fn runs(suite: Suite) -> usize {
    match suite {
        Suite::Smoke => 1,
        Suite::Quick => 3,
        Suite::Full => 7,
    }
}

/// Runs the group: `runs` migrations per system, alternating which system goes first.
pub fn run(ctx: &Ctx, figures: &mut Vec<Figure>, notes: &mut Vec<String>) -> Result<(), ProcError> {
    if !ctx.selected(GROUP) {
        return Ok(());
    }
    let missing: Vec<&str> = [
        "etcd",
        "etcdctl",
        "qemu-storage-daemon",
        "qemu-system-x86_64",
    ]
    .into_iter()
    .filter(|t| which(t).is_none())
    .collect();
    if !missing.is_empty() {
        notes.push(format!("{GROUP}: skipped, {missing:?} not installed"));
        return Ok(());
    }
    eprintln!("== {GROUP}");
    let work = procs::work_dir(ctx.tier_dir(Tier::Ram), GROUP)?;
    let w = work.path();
    std::fs::create_dir_all(w.join("etcd")).map_err(io_ctx("etcd dir"))?;
    let etcd = EtcdCluster::start(&w.join("etcd"), 1);
    let nodes = Nodes::start(ctx, w, &etcd.endpoint_arg())?;
    let mut downtimes: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..runs(ctx.params.suite) {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let run_dir = w.join(format!("run{i}-{k}"));
            std::fs::create_dir_all(&run_dir).map_err(io_ctx("run dir"))?;
            let outcome = if k == 0 {
                migrate_cormorant(&nodes, &run_dir, i)
            } else {
                migrate_qsd(&run_dir)
            };
            let system = [CORMORANT, QSD][k];
            match outcome {
                Ok(m) => {
                    eprintln!(
                        "  {GROUP} run {} {system:<14} downtime {:>5.0} ms  total {:>6.0} ms{}",
                        i + 1,
                        m.downtime_ms,
                        m.total_ms,
                        m.timeline
                            .as_ref()
                            .map_or(String::new(), |t| format!("  ({t})"))
                    );
                    if let Some(q) = &m.steps {
                        notes.push(format!(
                            "{GROUP} run {} {system}: QEMU's downtime: device stop (vhost-user, \
                             {} messages) {:.1} ms, then the final RAM and device state {:.1} ms",
                            i + 1,
                            q.messages,
                            q.device_stop_ms,
                            q.final_transfer_ms
                        ));
                        figures.push(figure(
                            &format!("{STOP_FIGURE} {}", i + 1),
                            system,
                            q.device_stop_ms,
                            "ms",
                            None,
                        ));
                    }
                    if let Some(t) = &m.timeline {
                        notes.push(format!("{GROUP} run {} {system}: {t}", i + 1));
                    }
                    if let Some(problem) = &m.problem {
                        notes.push(format!("{GROUP} run {} {system}: {problem}", i + 1));
                    }
                    figures.push(figure(
                        &format!("{RUN_FIGURE} {}", i + 1),
                        system,
                        m.downtime_ms,
                        "ms",
                        None,
                    ));
                    downtimes[k].push(m.downtime_ms);
                }
                Err(e) => notes.push(format!("{GROUP} run {} {system}: failed: {e}", i + 1)),
            }
        }
    }
    let medians = downtimes.map(|d| median(&d));
    for (k, m) in medians.iter().enumerate() {
        if let Some(m) = m {
            figures.push(figure(MEDIAN_FIGURE, [CORMORANT, QSD][k], *m, "ms", None));
        }
    }
    if let [Some(ours), Some(theirs)] = medians {
        // A downtime of 0 ms (QEMU rounds to ms) counts as 1 ms, so the ratio stays finite.
        let ratio = ours.max(1.0) / theirs.max(1.0);
        figures.push(figure(
            RATIO_FIGURE,
            CORMORANT,
            ratio,
            "x",
            Some(("<= 1x (issue 11)", ratio <= 1.0)),
        ));
    }
    drop(nodes);
    drop(etcd);
    Ok(())
}

/// Median of a few figures (mean of the middle two for an even count).
fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// One migration's figures.
struct Migrated {
    /// QEMU's `downtime` (ms): from stopping the source VM to the end of the migration.
    downtime_ms: f64,
    /// QEMU's `total-time` (ms) of the migration.
    total_ms: f64,
    /// Cormorant only: the switch-over as the daemons logged it.
    timeline: Option<String>,
    /// Where the source QEMU's downtime went (its trace).
    steps: Option<qemu_trace::Steps>,
    /// The guest did not finish its rounds cleanly on the destination.
    problem: Option<String>,
}

/// Nodes a and b on one etcd, logging at debug level (for the timeline).
struct Nodes {
    a: Node,
    b: Node,
}

impl Nodes {
    fn start(ctx: &Ctx, w: &Path, etcd: &str) -> Result<Nodes, ProcError> {
        let key = w.join("cluster.key");
        std::fs::write(&key, "c3".repeat(32)).map_err(io_ctx("key file"))?;
        // A key file group or others can read is refused.
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(&key, private).map_err(io_ctx("key file"))?;
        let start = |name: &str, ip: &str| {
            let port = std::net::TcpListener::bind((ip, 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(io_ctx("pick a port"))?;
            Node::start(
                ctx,
                &w.join(name),
                name,
                &format!("{ip}:{port}"),
                &key,
                etcd,
            )
        };
        let nodes = Nodes {
            a: start("a", "127.0.0.2")?,
            b: start("b", "127.0.0.3")?,
        };
        let both = || {
            let out = nodes.a.cli(&["node", "list"]).unwrap_or_default();
            serde_json::from_str::<Value>(&out)
                .ok()
                .and_then(|v| v.as_array().map(Vec::len))
                >= Some(2)
        };
        if !wait_until(Duration::from_secs(20), both) {
            return Err(ProcError::Command {
                cmd: "cormorant node list".into(),
                stderr: "node b never showed up in etcd".into(),
            });
        }
        Ok(nodes)
    }
}

/// One `cormorant serve` node with its own directories.
struct Node {
    bin: PathBuf,
    run_dir: PathBuf,
    proc: Guarded,
}

impl Node {
    fn start(
        ctx: &Ctx,
        dir: &Path,
        name: &str,
        listen: &str,
        key: &Path,
        etcd: &str,
    ) -> Result<Node, ProcError> {
        let run_dir = dir.join("run");
        std::fs::create_dir_all(&run_dir).map_err(io_ctx("node dir"))?;
        let mut cmd = Command::new(&ctx.cormorant_bin);
        // Debug for the switch-over's steps (a handful of lines per migration, none per request).
        cmd.env("RUST_LOG", "info,cormorant=debug")
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("serve")
            .arg("--ram-dir")
            .arg(dir.join("ram"))
            .arg("--volume-dir")
            .arg(dir.join("vol"))
            .args(["--node", name, "--listen", listen, "--cluster-key-file"])
            .arg(key)
            .args(["--etcd", etcd, "--lease-ttl", LEASE_TTL_SECS]);
        let mut proc = Guarded::spawn(&mut cmd, &dir.join("cormorant.log"), "cormorant serve")?;
        proc.wait_for_path(&run_dir.join("control.sock"), "cormorant serve")?;
        Ok(Node {
            bin: ctx.cormorant_bin.clone(),
            run_dir,
            proc,
        })
    }

    fn cli(&self, args: &[&str]) -> Result<String, ProcError> {
        procs::run_cmd(
            Command::new(&self.bin)
                .arg("--run-dir")
                .arg(&self.run_dir)
                .args(args),
        )
    }

    fn socket(&self, image: &str) -> PathBuf {
        self.run_dir.join(format!("{image}.sock"))
    }

    fn log(&self) -> String {
        procs::read_lossy(&self.proc.log)
    }
}

/// One Cormorant migration: image `mig<run>` created on a, adopted by b, the guest moved a->b.
fn migrate_cormorant(nodes: &Nodes, dir: &Path, run: usize) -> Result<Migrated, ProcError> {
    let image = format!("mig{run}");
    let size = format!("{DISK_MIB}M");
    nodes.a.cli(&[
        "image",
        "create",
        &image,
        "--size",
        &size,
        "--block-size",
        "1M",
        "--at",
        "a:ram",
    ])?;
    let source = nodes.a.socket(&image);
    if !wait_until(Duration::from_secs(15), || source.exists()) {
        return Err(ProcError::NoSocket {
            what: format!("image {image} on node a"),
            log: nodes.a.log(),
        });
    }
    let adopt = || nodes.b.cli(&["image", "adopt", &image]).map(drop);
    let mut m = migrate(dir, &source, &nodes.b.socket(&image), adopt)?;
    m.timeline = timeline::of(&image, &nodes.a.log(), &nodes.b.log()).map(|t| t.to_string());
    Ok(m)
}

/// One qsd migration: two qsds on one fresh file, the guest moved from the first to the second.
fn migrate_qsd(dir: &Path) -> Result<Migrated, ProcError> {
    let file = dir.join("disk.raw");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(DISK_MIB << 20))
        .map_err(io_ctx("create the qsd image"))?;
    let source = Qsd::start(&file, &dir.join("src.sock"), QsdAio::IoUring, 1)?;
    let target = Qsd::start(&file, &dir.join("dst.sock"), QsdAio::IoUring, 1)?;
    let m = migrate(dir, &source.socket, &target.socket, || Ok(()))?;
    drop((source, target));
    Ok(m)
}

/// Boots the workload on `source`, waits until it writes, calls `before_target` (Cormorant's
/// adopt), starts the destination QEMU on `target` with `-incoming`, migrates, takes QEMU's
/// figures, and lets the guest finish on the destination.
fn migrate(
    dir: &Path,
    source: &Path,
    target: &Path,
    before_target: impl FnOnce() -> Result<(), ProcError>,
) -> Result<Migrated, ProcError> {
    let script = rounds_script(ROUNDS);
    let qmp_path = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let trace = dir.join("src.trace");
    let mut src = Guest::spawn(
        &GuestOpts::new(dir.join("src"), &script)
            .disk(Disk::new(source))
            .timeout(Duration::from_secs(300))
            .qemu_args(&["-qmp", &qmp_arg])
            .qemu_args(&str_args(&qemu_trace::args(&trace))),
    );
    if !src.wait_for_console(MIGRATE_AFTER, Duration::from_secs(120)) {
        return Err(guest_failed("the source guest never started writing", &src));
    }
    before_target()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_ctx("pick a port"))?;
    let incoming = format!("tcp:127.0.0.1:{port}");
    let dst_qmp_path = dir.join("qmp-dst.sock");
    let dst_qmp_arg = format!("unix:{},server=on,wait=off", dst_qmp_path.display());
    let dst = Guest::spawn(
        &GuestOpts::new(dir.join("dst"), &script)
            .disk(Disk::new(target))
            .timeout(Duration::from_secs(300))
            .qemu_args(&["-incoming", &incoming, "-qmp", &dst_qmp_arg]),
    );
    // QMP answers once QEMU has set up its devices (the vhost-user-blk connection among them)
    // and listens for the migration. (Probing the port would take QEMU's one incoming
    // connection.)
    let inmigrate = wait_until(Duration::from_secs(30), || {
        Qmp::connect(&dst_qmp_path)
            .and_then(|mut q| q.execute("query-status", json!({})))
            .is_ok_and(|s| s["status"] == "inmigrate")
    });
    if !inmigrate {
        return Err(guest_failed(
            "the destination QEMU never waited for the migration",
            &dst,
        ));
    }
    let mut qmp = Qmp::connect(&qmp_path)?;
    qmp.execute("migrate", json!({ "uri": incoming }))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let info = loop {
        let info = qmp.execute("query-migrate", json!({}))?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed" | "cancelled") => {
                return Err(ProcError::Command {
                    cmd: "migrate".into(),
                    stderr: info.to_string(),
                })
            }
            _ if Instant::now() > deadline => {
                return Err(ProcError::Command {
                    cmd: "migrate".into(),
                    stderr: format!("not completed after 120 s: {info}"),
                })
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let figure = |key: &str| {
        info[key].as_f64().ok_or_else(|| ProcError::Command {
            cmd: "query-migrate".into(),
            stderr: format!("no {key} in {info}"),
        })
    };
    let (downtime_ms, total_ms) = (figure("downtime")?, figure("total-time")?);
    let _ = qmp.execute("quit", json!({}));
    drop(src.kill());
    let steps = qemu_trace::parse(&procs::read_lossy(&trace));
    let out = dst.wait();
    let problem = match (out.exit_code, out.value("done"), out.value("mismatch")) {
        (Some(0), Some("yes"), None) if out.value("write_error").is_none() => None,
        _ => Some(format!(
            "the guest did not finish cleanly on the destination (exit {:?}, mismatch {:?}, \
             write error {:?}); console {}",
            out.exit_code,
            out.value("mismatch"),
            out.value("write_error"),
            out.console_path.display()
        )),
    };
    Ok(Migrated {
        downtime_ms,
        total_ms,
        timeline: None,
        steps,
        problem,
    })
}

fn str_args(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn guest_failed(what: &str, guest: &RunningGuest) -> ProcError {
    ProcError::Command {
        cmd: what.to_string(),
        stderr: guest.console(),
    }
}

/// A QMP connection to a QEMU: the greeting read and capabilities negotiated.
struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, ProcError> {
        let stream = UnixStream::connect(path).map_err(io_ctx("connect to QMP"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io_ctx("QMP timeout"))?;
        let reader = BufReader::new(stream.try_clone().map_err(io_ctx("QMP clone"))?);
        let mut qmp = Qmp {
            writer: stream,
            reader,
        };
        qmp.read()?; // {"QMP": {...}}
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, ProcError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(io_ctx("read QMP"))?;
        if n == 0 {
            return Err(ProcError::Command {
                cmd: "QMP".into(),
                stderr: "QEMU closed the connection".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| ProcError::Command {
            cmd: "QMP".into(),
            stderr: format!("{e}: {line}"),
        })
    }

    /// Runs one command; its `return` value, skipping the events that arrive meanwhile.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, ProcError> {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").map_err(io_ctx("write QMP"))?;
        loop {
            let reply = self.read()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(ProcError::Command {
                    cmd: format!("QMP {command}"),
                    stderr: e.to_string(),
                });
            }
            if command == "quit" && reply.get("event").is_some_and(|e| e == "SHUTDOWN") {
                return Ok(Value::Null);
            }
        }
    }
}

/// The group's section of results.md: per-run downtimes of both systems, medians and ratio.
pub fn markdown(r: &Report) -> String {
    let runs: Vec<&Figure> = r
        .figures
        .iter()
        .filter(|f| f.name.starts_with(RUN_FIGURE))
        .collect();
    if runs.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n### Live-migration downtime (QEMU's `downtime`, ms, same run)\n\n\
         The device stop is the vhost-user part of it (SET_VRING_ENABLE, GET_VRING_BASE: \
         the backend's share), from the source QEMU's trace.\n\n\
         | run | cormorant | qsd-io_uring | cormorant device stop | qsd device stop |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    let mut names: Vec<&str> = runs.iter().map(|f| f.name.as_str()).collect();
    names.dedup();
    let value = |name: &str, system: &str, decimals: usize| {
        r.figures
            .iter()
            .find(|f| f.name == name && f.system == system)
            .map_or("-".to_string(), |f| format!("{:.*}", decimals, f.value))
    };
    for name in names {
        let run = name.trim_start_matches(RUN_FIGURE).trim();
        let stop = format!("{STOP_FIGURE} {run}");
        s += &format!(
            "| {run} | {} | {} | {} | {} |\n",
            value(name, CORMORANT, 0),
            value(name, QSD, 0),
            value(&stop, CORMORANT, 1),
            value(&stop, QSD, 1)
        );
    }
    s += &format!(
        "| median | {} | {} | | |\n",
        value(MEDIAN_FIGURE, CORMORANT, 0),
        value(MEDIAN_FIGURE, QSD, 0)
    );
    if let Some(f) = r.figures.iter().find(|f| f.name == RATIO_FIGURE) {
        s += &format!(
            "\nRatio of medians (cormorant / qsd): {:.2}x ({}).\n",
            f.value,
            if f.met == Some(true) {
                "no worse: met"
            } else {
                "worse: **not met**"
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[7.0, 668.0, 428.0]), Some(428.0));
        assert_eq!(median(&[4.0, 45.0]), Some(24.5));
    }
}
