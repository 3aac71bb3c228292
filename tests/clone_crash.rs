//! Issue 13: the daemon killed with -9 in the middle of a clone's copy-up and in the middle of
//! `image flatten`, then started again: nothing acknowledged is lost, no block reads zeros
//! where the parent had data or anything that was never written, and a second flatten finishes
//! the job, after which the parent can go. Also a snapshot of a clone taken mid-flatten (the
//! flatten's copies are not held by the snapshot's barrier).
//!
//! A VM-less client writes (`cormorant_frontend::BlkClient`); the kill is aimed by watching the
//! clone's block directory: a copy-up is built as `.NNNNNNNN.new` and renamed into place, so
//! the daemon is killed while such a file exists, and a flatten is killed once some, not all,
//! of the clone's blocks have files of their own.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, BIN};
use common::{never_zero_bytes, wait_until, TestDir};
use cormorant_frontend::{BlkClient, ClientOptions};

const MIB: usize = 1 << 20;
/// 4 MiB blocks: a copy-up (read, write, fdatasync, rename) takes long enough to be caught.
const BLOCK: usize = 4 * MIB;
const BLOCKS: usize = 48;
const SIZE: usize = BLOCK * BLOCKS;
/// Bytes a client write puts into a block: one page.
const PAGE: usize = 4096;

/// `gold` (volume tier, 4 MiB blocks) imported from a file of [`never_zero_bytes`], and its
/// snapshot `gold@base`; returns the content.
fn golden(daemon: &Daemon) -> Vec<u8> {
    let data = never_zero_bytes(SIZE, 0x90_1d);
    daemon.import("gold", &data, &["--tier", "volume", "--block-size", "4M"]);
    daemon.cli(&["image", "snapshot", "gold", "base"]);
    data
}

fn connect(daemon: &Daemon, image: &str) -> BlkClient {
    BlkClient::connect(daemon.socket(image), &ClientOptions::default()).unwrap()
}

/// Where the client's write to `block` lands: one page, somewhere inside the block.
fn write_offset(block: usize) -> usize {
    block * BLOCK + (block * 157 % (BLOCK / PAGE)) * PAGE
}

/// What the client's write to `block` holds.
fn write_data(block: usize) -> Vec<u8> {
    never_zero_bytes(PAGE, 0xc0ff_ee00 + block as u64)
}

/// A copy-up's temporary file in `dir` (`.NNNNNNNN.new`).
fn copy_up_in_progress(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".new"))
        })
        .unwrap_or(false)
}

/// Files of blocks of their own in a clone's directory (`NNNNNNNN`).
fn own_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.len() == 8 && name.bytes().all(|b| b.is_ascii_digit())
                })
                .count()
        })
        .unwrap_or(0)
}

/// What a writer thread saw before the daemon died under it.
struct Written {
    acked: Vec<usize>,
    /// The block whose write got no answer: it may or may not have landed.
    in_flight: Option<usize>,
}

/// Writes one page into each block from `first` on, each the block's first write (so each is
/// a copy-up), until the daemon stops answering or the blocks run out.
fn writer(mut client: BlkClient, first: usize) -> Written {
    let mut acked = Vec::new();
    for block in first..BLOCKS {
        let sector = (write_offset(block) / 512) as u64;
        match client.write(0, sector, &write_data(block)) {
            Ok(0) => acked.push(block),
            Ok(status) => panic!("write to block {block} failed with status {status}"),
            Err(_) => {
                return Written {
                    acked,
                    in_flight: Some(block),
                }
            }
        }
    }
    Written {
        acked,
        in_flight: None,
    }
}

/// The content the clone must have: the parent's, with the acknowledged writes.
fn with_writes(parent: &[u8], blocks: &[usize]) -> Vec<u8> {
    let mut want = parent.to_vec();
    for &block in blocks {
        let at = write_offset(block);
        want[at..at + PAGE].copy_from_slice(&write_data(block));
    }
    want
}

