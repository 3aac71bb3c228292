//! Per-image limits (issue 11, section 3), VM-less: an image driven flat out through the
//! vhost-user frontend runs at its limit (within 10%), a change applies live on the same
//! connection, an unlimited image driven at the same time is not held back, the limits
//! survive a restart and follow the image to another node, and bad input is refused.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{tools_available, TestDir};
use cormorant_frontend::{BlkClient, BlkQueue, BlkRequest, ClientOptions};

const S_OK: u8 = 0;
/// Requests kept in flight: enough that the limiter, not the round trip, sets the pace.
const DEPTH: usize = 16;
/// Driven before measuring, so the bucket's initial burst is spent.
const WARMUP: Duration = Duration::from_millis(500);
/// Long enough that one request more or less is well under 1% at these rates.
const WINDOW: Duration = Duration::from_millis(2500);

#[derive(Debug, Clone, Copy)]
struct Rate {
    iops: f64,
    bps: f64,
}

fn connect(daemon: &Daemon, image: &str) -> BlkClient {
    BlkClient::connect(daemon.socket(image), &ClientOptions::default()).expect("connect")
}

/// Keeps [`DEPTH`] reads (or writes) of `len` bytes in flight on `q` for [`WARMUP`] and then
/// [`WINDOW`]; the rate is what completed within the window.
fn drive(q: &mut BlkQueue, write: bool, len: u32, capacity_sectors: u64) -> Rate {
    let buf = q.alloc(len).unwrap();
    let step = u64::from(len) / 512;
    let slots = capacity_sectors / step;
    let mut next = 0u64;
    let mut request = || {
        let sector = (next % slots) * step;
        next += 1;
        if write {
            BlkRequest::write(sector, buf)
        } else {
            BlkRequest::read(sector, buf)
        }
    };
    let first: Vec<BlkRequest> = (0..DEPTH).map(|_| request()).collect();
    q.submit_batch(&first).unwrap();
    let from = Instant::now() + WARMUP;
    let end = from + WINDOW;
    let mut done = Vec::with_capacity(usize::from(q.size()));
    let (mut ops, mut bytes) = (0u64, 0u64);
    loop {
        done.clear();
        q.wait_completions(&mut done, Duration::from_secs(10))
            .unwrap();
        let now = Instant::now();
        for c in &done {
            assert_eq!(c.status, S_OK);
            if now >= from && now < end {
                ops += 1;
                bytes += u64::from(len);
            }
        }
        if now >= end {
            break;
        }
        let again: Vec<BlkRequest> = done.iter().map(|_| request()).collect();
        q.submit_batch(&again).unwrap();
    }
    while q.in_flight() > 0 {
        done.clear();
        q.wait_completions(&mut done, Duration::from_secs(10))
            .unwrap();
    }
    let seconds = WINDOW.as_secs_f64();
    Rate {
        iops: ops as f64 / seconds,
        bps: bytes as f64 / seconds,
    }
}

fn within_10_percent(measured: f64, limit: f64, what: &str) {
    eprintln!("{what}: measured {measured:.0}, limit {limit:.0}");
    assert!(
        (measured - limit).abs() <= limit * 0.10,
        "{what}: measured {measured:.0}, limit {limit:.0}"
    );
}

