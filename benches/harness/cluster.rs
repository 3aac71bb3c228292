//! The cluster group (issues 5 and 12): two daemons on loopback addresses (node a on 127.0.0.2,
//! node b on 127.0.0.3) sharing a 1-member etcd, as clusters do, and the VM-less client on a.
//! Every case runs the same load on two images back to back in one run, records both (IOPS,
//! MB/s, latency percentiles, the two daemons' CPU) and reports their ratio against issue 12's
//! target, because on a noisy machine only ratios of loads measured together mean anything.
//!
//! - `cluster read`: blocks held only by b (image "remote", moved there) against the same
//!   blocks held on a ("local"): 4 KiB random reads at QD32 (IOPS), at QD1 (p50: the difference
//!   in microseconds and the ratio) and 1 MiB sequential reads (MB/s).
//! - `cluster write`: 4 KiB random writes at QD32 to two copies (a and b) against one copy.
//! - `cluster cache`: "remote" with a RAM cache on a (`image set remote --cache ram`): one cold
//!   1 MiB sequential pass (read-ahead's case) and 4 KiB random reads over a working set the
//!   cache holds (after a pass that read all of it), against the same on "local". A daemon that
//!   refuses the flag (before issue 12) skips the part with a note.
//! - `cluster resync`: the throughput of the resync that moves "remote" to b while a client
//!   writes to it.
//!
//! `--only` selects on `cluster <part> <case>` (e.g. `cluster read`, `cluster cache`,
//! `cluster read randread 4k qd1`).

mod pass;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::etcd::EtcdCluster;
use crate::common::wait_until;
use crate::load::{self, LoadError, LoadResult, LoadSpec, Pattern};
use crate::procs::{self, io_ctx, Cormorant, ProcError, ProcSample};
use crate::report::{Figure, Measurement};
use crate::resources::figure;
use crate::{Ctx, Tier};
use pass::Pass;

/// Data per image: enough for random reads to miss the CPU caches, small enough to fill over
/// the peer protocol in a few seconds.
const SPAN: u64 = 256 << 20;
/// Requests in flight in the sequential 1 MiB cases: what fio in the guest groups uses
/// (`read 1m qd4`), a few requests for a read-ahead to run ahead of.
const SEQ_QD: u16 = 4;
/// The cache of "remote" on node a, and the node's RAM cache budget where the daemon has the
/// flag: twice the image, so the warm working set (the whole image) fits with room to spare.
const CACHE_SIZE: &str = "512M";
/// Figures and measurements name this system.
const SYSTEM: &str = "cormorant";

fn node(
    ctx: &Ctx,
    work: &Path,
    me: (&str, &str),
    extra: &[String],
    key: &Path,
) -> Result<Cormorant, ProcError> {
    let dir = work.join(me.0);
    std::fs::create_dir_all(&dir).map_err(io_ctx("node dir"))?;
    let mut args = ["--node", me.0, "--listen", me.1, "--cluster-key-file"]
        .map(String::from)
        .to_vec();
    args.push(key.to_string_lossy().into_owned());
    args.extend_from_slice(extra);
    Cormorant::start_with(
        &ctx.cormorant_bin,
        &dir,
        &dir.join("ram"),
        &dir.join("vol"),
        true,
        &args,
    )
}

/// Whether `serve` takes `--cache-budget-ram` (issue 12's cache): older daemons refuse to start
/// with it, so it is passed only when the help lists it.
fn has_cache_budget(bin: &Path) -> bool {
    procs::run_cmd(std::process::Command::new(bin).args(["serve", "--help"]))
        .is_ok_and(|help| help.contains("--cache-budget-ram"))
}

/// The two nodes and their etcd; dropped in field order (the daemons before etcd, the work
/// directory last).
struct Nodes {
    a: Cormorant,
    b: Cormorant,
    _etcd: EtcdCluster,
    work: tempfile::TempDir,
}

