//! Issue 5's cases: two daemons on loopback addresses, one image per placement. Remote 4K
//! random reads at QD32 against the same reads of local blocks (target >= 0.5x), 2-copy random
//! writes against 1-copy ones (target >= 0.6x), and resync throughput while a client writes.
//! Reported as figures (ratios of two loads measured back to back in the same run, and the
//! IOPS of each). The nodes keep their metadata in a 1-member etcd, as clusters do.

use std::time::{Duration, Instant};

use crate::common::etcd::EtcdCluster;
use crate::common::wait_until;
use crate::load::{self, LoadSpec, Pattern};
use crate::procs::{self, io_ctx, Cormorant, ProcError};
use crate::report::Figure;
use crate::resources::figure;
use crate::{Ctx, Tier};

/// Data per image: enough for random reads to miss the CPU caches, small enough to fill over
/// the peer protocol in a few seconds.
const SPAN: u64 = 256 << 20;

fn free_port(ip: &str) -> Result<u16, ProcError> {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io_ctx("pick a port"))
}

fn node(
    ctx: &Ctx,
    work: &std::path::Path,
    me: (&str, &str),
    peers: &[String],
    key: &std::path::Path,
) -> Result<Cormorant, ProcError> {
    let dir = work.join(me.0);
    std::fs::create_dir_all(&dir).map_err(io_ctx("node dir"))?;
    let mut args = ["--node", me.0, "--listen", me.1, "--cluster-key-file"]
        .map(String::from)
        .to_vec();
    args.push(key.to_string_lossy().into_owned());
    args.extend(["--cache-budget-ram".into(), crate::cache::BUDGET_RAM.into()]);
    args.extend_from_slice(peers);
    Cormorant::start_with(
        &ctx.cormorant_bin,
        &dir,
        &dir.join("ram"),
        &dir.join("vol"),
        true,
        &args,
    )
}

pub fn run(ctx: &Ctx, figures: &mut Vec<Figure>, notes: &mut Vec<String>) -> Result<(), ProcError> {
    if !ctx.selected("cluster") {
        return Ok(());
    }
    eprintln!("== cluster");
    let work = procs::work_dir(ctx.tier_dir(Tier::Ram), "cluster")?;
    let w = work.path();
    let key = w.join("cluster.key");
    std::fs::write(&key, "c3".repeat(32)).map_err(io_ctx("key file"))?;
    // A key file group or others can read is refused.
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&key, private).map_err(io_ctx("key file"))?;
    let (pa, pb) = (free_port("127.0.0.2")?, free_port("127.0.0.3")?);
    let (aa, ab) = (format!("127.0.0.2:{pa}"), format!("127.0.0.3:{pb}"));
    // The nodes find each other through a 1-member etcd (kept to the end).
    std::fs::create_dir_all(w.join("etcd")).map_err(io_ctx("etcd dir"))?;
    let etcd = EtcdCluster::start(&w.join("etcd"), 1);
    let membership = vec!["--etcd".to_string(), etcd.endpoint_arg()];
    let mut a = node(ctx, w, ("a", &aa), &membership, &key)?;
    let _b = node(ctx, w, ("b", &ab), &membership, &key)?;
    let nodes = || {
        let out = a.cli(&["node", "list"]).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
    };
    if !wait_until(Duration::from_secs(20), || nodes() >= Some(2)) {
        return Err(ProcError::Command {
            cmd: "cormorant node list".into(),
            stderr: "node b never showed up in etcd".into(),
        });
    }
    let system = "cormorant";
    let size = format!("{}M", SPAN >> 20);
    let data = w.join("data.raw");
    procs::write_data_file(&data, SPAN)?;
    for name in ["local", "remote"] {
        a.import_image(name, &data, "ram")?;
    }
    for (name, at) in [("one", vec!["a:ram"]), ("two", vec!["a:ram", "b:ram"])] {
        let mut args = vec!["image", "create", name, "--size", &size];
        for p in &at {
            args.extend(["--at", p]);
        }
        a.cli(&args)?;
        a.wait_socket(name)?;
    }
    let spec = |pattern, bs: u32, qd| LoadSpec {
        pattern,
        bs,
        qd,
        queues: 1,
        runtime: ctx.params.runtime,
        warmup: ctx.params.warmup,
        span: SPAN,
        client_poll: false,
        inflight: false,
    };

    // "remote" moves to node b while a client writes to it: the resync's throughput, then
    // every block of it lives on b only.
    a.cli(&["location", "add", "remote", "--at", "b:ram"])?;
    let started = Instant::now();
    let writer = {
        let socket = a.socket("remote");
        let s = spec(Pattern::RandWrite, 4096, 4);
        std::thread::spawn(move || load::run(&socket, &s))
    };
    a.cli(&["sync", "remote"])?;
    let secs = started.elapsed().as_secs_f64();
    let wrote = writer
        .join()
        .map_err(|_| "panicked".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(e) = wrote {
        notes.push(format!("cluster resync: the concurrent writer failed: {e}"));
    }
    figures.push(figure(
        "resync of a 256 MiB image to another node while a client writes",
        system,
        SPAN as f64 / 1e6 / secs,
        "MB/s",
        None,
    ));
    a.cli(&["sync", "remote"])?;
    a.cli(&["location", "rm", "remote", "--at", "a:ram"])?;

    let measure = |name: &str, s: &LoadSpec| {
        load::run(&a.socket(name), s).map_err(|e| ProcError::Command {
            cmd: format!("{} on {name}", s.label()),
            stderr: e.to_string(),
        })
    };
    let read = spec(Pattern::RandRead, 4096, 32);
    let (local, remote) = (measure("local", &read)?, measure("remote", &read)?);
    let ratio = remote.iops / local.iops.max(1.0);
    for (case, r) in [("local", &local), ("remote", &remote)] {
        let name = format!("{case} 4K randread QD32: IOPS");
        figures.push(figure(&name, system, r.iops, "IOPS", None));
    }
    figures.push(figure(
        "remote 4K randread QD32 vs local: IOPS",
        system,
        ratio,
        "x",
        Some((">= 0.5x", ratio >= 0.5)),
    ));
    let write = spec(Pattern::RandWrite, 4096, 32);
    let (one, two) = (measure("one", &write)?, measure("two", &write)?);
    let ratio = two.iops / one.iops.max(1.0);
    for (case, r) in [("1-copy", &one), ("2-copy", &two)] {
        let name = format!("{case} 4K randwrite QD32: IOPS");
        figures.push(figure(&name, system, r.iops, "IOPS", None));
    }
    figures.push(figure(
        "2-copy 4K randwrite QD32 vs 1 copy: IOPS",
        system,
        ratio,
        "x",
        Some((">= 0.6x", ratio >= 0.6)),
    ));

    // Issue 12 part 2: cache copies of the remote image's blocks on a.
    crate::cache::run(&a, &spec, figures)?;
    Ok(())
}