fn capacity(client: &BlkClient) -> u64 {
    client.config().capacity
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// The stderr of a CLI call that must fail.
fn refused(daemon: &Daemon, args: &[&str]) -> String {
    let out = daemon.cli_raw(args);
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn limits_hold_change_live_spare_other_images_and_survive_a_restart() {
    let dir = TestDir::new();
    let port = free_port();
    let mut daemon = Daemon::start_with(
        dir.path(),
        vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")],
    );
    let created = daemon.cli(&[
        "image",
        "create",
        "lim",
        "--size",
        "64M",
        "--iops-limit",
        "1000",
    ]);
    assert_eq!(created["qos"]["iops_limit"], 1000);
    daemon.cli(&["image", "create", "free", "--size", "64M"]);
    let mut lim = connect(&daemon, "lim");
    let mut free = connect(&daemon, "free");
    let (lim_cap, free_cap) = (capacity(&lim), capacity(&free));

    // Both flat out at once: the limited one at its limit, the other well above it.
    let (limited, unlimited) = std::thread::scope(|s| {
        let l = s.spawn(|| drive(lim.queue(0).unwrap(), false, 4096, lim_cap));
        let f = s.spawn(|| drive(free.queue(0).unwrap(), false, 4096, free_cap));
        (l.join().unwrap(), f.join().unwrap())
    });
    within_10_percent(limited.iops, 1000.0, "4K reads at --iops-limit 1000");
    eprintln!("unlimited image meanwhile: {:.0} IOPS", unlimited.iops);
    assert!(
        unlimited.iops > 3000.0,
        "the unlimited image was held back: {unlimited:?}"
    );

    // A bandwidth limit instead, live on the same connection: 64K writes at 8 MiB/s.
    let set = daemon.cli(&[
        "image",
        "set",
        "lim",
        "--iops-limit",
        "none",
        "--bps-limit",
        "8M",
    ]);
    assert_eq!(set["qos"]["iops_limit"], serde_json::Value::Null);
    assert_eq!(set["qos"]["bps_limit"], 8 << 20);
    let rate = drive(lim.queue(0).unwrap(), true, 64 << 10, lim_cap);
    within_10_percent(rate.bps, f64::from(8 << 20), "64K writes at --bps-limit 8M");

    // Both limits: the tighter one (500 IOPS of 4K is 2 MiB/s, under 8 MiB/s) holds.
    daemon.cli(&["image", "set", "lim", "--iops-limit", "500"]);
    let rate = drive(lim.queue(0).unwrap(), false, 4096, lim_cap);
    within_10_percent(
        rate.iops,
        500.0,
        "4K reads at --iops-limit 500 --bps-limit 8M",
    );

    let stats = daemon.cli(&["stats", "lim"]);
    assert_eq!(stats["qos"]["iops_limit"], 500, "{stats}");
    assert!(stats["qos"]["throttled"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        stats["qos"]["throttled_us"].as_u64().unwrap() > 0,
        "{stats}"
    );
    let free_stats = daemon.cli(&["stats", "free"]);
    assert_eq!(free_stats["qos"]["throttled"], 0, "{free_stats}");
    let metrics = scrape(port);
    assert!(
        metrics.contains("cormorant_image_iops_limit{image=\"lim\"} 500"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cormorant_image_bps_limit{image=\"lim\"} 8388608"),
        "{metrics}"
    );
    assert!(metrics.contains("cormorant_image_throttled_total{image=\"lim\"}"));

    // The limits are metadata: a restarted daemon holds the image to them.
    drop(lim);
    drop(free);
    daemon.restart();
    let info = daemon.cli(&["image", "info", "lim"]);
    assert_eq!(info["qos"]["iops_limit"], 500, "{info}");
    assert_eq!(info["qos"]["bps_limit"], 8 << 20, "{info}");
    // Now on two queues at once: the limit is the image's, shared by its queues.
    let opts = ClientOptions {
        num_queues: 2,
        ..ClientOptions::default()
    };
    let mut lim = BlkClient::connect(daemon.socket("lim"), &opts).unwrap();
    let cpu_before = cpu_seconds(daemon.pid());
    let rates: Vec<Rate> = std::thread::scope(|s| {
        let drivers: Vec<_> = lim
            .queues_mut()
            .iter_mut()
            .map(|q| s.spawn(move || drive(q, false, 4096, lim_cap)))
            .collect();
        drivers.into_iter().map(|d| d.join().unwrap()).collect()
    });
    let cpu = cpu_seconds(daemon.pid()) - cpu_before;
    let total: f64 = rates.iter().map(|r| r.iops).sum();
    eprintln!("per queue: {rates:?}");
    within_10_percent(
        total,
        500.0,
        "4K reads on two queues at 500 IOPS after a restart",
    );
    // A throttled queue sleeps until its tokens are due: a spinning one would burn a whole
    // core for the warm-up and the window.
    let busy = cpu / (WARMUP + WINDOW).as_secs_f64();
    eprintln!("daemon CPU while throttled: {:.0}% of a core", busy * 100.0);
    assert!(busy < 0.5, "the daemon used {busy:.2} of a core");
}

/// User plus system CPU time of process `pid`, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at state: utime and
    // stime are the 12th and 13th of those.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    ticks / 100.0
}

/// A request larger than the burst passes and puts the image in debt; the next one waits it
/// out, unless the operator lifts the limit, which frees it within a fraction of a second.
#[test]
fn a_large_request_passes_and_a_lifted_limit_frees_the_next() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&[
        "image",
        "create",
        "d",
        "--size",
        "16M",
        "--bps-limit",
        "4K",
        "--burst",
        "1ms",
    ]);
    let mut client = connect(&daemon, "d");
    let q = client.queue(0).unwrap();
    // 64 KiB at 4 KiB/s with a 4-byte bucket: it goes, and costs 16 s.
    let big = q.alloc(64 << 10).unwrap();
    let started = Instant::now();
    let done = q.run(&BlkRequest::write(0, big)).unwrap();
    assert_eq!(done.status, S_OK);
    assert!(started.elapsed() < Duration::from_secs(2));
    let small = q.alloc(4096).unwrap();
    let token = q.submit(&BlkRequest::read(0, small)).unwrap();
    let mut seen = Vec::new();
    q.poll_completions(&mut seen).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    q.poll_completions(&mut seen).unwrap();
    assert!(seen.is_empty(), "the read did not wait for the debt");
    let lifted = Instant::now();
    daemon.cli(&["image", "set", "d", "--bps-limit", "none"]);
    let done = q.wait_for(token, Duration::from_secs(10)).unwrap();
    assert_eq!(done.status, S_OK);
    let after = lifted.elapsed();
    eprintln!("held read completed {after:?} after the limit was lifted");
    assert!(after < Duration::from_secs(2), "{after:?}");
    let stats = daemon.cli(&["stats", "d"]);
    assert_eq!(stats["qos"]["throttled"], 1, "{stats}");
}

#[test]
fn bad_limits_are_refused_with_a_message() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&["image", "create", "d", "--size", "16M"]);
    let cases: &[(&[&str], &str)] = &[
        (&["image", "set", "d"], "--iops-limit"),
        (&["image", "set", "d", "--iops-limit", "0"], "none"),
        (
            &["image", "set", "d", "--iops-limit", "fast"],
            "requests per second",
        ),
        (
            &["image", "set", "d", "--iops-limit", "20000000"],
            "maximum",
        ),
        (&["image", "set", "d", "--bps-limit", "10X"], "suffix"),
        (&["image", "set", "d", "--bps-limit", "100"], "4K"),
        (&["image", "set", "d", "--burst", "5"], "200ms"),
        (&["image", "set", "d", "--burst", "1h"], "200ms"),
        (&["image", "set", "d", "--burst", "20s"], "10000 ms"),
        (&["image", "set", "d", "--burst", "200ms"], "needs a limit"),
        (
            &["image", "set", "nosuch", "--iops-limit", "5"],
            "no image named",
        ),
        (
            &["image", "create", "e", "--size", "16M", "--iops-limit", "0"],
            "none",
        ),
    ];
    for (args, says) in cases {
        let err = refused(&daemon, args);
        eprintln!("{args:?}: {err}");
        assert!(err.contains(says), "{args:?} said: {err}");
    }
    // Nothing was changed or created by a refused command.
    assert_eq!(
        daemon.cli(&["image", "info", "d"])["qos"]["iops_limit"],
        serde_json::Value::Null
    );
    assert!(!refused(&daemon, &["image", "info", "e"]).is_empty());
    // A control request that bypasses the CLI's parsing is checked by the daemon too.
    let raw = serde_json::json!({"op": "image_set", "name": "d", "qos": {"iops": {"set": 0}}});
    let mut stream =
        std::os::unix::net::UnixStream::connect(daemon.run_dir.join("control.sock")).unwrap();
    writeln!(stream, "{raw}").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.contains("error") && answer.contains("none"),
        "{answer}"
    );
}