impl Nodes {
    fn start(ctx: &Ctx, notes: &mut Vec<String>) -> Result<Nodes, ProcError> {
        let work = procs::work_dir(ctx.tier_dir(Tier::Ram), "cluster")?;
        let w = work.path();
        let key = w.join("cluster.key");
        std::fs::write(&key, "c3".repeat(32)).map_err(io_ctx("key file"))?;
        // A key file group or others can read is refused.
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(&key, private).map_err(io_ctx("key file"))?;
        let (pa, pb) = (
            procs::free_port("127.0.0.2")?,
            procs::free_port("127.0.0.3")?,
        );
        let (aa, ab) = (format!("127.0.0.2:{pa}"), format!("127.0.0.3:{pb}"));
        // The nodes find each other through a 1-member etcd (kept to the end).
        std::fs::create_dir_all(w.join("etcd")).map_err(io_ctx("etcd dir"))?;
        let etcd = EtcdCluster::start(&w.join("etcd"), 1);
        let mut extra = vec!["--etcd".to_string(), etcd.endpoint_arg()];
        if has_cache_budget(&ctx.cormorant_bin) {
            extra.extend(["--cache-budget-ram".to_string(), CACHE_SIZE.to_string()]);
        } else {
            notes.push(format!(
                "cluster: this daemon's `serve` has no --cache-budget-ram; started without a \
                 cache budget ({})",
                ctx.cormorant_bin.display()
            ));
        }
        let a = node(ctx, w, ("a", &aa), &extra, &key)?;
        let b = node(ctx, w, ("b", &ab), &extra, &key)?;
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
        Ok(Nodes {
            a,
            b,
            _etcd: etcd,
            work,
        })
    }

    /// CPU and memory of both daemons together: a remote request costs on both.
    fn sample(&self) -> ProcSample {
        let (a, b) = (procs::sample(self.a.pid()), procs::sample(self.b.pid()));
        ProcSample {
            cpu_secs: a.cpu_secs + b.cpu_secs,
            live_threads_cpu_secs: a.live_threads_cpu_secs + b.live_threads_cpu_secs,
            rss_kib: a.rss_kib + b.rss_kib,
            hwm_kib: a.hwm_kib + b.hwm_kib,
        }
    }
}

/// What one side of a case runs: a time-based load or one pass over a span.
#[derive(Clone, Debug)]
enum Work {
    Load(LoadSpec),
    Pass(Pass),
}

impl Work {
    fn run(&self, socket: &Path) -> Result<LoadResult, LoadError> {
        match self {
            Work::Load(s) => load::run(socket, s),
            Work::Pass(p) => pass::run(socket, *p),
        }
    }
}

/// The loads of the group, from the suite's run times.
struct Cases {
    read_qd32: LoadSpec,
    read_qd1: LoadSpec,
    read_seq: LoadSpec,
    write_qd32: LoadSpec,
    /// The writer that runs during the resync.
    resync_writer: LoadSpec,
    seq_pass: Pass,
}

impl Cases {
    fn new(ctx: &Ctx) -> Cases {
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
        Cases {
            read_qd32: spec(Pattern::RandRead, 4096, 32),
            read_qd1: spec(Pattern::RandRead, 4096, 1),
            read_seq: spec(Pattern::Read, 1 << 20, SEQ_QD),
            write_qd32: spec(Pattern::RandWrite, 4096, 32),
            resync_writer: spec(Pattern::RandWrite, 4096, 4),
            seq_pass: Pass {
                bs: 1 << 20,
                qd: SEQ_QD,
                span: SPAN,
            },
        }
    }

    fn warm_case(&self) -> String {
        format!("{} warm", self.read_qd32.label())
    }
}

/// Which cases `--only` selected.
struct Selection {
    /// Random QD32, random QD1, sequential 1 MiB.
    read: [bool; 3],
    write: bool,
    /// The cold pass, the warm random reads.
    cache: [bool; 2],
    resync: bool,
}

impl Selection {
    fn new(ctx: &Ctx, c: &Cases) -> Selection {
        let want = |part: &str, case: &str| ctx.selected(&format!("cluster {part} {case}"));
        Selection {
            read: [&c.read_qd32, &c.read_qd1, &c.read_seq].map(|s| want("read", &s.label())),
            write: want("write", &c.write_qd32.label()),
            cache: [
                want("cache", &c.seq_pass.label()),
                want("cache", &c.warm_case()),
            ],
            resync: want("resync", "resync"),
        }
    }

