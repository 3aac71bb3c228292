//! Snapshots, clones and flatten through the daemon, with a VM-less client: what each image
//! reads, what the rules refuse, and a snapshot taken under a stream of writes.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::Daemon;
use common::TestDir;
use cormorant_frontend::{BlkClient, ClientOptions};

const MIB: u64 = 1 << 20;
/// Sectors per MiB.
const SECTORS_PER_MIB: u64 = MIB / 512;

fn client(daemon: &Daemon, image: &str) -> BlkClient {
    BlkClient::connect(daemon.socket(image), &ClientOptions::default()).unwrap()
}

fn read(c: &mut BlkClient, sector: u64, len: u32) -> Vec<u8> {
    let (status, data) = c.read(0, sector, len).unwrap();
    assert_eq!(status, 0, "read at sector {sector}");
    data
}

fn write(c: &mut BlkClient, sector: u64, data: &[u8]) {
    assert_eq!(
        c.write(0, sector, data).unwrap(),
        0,
        "write at sector {sector}"
    );
}

/// A golden image of 8 MiB (1 MiB blocks) with every MiB filled with its index + 1, and a
/// snapshot of it.
fn golden(daemon: &Daemon) {
    daemon.create_image("gold", "8M", "1M", &[]);
    let mut c = client(daemon, "gold");
    for i in 0..8u64 {
        write(
            &mut c,
            i * SECTORS_PER_MIB,
            &vec![i as u8 + 1; MIB as usize],
        );
    }
    assert_eq!(c.flush(0).unwrap(), 0);
    drop(c);
    daemon.cli(&["image", "snapshot", "gold", "base"]);
}

#[test]
fn clones_read_their_parent_until_written_and_keep_it_unchanged() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    golden(&daemon);
    let made = daemon.cli(&["image", "clone", "gold@base", "vm1"]);
    assert_eq!(made["parent"], "gold@base");
    daemon.cli(&["image", "clone", "gold@base", "vm2", "--tier", "volume"]);

    let mut vm1 = client(&daemon, "vm1");
    assert_eq!(read(&mut vm1, 3 * SECTORS_PER_MIB, 4096), vec![4; 4096]);
    // A 4 KiB write inside block 3: the rest of the block is the parent's.
    write(&mut vm1, 3 * SECTORS_PER_MIB + 8, &[0xaa; 4096]);
    let block = read(&mut vm1, 3 * SECTORS_PER_MIB, MIB as u32);
    assert!(block[..4096].iter().all(|&b| b == 4));
    assert!(block[4096..8192].iter().all(|&b| b == 0xaa));
    assert!(block[8192..].iter().all(|&b| b == 4));
    // A discarded block reads zeros, not the parent.
    let range = cormorant_frontend::DiscardRange {
        sector: 5 * SECTORS_PER_MIB,
        num_sectors: SECTORS_PER_MIB as u32,
        flags: 0,
    };
    assert_eq!(vm1.discard(0, &[range]).unwrap(), 0);
    assert_eq!(read(&mut vm1, 5 * SECTORS_PER_MIB, 4096), vec![0; 4096]);

    let mut vm2 = client(&daemon, "vm2");
    assert_eq!(read(&mut vm2, 3 * SECTORS_PER_MIB + 8, 4096), vec![4; 4096]);
    assert_eq!(read(&mut vm2, 5 * SECTORS_PER_MIB, 4096), vec![6; 4096]);
    write(&mut vm2, 0, &[0xbb; 512]);
    let mut gold = client(&daemon, "gold");
    write(&mut gold, 7 * SECTORS_PER_MIB, &[0xcc; 512]);
    drop(gold);
    assert_eq!(read(&mut vm1, 7 * SECTORS_PER_MIB, 512), vec![8; 512]);

    let mut snap = client(&daemon, "gold@base");
    for i in 0..8u64 {
        let data = read(&mut snap, i * SECTORS_PER_MIB, MIB as u32);
        assert!(data.iter().all(|&b| b == i as u8 + 1), "snapshot block {i}");
    }
    assert_ne!(
        snap.write(0, 0, &[1; 512]).unwrap(),
        0,
        "a snapshot is read-only"
    );
    drop(snap);

    let info = daemon.cli(&["image", "info", "vm1"]);
    assert_eq!(info["parent"], "gold@base");
    assert_eq!(info["own_blocks"], 2, "{info}");
    let info = daemon.cli(&["image", "info", "gold@base"]);
    assert_eq!(info["children"], serde_json::json!(["vm1", "vm2"]));
    let info = daemon.cli(&["image", "info", "gold"]);
    assert_eq!(info["children"], serde_json::json!(["gold@base"]));
}

