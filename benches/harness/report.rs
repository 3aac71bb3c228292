//! Results: one [`Measurement`] per (case, system), written raw to `results.json`, and a markdown
//! table of ratios (Cormorant against each other system measured in the same run) beside the raw
//! numbers.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::load::LoadResult;
use crate::procs::ProcSample;

/// One system on one case.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurement {
    /// e.g. `backend ram`, `guest volume`.
    pub group: String,
    /// e.g. `randread 4k qd32 x1`.
    pub case: String,
    /// e.g. `cormorant`, `qsd-io_uring`, `host-fio-psync`.
    pub system: String,
    pub result: LoadResult,
    /// CPU seconds the serving process used during the case (all its threads).
    pub cpu_secs: Option<f64>,
    /// CPU seconds per million requests.
    pub cpu_secs_per_mreq: Option<f64>,
    /// RSS of the serving process after the case, KiB.
    pub rss_kib: Option<u64>,
}

impl Measurement {
    pub fn new(group: &str, case: &str, system: &str, result: LoadResult) -> Self {
        Measurement {
            group: group.to_string(),
            case: case.to_string(),
            system: system.to_string(),
            result,
            cpu_secs: None,
            cpu_secs_per_mreq: None,
            rss_kib: None,
        }
    }

    /// Records the serving process's CPU use between two samples and its RSS at the end.
    /// The samples bracket `wall_secs` (connect, warm-up, the run, teardown): CPU per request is
    /// taken over the requests of that whole time, at the measured rate.
    pub fn set_resources(&mut self, before: &ProcSample, after: &ProcSample, wall_secs: f64) {
        let cpu = after.cpu_secs - before.cpu_secs;
        self.cpu_secs = Some(cpu);
        let requests = self.result.iops * wall_secs;
        if requests > 0.0 {
            self.cpu_secs_per_mreq = Some(cpu / (requests / 1e6));
        }
        self.rss_kib = Some(after.rss_kib);
    }
}

/// A one-off figure that is not a load (idle CPU, open time, RSS of a large image).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Figure {
    pub name: String,
    pub system: String,
    pub value: f64,
    pub unit: String,
    /// The target from the issue, as text, if there is one.
    pub target: Option<String>,
    pub met: Option<bool>,
}

/// Everything a run produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub suite: String,
    pub host: HostInfo,
    pub measurements: Vec<Measurement>,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

/// What the numbers were measured on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostInfo {
    pub cpus: usize,
    pub kernel: String,
    pub load_avg_start: String,
}

impl HostInfo {
    pub fn probe() -> HostInfo {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        HostInfo {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            load_avg_start: read("/proc/loadavg").trim().to_string(),
        }
    }
}

/// The systems of one (group, case), in the order measured.
fn by_case(ms: &[Measurement]) -> Vec<((String, String), Vec<&Measurement>)> {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut map: BTreeMap<(String, String), Vec<&Measurement>> = BTreeMap::new();
    for m in ms {
        let key = (m.group.clone(), m.case.clone());
        if !map.contains_key(&key) {
            order.push(key.clone());
        }
        map.entry(key).or_default().push(m);
    }
    order
        .into_iter()
        .map(|k| {
            let v = map.remove(&k).unwrap_or_default();
            (k, v)
        })
        .collect()
}

/// The reference a system is compared with: `cormorant*` against everything else.
fn is_ours(system: &str) -> bool {
    system.starts_with("cormorant")
}

/// Ratio of Cormorant's IOPS to `other`'s, and of its p50 latency to `other`'s.
pub fn ratios(ours: &LoadResult, other: &LoadResult) -> (f64, f64) {
    let iops = if other.iops > 0.0 {
        ours.iops / other.iops
    } else {
        f64::NAN
    };
    let p50 = if other.lat_p50_us > 0.0 {
        ours.lat_p50_us / other.lat_p50_us
    } else {
        f64::NAN
    };
    (iops, p50)
}

/// A ratio target of issue 4: Cormorant against `other` on `group case`.
struct Target {
    group: &'static str,
    case: &'static str,
    other: &'static str,
    /// IOPS ratio at least this.
    min_iops: Option<f64>,
    /// p50 latency ratio at most this.
    max_p50: Option<f64>,
}

const fn iops(group: &'static str, case: &'static str, other: &'static str, min: f64) -> Target {
    Target {
        group,
        case,
        other,
        min_iops: Some(min),
        max_p50: None,
    }
}