    /// Whether "remote" must be moved to node b.
    fn remote(&self) -> bool {
        self.read.contains(&true) || self.cache.contains(&true) || self.resync
    }
}

/// One side of a case: the image it runs on and the name it is recorded under.
#[derive(Clone, Copy)]
struct Side<'a> {
    image: &'a str,
    system: &'a str,
}

const LOCAL: Side = Side {
    image: "local",
    system: "local",
};
const REMOTE: Side = Side {
    image: "remote",
    system: "remote",
};
const REMOTE_CACHED: Side = Side {
    image: "remote",
    system: "remote cache ram",
};

/// A running group: the nodes and where the results go.
struct Group<'a> {
    ctx: &'a Ctx,
    nodes: Nodes,
    measurements: &'a mut Vec<Measurement>,
    figures: &'a mut Vec<Figure>,
    notes: &'a mut Vec<String>,
}

impl Group<'_> {
    fn note(&mut self, note: String) {
        eprintln!("  {note}");
        self.notes.push(note);
    }

    /// A ratio figure against a lower bound from the issue.
    fn at_least(&mut self, name: String, value: f64, min: f64) {
        let target = format!(">= {min}x");
        let met = value >= min;
        self.figures
            .push(figure(&name, SYSTEM, value, "x", Some((&target, met))));
    }

    /// Runs `work` on `base`, then on `test`, back to back, and records both as case `case` of
    /// group `cluster <part>`. A side that fails (a stalled daemon, an error status) becomes a
    /// note and the case reports no ratio; the group goes on.
    fn pair(
        &mut self,
        (part, case): (&str, &str),
        work: &Work,
        sides: [Side; 2],
    ) -> Option<(LoadResult, LoadResult)> {
        let group = format!("cluster {part}");
        let mut results = Vec::with_capacity(2);
        for side in sides {
            let before = self.nodes.sample();
            let t0 = Instant::now();
            let r = match work.run(&self.nodes.a.socket(side.image)) {
                Ok(r) => r,
                Err(e) => {
                    let chain = crate::backend::error_chain(&e);
                    self.note(format!(
                        "{group} {case} {}: failed: {e}{chain}",
                        side.system
                    ));
                    return None;
                }
            };
            let mut m = Measurement::new(&group, case, side.system, r.clone());
            m.set_resources(&before, &self.nodes.sample(), t0.elapsed().as_secs_f64());
            self.ctx.progress(&m);
            self.measurements.push(m);
            if r.errors > 0 {
                let (errors, ops) = (r.errors, r.ops);
                self.note(format!(
                    "{group} {case} {}: {errors} of {ops} requests failed",
                    side.system
                ));
                return None;
            }
            results.push(r);
        }
        let test = results.pop()?;
        let base = results.pop()?;
        Some((base, test))
    }

    /// "remote" moves to node b while a client writes to it (the resync's throughput, a
    /// figure); then every block of it lives on b only.
    fn move_remote(&mut self, writer_spec: &LoadSpec) -> Result<(), ProcError> {
        let a = &self.nodes.a;
        a.cli(&["location", "add", "remote", "--at", "b:ram"])?;
        let started = Instant::now();
        let writer = {
            let socket = a.socket("remote");
            let s = writer_spec.clone();
            std::thread::spawn(move || load::run(&socket, &s))
        };
        a.cli(&["sync", "remote"])?;
        let secs = started.elapsed().as_secs_f64();
        let wrote = writer
            .join()
            .map_err(|_| "panicked".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        // The writer stopped after the first sync: a second one moves what it wrote last.
        a.cli(&["sync", "remote"])?;
        a.cli(&["location", "rm", "remote", "--at", "a:ram"])?;
        if let Err(e) = wrote {
            self.note(format!("cluster resync: the concurrent writer failed: {e}"));
        }
        self.figures.push(figure(
            "cluster resync: a 256 MiB image to another node while a client writes",
            SYSTEM,
            SPAN as f64 / 1e6 / secs,
            "MB/s",
            None,
        ));
        Ok(())
    }

    /// The read part: blocks on b only against blocks on a, cache off.
    fn read(&mut self, c: &Cases, [qd32, qd1, seq]: [bool; 3]) {
        if qd32 {
            let case = c.read_qd32.label();
            let work = Work::Load(c.read_qd32.clone());
            if let Some((l, r)) = self.pair(("read", &case), &work, [LOCAL, REMOTE]) {
                let name = format!("cluster read {case}: remote / local IOPS");
                self.at_least(name, r.iops / l.iops.max(1.0), 0.6);
            }
        }
        if qd1 {
            let case = c.read_qd1.label();
            let work = Work::Load(c.read_qd1.clone());
            if let Some((l, r)) = self.pair(("read", &case), &work, [LOCAL, REMOTE]) {
                let extra = r.lat_p50_us - l.lat_p50_us;
                self.figures.push(figure(
                    &format!("cluster read {case}: remote p50 - local p50"),
                    SYSTEM,
                    extra,
                    "us",
                    Some(("<= 25 us", extra <= 25.0)),
                ));
                self.figures.push(figure(
                    &format!("cluster read {case}: remote / local p50"),
                    SYSTEM,
                    r.lat_p50_us / l.lat_p50_us.max(1e-3),
                    "x",
                    None,
                ));
            }
        }
        if seq {
            let case = c.read_seq.label();
            let work = Work::Load(c.read_seq.clone());
            if let Some((l, r)) = self.pair(("read", &case), &work, [LOCAL, REMOTE]) {
                let name = format!("cluster read {case}: remote / local MB/s");
                self.at_least(name, r.mbps / l.mbps.max(1e-3), 0.8);
            }
        }
    }

    /// The write part: two copies (a and b) against one (a), on fresh thin images.
    fn write(&mut self, c: &Cases) -> Result<(), ProcError> {
        let size = format!("{}M", SPAN >> 20);
        for (name, at) in [("one", vec!["a:ram"]), ("two", vec!["a:ram", "b:ram"])] {
            let mut args = vec!["image", "create", name, "--size", &size];
            for p in &at {
                args.extend(["--at", p]);
            }
            self.nodes.a.cli(&args)?;
            self.nodes.a.wait_socket(name)?;
        }
        let case = c.write_qd32.label();
        let sides = [
            Side {
                image: "one",
                system: "1 copy",
            },
            Side {
                image: "two",
                system: "2 copies",
            },
        ];
        let work = Work::Load(c.write_qd32.clone());
        if let Some((one, two)) = self.pair(("write", &case), &work, sides) {
            let name = format!("cluster write {case}: 2 copies / 1 copy IOPS");
            self.at_least(name, two.iops / one.iops.max(1.0), 0.6);
        }
        Ok(())
    }

    /// The cache part, after the read part (which must see the cache off): "remote" cached on
    /// a, cold when this starts. One 1 MiB sequential pass, which read-ahead should carry, then
    /// random 4 KiB reads over the whole image once a pass has read all of it into the cache.
    /// Skipped with a note when the daemon refuses the cache.
    fn cache(&mut self, c: &Cases, [cold, warm]: [bool; 2]) {
        match enable_cache(&self.nodes.a) {
            Err(e) => {
                return self.note(format!(
                    "cluster cache: skipped: the daemon refused `image set remote --cache ram` \
                     (before issue 12?): {e}"
                ));
            }
            Ok(how) => self.notes.push(format!("cluster cache: `{how}` on node a")),
        }
        let sides = [LOCAL, REMOTE_CACHED];
        if cold && self.warm_up(LOCAL.image, c.seq_pass) {
            let case = c.seq_pass.label();
            let work = Work::Pass(c.seq_pass);
            if let Some((l, r)) = self.pair(("cache", &case), &work, sides) {
                let name = format!("cluster cache {case}: cold remote (read-ahead) / local MB/s");
                self.at_least(name, r.mbps / l.mbps.max(1e-3), 0.9);
            }
        }
        // Every byte of the working set read once: the cache holds it all (a second pass when
        // the cold case ran, which costs little if it hits).
        if warm && self.warm_up(REMOTE_CACHED.image, c.seq_pass) {
            let case = c.warm_case();
            let work = Work::Load(c.read_qd32.clone());
            if let Some((l, r)) = self.pair(("cache", &case), &work, sides) {
                let name = format!("cluster cache {case}: remote from cache / local IOPS");
                self.at_least(name, r.iops / l.iops.max(1.0), 0.9);
            }
        }
    }

    /// One unmeasured pass over `image`: fills its cache, or, on the local image, gives the
    /// cold pass's baseline what the time-based loads get from their warm-up (the daemon's
    /// mappings of the block files and of the client's memory touched once), so that the cold
    /// remote pass is compared with a local pass in its steady state. False (and a note) if it
    /// failed.
    fn warm_up(&mut self, image: &str, seq_pass: Pass) -> bool {
        match pass::run(&self.nodes.a.socket(image), seq_pass) {
            Ok(_) => true,
            Err(e) => {
                let chain = crate::backend::error_chain(&e);
                self.note(format!(
                    "cluster cache: the unmeasured pass over {image} failed: {e}{chain}"
                ));
                false
            }
        }
    }
}

