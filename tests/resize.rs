//! `image resize`: through the CLI (sizes checked, shrink refused without --allow-shrink or
//! while in use, data kept, new space zeros) and under a running guest, which sees its disk
//! grow without a reboot.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use common::guest::{Disk, Guest, GuestOpts};
use common::{tools_available, TestDir};

const MIB: usize = 1 << 20;

/// The bytes of an image, read on the host through `image export`.
fn exported(daemon: &Daemon, dir: &TestDir, image: &str) -> Vec<u8> {
    let raw = dir.join(&format!("{image}.export"));
    daemon.cli(&["image", "export", image, raw.to_str().unwrap()]);
    std::fs::read(&raw).unwrap()
}

/// Fails with a message naming `needle`, and never a panic.
fn refused(daemon: &Daemon, args: &[&str], needle: &str) {
    let out = daemon.cli_raw(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn resize_through_the_cli() {
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    // 10 MiB in blocks of 4 MiB: the last block is 2 MiB short.
    let content: Vec<u8> = (0..10 * MIB).map(|i| (i % 251) as u8 + 1).collect();
    let raw = dir.join("content.raw");
    std::fs::write(&raw, &content).unwrap();
    daemon.cli(&["image", "import", "disk", raw.to_str().unwrap()]);

    let grown = daemon.cli(&["image", "resize", "disk", "20M"]);
    assert_eq!(grown["size"], 20u64 << 20);
    assert_eq!(grown["old_size"], 10u64 << 20);
    assert_eq!(grown["blocks"], 5);
    let info = daemon.cli(&["image", "info", "disk"]);
    assert_eq!(info["size"], 20u64 << 20);
    let bytes = exported(&daemon, &dir, "disk");
    assert_eq!(bytes.len(), 20 * MIB);
    assert!(bytes[..10 * MIB] == content[..], "the old data is kept");
    assert!(
        bytes[10 * MIB..].iter().all(|&b| b == 0),
        "new space reads zeros"
    );

    refused(
        &daemon,
        &["image", "resize", "disk", "1000"],
        "multiple of 512",
    );
    refused(&daemon, &["image", "resize", "disk", "12Q"], "");
    refused(&daemon, &["image", "resize", "disk", "17T"], "limit");
    refused(&daemon, &["image", "resize", "nope", "1G"], "no image");
    refused(
        &daemon,
        &["image", "resize", "disk", "6M"],
        "--allow-shrink",
    );
    assert_eq!(daemon.cli(&["image", "info", "disk"])["size"], 20u64 << 20);

    // A shrink cuts inside a block; growing again, what was past the cut reads as zeros.
    daemon.cli(&["image", "resize", "disk", "6M", "--allow-shrink"]);
    let bytes = exported(&daemon, &dir, "disk");
    assert!(bytes == content[..6 * MIB], "a shrink keeps what is left");
    daemon.cli(&["image", "resize", "disk", "10M"]);
    let bytes = exported(&daemon, &dir, "disk");
    assert!(bytes[..6 * MIB] == content[..6 * MIB]);
    assert!(
        bytes[6 * MIB..].iter().all(|&b| b == 0),
        "nothing comes back from before the shrink"
    );

    daemon.cli(&["image", "create", "golden", "--size", "8M", "--read-only"]);
    refused(&daemon, &["image", "resize", "golden", "16M"], "read-only");

    // The size survives a restart (it is in the image's metadata file).
    let mut daemon = daemon;
    assert!(daemon.terminate());
    daemon.start_again();
    assert_eq!(daemon.cli(&["image", "info", "disk"])["size"], 10u64 << 20);
}

/// The guest writes near the end of its 10 MiB disk, the host grows the image to 20 MiB
/// under it while the guest keeps writing and verifying 1 MiB in a loop: `/sys/block/vda/size`
/// changes without a reboot, the loop never sees an error or a mismatch, the new space reads
/// zeros and takes writes that read back, and what was written before is unchanged. A shrink
/// while the guest runs is refused.
#[test]
fn a_running_guest_sees_its_disk_grow() {
    if !tools_available(&["qemu-system-x86_64"]) {
        return;
    }
    let dir = TestDir::new();
    let daemon = Daemon::start(dir.path());
    daemon.cli(&["image", "create", "disk", "--size", "10M"]);
    let script = r#"
dd if=/dev/urandom of=/tmp/old bs=1M count=1 2>/dev/null
dd if=/tmp/old of=/dev/vda bs=64k seek=144 oflag=direct conv=fsync 2>/dev/null || echo "RESULT old_write=failed"
before=$(cat /sys/block/vda/size)
echo "RESULT size_before=$before"
a=$(md5sum < /tmp/old | cut -d' ' -f1)
# I/O goes on while the disk grows: 1 MiB at 1 MiB written and verified in a loop.
( i=0; while [ ! -f /tmp/stop ]; do
    dd if=/tmp/old of=/dev/vda bs=64k seek=16 oflag=direct 2>/dev/null || echo bad >> /tmp/errors
    r=$(dd if=/dev/vda bs=64k skip=16 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$r" = "$a" ] || echo bad >> /tmp/errors
    i=$((i+1)); echo $i > /tmp/rounds
  done; touch /tmp/stopped ) &
echo READY_TO_RESIZE
n=0
while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $n -lt 600 ]; do usleep 100000; n=$((n+1)); done
echo "RESULT size_after=$(cat /sys/block/vda/size)"
touch /tmp/stop
while [ ! -f /tmp/stopped ]; do usleep 100000; done
echo "RESULT busy_rounds=$(cat /tmp/rounds)"
echo "RESULT busy_errors=$(cat /tmp/errors 2>/dev/null | wc -l)"
z=$(dd if=/dev/zero bs=1M count=10 2>/dev/null | md5sum | cut -d' ' -f1)
n=$(dd if=/dev/vda bs=1M skip=10 count=10 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$z" = "$n" ] && echo "RESULT new_zeros=yes" || echo "RESULT new_zeros=no"
b=$(dd if=/dev/vda bs=64k skip=144 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$a" = "$b" ] && echo "RESULT old_kept=yes" || echo "RESULT old_kept=no"
dd if=/dev/urandom of=/tmp/new bs=1M count=2 2>/dev/null
dd if=/tmp/new of=/dev/vda bs=64k seek=288 oflag=direct conv=fsync 2>/dev/null || echo "RESULT new_write=failed"
c=$(md5sum < /tmp/new | cut -d' ' -f1)
d=$(dd if=/dev/vda bs=64k skip=288 count=32 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$c" = "$d" ] && echo "RESULT new_back=yes" || echo "RESULT new_back=no"
echo "RESULT new_md5=$c"
"#;
    let mut guest =
        Guest::spawn(&GuestOpts::new(dir.path(), script).disk(Disk::new(daemon.socket("disk"))));
    assert!(
        guest.wait_for_console("READY_TO_RESIZE", Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    refused(
        &daemon,
        &["image", "resize", "disk", "4M", "--allow-shrink"],
        "in use",
    );
    let grown = daemon.cli(&["image", "resize", "disk", "20M"]);
    assert_eq!(grown["in_use"], true);
    let out = guest.wait();
    out.expect_ok();
    assert_eq!(out.value("size_before"), Some("20480"), "{}", out.console);
    assert_eq!(out.value("size_after"), Some("40960"), "{}", out.console);
    assert_eq!(out.value("new_zeros"), Some("yes"), "{}", out.console);
    assert_eq!(out.value("old_kept"), Some("yes"), "{}", out.console);
    assert_eq!(out.value("new_back"), Some("yes"), "{}", out.console);
    assert_eq!(out.value("new_write"), None, "{}", out.console);
    assert_eq!(out.value("busy_errors"), Some("0"), "{}", out.console);
    let rounds: u32 = out.expect_value("busy_rounds").parse().unwrap();
    assert!(rounds >= 1, "the I/O loop ran across the resize");
    // On the host too: the guest's write to the new space is in the image.
    let bytes = exported(&daemon, &dir, "disk");
    assert_eq!(bytes.len(), 20 * MIB);
    let part = dir.join("new.part");
    std::fs::write(&part, &bytes[18 * MIB..]).unwrap();
    assert_eq!(
        common::md5_prefix(&part, 2 * MIB),
        out.expect_value("new_md5")
    );
}

/// Bytes of a 64 KiB write that tell blocks and rounds apart.
fn pattern(block: u64, round: u8) -> Vec<u8> {
    (0..64 << 10)
        .map(|i: u32| (i as u8) ^ (block as u8).wrapping_mul(7) ^ round)
        .collect()
}

/// With etcd: an image owned by a with copies on a and b grows while a client is connected
/// to a. b learns the new size from etcd and takes its copy of the new blocks (the writes
/// leave every copy in sync); once a's copy is gone, b serves them, and the old data.
#[test]
fn a_holder_on_another_node_serves_the_new_blocks() {
    use cormorant_frontend::{BlkClient, ClientOptions};
    if !tools_available(&["etcd", "etcdctl"]) {
        return;
    }
    let dir = TestDir::new();
    let (_etcd, cluster) = common::etcd_cluster(dir.path(), 2);
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    // 3.5 blocks of 1 MiB: the last one is short.
    a.create_image("r", "3584K", "1M", &["a:ram", "b:ram"]);
    let mut client = BlkClient::connect(a.socket("r"), &ClientOptions::default()).unwrap();
    for block in 0..3u64 {
        assert_eq!(
            client.write(0, block * 2048, &pattern(block, 1)).unwrap(),
            0
        );
    }
    // Past the end: refused before the resize.
    assert_ne!(client.write(0, 7 * 2048, &pattern(7, 1)).unwrap(), 0);
    let grown = a.cli(&["image", "resize", "r", "8M"]);
    assert_eq!(grown["blocks"], 8);
    // The connected client's requests are checked against the new size at once; the old
    // short block's new half and the new blocks take writes on both copies.
    let spots: Vec<u64> = vec![3 * 2048 + 1024, 4 * 2048, 6 * 2048, 7 * 2048 + 1920];
    for (i, &sector) in spots.iter().enumerate() {
        let status = client.write(0, sector, &pattern(sector, 2)).unwrap();
        assert_eq!(status, 0, "write {i} at sector {sector}");
    }
    assert_eq!(client.flush(0).unwrap(), 0);
    let info = a.cli(&["image", "info", "r"]);
    assert_eq!(info["size"], 8u64 << 20);
    for block in info["blocks"].as_array().unwrap() {
        for location in block["locations"].as_array().unwrap() {
            assert_eq!(location["synced"], true, "{block}");
        }
    }
    assert!(
        b.block_file("ram", "r", 6).exists(),
        "b holds its copy of a new block"
    );
    a.cli(&["location", "rm", "r", "--at", "a:ram"]);
    for block in 0..3u64 {
        let (status, data) = client.read(0, block * 2048, 64 << 10).unwrap();
        assert_eq!(status, 0);
        assert!(data == pattern(block, 1), "old block {block} from b");
    }
    for &sector in &spots {
        let (status, data) = client.read(0, sector, 64 << 10).unwrap();
        assert_eq!(status, 0);
        assert!(
            data == pattern(sector, 2),
            "new data at sector {sector} from b"
        );
    }
    let (status, data) = client.read(0, 5 * 2048, 64 << 10).unwrap();
    assert_eq!(status, 0);
    assert!(
        data.iter().all(|&x| x == 0),
        "unwritten new space reads zeros"
    );
    assert_eq!(b.cli(&["image", "info", "r"])["size"], 8u64 << 20);

    // Across extents records (2048 blocks each): a shrink drops the records past the end,
    // so etcd's view stays whole for every node; growing again adds them back.
    a.create_image("s", "3G", "1M", &["a:ram", "b:ram"]);
    a.cli(&["image", "resize", "s", "1G", "--allow-shrink"]);
    let on_b = |size: u64| {
        common::wait_until(Duration::from_secs(10), || {
            b.cli(&["image", "info", "s"])["size"] == size
        })
    };
    assert!(on_b(1 << 30));
    a.cli(&["image", "resize", "s", "5G"]);
    assert!(on_b(5 << 30));
    let blocks = b.cli(&["image", "info", "s"])["blocks"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(blocks, 5120);
}