/// The ratio targets of issues 4 and 11 (the resource targets are figures).
const TARGETS: [Target; 17] = [
    iops(
        "backend ram",
        "randread 4k qd32 x1",
        "ch-vhost-user-block",
        1.5,
    ),
    Target {
        group: "backend ram",
        case: "randread 4k qd1 x1",
        other: "ch-vhost-user-block",
        min_iops: None,
        max_p50: Some(0.8),
    },
    iops("backend ram", "randread 4k qd32 x1", "qsd-io_uring", 2.5),
    iops("backend ram", "randread 4k qd32 x1", "host-fio-psync", 0.5),
    Target {
        group: "backend ram",
        case: "randread 4k qd1 x1",
        other: "qsd-io_uring",
        min_iops: None,
        max_p50: Some(0.3),
    },
    iops("guest ram", "randread 4k qd1", "virtio-blk-raw", 1.0),
    iops("guest ram", "randread 4k qd32", "virtio-blk-raw", 1.0),
    iops("guest ram", "randwrite 4k qd1", "virtio-blk-raw", 1.0),
    iops("guest ram", "randwrite 4k qd32", "virtio-blk-raw", 1.0),
    iops("guest ram", "read 1m qd4", "virtio-blk-raw", 1.0),
    iops("guest ram", "write 1m qd4", "virtio-blk-raw", 0.9),
    iops("guest volume", "randread 4k qd1", "virtio-blk-raw", 1.0),
    iops("guest volume", "randread 4k qd32", "virtio-blk-raw", 1.0),
    iops("guest volume", "randwrite 4k qd1", "virtio-blk-raw", 1.0),
    iops("guest volume", "randwrite 4k qd32", "virtio-blk-raw", 1.0),
    iops("guest volume", "read 1m qd4", "virtio-blk-raw", 1.0),
    iops("guest volume", "write 1m qd4", "virtio-blk-raw", 0.9),
];

fn find<'a>(
    ms: &'a [Measurement],
    group: &str,
    case: &str,
    system: &str,
) -> Option<&'a LoadResult> {
    ms.iter()
        .find(|m| m.group == group && m.case == case && m.system == system)
        .map(|m| &m.result)
}

/// The targets table: each target, the measured ratio, met or not.
fn targets(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| target | measured | met |");
    let _ = writeln!(s, "| --- | ---: | --- |");
    for t in &TARGETS {
        let (Some(ours), Some(other)) = (
            find(&r.measurements, t.group, t.case, "cormorant"),
            find(&r.measurements, t.group, t.case, t.other),
        ) else {
            continue;
        };
        let (ri, rl) = ratios(ours, other);
        let (what, value, met) = match (t.min_iops, t.max_p50) {
            (Some(min), _) => (format!("IOPS >= {min}x"), ri, ri >= min),
            (_, Some(max)) => (format!("p50 latency <= {max}x"), rl, rl <= max),
            _ => continue,
        };
        let _ = writeln!(
            s,
            "| {} {} vs {}: {what} | {value:.2}x | {} |",
            t.group,
            t.case,
            t.other,
            if met { "yes" } else { "**no**" }
        );
    }
    for f in r.figures.iter().filter(|f| f.met.is_some()) {
        let _ = writeln!(
            s,
            "| {} ({}): {} | {:.3} {} | {} |",
            f.name,
            f.system,
            f.target.as_deref().unwrap_or(""),
            f.value,
            f.unit,
            if f.met == Some(true) { "yes" } else { "**no**" }
        );
    }
    s
}

/// The markdown report: the targets, the ratio table, the raw numbers, then the figures.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Measured {} with `{}` ({} CPUs, kernel {}, load average at start {}).\n",
        r.date, r.command, r.host.cpus, r.host.kernel, r.host.load_avg_start
    );
    let _ = writeln!(s, "### Targets\n");
    s += &targets(r);
    let _ = writeln!(s, "\n### Ratios (Cormorant / other, same run)\n");
    let _ = writeln!(
        s,
        "| group | case | against | IOPS ratio | p50 latency ratio |"
    );
    let _ = writeln!(s, "| --- | --- | --- | ---: | ---: |");
    for ((group, case), ms) in by_case(&r.measurements) {
        let Some(ours) = ms.iter().find(|m| m.system == "cormorant") else {
            continue;
        };
        for other in ms.iter().filter(|m| m.system != "cormorant") {
            let (iops, p50) = ratios(&ours.result, &other.result);
            let _ = writeln!(
                s,
                "| {group} | {case} | {} | {iops:.2}x | {p50:.2}x |",
                other.system
            );
        }
    }
    let _ = writeln!(s, "\n### Raw numbers\n");
    let _ = writeln!(s, "| group | case | system | IOPS | MB/s | p50 us | p99 us | p99.9 us | CPU s / M req | RSS MiB |");
    let _ = writeln!(
        s,
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for ((group, case), ms) in by_case(&r.measurements) {
        for m in ms {
            let x = &m.result;
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
            let _ = writeln!(
                s,
                "| {group} | {case} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
                if is_ours(&m.system) {
                    format!("**{}**", m.system)
                } else {
                    m.system.clone()
                },
                x.iops,
                x.mbps,
                x.lat_p50_us,
                x.lat_p99_us,
                x.lat_p999_us,
                opt(m.cpu_secs_per_mreq),
                opt(m.rss_kib.map(|k| k as f64 / 1024.0)),
            );
        }
    }
    s += &crate::migration::markdown(r);
    if !r.figures.is_empty() {
        let _ = writeln!(s, "\n### Resource figures\n");
        let _ = writeln!(s, "| figure | system | value | target | met |");
        let _ = writeln!(s, "| --- | --- | ---: | --- | --- |");
        for f in &r.figures {
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} {} | {} | {} |",
                f.name,
                f.system,
                f.value,
                f.unit,
                f.target.as_deref().unwrap_or("-"),
                f.met.map_or("-", |m| if m { "yes" } else { "no" })
            );
        }
    }
    for n in &r.notes {
        let _ = writeln!(s, "\n- {n}");
    }
    s
}
