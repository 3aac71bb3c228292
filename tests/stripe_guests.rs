//! Issue 12 part 3 with a real guest under QEMU: an image striped over three nodes' volume
//! tiers with two copies of each block loses no acknowledged write when one member is killed
//! (`kill -9`) in the middle of a verified write workload; the guest keeps running, and once
//! the member is back `sync` brings its copies in sync again, holding the guest's data.

mod common;

use std::time::Duration;

use common::guest::{Disk, Guest, GuestOpts};
use common::{tools_available, wait_until, TestDir};

/// Shell that makes chunk `$i` of tag `$tag` (256 KiB, a number padded with zeros) in /tmp/c.
const MAKE_CHUNK: &str = r#"printf "%0262144d" $((i*1000+tag)) > /tmp/c"#;

/// 48 chunks of 256 KiB: 12 blocks of 1 MiB, four stripe units per member.
const CHUNKS: u32 = 48;

/// Writes chunks `0..CHUNKS` with `tag`, each flushed before the next (so each `WROTE i` is
/// an acknowledged, durable write), then reads every chunk back and compares it:
/// `RESULT write_errors=N` and `RESULT bad=N`.
fn write_and_check(tag: u32) -> String {
    let last = CHUNKS - 1;
    format!(
        r#"
tag={tag}; errors=0
for i in $(seq 0 {last}); do
  {MAKE_CHUNK}
  dd if=/tmp/c of=/dev/vda bs=64k seek=$((i*4)) oflag=direct conv=fsync 2>/dev/null || errors=$((errors+1))
  echo "WROTE $i"
done
echo "RESULT write_errors=$errors"
{}"#,
        check(tag)
    )
}

/// Reads every chunk and compares it with the chunk of `tag`: `RESULT bad=N`.
fn check(tag: u32) -> String {
    let last = CHUNKS - 1;
    format!(
        r#"
tag={tag}; bad=0
for i in $(seq 0 {last}); do
  {MAKE_CHUNK}
  want=$(md5sum < /tmp/c | cut -d' ' -f1)
  got=$(dd if=/dev/vda bs=64k skip=$((i*4)) count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || bad=$((bad+1))
done
echo "RESULT bad=$bad"
"#
    )
}

/// Copies (in sync, out of sync) of the image as its owner reports them.
fn copies(info: &serde_json::Value) -> (usize, usize) {
    let mut counts = (0, 0);
    for block in info["blocks"].as_array().unwrap() {
        for l in block["locations"].as_array().unwrap() {
            if l["synced"] == true {
                counts.0 += 1;
            } else {
                counts.1 += 1;
            }
        }
    }
    counts
}

#[test]
fn a_striped_image_with_two_copies_survives_a_member_killed_under_writes() {
    if !tools_available(&["qemu-system-x86_64", "etcd"]) {
        return;
    }
    let dir = TestDir::new();
    let (_etcd, mut cluster) = common::etcd_cluster(dir.path(), 3);
    let created = cluster.nodes[0].cli(&[
        "image",
        "create",
        "st",
        "--size",
        "12M",
        "--block-size",
        "1M",
        "--stripe",
        "a:volume,b:volume,c:volume",
        "--copies",
        "2",
    ]);
    assert_eq!(created["stripe"]["copies"], 2, "{created}");
    let info = cluster.nodes[0].cli(&["image", "info", "st"]);
    assert_eq!(copies(&info), (24, 0), "12 blocks, two copies each");

    let mut guest = Guest::spawn(
        &GuestOpts::new(dir.join("writer"), &write_and_check(1))
            .disk(Disk::new(cluster.nodes[0].socket("st")))
            .timeout(Duration::from_secs(300)),
    );
    assert!(
        guest.wait_for_console("WROTE 8", Duration::from_secs(180)),
        "{}",
        guest.console()
    );
    cluster.nodes[1].kill9(); // member b, mid-workload
    let out = guest.wait();
    out.expect_ok();
    assert_eq!(out.value("write_errors"), Some("0"), "{}", out.console);
    assert_eq!(out.value("bad"), Some("0"), "{}", out.console);
    let a = &cluster.nodes[0];
    let (_, stale) = copies(&a.cli(&["image", "info", "st"]));
    assert!(stale > 0, "b missed writes: its copies went out of sync");

    cluster.nodes[1].start_again();
    let a = &cluster.nodes[0];
    assert!(
        wait_until(Duration::from_secs(60), || {
            let _ = a.cli_raw(&["sync", "st"]);
            copies(&a.cli(&["image", "info", "st"])) == (24, 0)
        }),
        "sync brings b's copies back: {}",
        a.cli(&["image", "info", "st"])
    );
    let info = a.cli(&["image", "info", "st"]);
    assert_eq!(info["stripe"]["members"][1]["at"], "b:volume");
    assert!(info["stripe"]["members"][1].get("incomplete").is_none());

    // With c gone, every block's only reachable copies are on a and b: b's resynced copies
    // must hold the guest's data.
    cluster.nodes[2].kill9();
    let read = Guest::run(
        &GuestOpts::new(dir.join("reader"), &check(1))
            .disk(Disk::new(cluster.nodes[0].socket("st")))
            .timeout(Duration::from_secs(300)),
    );
    read.expect_ok();
    assert_eq!(read.value("bad"), Some("0"), "{}", read.console);
}