/// Compares block by block; a block in `either` may also be as `alt` has it.
fn check_blocks(got: &[u8], want: &[u8], alt: &[u8], either: &[usize], what: &str) {
    for block in 0..BLOCKS {
        let range = block * BLOCK..(block + 1) * BLOCK;
        let ok = got[range.clone()] == want[range.clone()]
            || (either.contains(&block) && got[range.clone()] == alt[range.clone()]);
        if !ok {
            let zeros = got[range.clone()].iter().filter(|&&b| b == 0).count();
            panic!("{what}: block {block} is wrong ({zeros} zero bytes)");
        }
    }
}

#[test]
fn kill_9_mid_copy_up_loses_no_acknowledged_write() {
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    let parent = golden(&daemon);
    daemon.cli(&["image", "clone", "gold@base", "vm", "--tier", "volume"]);

    let mut acked: Vec<usize> = Vec::new();
    let mut ambiguous: Vec<usize> = Vec::new();
    let mut next = 0;
    let mut kills = 0;
    while next < BLOCKS && kills < 4 {
        let client = connect(&daemon, "vm");
        let (done_tx, done_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let written = writer(client, next);
            let _ = done_tx.send(());
            written
        });
        // Let a few copy-ups through first, so each kill lands at another block.
        let clone_dir = daemon.image_dir("volume", "vm");
        let skip = own_files(&clone_dir) + 2;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut caught = false;
        while Instant::now() < deadline && done_rx.try_recv().is_err() {
            if own_files(&clone_dir) >= skip && copy_up_in_progress(&clone_dir) {
                daemon.kill9();
                caught = true;
                break;
            }
            std::thread::yield_now();
        }
        let written = thread.join().unwrap();
        eprintln!(
            "round {kills}: {} writes acknowledged, in flight {:?}, killed mid-copy-up: {caught}",
            written.acked.len(),
            written.in_flight
        );
        acked.extend(&written.acked);
        next = match written.in_flight {
            Some(block) => {
                ambiguous.push(block);
                block + 1
            }
            None => BLOCKS,
        };
        if caught {
            kills += 1;
            daemon.start_again();
        }
    }
    assert!(
        kills >= 2,
        "the daemon was killed mid-copy-up {kills} times"
    );

    // Every acknowledged write is there; a write in flight at a kill is all there or not at
    // all; every other byte is the parent's.
    let want = with_writes(&parent, &acked);
    let alt = with_writes(&parent, &[acked.clone(), ambiguous.clone()].concat());
    let mut client = connect(&daemon, "vm");
    let mut got = Vec::with_capacity(SIZE);
    for block in 0..BLOCKS {
        let (status, data) = client
            .read(0, (block * BLOCK / 512) as u64, BLOCK as u32)
            .unwrap();
        assert_eq!(status, 0, "read block {block}");
        got.extend(data);
    }
    drop(client);
    check_blocks(&got, &alt, &want, &ambiguous, "clone after kills");
    check_blocks(
        &daemon.exported("vm", SIZE),
        &alt,
        &want,
        &ambiguous,
        "clone export",
    );
    assert_eq!(
        daemon.exported("gold@base", SIZE),
        parent,
        "the snapshot changed"
    );
    assert_eq!(
        daemon.exported("gold", SIZE),
        parent,
        "the original changed"
    );

    // A copy-up cut short leaves at most a temporary file, which nothing takes for a block.
    let info = daemon.cli(&["image", "info", "vm"]);
    let own = info["own_blocks"].as_u64().unwrap() as usize;
    assert!(
        (acked.len()..=acked.len() + ambiguous.len()).contains(&own),
        "{own} own blocks for {} acknowledged writes: {info}",
        acked.len()
    );
}

