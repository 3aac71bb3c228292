//! Issue 12 part 3: sequential 1 MiB reads and writes of an image striped over the volume
//! tiers of three daemons (a, b, c on loopback addresses) against the same image with every
//! block on one daemon: the client's (a), or another (b). The client is on a, which owns the
//! three images.
//!
//! On one machine the three "disks" are directories of one file system and the "links" are
//! loopback, sharing the same cores: what this measures is the overhead of striping (two
//! blocks in three cross the peer protocol), not its gain. benches/README.md models the gain
//! for N nodes with their own disks and links.

use std::path::Path;
use std::time::Duration;

use cormorant_frontend::{BlkClient, ClientOptions};

use crate::common::etcd::EtcdCluster;
use crate::common::wait_until;
use crate::load::{self, LoadSpec, Pattern};
use crate::procs::{self, io_ctx, Cormorant, ProcError};
use crate::report::Figure;
use crate::resources::figure;
use crate::{Ctx, Tier};

/// Data per image at most: larger than one stripe of 4 MiB blocks many times over, small
/// enough to fill in a few seconds (the smoke suite's span is smaller still).
const SPAN: u64 = 256 << 20;
/// Requests in flight: a guest's sequential stream with read-ahead or writeback keeps a few
/// 1 MiB requests going, which is what lets a stripe use several members at once.
const QD: u16 = 4;
/// Request size.
const BS: u32 = 1 << 20;

/// Node `id` listening on `addr`, its RAM tier under `ram` and its volume tier under `vol`.
fn node(
    ctx: &Ctx,
    (ram, vol): (&Path, &Path),
    (id, addr): (&str, &str),
    etcd: &str,
    key: &Path,
) -> Result<Cormorant, ProcError> {
    let dir = vol.join(id);
    std::fs::create_dir_all(&dir).map_err(io_ctx("node dir"))?;
    let args: Vec<String> = [
        "--node",
        id,
        "--listen",
        addr,
        "--cluster-key-file",
        &key.to_string_lossy(),
        "--etcd",
        etcd,
    ]
    .map(String::from)
    .to_vec();
    let ram = ram.join(id);
    Cormorant::start_with(
        &ctx.cormorant_bin,
        &dir,
        &ram,
        &dir.join("vol"),
        true,
        &args,
    )
}

/// Writes the whole span once, so the reads measure stored blocks (an unwritten block reads
/// as zeros without any I/O).
pub fn fill(socket: &Path, span: u64) -> Result<(), ProcError> {
    let fail = |e: &dyn std::fmt::Display| ProcError::Command {
        cmd: format!("fill {}", socket.display()),
        stderr: e.to_string(),
    };
    let mut client = BlkClient::connect(socket, &ClientOptions::default()).map_err(|e| fail(&e))?;
    let chunk: Vec<u8> = (0..BS).map(|i| (i % 251) as u8).collect();
    for i in 0..span / u64::from(BS) {
        let status = client
            .write(0, i * u64::from(BS) / 512, &chunk)
            .map_err(|e| fail(&e))?;
        if status != 0 {
            return Err(fail(&format!("write status {status}")));
        }
    }
    Ok(())
}

pub fn run(ctx: &Ctx, figures: &mut Vec<Figure>, notes: &mut Vec<String>) -> Result<(), ProcError> {
    if !ctx.selected("stripe") {
        return Ok(());
    }
    eprintln!("== stripe");
    let ram = procs::work_dir(ctx.tier_dir(Tier::Ram), "stripe")?;
    let vol = procs::work_dir(ctx.tier_dir(Tier::Volume), "stripe")?;
    let key = vol.path().join("cluster.key");
    std::fs::write(&key, "d4".repeat(32)).map_err(io_ctx("key file"))?;
    // A key file group or others can read is refused.
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&key, private).map_err(io_ctx("key file"))?;
    std::fs::create_dir_all(vol.path().join("etcd")).map_err(io_ctx("etcd dir"))?;
    let etcd = EtcdCluster::start(&vol.path().join("etcd"), 1);
    let mut nodes = Vec::new();
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        let ip = format!("127.0.0.{}", i + 2);
        let addr = format!("{ip}:{}", procs::free_port(&ip)?);
        let dirs = (ram.path(), vol.path());
        nodes.push(node(ctx, dirs, (id, &addr), &etcd.endpoint_arg(), &key)?);
    }
    let a = &mut nodes[0];
    let registered = || {
        let out = a.cli(&["node", "list"]).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
    };
    if !wait_until(Duration::from_secs(20), || registered() >= Some(3)) {
        return Err(ProcError::Command {
            cmd: "cormorant node list".into(),
            stderr: "nodes b and c never showed up in etcd".into(),
        });
    }
    let span = SPAN.min(ctx.params.span);
    let size = format!("{}M", span >> 20);
    let create = |name: &str, placement: &[&str]| -> Result<(), ProcError> {
        let mut args = vec!["image", "create", name, "--size", &size];
        args.extend_from_slice(placement);
        a.cli(&args).map(drop)
    };
    create("one", &["--at", "a:volume"])?;
    create("remote", &["--at", "b:volume"])?;
    create("striped", &["--stripe", "a:volume,b:volume,c:volume"])?;
    let spec = |pattern| LoadSpec {
        pattern,
        bs: BS,
        qd: QD,
        queues: 1,
        runtime: ctx.params.runtime,
        warmup: ctx.params.warmup,
        span,
        client_poll: false,
        inflight: false,
    };
    let mut mbps = std::collections::BTreeMap::new();
    for name in ["one", "remote", "striped"] {
        let socket = a.wait_socket(name)?;
        fill(&socket, span)?;
        for pattern in [Pattern::Write, Pattern::Read] {
            let s = spec(pattern);
            let r = load::run(&socket, &s).map_err(|e| ProcError::Command {
                cmd: format!("{} on {name}", s.label()),
                stderr: e.to_string(),
            })?;
            if r.errors > 0 {
                notes.push(format!(
                    "stripe: {} on {name}: {} errors; node a's log: {}",
                    s.label(),
                    r.errors,
                    a.log_errors(4).join(" / ")
                ));
            }
            let case = format!("{name} seq {} 1M QD{QD}: MB/s", pattern.name());
            figures.push(figure(&case, "cormorant", r.mbps, "MB/s", None));
            mbps.insert((name, pattern.name()), r.mbps);
        }
    }
    let got = |name: &str, pattern: &str| mbps.get(&(name, pattern.to_string())).copied();
    for pattern in ["write", "read"] {
        let striped = got("striped", pattern).unwrap_or(0.0);
        for (against, what) in [
            ("one", "all blocks on the client's daemon"),
            ("remote", "all blocks on one other daemon"),
        ] {
            let base = got(against, pattern).unwrap_or(0.0);
            figures.push(figure(
                &format!(
                    "striped over 3 daemons vs {what}, seq {pattern} 1M QD{QD} \
                     (one machine: overhead, not gain)"
                ),
                "cormorant",
                striped / base.max(f64::MIN_POSITIVE),
                "x",
                None,
            ));
        }
    }
    notes.push(
        "stripe: three daemons on one machine share its disk, cores and loopback; the striped \
         figures show the cost of striping, not its gain (benches/README.md models the gain)"
            .into(),
    );
    drop(nodes);
    drop(etcd);
    Ok(())
}