#[test]
fn parents_with_children_stay_and_writable_images_are_not_cloned() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    golden(&daemon);
    daemon.cli(&["image", "clone", "gold@base", "vm1"]);
    let refused = |args: &[&str], says: &str| {
        let out = daemon.cli_raw(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was allowed");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    };
    refused(&["image", "rm", "gold@base"], "a child: vm1");
    refused(&["image", "rm", "gold"], "a child: gold@base");
    refused(&["image", "clone", "gold", "vm9"], "is writable");
    refused(
        &["image", "create", "x@y", "--size", "1M"],
        "snapshot's name",
    );
    refused(&["image", "snapshot", "gold", "base"], "already exists");
    refused(
        &["image", "snapshot", "gold@base", "again"],
        "is a snapshot",
    );
    refused(&["image", "snapshot", "gold", "vm1", "s"], "--group");
    refused(&["image", "flatten", "gold"], "not a clone");

    // Flatten while a client writes: the clone keeps its data and needs its parent no more.
    let mut vm1 = client(&daemon, "vm1");
    write(&mut vm1, 2 * SECTORS_PER_MIB, &[0xdd; 4096]);
    let flat = daemon.cli(&["image", "flatten", "vm1"]);
    assert_eq!(flat["blocks_copied"], 7, "{flat}");
    assert!(daemon.cli(&["image", "info", "vm1"])["parent"].is_null());
    daemon.cli(&["image", "rm", "gold@base"]);
    daemon.cli(&["image", "rm", "gold"]);
    let block = read(&mut vm1, 2 * SECTORS_PER_MIB, MIB as u32);
    assert!(block[..4096].iter().all(|&b| b == 0xdd));
    assert!(block[4096..].iter().all(|&b| b == 3));
    assert_eq!(read(&mut vm1, 6 * SECTORS_PER_MIB, 4096), vec![7; 4096]);
    drop(vm1);

    // And so after a restart, and the export is the whole content.
    let mut daemon = daemon;
    daemon.restart();
    let mut vm1 = client(&daemon, "vm1");
    assert_eq!(read(&mut vm1, 6 * SECTORS_PER_MIB, 4096), vec![7; 4096]);
    drop(vm1);
    let out = dir.join("vm1.raw");
    daemon.cli(&["image", "export", "vm1", out.to_str().unwrap()]);
    let raw = std::fs::read(&out).unwrap();
    assert_eq!(raw.len() as u64, 8 * MIB);
    assert!(raw[(7 * MIB) as usize..].iter().all(|&b| b == 8));
}

#[test]
fn clones_survive_a_restart_and_export_their_whole_content() {
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    golden(&daemon);
    daemon.cli(&["image", "clone", "gold@base", "mid"]);
    let mut mid = client(&daemon, "mid");
    write(&mut mid, SECTORS_PER_MIB, &[0x11; 4096]);
    drop(mid);
    daemon.cli(&["image", "snapshot", "mid", "s1"]);
    // A chain: gold@base <- mid <- mid@s1 <- top.
    daemon.cli(&["image", "clone", "mid@s1", "top"]);
    // A snapshot whose metadata was never saved (the daemon died after the barrier).
    let orphan = dir.join("ram").join("mid@s2@00000000000abcde");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("00000001"), b"linked").unwrap();
    daemon.restart();
    assert!(!orphan.exists(), "the unfinished snapshot's files stay");
    assert!(dir.join("ram").read_dir().unwrap().count() >= 4);
    let mut top = client(&daemon, "top");
    assert_eq!(read(&mut top, SECTORS_PER_MIB, 4096), vec![0x11; 4096]);
    assert_eq!(read(&mut top, SECTORS_PER_MIB + 8, 4096), vec![2; 4096]);
    assert_eq!(read(&mut top, 4 * SECTORS_PER_MIB, 4096), vec![5; 4096]);
    drop(top);
    let out = dir.join("top.raw");
    daemon.cli(&["image", "export", "top", out.to_str().unwrap()]);
    let raw = std::fs::read(&out).unwrap();
    for i in 0..8u64 {
        let block = &raw[(i * MIB) as usize..((i + 1) * MIB) as usize];
        let skip = if i == 1 { 4096 } else { 0 };
        assert!(block[skip..].iter().all(|&b| b == i as u8 + 1), "block {i}");
    }
}