/// Turns the RAM cache of "remote" on, with a size where the daemon takes one; returns the
/// command that worked, or the last refusal.
fn enable_cache(a: &Cormorant) -> Result<String, String> {
    let with_size = [
        "image",
        "set",
        "remote",
        "--cache",
        "ram",
        "--cache-size",
        CACHE_SIZE,
    ];
    let mut last = String::new();
    for args in [&with_size[..], &with_size[..5]] {
        match a.cli(args) {
            Ok(_) => return Ok(format!("cormorant {}", args.join(" "))),
            Err(ProcError::Command { stderr, .. }) => {
                last = stderr.lines().next().unwrap_or_default().to_string();
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

pub fn run(
    ctx: &Ctx,
    measurements: &mut Vec<Measurement>,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<(), ProcError> {
    let cases = Cases::new(ctx);
    let sel = Selection::new(ctx, &cases);
    if !(sel.remote() || sel.write) {
        return Ok(());
    }
    eprintln!("== cluster");
    let nodes = Nodes::start(ctx, notes)?;
    let mut g = Group {
        ctx,
        nodes,
        measurements,
        figures,
        notes,
    };
    if sel.remote() {
        let data = g.nodes.work.path().join("data.raw");
        procs::write_data_file(&data, SPAN)?;
        for name in ["local", "remote"] {
            g.nodes.a.import_image(name, &data, "ram")?;
        }
        g.move_remote(&cases.resync_writer)?;
    }
    g.read(&cases, sel.read);
    if sel.write {
        g.write(&cases)?;
    }
    if sel.cache.contains(&true) {
        g.cache(&cases, sel.cache);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Params, Suite};

    fn selection(only: &[&str]) -> Selection {
        let ctx = Ctx {
            params: Params::new(Suite::Quick),
            cormorant_bin: "cormorant".into(),
            ch_bin: "ch".into(),
            ram_dir: "/dev/shm".into(),
            volume_dir: "/tmp".into(),
            only: only.iter().map(|s| s.to_string()).collect(),
        };
        Selection::new(&ctx, &Cases::new(&ctx))
    }

    #[test]
    fn only_selects_parts_and_cases() {
        let all = selection(&["cluster"]);
        assert_eq!(all.read, [true; 3]);
        assert!(all.write && all.resync && all.cache == [true; 2]);

        let read = selection(&["cluster read"]);
        assert_eq!(read.read, [true; 3]);
        assert!(!read.write && !read.resync && read.cache == [false; 2]);
        assert!(read.remote());

        let cache = selection(&["cluster cache"]);
        assert_eq!(cache.read, [false; 3]);
        assert_eq!(cache.cache, [true; 2]);
        assert!(cache.remote());

        let one = selection(&["cluster read randread 4k qd1"]);
        assert_eq!(one.read, [false, true, false]);

        let write = selection(&["cluster write"]);
        assert!(write.write && !write.remote());

        let other = selection(&["backend ram"]);
        assert!(!other.remote() && !other.write);
    }
}
