//! Proves the guest harness (tests/common) against qemu-storage-daemon, a backend known to work:
//! data a real guest writes through vhost-user-blk reads back in the guest and lands in the
//! image file on the host.

mod common;

use common::guest::{Disk, Guest, GuestOpts};
use common::qsd::{Qsd, QsdOpts};
use common::{md5_prefix, tools_available, TestDir};
use std::fs::File;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn raw_image(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

/// Writes 4 MiB of random data to /dev/vda with O_DIRECT, reads it back with O_DIRECT and
/// compares; the host then checks the image file holds the same bytes.
#[test]
fn guest_writes_and_reads_back_through_qsd() {
    if !tools_available(&["qemu-system-x86_64", "qemu-storage-daemon"]) {
        return;
    }
    let dir = TestDir::new();
    let image = dir.join("disk.raw");
    raw_image(&image, 64 * MIB);
    let qsd = Qsd::start(&image, &dir.join("qsd.sock"), &QsdOpts::default());

    let script = r#"
set -e
dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
dd if=/tmp/data of=/dev/vda bs=1M count=4 oflag=direct 2>/dev/null
dd if=/dev/vda of=/tmp/back bs=1M count=4 iflag=direct 2>/dev/null
a=$(md5sum < /tmp/data | cut -d' ' -f1)
b=$(md5sum < /tmp/back | cut -d' ' -f1)
echo "RESULT md5=$a"
echo "RESULT sectors=$(cat /sys/block/vda/size)"
if [ "$a" = "$b" ]; then echo "RESULT match=yes"; else echo "RESULT match=no"; fi
"#;
    let out = Guest::run(&GuestOpts::new(dir.path(), script).disk(Disk::new(&qsd.socket)));
    out.expect_ok();
    assert_eq!(out.value("match"), Some("yes"), "{}", out.console);
    assert_eq!(out.value("sectors"), Some("131072"));
    qsd.stop();
    assert_eq!(md5_prefix(&image, 4 << 20), out.expect_value("md5"));
}

/// Two disks, the second with two queues and a guest with two vCPUs: both queues carry I/O
/// (one writer pinned to each vCPU), and the disks appear in the order given.
#[test]
fn guest_with_two_disks_and_two_queues() {
    if !tools_available(&["qemu-system-x86_64", "qemu-storage-daemon"]) {
        return;
    }
    let dir = TestDir::new();
    let (img_a, img_b) = (dir.join("a.raw"), dir.join("b.raw"));
    raw_image(&img_a, 64 * MIB);
    raw_image(&img_b, 32 * MIB);
    let qsd_a = Qsd::start(&img_a, &dir.join("a.sock"), &QsdOpts::default());
    let qsd_b = Qsd::start(&img_b, &dir.join("b.sock"), &QsdOpts::default().queues(2));

    let script = r#"
set -e
echo "RESULT sectors_a=$(cat /sys/block/vda/size)"
echo "RESULT sectors_b=$(cat /sys/block/vdb/size)"
echo "RESULT queues_b=$(ls /sys/block/vdb/mq | wc -l)"
dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
# One writer per vCPU, hence per queue: each writes half of the 4 MiB.
taskset 1 dd if=/tmp/data of=/dev/vdb bs=1M count=2 oflag=direct 2>/dev/null &
taskset 2 dd if=/tmp/data of=/dev/vdb bs=1M skip=2 seek=2 count=2 oflag=direct 2>/dev/null &
wait
dd if=/tmp/data of=/dev/vda bs=1M count=4 oflag=direct 2>/dev/null
dd if=/dev/vdb of=/tmp/back bs=1M count=4 iflag=direct 2>/dev/null
a=$(md5sum < /tmp/data | cut -d' ' -f1)
b=$(md5sum < /tmp/back | cut -d' ' -f1)
echo "RESULT md5=$a"
if [ "$a" = "$b" ]; then echo "RESULT match=yes"; else echo "RESULT match=no"; fi
# Completions per queue: each queue has its own MSI-X vector, named virtioN-req.Q.
dev=$(basename "$(readlink /sys/block/vdb/device)")
for q in 0 1; do
    n=$(awk -v n="$dev-req.$q" '$NF == n { s = 0; for (i = 2; $i ~ /^[0-9]+$/; i++) s += $i; print s }' /proc/interrupts)
    echo "RESULT irqs_$q=$n"
done
"#;
    let out = Guest::run(
        &GuestOpts::new(dir.path(), script)
            .cpus(2)
            .disk(Disk::new(&qsd_a.socket))
            .disk(Disk::new(&qsd_b.socket).queues(2)),
    );
    out.expect_ok();
    assert_eq!(
        out.value("sectors_a"),
        Some("131072"),
        "vda is the first disk"
    );
    assert_eq!(
        out.value("sectors_b"),
        Some("65536"),
        "vdb is the second disk"
    );
    assert_eq!(out.value("queues_b"), Some("2"), "{}", out.console);
    assert_eq!(out.value("match"), Some("yes"), "{}", out.console);
    for q in ["irqs_0", "irqs_1"] {
        let n: u64 = out.expect_value(q).parse().unwrap();
        assert!(n > 1, "vdb queue {q} carried no I/O:\n{}", out.console);
    }
    qsd_a.stop();
    qsd_b.stop();
    let md5 = out.expect_value("md5");
    assert_eq!(md5_prefix(&img_a, 4 << 20), md5);
    assert_eq!(md5_prefix(&img_b, 4 << 20), md5);
}
