//! Heat tiering under a real guest: an auto image's blocks are promoted to the RAM tier and
//! demoted back while the guest writes and verifies its data, with test-only knobs (a short
//! plan interval and decay) so that happens within a minute. The RAM the image's blocks take
//! never exceeds the node's budget, and the guest sees no error and no mismatch, before or
//! after its blocks moved.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::Daemon;
use common::guest::{Disk, Guest, GuestOpts};
use common::{tools_available, wait_until, TestDir};

/// 8 blocks of 256 KiB: the hot window (6 blocks) fits, the image (32 blocks) does not.
const BUDGET: u64 = 2 << 20;

/// Rewrites and reads back 64 KiB chunks of a window of 24 chunks (6 blocks) that moves by
/// 8 blocks every 60 rounds, until 55 s of uptime; then idles until 90 s (its blocks go
/// cold and back to the volume tier) and verifies every chunk it wrote.
const SCRIPT: &str = r#"
r=0; bad=0; errors=0
while [ "$(cut -d. -f1 /proc/uptime)" -lt 55 ]; do
  r=$((r+1)); i=$(( 32 * ((r / 60) % 4) + r % 24 ))
  printf "%065536d" $((r*1000+i)) > /tmp/c
  dd if=/tmp/c of=/dev/vda bs=64k seek=$i oflag=direct conv=fsync 2>/dev/null || errors=$((errors+1))
  md5sum < /tmp/c | cut -d' ' -f1 > /tmp/sum.$i
  got=$(dd if=/dev/vda bs=64k skip=$i count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$(cat /tmp/sum.$i)" ] || bad=$((bad+1))
  [ $((r % 50)) -eq 0 ] && echo "ROUND $r"
done
echo "PHASE idle"
while [ "$(cut -d. -f1 /proc/uptime)" -lt 90 ]; do sleep 1; done
for j in $(seq 0 127); do
  [ -e /tmp/sum.$j ] || continue
  got=$(dd if=/dev/vda bs=64k skip=$j count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$(cat /tmp/sum.$j)" ] || bad=$((bad+1))
done
echo "RESULT rounds=$r"
echo "RESULT bad=$bad"
echo "RESULT errors=$errors"
"#;

fn tiering(daemon: &Daemon) -> serde_json::Value {
    daemon.cli(&["stats", "t"])["tiering"].clone()
}

#[test]
fn blocks_move_between_tiers_under_a_verifying_guest() {
    if !tools_available(&["qemu-system-x86_64"]) {
        return;
    }
    let dir = TestDir::new();
    let daemon = Arc::new(Daemon::start_with(
        dir.path(),
        [
            "--ram-budget",
            "2M",
            "--tier-interval-ms",
            "100",
            "--tier-decay-ms",
            "2000",
        ]
        .map(String::from)
        .to_vec(),
    ));
    daemon.cli(&[
        "image",
        "create",
        "t",
        "--size",
        "8M",
        "--block-size",
        "256K",
        "--tier",
        "auto",
    ]);
    let info = daemon.cli(&["image", "info", "t"]);
    assert_eq!(info["tiers"]["volume"], 32, "{info}");
    assert_eq!(info["tiers"]["tiering"], "auto");
    // The budget is checked from outside all along: what the node counts, and the files.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (daemon, stop) = (daemon.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                let stats = daemon.cli(&["stats"]);
                let used = stats["tiering"]["ram_used"].as_u64().unwrap();
                assert_eq!(stats["tiering"]["ram_budget"], BUDGET);
                assert!(used <= BUDGET, "RAM of auto blocks {used} over the budget");
                let files: u64 = std::fs::read_dir(daemon.image_dir("ram", "t"))
                    .map(|d| d.flatten().map(|e| e.metadata().unwrap().len()).sum())
                    .unwrap_or(0);
                assert!(files <= BUDGET, "RAM-tier files {files} over the budget");
                peak = peak.max(used);
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let mut guest = Guest::spawn(
        &GuestOpts::new(dir.join("guest"), SCRIPT)
            .disk(Disk::new(daemon.socket("t")))
            .timeout(Duration::from_secs(300)),
    );
    assert!(
        guest.wait_for_console("PHASE idle", Duration::from_secs(200)),
        "{}",
        guest.console()
    );
    let moved = tiering(&daemon);
    assert!(
        moved["promotions"].as_u64().unwrap() >= 6,
        "the hot windows were promoted: {moved}"
    );
    // Idle: every block goes cold and back to the volume tier, before the guest verifies.
    let all_cold = wait_until(Duration::from_secs(30), || {
        tiering(&daemon)["blocks"]["ram"] == 0
    });
    assert!(
        all_cold,
        "still in RAM after 30 s idle: {}",
        tiering(&daemon)
    );
    let out = guest.wait();
    stop.store(true, Ordering::Relaxed);
    let peak = watcher.join().unwrap();
    out.expect_ok();
    assert_eq!(out.value("bad"), Some("0"), "{}", out.console);
    assert_eq!(out.value("errors"), Some("0"), "{}", out.console);
    let done = tiering(&daemon);
    assert!(done["demotions"].as_u64().unwrap() >= 6, "{done}");
    assert!(peak > 0 && peak <= BUDGET, "peak {peak}");
    let log = daemon.log();
    assert!(!log.contains("move to"), "a move failed:\n{log}");
    eprintln!("tiering: {done}, peak RAM {peak} of {BUDGET}");
}

/// In a cluster only the owner moves an auto image's blocks, and only its own copies: the
/// other node's copies stay on its volume tier, and every block reads back what was written.
#[test]
fn in_a_cluster_only_the_owner_moves_its_own_copies() {
    if !tools_available(&["etcd"]) {
        return;
    }
    use cormorant_frontend::{BlkClient, ClientOptions};
    let dir = TestDir::new();
    let etcd = common::start_etcd(dir.path());
    let knobs = ["--ram-budget", "1M", "--tier-interval-ms", "100"];
    let cluster =
        common::daemon::Cluster::start_etcd_with(dir.path(), 2, &etcd.endpoint_arg(), &knobs);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    a.cli(&[
        "image",
        "create",
        "c",
        "--size",
        "4M",
        "--block-size",
        "256K",
        "--at",
        "a:volume",
        "--at",
        "b:volume",
        "--tier",
        "auto",
    ]);
    let mut client = BlkClient::connect(a.socket("c"), &ClientOptions::default()).unwrap();
    for block in 0..16u64 {
        let data = vec![block as u8 + 1; 256 << 10];
        assert_eq!(client.write(0, block * 512, &data).unwrap(), 0);
    }
    // Blocks 0..4 are read over and over: exactly the 1 MiB budget.
    let hot = wait_until(Duration::from_secs(30), || {
        for block in 0..4u64 {
            for _ in 0..8 {
                let (status, _) = client.read(0, block * 512, 4096).unwrap();
                assert_eq!(status, 0);
            }
        }
        a.cli(&["stats", "c"])["tiering"]["blocks"]["ram"] == 4
    });
    assert!(hot, "{}", a.cli(&["stats", "c"]));
    let info = a.cli(&["image", "info", "c"]);
    for block in info["blocks"].as_array().unwrap() {
        let index = block["index"].as_u64().unwrap();
        let places: Vec<String> = block["locations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["synced"] == true)
            .map(|l| {
                format!(
                    "{}:{}",
                    l["node"].as_str().unwrap(),
                    l["tier"].as_str().unwrap()
                )
            })
            .collect();
        let want = if index < 4 {
            ["b:volume", "a:ram"]
        } else {
            ["a:volume", "b:volume"]
        };
        let mut sorted = places.clone();
        sorted.sort();
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(sorted, want, "block {index}: {info}");
        assert_eq!(places.len(), block["locations"].as_array().unwrap().len());
    }
    // Node b holds copies but owns nothing: its mover moved nothing.
    let on_b = b.cli(&["stats"]);
    assert_eq!(on_b["images"]["c"]["tiering"]["promotions"], 0, "{on_b}");
    let b_ram = std::fs::read_dir(b.image_dir("ram", "c")).map_or(0, |d| d.count());
    assert_eq!(b_ram, 0, "node b has no RAM-tier file of c");
    for block in 0..16u64 {
        let (status, data) = client.read(0, block * 512, 256 << 10).unwrap();
        assert_eq!(status, 0);
        assert!(data.iter().all(|&x| x == block as u8 + 1), "block {block}");
    }
}

/// kill -9 of the daemon while the mover promotes and demotes an auto image's blocks (a slow
/// rate keeps a move in progress most of the time), five times: after every restart every
/// block reads what was last written and flushed, and the mover goes on.
#[test]
fn kill_9_mid_move_loses_nothing() {
    use cormorant_frontend::{BlkClient, ClientOptions};
    const BLOCK: usize = 256 << 10;
    const BLOCKS: usize = 32;
    let dir = TestDir::new();
    let args = [
        "--ram-budget",
        "2M",
        "--tier-interval-ms",
        "100",
        "--tier-decay-ms",
        "500",
        "--tier-rate",
        "2M",
    ];
    let mut daemon = Daemon::start_with(dir.path(), args.iter().map(|a| a.to_string()).collect());
    daemon.cli(&[
        "image",
        "create",
        "t",
        "--size",
        "8M",
        "--block-size",
        "256K",
        "--tier",
        "auto",
    ]);
    let connect = |daemon: &Daemon| {
        BlkClient::connect(daemon.socket("t"), &ClientOptions::default()).unwrap()
    };
    let mut want: Vec<Vec<u8>> = (0..BLOCKS)
        .map(|b| common::never_zero_bytes(BLOCK, b as u64))
        .collect();
    let mut moved = 0;
    for round in 0..5u64 {
        let mut c = connect(&daemon);
        // This round's writes, flushed, then a hot window read over and over.
        for b in (round as usize..BLOCKS).step_by(5) {
            want[b] = common::never_zero_bytes(BLOCK, round << 8 | b as u64);
        }
        for (b, data) in want.iter().enumerate() {
            assert_eq!(c.write(0, (b * BLOCK / 512) as u64, data).unwrap(), 0);
        }
        assert_eq!(c.flush(0).unwrap(), 0);
        let hot = (round as usize * 8) % BLOCKS;
        let until = std::time::Instant::now() + Duration::from_millis(400 + 150 * round);
        while std::time::Instant::now() < until {
            for b in hot..hot + 6 {
                let (status, _) = c.read(0, (b * BLOCK / 512) as u64, 4096).unwrap();
                assert_eq!(status, 0);
            }
        }
        let t = tiering(&daemon);
        moved += t["promotions"].as_u64().unwrap_or(0) + t["demotions"].as_u64().unwrap_or(0);
        drop(c);
        daemon.kill9();
        daemon.start_again();
        let mut c = connect(&daemon);
        for (b, data) in want.iter().enumerate() {
            let (status, got) = c.read(0, (b * BLOCK / 512) as u64, BLOCK as u32).unwrap();
            assert_eq!(status, 0, "round {round}: block {b} after the restart");
            assert!(got == *data, "round {round}: block {b} lost its data");
        }
    }
    assert!(moved > 0, "the mover never moved a block before a kill");
}