/// In a cluster the limits are stored in etcd (`qos/<id>`) and apply on the node the image
/// moves to.
#[test]
fn limits_live_in_etcd_and_follow_the_image_to_another_node() {
    if !tools_available(&["etcd", "etcdctl"]) {
        return;
    }
    let dir = TestDir::new();
    let (etcd, cluster) = common::etcd_cluster(dir.path(), 2);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.create_image("q", "16M", "1M", &["a:ram"]);
    a.cli(&[
        "image",
        "set",
        "q",
        "--iops-limit",
        "400",
        "--burst",
        "50ms",
    ]);
    let id = a.cli(&["image", "info", "q"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let stored = etcd.etcdctl(&[
        "get",
        "--print-value-only",
        &format!("/cormorant/default/qos/{id}"),
    ]);
    let stored: serde_json::Value = serde_json::from_str(stored.trim()).unwrap();
    assert_eq!(stored, serde_json::json!({"iops": 400, "burst_ms": 50}));
    // Only the owner changes them.
    let err = refused(b, &["image", "set", "q", "--iops-limit", "100"]);
    assert!(err.contains("owned by node a"), "{err}");

    {
        let mut on_a = connect(a, "q");
        assert_eq!(on_a.write(0, 0, &[7; 4096]).unwrap(), S_OK);
    } // a's guest stops: the image may move.
    assert!(common::wait_until(Duration::from_secs(5), || {
        a.log().contains("device stopped") || a.log().contains("frontend disconnected")
    }));
    b.cli(&["image", "adopt", "q"]);
    let mut on_b = connect(b, "q");
    let cap = capacity(&on_b);
    let rate = drive(on_b.queue(0).unwrap(), false, 4096, cap);
    within_10_percent(
        rate.iops,
        400.0,
        "4K reads at 400 IOPS on the node it moved to",
    );
    assert_eq!(b.cli(&["stats", "q"])["qos"]["iops_limit"], 400);
    // The new owner changes them now, live.
    b.cli(&["image", "set", "q", "--iops-limit", "none"]);
    let gone = etcd.etcdctl(&[
        "get",
        "--print-value-only",
        &format!("/cormorant/default/qos/{id}"),
    ]);
    assert!(gone.trim().is_empty(), "{gone}");
}