/// Starts `image flatten vm` in the background; its answer comes through `wait`.
fn flatten_in_background(daemon: &Daemon) -> std::process::Child {
    Command::new(BIN)
        .arg("--run-dir")
        .arg(&daemon.run_dir)
        .args(["image", "flatten", "vm"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn kill_9_mid_flatten_then_flatten_again_and_drop_the_parent() {
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    let parent = golden(&daemon);
    daemon.cli(&["image", "clone", "gold@base", "vm", "--tier", "volume"]);
    // The clone's own writes in a few blocks, flushed.
    let mut client = connect(&daemon, "vm");
    let written = [3usize, 17, 40];
    for &block in &written {
        let sector = (write_offset(block) / 512) as u64;
        assert_eq!(client.write(0, sector, &write_data(block)).unwrap(), 0);
    }
    assert_eq!(client.flush(0).unwrap(), 0);
    drop(client);
    let want = with_writes(&parent, &written);

    let clone_dir = daemon.image_dir("volume", "vm");
    let mut flatten = flatten_in_background(&daemon);
    let part_way = wait_until(Duration::from_secs(60), || {
        own_files(&clone_dir) >= written.len() + 8
    });
    daemon.kill9();
    let _ = flatten.wait();
    assert!(part_way, "flatten copied nothing in 60 s");
    daemon.start_again();

    let info = daemon.cli(&["image", "info", "vm"]);
    assert_eq!(info["parent"], "gold@base", "{info}");
    let own = info["own_blocks"].as_u64().unwrap() as usize;
    assert!(
        own > written.len() && own < BLOCKS,
        "killed part-way: {own} of {BLOCKS} blocks own: {info}"
    );
    assert_eq!(daemon.exported("vm", SIZE), want, "after the kill");

    // The second flatten copies only what the first did not.
    let flat = daemon.cli(&["image", "flatten", "vm"]);
    assert_eq!(flat["blocks_copied"], (BLOCKS - own) as u64, "{flat}");
    assert!(daemon.cli(&["image", "info", "vm"])["parent"].is_null());
    daemon.cli(&["image", "rm", "gold@base"]);
    daemon.cli(&["image", "rm", "gold"]);
    assert_eq!(daemon.exported("vm", SIZE), want, "after flatten");
    daemon.restart();
    assert_eq!(daemon.exported("vm", SIZE), want, "after a restart");
    let mut client = connect(&daemon, "vm");
    let (status, page) = client
        .read(0, (write_offset(17) / 512) as u64, PAGE as u32)
        .unwrap();
    assert_eq!(status, 0);
    assert_eq!(page, write_data(17));
}

/// A guest's view of the same: it writes one page into each block of its clone (each write
/// a copy-up, flushed), with QEMU reconnecting (`reconnect-ms`) to a daemon killed with -9
/// while a copy-up is being built, several times. The restarted daemon replays the write left
/// in flight (over the half-built copy-up), the guest sees no error, and every page, its own
/// and the parent's, reads back right, in the guest and on the host.
const GUEST_SCRIPT: &str = r#"
md5() { md5sum | cut -d' ' -f1; }
page() { dd if=/dev/vda bs=4k skip=$1 count=1 iflag=direct 2>/dev/null | md5; }
for i in $(seq 0 47); do page $(( i * 1024 + 1023 )) > /tmp/gold.$i; done
echo READY
for i in $(seq 0 47); do
  printf "%04096d" $((i + 1)) > /tmp/r
  dd if=/tmp/r of=/dev/vda bs=4k seek=$(( i * 1024 + i * 157 % 1023 )) oflag=direct conv=fsync 2>/dev/null || echo "WRITE-ERROR $i"
  echo "WROTE $i"
done
bad=0
for i in $(seq 0 47); do
  printf "%04096d" $((i + 1)) > /tmp/r
  [ "$(page $(( i * 1024 + i * 157 % 1023 )))" = "$(md5 < /tmp/r)" ] || { echo "RECORD-DIFFERS $i"; bad=$((bad + 1)); }
  [ "$(page $(( i * 1024 + 1023 )))" = "$(cat /tmp/gold.$i)" ] || { echo "GOLD-DIFFERS $i"; bad=$((bad + 1)); }
done
echo "RESULT bad=$bad"
"#;

fn in_use(daemon: &Daemon, image: &str) -> bool {
    let out = daemon.cli_raw(&["image", "info", image]);
    out.status.success()
        && serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|info| info["in_use"] == true)
}

#[test]
fn kill_9_mid_copy_up_under_a_guest_loses_nothing() {
    if !common::tools_available(&["qemu-system-x86_64"]) {
        return;
    }
    use common::guest::{Disk, Guest, GuestOpts};
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    let parent = golden(&daemon);
    daemon.cli(&["image", "clone", "gold@base", "vm", "--tier", "volume"]);
    let mut guest = Guest::spawn(
        &GuestOpts::new(dir.join("guest"), GUEST_SCRIPT)
            .disk(Disk::new(daemon.socket("vm")).reconnect_ms(100))
            .timeout(Duration::from_secs(600)),
    );
    assert!(
        guest.wait_for_console("READY", Duration::from_secs(240)),
        "{}",
        guest.console()
    );
    let clone_dir = daemon.image_dir("volume", "vm");
    let mut kills = 0;
    while kills < 3 && !guest.console().contains("RESULT bad") {
        let skip = own_files(&clone_dir) + 3;
        let aimed = wait_until(Duration::from_secs(120), || {
            own_files(&clone_dir) >= skip && copy_up_in_progress(&clone_dir)
        });
        if !aimed {
            break;
        }
        daemon.kill9();
        kills += 1;
        daemon.start_again();
        assert!(
            wait_until(Duration::from_secs(30), || in_use(&daemon, "vm")),
            "QEMU did not reconnect"
        );
    }
    let out = guest.wait();
    out.expect_ok();
    for failure in ["WRITE-ERROR", "RECORD-DIFFERS", "GOLD-DIFFERS", "I/O error"] {
        assert!(
            !out.console.contains(failure),
            "{failure}:\n{}",
            out.console
        );
    }
    assert_eq!(out.value("bad"), Some("0"), "{}", out.console);
    assert!(kills >= 2, "killed mid-copy-up only {kills} times");
    let replays = daemon.log().matches("requests left in flight").count();
    eprintln!("{kills} kills mid-copy-up, {replays} replays of requests left in flight");

    let mut want = parent.clone();
    for i in 0..BLOCKS {
        let at = i * BLOCK + (i * 157 % 1023) * PAGE;
        let record = format!("{:04096}", i + 1);
        want[at..at + PAGE].copy_from_slice(record.as_bytes());
    }
    assert!(daemon.exported("vm", SIZE) == want, "the clone's content");
    assert!(
        daemon.exported("gold@base", SIZE) == parent,
        "the snapshot changed"
    );
}

/// A snapshot of a clone taken while `image flatten` copies its blocks in (the flatten's
/// copies are not guest writes, so the barrier does not hold them): the snapshot holds the
/// clone's content, keeps the parent it needs, and still reads right once the flatten is
/// done and the clone no longer needs that parent.
#[test]
fn a_snapshot_taken_mid_flatten_keeps_what_it_needs() {
    let dir = TestDir::new();
    let mut daemon = Daemon::start(dir.path());
    let parent = golden(&daemon);
    daemon.cli(&["image", "clone", "gold@base", "vm", "--tier", "volume"]);
    let mut client = connect(&daemon, "vm");
    let written = [5usize, 30];
    for &block in &written {
        let sector = (write_offset(block) / 512) as u64;
        assert_eq!(client.write(0, sector, &write_data(block)).unwrap(), 0);
    }
    drop(client);
    let want = with_writes(&parent, &written);

    let clone_dir = daemon.image_dir("volume", "vm");
    let mut flatten = flatten_in_background(&daemon);
    let part_way = wait_until(Duration::from_secs(60), || {
        own_files(&clone_dir) >= written.len() + 8
    });
    daemon.cli(&["image", "snapshot", "vm", "mid"]);
    let snapped_own = own_files(&daemon.image_dir("volume", "vm@mid"));
    assert!(flatten.wait().unwrap().success(), "flatten failed");
    assert!(
        part_way && snapped_own < BLOCKS,
        "snapshot taken after the flatten: {snapped_own}"
    );

    assert!(daemon.cli(&["image", "info", "vm"])["parent"].is_null());
    assert_eq!(
        daemon.cli(&["image", "info", "vm@mid"])["parent"],
        "gold@base"
    );
    let refused = daemon.cli_raw(&["image", "rm", "gold@base"]);
    assert!(!refused.status.success(), "gold@base removed under vm@mid");
    assert!(
        daemon.exported("vm@mid", SIZE) == want,
        "the snapshot's content"
    );
    assert!(daemon.exported("vm", SIZE) == want, "the clone's content");
    daemon.restart();
    assert!(
        daemon.exported("vm@mid", SIZE) == want,
        "the snapshot after a restart"
    );
}
