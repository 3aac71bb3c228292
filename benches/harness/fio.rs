//! fio jobs: the command line of one job (the same on the host and in a guest) and the parser of
//! its JSON output. On the host, fio with psync on the same kind of file is the ceiling the
//! backends are measured against.

use std::path::Path;
use std::process::Command;

use crate::load::{human_size, LoadResult, Pattern};
use crate::procs::{run_cmd, ProcError};

/// One fio job.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FioJob {
    pub pattern: Pattern,
    pub bs: u32,
    pub iodepth: u16,
    /// `psync`, `libaio` or `io_uring`.
    pub engine: &'static str,
    /// O_DIRECT (in a guest: bypass the guest page cache, so every request reaches the device).
    pub direct: bool,
    pub runtime_secs: f64,
    pub ramp_secs: f64,
    /// Bytes of the file or device addressed from offset 0.
    pub size: u64,
}

impl FioJob {
    fn rw(&self) -> String {
        match self.pattern {
            Pattern::Mixed { .. } => "randrw".to_string(),
            p => p.name(),
        }
    }

    /// fio arguments for `filename` (no shell quoting needed: no spaces).
    pub fn args(&self, filename: &str) -> Vec<String> {
        let mut a = vec![
            "--name=job".to_string(),
            format!("--filename={filename}"),
            format!("--rw={}", self.rw()),
            format!("--bs={}", self.bs),
            format!("--iodepth={}", self.iodepth),
            format!("--ioengine={}", self.engine),
            format!("--direct={}", u8::from(self.direct)),
            format!("--size={}", self.size),
            format!("--runtime={}ms", (self.runtime_secs * 1000.0) as u64),
            format!("--ramp_time={}ms", (self.ramp_secs * 1000.0) as u64),
            "--time_based=1".to_string(),
            "--randrepeat=0".to_string(),
            "--norandommap=1".to_string(),
            "--group_reporting=1".to_string(),
            "--output-format=json".to_string(),
        ];
        if let Pattern::Mixed { read_pct } = self.pattern {
            a.push(format!("--rwmixread={read_pct}"));
        }
        if self.iodepth > 1 {
            // Submit and reap in batches, as a guest's block layer does under load.
            a.push(format!("--iodepth_batch_submit={}", self.iodepth / 4 + 1));
            a.push("--iodepth_batch_complete_min=1".to_string());
        }
        a
    }

    pub fn label(&self) -> String {
        format!(
            "{} {} qd{} {}",
            self.pattern.name(),
            human_size(u64::from(self.bs)),
            self.iodepth,
            self.engine
        )
    }
}

/// Runs `job` on the host against `file` (which must exist with at least `job.size` bytes).
pub fn run_host(job: &FioJob, file: &Path) -> Result<LoadResult, ProcError> {
    // invalidate=0: fio drops the file's page cache before a job by default, which on a disk
    // file system turns the ceiling into a disk measurement while the daemons read cached data.
    let out = run_cmd(
        Command::new("fio")
            .args(job.args(&file.to_string_lossy()))
            .arg("--invalidate=0"),
    )?;
    parse(&out, job.bs).ok_or_else(|| ProcError::Command {
        cmd: format!("fio {}", job.label()),
        stderr: format!("unparsable output:\n{out}"),
    })
}

/// Parses fio's JSON output (possibly with other text around it: a guest console) into a result.
pub fn parse(text: &str, bs: u32) -> Option<LoadResult> {
    let start = text.find("{\n")?;
    let end = text.rfind("\n}")? + 2;
    let v: serde_json::Value = serde_json::from_str(text.get(start..end)?).ok()?;
    let job = v.get("jobs")?.get(0)?;
    let mut r = LoadResult::default();
    let mut lat_weight = 0.0;
    for dir in ["read", "write"] {
        let d = job.get(dir)?;
        let ios = d.get("total_ios").and_then(|x| x.as_u64()).unwrap_or(0);
        if ios == 0 {
            continue;
        }
        let iops = d.get("iops")?.as_f64()?;
        r.iops += iops;
        r.ops += ios;
        r.errors += job.get("error").and_then(|x| x.as_u64()).unwrap_or(0);
        let clat = d.get("clat_ns")?;
        let pct = |p: &str| {
            clat.get("percentile")
                .and_then(|x| x.get(p))
                .and_then(|x| x.as_f64())
                .unwrap_or(0.0)
                / 1000.0
        };
        // With several directions (mixed), take the worse percentile of the two.
        r.lat_p50_us = r.lat_p50_us.max(pct("50.000000"));
        r.lat_p99_us = r.lat_p99_us.max(pct("99.000000"));
        r.lat_p999_us = r.lat_p999_us.max(pct("99.900000"));
        r.lat_max_us = r.lat_max_us.max(clat.get("max")?.as_f64()? / 1000.0);
        r.lat_mean_us += clat.get("mean")?.as_f64()? / 1000.0 * iops;
        lat_weight += iops;
    }
    if lat_weight > 0.0 {
        r.lat_mean_us /= lat_weight;
    }
    r.seconds = job.get("job_runtime")?.as_f64()? / 1000.0;
    r.mbps = r.iops * f64::from(bs) / 1e6;
    Some(r)
}