/// A snapshot taken under a stream of writes (one at a time, each acknowledged before the
/// next) holds exactly a prefix of them: every region is as some write count left it.
#[test]
fn a_snapshot_under_writes_holds_a_prefix_of_them() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.create_image("live", "4M", "64K", &[]);
    const REGIONS: u64 = 64; // one 4 KiB region per 64 KiB block
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, acked) = (stop.clone(), acked.clone());
        let mut c = client(&daemon, "live");
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let region = n % REGIONS;
                let data: Vec<u8> = (0..512).flat_map(|_| n.to_le_bytes()).collect();
                write(&mut c, region * 128, &data);
                acked.store(n, Ordering::Release);
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let before = acked.load(Ordering::Acquire);
    let taken = daemon.cli(&["image", "snapshot", "live", "s"]);
    let after = acked.load(Ordering::Acquire);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let total = writer.join().unwrap();
    assert!(total > after, "writes went on after the snapshot");
    eprintln!("writes held {} us", taken["writes_held_us"]);

    // The last write the snapshot holds: the largest count found in it.
    let mut snap = client(&daemon, "live@s");
    let mut counts = Vec::new();
    for region in 0..REGIONS {
        let data = read(&mut snap, region * 128, 4096);
        let n = u64::from_le_bytes(data[..8].try_into().unwrap());
        assert!(
            data.chunks(8).all(|c| c == &data[..8]),
            "region {region} is torn"
        );
        counts.push(n);
    }
    let prefix = *counts.iter().max().unwrap();
    assert!(
        (before..=after + 1).contains(&prefix),
        "snapshot holds write {prefix}, taken between {before} and {after}"
    );
    for (region, &n) in counts.iter().enumerate() {
        // The last write to this region at or before `prefix`.
        let region = region as u64;
        let last = prefix.checked_sub((prefix + REGIONS - region) % REGIONS);
        let want = last.filter(|&n| n > 0).unwrap_or(0);
        assert_eq!(n, want, "region {region}");
    }
}

/// A snapshot whose metadata cannot be read at a start is not served, and neither are its
/// clones; but nothing of theirs is removed, `rm` of its image is still refused, and once the
/// metadata is back everything reads as before.
#[test]
fn an_unreadable_snapshot_is_kept_not_swept() {
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    golden(&daemon);
    daemon.cli(&["image", "clone", "gold@base", "vm1"]);
    let meta = dir.join("vol").join(".meta").join("gold@base.json");
    let good = std::fs::read(&meta).expect("the snapshot's metadata file");
    std::fs::write(&meta, b"{ not json").unwrap();
    daemon.restart();
    let images = daemon.cli(&["image", "list"]);
    let names: Vec<&str> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gold"], "only the image itself is served");
    let out = daemon.cli_raw(&["image", "rm", "gold"]);
    assert!(!out.status.success(), "gold was removed under its snapshot");
    std::fs::write(&meta, good).unwrap();
    daemon.restart();
    let mut vm1 = client(&daemon, "vm1");
    assert_eq!(read(&mut vm1, 2 * SECTORS_PER_MIB, 4096), vec![3; 4096]);
    let mut snap = client(&daemon, "gold@base");
    assert_eq!(read(&mut snap, 7 * SECTORS_PER_MIB, 4096), vec![8; 4096]);
}

