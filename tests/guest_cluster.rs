//! A real guest on a disk whose blocks live on three nodes: a replica is killed with -9 in
//! the middle of a verified write workload, comes back, and is resynced; no acknowledged,
//! flushed write is lost and every copy ends byte-identical.

mod common;

use std::time::Duration;

use common::guest::{Disk, Guest, GuestOpts};
use common::{tools_available, TestDir};

const CHUNKS: u32 = 16;

#[test]
fn a_replica_killed_under_a_guest_workload_loses_nothing() {
    if !tools_available(&["qemu-system-x86_64", "etcd"]) {
        return;
    }
    let dir = TestDir::new();
    let (_etcd, mut cluster) = common::etcd_cluster(dir.path(), 3);
    cluster.nodes[0].create_image("g", "32M", "1M", &["a:ram", "b:ram", "c:volume"]);
    let script = format!(
        r#"
for i in $(seq 0 {last}); do
  dd if=/dev/urandom of=/tmp/c bs=64k count=16 2>/dev/null
  dd if=/tmp/c of=/dev/vda bs=64k seek=$((i*16)) oflag=direct conv=fsync 2>/dev/null || echo "RESULT write_error=$i"
  md5sum < /tmp/c | cut -d' ' -f1 > /tmp/sum.$i
  echo "CHUNK $i"
  sleep 0.2
done
bad=0
for i in $(seq 0 {last}); do
  b=$(dd if=/dev/vda bs=64k skip=$((i*16)) count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$b" = "$(cat /tmp/sum.$i)" ] || bad=$((bad+1))
done
echo "RESULT bad=$bad"
"#,
        last = CHUNKS - 1
    );
    let opts = GuestOpts::new(dir.join("guest"), &script)
        .disk(Disk::new(cluster.nodes[0].socket("g")))
        .timeout(Duration::from_secs(240));
    let mut guest = Guest::spawn(&opts);
    assert!(guest.wait_for_console("CHUNK 3", Duration::from_secs(120)));
    cluster.nodes[1].kill9();
    assert!(guest.wait_for_console("CHUNK 9", Duration::from_secs(120)));
    cluster.nodes[1].start_again();
    let out = guest.wait();
    out.expect_ok();
    assert_eq!(out.value("bad"), Some("0"), "{}", out.console);
    assert_eq!(out.value("write_error"), None, "{}", out.console);

    // b missed writes while dead: its copies went stale; after the failure list entry
    // expires, a sync brings them back.
    let info = cluster.nodes[0].cli(&["image", "info", "g"]);
    let stale = info["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["locations"].as_array().unwrap())
        .filter(|l| !l["synced"].as_bool().unwrap())
        .count();
    assert!(stale > 0, "b's copies should have gone stale");
    std::thread::sleep(Duration::from_secs(3));
    cluster.nodes[0].cli(&["sync", "g"]);
    let info = cluster.nodes[0].cli(&["image", "info", "g"]);
    for block in info["blocks"].as_array().unwrap() {
        for l in block["locations"].as_array().unwrap() {
            assert_eq!(l["synced"], true, "{block}");
        }
    }
    for block in 0..CHUNKS as u64 {
        let a = std::fs::read(cluster.nodes[0].block_file("ram", "g", block)).unwrap();
        let b = std::fs::read(cluster.nodes[1].block_file("ram", "g", block)).unwrap();
        let c = std::fs::read(cluster.nodes[2].block_file("volume", "g", block)).unwrap();
        assert!(a == b && b == c, "block {block}: copies differ");
    }
}
