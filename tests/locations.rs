//! Moving an image's blocks between copies on one node (RAM tier to volume tier) while a
//! frontend keeps writing: location add, sync, location rm, and the rules around them.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::Daemon;
use common::TestDir;
use cormorant_frontend::{BlkClient, ClientOptions};

const S_OK: u8 = 0;

fn synced_counts(daemon: &Daemon, image: &str) -> (usize, usize) {
    let info = daemon.cli(&["image", "info", image]);
    let mut synced = 0;
    let mut stale = 0;
    for block in info["blocks"].as_array().unwrap() {
        for l in block["locations"].as_array().unwrap() {
            if l["synced"].as_bool().unwrap() {
                synced += 1;
            } else {
                stale += 1;
            }
        }
    }
    (synced, stale)
}

#[test]
fn move_between_tiers_under_writes() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&[
        "image",
        "create",
        "m",
        "--size",
        "8M",
        "--block-size",
        "256K",
    ]);
    let mut client = BlkClient::connect(daemon.socket("m"), &ClientOptions::default()).unwrap();
    // Fill every block with its own byte.
    for block in 0..32u64 {
        let status = client
            .write(0, block * 512, &vec![block as u8; 256 << 10])
            .unwrap();
        assert_eq!(status, S_OK);
    }

    // Without an in-sync second copy, the only copy cannot go.
    let refused = daemon.cli_raw(&["location", "rm", "m", "--at", "local:ram"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no in-sync copy"));

    let added = daemon.cli(&["location", "add", "m", "--at", "local:volume"]);
    assert_eq!(added["added"], 32);

    // A writer keeps rewriting the first 4 blocks while the copies sync.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut round = 0u8;
            while !stop.load(Ordering::Relaxed) {
                round = round.wrapping_add(1);
                for block in 0..4u64 {
                    let data = vec![round ^ block as u8; 4096];
                    assert_eq!(client.write(0, block * 512 + 8, &data).unwrap(), S_OK);
                }
            }
            (client, round)
        })
    };
    let report = daemon.cli(&["sync", "m"]);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (mut client, round) = writer.join().unwrap();
    // Whatever the background fill and the explicit sync raced, one more sync settles it.
    daemon.cli(&["sync", "m"]);
    assert_eq!(synced_counts(&daemon, "m"), (64, 0), "sync report {report}");

    daemon.cli(&["location", "rm", "m", "--at", "local:ram"]);
    assert_eq!(synced_counts(&daemon, "m"), (32, 0));
    assert!(
        !daemon.block_file("ram", "m", 5).exists(),
        "the RAM copy is gone"
    );
    assert!(daemon.block_file("volume", "m", 5).exists());
    // Reads now come from the volume copy: the last writes and the untouched data.
    for block in 0..32u64 {
        let (status, data) = client.read(0, block * 512, 8192).unwrap();
        assert_eq!(status, S_OK);
        assert!(
            data[..4096].iter().all(|&b| b == block as u8),
            "block {block}"
        );
        if block < 4 {
            assert!(
                data[4096..].iter().all(|&b| b == round ^ block as u8),
                "block {block}"
            );
        }
    }
    let refused = daemon.cli_raw(&["location", "rm", "m", "--at", "local:volume"]);
    assert!(!refused.status.success(), "last copy");
}

#[test]
fn location_commands_check_their_input() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&["image", "create", "x", "--size", "4M", "--block-size", "1M"]);
    for bad in [
        vec!["location", "add", "x", "--at", "nowhere:ram"],
        vec!["location", "add", "x", "--at", "local:ssd"],
        vec![
            "location",
            "add",
            "x",
            "--blocks",
            "0..5",
            "--at",
            "local:volume",
        ],
        vec![
            "location",
            "add",
            "x",
            "--blocks",
            "3..3",
            "--at",
            "local:volume",
        ],
        vec!["location", "add", "nope", "--at", "local:volume"],
        vec!["sync", "x", "--blocks", "2..9"],
        vec![
            "image",
            "create",
            "y",
            "--size",
            "1M",
            "--at",
            "elsewhere:ram",
        ],
    ] {
        let out = daemon.cli_raw(&bad);
        assert!(!out.status.success(), "{bad:?} should fail");
    }
    let half = daemon.cli(&[
        "location",
        "add",
        "x",
        "--blocks",
        "0..2",
        "--at",
        "local:volume",
    ]);
    assert_eq!(half["added"], 2);
    let again = daemon.cli(&[
        "location",
        "add",
        "x",
        "--blocks",
        "0..4",
        "--at",
        "local:volume",
    ]);
    assert_eq!(again["added"], 2, "blocks that have the copy keep it");
}