/// A clone grows past its parent (the new space reads zeros, the old still reads through),
/// a snapshot of the grown clone takes the new blocks too, and a shrink waits for a flatten.
#[test]
fn a_clone_grows_past_its_parent_and_is_snapshotted_whole() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    golden(&daemon);
    daemon.cli(&["image", "clone", "gold@base", "vm1"]);
    daemon.cli(&["image", "resize", "vm1", "12M"]);
    let mut vm1 = client(&daemon, "vm1");
    assert_eq!(read(&mut vm1, 7 * SECTORS_PER_MIB, 4096), vec![8; 4096]);
    assert_eq!(read(&mut vm1, 10 * SECTORS_PER_MIB, 4096), vec![0; 4096]);
    write(&mut vm1, 11 * SECTORS_PER_MIB, &[0x5a; 4096]);
    drop(vm1);
    daemon.cli(&["image", "snapshot", "vm1", "big"]);
    let mut snap = client(&daemon, "vm1@big");
    assert_eq!(
        read(&mut snap, 11 * SECTORS_PER_MIB, 4096),
        vec![0x5a; 4096]
    );
    assert_eq!(read(&mut snap, 2 * SECTORS_PER_MIB, 4096), vec![3; 4096]);
    drop(snap);
    let out = daemon.cli_raw(&["image", "resize", "vm1", "4M", "--allow-shrink"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("flatten"),
        "{stderr}"
    );
    let out = daemon.cli_raw(&["image", "resize", "gold@base", "16M"]);
    assert!(!out.status.success(), "a snapshot was resized");
}

/// An auto-tiered clone: its hot blocks move to the RAM tier (those it reads through become
/// copies of its own there) and every block reads the same before and after.
#[test]
fn an_auto_tiered_clone_keeps_its_content_through_moves() {
    let dir = TestDir::new();
    let args = ["--ram-budget", "4M", "--tier-interval-ms", "200"];
    let daemon = Daemon::start_with(dir.path(), args.iter().map(|a| a.to_string()).collect());
    golden(&daemon);
    daemon.cli(&["image", "clone", "gold@base", "vm1", "--tier", "volume"]);
    let mut vm1 = client(&daemon, "vm1");
    write(&mut vm1, 2 * SECTORS_PER_MIB + 8, &[0x77; 4096]);
    daemon.cli(&["image", "set", "vm1", "--tier", "auto"]);
    let expect = |c: &mut BlkClient| {
        for i in 0..8u64 {
            let data = read(c, i * SECTORS_PER_MIB, MIB as u32);
            for (page, chunk) in data.chunks(4096).enumerate() {
                let want = if i == 2 && page == 1 {
                    0x77
                } else {
                    i as u8 + 1
                };
                assert!(chunk.iter().all(|&b| b == want), "block {i} page {page}");
            }
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Blocks 1-3 hot: read them again and again.
        for _ in 0..20 {
            for i in 1..4u64 {
                read(&mut vm1, i * SECTORS_PER_MIB, 4096);
            }
        }
        let stats = daemon.cli(&["stats", "vm1"]);
        if stats["tiering"]["promotions"].as_u64().unwrap_or(0) >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing promoted: {stats}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    expect(&mut vm1);
    drop(vm1);
    let info = daemon.cli(&["image", "info", "vm1"]);
    assert!(
        info["tiers"]["ram"].as_u64().unwrap() >= 3,
        "{}",
        info["tiers"]
    );
    let mut snap = client(&daemon, "gold@base");
    assert_eq!(
        read(&mut snap, 2 * SECTORS_PER_MIB + 8, 4096),
        vec![3; 4096]
    );
}
